"""A build scored against the ground truth of planted data (``ground_truth.csv`` of the demo or the
hard data): where each species' best latent lies, how many annotated boxes are on the planted part,
and how well the confidence tells them apart.

A box is *on the part* when at least half of its area lies inside the part's box in that image (an
image that does not show the part has no box on it). A zone is on the part when at least half of
its boxes are; an annotation when at least half of its images' zones are."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

Box = tuple[int, int, int, int]


def planted_parts(ground_truth: str | Path) -> dict[str, Box]:
    """image_id → the planted part's box (x0, y0, x1, y1), for the images that show one."""
    with open(ground_truth, newline="") as f:
        return {r["processid"]: tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1")) for r in csv.DictReader(f)}


def on_part(box: dict, part: Box | None) -> bool:
    if part is None:
        return False
    inside = max(0, min(box["x1"], part[2]) - max(box["x0"], part[0])) * max(0, min(box["y1"], part[3]) - max(box["y0"], part[1]))
    return inside >= 0.5 * (box["x1"] - box["x0"]) * (box["y1"] - box["y0"])


def zone_on_part(boxes: list[dict], part: Box | None) -> bool:
    return bool(boxes) and sum(on_part(b, part) for b in boxes) >= 0.5 * len(boxes)


def best_latents(build: str | Path, parts: dict[str, Box]) -> dict[str, dict]:
    """For each species with candidates: its best-ranked latent (candidates/ latent_rank 0), over
    that latent's described zones (grounded ones; all of them without evidence) how many are on the
    part (``hits`` of ``zones``), and ``on``: at least half of them."""
    rows = pq.read_table(Path(build) / "candidates", columns=["image_id", "species", "latent", "latent_rank",
                                                              "image_rank", "boxes"])
    rows = rows.filter(pc.and_(pc.equal(rows["latent_rank"], 0), pc.is_valid(rows["image_rank"]))).to_pylist()
    out: dict[str, dict] = {}
    for r in rows:
        st = out.setdefault(r["species"], {"latent": r["latent"], "hits": 0, "zones": 0})
        st["zones"] += 1
        st["hits"] += zone_on_part(r["boxes"], parts.get(r["image_id"]))
    for st in out.values():
        st["on"] = st["zones"] > 0 and st["hits"] >= 0.5 * st["zones"]
    return out


def auc(positive: list[float], negative: list[float]) -> float | None:
    """The probability that a random positive scores above a random negative (ties count ½)."""
    if not positive or not negative:
        return None
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def annotation_quality(build: str | Path, parts: dict[str, Box], min_confidence: float) -> dict:
    """Over the ok annotations of ``build``: boxes on the part (all, and of the annotations at or
    above ``min_confidence``), the species kept above it with an annotation on the part, and the AUC of
    the confidence for annotations on vs off the part. Also the units by status."""
    traits = pq.read_table(Path(build) / "traits", columns=["species", "image_ids", "boxes", "status", "confidence"])
    statuses = dict(zip(*np.unique(np.asarray(traits["status"].to_pylist(), dtype=object), return_counts=True)))
    ok = [r for r in traits.to_pylist() if r["status"] == "ok"]
    box_hits, box_all, kept_hits, kept_all = 0, 0, 0, 0
    on_conf, off_conf, kept_species = [], [], set()
    for r in ok:
        zones = [zone_on_part(boxes, parts.get(i)) for i, boxes in zip(r["image_ids"], r["boxes"])]
        hits = sum(on_part(b, parts.get(i)) for i, boxes in zip(r["image_ids"], r["boxes"]) for b in boxes)
        n = sum(len(boxes) for boxes in r["boxes"])
        box_hits, box_all = box_hits + hits, box_all + n
        is_on = sum(zones) >= 0.5 * len(zones)
        if r["confidence"] is not None:
            (on_conf if is_on else off_conf).append(r["confidence"])
        if r["confidence"] is None or r["confidence"] >= min_confidence:
            kept_hits, kept_all = kept_hits + hits, kept_all + n
            if is_on:
                kept_species.add(r["species"])
    return {"ok": len(ok), "boxes_on_part": box_hits / box_all if box_all else None,
            "kept_boxes_on_part": kept_hits / kept_all if kept_all else None, "kept_species": sorted(kept_species),
            "auc": auc(on_conf, off_conf), "statuses": {str(k): int(v) for k, v in statuses.items()}}
