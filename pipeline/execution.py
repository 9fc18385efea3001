"""The Ray wiring both drivers share (the build and the SAE trainer): joining or starting Ray,
checking that an actor pool can ever be placed before it waits, and the image path
``index shards → decode (tasks) → backbone actor pool``.

The drivers name the actor class (:mod:`actors.encoder`); this module only strings the Ray Data
operators together, so it stays library code."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa
import ray
import ray.data
from ray.autoscaler.sdk import request_resources
from ray.data import ActorPoolStrategy

from pipeline import storage
from pipeline.config import (ConfigError, EncoderConfig, PreprocessConfig, RayConfig, SourceConfig, StorageConfig,
                             fsspec_options)
from pipeline.console import PREFIX
from pipeline.errors import write_errors
from pipeline.preprocessing import decode_batch
from pipeline.sources import ImageReader

SHARD_BATCHES = 4  # encoder batches per index shard (one input block: one decode..encode task chain)


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


@ray.remote
def _call(fn, item):
    return fn(item)


def in_tasks(fn, items) -> list:
    """``[fn(item) for item in items]``, each call a Ray task (one per WebDataset shard, say), in order."""
    return ray.get([_call.remote(fn, item) for item in items])


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# --------------------------------------------------------------------------- can a pool ever be placed?

@dataclass(frozen=True)
class PoolAsk:
    """What one actor of a stage's pool asks for, and the config key behind each resource."""
    stage: str
    per_actor: dict[str, float]
    """e.g. {"GPU": 1, "CPU": 1}"""
    keys: dict[str, str]
    """resource → the key that sets it, e.g. {"GPU": "encoder.num_gpus"}"""

    @property
    def wanted(self) -> dict[str, float]:
        return {r: v for r, v in self.per_actor.items() if v > 0}

    def describe(self) -> str:
        return ", ".join(f"{r}:{v:g}" for r, v in self.wanted.items())


def fits(ask: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(r, 0) >= v for r, v in ask.items())


def never_fits(pool: PoolAsk, nodes: list[dict[str, float]], node_types: dict[str, dict[str, float]]) -> str:
    """Why no node of the cluster, up or addable, can ever hold one actor of ``pool`` (naming the
    key and the figures); '' when one can."""
    ask = pool.wanted
    if any(fits(ask, n) for n in nodes) or any(fits(ask, t) for t in node_types.values()):
        return ""
    grow = "and cannot add one" if not node_types else f"and none of its node types ({', '.join(node_types)}) has it"
    for resource, value in ask.items():
        most = max([n.get(resource, 0) for n in [*nodes, *node_types.values()]], default=0)
        if most < value:
            key = pool.keys.get(resource, resource)
            has = f"no {resource}" if most == 0 else f"at most {most:g} {resource} per node"
            off = "false" if key.endswith("use_gpu") else "0"
            fix = (f"set {key}={off} to run on the CPU" if resource == "GPU" and most == 0 else
                   f"set {key} to at most {most:g}" if most else f"lower {key}")
            return f"{key}={value:g} but this Ray cluster has {has} {grow}; {fix}"
    return (f"{pool.stage}: one actor asks for {pool.describe()} ({', '.join(pool.keys.values())}) together, "
            "and no node has all of it; lower one of those keys")


def cluster_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def addable_node_types() -> dict[str, dict[str, float]]:
    """Node types an autoscaler may still add (name → resources); none for a fixed cluster."""
    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return {}
    return {g.name or f"type{i}": dict(g.resources) for i, g in enumerate(config.node_group_configs) if g.max_count != 0}


def ensure_placeable(pools: list[PoolAsk], wait_s: float, *, nodes: Callable[[], list[dict]] = cluster_nodes,
                     node_types: Callable[[], dict] = addable_node_types, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep, log=print, poll_s: float = 5.0) -> None:
    """Before a pool is submitted: stop with a ConfigError naming the key when it can never be placed;
    when it fits only a node type that is not up yet, ask the autoscaler for it and wait (saying so
    once a minute) up to ``wait_s`` (``ray.wait_for_resources_s``), then stop the same way."""
    types = node_types()
    for pool in pools:
        reason = never_fits(pool, nodes(), types)
        if reason:
            raise ConfigError(reason)
    for pool in pools:
        if any(fits(pool.wanted, n) for n in nodes()):
            continue
        request_resources(bundles=[pool.wanted])  # the autoscaler adds nodes for requests, not for our waiting
        start, said = clock(), None
        while not any(fits(pool.wanted, n) for n in nodes()):
            waited = clock() - start
            if waited >= wait_s:
                raise ConfigError(f"{pool.stage}: waited {waited:.0f} s for a node with {pool.describe()} "
                                  f"({', '.join(pool.keys.values())}); node types that have one: "
                                  f"{', '.join(t for t, r in types.items() if fits(pool.wanted, r))}; none came up "
                                  "(see `ray status`); raise ray.wait_for_resources_s or lower those keys")
            if said is None or clock() - said >= 60:
                log(f"{PREFIX} stage {pool.stage}: waiting for a node with {pool.describe()} — "
                    f"{waited / 60:.0f} min so far (up to ray.wait_for_resources_s={wait_s:g})")
                said = clock()
            sleep(poll_s)
        request_resources(bundles=[])


@dataclass(frozen=True)
class ActorPool:
    """An actor pool declared once — the actor class, its constructor arguments, one actor's
    resources and the pool's size — and read by both the placement check (:attr:`ask`) and the Ray
    call (:meth:`map_batches`), as Ray's batch ``StatefulStage`` carries ``fn_constructor_kwargs``
    and its ``map_batches`` arguments together. Actors get the config sections they use."""
    stage: str
    actor: type
    constructor_kwargs: dict
    num_gpus: float
    num_cpus: float
    keys: dict[str, str]
    """resource → the key that sets it, e.g. {"GPU": "encoder.num_gpus"}"""
    min_size: int = 1
    max_size: int = 1
    concurrent_calls: int | None = None
    """Calls each actor serves at once, on threads of its own (None: one at a time, Ray's default)."""

    @property
    def ask(self) -> PoolAsk:
        return PoolAsk(self.stage, {"GPU": self.num_gpus, "CPU": self.num_cpus}, self.keys)

    def map_batches(self, ds: ray.data.Dataset, **kwargs) -> ray.data.Dataset:
        threads = {} if self.concurrent_calls is None else {
            "max_concurrent_calls_per_actor": self.concurrent_calls, "enable_true_multi_threading": True}
        pool = ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size, **threads)
        return ds.map_batches(self.actor, compute=pool, num_gpus=self.num_gpus, num_cpus=self.num_cpus,
                              fn_constructor_kwargs=self.constructor_kwargs, **kwargs)


def encoder_pool(stage: str, encoder: EncoderConfig, actor: type, constructor_kwargs: dict) -> ActorPool:
    """The backbone's pool (the build's encode stage, the trainer's patch features), sized by ``encoder``."""
    return ActorPool(stage, actor, constructor_kwargs, encoder.num_gpus, encoder.num_cpus,
                     {"GPU": "encoder.num_gpus", "CPU": "encoder.num_cpus"}, encoder.min_actors, encoder.max_actors)


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


def encode_images(index: ray.data.Dataset, pool: ActorPool, *, source: SourceConfig, preprocess: PreprocessConfig,
                  encoder: EncoderConfig, patch_px: int,
                  errors_to: tuple[str, StorageConfig] | None = None) -> ray.data.Dataset:
    """index rows → decode tasks → the encoder ``pool`` (:func:`encoder_pool`). With
    ``preprocess.decode: gpu`` the tasks pass checked bytes and the pool's actors decode them
    (their ``device_decode`` argument, :mod:`actors.encoder`)."""
    if preprocess.decode == "gpu":
        pool = replace(pool, constructor_kwargs={**pool.constructor_kwargs,
                                                 "device_decode": (preprocess, patch_px, errors_to)})
    pixels = index.map_batches(decode_task, batch_size=preprocess.batch_size, batch_format="numpy",
                               fn_kwargs={"source": source, "preprocess": preprocess, "patch_px": patch_px,
                                          "errors_to": errors_to})
    return pool.map_batches(pixels, batch_size=encoder.batch_size, batch_format="numpy")


# --------------------------------------------------------------------------- outputs a rerun resumes from

def write_shard(rows: pa.Table, *, output: str, storage_section: StorageConfig, folder: str, key: str) -> pa.Table:
    """Write one task's rows as ``OUTPUT/FOLDER/<digest of their KEY values>.parquet`` (whole or not
    at all, :func:`pipeline.storage.publish`); returns ``{"rows": [n]}``. The name is determined by
    the input the task was given, so the same rows written again — a retried task, a write that an
    s3 retry delivers after its task was cancelled — replace the file instead of adding rows."""
    if rows.num_rows:
        fs, root = storage.filesystem(output, fsspec_options(storage_section, output))
        name = storage.stable_digest(sorted(set(rows.column(key).to_pylist())))
        storage.write_table(fs, storage.join(root, folder, f"{name}.parquet"), rows)
    return pa.table({"rows": [rows.num_rows]})


def write_named_files(ds: ray.data.Dataset, output: str, storage_section: StorageConfig, folder: str, key: str) -> int:
    """Run ``ds`` and write each of its blocks (one per task: an encoder batch, an annotate shard) with
    :func:`write_shard`; returns the rows written."""
    written = ds.map_batches(write_shard, batch_size=None, batch_format="pyarrow", fn_kwargs={
        "output": output, "storage_section": storage_section, "folder": folder, "key": key})
    return sum(int(n) for batch in written.iter_batches(batch_format="pyarrow") for n in batch.column("rows").to_pylist())
