#!/usr/bin/env python
"""Throughput of OpenAIBackend against a model server of known capacity (run by hand, not a test).

    python benchmarks/bench_llm_client.py [--latency 0.5] [--capacity 16] [-n 400] [--serial-n 20] [--fault-rate 0]
    python benchmarks/bench_llm_client.py --stage [--stage-n 200] [--stage-serial-n 6]   # the annotate stage only
    python benchmarks/bench_llm_client.py --overlap --latency 1 [--overlap-n 331] [--overlap-faults 0.1] [--overlap-repeats 3]

The fake server (benchmarks/fake_openai_server.py) answers each request after ``latency`` seconds and
processes at most ``capacity`` at once, so no client can beat capacity / latency requests/s.
Rows:
- serial      one blocking ``requests`` call at a time, the reference code's pattern (DESIGN §3.3);
              measured on --serial-n requests (it would take n * latency seconds on all n);
- in_flight=k OpenAIBackend.complete_many on n requests with max_in_flight=k (k = 1, C, 2C);
- faults      k = 2C with --fault-rate of the arrivals answered 500 (retried after backoff), if > 0.

Target: OpenAIBackend with max_in_flight >= C reaches >= 0.8 of capacity / latency. The last line is
``RESULT llm_client: ratio=X (target >= 0.8) PASS|MISS``.

Then (alone with --stage) the annotate stage, pipeline.annotation.stage.AnnotateUnits with
annotate.llm.kind=openai at the same fake server, on the demo dataset (written once to a temp
folder; candidate rows built without Ray or a model: squash geometry, a 3x3 patch zone near the
centre, consensus groups of 3 per species). Each row times the whole stage call -- image loading,
measurement, PNG rendering (threads) and the requests -- on --stage-n requests (units repeated
under new latents), for images_per_prompt 1 and 3:
- serial      max_in_flight=1 through the same stage on --stage-serial-n units: one request at a time,
              the reference code's pattern;
- in_flight=k the stage with max_in_flight=k (k = C, 2C).
When the best ratio is under 0.8 it prints where the time goes: the stage's per-unit preparation
(load / measure / render) and request building, measured apart, one thread and with the stage's
thread pool. The last line is ``RESULT annotate_stage: ratio=X (target >= 0.8) PASS|FAIL``.

With --overlap: one annotate actor as Ray Data drives it (the stage called from
annotate.max_concurrent_batches threads at once, batches of the build's size) on --overlap-n
single-image units, without faults and with --overlap-faults of the arrivals answered 500 or 429,
for max_concurrent_batches 1 (each batch a barrier: the stage before batches overlapped) and the
default, best of --overlap-repeats interleaved rounds (the machine may be shared: every round
is printed too). Target: >= 0.85 of C / L with 10 % faults; the last line is
``RESULT annotate_overlap: ratio=X with 10% faults (target >= 0.85) PASS|FAIL (barrier: Y)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import stage_candidates  # noqa: E402
from benchmarks.fake_openai_server import FakeOpenAIServer  # noqa: E402
from pipeline.annotation.llm_openai import OpenAIBackend  # noqa: E402
from pipeline.annotation.llm import ChatRequest, ChatResult  # noqa: E402
from pipeline.config import AnnotateConfig  # noqa: E402


def chat_request(i: int) -> ChatRequest:
    content = [{"type": "text", "text": f"Describe the trait in the box. marker=req{i}"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}]
    return ChatRequest(messages=[{"role": "user", "content": content}], request_id=f"req{i}")


def run_serial(server: FakeOpenAIServer, n: int) -> float:
    """Seconds for n requests sent one after another with a blocking HTTP client."""
    session = requests.Session()
    start = time.perf_counter()
    for i in range(n):
        req = chat_request(i)
        body = {"model": "fake-vlm", "messages": req.messages, "max_tokens": req.max_tokens, "temperature": req.temperature}
        session.post(f"{server.base_url}/chat/completions", json=body, timeout=60).raise_for_status()
    return time.perf_counter() - start


def run_backend(server: FakeOpenAIServer, n: int, in_flight: int) -> tuple[float, int]:
    """Seconds for n requests through OpenAIBackend, and how many succeeded."""
    backend = OpenAIBackend(server.base_url, "fake-vlm", max_in_flight=in_flight, backoff_s=0.1, max_backoff_s=2)
    start = time.perf_counter()
    results = backend.complete_many([chat_request(i) for i in range(n)])
    return time.perf_counter() - start, sum(isinstance(r, ChatResult) for r in results)


# --------------------------------------------------------------------------- the annotate stage

STAGE_ANSWER = json.dumps({"is_background": False, "body_part": "thorax",
                           "traits": [{"attribute": "colour", "value": "orange spot on a dark ground"},
                                      {"attribute": "shape", "value": "rounded"}],
                           "common_traits": ["orange spot on the thorax"]})


def stage_units(candidates: list[dict], images_per_prompt: int, n: int) -> list[dict]:
    """n annotation units: the demo's units repeated, each copy under a new latent (a new annotation id)."""
    from pipeline.annotation.units import annotation_units

    base = annotation_units(candidates, images_per_prompt)
    return [{**u, "latent": k // len(base)} for k, u in ((k, base[k % len(base)]) for k in range(n))]


def make_stage(server: FakeOpenAIServer, root: Path, images_per_prompt: int, in_flight: int, backoff_s: float = 0.1):
    from pipeline.annotation.stage import AnnotateUnits
    from pipeline.config import LLMConfig, PreprocessConfig, SourceConfig

    llm = LLMConfig(kind="openai", base_url=server.base_url, model="fake-vlm", backoff_s=backoff_s)
    cfg = AnnotateConfig(llm=llm, images_per_prompt=images_per_prompt, max_in_flight=in_flight)
    return AnnotateUnits(cfg, SourceConfig(format="bioscan", root=str(root)), PreprocessConfig(),
                              max_in_flight=in_flight)


def run_stage(server: FakeOpenAIServer, root: Path, units: list[dict], images_per_prompt: int,
              in_flight: int) -> tuple[float, Counter, int]:
    """Seconds for one stage call on ``units`` (built outside the timing), statuses, images sent."""
    import pyarrow as pa

    stage = make_stage(server, root, images_per_prompt, in_flight)
    batch = pa.Table.from_pylist(units)
    start = time.perf_counter()
    table, _ = stage(batch)
    seconds = time.perf_counter() - start
    return seconds, Counter(table["status"].to_pylist()), sum(len(u["members"]) for u in units)


def prepare_profile(server: FakeOpenAIServer, root: Path, units: list[dict], images_per_prompt: int,
                    in_flight: int) -> dict:
    """Where a unit's CPU time goes outside the wire: seconds per unit for load, measure, render and
    request building (one thread), and units/s of the stage's prepare over a pool of the size
    asyncio.to_thread uses (min(32, cpus + 4))."""
    from pipeline.annotation.measurements import regions_and_measurements
    from pipeline.annotation.prompts import build_request
    from pipeline.preprocessing import Geometry

    stage = make_stage(server, root, images_per_prompt, in_flight)
    parts = Counter()
    for unit in units:
        images = []
        for row in unit["members"]:
            t0 = time.perf_counter()
            rgb = stage.load_rgb(row)
            t1 = time.perf_counter()
            regions, _ = regions_and_measurements(rgb, row["patches"], Geometry.from_row(row))
            t2 = time.perf_counter()
            images += stage.rendering.images(rgb, regions, max_crops=3 if len(unit["members"]) == 1 else 1)
            t3 = time.perf_counter()
            parts["load"] += t1 - t0
            parts["measure"] += t2 - t1
            parts["render"] += t3 - t2
        t0 = time.perf_counter()
        request = build_request(images, render=stage.cfg.render, request_id="x")
        json.dumps({"model": "fake-vlm", "messages": request.messages, "response_format": request.response_format})
        parts["request"] += time.perf_counter() - t0
        parts["png_kb"] += sum(len(i) for i in images) / 1024
    out = {k: v / len(units) for k, v in parts.items()}
    workers = min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(stage.prepare, units))
        out["pool_units_per_s"] = len(units) / (time.perf_counter() - start)
    out["workers"] = workers
    return out


def stage_benchmark(L: float, C: int, n: int, serial_n: int, images_per_species: int) -> None:
    ideal = C / L
    rows = []  # (ipp, client, requests, images, statuses, seconds, busy)
    units = {}
    with tempfile.TemporaryDirectory(prefix="bench_annotate_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        candidates = stage_candidates(root, images_per_species)
        setup_s = time.perf_counter() - t0
        with FakeOpenAIServer(latency_s=L, capacity=C, answer=lambda marker, text, body: STAGE_ANSWER) as server:
            for ipp in (1, 3):
                units[ipp] = stage_units(candidates, ipp, n)
                for k, m in [(1, serial_n), (C, n), (2 * C, n)]:
                    server.reset()
                    seconds, statuses, n_images = run_stage(server, root, units[ipp][:m], ipp, k)
                    name = "serial (in_flight=1)" if k == 1 else f"in_flight={k}"
                    rows.append((ipp, name, m, n_images, statuses, seconds, server.max_processing))
            best = {ipp: max(r[2] / r[5] for r in rows if r[0] == ipp and r[1] != "serial (in_flight=1)") for ipp in (1, 3)}
            ratio = min(best.values()) / ideal
            profiles = {}
            if ratio < 0.8:
                for ipp in (1, 3):
                    if best[ipp] / ideal < 0.8:
                        profiles[ipp] = prepare_profile(server, root, units[ipp][:min(n, 40)], ipp, C)

    n_species = len({c["species"] for c in candidates})
    print(f"\nannotate stage (AnnotateUnits, llm.kind=openai, render=overlay) on the demo dataset: "
          f"{len(candidates)} images, {n_species} species, written and indexed in {setup_s:.1f} s; {os.cpu_count()} CPUs")
    print(f"fake server: latency {L} s, capacity {C} -> ideal {ideal:.1f} req/s")
    print(f"{'ipp':>3} {'stage':<22} {'requests':>8} {'images':>6} {'failed':>6} {'seconds':>8} {'req/s':>7} "
          f"{'vs ideal':>8} {'vs serial':>9} {'busy':>5}")
    serial = {r[0]: r[2] / r[5] for r in rows if r[1].startswith("serial")}
    for ipp, name, m, n_images, statuses, seconds, busy in rows:
        rate = m / seconds
        print(f"{ipp:>3} {name:<22} {m:>8} {n_images:>6} {statuses.get('failed', 0):>6} {seconds:>8.2f} {rate:>7.1f} "
              f"{rate / ideal:>8.2f} {rate / serial[ipp]:>8.1f}x {busy:>5}")
    print("ipp = annotate.images_per_prompt; whole stage call timed (load, measure, render, requests); "
          "busy = most requests the server processed at once")
    for ipp, p in profiles.items():
        per_unit = p["load"] + p["measure"] + p["render"]
        bound = min(ideal, p["pool_units_per_s"])
        print(f"where the time goes, ipp={ipp} (one thread, per unit): load {p['load'] * 1e3:.1f} ms, "
              f"measure {p['measure'] * 1e3:.1f} ms, render {p['render'] * 1e3:.1f} ms "
              f"(= {1 / per_unit:.1f} units/s on one thread), request build+JSON {p['request'] * 1e3:.1f} ms, "
              f"{p['png_kb']:.0f} KiB PNG per request")
        print(f"  prepare over {p['workers']} threads ({os.cpu_count()} CPUs): {p['pool_units_per_s']:.1f} units/s "
              f"-> the stage can reach at most {bound:.1f} req/s = {bound / ideal:.2f} of ideal "
              f"({'CPU-bound: rendering' if p['pool_units_per_s'] < ideal else 'not prepare-bound'})")
    print(f"RESULT annotate_stage: ratio={ratio:.2f} (target >= 0.8) {'PASS' if ratio >= 0.8 else 'FAIL'}"
          f" (ipp=1 {best[1] / ideal:.2f}, ipp=3 {best[3] / ideal:.2f}; vs serial ipp=1 {best[1] / serial[1]:.1f}x, "
          f"ipp=3 {best[3] / serial[3]:.1f}x)")


# --------------------------------------------------------------------------- overlapping batches under faults

def run_actor(stage, units: list[dict], batch_rows: int, concurrent_batches: int) -> tuple[float, Counter]:
    """Seconds for ``units`` through one annotate actor as Ray Data drives it: batches of
    ``batch_rows``, the stage called from ``concurrent_batches`` threads at once
    (annotate.max_concurrent_batches; 1 = each batch a barrier, the stage before overlap)."""
    import pyarrow as pa

    batches = [pa.Table.from_pylist(units[i:i + batch_rows]) for i in range(0, len(units), batch_rows)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent_batches) as pool:
        tables = [table for table, _ in pool.map(stage, batches)]
    seconds = time.perf_counter() - start
    return seconds, Counter(s for t in tables for s in t["status"].to_pylist())


def overlap_benchmark(L: float, C: int, n: int, fault_rate: float, concurrent: list[int], images_per_species: int,
                      repeats: int) -> None:
    """The annotate stage (one actor, images_per_prompt 1, llm defaults: max_retries 5, backoff 1 s)
    at in_flight 2C with the build's batch size (4 x in_flight), without and with ``fault_rate``
    of the arrivals answered 500 or 429 (Retry-After: 1, half each), for each number of
    concurrent batches; ``repeats`` rounds over all of them, interleaved so that a burst of load
    from elsewhere on the machine hits every row alike. Faults answer at once (they take no
    server slot), so the ideal stays C / L."""
    ideal, in_flight = C / L, 2 * C
    batch_rows = 4 * in_flight  # pipeline.build: max(annotate.batch_size, 4 x the actor's share)
    seconds = defaultdict(list)  # (fault rate, concurrent batches) -> seconds of each round
    faulted, failed, busy = {}, Counter(), {}
    with tempfile.TemporaryDirectory(prefix="bench_annotate_") as tmp:
        root = Path(tmp)
        units = stage_units(stage_candidates(root, images_per_species), 1, n)
        for _ in range(repeats):
            for rate in (0.0, fault_rate):
                for k in concurrent:
                    rng = random.Random(0)
                    faults = lambda index, marker, body: (  # noqa: E731
                        None if rng.random() >= rate else "http_500" if rng.random() < 0.5 else "http_429")
                    with FakeOpenAIServer(latency_s=L, capacity=C, answer=lambda marker, text, body: STAGE_ANSWER,
                                          faults=faults) as server:
                        stage = make_stage(server, root, 1, in_flight, backoff_s=1.0)
                        took, statuses = run_actor(stage, units, batch_rows, k)
                        seconds[rate, k].append(took)
                        faulted[rate, k] = sum(r.fault != "ok" for r in server.received)
                        failed[rate, k] += statuses.get("failed", 0)
                        busy[rate, k] = max(busy.get((rate, k), 0), server.max_processing)
    print(f"\nannotate stage, one actor, overlapping batches: {n} units (images_per_prompt 1), in_flight {in_flight}, "
          f"batches of {batch_rows}; fake server latency {L} s, capacity {C} -> ideal {ideal:.1f} req/s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; best of {repeats} rounds")
    print(f"{'faults':>6} {'concurrent_batches':>18} {'seconds':>8} {'req/s':>7} {'vs ideal':>8} {'median':>6} "
          f"{'faulted':>7} {'failed':>6} {'busy':>5}  every round (vs ideal)")
    best = {}
    for (rate, k), runs in seconds.items():
        best[rate, k] = n / min(runs) / ideal
        median = n / sorted(runs)[len(runs) // 2] / ideal
        print(f"{rate:>6.0%} {k:>18} {min(runs):>8.2f} {n / min(runs):>7.1f} {best[rate, k]:>8.2f} {median:>6.2f} "
              f"{faulted[rate, k]:>7} {failed[rate, k]:>6} {busy[rate, k]:>5}  "
              + " ".join(f"{n / s / ideal:.2f}" for s in runs))
    print("concurrent_batches = annotate.max_concurrent_batches (1: each batch a barrier); faulted = attempts answered "
          "500/429 (last round); failed = units still failing after the retries (all rounds); busy = most requests "
          "processed at once")
    ratio = max(v for (rate, _), v in best.items() if rate == fault_rate)
    barrier = best.get((fault_rate, 1))
    print(f"RESULT annotate_overlap: ratio={ratio:.2f} with {fault_rate:.0%} faults (target >= 0.85) "
          f"{'PASS' if ratio >= 0.85 else 'FAIL'}" + (f" (barrier: {barrier:.2f})" if barrier is not None else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.5, help="server seconds per request (L)")
    parser.add_argument("--capacity", type=int, default=16, help="requests the server processes at once (C)")
    parser.add_argument("-n", type=int, default=400, help="requests per OpenAIBackend row")
    parser.add_argument("--serial-n", type=int, default=20, help="requests for the serial and in_flight=1 rows")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of arrivals answered 500 in the faults row")
    parser.add_argument("--stage", action="store_true", help="only the annotate stage rows")
    parser.add_argument("--no-stage", action="store_true", help="only the client rows")
    parser.add_argument("--stage-n", type=int, default=200, help="requests per annotate stage row")
    parser.add_argument("--stage-serial-n", type=int, default=6, help="requests for the stage's serial rows")
    parser.add_argument("--images-per-species", type=int, default=6, help="demo dataset size for the stage rows")
    parser.add_argument("--overlap", action="store_true",
                        help="only the overlapping-batches rows (with --overlap-faults and without)")
    parser.add_argument("--overlap-n", type=int, default=331, help="units per overlapping-batches row")
    parser.add_argument("--overlap-faults", type=float, default=0.1, help="share of arrivals answered 500/429 there")
    parser.add_argument("--overlap-repeats", type=int, default=3, help="rounds over the overlapping-batches rows")
    parser.add_argument("--concurrent-batches", type=int, nargs="+", default=[1, AnnotateConfig().max_concurrent_batches],
                        help="annotate.max_concurrent_batches values compared (1: each batch a barrier)")
    args = parser.parse_args()
    L, C = args.latency, args.capacity
    if args.overlap:
        overlap_benchmark(L, C, args.overlap_n, args.overlap_faults, args.concurrent_batches, args.images_per_species,
                          args.overlap_repeats)
        return
    if not args.stage:
        client_benchmark(args)
    if not args.no_stage:
        stage_benchmark(L, C, args.stage_n, args.stage_serial_n, args.images_per_species)


def client_benchmark(args) -> None:
    L, C = args.latency, args.capacity
    ideal = C / L

    rows = []  # (client, requests, ok, seconds, max processed at once)
    with FakeOpenAIServer(latency_s=L, capacity=C) as server:
        seconds = run_serial(server, args.serial_n)
        rows.append(("serial (requests)", args.serial_n, args.serial_n, seconds, server.max_processing))
        for k, n in [(1, args.serial_n), (C, args.n), (2 * C, args.n)]:
            server.reset()
            seconds, ok = run_backend(server, n, k)
            rows.append((f"in_flight={k}", n, ok, seconds, server.max_processing))
    if args.fault_rate > 0:
        rng = random.Random(0)
        faults = lambda index, marker, body: "http_500" if rng.random() < args.fault_rate else None  # noqa: E731
        with FakeOpenAIServer(latency_s=L, capacity=C, faults=faults) as server:
            seconds, ok = run_backend(server, args.n, 2 * C)
            rows.append((f"in_flight={2 * C} faults={args.fault_rate:.0%}", args.n, ok, seconds, server.max_processing))

    serial_rate = rows[0][1] / rows[0][3]
    print(f"fake server: latency {L} s, capacity {C} -> ideal {ideal:.1f} req/s")
    print(f"{'client':<30} {'requests':>8} {'ok':>5} {'seconds':>8} {'req/s':>7} {'vs ideal':>8} {'vs serial':>9} {'busy':>5}")
    for client, n, ok, seconds, busy in rows:
        rate = n / seconds
        print(f"{client:<30} {n:>8} {ok:>5} {seconds:>8.2f} {rate:>7.1f} {rate / ideal:>8.2f} "
              f"{rate / serial_rate:>8.1f}x {busy:>5}")
    best = max(n / s for client, n, _, s, _ in rows[2:4])  # in_flight = C and 2C
    ratio = best / ideal
    print("busy = most requests the server processed at once; vs ideal = req/s / (C / L)")
    print(f"RESULT llm_client: ratio={ratio:.2f} (target >= 0.8) {'PASS' if ratio >= 0.8 else 'MISS'}")


if __name__ == "__main__":
    main()
