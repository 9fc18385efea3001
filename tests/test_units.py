"""Annotation units built in Arrow (pipeline/annotation/units.py) equal the grouping written out
directly in Python: one unit per candidate outside a consensus group, one per group, members
strongest first; and their ids are the ones the stage recomputes per unit."""

import random
from collections import defaultdict

import pyarrow as pa
import pytest

from pipeline.annotation.units import (annotation_units, sent, skip_reason, unit_annotation_id, unit_table,
                                       with_annotation_ids)
from pipeline.config import AnnotateConfig


def candidate_rows(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"image_id": f"img{i:04d}", "species": rng.choice(["Aus bus", "Aus cus", "Bus dus"]), "genus": "Aus",
             "latent": rng.randint(0, 6), "consensus_group": rng.choice([None, 0, 1, 2]),
             "image_rank": rng.randint(0, 9),  # ties: the group keeps candidates/ order among them
             "patches": [rng.randint(0, 255) for _ in range(rng.randint(1, 5))]} for i in range(n)]


def direct_units(rows: list[dict], images_per_prompt: int) -> list[dict]:
    groups, units = defaultdict(list), []
    for row in rows:
        if images_per_prompt > 1 and row["consensus_group"] is not None:
            groups[row["species"], row["latent"], row["consensus_group"]].append(row)
        else:
            units.append([row])
    units += [sorted(g, key=lambda r: r["image_rank"]) for _, g in sorted(groups.items())]
    return [{"species": m[0]["species"], "genus": m[0]["genus"], "latent": m[0]["latent"], "members": m,
             "grounded": True, "confidence": None} for m in units]


@pytest.mark.parametrize("images_per_prompt", [1, 3])
def test_units_equal_the_direct_grouping(images_per_prompt):
    rows = candidate_rows()
    units = annotation_units(rows, images_per_prompt)
    assert units == direct_units(rows, images_per_prompt)
    sizes = {len(u["members"]) for u in units}
    assert sizes == {1} if images_per_prompt == 1 else max(sizes) > 1


def test_ids_are_the_ones_the_stage_recomputes():
    rows, cfg = candidate_rows(seed=1), AnnotateConfig()
    table = with_annotation_ids(cfg, unit_table(pa.Table.from_pylist(rows), 3))
    ids = table["annotation_id"].to_pylist()
    assert ids == [unit_annotation_id(cfg, u) for u in direct_units(rows, 3)] and len(set(ids)) == len(ids)


def test_no_candidates_no_units():
    empty = pa.Table.from_pylist(candidate_rows(1)).slice(0, 0)
    assert unit_table(empty, 3).num_rows == 0 and annotation_units([], 3) == []


def evidence(grounded: bool, share: float = 0.05) -> dict:
    zone = {"on_specimen": 1.0 if grounded else 0.0, "regions": 1, "largest_share": 1.0, "grounded": grounded,
            "grounded_share": 1.0 if grounded else 0.0, "grounded_regions": int(grounded),
            "grounded_largest_share": 1.0 if grounded else 0.0, "axial": 0.5 if grounded else None,
            "lateral": 0.1 if grounded else None, "specimen_share": share if grounded else 0.0}
    pair = {"support": 1.0, "specificity": 0.9, "contrast": 0.5, "grounded": 0.5, "on_specimen": 0.5,
            "placement_spread": 0.0, "size_spread": 0.0, "consistency": 1.0, "compactness": 1.0, "partness": 1.0,
            "regions": 1.0, "zones": 4, "score": 0.1}
    return {"pair": pair, "zone": zone}


def measured_rows() -> pa.Table:
    """Latent 1: two grounded zones and one on the plate; latent 2 (forward): only plate zones;
    latent 3: grounded but not forward."""
    rows = []
    for latent, grounded, forward in ((1, [True, False, True], True), (2, [False] * 4, True), (3, [True], False)):
        rank = 0
        for k, g in enumerate(grounded):
            rows.append({"image_id": f"z{latent}-{k}", "species": "Aus bus", "genus": "Aus", "latent": latent,
                         "image_rank": rank if g else None, "consensus_group": None, "patches": [k],
                         "evidence": evidence(g), "forward": forward})
            rank += g
    table = pa.Table.from_pylist(rows)
    return table.set_column(table.schema.get_field_index("consensus_group"), "consensus_group",
                            pa.array([None] * len(rows), pa.int32()))  # typed, as candidates/ is


def test_only_forward_grounded_zones_are_described_and_a_pair_on_the_plate_is_one_background_unit():
    units = unit_table(measured_rows(), images_per_prompt=3).to_pylist()
    described = [(u["latent"], [m["image_id"] for m in u["members"]], u["grounded"]) for u in units]
    assert described == [(1, ["z1-0"], True), (1, ["z1-2"], True), (2, ["z2-0", "z2-1", "z2-2"], False)]
    conf = {u["latent"]: u["confidence"] for u in units}
    assert conf[2] == 0.0 and 0 < conf[1] <= 1  # a background unit has no confidence to give


def test_what_is_not_sent_and_why():
    table = unit_table(measured_rows(), 3)
    assert sent(table, 0.0).to_pylist() == [True, True, False]
    confident = table["confidence"][0].as_py()
    assert sent(table, confident + 0.01).to_pylist() == [False, False, False]
    assert skip_reason(False, 0.9, 0.0) == "background" and skip_reason(True, 0.3, 0.5) == "low_confidence"
    assert skip_reason(True, None, 0.5) is None and skip_reason(None, None, 0.5) is None  # rows without evidence
