"""Where a build's report finds the expert reviews of it: ``OUT/reviews/<review id>.json``, written
by ``sae-traits review score`` into every build the review sampled (the review's key
records them), replaced each time the review is scored again. Each holds the review folder's path,
when it was scored, which of its builds this one is, and every build's scores, so the report
shows them without reaching the review folder (which may be on a reviewer's laptop)."""

from __future__ import annotations

import json

from pipeline import storage

REVIEWS_DIR = "reviews"


def pointer_path(build_root: str, review_id: str) -> str:
    return storage.join(build_root, REVIEWS_DIR, f"{review_id}.json")


def write_pointer(fs, build_root: str, review_id: str, record: dict) -> str:
    path = pointer_path(build_root, review_id)
    storage.write_json(fs, path, record)  # whole or not at all: the report may be reading it
    return path


def read_pointers(fs, build_root: str) -> list[dict]:
    """The reviews of the build, newest scoring first (none when it was never reviewed)."""
    folder = storage.join(build_root, REVIEWS_DIR)
    if not fs.isdir(folder):
        return []
    records = []
    for path in sorted(fs.glob(storage.join(folder, "*.json"))):
        try:
            records.append(storage.read_json(fs, path))
        except (OSError, ValueError):  # a pointer being rewritten, or not ours: the report goes on without it
            continue
    return sorted(records, key=lambda r: json.dumps(r.get("scored_at")), reverse=True)
