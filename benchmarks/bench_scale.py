#!/usr/bin/env python
"""Scale: the build's count → select → candidates → annotate (kind none, no renderings) → report
stages over synthetic firings at realistic density (pipeline/demo/firings.py: ~3,000 firings
per image over 24,576 latents), at N and FACTOR·N images, each size in its own process.

    python benchmarks/bench_scale.py [--images N] [--factor 4] [--firings 3000] [--keep DIR]
                                     [--small-build-images M] [--set KEY=VALUE ...]

Prints, per stage, the wall time at both sizes and their ratio (goal <= 1.1·FACTOR, i.e. 4.4 at 4N);
the driver's peak RSS at both sizes (goal: ratio <= 1.3); the object store's peak use and the
bytes spilled; the stage that grows worst; and ``RESULT`` lines. tests/test_scale.py runs it at
a small N so it cannot rot. The stages run on Ray at every size (``ray.small_build_images`` 0);
``--small-build-images M`` sets that key, so that sizes up to M run in the driver: the same
command with 0 and with M compares the two paths. ``--set`` overrides any build key at both sizes
(``--set candidates.evidence=false --set contrast.score=ratio``: the stages without the evidence,
what docs/quality.md compares the default with).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("count", "select", "candidates", "annotate")


def build_config(out: Path, sae: Path, rows_per_file: int, small_build_images: int = 0,
                 overrides: list[str] = ()) -> dict:
    from pipeline.config import BuildConfig, merge, parse_overrides, validate

    return validate(BuildConfig, merge({
        "source": {"format": "imagefolder", "root": str(out / "source-images")},  # (indexed already)
        "backbone": {"model": str(out / "no-backbone"), "layer": 10},  # never loaded: encode is done
        "sae": {"checkpoint": str(sae), "threshold": 0.9},
        "encoder": {"batch_size": rows_per_file // 4, "num_gpus": 0},
        "annotate": {"llm": {"kind": "none"}, "save_renderings": False},
        # Fewer annotation units than the defaults (10 latents x 9 images per species): the stage is
        # linear in units either way, and 2 cores render ~15 units/s.
        "contrast": {"max_latents_per_species": 3}, "candidates": {"top_images": 3, "group_size": 3},
        "ray": {"num_cpus": 2, "small_build_images": small_build_images},
        "report": False,  # timed on its own, after the build
        "output": str(out),
    }, parse_overrides(list(overrides)))).model_dump(mode="json")


def prepare(out: Path, n_images: int, firings: int, sae: Path, small_build_images: int = 0,
            overrides: list[str] = ()) -> dict:
    from pipeline.demo.firings import write_synthetic_build

    rows_per_file = 1024
    t0 = time.perf_counter()
    summary = write_synthetic_build(out, build_config(out, sae, rows_per_file, small_build_images, overrides), n_images,
                                    firings=firings, rows_per_file=rows_per_file)
    return {**summary, "generate_s": round(time.perf_counter() - t0, 1)}


def object_store_poller(stop: threading.Event, seen: dict, address: str) -> None:
    """Peak object store use and spilled bytes, from the raylet's own memory summary."""
    from ray._private.internal_api import memory_summary

    while not stop.wait(0.5):
        try:
            text = memory_summary(address=address, stats_only=True)
        except Exception:  # Ray starting or stopping
            continue
        used = re.search(r"Plasma memory usage (\d+) MiB", text)
        spilled = re.search(r"Spilled (\d+) MiB", text)
        if used:
            seen["peak_mib"] = max(seen.get("peak_mib", 0), int(used.group(1)))
        if spilled:
            seen["spilled_mib"] = max(seen.get("spilled_mib", 0), int(spilled.group(1)))


def child(out: Path) -> None:
    """Runs in its own process: the build from "encode done", then prints its figures as JSON."""
    import ray

    from pipeline.graph import Build
    from pipeline.config import BuildConfig, validate
    from pipeline.contract import STATE
    from pipeline.execution import init_ray

    cfg = validate(BuildConfig, json.loads((out / STATE / "config.json").read_text()))
    init_ray(cfg.ray)
    seen, stop = {}, threading.Event()
    poller = threading.Thread(target=object_store_poller, args=(stop, seen, ray.get_runtime_context().gcs_address),
                              daemon=True)
    poller.start()
    build = Build(cfg)
    running = {"stage": "start"}
    rss_by_stage: dict[str, float] = {}
    sampler = threading.Thread(target=rss_sampler, args=(stop, build, running, rss_by_stage), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    manifest = build.run()
    wall = time.perf_counter() - t0
    running["stage"] = "report"
    report_t0 = time.perf_counter()
    Build(cfg).write_report()
    report_s = time.perf_counter() - report_t0
    stop.set()
    poller.join(timeout=5)
    sampler.join(timeout=5)
    stages = {k: manifest["stages"][k]["wall_s"] for k in STAGES}
    ray.shutdown()
    print("SCALE-RESULT " + json.dumps({
        "stages": {**stages, "report": round(report_s, 2)}, "build_s": round(wall, 1),
        "driver_peak_rss_mib": round(max(rss_by_stage.values()), 1), "driver_rss_by_stage": rss_by_stage,
        "object_store_peak_mib": seen.get("peak_mib"), "spilled_mib": seen.get("spilled_mib", 0),
        "summary": manifest["summary"]}))


def rss_sampler(stop: threading.Event, build, running: dict, peaks: dict) -> None:
    """The driver's resident memory every 50 ms, as a peak per stage (the stage running is the one
    after the last recorded in build.stages)."""
    order = ("index", "encode", *STAGES)
    while not stop.wait(0.05):
        done = [s for s in order if s in build.stages]
        stage = running["stage"] if running["stage"] == "report" else (
            order[len(done)] if len(done) < len(order) else "finish")
        rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS")) / 1024
        peaks[stage] = round(max(peaks.get(stage, 0.0), rss), 1)


def run_size(work: Path, n_images: int, firings: int, sae: Path, small_build_images: int = 0,
             overrides: list[str] = ()) -> dict:
    out = work / f"n{n_images}"
    generated = prepare(out, n_images, firings, sae, small_build_images, overrides)
    proc = subprocess.run([sys.executable, __file__, "--child", str(out)], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SCALE-RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"the build at N={n_images} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(line.removeprefix("SCALE-RESULT ")), **generated}


def random_sae(folder: Path, m: int = 24_576) -> Path:
    import torch

    from pipeline.sae import SAESpec, SparseAutoencoder, save_sae

    torch.manual_seed(0)
    return save_sae(SparseAutoencoder(SAESpec(d=8, m=m)), folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--firings", type=int, default=3_000)
    parser.add_argument("--small-build-images", type=int, default=0,
                        help="ray.small_build_images: sizes up to this run count..annotate in the driver")
    parser.add_argument("--keep", type=Path, help="build the sizes under this folder and keep them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a build key at both sizes (repeatable)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        sae = random_sae(work / "sae")
        small = run_size(work, args.images, args.firings, sae, args.small_build_images, args.overrides)
        large = run_size(work, args.images * args.factor, args.firings, sae, args.small_build_images, args.overrides)
    goal = 1.1 * args.factor
    print(f"synthetic firings: N={small['images']} ({small['firings'] / 1e6:.1f} M firings, {small['files']} files) "
          f"and {args.factor}N={large['images']} ({large['firings'] / 1e6:.1f} M); generated in "
          f"{small['generate_s']} / {large['generate_s']} s")
    print(f"{'stage':<12} {'N s':>8} {f'{args.factor}N s':>8} {'ratio':>7}")
    ratios = {}
    for stage in (*STAGES, "report"):
        a, b = small["stages"][stage], large["stages"][stage]
        ratios[stage] = b / a if a > 0 else float("nan")
        print(f"{stage:<12} {a:>8.2f} {b:>8.2f} {ratios[stage]:>7.2f}")
    rss = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    print(f"driver peak RSS: {small['driver_peak_rss_mib']} MiB -> {large['driver_peak_rss_mib']} MiB (ratio {rss:.2f}); "
          f"by stage (MiB, N -> {args.factor}N): " + ", ".join(
              f"{k} {v} -> {large['driver_rss_by_stage'].get(k)}" for k, v in small["driver_rss_by_stage"].items()))
    print(f"object store peak: {small['object_store_peak_mib']} MiB -> {large['object_store_peak_mib']} MiB; "
          f"spilled {small['spilled_mib']} MiB -> {large['spilled_mib']} MiB")
    worst = max(ratios, key=lambda s: ratios[s])
    print(f"grows worst: {worst} ({ratios[worst]:.2f})")
    print(f"annotations: {small['summary']['annotations']} -> {large['summary']['annotations']}; "
          f"latents selected {small['summary']['latents_selected']} -> {large['summary']['latents_selected']}")
    for stage, ratio in ratios.items():
        print(f"RESULT scale_{stage}: ratio={ratio:.2f} (target <= {goal:.1f}) {'PASS' if ratio <= goal else 'MISS'}")
    print(f"RESULT scale_driver_rss: ratio={rss:.2f} (target <= 1.3) {'PASS' if rss <= 1.3 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
