"""Evidence for a trait before anyone pays to describe it: does a (species, latent) pair's zone sit on
the specimen, in the same place, in one piece, in most of the species' photos, and nowhere else?

    frame = SpecimenFrame.of(rgb, geom)                        # once per candidate image
    zone = zone_evidence(frame, patches, values, min_on_specimen)   # per candidate (image, latent)
    pair = pair_evidence(zones, support, specificity(f_species, f_elsewhere), f_species, f_genus)
    unit_confidence(pair, member_zones)                        # per annotation, in [0, 1]

Everything is measured on the patch grid. The specimen mask is the measurements' segmentation
(:func:`pipeline.annotation.measurements.segment_specimen`) of the image reduced to a few pixels
per patch, read once per image as each patch square's share of specimen pixels, so a zone costs
only its own patches. Positions are in the
specimen's own frame (its long axis and the normal to it, as the measurements compute them) and
taken as absolute values: the frame has no head end and a specimen may be mirrored, so only the
distance from the centre along and across the body is comparable between photos.

A zone's *regions* are its 8-connected components on the grid; a patch square is *grounded* when at
least ``min_on_specimen`` of its pixels lie on the specimen. A zone's grounded squares are what is
outlined for the model and described (``grounded_patches``): a zone that is half plate, half body is
described on the body only, and a zone with none is background and is never sent. The formulas of the pair's score and of the confidence are in :func:`pair_evidence`
and :func:`unit_confidence` (docs/quality.md explains how to read them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.annotation.measurements import segment_specimen, specimen_frame
from pipeline.boxes import patch_box_table, region_boxes, region_labels
from pipeline.preprocessing import Geometry

CONFIDENCE_BANDS = (("low", 0.0), ("medium", 0.5), ("high", 0.65))
"""Where each band of confidence starts (docs/quality.md: on the hard planted data, 85 % of the boxes
of annotations from 0.65 up lie on the planted part, and every species keeps one). The report
colours by them, a review draws and scores by them."""
TRUSTED = CONFIDENCE_BANDS[-1][1]
"""The default confidence: from here a trait is trusted (the report's green, the bench's threshold)."""
WEIGHTS = {"consistency": 2, "partness": 2}
"""The factors counted twice (the others once), in the score and the confidence: those that say the zone
is a part — one place, one size on the body, not the whole specimen — where the failures of a
ranking by frequency are (whole-body and scattered zones; docs/quality.md)."""
MASK_PX_PER_PATCH = 4
"""The specimen mask's resolution for the evidence: about this many pixels along a patch square's side."""
PLACEMENT_SCALE = 0.25
"""A spread of |axial| + |lateral| (in half-lengths of the specimen) that costs a factor e in consistency."""
SIZE_SCALE = 1.0
"""A spread of ln(the zone's share of the specimen) that costs a factor e in consistency."""


@dataclass(frozen=True)
class SpecimenFrame:
    """One image's specimen on the patch grid: each patch square's pixel area and specimen share,
    and the specimen's frame (centroid, long axis u, normal n, half-extents) in original pixels."""
    area_px: np.ndarray
    """float [patches]: pixels of the original image each patch square covers (0 in letterbox padding)."""
    on_specimen: np.ndarray
    """float [patches]: the share of those pixels on the specimen."""
    centre_px: np.ndarray
    """float [patches, 2]: each square's centre (x, y) in original pixels."""
    box_px: np.ndarray
    """int [patches, 4]: each square's box (x0, y0, x1, y1) in original pixels."""
    specimen_px: int
    centroid: np.ndarray
    u: np.ndarray
    n: np.ndarray
    half_u: float
    half_n: float

    @classmethod
    def of(cls, rgb: np.ndarray, geom: Geometry, scale: float = 1.0) -> SpecimenFrame:
        """The specimen of ``rgb`` on ``geom``'s patch grid; ``rgb`` is the photo, or a reduction of
        it whose pixels span ``scale`` original pixels (:meth:`OriginalImages.load_reduced`). The mask
        is made at about :data:`MASK_PX_PER_PATCH` pixels per patch side (box-reduced further by a
        whole factor): a share per square needs no more, and it costs a fraction of the photo's."""
        f = max(1, min(rgb.shape[:2]) // (MASK_PX_PER_PATCH * geom.grid_side))
        mask = segment_specimen(np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).reduce(f)) if f > 1 else rgb)
        s = scale * f  # original pixels per mask pixel
        # A summed-area table gives every square's specimen pixels in O(1) (its box in mask pixels).
        table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
        table[1:, 1:] = mask.cumsum(0).cumsum(1)
        boxes = patch_box_table(geom)
        x0, y0, x1, y1 = boxes.T
        sx0, sx1 = (np.rint(x / s).astype(np.int64).clip(0, mask.shape[1]) for x in (x0, x1))
        sy0, sy1 = (np.rint(y / s).astype(np.int64).clip(0, mask.shape[0]) for y in (y0, y1))
        inside = table[sy1, sx1] - table[sy0, sx1] - table[sy1, sx0] + table[sy0, sx0]
        small_area = (sx1 - sx0) * (sy1 - sy0)
        area = ((x1 - x0).clip(0) * (y1 - y0).clip(0)).astype(float)
        centroid, u, n, half_u, half_n = specimen_frame(mask)
        # mask pixel i spans original pixels [i·s, (i+1)·s): its centre is i·s + (s - 1) / 2
        return cls(area, np.divide(inside, small_area, out=np.zeros(len(area)), where=small_area > 0),
                   np.stack([(x0 + x1) / 2, (y0 + y1) / 2], 1), boxes, round(int(mask.sum()) * s * s),
                   centroid * s + (s - 1) / 2, u, n, half_u * s, half_n * s)

    @property
    def side(self) -> int:
        """Patches per side of the grid."""
        return math.isqrt(len(self.area_px))

    def position(self, patches: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
        """|axial|, |lateral| of the weighted centre of ``patches`` (see the module docstring)."""
        d = (self.centre_px[patches] * weight[:, None]).sum(0) / weight.sum() - self.centroid
        return abs(float(d @ self.u) / self.half_u), abs(float(d @ self.n) / self.half_n)


def zone_evidence(frame: SpecimenFrame, patches, values, min_on_specimen: float) -> dict:
    """One candidate zone (:data:`pipeline.contract.ZONE_EVIDENCE_TYPE`, plus ``grounded_patches``,
    its grounded squares, and ``boxes``, those of its grounded regions — of all its regions when it
    has none):

    - on_specimen: the share of its pixels on the specimen; regions: how many; largest_share: the
      share of its activation in its largest region;
    - grounded: whether any of its squares has at least ``min_on_specimen`` of its pixels on the
      specimen (those squares are what is described: ``grounded_patches``); grounded_share: the share of
      its activation on them; grounded_regions: the regions they form; grounded_largest_share: the
      share of their activation in the largest of those;
    - axial, lateral: |position| of its grounded squares' specimen pixels in the specimen's frame;
      specimen_share: those pixels over the specimen's (None, None, 0 when it is not grounded)."""
    patches = np.asarray(patches, np.int64)
    values = np.asarray(values, float)
    area, on = frame.area_px[patches], frame.on_specimen[patches]
    labels = region_labels(patches, frame.side)
    activation = np.bincount(labels, weights=values)
    total = activation.sum()
    kept = on >= min_on_specimen  # the described part of the zone: its squares on the specimen, regions of their own
    grounded_labels = labels[kept] if kept.all() else region_labels(patches[kept], frame.side)
    grounded_activation = np.bincount(grounded_labels, weights=values[kept]) if kept.any() else np.zeros(0)
    zone_area = area.sum()

    def share(part: float, of: float) -> float:
        return float(part / of) if of > 0 else 0.0
    out = {"on_specimen": share((area * on).sum(), zone_area), "regions": len(activation),
           "largest_share": share(activation.max(initial=0.0), total), "grounded": bool(kept.any()),
           "grounded_share": share(grounded_activation.sum(), total), "grounded_regions": len(grounded_activation),
           "grounded_largest_share": share(grounded_activation.max(initial=0.0), grounded_activation.sum()),
           "axial": None, "lateral": None, "specimen_share": 0.0, "grounded_patches": np.sort(patches[kept]).tolist(),
           # what is outlined: the grounded regions' boxes, or a background zone's own regions (where it was)
           "boxes": region_boxes(grounded_labels, frame.box_px[patches[kept]]) if kept.any() else
           region_boxes(labels, frame.box_px[patches])}
    if kept.any():
        on_px = area[kept] * on[kept]
        out["axial"], out["lateral"] = frame.position(patches[kept], on_px + 1e-9)
        out["specimen_share"] = float(on_px.sum() / max(frame.specimen_px, 1))
    return out


def specificity(f_species: float, f_elsewhere: float) -> float:
    """f_s / (f_s + f_elsewhere), f_elsewhere being the latent's frequency over every other genus
    (selected/): 1 when it fires in no other genus, ½ when as often there as in the species."""
    return f_species / (f_species + f_elsewhere) if f_species > 0 else 0.0


def _factors(pair: dict, zones: list[dict]) -> dict[str, float]:
    """The evidence's factors, each in [0, 1], over ``zones`` (grounded ones): see :func:`pair_evidence`."""
    def mean(key: str, f=float) -> float:
        return float(np.mean([f(z[key]) for z in zones])) if zones else 0.0
    return {"contrast": pair["contrast"], "grounded": pair["grounded"], "consistency": pair["consistency"],
            "grounding": mean("grounded_share", math.sqrt), "compactness": mean("grounded_largest_share"),
            "partness": 1.0 - mean("specimen_share") ** 2, "support": math.sqrt(pair["support"]),
            "specificity": pair["specificity"]}


def pair_evidence(zones: list[dict], support: float, specificity: float, f_species: float, f_genus: float) -> dict:
    """A selected (species, latent) pair (:data:`pipeline.contract.PAIR_EVIDENCE_TYPE`) from the zones
    of its candidate images. Its factors, each in [0, 1]:

        contrast     1 − f_genus / f_species: 0 at f_s = f_g (the paper's bound), → 1 as the ratio grows
        grounded     the share of its candidate zones that have a grounded square
        grounding    mean over grounded zones of √(the share of their activation on grounded squares)
        consistency  exp(−(sd|axial| + sd|lateral|) / 0.25) · exp(−sd ln specimen_share / 1.0) over its
                     grounded zones: the same place, the same size in every photo (1 with under two)
        compactness  mean share of a grounded zone's activation in its largest grounded region: one piece
        partness     1 − (mean specimen_share)²: a part, not the whole body
        support      √(share of the species' images where the latent fires)
        specificity  f_s / (f_s + f_elsewhere): it fires in no other genus

        score = grounded · Π factor^weight   (weight 2 for consistency and partness, :data:`WEIGHTS`, else 1;
                                              grounded counts twice: a latent on the specimen in only
                                              some photos is there by chance more often than not)

    ``zones`` the pair's candidate zones (:func:`zone_evidence`)."""
    grounded = [z for z in zones if z["grounded"]]
    pair = {"support": support, "specificity": specificity,
            "contrast": max(0.0, 1.0 - f_genus / f_species) if f_species > 0 else 0.0,
            "grounded": len(grounded) / len(zones) if zones else 0.0,
            "on_specimen": float(np.mean([z["on_specimen"] for z in zones])) if zones else 0.0,
            "placement_spread": 0.0, "size_spread": 0.0, "consistency": 1.0,
            "regions": float(np.mean([z["regions"] for z in zones])) if zones else 0.0, "zones": len(zones)}
    if len(grounded) >= 2:
        pair["placement_spread"] = float(np.std([z["axial"] for z in grounded]) + np.std([z["lateral"] for z in grounded]))
        pair["size_spread"] = float(np.std([math.log(max(z["specimen_share"], 1e-6)) for z in grounded]))
        pair["consistency"] = math.exp(-pair["placement_spread"] / PLACEMENT_SCALE - pair["size_spread"] / SIZE_SCALE)
    factors = _factors(pair, grounded)
    pair["compactness"], pair["partness"] = factors["compactness"], factors["partness"]
    pair["score"] = pair["grounded"] * math.prod(v ** WEIGHTS.get(k, 1) for k, v in factors.items())
    return pair


def confidence_band(confidence: float | None) -> str | None:
    """The band (:data:`CONFIDENCE_BANDS`) a confidence falls in; None without one."""
    if confidence is None:
        return None
    return [name for name, start in CONFIDENCE_BANDS if confidence >= start][-1]


def unit_confidence(pair: dict, zones: list[dict]) -> float:
    """How far to trust an annotation, before it is asked for: the weighted geometric mean of the
    pair's factors (:func:`pair_evidence`, :data:`WEIGHTS`) with grounding, compactness and partness
    taken over the unit's own zones — the typical factor, in [0, 1]. 0 when a zone of the unit is not
    grounded."""
    if not zones or not all(z["grounded"] for z in zones):
        return 0.0
    factors = _factors(pair, zones)
    weights = {k: WEIGHTS.get(k, 1) for k in factors}
    return math.exp(sum(weights[k] * math.log(max(v, 1e-6)) for k, v in factors.items()) / sum(weights.values()))
