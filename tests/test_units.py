"""Annotation units built in Arrow (pipeline/annotation/units.py) equal the grouping written out
directly in Python: one unit per candidate outside a consensus group, one per group, members
strongest first; and their ids are the ones the stage recomputes per unit."""

import random
from collections import defaultdict

import pyarrow as pa
import pytest

from pipeline.annotation.units import annotation_units, unit_annotation_id, unit_table, with_annotation_ids
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
    return [{"species": m[0]["species"], "genus": m[0]["genus"], "latent": m[0]["latent"], "members": m} for m in units]


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
