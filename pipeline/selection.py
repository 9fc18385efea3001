"""Taxonomic-contrast selection of latents per species (the paper's Algorithm 1).

    f_s(z) = C_species[s][z] / Σ_z' C_species[s][z']      f_g(z) likewise for the genus of s
    select (s, z)  ⇔  f_s(z) > t  ∧  f_g(z) > t  ∧  f_s(z) > f_g(z)

A species that is the only species of its genus has f_s = f_g, so the strict rule selects
nothing for it (the paper's behaviour, ``lone_species: none``); ``lone_species: family``
contrasts such a species against its family instead. Selected latents are ordered per species by
a score and capped (``max_latents_per_species``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ContrastConfig

SELECTED_SCHEMA = pa.schema([
    ("species", pa.string()), ("genus", pa.string()), ("latent", pa.int32()),
    ("f_species", pa.float64()), ("f_genus", pa.float64()),
    ("contrast_rank", pa.string()), ("contrast_taxon", pa.string()),
    ("score", pa.float64()), ("rank_in_species", pa.int32()),
])


def frequencies(counts: pa.Table) -> pa.Table:
    """Add ``freq`` = count / (total count of the same rank and taxon)."""
    totals = counts.group_by(["rank", "taxon"], use_threads=False).aggregate([("count", "sum")])
    joined = counts.join(totals, ["rank", "taxon"], join_type="inner", use_threads=False)
    return joined.append_column("freq", pc.divide(pc.cast(joined["count"], pa.float64()),
                                                  pc.cast(joined["count_sum"], pa.float64())))


def taxonomy_of_species(index: pa.Table) -> pa.Table:
    """One row per labelled species: species, genus, family, and whether it is alone in its genus."""
    labelled = index.filter(pc.and_(pc.is_valid(index["species"]), pc.is_valid(index["genus"])))
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
    if kind == "ratio":
        return f_s / f_p
    if kind == "log_ratio_weighted":
        return f_s * np.log(f_s / f_p)
    raise ValueError(f"contrast.score: unknown score {kind!r}")


def select_latents(counts: pa.Table, taxonomy: pa.Table, cfg: ContrastConfig) -> pa.Table:
    """counts/ rows + species taxonomy → selected/ rows, best score first within each species."""
    freq = frequencies(counts)
    species = freq.filter(pc.equal(freq["rank"], "species"))
    species = pa.table({"species": species["taxon"], "latent": species["latent"], "f_species": species["freq"]})
    species = species.join(taxonomy.select(["species", "genus", "family", "lone"]), "species", use_threads=False)
    use_family = pc.and_(species["lone"], pc.is_valid(species["family"])) if cfg.lone_species == "family" \
        else pa.array([False] * species.num_rows)
    species = species.append_column("contrast_rank", pc.if_else(use_family, "family", "genus"))
    species = species.append_column("contrast_taxon", pc.if_else(use_family, species["family"], species["genus"]))
    parents = freq.select(["rank", "taxon", "latent", "freq"]).rename_columns(
        ["contrast_rank", "contrast_taxon", "latent", "f_genus"])
    pairs = species.join(parents, ["contrast_rank", "contrast_taxon", "latent"], use_threads=False)
    t = cfg.t_freq
    keep = pc.and_(pc.and_(pc.greater(pairs["f_species"], t), pc.greater(pairs["f_genus"], t)),
                   pc.greater(pairs["f_species"], pairs["f_genus"]))
    pairs = pairs.filter(keep)
    score = _score(pairs["f_species"].to_numpy(), pairs["f_genus"].to_numpy(), cfg.score)
    pairs = pairs.append_column("score", pa.array(score, pa.float64()))
    pairs = pairs.sort_by([("species", "ascending"), ("score", "descending"), ("latent", "ascending")])
    # Rank within species: position minus the species' first position (rows are sorted by species).
    sp = pairs["species"].to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(sp[1:] != sp[:-1]) + 1] if len(sp) else np.zeros(0, int)
    first = np.repeat(starts, np.diff(np.r_[starts, len(sp)]))
    rank = np.arange(len(sp)) - first
    pairs = pairs.append_column("rank_in_species", pa.array(rank, pa.int32()))
    pairs = pairs.filter(pc.less(pairs["rank_in_species"], cfg.max_latents_per_species))
    return pairs.select(SELECTED_SCHEMA.names).cast(SELECTED_SCHEMA)
