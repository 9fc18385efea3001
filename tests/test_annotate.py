"""The annotate stage without Ray: units, the openai backend against a faulty test server
(retried, then recorded; nothing lost, nothing duplicated), the transformers backend with a tiny
random Qwen2.5-VL, and the MLLM-only baseline switch."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.annotation.stage import AnnotateUnits, annotation_id, annotation_units, prompt_version_for, unit_annotation_id
from pipeline.config import AnnotateConfig, validate
from pipeline.demo import demo_build_config
from tests.fake_openai_server import FakeOpenAIServer

CONSENSUS_ANSWER = json.dumps({
    "regions": [{"image": i, "is_background": False, "body_part": "left antennae", "traits": [
        {"attribute": "color", "value": "bright blue"}]} for i in (1, 2, 3)],
    "is_background": False, "body_part": "antenna", "common_traits": ["bright blue", "thin and elongated"]})
SINGLE_ANSWER = "**Body part:** forewing\nTraits:\n- colour: bright blue patch\n- shape: oval"


def fake_answer(marker, text, body):
    n_images = sum(p.get("type") == "image_url" for m in body["messages"] for p in m["content"])
    return CONSENSUS_ANSWER if n_images == 3 else SINGLE_ANSWER


@pytest.fixture(scope="module")
def units(demo_build):
    out, _ = demo_build
    return annotation_units(pq.read_table(out / "candidates").to_pylist(), images_per_prompt=3)


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
    from pipeline.tiny_models import make_tiny_qwen2_5_vl

    model = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen")
    annotate = {"llm": {"kind": "transformers", "model": str(model), "max_tokens": 8}, "render": "crop"}
    table, rejected = stage(demo_dir, **annotate)(pa.Table.from_pylist(units[-2:]))
    rows = table.to_pylist()
    assert len(rows) == 2 and not rejected
    for r in rows:  # random weights say nothing sensible: unparsed is the honest status
        assert r["status"] in ("ok", "background", "unparsed") and r["raw_answer"] is not None
        assert r["model"] == str(model) and r["completion_tokens"] > 0 and r["prompt_version"].startswith("crop-")
