"""``sae-traits review sample``: a blinded review set drawn from finished builds.

From each build, ``per_build`` annotations an export would publish (status ok, and unparsed ones
with a description) are drawn, stratified by species: the species are visited in a seeded random
order, one annotation of each at a time (drawn at random within the species), round after round,
so every species is represented before any gives a second one. With ``by_confidence`` the confidence
bands (high, medium, low, none) take turns first, each drawing that way within itself. The draws of all builds are
shuffled together and numbered 001, 002, ... in that order. Each item keeps what the model saw —
the build's saved renderings (annotate.save_renderings), else the same renderings made again from
the source images by the annotate stage's own code (:class:`pipeline.export.Pictures`) — and its
description. An annotation whose images cannot be read any more is skipped for the next draw.

What reviewers see (``items/``) holds no build id, path, label, model, prompt version or
annotation id; ``key.json``, kept apart, says which build and annotation each item is."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import ConfigError, fsspec_options
from pipeline.console import PREFIX
from pipeline.contract import RENDERINGS_FIELD
from pipeline.evidence import CONFIDENCE_BANDS, confidence_band
from pipeline.export import ExportedBuild, Pictures, image_suffix
from pipeline.review.config import ReviewSampleConfig
from pipeline.review.folder import ITEMS, ITEMS_JSON, KEY_JSON, RATINGS_DIR

KEY_VERSION = 1
DRAWN_COLUMNS = ["annotation_id", "image_ids", "species", "genus", "latent", "description", "model",
                 "prompt_version", "status", "confidence"]
BANDS = (*(name for name, _ in reversed(CONFIDENCE_BANDS)), None)  # the order the bands take turns in


def stratified_order(rows: list[dict], rng: np.random.Generator) -> list[dict]:
    """Every row, in the order a stratified draw takes them: species in random order, one random
    row of each per round (a species with no rows left drops out)."""
    by_species = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["annotation_id"]):  # file order must not matter
        by_species[r["species"]].append(r)
    species = sorted(by_species, key=lambda s: (s is None, s or ""))
    queues = [[by_species[s][i] for i in rng.permutation(len(by_species[s]))] for s in
              (species[i] for i in rng.permutation(len(species)))]
    order = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order


def banded_order(rows: list[dict], rng: np.random.Generator) -> list[dict]:
    """Every row, the confidence bands taking turns (:data:`BANDS`), each band's rows in
    :func:`stratified_order`."""
    queues = [stratified_order([r for r in rows if confidence_band(r["confidence"]) == band], rng) for band in BANDS]
    return [q[depth] for depth in range(max((len(q) for q in queues), default=0)) for q in queues if depth < len(q)]


def drawable(build: ExportedBuild, include_unparsed: bool) -> list[dict]:
    """The build's annotations a review may draw: what an export publishes, with a description."""
    rows = []
    for table in build.traits(DRAWN_COLUMNS):
        described = pc.and_(pc.is_valid(table["description"]), pc.not_equal(pc.utf8_trim_whitespace(
            pc.fill_null(table["description"], "")), ""))
        keep = described if include_unparsed else pc.and_(described, pc.equal(table["status"], "ok"))
        rows += table.filter(keep).to_pylist()
    return rows


def with_renderings(build: ExportedBuild, rows: list[dict]) -> list[dict]:
    """``rows`` with their saved renderings (read for these annotations only: a build's are large)."""
    wanted = pa.array([r["annotation_id"] for r in rows], pa.string())
    saved = {}
    for table in build.traits(["annotation_id", RENDERINGS_FIELD.name]):
        for r in table.filter(pc.is_in(table["annotation_id"], wanted)).to_pylist():
            saved[r["annotation_id"]] = r[RENDERINGS_FIELD.name]
    return [{**r, RENDERINGS_FIELD.name: saved.get(r["annotation_id"])} for r in rows]


def draw(build: ExportedBuild, cfg: ReviewSampleConfig, rng: np.random.Generator,
         log) -> tuple[list[tuple[dict, list[bytes]]], dict]:
    """(up to per_build (annotation row, its images), figures of the draw) from one build."""
    rows = drawable(build, cfg.include_unparsed)
    order = banded_order(rows, rng) if cfg.by_confidence else stratified_order(rows, rng)
    has_saved = build.saved_renderings()
    pictures = Pictures(build, log, has_saved, threads=cfg.threads)
    drawn, tried = [], 0
    try:
        while len(drawn) < cfg.per_build and tried < len(order):  # skip annotations whose images are gone
            batch = order[tried:tried + cfg.per_build - len(drawn)]
            tried += len(batch)
            images = pictures.of(with_renderings(build, batch) if has_saved else batch)
            drawn += [(r, im) for r, im in zip(batch, images) if im]
    finally:
        pictures.close()
    figures = {"available": len(rows), "drawn": len(drawn), "without_images": tried - len(drawn),
               "species_available": len({r["species"] for r in rows}),
               "species_drawn": len({r["species"] for r, _ in drawn}),
               "renderings": "saved" if has_saved else "made again from the source images"}
    return drawn, figures


def open_build(cfg: ReviewSampleConfig, build: str) -> ExportedBuild:
    """A build is read for a review as an export reads it (what it publishes, its renderings)."""
    return ExportedBuild.open(build, fsspec_options(cfg.storage, build))


def label_of(build: str) -> str:
    return posixpath.basename(build.rstrip("/")) or build


def prepare_folder(cfg: ReviewSampleConfig) -> tuple[Path, Path]:
    """(the folder to write into, the review folder it becomes): written beside it, then renamed,
    so an interrupted sample leaves no half review set."""
    out = Path(cfg.out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not cfg.overwrite:
        raise ConfigError(f"out: {cfg.out} already exists; choose another out or set overwrite (--overwrite) "
                          "— its ratings would be lost")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / ITEMS).mkdir(parents=True)
    (partial / RATINGS_DIR).mkdir()
    return partial, out


def sweep_builds(sweep: str, storage_section) -> list[str]:
    """The output folders of a sweep's builds, in the order it built them (its sweep.json)."""
    fs, root = storage.filesystem(sweep, fsspec_options(storage_section, sweep))
    path = storage.join(root, "sweep.json")
    if not fs.exists(path):
        raise ConfigError(f"sweep: {sweep} holds no sweep.json (sae-traits sweep writes it when its builds have finished)")
    return [b["output"] for b in storage.read_json(fs, path)["builds"]]


def sample(cfg: ReviewSampleConfig, log=print) -> dict:
    """Write the review set ``cfg`` asks for; returns its figures."""
    if cfg.sweep is not None:
        cfg = cfg.model_copy(update={"builds": [*cfg.builds, *(b for b in sweep_builds(cfg.sweep, cfg.storage)
                                                                 if b not in cfg.builds)]})
    labels = cfg.labels or [label_of(b) for b in cfg.builds]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels: the builds' names repeat ({labels}); give each a label (--label)")
    builds = [open_build(cfg, b) for b in cfg.builds]  # each refused here unless a finished build
    partial, out = prepare_folder(cfg)
    entries, key_builds = [], []
    for i, (path, label, build) in enumerate(zip(cfg.builds, labels, builds)):
        drawn, figures = draw(build, cfg, np.random.default_rng([cfg.seed, 1, i]), log)
        log(f"{PREFIX} review: {label}: {figures['drawn']} of {figures['available']} annotations drawn "
            f"({figures['species_drawn']} of {figures['species_available']} species; renderings {figures['renderings']})")
        entries += [(i, row, images) for row, images in drawn]
        key_builds.append({"label": label, "build": path, **figures,
                           "models": sorted({str(r["model"]) for r, _ in drawn}),
                           "prompt_versions": sorted({str(r["prompt_version"]) for r, _ in drawn})})
    shuffled = [entries[k] for k in np.random.default_rng([cfg.seed, 2]).permutation(len(entries))]

    items, key_items = [], {}
    width = max(3, len(str(len(shuffled))))
    for n, (i, row, images) in enumerate(shuffled, start=1):
        item = f"{n:0{width}d}"
        names = [f"{item}-{k}.{image_suffix(data)}" for k, data in enumerate(images, start=1)]
        for name, data in zip(names, images):
            (partial / ITEMS / name).write_bytes(data)
        items.append({"item": item, "images": names, "description": row["description"],
                      **({"species": row["species"], "genus": row["genus"]} if cfg.show_species else {})})
        key_items[item] = {"build": i, **{c: row[c] for c in DRAWN_COLUMNS if c != "description"}}
    (partial / ITEMS / ITEMS_JSON).write_text(json.dumps({"items": items}, indent=1, ensure_ascii=False))
    key = {"version": KEY_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "config": cfg.model_dump(exclude={"storage", "overwrite"}), "builds": key_builds, "items": key_items}
    (partial / KEY_JSON).write_text(json.dumps(key, indent=1, ensure_ascii=False))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(partial, out)
    log(f"{PREFIX} review: {len(items)} items from {len(builds)} builds → {out} "
        f"(serve it: sae-traits review serve {out})")
    return {"review": str(out), "items": len(items), "builds": key_builds}
