"""A simple single-process SAE trainer (the paper's recipe), good enough for the demo.

    python -m pipeline.train_sae --config FILE.yaml [--set key=value ...]

Patch activations come from the same sources, preprocessing and backbone as the build. The
recipe fixes the reference code's bugs: b_dec starts at the mean of a sample of activations, and
the L1 warm-up really scales the loss. Decoder rows stay unit-norm and the decoder gradient's
component parallel to each row is removed before every step. Output: the project's format
(config.json + model.safetensors, with training figures in its metadata) and ``sae.pt`` in the
saev format."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from actors.encoder import PatchFeatures
from actors.sae import SAESpec, SparseAutoencoder, save_sae, save_saev
from pipeline.config import (BackboneConfig, ConfigError, PreprocessConfig, Section, SourceConfig,
                             add_config_arguments, load_config)


class SAETrainSpec(Section):
    kind: Literal["relu", "topk", "batchtopk"] = "relu"
    """relu: the paper's ReLU + L1; topk / batchtopk: k active latents per patch (per patch on
    average across a batch), no L1 — not in the paper, a fixed L0 instead of a tuned α."""
    k: int | None = Field(default=None, ge=1)
    """Active latents per patch for topk / batchtopk."""
    expansion: int = Field(default=32, ge=1)
    """m = expansion · d latents (the paper: 32 → 24,576 for DINOv2-base)."""
    alpha: float = Field(default=4e-4, ge=0)
    """L1 coefficient α (the paper's default 4e-4); relu only."""
    scale: Literal["none", "unit_mean_norm"] = "none"
    """none: raw activations (the paper); unit_mean_norm: scale so the mean patch norm is 1.
    The scale is stored in the checkpoint and the build's encoder applies it identically."""

    @model_validator(mode="after")
    def _k_for_topk(self) -> SAETrainSpec:
        if self.kind != "relu" and self.k is None:
            raise ValueError(f"k is required for a {self.kind} SAE")
        return self


class TrainLoop(Section):
    batch_size: int = Field(default=16384, ge=1)
    """Patches per step (the paper: 16,384)."""
    steps: int = Field(default=1000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=500, ge=0)
    """Linear learning-rate warm-up."""
    l1_warmup_steps: int = Field(default=0, ge=0)
    """α rises linearly from 0 to sae.alpha over this many steps (0: no warm-up)."""
    seed: int = 0
    max_images: int | None = Field(default=None, ge=1)
    """Read at most this many images for activations (the simple trainer holds them in memory)."""
    log_every: int = Field(default=50, ge=1)
    dead_after_patches: int = Field(default=1_000_000, ge=1)
    """A latent that has not fired for this many patches counts as dead (metrics; AuxK loss)."""
    aux_k: int = Field(default=256, ge=1)
    """topk / batchtopk: dead latents used by the AuxK loss per patch."""
    aux_alpha: float = Field(default=1 / 32, ge=0)
    """topk / batchtopk: weight of the AuxK loss."""
    dense_fraction: float = Field(default=0.1, gt=0, le=1)
    """A latent firing on more than this fraction of a batch's patches counts as dense (metrics)."""


class TrainSourceConfig(SourceConfig):
    format: Literal["bioscan", "imagefolder", "parquet", "activations"] = "bioscan"
    """Image sources as in the build (features come from the backbone), or activations: a
    folder (or file) of precomputed patch activations — .npy arrays [n, d] (float32 or float16)
    or Parquet files whose first fixed-size-list column holds one activation per row."""


class TrainSAEConfig(Section):
    source: TrainSourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    sae: SAETrainSpec = Field(default_factory=SAETrainSpec)
    train: TrainLoop = Field(default_factory=TrainLoop)
    output: str
    """Checkpoint folder."""


def load_activation_files(cfg: SourceConfig) -> torch.Tensor:
    """Precomputed activations [n, d] from .npy / Parquet files (fp32, CPU)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, root = storage.filesystem(cfg.root, cfg.storage_options)
    files = sorted(p for p in fs.find(root) if p.endswith((".npy", ".parquet"))) if fs.isdir(root) else [root]
    chunks, first = [], None
    for path in files:
        with fs.open(path, "rb") as f:
            if path.endswith(".npy"):
                array = np.load(f)
            else:
                table = pq.read_table(f)
                column = next((c for c in table.columns if pa.types.is_fixed_size_list(c.type)), None)
                if column is None:
                    raise ConfigError(f"source.root: {path} has no fixed-size list column of activations")
                array = column.combine_chunks().flatten().to_numpy().reshape(len(column), column.type.list_size)
        if array.ndim != 2:
            raise ConfigError(f"source.root: {path} holds an array of shape {array.shape}; expected [n, d]")
        if first is None:
            first = (path, array.shape)
        elif array.shape[1] != first[1][1]:
            raise ConfigError(f"source.root: {path} has shape {array.shape} but {first[0]} has {first[1]}: "
                              "every file must have the same d")
        chunks.append(torch.tensor(array, dtype=torch.float32))  # a copy: Arrow buffers are read-only
    if not chunks or not sum(len(c) for c in chunks):
        raise ConfigError(f"source.root: no activations (.npy or Parquet) in {cfg.root}")
    return torch.cat(chunks)


def collect_activations(cfg: TrainSAEConfig) -> torch.Tensor:
    """All patch activations [N·P, d]: precomputed, or of the source's images (fp32, CPU)."""
    if cfg.source.format == "activations":
        return load_activation_files(cfg.source)
    from pipeline.preprocessing import decode_batch
    from pipeline.sources import ImageReader, build_index

    index, _ = build_index(cfg.source)
    if cfg.train.max_images:
        index = index.slice(0, cfg.train.max_images)
    features = PatchFeatures(cfg.backbone.model, cfg.backbone.layer, cfg.backbone.dtype)
    reader = ImageReader(cfg.source)
    chunks = []
    for start in range(0, index.num_rows, cfg.preprocess.batch_size):
        batch = index.slice(start, cfg.preprocess.batch_size).to_pydict()
        good, _ = decode_batch({k: np.array(v, dtype=object) for k, v in batch.items()}, cfg.preprocess, reader)
        if len(good["image_id"]):
            chunks.append(features(good["pixels"]).float().reshape(-1, features.hidden_size).cpu())
    if not chunks:
        raise ConfigError(f"source.root: no decodable images in {cfg.source.root}")
    return torch.cat(chunks)


def lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def train(acts: torch.Tensor, spec: SAETrainSpec, loop: TrainLoop, log=print) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE of ``spec.kind`` on activations [N, d]; returns the SAE and the logged metrics."""
    gen = torch.Generator().manual_seed(loop.seed)
    torch.manual_seed(loop.seed)
    finite = torch.isfinite(acts).all(dim=1)
    n_nonfinite = int((~finite).sum())
    if n_nonfinite:  # a NaN/Inf patch is counted and skipped, never trained on
        log(json.dumps({"skipped_nonfinite_patches": n_nonfinite}))
        acts = acts[finite]
    if not len(acts):
        raise ValueError("train: no finite activations to train on")
    d = acts.shape[1]
    sample = acts[torch.randperm(len(acts), generator=gen)[:65536]]
    scale = 1.0 if spec.scale == "none" else 1.0 / sample.norm(dim=1).mean().item()
    sae = SparseAutoencoder(SAESpec(d=d, m=spec.expansion * d, kind=spec.kind, k=spec.k, input_scale=scale,
                                    metadata={"skipped_nonfinite_patches": n_nonfinite}))
    with torch.no_grad():
        sae.b_dec.copy_((sample * scale).mean(0))  # the reference code meant to do this but never did
    opt = torch.optim.Adam(sae.parameters(), lr=loop.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, loop.warmup_steps))
    variance = acts.var(0).sum().item() * scale**2  # of the data the SAE sees
    history = []
    since_fired = torch.zeros(sae.spec.m, dtype=torch.long)  # patches since each latent last fired
    for step in range(loop.steps):
        batch = acts[torch.randint(len(acts), (min(loop.batch_size, len(acts)),), generator=gen)]
        alpha = spec.alpha * (min(1.0, (step + 1) / loop.l1_warmup_steps) if loop.l1_warmup_steps else 1.0)
        dead = since_fired >= loop.dead_after_patches
        out = sae.loss(batch, alpha, dead=dead, aux_k=loop.aux_k, aux_alpha=loop.aux_alpha)
        with torch.no_grad():
            firing_rate = (out.pop("codes") > 0).float().mean(0)
            since_fired += len(batch)
            since_fired[firing_rate > 0] = 0
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.remove_parallel_grad_()
        opt.step()
        sched.step()
        sae.normalize_decoder_()
        if step % loop.log_every == 0 or step == loop.steps - 1:
            row = {"step": step, "alpha": alpha, "lr": sched.get_last_lr()[0],
                   **{k: round(v.item(), 6) for k, v in out.items()},
                   "nmse": round(out["mse"].item() * d / variance, 6),
                   "dead": round(dead.float().mean().item(), 6),
                   "dense": round((firing_rate > loop.dense_fraction).float().mean().item(), 6)}
            history.append(row)
            log(json.dumps(row))
    return sae, history


def write_checkpoint(sae: SparseAutoencoder, history: list[dict], output: str | Path, **metadata) -> Path:
    """The project format (final figures in its metadata), ``sae.pt`` in the saev format and
    ``metrics.jsonl``, all in ``output``."""
    out = Path(output)
    sae.spec.metadata |= {"final": history[-1], **metadata}
    save_sae(sae, out)
    save_saev(sae, out / "sae.pt")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train_sae", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainSAEConfig, args.config, args.overrides)
        start = time.perf_counter()
        acts = collect_activations(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[train_sae] {acts.shape[0]} patch activations of d={acts.shape[1]}", flush=True)
    sae, history = train(acts, cfg.sae, cfg.train)
    out = write_checkpoint(sae, history, cfg.output, patches=int(acts.shape[0]),
                           wall_s=round(time.perf_counter() - start, 2), config=cfg.model_dump(mode="json"))
    print(f"[train_sae] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
