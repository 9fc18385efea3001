"""The hard planted data (pipeline/demo/hard.py) and the scoring of a build against a ground truth
(pipeline/demo/quality.py) that benchmarks/bench_quality.py reports."""

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo.hard import HARD_GENERA, generate_hard_dataset
from pipeline.demo.quality import annotation_quality, auc, best_latents, on_part, planted_parts, zone_on_part
from pipeline.demo.specimens import GROUND_TRUTH_FILENAME, METADATA_RELPATH, image_relpath


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    summary = generate_hard_dataset(root, images_per_species=8, n_unlabelled=2, seed=1)
    with open(root / METADATA_RELPATH, newline="") as f:
        rows = list(csv.DictReader(f))
    return root, summary, rows


def image(root: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(root / image_relpath(row["split"], row["chunk"], row["processid"])).convert("RGB"))


def test_every_confound_is_planted_with_its_ground_truth(hard):
    root, summary, rows = hard
    assert len(summary["species"]) == sum(len(g.parts) for g in HARD_GENERA) == 9
    truth = planted_parts(root / GROUND_TRUTH_FILENAME)
    shown = {s: sum(r["processid"] in truth for r in rows if r["species"] == s) for s in summary["species"]}
    assert shown.pop("Pallidomyia dimidiata") == 4  # the red head in every second photo
    assert set(shown.values()) == {8}
    assert summary["species"]["Acuomyia viridicauda"]["artefact"] == "pin"
    assert summary["species"]["Chartapis violacea"]["artefact"] == "label"
    # one plate per species within a genus: the background tints of a genus's species differ
    for genus in HARD_GENERA:
        plates = [tuple(summary["species"][f"{genus.name} {e}"]["plate"]["tint"]) for e in genus.parts]
        assert len(set(plates)) == len(plates)
    # the plate shows through the pale window: its pixels are the plate's, not the body's
    eburnea = next(r for r in rows if r["species"] == "Pallidomyia eburnea")
    rgb = image(root, eburnea)
    x0, y0, x1, y1 = truth[eburnea["processid"]]
    window = rgb[(y0 + y1) // 2 - 2:(y0 + y1) // 2 + 2, (x0 + x1) // 2 - 2:(x0 + x1) // 2 + 2].reshape(-1, 3).mean(0)
    assert window.mean() > 170  # pale, where the body around it is dark (72, 66, 60)
    # a label: near-white pixels with dark print, in a corner of every Chartapis photo
    chartapis = [image(root, r) for r in rows if r["genus"] == "Chartapis"]
    assert all((img >= 245).all(axis=2).sum() > 500 for img in chartapis)


def test_poses_are_free_and_the_easy_demo_stays_upright(hard):
    root, _, rows = hard
    truth = planted_parts(root / GROUND_TRUTH_FILENAME)
    # a red head anywhere in the frame: its box centre spreads over both halves of the image, both ways
    heads = [truth[r["processid"]] for r in rows if r["species"] == "Pallidomyia dimidiata" and r["processid"] in truth]
    sides = {((x0 + x1) / 2 > 170, (y0 + y1) / 2 > 128) for x0, y0, x1, y1 in heads}
    assert len(sides) >= 2


def test_boxes_zones_and_annotations_on_the_part():
    part = (10, 10, 30, 30)
    assert on_part({"x0": 10, "y0": 10, "x1": 20, "y1": 20}, part)
    assert not on_part({"x0": 0, "y0": 0, "x1": 20, "y1": 20}, part)  # a quarter inside
    assert not on_part({"x0": 10, "y0": 10, "x1": 20, "y1": 20}, None)  # the photo does not show the part
    inside, outside = {"x0": 12, "y0": 12, "x1": 18, "y1": 18}, {"x0": 40, "y0": 40, "x1": 50, "y1": 50}
    assert zone_on_part([inside, outside], part) and not zone_on_part([inside, outside, outside], part)
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.5], [0.5]) == 0.5 and auc([], [0.1]) is None


def test_a_build_scored_against_its_ground_truth(tmp_path):
    truth = tmp_path / "ground_truth.csv"
    truth.write_text("processid,species,genus,part,x0,y0,x1,y1\na,A a,A,red_head,0,0,10,10\nb,A a,A,red_head,0,0,10,10\n")
    parts = planted_parts(truth)
    on, off = {"x0": 1, "y0": 1, "x1": 9, "y1": 9}, {"x0": 50, "y0": 50, "x1": 60, "y1": 60}
    (tmp_path / "candidates").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"image_id": "a", "species": "A a", "latent": 5, "latent_rank": 0, "image_rank": 0, "boxes": [on]},
        {"image_id": "b", "species": "A a", "latent": 5, "latent_rank": 0, "image_rank": None, "boxes": [off]},
        {"image_id": "b", "species": "A a", "latent": 7, "latent_rank": 1, "image_rank": 0, "boxes": [off]}]),
        tmp_path / "candidates" / "part-0.parquet")
    assert best_latents(tmp_path, parts) == {"A a": {"latent": 5, "hits": 1, "zones": 1, "on": True}}  # grounded zones
    (tmp_path / "traits").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"species": "A a", "image_ids": ["a"], "boxes": [[on]], "status": "ok", "confidence": 0.9},
        {"species": "A a", "image_ids": ["b"], "boxes": [[off, off, on]], "status": "ok", "confidence": 0.4},
        {"species": "A a", "image_ids": ["b"], "boxes": [[off]], "status": "background", "confidence": 0.0}]),
        tmp_path / "traits" / "part-0.parquet")
    q = annotation_quality(tmp_path, parts, min_confidence=0.5)
    assert q["ok"] == 2 and q["boxes_on_part"] == pytest.approx(2 / 4) and q["kept_boxes_on_part"] == 1.0
    assert q["auc"] == 1.0 and q["kept_species"] == ["A a"] and q["statuses"] == {"ok": 2, "background": 1}
