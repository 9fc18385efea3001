"""Reuse across builds (pipeline.reuse): sweeps that encode each image once and ask each request
once, an update that encodes only new and replaced images, a model file changed in place that
invalidates encode reuse, reuse into an s3 output, and the refusals. Every reusing build is
compared with an independent from-scratch build of the same config (tests.tables.assert_same_build).

The builds run in the test's process on the session Ray, on the demo images (104), with the
OpenAI-compatible fake server counting the LLM requests."""

import csv
import json
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.fake_openai_server import FakeOpenAIServer
from pipeline.config import BuildConfig, ConfigError, load_config
from pipeline.contract import STATE
from pipeline.demo.run import demo_build_config
from pipeline.fingerprint import fingerprints
from pipeline.graph import Build
from pipeline.reuse import PREVIOUS, EarlierBuild, matching
from pipeline.sweep import main as sweep_main
from tests.s3_server import client, download, storage_keys
from tests.tables import assert_same_build, markdown_rows

BASE = ["encoder.num_gpus=1", "encoder.num_cpus=0.25", "report=false"]
T_FREQS = (0.003, 0.01, 0.03)
METADATA = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"


def llm_keys(server: FakeOpenAIServer) -> list[str]:
    return ["annotate.llm.kind=openai", f"annotate.llm.base_url={server.base_url}", "annotate.llm.model=fake-vlm",
            "annotate.max_in_flight=4"]


def write_config(path: Path, cfg: BuildConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def twin(config: Path, out: Path, overrides: list[str]) -> dict:
    """An independent from-scratch build of a config (no reuse)."""
    return Build(load_config(BuildConfig, config, [*overrides, f"output={out}", "reuse=[]"])).run()


def requests_of(build: Path) -> set[str]:
    return set(pq.read_table(build / STATE / "items" / "requests.parquet")["request_key"].to_pylist())


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(latency_s=0.01, capacity=8) as server:
        yield server


@pytest.fixture(scope="module")
def t_freq_sweep(ray_local, demo_dir, server, tmp_path_factory):
    """The demo, swept over three contrast.t_freq values with the fake LLM: (config, sweep folder,
    sweep.json, the markers of the requests the server received)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = write_config(tmp / "base.yaml", demo_build_config(demo_dir, [*BASE, *llm_keys(server)]))
    server.reset()
    code = sweep_main(["--config", str(config), "--vary", f"contrast.t_freq={','.join(map(str, T_FREQS))}",
                       "--out", str(tmp / "sweep")])
    assert code == 0
    received = [r.marker for r in server.received]
    return config, tmp / "sweep", json.loads((tmp / "sweep" / "sweep.json").read_text()), received


def test_a_t_freq_sweep_encodes_each_image_once_and_asks_each_request_once(t_freq_sweep, server, tmp_path, capsys):
    config, sweep, result, received = t_freq_sweep
    builds = result["builds"]
    assert [b["values"] for b in builds] == [{"contrast.t_freq": t} for t in T_FREQS]
    n_images = builds[0]["images_encoded"]
    assert n_images == 104 and [b["images_encoded"] for b in builds] == [104, 0, 0]
    assert [b["images_reused"] for b in builds] == [0, 104, 104]
    assert [b["reused_whole"] for b in builds[1:]] == [["encode", "count"]] * 2  # select onwards depend on t_freq
    keys = [requests_of(sweep / b["build"]) for b in builds]
    distinct = set().union(*keys)
    assert len(received) == len(set(received)) == len(distinct) == sum(b["llm_requests"] for b in builds)
    assert builds[1]["answers_reused"] > 0 and builds[2]["answers_reused"] > 0  # a unit in two builds is asked once
    assert len(distinct) < sum(len(k) for k in keys)
    table = markdown_rows((sweep / "sweep.md").read_text())
    assert table[0][:2] == ["contrast.t_freq", "images encoded / reused"] and ["0.01", "0 / 104"] in [r[:2] for r in table]
    # Each build equals a build of its config from scratch (the first one was one).
    for b in builds[1:]:
        out = tmp_path / b["build"]
        twin(config, out, [f"contrast.t_freq={b['values']['contrast.t_freq']}"])
        assert_same_build(out, sweep / b["build"])
    # The same command again resumes the sweep: every build is finished, nothing is asked again.
    server.reset()
    capsys.readouterr()
    assert sweep_main(["--config", str(config), "--vary", f"contrast.t_freq={','.join(map(str, T_FREQS))}",
                       "--out", str(sweep)]) == 0
    assert server.received == [] and "finished earlier; nothing to redo" in capsys.readouterr().out


def test_an_images_per_prompt_sweep_reuses_encode_and_candidates_and_only_the_prompts_differ(t_freq_sweep, server,
                                                                                              tmp_path):
    config, sweep, result, _ = t_freq_sweep
    first = sweep / result["builds"][0]["build"]  # t_freq 0.003, 3 images per prompt: a from-scratch build
    server.reset()
    assert sweep_main(["--config", str(config), "--vary", "annotate.images_per_prompt=3,1", "--out", str(tmp_path / "ipp"),
                       "--set", f"reuse=[{first}]"]) == 0
    three, one = json.loads((tmp_path / "ipp" / "sweep.json").read_text())["builds"]
    assert three["reused_whole"] == one["reused_whole"] == ["encode", "count", "select", "candidates"]
    assert three["images_encoded"] == one["images_encoded"] == 0
    assert three["llm_requests"] == 0 and three["answers_reused"] == three["units"]  # the same build as `first`
    assert_same_build(first, tmp_path / "ipp" / three["build"])
    # One image per prompt: the candidates outside a complete group were single-image prompts already.
    new = requests_of(tmp_path / "ipp" / one["build"]) - requests_of(first)
    assert 0 < one["answers_reused"] and one["llm_requests"] == len(new) == len(server.received)
    twin(config, tmp_path / "twin", ["annotate.images_per_prompt=1"])
    assert_same_build(tmp_path / "twin", tmp_path / "ipp" / one["build"])
    # The paper's human comparison from the sweep's folder: a blinded review set over its builds.
    from pipeline.review.__main__ import main as review_main
    assert review_main(["sample", "--sweep", str(tmp_path / "ipp"), "--per-build", "4", "--out", str(tmp_path / "review")]) == 0
    key = json.loads((tmp_path / "review" / "key.json").read_text())
    assert [(b["label"], b["build"]) for b in key["builds"]] == [(b["build"], str(tmp_path / "ipp" / b["build"]))
                                                                 for b in (three, one)]


def test_a_unit_not_sent_is_never_reused_and_a_reused_answer_carries_this_builds_evidence(t_freq_sweep, server,
                                                                                            tmp_path):
    """A build that sent nothing (every unit under annotate.min_confidence) gives a later build no
    answer: the not-asked rows are not answers. And a reused answer's evidence and confidence are
    the reusing build's (the same request, other candidates around it: candidates.top_images)."""
    config, sweep, result, _ = t_freq_sweep
    first = sweep / result["builds"][0]["build"]
    server.reset()
    stingy = Build(load_config(BuildConfig, config, ["annotate.min_confidence=1.0", f"output={tmp_path / 'stingy'}",
                                                     "reuse=[]"])).run()
    assert server.received == [] and set(stingy["summary"]["annotations"]) <= {"low_confidence", "background"}
    generous = Build(load_config(BuildConfig, config, [f"output={tmp_path / 'generous'}", f"reuse=[{tmp_path / 'stingy'}]"]))
    manifest = generous.run()
    assert manifest["summary"]["annotations_reused"] == 0 and len(server.received) == manifest["stages"]["annotate"][
        "computed"]["llm_requests"] > 0
    assert_same_build(first, tmp_path / "generous")
    # Fewer images per pair: other pair evidence around the same first consensus groups.
    server.reset()
    fewer = Build(load_config(BuildConfig, config, ["candidates.top_images=6", f"output={tmp_path / 'fewer'}",
                                                    f"reuse=[{first}]"])).run()
    assert fewer["summary"]["annotations_reused"] > 0
    twin(config, tmp_path / "fewer-twin", ["candidates.top_images=6"])
    assert_same_build(tmp_path / "fewer-twin", tmp_path / "fewer")


def source_copy(demo_dir: Path, dest: Path, keep) -> list[dict]:
    """The demo's data at ``dest`` (file times kept), its metadata cut to the rows ``keep(i)`` holds."""
    shutil.copytree(demo_dir / "data", dest)
    with open(demo_dir / "data" / METADATA, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(dest / METADATA, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for i, r in enumerate(rows) if keep(i))
    return rows


def test_an_update_encodes_only_added_and_replaced_images_and_equals_a_build_from_scratch(ray_local, demo_dir,
                                                                                          tmp_path, capsys):
    from pipeline.build import main

    source = tmp_path / "data"
    rows = source_copy(demo_dir, source, keep=lambda i: i % 5 != 4)  # 80 % of the images
    models = tmp_path / "models"
    shutil.copytree(demo_dir / "models", models)
    out = tmp_path / "build"
    config = write_config(tmp_path / "build.yaml", demo_build_config(demo_dir, [
        *BASE, f"source.root={source}", f"backbone.model={models / 'dinov2-tiny'}", f"sae.checkpoint={models / 'sae'}",
        f"output={out}"]))
    assert main(["--config", str(config)]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["summary"]["images_encoded"] == sum(i % 5 != 4 for i in range(len(rows)))

    shutil.copy(demo_dir / "data" / METADATA, source / METADATA)  # the other 20 % are added
    replaced = next(source.rglob(f"{rows[0]['processid']}.jpg"))
    replaced.write_bytes(next(source.rglob(f"{rows[1]['processid']}.jpg")).read_bytes())  # one image replaced
    capsys.readouterr()
    assert main(["--config", str(config), "--update"]) == 0
    console = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    added = len(rows) - first["summary"]["images_encoded"]
    assert manifest["summary"]["images_encoded"] == added + 1, console
    assert manifest["summary"]["images_reused"] == len(rows) - added - 1
    assert manifest["stages"]["encode"]["reused"]["from"][0]["path"] == f"{out} (before this update)"
    assert "update: the build in" in console and not (out / PREVIOUS).exists()
    scratch = tmp_path / "scratch"
    twin(config, scratch, [])
    assert_same_build(scratch, out)
    # A changed config is still refused on the same output, pointing at reuse.
    assert main(["--config", str(config), "--update", "--set", "contrast.t_freq=0.01"]) == 2
    assert f"--reuse {out}" in capsys.readouterr().err

    # The SAE's, then the backbone's weights changed in place (same path and size, new bytes): no
    # image's encode key matches the build's any more, nor its encode stage's fingerprint.
    cfg = load_config(BuildConfig, config)
    index = pq.read_table(out / STATE / "index")
    earlier = EarlierBuild(str(out), None)
    before = fingerprints(cfg, index)
    assert earlier.fingerprint("encode") == before.stages["encode"]
    assert pa.compute.all(matching(before.images, "encode_key", earlier.keys("images"))).as_py()
    for weights in (models / "sae" / "model.safetensors", models / "dinov2-tiny" / "model.safetensors"):
        original = weights.read_bytes()
        weights.write_bytes(original[:-8] + bytes(b ^ 0xFF for b in original[-8:]))
        after = fingerprints(cfg, index)
        assert after.stages["encode"] != before.stages["encode"] and after.stages["index"] == before.stages["index"]
        assert not pa.compute.any(matching(after.images, "encode_key", earlier.keys("images"))).as_py(), weights
        weights.write_bytes(original)  # the same bytes again (a new mtime): a content digest, so reusable again
        assert fingerprints(cfg, index) == before


def test_a_sweep_orders_its_builds_for_reuse_and_refuses_a_bad_vary_naming_the_key(demo_dir, tmp_path, capsys):
    from pipeline.sweep import plan

    builds = plan([("annotate.images_per_prompt", [1, 3]), ("sae.checkpoint", ["/m/sae-a1/", "/m/sae-a3"])])
    assert [name for name, _ in builds] == ["checkpoint=sae-a1_images_per_prompt=1", "checkpoint=sae-a1_images_per_prompt=3",
                                            "checkpoint=sae-a3_images_per_prompt=1", "checkpoint=sae-a3_images_per_prompt=3"]
    config = write_config(tmp_path / "base.yaml", demo_build_config(demo_dir, BASE))
    for vary, said in (("contrast.t_frq=0.1,0.2", "contrast.t_frq"), ("contrast.t_freq=0.1,0.1", "given twice"),
                       ("contrast.t_freq", "KEY=VALUE1,VALUE2"), ("contrast.t_freq=-1,0.1", "contrast.t_freq")):
        assert sweep_main(["--config", str(config), "--vary", vary, "--out", str(tmp_path / "sweep")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_reuse_is_refused_naming_the_path_when_it_cannot_be_trusted(demo_dir, demo_build, tmp_path):
    clean, _ = demo_build
    with pytest.raises(ConfigError, match=f"reuse: {tmp_path / 'none'} cannot be reused: .*no manifest.json"):
        EarlierBuild(str(tmp_path / "none"), None)
    with pytest.raises(ConfigError, match="is this build's own output"):
        EarlierBuild(str(clean), None, own_output=str(clean))
    older = tmp_path / "older"
    shutil.copytree(clean, older, copy_function=__import__("os").link)
    manifest = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").unlink()
    (older / "manifest.json").write_text(json.dumps({**manifest, "contract": "0"}))
    with pytest.raises(ConfigError, match=f"reuse: {older} was written under data-contract version 0"):
        EarlierBuild(str(older), None)
    with pytest.raises(ConfigError, match=f"--update: the build in {older} cannot be updated .*--overwrite"):
        Build(demo_build_config(demo_dir, [f"output={older}", "encoder.num_gpus=1", "encoder.num_cpus=0.25"])).run(update=True)
    assert (older / "manifest.json").exists() and not (older / PREVIOUS).exists()  # nothing moved
    (older / "manifest.json").write_text(json.dumps(manifest))
    file = sorted((older / "activations").glob("*.parquet"))[0]
    table = pq.read_table(file)
    file.unlink()  # a hard link: the clean build's file stays
    pq.write_table(table.set_column(table.schema.get_field_index("n_firings"), "n_firings",
                                    table["n_firings"].cast(pa.int64())), file)
    earlier = EarlierBuild(str(older), None)
    with pytest.raises(ConfigError, match=rf"reuse: {older}: activations/{file.name} does not have the schema .*n_firings \(int64\)"):
        list(earlier.tables("activations"))


def test_a_build_on_s3_reuses_local_and_s3_builds(ray_local, demo_dir, demo_build, s3_server, tmp_path):
    """The demo's config into s3 twice: from the local clean build (copied through this process),
    then from that s3 build (a server-side copy); both equal the clean build."""
    clean, _ = demo_build
    run = uuid.uuid4().hex[:8]
    fs = client(s3_server)
    fs.mkdir(f"reuse-{run}")
    keys = [*BASE, *storage_keys(s3_server)]
    for name, earlier in (("a", str(clean)), ("b", f"s3://reuse-{run}/a")):
        manifest = Build(demo_build_config(demo_dir, [*keys, f"output=s3://reuse-{run}/{name}", f"reuse=[{earlier}]"])).run()
        assert all(manifest["stages"][s]["reused"]["whole"] for s in ("encode", "count", "select", "candidates"))
        assert manifest["stages"]["encode"]["reused"]["from"][0]["path"] == earlier
        assert manifest["summary"]["images_encoded"] == 0 and manifest["summary"]["images_reused"] == 104
        assert manifest["summary"]["annotations_reused"] == manifest["stages"]["annotate"]["rows"] > 0
        assert_same_build(clean, download(fs, f"reuse-{run}/{name}", tmp_path / name))
    # An update's snapshot on s3: each object copied, then deleted; a move cut short is finished by running it again.
    from pipeline import storage
    objects = sorted(p.removeprefix(f"reuse-{run}/b/") for p in fs.find(f"reuse-{run}/b"))
    storage.move(fs, f"reuse-{run}/b/activations", f"reuse-{run}/moved/activations")  # as if killed after one folder
    storage.move(fs, f"reuse-{run}/b", f"reuse-{run}/moved")
    assert sorted(p.removeprefix(f"reuse-{run}/moved/") for p in fs.find(f"reuse-{run}/moved")) == objects
    assert not fs.find(f"reuse-{run}/b")
