"""Stage fingerprints (pipeline.fingerprint): a stage's changes exactly when something its rows
depend on changes — a config key it reads, a stage it reads, the bytes of an image, the backbone's
or the SAE's files — and never for a runtime key; a build records them in its markers and manifest."""

import json
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

from pipeline import fingerprint, storage
from pipeline.contract import STAGES, STATE
from pipeline.demo.run import demo_build_config
from pipeline.fingerprint import fingerprints, key_values

NAMES = [stage.name for stage in STAGES]


def stage_fingerprints(cfg, index) -> dict[str, str]:
    return fingerprints(cfg, index).stages


@pytest.fixture
def demo(demo_dir, demo_build, tmp_path, monkeypatch):
    """(config overrides → BuildConfig, the demo build's index), with a digest cache of this test."""
    monkeypatch.setenv("SAE_TRAITS_CACHE", str(tmp_path / "cache"))
    out, _ = demo_build
    index = pq.read_table(out / STATE / "index")
    return (lambda *keys: demo_build_config(demo_dir, [f"output={tmp_path / 'out'}", *keys])), index


def changed(a: dict, b: dict) -> list[str]:
    return [name for name in NAMES if a[name] != b[name]]


def test_key_values_leave_runtime_keys_out():
    config = {"encoder": {"batch_size": 8, "num_gpus": 1}, "sae": {"threshold": 0.9, "checkpoint": "x"},
              "contrast": {"t_freq": 0.01, "score": "ratio"}, "output": "o"}
    assert key_values(config, ("sae", "encoder", "contrast.t_freq")) == {
        "contrast.t_freq": 0.01, "sae.checkpoint": "x", "sae.threshold": 0.9}


def test_a_stage_changes_with_what_it_reads_and_only_that(demo):
    config, index = demo
    base = stage_fingerprints(config(), index)
    assert list(base) == NAMES and len(set(base.values())) == len(NAMES)
    assert stage_fingerprints(config(), index) == base  # deterministic
    assert changed(base, stage_fingerprints(config("contrast.t_freq=0.01"), index)) == ["select", "candidates", "annotate"]
    assert changed(base, stage_fingerprints(config("annotate.images_per_prompt=1"), index)) == ["annotate"]
    assert changed(base, stage_fingerprints(config("annotate.llm.model=other"), index)) == ["annotate"]
    assert changed(base, stage_fingerprints(config("sae.threshold=0.5"), index)) == NAMES[1:]
    # How the input is decoded (nvJPEG or libjpeg) moves the firings, so encode and all after it,
    # but not the question an LLM request asks about a box (its key has the boxes).
    assert changed(base, stage_fingerprints(config("preprocess.decode=gpu"), index)) == NAMES[1:]
    assert fingerprints(config("preprocess.decode=gpu"), index).request == fingerprints(config(), index).request
    assert fingerprints(config("preprocess.image_size=112"), index).request != fingerprints(config(), index).request
    assert changed(base, stage_fingerprints(config("counting.unit=images"), index)) == ["count", "select", "candidates",
                                                                                      "annotate"]
    # Runtime keys say where and how fast, never what: no fingerprint moves.
    assert stage_fingerprints(config("encoder.batch_size=3", "annotate.max_in_flight=1", "ray.num_cpus=1",
                                     "annotate.llm.base_url=http://x/v1", "report=false"), index) == base


def test_files_changed_in_place_change_the_fingerprints_that_read_them(demo, tmp_path):
    config, index = demo
    checkpoint = config().sae.checkpoint
    local = tmp_path / "sae" / os.path.basename(checkpoint.rstrip("/"))
    (shutil.copytree if os.path.isdir(checkpoint) else shutil.copy)(checkpoint, local)
    base = stage_fingerprints(config(f"sae.checkpoint={local}"), index)
    # Same path, new content (an SAE retrained into the same place): encode and all after it.
    target = next(p for p in ([local] if local.is_file() else sorted(local.rglob("*"))) if p.is_file())
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert changed(base, stage_fingerprints(config(f"sae.checkpoint={local}"), index)) == NAMES[1:]

    # An image replaced by other bytes at the same path: the index (and so every stage).
    image, backup = index.column("path")[0].as_py(), tmp_path / "backup.jpg"
    shutil.copy2(image, backup)
    try:
        with open(image, "ab") as f:
            f.write(b"\0")
        assert changed(base, stage_fingerprints(config(f"sae.checkpoint={local}"), index)) == NAMES
    finally:
        shutil.copy2(backup, image)


def test_content_digests_are_computed_once_per_file_version(demo, tmp_path):
    import hashlib

    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 1000)
    cache = storage.cache_dir() / fingerprint.DIGESTS
    first = fingerprint.content_digest(str(path))
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [hashlib.sha256(b"x" * 1000).hexdigest()]
    cache.write_text(json.dumps({key: "cached" for key in entries}))  # a second call must read it, not hash
    assert fingerprint.content_digest(str(path)) != first
    cache.write_text(json.dumps(entries))
    assert fingerprint.content_digest(str(path)) == first
    path.write_bytes(b"y" * 1000)  # a new version of the file: hashed again
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert fingerprint.content_digest(str(path)) != first and len(json.loads(cache.read_text())) == 2


def test_a_build_records_its_stage_fingerprints(demo, demo_build):
    config, index = demo
    out, manifest = demo_build
    recorded = {name: manifest["stages"][name]["fingerprint"] for name in NAMES}
    assert recorded == {name: json.loads((out / STATE / "stages" / f"{name}.json").read_text())["fingerprint"]
                        for name in NAMES}
    assert recorded == stage_fingerprints(demo_build_config_of(manifest), index)


def demo_build_config_of(manifest: dict):
    from pipeline.config import BuildConfig

    return BuildConfig.model_validate(manifest["config"])


def test_a_resumed_stage_whose_inputs_changed_in_place_is_named(demo_build, tmp_path, capsys):
    """Its recorded fingerprint no longer matches (here: the marker says it read something else)."""
    from pipeline.config import BuildConfig
    from pipeline.graph import Build

    clean, manifest = demo_build
    out = tmp_path / "build"
    shutil.copytree(clean, out, ignore=shutil.ignore_patterns("manifest.json", "report"))
    marker = out / STATE / "stages" / "encode.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "fingerprint": "read-other-weights"}))
    cfg = BuildConfig.model_validate({**manifest["config"], "output": str(out), "report": False})
    Build(cfg).run()
    err = capsys.readouterr().err
    assert "warning: what stage encode read has changed since it ran" in err and "--overwrite redoes them" in err
    assert "stage count" not in err  # only the stage whose fingerprint differs
