import numpy as np

from pipeline.boxes import connected_regions, region_masks, zone_mask, zones_to_boxes
from pipeline.config import PreprocessConfig
from pipeline.preprocessing import plan_geometry


def geometry(kind, w=341, h=256):
    return plan_geometry(kind, w, h, PreprocessConfig(geometry=kind))[0]


def test_regions_are_8_connected():
    # two diagonal neighbours are one region; a patch two cells away is another
    patches = [0 * 16 + 0, 1 * 16 + 1, 2 * 16 + 2, 5 * 16 + 5, 5 * 16 + 7]
    assert connected_regions(patches, 16) == [[0, 17, 34], [85], [87]]


def test_rows_do_not_wrap_around_the_grid():
    assert connected_regions([15, 16], 16) == [[15], [16]]  # end of row 0, start of row 1


def test_squash_boxes_are_exact_in_original_pixels():
    geom = geometry("squash", 341, 256)
    boxes = zones_to_boxes([0, 1, 16, 17, 200], geom)
    # patch columns of a 341-wide image: square c covers original x in [ceil(c*14*341/224 - .5), ...)
    assert boxes[0] == {"x0": 0, "y0": 0, "x1": 43, "y1": 32}
    r, c = divmod(200, 16)
    assert boxes[1] == {"x0": int(np.ceil(c * 14 * 341 / 224 - 0.5)), "y0": r * 16,
                        "x1": int(np.ceil((c + 1) * 14 * 341 / 224 - 0.5)), "y1": (r + 1) * 16}


def test_pad_squares_in_the_letterbox_map_to_nothing():
    geom = geometry("pad", 341, 256)  # 224 x 168 image pasted 28 px down
    assert zones_to_boxes([0, 1], geom) == []          # first row: entirely padding
    box = zones_to_boxes([2 * 16 + 3], geom)[0]        # a row inside the image
    assert box["y0"] == round((28 - 28) / geom.scale_y) and box["x0"] == int(np.ceil(3 * 14 / geom.scale_x - 0.5))


def test_center_crop_boxes_are_shifted_by_the_crop():
    geom = geometry("center_crop", 341, 256)
    box = zones_to_boxes([0], geom)[0]
    assert box["x0"] == 58 and box["y0"] == 16  # resize 341x256 → 341x256 (short side 256), crop 58/16


def test_zone_mask_equals_the_union_of_region_masks_and_boxes_bound_them():
    geom = geometry("squash", 333, 257)
    patches = [3, 4, 19, 100, 101, 255]
    mask = zone_mask(patches, geom)
    regions = region_masks(patches, geom)
    assert len(regions) == 3
    assert np.array_equal(mask, np.logical_or.reduce([m for _, m in regions]))
    for box, m in regions:
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (box["x0"], box["y0"], box["x1"], box["y1"])
    assert mask[-1, -1]  # patch 255 reaches the last original pixel


def test_boxes_follow_the_geometrys_patch_size():
    """A 16-px-patch backbone: a 224 input is a 14×14 grid of 16-px squares."""
    geom = plan_geometry("squash", 224, 224, PreprocessConfig(), patch_px=16)[0]
    assert geom.grid_side == 14
    assert zones_to_boxes([0, 1, 15], geom) == [{"x0": 0, "y0": 0, "x1": 32, "y1": 32}]
    assert zones_to_boxes([13], geom) == [{"x0": 208, "y0": 0, "x1": 224, "y1": 16}]
