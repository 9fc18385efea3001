"""Candidates: the zones of every selected pair, measured on their images and ranked (pipeline/candidates.py).

The images are drawn here: a dark specimen (a rectangle) on a light plate, so which patch squares
lie on the specimen is known exactly."""

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.candidates import CandidateImages, find_candidates, measure_candidates, measure_species
from pipeline.config import CandidatesConfig, ContrastConfig, PreprocessConfig, SourceConfig
from pipeline.contract import CANDIDATES_SCHEMA, SELECTED_SCHEMA
from pipeline.preprocessing import OriginalImages, plan_geometry

SIDE = 224  # images of 224 x 224: a patch square is 14 x 14 original pixels, patch p = (row p // 16, col p % 16)
SPECIMEN = (56, 56, 168, 168)  # rows and columns 4..11 of the grid


def patch(row: int, col: int) -> int:
    return row * 16 + col


ON = [patch(5, 5), patch(5, 6), patch(6, 5)]  # squarely on the specimen
OFF = [patch(0, 0), patch(0, 1), patch(1, 0)]  # on the plate


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("specimens")
    paths = {}
    for k in range(6):
        rgb = np.full((SIDE, SIDE, 3), 235, np.uint8)
        x0, y0, x1, y1 = SPECIMEN
        rgb[y0:y1, x0:x1] = (40, 30, 25)
        paths[f"i{k}"] = str(folder / f"i{k}.png")
        Image.fromarray(rgb).save(paths[f"i{k}"])
    return paths


def activations(rows, paths=None):
    geom = plan_geometry("squash", SIDE, SIDE, PreprocessConfig())[0]
    base = {"species": "G a", "genus": "G", "family": "F", "source_file": None, "source_row": None,
            "orig_w": SIDE, "orig_h": SIDE, "scale_x": geom.scale_x, "scale_y": geom.scale_y,
            "offset_x": 0.0, "offset_y": 0.0, "input_size": 224, "patch_px": 14}
    return pa.Table.from_pylist([{**base, "path": (paths or {}).get(r["image_id"]), **r} for r in rows])


def selected(pairs):
    return pa.Table.from_pylist([{"species": s, "genus": "G", "latent": z, "f_species": 0.1, "f_genus": 0.05,
                                  "f_elsewhere": 0.01, "contrast_rank": "genus", "contrast_taxon": "G", "score": 2.0 - i,
                                  "rank_in_species": i} for i, (s, z) in enumerate(pairs)], schema=SELECTED_SCHEMA)


def firings(zones: dict[int, list[int]], strength: float = 1.0):
    """latent → patches as an activations/ row's lists (values rising with the patch order, times strength)."""
    latent, patch_, value = [], [], []
    for z, patches in zones.items():
        for k, p in enumerate(patches):
            latent.append(z), patch_.append(p), value.append(strength * (1 + k))
    return {"latent": latent, "patch": patch_, "value": value}


def measure(rows, pairs, paths, *, score="evidence", top_images=2, group_size=2, max_latents=1, evidence=True,
            min_on_specimen=0.5):
    hits = find_candidates(activations(rows, paths), selected(pairs))
    sel = selected(pairs)
    images = CandidateImages(OriginalImages(SourceConfig(format="imagefolder", root="/"), PreprocessConfig()))
    out = measure_species(hits, sel, {"G a": len(rows)}, images,
                          contrast=ContrastConfig(score=score, max_latents_per_species=max_latents),
                          candidates=CandidatesConfig(top_images=top_images, group_size=group_size, evidence=evidence),
                          min_on_specimen=min_on_specimen)
    return out, images.rejected


def test_find_candidates_keeps_selected_latents_of_the_images_own_species():
    batch = activations([
        {"image_id": "a", "latent": [5, 7, 5, 9], "patch": [3, 0, 1, 3], "value": [1.0, 2.0, 3.0, 4.0]},
        {"image_id": "b", "species": "G b", "latent": [5], "patch": [2], "value": [9.0]},  # 5 not selected for G b
    ])
    out = find_candidates(batch, selected([("G a", 5), ("G a", 9), ("G b", 7)])).sort_by("latent").to_pylist()
    # patches sorted, each value with its own patch
    assert [(r["image_id"], r["latent"], r["patches"], r["values"], r["activation_sum"]) for r in out] == [
        ("a", 5, [1, 3], [3.0, 1.0], 4.0), ("a", 9, [3], [4.0], 4.0)]


def test_a_zone_on_the_plate_is_passed_over_for_the_next_image(images):
    # latent 5 fires on the plate in the two strongest images, on the specimen in the next three
    rows = [{"image_id": f"i{k}", **firings({5: OFF if k < 2 else ON}, strength=10 - k)} for k in range(5)]
    out, rejected = measure(rows, [("G a", 5)], images, top_images=2)
    assert not rejected
    got = [(r["image_id"], r["image_rank"], r["evidence"]["zone"]["grounded"]) for r in out.to_pylist()]
    # read until two grounded zones were found: the plate zones stay, with no rank; i4 is never read
    assert got == [("i0", None, False), ("i1", None, False), ("i2", 0, True), ("i3", 1, True)]
    first = out.to_pylist()[0]
    assert first["grounded_patches"] == [] and first["evidence"]["zone"]["on_specimen"] == 0.0
    # a background zone keeps the boxes of its own regions, to show where it was
    assert first["boxes"] == [{"x0": 0, "y0": 0, "x1": 28, "y1": 28}]
    assert out.schema == CANDIDATES_SCHEMA
    assert [r["consensus_group"] for r in out.to_pylist()] == [None, None, 0, 0]


def test_only_the_regions_on_the_specimen_are_described(images):
    rows = [{"image_id": "i0", **firings({5: [*OFF, *ON]})}]
    out, _ = measure(rows, [("G a", 5)], images)
    row = out.to_pylist()[0]
    assert row["patches"] == sorted(OFF + ON) and row["grounded_patches"] == sorted(ON)
    assert row["boxes"] == [{"x0": 70, "y0": 70, "x1": 98, "y1": 98}]  # the specimen's region only
    zone = row["evidence"]["zone"]
    assert zone["regions"] == 2 and zone["grounded_regions"] == 1 and zone["on_specimen"] == pytest.approx(0.5)
    # values rise with the patch order: the specimen's patches (listed last) hold 4+5+6 of 21
    assert zone["grounded_share"] == pytest.approx(15 / 21)
    # min_on_specimen 0: every region is described, as the paper
    everything, _ = measure(rows, [("G a", 5)], images, min_on_specimen=0.0)
    assert everything.to_pylist()[0]["grounded_patches"] == sorted(OFF + ON)


def test_evidence_ranks_a_latent_on_the_specimen_above_a_stronger_contrast_on_the_plate(images):
    # latent 7 has the better contrast rank (0) but fires on the plate only; latent 5 on the specimen
    rows = [{"image_id": f"i{k}", **firings({7: OFF, 5: ON})} for k in range(4)]
    pairs = [("G a", 7), ("G a", 5)]
    by_evidence, _ = measure(rows, pairs, images, score="evidence")
    by_ratio, _ = measure(rows, pairs, images, score="ratio")
    ranks = {(r["latent"], r["latent_rank"], r["forward"]) for r in by_evidence.to_pylist()}
    assert ranks == {(5, 0, True), (7, 1, False)}
    assert {(r["latent"], r["latent_rank"], r["forward"]) for r in by_ratio.to_pylist()} == {(7, 0, True), (5, 1, False)}
    # every selected pair is measured either way, with its evidence
    pair = {r["latent"]: r["evidence"]["pair"] for r in by_ratio.to_pylist()}
    assert pair[7]["grounded"] == 0 and pair[7]["score"] == 0 and pair[5]["grounded"] == 1 and pair[5]["score"] > 0
    assert pair[5]["support"] == 1.0 and pair[5]["specificity"] == pytest.approx(0.1 / 0.11)


def test_an_image_that_can_no_longer_be_read_is_an_error_row_and_skipped(images, tmp_path):
    paths = {**images, "gone": str(tmp_path / "gone.png")}
    rows = [{"image_id": "gone", **firings({5: ON}, strength=9)}, *({"image_id": f"i{k}", **firings({5: ON})}
                                                                    for k in range(2))]
    out, rejected = measure(rows, [("G a", 5)], paths)
    assert [r["image_id"] for r in out.to_pylist()] == ["i0", "i1"]
    assert [(r.stage, r.reason, r.image_id) for r in rejected] == [("candidates", "missing_file", "gone")]


def test_without_evidence_no_image_is_read_and_every_zone_is_whole():
    rows = [{"image_id": f"x{k}", **firings({5: OFF}, strength=5 - k)} for k in range(4)]
    out, rejected = measure(rows, [("G a", 5)], {}, score="ratio", top_images=3, evidence=False)  # no file exists
    assert not rejected
    got = out.to_pylist()
    assert [r["image_id"] for r in got] == ["x0", "x1", "x2"] and [r["image_rank"] for r in got] == [0, 1, 2]
    assert all(r["evidence"] is None and r["grounded_patches"] == r["patches"] for r in got)


def test_measure_candidates_covers_every_species(images):
    rows = [{"image_id": "i0", **firings({5: ON})}, {"image_id": "i1", "species": "G b", **firings({5: ON})}]
    table, rejected = measure_candidates(activations(rows, images), selected([("G a", 5), ("G b", 5)]),
                                         {"G a": 1, "G b": 1},
                                         OriginalImages(SourceConfig(format="imagefolder", root="/"), PreprocessConfig()),
                                         contrast=ContrastConfig(), candidates=CandidatesConfig(), min_on_specimen=0.5)
    assert sorted(table["species"].to_pylist()) == ["G a", "G b"] and not rejected
