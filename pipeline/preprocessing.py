"""Decode, convert to RGB and resize specimen photos for the backbone (Ray Data tasks, CPU; or,
with ``preprocess.decode: gpu``, in the encode actors on their GPU).

Every image keeps its :class:`Geometry` — the affine map between original pixels and the model
input — so any patch maps back to exact original pixels whatever the geometry:

    input = original · scale + offset          (per axis, in pixel-edge coordinates)

PIL's resize and torch's antialiased interpolation use the same pixel-centre convention, so the
map is exact, not approximate — also for a JPEG decoded at 1/2, 1/4 or 1/8 scale, whose
resample covers the original's extent in the decoded pixels (x / scale), partial last pixel and
all (:func:`prepare_bytes`)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFile

from pipeline.config import PreprocessConfig, SourceConfig
from pipeline.storage import StorageUnavailable
from pipeline.contract import GEOMETRY_SCHEMA, INDEX_SCHEMA, image_format
from pipeline.errors import ImageRejected, Rejected, error_detail
from pipeline.sources import ImageReader

# We check the pixel count ourselves from the header (max_pixels), before decoding; PIL's own
# bomb check would raise inside open() with a less useful message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, not a grey band

PATCH_PX = 14  # DINOv2's; a build passes its backbone's own (pipeline.encoding.backbone_patch_px)
GEOMETRY_TYPES = {f.name: f.type.to_pandas_dtype().__name__ for f in GEOMETRY_SCHEMA}  # numpy dtype names
GEOMETRY_COLUMNS = tuple(GEOMETRY_SCHEMA.names)


@dataclass(frozen=True)
class Geometry:
    """input = original · scale + offset, per axis; ``input_size`` is the square model input side,
    tiled by ``patch_px`` squares (the backbone's patch size)."""
    orig_w: int
    orig_h: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    input_size: int
    patch_px: int = PATCH_PX

    @property
    def grid_side(self) -> int:
        """Patches per side of the model input."""
        return self.input_size // self.patch_px

    def to_original_px(self, x_in: float, y_in: float) -> tuple[int, int]:
        """The first original pixel whose centre lies at or after input coordinate (x_in, y_in),
        clipped to the image: half-open input intervals map to half-open pixel ranges."""
        x = math.ceil((x_in - self.offset_x) / self.scale_x - 0.5)
        y = math.ceil((y_in - self.offset_y) / self.scale_y - 0.5)
        return min(max(x, 0), self.orig_w), min(max(y, 0), self.orig_h)

    def patch_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Original-pixel box (x0, y0, x1, y1; x1, y1 exclusive) of one patch square."""
        p = self.patch_px
        x0, y0 = self.to_original_px(col * p, row * p)
        x1, y1 = self.to_original_px((col + 1) * p, (row + 1) * p)
        return x0, y0, x1, y1

    @classmethod
    def from_row(cls, row: dict) -> Geometry:
        """From a table row; a row written before the patch size was recorded was DINOv2's 14 px."""
        return cls(**{k: row[k] for k in GEOMETRY_COLUMNS if row.get(k) is not None})


def plan_geometry(kind: str, w: int, h: int, cfg: PreprocessConfig,
                  patch_px: int = PATCH_PX) -> tuple[Geometry, tuple[int, int]]:
    """The geometry of an image of w×h, and the size it is first resized to."""
    s = cfg.image_size
    if kind == "squash":
        size = (s, s)
        off = (0.0, 0.0)
    elif kind == "pad":
        k = s / max(w, h)
        size = (max(1, round(w * k)), max(1, round(h * k)))
        off = ((s - size[0]) // 2, (s - size[1]) // 2)
    elif kind == "center_crop":
        # torchvision Resize(int) scales the shorter side; CenterCrop rounds the offset.
        k = cfg.resize_shorter / min(w, h)
        size = (max(s, round(w * k)), max(s, round(h * k)))
        off = (-int(round((size[0] - s) / 2.0)), -int(round((size[1] - s) / 2.0)))
    else:
        raise ValueError(f"preprocess.geometry: unknown geometry {kind!r}")
    geom = Geometry(w, h, size[0] / w, size[1] / h, float(off[0]), float(off[1]), s, patch_px)
    return geom, size


def to_rgb(img: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; transparency is flattened onto white (a specimen background)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def open_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Bytes → an image whose header is read and checked (size, format, pixel count), not yet
    decoded; :class:`ImageRejected` with the reason otherwise."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    if len(data) > cfg.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > preprocess.max_bytes={cfg.max_bytes}")
    try:  # reads the header only; only the accepted formats' plugins look at the bytes
        img = Image.open(io.BytesIO(data), formats=cfg.formats)
    except Exception:  # UnidentifiedImageError and friends; their message names a BytesIO's address
        # Bytes that start as an accepted format but do not open are a photo cut off before the end
        # of its header: the same as one cut later, not some other kind of file.
        cut = image_format(data)
        if cut is not None and (cfg.formats is None or cut.pillow in cfg.formats):
            raise ImageRejected("truncated", f"{cut.pillow} of {len(data)} bytes whose header Pillow cannot read "
                                             "(cut short)") from None
        accepted = "/".join(cfg.formats) if cfg.formats else "image"
        raise ImageRejected("not_an_image", f"{len(data)} bytes in no {accepted} format Pillow reads "
                                            f"(they start {bytes(data[:16])!r})") from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} = {w * h} > preprocess.max_pixels={cfg.max_pixels}")
    if min(w, h) < PATCH_PX:
        raise ImageRejected("too_small", f"{w}x{h} is smaller than one {PATCH_PX}-px patch")
    return img


def load_rgb(img: Image.Image, n_bytes: int, header_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image (at the scale a draft asked for, if any) → RGB, or :class:`ImageRejected`
    naming the size its header gave (``header_size``: before a draft changed it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, ...
        reason = "truncated" if "truncated" in str(exc).lower() else "decode_failed"
        w, h = header_size or img.size
        raise ImageRejected(reason, f"{img.format} of {w}x{h} (its header says) in {n_bytes} bytes: "
                                    f"{error_detail(exc)}") from None
    return to_rgb(img)


def decode_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Bytes → RGB image at full resolution (renderings and crops need the detail), or
    :class:`ImageRejected` with the reason."""
    return load_rgb(open_image(data, cfg), len(data))


class OriginalImages:
    """Encoded images at full resolution again, after encode: what the evidence, the measurements and
    the renderings read. Each read is checked against the size the image had when it was encoded."""

    def __init__(self, source: SourceConfig, preprocess: PreprocessConfig):
        self.reader = ImageReader(source)
        self.preprocess = preprocess

    def load(self, row: dict, geom: Geometry | None = None) -> np.ndarray:
        """An index-carrying row's image as ``uint8 [H, W, 3]``; ImageRejected when it is gone or
        changed since it was encoded."""
        rgb, _ = self.load_reduced(row, geom)
        return rgb

    def load_reduced(self, row: dict, geom: Geometry | None = None, min_side: int | None = None) -> tuple[np.ndarray, float]:
        """(the image as ``uint8 [h, w, 3]``, the original pixels one of its pixels spans): at full
        resolution, or with ``min_side`` decoded at the smallest DCT scale (a JPEG's 1/2, 1/4 or 1/8:
        :func:`draft_decode`) that keeps its shorter side at least that. ImageRejected as :meth:`load`."""
        try:
            data = self.reader.read(row["path"], row["source_file"], row["source_row"])
        except FileNotFoundError as exc:
            raise ImageRejected("missing_file", str(exc)) from None
        img = open_image(data, self.preprocess)
        (w, h), geom = img.size, geom or Geometry.from_row(row)
        if (w, h) != (geom.orig_w, geom.orig_h):
            raise ImageRejected("changed_on_disk", f"image is {w}x{h}, was {geom.orig_w}x{geom.orig_h} when encoded")
        if min_side is None or min(w, h) < 2 * min_side:
            return np.asarray(load_rgb(img, len(data))), 1.0
        rgb, box = draft_decode(img, (math.ceil(w * min_side / min(w, h)), math.ceil(h * min_side / min(w, h))), len(data))
        return np.asarray(rgb), w / (box[2] - box[0])


# Integer box reduction (Image.reduce) before the final bicubic resample leaves at least this
# factor for the resample: Pillow's own advice for "indistinguishable from fair resampling".
REDUCING_GAP = 2.0


def draft_decode(img: Image.Image, size: tuple[int, int], n_bytes: int) -> tuple[Image.Image, tuple[float, ...]]:
    """Decode an opened image with no more pixels than ``size`` needs: a JPEG at 1/2, 1/4 or 1/8
    scale in the DCT domain (libjpeg's scaled IDCT), the largest scale still at least ``size`` on
    both axes; other formats whole. Returns the RGB image and the box of the original in its pixels
    (original pixel edge x ↦ x / scale), so a resample over that box keeps the geometry exact
    whatever the scale, even where the width or height is not a multiple of it."""
    header_size = img.size
    box: tuple[float, ...] = (0, 0, *header_size)
    drafted = img.draft(None, size) if img.format == "JPEG" else None
    if drafted is not None:
        box = drafted[1]
    return load_rgb(img, n_bytes, header_size), box


def resample(img: Image.Image, geom: Geometry, size: tuple[int, int], cfg: PreprocessConfig,
             box: tuple[float, ...] | None = None) -> np.ndarray:
    """The region ``box`` of ``img`` (default: all of it) → uint8 [S, S, 3] model input laid out
    as ``geom`` says: bicubic (DINOv2's processor), after an integer reduction where the image
    is over :data:`REDUCING_GAP` times the size."""
    resized = img.resize(size, Image.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
    s = cfg.image_size
    if cfg.geometry == "squash":
        canvas = resized
    else:
        canvas = Image.new("RGB", (s, s), (cfg.pad_value,) * 3)
        canvas.paste(resized, (int(geom.offset_x), int(geom.offset_y)))  # negative = crop
    return np.asarray(canvas, dtype=np.uint8)


def resample_tensor(chw: torch.Tensor, box_size: tuple[float, float], geom: Geometry, size: tuple[int, int],
                    cfg: PreprocessConfig, in_float: bool | None = None) -> torch.Tensor:
    """uint8 [3, H, W] on any device, whose first ``box_size`` = (w, h) pixels (fractional: a
    draft's partial last pixel) show the whole original → uint8 [S, S, 3] model input laid out as
    ``geom`` says: bicubic with antialiasing at exactly size / box_size, the scale of ``geom``.
    On a CPU it is torch's uint8 kernel, which reproduces Pillow's to within one grey level at
    a fifth of its time; elsewhere (or ``in_float``) it runs in float and rounds."""
    in_float = chw.device.type != "cpu" if in_float is None else in_float
    x = chw[None].float() if in_float else chw[None]
    out = torch.ops.aten._upsample_bicubic2d_aa.default(x, [size[1], size[0]], False,
                                                       size[1] / box_size[1], size[0] / box_size[0])[0]
    if out.is_floating_point():
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    s = cfg.image_size
    if cfg.geometry != "squash":  # pad: the letterbox around it; center_crop: a window into it
        canvas = torch.full((3, s, s), cfg.pad_value, dtype=torch.uint8, device=out.device)
        ox, oy = int(geom.offset_x), int(geom.offset_y)
        w, h = min(size[0], s - ox, size[0] + ox, s), min(size[1], s - oy, size[1] + oy, s)
        canvas[:, max(oy, 0):max(oy, 0) + h, max(ox, 0):max(ox, 0) + w] = \
            out[:, max(-oy, 0):max(-oy, 0) + h, max(-ox, 0):max(-ox, 0) + w]
        out = canvas
    return out.permute(1, 2, 0)


def prepare_pixels(img: Image.Image, cfg: PreprocessConfig, patch_px: int = PATCH_PX) -> tuple[np.ndarray, Geometry]:
    """RGB image → uint8 [S, S, 3] model input and its geometry."""
    geom, size = plan_geometry(cfg.geometry, img.width, img.height, cfg, patch_px)
    return resample(img, geom, size, cfg), geom


def prepare_bytes(data: bytes, cfg: PreprocessConfig, patch_px: int = PATCH_PX) -> tuple[np.ndarray, Geometry]:
    """An image's bytes → uint8 [S, S, 3] model input and its :class:`Geometry` in original
    pixels, decoding no more pixels than the input needs (:func:`draft_decode`); the one path
    from bytes to the model that the decode stage, the endpoint and the benchmarks take.
    A draft-decoded JPEG is resampled by :func:`resample_tensor`, anything else by Pillow as
    before (so an image that needs no draft gives the same bytes as it always did).
    :class:`ImageRejected` with the reason for a bad image."""
    img = open_image(data, cfg)
    geom, size = plan_geometry(cfg.geometry, img.width, img.height, cfg, patch_px)
    rgb, box = draft_decode(img, size, len(data))
    if rgb.size == (geom.orig_w, geom.orig_h):
        return resample(rgb, geom, size, cfg, box), geom
    chw = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    return resample_tensor(chw, box[2:], geom, size, cfg).numpy(), geom


INDEX_PASSTHROUGH = tuple(INDEX_SCHEMA.names)
IMAGE_BYTES = "image_bytes"  # decode: gpu — the column that carries each image's bytes to the encode actors


def check_bytes(data: bytes, cfg: PreprocessConfig, patch_px: int = PATCH_PX) -> Geometry:
    """decode: gpu — what a decode task still does for an image the encode actor will decode: its
    header checked (:func:`open_image`) and its geometry planned. A JPEG without its end marker is
    decoded here as on the CPU path, so a cut file is rejected as ``truncated`` by the same code
    (nvJPEG might fill the rest in grey)."""
    img = open_image(data, cfg)
    if img.format == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        prepare_bytes(data, cfg, patch_px)  # raises for a cut file; a valid one with trailing bytes passes
    return plan_geometry(cfg.geometry, img.width, img.height, cfg, patch_px)[0]


def decode_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, reader,
                 patch_px: int = PATCH_PX) -> tuple[dict[str, np.ndarray], list[Rejected]]:
    """Index rows → geometry columns and the model input — uint8 ``pixels`` [B, S, S, 3]
    (:func:`prepare_bytes`), or with ``preprocess.decode: gpu`` the checked ``image_bytes`` that the
    encode actor decodes (:func:`check_bytes`, :class:`DeviceDecoder`); bad images become
    :class:`Rejected`.

    ``reader`` is a :class:`pipeline.sources.ImageReader` (anything with ``read(path, file, row)``)."""
    payload = IMAGE_BYTES if cfg.decode == "gpu" else "pixels"
    out = {k: [] for k in INDEX_PASSTHROUGH + GEOMETRY_COLUMNS + (payload,)}
    rejected: list[Rejected] = []
    n = len(batch["image_id"])
    for i in range(n):
        row = {k: _item(batch[k][i]) for k in INDEX_PASSTHROUGH}
        try:
            try:
                data = reader.read(row["path"], row["source_file"], row["source_row"])
            except FileNotFoundError as exc:
                raise ImageRejected("missing_file", str(exc)) from None
            if payload == IMAGE_BYTES:
                value, geom = data, check_bytes(data, cfg, patch_px)
            else:
                value, geom = prepare_bytes(data, cfg, patch_px)
        except ImageRejected as exc:
            rejected.append(Rejected(stage="decode", reason=exc.reason, detail=exc.detail, image_id=row["image_id"]))
            continue
        except StorageUnavailable:  # the store, not this image: stop (a rerun resumes), never reject it
            raise
        except Exception as exc:  # anything else about this one image must not kill the batch
            rejected.append(Rejected(stage="decode", reason="decode_failed",
                                     detail=error_detail(exc), image_id=row["image_id"]))
            continue
        for k, v in {**row, **asdict(geom), payload: value}.items():
            out[k].append(v)
    s = cfg.image_size
    cols = {k: np.array(v, dtype=object) for k, v in out.items() if k not in GEOMETRY_COLUMNS + ("pixels",)}
    for k, dtype in GEOMETRY_TYPES.items():
        cols[k] = np.array(out[k], dtype=dtype)
    if payload == "pixels":
        cols["pixels"] = np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, s, s, 3), np.uint8)
    return cols, rejected


class DeviceDecoder:
    """``preprocess.decode: gpu``, in the encode actor: a batch's ``image_bytes`` → uint8 ``pixels``
    [B, S, S, 3] on ``device``, with the geometry the decode task planned. JPEGs (YCbCr or grey)
    are decoded by nvJPEG, batched (``torchvision.io.decode_jpeg(..., device="cuda")``), and
    resampled on the GPU by :func:`resample_tensor`; other formats, and any image nvJPEG refuses,
    take :func:`prepare_bytes` on the actor's CPU. On a CPU device (no GPU) the JPEGs are decoded
    whole by Pillow instead of nvJPEG, and the rest of the path is the same."""

    def __init__(self, cfg: PreprocessConfig, patch_px: int, device: torch.device | str):
        self.cfg, self.patch_px, self.device = cfg, patch_px, torch.device(device)

    def decode_jpegs(self, images: list[bytes]) -> list[torch.Tensor | None]:
        """uint8 [3, H, W] per JPEG on the device at full size; None where the decoder refused it."""
        if self.device.type != "cuda":
            return [self.decode_whole(d) for d in images]
        from torchvision.io import ImageReadMode, decode_jpeg  # GPU only: its image ops need a CUDA torch

        data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the batch: decode them one by one
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def decode_whole(self, data: bytes) -> torch.Tensor | None:
        try:
            return torch.from_numpy(np.array(decode_image(data, self.cfg))).permute(2, 0, 1)
        except ImageRejected:  # prepare_bytes says why, on the way to errors/
            return None

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[dict, list[Rejected]]:
        """→ (the batch without ``image_bytes``, with ``pixels``, less the rows that did not decode;
        those as :class:`Rejected`)."""
        images = list(batch[IMAGE_BYTES])
        jpegs = [i for i, d in enumerate(images) if on_nvjpeg(d)]
        decoded = dict(zip(jpegs, self.decode_jpegs([images[i] for i in jpegs]) if jpegs else []))
        pixels, keep, rejected = [], [], []
        for i, data in enumerate(images):
            geom = Geometry.from_row({k: batch[k][i] for k in GEOMETRY_COLUMNS})
            try:
                if decoded.get(i) is not None:
                    _, size = plan_geometry(self.cfg.geometry, geom.orig_w, geom.orig_h, self.cfg, self.patch_px)
                    pixels.append(resample_tensor(decoded[i], (geom.orig_w, geom.orig_h), geom, size, self.cfg))
                else:
                    pixels.append(torch.from_numpy(np.array(prepare_bytes(data, self.cfg, self.patch_px)[0])).to(self.device))
            except ImageRejected as exc:
                rejected.append(Rejected(stage="decode", reason=exc.reason, detail=exc.detail,
                                         image_id=_item(batch["image_id"][i])))
                continue
            keep.append(i)
        s = self.cfg.image_size
        out = {k: v[keep] for k, v in batch.items() if k != IMAGE_BYTES}
        out["pixels"] = torch.stack(pixels) if pixels else torch.zeros((0, s, s, 3), dtype=torch.uint8)
        return out, rejected


def on_nvjpeg(data: bytes) -> bool:
    """A JPEG nvJPEG decodes to the same colours as Pillow: YCbCr or grey (not CMYK/YCCK)."""
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
    except Exception:
        return False
    return img.mode in ("RGB", "L")


def _item(value):
    """numpy scalar / None → plain Python value."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

