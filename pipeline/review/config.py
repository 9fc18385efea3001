"""The configs of ``sae-traits review``: one per subcommand, built like the project's
others (:class:`pipeline.config.Section`: ``extra="forbid"``, a docstring per field, YAML plus
``--set key=value``, errors naming the key).

    ReviewSampleConfig   sae-traits review sample         builds, per_build, seed, out, ...
    ReviewServeConfig    sae-traits review serve          review, host, port
    ReviewScoreConfig    sae-traits review score          review, bootstrap, seed, level, ...
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from pipeline import storage
from pipeline.config import Section, StorageConfig

FLAGS = ("wrong_body_part", "hallucinated", "background")
"""What a reviewer may flag on an item, besides the rating."""
FLAG_LABELS = {"wrong_body_part": "wrong body part", "hallucinated": "hallucinated", "background": "background"}
"""How the page and the scores name each flag."""
RATINGS = (1, 2, 3, 4, 5)


def local_review_folder(path: str) -> str:
    """A review folder is local: the server appends each rating to a file there and fsyncs it."""
    if storage.is_remote(path):
        raise ValueError(f"a review folder is a local path (got {path}): ratings are appended and fsynced there")
    return path


class ReviewSampleConfig(Section):
    """``sae-traits review sample``: a blinded, seeded review set drawn from finished builds."""
    builds: list[str] = Field(default_factory=list)
    """The finished builds' output folders (local paths or fsspec URLs), one per configuration compared."""
    sweep: str | None = None
    """A sweep's folder (``sae-traits sweep --out``): each of its builds (from sweep.json), after
    ``builds``, labelled by its folder name (its varied values)."""
    labels: list[str] | None = None
    """What the scores call each build, in the order of builds (null: each folder's name). Kept in the
    key only, never shown to reviewers."""
    per_build: int = Field(default=30, ge=1)
    """Annotations drawn from each build (the paper: 30); a build with fewer gives all it has."""
    seed: int = Field(default=0, ge=0)
    """Seeds the draw and the shuffle: the same builds and seed give the same review set."""
    out: str
    """The review folder to write (local): items/ (what reviewers see), key.json (which build each
    item came from), ratings/ (one file per reviewer, written by serve)."""
    overwrite: bool = False
    """Replace an existing review folder (its ratings too); otherwise a non-empty one is refused."""
    include_unparsed: bool = True
    """Also draw annotations whose answer was not parsed (status unparsed) when they have a description:
    an export publishes them. ok ones are always drawn; background and failed ones never."""
    by_confidence: bool = False
    """Stratify each build's draw by confidence band (pipeline.evidence.CONFIDENCE_BANDS: high, medium,
    low, then annotations without a confidence) as well as by species: the bands give an annotation in
    turn, so each is represented and review score reports accuracy per band — how well the
    confidence is calibrated. Every item's confidence is in the key either way."""
    show_species: bool = True
    """Show reviewers each item's species and genus (the same for every build of one dataset, so it
    tells nothing of the build; an expert judges a description against the taxon)."""
    threads: int = Field(default=8, ge=1)
    """Threads reading and rendering source images for builds that did not save their renderings."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How s3:// builds are reached (their source images: each build's own storage section)."""

    _out_is_local = field_validator("out")(lambda cls, v: local_review_folder(v))

    @model_validator(mode="after")
    def _labels_match_builds(self) -> ReviewSampleConfig:
        if not self.builds and self.sweep is None:
            raise ValueError("builds: give at least one build (--build), or a sweep (--sweep)")
        if self.labels is not None and self.sweep is not None:
            raise ValueError("labels: a sweep's builds are labelled by their folder names; leave labels out")
        if self.labels is not None and len(self.labels) != len(self.builds):
            raise ValueError(f"labels: {len(self.labels)} given for {len(self.builds)} builds")
        if len(set(self.builds)) != len(self.builds):
            raise ValueError("builds: a build is given twice")
        return self


class ReviewServeConfig(Section):
    """``sae-traits review serve``: the rating page of a review folder, on this machine."""
    review: str
    """The review folder (written by sample)."""
    host: str = "127.0.0.1"
    """Address to listen on: loopback by default (the page has no login; a reviewer types a name)."""
    port: int = Field(default=8765, ge=0, le=65535)
    """Port to listen on (0: any free one, printed)."""

    _review_is_local = field_validator("review")(lambda cls, v: local_review_folder(v))


class ReviewScoreConfig(Section):
    """``sae-traits review score``: per build, the raw and annotator-normalised mean rating with
    bootstrap intervals, Krippendorff's alpha and flag counts (scores/ in the review folder)."""
    review: str
    """The review folder (written by sample, rated through serve)."""
    bootstrap: int = Field(default=10_000, ge=100)
    """Bootstrap resamples of a build's items for each interval."""
    level: float = Field(default=0.95, gt=0, lt=1)
    """Coverage of the (percentile) bootstrap intervals."""
    seed: int = Field(default=0, ge=0)
    """Seeds the bootstrap: the same ratings and seed give the same intervals."""
    link_builds: bool = True
    """Write a pointer to these scores into each build folder (reviews/), which the build's report shows."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How s3:// builds are reached, for their pointers."""

    _review_is_local = field_validator("review")(lambda cls, v: local_review_folder(v))


REVIEWER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
