"""Firing counts per taxon, as an integer-coded, two-level sparse reduce.

The build knows every labelled taxonomy before it counts (the index), so each distinct
(species, genus, family) gets an integer code up front (:func:`taxonomy_codes`). Then:

1. ``count_firings`` (per activations/ batch): partial counts per (code, latent), counted with
   ``np.bincount`` — no Python loop over firings and no string hashing per firing;
2. partials with the same (code, latent) are summed (:func:`sum_counts` on one table; in a build,
   :func:`reduce_counts`: a hash-partitioned Ray Data groupby whose ``Sum`` is an ``AggregateFnV2``,
   or :func:`counts_of` on the whole table for a build small enough to run in its driver);
3. ``counts_by_rank`` rolls the summed rows up to (rank, taxon, latent) — the counts/ contract.
   Because the whole taxonomy is the key, genus and family counts are exact even if a species
   name were filed under two genera.

Only rows with both species and genus take part (the paper's labelled set); only nonzero cells
ever exist, and nothing is gathered on the driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from pipeline.contract import COUNTS_SCHEMA

CODE_COUNTS_SCHEMA = pa.schema([("code", pa.int32()), ("latent", pa.int32()), ("count", pa.int64())])
TAXON_KEY = ["species", "genus", "family"]
RANKS = ("species", "genus", "family")
DENSE_CELLS = 1 << 23  # bincount over a dense [codes, latents] grid up to this size (64 MB), else sort
NO_FAMILY = ""  # join keys cannot be null: a missing family is this value inside the key


def sparse_count(codes: np.ndarray, latents: np.ndarray, n_codes: int,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occurrences (or summed weights) of each (code, latent) pair → (codes, latents, counts) of
    the nonzero pairs, sorted by code then latent."""
    m = int(latents.max()) + 1 if len(latents) else 1
    key = codes.astype(np.int64)  # a fresh array, updated in place below (this is the hot loop)
    key *= m
    key += latents
    if n_codes * m <= DENSE_CELLS:
        dense = np.bincount(key, weights=weights, minlength=n_codes * m)
        cells = np.flatnonzero(dense)
        counts = dense[cells]
    else:
        cells, inverse = np.unique(key, return_inverse=True)
        counts = np.bincount(inverse, weights=weights, minlength=len(cells))
    if weights is not None:  # float sums of integer counts: exact below 2**53
        counts = np.rint(counts).astype(np.int64)
    return cells // m, cells % m, counts


def labelled_rows(table: pa.Table) -> pa.Table:
    """The rows that take part in the contrast: both species and genus known."""
    return table.filter(pc.and_(pc.is_valid(table["species"]), pc.is_valid(table["genus"])))


def _key(table: pa.Table) -> pa.Table:
    return pa.table({"species": table["species"], "genus": table["genus"],
                     "family": table["family"].fill_null(NO_FAMILY)})


def taxonomy_codes(index: pa.Table) -> pa.Table:
    """One row per distinct labelled (species, genus, family) with its integer ``code``."""
    distinct = _key(labelled_rows(index)).group_by(TAXON_KEY, use_threads=False).aggregate([])
    distinct = distinct.sort_by([(k, "ascending") for k in TAXON_KEY])
    return distinct.append_column("code", pa.array(np.arange(distinct.num_rows), pa.int32()))


def count_firings(batch: pa.Table, taxonomy: pa.Table, unit: str = "patches") -> pa.Table:
    """Partial counts of one batch: (code, latent, count), code from :func:`taxonomy_codes`.

    unit="patches" (the paper): a count is the number of (image, patch) firings;
    unit="images": the number of images where the latent fires at least once."""
    if unit not in ("patches", "images"):
        raise ValueError(f"counting.unit: unknown unit {unit!r}")
    batch = labelled_rows(batch)
    keyed = _key(batch).append_column("row", pa.array(np.arange(batch.num_rows), pa.int64()))
    coded = keyed.join(taxonomy, TAXON_KEY, join_type="inner", use_threads=False)
    row_code = np.full(batch.num_rows, -1, np.int64)
    row_code[coded["row"].to_numpy()] = coded["code"].to_numpy()
    if (row_code < 0).any():
        raise ValueError("count_firings: a row's taxonomy is missing from the taxonomy codes")
    latent_lists = batch["latent"].combine_chunks()
    latents = pc.list_flatten(latent_lists).to_numpy()
    lengths = pc.list_value_length(latent_lists).fill_null(0).to_numpy()
    if unit == "images":  # one firing per (image, latent)
        rows, latents, _ = sparse_count(np.repeat(np.arange(batch.num_rows), lengths), latents, batch.num_rows)
        codes = row_code[rows]
    else:
        codes = np.repeat(row_code, lengths)
    codes, latents, counts = sparse_count(codes, latents, taxonomy.num_rows)
    return _code_counts(codes, latents, counts)


def _code_counts(codes: np.ndarray, latents: np.ndarray, counts: np.ndarray) -> pa.Table:
    return pa.table({"code": pa.array(codes, pa.int32()), "latent": pa.array(latents, pa.int32()),
                     "count": pa.array(counts, pa.int64())}, schema=CODE_COUNTS_SCHEMA)


def sum_counts(partials: pa.Table, n_codes: int) -> pa.Table:
    """Sum partial counts with the same (code, latent) — the reduce, on one table."""
    codes, latents, counts = sparse_count(partials["code"].to_numpy(), partials["latent"].to_numpy(), n_codes,
                                          weights=partials["count"].to_numpy().astype(np.float64))
    return _code_counts(codes, latents, counts)


def counts_by_rank(code_counts: pa.Table, taxonomy: pa.Table, ranks: tuple[str, ...] = RANKS) -> pa.Table:
    """Summed (code, latent, count) rows → the counts/ contract: one row per (rank, taxon, latent).
    Works on any subset of codes too (each output row then holds that subset's sum)."""
    codes = code_counts["code"].to_numpy()
    latents = code_counts["latent"].to_numpy()
    weights = code_counts["count"].to_numpy().astype(np.float64)
    order = np.argsort(taxonomy["code"].to_numpy())
    parts = []
    for rank in ranks:
        names = taxonomy[rank].take(pa.array(order))
        if rank == "family":  # the key's stand-in for a missing family is not a taxon
            names = pc.if_else(pc.equal(names, NO_FAMILY), pa.scalar(None, pa.string()), names)
        encoded = pc.dictionary_encode(names).combine_chunks()
        rank_code = encoded.indices.fill_null(-1).to_numpy()[codes]
        keep = rank_code >= 0
        taxa, lat, cnt = sparse_count(rank_code[keep], latents[keep], len(encoded.dictionary), weights[keep])
        parts.append(pa.table({"rank": pa.array([rank] * len(taxa), pa.string()),
                               "taxon": encoded.dictionary.take(pa.array(taxa)),
                               "latent": pa.array(lat, pa.int32()), "count": pa.array(cnt, pa.int64())},
                              schema=COUNTS_SCHEMA))
    return pa.concat_tables(parts)


def counts_of(activations: pa.Table, taxonomy: pa.Table, unit: str = "patches", ranks: tuple[str, ...] = RANKS) -> pa.Table:
    """The counts/ rows of a whole activations/ table at once (the three steps on one table)."""
    return counts_by_rank(sum_counts(count_firings(activations, taxonomy, unit), taxonomy.num_rows), taxonomy, ranks)


# --------------------------------------------------------------------------- the distributed reduce

def _named_sum(schema: pa.Schema):
    def rename(batch: pa.Table) -> pa.Table:
        batch = batch.rename_columns(["count" if c == "sum(count)" else c for c in batch.column_names])
        return batch.select(schema.names).cast(schema)
    return rename


def reduce_counts(activations: ray.data.Dataset, taxonomy: pa.Table, unit: str = "patches",
                  ranks: tuple[str, ...] = RANKS, num_partitions: int | None = None) -> ray.data.Dataset:
    """activations (image rows with taxon columns and a ``latent`` list) → counts/ rows;
    ``taxonomy`` is :func:`pipeline.counting.taxonomy_codes` of the build's index."""
    by_code = (activations.map_batches(count_firings, batch_format="pyarrow",
                                       fn_kwargs={"taxonomy": taxonomy, "unit": unit})
               .groupby(["code", "latent"], num_partitions=num_partitions).sum("count")
               .map_batches(_named_sum(CODE_COUNTS_SCHEMA), batch_format="pyarrow"))
    return (by_code.map_batches(counts_by_rank, batch_format="pyarrow", fn_kwargs={"taxonomy": taxonomy, "ranks": ranks})
            .groupby(["rank", "taxon", "latent"], num_partitions=num_partitions).sum("count")
            .map_batches(_named_sum(COUNTS_SCHEMA), batch_format="pyarrow"))
