#!/usr/bin/env python
"""Trait quality on hard planted data: every ranking side by side, the confidence, the requests saved.

    python benchmarks/bench_quality.py [--images-per-species 16] [--seed 0] [--keep]

Writes the hard planted data (pipeline/demo/hard.py: a plate per species, a pale part on a pale
background, a part in half of the photos, a pin or label on a whole genus, any pose), a tiny
random-weight DINOv2 and a demo SAE trained on that data (not timed), then builds it on one local
Ray (2 CPUs) with the templated describer (kind none: what is counted is what would be sent):

- once per ``contrast.score`` (evidence, ratio, difference, log_ratio_weighted), each with the
  evidence measured, and once the paper's way (ratio, ``candidates.evidence=false``: no image read
  before annotate, every zone described whole);
- the default again with ``annotate.min_on_specimen=0`` (every zone sent): the requests item 3 saves;
- the default and the paper's way from scratch, twice each: the wall time the evidence adds.

Per ranking it prints the species whose best latent lies on the planted part (pipeline/demo/quality.py),
the share of the ok annotations' boxes on the part (all of them, and those at or above the default
confidence), the species kept above it with an annotation on the part, the AUC of the confidence
for annotations on vs off the part, and the units sent / not sent; then ``RESULT`` lines for the
goals of issue 33.
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

from benchmarks.common import header, machine_info, offline_env, print_summary, print_table, result, start_ray  # noqa: E402

offline_env(ROOT)

RANKINGS = ("evidence", "ratio", "difference", "log_ratio_weighted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-species", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the hard data (0: the data docs/quality.md reports)")
    parser.add_argument("--timing-runs", type=int, default=2, help="builds from scratch per side for the wall time")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from pipeline.console import quiet
    from pipeline.demo.hard import generate_hard_dataset
    from pipeline.demo.quality import annotation_quality, best_latents, planted_parts
    from pipeline.demo.run import demo_build_config, prepare_demo
    from pipeline.evidence import TRUSTED as DEFAULT_CONFIDENCE
    from pipeline.graph import Build

    header("bench_quality: rankings, confidence and background on hard planted data")
    machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    ray = start_ray(2)
    try:
        data = scratch / "hard"
        with quiet(scratch / "prepare.log"):
            summary = prepare_demo(data, args.images_per_species, log=lambda *_: None, generate=generate_hard_dataset,
                                   seed=args.seed)
        parts = planted_parts(data / "data" / "ground_truth.csv")
        species = sorted(summary["species"])

        def build(name: str, overrides: list[str], reuse: bool = True) -> tuple[Path, dict]:
            """(the build's folder, its wall time and the candidates and annotate stages' in s)."""
            out = scratch / "builds" / name
            sets = [f"output={out}", "report=false", *overrides]
            if reuse:  # the images are encoded once, by the first build
                sets.append(f"reuse=[{scratch / 'builds' / 'evidence'}]")
            start = time.perf_counter()
            with quiet(scratch / f"{name}.log"):
                manifest = Build(demo_build_config(data, sets)).run(overwrite=True)
            return out, {"wall": time.perf_counter() - start,
                         **{stage: manifest["stages"][stage]["wall_s"] for stage in ("candidates", "annotate")}}

        rows, figures = [], {}
        sides = [(score, [f"contrast.score={score}"]) for score in RANKINGS]
        sides.append(("ratio, no evidence (the paper's)", ["contrast.score=ratio", "candidates.evidence=false"]))
        for i, (name, overrides) in enumerate(sides):
            out, _ = build(name.split(",")[0] if i < len(RANKINGS) else "paper", overrides, reuse=i > 0)
            best = best_latents(out, parts)
            quality = annotation_quality(out, parts, DEFAULT_CONFIDENCE)
            on = sorted(s for s, st in best.items() if st["on"])
            sent = quality["ok"] + quality["statuses"].get("unparsed", 0) + quality["statuses"].get("failed", 0)
            figures[name] = {"best_on_part": on, **quality, "sent": sent}
            rows.append([name, f"{len(on)}/{len(species)}", pct(quality["boxes_on_part"]),
                         pct(quality["kept_boxes_on_part"]), f"{len(quality['kept_species'])}/{len(species)}",
                         "-" if quality["auc"] is None else round(quality["auc"], 3), sent,
                         quality["statuses"].get("background", 0)])
        print_table(["ranking", "best latent on part", "boxes on part", f"boxes on part, conf >= {DEFAULT_CONFIDENCE}",
                     "species kept", "AUC", "units sent", "background, not sent"], rows)
        print("  best latent per species (on the part: +):")
        for name, fig in figures.items():
            print(f"    {name:<34} " + " ".join(("+" if s in fig["best_on_part"] else "-") + s.split()[1][:6] for s in species))

        everything, _ = build("min_on_specimen_0", ["annotate.min_on_specimen=0"])
        sent_all = annotation_quality(everything, parts, DEFAULT_CONFIDENCE)["ok"]
        saved = sent_all - figures["evidence"]["sent"]
        print(f"  requests: {figures['evidence']['sent']} sent by default, {sent_all} with annotate.min_on_specimen=0 "
              f"({saved} saved); background zones sent by default: {background_sent(scratch / 'builds' / 'evidence')}")

        walls = {"evidence": [], "paper": []}
        for run in range(args.timing_runs):
            for name, overrides in (("evidence", []), ("paper", ["contrast.score=ratio", "candidates.evidence=false"])):
                walls[name].append(build(f"timing-{name}-{run}", overrides, reuse=False)[1])
        best = {name: min(runs, key=lambda t: t["wall"]) for name, runs in walls.items()}
        added = best["evidence"]["wall"] / best["paper"]["wall"] - 1
        print(f"  wall time from scratch (best of {args.timing_runs}): with evidence {best['evidence']['wall']:.1f} s "
              f"(candidates {best['evidence']['candidates']:.1f} s, annotate {best['evidence']['annotate']:.1f} s), "
              f"the paper's way {best['paper']['wall']:.1f} s (candidates {best['paper']['candidates']:.1f} s, "
              f"annotate {best['paper']['annotate']:.1f} s): {added:+.1%}")

        ev = figures["evidence"]
        result("best_latent_on_part", len(ev["best_on_part"]) / len(species), "every species",
               len(ev["best_on_part"]) == len(species), f"{len(ev['best_on_part'])}/{len(species)}")
        result("kept_boxes_on_part", ev["kept_boxes_on_part"], ">= 0.80, every species kept",
               (ev["kept_boxes_on_part"] or 0) >= 0.8 and len(ev["kept_species"]) == len(species),
               f"{len(ev['kept_species'])}/{len(species)} species kept")
        result("confidence_auc", ev["auc"], ">= 0.90", (ev["auc"] or 0) >= 0.9)
        result("background_sent", background_sent(scratch / "builds" / "evidence"), "0",
               background_sent(scratch / "builds" / "evidence") == 0, f"{saved} requests saved")
        result("evidence_wall", 1 + added, "<= 1.10x", added <= 0.10)
        if args.json:
            args.json.write_text(json.dumps({"figures": figures, "walls": walls, "saved": saved}, indent=1, default=str))
        print_summary()
        return 0
    finally:
        ray.shutdown()
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def background_sent(build: Path) -> int:
    """Zones under annotate.min_on_specimen among the units that were sent (must be none)."""
    import pyarrow.parquet as pq

    traits = pq.read_table(build / "traits", columns=["status", "evidence"]).to_pylist()
    return sum(1 for r in traits if r["status"] not in ("background", "low_confidence") and r["evidence"]
               for z in r["evidence"]["zones"] if not z["grounded"])


if __name__ == "__main__":
    sys.exit(main())
