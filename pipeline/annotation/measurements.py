"""Model-free measurements of a latent's activation region on a specimen photo.

Everything here is plain numpy on arrays in ORIGINAL image pixels:

* images are ``uint8 [H, W, 3]`` sRGB;
* masks (specimen, zone) are ``bool [H, W]``;
* a box is ``{"x0", "y0", "x1", "y1"}`` (ints, x1/y1 exclusive).

Coordinates are image coordinates: x to the right, y DOWN.

Axis conventions used by :func:`measure_region`
------------------------------------------------
* ``orientation_deg`` is the angle of the zone's major axis measured from +x
  towards +y (i.e. clockwise on screen, because y points down), in [0, 180).
* The specimen's long axis ``u`` is the major eigenvector of the covariance of
  its pixel coordinates, signed to point towards +x (right); if it is exactly
  vertical it points towards +y (down).  The normal is ``n = (-u_y, u_x)``,
  i.e. ``u`` turned 90 degrees clockwise on screen: for a horizontal specimen
  ``n`` points down, for a vertical one it points left.  Looking along ``u``,
  ``n`` points to the RIGHT-hand side.
* ``axial_pos`` / ``lateral_pos`` are the projections of (zone centroid -
  specimen centroid) on ``u`` / ``n``, divided by the specimen's half-extent
  along ``u`` / ``n`` (half of max-min projection, + half a pixel).  They are
  roughly in [-1, 1] (slightly outside is possible because the centroid is not
  the midpoint of the extent, or when the zone sticks out of the specimen).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.boxes import label_components, region_masks
from pipeline.preprocessing import Geometry

__all__ = [
    "PALETTE",
    "regions_and_measurements",
    "segment_specimen",
    "nearest_colour_name",
    "measure_region",
    "describe_measurements",
]

# Fixed named sRGB colours.  Chosen to be mutually >= ~17 CIELAB dE76 apart so
# that small perturbations never change the name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "light grey": (192, 192, 192),
    "white": (255, 255, 255),
    "dark brown": (70, 45, 25),
    "brown": (140, 85, 40),
    "tan": (210, 180, 140),
    "yellow": (240, 220, 40),
    "orange": (240, 140, 20),
    "red": (200, 30, 30),
    "dark red": (120, 15, 20),
    "pink": (240, 160, 190),
    "magenta": (210, 40, 170),
    "purple": (110, 50, 150),
    "dark blue": (25, 35, 110),
    "blue": (40, 80, 210),
    "light blue": (140, 190, 235),
    "teal": (0, 128, 128),
    "green": (40, 150, 50),
    "dark green": (25, 75, 35),
    "olive": (128, 128, 0),
}


# --------------------------------------------------------------------------
# specimen segmentation
# --------------------------------------------------------------------------

def _otsu_threshold(hist: np.ndarray) -> int:
    """Otsu threshold on a 256-bin histogram: foreground is ``bin > t``."""
    p = hist.astype(np.float64)
    total = p.sum()
    if total <= 0:
        return 255
    p /= total
    bins = np.arange(p.size, dtype=np.float64)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * bins)
    mu_t = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - mu) ** 2 / (w0 * w1)
    between = np.nan_to_num(between, nan=0.0, posinf=0.0, neginf=0.0)
    between[w1 <= 1e-12] = 0.0
    if between.max() <= 0:
        return 255
    return int(np.argmax(between))


def _foreground_score(rgb: np.ndarray) -> np.ndarray:
    """max(HSV saturation, 1 - HSV value), quantised to 0..255 (uint8)."""
    x = np.asarray(rgb)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
    mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
    sat = (mx - mn) * 255.0 / np.maximum(mx, 1.0)
    score = np.maximum(sat, 255.0 - mx)
    return (score + 0.5).astype(np.uint8)


def segment_specimen(rgb: np.ndarray, *, fill_holes: bool = True) -> np.ndarray:
    """Specimen vs. plain light background, as ``bool [H, W]``.

    Otsu threshold (256-bin histogram) on ``max(saturation, 1 - value)``;
    keeps the largest 8-connected foreground component and (by default) fills
    its holes (background pockets not 4-connected to the image border, e.g. a
    pale wing spot).  Never empty: if thresholding finds nothing, the whole
    image is returned.  ~3-5 ms on a 400x256 image.
    """
    x = np.asarray(rgb)
    if x.ndim != 3 or x.shape[-1] < 3:
        raise ValueError(f"rgb must be [H, W, 3], got shape {x.shape}")
    score = _foreground_score(x)
    t = _otsu_threshold(np.bincount(score.ravel(), minlength=256))
    fg = score > t
    if not fg.any():
        return np.ones(score.shape, dtype=bool)
    labels, n = label_components(fg, 8)
    if n > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    if fill_holes:
        fg = _fill_holes(fg)
    return fg


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    bg_labels, n = label_components(~mask, 4)
    if n == 0:
        return mask
    border = np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])
    outside = np.zeros(n + 1, dtype=bool)
    outside[border] = True
    outside[0] = True  # label 0 = the mask itself
    return mask | ~outside[bg_labels]


# --------------------------------------------------------------------------
# colour naming (CIELAB dE76)
# --------------------------------------------------------------------------

def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, [..., 3]) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


_PALETTE_NAMES = list(PALETTE)
_PALETTE_LAB = _srgb_to_lab(np.array([PALETTE[k] for k in _PALETTE_NAMES]))


def nearest_colour_name(rgb_mean) -> str:
    """Name of the PALETTE entry nearest to an sRGB colour (CIELAB dE76)."""
    lab = _srgb_to_lab(np.asarray(rgb_mean, dtype=np.float64).reshape(3))
    d = np.sum((_PALETTE_LAB - lab) ** 2, axis=1)
    return _PALETTE_NAMES[int(np.argmin(d))]


# --------------------------------------------------------------------------
# region measurements
# --------------------------------------------------------------------------

def _moments(mask: np.ndarray):
    """(centroid [x, y], covariance 2x2) of a mask's pixels; pixels are unit squares
    (+1/12 on the variances, so a w x h rectangle has variances w^2/12, h^2/12)."""
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    c = pts.mean(axis=0)
    d = pts - c
    cov = d.T @ d / len(pts) + np.eye(2) / 12.0
    return c, cov


def _principal_axis(cov: np.ndarray):
    """(theta [rad, in (-pi/2, pi/2]], major eigenvalue, minor eigenvalue)."""
    sxx, syy, sxy = cov[0, 0], cov[1, 1], cov[0, 1]
    theta = 0.5 * math.atan2(2 * sxy, sxx - syy)
    half_tr = 0.5 * (sxx + syy)
    r = math.hypot(0.5 * (sxx - syy), sxy)
    return theta, half_tr + r, max(half_tr - r, 0.0)


def specimen_frame(specimen_mask: np.ndarray):
    """Centroid, unit long axis u, normal n, half-extents along u and n."""
    c, cov = _moments(specimen_mask)
    theta, _, _ = _principal_axis(cov)
    u = np.array([math.cos(theta), math.sin(theta)])
    if abs(u[0]) < 1e-9:              # vertical: point towards +y
        u = np.array([0.0, 1.0])
    elif u[0] < 0:                    # (cannot happen with atan2/2, kept for safety)
        u = -u
    n = np.array([-u[1], u[0]])
    ys, xs = np.nonzero(specimen_mask)
    d = np.stack([xs, ys], axis=1) - c
    pu, pn = d @ u, d @ n
    half_u = 0.5 * (pu.max() - pu.min()) + 0.5
    half_n = 0.5 * (pn.max() - pn.min()) + 0.5
    return c, u, n, half_u, half_n


def measure_region(rgb: np.ndarray, specimen_mask: np.ndarray, zone_mask: np.ndarray,
                   box: dict) -> dict:
    """Measurements of ONE region (``zone_mask`` = one connected component of the
    zone, in original pixels).  See the module docstring for axis conventions.

    Keys: area_px, area_frac_specimen, box_w_px, box_h_px, elongation,
    orientation_deg, axial_pos, lateral_pos, colour_r, colour_g, colour_b,
    colour_name.  An empty zone gives zeros, elongation 1.0 and black.
    """
    img = np.asarray(rgb)[..., :3]
    spec = np.asarray(specimen_mask, dtype=bool)
    zone = np.asarray(zone_mask, dtype=bool)
    if not (img.shape[:2] == spec.shape == zone.shape):
        raise ValueError(f"shape mismatch: rgb {img.shape}, specimen {spec.shape}, zone {zone.shape}")
    if not spec.any():
        spec = np.ones_like(spec)

    area = int(zone.sum())
    inter = zone & spec
    out = {
        "area_px": area,
        "area_frac_specimen": float(inter.sum()) / float(spec.sum()),
        "box_w_px": int(box["x1"]) - int(box["x0"]),
        "box_h_px": int(box["y1"]) - int(box["y0"]),
        "elongation": 1.0,
        "orientation_deg": 0.0,
        "axial_pos": 0.0,
        "lateral_pos": 0.0,
    }
    if area > 0:
        zc, zcov = _moments(zone)
        theta, lmax, lmin = _principal_axis(zcov)
        out["elongation"] = float(math.sqrt(lmax / lmin)) if lmin > 0 else 1.0
        out["orientation_deg"] = float(math.degrees(theta) % 180.0)
        sc, u, n, half_u, half_n = specimen_frame(spec)
        d = zc - sc
        out["axial_pos"] = float(d @ u / half_u)
        out["lateral_pos"] = float(d @ n / half_n)
        pix = img[inter] if inter.any() else img[zone]
        mean = np.rint(pix.reshape(-1, 3).astype(np.float64).mean(axis=0)).astype(int)
    else:
        mean = np.zeros(3, dtype=int)
    out["colour_r"], out["colour_g"], out["colour_b"] = (int(v) for v in mean)
    out["colour_name"] = nearest_colour_name(mean)
    return out


def regions_and_measurements(rgb: np.ndarray, patches, geom: Geometry) -> tuple[list[tuple[dict, np.ndarray]], list[dict]]:
    """The zone of ``patches`` as connected regions — (box in original pixels, mask) — and each
    region's measurements."""
    regions = region_masks(patches, geom)
    specimen = segment_specimen(rgb)
    return regions, [measure_region(rgb, specimen, mask, box) for box, mask in regions]


# --------------------------------------------------------------------------
# templated description (no language model)
# --------------------------------------------------------------------------

def _position_words(axial: float, lateral: float, front: str) -> str:
    if front == "negative":
        axial, lateral = -axial, -lateral
    ax = "front" if axial > 1 / 3 else "rear" if axial < -1 / 3 else "middle"
    # looking along the long axis towards the front, +lateral is the right-hand side
    lat = "right" if lateral > 0.25 else "left" if lateral < -0.25 else ""
    return f"{ax}-{lat}" if lat else ax


def _shape_word(elongation: float) -> str:
    if elongation < 1.5:
        return "compact"
    if elongation < 3.0:
        return "elongated"
    return "strongly elongated"


def describe_measurements(part_label: str | None, measurements: list[dict], *,
                          front: str = "positive") -> str:
    """Short templated English description of a latent's regions, e.g.
    ``'Region 1: compact blue zone in the front-left of the specimen, 3.1% of its
    area (42×40 px).'``

    Position words come from axial_pos (front > 1/3, rear < -1/3, else middle)
    and lateral_pos (|lateral| > 0.25 gives left/right, as seen looking along the
    long axis towards the front).  ``front="positive"`` (default) calls the +axial
    end (right end of a horizontal specimen, lower end of a vertical one) the
    front; ``front="negative"`` the other end.  These words are therefore only
    anatomically meaningful if the caller knows where the head is.
    """
    if front not in ("positive", "negative"):
        raise ValueError("front must be 'positive' or 'negative'")
    parts = []
    if part_label:
        parts.append(f"Part: {part_label}.")
    if not measurements:
        parts.append("No region found.")
    for i, m in enumerate(measurements, start=1):
        pos = _position_words(float(m["axial_pos"]), float(m["lateral_pos"]), front)
        parts.append(
            f"Region {i}: {_shape_word(float(m['elongation']))} {m['colour_name']} zone "
            f"in the {pos} of the specimen, {100.0 * float(m['area_frac_specimen']):.1f}% "
            f"of its area ({int(m['box_w_px'])}×{int(m['box_h_px'])} px)."
        )
    return " ".join(parts)
