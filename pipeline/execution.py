"""The Ray wiring both drivers share (the build and the SAE trainer): joining or starting Ray, and
the image path ``index shards → decode (tasks) → backbone actor pool``.

The drivers name the actor class (:mod:`actors.encoder`); this module only strings the Ray Data
operators together, so it stays library code."""

from __future__ import annotations

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipeline.config import EncoderConfig, PreprocessConfig, RayConfig, SourceConfig, StorageConfig, fsspec_options
from pipeline.errors import write_errors
from pipeline.preprocessing import decode_batch
from pipeline.sources import ImageReader

SHARD_BATCHES = 4  # encoder batches per index shard (one input block; at most one output file's rows)


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    if cfg.num_cpus is not None or cfg.num_gpus is not None:
        # Resources given: a fresh local Ray of that size (never a cluster that happens to run here).
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    else:
        # ray.address, else RAY_ADDRESS (as under `ray job submit`), else a running local
        # cluster, else a new local Ray — Ray's own order.
        ray.init(address=cfg.address)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def in_shards(rows: pa.Table, shard_rows: int) -> ray.data.Dataset:
    """A Ray Dataset of one block per ``shard_rows`` rows (one task each downstream)."""
    return ray.data.from_arrow([rows.slice(i, shard_rows) for i in range(0, rows.num_rows, shard_rows)])


def decode_task(batch, *, source: SourceConfig, preprocess: PreprocessConfig, patch_px: int,
                errors_to: tuple[str, StorageConfig] | None = None):
    """Index rows → model-ready pixels (a Ray Data task); rejected images go to the errors/ of
    ``errors_to`` = (output, storage section), or are dropped when it is None. (Credentials are
    read here, in the worker, as everywhere: never shipped from the driver.)"""
    good, rejected = decode_batch(batch, preprocess, ImageReader(source), patch_px)
    if errors_to is not None:
        output, storage_section = errors_to
        write_errors(output, fsspec_options(storage_section, output), rejected)
    return good


def encode_images(index: ray.data.Dataset, actor: type, actor_kwargs: dict, *, source: SourceConfig,
                  preprocess: PreprocessConfig, encoder: EncoderConfig, patch_px: int,
                  errors_to: tuple[str, StorageConfig] | None = None) -> ray.data.Dataset:
    """index rows → decode tasks → ``actor`` (built with ``actor_kwargs``) in the encoder pool."""
    pixels = index.map_batches(decode_task, batch_size=preprocess.batch_size, batch_format="numpy",
                               fn_kwargs={"source": source, "preprocess": preprocess, "patch_px": patch_px,
                                          "errors_to": errors_to})
    return pixels.map_batches(
        actor, batch_size=encoder.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=encoder.min_actors, max_size=encoder.max_actors),
        num_gpus=encoder.num_gpus, num_cpus=encoder.num_cpus, fn_constructor_kwargs=actor_kwargs)
