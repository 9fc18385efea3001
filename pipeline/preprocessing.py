"""Decode, convert to RGB and resize specimen photos for the backbone (Ray Data tasks, CPU).

Every image keeps its :class:`Geometry` — the affine map between original pixels and the model
input — so any patch maps back to exact original pixels whatever the geometry:

    input = original · scale + offset          (per axis, in pixel-edge coordinates)

PIL's resize uses the same pixel-centre convention, so the map is exact, not approximate."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile

from pipeline.config import PreprocessConfig
from pipeline.storage import StorageUnavailable
from pipeline.contract import GEOMETRY_SCHEMA, INDEX_SCHEMA
from pipeline.errors import ImageRejected, Rejected, error_detail

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


def decode_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Bytes → RGB image, or :class:`ImageRejected` with the reason."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    if len(data) > cfg.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > preprocess.max_bytes={cfg.max_bytes}")
    try:  # reads the header only; only the accepted formats' plugins look at the bytes
        img = Image.open(io.BytesIO(data), formats=cfg.formats)
    except Exception:  # UnidentifiedImageError and friends; their message names a BytesIO's address
        accepted = "/".join(cfg.formats) if cfg.formats else "image"
        raise ImageRejected("not_an_image", f"{len(data)} bytes in no {accepted} format Pillow reads "
                                            f"(they start {bytes(data[:16])!r})") from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} = {w * h} > preprocess.max_pixels={cfg.max_pixels}")
    if min(w, h) < PATCH_PX:
        raise ImageRejected("too_small", f"{w}x{h} is smaller than one {PATCH_PX}-px patch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, ...
        reason = "truncated" if "truncated" in str(exc).lower() else "decode_failed"
        raise ImageRejected(reason, f"{img.format} of {w}x{h} (its header says) in {len(data)} bytes: "
                                    f"{error_detail(exc)}") from None
    return to_rgb(img)


def prepare_pixels(img: Image.Image, cfg: PreprocessConfig, patch_px: int = PATCH_PX) -> tuple[np.ndarray, Geometry]:
    """RGB image → uint8 [S, S, 3] model input and its geometry (bicubic, like DINOv2's processor)."""
    geom, size = plan_geometry(cfg.geometry, img.width, img.height, cfg, patch_px)
    resized = img.resize(size, Image.BICUBIC)
    s = cfg.image_size
    if cfg.geometry == "squash":
        canvas = resized
    else:
        canvas = Image.new("RGB", (s, s), (cfg.pad_value,) * 3)
        canvas.paste(resized, (int(geom.offset_x), int(geom.offset_y)))  # negative = crop
    return np.asarray(canvas, dtype=np.uint8), geom


INDEX_PASSTHROUGH = tuple(INDEX_SCHEMA.names)


def decode_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, reader,
                 patch_px: int = PATCH_PX) -> tuple[dict[str, np.ndarray], list[Rejected]]:
    """Index rows → model-ready pixels + geometry columns; bad images become :class:`Rejected`.

    ``reader`` is a :class:`pipeline.sources.ImageReader` (anything with ``read(path, file, row)``)."""
    out = {k: [] for k in INDEX_PASSTHROUGH + GEOMETRY_COLUMNS + ("pixels",)}
    rejected: list[Rejected] = []
    n = len(batch["image_id"])
    for i in range(n):
        row = {k: _item(batch[k][i]) for k in INDEX_PASSTHROUGH}
        try:
            try:
                data = reader.read(row["path"], row["source_file"], row["source_row"])
            except FileNotFoundError as exc:
                raise ImageRejected("missing_file", str(exc)) from None
            pixels, geom = prepare_pixels(decode_image(data, cfg), cfg, patch_px)
        except ImageRejected as exc:
            rejected.append(Rejected(stage="decode", reason=exc.reason, detail=exc.detail, image_id=row["image_id"]))
            continue
        except StorageUnavailable:  # the store, not this image: stop (a rerun resumes), never reject it
            raise
        except Exception as exc:  # anything else about this one image must not kill the batch
            rejected.append(Rejected(stage="decode", reason="decode_failed",
                                     detail=error_detail(exc), image_id=row["image_id"]))
            continue
        for k, v in {**row, **asdict(geom), "pixels": pixels}.items():
            out[k].append(v)
    s = cfg.image_size
    cols = {k: np.array(v, dtype=object) for k, v in out.items() if k not in GEOMETRY_COLUMNS + ("pixels",)}
    for k, dtype in GEOMETRY_TYPES.items():
        cols[k] = np.array(out[k], dtype=dtype)
    cols["pixels"] = np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, s, s, 3), np.uint8)
    return cols, rejected


def _item(value):
    """numpy scalar / None → plain Python value."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

