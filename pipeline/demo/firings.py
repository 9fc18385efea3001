"""Firings at realistic density, without images: a build folder in the state a build is in when
its encode stage has finished (index/, activations/ and the stage records), for N images of
about 3,000 firings each over 24,576 latents, with a taxonomy shaped like BIOSCAN-5M's labelled
subset. What the scale benchmark (benchmarks/bench_scale.py) runs the later stages over.

    write_synthetic_build(out, n_images=25_000)    # then Build(config).run() resumes from "encode done"

Shapes (seeded, so the same N gives the same tables):
- latents: a heavy-tailed (Zipf-like) frequency over ``m`` latents, plus a few signature latents
  per species that fire more in it than in its genus (so taxonomic contrast finds something);
- patches 0..255 (a 16 x 16 grid: 224 px at 14 px patches); values τ + Exp(1);
- taxonomy: about one genus per 80 images and three species per genus, species sizes skewed
  (Zipf), some species alone in their genus, ``unlabelled`` of the rows without a species;
- the images: every row points at one of a few real 256 x 256 JPEGs (the annotate stage reads
  pixels for its measurements), with the geometry they really have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.contract import ACTIVATIONS_SCHEMA, INDEX_SCHEMA, STAGE, STATE
from pipeline.preprocessing import Geometry

IMAGE_SIDE, INPUT_SIZE, PATCH_PX = 256, 224, 14
N_PATCHES = (INPUT_SIZE // PATCH_PX) ** 2
N_SOURCE_IMAGES = 16


def synthetic_taxonomy(n_images: int, rng: np.random.Generator, unlabelled: float = 0.05) -> dict[str, np.ndarray]:
    """species / genus / family per image: skewed species sizes, some species alone in their genus."""
    n_genera = max(3, n_images // 80)
    per_genus = np.where(rng.random(n_genera) < 0.2, 1, rng.integers(2, 6, n_genera))  # 20 % monotypic
    genus_of = np.repeat(np.arange(n_genera), per_genus)
    weight = 1.0 / (1 + np.arange(genus_of.size)) ** 0.9  # Zipf-like species sizes
    rng.shuffle(weight)
    species = rng.choice(genus_of.size, size=n_images, p=weight / weight.sum())
    names = np.array([f"Genus{g:05d} species{s:06d}" for s, g in enumerate(genus_of)], dtype=object)
    genus_names = np.array([f"Genus{g:05d}" for g in range(n_genera)], dtype=object)
    family_names = np.array([f"Family{g // 12:04d}" for g in range(n_genera)], dtype=object)
    species_col = names[species]
    species_col[rng.random(n_images) < unlabelled] = None  # a genus but no species, as BIOSCAN has
    return {"species": species_col, "genus": genus_names[genus_of[species]],
            "family": family_names[genus_of[species]], "species_code": species}


def latent_sampler(m: int, rng: np.random.Generator) -> np.ndarray:
    """The cumulative distribution of a heavy-tailed latent frequency (latent order shuffled)."""
    p = 1.0 / (10 + np.arange(m)) ** 1.1
    cdf = np.cumsum(p[rng.permutation(m)])
    return cdf / cdf[-1]


def firings_table(rows: dict[str, np.ndarray], cdf: np.ndarray, signatures: np.ndarray, firings: int,
                  threshold: float, rng: np.random.Generator) -> pa.Table:
    """An activations/ file's rows: each image about ``firings`` (latent, patch, value) triples."""
    n = rows["image_id"].size
    counts = rng.poisson(firings, n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    latent = np.searchsorted(cdf, rng.random(offsets[-1])).astype(np.int32)
    # ~4 % of each labelled image's firings are its species' signature latents.
    own = np.repeat(rows["species_code"], counts)
    mark = (rng.random(latent.size) < 0.04) & np.repeat(rows["labelled"], counts)
    latent[mark] = signatures[own[mark], rng.integers(0, signatures.shape[1], int(mark.sum()))]
    patch = rng.integers(0, N_PATCHES, latent.size).astype(np.int16)
    value = (threshold + rng.exponential(1.0, latent.size)).astype(np.float32)
    lists = {name: pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
             for name, values in (("latent", latent), ("patch", patch), ("value", value))}
    columns = {f.name: pa.array(rows[f.name], f.type) for f in INDEX_SCHEMA}
    columns |= {name: pa.array(np.full(n, value), ACTIVATIONS_SCHEMA.field(name).type)
                for name, value in rows["geometry"].items()}
    return pa.table({**columns, **lists, "n_firings": pa.array(counts.astype(np.int32))}, schema=ACTIVATIONS_SCHEMA)


def write_source_images(folder: Path, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(N_SOURCE_IMAGES):
        pixels = rng.integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        path = folder / f"specimen{k:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def write_synthetic_build(out: str | Path, config: dict, n_images: int, *, m: int = 24_576, firings: int = 3_000,
                          rows_per_file: int = 1024, threshold: float = 0.9, seed: int = 0) -> dict:
    """Write ``out`` as a build whose index and encode stages are done, recorded with ``config``
    (a dumped BuildConfig whose output is ``out``). Returns {images, firings, files}."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    taxa = synthetic_taxonomy(n_images, rng)
    cdf = latent_sampler(m, rng)
    signatures = rng.integers(0, m, (int(taxa["species_code"].max()) + 1, 8)).astype(np.int32)
    sources = write_source_images(out / "source-images", rng)
    scale = INPUT_SIZE / IMAGE_SIDE
    geometry = Geometry(orig_w=IMAGE_SIDE, orig_h=IMAGE_SIDE, scale_x=scale, scale_y=scale, offset_x=0.0,
                        offset_y=0.0, input_size=INPUT_SIZE, patch_px=PATCH_PX)
    image_ids = np.array([f"SYN{i:08d}" for i in range(n_images)], dtype=object)
    index = {"image_id": image_ids, "species": taxa["species"], "genus": taxa["genus"], "family": taxa["family"],
             "split": np.full(n_images, "train", dtype=object), "path": np.array(sources, dtype=object)[
                 np.arange(n_images) % N_SOURCE_IMAGES], "source_file": np.full(n_images, None, dtype=object),
             "source_row": np.full(n_images, None, dtype=object)}
    (out / STAGE["encode"].output).mkdir(parents=True, exist_ok=True)
    total, files = 0, 0
    for start in range(0, n_images, rows_per_file):
        part = {k: v[start:start + rows_per_file] for k, v in index.items()}
        part |= {"species_code": taxa["species_code"][start:start + rows_per_file],
                 "labelled": np.array([s is not None for s in part["species"]]),
                 "geometry": {k: getattr(geometry, k) for k in ACTIVATIONS_SCHEMA.names if hasattr(geometry, k)}}
        table = firings_table(part, cdf, signatures, firings, threshold, rng)
        pq.write_table(table, out / STAGE["encode"].output / f"synthetic-{files:06d}.parquet")
        total += int(table["n_firings"].to_numpy().sum(dtype=np.int64))
        files += 1
    index_table = pa.table({f.name: pa.array(index[f.name], f.type) for f in INDEX_SCHEMA}, schema=INDEX_SCHEMA)
    (out / STAGE["index"].output).mkdir(parents=True, exist_ok=True)
    pq.write_table(index_table, out / STAGE["index"].output / "index.parquet")
    fs, root = storage.filesystem(str(out))
    storage.write_json(fs, storage.join(root, f"{STATE}/config.json"), config)
    for stage, extra in (("index", {"rejected": 0}), ("encode", {})):
        storage.write_json(fs, storage.join(root, f"{STATE}/stages/{stage}.json"),
                           {"rows": n_images, "wall_s": 0.0, "synthetic": True, **extra})
    summary = {"images": n_images, "firings": total, "files": files}
    (out / "synthetic.json").write_text(json.dumps(summary))
    return summary
