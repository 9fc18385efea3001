#!/usr/bin/env python
"""Decode speed per CPU core: today's full decode + bicubic resize against ``prepare_bytes`` (a
JPEG decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, then an integer reduction and the
bicubic resample), one process, one thread; and what it means for a GPU that encodes
``--gpu-images-per-s`` images/s (DINOv2-B + SAE on one H100, measured at actor level): the CPU
cores it needs to stay busy.

    python benchmarks/bench_decode.py [--seconds 3] [--demo DIR]
    python benchmarks/bench_decode.py --gpu          # on a GPU: preprocess.decode=gpu end to end

Images: the demo's synthetic specimens resized to each size with mild sensor noise (sigma 2),
JPEG quality 90 (and one PNG). Each size is timed in two rounds (today, new, today, new), and the
ratio of each round is printed: the two agree when the machine is quiet.

With ``--demo DIR`` (a folder ``python -m pipeline.demo`` prepared: data and models), it also
encodes the demo's images saved at 1024x768 both ways with the demo's backbone and SAE and prints
the firing Jaccard (the draft decode is not bit-identical), and checks that at the demo's own size
(no draft scale applies) the model input is identical byte for byte.

Prints ``RESULT decode_<size>: ratio=X (target >= T) PASS|MISS`` per size and a table.

``--gpu`` (CUDA; needs neither Ray nor the demo): 1024x768 JPEG bytes through the encode actor's
DeviceDecoder (nvJPEG, batched, and the resample on the GPU) and the full-size encoder (DINOv2-B
config with random weights + SAE 768 -> 24,576), against the encoder alone on decoded pixels.
"""

from __future__ import annotations

import argparse
import glob
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, machine_info, offline_env, print_summary, print_table, record, result  # noqa: E402
from pipeline.config import PreprocessConfig  # noqa: E402
from pipeline.preprocessing import decode_image, plan_geometry, prepare_bytes  # noqa: E402

CASES = [  # (label, width, height, format, target ratio)
    ("256x192 JPEG", 256, 192, "JPEG", 1.0),
    ("1024x768 JPEG", 1024, 768, "JPEG", 3.0),
    ("4000x3000 JPEG", 4000, 3000, "JPEG", 6.0),
    ("1024x768 PNG", 1024, 768, "PNG", 1.0),
]


def todays_decode(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """The decode stage before prepare_bytes: the whole image decoded, then one bicubic resize."""
    img = decode_image(data, cfg)
    geom, size = plan_geometry(cfg.geometry, img.width, img.height, cfg)
    resized = img.resize(size, Image.BICUBIC)
    if cfg.geometry != "squash":
        canvas = Image.new("RGB", (cfg.image_size,) * 2, (cfg.pad_value,) * 3)
        canvas.paste(resized, (int(geom.offset_x), int(geom.offset_y)))
        resized = canvas
    return np.asarray(resized, dtype=np.uint8)


def new_decode(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    return prepare_bytes(data, cfg)[0]


def specimen_photos(demo_images: list[str], w: int, h: int, fmt: str, n: int, noise: float = 2.0) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for path in demo_images[:n]:
        img = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
        pixels = np.asarray(img).astype(np.float32) + rng.normal(0, noise, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def images_per_s(fn, images: list[bytes], cfg: PreprocessConfig, seconds: float) -> float:
    fn(images[0], cfg)  # warm
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in images:
            fn(data, cfg)
            n += 1
    return n / (time.perf_counter() - start)


def firing_sets(encoder, batch: np.ndarray) -> list[set[tuple[int, int]]]:
    offsets, latent, patch, _ = encoder.firings(batch)
    return [set(zip(patch[a:b].tolist(), latent[a:b].tolist())) for a, b in zip(offsets[:-1], offsets[1:])]


def demo_checks(demo: Path, cfg: PreprocessConfig) -> None:
    """Firing Jaccard at 1024x768 (full decode vs prepare_bytes), identity at the demo's own size."""
    import yaml  # the demo's build.yaml names its models

    from pipeline.encoding import FiringEncoder

    build = yaml.safe_load((demo / "build.yaml").read_text()) if (demo / "build.yaml").exists() else {}
    backbone = build.get("backbone", {}).get("model", str(demo / "models" / "dinov2-tiny"))
    layer = build.get("backbone", {}).get("layer", 2)
    sae = build.get("sae", {}).get("checkpoint", str(demo / "models" / "sae"))
    threshold = build.get("sae", {}).get("threshold", 0.9)
    encoder = FiringEncoder(backbone, layer, sae, threshold)
    files = sorted(glob.glob(str(demo / "data" / "**" / "*.jpg"), recursive=True))
    own = [Path(f).read_bytes() for f in files]
    same = sum(np.array_equal(todays_decode(d, cfg), new_decode(d, cfg)) for d in own)
    result("decode_identical_at_demo_size", same / len(own), "= 1: byte-identical model inputs", same == len(own),
           f"{same}/{len(own)} demo images at their own size")
    big = []
    for f in files:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").resize((1024, 768), Image.BICUBIC).save(buf, "JPEG", quality=95)
        big.append(buf.getvalue())
    inter = union = 0
    per_image = []
    for start in range(0, len(big), 64):
        chunk = big[start:start + 64]
        full = firing_sets(encoder, np.stack([todays_decode(d, cfg) for d in chunk]))
        fast = firing_sets(encoder, np.stack([new_decode(d, cfg) for d in chunk]))
        for a, b in zip(full, fast):
            inter, union = inter + len(a & b), union + len(a | b)
            per_image.append(len(a & b) / len(a | b) if a | b else 1.0)
    jaccard = inter / union if union else 1.0
    print(f"  firings at 1024x768, {len(big)} demo images: {union} (patch, latent) pairs in either, "
          f"Jaccard {jaccard:.4f} (per image: mean {np.mean(per_image):.4f}, min {min(per_image):.4f})")
    result("decode_firing_jaccard_1024x768", jaccard, ">= 0.95", jaccard >= 0.95, "Jaccard, not a speed ratio")


def bench_gpu_decode(demo_images: list[str], seconds: float, smoke_cpu: bool) -> None:
    """preprocess.decode: gpu on one GPU: 1024x768 JPEG bytes in → firings out (the DeviceDecoder,
    nvJPEG batched, then the full-size encoder), against the encoder alone on decoded pixels."""
    import tempfile

    from benchmarks.bench_build import full_size_encoder, make_pixels, passthrough_columns
    from pipeline.preprocessing import GEOMETRY_COLUMNS, IMAGE_BYTES, DeviceDecoder, check_bytes

    header("gpu_decode: 1024x768 JPEG bytes in -> firings out on one GPU, vs the encoder alone")
    if not torch.cuda.is_available() and not smoke_cpu:
        result("gpu_decode", None, "", None, note=f"skipped: no GPU (torch {torch.__version__})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        encoder, line, batches, _, _ = full_size_encoder(Path(tmp), smoke_cpu)
    print(f"  {line}", flush=True)
    cfg, bs = PreprocessConfig(decode="gpu"), batches[0]
    photos = specimen_photos(demo_images, 1024, 768, "JPEG", 16)
    photos = [photos[i % len(photos)] for i in range(bs)]
    as_bytes = passthrough_columns(bs)
    geoms = [check_bytes(d, cfg) for d in photos]
    for k in GEOMETRY_COLUMNS:
        as_bytes[k] = np.array([getattr(g, k) for g in geoms], dtype=as_bytes[k].dtype if k in as_bytes else None)
    as_bytes[IMAGE_BYTES] = np.array(photos, dtype=object)
    as_pixels = {"pixels": make_pixels(bs, seed=2), **passthrough_columns(bs)}
    decoder = DeviceDecoder(cfg, encoder.features.patch_px, encoder.device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def rate(step) -> float:
        step()
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            n += bs
        sync()
        return n / (time.perf_counter() - start)

    alone = rate(lambda: encoder(as_pixels))
    decode_only = rate(lambda: decoder(as_bytes))
    end_to_end = rate(lambda: encoder(decoder(as_bytes)[0]))
    print_table(["what", "images/s"], [["encoder alone (pixels decoded up front)", alone],
                                       ["DeviceDecoder alone (nvJPEG + resample)", decode_only],
                                       ["bytes in -> firings out", end_to_end]])
    print(f"  batch {bs}, {seconds:g} s each after one warm-up batch; 1024x768 JPEGs of "
          f"{np.mean([len(d) for d in photos]) / 1024:.0f} KB")
    record(f"RESULT gpu_decode: bytes in -> firings out {end_to_end:,.0f} images/s = {end_to_end / alone:.2f} of "
           f"the encoder alone ({alone:,.0f} images/s); a measurement, no target"
           + ("  [CPU smoke run, not a measurement]" if smoke_cpu else f"  [{line.split(';')[0]}]"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--images", type=int, default=8, help="distinct images per size")
    parser.add_argument("--gpu-images-per-s", type=float, default=4400.0,
                        help="what one GPU encodes (DINOv2-B + SAE, one H100, actor level)")
    parser.add_argument("--demo", type=Path, default=None,
                        help="a prepared demo folder: adds the firing Jaccard and the identity check")
    parser.add_argument("--geometry", default="squash", choices=["squash", "pad", "center_crop"])
    parser.add_argument("--gpu", action="store_true",
                        help="only the GPU check: preprocess.decode=gpu end to end vs the encoder alone")
    parser.add_argument("--gpu-smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    offline_env(ROOT)
    torch.set_num_threads(1)  # per core, as in a decode task (Ray runs a 1-CPU task with one thread)
    machine_info()
    header(f'decode, one process, geometry {args.geometry}')
    cfg = PreprocessConfig(geometry=args.geometry)
    demo_images = sorted(glob.glob(str((args.demo or ROOT) / "**" / "*.jpg"), recursive=True))
    if not demo_images:
        from pipeline.demo.specimens import generate_demo_dataset
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
        generate_demo_dataset(tmp, images_per_species=1, seed=0)
        demo_images = sorted(glob.glob(str(tmp / "**" / "*.jpg"), recursive=True))
    if args.gpu or args.gpu_smoke_cpu:
        bench_gpu_decode(demo_images, args.seconds, args.gpu_smoke_cpu)
        print_summary()
        return 0
    rows = []
    for label, w, h, fmt, target in CASES:
        images = specimen_photos(demo_images, w, h, fmt, max(2, args.images if w * h < 4e6 else 3))
        rounds = []
        for _ in range(2):
            today = images_per_s(todays_decode, images, cfg, args.seconds)
            new = images_per_s(new_decode, images, cfg, args.seconds)
            rounds.append((today, new))
        today, new = (float(np.mean(v)) for v in zip(*rounds))
        ratio = new / today
        kb = np.mean([len(d) for d in images]) / 1024
        rows.append([label, f"{kb:.0f} KB", today, new, f"{rounds[0][1] / rounds[0][0]:.2f}x",
                     f"{rounds[1][1] / rounds[1][0]:.2f}x", args.gpu_images_per_s / today,
                     args.gpu_images_per_s / new])
        passed = ratio >= target if target > 1 else ratio >= 0.95  # "no slower", within timing noise
        result(f"decode_{label.replace(' ', '_')}", ratio, f">= {target:g}" if target > 1 else "no slower (>= 0.95)",
               passed)
    print_table(["image", "file", "today img/s/core", "new img/s/core", "ratio round 1", "ratio round 2",
                 "cores/GPU today", "cores/GPU new"], rows)
    print(f"  cores/GPU: CPU cores one GPU needs to decode {args.gpu_images_per_s:,.0f} images/s")
    if args.demo:
        header("the demo's images: identity at their size, firings at 1024x768")
        demo_checks(args.demo, cfg)
    print_summary()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
