"""The build graph: every stage of a dataset build and its Ray wiring, on one screen.

    index (driver) → _build/index/
    index shards → decode (tasks) → encode (GPU actor pool) → activations/    [resumed by image_id]
    activations/ → partial counts (tasks) → groupby-sum (shuffle) → counts/
    counts/ → select_latents (driver; counts are sparse) → selected/
    activations/ → find_candidates (tasks) → top images per (species, latent) (groupby) → candidates/
    candidates/ → unit shards (driver) → annotate (actor pool) → traits/      [resumed by annotation_id]
    rejected rows anywhere → errors/ (de-duplicated at the end)

Resume: the same command over the same output picks up where a killed run stopped. A finished
stage leaves a marker (_build/stages/NAME.json) and is never redone. An unfinished count, select
or candidates stage is cleared and redone (they are cheap). Encode and annotate take their input
in shards (one Ray Data block each; no output file holds more than a shard). A file whose footer
reads is complete (Parquet writes it last; an S3 object appears whole or not at all), so a
restart keeps the rows of complete files, deletes cut-off ones, and sends only the remaining
rows: no image is encoded and no LLM answer paid for twice once written. (Ray Data's own
row-level checkpointing would restore the same way, but its restore step adds an actor pool that
reserves a CPU per actor, which deadlocks a resumed build on a small cluster.) A different config
pointed at an existing output is refused, naming the keys that differ.

    python -m pipeline.build --config FILE.yaml [--set key=value ...] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import BuildConfig, ConfigError, RayConfig, add_config_arguments, config_changes, load_config
from pipeline.errors import write_errors

STAGE_DIRS = ("activations", "counts", "selected", "candidates", "traits", "errors")
STATE = "_build"  # resume state: the config, the index, stage markers, fault-switch markers
STAGES = ("index", "encode", "count", "select", "candidates", "annotate")
STAGE_OUTPUT = {"index": f"{STATE}/index", "encode": "activations", "count": "counts", "select": "selected",
                "candidates": "candidates", "annotate": "traits"}
RESUMABLE = {"encode": "image_id", "annotate": "annotation_id"}  # stages resumed row by row → their row id
# Keys a resume may change: where and how fast it runs (and where the folder now is), never what it computes.
RESUMABLE_KEYS = ("output", "ray.", "storage.", "source.storage_options", "preprocess.batch_size", "encoder.batch_size",
                  "encoder.num_gpus", "encoder.num_cpus", "encoder.min_actors", "encoder.max_actors",
                  "encoder.fail_once_after_batches", "annotate.max_in_flight", "annotate.num_actors",
                  "annotate.num_gpus", "annotate.num_cpus", "annotate.batch_size", "annotate.llm.base_url",
                  "annotate.llm.api_key_env", "annotate.llm.timeout_s", "annotate.llm.max_retries",
                  "annotate.llm.backoff_s", "annotate.llm.app_name", "report")
SHARD_BATCHES = 4  # encoder batches per encode shard (one input block; at most one output file's rows)


# --------------------------------------------------------------------------- task adapters
# Thin wrappers that run a plain stage function inside Ray and route its rejected rows to errors/.

def decode_task(batch, *, cfg: BuildConfig):
    from pipeline.preprocessing import decode_batch
    from pipeline.sources import ImageReader

    good, rejected = decode_batch(batch, cfg.preprocess, ImageReader(cfg.source))
    write_errors(cfg.output, cfg.storage_options, rejected)
    return good


class EncodeActor:
    """The FiringEncoder, plus the tests' fault switch (encoder.fail_once_after_batches)."""

    def __init__(self, cfg: BuildConfig):
        from actors.encoder import FiringEncoder

        self.cfg, self.batches = cfg, 0
        self.encoder = FiringEncoder(model=cfg.backbone.model, layer=cfg.backbone.layer, sae_checkpoint=cfg.sae.checkpoint,
                                     threshold=cfg.sae.threshold, dtype=cfg.backbone.dtype, storage=cfg.storage)

    def __call__(self, batch):
        out = self.encoder(batch)
        self.batches += 1
        if self.batches == self.cfg.encoder.fail_once_after_batches and claim_fault(self.cfg, "encoder"):
            os._exit(1)  # dies holding a finished batch: Ray Data must restart the actor and redo it
        return out


def claim_fault(cfg: BuildConfig, name: str) -> bool:
    """True the first time per build (a marker in _build/faults/), so an injected fault fires once."""
    fs, root = storage.filesystem(cfg.output, cfg.storage_options)
    marker = storage.join(root, STATE, "faults", name)
    fs.makedirs(storage.join(root, STATE, "faults"), exist_ok=True)
    try:
        with fs.open(marker, "xb"):  # exclusive create: two actors reaching the switch together fire it once
            return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # a store without exclusive create
        if fs.exists(marker):
            return False
        fs.touch(marker)
        return True


class AnnotateActor:
    def __init__(self, cfg: BuildConfig, max_in_flight: int):
        from pipeline.annotate import AnnotateCandidates

        self.cfg = cfg
        self.stage = AnnotateCandidates(cfg.annotate, cfg.source, cfg.preprocess, max_in_flight=max_in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        traits, rejected = self.stage(batch.drop_columns(["annotation_id"]))
        write_errors(self.cfg.output, self.cfg.storage_options, rejected)
        return traits


# --------------------------------------------------------------------------- the build

class Build:
    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.fs, self.root = storage.filesystem(cfg.output, cfg.storage_options)
        self.arrow_fs, self.arrow_root = storage.arrow_filesystem(cfg.output, cfg.storage_options)
        self.stages: dict[str, dict] = {}
        self._index: pa.Table | None = None

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def arrow_path(self, name: str) -> str:
        return storage.join(self.arrow_root, name)

    def read(self, name: str, columns: list[str] | None = None):
        import ray.data
        return ray.data.read_parquet(self.arrow_path(name), filesystem=self.arrow_fs, columns=columns)

    def write(self, ds, name: str, rows_per_file: int | None = None) -> None:
        """rows_per_file: write each task's rows as they come (Ray Data otherwise combines small blocks
        into fewer files, and a complete file is the unit a resume keeps)."""
        ds.write_parquet(self.arrow_path(name), filesystem=self.arrow_fs, max_rows_per_file=rows_per_file)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    # -- output folder: new, resumed, or refused ---------------------------------------------

    def open_output(self, overwrite: bool) -> None:
        """Start a new build in the output, or check that the one there is this one (to resume)."""
        cfg, saved = self.cfg, self.path(f"{STATE}/config.json")
        if overwrite:
            for name in STAGE_DIRS + ("renderings", "report", "manifest.json", STATE):
                self.remove(name)
        current = cfg.model_dump(mode="json")
        if self.fs.exists(saved):
            changes = config_changes(storage.read_json(self.fs, saved), current, RESUMABLE_KEYS)
            if changes:
                raise ConfigError(f"output: {cfg.output} holds a build made with a different config ({changes}); "
                                  "rerun with that config to resume it, choose another output, or pass --overwrite")
            return
        if any(self.fs.exists(self.path(name)) for name in STAGE_DIRS + ("manifest.json",)):
            raise ConfigError(f"output: {cfg.output} already holds files of another build; "
                              "choose another output or pass --overwrite")
        storage.write_json(self.fs, saved, current)

    def finished_stage(self, name: str) -> dict | None:
        marker = self.path(f"{STATE}/stages/{name}.json")
        return storage.read_json(self.fs, marker) if self.fs.exists(marker) else None

    def run_stage(self, name: str) -> None:
        done = self.finished_stage(name)
        if done is not None:
            self.stages[name] = {**done, "resumed": True}
            print(f"[sae-traits] stage {name}: done in an earlier run ({done['rows']} rows)", flush=True)
            return
        print(f"[sae-traits] stage {name} ...", flush=True)
        if name not in RESUMABLE:  # a partial output of a killed run is cleared; these stages are cheap
            self.remove(STAGE_OUTPUT[name])
        start = time.perf_counter()
        extra = getattr(self, f"stage_{name}")() or {}
        wall = time.perf_counter() - start
        record = {"rows": storage.count_rows(self.fs, self.path(STAGE_OUTPUT[name])), "wall_s": round(wall, 3), **extra}
        storage.write_json(self.fs, self.path(f"{STATE}/stages/{name}.json"), record)  # done from here on
        self.stages[name] = record
        print(f"[sae-traits] stage {name}: {record['rows']} rows in {wall:.1f} s", flush=True)

    def written_ids(self, name: str) -> set[str]:
        """Row ids already in stage ``name``'s output from a killed run. Parquet writes its footer last and an S3
        object appears only once complete, so a file whose footer reads is whole: its rows count
        as done. A file cut off mid-write is deleted (its rows are redone)."""
        done = set()
        for path in storage.parquet_files(self.fs, self.path(STAGE_OUTPUT[name])):
            try:
                with self.fs.open(path, "rb") as f:
                    done.update(pq.read_table(f, columns=[RESUMABLE[name]]).column(0).to_pylist())
            except (pa.ArrowInvalid, OSError):
                self.fs.rm(path)
        return done

    def pending(self, name: str, rows: pa.Table, shard_rows: int):
        """The stage's input rows not yet written (all of them on a first run), as a Ray Dataset of
        one block per shard of ``shard_rows``; None when nothing is left."""
        import ray.data

        done = self.written_ids(name)
        if done:
            rows = rows.filter(pc.invert(pc.is_in(rows[RESUMABLE[name]], value_set=pa.array(list(done), pa.string()))))
            print(f"[sae-traits] stage {name}: resuming, {len(done)} rows written earlier, {rows.num_rows} to do", flush=True)
        if not rows.num_rows:
            return None
        return ray.data.from_arrow([rows.slice(i, shard_rows) for i in range(0, rows.num_rows, shard_rows)])

    def index(self) -> pa.Table:
        if self._index is None:
            self._index = storage.read_table(self.fs, self.path(STAGE_OUTPUT["index"]))
        return self._index

    # -- the stages ----------------------------------------------------------------------------

    def stage_index(self) -> dict:
        from pipeline.sources import build_index

        index, rejected = build_index(self.cfg.source)
        write_errors(self.cfg.output, self.cfg.storage_options, rejected)
        storage.write_table(self.fs, self.path(f"{STAGE_OUTPUT['index']}/index.parquet"), index)
        return {"rejected": len(rejected)}

    def stage_encode(self) -> None:
        from ray.data import ActorPoolStrategy

        cfg = self.cfg
        # Output files of at most a shard: a killed build redoes only what was in flight.
        shard_rows = SHARD_BATCHES * cfg.encoder.batch_size
        if (todo := self.pending("encode", self.index(), shard_rows)) is None:
            return
        pixels = todo.map_batches(
            decode_task, batch_size=cfg.preprocess.batch_size, batch_format="numpy", fn_kwargs={"cfg": cfg})
        activations = pixels.map_batches(
            EncodeActor, batch_size=cfg.encoder.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=cfg.encoder.min_actors, max_size=cfg.encoder.max_actors),
            num_gpus=cfg.encoder.num_gpus, num_cpus=cfg.encoder.num_cpus, fn_constructor_kwargs={"cfg": cfg})
        self.write(activations, "activations", rows_per_file=shard_rows)

    def stage_count(self) -> None:
        from actors.reducer import reduce_counts
        from pipeline.counting import taxonomy_codes

        firings = self.read("activations", columns=["species", "genus", "family", "latent"])
        self.write(reduce_counts(firings, taxonomy_codes(self.index()), self.cfg.counting.unit,
                                 num_partitions=self.n_cpus), "counts")

    def stage_select(self) -> None:
        from pipeline.selection import select_latents, taxonomy_of_species

        counts = storage.read_table(self.fs, self.path("counts"))
        selected = select_latents(counts, taxonomy_of_species(self.index()), self.cfg.contrast)
        storage.write_table(self.fs, self.path("selected/selected.parquet"), selected)

    def stage_candidates(self) -> None:
        from pipeline.candidates import find_candidates, keep_top_images

        cfg = self.cfg
        selected = storage.read_table(self.fs, self.path("selected"))
        hits = self.read("activations").map_batches(find_candidates, batch_format="pyarrow", fn_kwargs={"selected": selected})
        top = hits.groupby(["species", "latent"], num_partitions=self.n_cpus).map_groups(
            keep_top_images, batch_format="pyarrow",
            fn_kwargs={"top_images": cfg.candidates.top_images, "group_size": cfg.candidates.group_size})
        self.write(top, "candidates")

    def stage_annotate(self) -> None:
        from ray.data import ActorPoolStrategy

        from pipeline.annotate import TRAITS_SCHEMA, annotation_units, unit_annotation_id

        ann = self.cfg.annotate
        candidates = storage.read_table(self.fs, self.path("candidates")) if self.fs.exists(self.path("candidates")) else None
        units = annotation_units(candidates.to_pylist() if candidates else [], ann.images_per_prompt)
        if not units:  # nothing selected: still leave an empty traits/ with the contract's schema
            storage.write_table(self.fs, self.path("traits/empty.parquet"), TRAITS_SCHEMA.empty_table())
            return
        # kind none is CPU work: one actor per CPU. An LLM kind is waiting on the model:
        # num_actors actors, each with its share of max_in_flight and batches big enough to fill it.
        actors = self.n_cpus if ann.llm.kind == "none" else ann.num_actors
        share = -(-ann.max_in_flight // actors)
        batch = ann.batch_size if ann.llm.kind == "none" else max(ann.batch_size, 4 * share)
        # Shards of one batch (so every actor gets work), keyed by annotation_id: a resumed build
        # sends only the units whose answers were never written.
        table = pa.Table.from_pylist([{"annotation_id": unit_annotation_id(ann, u), **u} for u in units])
        if (todo := self.pending("annotate", table, batch)) is None:
            return
        traits = todo.map_batches(
            AnnotateActor, batch_size=batch, batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=actors), num_gpus=ann.num_gpus, num_cpus=ann.num_cpus,
            fn_constructor_kwargs={"cfg": self.cfg, "max_in_flight": share})
        self.write(traits, "traits", rows_per_file=batch)

    # -- the whole build -----------------------------------------------------------------------

    def run(self, overwrite: bool = False) -> dict:
        import ray
        import ray.data

        cfg = self.cfg
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        self.open_output(overwrite)
        if self.fs.exists(self.path("manifest.json")):  # finished earlier: nothing to redo
            manifest = storage.read_json(self.fs, self.path("manifest.json"))
            print(format_summary(manifest["summary"], resumed=True), flush=True)
            return manifest

        self.run_stage("index")
        if any(self.finished_stage(name) is None for name in STAGES):
            init_ray(cfg.ray)
            ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
            self.n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        for name in STAGES[1:]:
            self.run_stage(name)

        errors = compact_errors(self.fs, self.path("errors"))
        self.stages["errors"] = {"rows": errors.num_rows}
        manifest = {
            "status": "succeeded",
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "resumed": any(s.get("resumed") for s in self.stages.values()),
            "stages": self.stages,
            "summary": self.summary(errors),
            "config": cfg.model_dump(mode="json"),
            "versions": versions(),
            "sae": sae_metadata(cfg.sae.checkpoint, cfg.options_for(cfg.sae.checkpoint)),
        }
        storage.write_json(self.fs, self.path("manifest.json"), manifest)
        print(format_summary(manifest["summary"]), flush=True)
        if cfg.report:
            self.write_report()
        return manifest

    def write_report(self) -> None:
        from pipeline.report import write_report

        try:
            print(f"[sae-traits] report: {write_report(self.cfg.output, self.cfg.storage_options, log=lambda *_: None)}")
        except Exception as exc:  # the dataset is complete and recorded; a report problem must not fail the build
            print(f"[sae-traits] warning: no report ({type(exc).__name__}: {exc}); "
                  f"retry with python -m pipeline.report --build {self.cfg.output}", file=sys.stderr, flush=True)

    def summary(self, errors: pa.Table) -> dict:
        """The figures a user checks first: what went in, what came out, where the time went."""
        def rows(name):
            return self.stages.get(name, {}).get("rows", 0)

        traits = storage.read_table(self.fs, self.path("traits"), columns=["status"])
        selected = storage.read_table(self.fs, self.path("selected"), columns=["species"])
        rejected = Counter(s for s in errors.column("stage").to_pylist() if s != "annotate") if errors.num_rows else {}
        return {
            "images_read": rows("index") + self.stages.get("index", {}).get("rejected", 0),
            "images_indexed": rows("index"),
            "images_encoded": rows("encode"),
            "images_rejected": dict(sorted(rejected.items())),
            "latents_selected": rows("select"),
            "species_with_latents": len(set(selected.column("species").to_pylist())) if selected.num_rows else 0,
            "candidates": rows("candidates"),
            "annotations": dict(sorted(Counter(traits.column("status").to_pylist()).items())) if traits.num_rows else {},
            "errors": errors.num_rows,
            "stages": {name: {"rows": s.get("rows"), "wall_s": s.get("wall_s"), "resumed": bool(s.get("resumed"))}
                       for name, s in self.stages.items() if name in STAGES},
        }


def compact_errors(fs, path: str) -> pa.Table:
    """errors/ → one de-duplicated file. A resumed stage may record a rejected image again (it was
    never written, so it is retried); one row per (stage, image, annotation) stays."""
    from pipeline.errors import ERRORS_SCHEMA

    errors = storage.read_table(fs, path) if fs.exists(path) else ERRORS_SCHEMA.empty_table()
    if not errors.num_rows:
        return ERRORS_SCHEMA.empty_table()
    seen, keep = set(), []
    for i, row in enumerate(errors.select(["stage", "image_id", "annotation_id"]).to_pylist()):
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    errors = errors.take(keep).sort_by([("stage", "ascending"), ("image_id", "ascending"), ("annotation_id", "ascending")])
    old = storage.parquet_files(fs, path)
    storage.write_table(fs, storage.join(path, "errors.parquet"), errors)
    for p in old:
        if not p.endswith("/errors.parquet"):
            fs.rm(p)
    return errors


def format_summary(summary: dict, resumed: bool = False) -> str:
    """The end-of-build table (also printed by a rerun over a finished build)."""
    lines = ["", "sae-traits build summary" + (" (finished earlier; nothing to redo)" if resumed else ""),
             f"  {'stage':<12}{'rows':>10}{'wall s':>10}"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<12}{s['rows']:>10}{s['wall_s']:>10.1f}" + ("  (earlier run)" if s["resumed"] else ""))
    rejected = sum(summary["images_rejected"].values())
    lines += [f"  images: {summary['images_read']} read, {summary['images_encoded']} encoded, {rejected} rejected"
              + (f" ({', '.join(f'{k} {v}' for k, v in summary['images_rejected'].items())})" if rejected else ""),
              f"  latents selected: {summary['latents_selected']} over {summary['species_with_latents']} species; "
              f"candidates: {summary['candidates']}",
              "  annotations: " + (", ".join(f"{k} {v}" for k, v in summary["annotations"].items()) or "none"),
              f"  errors/: {summary['errors']} rows", ""]
    return "\n".join(lines)


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


def sae_metadata(checkpoint: str, storage_options: dict | None = None) -> dict:
    from actors.sae import sae_config_json

    spec = sae_config_json(checkpoint, storage_options)
    if spec is not None:
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
