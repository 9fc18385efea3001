#!/usr/bin/env python
"""One device check for every GPU path, for the rare, short loan of a GPU (issue 37): one command,
a few minutes, every figure at once. Each part has its own time limit and prints its own line
``CHECK <part>: PASS|MISS|SKIP|ERROR ...``; a part that raises, runs out of time or out of GPU
memory is reported as ERROR in one line and the others still run.

    python benchmarks/device_check.py --json device.json     # on one CUDA card, ~3 min
    python benchmarks/device_check.py --smoke-cpu            # every part on the CPU, tiny shapes (< 60 s)
    python benchmarks/device_check.py --parts encode,train_sae --part-limit-s 120 --seconds 2

Parts (random weights, no network, no Ray, no vLLM; models are written to a temporary folder and
loaded through the build's own path, ``FiringEncoder.from_sections`` → ``load_backbone``):

- encode     the full-size encoder (DINOv2-B config, block 10, SAE 768 → 24,576 at τ = 0.9, the
             SAE's b_enc calibrated as in ``bench_build.py --only gpu_encoder``) on 1024×768 JPEGs
             decoded by the build's decode task (``decode_batch``), bf16 and fp32: images/s at the
             best of batches 64/128/256/512, peak GPU memory, and the firings' Jaccard against the
             same 4 images encoded on the CPU in fp32. Target: bf16 ≥ 4,000 images/s.
- decode     ``preprocess.decode: gpu``: JPEG bytes through ``DeviceDecoder`` into the encoder,
             against the encoder alone on pixels decoded up front (what ``bench_decode.py --gpu``
             measures), and the patch → original-pixel boxes (``pipeline.boxes``) of both decode
             paths compared for photos of four sizes in every geometry. Target: ≥ 0.9 of the
             encoder alone; boxes equal.
- train_sae  the trainer's step (``SAETraining.train_step``, no Ray Train) in bf16 at the paper's
             shapes (d = 768, m = 24,576, batch 16,384): steps/s and patches/s, and 300 steps on
             planted data must lower the loss (first vs last metrics row).
- clip       a few open_clip training steps (open_clip's ClipLoss, AdamW, bf16) of a small random
             ViT CLIP (224 px, width 384, 6 blocks) on photos decoded by ``DeviceDecoder``, with
             synthetic captions (loss first vs last); SKIP
             when open_clip is not importable. (The caption shards of ``sae-traits downstream``
             need a finished build and open_clip's trainer as a subprocess: too entangled here.)

Then ``CHECK summary:`` — the card, torch / CUDA / transformers versions, every part's status and
each target met or missed. ``--json PATH`` writes every figure (after each part too, so a run
stopped at its limit keeps what it measured). Exit 0 when every part ran (PASS,
MISS: a target missed is a finding, not a failure; or SKIP), 1 when a part errored, 2 without a
CUDA device (unless ``--smoke-cpu``) or without a package the project needs.

The trainer's step comes from ``pipeline.sae_training`` (the recipe without Ray: the driver,
``pipeline.train_sae``, imports Ray for its Ray Train workers). Nothing here imports ``actors/`` or
Ray: a test runs the smoke mode with both made unimportable.

On a lent GPU (the device tool's ``run``): the working tree travels by itself (1.8 MiB, of which
``pipeline/`` 0.76 MiB and ``benchmarks/`` 0.26 MiB are what this imports); no venv. The machine's
image has torch, torchvision, transformers, pyarrow, fsspec, Pillow, PyYAML and aiohttp, but not
pydantic (``pipeline.config``), s3fs and botocore (``pipeline.storage`` imports them at module
level) nor open_clip: their wheels, 21 MiB (botocore 16 of them), go in ``build/device-wheels``
(ignored: ``/build/``), prepared once here:

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d build/device-wheels \\
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        typing_extensions==4.16.0 s3fs==2026.7.0 fsspec==2026.7.0 aiobotocore==3.10.0 botocore==1.43.117 \\
        jmespath==1.1.0 aioitertools==0.13.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5

(the venv's versions). Then one call, ``carry: ["build/device-wheels"]``, ``timeout_s: 480`` (four
parts of at most 100 s each, and the set-up; a run takes ~3 min):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/device-wheels/*.whl \\
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && set -o pipefail \\
      && python3 benchmarks/device_check.py --json $OUT/device.json 2>&1 | tee $OUT/device_check.log

A package still missing there stops the check at once with one line naming it (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import logging
import math
import platform
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # on a lent GPU a package the project needs may be missing from the machine's image: say which
    from benchmarks.bench_build import full_size_encoder, passthrough_columns  # noqa: E402
    from benchmarks.bench_decode import firing_sets, specimen_photos  # noqa: E402
    from benchmarks.common import header, machine_info, offline_env, print_summary, print_table, record  # noqa: E402
    from pipeline.boxes import patch_box_table  # noqa: E402
    from pipeline.config import BackboneConfig, PreprocessConfig, SAEConfig, SAETrainSpec, TrainLoop  # noqa: E402
    from pipeline.demo.specimens import generate_demo_dataset  # noqa: E402
    from pipeline.encoding import FiringEncoder  # noqa: E402
    from pipeline.preprocessing import GEOMETRY_COLUMNS, PATCH_PX, DeviceDecoder, Geometry, decode_batch  # noqa: E402
    from pipeline.sae_training import SAETraining  # noqa: E402
    MISSING = None
except ImportError as exc:
    MISSING = exc

PARTS = {"encode": "the full-size encoder on decoded 1024x768 photos, bf16 and fp32, vs the CPU in fp32",
         "decode": "preprocess.decode: gpu (DeviceDecoder) into the encoder vs the encoder alone; boxes vs CPU decode",
         "train_sae": "the SAE trainer's step in bf16 at the paper's shapes, on planted data",
         "clip": "open_clip training steps of a small random CLIP on photos decoded by DeviceDecoder"}
# Targets (issue 37). docs/benchmarks.md records ≈4,400 images/s on one H100 (bench_build.py --only
# gpu_encoder); bench_decode.py --gpu prints the decode-fed ratio as a measurement, without a target;
# the Jaccard target is bench_decode.py's, for two decodes of the same photos.
ENCODE_TARGET = 4000.0  # images/s, bf16, DINOv2-B + SAE, one H100
DECODE_FED_TARGET = 0.9  # bytes in → firings out, over the encoder alone on decoded pixels
JACCARD_TARGET = 0.95  # fp32 on the GPU vs fp32 on the CPU (bf16's is printed, not judged)
LAYER, TAU = 10, 0.9  # block 10 of DINOv2-B (hidden_states[-2]); τ, SAEConfig.threshold's default
GEOMETRIES = ("squash", "pad", "center_crop")


@dataclass(frozen=True)
class Shapes:
    photo: tuple[int, int]  # (w, h) of the JPEGs encoded
    box_photos: tuple[tuple[int, int], ...]  # sizes whose boxes both decode paths must agree on
    distinct_photos: int  # distinct JPEGs (larger batches repeat them); also the CLIP batch
    encode_batches: tuple[int, ...]
    reference_images: int  # encoded on the CPU in fp32 too, for the Jaccard
    decode_batch: int  # when encode picked none
    sae: tuple[int, int, int, int]  # d, m, batch, steps
    clip: tuple[int, ...]  # image, patch, width, layers, text width, text layers, embedding; see clip_config
    clip_steps: int
    seconds: float  # timed seconds per measurement
    part_limit_s: float


FULL = Shapes(photo=(1024, 768), box_photos=((1024, 768), (768, 1024), (1001, 751), (4000, 3000)), distinct_photos=32,
              encode_batches=(64, 128, 256, 512), reference_images=4, decode_batch=256, sae=(768, 24_576, 16_384, 300),
              clip=(224, 16, 384, 6, 256, 4, 256), clip_steps=30, seconds=2.0, part_limit_s=100.0)
SMOKE = Shapes(photo=(64, 48), box_photos=((64, 48), (48, 64), (65, 47)), distinct_photos=8, encode_batches=(4, 8),
               reference_images=4, decode_batch=8, sae=(64, 256, 256, 60), clip=(32, 8, 64, 2, 64, 2, 32), clip_steps=6,
               seconds=0.2, part_limit_s=40.0)


class PartTimeout(BaseException):
    """A part over its time limit. A BaseException, so that the library's per-image ``except
    Exception`` (decode_batch rejects a bad image and goes on) cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def cuda_hidden():
    """pick_device_dtype puts every encoder on CUDA when one is visible; the CPU reference is made
    with CUDA hidden from it (its weights and tensors then stay on the CPU)."""
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        yield


class PhotoReader:
    """What decode_batch reads images with (pipeline.sources.ImageReader's ``read``), over photos in memory."""

    def __init__(self, photos: dict[str, bytes]):
        self.photos = photos

    def read(self, path: str, source_file, source_row) -> bytes:
        return self.photos[path]


def tile(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """A batch of n rows repeating the batch's rows (a few distinct photos make any batch size)."""
    take = np.arange(n) % len(batch["image_id"])
    return {k: v[take] for k, v in batch.items()}


def jaccard(a: list[set], b: list[set]) -> float:
    """|a ∩ b| / |a ∪ b| of the (patch, latent) firings, over all images."""
    union = sum(len(x | y) for x, y in zip(a, b))
    return sum(len(x & y) for x, y in zip(a, b)) / union if union else 1.0


def verdict(ok: bool, smoke: bool = False) -> str:
    """PASS / MISS; a CPU smoke run judges no speed."""
    return "not judged in a CPU smoke run" if smoke else ("PASS" if ok else "MISS")


def in_gib(peak: float | None) -> str:
    return "-" if peak is None else f"{peak} GiB"


@dataclass
class Setup:
    """What the parts share, each made on first use: the models, the photos, the decoded batches."""

    smoke: bool
    shapes: Shapes
    device: torch.device
    scratch: Path
    best_batch: int | None = None  # encode's best bf16 batch, which decode then uses
    made: dict = field(default_factory=dict)

    def once(self, key, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def models(self) -> tuple[str, str, str]:
        """(backbone folder, SAE folder, a line describing them), written once by bench_build's
        full_size_encoder (the encoder it loads as well is dropped: each part loads its own)."""
        def make():
            folder = self.scratch / "models"
            encoder, line, *_ = full_size_encoder(folder, self.smoke)
            del encoder
            self.free()
            return str(folder / "dinov2-base-random"), str(folder / "sae"), line
        return self.once("models", make)

    def encoder(self, dtype: str, on_cpu: bool = False) -> FiringEncoder:
        """The build's encoder as a config's sections describe it (FiringEncoder.from_sections)."""
        model, sae, _ = self.models()
        with cuda_hidden() if on_cpu else contextlib.nullcontext():
            return FiringEncoder.from_sections(BackboneConfig(model=model, layer=LAYER, dtype=dtype),
                                               SAEConfig(checkpoint=sae, threshold=TAU), None)

    def photos(self, size: tuple[int, int] | None = None, n: int | None = None) -> list[bytes]:
        """The demo's specimens as JPEGs of ``size`` (default: the shapes' photo), made as bench_decode makes them."""
        def demo_images():
            folder = self.scratch / "demo"
            generate_demo_dataset(folder, images_per_species=max(1, self.shapes.distinct_photos // 8), n_unlabelled=0)
            return sorted(glob.glob(str(folder / "**" / "*.jpg"), recursive=True))
        size, n = size or self.shapes.photo, n or self.shapes.distinct_photos
        return self.once(("photos", size, n), lambda: specimen_photos(self.once("demo", demo_images), *size, "JPEG", n))

    def decoded(self, cfg: PreprocessConfig, photos: list[bytes] | None = None, patch_px: int | None = None) -> dict:
        """The build's decode task over the photos: index and geometry columns, and ``pixels``
        (decode: cpu) or the checked ``image_bytes`` (decode: gpu)."""
        photos = photos or self.photos()
        index = passthrough_columns(len(photos))
        batch, rejected = decode_batch(index, cfg, PhotoReader(dict(zip(index["path"], photos))), patch_px or PATCH_PX)
        if rejected:
            raise RuntimeError(f"decode_batch rejected {len(rejected)} of the photos: {rejected[0]}")
        return batch

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def rate(self, step, per_step: int, warmup: int = 2) -> float:
        """Items/s of ``step`` (per_step items a call) over the shapes' seconds, after warm-up calls."""
        for _ in range(warmup):
            step()
        self.sync()
        n, start = 0, time.perf_counter()
        while not n or time.perf_counter() - start < self.shapes.seconds:
            step()
            n += per_step
        self.sync()
        return n / (time.perf_counter() - start)

    def steps_per_s(self, step, steps: int, warmup: int) -> float:
        """Run ``step`` ``steps`` times; calls/s of those after the first ``warmup``."""
        for i in range(steps):
            if i == warmup:
                self.sync()
                start = time.perf_counter()
            step()
        self.sync()
        return (steps - warmup) / (time.perf_counter() - start)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device.type == "cuda" else None

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- 1. encode

def part_encode(setup: Setup, figures: dict) -> tuple[str, str]:
    s, cfg = setup.shapes, PreprocessConfig()  # decode: cpu, the default
    figures["encoder"] = setup.models()[2]
    print(f"  {figures['encoder']}", flush=True)
    decoded = setup.decoded(cfg)
    figures["photo"] = f"{s.photo[0]}x{s.photo[1]} JPEG, {np.mean([len(p) for p in setup.photos()]) / 1024:.0f} KB"
    pixels = decoded["pixels"][:s.reference_images]
    reference = firing_sets(setup.encoder("float32", on_cpu=True), pixels)
    figures["firings_per_image"] = round(float(np.mean([len(f) for f in reference])), 1)
    rows = figures["by_batch"] = []
    for label, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        encoder = setup.encoder(dtype)
        figures[f"{label}_dtype"] = str(encoder.dtype).removeprefix("torch.")  # a CPU runs fp32 whatever it is asked
        for bs in s.encode_batches:
            batch = tile(decoded, bs)
            setup.reset_peak()
            try:
                rate = setup.rate(lambda: encoder(batch), bs)
            except torch.OutOfMemoryError:
                rows.append({"dtype": label, "batch": bs, "images_per_s": None, "peak_gib": "OOM"})
                setup.free()
                continue
            rows.append({"dtype": label, "batch": bs, "images_per_s": round(rate, 1), "peak_gib": setup.peak_gib()})
        ran = [r for r in rows if r["dtype"] == label and r["images_per_s"]]
        none = {"images_per_s": 0.0, "batch": None, "peak_gib": None}  # every batch size out of memory
        best = max(ran, key=lambda r: r["images_per_s"]) if ran else none
        figures |= {f"{label}_images_per_s": best["images_per_s"], f"{label}_batch": best["batch"],
                    f"{label}_peak_gib": best["peak_gib"],
                    f"{label}_jaccard_vs_cpu_fp32": round(jaccard(firing_sets(encoder, pixels), reference), 4)}
        setup.best_batch = setup.best_batch or best["batch"]
        del encoder
        setup.free()
    print_table(["dtype", "batch", "images/s", "peak GiB"],
                [[r["dtype"], r["batch"], r["images_per_s"] or "-", r["peak_gib"] or "-"] for r in rows])
    fast, same = figures["bf16_images_per_s"] >= ENCODE_TARGET, figures["fp32_jaccard_vs_cpu_fp32"] >= JACCARD_TARGET
    status = "PASS" if same and (fast or setup.smoke) else "MISS"
    ran_as = "" if figures["bf16_dtype"] == "bfloat16" else f" (run as {figures['bf16_dtype']} here)"
    return status, (f"bf16{ran_as} {figures['bf16_images_per_s']:,.0f} images/s at batch {figures['bf16_batch']} "
                    f"(target >= {ENCODE_TARGET:,.0f}: {verdict(fast, setup.smoke)}), peak "
                    f"{in_gib(figures['bf16_peak_gib'])}; fp32 "
                    f"{figures['fp32_images_per_s']:,.0f} images/s at batch {figures['fp32_batch']}; firings' Jaccard "
                    f"vs the CPU in fp32: fp32 {figures['fp32_jaccard_vs_cpu_fp32']:.4f} (target >= {JACCARD_TARGET}: "
                    f"{verdict(same)}), bf16 {figures['bf16_jaccard_vs_cpu_fp32']:.4f} (not judged)")


# --------------------------------------------------------------------------- 2. decode on the GPU

def part_decode(setup: Setup, figures: dict) -> tuple[str, str]:
    s, cpu_cfg, gpu_cfg = setup.shapes, PreprocessConfig(), PreprocessConfig(decode="gpu")
    encoder = setup.encoder("bfloat16")  # the build's dtype on CUDA
    decoder = DeviceDecoder(gpu_cfg, encoder.features.patch_px, encoder.device)
    bs = figures["batch"] = setup.best_batch or s.decode_batch
    as_pixels, as_bytes = tile(setup.decoded(cpu_cfg), bs), tile(setup.decoded(gpu_cfg), bs)
    alone = figures["encoder_alone_images_per_s"] = round(setup.rate(lambda: encoder(as_pixels), bs), 1)
    figures["decoder_alone_images_per_s"] = round(setup.rate(lambda: decoder(as_bytes), bs), 1)
    fed = figures["bytes_to_firings_images_per_s"] = round(setup.rate(lambda: encoder(decoder(as_bytes)[0]), bs), 1)
    ratio = figures["decode_fed_ratio"] = round(fed / alone, 3)
    print_table(["what", "images/s"], [["encoder alone (pixels decoded up front)", alone],
                                       ["DeviceDecoder alone", figures["decoder_alone_images_per_s"]],
                                       ["bytes in -> firings out", fed]])

    # The same photos both ways: pixels a grey level or two apart (docs/cluster.md), firings close.
    distinct = len(setup.photos())
    on_device, _ = decoder(as_bytes)
    gpu_pixels, cpu_pixels = on_device["pixels"][:distinct], torch.from_numpy(as_pixels["pixels"][:distinct])
    diff = (gpu_pixels.cpu().int() - cpu_pixels.int()).abs()
    figures["pixels_max_abs_diff"] = int(diff.max())
    figures["pixels_mean_abs_diff"] = round(float(diff.float().mean()), 3)
    figures["firings_jaccard_gpu_vs_cpu_decode"] = round(jaccard(firing_sets(encoder, gpu_pixels),
                                                                 firing_sets(encoder, cpu_pixels.numpy())), 4)

    # Boxes: every patch's box in original pixels, from each path's geometry, photos of several
    # sizes (a draft-scale decode, odd sizes, portrait) in every geometry.
    photos = [setup.photos(size, 1)[0] for size in s.box_photos]
    equal = compared = 0
    for geometry in GEOMETRIES:
        cpu = setup.decoded(PreprocessConfig(geometry=geometry), photos)
        on_gpu = PreprocessConfig(geometry=geometry, decode="gpu")
        gpu, rejected = DeviceDecoder(on_gpu, PATCH_PX, setup.device)(setup.decoded(on_gpu, photos))
        if rejected:
            raise RuntimeError(f"DeviceDecoder rejected {len(rejected)} photos ({geometry}): {rejected[0]}")
        for i in range(len(photos)):
            geometries = [Geometry.from_row({k: side[k][i] for k in GEOMETRY_COLUMNS}) for side in (cpu, gpu)]
            tables = [patch_box_table(geometry) for geometry in geometries]
            equal += bool(np.array_equal(*tables))
            compared += 1
    figures["boxes_equal"], figures["boxes_compared"] = equal, compared
    fed_ok, boxes_ok = ratio >= DECODE_FED_TARGET, equal == compared
    status = "PASS" if boxes_ok and (fed_ok or setup.smoke) else "MISS"
    return status, (f"bytes in -> firings out {fed:,.0f} images/s = {ratio:.2f} of the encoder alone ({alone:,.0f}) "
                    f"(target >= {DECODE_FED_TARGET}: {verdict(fed_ok, setup.smoke)}); boxes equal to the CPU decode's "
                    f"for {equal}/{compared} photos x geometries ({verdict(boxes_ok)}); pixels differ by <= "
                    f"{figures['pixels_max_abs_diff']} (mean {figures['pixels_mean_abs_diff']}), firings' Jaccard "
                    f"{figures['firings_jaccard_gpu_vs_cpu_decode']:.4f} (not judged); batch {bs}")


# --------------------------------------------------------------------------- 3. SAE training

def planted_patches(n: int, d: int, device: torch.device, atoms_per_patch: int = 8) -> torch.Tensor:
    """[n, d] patches, each a positive mix of a few of 4·d random unit atoms, plus an offset and a
    little noise: data on which an SAE's loss falls within a few hundred steps."""
    g = torch.Generator(device).manual_seed(0)
    atoms = torch.randn(4 * d, d, generator=g, device=device)
    atoms /= atoms.norm(dim=1, keepdim=True)
    which = torch.randint(4 * d, (n, atoms_per_patch), generator=g, device=device)
    weights = torch.rand(n, atoms_per_patch, generator=g, device=device) * 2 + 1
    mixed = torch.nn.functional.embedding_bag(which, atoms, per_sample_weights=weights, mode="sum")
    return mixed + torch.randn(d, generator=g, device=device) + 0.01 * torch.randn(n, d, generator=g, device=device)


def part_train_sae(setup: Setup, figures: dict) -> tuple[str, str]:
    d, m, batch, steps = setup.shapes.sae
    loop = TrainLoop(batch_size=batch, steps=steps, log_every=max(1, steps // 6), warmup_steps=steps // 10,
                     dtype="bfloat16")
    run = SAETraining(SAETrainSpec(expansion=m // d), loop, d, setup.device)
    pool = planted_patches(4 * batch, d, setup.device).split(batch)
    run.initialise(torch.cat(pool)[:loop.init_patches])
    setup.reset_peak()
    per_s = setup.steps_per_s(lambda: run.train_step(pool[run.step % len(pool)]), steps, warmup=5)
    first, last = run.history[0], run.history[-1]
    figures |= {"d": d, "m": m, "batch": batch, "steps": steps, "dtype": "bfloat16 autocast",
                "steps_per_s": round(per_s, 2), "patches_per_s": round(per_s * batch),
                "ms_per_step": round(1e3 / per_s, 2),
                "minutes_per_100m_patches": round(100e6 / (per_s * batch) / 60, 1), "peak_gib": setup.peak_gib(),
                "loss_first": first["loss"], "loss_last": last["loss"],
                "nmse_first": first["nmse"], "nmse_last": last["nmse"],
                "logged_steps": [r["step"] for r in run.history]}
    lower = last["loss"] < first["loss"]
    return "PASS" if lower else "MISS", (
        f"{per_s:,.1f} steps/s = {per_s * batch:,.0f} patches/s (d={d}, m={m:,}, batch {batch:,}, bf16; the paper's "
        f"100M patches in {figures['minutes_per_100m_patches']} min), peak {in_gib(figures['peak_gib'])}; loss "
        f"{first['loss']:.4g} at step {first['step']} -> {last['loss']:.4g} at step {last['step']} "
        f"(lower: {verdict(lower)})")


# --------------------------------------------------------------------------- 4. CLIP fine-tune

def clip_config(image: int, patch: int, width: int, layers: int, text_width: int, text_layers: int, embed: int) -> dict:
    """An open_clip model config (``open_clip_config.json``) of a ViT CLIP with 64-wide heads (32 if
    narrower); vocab_size 49,408 is open_clip's own BPE vocabulary, shipped in its wheel."""
    heads = 64 if width >= 128 else 32
    return {"model_cfg": {"embed_dim": embed,
                          "vision_cfg": {"image_size": image, "layers": layers, "width": width, "head_width": heads,
                                         "patch_size": patch},
                          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": text_width,
                                       "heads": max(2, text_width // 64), "layers": text_layers}}}


def part_clip(setup: Setup, figures: dict) -> tuple[str, str]:
    try:
        import open_clip  # the downstream extra: optional, and not in the lent GPU's image
    except ImportError as exc:
        return "SKIP", f"open_clip is not importable here ({exc}); carry its wheels (device_check.py's docstring)"
    s, device = setup.shapes, setup.device
    folder = setup.scratch / "clip"
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(clip_config(*s.clip)))
    logging.disable(logging.WARNING)  # open_clip says "no pretrained weights loaded", which is meant
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{folder}", device=device, output_dict=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    finally:
        logging.disable(logging.NOTSET)
    image, patch = s.clip[:2]
    cfg = PreprocessConfig(decode="gpu", image_size=image)
    decoded, rejected = DeviceDecoder(cfg, patch, device)(setup.decoded(cfg, patch_px=patch))
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (open_clip.OPENAI_DATASET_MEAN,
                                                                             open_clip.OPENAI_DATASET_STD))
    images = (decoded["pixels"].permute(0, 3, 1, 2).float() / 255 - mean) / std
    captions = [f"a photo of {species}, specimen {i}" for i, species in enumerate(decoded["species"])]
    texts = tokenizer(captions).to(device)
    loss_fn = open_clip.ClipLoss()
    # open_clip_train's optimiser for ViTs (AdamW, betas 0.9/0.98, eps 1e-6, wd 0.2); bf16 autocast as its
    # --precision amp_bf16
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    setup.reset_peak()
    per_s = setup.steps_per_s(step, s.clip_steps, warmup=1)
    n = len(images)
    figures |= {"model": f"ViT {image} px / patch {patch}, width {s.clip[2]} x {s.clip[3]} layers; text width "
                         f"{s.clip[4]} x {s.clip[5]} layers; embedding {s.clip[6]}; random weights",
                "batch": n, "rejected": len(rejected), "steps": s.clip_steps, "steps_per_s": round(per_s, 2),
                "images_per_s": round(per_s * n, 1), "peak_gib": setup.peak_gib(),
                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
    lower = math.isfinite(losses[-1]) and losses[-1] < losses[0]
    return "PASS" if lower else "MISS", (
        f"{per_s:,.1f} steps/s = {per_s * n:,.0f} images/s (batch {n} decoded by DeviceDecoder, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}), peak {in_gib(figures['peak_gib'])}; "
        f"ClipLoss {losses[0]:.3f} -> {losses[-1]:.3f} over {s.clip_steps} steps (lower: {verdict(lower)})")


# --------------------------------------------------------------------------- the run

def run_part(name: str, setup: Setup, limit_s: float) -> dict:
    header(f"{name}: {PARTS[name]}")
    figures, start = {}, time.perf_counter()
    try:
        with time_limit(limit_s):
            status, line = globals()[f"part_{name}"](setup, figures)
    except (Exception, PartTimeout) as exc:  # one part's failure must not hide the others
        traceback.print_exc(limit=-4, file=sys.stdout)
        status, line = "ERROR", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    setup.free()
    seconds = round(time.perf_counter() - start, 1)
    record(f"CHECK {name}: {status}  {line}  [{seconds} s]")
    return {"status": status, "line": line, "seconds": seconds, "figures": figures}


def machine() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name(0) if cuda else "none (CPU)", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def summary(parts: dict, about: dict, smoke: bool) -> tuple[str, dict]:
    """The summary line, and every target with its value and whether it was met (None: not run, or a
    speed on a CPU smoke run)."""
    def figure(part: str, key: str):
        return parts.get(part, {}).get("figures", {}).get(key)

    targets = {  # name: (value, target, a speed?)
        "encode_bf16_images_per_s": (figure("encode", "bf16_images_per_s"), ENCODE_TARGET, True),
        "encode_fp32_jaccard_vs_cpu": (figure("encode", "fp32_jaccard_vs_cpu_fp32"), JACCARD_TARGET, False),
        "decode_fed_ratio": (figure("decode", "decode_fed_ratio"), DECODE_FED_TARGET, True),
        # the encoder's target end to end, from JPEG bytes: shown here (decode's status is its ratio)
        "decode_bytes_to_firings_images_per_s": (figure("decode", "bytes_to_firings_images_per_s"), ENCODE_TARGET,
                                                 True),
    }
    judged = {name: {"value": value, "target": target,
                     "met": None if value is None or (speed and smoke) else value >= target}
              for name, (value, target, speed) in targets.items()}

    def stands(t: dict) -> str:
        if t["value"] is None:
            return "not run"
        return f"{t['value']:g} " + ("not judged" if t["met"] is None else "PASS" if t["met"] else "MISS")

    line = (f"{about['card']}; torch {about['torch']}, CUDA {about['cuda']}, transformers {about['transformers']}, "
            f"python {about['python']}; parts: " + ", ".join(f"{k} {v['status']}" for k, v in parts.items())
            + "; targets: " + ", ".join(f"{name} >= {t['target']:g}: {stands(t)}" for name, t in judged.items())
            + ("; a CPU smoke run: speeds not judged" if smoke else ""))
    return line, judged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-cpu", action="store_true", help="every part on the CPU with tiny shapes (the test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--part-limit-s", type=float, help="each part's time limit (default 100 s; 40 s smoke)")
    parser.add_argument("--seconds", type=float, help="timed seconds per measurement (default 2; 0.2 smoke)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(names) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(set(names) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if MISSING is not None:
        print(f"CHECK setup: ERROR {MISSING.name or MISSING} is not installed here; carry its wheel "
              f"(device_check.py's docstring): {MISSING}")
        return 2
    if not args.smoke_cpu and not torch.cuda.is_available():
        print(f"CHECK device: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run it on a GPU machine, or with --smoke-cpu for the code paths on the CPU")
        return 2
    offline_env(ROOT)
    shapes = SMOKE if args.smoke_cpu else FULL
    shapes = replace(shapes, seconds=args.seconds or shapes.seconds,
                     part_limit_s=args.part_limit_s or shapes.part_limit_s)
    if args.smoke_cpu:
        torch.set_num_threads(1)  # code paths, not speed: stay light beside other work
    machine_info()
    about, parts, started = machine(), {}, time.perf_counter()

    def report() -> tuple[str, int]:
        line, targets = summary(parts, about, args.smoke_cpu)
        errors = sum(p["status"] == "ERROR" for p in parts.values())
        if args.json:
            args.json.write_text(json.dumps({
                "mode": "smoke-cpu" if args.smoke_cpu else "gpu", "machine": about, "shapes": asdict(shapes),
                "parts": parts, "targets": targets, "summary": line, "errors": errors,
                "finished": len(parts) == len(set(names)), "wall_s": round(time.perf_counter() - started, 1)},
                indent=1, default=str))
        return line, errors

    with tempfile.TemporaryDirectory(prefix="device_check_") as scratch:
        setup = Setup(args.smoke_cpu, shapes, torch.device("cpu" if args.smoke_cpu else "cuda"), Path(scratch))
        for name in (p for p in PARTS if p in names):
            parts[name] = run_part(name, setup, shapes.part_limit_s)
            report()  # as it goes: a run stopped at its limit keeps what it measured
    print_summary()
    line, errors = report()
    print(f"CHECK summary: {line}; {errors} errored; {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
