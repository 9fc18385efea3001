#!/usr/bin/env python
"""A sweep that reuses vs the same builds made independently: wall time and LLM requests.

    python benchmarks/bench_sweep.py [--latency-s 0.2] [--keep]

On the demo data (prepared once under a temporary folder, not timed): three ``contrast.t_freq``
values, first as ``python -m pipeline.sweep`` (each build reusing the ones before it), then as
three independent builds of the same configs, in one run, against one fake OpenAI-compatible
server that answers each request after ``--latency-s`` (the LLM's cost; the paper's 72B model takes
4.62 s per annotation on 2×H100, so the default 0.2 s understates the gain). Every build runs in
this process on one local Ray (2 CPUs, 1 declared GPU), as a sweep does. Prints the per-build
table and ``RESULT`` lines: wall time (independent / sweep) and LLM requests (independent /
sweep), targets ≥ 1.5× and ≥ 1.5×, and checks that each sweep build equals its independent twin.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, machine_info, offline_env, print_summary, print_table, result  # noqa: E402

offline_env(ROOT)

T_FREQS = (0.003, 0.01, 0.03)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-s", type=float, default=0.2, help="the fake LLM's seconds per request")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    import ray
    import yaml

    from benchmarks.fake_openai_server import FakeOpenAIServer
    from pipeline.config import BuildConfig, load_config
    from pipeline.console import quiet
    from pipeline.demo.run import demo_build_config, prepare_demo
    from pipeline.graph import Build
    from pipeline.sweep import run_sweep
    from tests.tables import assert_same_build

    header("bench_sweep: a 3-value contrast.t_freq sweep with reuse vs 3 independent builds")
    machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        with quiet(scratch / "prepare.log"):
            prepare_demo(scratch / "demo", log=lambda *_: None)
        with FakeOpenAIServer(latency_s=args.latency_s, capacity=8) as server:
            base = demo_build_config(scratch / "demo", [
                "encoder.num_gpus=1", "encoder.num_cpus=0.5", "report=false", "annotate.llm.kind=openai",
                f"annotate.llm.base_url={server.base_url}", "annotate.llm.model=fake-vlm", "annotate.max_in_flight=4"])
            config = scratch / "base.yaml"
            config.write_text(yaml.safe_dump(base.model_dump(mode="json"), sort_keys=False))

            start = time.perf_counter()
            with quiet(scratch / "sweep.log"):
                sweep = run_sweep(str(config), [("contrast.t_freq", list(T_FREQS))], str(scratch / "sweep"), [])
            sweep_wall, sweep_requests = time.perf_counter() - start, len(server.received)

            server.reset()
            start, independent = time.perf_counter(), []
            for t in T_FREQS:
                cfg = load_config(BuildConfig, config, [f"contrast.t_freq={t}", f"output={scratch / 'independent' / str(t)}"])
                with quiet(scratch / "independent.log"):
                    independent.append(Build(cfg).run())
            independent_wall, independent_requests = time.perf_counter() - start, len(server.received)

        rows = []
        for b, manifest, t in zip(sweep["builds"], independent, T_FREQS):
            assert_same_build(scratch / "independent" / str(t), scratch / "sweep" / b["build"])
            rows.append([t, b["images_encoded"], b["images_reused"], b["llm_requests"], b["answers_reused"],
                         sum(v or 0 for v in b["wall_s"].values()),
                         manifest["summary"]["images_encoded"], manifest["stages"]["annotate"]["computed"]["llm_requests"],
                         manifest["wall_s"]])
        print_table(["t_freq", "sweep: encoded", "reused", "LLM requests", "answers reused", "stage wall s",
                     "independent: encoded", "LLM requests", "wall s"], rows)
        print(f"  sweep {sweep_wall:.1f} s, {sweep_requests} requests; independent {independent_wall:.1f} s, "
              f"{independent_requests} requests (each sweep build equals its independent twin: checked)")
        print(json.dumps({"sweep_wall_s": round(sweep_wall, 2), "independent_wall_s": round(independent_wall, 2),
                          "sweep_requests": sweep_requests, "independent_requests": independent_requests}))
        wall = independent_wall / sweep_wall
        asked = independent_requests / max(sweep_requests, 1)
        result("sweep_wall", wall, ">= 1.5x", wall >= 1.5, f"independent {independent_wall:.1f} s / sweep {sweep_wall:.1f} s")
        result("sweep_llm_requests", asked, ">= 1.5x", asked >= 1.5,
               f"independent {independent_requests} / sweep {sweep_requests}")
        print_summary()
        return 0
    finally:
        ray.shutdown()
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
