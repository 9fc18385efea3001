import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.demo.specimens import (BIOSCAN_COLUMNS, GROUND_TRUTH_FILENAME, METADATA_RELPATH,
                                PART_COLOURS, generate_demo_dataset, image_relpath)


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bioscan")
    summary = generate_demo_dataset(root, images_per_species=4, n_unlabelled=5, seed=3)
    return summary, _read_csv(Path(root) / METADATA_RELPATH), _read_csv(Path(root) / GROUND_TRUTH_FILENAME)


def _image(summary, row) -> Image.Image:
    return Image.open(Path(summary["root"]) / image_relpath(row["split"], row["chunk"], row["processid"]))


def test_metadata_has_the_bioscan_columns_in_order(demo):
    summary, rows, _ = demo
    with open(summary["metadata"], newline="") as f:
        assert tuple(next(csv.reader(f))) == BIOSCAN_COLUMNS
    assert len(BIOSCAN_COLUMNS) == 23
    assert len(rows) == summary["n_images"] == 4 * len(summary["species"]) + 5
    assert len({r["processid"] for r in rows}) == len(rows)
    assert all(r["phylum"] == "Arthropoda" and r["class"] == "Insecta" for r in rows)
    assert all(set(r["dna_barcode"]) <= set("ACGT") and len(r["dna_barcode"]) > 500 for r in rows)


def test_image_relpath_has_chunk_folder_only_when_chunk_given():
    assert image_relpath("train", "2", "SYNT0000001") == "bioscan5m/images/cropped_256/train/2/SYNT0000001.jpg"
    assert image_relpath("val", "", "SYNT0000001") == "bioscan5m/images/cropped_256/val/SYNT0000001.jpg"


def test_images_exist_with_cropped_256_sizes_and_chunks_only_for_train_and_pretrain(demo):
    summary, rows, _ = demo
    assert {r["split"] for r in rows} == {"train", "val", "test", "pretrain"}
    for r in rows:
        assert bool(r["chunk"]) == (r["split"] in ("train", "pretrain"))
        with _image(summary, r) as im:
            w, h = im.size
            assert im.format == "JPEG"
        assert (h == 256 and 300 <= w <= 400) or (w == 256 and 300 <= h <= 380)
    jpgs = list(Path(summary["root"]).rglob("*.jpg"))
    assert len(jpgs) == len(rows)


def test_taxonomy_has_congeners_and_exactly_the_lone_species_alone(demo):
    summary, rows, _ = demo
    by_genus = defaultdict(set)
    for r in rows:
        if r["species"]:
            assert r["species"].split(" ")[0] == r["genus"] and r["taxon"] == r["species"]
            by_genus[r["genus"]].add(r["species"])
    assert max(len(s) for s in by_genus.values()) >= 2
    alone = sorted(next(iter(s)) for s in by_genus.values() if len(s) == 1)
    assert alone == sorted(summary["lone_species"]) and len(alone) == 1
    # Congeners differ in their planted part.
    for species in by_genus.values():
        assert len({summary["species"][s]["part"] for s in species}) == len(species)


def test_unlabelled_rows_have_empty_species_and_genus(demo):
    summary, rows, truth = demo
    unlabelled = [r for r in rows if r["split"] == "pretrain"]
    assert len(unlabelled) == summary["n_unlabelled"] == 5
    assert all(r["species"] == "" and r["genus"] == "" and r["order"] for r in unlabelled)
    assert all(r["species"] for r in rows if r["split"] != "pretrain")
    pretrain_ids = {r["processid"] for r in unlabelled}
    assert all(t["species"] == "" == t["genus"] for t in truth if t["processid"] in pretrain_ids)


def test_ground_truth_boxes_hold_the_part_colour(demo):
    summary, rows, truth = demo
    by_id = {r["processid"]: r for r in rows}
    labelled = [r for r in rows if r["species"]]
    assert {t["processid"] for t in truth} >= {r["processid"] for r in labelled}
    for t in truth:
        row = by_id[t["processid"]]
        if row["species"]:
            assert t["part"] == summary["species"][row["species"]]["part"]
        with _image(summary, row) as im:
            pixels = np.asarray(im.convert("RGB"), float)
        h, w = pixels.shape[:2]
        x0, y0, x1, y1 = (int(t[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # Big enough to cover >= 2x2 patches of a 16x16 grid after a resize to 224x224.
        assert min((x1 - x0) * 224 / w, (y1 - y0) * 224 / h) >= 28
        coloured = np.linalg.norm(pixels - PART_COLOURS[t["part"]], axis=2) < 60
        inside = np.zeros_like(coloured)
        inside[y0:y1, x0:x1] = True
        assert coloured[inside].mean() > 0.25, t  # stripes fill the least of their box
        assert coloured[~inside].sum() <= 0.02 * coloured.sum(), t
        # The box is tight: the part colour reaches (nearly) every edge of it.
        ys, xs = np.nonzero(coloured)
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x0, y0, x1, y1], atol=3), t


def test_part_colours_occur_only_where_planted(demo):
    summary, rows, truth = demo
    planted = {t["processid"]: t["part"] for t in truth}
    for r in rows:
        with _image(summary, r) as im:
            pixels = np.asarray(im.convert("RGB"), float)
        for part, colour in PART_COLOURS.items():
            present = (np.linalg.norm(pixels - colour, axis=2) < 60).sum()
            assert (present > 0) == (planted.get(r["processid"]) == part), (r["processid"], part)


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", images_per_species=2, n_unlabelled=2, seed=7)
    b = generate_demo_dataset(tmp_path / "b", images_per_species=2, n_unlabelled=2, seed=7)
    c = generate_demo_dataset(tmp_path / "c", images_per_species=2, n_unlabelled=2, seed=8)

    def files(summary):
        root = Path(summary["root"])
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(a) == files(b)
    assert files(a) != files(c)
