"""``sae-traits downstream``: the paper's downstream check on any finished build. It fine-tunes a
starting CLIP (BioCLIP in the paper) with **open_clip's own trainer** twice — on the build's trait
captions and on a species-only control of the same images, same steps, seed and hyper-parameters
— then classifies the held-out images zero-shot over the build's species with the starting model
and both fine-tunes, as BioCLIP evaluates (the OpenAI ImageNet templates, normalised text
embeddings averaged per class, ``logit_scale.exp() * image @ W``):

    sae-traits downstream --config downstream.yaml [--set key=value ...]
    python -m pipeline.downstream --build OUT --out DIR [--set finetune.epochs=3 ...]

``DIR/shards/``  the caption shards (``export --format clip``, :mod:`pipeline.captions`), made once
``DIR/runs/``    the trainer's logs and checkpoints, one folder per fine-tune (``traits``, ``species_only``)
``DIR/downstream.md``, ``DIR/downstream.json``  top-1 and top-5 of the three, with counts and commands

A rerun with the same config skips what is done; a killed fine-tune resumes from its last finished
epoch (``--resume latest``). Several GPUs of one node train with ``torchrun``, one process each.
Needs the ``downstream`` extra (open_clip_torch with its training extra)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.captions import SUMMARY
from pipeline.config import ConfigError, DownstreamConfig, ExportConfig, add_config_arguments, flag_overrides, load_config
from pipeline.console import EXIT_FAILED, PREFIX, exit_code, markdown_table, say
from pipeline.export import ExportedBuild, export_clip


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip logs on the root logger ("no pretrained weights loaded" for a random start, which
    is meant): kept off the console while this command makes models; the trainer's go to its log."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


RUNS = {"traits": "fine-tuned on the trait captions", "species_only": "fine-tuned on species-only captions"}
STARTING = "starting model"


def open_clip_module():
    """open_clip, or a ConfigError saying how to install it. (A function-level import: an optional
    heavy dependency, the downstream extra, that only this command needs.)"""
    try:
        import open_clip
        import open_clip_train.main  # noqa: F401  the trainer, run as a module below
        import webdataset  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"downstream needs the downstream extra (pip install -e '.[downstream]'): {exc}") from None
    return open_clip


# --------------------------------------------------------------------------- shards

def caption_shards(cfg: DownstreamConfig, log) -> dict:
    """``out/shards``: the build's clip export, written unless one of the same build and clip
    section is there already; returns its clip_export.json."""
    shards = Path(cfg.out) / "shards"
    summary_file = shards / SUMMARY
    export = ExportConfig(build=cfg.build, format="clip", out=str(shards), overwrite=True, clip=cfg.clip,
                          storage=cfg.storage)
    build = ExportedBuild.of(export)  # NotFinished (a ConfigError) for a folder that holds no finished build
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if (summary.get("build_id") == build.manifest.get("build_id")
                and summary.get("clip") == cfg.clip.model_dump(mode="json")):
            log(f"{PREFIX} downstream: caption shards of {cfg.build} already in {shards}")
            return summary
    export_clip(export, build, log)
    return json.loads(summary_file.read_text())


# --------------------------------------------------------------------------- the starting model

def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth"))


def starting_model(cfg: DownstreamConfig, open_clip) -> tuple[str, str]:
    """(--model, --pretrained) of the starting model, for the trainer and the evaluation alike. A
    local-dir: model without weights gets random ones, drawn once with finetune.seed and saved in
    ``out/start_model`` (so both fine-tunes and the evaluation start from the same weights)."""
    if cfg.model.startswith("local-dir:"):
        folder = Path(cfg.model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").exists():
            raise ConfigError(f"model: {folder} has no open_clip_config.json")
        if has_weights(folder):
            return cfg.model, ""
        start = Path(cfg.out) / "start_model"
        if not has_weights(start):
            start.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / "open_clip_config.json", start / "open_clip_config.json")
            torch.manual_seed(cfg.finetune.seed)
            with quiet_open_clip():
                model = open_clip.create_model(cfg.model)
            tmp = start / "weights.tmp"
            torch.save(model.state_dict(), tmp)
            tmp.replace(start / "open_clip_pytorch_model.bin")
        return f"local-dir:{start.resolve()}", ""
    if not cfg.model.startswith("hf-hub:") and not cfg.pretrained:
        raise ConfigError(f"pretrained: model {cfg.model} needs its weights: an open_clip pretrained tag "
                          "(see open_clip.list_pretrained()) or a checkpoint file")
    return cfg.model, cfg.pretrained


# --------------------------------------------------------------------------- the fine-tunes

def shard_pattern(folder: Path, n: int) -> str:
    """The brace pattern open_clip (braceexpand) reads: shard-{000000..000009}.tar."""
    return str(folder / ("shard-000000.tar" if n == 1 else f"shard-{{000000..{n - 1:06d}}}.tar"))


def loader_workers(sizes: list[int], wanted: int, world: int, batch_size: int) -> int:
    """Data loader processes per GPU process, at most ``wanted``, such that each one's shards hold
    a full batch whatever shards it is dealt (webdataset deals the shuffled shard list out by
    process; one short of a batch repeats its shards forever). A ConfigError where no count does."""
    if sum(sizes) < batch_size * world:
        raise ConfigError(f"finetune.batch_size: {batch_size} per GPU x {world} GPU(s) is more than the "
                          f"{sum(sizes)} training samples; lower it")
    if wanted == 0 and world == 1:
        return 0  # the trainer's own process reads every shard
    smallest = sorted(sizes)
    for workers in range(min(max(wanted, 1), len(sizes) // world), 0, -1):
        if sum(smallest[:len(sizes) // (workers * world)]) >= batch_size:
            return workers
    raise ConfigError(f"clip.samples_per_shard: {len(sizes)} shards cannot be dealt out to {world} GPU processes "
                      f"so that each gets a full batch of {batch_size}; lower clip.samples_per_shard or "
                      "finetune.batch_size")


def plan(cfg: DownstreamConfig, summary: dict, shards: Path) -> dict:
    """The trainer's device, processes, precision, workers and sample counts."""
    ft = cfg.finetune
    device = ("cuda" if torch.cuda.is_available() else "cpu") if ft.device == "auto" else ft.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device: cuda, but no GPU is visible; set finetune.device=cpu")
    world = (ft.gpus or torch.cuda.device_count()) if device == "cuda" else 1
    precision = ("amp" if device == "cuda" else "fp32") if ft.precision == "auto" else ft.precision
    sizes = list(json.loads((shards / "traits" / "sizes.json").read_text()).values())
    samples = ft.samples_per_epoch or summary["samples"]
    return {"device": device, "world": world, "precision": precision, "shards": len(sizes), "samples": samples,
            "workers": loader_workers(sizes, ft.workers, world, ft.batch_size),
            "steps_per_epoch": math.ceil(samples / (ft.batch_size * world))}


def trainer_command(cfg: DownstreamConfig, run: str, shards: Path, how: dict, model: str, pretrained: str) -> list[str]:
    ft = cfg.finetune
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={how['world']}"]
                if how["world"] > 1 else [sys.executable])
    args = ["-m", "open_clip_train.main", "--train-data", shard_pattern(shards / run, how["shards"]),
            "--dataset-type", "webdataset", "--train-num-samples", str(how["samples"]),
            "--batch-size", str(ft.batch_size), "--epochs", str(ft.epochs), "--lr", str(ft.lr), "--wd", str(ft.wd),
            "--warmup", str(ft.warmup), "--seed", str(ft.seed), "--workers", str(how["workers"]),
            "--precision", how["precision"], "--device", how["device"], "--model", model,
            *(["--pretrained", pretrained] if pretrained else []),
            # resume from epoch_latest.pt, which the trainer replaces atomically (an epoch_N.pt cut
            # short by a kill is never read), and keep only the last epoch's epoch_N.pt beside it
            "--logs", str(Path(cfg.out) / "runs"), "--name", run, "--resume", "latest", "--save-most-recent",
            "--delete-previous-checkpoint", "--log-every-n-steps", "10", *ft.extra_args]
    return launcher + args


def changed_flags(before: list[str], now: list[str]) -> str:
    """'--epochs 2 → 3; ...' between two trainer command lines."""
    def flags(args: list[str]) -> dict[str, str]:
        out, key = {}, None
        for a in args:
            if a.startswith("--"):
                key = a
                out[key] = ""
            elif key is not None:
                out[key] = (out[key] + " " + a).strip()
        return out
    a, b = flags(before), flags(now)
    return "; ".join(f"{k} {a.get(k, '(none)')} → {b.get(k, '(none)')}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k)) or "the launcher"


def final_checkpoint(cfg: DownstreamConfig, run: str) -> Path:
    return Path(cfg.out) / "runs" / run / "checkpoints" / f"epoch_{cfg.finetune.epochs}.pt"


def fine_tune(cfg: DownstreamConfig, run: str, command: list[str], log) -> dict:
    """One fine-tune with open_clip's trainer (its output in runs/RUN.log), resumed where a killed
    one stopped; skipped when its last epoch's checkpoint is there. A run folder made with other
    settings is refused rather than resumed into."""
    folder = Path(cfg.out) / "runs" / run
    record = folder / "sae_traits_command.json"
    settings = [a for a in command if a != sys.executable]
    recorded = json.loads(record.read_text()) if record.exists() else {"command": settings}
    if recorded["command"] != settings:
        raise ConfigError(f"out: {folder} holds a fine-tune made with other settings "
                          f"({changed_flags(recorded['command'], settings)}); use another out")
    checkpoint = final_checkpoint(cfg, run)
    finished = recorded.get("seconds")
    if finished is not None and checkpoint.exists():  # the trainer exited 0 after writing it
        log(f"{PREFIX} downstream: {run}: done earlier ({checkpoint})")
        return {"checkpoint": str(checkpoint), "seconds": finished}
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"command": settings}))
    logfile = folder.parent / f"{run}.log"
    log(f"{PREFIX} downstream: {run}: open_clip's trainer → {folder} (log: {logfile})")
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(logfile, "ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = round(time.monotonic() - start, 1)
    if done.returncode != 0 or not checkpoint.exists():
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{run}: open_clip's trainer exited {done.returncode} without {checkpoint.name}: "
                           f"{tail[0]} (the whole log: {logfile})")
    record.write_text(json.dumps({"command": settings, "seconds": seconds}))
    log(f"{PREFIX} downstream: {run}: {cfg.finetune.epochs} epochs in {seconds:.0f} s")
    return {"checkpoint": str(checkpoint), "seconds": seconds}


# --------------------------------------------------------------------------- zero-shot

def held_out_batches(shards: Path, n: int, preprocess, batch_size: int):
    """(images [B, 3, H, W], species names) of the held-out shards, read by webdataset as the
    trainer reads its own."""
    import webdataset as wds  # noqa: PLC0415 (the downstream extra; checked by open_clip_module)

    urls = shard_pattern(shards / "held_out", n)
    samples = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png;webp", "txt")
    images, names = [], []
    for image, species in samples:
        images.append(preprocess(image))
        names.append(species)
        if len(images) == batch_size:
            yield torch.stack(images), names
            images, names = [], []
    if images:
        yield torch.stack(images), names


@torch.no_grad()
def zero_shot(open_clip, model_name: str, pretrained: str, checkpoint: str | None, species: list[str],
              shards: Path, n_shards: int, cfg: DownstreamConfig, device: str) -> dict:
    """Top-1 and top-k (k = min(5, classes)) of one model over the held-out images."""
    with quiet_open_clip():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None,
                                                                     device=device)
    if checkpoint:
        open_clip.load_checkpoint(model, checkpoint, device=device)
    model.eval()
    templates = (open_clip.OPENAI_IMAGENET_TEMPLATES if cfg.zero_shot.templates == "openai"
                 else open_clip.SIMPLE_IMAGENET_TEMPLATES)
    weights = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(model_name), species, templates,
                                                   num_classes_per_batch=10, device=device)
    index = {name: i for i, name in enumerate(species)}
    k = min(5, len(species))
    top1 = topk = n = 0
    for images, names in held_out_batches(shards, n_shards, preprocess, cfg.zero_shot.batch_size):
        features = model.encode_image(images.to(device), normalize=True)
        logits = model.logit_scale.exp() * features @ weights
        best = logits.topk(k, dim=1).indices.cpu()
        truth = torch.tensor([index[s] for s in names])
        top1 += int((best[:, 0] == truth).sum())
        topk += int((best == truth[:, None]).any(dim=1).sum())
        n += len(names)
    return {"top1": top1 / n if n else 0.0, f"top{k}": topk / n if n else 0.0, "images": n}


# --------------------------------------------------------------------------- the comparison

def run(cfg: DownstreamConfig, log=print) -> dict:
    open_clip = open_clip_module()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = caption_shards(cfg, log)
    shards = out / "shards"
    if not summary["samples"] or not summary["held_out_images"]:
        raise ConfigError(f"build: {cfg.build} gives {summary['samples']} training samples and "
                          f"{summary['held_out_images']} held-out images; the check needs both (ok annotations, "
                          "and species with two or more images)")
    if len(summary["species"]) < 2:
        raise ConfigError(f"build: {cfg.build} has {len(summary['species'])} species; classifying needs two or more")
    model, pretrained = starting_model(cfg, open_clip)
    how = plan(cfg, summary, shards)
    log(f"{PREFIX} downstream: {summary['samples']} samples on {summary['train_images']} images, "
        f"{cfg.finetune.epochs} epochs of {how['steps_per_epoch']} steps (batch {cfg.finetune.batch_size} x "
        f"{how['world']} {how['device']}), {how['workers']} loader workers; {summary['held_out_images']} held-out "
        f"images of {len(summary['species'])} species")
    runs = {}
    for name in RUNS:
        command = trainer_command(cfg, name, shards, how, model, pretrained)
        runs[name] = {**fine_tune(cfg, name, command, log), "command": shlex.join(command)}

    def evaluate(checkpoint: str | None) -> dict:
        return zero_shot(open_clip, model, pretrained, checkpoint, summary["species"], shards,
                         summary["shards"]["held_out"], cfg, how["device"])

    rows = [{"model": STARTING, **evaluate(None)}]
    rows += [{"model": label, "run": name, **evaluate(runs[name]["checkpoint"]), **runs[name]}
             for name, label in RUNS.items()]
    result = {"build": cfg.build, "build_id": summary.get("build_id"), "model": cfg.model, "pretrained": cfg.pretrained,
              "train_samples": summary["samples"], "train_images": summary["train_images"],
              "held_out_images": summary["held_out_images"], "classes": len(summary["species"]),
              "epochs": cfg.finetune.epochs, "steps": cfg.finetune.epochs * how["steps_per_epoch"], "plan": how,
              "rows": rows, "config": cfg.model_dump(mode="json")}
    (out / "downstream.json").write_text(json.dumps(result, indent=2))
    (out / "downstream.md").write_text(markdown(result))
    log(table(result))
    log(f"{PREFIX} downstream: {out / 'downstream.md'}")
    return result


def table(result: dict) -> str:
    k = next(key for key in result["rows"][0] if key.startswith("top") and key != "top1")
    return markdown_table(["model", "top-1", k.replace("top", "top-"), "held-out images"],
                          [[r["model"], f"{r['top1']:.3f}", f"{r[k]:.3f}", str(r["images"])] for r in result["rows"]])


def markdown(result: dict) -> str:
    runs = "\n".join(f"- {r['model']}: `{r['command']}` ({r['seconds']} s)" for r in result["rows"] if "command" in r)
    return (f"# Zero-shot species classification of held-out images\n\n"
            f"Build `{result['build']}` ({result['build_id']}); starting model `{result['model']}`"
            f"{' with ' + result['pretrained'] if result['pretrained'] else ''}; {result['classes']} species, "
            f"{result['held_out_images']} held-out images; both fine-tunes: {result['train_samples']} samples on "
            f"{result['train_images']} images, {result['steps']} steps.\n\n{table(result)}\n\n"
            f"Trainer commands (open_clip's own trainer):\n\n{runs}\n")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.downstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", help="the finished build's output folder (key build)")
    parser.add_argument("--out", help="a local folder for the shards, the fine-tunes and the results (key out)")
    add_config_arguments(parser, DownstreamConfig, "downstream.md")
    args = parser.parse_args(argv)
    flags = flag_overrides(args, ("build", "out"))
    cfg = None
    try:
        cfg = load_config(DownstreamConfig, args.config, [*args.overrides, *flags])
        run(cfg)
    except RuntimeError as exc:  # a fine-tune or the evaluation failed: its log is named
        say(f"{PREFIX} downstream failed: {exc}", err=True)
        return EXIT_FAILED
    except Exception as exc:
        return exit_code(exc, cfg.out if cfg else None, resumes=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
