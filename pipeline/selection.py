"""Taxonomic-contrast selection of latents per species (the paper's Algorithm 1).

    f_s(z) = C_species[s][z] / Σ_z' C_species[s][z']      f_g(z) likewise for the genus of s
    select (s, z)  ⇔  f_s(z) > t  ∧  f_g(z) > t  ∧  f_s(z) > f_g(z)

A species that is the only species of its genus has f_s = f_g, so the strict rule selects
nothing for it (the paper's behaviour, ``lone_species: none``); ``lone_species: family``
contrasts such a species against its family instead. Selected latents are ordered per species by
a score and ranked (``rank_in_species``, 0 = best); every selected pair is kept, exactly the
paper's selection. The candidates stage ranks them again when ``contrast.score`` is evidence, and
only the best ``max_latents_per_species`` go forward to be annotated (:mod:`pipeline.candidates`).
``f_elsewhere`` is the latent's frequency over every other genus, what the evidence's specificity
reads (:mod:`pipeline.evidence`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from pipeline.config import ContrastConfig
from pipeline.contract import SELECTED_SCHEMA
from pipeline.counting import labelled_rows

def rank_frequencies(counts: pa.Table, rank: str) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One rank's counts as (taxon names, taxon code per row, latent per row, f per row, total per
    taxon code), where f = count / (total count of that taxon) and rows are sorted by (code, latent)."""
    rows = counts.filter(pc.equal(counts["rank"], rank))
    encoded = pc.dictionary_encode(rows["taxon"]).combine_chunks()
    codes = encoded.indices.to_numpy().astype(np.int64)
    latents = rows["latent"].to_numpy().astype(np.int64)
    count = rows["count"].to_numpy().astype(np.float64)
    totals = np.bincount(codes, weights=count, minlength=len(encoded.dictionary))
    order = np.lexsort((latents, codes))
    return encoded.dictionary, codes[order], latents[order], (count / totals[codes])[order], totals


def latent_totals(counts: pa.Table) -> pa.Table:
    """Firings of each latent over every genus: (latent, count), what f_elsewhere is taken from."""
    return _sum_by_latent(counts.filter(pc.equal(counts["rank"], "genus")))


def latent_totals_of(counts: ray.data.Dataset) -> pa.Table:
    """:func:`latent_totals` of counts/ as a Ray Dataset: one small table per block (at most a row
    per latent), summed in the driver."""
    return _sum_by_latent(pa.concat_tables(ray.get(counts.map_batches(latent_totals, batch_format="pyarrow")
                                                   .to_arrow_refs())))


def _sum_by_latent(rows: pa.Table) -> pa.Table:
    return rows.group_by(["latent"], use_threads=False).aggregate([("count", "sum")]).rename_columns(["latent", "count"])


def taxonomy_of_species(index: pa.Table) -> pa.Table:
    """One row per labelled species: species, genus, family, and whether it is alone in its genus."""
    labelled = labelled_rows(index)
    species = labelled.group_by(["species"], use_threads=False).aggregate(
        [("genus", "min"), ("family", "min"), ([], "count_all")])
    species = pa.table({"species": species["species"], "genus": species["genus_min"],
                        "family": species["family_min"], "n_images": species["count_all"]})
    per_genus = species.group_by(["genus"], use_threads=False).aggregate([([], "count_all")])
    species = species.join(per_genus, "genus", use_threads=False)
    return species.append_column("lone", pc.equal(species["count_all"], 1)).drop_columns(["count_all"])


def _score(f_s: np.ndarray, f_p: np.ndarray, kind: str) -> np.ndarray:
    if kind == "difference":
        return f_s - f_p
    if kind in ("ratio", "evidence"):  # evidence: ratio here, the evidence ranking after the candidates' pixels
        return f_s / f_p
    if kind == "log_ratio_weighted":
        return f_s * np.log(f_s / f_p)
    raise ValueError(f"contrast.score: unknown score {kind!r}")


def contrasted_with_family(taxonomy: pa.Table, cfg: ContrastConfig) -> np.ndarray:
    """Per taxonomy row: whether that species is contrasted against its family, not its genus
    (``contrast.lone_species: family``, a species alone in its genus whose family is known)."""
    if cfg.lone_species != "family":
        return np.zeros(taxonomy.num_rows, bool)
    return (taxonomy["lone"].fill_null(False).to_numpy(zero_copy_only=False)
            & pc.is_valid(taxonomy["family"]).to_numpy(zero_copy_only=False))


def select_latents(counts: pa.Table, taxonomy: pa.Table, cfg: ContrastConfig, totals: pa.Table | None = None) -> pa.Table:
    """counts/ rows + species taxonomy → selected/ rows, best score first within each species.
    Integer-coded: each species row finds its parent's f by binary search on (code, latent).
    Works on any subset of counts/ that holds, for each of its species, the parent's rows too
    (what :func:`select_by_contrast_group` hands it), given the :func:`latent_totals` of the whole
    (``totals``; by default those of ``counts``)."""
    species_names, s_code, latent, f_s, s_totals = rank_frequencies(counts, "species")
    tax = taxonomy.select(["species", "genus", "family", "lone"])
    tax = tax.take(pc.index_in(species_names, tax["species"]))  # aligned with species codes
    use_family = contrasted_with_family(tax, cfg)
    m = int(latent.max()) + 1 if len(latent) else 1
    f_parent = np.zeros(len(f_s))
    parent_total = np.zeros(len(f_s))
    for rank, uses in (("genus", ~use_family), ("family", use_family)):
        names, p_code, p_latent, p_f, p_totals = rank_frequencies(counts, rank)
        if not len(p_code):
            continue
        parent_of_species = pc.index_in(tax[rank], names).fill_null(-1).to_numpy().astype(np.int64)
        rows = np.flatnonzero(uses[s_code] & (parent_of_species[s_code] >= 0))
        keys = p_code * m + p_latent  # sorted, since rows are sorted by (code, latent)
        want = parent_of_species[s_code[rows]] * m + latent[rows]
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = keys[at] == want
        f_parent[rows[hit]] = p_f[at[hit]]
        parent_total[rows[hit]] = p_totals[p_code[at[hit]]]
    t = cfg.t_freq
    keep = (f_s > t) & (f_parent > t) & (f_s > f_parent)
    s_code, latent, f_s, f_parent = s_code[keep], latent[keep], f_s[keep], f_parent[keep]
    # The species' own genus: its parent, or (contrasted with its family) the species itself, alone in it.
    own_total = np.where(use_family[s_code], s_totals[s_code], parent_total[keep])
    own_count = np.where(use_family[s_code], f_s, f_parent) * own_total
    f_elsewhere = _elsewhere(latent, own_count, own_total, latent_totals(counts) if totals is None else totals)
    score = _score(f_s, f_parent, cfg.score)
    # Best first within each species; rank = position minus the species' first position.
    order = np.lexsort((latent, -score, s_code))
    s_code, latent, f_s, f_parent, score = s_code[order], latent[order], f_s[order], f_parent[order], score[order]
    f_elsewhere = f_elsewhere[order]
    starts = np.r_[0, np.flatnonzero(s_code[1:] != s_code[:-1]) + 1] if len(s_code) else np.zeros(0, int)
    rank_in_species = np.arange(len(s_code)) - np.repeat(starts, np.diff(np.r_[starts, len(s_code)]))
    sp = pa.array(s_code)
    family_row = pa.array(use_family[s_code])
    return pa.table({
        "species": species_names.take(sp), "genus": tax["genus"].take(sp), "latent": pa.array(latent, pa.int32()),
        "f_species": f_s, "f_genus": f_parent, "f_elsewhere": f_elsewhere,
        "contrast_rank": pc.if_else(family_row, "family", "genus"),
        "contrast_taxon": pc.if_else(family_row, tax["family"].take(sp), tax["genus"].take(sp)),
        "score": score, "rank_in_species": pa.array(rank_in_species, pa.int32()),
    }, schema=SELECTED_SCHEMA)


def _elsewhere(latent: np.ndarray, own_count: np.ndarray, own_total: np.ndarray, totals: pa.Table) -> np.ndarray:
    """Per row, the latent's frequency over every genus but the species' own (0 when there is none)."""
    by_latent = np.zeros(int(max(latent.max(initial=0), pc.max(totals["latent"]).as_py() or 0)) + 1)
    by_latent[totals["latent"].to_numpy()] = totals["count"].to_numpy()
    rest = by_latent.sum() - own_total
    return np.divide(by_latent[latent] - own_count, rest, out=np.zeros(len(latent)), where=rest > 0).clip(0)


# --------------------------------------------------------------------------- in Ray tasks

GROUP_KEY = ["contrast_rank", "contrast_taxon"]


def species_contrast_groups(taxonomy: pa.Table, cfg: ContrastConfig) -> pa.Table:
    """Per labelled species, the taxon it is contrasted against: (species, contrast_rank, contrast_taxon)."""
    family = pa.array(contrasted_with_family(taxonomy, cfg))
    return pa.table({"species": taxonomy["species"], "contrast_rank": pc.if_else(family, "family", "genus"),
                     "contrast_taxon": pc.if_else(family, taxonomy["family"], taxonomy["genus"])})


def tag_contrast_group(counts: pa.Table, groups: pa.Table, ranks: tuple[str, ...]) -> pa.Table:
    """counts/ rows with the contrast group they belong to: a species row joins its parent's group,
    a genus or family row is its own; ranks no species is contrasted against are dropped."""
    counts = counts.filter(pc.is_in(counts["rank"], pa.array(["species", *ranks])))
    is_species = pc.equal(counts["rank"], "species")
    own = counts.filter(pc.invert(is_species))
    own = own.append_column("contrast_rank", own["rank"]).append_column("contrast_taxon", own["taxon"])
    species = counts.filter(is_species)
    at = pc.index_in(species["taxon"], groups["species"])
    species = species.append_column("contrast_rank", groups["contrast_rank"].take(at)) \
                     .append_column("contrast_taxon", groups["contrast_taxon"].take(at))
    return pa.concat_tables([species, own])


def select_by_contrast_group(counts: ray.data.Dataset, taxonomy: pa.Table, cfg: ContrastConfig,
                             num_partitions: int | None = None) -> ray.data.Dataset:
    """counts/ as a Ray Dataset → selected/ rows, selected in tasks, one contrast group (a genus,
    or the family of lone species) at a time: nothing on the driver grows with counts/, only the
    per-species ``taxonomy`` (:func:`taxonomy_of_species`) and the per-latent totals travel to the tasks."""
    totals = latent_totals_of(counts)
    groups = species_contrast_groups(taxonomy, cfg)
    ranks = ("genus", "family") if cfg.lone_species == "family" else ("genus",)
    return (counts.map_batches(tag_contrast_group, batch_format="pyarrow",
                               fn_kwargs={"groups": groups, "ranks": ranks})
            .groupby(GROUP_KEY, num_partitions=num_partitions)
            .map_groups(_select_group, batch_format="pyarrow",
                        fn_kwargs={"taxonomy": taxonomy, "cfg": cfg, "totals": totals}))


def _select_group(group: pa.Table, taxonomy: pa.Table, cfg: ContrastConfig, totals: pa.Table) -> pa.Table:
    return select_latents(group.drop_columns(GROUP_KEY), taxonomy, cfg, totals)
