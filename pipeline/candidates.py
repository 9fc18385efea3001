"""Candidates: for every selected (species, latent), the images of that species where it fires, with
the evidence of their zones, ranked.

Two plain batch functions, strung together by the build graph (or by :func:`measure_candidates` on
one table, for a build small enough to run in its driver):
- ``find_candidates`` (per activations/ batch): joins each image's firings with its species'
  selected latents → one row per (image, latent) with the zone's patches, their activations and
  the summed activation;
- ``measure_species`` (per species): reads each candidate image once, and for every selected latent
  walks its images strongest first, measuring each zone's evidence (:mod:`pipeline.evidence`) until
  ``top_images`` zones with a region on the specimen are found (at most twice as many images are
  read); then ranks the species' latents by ``contrast.score`` (evidence: by the pairs' evidence),
  marks the best ``contrast.max_latents_per_species`` as ``forward``, groups each latent's grounded
  zones in consensus groups of ``group_size`` and maps zones to boxes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.boxes import zones_to_boxes
from pipeline.config import (AnnotateConfig, CandidatesConfig, ContrastConfig, PreprocessConfig, SourceConfig,
                             StorageConfig, fsspec_options)
from pipeline.contract import CANDIDATES_SCHEMA, IMAGE_COLUMNS, ZONE_EVIDENCE_TYPE
from pipeline.errors import ImageRejected, Rejected, error_detail, write_errors
from pipeline.evidence import MASK_PX_PER_PATCH, SpecimenFrame, pair_evidence, specificity, zone_evidence
from pipeline.preprocessing import Geometry, OriginalImages

SCAN_FACTOR = 2
"""At most this many times ``top_images`` images are read per pair looking for grounded zones."""
ZONE_FIELDS = tuple(field.name for field in ZONE_EVIDENCE_TYPE)


def find_candidates(batch: pa.Table, selected: pa.Table) -> pa.Table:
    """An activations/ batch → one row per (image, selected latent of its species that fires), with
    the zone's ``patches`` (sorted), their ``values`` and ``activation_sum``."""
    latent = batch["latent"].combine_chunks()
    rows = pc.list_parent_indices(latent)
    flat = pa.table({
        "row": rows,
        "species": pc.take(batch["species"], rows),
        "latent": pc.list_flatten(latent).cast(pa.int32()),
        "patch": pc.list_flatten(batch["patch"].combine_chunks()),
        "value": pc.list_flatten(batch["value"].combine_chunks()),
    })
    hits = flat.join(selected.select(["species", "latent"]), ["species", "latent"], join_type="inner", use_threads=False)
    hits = hits.sort_by([("row", "ascending"), ("latent", "ascending"), ("patch", "ascending")])
    per_zone = hits.group_by(["row", "latent"], use_threads=False).aggregate([
        ("patch", "list"), ("value", "list"), ("value", "sum")])
    carried = batch.select([c for c in IMAGE_COLUMNS if c in batch.column_names]).take(per_zone["row"])
    return carried.append_column("latent", per_zone["latent"].cast(pa.int32())) \
        .append_column("patches", per_zone["patch_list"].cast(pa.list_(pa.int16()))) \
        .append_column("values", per_zone["value_list"]) \
        .append_column("activation_sum", per_zone["value_sum"].cast(pa.float64()))


class CandidateImages:
    """Each candidate image of one species read once, as its :class:`SpecimenFrame`; one that can no
    longer be read is a :class:`Rejected` row (stage candidates) and has no frame."""

    def __init__(self, originals: OriginalImages):
        self.originals = originals
        self.frames: dict[str, SpecimenFrame | None] = {}
        self.rejected: list[Rejected] = []

    def frame(self, row: dict) -> SpecimenFrame | None:
        image_id = row["image_id"]
        if image_id not in self.frames:
            geom = Geometry.from_row(row)
            try:  # decoded no larger than the mask needs (a JPEG at 1/2-1/8 in the DCT domain)
                rgb, scale = self.originals.load_reduced(row, geom, MASK_PX_PER_PATCH * geom.grid_side)
                self.frames[image_id] = SpecimenFrame.of(rgb, geom, scale)
            except storage.StorageUnavailable:  # the store, not this image: stop (a rerun redoes the stage)
                raise
            except Exception as exc:  # ImageRejected, or one that no longer decodes as it did
                reason = exc.reason if isinstance(exc, ImageRejected) else "unreadable"
                self.rejected.append(Rejected("candidates", reason, error_detail(exc), image_id=image_id))
                self.frames[image_id] = None
        return self.frames[image_id]


def measure_species(hits: pa.Table, selected: pa.Table, species_images: dict[str, int], images: CandidateImages, *,
                    contrast: ContrastConfig, candidates: CandidatesConfig, min_on_specimen: float) -> pa.Table:
    """:func:`find_candidates` rows of one species → its candidates/ rows (see the module docstring).
    ``selected``: its selected/ rows; ``species_images``: labelled images per species (the support's
    denominator)."""
    species = hits["species"][0].as_py()
    hits = hits.sort_by([("latent", "ascending"), ("activation_sum", "descending"), ("image_id", "ascending")])
    rows = hits.to_pylist()
    by_latent: dict[int, list[dict]] = {}
    for row in rows:
        by_latent.setdefault(row["latent"], []).append(row)
    if not candidates.evidence:  # the paper's: the strongest images, each zone whole, nothing read
        return _unmeasured(by_latent, selected, contrast, candidates)
    pairs = []
    for sel in selected.to_pylist():
        pair_rows = by_latent.get(sel["latent"], [])
        measured, n_grounded = [], 0
        for row in pair_rows[:SCAN_FACTOR * candidates.top_images]:
            frame = images.frame(row)
            if frame is None:
                continue
            zone = zone_evidence(frame, row["patches"], row["values"], min_on_specimen)
            measured.append((row, zone))
            n_grounded += zone["grounded"]
            if n_grounded == candidates.top_images:
                break
        evidence = pair_evidence([z for _, z in measured], len(pair_rows) / max(species_images.get(species, 0), 1),
                                 specificity(sel["f_species"], sel["f_elsewhere"]), sel["f_species"], sel["f_genus"])
        pairs.append((sel, evidence, measured))
    if contrast.score == "evidence":  # ties (no grounded zone at all) keep the contrast's order
        pairs.sort(key=lambda p: (-p[1]["score"], p[0]["rank_in_species"]))
    else:
        pairs.sort(key=lambda p: p[0]["rank_in_species"])
    return _candidate_rows([(sel, evidence["score"] if contrast.score == "evidence" else sel["score"], evidence, measured)
                            for sel, evidence, measured in pairs], contrast, candidates)


def _unmeasured(by_latent: dict[int, list[dict]], selected: pa.Table, contrast: ContrastConfig,
                candidates: CandidatesConfig) -> pa.Table:
    """candidates.evidence false: each pair's ``top_images`` strongest zones, whole, in selected/'s order."""
    pairs = sorted(selected.to_pylist(), key=lambda sel: sel["rank_in_species"])
    return _candidate_rows([(sel, sel["score"], None, [(row, None) for row in by_latent.get(sel["latent"], [])
                                                         [:candidates.top_images]]) for sel in pairs],
                           contrast, candidates)


def _candidate_rows(pairs: list[tuple[dict, float, dict | None, list[tuple[dict, dict | None]]]],
                    contrast: ContrastConfig, candidates: CandidatesConfig) -> pa.Table:
    """candidates/ rows of one species' pairs, best first: (selected row, score, pair evidence, [(hit
    row, zone evidence)] strongest first); a zone without evidence counts as grounded whole."""
    out = []
    for latent_rank, (sel, score, evidence, measured) in enumerate(pairs):
        grounded = [zone is None or zone["grounded"] for _, zone in measured]
        n_full = sum(grounded) // candidates.group_size * candidates.group_size
        image_rank = 0
        for (row, zone), is_grounded in zip(measured, grounded):
            rank = image_rank if is_grounded else None
            image_rank += is_grounded
            out.append({**{c: row[c] for c in IMAGE_COLUMNS if c in row}, "latent": row["latent"],
                        "patches": row["patches"], "activation_sum": row["activation_sum"],
                        "latent_score": score, "latent_rank": latent_rank, "image_rank": rank,
                        "consensus_group": rank // candidates.group_size if rank is not None and rank < n_full else None,
                        "boxes": zones_to_boxes(row["patches"], Geometry.from_row(row)) if zone is None else zone["boxes"],
                        "grounded_patches": row["patches"] if zone is None else zone["grounded_patches"],
                        "evidence": None if zone is None else {"pair": evidence, "zone": {k: zone[k] for k in ZONE_FIELDS}},
                        "forward": latent_rank < contrast.max_latents_per_species})
    return pa.Table.from_pylist(out, schema=CANDIDATES_SCHEMA)


def measure_candidates(activations: pa.Table, selected: pa.Table, species_images: dict[str, int],
                       originals: OriginalImages, *, contrast: ContrastConfig, candidates: CandidatesConfig,
                       min_on_specimen: float) -> tuple[pa.Table, list[Rejected]]:
    """The candidates/ rows of a whole activations/ table at once (and the images that could not be
    read): :func:`find_candidates` then :func:`measure_species` per species — the build graph's two
    steps on one table."""
    hits = find_candidates(activations, selected)
    images = CandidateImages(originals)
    tables = [CANDIDATES_SCHEMA.empty_table()]
    for species in sorted(set(hits["species"].to_pylist())):
        tables.append(measure_species(hits.filter(pc.equal(hits["species"], species)),
                                      selected.filter(pc.equal(selected["species"], species)), species_images, images,
                                      contrast=contrast, candidates=candidates, min_on_specimen=min_on_specimen))
    return pa.concat_tables(tables), images.rejected


def measure_species_task(hits: pa.Table, *, selected: pa.Table, species_images: dict[str, int], source: SourceConfig,
                         preprocess: PreprocessConfig, contrast: ContrastConfig, candidates: CandidatesConfig,
                         annotate: AnnotateConfig, errors_to: tuple[str, StorageConfig]) -> pa.Table:
    """:func:`measure_species` as a Ray Data task over one species' hits; the images it could not read
    go to the errors/ of ``errors_to`` = (output, storage section)."""
    if not hits.num_rows:
        return CANDIDATES_SCHEMA.empty_table()
    species = hits["species"][0].as_py()
    images = CandidateImages(OriginalImages(source, preprocess))
    out = measure_species(hits, selected.filter(pc.equal(selected["species"], species)), species_images, images,
                          contrast=contrast, candidates=candidates, min_on_specimen=annotate.min_on_specimen)
    output, storage_section = errors_to
    write_errors(output, fsspec_options(storage_section, output), images.rejected)
    return out
