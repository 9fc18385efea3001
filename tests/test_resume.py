"""Resume: a build whose driver is killed (SIGKILL, mid-stage) and started again with the same
config and output finishes with the same tables as an uninterrupted build; finished stages and
written shards are not redone, and the annotate stage never asks twice for an answer it wrote.

The killed drivers are real `python -m pipeline.build` processes joined to the session's local
Ray (as `ray job submit` drivers join a cluster), so killing one leaves the cluster running."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from benchmarks.fake_openai_server import FakeOpenAIServer
from pipeline.graph import Build
from pipeline.contract import STATE
from pipeline.lease import LEASE
from pipeline.errors import compact_errors
from pipeline.config import ConfigError
from pipeline.demo.run import demo_build_config
from pipeline.contract import ERRORS_SCHEMA
from tests.s3_server import client, download, storage_keys, upload
from tests.tables import assert_same_build

REPO = Path(__file__).resolve().parents[1]
BASE = ["encoder.num_gpus=1", "encoder.num_cpus=0.25", "report=false"]


def write_config(demo_dir, path: Path, overrides: list[str]) -> Path:
    cfg = demo_build_config(demo_dir, BASE + overrides)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def driver(config: Path, address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.build", "--config", str(config), "--set", f"ray.address={address}"],
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def held_by_tasks() -> dict[str, float]:
    """CPUs and GPUs that running tasks and actors hold in the session's cluster."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return {k: total[k] - free.get(k, 0.0) for k in ("CPU", "GPU") if k in total}


def kill_when(proc: subprocess.Popen, timeout_s: float, ready) -> None:
    """SIGKILL the driver (and anything it started) as soon as ``ready()``; fails if it finished first.
    Returns once the cluster has stopped the killed job's actors and tasks (their resources are free
    again): until then they may still write a shard, which the caller must count as written."""
    before = held_by_tasks()
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the build finished before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while held_by_tasks() != before:
        assert time.monotonic() < deadline, f"the killed job's workers still hold {held_by_tasks()}"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode} (killed after {timeout_s:.0f} s if -9):\n{text[-4000:]}"
    return text


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def ids_in(folder: Path, column: str) -> set[str]:
    """Ids in the complete files of a folder (the kill may have cut one off mid-write)."""
    ids = set()
    for f in parquet_files(folder):
        try:
            ids.update(pq.read_table(f, columns=[column]).column(0).to_pylist())
        except (pa.ArrowInvalid, OSError):
            pass
    return ids


def done(out: Path, stage: str) -> bool:
    return (out / STATE / "stages" / f"{stage}.json").exists()


@pytest.fixture(scope="module")
def address(ray_local):
    return ray_local.get_runtime_context().gcs_address


def from_finished_candidates(clean: Path, out: Path, config: Path) -> None:
    """A copy of the clean build in the state a build is in when the annotate stage starts
    (index..candidates finished), recorded with ``config`` — saves redoing the encoder stages."""
    shutil.copytree(clean, out, ignore=shutil.ignore_patterns("traits", "report", "manifest.json", "annotate.json"))
    (out / STATE / "config.json").write_text(json.dumps(yaml.safe_load(config.read_text())))


def test_driver_killed_during_encode_resumes_without_loss(address, demo_dir, demo_build, units, load_factor, tmp_path):
    clean, _ = demo_build
    out = tmp_path / "build"
    # Encoder batches of 4: one activations/ file per batch (26 in all), so the encode stage can be cut
    # between them (decode batches of 4 too, or one decode task would feed 4 shards at once).
    config = write_config(demo_dir, tmp_path / "build.yaml", [f"output={out}", "encoder.batch_size=4",
                                                              "preprocess.batch_size=4"])
    kill_when(driver(config, address, tmp_path / "run1.log"),
              300 * load_factor, lambda: len(parquet_files(out / "activations")) >= 1 and not done(out, "encode"))
    assert not done(out, "encode")
    written = ids_in(out / "activations", "image_id")
    # A file cut off mid-write by the kill (no footer): the resumed build must drop it, not trust it.
    cut = out / "activations" / "zz-cut-off.parquet"
    whole = parquet_files(out / "activations")[0].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])

    text = finish(driver(config, address, tmp_path / "run2.log"), tmp_path / "run2.log", 400 * load_factor)
    assert "stage index: done in an earlier run" in text
    assert f"stage encode: resuming, {len(written)} rows written earlier, {104 - len(written)} to do" in text
    assert 0 < len(written) < 104 and not cut.exists()
    assert_same_build(clean, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] and manifest["stages"]["index"]["resumed"] and not manifest["stages"]["encode"].get("resumed")
    assert manifest["summary"]["images_encoded"] == 104 and manifest["summary"]["annotations"] == demo_build[1]["summary"]["annotations"]


@pytest.fixture(scope="module")
def units(demo_build) -> int:
    """How many requests an uninterrupted build pays for: the clean build's units less those never sent
    (no zone on the specimen). Counted from the build, not written down: the evidence that decides
    which zones go forward is measured with the demo's SAE, trained in this run."""
    clean, _ = demo_build
    traits = pq.read_table(clean / "traits", columns=["model"]).column("model").to_pylist()
    sent = sum(1 for model in traits if model is not None)  # a unit never sent has no model
    assert sent > 50, f"{sent} of {len(traits)} demo units sent"
    return sent


def llm_keys(server: FakeOpenAIServer) -> list[str]:
    return ["annotate.llm.kind=openai", f"annotate.llm.base_url={server.base_url}", "annotate.llm.model=fake-vlm",
            "annotate.max_in_flight=2"]


@pytest.fixture(scope="module")
def llm_reference(address, demo_dir, demo_build, units, load_factor, tmp_path_factory) -> Path:
    """An uninterrupted build's annotate stage with the fake OpenAI server, from the clean build's
    finished candidates: the reference of the tests below (answers depend on the unit, not the server)."""
    clean, _ = demo_build
    tmp = tmp_path_factory.mktemp("llm-reference")
    with FakeOpenAIServer(latency_s=0.1, capacity=4) as server:
        ref = tmp / "ref"
        from_finished_candidates(clean, ref, write_config(demo_dir, tmp / "ref.yaml", [f"output={ref}", *llm_keys(server)]))
        finish(driver(tmp / "ref.yaml", address, tmp / "ref.log"), tmp / "ref.log", 400 * load_factor)
        assert len({r.marker for r in server.received}) == units == len(server.received)
    return ref


def test_driver_killed_during_annotate_never_pays_twice(address, demo_dir, demo_build, units, llm_reference, load_factor,
                                                        tmp_path, capsys):
    """... and its rerun takes over the dead driver's lease at once (same machine, its pid gone)."""
    clean, _ = demo_build
    with FakeOpenAIServer(latency_s=0.1, capacity=4) as server:
        out = tmp_path / "build"
        config = write_config(demo_dir, tmp_path / "build.yaml", [f"output={out}", *llm_keys(server)])
        from_finished_candidates(clean, out, config)
        first = driver(config, address, tmp_path / "run1.log")
        kill_when(first, 300 * load_factor, lambda: len(parquet_files(out / "traits")) >= 2)
        killed = time.monotonic()
        asked_first = {r.marker for r in server.received}
        written = ids_in(out / "traits", "annotation_id")
        assert 0 < len(written) < units and written <= asked_first
        assert list((out / LEASE).glob("*.json")), "the killed driver's lease record is gone"

        server.reset()
        time.sleep(max(0.0, 3 - (time.monotonic() - killed)))  # rerun 3 s after the kill, as a user would
        start = time.monotonic()
        rerun = driver(config, address, tmp_path / "run2.log")
        while "taking over" not in (tmp_path / "run2.log").read_text() and rerun.poll() is None:
            time.sleep(0.05)
        took_over_s = time.monotonic() - start
        text = finish(rerun, tmp_path / "run2.log", 400 * load_factor)
        with capsys.disabled():
            print(f"\n[one writer] a killed driver's lease taken over {took_over_s:.2f} s after the rerun started")
        assert f"[sae-traits] output: taking over from build pid {first.pid} on host " in text
        assert f"its process (pid {first.pid} on this machine) has exited" in text
        assert took_over_s < 5 * load_factor
        asked_again = [r.marker for r in server.received]
        assert f"stage annotate: resuming, {len(written)} rows written earlier" in text
        assert not written & set(asked_again), "paid twice for answers already written"
        assert len(asked_again) == len(set(asked_again)) == units - len(written)
    assert_same_build(llm_reference, out)


def second_driver_refused(config: Path, address: str, tmp_path: Path, lease_held, load_factor: float, capsys) -> str:
    """Start a build, then the same command again once the first holds the output's lease: the
    second must stop within 5 s (exit 4) naming the first; the first must finish. Returns its log."""
    first = driver(config, address, tmp_path / "first.log")
    deadline = time.monotonic() + 120 * load_factor
    while not lease_held():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "pipeline.build", "--config", str(config), "--set",
                             f"ray.address={address}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert first.poll() is None, "the first build had finished before the second was refused"
    text = finish(first, tmp_path / "first.log", 400 * load_factor)
    error = second.stderr.strip().splitlines()
    with capsys.disabled():
        print(f"\n[one writer] second driver refused in {took:.2f} s (exit {second.returncode}):\n  {error[-1]}")
    assert second.returncode == 4, second.stderr[-3000:]
    assert took < 5 * load_factor
    assert error[-1].startswith("error: another build is writing ") and f": pid {first.pid} on host " in error[-1]
    assert "Traceback" not in second.stderr and "stage " not in second.stdout
    return text


def test_a_second_build_on_the_same_output_is_refused_and_the_first_pays_once(address, demo_dir, demo_build, units,
                                                                             llm_reference, load_factor, tmp_path, capsys):
    clean, _ = demo_build
    with FakeOpenAIServer(latency_s=0.05, capacity=4) as server:
        out = tmp_path / "build"
        config = write_config(demo_dir, tmp_path / "build.yaml", [f"output={out}", *llm_keys(server)])
        from_finished_candidates(clean, out, config)
        second_driver_refused(config, address, tmp_path, lambda: any((out / LEASE).glob("*.json")), load_factor, capsys)
        asked = [r.marker for r in server.received]
        assert len(asked) == len(set(asked)) == units, "one LLM request per unit"
    assert_same_build(llm_reference, out)
    assert not list((out / LEASE).glob("*.json")), "the lease is released when the build ends"


def test_a_second_build_on_the_same_s3_output_is_refused(address, demo_dir, demo_build, units, llm_reference, load_factor,
                                                         s3_server, tmp_path, capsys):
    """The same on s3:// (the moto server): the lease record is created with a conditional PutObject."""
    clean, _ = demo_build
    fs = client(s3_server)
    if not fs.exists("one-writer"):
        fs.mkdir("one-writer")
    remote = f"one-writer/{uuid.uuid4().hex[:8]}"
    with FakeOpenAIServer(latency_s=0.05, capacity=4) as server:
        config = write_config(demo_dir, tmp_path / "build.yaml",
                              [f"output=s3://{remote}", *llm_keys(server), *storage_keys(s3_server)])
        from_finished_candidates(clean, tmp_path / "staged", config)
        upload(fs, tmp_path / "staged", remote)
        second_driver_refused(config, address, tmp_path, lambda: bool(fs.find(f"{remote}/{LEASE}")), load_factor, capsys)
        asked = [r.marker for r in server.received]
        assert len(asked) == len(set(asked)) == units, "one LLM request per unit"
    assert_same_build(llm_reference, download(fs, remote, tmp_path / "downloaded"))
    assert not fs.find(f"{remote}/{LEASE}")


def test_rerun_of_a_finished_build_redoes_nothing(demo_dir, demo_build, tmp_path, capsys):
    clean, manifest = demo_build
    out = tmp_path / "copy"
    shutil.copytree(clean, out)  # a moved build folder resumes: output is not part of what it computes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = Build(demo_build_config(demo_dir, [f"output={out}", "encoder.num_gpus=1", "encoder.batch_size=16"])).run()
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert "finished earlier; nothing to redo" in capsys.readouterr().out


def test_a_different_config_is_refused_naming_the_keys(demo_dir, demo_build, tmp_path):
    clean, _ = demo_build
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    cfg = demo_build_config(demo_dir, [f"output={out}", "contrast.t_freq=0.01", "candidates.top_images=6"])
    with pytest.raises(ConfigError) as err:
        Build(cfg).run()
    message = str(err.value)
    assert "contrast.t_freq: 0.003 → 0.01" in message and "candidates.top_images: 9 → 6" in message
    assert "--overwrite" in message and "encoder" not in message
    # --overwrite starts again: the old build is gone and the new config is the one recorded.
    Build(cfg).open_output(overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [STATE]
    assert json.loads((out / STATE / "config.json").read_text())["contrast"]["t_freq"] == 0.01


def test_a_folder_of_another_kind_is_refused(demo_dir, tmp_path):
    (tmp_path / "out" / "traits").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds files of another build"):
        Build(demo_build_config(demo_dir, [f"output={tmp_path / 'out'}"])).run()


def test_unfinished_cheap_stages_are_cleared_and_redone(ray_local, demo_dir, demo_build, tmp_path):
    """Killed inside count / candidates: what they left (a cut-off file, stray rows) is cleared."""
    clean, _ = demo_build
    out = tmp_path / "build"
    shutil.copytree(clean, out, ignore=shutil.ignore_patterns("selected", "traits", "report", "manifest.json",
                                                               "select.json", "candidates.json", "annotate.json"))
    (out / "counts" / "zz-cut-off.parquet").write_bytes(b"PAR1 truncated")
    (out / STATE / "stages" / "count.json").unlink()
    stray = pq.read_table(clean / "candidates").slice(0, 5)
    pq.write_table(stray, out / "candidates" / "zz-stray.parquet")
    Build(demo_build_config(demo_dir, [f"output={out}", *BASE])).run()
    assert not (out / "counts" / "zz-cut-off.parquet").exists() and not (out / "candidates" / "zz-stray.parquet").exists()
    assert_same_build(clean, out)


def test_errors_are_compacted_once_per_rejected_row(tmp_path):
    """A resumed encode stage retries an image it rejected before (it was never written): errors/
    keeps one row per (stage, image, annotation)."""
    rows = [{"image_id": "a", "annotation_id": None, "stage": "decode", "reason": "truncated", "detail": ""},
            {"image_id": "b", "annotation_id": None, "stage": "decode", "reason": "missing_file", "detail": ""},
            {"image_id": None, "annotation_id": "x", "stage": "annotate", "reason": "llm_http_500", "detail": ""}]
    folder = tmp_path / "errors"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), folder / "decode-1.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1] + rows[2:], schema=ERRORS_SCHEMA), folder / "decode-2.parquet")
    from pipeline import storage

    fs, root = storage.filesystem(str(folder))
    compacted = compact_errors(fs, root)
    assert sorted(p.name for p in folder.iterdir()) == ["errors.parquet"]
    assert pq.read_table(folder).to_pylist() == compacted.to_pylist()
    assert sorted((r["stage"], r["image_id"] or r["annotation_id"]) for r in compacted.to_pylist()) == [
        ("annotate", "x"), ("decode", "a"), ("decode", "b")]
    assert compact_errors(fs, root).num_rows == 3  # idempotent


def test_killed_while_finishing_redoes_only_the_finish(demo_dir, demo_build, tmp_path, capsys):
    """Killed while writing the manifest: files are published whole (written beside, then renamed),
    so what is left is a stray .partial file; the rerun redoes only the summary and manifest."""
    clean, manifest = demo_build
    out = tmp_path / "copy"
    shutil.copytree(clean, out, ignore=shutil.ignore_patterns("manifest.json", "report"))
    (out / "manifest.json.partial").write_text('{"status": "succ')
    again = Build(demo_build_config(demo_dir, [f"output={out}", *BASE])).run()
    assert all(again["stages"][name]["resumed"] for name in again["summary"]["stages"])
    assert again["summary"] == {**manifest["summary"], "stages": {
        name: {**s, "resumed": True} for name, s in manifest["summary"]["stages"].items()}}
    assert json.loads((out / "manifest.json").read_text())["status"] == "succeeded"
    assert "done in an earlier run" in capsys.readouterr().out
    assert_same_build(clean, out)
