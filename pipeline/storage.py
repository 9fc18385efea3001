"""Pluggable storage: every input and output path goes through fsspec, so a local folder and an
``s3://`` bucket are the same code path (credentials via ``storage_options``)."""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def stable_digest(values: list[str], n: int = 16) -> str:
    """A short digest of a list of ids: deterministic names, so a retried task overwrites its own
    output instead of duplicating it."""
    h = hashlib.sha1()
    for v in values:
        h.update(str(v).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a folder of Parquet files (an empty folder gives no rows)."""
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        tables = [pq.read_table(fs.open(p, "rb"), columns=columns) for p in files]
        tables = [t for t in tables if t.num_columns]
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    return pq.read_table(fs.open(path, "rb"), columns=columns)


def arrow_filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """A pyarrow filesystem + path for Ray Data's read/write_parquet (local paths stay native)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    fs, path = filesystem(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return LocalFileSystem(), path
    return PyFileSystem(FSSpecHandler(fs)), path


def count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows of a Parquet folder, from the footers only."""
    if not fs.exists(path):
        return 0
    files = [p for p in fs.find(path) if p.endswith(".parquet")]
    return sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in files)
