"""The annotate actor: a thin host around :class:`pipeline.annotation.stage.AnnotateUnits` in the
build's annotate pool, routing the rows it rejects to errors/."""

from __future__ import annotations

import pyarrow as pa

from pipeline.annotation.stage import AnnotateUnits
from pipeline.config import BuildConfig
from pipeline.errors import write_errors


class AnnotateActor:
    """A batch of units (with their annotation_id, which the stage records) → traits/ rows. Ray Data
    calls it from up to ``annotate.max_concurrent_batches`` threads at once; the stage overlaps those batches."""

    def __init__(self, cfg: BuildConfig, max_in_flight: int):
        self.cfg = cfg
        self.stage = AnnotateUnits(cfg.annotate, cfg.source, cfg.preprocess, max_in_flight=max_in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        traits, rejected = self.stage(batch)
        write_errors(self.cfg.output, self.cfg.storage_options, rejected)
        return traits
