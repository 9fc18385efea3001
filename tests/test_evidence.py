"""The evidence of zones and pairs, and the confidence (pipeline/evidence.py), on drawn specimens whose
masks are known."""

import math

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.evidence import SpecimenFrame, pair_evidence, specificity, unit_confidence, zone_evidence
from pipeline.preprocessing import plan_geometry

SIDE = 224


def frame(specimen=(28, 84, 196, 140), side=SIDE) -> SpecimenFrame:
    """A dark horizontal specimen (x0, y0, x1, y1) on a light plate, 224 x 224 (14-px squares)."""
    rgb = np.full((side, side, 3), 235, np.uint8)
    x0, y0, x1, y1 = specimen
    rgb[y0:y1, x0:x1] = (40, 30, 25)
    return SpecimenFrame.of(rgb, plan_geometry("squash", side, side, PreprocessConfig())[0])


def p(row, col):
    return row * 16 + col


def test_each_square_knows_its_share_of_specimen_pixels():
    exact = frame((7, 42, 98, 70), side=112)  # a small photo: the mask at full resolution (7-px squares)
    assert exact.on_specimen[p(6, 5)] == 1.0 and exact.on_specimen[p(0, 0)] == 0.0
    assert exact.on_specimen[p(6, 1)] == 1.0 and exact.specimen_px == 91 * 28 and exact.area_px[0] == 49
    half = frame((21, 84, 196, 140))  # 224 px: the mask at a third (~4 px a square); starts half-way into column 1
    assert half.on_specimen[p(7, 5)] == 1.0 and half.on_specimen[p(0, 0)] == 0.0
    assert half.on_specimen[p(7, 1)] == pytest.approx(0.5, abs=0.2)
    assert half.area_px[p(0, 0)] == 196 and half.specimen_px == pytest.approx(175 * 56, rel=0.05)


def test_zone_evidence_on_and_off_the_specimen():
    f = frame()
    zone = zone_evidence(f, [p(7, 3), p(7, 4), p(0, 0)], [1.0, 1.0, 2.0], min_on_specimen=0.5)
    assert zone["regions"] == 2 and zone["on_specimen"] == pytest.approx(2 / 3)
    assert zone["largest_share"] == pytest.approx(0.5) and zone["grounded_share"] == pytest.approx(0.5)
    assert zone["grounded"] and zone["grounded_regions"] == 1 and zone["grounded_largest_share"] == 1.0
    assert zone["grounded_patches"] == [p(7, 3), p(7, 4)]
    assert zone["specimen_share"] == pytest.approx(2 * 196 / (168 * 56), rel=0.05)
    nothing = zone_evidence(f, [p(0, 0)], [1.0], min_on_specimen=0.5)
    assert not nothing["grounded"] and nothing["axial"] is None and nothing["grounded_patches"] == []


def test_position_is_taken_in_the_specimens_frame_and_without_a_head_end():
    horizontal = frame((28, 84, 196, 140))
    vertical = frame((84, 28, 140, 196))
    # the same place on the body: near one end, on the axis
    a = zone_evidence(horizontal, [p(6, 2)], [1.0], 0.5)
    b = zone_evidence(horizontal, [p(6, 13)], [1.0], 0.5)  # the other end: the frame cannot tell them apart
    c = zone_evidence(vertical, [p(2, 6)], [1.0], 0.5)  # the specimen turned a quarter
    # (within a pixel of the reduced mask, a third of the photo's)
    assert a["axial"] == pytest.approx(b["axial"], abs=0.05) and a["axial"] == pytest.approx(c["axial"], abs=0.05)
    assert a["axial"] > 0.7 and a["lateral"] == pytest.approx(c["lateral"], abs=0.05)


def zone(axial=0.5, lateral=0.1, share=0.05, grounded=True, grounded_share=1.0, largest=1.0):
    return {"grounded": grounded, "axial": axial if grounded else None, "lateral": lateral if grounded else None,
            "specimen_share": share if grounded else 0.0, "grounded_share": grounded_share if grounded else 0.0,
            "grounded_largest_share": largest if grounded else 0.0, "on_specimen": 1.0 if grounded else 0.0,
            "regions": 1, "largest_share": 1.0, "grounded_regions": int(grounded)}


def pair(zones, support=1.0, spec=0.9, f_s=0.02, f_g=0.01):
    return pair_evidence(zones, support, spec, f_s, f_g)


def test_a_consistent_compact_part_beats_every_weaker_kind_of_evidence():
    best = pair([zone()] * 6)
    assert 0 < best["score"] <= 1 and best["consistency"] == 1.0 and best["contrast"] == 0.5
    weaker = {
        "scattered placement": pair([zone(axial=a, lateral=lt) for a, lt in ((0.1, 0.6), (0.9, 0.0), (0.4, 0.9))] * 2),
        "on the plate in half the images": pair([zone(), zone(grounded=False)] * 3),
        "the whole body": pair([zone(share=0.9)] * 6),
        "in pieces": pair([zone(largest=0.3)] * 6),
        "mostly off the specimen": pair([zone(grounded_share=0.1)] * 6),
        "in few of the species' images": pair([zone()] * 6, support=0.2),
        "common in other genera": pair([zone()] * 6, spec=0.3),
        "barely contrasted": pair([zone()] * 6, f_s=0.0105),
    }
    for why, evidence in weaker.items():
        assert evidence["score"] < best["score"], why
    assert pair([zone(grounded=False)] * 4)["score"] == 0 and pair([])["score"] == 0


def test_confidence_is_a_typical_factor_and_zero_for_background():
    zones = [zone()] * 3
    evidence = pair(zones)
    c = unit_confidence(evidence, zones)
    # contrast, grounded, consistency (×2), grounding, compactness, partness (×2), √support, specificity
    factors = [evidence["contrast"], 1.0, 1.0, 1.0, 1.0, 1.0, (1 - 0.05 ** 2) ** 2, 1.0, 0.9]
    assert c == pytest.approx(math.prod(factors) ** (1 / 10))
    assert unit_confidence(evidence, [zone(), zone(grounded=False)]) == 0.0 and unit_confidence(evidence, []) == 0.0
    assert unit_confidence(pair(zones, spec=0.5), zones) < c  # any weaker factor lowers it
    assert unit_confidence(evidence, [zone(share=0.8)] * 3) < c  # its own zones count, not only the pair's


def test_specificity():
    assert specificity(0.02, 0.0) == 1.0 and specificity(0.02, 0.02) == 0.5 and specificity(0.0, 0.1) == 0.0
