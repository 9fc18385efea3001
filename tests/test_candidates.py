import pyarrow as pa

from pipeline.candidates import find_candidates, keep_top_images
from pipeline.config import PreprocessConfig
from pipeline.preprocessing import plan_geometry
from pipeline.contract import SELECTED_SCHEMA


def activations(rows):
    geom = plan_geometry("squash", 448, 224, PreprocessConfig())[0]
    base = {"species": "G a", "genus": "G", "family": "F", "path": None, "source_file": None, "source_row": None,
            "orig_w": 448, "orig_h": 224, "scale_x": geom.scale_x, "scale_y": geom.scale_y,
            "offset_x": 0.0, "offset_y": 0.0, "input_size": 224}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def selected(pairs):
    return pa.Table.from_pylist([{"species": s, "genus": "G", "latent": z, "f_species": 0.1, "f_genus": 0.05,
                                  "contrast_rank": "genus", "contrast_taxon": "G", "score": 2.0, "rank_in_species": i}
                                 for i, (s, z) in enumerate(pairs)], schema=SELECTED_SCHEMA)


def test_find_candidates_keeps_selected_latents_of_the_images_own_species():
    batch = activations([
        {"image_id": "a", "latent": [5, 7, 5, 9], "patch": [0, 0, 1, 3], "value": [1.0, 2.0, 3.0, 4.0]},
        {"image_id": "b", "species": "G b", "latent": [5], "patch": [2], "value": [9.0]},  # 5 not selected for G b
    ])
    out = find_candidates(batch, selected([("G a", 5), ("G a", 9), ("G b", 7)])).sort_by("latent").to_pylist()
    assert [(r["image_id"], r["latent"], r["patches"], r["activation_sum"]) for r in out] == [
        ("a", 5, [0, 1], 4.0), ("a", 9, [3], 4.0)]


def test_find_candidates_takes_only_the_best_ranked_latents_of_each_species():
    batch = activations([{"image_id": "a", "latent": [5, 7, 9], "patch": [0, 1, 2], "value": [1.0, 1.0, 1.0]}])
    chosen = selected([("G a", 9), ("G a", 5), ("G a", 7)])  # ranks 0, 1, 2
    assert sorted(r["latent"] for r in find_candidates(batch, chosen).to_pylist()) == [5, 7, 9]
    assert sorted(r["latent"] for r in find_candidates(batch, chosen, max_latents_per_species=2).to_pylist()) == [5, 9]


def test_keep_top_images_ranks_groups_and_boxes():
    rows = [{"image_id": f"i{k}", "latent": 5, "patches": [0, 1] if k else [0, 2],
             "activation_sum": float(k)} for k in range(8)]
    group = activations(rows)
    out = keep_top_images(group, top_images=7, group_size=3).to_pylist()
    assert [r["image_id"] for r in out] == ["i7", "i6", "i5", "i4", "i3", "i2", "i1"]
    assert [r["consensus_group"] for r in out] == [0, 0, 0, 1, 1, 1, None]  # only complete groups
    # squash of 448x224: a square is 28x14 original pixels; patches 0 and 1 are one region
    assert out[0]["boxes"] == [{"x0": 0, "y0": 0, "x1": 56, "y1": 14}]
