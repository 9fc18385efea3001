"""The annotate stage without Ray: units, the openai backend against a faulty test server
(retried, then recorded; nothing lost, nothing duplicated), the transformers backend with a tiny
random Qwen2.5-VL, and the MLLM-only baseline switch. Batches overlap (no batch is a barrier for
the others), in the stage called from two threads and in the build's annotate pool on Ray, with the
same rows as one batch at a time."""

import asyncio
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.fake_openai_server import FakeOpenAIServer
from pipeline.annotation.stage import AnnotateUnits
from pipeline.annotation.units import annotation_id, annotation_units, prompt_version_for, unit_annotation_id
from pipeline.graph import Build, RunContext
from pipeline.config import AnnotateConfig, validate
from pipeline.demo.run import demo_build_config
from pipeline.fingerprint import fingerprints
from pipeline.storage import StorageUnavailable

CONSENSUS_ANSWER = json.dumps({
    "regions": [{"image": i, "is_background": False, "body_part": "left antennae", "traits": [
        {"attribute": "color", "value": "bright blue"}]} for i in (1, 2, 3)],
    "is_background": False, "body_part": "antenna", "common_traits": ["bright blue", "thin and elongated"]})
SINGLE_ANSWER = "**Body part:** forewing\nTraits:\n- colour: bright blue patch\n- shape: oval"


def fake_answer(marker, text, body):
    n_images = sum(p.get("type") == "image_url" for m in body["messages"] for p in m["content"])
    return CONSENSUS_ANSWER if n_images == 3 else SINGLE_ANSWER


@pytest.fixture(scope="module")
def all_units(demo_build):
    out, _ = demo_build
    return annotation_units(pq.read_table(out / "candidates").to_pylist(), images_per_prompt=3)


@pytest.fixture(scope="module")
def units(all_units):
    """The units a build sends (a pair with no zone on the specimen makes one that is never sent)."""
    return [u for u in all_units if u["grounded"]]


def stage(demo_dir, **annotate):
    cfg = demo_build_config(demo_dir)
    return AnnotateUnits(validate(AnnotateConfig, annotate), cfg.source, cfg.preprocess)


def test_units_are_complete_consensus_groups_then_single_images():
    rows = [{"species": "A a", "genus": "A", "latent": 7, "image_id": f"i{k}", "image_rank": k,
             "consensus_group": k // 3 if k < 6 else None} for k in range(8)]
    units = annotation_units(rows, images_per_prompt=3)
    assert sorted(len(u["members"]) for u in units) == [1, 1, 3, 3]
    assert [r["image_id"] for r in units[-1]["members"]] == ["i3", "i4", "i5"]  # strongest first
    assert len(annotation_units(rows, images_per_prompt=1)) == 8


def test_openai_backend_retries_then_records_failures_and_loses_nothing(demo_dir, units):
    annotate = {"llm": {"kind": "openai", "base_url": "http://x", "model": "fake-vlm", "max_retries": 2,
                        "backoff_s": 0.01, "timeout_s": 5}, "max_in_flight": 4, "save_renderings": True}
    probe = stage(demo_dir, **annotate)
    ids = [annotation_id(prompt_version_for(probe.cfg, len(u["members"])), u["species"],
                         u["latent"], [r["image_id"] for r in u["members"]]) for u in units]
    assert ids == [unit_annotation_id(probe.cfg, u) for u in units]
    doomed, flaky, garbled = set(ids[:2]), ids[2], ids[3]

    def faults(index, marker, body):
        return "http_500" if marker in doomed else None

    script = {flaky: ["http_429:0.05", "http_503"], garbled: ["malformed"]}
    with FakeOpenAIServer(latency_s=0.05, capacity=8, answer=fake_answer,
                          faults=lambda i, m, b: faults(i, m, b) or (script[m].pop(0) if script.get(m) else None)) as server:
        annotate["llm"]["base_url"] = server.base_url
        st = stage(demo_dir, **annotate)
        table, rejected = st(pa.Table.from_pylist(units))
        successes, max_processing = server.successes(), server.max_processing
        urls = [p["image_url"]["url"] for p in server.received[0].body["messages"][0]["content"] if "image_url" in p]
    assert urls and all(u.startswith("data:image/jpeg;base64,") for u in urls)  # the true type of the default format
    rows = table.to_pylist()
    assert [r["annotation_id"] for r in rows] == ids and len(set(ids)) == len(ids)  # nothing lost or duplicated
    failed = {r["annotation_id"]: (r["error"], r["attempts"]) for r in rows if r["status"] == "failed"}
    assert set(failed) == doomed, failed
    assert {r.annotation_id: r.reason for r in rejected} == {i: "llm_http_500" for i in doomed}
    assert all(successes[i] == 1 for i in ids if i not in doomed) and not any(successes[i] for i in doomed)
    assert max_processing <= 4  # annotate.max_in_flight
    by_id = {r["annotation_id"]: r for r in rows}
    assert by_id[flaky]["attempts"] == 3 and by_id[garbled]["attempts"] == 2
    for r in rows:
        if r["annotation_id"] in doomed:
            assert r["attempts"] == 3 and r["error"].startswith("http_500") and r["boxes"] and r["measurements"][0]
        elif len(r["image_ids"]) == 3:
            assert r["status"] == "ok" and r["body_part"] == "antenna" and r["parsed_as"] == "json"
            assert r["description"] == "antenna: bright blue; thin and elongated" and len(r["renderings"]) == 3
            assert r["prompt_version"].startswith("consensus-v1.") and r["model"] == "fake-vlm"
        else:
            assert r["status"] == "ok" and r["body_part"] == "forewing" and r["parsed_as"] == "text"
            assert {"attribute": "colour", "value": "bright blue patch"} in r["traits"]
            assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 and r["latency_s"] > 0


def test_units_not_sent_are_written_without_a_request_or_an_image_read(demo_dir, units):
    by_confidence = sorted(units, key=lambda u: u["confidence"])
    low, high = by_confidence[0], by_confidence[-1]
    assert low["confidence"] < high["confidence"]
    # a pair with no zone on the specimen, as unit_table makes it; its images must not even be read
    background = dict(by_confidence[1], grounded=False,
                      members=[dict(m, path="/nowhere/gone.jpg") for m in by_confidence[1]["members"]])
    with FakeOpenAIServer(answer=fake_answer) as server:
        st = stage(demo_dir, llm={"kind": "openai", "base_url": server.base_url, "model": "fake-vlm"},
                   min_confidence=(low["confidence"] + high["confidence"]) / 2)
        table, rejected = st(pa.Table.from_pylist([background, low, high]))
        asked = [r.marker for r in server.received]
    rows = {r["status"]: r for r in table.to_pylist()}
    assert set(rows) == {"background", "low_confidence", "ok"} and not rejected
    assert asked == [rows["ok"]["annotation_id"]]  # one request: the confident unit's
    for status in ("background", "low_confidence"):
        r = rows[status]
        assert r["model"] is None and r["attempts"] == 0 and r["description"] is None and r["boxes"]
        assert r["evidence"]["pair"] and len(r["evidence"]["zones"]) == len(r["image_ids"])
    assert rows["background"]["is_background"] and rows["background"]["body_part"] == "background"
    assert rows["low_confidence"]["confidence"] == pytest.approx(low["confidence"])
    assert rows["ok"]["confidence"] == pytest.approx(high["confidence"]) and rows["ok"]["evidence"]["zones"]


def test_only_the_squares_on_the_specimen_are_outlined_and_measured(demo_dir, units):
    from pipeline.boxes import zones_to_boxes
    from pipeline.preprocessing import Geometry

    member = next(m for u in units for m in u["members"] if len(m["patches"]) > 1)
    part = member["patches"][:1]  # as if only its first square lay on the specimen
    unit = {"members": [dict(member, grounded_patches=part)]}
    _, boxes, measurements = stage(demo_dir).prepare(unit)
    assert boxes == [zones_to_boxes(part, Geometry.from_row(member))] and len(measurements[0]) == 1


def test_mllm_only_baseline_sends_whole_images(demo_dir, units):
    with FakeOpenAIServer(answer=fake_answer) as server:
        annotate = {"llm": {"kind": "openai", "base_url": server.base_url, "model": "fake-vlm"},
                    "mllm_only": True, "save_renderings": True, "images_per_prompt": 1}
        one = annotation_units([m for u in units[:1] for m in u["members"]], images_per_prompt=1)[:1]
        table, _ = stage(demo_dir, **annotate)(pa.Table.from_pylist(one))
    row = table.to_pylist()[0]
    whole = Image.open(io.BytesIO(row["renderings"][0]))
    member = one[0]["members"][0]
    assert whole.size == (member["orig_w"], member["orig_h"])  # the whole image, not upscaled, no outline
    assert row["prompt_version"].startswith("mllm-only-v1.") and row["boxes"][0]  # boxes still recorded


def test_transformers_backend_in_the_stage(demo_dir, units, tmp_path_factory):
    from pipeline.demo.tiny_models import make_tiny_qwen2_5_vl

    model = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen")
    annotate = {"llm": {"kind": "transformers", "model": str(model), "max_tokens": 8}, "render": "crop"}
    table, rejected = stage(demo_dir, **annotate)(pa.Table.from_pylist(units[-2:]))
    rows = table.to_pylist()
    assert len(rows) == 2 and not rejected
    for r in rows:  # random weights say nothing sensible: unparsed is the honest status
        assert r["status"] in ("ok", "background", "unparsed") and r["raw_answer"] is not None
        assert r["model"] == str(model) and r["completion_tokens"] > 0 and r["prompt_version"].startswith("crop-")


# --------------------------------------------------------------------------- batches overlap

class HoldingServer(FakeOpenAIServer):
    """Holds its answer to the first request that arrives until ``others`` other requests have
    been answered (or ``hold_s`` have passed: a client that keeps batches apart asks nothing of
    its next batch while one request of the current batch is unanswered)."""

    def __init__(self, others: int, hold_s: float = 10, **kwargs):
        super().__init__(answer=fake_answer, **kwargs)
        self.others, self.hold_s = others, hold_s
        self.answered_while_held: int | None = None

    def answered(self) -> int:
        return sum(r.outcome == "answered" for r in self.received[1:])

    async def _respond(self, request, fault, marker, text, body):
        if self.received[0].marker == marker:
            deadline = time.monotonic() + self.hold_s
            while self.answered() < self.others and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self.answered_while_held = self.answered()
        return await super()._respond(request, fault, marker, text, body)


def comparable(rows: list[dict]) -> list[dict]:
    """Rows by annotation_id, without the one field that differs between two runs (wall times)."""
    return sorted(({k: v for k, v in r.items() if k != "latency_s"} for r in rows), key=lambda r: r["annotation_id"])


def openai_build(demo_dir, base_url: str, overrides: list[str]):
    return demo_build_config(demo_dir, ["annotate.llm.kind=openai", "annotate.llm.model=fake-vlm",
                                        f"annotate.llm.base_url={base_url}", "annotate.llm.backoff_s=0.01",
                                        "annotate.max_in_flight=2", *overrides])


def test_batches_called_at_once_overlap_and_share_the_request_slots(demo_dir, units):
    """Batch A's first request is held by the server until the rest of A and all of batch B are
    answered: with the stage called from two threads (as the annotate actor is), they go through
    the one request slot A leaves free. The rows are those of the batches one after the other."""
    a, b = pa.Table.from_pylist(units[:4]), pa.Table.from_pylist(units[4:8])
    with FakeOpenAIServer(answer=fake_answer) as server:
        cfg = openai_build(demo_dir, server.base_url, [])
        st = AnnotateUnits(cfg.annotate, cfg.source, cfg.preprocess)
        one_at_a_time = [row for batch in (a, b) for row in st(batch)[0].to_pylist()]
    # latency: each answered request holds its slot a while, so batches with slots of their own would show
    with HoldingServer(others=3 + 4, latency_s=0.1) as server:
        cfg = openai_build(demo_dir, server.base_url, [])
        st = AnnotateUnits(cfg.annotate, cfg.source, cfg.preprocess)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(st, a)
            while not server.received:  # A holds a slot before B is called
                time.sleep(0.01)
            second = pool.submit(st, b)
            overlapped = [row for call in (first, second) for row in call.result()[0].to_pylist()]
        answered_while_held, max_open = server.answered_while_held, server.max_open
    assert answered_while_held == 7, "batch B waited for batch A's held request: batches are barriers again"
    assert max_open <= 2  # annotate.max_in_flight holds over both batches, not per batch
    assert comparable(overlapped) == comparable(one_at_a_time) and len(overlapped) == 8


@pytest.mark.parametrize("runs_on", ["ray", "driver"])
def test_annotate_pool_overlaps_batches_in_one_actor(demo_dir, demo_build, tmp_path, runs_on):
    """The build's annotate pool on Ray (one actor, max_concurrent_batches 2, batches of 8, 3 of
    them), or a small build's driver (the same callable from max_concurrent_batches threads): while
    the server holds the first request, a whole other batch is answered. traits/ holds the rows the
    stage gives for those units in one call."""
    clean, _ = demo_build
    out = tmp_path / "build"
    candidates = pq.read_table(clean / "candidates")
    some = {(r["image_id"], r["latent"]) for u in annotation_units(candidates.to_pylist(), 3)[:24] for r in u["members"]}
    (out / "candidates").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([r for r in candidates.to_pylist() if (r["image_id"], r["latent"]) in some],
                                        candidates.schema), out / "candidates" / "part.parquet")
    units = annotation_units(pq.read_table(out / "candidates").to_pylist(), images_per_prompt=3)
    overrides = [f"output={out}", "annotate.batch_size=8", "annotate.max_concurrent_batches=2",
                 f"ray.small_build_images={0 if runs_on == 'ray' else 5000}"]
    with FakeOpenAIServer(answer=fake_answer) as server:
        cfg = openai_build(demo_dir, server.base_url, overrides)
        expected, _ = AnnotateUnits(cfg.annotate, cfg.source, cfg.preprocess)(pa.Table.from_pylist(units))
    assert expected.num_rows == 24
    shutil.copytree(clean / "_build" / "index", out / "_build" / "index")
    with HoldingServer(others=8) as server:
        build = Build(openai_build(demo_dir, server.base_url, overrides))
        build.keys = fingerprints(build.cfg, build.index())  # what the build computes before its stages
        assert build.in_driver("annotate") == (runs_on == "driver")
        build.stage_annotate(RunContext(n_cpus=2, patch_px=None, pools=build.pools(n_cpus=2)))
        answered_while_held, max_open = server.answered_while_held, server.max_open
    assert answered_while_held >= 8, "the actor waited for the held request's batch: batches are barriers again"
    assert max_open <= 2
    assert comparable(pq.read_table(out / "traits").to_pylist()) == comparable(expected.to_pylist())


def test_an_unreachable_store_stops_the_batch(demo_dir, units, monkeypatch):
    st = stage(demo_dir, llm={"kind": "none"})

    def read(path, *args):
        raise StorageUnavailable(f"s3://bucket/{path}: no answer")
    monkeypatch.setattr(st.reader, "read", read)
    with pytest.raises(StorageUnavailable, match="no answer"):
        st(pa.Table.from_pylist(units[:3]))


def test_the_stage_records_the_annotation_id_its_units_carry(demo_dir, units):
    """The build puts annotation_id on each unit (with_annotation_ids, its resume key): the stage
    records that id; a unit given without one (a caller outside the build) gets it computed."""
    st = stage(demo_dir, llm={"kind": "none"})
    some = units[:3]
    carried = [{"annotation_id": f"given-{k}", **u} for k, u in enumerate(some)]
    table, _ = st(pa.Table.from_pylist(carried))
    assert table.column("annotation_id").to_pylist() == ["given-0", "given-1", "given-2"]
    table, _ = st(pa.Table.from_pylist(some))
    assert table.column("annotation_id").to_pylist() == [unit_annotation_id(st.cfg, u) for u in some]


def test_each_members_geometry_is_made_once(demo_dir, units, monkeypatch):
    """UnitImages builds a member's Geometry once and uses it to check the image and to find its zone."""
    from pipeline.annotation import renderings

    made = []
    real = renderings.Geometry.from_row

    def counted(row):
        made.append(row["image_id"])
        return real(row)
    monkeypatch.setattr(renderings.Geometry, "from_row", staticmethod(counted))
    unit = next(u for u in units if len(u["members"]) == 3)
    images, boxes, measurements = stage(demo_dir, llm={"kind": "none"}).prepare(unit)
    assert made == [r["image_id"] for r in unit["members"]] and len(images) == len(boxes) == len(measurements) == 3
