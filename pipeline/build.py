"""The build graph: every stage of a dataset build and its Ray wiring, on one screen.

    index (driver) → decode (tasks) → encode (GPU actor pool) → activations/
    activations/ → partial counts (tasks) → groupby-sum (shuffle) → counts/
    counts/ → select_latents (driver; counts are sparse) → selected/
    activations/ → find_candidates (tasks) → top images per (species, latent) (groupby) → candidates/
    candidates/ → annotate (CPU actor pool) → traits/            rejected rows anywhere → errors/

    python -m pipeline.build --config FILE.yaml [--set key=value ...] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata

import pyarrow as pa

from pipeline import storage
from pipeline.config import BuildConfig, ConfigError, RayConfig, add_config_arguments, load_config
from pipeline.errors import write_errors

STAGE_DIRS = ("activations", "counts", "selected", "candidates", "traits", "errors")
INDEX_BLOCK_ROWS = 256


# --------------------------------------------------------------------------- task adapters
# Thin wrappers that run a plain stage function inside Ray and route its rejected rows to errors/.

def decode_task(batch, *, cfg: BuildConfig):
    from pipeline.preprocessing import decode_batch
    from pipeline.sources import ImageReader

    good, rejected = decode_batch(batch, cfg.preprocess, ImageReader(cfg.source))
    write_errors(cfg.output, cfg.source.storage_options, rejected)
    return good


class AnnotateActor:
    def __init__(self, cfg: BuildConfig, max_in_flight: int):
        from pipeline.annotate import AnnotateCandidates

        self.cfg = cfg
        self.stage = AnnotateCandidates(cfg.annotate, cfg.source, cfg.preprocess, max_in_flight=max_in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        traits, rejected = self.stage(batch)
        write_errors(self.cfg.output, self.cfg.source.storage_options, rejected)
        return traits


# --------------------------------------------------------------------------- the build

class Build:
    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.fs, self.root = storage.filesystem(cfg.output, cfg.source.storage_options)
        self.arrow_fs, self.arrow_root = storage.arrow_filesystem(cfg.output, cfg.source.storage_options)
        self.stages: dict[str, dict] = {}

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def arrow_path(self, name: str) -> str:
        return storage.join(self.arrow_root, name)

    @contextmanager
    def stage(self, name: str, rows_from: str | None = None):
        print(f"[sae-traits] stage {name} ...", flush=True)
        start = time.perf_counter()
        yield
        wall = time.perf_counter() - start
        rows = storage.count_rows(self.fs, self.path(rows_from or name))
        self.stages[name] = {"rows": rows, "wall_s": round(wall, 3)}
        print(f"[sae-traits] stage {name}: {rows} rows in {wall:.1f} s", flush=True)

    def read(self, name: str, columns: list[str] | None = None):
        import ray.data
        return ray.data.read_parquet(self.arrow_path(name), filesystem=self.arrow_fs, columns=columns)

    def write(self, ds, name: str) -> None:
        ds.write_parquet(self.arrow_path(name), filesystem=self.arrow_fs)

    def prepare_output(self, overwrite: bool) -> None:
        manifest = self.path("manifest.json")
        if self.fs.exists(manifest) and not overwrite:
            raise ConfigError(f"output: {self.cfg.output} already holds a build (manifest.json); "
                              "choose another output or pass --overwrite")
        for name in STAGE_DIRS + ("renderings", "manifest.json"):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)

    def run(self, overwrite: bool = False) -> dict:
        import ray
        import ray.data
        from ray.data import ActorPoolStrategy

        from actors.encoder import FiringEncoder
        from actors.reducer import reduce_counts
        from pipeline.candidates import find_candidates, keep_top_images
        from pipeline.counting import taxonomy_codes
        from pipeline.selection import select_latents, taxonomy_of_species
        from pipeline.sources import build_index

        cfg = self.cfg
        started = datetime.now(timezone.utc)
        self.prepare_output(overwrite)
        t0 = time.perf_counter()

        index, rejected = build_index(cfg.source)
        write_errors(cfg.output, cfg.source.storage_options, rejected)
        self.stages["index"] = {"rows": index.num_rows, "rejected": len(rejected),
                                "wall_s": round(time.perf_counter() - t0, 3)}

        init_ray(cfg.ray)
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

        with self.stage("encode", rows_from="activations"):
            blocks = [index.slice(i, INDEX_BLOCK_ROWS) for i in range(0, index.num_rows, INDEX_BLOCK_ROWS)]
            pixels = ray.data.from_arrow(blocks).map_batches(
                decode_task, batch_size=cfg.preprocess.batch_size, batch_format="numpy", fn_kwargs={"cfg": cfg})
            activations = pixels.map_batches(
                FiringEncoder, batch_size=cfg.encoder.batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(min_size=cfg.encoder.min_actors, max_size=cfg.encoder.max_actors),
                num_gpus=cfg.encoder.num_gpus, num_cpus=cfg.encoder.num_cpus,
                fn_constructor_kwargs={"model": cfg.backbone.model, "layer": cfg.backbone.layer,
                                       "sae_checkpoint": cfg.sae.checkpoint, "threshold": cfg.sae.threshold,
                                       "dtype": cfg.backbone.dtype})
            self.write(activations, "activations")

        with self.stage("count", rows_from="counts"):
            firings = self.read("activations", columns=["species", "genus", "family", "latent"])
            taxonomy = taxonomy_codes(index)
            self.write(reduce_counts(firings, taxonomy, cfg.counting.unit, num_partitions=n_cpus), "counts")

        with self.stage("select", rows_from="selected"):
            counts = storage.read_table(self.fs, self.path("counts"))
            selected = select_latents(counts, taxonomy_of_species(index), cfg.contrast)
            storage.write_table(self.fs, storage.join(self.path("selected"), "selected.parquet"), selected)

        with self.stage("candidates"):
            hits = self.read("activations").map_batches(
                find_candidates, batch_format="pyarrow", fn_kwargs={"selected": selected})
            top = hits.groupby(["species", "latent"], num_partitions=n_cpus).map_groups(
                keep_top_images, batch_format="pyarrow",
                fn_kwargs={"top_images": cfg.candidates.top_images, "group_size": cfg.candidates.group_size})
            self.write(top, "candidates")

        with self.stage("annotate", rows_from="traits"):
            from pipeline.annotate import TRAITS_SCHEMA, annotation_units

            units = annotation_units(storage.read_table(self.fs, self.path("candidates")).to_pylist()
                                     if self.fs.exists(self.path("candidates")) else [], cfg.annotate.images_per_prompt)
            if units:
                ann = cfg.annotate
                # kind none is CPU work: one actor per CPU. An LLM kind is waiting on the model:
                # num_actors actors, each with its share of max_in_flight and batches big enough to fill it.
                actors = n_cpus if ann.llm.kind == "none" else ann.num_actors
                share = -(-ann.max_in_flight // actors)
                batch = ann.batch_size if ann.llm.kind == "none" else max(ann.batch_size, 4 * share)
                # Blocks of one batch each, made on the driver, so every actor gets work.
                traits = ray.data.from_items(units, override_num_blocks=-(-len(units) // batch)).map_batches(
                    AnnotateActor, batch_size=batch, batch_format="pyarrow",
                    compute=ActorPoolStrategy(min_size=1, max_size=actors), num_gpus=ann.num_gpus, num_cpus=ann.num_cpus,
                    fn_constructor_kwargs={"cfg": cfg, "max_in_flight": share})
                self.write(traits, "traits")
            else:  # nothing selected: still leave an empty traits/ with the contract's schema
                storage.write_table(self.fs, storage.join(self.path("traits"), "empty.parquet"), TRAITS_SCHEMA.empty_table())

        self.stages["errors"] = {"rows": storage.count_rows(self.fs, self.path("errors"))}
        manifest = {
            "status": "succeeded",
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "stages": self.stages,
            "config": cfg.model_dump(mode="json"),
            "versions": versions(),
            "sae": sae_metadata(cfg.sae.checkpoint),
        }
        with self.fs.open(self.path("manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        return manifest


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.num_cpus is not None or cfg.num_gpus is not None:
        # Resources given: a fresh local Ray of that size (never a cluster that happens to run here).
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
    else:
        # ray.address, else RAY_ADDRESS (as under `ray job submit`), else a running local
        # cluster, else a new local Ray — Ray's own order.
        ray.init(address=cfg.address)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("sae-traits", "ray", "torch", "transformers", "pyarrow", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def sae_metadata(checkpoint: str) -> dict:
    from pathlib import Path

    config = Path(checkpoint) / "config.json"
    if config.is_file():
        spec = json.loads(config.read_text())
        return {"checkpoint": checkpoint, "d": spec.get("d"), "m": spec.get("m"), "metadata": spec.get("metadata", {})}
    return {"checkpoint": checkpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.build", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build in the output")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(BuildConfig, args.config, args.overrides)  # fails before Ray starts
        manifest = Build(cfg).run(overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": cfg.output, "stages": manifest["stages"], "wall_s": manifest["wall_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
