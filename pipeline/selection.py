"""Taxonomic-contrast selection of latents per species (the paper's Algorithm 1).

    f_s(z) = C_species[s][z] / Σ_z' C_species[s][z']      f_g(z) likewise for the genus of s
    select (s, z)  ⇔  f_s(z) > t  ∧  f_g(z) > t  ∧  f_s(z) > f_g(z)

A species that is the only species of its genus has f_s = f_g, so the strict rule selects
nothing for it (the paper's behaviour, ``lone_species: none``); ``lone_species: family``
contrasts such a species against its family instead. Selected latents are ordered per species by
a score and ranked (``rank_in_species``, 0 = best); every selected pair is kept, exactly the
paper's selection — the per-species cap (``max_latents_per_species``) only limits what goes
forward to candidates (:func:`pipeline.candidates.find_candidates`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from pipeline.config import ContrastConfig
from pipeline.contract import SELECTED_SCHEMA
from pipeline.counting import labelled_rows

def rank_frequencies(counts: pa.Table, rank: str) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """One rank's counts as (taxon names, taxon code per row, latent per row, f per row), where
    f = count / (total count of that taxon) and rows are sorted by (code, latent)."""
    rows = counts.filter(pc.equal(counts["rank"], rank))
    encoded = pc.dictionary_encode(rows["taxon"]).combine_chunks()
    codes = encoded.indices.to_numpy().astype(np.int64)
    latents = rows["latent"].to_numpy().astype(np.int64)
    count = rows["count"].to_numpy().astype(np.float64)
    totals = np.bincount(codes, weights=count, minlength=len(encoded.dictionary))
    order = np.lexsort((latents, codes))
    return encoded.dictionary, codes[order], latents[order], (count / totals[codes])[order]


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


def going_forward(selected: pa.Table, max_latents_per_species: int | None) -> pa.Table:
    """The selected/ rows that go forward to candidates: each species' best ``max_latents_per_species``
    (``contrast.max_latents_per_species``; all when None)."""
    if max_latents_per_species is None:
        return selected
    return selected.filter(pc.less(selected["rank_in_species"], max_latents_per_species))


def _score(f_s: np.ndarray, f_p: np.ndarray, kind: str) -> np.ndarray:
    if kind == "difference":
        return f_s - f_p
    if kind == "ratio":
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


def select_latents(counts: pa.Table, taxonomy: pa.Table, cfg: ContrastConfig) -> pa.Table:
    """counts/ rows + species taxonomy → selected/ rows, best score first within each species.
    Integer-coded: each species row finds its parent's f by binary search on (code, latent).
    Works on any subset of counts/ that holds, for each of its species, the parent's rows too
    (what :func:`select_by_contrast_group` hands it)."""
    species_names, s_code, latent, f_s = rank_frequencies(counts, "species")
    tax = taxonomy.select(["species", "genus", "family", "lone"])
    tax = tax.take(pc.index_in(species_names, tax["species"]))  # aligned with species codes
    use_family = contrasted_with_family(tax, cfg)
    m = int(latent.max()) + 1 if len(latent) else 1
    f_parent = np.zeros(len(f_s))
    for rank, uses in (("genus", ~use_family), ("family", use_family)):
        names, p_code, p_latent, p_f = rank_frequencies(counts, rank)
        if not len(p_code):
            continue
        parent_of_species = pc.index_in(tax[rank], names).fill_null(-1).to_numpy().astype(np.int64)
        rows = np.flatnonzero(uses[s_code] & (parent_of_species[s_code] >= 0))
        keys = p_code * m + p_latent  # sorted, since rows are sorted by (code, latent)
        want = parent_of_species[s_code[rows]] * m + latent[rows]
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = keys[at] == want
        f_parent[rows[hit]] = p_f[at[hit]]
    t = cfg.t_freq
    keep = (f_s > t) & (f_parent > t) & (f_s > f_parent)
    s_code, latent, f_s, f_parent = s_code[keep], latent[keep], f_s[keep], f_parent[keep]
    score = _score(f_s, f_parent, cfg.score)
    # Best first within each species; rank = position minus the species' first position.
    order = np.lexsort((latent, -score, s_code))
    s_code, latent, f_s, f_parent, score = s_code[order], latent[order], f_s[order], f_parent[order], score[order]
    starts = np.r_[0, np.flatnonzero(s_code[1:] != s_code[:-1]) + 1] if len(s_code) else np.zeros(0, int)
    rank_in_species = np.arange(len(s_code)) - np.repeat(starts, np.diff(np.r_[starts, len(s_code)]))
    sp = pa.array(s_code)
    family_row = pa.array(use_family[s_code])
    return pa.table({
        "species": species_names.take(sp), "genus": tax["genus"].take(sp), "latent": pa.array(latent, pa.int32()),
        "f_species": f_s, "f_genus": f_parent,
        "contrast_rank": pc.if_else(family_row, "family", "genus"),
        "contrast_taxon": pc.if_else(family_row, tax["family"].take(sp), tax["genus"].take(sp)),
        "score": score, "rank_in_species": pa.array(rank_in_species, pa.int32()),
    }, schema=SELECTED_SCHEMA)


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
    per-species ``taxonomy`` (:func:`taxonomy_of_species`) travels to the tasks."""
    groups = species_contrast_groups(taxonomy, cfg)
    ranks = ("genus", "family") if cfg.lone_species == "family" else ("genus",)
    return (counts.map_batches(tag_contrast_group, batch_format="pyarrow",
                               fn_kwargs={"groups": groups, "ranks": ranks})
            .groupby(GROUP_KEY, num_partitions=num_partitions)
            .map_groups(_select_group, batch_format="pyarrow", fn_kwargs={"taxonomy": taxonomy, "cfg": cfg}))


def _select_group(group: pa.Table, taxonomy: pa.Table, cfg: ContrastConfig) -> pa.Table:
    return select_latents(group.drop_columns(GROUP_KEY), taxonomy, cfg)
