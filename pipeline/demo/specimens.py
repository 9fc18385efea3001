"""Synthetic insect specimen photos in the BIOSCAN-5M layout, with planted parts and their boxes.

Every genus has one body plan (shape and colour), so congeners look alike; every species adds one
planted part that its congeners lack, painted in a saturated colour that occurs nowhere else. A
trait finder then has exactly one thing to discover per species, and `ground_truth.csv` says where
it is in each image (box in original pixels, x1/y1 exclusive).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BIOSCAN_COLUMNS: tuple[str, ...] = (
    "processid", "sampleid", "taxon", "phylum", "class", "order", "family", "subfamily", "genus",
    "species", "dna_bin", "dna_barcode", "country", "province_state", "coord-lat", "coord-lon",
    "image_measurement_value", "area_fraction", "scale_factor", "inferred_ranks", "split",
    "index_bioscan_1M_insect", "chunk",
)
METADATA_RELPATH = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"
GROUND_TRUTH_FILENAME = "ground_truth.csv"
GROUND_TRUTH_COLUMNS = ("processid", "species", "genus", "part", "x0", "y0", "x1", "y1")

RGB = tuple[int, int, int]

# Saturated hues at least ~45 degrees apart; body, wing and background colours are all dull, so a
# pixel near one of these colours belongs to that part.
PART_COLOURS: dict[str, RGB] = {
    "red_head": (225, 25, 30),
    "orange_thorax_spot": (255, 135, 0),
    "banded_abdomen": (255, 225, 0),
    "green_abdomen_tip": (20, 200, 50),
    "cyan_thorax": (0, 215, 230),
    "wing_spot": (20, 60, 255),
    "violet_abdomen_spot": (150, 40, 255),
    "magenta_wing_tip": (235, 0, 200),
}

_SUPERSAMPLE = 2  # draw at 2x and box-reduce: anti-aliased edges without per-shape smoothing


# ----------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Ellipse:
    """An ellipse in the specimen's frame (x towards the head, units ~ pixels at scale 1)."""
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0  # radians, direction of the rx axis

    def at(self, u: float, v: float) -> tuple[float, float]:
        """The point at (u, v) in the ellipse's own axes."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    def points(self, u_min: float = -math.inf, u_max: float = math.inf, n: int = 96) -> np.ndarray:
        """Outline [n', 2]; with limits, the closed slice u_min <= u <= u_max along the rx axis."""
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        u, v = self.rx * np.cos(t), self.ry * np.sin(t)
        # Outline points are in angular order, so a slice is still a simple polygon
        # (two arcs joined by chords).
        keep = (u >= u_min) & (u <= u_max)
        x, y = self.at(u[keep], v[keep])
        return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class BodyPlan:
    """A genus's look: congeners share it, so only the planted part tells them apart."""
    colour: RGB
    head_r: float
    thorax: tuple[float, float]   # (rx, ry)
    abdomen: tuple[float, float]
    waist: float                  # petiole length between thorax and abdomen (wasp waist)
    wing: tuple[float, float]     # (half-length, half-width)
    wing_angle: float             # degrees between each wing and the body axis, pointing back
    leg_len: float
    antenna_len: float


@dataclass(frozen=True)
class Body:
    """One specimen's drawn shapes in its own frame; `wings[0]` is the side that carries wing parts."""
    head: Ellipse
    eyes: tuple[Ellipse, Ellipse]
    thorax: Ellipse
    abdomen: Ellipse
    wings: tuple[Ellipse, Ellipse]
    legs: tuple[np.ndarray, ...]      # polylines [k, 2]
    antennae: tuple[np.ndarray, ...]
    petiole: np.ndarray | None

    def outline_points(self) -> np.ndarray:
        """Every drawn outline point [n, 2], to fit the pose to the frame."""
        ellipses = (self.head, self.thorax, self.abdomen, *self.wings)
        lines = [*self.legs, *self.antennae] + ([self.petiole] if self.petiole is not None else [])
        return np.concatenate([e.points() for e in ellipses] + lines)


def _polyline(start: tuple[float, float], steps: list[tuple[float, float]], side: int) -> np.ndarray:
    """Joint chain from `start`; each step is (length, angle from +x in degrees) mirrored by side."""
    pts = [np.asarray(start, float)]
    for length, deg in steps:
        a = math.radians(deg)
        pts.append(pts[-1] + length * np.array([math.cos(a), side * math.sin(a)]))
    return np.stack(pts)


def _layout(plan: BodyPlan, rng: np.random.Generator) -> Body:
    """Place the segments along the x axis (head at +x) and splay legs with a little jitter."""
    trx, try_ = plan.thorax
    arx, ary = plan.abdomen
    hr = plan.head_r
    thorax = Ellipse(0.0, 0.0, trx, try_)
    head = Ellipse(trx + 0.6 * hr, 0.0, hr, 0.92 * hr)
    abd_x = -(0.85 * trx + plan.waist + arx)
    abdomen = Ellipse(abd_x, 0.0, arx, ary)
    sides = (1, -1)
    eyes = tuple(Ellipse(head.cx + 0.3 * hr, s * 0.55 * hr, 0.45 * hr, 0.32 * hr, s * 0.5) for s in sides)
    wings = []
    for s in sides:
        a = math.pi - s * math.radians(plan.wing_angle + rng.uniform(-5, 5))
        ax, ay = -0.15 * trx, s * 0.45 * try_
        d = 0.9 * plan.wing[0]
        wings.append(Ellipse(ax + d * math.cos(a), ay + d * math.sin(a), *plan.wing, a))
    legs = []
    for s in sides:
        # Fore legs reach forward, hind legs back; tibiae bend further the same way.
        for k, (femur, tibia) in enumerate(((55, 25), (95, 100), (130, 160))):
            j = rng.uniform(-10, 10, size=2)
            start = ((0.45 - 0.45 * k) * trx, s * 0.7 * try_)
            L = plan.leg_len
            legs.append(_polyline(start, [(0.45 * L, femur + j[0]), (0.45 * L, tibia + j[1]),
                                          (0.12 * L, tibia + j[1] + 20 * (k - 1))], s))
    antennae = tuple(
        _polyline((head.cx + 0.75 * hr, s * 0.3 * hr),
                  [(0.5 * plan.antenna_len, 25 + rng.uniform(-8, 8)),
                   (0.5 * plan.antenna_len, 50 + rng.uniform(-8, 8))], s) for s in sides)
    petiole = (np.array([[-0.8 * trx, 0.0], [abd_x + 0.8 * arx, 0.0]]) if plan.waist > 0 else None)
    return Body(head, eyes, thorax, abdomen, tuple(wings), tuple(legs), antennae, petiole)


# Each painter returns the polygons of one planted part, built from the body's own shapes so the
# part follows the genus's proportions and the specimen's pose.
def _wing_spot(b: Body) -> list[np.ndarray]:
    w = b.wings[0]
    return [Ellipse(*w.at(0.05 * w.rx, 0.0), 0.45 * w.rx, 0.85 * w.ry, w.angle).points()]


def _bands(b: Body) -> list[np.ndarray]:
    a = b.abdomen
    return [a.points(u * a.rx, (u + 0.32) * a.rx) for u in (-0.9, -0.3, 0.3)]


_PART_PAINTERS = {
    "red_head": lambda b: [b.head.points()],
    "orange_thorax_spot": lambda b: [Ellipse(-0.1 * b.thorax.rx, 0.0, 0.8 * b.thorax.rx,
                                             0.8 * b.thorax.ry).points()],
    "banded_abdomen": _bands,
    "green_abdomen_tip": lambda b: [b.abdomen.points(u_max=-0.1 * b.abdomen.rx)],
    "cyan_thorax": lambda b: [b.thorax.points()],
    "wing_spot": _wing_spot,
    "violet_abdomen_spot": lambda b: [Ellipse(b.abdomen.cx + 0.2 * b.abdomen.rx, 0.0,
                                              0.8 * b.abdomen.ry, 0.8 * b.abdomen.ry).points()],
    "magenta_wing_tip": lambda b: [b.wings[0].points(u_min=0.05 * b.wings[0].rx)],
}
assert _PART_PAINTERS.keys() == PART_COLOURS.keys()
# A part of the hard planted data (pipeline.demo.hard), kept out of PART_COLOURS so the easy demo's
# random draws over it stay as they were: a clear window in the thorax through which the plate shows,
# a pale part on a pale background.
WINDOW_PARTS = ("pale_thorax_window",)
_PART_PAINTERS["pale_thorax_window"] = _PART_PAINTERS["orange_thorax_spot"]


@dataclass(frozen=True)
class Plate:
    """The background a specimen is photographed on: a tint and a texture (none: the demo's plain plate)."""
    tint: RGB = (236, 232, 220)
    texture: str | None = None
    """speckle (dark grains), weave (a fine mesh) or mottle (soft blotches)."""


PLATE = Plate()


def _plate_texture(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """float [h, w]: grey levels added to the plate."""
    w, h = size
    if kind == "speckle":
        grains = Image.new("L", size)
        d = ImageDraw.Draw(grains)
        for x, y in rng.uniform(0, 1, (int(0.01 * w * h), 2)) * (w, h):
            r = rng.uniform(1.0, 2.5)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
        return -100.0 * np.asarray(grains, float) / 255
    if kind == "weave":
        y, x = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 7, 2)
        return -35.0 * (((x + phase[0]) % 6 < 1.5) | ((y + phase[1]) % 6 < 1.5))
    if kind == "mottle":
        noise = Image.fromarray(rng.uniform(0, 255, (h, w)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4))
        blotch = np.asarray(noise, float) - 127.5
        return 40.0 * blotch / max(np.abs(blotch).max(), 1.0)
    raise ValueError(f"unknown plate texture {kind!r}")


@dataclass(frozen=True)
class Pose:
    """Specimen frame -> canvas pixels: optional mirror, rotation, scale, translation."""
    angle: float
    scale: float
    flip: bool
    offset: tuple[float, float] = (0.0, 0.0)

    def __call__(self, pts: np.ndarray) -> list[float]:
        x, y = pts[:, 0], (-pts[:, 1] if self.flip else pts[:, 1])
        c, s = math.cos(self.angle), math.sin(self.angle)
        out = np.stack([self.offset[0] + self.scale * (x * c - y * s),
                        self.offset[1] + self.scale * (x * s + y * c)], axis=1)
        return out.ravel().tolist()


def _fit_pose(body: Body, size: tuple[int, int], rng: np.random.Generator, free: bool = False) -> Pose:
    """Random pose whose whole drawing (plus stroke width) stays inside the frame. ``free``: any
    rotation, smaller and anywhere in the frame (off-centre), not lying along the crop's long side."""
    w, h = size
    portrait = h > w
    if free:
        pose = Pose(rng.uniform(0, 2 * math.pi), 1.0, bool(rng.integers(2)))
    else:
        # Landscape crops hold a specimen lying along x, portrait ones a specimen standing along y.
        base = rng.choice([math.pi / 2, -math.pi / 2] if portrait else [0.0, math.pi])
        pose = Pose(base + math.radians(rng.uniform(-25, 25)), 1.0, bool(rng.integers(2)))
    pts = np.asarray(pose(body.outline_points())).reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    margin = 8.0  # px kept free around the specimen, more than any stroke's half-width
    fit = min((w - 2 * margin) / (hi[0] - lo[0]), (h - 2 * margin) / (hi[1] - lo[1]))
    scale = fit * (rng.uniform(0.7, 0.95) if free else rng.uniform(0.8, 1.1) / 1.1)  # 1.1: just fills the frame
    slack = (np.array(size) - 2 * margin - scale * (hi - lo)) / 2
    shift = rng.uniform(-1, 1, 2) * (slack if free else np.minimum(slack, 0.06 * np.array(size)))
    centre = np.array(size) / 2 + shift - scale * (lo + hi) / 2
    return Pose(pose.angle, scale, pose.flip, (float(centre[0]), float(centre[1])))


# ----------------------------------------------------------------------------- rendering

def _shade(colour: np.ndarray, factor: float, alpha: int = 255) -> tuple[int, ...]:
    return (*np.clip(colour * factor, 0, 255).astype(int).tolist(), alpha)


def _draw_body(img: Image.Image, body: Body, pose: Pose, colour: np.ndarray) -> None:
    """Opaque body first, then translucent wings composited over it."""
    s = pose.scale  # stroke widths follow the specimen's size
    d = ImageDraw.Draw(img)
    for line in body.legs:
        d.line(pose(line), fill=_shade(colour, 0.6), width=max(1, round(4 * s)), joint="curve")
    for line in body.antennae:
        d.line(pose(line), fill=_shade(colour, 0.55), width=max(1, round(2.5 * s)), joint="curve")
    if body.petiole is not None:
        d.line(pose(body.petiole), fill=_shade(colour, 0.7), width=max(1, round(9 * s)))
    outline, stroke = _shade(colour, 0.5), max(1, round(1.5 * s))
    for seg, factor in ((body.abdomen, 1.12), (body.thorax, 1.0), (body.head, 0.85)):
        d.polygon(pose(seg.points()), fill=_shade(colour, factor), outline=outline, width=stroke)
        # A dull highlight gives the segment some relief.
        sheen = Ellipse(*seg.at(0.15 * seg.rx, -0.3 * seg.ry), 0.5 * seg.rx, 0.3 * seg.ry, seg.angle)
        d.polygon(pose(sheen.points()), fill=_shade(0.6 * colour + 0.4 * 235, factor))
    a = body.abdomen
    for u in np.linspace(-0.7, 0.5, 4) * a.rx:  # tergite seams
        v = a.ry * math.sqrt(1 - (u / a.rx) ** 2)
        d.line(pose(np.array([a.at(u, -v), a.at(u, v)])), fill=outline, width=stroke)
    for eye in body.eyes:
        d.polygon(pose(eye.points()), fill=(35, 28, 25, 255))
    wings = Image.new("RGBA", img.size)
    dw = ImageDraw.Draw(wings)
    for w in body.wings:
        dw.polygon(pose(w.points()), fill=(228, 230, 234, 105), outline=(80, 80, 85, 190), width=stroke)
        for v in (-0.35, 0.1, 0.45):  # veins fan out from the wing base
            dw.line(pose(np.array([w.at(-0.95 * w.rx, 0), w.at(0.7 * w.rx, v * w.ry)])),
                    fill=(90, 90, 95, 150), width=stroke)
    img.alpha_composite(wings)


def _draw_artefact(img: Image.Image, kind: str, body: Body, pose: Pose, rng: np.random.Generator) -> None:
    """A mounting artefact on the photo: a pin through the thorax (its head and shadow) or a
    collection label beside the specimen (a card with lines of print), in canvas pixels."""
    if kind == "pin":
        layer = Image.new("RGBA", img.size)
        d = ImageDraw.Draw(layer)
        x, y = np.asarray(pose(np.array([[body.thorax.cx + 0.1 * body.thorax.rx, 0.0]]))).reshape(2)
        r = 0.35 * body.thorax.ry * pose.scale
        d.ellipse([x - 0.5 * r, y - 0.4 * r, x + 1.5 * r, y + 1.6 * r], fill=(20, 18, 16, 110))  # its shadow
        d.ellipse([x - r, y - r, x + r, y + r], fill=(188, 190, 196, 255), outline=(60, 60, 64, 255),
                  width=max(1, round(0.15 * r)))
        d.ellipse([x - 0.45 * r, y - 0.55 * r, x - 0.05 * r, y - 0.15 * r], fill=(250, 250, 252, 255))
        img.alpha_composite(layer)
        return
    if kind != "label":
        raise ValueError(f"unknown artefact {kind!r}")
    d = ImageDraw.Draw(img)
    W, H = img.size
    lw, lh = 0.3 * W, 0.16 * H
    # In the corner farthest from the specimen, so the label never covers it.
    centre = np.asarray(pose(body.outline_points())).reshape(-1, 2).mean(0)
    x0 = 0.03 * W if centre[0] > W / 2 else W - 0.03 * W - lw
    y0 = 0.04 * H if centre[1] > H / 2 else H - 0.04 * H - lh
    d.rectangle([x0, y0, x0 + lw, y0 + lh], fill=(250, 250, 246, 255), outline=(150, 150, 145, 255))
    for k in range(3):
        ly = y0 + (0.25 + 0.25 * k) * lh
        length = lw * rng.uniform(0.5, 0.85)
        d.line([x0 + 0.08 * lw, ly, x0 + 0.08 * lw + length, ly], fill=(30, 30, 30, 255), width=max(1, round(0.07 * lh)))


def render_specimen(plan: BodyPlan, part: str | None, size: tuple[int, int], rng: np.random.Generator, *,
                    plate: RGB = PLATE, artefact: str | None = None, free_pose: bool = False,
                    ) -> tuple[Image.Image, tuple[int, int, int, int] | None, float]:
    """One photo of `size` = (w, h): (RGB image, part box (x0, y0, x1, y1) or None, area fraction).
    ``plate``: the background; ``artefact``: a pin or label drawn too (:func:`_draw_artefact`);
    ``free_pose``: any rotation, off-centre (:func:`_fit_pose`)."""
    w, h = size
    body = _layout(plan, rng)
    fit = _fit_pose(body, size, rng, free_pose)
    pose = Pose(fit.angle, fit.scale * _SUPERSAMPLE, fit.flip,
                (fit.offset[0] * _SUPERSAMPLE, fit.offset[1] * _SUPERSAMPLE))
    # Colour jitter: overall brightness plus a small per-channel cast.
    colour = np.asarray(plan.colour, float) * rng.uniform(0.85, 1.15) + rng.normal(0, 6, 3)
    big = (w * _SUPERSAMPLE, h * _SUPERSAMPLE)
    insect = Image.new("RGBA", big)
    _draw_body(insect, body, pose, colour)
    box = None
    if part is not None:
        # Painted last and opaque so nothing dims it; the same polygons on a mask give the box.
        mask = Image.new("L", big)
        fill = (0, 0, 0, 0) if part in WINDOW_PARTS else (*PART_COLOURS[part], 255)
        for poly in _PART_PAINTERS[part](body):
            ImageDraw.Draw(insect).polygon(pose(poly), fill=fill)
            ImageDraw.Draw(mask).polygon(pose(poly), fill=255)
        box = mask.reduce(_SUPERSAMPLE).getbbox()
    if artefact is not None:
        _draw_artefact(insect, artefact, body, pose, rng)
    insect = insect.reduce(_SUPERSAMPLE)
    alpha = insect.getchannel("A")
    # Plain light plate with a soft drop shadow and mild sensor noise, like BIOSCAN crops.
    shadow = Image.new("L", size)
    shadow.paste(alpha.filter(ImageFilter.GaussianBlur(5)), (3, 4))  # paste: shifts without wrapping
    bg = np.asarray(plate.tint, float) * rng.uniform(0.95, 1.03) + rng.normal(0, 2, 3)
    rgb = np.broadcast_to(bg, (h, w, 3)) * (1 - 0.25 * np.asarray(shadow, float)[..., None] / 255)
    if plate.texture is not None:
        rgb = rgb + _plate_texture(plate.texture, size, rng)[..., None]
    a = np.asarray(alpha, float)[..., None] / 255
    rgb = rgb * (1 - a) + np.asarray(insect.convert("RGB"), float) * a
    rgb += rng.normal(0, 3, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))
    return image, box, float((a > 0.5).mean())


# ----------------------------------------------------------------------------- taxonomy

@dataclass(frozen=True)
class Genus:
    order: str
    family: str
    subfamily: str
    name: str
    plan: BodyPlan
    parts: dict[str, str]  # species epithet -> planted part
    artefact: str | None = None  # a pin or label on every photo of the genus (pipeline.demo.hard)
    plates: dict[str, Plate] = field(default_factory=dict)  # species epithet -> its plate (else PLATE)
    visible: dict[str, float] = field(default_factory=dict)  # species epithet -> share of photos showing its part (else 1)


GENERA: tuple[Genus, ...] = (
    Genus("Diptera", "Synthomyiidae", "Synthomyiinae", "Synthomyia",
          BodyPlan((72, 66, 60), 32, (40, 36), (56, 40), 0, (66, 30), 24, 62, 34),
          {"caerulea": "wing_spot", "rubriceps": "red_head", "flavocincta": "banded_abdomen"}),
    Genus("Diptera", "Synthomyiidae", "Fictodrosinae", "Fictodrosa",
          BodyPlan((150, 118, 84), 30, (38, 34), (60, 34), 0, (70, 22), 18, 58, 40),
          {"aurantinota": "orange_thorax_spot", "viridicauda": "green_abdomen_tip"}),
    Genus("Hymenoptera", "Pseudapidae", "Pseudapinae", "Mimapis",
          BodyPlan((48, 44, 42), 30, (40, 38), (58, 44), 8, (62, 22), 30, 60, 38),
          {"cyanothorax": "cyan_thorax", "roseipennis": "magenta_wing_tip"}),
    Genus("Hymenoptera", "Pseudapidae", "Solitariinae", "Solitaria",
          BodyPlan((112, 108, 92), 28, (36, 30), (64, 34), 20, (64, 20), 20, 62, 44),
          {"unica": "violet_abdomen_spot"}),
)

# (country, province_state, lat, lon): BIOSCAN's main collecting regions.
_SITES = (
    ("Canada", "Ontario", 43.53, -80.22), ("Costa Rica", "Guanacaste", 10.84, -85.61),
    ("South Africa", "Western Cape", -33.92, 18.86), ("Pakistan", "Punjab", 31.52, 74.36),
    ("Thailand", "Chiang Mai", 18.79, 98.98),
)


def image_relpath(split: str, chunk: str, processid: str) -> str:
    """bioscan5m/images/cropped_256/<split>/[<chunk>/]<processid>.jpg; chunk folder only when chunk != ''."""
    folder = f"bioscan5m/images/cropped_256/{split}" + (f"/{chunk}" if chunk else "")
    return f"{folder}/{processid}.jpg"


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Like `cropped_256`: short side 256, mostly landscape 300-400 wide, ~1 in 6 portrait."""
    if rng.random() < 1 / 6:
        return 256, int(rng.integers(300, 381))
    return int(rng.integers(300, 401)), 256


def _splits(n: int) -> list[str]:
    """Per species: mostly train, one eighth each val and test (at least one each from 3 images)."""
    held = max(1, n // 8) if n >= 3 else 0
    return ["val"] * held + ["test"] * held + ["train"] * (n - 2 * held)


def _mutate(seq: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Substitute bases at `rate`, so barcodes cluster by species as real COI barcodes do."""
    hit = rng.random(seq.size) < rate
    out = seq.copy()
    out[hit] = rng.integers(0, 4, hit.sum())
    return out


def _dna_bin(rng: np.random.Generator) -> str:
    """A BOLD Barcode Index Number such as "BOLD:ACK1234"."""
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), 2))
    return f"BOLD:A{letters}{rng.integers(1000, 10000)}"


def _metadata_row(i: int, genus: Genus, epithet: str, split: str, barcode: np.ndarray,
                  dna_bin: str, area_fraction: float, rng: np.random.Generator) -> dict[str, object]:
    """One metadata record; missing taxa stay empty, taxon is the lowest rank that is known."""
    species = f"{genus.name} {epithet}" if epithet else ""
    ranks = {"order": genus.order, "family": genus.family,
             "subfamily": genus.subfamily if species else "", "genus": genus.name if species else "",
             "species": species}
    country, province, lat, lon = _SITES[rng.integers(len(_SITES))]
    scale_factor = rng.uniform(0.12, 0.35)  # original photo -> 256-px crop
    return {
        "processid": f"SYNT{i:07d}",
        "sampleid": f"SYNTH{10000 + i // 96:05d}-{'ABCDEFGH'[i % 96 // 12]}{i % 12 + 1:02d}",  # plate-well
        "taxon": next(v for v in reversed(ranks.values()) if v),
        "phylum": "Arthropoda", "class": "Insecta", **ranks,
        "dna_bin": dna_bin,
        "dna_barcode": "".join("ACGT"[b] for b in barcode),
        "country": country, "province_state": province,
        "coord-lat": round(lat + rng.normal(0, 0.05), 4), "coord-lon": round(lon + rng.normal(0, 0.05), 4),
        "image_measurement_value": round(area_fraction * 256 * 340 / scale_factor ** 2, 1),
        "area_fraction": round(area_fraction, 4),
        "scale_factor": round(scale_factor, 4),
        "inferred_ranks": 0,  # no rank was inferred: every given rank is an identification
        "split": split,
        "index_bioscan_1M_insect": int(rng.integers(1, 1_128_313)) if rng.random() < 0.5 else "",
        "chunk": str(rng.integers(1, 3)) if split in ("train", "pretrain") else "",
    }


def generate_demo_dataset(root, *, images_per_species: int = 16, n_unlabelled: int = 8,
                          seed: int = 0, genera: tuple[Genus, ...] = GENERA, free_pose: bool = False) -> dict:
    """Write the dataset under `root` (a local folder, created) and return a summary:
    {"root": str, "n_images": int, "species": {name: {"genus", "family", "part", "n_images"}},
     "lone_species": [names], "n_unlabelled": int, "metadata": path, "ground_truth": path}.
    The same seed gives identical CSVs and image bytes. ``genera`` and ``free_pose``: what the hard
    planted data changes (:mod:`pipeline.demo.hard`)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    genus_barcode = {g.name: rng.integers(0, 4, 658) for g in genera}  # 658 bp, the COI barcode length
    # (genus, epithet, part, split); unlabelled records reuse a body plan, carry a random part or none.
    jobs: list[tuple[Genus, str, str | None, str]] = []
    summary_species = {}
    for g in genera:
        for epithet, part in g.parts.items():
            # A species' part shows on an evenly spread share of its photos (all of them by default).
            v = g.visible.get(epithet, 1.0)
            jobs += [(g, epithet, part if math.floor((k + 1) * v) > math.floor(k * v) else None, split)
                     for k, split in enumerate(_splits(images_per_species))]
            summary_species[f"{g.name} {epithet}"] = {
                "genus": g.name, "family": g.family, "part": part, "n_images": images_per_species}
    parts = [None, *PART_COLOURS]
    for _ in range(n_unlabelled):
        jobs.append((genera[rng.integers(len(genera))], "", parts[rng.integers(len(parts))], "pretrain"))

    species_barcode, species_bin = {}, {}
    rows, truth = [], []
    for i, (genus, epithet, part, split) in enumerate(jobs, start=1):
        # One generator per image keeps each image independent of how many came before it.
        img_rng = np.random.default_rng([seed, i])
        image, box, area = render_specimen(genus.plan, part, _image_size(img_rng), img_rng, plate=genus.plates.get(epithet, PLATE),
                                           artefact=genus.artefact, free_pose=free_pose)
        key = (genus.name, epithet)
        if key not in species_barcode:
            species_barcode[key] = _mutate(genus_barcode[genus.name], 0.06, rng)
            species_bin[key] = _dna_bin(rng)
        row = _metadata_row(i, genus, epithet, split, _mutate(species_barcode[key], 0.005, rng),
                            species_bin[key] if epithet else "", area, rng)
        path = root / image_relpath(split, row["chunk"], row["processid"])
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=90)
        rows.append(row)
        if box is not None:
            truth.append((row["processid"], row["species"], row["genus"], part, *box))

    metadata = root / METADATA_RELPATH
    metadata.parent.mkdir(parents=True, exist_ok=True)
    with open(metadata, "w", newline="") as f:
        writer = csv.DictWriter(f, BIOSCAN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    ground_truth = root / GROUND_TRUTH_FILENAME
    with open(ground_truth, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GROUND_TRUTH_COLUMNS)
        writer.writerows(truth)
    return {
        "root": str(root),
        "n_images": len(rows),
        "species": summary_species,
        "lone_species": [f"{g.name} {e}" for g in genera if len(g.parts) == 1 for e in g.parts],
        "n_unlabelled": n_unlabelled,
        "metadata": str(metadata),
        "ground_truth": str(ground_truth),
    }
