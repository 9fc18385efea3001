"""Candidates: for every selected (species, latent) that goes forward, the images of that species where it fires.

Two plain batch functions, strung together by the build graph (or by :func:`top_candidates` on
one table, for a build small enough to run in its driver):
- ``find_candidates`` (per activations/ batch): joins each image's firings with its species'
  selected latents — the best ``contrast.max_latents_per_species`` of each species — → one row
  per (image, latent) with the zone's patches and summed activation;
- ``keep_top_images`` (per (species, latent) group): keeps the strongest ``top_images``, groups
  them in consensus groups of ``group_size`` where enough exist, and maps zones to boxes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.boxes import zones_to_boxes
from pipeline.contract import BOX_TYPE, IMAGE_COLUMNS
from pipeline.preprocessing import GEOMETRY_COLUMNS, Geometry
from pipeline.selection import going_forward


def find_candidates(batch: pa.Table, selected: pa.Table, max_latents_per_species: int | None = None) -> pa.Table:
    """An activations/ batch → one row per (image, selected latent of its species that fires),
    over the ``max_latents_per_species`` best-ranked latents of each species (all when None)."""
    selected = going_forward(selected, max_latents_per_species)
    latent = batch["latent"].combine_chunks()
    rows = pc.list_parent_indices(latent)
    flat = pa.table({
        "row": rows,
        "species": pc.take(batch["species"], rows),
        "latent": pc.list_flatten(latent).cast(pa.int32()),
        "patch": pc.list_flatten(batch["patch"].combine_chunks()),
        "value": pc.list_flatten(batch["value"].combine_chunks()),
    })
    hits = flat.join(selected.select(["species", "latent", "score", "rank_in_species"]), ["species", "latent"], join_type="inner", use_threads=False)
    per_zone = hits.group_by(["row", "latent"], use_threads=False).aggregate([
        ("patch", "list"), ("value", "sum"), ("score", "min"), ("rank_in_species", "min")])
    carried = batch.select([c for c in IMAGE_COLUMNS if c in batch.column_names]).take(per_zone["row"])
    patches = pa.array([sorted(p) for p in per_zone["patch_list"].to_pylist()], pa.list_(pa.int16()))
    return carried.append_column("latent", per_zone["latent"].cast(pa.int32())) \
        .append_column("patches", patches) \
        .append_column("activation_sum", per_zone["value_sum"].cast(pa.float64())) \
        .append_column("latent_score", per_zone["score_min"]) \
        .append_column("latent_rank", per_zone["rank_in_species_min"].cast(pa.int32()))


def keep_top_images(group: pa.Table, top_images: int, group_size: int) -> pa.Table:
    """One (species, latent) group → its strongest images, consensus groups and boxes."""
    group = group.sort_by([("activation_sum", "descending"), ("image_id", "ascending")]).slice(0, top_images)
    n = group.num_rows
    image_rank = np.arange(n, dtype=np.int32)
    # Only complete groups form a consensus prompt; the remainder stays single-image.
    n_full = (n // group_size) * group_size
    consensus = [int(i // group_size) if i < n_full else None for i in image_rank]
    boxes = []
    for row in group.select(["patches", *(c for c in GEOMETRY_COLUMNS if c in group.column_names)]).to_pylist():
        boxes.append(zones_to_boxes(row["patches"], Geometry.from_row(row)))
    return group.append_column("image_rank", pa.array(image_rank)) \
        .append_column("consensus_group", pa.array(consensus, pa.int32())) \
        .append_column("boxes", pa.array(boxes, pa.list_(BOX_TYPE)))


def top_candidates(activations: pa.Table, selected: pa.Table, max_latents_per_species: int | None,
                   top_images: int, group_size: int) -> pa.Table:
    """The candidates/ rows of a whole activations/ table at once: ``find_candidates`` then
    ``keep_top_images`` per (species, latent) group — the build graph's two steps on one table."""
    hits = find_candidates(activations, selected, max_latents_per_species)
    if not hits.num_rows:
        return keep_top_images(hits, top_images, group_size)
    hits = hits.sort_by([("species", "ascending"), ("latent", "ascending")])
    key = pc.binary_join_element_wise(hits["species"], pc.cast(hits["latent"], pa.string()), "\x00").to_numpy(
        zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1, len(key)]
    return pa.concat_tables([keep_top_images(hits.slice(a, b - a), top_images, group_size)
                             for a, b in zip(starts[:-1], starts[1:])])
