import time

import numpy as np
import pytest

from pipeline.annotation.measurements import (
    PALETTE,
    describe_measurements,
    measure_region,
    nearest_colour_name,
    segment_specimen,
)
from pipeline.boxes import label_components

H, W = 256, 400


def _ellipse(cx=200, cy=128, ax=150, ay=60, shape=(H, W)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _specimen_image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(232, 8, size=(H, W, 3)), 0, 255).astype(np.uint8)
    ell = _ellipse()
    dark = np.clip(rng.normal((70, 50, 35), 10, size=(H, W, 3)), 0, 255).astype(np.uint8)
    img[ell] = dark[ell]
    return img, ell


def _box_of(mask):
    ys, xs = np.nonzero(mask)
    return {"x0": int(xs.min()), "y0": int(ys.min()), "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1}


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


# ---------------------------------------------------------------- segmentation

def test_segment_dark_ellipse_on_noisy_light_background():
    img, ell = _specimen_image()
    seg = segment_specimen(img)
    assert seg.dtype == bool and seg.shape == (H, W)
    assert _iou(seg, ell) > 0.9


def test_segment_keeps_largest_component_and_fills_holes():
    img, ell = _specimen_image(1)
    img[5:15, 5:15] = (20, 20, 20)          # small dark speck away from the specimen
    hole = _ellipse(200, 128, 20, 10)
    img[hole] = (245, 245, 245)              # pale spot inside the specimen
    seg = segment_specimen(img)
    assert not seg[5:15, 5:15].any()
    assert seg[hole].all()
    assert _iou(seg, ell) > 0.9
    assert not segment_specimen(img, fill_holes=False)[hole].any()


def test_segment_never_empty():
    flat = np.full((32, 48, 3), 240, np.uint8)
    seg = segment_specimen(flat)
    assert seg.any() and seg.shape == (32, 48)


def test_segment_speed_400x256():
    img, _ = _specimen_image(2)
    segment_specimen(img)
    t = time.perf_counter()
    for _ in range(5):
        segment_specimen(img)
    assert (time.perf_counter() - t) / 5 < 0.05


def test_label_components_8_vs_4_connectivity():
    m = np.zeros((6, 6), bool)
    m[1, 1] = m[2, 2] = True                 # diagonal neighbours
    m[4, 4:6] = True
    lab8, n8 = label_components(m, 8)
    lab4, n4 = label_components(m, 4)
    assert n8 == 2 and lab8[1, 1] == lab8[2, 2]
    assert n4 == 3 and lab4[1, 1] != lab4[2, 2]
    assert (lab8 > 0).sum() == m.sum() and (lab8[~m] == 0).all()


def test_label_components_u_shape_is_one_component():
    m = np.zeros((10, 10), bool)
    m[1:9, 1] = m[1:9, 8] = m[8, 1:9] = True   # U: arms meet only at the bottom
    m[0:3, 4:6] = True                        # separate blob
    lab, n = label_components(m)
    assert n == 2
    assert lab[1, 1] == lab[1, 8] and lab[1, 1] != lab[0, 4]


# ---------------------------------------------------------------- colour

@pytest.mark.parametrize("name", list(PALETTE))
def test_palette_colours_name_themselves(name):
    assert nearest_colour_name(PALETTE[name]) == name


@pytest.mark.parametrize("name", list(PALETTE))
def test_perturbed_palette_colours_keep_their_name(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    base = np.array(PALETTE[name])
    for _ in range(10):
        col = np.clip(base + rng.integers(-6, 7, 3), 0, 255)
        assert nearest_colour_name(col) == name, col


def test_colour_names_of_typical_colours():
    assert nearest_colour_name((250, 250, 250)) == "white"
    assert nearest_colour_name((10, 12, 8)) == "black"
    assert nearest_colour_name((230, 60, 50)) == "red"
    assert nearest_colour_name((30, 70, 220)) == "blue"


def test_palette_size():
    assert 16 <= len(PALETTE) <= 24
    for v in PALETTE.values():
        assert len(v) == 3 and all(0 <= c <= 255 for c in v)


# ---------------------------------------------------------------- measure_region

KEYS = {"area_px", "area_frac_specimen", "box_w_px", "box_h_px", "elongation", "orientation_deg",
        "axial_pos", "lateral_pos", "colour_r", "colour_g", "colour_b", "colour_name"}


def test_rectangle_zone_exact_area_box_and_elongation():
    img = np.full((H, W, 3), 200, np.uint8)
    spec = np.ones((H, W), bool)
    zone = np.zeros((H, W), bool)
    zone[100:120, 50:110] = True             # 60 wide x 20 high
    m = measure_region(img, spec, zone, _box_of(zone))
    assert set(m) == KEYS
    assert m["area_px"] == 1200 and isinstance(m["area_px"], int)
    assert (m["box_w_px"], m["box_h_px"]) == (60, 20)
    assert m["elongation"] == pytest.approx(3.0, rel=1e-6)
    assert m["orientation_deg"] == pytest.approx(0.0, abs=1e-6)
    vert = np.zeros((H, W), bool)
    vert[50:110, 100:120] = True
    mv = measure_region(img, spec, vert, _box_of(vert))
    assert mv["elongation"] == pytest.approx(3.0, rel=1e-6)
    assert mv["orientation_deg"] == pytest.approx(90.0, abs=1e-6)


def test_diagonal_zone_orientation_and_degenerate_zone():
    img = np.full((64, 64, 3), 200, np.uint8)
    spec = np.ones((64, 64), bool)
    diag = np.eye(64, dtype=bool) | np.eye(64, k=1, dtype=bool)
    m = measure_region(img, spec, diag, _box_of(diag))
    assert m["orientation_deg"] == pytest.approx(45.0, abs=1.0)   # y down: towards lower right
    assert m["elongation"] > 10
    anti = diag[:, ::-1]
    assert measure_region(img, spec, anti, _box_of(anti))["orientation_deg"] == pytest.approx(135.0, abs=1.0)
    one = np.zeros((64, 64), bool)
    one[10, 10] = True
    m1 = measure_region(img, spec, one, _box_of(one))
    assert m1["elongation"] == 1.0 and m1["area_px"] == 1
    empty = measure_region(img, spec, np.zeros((64, 64), bool), {"x0": 0, "y0": 0, "x1": 0, "y1": 0})
    assert empty["area_px"] == 0 and empty["elongation"] == 1.0


def test_axial_position_on_horizontal_specimen():
    img, ell = _specimen_image()
    spec = segment_specimen(img)
    right = np.zeros((H, W), bool)
    right[118:138, 320:345] = True
    left = np.zeros((H, W), bool)
    left[118:138, 55:80] = True
    mr = measure_region(img, spec, right, _box_of(right))
    ml = measure_region(img, spec, left, _box_of(left))
    assert mr["axial_pos"] > 0.5 and ml["axial_pos"] < -0.5
    assert abs(mr["lateral_pos"]) < 0.1 and abs(ml["lateral_pos"]) < 0.1
    below = np.zeros((H, W), bool)
    below[160:175, 190:210] = True           # below the axis: +lateral (normal points down)
    assert measure_region(img, spec, below, _box_of(below))["lateral_pos"] > 0.5


def test_axial_position_on_vertical_specimen_points_down():
    spec = _ellipse(cx=128, cy=200, ax=40, ay=150, shape=(400, 256))
    img = np.full((400, 256, 3), 230, np.uint8)
    img[spec] = (60, 40, 30)
    low = np.zeros_like(spec)
    low[320:340, 118:138] = True
    left = np.zeros_like(spec)
    left[190:210, 95:105] = True
    assert measure_region(img, spec, low, _box_of(low))["axial_pos"] > 0.5
    assert measure_region(img, spec, left, _box_of(left))["lateral_pos"] > 0.5   # normal points left


def test_area_frac_specimen_exact_and_colour_from_intersection():
    img = np.full((100, 100, 3), 255, np.uint8)
    spec = np.zeros((100, 100), bool)
    spec[20:80, 20:70] = True                # 3000 px
    img[spec] = PALETTE["orange"]
    zone = np.zeros((100, 100), bool)
    zone[10:40, 10:40] = True                # 900 px, 400 px inside the specimen
    m = measure_region(img, spec, zone, _box_of(zone))
    assert m["area_px"] == 900
    assert m["area_frac_specimen"] == pytest.approx(400 / 3000, abs=1e-12)
    assert (m["colour_r"], m["colour_g"], m["colour_b"]) == PALETTE["orange"]
    assert m["colour_name"] == "orange"
    outside = np.zeros((100, 100), bool)
    outside[0:10, 0:10] = True               # no intersection -> whole-zone colour
    mo = measure_region(img, spec, outside, _box_of(outside))
    assert mo["area_frac_specimen"] == 0.0 and mo["colour_name"] == "white"


def test_mean_colour_of_mixed_zone():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :5] = (200, 0, 0)
    img[:, 5:] = (0, 0, 100)
    m = measure_region(img, np.ones((10, 10), bool), np.ones((10, 10), bool),
                       {"x0": 0, "y0": 0, "x1": 10, "y1": 10})
    assert (m["colour_r"], m["colour_g"], m["colour_b"]) == (100, 0, 50)


# ---------------------------------------------------------------- description

def _meas(**kw):
    base = dict(area_px=1000, area_frac_specimen=0.031, box_w_px=42, box_h_px=40, elongation=1.1,
                orientation_deg=0.0, axial_pos=0.0, lateral_pos=0.0, colour_r=40, colour_g=80,
                colour_b=210, colour_name="blue")
    base.update(kw)
    return base


def test_describe_measurements_words():
    text = describe_measurements("wing", [
        _meas(axial_pos=0.7, lateral_pos=-0.5),
        _meas(axial_pos=-0.6, lateral_pos=0.0, elongation=2.0, colour_name="dark brown"),
        _meas(axial_pos=0.0, lateral_pos=0.6, elongation=5.0, colour_name="yellow"),
    ])
    assert "wing" in text
    assert "Region 1: compact blue zone in the front-left of the specimen, 3.1% of its area (42×40 px)." in text
    assert "Region 2: elongated dark brown zone in the rear of the specimen" in text
    assert "Region 3: strongly elongated yellow zone in the middle-right" in text
    flipped = describe_measurements(None, [_meas(axial_pos=0.7, lateral_pos=-0.5)], front="negative")
    assert "rear-right" in flipped and "Part" not in flipped


def test_describe_measurements_from_real_measurement():
    img, _ = _specimen_image()
    spec = segment_specimen(img)
    zone = np.zeros((H, W), bool)
    zone[118:138, 320:345] = True
    img[zone] = PALETTE["yellow"]
    text = describe_measurements(None, [measure_region(img, spec, zone, _box_of(zone))])
    assert "yellow" in text and "front" in text and "(25×20 px)" in text


def test_describe_measurements_empty():
    assert "No region" in describe_measurements("leg", [])
