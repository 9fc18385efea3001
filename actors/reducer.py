"""The distributed reduce of firing counts.

Each activations/ block is turned into integer-coded partial counts where it lies
(:func:`pipeline.counting.count_firings`, a Ray Data task); a hash-partitioned Ray Data groupby
sums partials with the same (code, latent) (``Sum`` is an ``AggregateFnV2``); each summed block
is rolled up to (rank, taxon, latent) and a second, much smaller groupby merges those. Nothing
is gathered on the driver and only nonzero cells exist."""

from __future__ import annotations

import pyarrow as pa
import ray.data

from pipeline.counting import CODE_COUNTS_SCHEMA, COUNTS_SCHEMA, RANKS, count_firings, counts_by_rank


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
