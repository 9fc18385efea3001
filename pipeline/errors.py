"""Per-row failures become rows of ``errors/`` (never exceptions that kill a batch).

A stage returns its rejected rows as :class:`Rejected`; the Ray wiring hands them to
:func:`write_errors`, which writes one small Parquet file per (stage, batch) under a name derived
from the ids, so a retried task overwrites its own file instead of duplicating rows."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline import storage

ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("annotation_id", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])


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
    storage.write_table(fs, storage.join(root, "errors", name), errors_table(rows))
