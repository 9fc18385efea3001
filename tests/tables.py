"""Compare two build outputs table by table, as a resume or fault check does: each contract table
of the one build, sorted by its row key, must equal the other's, column for column.

    from tests.tables import assert_same_build
    assert_same_build(clean_out, faulty_out, ignore={"traits": ["latency_s"]})

Paths are local build folders (the ``output`` of a build). Row order and file layout are not
compared (they depend on how Ray split the work); duplicate rows are (a row written twice is a bug).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# table (folder under the build output) → its row key, the sort order of the comparison
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "activations": ("image_id",),
    "counts": ("rank", "taxon", "latent"),
    "selected": ("species", "latent"),
    "candidates": ("species", "latent", "image_id"),
    "traits": ("annotation_id",),
    "errors": ("stage", "image_id", "annotation_id", "reason"),
}
# Columns that differ between two equal builds whatever happened: wall-clock time per request.
ALWAYS_VARY: dict[str, tuple[str, ...]] = {"traits": ("latency_s",)}


def read_table(build: str | Path, name: str) -> pa.Table | None:
    """All Parquet files of build/name as one table; None when the folder is missing or holds no
    file (every build leaves an errors/, empty when nothing was rejected)."""
    path = Path(build) / name
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        return None
    return pa.concat_tables([pq.read_table(p) for p in files], promote_options="default")


def _order(value):
    """A sort key for any value a table holds (None first, then by type name, then the value)."""
    if value is None:
        return (0, "", "")
    if isinstance(value, (list, tuple)):
        return (1, "list", tuple(_order(v) for v in value))
    if isinstance(value, dict):
        return (1, "dict", tuple((k, _order(v)) for k, v in sorted(value.items())))
    return (1, type(value).__name__, value)


def _normal(value):
    """NaN → a marker, at any depth (NaN != NaN would make equal rows differ)."""
    if isinstance(value, float) and math.isnan(value):
        return "<NaN>"
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def sorted_rows(build: str | Path, name: str, ignore: Iterable[str] = (), key: Iterable[str] | None = None) -> list[dict]:
    """The rows of build/name as dicts without the ``ignore`` columns, sorted by ``key`` (default:
    SORT_KEYS[name]) and then by the whole row, so equal tables give equal lists."""
    table = read_table(build, name)
    if table is None:
        return []
    ignore = set(ignore)
    rows = [{k: _normal(v) for k, v in r.items() if k not in ignore} for r in table.to_pylist()]
    key = tuple(key or SORT_KEYS.get(name, ()))
    return sorted(rows, key=lambda r: (tuple(_order(r.get(k)) for k in key), _order(sorted(r.items()))))


def table_differences(a: str | Path, b: str | Path, name: str, ignore: Iterable[str] = (),
                      key: Iterable[str] | None = None, max_shown: int = 5) -> list[str]:
    """What differs between table ``name`` of builds a and b (empty when they are equal)."""
    rows_a, rows_b = sorted_rows(a, name, ignore, key), sorted_rows(b, name, ignore, key)
    if rows_a == rows_b:
        return []
    key = tuple(key or SORT_KEYS.get(name, ()))
    problems = []
    cols_a = set().union(*(r.keys() for r in rows_a)) if rows_a else set()
    cols_b = set().union(*(r.keys() for r in rows_b)) if rows_b else set()
    if rows_a and rows_b and cols_a != cols_b:
        problems.append(f"{name}: columns only in a {sorted(cols_a - cols_b)}, only in b {sorted(cols_b - cols_a)}")
    if len(rows_a) != len(rows_b):
        problems.append(f"{name}: {len(rows_a)} rows in a, {len(rows_b)} in b")
    keys_a = [tuple(r.get(k) for k in key) for r in rows_a]
    keys_b = [tuple(r.get(k) for k in key) for r in rows_b]
    if key and keys_a != keys_b:
        only_a = sorted(set(keys_a) - set(keys_b), key=_order)
        only_b = sorted(set(keys_b) - set(keys_a), key=_order)
        dup_a = len(keys_a) - len(set(keys_a))
        dup_b = len(keys_b) - len(set(keys_b))
        problems.append(f"{name}: keys {key} only in a {only_a[:max_shown]} ({len(only_a)}), "
                        f"only in b {only_b[:max_shown]} ({len(only_b)}); duplicate keys a {dup_a}, b {dup_b}")
    shown = 0
    for ra, rb in zip(rows_a, rows_b):
        if ra != rb and shown < max_shown:
            cols = sorted(c for c in cols_a | cols_b if ra.get(c) != rb.get(c))
            detail = {c: (_short(ra.get(c)), _short(rb.get(c))) for c in cols}
            problems.append(f"{name}: row {tuple(ra.get(k) for k in key)} vs {tuple(rb.get(k) for k in key)} "
                            f"differs in {cols}: {detail}")
            shown += 1
    return problems or [f"{name}: tables differ"]


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def assert_same_build(a: str | Path, b: str | Path, ignore: Mapping[str, Iterable[str]] | None = None,
                      tables: Iterable[str] | None = None) -> None:
    """Every table of ``tables`` (default: all contract tables, SORT_KEYS) of build folder a equals
    b's after sorting, leaving out the columns ALWAYS_VARY and ``ignore`` ({table: [columns]}) name.
    A table missing in both builds is equal; missing in one, it equals an empty one."""
    problems = []
    for name in tables or SORT_KEYS:
        skip = {*ALWAYS_VARY.get(name, ()), *((ignore or {}).get(name, ()))}
        problems += table_differences(a, b, name, ignore=skip)
    assert not problems, f"builds {a} and {b} differ:\n  " + "\n  ".join(problems)


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (header first, the --- line left out)."""
    rows = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-:") for c in r)]
