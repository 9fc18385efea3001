"""Counts and selection against a direct computation of the paper's formulas, written here."""

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ContrastConfig
from pipeline.counting import count_firings, counts_by_rank, sum_counts, taxonomy_codes
from pipeline.selection import select_latents, taxonomy_of_species

# genus G1: 3 species, G2: 2 species, G3: 1 species (lone), in families F1 (G1, G3) and F2 (G2)
TAXA = [("G1 a", "G1", "F1"), ("G1 b", "G1", "F1"), ("G1 c", "G1", "F1"),
        ("G2 a", "G2", "F2"), ("G2 b", "G2", "F2"), ("G3 a", "G3", "F1")]
N_LATENTS = 40


def random_activations(n_images=300, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        kind = rng.integers(0, len(TAXA) + 2)
        if kind < len(TAXA):
            species, genus, family = TAXA[kind]
            if rng.random() < 0.1:
                family = None                               # a labelled row with no family
        elif kind == len(TAXA):
            species, genus, family = None, None, None      # unlabelled
        else:
            species, genus, family = None, "G1", "F1"      # genus only: takes no part
        skew = rng.dirichlet(np.ones(N_LATENTS) * 0.3)     # species-like skew of latent use
        n = rng.integers(0, 60)
        patches = rng.integers(0, 256, n)
        latents = rng.choice(N_LATENTS, n, p=skew)
        keep = np.unique(patches * N_LATENTS + latents, return_index=True)[1]  # (patch, latent) unique
        rows.append({"image_id": f"i{i}", "species": species, "genus": genus, "family": family,
                     "latent": latents[keep].astype(np.int32).tolist(), "patch": patches[keep].astype(np.int16).tolist(),
                     "value": rng.uniform(1, 2, len(keep)).astype(np.float32).tolist()})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.string()), ("species", pa.string()), ("genus", pa.string()), ("family", pa.string()),
        ("latent", pa.list_(pa.int32())), ("patch", pa.list_(pa.int16())), ("value", pa.list_(pa.float32()))]))


def direct_counts(table: pa.Table, unit: str) -> dict:
    counts = defaultdict(int)
    for row in table.to_pylist():
        if row["species"] is None or row["genus"] is None:
            continue
        latents = row["latent"] if unit == "patches" else set(row["latent"])
        for z in latents:
            for rank in ("species", "genus", "family"):
                if row[rank] is not None:
                    counts[(rank, row[rank], z)] += 1
    return dict(counts)


def as_dict(counts: pa.Table) -> dict:
    return {(r["rank"], r["taxon"], r["latent"]): r["count"] for r in counts.to_pylist()}


def counts_in_batches(table: pa.Table, unit: str, batch_rows: int = 37) -> pa.Table:
    taxonomy = taxonomy_codes(table)
    partials = [count_firings(table.slice(i, batch_rows), taxonomy, unit) for i in range(0, table.num_rows, batch_rows)]
    return counts_by_rank(sum_counts(pa.concat_tables(partials), taxonomy.num_rows), taxonomy)


@pytest.mark.parametrize("unit", ["patches", "images"])
@pytest.mark.parametrize("dense", [True, False])
def test_counts_equal_direct_computation(unit, dense, monkeypatch):
    if not dense:  # force the sort-based path used when a dense grid would be too large
        monkeypatch.setattr("pipeline.counting.DENSE_CELLS", 1)
    table = random_activations()
    assert as_dict(counts_in_batches(table, unit)) == direct_counts(table, unit)


def direct_selection(counts: dict, t: float, lone_to_family: bool) -> dict:
    totals = defaultdict(int)
    for (rank, taxon, _), c in counts.items():
        totals[(rank, taxon)] += c
    f = {k: c / totals[k[:2]] for k, c in counts.items()}
    genus_of = {s: (g, fam) for s, g, fam in TAXA}
    n_species = defaultdict(int)
    for _, g, _ in TAXA:
        n_species[g] += 1
    selected = {}
    for (rank, s, z), f_s in f.items():
        if rank != "species":
            continue
        g, fam = genus_of[s]
        parent = ("family", fam) if (lone_to_family and n_species[g] == 1) else ("genus", g)
        f_g = f.get((*parent, z), 0.0)
        if f_s > t and f_g > t and f_s > f_g:
            selected[(s, z)] = (f_s, f_g)
    return selected


def taxonomy() -> pa.Table:
    return taxonomy_of_species(pa.table({"species": [s for s, _, _ in TAXA], "genus": [g for _, g, _ in TAXA],
                                         "family": [f for _, _, f in TAXA]}))


@pytest.mark.parametrize("t", [3e-3, 1e-2, 3e-2])
@pytest.mark.parametrize("lone", ["none", "family"])
def test_selection_equals_algorithm_1(t, lone):
    table = random_activations(seed=1)
    counts = counts_in_batches(table, "patches")
    cfg = ContrastConfig(t_freq=t, lone_species=lone, max_latents_per_species=N_LATENTS)
    got = {(r["species"], r["latent"]): (r["f_species"], r["f_genus"])
           for r in select_latents(counts, taxonomy(), cfg).to_pylist()}
    expected = direct_selection(direct_counts(table, "patches"), t, lone == "family")
    assert got.keys() == expected.keys() and len(got) > 5
    for k, (fs, fg) in expected.items():
        assert got[k] == pytest.approx((fs, fg), rel=1e-12)
    lone_selected = [k for k in got if k[0] == "G3 a"]
    assert (len(lone_selected) > 0) == (lone == "family")  # paper: nothing for a lone species


def test_scores_order_and_rank_within_species():
    """selected/ keeps every pair the rule selects, ranked; the per-species cap applies to what goes
    forward to candidates (tests/test_candidates.py), not to the selection."""
    counts = counts_in_batches(random_activations(seed=2), "patches")
    sel = select_latents(counts, taxonomy(), ContrastConfig(max_latents_per_species=3, score="ratio")).to_pylist()
    by_species = defaultdict(list)
    for r in sel:
        by_species[r["species"]].append(r)
    assert max(len(rows) for rows in by_species.values()) > 3  # the cap did not cut the selection
    for rows in by_species.values():
        assert [r["rank_in_species"] for r in rows] == list(range(len(rows)))
        ratios = [r["f_species"] / r["f_genus"] for r in rows]
        assert ratios == sorted(ratios, reverse=True) and all(r["score"] == pytest.approx(q) for r, q in zip(rows, ratios))


def test_distributed_reduce_equals_direct_computation(ray_local):
    import ray.data
    from pipeline.counting import reduce_counts

    table = random_activations(n_images=400, seed=3)
    blocks = [table.slice(i, 50) for i in range(0, table.num_rows, 50)]
    taxonomy = taxonomy_codes(table)
    counts = pa.concat_tables(list(reduce_counts(ray.data.from_arrow(blocks), taxonomy, "patches", num_partitions=3)
                                   .iter_batches(batch_format="pyarrow")))
    assert as_dict(counts) == direct_counts(table, "patches")
    assert len(counts) == len(set(as_dict(counts)))  # one row per key: fully reduced


@pytest.mark.parametrize("lone", ["none", "family"])
def test_selection_in_tasks_equals_selection_on_the_whole_table(ray_local, lone):
    """select_by_contrast_group (one contrast group per task, counts/ never on the driver) selects
    exactly what select_latents selects over all of counts/, with the same scores and ranks."""
    import ray.data
    from pipeline.selection import select_by_contrast_group

    counts = counts_in_batches(random_activations(seed=4), "patches")
    cfg = ContrastConfig(t_freq=3e-3, lone_species=lone, max_latents_per_species=N_LATENTS)
    whole = select_latents(counts, taxonomy(), cfg)
    blocks = [counts.slice(i, 40) for i in range(0, counts.num_rows, 40)]  # taxa split across blocks
    in_tasks = pa.concat_tables(list(select_by_contrast_group(ray.data.from_arrow(blocks), taxonomy(), cfg,
                                                              num_partitions=3).iter_batches(batch_format="pyarrow")))
    key = lambda r: (r["species"], r["latent"])  # noqa: E731
    assert len(whole) > 5 and sorted(in_tasks.to_pylist(), key=key) == sorted(whole.to_pylist(), key=key)
    assert ("G3 a" in set(in_tasks["species"].to_pylist())) == (lone == "family")
