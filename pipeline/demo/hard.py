"""Hard planted data: the demo's specimens with the confounds of a real collection, and their ground truth.

    generate_hard_dataset(root, images_per_species=16)    # the BIOSCAN layout, as the demo's

Each species still carries one planted part its congeners lack (``ground_truth.csv``: its box in
each photo that shows it), but the photos are made to mislead a ranking by frequency alone:

- **one plate per species**: every species is photographed on a background tint of its own within
  its genus (tints recur across genera), as BIOSCAN photographs a plate at a time, so a latent for
  that plate's background passes the taxonomic contrast;
- **a pale part on a pale background**: *Pallidomyia eburnea*'s part is a spot of the plate's own
  colour inside the thorax, so whatever fires on it fires on the background too;
- **a part in half of the photos**: *Pallidomyia dimidiata* shows its red head in every second photo;
- **an artefact shared by a genus**: every *Acuomyia* is pinned through the thorax, every
  *Chartapis* photographed beside a collection label;
- **any pose**: specimens rotated by any angle, mirrored, smaller and off-centre.

The easy demo (:mod:`pipeline.demo.specimens`) is unchanged; ``benchmarks/bench_quality.py`` builds
on this data and scores each ranking against its ground truth."""

from __future__ import annotations

from pipeline.demo.specimens import PLATE, BodyPlan, Genus, Plate, generate_demo_dataset

PLATES = {"cream": Plate((236, 232, 220), "speckle"), "blue": Plate((196, 214, 240), "weave"),
          "rose": Plate((240, 200, 214), "mottle"), "sage": Plate((202, 232, 198), "speckle"),
          "sand": Plate((236, 220, 184), "weave")}

HARD_GENERA: tuple[Genus, ...] = (
    Genus("Diptera", "Confusidae", "Confusinae", "Pallidomyia",
          BodyPlan((72, 66, 60), 32, (40, 36), (56, 40), 0, (66, 30), 24, 62, 34),
          {"eburnea": "pale_thorax_window", "dimidiata": "red_head", "aurantinota": "orange_thorax_spot"},
          plates={"eburnea": PLATES["rose"], "dimidiata": PLATES["sage"], "aurantinota": PLATES["blue"]},
          visible={"dimidiata": 0.5}),
    Genus("Diptera", "Confusidae", "Acuinae", "Acuomyia",
          BodyPlan((112, 86, 62), 30, (38, 34), (60, 34), 0, (70, 22), 18, 58, 40),
          {"viridicauda": "green_abdomen_tip", "roseipennis": "magenta_wing_tip"}, artefact="pin",
          plates={"viridicauda": PLATES["cream"], "roseipennis": PLATES["sand"]}),
    Genus("Hymenoptera", "Chartidae", "Chartinae", "Chartapis",
          BodyPlan((48, 44, 42), 30, (40, 38), (58, 44), 8, (62, 22), 30, 60, 38),
          {"cyanothorax": "cyan_thorax", "violacea": "violet_abdomen_spot"}, artefact="label",
          plates={"cyanothorax": PLATES["rose"], "violacea": PLATES["blue"]}),
    Genus("Hymenoptera", "Chartidae", "Fasciatinae", "Fasciata",
          BodyPlan((112, 108, 92), 28, (36, 30), (64, 34), 20, (64, 20), 20, 62, 44),
          {"caerulea": "wing_spot", "flavocincta": "banded_abdomen"},
          plates={"caerulea": PLATES["cream"], "flavocincta": PLATES["rose"]}),
)


def generate_hard_dataset(root, *, images_per_species: int = 16, n_unlabelled: int = 8, seed: int = 0) -> dict:
    """Write the hard planted data under ``root``: :func:`~pipeline.demo.specimens.generate_demo_dataset`'s
    layout, files and summary, over :data:`HARD_GENERA` in any pose; the summary's species also say
    their part's visible share, their plate and their genus's artefact."""
    summary = generate_demo_dataset(root, images_per_species=images_per_species, n_unlabelled=n_unlabelled,
                                    seed=seed, genera=HARD_GENERA, free_pose=True)
    for genus in HARD_GENERA:
        for epithet in genus.parts:
            summary["species"][f"{genus.name} {epithet}"] |= {
                "visible": genus.visible.get(epithet, 1.0), "plate": vars(genus.plates.get(epithet, PLATE)),
                "artefact": genus.artefact}
    return summary
