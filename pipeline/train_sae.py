"""SAE training on Ray Train: the paper's recipe, with the reference code's bugs fixed.

    python -m pipeline.train_sae --config FILE.yaml [--set key=value ...] [--overwrite]

    images ─► decode (tasks) ─► backbone (actor pool) ─┐
                                                        ├─► Ray Data rows {x: [d]} ─► TorchTrainer
    activation files (.npy [n, d] / Parquet) ───────────┘    N data-parallel workers, each reading
                                                             its shard with iter_torch_batches and
                                                             a local shuffle buffer

Outputs in ``output``: the project's SAE format (config.json + model.safetensors, with the final
figures in its metadata), the saev layouts that can hold it (``saev-0.1.pt``, ``saev-schema5.pt``;
:data:`SAEV_EXPORTS`), ``metrics.jsonl`` (one line every
``train.log_every`` steps) and ``ray_train/`` with the periodic checkpoints. Run the same command
again after an interruption and it resumes from the last checkpoint; one worker with the same
seed ends at the same weights as an uninterrupted run.

The recipe: b_dec starts at the mean of a sample of activations (the reference code meant to and
never did); Adam with a linear lr warm-up; an L1 warm-up that really scales the loss (the
reference code's schedule wrote an attribute the loss never read); decoder rows unit-norm, with
the gradient component parallel to each row removed before every step."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from tqdm import tqdm

from actors.encoder import PatchActivations
from pipeline import storage
from pipeline.config import (ConfigError, SourceConfig, TrainLoop, TrainSAEConfig, add_config_arguments,
                             config_changes, fsspec_options, load_config, runtime_keys)
from pipeline.console import exit_code
from pipeline.contract import STATE
from pipeline.encoding import backbone_config, backbone_patch_px
from pipeline.execution import (SHARD_BATCHES, ActorPool, PoolAsk, encode_images, encoder_pool, ensure_placeable,
                                in_shards, in_tasks, init_ray)
from pipeline.lease import OutputLease
from pipeline.sae import CheckpointError, SparseAutoencoder, save_sae, save_saev, save_saev_schema5
from pipeline.sae_training import SAETraining
from pipeline.sources import build_index

# Keys that may change between an interrupted run and its resume: they change how long or how
# visibly it runs, not the trajectory it follows.
RESUMABLE_KEYS = runtime_keys(TrainSAEConfig)


# --------------------------------------------------------------------------- activation sources

def activation_files(cfg: SourceConfig) -> list[tuple[str, tuple[int, int]]]:
    """Every .npy / Parquet file under ``cfg.root`` with its shape [n, d], read from the headers
    only; files that disagree on d are refused naming both shapes."""
    fs, root = storage.filesystem(cfg.root, cfg.fsspec_options)
    paths = sorted(p for p in fs.find(root) if p.endswith((".npy", ".parquet"))) if fs.isdir(root) else [root]
    files = []
    for path in paths:
        with fs.open(path, "rb") as f:
            if path.endswith(".npy"):
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    np.lib.format.read_magic(f), np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(f)
            else:
                meta = pq.ParquetFile(f)
                column = next((c for c in meta.schema_arrow if pa.types.is_fixed_size_list(c.type)), None)
                if column is None:
                    raise ConfigError(f"source.root: {path} has no fixed-size list column of activations")
                shape = (meta.metadata.num_rows, column.type.list_size)
        if len(shape) != 2:
            raise ConfigError(f"source.root: {path} holds an array of shape {tuple(shape)}; expected [n, d]")
        if files and shape[1] != files[0][1][1]:
            raise ConfigError(f"source.root: {path} has shape {tuple(shape)} but {files[0][0]} has "
                              f"{files[0][1]}: every file must have the same d")
        files.append((path, tuple(shape)))
    if not sum(shape[0] for _, shape in files):
        raise ConfigError(f"source.root: no activations (.npy or Parquet with rows) in {cfg.root}")
    return files


def read_activation_chunks(batch: dict[str, np.ndarray], *, cfg: SourceConfig,
                           chunk_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map over file paths → ``{"x": float32 [≤chunk_rows, d]}`` chunks (a large file
    never sits whole in one block)."""
    fs, _ = storage.filesystem(cfg.root, cfg.fsspec_options)
    for path in batch["path"]:
        with fs.open(path, "rb") as f:
            if path.endswith(".npy"):
                array = np.load(f)
                for start in range(0, len(array), chunk_rows):
                    yield {"x": np.asarray(array[start:start + chunk_rows], np.float32)}
            else:
                for rows in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
                    column = next(c for c in rows.columns if pa.types.is_fixed_size_list(c.type))
                    values = column.flatten().to_numpy(zero_copy_only=False)
                    yield {"x": values.reshape(len(column), column.type.list_size).astype(np.float32)}


def backbone_pool(cfg: TrainSAEConfig) -> ActorPool:
    """The backbone's actor pool (image sources): the placement check and the Ray call read it."""
    return encoder_pool("backbone", cfg.encoder, PatchActivations, {
        "model": cfg.backbone.model, "layer": cfg.backbone.layer, "dtype": cfg.backbone.dtype, "storage": cfg.storage,
        "revision": cfg.backbone.revision})


def activation_dataset(cfg: TrainSAEConfig):
    """(Ray Dataset with one ``x`` [d] float32 row per patch, d)."""
    if cfg.source.format == "activations":
        files = activation_files(cfg.source)
        ds = ray.data.from_items([{"path": p} for p, _ in files]).map_batches(
            read_activation_chunks, batch_size=1, fn_kwargs={"cfg": cfg.source})
        ds.context.execution_options.preserve_order = True  # same order every epoch and every run
        return ds, files[0][1][1]

    patch_px = backbone_patch_px(cfg.backbone, cfg.preprocess, cfg.storage)  # before any image is read
    index, _ = build_index(cfg.source, map_shards=in_tasks)
    if cfg.train.max_images:
        index = index.slice(0, cfg.train.max_images)
    if not index.num_rows:
        raise ConfigError(f"source.root: no images in {cfg.source.root}")
    # Rejected images are simply not trained on (errors_to=None).
    ds = encode_images(in_shards(index, SHARD_BATCHES * cfg.encoder.batch_size), backbone_pool(cfg),
                       source=cfg.source, preprocess=cfg.preprocess, encoder=cfg.encoder, patch_px=patch_px)
    ds.context.execution_options.preserve_order = True
    return ds, backbone_config(cfg.backbone.model, fsspec_options(cfg.storage, cfg.backbone.model),
                               cfg.backbone.revision)["hidden_size"]


# --------------------------------------------------------------------------- the Ray Train worker

def stream_batches(shard, batch_size: int, loop: TrainLoop, epoch: int, skip: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(epoch, batch index, x [batch, d]) forever, epoch after epoch, starting at batch ``skip`` of
    ``epoch``. The shuffle is seeded per epoch, so a resumed run sees the same batches."""
    buffer = max(loop.shuffle_buffer, batch_size) if loop.shuffle_buffer else None
    while True:
        n = 0
        for i, batch in enumerate(shard.iter_torch_batches(
                batch_size=batch_size, dtypes=torch.float32, drop_last=True,
                local_shuffle_buffer_size=buffer, local_shuffle_seed=loop.seed + epoch if buffer else None)):
            n += 1
            if i >= skip:
                yield epoch, i, batch["x"]
        if not n:
            raise ValueError(f"train: the source yields fewer patches per worker than one batch ({batch_size}); "
                             "lower train.batch_size or add data")
        epoch, skip = epoch + 1, 0


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    cfg = TrainSAEConfig.model_validate(config["cfg"])
    loop = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if loop.threads:
        torch.set_num_threads(loop.threads)
    device = ray.train.torch.get_device() if loop.use_gpu else torch.device("cpu")
    run = SAETraining(cfg.sae, loop, config["d"], device, world)
    shard = ray.train.get_dataset_shard("train")
    per_worker = loop.batch_size // world

    epoch = skip = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=False)
        run.load_state_dict(state)
        epoch, skip = state["epoch"], state["next_batch"]
    resumed_at = run.step
    batches = stream_batches(shard, per_worker, loop, epoch, skip)
    if not checkpoint:  # the first batches give b_dec and the scale, then are trained on as usual
        head = list(itertools.islice(batches, math.ceil(min(loop.init_patches, per_worker * loop.n_steps) / per_worker)))
        run.initialise(torch.cat([x for _, _, x in head]))
        batches = itertools.chain(head, batches)

    # A live copy of the metrics for people watching a run on this node; the authoritative rows
    # travel in the checkpoints (rows logged after the checkpoint we resume from are dropped).
    metrics = Path(config["metrics"])
    if rank == 0:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in run.history))
    bar = tqdm(total=loop.n_steps, initial=run.step, disable=rank != 0, desc="train_sae", unit="step",
               mininterval=5, file=sys.stderr)
    for epoch, i, x in batches:
        if run.step >= loop.n_steps:
            break
        row = run.train_step(x)
        bar.update(1)
        if row and rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(nmse=row["nmse"], l0=row["l0"], dead=row["dead"], refresh=False)
        if run.step % loop.checkpoint_every == 0 or run.step == loop.n_steps:
            report_checkpoint(run, {"epoch": epoch, "next_batch": i + 1}, row or {"step": run.step - 1}, rank)
            if loop.fail_at_step == run.step and resumed_at < run.step:
                raise RuntimeError(f"train.fail_at_step: injected failure after step {run.step}")
    bar.close()


def report_checkpoint(run: SAETraining, position: dict, metrics: dict, rank: int) -> None:
    """Rank 0 saves the whole training state; every rank reports (report is a barrier)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save({**run.state_dict(), **position}, Path(folder) / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------- the driver

def check_resume(cfg: TrainSAEConfig, out: Path, overwrite: bool) -> int | None:
    """A resume must use the config the run started with (except RESUMABLE_KEYS). Returns the
    activation size d of the run being resumed (None for a new run); :func:`fit` records the
    config and d once it knows d."""
    saved = out / "train_config.json"
    if overwrite and out.exists():
        for child in out.iterdir():  # all but the lease this run holds (under _build/)
            if child.name != STATE:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    current = cfg.model_dump(mode="json")
    d = None
    if saved.exists():
        previous = json.loads(saved.read_text())
        d = previous["d"]
        changes = config_changes(previous["config"], current, RESUMABLE_KEYS)
        if changes:
            raise ConfigError(f"output: {out} holds a training run made with a different config ({changes}); "
                              "resume with the same config, or pass --overwrite to start again")
    out.mkdir(parents=True, exist_ok=True)
    return d


def fit(cfg: TrainSAEConfig, overwrite: bool = False, log=print) -> Path:
    """Train (or resume) on Ray Train; writes the final SAE into ``cfg.output`` and returns it."""
    out = Path(cfg.output).resolve()
    with OutputLease(str(out), None, cfg.output_lease_s, "SAE training"):  # one run per output folder
        return fit_holding_lease(cfg, out, overwrite, log)


def fit_holding_lease(cfg: TrainSAEConfig, out: Path, overwrite: bool, log) -> Path:
    resumed_d = check_resume(cfg, out, overwrite)
    start = time.perf_counter()
    init_ray(cfg.ray)
    workers = PoolAsk("train", {"GPU": 1.0 if cfg.train.use_gpu else 0.0, "CPU": cfg.train.cpus_per_worker},
                      {"GPU": "train.use_gpu", "CPU": "train.cpus_per_worker"})
    pools = [workers] if cfg.source.format == "activations" else [backbone_pool(cfg).ask, workers]
    ensure_placeable(pools, cfg.ray.wait_for_resources_s)  # never wait for workers no node can hold
    ds, d = activation_dataset(cfg)
    if resumed_d not in (None, d):
        raise ConfigError(f"source: the activations have shape [n, {d}] but the run being resumed in {out} "
                          f"trains an SAE on [n, {resumed_d}]")
    (out / "train_config.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "d": d}, indent=2))
    if cfg.train.cache:
        ds = ds.materialize()
    log(f"[train_sae] {cfg.train.n_steps} steps of {cfg.train.batch_size} patches, d={d}, "
        f"m={cfg.sae.expansion * d}, {cfg.train.num_workers} worker(s)")
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # a resumed run must see the batches in the same order
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "d": d, "metrics": str(out / "metrics.jsonl")},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
        run_config=ray.train.RunConfig(
            name="ray_train", storage_path=str(out),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    run = SAETraining(cfg.sae, cfg.train, d)
    run.load_state_dict(state)
    history = run.history
    write_checkpoint(run.finished_sae(), history, out, log=log, patches=run.patches_seen,
                     wall_s=round(time.perf_counter() - start, 2), config=cfg.model_dump(mode="json"))
    log(f"[train_sae] wrote {out}: {json.dumps(history[-1])}")
    return out


SAEV_EXPORTS = {"saev-0.1.pt": save_saev, "saev-schema5.pt": save_saev_schema5}  # file → the layout it holds


def write_checkpoint(sae: SparseAutoencoder, history: list[dict], output: str | Path, log=print, **metadata) -> Path:
    """The project format (final figures in its metadata), the saev layouts that can hold this SAE
    (:data:`SAEV_EXPORTS`; one that cannot is skipped with the reason) and ``metrics.jsonl``, all in ``output``."""
    out = Path(output)
    sae.spec.metadata |= {"final": history[-1], **metadata}
    save_sae(sae, out)
    for name, save in SAEV_EXPORTS.items():
        try:
            save(sae, out / name)
        except CheckpointError as exc:
            log(f"[train_sae] no {name}: {exc}")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.train_sae", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, TrainSAEConfig, "training.md")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in the output and start again")
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(TrainSAEConfig, args.config, args.overrides)
        fit(cfg, overwrite=args.overwrite)
    except Exception as exc:  # a run resumes from its last checkpoint
        return exit_code(exc, cfg.output if cfg else None, resumes=True)
    return 0


if __name__ == "__main__":
    # Run through the importable module, not __main__, so Ray pickles the worker function and
    # the config classes by reference.
    from pipeline.train_sae import main as _main

    sys.exit(_main())
