"""The annotate actor: a thin host around :class:`pipeline.annotation.stage.AnnotateUnits` in the
build's annotate pool, routing the rows it rejects to errors/."""

from __future__ import annotations

import pyarrow as pa

from pipeline.annotation.stage import AnnotateUnits
from pipeline.config import AnnotateConfig, PreprocessConfig, SourceConfig, StorageConfig, fsspec_options
from pipeline.errors import write_errors


class AnnotateActor:
    """A batch of units (with their annotation_id, which the stage records) → traits/ rows. Ray Data
    calls it from up to ``annotate.max_concurrent_batches`` threads at once; the stage overlaps those batches.
    ``errors_to``: (the build's output, its storage section), where rejected rows go."""

    def __init__(self, annotate: AnnotateConfig, source: SourceConfig, preprocess: PreprocessConfig,
                 errors_to: tuple[str, StorageConfig], max_in_flight: int):
        self.errors_to = errors_to
        self.stage = AnnotateUnits(annotate, source, preprocess, max_in_flight=max_in_flight)

    def __call__(self, batch: pa.Table) -> pa.Table:
        traits, rejected = self.stage(batch)
        output, storage = self.errors_to
        write_errors(output, fsspec_options(storage, output), rejected)
        return traits
