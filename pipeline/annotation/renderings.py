"""Images shown to the multimodal LLM, returned as encoded bytes (PNG, or JPEG when asked).

Inputs follow the package conventions: ``uint8 [H, W, 3]`` sRGB in ORIGINAL
pixels, zone masks ``bool [H, W]`` in the same pixels, boxes
``{"x0", "y0", "x1", "y1"}`` with exclusive x1/y1.  Pure functions, no I/O;
:class:`Rendering` picks among them as the annotate section says, and
:class:`UnitImages` (the one reader here) reads a unit's images from the source and renders them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.annotation.measurements import regions_and_measurements
from pipeline.config import AnnotateConfig, PreprocessConfig, SourceConfig
from pipeline.preprocessing import Geometry, OriginalImages

__all__ = ["png_bytes", "encode_image", "zone_outline", "render_overlay", "render_crop", "crop_box", "union_box",
           "Rendering", "UnitImages"]
MAX_IMAGES = 3  # images per prompt the Serve config lets vLLM take (limit_mm_per_prompt)


def png_bytes(rgb: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encode a ``uint8 [H, W, 3]`` (or ``[H, W]`` grey) array as PNG bytes
    (``compress_level`` 0-9 as in Pillow; default 1: encoding dominates the annotate stage's
    time, and level 1 is ~3x faster than Pillow's 6 for ~1.3x the bytes)."""
    x = np.asarray(rgb)
    if x.ndim == 3 and x.shape[-1] == 4:
        x = x[..., :3]
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(x)).save(buf, format="PNG", compress_level=int(compress_level))
    return buf.getvalue()


def encode_image(rgb: np.ndarray, fmt: str = "png", *, jpeg_quality: int = 95) -> bytes:
    """PNG (lossless) or JPEG bytes. JPEG at quality 95 encodes ~20x faster than PNG level 1 for
    an upscaled overlay and is ~6x smaller; PNG encoding otherwise bounds the annotate stage."""
    if fmt == "png":
        return png_bytes(rgb)
    if fmt != "jpeg":
        raise ValueError(f"image format must be png or jpeg, got {fmt!r}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)).save(
        buf, format="JPEG", quality=int(jpeg_quality))
    return buf.getvalue()


def _shift_reduce(mask: np.ndarray, r: int, op, pad: bool) -> np.ndarray:
    """Square (2r+1)x(2r+1) dilation (op=np.logical_or) or erosion
    (op=np.logical_and); ``pad`` is the value assumed outside the image."""
    if r <= 0:
        return mask.copy()
    H, W = mask.shape
    p = np.pad(mask, r, constant_values=pad)
    rows = p[:, 0:W].copy()
    for k in range(1, 2 * r + 1):
        op(rows, p[:, k:k + W], out=rows)
    out = rows[0:H].copy()
    for k in range(1, 2 * r + 1):
        op(out, rows[k:k + H], out=out)
    return out


def zone_outline(zone_mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Outline pixels (bool) of the union polygon(s) of a zone mask.

    Morphological gradient with a square element: dilation by ``width // 2``
    minus erosion by ``width - width // 2``, so the band is ``width`` px wide,
    straddling the mask boundary (for width 3: 1 px outside, 2 px inside).
    Holes get an outline too; a zone touching the image edge is closed along
    the edge (outside the image counts as background).
    """
    m = np.asarray(zone_mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"zone_mask must be 2-D, got shape {m.shape}")
    w = max(int(width), 1)
    r_out, r_in = w // 2, w - w // 2
    dil = _shift_reduce(m, r_out, np.logical_or, False)
    ero = _shift_reduce(m, r_in, np.logical_and, False)
    return dil & ~ero


def render_overlay(rgb: np.ndarray, zone_mask: np.ndarray, *, colour=(255, 0, 0),
                   width: int = 3, upscale: int = 2, fmt: str = "png") -> bytes:
    """Outline (``colour``, ``width`` px) of the zone drawn on the image, then the
    image upscaled ``upscale``x with bicubic interpolation; ``fmt`` bytes of size
    ``(H*upscale, W*upscale)``."""
    img = np.array(np.asarray(rgb)[..., :3], dtype=np.uint8, copy=True)
    zone = np.asarray(zone_mask, dtype=bool)
    if img.shape[:2] != zone.shape:
        raise ValueError(f"shape mismatch: rgb {img.shape}, zone {zone.shape}")
    img[zone_outline(zone, width)] = np.asarray(colour, dtype=np.uint8)
    s = max(int(upscale), 1)
    if s > 1:
        H, W = img.shape[:2]
        img = np.asarray(Image.fromarray(img).resize((W * s, H * s), Image.BICUBIC))
    return encode_image(img, fmt)


def _grow(lo: int, hi: int, need: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) symmetrically to length ``need`` inside [0, limit), shifting
    away from an edge when blocked; never beyond the image."""
    need = min(need, limit)
    extra = need - (hi - lo)
    if extra <= 0:
        return lo, hi
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = max(lo - (hi - limit), 0), limit
    return lo, hi


def crop_box(box: dict, shape, *, margin_frac: float = 0.15, min_side_px: int = 64) -> dict:
    """The crop window used by :func:`render_crop` (x1/y1 exclusive).

    Each side is enlarged by ``round(margin_frac * side)`` px on both ends and
    clipped to the image; then a side shorter than ``min_side_px`` is grown
    (centred, shifted away from the image edge if needed) to
    ``min(min_side_px, image side)``.
    """
    H, W = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (int(box[k]) for k in ("x0", "y0", "x1", "y1"))
    x0, x1 = max(min(x0, x1), 0), min(max(x0, x1), W)
    y0, y1 = max(min(y0, y1), 0), min(max(y0, y1), H)
    mx = int(np.floor(margin_frac * (x1 - x0) + 0.5))
    my = int(np.floor(margin_frac * (y1 - y0) + 0.5))
    x0, x1 = max(x0 - mx, 0), min(x1 + mx, W)
    y0, y1 = max(y0 - my, 0), min(y1 + my, H)
    x0, x1 = _grow(x0, x1, int(min_side_px), W)
    y0, y1 = _grow(y0, y1, int(min_side_px), H)
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1}


def union_box(boxes: list[dict]) -> dict:
    """The smallest box holding all of ``boxes``."""
    return {"x0": min(b["x0"] for b in boxes), "y0": min(b["y0"] for b in boxes),
            "x1": max(b["x1"] for b in boxes), "y1": max(b["y1"] for b in boxes)}


def render_crop(rgb: np.ndarray, box: dict, *, margin_frac: float = 0.15,
                min_side_px: int = 64, fmt: str = "png") -> bytes:
    """``fmt`` bytes of the region's box plus a margin (see :func:`crop_box`)."""
    img = np.asarray(rgb)[..., :3]
    c = crop_box(box, img.shape, margin_frac=margin_frac, min_side_px=min_side_px)
    if c["x1"] <= c["x0"] or c["y1"] <= c["y0"]:
        raise ValueError(f"empty crop for box {box} on image {img.shape[:2]}")
    return encode_image(img[c["y0"]:c["y1"], c["x0"]:c["x1"]], fmt)


@dataclass(frozen=True)
class Rendering:
    """How a unit's regions are shown to the model (``annotate.render``, ``mllm_only``, ``crop_margin``,
    ``image_format``)."""
    kind: str = "overlay"
    mllm_only: bool = False
    crop_margin: float = 0.15
    image_format: str = "jpeg"

    @classmethod
    def of(cls, cfg: AnnotateConfig) -> Rendering:
        return cls(cfg.render, cfg.mllm_only, cfg.crop_margin, cfg.image_format)

    @property
    def prompt_render(self) -> str:
        """The rendering a prompt is worded for: the MLLM-only baseline has prompts of its own."""
        return "mllm_only" if self.mllm_only else self.kind

    def images(self, rgb: np.ndarray, regions: list[tuple[dict, np.ndarray]], max_crops: int = MAX_IMAGES) -> list[bytes]:
        """Encoded images for one image: the whole image (MLLM-only baseline), the zone outlined and
        upscaled (overlay), or a crop per region, largest first (crop, at most ``max_crops``)."""
        fmt = self.image_format
        if self.mllm_only:
            return [encode_image(rgb, fmt)]
        if self.kind == "overlay":
            return [render_overlay(rgb, np.logical_or.reduce([m for _, m in regions]), fmt=fmt)]
        by_area = sorted(regions, key=lambda r: -int(r[1].sum()))[:max_crops]
        return [render_crop(rgb, box, margin_frac=self.crop_margin, fmt=fmt) for box, _ in by_area]


def described_patches(row: dict) -> list[int]:
    """The patches of a candidate's zone that are outlined and described: its grounded regions
    (candidates/ grounded_patches; the whole zone for a row without them)."""
    grounded = row.get("grounded_patches")
    return row["patches"] if grounded is None else grounded


class UnitImages:
    """A unit's images (a unit: a dict with ``members``, its candidates/ rows): each member's image
    read from the source and checked against the size it had when encoded, its Geometry made once,
    its zone's regions measured and rendered as the annotate section says. The annotate stage holds
    one, and so does an export that makes the renderings again: the same code, the same bytes. Its
    image reader caches (a shard, a row group): one per thread."""

    def __init__(self, cfg: AnnotateConfig, source: SourceConfig, preprocess: PreprocessConfig):
        self.rendering = Rendering.of(cfg)
        self.originals = OriginalImages(source, preprocess)
        self.reader = self.originals.reader

    def load(self, row: dict, geom: Geometry | None = None) -> np.ndarray:
        """A member's image as ``uint8 [H, W, 3]`` (:meth:`OriginalImages.load`)."""
        return self.originals.load(row, geom)

    def prepare(self, unit: dict) -> tuple[list[bytes], list[list[dict]], list[list[dict]]]:
        """(rendered images, boxes per member, measurements per member). A consensus unit sends one
        rendering per member (the largest crop with render crop); a single image may send up to 3 crops."""
        images, boxes, measurements = [], [], []
        single = len(unit["members"]) == 1
        for row in unit["members"]:
            geom = Geometry.from_row(row)
            rgb = self.load(row, geom)
            regions, measured = regions_and_measurements(rgb, described_patches(row), geom)
            images += self.rendering.images(rgb, regions, max_crops=3 if single else 1)
            boxes.append([box for box, _ in regions])
            measurements.append(measured)
        return images, boxes, measurements

    def crops(self, unit: dict, boxes: list[list[dict]]) -> list[bytes]:
        """Per member, its image cropped around its boxes (``boxes[k]``, the annotation's; when empty,
        the member's candidates/ boxes) with the crop margin, no outline."""
        r = self.rendering
        return [render_crop(self.load(m), union_box(b or m["boxes"]), margin_frac=r.crop_margin, fmt=r.image_format)
                for m, b in zip(unit["members"], boxes)]
