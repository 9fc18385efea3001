"""What the build report reads of a build (pipeline/report.py writes the pages): the tables in
Arrow, each sorted by the key its pages look it up by (:class:`RowsBy`), activations/ streamed in
small batches; candidates/ and traits/, which grow with the annotations, read whole only a pass of
species at a time. The build is opened, and its tables read, through :class:`pipeline.finished.FinishedBuild`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import BuildConfig
from pipeline.contract import (CANDIDATES_SCHEMA, COUNTS_SCHEMA, ERRORS, ERRORS_SCHEMA, IMAGE_COLUMNS, SELECTED_SCHEMA,
                               TRAITS_SCHEMA)
from pipeline.finished import FinishedBuild
from pipeline.review.pointers import read_pointers

ACTIVATION_BATCH_ROWS = 256  # images (~3,000 firings each) per batch of the report's activations/ scan
MAX_SCAN_IMAGES = 200_000  # latent galleries scan all of activations/ only up to this many images
PASS_ROWS = 16_384    # candidates + traits rows held at once: species pages are written a pass at a time
# What the pages show of traits/: every column but the bulky raw text and per-request figures.
TRAITS_COLUMNS = [c for c in TRAITS_SCHEMA.names if c not in (
    "latency_s", "body_part_raw", "is_background", "parsed_as", "raw_answer", "prompt_tokens", "completion_tokens",
    "attempts")]
CANDIDATE_COLUMNS = [c for c in CANDIDATES_SCHEMA.names if c not in ("latent_score", "latent_rank")]
PAIR_COLUMNS = ["species", "latent", "latent_rank", "latent_score", "forward", "evidence"]
PAIR_EVIDENCE = ["score", "grounded", "support", "specificity", "consistency", "compactness", "partness", "on_specimen"]


def forward_pairs(batches) -> pa.Table:
    """The pairs of candidates/ that went forward (one row each: species, latent, latent_rank,
    latent_score and their evidence's figures as ``evidence_*`` columns), from its batches."""
    parts = []
    for t in batches:
        t = t.filter(pc.fill_null(t["forward"], False))
        pair = pc.struct_field(t["evidence"].combine_chunks(), "pair") if t.num_rows else None
        parts.append(pa.table({"species": t["species"], "latent": t["latent"], "latent_rank": t["latent_rank"],
                               "latent_score": t["latent_score"],
                               **{f"evidence_{k}": (pc.struct_field(pair, k) if pair is not None
                                                    else pa.array([], pa.float64())) for k in PAIR_EVIDENCE}}))
    rows = pa.concat_tables(parts) if parts else pa.table(
        {"species": pa.array([], pa.string()), "latent": pa.array([], pa.int32()), "latent_rank": pa.array([], pa.int32()),
         "latent_score": pa.array([], pa.float64()), **{f"evidence_{k}": pa.array([], pa.float64()) for k in PAIR_EVIDENCE}})
    return rows.group_by(["species", "latent"], use_threads=False).aggregate(
        [(c, "min") for c in rows.column_names if c not in ("species", "latent")]).rename_columns(
        ["species", "latent", *(c for c in rows.column_names if c not in ("species", "latent"))])


def keep_top(top: pa.Table | None, found: pa.Table, k: int) -> pa.Table:
    """The running ``k`` strongest rows per latent of a scan, after one more batch's ``found``."""
    return found if top is None else top_per_latent(pa.concat_tables([top, found], promote_options="default"), k)


def top_per_latent(t: pa.Table, k: int) -> pa.Table:
    """The ``k`` rows of each latent with the highest value_sum (ties: image_id)."""
    t = t.sort_by([("latent", "ascending"), ("value_sum", "descending"), ("image_id", "ascending")])
    latent = t["latent"].to_numpy()
    starts = np.r_[0, np.flatnonzero(latent[1:] != latent[:-1]) + 1] if len(latent) else np.zeros(0, int)
    pos = np.arange(len(latent)) - np.repeat(starts, np.diff(np.r_[starts, len(latent)]))
    return t.filter(pa.array(pos < k))


def strongest_zones(batch: pa.Table, latents: pa.Array, k: int) -> pa.Table:
    """An activations/ batch → for each latent in ``latents``, its ``k`` images with the highest
    summed value, with that latent's firing patches (the zone)."""
    latent = batch["latent"].combine_chunks()
    rows = pc.list_parent_indices(latent)
    flat = pa.table({"row": rows, "latent": pc.list_flatten(latent).cast(pa.int32()),
                     "patch": pc.list_flatten(batch["patch"].combine_chunks()),
                     "value": pc.list_flatten(batch["value"].combine_chunks()).cast(pa.float64())})
    flat = flat.filter(pc.is_in(flat["latent"], latents))
    zones = flat.group_by(["row", "latent"], use_threads=False).aggregate([("patch", "list"), ("value", "sum")])
    carried = batch.select([c for c in IMAGE_COLUMNS if c in batch.column_names]).take(zones["row"])
    return top_per_latent(carried.append_column("latent", zones["latent"])
                          .append_column("patches", zones["patch_list"])
                          .append_column("value_sum", zones["value_sum"]), k)


class RowsBy:
    """An Arrow table sorted by ``key`` (then ``order``), each key's rows one slice. Python rows are made
    one key at a time — a page's worth — never for the whole table: a BIOSCAN-size build's candidates
    and traits are ~50 KB per annotation as Python rows, ~7 KB in Arrow."""

    def __init__(self, table: pa.Table, key: str, order: list[tuple[str, str]] = ()):
        self.table = table.sort_by([(key, "ascending"), *order]) if table.num_rows else table
        # Sorted, so each key's dictionary index is one run; the dictionary lists the keys in order.
        encoded = pc.dictionary_encode(self.table[key].combine_chunks(), null_encoding="encode")
        index = encoded.indices.to_numpy(zero_copy_only=False)
        starts = np.r_[0, np.flatnonzero(index[1:] != index[:-1]) + 1] if len(index) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(index)]
        self.keys: list = encoded.dictionary.to_pylist()
        self.span = {k: (int(a), int(b)) for k, a, b in zip(self.keys, starts, ends)}

    def __len__(self) -> int:
        return self.table.num_rows

    def count(self, key) -> int:
        a, b = self.span.get(key, (0, 0))
        return b - a

    def slice(self, key, limit: int | None = None) -> pa.Table:
        a, b = self.span.get(key, (0, 0))
        return self.table.slice(a, b - a if limit is None else min(limit, b - a))

    def rows(self, key, limit: int | None = None) -> list[dict]:
        return self.slice(key, limit).to_pylist()


class GenusCounts(RowsBy):
    """counts/ genus rows of the selected latents (genera × latents: millions of rows at BIOSCAN size)
    by latent, highest count first."""

    COLUMNS = ["rank", "taxon", "latent", "count"]

    def __init__(self, tables: list[pa.Table]):
        t = pa.concat_tables([t.select(self.COLUMNS[1:]) for t in tables]) if tables else \
            COUNTS_SCHEMA.empty_table().select(self.COLUMNS[1:])
        super().__init__(t, "latent", [("count", "descending"), ("taxon", "ascending")])
        totals = t.group_by("latent").aggregate([("count", "sum")])
        self.totals = dict(zip(totals["latent"].to_pylist(), totals["count_sum"].to_pylist()))

    def total(self, z: int) -> int:
        """Latent z's firings over all genera."""
        return self.totals.get(z, 0)

    def strongest(self, z: int, k: int) -> tuple[list[dict], int]:
        """Latent z's ``k`` genera with the most firings (as rows), and how many genera it fires in."""
        return self.rows(z, k), self.count(z)


class BuildData:
    """What the pages need from a build, in Arrow, each table by the key its pages look it up by
    (:class:`RowsBy`); activations/ streamed. candidates/ and traits/ grow with the annotations
    (traits rows are ~7 KB each in Arrow): all their rows are read only a pass of species at a time
    (:meth:`species_passes`, :meth:`rows_for`); held whole are their keys and statuses."""

    def __init__(self, build: FinishedBuild, max_gallery: int, max_scan_images: int = MAX_SCAN_IMAGES):
        self.build, self.manifest = build, build.manifest
        self.cfg: BuildConfig = build.config
        # The selected latents that went forward to be annotated (selected/ holds every selected pair;
        # candidates/ says which went forward, ranked by contrast.score, with their evidence).
        selected = build.read("selected", SELECTED_SCHEMA.names)
        self.n_selected = selected.num_rows
        selected = selected.join(forward_pairs(build.batches("candidates", PAIR_COLUMNS)), ["species", "latent"],
                                 join_type="inner", use_threads=False)
        self.selected_of = RowsBy(selected, "species", [("latent_rank", "ascending"), ("latent", "ascending")])
        self.selected_for = RowsBy(selected, "latent", [("species", "ascending")])
        self.latents = self.selected_for.keys
        wanted = pa.array(self.latents, pa.int32())
        keys = ["species", "genus", "latent"]
        self.candidate_keys = build.read("candidates", keys)
        self.trait_keys = build.read("traits", [*keys, "status", "confidence"])
        self.errors = build.read(ERRORS, ERRORS_SCHEMA.names)
        self.reviews = read_pointers(build.fs, build.root)  # written by python -m pipeline.review score
        self.genus_counts = GenusCounts([t.filter(pc.and_(pc.equal(t["rank"], "genus"), pc.is_in(
            t["latent"], wanted.cast(t["latent"].type)))) for t in build.batches("counts", GenusCounts.COLUMNS)])

        # activations/, file by file: images per species and firings per image from two small columns;
        # each latent's strongest images from the firings themselves only while that scan stays
        # cheap (a BIOSCAN-size build holds ~10^10 firings): beyond max_scan_images, from candidates/.
        self.images, self.taxon = Counter(), {}
        self.gallery_scanned = bool(self.latents) and build.num_rows("activations") <= max_scan_images
        firings, top = [], None
        columns = [*IMAGE_COLUMNS, "family", "n_firings"] + (["latent", "patch", "value"] if self.gallery_scanned else [])
        for batch in build.batches("activations", columns, batch_rows=ACTIVATION_BATCH_ROWS):
            if not batch.num_rows:
                continue
            firings.append(batch["n_firings"].to_numpy(zero_copy_only=False))
            for r in batch.group_by(["species", "genus"] + (["family"] if "family" in batch.column_names else []),
                                    use_threads=False).aggregate([("image_id", "count")]).to_pylist():
                self.images[r["species"]] += r["image_id_count"]
                if r["species"] is not None:
                    self.taxon[r["species"]] = (r["genus"], r.get("family"))
            if self.gallery_scanned:
                top = keep_top(top, strongest_zones(batch, wanted, max_gallery), max_gallery)
        if self.latents and not self.gallery_scanned:
            for batch in build.batches("candidates", CANDIDATE_COLUMNS):
                batch = batch.filter(pc.fill_null(batch["forward"], False))  # the latents the report pages
                top = keep_top(top, top_per_latent(batch.append_column("value_sum", batch["activation_sum"]),
                                                   max_gallery), max_gallery)
        self.firings = np.concatenate(firings) if firings else np.zeros(0, int)
        self.gallery = RowsBy(top if top is not None else pa.table({"latent": pa.array([], pa.int32())}), "latent",
                              [("value_sum", "descending"), ("image_id", "ascending")])
        # Species known only downstream (should not happen): their genus from those tables.
        for t in (selected, self.candidate_keys, self.trait_keys):
            for r in t.group_by(["species", "genus"]).aggregate([]).to_pylist():
                self.taxon.setdefault(r["species"], (r["genus"], None))
        self.species = sorted((s for s in self.taxon if s is not None), key=lambda s: (self.taxon[s][0] or "", s))

    def species_passes(self, max_rows: int | None = None):
        """self.species in order, in runs whose candidates and traits rows number at most ``max_rows``
        (PASS_ROWS by default; a species with more is a run of its own)."""
        max_rows = max_rows or PASS_ROWS
        rows = Counter()
        for t in (self.candidate_keys, self.trait_keys):
            for r in t.group_by("species").aggregate([("species", "count")]).to_pylist():
                rows[r["species"]] += r["species_count"]
        run, size = [], 0
        for s in self.species:
            if run and size + rows[s] > max_rows:
                yield run
                run, size = [], 0
            run.append(s)
            size += rows[s]
        if run:
            yield run

    def rows_for(self, species: list[str]) -> tuple[RowsBy, RowsBy]:
        """The candidates/ and traits/ rows of these species (one pass of :meth:`species_passes`), by species."""
        wanted = pa.array(species, pa.string())

        def keep(t):
            return pc.is_in(t["species"], wanted)
        return (RowsBy(self.build.read("candidates", CANDIDATE_COLUMNS, keep), "species"),
                RowsBy(self.build.read("traits", TRAITS_COLUMNS, keep), "species"))
