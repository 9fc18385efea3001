"""The offline demo: synthetic specimens → tiny random-weight DINOv2 → demo SAE → full build.

    python -m pipeline.demo --out DIR

Needs no network and no GPU: it writes the demo data (BIOSCAN-5M layout, with a ground truth of
the planted parts) and a tiny DINOv2 under DIR, trains the demo SAE with the project's trainer,
runs the whole build on the local CPU, and prints where everything is."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

from pipeline.graph import Build
from pipeline.config import BuildConfig, TrainSAEConfig, merge, parse_overrides, validate
from pipeline.console import exit_code, quiet, say
from pipeline.demo.quality import best_latents, planted_parts
from pipeline.demo.specimens import generate_demo_dataset
from pipeline.demo.tiny_models import make_tiny_dinov2
from pipeline.train_sae import fit

# The tiny backbone: 4 blocks of width 64; we read block 2 (its second-to-last, as the paper
# reads block 10 of 12). Threshold and t_freq are set for this SAE's units and size.
DEMO_LAYER = 2


def demo_train_config(out: Path) -> TrainSAEConfig:
    return validate(TrainSAEConfig, {
        "source": {"format": "bioscan", "root": str(out / "data")},
        "backbone": {"model": str(out / "models" / "dinov2-tiny"), "layer": DEMO_LAYER},
        "encoder": {"num_gpus": 0, "batch_size": 32},
        "sae": {"expansion": 8, "alpha": 4e-3},
        # ~35k patches seen ~35 times: cached in the object store after the first pass.
        "train": {"batch_size": 2048, "steps": 600, "lr": 3e-3, "warmup_steps": 50, "l1_warmup_steps": 100,
                  "log_every": 100, "checkpoint_every": 600, "shuffle_buffer": 16384, "cache": True},
        "output": str(out / "models" / "sae"),
    })


def demo_build_config(out: Path, overrides: list[str] | None = None) -> BuildConfig:
    base = {
        "source": {"format": "bioscan", "root": str(out / "data")},
        "backbone": {"model": str(out / "models" / "dinov2-tiny"), "layer": DEMO_LAYER},
        "sae": {"checkpoint": str(out / "models" / "sae"), "threshold": 0.9},
        "encoder": {"num_gpus": 0, "batch_size": 32},
        "contrast": {"t_freq": 3e-3, "max_latents_per_species": 5},
        "candidates": {"top_images": 9, "group_size": 3},
        "annotate": {"save_renderings": True},
        "output": str(out / "build"),
    }
    return validate(BuildConfig, merge(base, parse_overrides(overrides or [])))


def prepare_demo(out: Path, images_per_species: int = 16, log=say, generate=generate_demo_dataset, seed: int = 0) -> dict:
    """Data (``generate``: the demo's, or :func:`pipeline.demo.hard.generate_hard_dataset`, with
    ``seed``), tiny backbone and trained SAE under ``out`` (skips what is already there)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = generate(out / "data", images_per_species=images_per_species, seed=seed)
    log(f"[demo] {summary['n_images']} synthetic specimen photos in {out / 'data'}")
    make_tiny_dinov2(out / "models" / "dinov2-tiny")
    cfg = demo_train_config(out)
    sae_dir = fit(cfg, log=lambda line: None)  # on Ray Train, streaming the images through the backbone
    final = json.loads((sae_dir / "config.json").read_text())["metadata"]["final"]
    log(f"[demo] trained the demo SAE on Ray Train ({cfg.train.n_steps} steps): {json.dumps(final)}")
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the demo data, models and build")
    parser.add_argument("--images-per-species", type=int, default=16)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a build config key (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show what Ray and the libraries print (by default it goes to OUT/logs/ and the build's log)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.perf_counter()
    try:
        cfg = demo_build_config(out, args.overrides)
        log = out / "logs" / f"demo-{time.strftime('%Y%m%dT%H%M%S')}.log"
        with nullcontext() if args.verbose else quiet(log):
            prepare_demo(out, args.images_per_species)
            (out / "build.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            build = Build(cfg)
            build.run(overwrite=True, quiet_log=not args.verbose)
    except Exception as exc:  # a config to fix, a disk that fills up: one line (docs/build.md#exit-codes)
        return exit_code(exc, str(out))
    say(f"\n[demo] done in {time.perf_counter() - start:.0f} s")
    say(f"  data:          {out / 'data'}  (ground truth: {out / 'data' / 'ground_truth.csv'})")
    say(f"  models:        {out / 'models'}")
    say(f"  build config:  {out / 'build.yaml'}  (rerun: sae-traits build --config {out / 'build.yaml'} --overwrite)")
    say(f"  build output:  {cfg.output}  (summary above; manifest.json)")
    say(f"  report:        {Path(cfg.output) / 'report' / 'index.html'}")
    if not args.verbose:
        say(f"  logs:          {log} (data and SAE training), {build.log_path} (the build)")
    say("  planted parts found by each species' best latent (its described zones with a box on the part):")
    for species, st in sorted(best_latents(cfg.output, planted_parts(out / "data" / "ground_truth.csv")).items()):
        say(f"    {species:<26} latent {st['latent']:>4}: {st['hits']}/{st['zones']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
