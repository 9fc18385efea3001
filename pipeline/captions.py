"""Image–caption shards for CLIP training from a finished build (``export --format clip``), as the
paper's downstream check uses them (its reference code's ``create_train_json.py`` and
``convert_trait_wds.py``: one sample per (image, annotation), ``"A photo of " + species + " with "
+ trait description``):

    OUT/traits/shard-000000.tar ...        jpg|png + txt (the trait caption) + json, and sizes.json
    OUT/species_only/shard-000000.tar ...  the same images in the same order, txt "A photo of {species}"
    OUT/held_out/shard-000000.tar ...      one sample per held-out image: jpg|png + txt (its species) + json
    OUT/held_out.csv                       image_id, species, genus of the held-out images
    OUT/clip_export.json                   counts, the species (the zero-shot classes), the split, the build

Only ``ok`` annotations make samples. Every labelled image the build encoded is assigned to train
or held-out by image id — seeded, per species, so each species keeps its share — and a held-out
image is in no training shard, whatever annotations it has. The shards are what open_clip's
trainer reads (``--dataset-type webdataset``; ``sizes.json`` gives it the sample counts)."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow.compute as pc

from pipeline import storage
from pipeline.annotation.renderings import png_bytes
from pipeline.config import ClipConfig
from pipeline.console import PREFIX
from pipeline.contract import image_format
from pipeline.errors import ImageRejected
from pipeline.finished import FinishedBuild
from pipeline.preprocessing import decode_image
from pipeline.sources import ImageReader

SHARD_SETS = ("traits", "species_only", "held_out")
SUMMARY = "clip_export.json"
IMAGE_ROWS = ["image_id", "species", "genus", "path", "source_file", "source_row"]
TRAITS_READ = ["status", "annotation_id", "species", "genus", "image_ids", "latent", "body_part", "description"]


def held_out_images(images: dict[str, str], fraction: float, seed: int) -> set[str]:
    """image_id → species in, the held-out ids out: per species, round(n × fraction) of its images
    (at least one, never all: a species with one image is only trained on), drawn by a generator
    seeded with ``seed`` and the species, over its ids sorted — the same split on every run."""
    by_species: dict[str, list[str]] = defaultdict(list)
    for image_id, species in images.items():
        by_species[species].append(image_id)
    held = set()
    for species, ids in sorted(by_species.items()):
        if len(ids) < 2:
            continue
        ids = sorted(ids)
        random.Random(f"{seed}:{species}").shuffle(ids)
        held.update(ids[:min(len(ids) - 1, max(1, round(len(ids) * fraction)))])
    return held


AS_THEY_ARE = ("JPEG", "PNG", "WEBP")  # what open_clip's WebDataset loader decodes as they are


def image_member(data: bytes, preprocess) -> tuple[str, bytes]:
    """(WebDataset extension, bytes) of a photo or rendering as the trainer reads it: a JPEG, PNG or
    WebP as it is, anything else (TIFF, GIF, 16-bit, CMYK...) converted to an RGB PNG."""
    fmt = image_format(data)
    if fmt is not None and fmt.pillow in AS_THEY_ARE:
        return fmt.suffix, data
    return "png", png_bytes(np.asarray(decode_image(data, preprocess)), compress_level=6)  # Pillow's default


class TarShards:
    """Samples → ``FOLDER/shard-000000.tar`` … (each written whole, :func:`pipeline.storage.publish`)
    and ``FOLDER/sizes.json``, which open_clip reads for the sample counts."""

    def __init__(self, fs, folder: str, per_shard: int):
        self.fs, self.folder, self.per_shard = fs, folder, per_shard
        self.sizes: dict[str, int] = {}
        self.buf, self.tar, self.n = None, None, 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None:
            self.buf = io.BytesIO()
            self.tar = tarfile.open(fileobj=self.buf, mode="w")
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.n += 1
        if self.n == self.per_shard:
            self.flush()

    def flush(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = f"shard-{len(self.sizes):06d}.tar"
        storage.publish(self.fs, storage.join(self.folder, name), self.buf.getvalue())
        self.sizes[name] = self.n
        self.buf, self.tar, self.n = None, None, 0

    def close(self) -> dict[str, int]:
        self.flush()
        storage.publish(self.fs, storage.join(self.folder, "sizes.json"), json.dumps(self.sizes, indent=1).encode())
        return self.sizes


def caption_of(template: str, row: dict) -> str:
    return template.format(species=row["species"], genus=row["genus"] or "", description=row["description"],
                           body_part=row["body_part"] or "")


def write_caption_shards(clip: ClipConfig, build: FinishedBuild, fs, out: str, pictures=None, log=print) -> dict:
    """Write the shards of ``clip`` for ``build`` under ``out`` (see the module's docstring) and
    return their figures. ``pictures``: a :class:`pipeline.export.Pictures` that makes each
    annotation's renderings or crops (``clip.image`` rendering or crop); None: the original photos."""
    labelled = build.read("activations", IMAGE_ROWS, lambda t: pc.is_valid(t["species"])).to_pylist()
    rows = {r["image_id"]: r for r in labelled}
    held = held_out_images({i: r["species"] for i, r in rows.items()}, clip.held_out_fraction, clip.split_seed)
    reader = ImageReader(build.config.source)
    missing: list[str] = []

    def original(image_id: str) -> tuple[str, bytes] | None:
        r = rows.get(image_id)
        try:
            if r is None:
                raise LookupError("not among the build's labelled images")
            return image_member(reader.read(r["path"], r["source_file"], r["source_row"]), build.config.preprocess)
        except (OSError, LookupError, ImageRejected) as exc:  # moved or changed since the build
            missing.append(f"{image_id}: {type(exc).__name__}: {exc}")
            return None

    shards = {name: TarShards(fs, storage.join(out, name), clip.samples_per_shard) for name in SHARD_SETS}
    n_samples, train_images, annotations = 0, set(), 0
    # Renderings are made from a row's boxes (or read from its saved renderings): every column then.
    for table in build.tables("traits", TRAITS_READ if pictures is None else None):
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["description"])))
        batch = table.to_pylist()
        made = pictures.of(batch) if pictures is not None else [None] * len(batch)
        for row, images in zip(batch, made):
            annotations += 1
            sample = {"species": row["species"], "genus": row["genus"], "annotation_id": row["annotation_id"],
                      "latent": row["latent"], "body_part": row["body_part"]}
            for k, image_id in enumerate(row["image_ids"]):
                if image_id in held:
                    continue
                if images is None:
                    member = original(image_id)
                elif k < len(images):
                    member = image_member(images[k], build.config.preprocess)
                else:
                    member = None
                if member is None:
                    continue
                key, meta = f"{n_samples:09d}", json.dumps({**sample, "image_id": image_id}).encode()
                for name, template in (("traits", clip.caption_template), ("species_only", clip.control_template)):
                    shards[name].add(key, {member[0]: member[1], "txt": caption_of(template, row).encode(),
                                           "json": meta})
                n_samples += 1
                train_images.add(image_id)
    held_rows = sorted((rows[i] for i in held), key=lambda r: r["image_id"])
    n_held = 0
    for r in held_rows:
        member = original(r["image_id"])
        if member is None:
            continue
        meta = json.dumps({k: r[k] for k in ("image_id", "species", "genus")}).encode()
        shards["held_out"].add(f"{n_held:09d}", {member[0]: member[1], "txt": r["species"].encode(), "json": meta})
        n_held += 1
    sizes = {name: shards[name].close() for name in SHARD_SETS}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["image_id", "species", "genus"])
    writer.writerows([r["image_id"], r["species"], r["genus"]] for r in held_rows)
    storage.publish(fs, storage.join(out, "held_out.csv"), table.getvalue().encode())
    for line in missing[:10]:
        log(f"{PREFIX} export: image not read, left out: {line}")
    summary = {
        "format": "clip", "build": build.where, "build_id": build.manifest.get("build_id"),
        "annotations": annotations, "samples": n_samples, "train_images": len(train_images),
        "held_out_images": n_held, "species": sorted({r["species"] for r in labelled}),
        "shards": {name: len(s) for name, s in sizes.items()}, "images_missing": len(missing),
        "clip": clip.model_dump(mode="json"),
    }
    storage.publish(fs, storage.join(out, SUMMARY), json.dumps(summary, indent=2).encode())
    log(f"{PREFIX} export: {n_samples} image–caption samples of {annotations} annotations on "
        f"{len(train_images)} images ({summary['shards']['traits']} shard(s) each for traits and species_only), "
        f"{n_held} held-out images of {len(summary['species'])} species → {out}")
    return {k: v for k, v in summary.items() if k not in ("species", "clip")}
