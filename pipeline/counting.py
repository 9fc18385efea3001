"""Firing counts per taxon: the per-batch half of the distributed reduce.

``count_firings`` turns a batch of activations/ rows into *partial* sparse counts
(rank, taxon, latent, count) with vectorised pyarrow (no Python loop over firings); the Ray side
(:mod:`actors.reducer`) sums partials with the same key across the cluster. Only nonzero cells
ever exist."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

COUNTS_SCHEMA = pa.schema([("rank", pa.string()), ("taxon", pa.string()), ("latent", pa.int32()),
                           ("count", pa.int64())])
RANKS = ("species", "genus", "family")


def count_firings(batch: pa.Table, unit: str = "patches", ranks: tuple[str, ...] = RANKS) -> pa.Table:
    """Partial counts of one batch.

    unit="patches" (the paper): C[taxon][z] += number of patches of the image where z fires.
    unit="images": C[taxon][z] += 1 for every image where z fires at least once."""
    # Only rows with both species and genus take part in the contrast (the paper's labelled set).
    batch = batch.filter(pc.and_(pc.is_valid(batch["species"]), pc.is_valid(batch["genus"])))
    latent = batch["latent"].combine_chunks()
    flat = pa.table({"row": pc.list_parent_indices(latent), "latent": pc.list_flatten(latent)})
    if unit == "images":
        flat = flat.group_by(["row", "latent"], use_threads=False).aggregate([])
    elif unit != "patches":
        raise ValueError(f"counting.unit: unknown unit {unit!r}")
    partials = []
    for rank in ranks:
        taxon = pc.take(batch[rank], flat["row"])
        per_taxon = (pa.table({"taxon": taxon, "latent": flat["latent"]})
                     .filter(pc.is_valid(taxon))  # e.g. a missing family
                     .group_by(["taxon", "latent"], use_threads=False)
                     .aggregate([([], "count_all")]))
        partials.append(pa.table({
            "rank": pa.array([rank] * per_taxon.num_rows, pa.string()),
            "taxon": per_taxon["taxon"].cast(pa.string()),
            "latent": per_taxon["latent"].cast(pa.int32()),
            "count": per_taxon["count_all"].cast(pa.int64()),
        }))
    return pa.concat_tables(partials).cast(COUNTS_SCHEMA)


def sum_counts(partials: pa.Table) -> pa.Table:
    """Sum partial counts with the same (rank, taxon, latent) — the reduce, on one table."""
    summed = partials.group_by(["rank", "taxon", "latent"], use_threads=False).aggregate([("count", "sum")])
    return pa.table({"rank": summed["rank"], "taxon": summed["taxon"], "latent": summed["latent"],
                     "count": summed["count_sum"]}).cast(COUNTS_SCHEMA)
