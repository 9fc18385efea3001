"""One record type for an annotation: a row of traits/ (:data:`pipeline.contract.TRAITS_SCHEMA`).

A describer fills the answer's fields (status, description, body part, traits, model, prompt
version, tokens, ...); the annotate stage adds the unit it describes (annotation_id, images,
taxon, latent, boxes, measurements, evidence, confidence) with :func:`dataclasses.replace`. Statuses:
ok, background (the model called the zone background, or no zone of the pair lies on the specimen:
then nothing was asked, ``model`` is empty), low_confidence (under annotate.min_confidence: not
asked), unparsed (the raw answer is kept) and failed (the reason in ``error``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline.contract import TRAITS_SCHEMA


@dataclass(frozen=True)
class Annotation:
    # the unit described
    annotation_id: str | None = None
    image_ids: list[str] = field(default_factory=list)
    species: str | None = None
    genus: str | None = None
    latent: int | None = None
    boxes: list[list[dict]] = field(default_factory=list)
    """Per image, its regions' boxes in original pixels."""
    measurements: list[list[dict]] = field(default_factory=list)
    """Per image, its regions' model-free measurements."""
    # the answer
    description: str | None = None
    model: str | None = None
    prompt_version: str | None = None
    status: str | None = None
    latency_s: float | None = None
    body_part: str | None = None
    body_part_raw: str | None = None
    body_part_known: bool | None = None
    is_background: bool | None = None
    traits: list[dict] = field(default_factory=list)
    common_traits: list[str] = field(default_factory=list)
    parsed_as: str | None = None
    raw_answer: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int | None = None
    error: str | None = None
    # what the unit's evidence says of it, before any request
    evidence: dict | None = None
    """The pair's evidence and each image's zone's (pipeline.evidence), as candidates/ measured them."""
    confidence: float | None = None
    """pipeline.evidence.unit_confidence, in [0, 1]: known before the request."""

    @classmethod
    def not_asked(cls, status: str, *, prompt_version: str | None) -> Annotation:
        """A unit never sent: ``background`` (none of its zones lies on the specimen) or
        ``low_confidence``."""
        background = status == "background"
        return cls(status=status, prompt_version=prompt_version, attempts=0, latency_s=0.0,
                   is_background=True if background else None, body_part="background" if background else None)

    @classmethod
    def failed(cls, reason: str, *, model: str | None, prompt_version: str | None, attempts: int = 0,
               detail: str = "") -> Annotation:
        """No answer after the retries (or no request possible): ``error`` is ``reason: detail``."""
        return cls(status="failed", model=model, prompt_version=prompt_version, attempts=attempts,
                   error=f"{reason}: {detail}" if detail else reason)


def annotations_table(annotations: list[Annotation]) -> pa.Table:
    """traits/ rows, in the contract's schema."""
    return pa.Table.from_pylist([asdict(a) for a in annotations], schema=TRAITS_SCHEMA)
