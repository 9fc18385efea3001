#!/usr/bin/env python
"""The same images read as a WebDataset (tar shards, members by offset) and as an ImageFolder
(one file each): index, then read + decode every image in one process, as a decode task does.

    python benchmarks/bench_sources.py [--images N] [--shards S]

Prints images/s of each and ``RESULT webdataset_vs_imagefolder: ratio=X (target >= 0.9) PASS|MISS``.
Local disk here (the page cache warm after the first pass: each source is read twice, the second
timed); on S3 a shard is one object instead of N, which this does not measure.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PreprocessConfig, SourceConfig  # noqa: E402
from pipeline.preprocessing import decode_image  # noqa: E402
from pipeline.sources import ImageReader, build_index  # noqa: E402


def make_sources(root: Path, n: int, shards: int) -> tuple[SourceConfig, SourceConfig]:
    rng = np.random.default_rng(0)
    folder, wds = root / "folder", root / "wds"
    wds.mkdir(parents=True)
    tars = [tarfile.open(wds / f"part-{k:05d}.tar", "w") for k in range(shards)]
    for i in range(n):
        species = f"Genus{i % 20} species{i % 40}"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        path = folder / species.replace(" ", "_") / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        for ext, payload in (("jpg", data), ("sci.txt", species.encode())):
            info = tarfile.TarInfo(f"img{i:06d}.{ext}")
            info.size = len(payload)
            tars[i % shards].addfile(info, io.BytesIO(payload))
    for tar in tars:
        tar.close()
    return (SourceConfig(format="imagefolder", root=str(folder)),
            SourceConfig(format="webdataset", root=str(wds), taxonomy_member=None,
                         taxonomy_text_members={"species": "sci.txt"}))


def time_source(cfg: SourceConfig) -> tuple[float, float, int]:
    """(index s, read + decode s, images) — the second of two passes."""
    preprocess = PreprocessConfig()
    for _ in range(2):
        t0 = time.perf_counter()
        index, _ = build_index(cfg)
        t1 = time.perf_counter()
        reader = ImageReader(cfg)
        for row in index.select(["path", "source_file", "source_row"]).to_pylist():
            decode_image(reader.read(row["path"], row["source_file"], row["source_row"]), preprocess)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, index.num_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, wds = make_sources(Path(tmp), args.images, args.shards)
        rows = {name: time_source(cfg) for name, cfg in (("imagefolder", folder), ("webdataset", wds))}
    print(f"{'source':<12} {'images':>7} {'index s':>8} {'read+decode s':>14} {'images/s':>9}")
    rate = {}
    for name, (index_s, read_s, n) in rows.items():
        rate[name] = n / (index_s + read_s)
        print(f"{name:<12} {n:>7} {index_s:>8.2f} {read_s:>14.2f} {rate[name]:>9.0f}")
    ratio = rate["webdataset"] / rate["imagefolder"]
    print(f"RESULT webdataset_vs_imagefolder: ratio={ratio:.2f} (target >= 0.9) {'PASS' if ratio >= 0.9 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
