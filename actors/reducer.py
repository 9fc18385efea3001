"""The distributed reduce of firing counts.

Each activations/ block is turned into partial sparse counts where it lies
(:func:`pipeline.counting.count_firings`, a Ray Data task), then partials with the same
(rank, taxon, latent) are summed by a hash-partitioned Ray Data groupby (``Sum`` is an
``AggregateFnV2``). Nothing is gathered on the driver and only nonzero cells exist."""

from __future__ import annotations

import pyarrow as pa
import ray.data

from pipeline.counting import COUNTS_SCHEMA, RANKS, count_firings

KEY = ["rank", "taxon", "latent"]


def _rename_sum(batch: pa.Table) -> pa.Table:
    return batch.rename_columns(["count" if c == "sum(count)" else c for c in batch.column_names]).select(
        COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA)


def reduce_counts(activations: ray.data.Dataset, unit: str = "patches", ranks: tuple[str, ...] = RANKS,
                  num_partitions: int | None = None) -> ray.data.Dataset:
    """activations (image rows with taxon columns and a ``latent`` list) → counts/ rows."""
    partials = activations.map_batches(count_firings, batch_format="pyarrow",
                                       fn_kwargs={"unit": unit, "ranks": ranks})
    return (partials.groupby(KEY, num_partitions=num_partitions).sum("count")
            .map_batches(_rename_sum, batch_format="pyarrow"))
