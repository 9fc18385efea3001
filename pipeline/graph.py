"""The build graph: every stage of a dataset build and its Ray wiring, on one screen.

    index (driver) → _build/index/
    index shards → decode (tasks) → encode (GPU actor pool) → activations/    [resumed by image_id]
    activations/ → partial counts (tasks) → groupby-sum (shuffle) → counts/
    counts/ → select_latents (tasks, one contrast group each) → selected/
    activations/ → find_candidates (tasks) → evidence and ranking per species (groupby; reads the candidate images) → candidates/
    candidates/ → unit shards (driver) → annotate (actor pool) → traits/      [resumed by annotation_id]
    rejected rows anywhere → errors/ (de-duplicated at the end; present, maybe empty, in every build)

A small build (at most ``ray.small_build_images`` images) runs count, select, candidates and an
annotate that is templated or asks an OpenAI-compatible server in the driver on whole tables, with
the same library functions: Ray's fixed costs (planning, shuffle actors, actor starts) would
otherwise be most of its time.

The stages, their folders, schemas and resume keys are declared once, in :mod:`pipeline.contract`.
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

The driver (:mod:`pipeline.build`) holds the output's lease (:mod:`pipeline.lease`) before it
imports this module: a second driver on the same output is refused before torch and Ray load.
"""

from __future__ import annotations

import platform
import sys
import time
import traceback
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from actors.annotate import AnnotateActor
from actors.encoder import EncodeActor
from pipeline import storage
from pipeline.annotation.units import sent, unit_table, with_annotation_ids
from pipeline.candidates import find_candidates, measure_candidates, measure_species_task
from pipeline.config import BuildConfig, ConfigError, config_changes, runtime_keys
from pipeline.console import PREFIX, Progress, quiet, say
from pipeline.contract import (CANDIDATES_SCHEMA, CONTRACT_VERSION, ERRORS, ERRORS_SCHEMA, SELECTED_SCHEMA, STAGE,
                               STAGE_NAMES, STATE, TABLES, TRAITS_SCHEMA)
from pipeline.counting import counts_of, reduce_counts, taxonomy_codes
from pipeline.encoding import check_models
from pipeline.errors import compact_errors, write_errors
from pipeline.evidence import TRUSTED
from pipeline.fingerprint import REQUEST_KEYS, Fingerprints, fingerprints, request_keys
from pipeline.execution import (SHARD_BATCHES, ActorPool, cluster_cpus, encode_images, encoder_pool, ensure_placeable,
                                in_shards, in_tasks, init_ray, write_named_files, write_shard)
from pipeline.lease import LEASE, OutputLease
from pipeline.preprocessing import OriginalImages
from pipeline.report import write_report
from pipeline.reuse import (DECODE, ITEMS, PREVIOUS, EarlierBuild, answered, copy_folder, decode_errors, matching, restamped,
                            reuse_counts, reused_rows, whole_match)
from pipeline.sae import sae_metadata
from pipeline.selection import select_by_contrast_group, select_latents, taxonomy_of_species
from pipeline.sources import build_index

RESUME_READ_THREADS = 16  # output files whose resume keys are read at once (object-store latency, not CPU)
# Rows per Parquet row group of every table the build writes. Left to Ray Data, each small block a
# groupby makes becomes a row group: candidates/ at 100,000 images had 10,500 row groups of 3 rows
# and a 28 MB footer, and reading its 31k rows cost the driver +800 MiB and 8 s.
ROW_GROUP_ROWS = 65_536
# Keys a resume may change: where and how fast it runs (and where the folder now is), never what it computes.
RESUMABLE_KEYS = runtime_keys(BuildConfig)
LOGS = f"{STATE}/logs"  # one log file per run of the build: what Ray and the libraries wrote


class RunContext(NamedTuple):
    """What the stages need to know of this run beyond the config (found once, before they start)."""
    n_cpus: int
    """CPUs of the Ray cluster: partitions of the shuffles, kind-none annotate actors."""
    patch_px: int | None
    """The backbone's patch size (read from its config; None when encode is done already)."""
    pools: dict[str, ActorPool]
    """The actor pools of the unfinished stages that run on Ray (:meth:`Build.pools`), by stage."""


# --------------------------------------------------------------------------- the build

class Build:
    def __init__(self, cfg: BuildConfig, lease: OutputLease | None = None):
        """``lease``: the output's lease, held already by the driver (:mod:`pipeline.build`);
        without one, :meth:`run` takes it."""
        self.cfg, self.lease = cfg, lease
        self.fs, self.root = storage.filesystem(cfg.output, cfg.storage_options)
        self.arrow_fs, self.arrow_root = storage.arrow_filesystem(cfg.output, cfg.storage_options)
        self.stages: dict[str, dict] = {}
        self._index: pa.Table | None = None
        self.progress: Progress | None = None
        self.log_path: str | None = None
        self.current: str | None = None  # the stage running now (what a write failure names)
        self.fingerprints: dict[str, str] = {}  # by stage, once the index is known (pipeline.fingerprint)
        self.keys: Fingerprints | None = None  # and the per-item keys (reuse)
        self.earlier: list[EarlierBuild] = []  # the finished builds this one reuses (pipeline.reuse)
        self.undecodable: pa.Array = pa.array([], pa.string())  # images whose errors/ rows were reused
        self.reused_now: Counter[str] = Counter()  # rows this run took from earlier builds, by stage

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def arrow_path(self, name: str) -> str:
        return storage.join(self.arrow_root, name)

    def read(self, name: str, columns: list[str] | None = None):
        return ray.data.read_parquet(self.arrow_path(name), filesystem=self.arrow_fs, columns=columns)

    def write(self, ds, name: str) -> None:
        """A cheap stage's table (count, select, candidates: cleared and redone if a run stops mid-stage)."""
        ds.write_parquet(self.arrow_path(name), filesystem=self.arrow_fs, row_group_size=ROW_GROUP_ROWS)

    def write_named(self, ds, name: str) -> None:
        """Each task's rows as one file named by their resume keys (:func:`write_named_files`): a
        retried task, or a write that lands after its task was cancelled, replaces its own file."""
        write_named_files(ds, self.cfg.output, self.cfg.storage, STAGE[name].output, STAGE[name].resume_key)

    def write_whole(self, table: pa.Table, name: str) -> None:
        """A table made in the driver, as one file (a small build's count, select and candidates)."""
        storage.write_table(self.fs, self.path(f"{name}/part-00000.parquet"), table,
                            row_group_size=ROW_GROUP_ROWS)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    # -- output folder: new, resumed, or refused ---------------------------------------------

    def open_output(self, overwrite: bool) -> None:
        """Start a new build in the output, or check that the one there is this one (to resume)."""
        cfg, saved = self.cfg, self.path(f"{STATE}/config.json")
        if overwrite:  # everything but the lease this driver holds
            for name in (*TABLES, "renderings", "report", "manifest.json"):
                self.remove(name)
            if self.fs.exists(self.path(STATE)):
                for path in self.fs.ls(self.path(STATE), detail=False):
                    if path.rstrip("/") != self.path(LEASE):
                        self.fs.rm(path, recursive=True)
        current = cfg.model_dump(mode="json")
        if self.fs.exists(saved):
            changes = config_changes(storage.read_json(self.fs, saved), current, RESUMABLE_KEYS)
            if changes:
                raise ConfigError(f"output: {cfg.output} holds a build made with a different config ({changes}); "
                                  "rerun with that config to resume it, build into another output with "
                                  f"--reuse {cfg.output} (only what changed is computed), or pass --overwrite")
            return
        if any(self.fs.exists(self.path(name)) for name in (*TABLES, "manifest.json")):
            raise ConfigError(f"output: {cfg.output} already holds files of another build; "
                              "choose another output or pass --overwrite")
        storage.write_json(self.fs, saved, current)

    def finished_stage(self, name: str) -> dict | None:
        marker = self.path(f"{STATE}/stages/{name}.json")
        return storage.read_json(self.fs, marker) if self.fs.exists(marker) else None

    def run_stage(self, name: str, ctx: RunContext | None = None) -> None:
        done = self.finished_stage(name)
        if done is not None:
            self.stages[name] = {**done, "resumed": True}
            say(f"{PREFIX} stage {name}: done in an earlier run ({done['rows']} rows)")
            if name in self.fingerprints:
                self.warn_if_changed(name)
            return
        self.lease.check()
        say(f"{PREFIX} stage {name} ...")
        self.current = name
        stage = STAGE[name]
        if stage.resume_key is None:  # a partial output of a killed run is cleared; these stages are cheap
            self.remove(stage.output)
        start = time.perf_counter()
        if (earlier := whole_match(self.earlier, name, self.fingerprints.get(name))) is not None:
            extra = self.take_whole(name, earlier)
        else:
            run = getattr(self, f"stage_{name}")
            with Progress(name, "rows", None, self.rows_written(name)) as self.progress:
                extra = (run() if ctx is None else run(ctx)) or {}
            extra |= self.reused_items(name)
        wall = time.perf_counter() - start
        record = {"rows": storage.count_rows(self.fs, self.path(stage.output)), "wall_s": round(wall, 3),
                  **({} if name == "index" else {"runs_on": "driver" if self.in_driver(name) else "ray",
                                                 "fingerprint": self.fingerprints[name]}), **extra}
        self.lease.check()  # a driver that lost the output to another writes no marker
        storage.write_json(self.fs, self.path(f"{STATE}/stages/{name}.json"), record)  # done from here on
        self.stages[name] = record
        say(f"{PREFIX} stage {name}: {record['rows']} rows in {wall:.1f} s")

    # -- reuse of earlier builds (pipeline.reuse) ------------------------------------------------

    def take_whole(self, name: str, earlier: EarlierBuild) -> dict:
        """Stage ``name``'s output from an earlier build with the same fingerprint (encode: with
        the errors/ rows of its images that did not decode)."""
        folder = STAGE[name].output
        earlier.check_folder(folder)
        copy_folder(earlier.fs, earlier.build.path(folder), self.fs, self.path(folder))
        if name == "encode" and (failed := decode_errors(earlier)) is not None:
            self.write_reused_errors(failed)
        rows = storage.count_rows(self.fs, self.path(folder))
        say(f"{PREFIX} stage {name}: reused whole from {earlier.label} ({rows} rows)")
        return {"reused": {"from": [{**earlier.name, "rows": rows}], "rows": rows, "whole": True}}

    def write_reused_errors(self, rows: pa.Table) -> None:
        ids = sorted(set(rows.column("image_id").to_pylist()))
        storage.write_table(self.fs, self.path(f"{ERRORS}/{DECODE}-reused-{storage.stable_digest(ids)}.parquet"),
                            rows.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA))

    def reuse_images(self) -> None:
        """activations/ rows (and errors/ rows of images that did not decode) of the images whose
        encode key an earlier build holds, written here before the stage encodes the rest."""
        if not self.earlier:
            return
        wanted = self.keys.images.filter(pc.invert(pc.is_in(self.keys.images["image_id"],
                                                            value_set=self.written_ids("encode"))))
        undecodable = []
        for earlier in self.earlier:
            hit = matching(wanted, "encode_key", earlier.keys("images"))
            ids = wanted["image_id"].filter(hit).combine_chunks()
            if not len(ids):
                continue
            n = 0
            for rows in reused_rows(earlier, "activations", "image_id", ids):
                write_shard(rows, output=self.cfg.output, storage_section=self.cfg.storage, folder="activations",
                            key="image_id")
                n += rows.num_rows
            if (failed := decode_errors(earlier, ids)) is not None:
                self.write_reused_errors(failed)
                undecodable += failed.column("image_id").to_pylist()
            self.reused_now["encode"] += n + (failed.num_rows if failed is not None else 0)
            say(f"{PREFIX} stage encode: {n} images reused from {earlier.label}")
            wanted = wanted.filter(pc.invert(hit))
        self.undecodable = pa.array(sorted(set(undecodable)), pa.string())

    def reuse_answers(self, units: pa.Table) -> None:
        """traits/ rows (never failed ones) of the units whose request key an earlier build holds,
        written here before the stage asks for the rest."""
        if not self.earlier:
            return
        wanted = units.select(["annotation_id", "request_key"])
        wanted = wanted.filter(pc.invert(pc.is_in(wanted["annotation_id"], value_set=self.written_ids("annotate"))))
        for earlier in self.earlier:
            ids = wanted["annotation_id"].filter(matching(wanted, "request_key", earlier.keys("requests"))).combine_chunks()
            if not len(ids):
                continue
            taken = []  # a failed answer is not taken: a later build may hold one for the same request
            for rows in reused_rows(earlier, "traits", "annotation_id", ids, keep=answered):
                write_shard(restamped(rows, units), output=self.cfg.output, storage_section=self.cfg.storage,
                            folder="traits", key="annotation_id")
                taken += rows.column("annotation_id").chunks
            if taken:
                taken = pa.chunked_array(taken, pa.string()).combine_chunks()
                self.reused_now["annotate"] += len(taken)
                say(f"{PREFIX} stage annotate: {len(taken)} answers reused from {earlier.label}")
                wanted = wanted.filter(pc.invert(pc.is_in(wanted["annotation_id"], value_set=taken)))

    def reused_items(self, name: str) -> dict:
        """For a per-item stage's marker: the rows now in its output that earlier builds gave, by
        build; for annotate also what this build asked the LLM for itself (the rows it computed)."""
        if name not in ("encode", "annotate"):
            return {}
        given, extra = pa.array([], pa.string()), {}
        if self.earlier:
            kind, ours, key = (("images", self.keys.images.select(["image_id", "encode_key"]), "encode_key")
                               if name == "encode" else
                               ("requests", storage.read_table(self.fs, self.path(f"{ITEMS}/requests.parquet")),
                                "request_key"))
            by_build, given = reuse_counts(ours, key, self.written_ids(name), self.earlier, kind)
            extra["reused"] = {"from": by_build, "rows": len(given), "whole": False}
        if name == "annotate" and self.fs.exists(self.path("traits")):
            traits = storage.read_table(self.fs, self.path("traits"),
                                        columns=["annotation_id", "attempts", "prompt_tokens", "completion_tokens"])
            if traits.num_rows:
                asked = traits.filter(pc.invert(pc.is_in(traits["annotation_id"], value_set=given)))
                total = {c: pc.sum(asked[c]).as_py() or 0 for c in ("attempts", "prompt_tokens", "completion_tokens")}
                extra["computed"] = {"rows": asked.num_rows,
                                     "llm_requests": 0 if self.cfg.annotate.llm.kind == "none" else total["attempts"],
                                     "prompt_tokens": total["prompt_tokens"],
                                     "completion_tokens": total["completion_tokens"]}
        return extra

    def record_fingerprint(self, name: str) -> None:
        """Add the index stage's fingerprint to the marker this run wrote (it needs the index itself)."""
        if self.stages[name].get("resumed"):
            return self.warn_if_changed(name)
        marker = self.path(f"{STATE}/stages/{name}.json")
        storage.write_json(self.fs, marker, {**storage.read_json(self.fs, marker), "fingerprint": self.fingerprints[name]})
        self.stages[name]["fingerprint"] = self.fingerprints[name]

    def warn_if_changed(self, name: str) -> None:
        """A stage finished in an earlier run whose inputs have changed in place since (same config)."""
        if self.stages[name].get("fingerprint") not in (None, self.fingerprints[name]):
            say(f"{PREFIX} warning: what stage {name} read has changed since it ran (an image, the backbone's or "
                "the SAE's files); its rows are kept: --overwrite redoes them", err=True)

    def rows_written(self, name: str):
        """Rows in the complete files of stage ``name``'s output so far (each file's footer read once)."""
        seen: dict[str, int] = {}

        def count() -> int:
            for path in storage.parquet_files(self.fs, self.path(STAGE[name].output)):
                if path not in seen:
                    try:
                        seen[path] = pq.ParquetFile(self.fs.open(path, "rb")).metadata.num_rows
                    except (pa.ArrowInvalid, OSError):  # still being written
                        pass
            return sum(seen.values())
        return count

    def written_ids(self, name: str) -> pa.Array:
        """Row ids already in stage ``name``'s output from a killed run. Parquet writes its footer last and an S3
        object appears only once complete, so a file whose footer reads is whole: its rows count
        as done. A file cut off mid-write is deleted (its rows are redone). The files are read
        in parallel (thousands of object-store reads at full size) and the ids kept as Arrow."""
        key = STAGE[name].resume_key

        def ids_of(path: str) -> pa.ChunkedArray | None:
            try:
                with self.fs.open(path, "rb") as f:
                    return pq.read_table(f, columns=[key]).column(0)
            except (pa.ArrowInvalid, OSError):
                self.fs.rm(path)
                return None

        with ThreadPoolExecutor(RESUME_READ_THREADS) as pool:
            chunks = [c for ids in pool.map(ids_of, storage.parquet_files(self.fs, self.path(STAGE[name].output)))
                      if ids is not None for c in ids.chunks]
        return pc.unique(pa.chunked_array(chunks, pa.string())) if chunks else pa.array([], pa.string())

    def pending(self, name: str, rows: pa.Table, unit: str) -> pa.Table | None:
        """The stage's input rows not yet written (all of them on a first run); None when nothing is left.
        The stage's progress line counts them, in ``unit``."""
        done = self.written_ids(name)
        if name == "encode" and len(self.undecodable):  # their errors/ rows came from an earlier build
            done = pa.concat_arrays([done, self.undecodable])
        if len(done):
            key = STAGE[name].resume_key
            rows = rows.filter(pc.invert(pc.is_in(rows[key], value_set=done)))
            if (earlier_run := len(done) - self.reused_now[name]) > 0:
                say(f"{PREFIX} stage {name}: resuming, {earlier_run} rows written earlier, {rows.num_rows} to do")
        if self.progress is not None:
            self.progress.expect(rows.num_rows, unit)
        return rows if rows.num_rows else None

    def small(self) -> bool:
        """Whether this build is small enough to run its table stages in the driver (ray.small_build_images)."""
        return self.cfg.ray.small_build_images > 0 and self.index().num_rows <= self.cfg.ray.small_build_images

    def in_driver(self, name: str) -> bool:
        """Whether stage ``name`` runs in the driver rather than on Ray (see :meth:`small`): an
        OpenAI-compatible server is asked from the driver too; a transformers model or the Serve app
        runs in the annotate pool."""
        if name == "annotate" and self.cfg.annotate.llm.kind not in ("none", "openai"):
            return False
        return name in ("count", "select", "candidates", "annotate") and self.small()

    def index(self) -> pa.Table:
        if self._index is None:
            self._index = storage.read_table(self.fs, self.path(STAGE["index"].output))
        return self._index

    # -- the stages ----------------------------------------------------------------------------

    def stage_index(self) -> dict:
        index, rejected = build_index(self.cfg.source, map_shards=in_tasks)
        write_errors(self.cfg.output, self.cfg.storage_options, rejected)
        storage.write_table(self.fs, self.path(f"{STAGE['index'].output}/index.parquet"), index)
        return {"rejected": len(rejected)}

    def stage_encode(self, ctx: RunContext) -> None:
        cfg = self.cfg
        # Output files of at most a shard: a killed build redoes only what was in flight.
        shard_rows = SHARD_BATCHES * cfg.encoder.batch_size
        self.reuse_images()
        if (todo := self.pending("encode", self.index(), "images")) is None:
            return
        activations = encode_images(in_shards(todo, shard_rows), ctx.pools["encode"], source=cfg.source,
                                    preprocess=cfg.preprocess, encoder=cfg.encoder, patch_px=ctx.patch_px,
                                    errors_to=(cfg.output, cfg.storage))
        self.write_named(activations, "encode")

    def stage_count(self, ctx: RunContext) -> None:
        columns = ["species", "genus", "family", "latent"]
        if self.in_driver("count"):
            firings = storage.read_table(self.fs, self.path("activations"), columns=columns)
            self.write_whole(counts_of(firings, taxonomy_codes(self.index()), self.cfg.counting.unit), "counts")
            return
        firings = self.read("activations", columns=columns)
        self.write(reduce_counts(firings, taxonomy_codes(self.index()), self.cfg.counting.unit,
                                 num_partitions=ctx.n_cpus), "counts")

    def stage_select(self, ctx: RunContext) -> None:
        if self.in_driver("select"):
            counts = storage.read_table(self.fs, self.path("counts"))
            self.write_whole(select_latents(counts, taxonomy_of_species(self.index()), self.cfg.contrast), "selected")
            return
        self.write(select_by_contrast_group(self.read("counts"), taxonomy_of_species(self.index()), self.cfg.contrast,
                                            num_partitions=ctx.n_cpus), "selected")
        if not storage.parquet_files(self.fs, self.path("selected")):  # nothing selected: the contract's empty table
            storage.write_table(self.fs, self.path("selected/empty.parquet"), SELECTED_SCHEMA.empty_table())

    def stage_candidates(self, ctx: RunContext) -> None:
        cfg = self.cfg
        selected = storage.read_table(self.fs, self.path("selected"))
        taxonomy = taxonomy_of_species(self.index())
        species_images = dict(zip(taxonomy["species"].to_pylist(), taxonomy["n_images"].to_pylist()))
        sections = {"contrast": cfg.contrast, "candidates": cfg.candidates}
        if self.in_driver("candidates"):
            rows, rejected = measure_candidates(storage.read_table(self.fs, self.path("activations")), selected,
                                                species_images, OriginalImages(cfg.source, cfg.preprocess),
                                                min_on_specimen=cfg.annotate.min_on_specimen, **sections)
            write_errors(cfg.output, cfg.storage_options, rejected)
            self.write_whole(rows, "candidates")
            return
        hits = self.read("activations").map_batches(find_candidates, batch_format="pyarrow",
                                                    fn_kwargs={"selected": selected})
        measured = hits.groupby("species", num_partitions=ctx.n_cpus).map_groups(
            measure_species_task, batch_format="pyarrow",
            fn_kwargs={"selected": selected, "species_images": species_images, "source": cfg.source,
                       "preprocess": cfg.preprocess, "annotate": cfg.annotate, "errors_to": (cfg.output, cfg.storage),
                       **sections})
        self.write(measured, "candidates")
        if not storage.parquet_files(self.fs, self.path("candidates")):  # nothing selected: the contract's empty table
            storage.write_table(self.fs, self.path("candidates/empty.parquet"), CANDIDATES_SCHEMA.empty_table())

    def stage_annotate(self, ctx: RunContext) -> None:
        ann = self.cfg.annotate
        candidates = storage.read_table(self.fs, self.path("candidates")) if self.fs.exists(self.path("candidates")) else None
        units = unit_table(candidates, ann.images_per_prompt) if candidates is not None and candidates.num_rows else None
        if units is None:  # nothing selected: still leave an empty traits/ with the contract's schema
            storage.write_table(self.fs, self.path("traits/empty.parquet"), TRAITS_SCHEMA.empty_table())
            return
        # Shards of one batch (so every actor gets work), keyed by annotation_id: a resumed build
        # sends only the units whose answers were never written.
        units = with_annotation_ids(ann, units)
        units = units.append_column("request_key", request_keys(units, self.keys.images, self.keys.request))
        asked = units.filter(sent(units, ann.min_confidence))  # a unit not sent is no request: nothing to take or give
        storage.write_table(self.fs, self.path(f"{ITEMS}/requests.parquet"),
                            asked.select(REQUEST_KEYS.names).cast(REQUEST_KEYS))
        self.reuse_answers(asked)
        if (todo := self.pending("annotate", units.drop_columns(["request_key"]), "units")) is None:
            return
        batch = self.annotate_batch(ctx.n_cpus)
        if self.in_driver("annotate"):  # the pool's own callable, a file per batch
            annotate = AnnotateActor(**self.annotate_kwargs(ann.max_in_flight))

            def annotate_batch(start: int) -> None:
                write_shard(annotate(todo.slice(start, batch)), output=self.cfg.output, storage_section=self.cfg.storage,
                            folder="traits", key="annotation_id")
            # An LLM kind waits on the server: its batches overlap as in the actor (max_concurrent_batches
            # threads share its max_in_flight requests); templated descriptions are CPU work, one at a time.
            pool = ThreadPoolExecutor(1 if ann.llm.kind == "none" else ann.max_concurrent_batches)
            try:
                for done in [pool.submit(annotate_batch, start) for start in range(0, todo.num_rows, batch)]:
                    done.result()
            finally:
                pool.shutdown(wait=False, cancel_futures=True)  # a failed or interrupted build sends nothing more
            return
        traits = ctx.pools["annotate"].map_batches(in_shards(todo, batch), batch_size=batch, batch_format="pyarrow")
        self.write_named(traits, "annotate")

    # -- the actor pools, declared once: the placement check and the Ray calls read these ------------

    def annotate_actors(self, n_cpus: int) -> int:
        # kind none is CPU work: one actor per CPU. An LLM kind is waiting on the model: num_actors
        # actors, each with its share of max_in_flight and batches big enough to fill it.
        return n_cpus if self.cfg.annotate.llm.kind == "none" else self.cfg.annotate.num_actors

    def annotate_share(self, n_cpus: int) -> int:
        """Each annotate actor's share of annotate.max_in_flight."""
        return -(-self.cfg.annotate.max_in_flight // self.annotate_actors(n_cpus))

    def annotate_batch(self, n_cpus: int) -> int:
        ann = self.cfg.annotate
        return ann.batch_size if ann.llm.kind == "none" else max(ann.batch_size, 4 * self.annotate_share(n_cpus))

    def annotate_kwargs(self, max_in_flight: int) -> dict:
        """The annotate actor's constructor arguments: the config sections it uses."""
        cfg = self.cfg
        return {"annotate": cfg.annotate, "source": cfg.source, "preprocess": cfg.preprocess,
                "errors_to": (cfg.output, cfg.storage), "max_in_flight": max_in_flight}

    def pools(self, n_cpus: int) -> dict[str, ActorPool]:
        """The actor pool of each unfinished stage that runs on Ray, by stage."""
        cfg, pools = self.cfg, {}
        if self.finished_stage("encode") is None:
            pools["encode"] = encoder_pool("encode", cfg.encoder, EncodeActor, {
                "backbone": cfg.backbone, "sae": cfg.sae, "storage": cfg.storage,
                "fail_once_after_batches": cfg.encoder.fail_once_after_batches,
                "fault_marker": storage.join(cfg.output, STATE, "faults", "encoder")})
        if self.finished_stage("annotate") is None and not self.in_driver("annotate"):
            ann = cfg.annotate
            pools["annotate"] = ActorPool(
                "annotate", AnnotateActor, self.annotate_kwargs(self.annotate_share(n_cpus)), ann.num_gpus, ann.num_cpus,
                {"GPU": "annotate.num_gpus", "CPU": "annotate.num_cpus"}, max_size=self.annotate_actors(n_cpus),
                # An LLM kind's actor is called from max_concurrent_batches threads at once: the
                # batches overlap on the stage's one event loop and share its max_in_flight requests.
                concurrent_calls=1 if ann.llm.kind == "none" else ann.max_concurrent_batches)
        return pools

    # -- the whole build -----------------------------------------------------------------------

    def run(self, overwrite: bool = False, quiet_log: bool = False, update: bool = False) -> dict:
        """Build (or resume, or just summarise a finished build). ``quiet_log``: what Ray and the
        libraries print goes to a log file under OUT/_build/logs/ instead of the console.
        ``update``: bring a finished build up to date with its source (:meth:`start_update`)."""
        if self.lease is None:  # a build run from Python (the demo, the tests): it holds the lease too
            with OutputLease(self.cfg.output, self.cfg.storage_options, self.cfg.output_lease_s, "build") as self.lease:
                try:
                    return self.run(overwrite, quiet_log, update)
                finally:
                    self.lease = None
        cfg = self.cfg
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        # Checked before anything is written or Ray starts: the backbone's patch grid, its weights, the SAE (issue 23).
        patch_px = check_models(cfg.backbone, cfg.sae, cfg.preprocess, cfg.storage) \
            if overwrite or update or self.finished_stage("encode") is None else None
        self.open_output(overwrite)
        if update:
            self.start_update()
        if self.fs.exists(self.path("manifest.json")):  # finished earlier: nothing to redo
            manifest = storage.read_json(self.fs, self.path("manifest.json"))
            say(format_summary(manifest["summary"], resumed=True))
            return manifest
        self.earlier = self.open_earlier()
        if not quiet_log:
            return self.run_stages(started, t0, patch_px)
        local_log, kept = self.log_file(started)
        self.log_path = str(local_log)  # until the build has finished: a failed one's log stays here
        with quiet(local_log):
            try:
                manifest = self.run_stages(started, t0, patch_px)
            except BaseException:
                traceback.print_exc()  # into the log; the console gets one line (main)
                raise
        if kept != self.log_path:  # a remote output: its log goes beside it too
            self.fs.put(self.log_path, kept)
            self.log_path = kept
        return manifest

    def start_update(self) -> None:
        """An update rebuilds the output over its source as it is now, reusing the build it held:
        that build's tables, markers and manifest move to _build/previous/ (an earlier build like
        any other, removed once the update has finished). A killed update is resumed by the same
        command: the snapshot is already there."""
        previous = self.path(PREVIOUS)
        if not self.fs.exists(self.path("manifest.json")):
            if self.fs.exists(storage.join(previous, "manifest.json")):
                return
            raise ConfigError(f"--update: {self.cfg.output} holds no finished build to update; rerun the command "
                              "without --update to finish it first")
        try:  # refused before anything moves
            EarlierBuild(self.cfg.output, self.cfg.storage_options)
        except ConfigError as exc:
            raise ConfigError(f"--update: the build in {self.cfg.output} cannot be updated ({exc}); "
                              "rebuild it with --overwrite") from None
        say(f"{PREFIX} update: the build in {self.cfg.output} is reused for what has not changed")
        for name in (*TABLES, "renderings", "report", STAGE["index"].output, f"{STATE}/stages", ITEMS, "manifest.json"):
            if self.fs.exists(self.path(name)):  # the manifest last: until it moves, a rerun finishes the move
                storage.move(self.fs, self.path(name), storage.join(previous, name))

    def open_earlier(self) -> list[EarlierBuild]:
        """The finished builds this one reuses: an update's snapshot, then reuse: in order (refused,
        naming the path, when one is not a finished build of this data-contract version)."""
        cfg = self.cfg
        earlier = [EarlierBuild(url, cfg.options_for(url), cfg.output) for url in cfg.reuse]
        if self.fs.exists(self.path(f"{PREVIOUS}/manifest.json")):
            earlier.insert(0, EarlierBuild(storage.join(cfg.output, PREVIOUS), cfg.storage_options,
                                           label=f"{cfg.output} (before this update)"))
        return earlier

    def log_file(self, started: datetime) -> tuple[Path, str]:
        """(where this run's log is written, where it is kept): OUT/_build/logs/build-TIME.log; for
        a remote output a local file first (~/.cache/sae-traits/logs/), copied there at the end."""
        name = f"build-{started.strftime('%Y%m%dT%H%M%SZ')}.log"
        kept = self.path(f"{LOGS}/{name}")
        if storage.is_local(self.fs):
            return Path(kept), kept
        return storage.cache_dir() / "logs" / f"{Path(self.root).name}-{name}", kept

    def run_stages(self, started: datetime, t0: float, patch_px: int | None) -> dict:
        cfg = self.cfg
        self.run_stage("index")
        self.keys = fingerprints(cfg, self.index())
        self.fingerprints = self.keys.stages
        storage.write_table(self.fs, self.path(f"{ITEMS}/images.parquet"), self.keys.images)
        self.record_fingerprint("index")
        n_cpus, pools = 1, {}
        if any(self.finished_stage(name) is None and not self.in_driver(name) for name in STAGE_NAMES[1:]):
            init_ray(cfg.ray)
            context = ray.get_runtime_context()
            self.lease.note_ray(context.gcs_address, context.get_job_id())  # a driver elsewhere can then prove it dead
            data_context = ray.data.DataContext.get_current()
            data_context.enable_progress_bars = sys.stderr.isatty()
            # A task's own exception, not Ray Data's UserCodeException wrapper (whose cause does not survive
            # pickling): an unreachable store or a full disk in a write task is then named as in the driver.
            data_context.raise_original_map_exception = True
            n_cpus = cluster_cpus()
            pools = self.pools(n_cpus)
            # Never wait for a pool no node can hold: stop now, naming the key (nothing submitted yet).
            ensure_placeable([pool.ask for pool in pools.values()], cfg.ray.wait_for_resources_s)
        for name in STAGE_NAMES[1:]:
            self.run_stage(name, RunContext(n_cpus, patch_px, pools))

        self.current = None
        errors = compact_errors(self.fs, self.path(ERRORS))
        self.stages["errors"] = {"rows": errors.num_rows}
        manifest = {
            "status": "succeeded",
            "build_id": uuid.uuid4().hex[:16],  # how a build that reuses this one names it
            "contract": CONTRACT_VERSION,
            "reused": [b.name for b in self.earlier],
            "started": started.isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "resumed": any(s.get("resumed") for s in self.stages.values()),
            "stages": self.stages,
            "summary": self.summary(errors),
            "config": cfg.model_dump(mode="json"),
            "versions": versions(),
            "sae": sae_metadata(cfg.sae.checkpoint, cfg.options_for(cfg.sae.checkpoint), cfg.sae.revision),
            "hub": hub_revisions(cfg),
        }
        storage.write_json(self.fs, self.path("manifest.json"), manifest)
        self.remove(PREVIOUS)  # an update's snapshot: what it could give has been taken
        say(format_summary(manifest["summary"]))
        if cfg.report:
            self.write_report()
        return manifest

    def write_report(self) -> None:
        try:
            say(f"{PREFIX} report: {write_report(self.cfg.output, self.cfg.storage_options, log=lambda *_: None)}")
        except Exception as exc:  # the dataset is complete and recorded; a report problem must not fail the build
            say(f"{PREFIX} warning: no report ({type(exc).__name__}: {exc}); "
                f"retry with sae-traits report --build {self.cfg.output}", err=True)

    def summary(self, errors: pa.Table) -> dict:
        """The figures a user checks first: what went in, what came out, where the time went."""
        def rows(name):
            return self.stages.get(name, {}).get("rows", 0)

        traits = storage.read_table(self.fs, self.path("traits"), columns=["status", "confidence"])
        selected = storage.read_table(self.fs, self.path("selected"), columns=["species"])
        rejected = Counter(s for s in errors.column("stage").to_pylist() if s != "annotate") if errors.num_rows else {}
        def reused(name):
            return self.stages.get(name, {}).get("reused", {}).get("rows", 0)

        return {
            "images_read": rows("index") + self.stages.get("index", {}).get("rejected", 0),
            "images_indexed": rows("index"),
            "images_encoded": rows("encode") - reused("encode"),
            "images_reused": reused("encode"),
            "images_rejected": dict(sorted(rejected.items())),
            "latents_selected": rows("select"),
            "species_with_latents": len(set(selected.column("species").to_pylist())) if selected.num_rows else 0,
            "candidates": rows("candidates"),
            "annotations": dict(sorted(Counter(traits.column("status").to_pylist()).items())) if traits.num_rows else {},
            # ok annotations at the trusted confidence (None: a build without evidence)
            "annotations_trusted": (pc.sum(pc.and_(pc.equal(traits["status"], "ok"), pc.greater_equal(
                traits["confidence"], TRUSTED))).as_py() or 0) if self.cfg.candidates.evidence else None,
            "annotations_reused": reused("annotate"),
            "errors": errors.num_rows,
            "stages": {name: {"rows": s.get("rows"), "wall_s": s.get("wall_s"), "resumed": bool(s.get("resumed")),
                              "reused": s.get("reused", {}).get("rows", 0), "whole": s.get("reused", {}).get("whole", False),
                              "computed": (s.get("rows") or 0) - s.get("reused", {}).get("rows", 0),
                              "reused_from": [b["path"] for b in s.get("reused", {}).get("from", [])]}
                       for name, s in self.stages.items() if name in STAGE_NAMES},
        }


def format_summary(summary: dict, resumed: bool = False) -> str:
    """The end-of-build table (also printed by a rerun over a finished build)."""
    lines = ["", "sae-traits build summary" + (" (finished earlier; nothing to redo)" if resumed else ""),
             f"  {'stage':<12}{'rows':>10}{'wall s':>10}"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<12}{s['rows']:>10}{s['wall_s']:>10.1f}" + ("  (earlier run)" if s["resumed"] else "")
                     + (f"  ({reused_how(s)} from {', '.join(s['reused_from'])})" if s.get("reused") else ""))
    rejected = sum(summary["images_rejected"].values())
    reused = f" ({summary['images_reused']} more reused)" if summary.get("images_reused") else ""
    lines += [f"  images: {summary['images_read']} read, {summary['images_encoded']} encoded{reused}, {rejected} rejected"
              + (f" ({', '.join(f'{k} {v}' for k, v in summary['images_rejected'].items())})" if rejected else ""),
              f"  latents selected: {summary['latents_selected']} over {summary['species_with_latents']} species; "
              f"candidates: {summary['candidates']}",
              "  annotations: " + (", ".join(f"{k} {v}" for k, v in summary["annotations"].items()) or "none")
              + (f"; {summary['annotations_trusted']} ok at confidence >= {TRUSTED}"
                 if summary.get("annotations_trusted") is not None else ""),
              f"  errors/: {summary['errors']} rows", ""]
    return "\n".join(lines)


def reused_how(stage: dict) -> str:
    return "reused whole" if stage.get("whole") else f"{stage['reused']} rows reused"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("sae-traits", "ray", "torch", "transformers", "pyarrow", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def hub_revisions(cfg: BuildConfig) -> dict:
    """For each model on the Hugging Face hub, the reference, the revision asked for and the commit it
    resolved to (from the hub's cache, which the encoders filled): what makes a hub build repeatable."""
    out = {}
    for key, ref, revision in (("backbone.model", cfg.backbone.model, cfg.backbone.revision),
                               ("sae.checkpoint", cfg.sae.checkpoint, cfg.sae.revision)):
        commit = storage.hub_commit(ref, revision)
        if commit is not None:
            out[key] = {"reference": ref, "revision": revision or "main", "commit": commit}
    return out
