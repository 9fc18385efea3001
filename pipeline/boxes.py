"""Activation zones → regions → boxes in original-image pixels.

A zone is the union of the 14-px squares of the patches where a latent fires. Its 8-connected
components (on the patch grid) are the regions; each region's box is the union of its squares
mapped back through the image's :class:`~pipeline.preprocessing.Geometry`, so it is exact in
original pixels for every geometry. Squares that fall entirely in letterbox padding (``pad``)
map to nothing and are dropped."""

from __future__ import annotations

import numpy as np

from pipeline.preprocessing import PATCH_PX, Geometry

NEIGHBOURS_8 = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def grid_side(geom: Geometry) -> int:
    return geom.input_size // PATCH_PX


def connected_regions(patches, side: int) -> list[list[int]]:
    """Patch indices (row-major on a side×side grid) grouped into 8-connected components, each
    sorted, components ordered by their first patch."""
    todo = set(int(p) for p in patches)
    regions = []
    for start in sorted(todo):
        if start not in todo:
            continue
        todo.discard(start)
        stack, region = [start], []
        while stack:
            p = stack.pop()
            region.append(p)
            r, c = divmod(p, side)
            for dr, dc in NEIGHBOURS_8:
                rr, cc = r + dr, c + dc
                q = rr * side + cc
                if 0 <= rr < side and 0 <= cc < side and q in todo:
                    todo.discard(q)
                    stack.append(q)
        regions.append(sorted(region))
    return regions


def patch_boxes(patches, geom: Geometry) -> list[tuple[int, int, int, int]]:
    """Original-pixel box of each patch square (x0, y0, x1, y1; exclusive ends)."""
    side = grid_side(geom)
    return [geom.patch_box(*divmod(int(p), side)) for p in patches]


def region_box(patches, geom: Geometry) -> dict | None:
    """The union of the region's squares as one box, or None when it maps to no original pixel."""
    squares = [b for b in patch_boxes(patches, geom) if b[2] > b[0] and b[3] > b[1]]
    if not squares:
        return None
    a = np.array(squares)
    return {"x0": int(a[:, 0].min()), "y0": int(a[:, 1].min()), "x1": int(a[:, 2].max()), "y1": int(a[:, 3].max())}


def zones_to_boxes(patches, geom: Geometry) -> list[dict]:
    """One box per 8-connected region of the zone, in original pixels."""
    boxes = (region_box(region, geom) for region in connected_regions(patches, grid_side(geom)))
    return [b for b in boxes if b is not None]


def zone_mask(patches, geom: Geometry) -> np.ndarray:
    """bool [orig_h, orig_w]: the original pixels covered by the zone's squares."""
    mask = np.zeros((geom.orig_h, geom.orig_w), bool)
    for x0, y0, x1, y1 in patch_boxes(patches, geom):
        mask[y0:y1, x0:x1] = True
    return mask


def region_masks(patches, geom: Geometry) -> list[tuple[dict, np.ndarray]]:
    """(box, mask) of every region that maps to original pixels, in the order of zones_to_boxes."""
    out = []
    for region in connected_regions(patches, grid_side(geom)):
        box = region_box(region, geom)
        if box is not None:
            out.append((box, zone_mask(region, geom)))
    return out
