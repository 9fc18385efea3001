"""Per-row failures become rows of ``errors/`` (never exceptions that kill a batch).

A stage returns its rejected rows as :class:`Rejected`; the Ray wiring hands them to
:func:`write_errors`, which writes one small Parquet file per (stage, batch) under a name derived
from the ids, so a retried task overwrites its own file instead of duplicating rows. At the end
of a build :func:`compact_errors` leaves one de-duplicated file (an empty one with the schema
when nothing was rejected). Details are stable across runs: :func:`error_detail` never lets an
object's memory address into them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.contract import ERRORS, ERRORS_SCHEMA

ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f…>" differs in every run


@dataclass(frozen=True)
class Rejected:
    """One rejected input or failed request."""
    stage: str
    reason: str  # a short machine-friendly reason: "missing_file", "truncated", ...
    detail: str = ""
    image_id: str | None = None
    annotation_id: str | None = None


class ImageRejected(Exception):
    """Raised by decoding helpers; carries the reason recorded in errors/."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def error_detail(exc: BaseException) -> str:
    """``TypeName: message`` of an exception, with object addresses taken out (stable across runs)."""
    return ADDRESS.sub("", f"{type(exc).__name__}: {exc}")


def errors_table(rows: list[Rejected]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_id": r.image_id, "annotation_id": r.annotation_id, "stage": r.stage,
          "reason": r.reason, "detail": r.detail[:2000]} for r in rows],
        schema=ERRORS_SCHEMA)


def write_errors(output: str, storage_options: dict, rows: list[Rejected]) -> None:
    if not rows:
        return
    fs, root = storage.filesystem(output, storage_options)
    ids = [r.image_id or r.annotation_id or "" for r in rows]
    name = f"{rows[0].stage}-{storage.stable_digest(ids)}.parquet"
    storage.write_table(fs, storage.join(root, ERRORS, name), errors_table(rows))


ERRORS_KEY = ["stage", "image_id", "annotation_id"]


def compact_errors(fs, path: str) -> pa.Table:
    """errors/ → one de-duplicated, sorted file (with the schema and no rows when nothing was
    rejected). A resumed stage may record a rejected image again (it was never written, so it is
    retried); the first row per (stage, image, annotation) stays."""
    errors = storage.read_table(fs, path) if fs.exists(path) else ERRORS_SCHEMA.empty_table()
    if errors.num_rows:
        errors = errors.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
        first = (errors.append_column("_row", pa.array(range(errors.num_rows), pa.int64()))
                 .group_by(ERRORS_KEY, use_threads=False).aggregate([("_row", "min")])["_row_min"])
        errors = errors.take(np.sort(first.to_numpy())).sort_by([(k, "ascending") for k in ERRORS_KEY])
    else:
        errors = ERRORS_SCHEMA.empty_table()
    old = storage.parquet_files(fs, path)
    storage.write_table(fs, storage.join(path, "errors.parquet"), errors)
    for p in old:
        if not p.endswith("/errors.parquet"):
            fs.rm(p)
    return errors
