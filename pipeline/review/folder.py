"""A review folder on disk, and each reviewer's ratings file.

    REVIEW/items/items.json    what reviewers see: per item its id, images, description (and taxon)
    REVIEW/items/NNN-K.jpg     the item's images, as the model saw them
    REVIEW/key.json            which build each item came from (never served; read by score)
    REVIEW/ratings/NAME.jsonl  one reviewer's ratings, one line per click, appended and fsynced
    REVIEW/scores/             what score writes: scores.md, scores.json, scores.svg

A ratings file is append-only: each click writes the item's whole state (rating, flags) as one
JSON line and fsyncs it before the page is told it is saved, so a crash loses nothing that was
acknowledged. Read back, an item's last line wins (a re-rating replaces the earlier one; a line
sent twice counts once) and a torn last line — a crash mid-write — is ignored."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.config import ConfigError
from pipeline.review.config import FLAGS, RATINGS, REVIEWER_NAME

ITEMS = "items"
ITEMS_JSON = "items.json"
KEY_JSON = "key.json"
RATINGS_DIR = "ratings"
SCORES_DIR = "scores"
RATINGS_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Rating:
    """One reviewer's current judgement of one item: a rating 1-5 (None: only flagged so far) and flags."""
    item: str
    rating: int | None
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, record: dict, items: set[str] | None = None) -> Rating:
        """A rating from a request body or a file's line; ValueError naming the field that is wrong."""
        if not isinstance(record, dict):
            raise ValueError("a rating is a JSON object")
        item, rating, flags = record.get("item"), record.get("rating"), record.get("flags", [])
        if not isinstance(item, str) or (items is not None and item not in items):
            raise ValueError(f"item: {item!r} is not an item of this review")
        if rating is not None and (isinstance(rating, bool) or rating not in RATINGS):
            raise ValueError(f"rating: {rating!r} is not one of {list(RATINGS)} (or null)")
        if not isinstance(flags, list) or any(f not in FLAGS for f in flags):
            raise ValueError(f"flags: {flags!r} is not a list of {list(FLAGS)}")
        return cls(item, rating, tuple(f for f in FLAGS if f in flags))

    def record(self) -> dict:
        return {"item": self.item, "rating": self.rating, "flags": list(self.flags)}


def check_reviewer(name: str) -> str:
    if not isinstance(name, str) or not REVIEWER_NAME.match(name):
        raise ValueError(f"reviewer: {name!r} is not a reviewer name (1-64 letters, digits, '_', '.', '-'; "
                         "starting with a letter or digit)")
    return name


class RatingsFile:
    """One reviewer's append-only ratings file (see the module's docstring)."""

    _locks: ClassVar[dict[str, threading.Lock]] = {}
    _locks_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._locks_guard:  # one lock per file across every request thread of the server
            self.lock = self._locks.setdefault(str(self.path.resolve()), threading.Lock())

    def append(self, rating: Rating, **extra) -> None:
        """Write ``rating`` (with ``extra`` fields: reviewer, time) as one line and fsync it; returns
        once it is on disk."""
        line = (json.dumps({**rating.record(), **extra}, sort_keys=True) + "\n").encode()
        with self.lock:
            new = not self.path.exists()
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line from a crash: end it, so it stays one ignored line
                        line = b"\n" + line
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if new:  # the file's name must survive a crash too
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def read(self, items: set[str] | None = None) -> dict[str, Rating]:
        """item → its last complete, valid line (lines of items not in ``items`` are left out)."""
        if not self.path.exists():
            return {}
        out = {}
        with self.lock:
            data = self.path.read_bytes()
        for line in data.split(b"\n")[:-1]:  # what follows the last newline is a torn line
            try:
                rating = Rating.parse(json.loads(line), items)
            except ValueError:  # a torn line that a later append ended, or an item not in the review
                continue
            out.pop(rating.item, None)  # re-inserted: the dict keeps the order of the last clicks
            out[rating.item] = rating
        return out


class ReviewFolder:
    """The paths of a review folder and what it holds; refuses a folder that sample did not write."""

    def __init__(self, path: str | Path, key: str = "review"):
        self.root = Path(path)
        if not (self.root / ITEMS / ITEMS_JSON).is_file():
            raise ConfigError(f"{key}: {path} is not a review folder (no {ITEMS}/{ITEMS_JSON}: write one with "
                              "sae-traits review sample)")
        self.items_dir = self.root / ITEMS
        self.ratings_dir = self.root / RATINGS_DIR
        self.scores_dir = self.root / SCORES_DIR

    def items(self) -> list[dict]:
        return json.loads((self.items_dir / ITEMS_JSON).read_text())["items"]

    def item_ids(self) -> set[str]:
        return {it["item"] for it in self.items()}

    def key(self) -> dict:
        path = self.root / KEY_JSON
        if not path.is_file():
            raise ConfigError(f"review: {self.root} has no {KEY_JSON} (the key of which build each item came from)")
        return json.loads(path.read_text())

    def ratings_file(self, reviewer: str) -> RatingsFile:
        return RatingsFile(self.ratings_dir / f"{check_reviewer(reviewer)}{RATINGS_SUFFIX}")

    def reviewers(self) -> list[str]:
        if not self.ratings_dir.is_dir():
            return []
        return sorted(p.name[:-len(RATINGS_SUFFIX)] for p in self.ratings_dir.glob(f"*{RATINGS_SUFFIX}")
                      if REVIEWER_NAME.match(p.name[:-len(RATINGS_SUFFIX)]))

    def all_ratings(self) -> dict[str, dict[str, Rating]]:
        """reviewer → item → their current rating of it."""
        items = self.item_ids()
        return {r: self.ratings_file(r).read(items) for r in self.reviewers()}
