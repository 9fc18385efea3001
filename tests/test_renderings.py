import io

import numpy as np
import pytest
from PIL import Image

from pipeline.annotation.renderings import crop_box, png_bytes, render_crop, render_overlay, zone_outline

H, W = 256, 400


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _image():
    rng = np.random.default_rng(0)
    img = rng.integers(100, 160, size=(H, W, 3)).astype(np.uint8)
    img[..., 0] = img[..., 1]                # greyish, so pure red only comes from the outline
    return img


def _squares_zone():
    """Union of three 25x16 'patch squares' forming an L (not a box)."""
    z = np.zeros((H, W), bool)
    z[64:128, 100:200] = True                # 4x4 squares
    z[128:160, 100:150] = True               # L-foot
    return z


def _box_filter(mask, r, any_):
    """Independent square dilation (any_=True) / erosion (any_=False) by r px, for checking."""
    p = np.pad(mask, r, constant_values=not any_)
    acc = np.zeros_like(mask) if any_ else np.ones_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            s = p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
            acc = (acc | s) if any_ else (acc & s)
    return acc


def test_zone_outline_width_and_position():
    z = np.zeros((40, 40), bool)
    z[10:30, 10:30] = True
    o = zone_outline(z, 3)
    # row 20 crosses the left edge at x=10: 1 px outside, 2 px inside
    assert o[20].nonzero()[0].tolist() == [9, 10, 11, 28, 29, 30]
    assert not o[15:25, 15:25].any() and not o[:8].any()
    assert o[9, 9] and o[30, 30]             # corners closed
    o1 = zone_outline(z, 1)
    assert o1.sum() == 4 * 20 - 4 and not (o1 & ~z).any()


def test_zone_outline_follows_union_polygon_not_box():
    z = _squares_zone()
    o = zone_outline(z, 3)
    # concave corner of the L: the outline runs along y=128 for x in 150..200 and x=150 for y in 128..160
    assert o[128, 175] and o[127, 175]
    assert o[145, 150] and o[145, 149]
    # the bounding box's edges (outside the L) are NOT outlined
    assert not o[159, 180] and not o[145, 199] and not o[150, 190]
    assert not o[100, 150]                   # deep inside


def test_zone_outline_at_image_edge_and_empty():
    z = np.zeros((20, 20), bool)
    z[:, :8] = True
    o = zone_outline(z, 3)
    assert o[10, 0] and o[10, 8] and not o[10, 4]
    assert not zone_outline(np.zeros((5, 5), bool)).any()


def test_render_overlay_size_and_red_on_boundary():
    img = _image()
    zone = _squares_zone()
    out = _decode(render_overlay(img, zone))
    assert out.shape == (2 * H, 2 * W, 3)
    red = (out[..., 0] > 200) & (out[..., 1] < 60) & (out[..., 2] < 60)
    assert red.sum() > 500
    # map red pixels of the 2x image back to the original grid
    ys, xs = np.nonzero(red)
    near = _box_filter(zone, 3, True) & ~_box_filter(zone, 3, False)
    assert near[ys // 2, xs // 2].all()       # all red lies within 3 px of the zone boundary
    assert not _box_filter(zone, 6, False)[ys // 2, xs // 2].any()   # none deep inside
    assert not (~_box_filter(zone, 4, True))[ys // 2, xs // 2].any()  # none far outside
    # the outline is continuous along the top edge of the zone
    assert red[2 * 64 + 1, 2 * 100 + 10:2 * 200 - 10].all()
    # far outside and deep inside stay untouched
    np.testing.assert_array_equal(red[:100], False)
    assert not red[2 * 96, 2 * 150]


def test_render_overlay_custom_colour_and_no_upscale():
    img = _image()
    zone = _squares_zone()
    out = _decode(render_overlay(img, zone, colour=(0, 255, 0), width=1, upscale=1))
    assert out.shape == (H, W, 3)
    green = np.all(out == (0, 255, 0), axis=-1)
    np.testing.assert_array_equal(green, zone_outline(zone, 1))
    # the input is not modified
    assert not np.all(img == (0, 255, 0), axis=-1).any()


def test_render_crop_interior_box():
    img = _image()
    box = {"x0": 150, "y0": 100, "x1": 250, "y1": 160}   # 100 x 60 -> margins 15, 9
    out = _decode(render_crop(img, box))
    assert out.shape == (60 + 18, 100 + 30, 3)
    np.testing.assert_array_equal(out, img[91:169, 135:265])


def test_render_crop_small_box_grows_to_min_side():
    img = _image()
    box = {"x0": 200, "y0": 120, "x1": 210, "y1": 130}
    out = _decode(render_crop(img, box))
    assert out.shape == (64, 64, 3)
    c = crop_box(box, img.shape)
    assert c["x0"] <= 200 and c["x1"] >= 210 and c["y0"] <= 120 and c["y1"] >= 130


def test_render_crop_corner_box_is_clipped():
    img = _image()
    box = {"x0": 0, "y0": 0, "x1": 100, "y1": 60}        # margin clipped on the top/left
    out = _decode(render_crop(img, box))
    assert out.shape == (69, 115, 3)
    np.testing.assert_array_equal(out, img[:69, :115])
    br = {"x0": W - 10, "y0": H - 10, "x1": W, "y1": H}  # tiny box at bottom-right corner
    c = crop_box(br, img.shape)
    assert c == {"x0": W - 64, "y0": H - 64, "x1": W, "y1": H}
    assert _decode(render_crop(img, br)).shape == (64, 64, 3)


def test_render_crop_image_smaller_than_min_side():
    img = np.zeros((40, 50, 3), np.uint8)
    out = _decode(render_crop(img, {"x0": 10, "y0": 10, "x1": 20, "y1": 20}))
    assert out.shape == (40, 50, 3)


def test_png_bytes_roundtrip():
    img = _image()
    np.testing.assert_array_equal(_decode(png_bytes(img)), img)
    with pytest.raises(Exception):
        png_bytes(np.zeros((4, 4, 7), np.uint8))


def test_jpeg_encoding_for_the_llm_is_close_and_labelled_jpeg():
    from pipeline.annotation.prompts import sniff_image_mime
    from pipeline.annotation.renderings import encode_image

    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:40] = (200, 30, 30)
    data = encode_image(img, "jpeg")
    assert sniff_image_mime(data) == "image/jpeg" and sniff_image_mime(encode_image(img)) == "image/png"
    assert np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - img).mean() < 3  # quality 95: close
    with pytest.raises(ValueError, match="png or jpeg"):
        encode_image(img, "gif")
