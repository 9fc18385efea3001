"""Annotation units: what one LLM request is about, built from candidates/ in Arrow.

A unit is a complete consensus group of candidates/ (three images of one species where the same
latent fires — the paper's three-image prompt) when ``annotate.images_per_prompt`` is 3, else one
candidate image; only the ``forward`` pairs' grounded zones (those with an image_rank) make units.
A forward pair with no grounded zone makes one unit that is not ``grounded`` (its strongest zones,
all background): it is written as a background row and never sent. Each unit carries its
``confidence`` (:func:`pipeline.evidence.unit_confidence`, from its members' evidence). Its
``annotation_id`` (a digest of the prompt version, species, latent and image ids) is the annotate
stage's resume key. Built in Arrow, not as Python rows: at BIOSCAN size candidates/ holds ~10^6 rows,
which the build's driver turns into units."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.annotation.describer import unit_prompt_version
from pipeline.annotation.renderings import Rendering
from pipeline.annotation.vocabulary import load_vocabulary
from pipeline.config import AnnotateConfig
from pipeline.evidence import unit_confidence

GROUP_KEY = ("species", "latent", "consensus_group")


def annotation_id(prompt_version: str, species: str, latent: int, image_ids: list[str]) -> str:
    """Stable across runs: the same request always has the same id (resume, de-duplication)."""
    return storage.stable_digest([prompt_version, species, str(latent), *image_ids])


def unit_table(candidates: pa.Table, images_per_prompt: int) -> pa.Table:
    """candidates/ rows → one row per unit: species, genus, latent, ``members`` (the candidate rows,
    strongest first), ``grounded`` and ``confidence``: first one unit per grounded forward candidate
    outside a complete consensus group (all of them when ``images_per_prompt`` is 1), in candidates/
    order, then one per group, ordered by (species, latent, consensus_group), then one per forward
    pair with no grounded zone. (Rows without ``forward`` or ``evidence``, as written before
    evidence existed, all count as forward and grounded.)"""
    if "forward" in candidates.column_names:
        candidates = candidates.filter(pc.fill_null(candidates["forward"], False))
    if "evidence" not in candidates.column_names:
        return _with_confidence(_described_units(candidates, images_per_prompt), True)
    grounded = pc.is_valid(candidates["image_rank"])
    described = _with_confidence(_described_units(candidates.filter(grounded), images_per_prompt), True)
    background = _with_confidence(_background_units(candidates, grounded, images_per_prompt), False)
    return pa.concat_tables([described, background.cast(described.schema)]) if background.num_rows else described


def skip_reason(grounded: bool | None, confidence: float | None, min_confidence: float) -> str | None:
    """The status of a unit that is not sent — background (no zone on the specimen), low_confidence
    (under ``annotate.min_confidence``) — or None for one that is."""
    if grounded is False:
        return "background"
    return "low_confidence" if confidence is not None and confidence < min_confidence else None


def unit_evidence(members: list[dict]) -> dict | None:
    """A unit's evidence for traits/: its pair's, and each member zone's (None for rows without)."""
    if not members or not members[0].get("evidence"):
        return None
    return {"pair": members[0]["evidence"]["pair"], "zones": [m["evidence"]["zone"] for m in members]}


def sent(units: pa.Table, min_confidence: float) -> pa.Array:
    """Per :func:`unit_table` row, whether it is sent (:func:`skip_reason` is None)."""
    return pa.array([skip_reason(g, c, min_confidence) is None
                     for g, c in zip(units["grounded"].to_pylist(), units["confidence"].to_pylist())], pa.bool_())


def _with_confidence(units: pa.Table, grounded: bool) -> pa.Table:
    members = units["members"].combine_chunks()
    offsets = members.offsets.to_numpy()
    evidence = (members.flatten().field("evidence").to_pylist() if "evidence" in members.type.value_type.names
                else [None] * (offsets[-1] if len(offsets) else 0))
    confidence = [unit_confidence(evidence[a]["pair"], [e["zone"] for e in evidence[a:b]]) if b > a and evidence[a] else None
                  for a, b in zip(offsets[:-1], offsets[1:])]
    return units.append_column("grounded", pa.array([grounded] * units.num_rows, pa.bool_())) \
        .append_column("confidence", pa.array(confidence, pa.float64()))


def _background_units(candidates: pa.Table, grounded: pa.Array, images_per_prompt: int) -> pa.Table:
    """One unit per forward pair with no grounded zone: its strongest ``images_per_prompt`` zones."""
    keyed = candidates.append_column("_row", pa.array(np.arange(candidates.num_rows))) \
        .append_column("_grounded", grounded)
    per_pair = keyed.group_by(["species", "latent"], use_threads=False).aggregate(
        [("_grounded", "any"), ("_row", "list")])
    lone = per_pair.filter(pc.invert(per_pair["_grounded_any"]))
    rows = [r[:images_per_prompt] for r in lone["_row_list"].to_pylist()]
    take = pa.array([i for r in rows for i in r], pa.int64())
    offsets = pa.array(np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int32))
    members = candidates.take(take).to_struct_array().combine_chunks()
    first = pa.array([r[0] for r in rows], pa.int64())
    return pa.table({"species": candidates["species"].take(first), "genus": candidates["genus"].take(first),
                     "latent": candidates["latent"].take(first),
                     "members": pa.ListArray.from_arrays(offsets, members)})


def _described_units(candidates: pa.Table, images_per_prompt: int) -> pa.Table:
    n = candidates.num_rows
    in_group = np.zeros(n, bool)
    if images_per_prompt > 1 and "consensus_group" in candidates.column_names:
        in_group = pc.is_valid(candidates["consensus_group"]).to_numpy(zero_copy_only=False)
    singles = np.flatnonzero(~in_group)
    grouped = candidates.append_column("_row", pa.array(np.arange(n))).filter(pa.array(in_group))
    grouped = grouped.sort_by([*((k, "ascending") for k in GROUP_KEY), ("image_rank", "ascending")])  # stable
    starts = np.zeros(0, np.int64)
    if grouped.num_rows:
        changed = np.zeros(grouped.num_rows - 1, bool)
        for key in GROUP_KEY:
            column = grouped[key].combine_chunks()
            changed |= pc.not_equal(column[1:], column[:-1]).to_numpy(zero_copy_only=False)
        starts = np.r_[0, np.flatnonzero(changed) + 1]
    ends = np.r_[starts[1:], grouped.num_rows] if grouped.num_rows else np.zeros(0, np.int64)
    order = np.r_[singles, grouped["_row"].to_numpy()].astype(np.int64)
    offsets = np.r_[np.arange(len(singles) + 1), len(singles) + ends]
    members = candidates.take(pa.array(order)).to_struct_array().combine_chunks()
    first = pa.array(order[offsets[:-1]])  # each unit's first member, as a candidates/ row
    return pa.table({"species": candidates["species"].take(first), "genus": candidates["genus"].take(first),
                     "latent": candidates["latent"].take(first),
                     "members": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), members)})


def prompt_version_for(cfg: AnnotateConfig, n_images: int) -> str:
    """The version the describer will record for a unit of ``n_images``, known before asking it."""
    return unit_prompt_version(cfg.llm, Rendering.of(cfg).prompt_render, n_images, cfg.include_taxon,
                               load_vocabulary(cfg.vocabulary))


def unit_annotation_id(cfg: AnnotateConfig, unit: dict) -> str:
    """A unit's annotation_id: the build writes it next to the unit (its resume key, which the stage
    then reads from the unit's row); the stage computes it here only for a unit given without one."""
    members = unit["members"]
    return annotation_id(prompt_version_for(cfg, len(members)), unit["species"], unit["latent"],
                         [r["image_id"] for r in members])


def with_annotation_ids(cfg: AnnotateConfig, units: pa.Table) -> pa.Table:
    """:func:`unit_table` rows with their ``annotation_id`` first, computed from the columns the id
    needs only (no member becomes a Python dict)."""
    members = units["members"].combine_chunks()
    image_ids, offsets = members.flatten().field("image_id").to_pylist(), members.offsets.to_numpy()
    versions = {int(n): prompt_version_for(cfg, int(n)) for n in np.unique(np.diff(offsets))}
    ids = [annotation_id(versions[int(end - start)], species, latent, image_ids[start:end])
           for species, latent, start, end in zip(units["species"].to_pylist(), units["latent"].to_pylist(),
                                                   offsets[:-1], offsets[1:])]
    return units.add_column(0, "annotation_id", pa.array(ids, pa.string()))


def annotation_units(candidates: list[dict], images_per_prompt: int) -> list[dict]:
    """:func:`unit_table` for candidate rows given as Python dicts, as Python dicts
    {species, genus, latent, members: [rows, strongest first]}."""
    return unit_table(pa.Table.from_pylist(candidates), images_per_prompt).to_pylist() if candidates else []
