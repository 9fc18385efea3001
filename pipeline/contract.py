"""The data contract of a build: every table's schema and the one table of stages that write them.

    stage        reads             writes          resumed by        schema
    index        the source        _build/index    (redone)          INDEX_SCHEMA
    encode       _build/index      activations     image_id          ACTIVATIONS_SCHEMA
    count        activations       counts          (redone)          COUNTS_SCHEMA
    select       counts            selected        (redone)          SELECTED_SCHEMA
    candidates   activations       candidates      (redone)          CANDIDATES_SCHEMA
    annotate     candidates        traits          annotation_id     TRAITS_SCHEMA
    (any)        rejected rows     errors          (de-duplicated)   ERRORS_SCHEMA

The build's bookkeeping (what to clear, what to resume, what to count), the report's column lists,
the columns carried from stage to stage and the contract tests all read :data:`STAGES`; column
names follow DESIGN §5 (extra columns are allowed, none of the required ones may go)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

STATE = "_build"  # resume state under the output: the config, the index, stage markers, fault switches
# The version of the tables' meaning: part of every stage's fingerprint (pipeline.fingerprint). Bump
# it when a stage writes different rows from the same inputs, so no later build reuses older rows.
CONTRACT_VERSION = "2"  # 2: candidates/ holds every selected pair, with evidence; traits/ confidence

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("species", pa.string()), ("genus", pa.string()), ("family", pa.string()),
    ("split", pa.string()), ("path", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64()),
])
# Where an image's pixels came from and how they map onto the model input (pipeline.preprocessing.Geometry).
GEOMETRY_SCHEMA = pa.schema([
    ("orig_w", pa.int32()), ("orig_h", pa.int32()), ("scale_x", pa.float64()), ("scale_y", pa.float64()),
    ("offset_x", pa.float64()), ("offset_y", pa.float64()), ("input_size", pa.int32()), ("patch_px", pa.int32()),
])
# The columns that let a later stage (candidates, annotate, the report) find and re-read an image.
IMAGE_COLUMNS = ("image_id", "species", "genus", "path", "source_file", "source_row", *GEOMETRY_SCHEMA.names)

ACTIVATIONS_SCHEMA = pa.schema([
    *INDEX_SCHEMA, *GEOMETRY_SCHEMA,
    ("latent", pa.list_(pa.int32())), ("patch", pa.list_(pa.int16())), ("value", pa.list_(pa.float32())),
    ("n_firings", pa.int32()),
])
COUNTS_SCHEMA = pa.schema([("rank", pa.string()), ("taxon", pa.string()), ("latent", pa.int32()), ("count", pa.int64())])
SELECTED_SCHEMA = pa.schema([
    ("species", pa.string()), ("genus", pa.string()), ("latent", pa.int32()),
    ("f_species", pa.float64()), ("f_genus", pa.float64()), ("f_elsewhere", pa.float64()),
    ("contrast_rank", pa.string()), ("contrast_taxon", pa.string()),
    ("score", pa.float64()), ("rank_in_species", pa.int32()),
])
BOX_TYPE = pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32())])
# Evidence (pipeline.evidence): of a selected (species, latent) pair, from its candidate zones, and of one zone.
PAIR_EVIDENCE_TYPE = pa.struct([
    ("support", pa.float64()), ("specificity", pa.float64()), ("contrast", pa.float64()), ("grounded", pa.float64()),
    ("on_specimen", pa.float64()), ("placement_spread", pa.float64()), ("size_spread", pa.float64()),
    ("consistency", pa.float64()), ("compactness", pa.float64()), ("partness", pa.float64()),
    ("regions", pa.float64()), ("zones", pa.int32()), ("score", pa.float64()),
])
ZONE_EVIDENCE_TYPE = pa.struct([
    ("on_specimen", pa.float64()), ("regions", pa.int32()), ("largest_share", pa.float64()), ("grounded", pa.bool_()),
    ("grounded_share", pa.float64()), ("grounded_regions", pa.int32()), ("grounded_largest_share", pa.float64()),
    ("axial", pa.float64()), ("lateral", pa.float64()), ("specimen_share", pa.float64()),
])
CANDIDATE_EVIDENCE_TYPE = pa.struct([("pair", PAIR_EVIDENCE_TYPE), ("zone", ZONE_EVIDENCE_TYPE)])
TRAIT_EVIDENCE_TYPE = pa.struct([("pair", PAIR_EVIDENCE_TYPE), ("zones", pa.list_(ZONE_EVIDENCE_TYPE))])
# One row per (image, latent) for every selected pair: the images its evidence was measured on
# (strongest first); `forward` rows are those of the pairs ranked within contrast.max_latents_per_species,
# the only ones annotated. image_rank and consensus_group count grounded zones only (null otherwise);
# boxes are those of the grounded regions (grounded_patches: what is outlined and described), or of
# every region of a zone with none.
CANDIDATES_SCHEMA = pa.schema([
    *(ACTIVATIONS_SCHEMA.field(name) for name in IMAGE_COLUMNS),
    ("latent", pa.int32()), ("patches", pa.list_(pa.int16())), ("activation_sum", pa.float64()),
    ("latent_score", pa.float64()), ("latent_rank", pa.int32()),
    ("image_rank", pa.int32()), ("consensus_group", pa.int32()), ("boxes", pa.list_(BOX_TYPE)),
    ("grounded_patches", pa.list_(pa.int16())), ("evidence", CANDIDATE_EVIDENCE_TYPE), ("forward", pa.bool_()),
])
MEASUREMENT_TYPE = pa.struct([
    ("area_px", pa.int64()), ("area_frac_specimen", pa.float64()),
    ("box_w_px", pa.int32()), ("box_h_px", pa.int32()),
    ("elongation", pa.float64()), ("orientation_deg", pa.float64()),
    ("axial_pos", pa.float64()), ("lateral_pos", pa.float64()),
    ("colour_r", pa.int32()), ("colour_g", pa.int32()), ("colour_b", pa.int32()), ("colour_name", pa.string()),
])
TRAIT_TYPE = pa.struct([("attribute", pa.string()), ("value", pa.string())])
# One row per annotation; pipeline.annotation.record.Annotation has exactly these fields.
TRAITS_SCHEMA = pa.schema([
    ("annotation_id", pa.string()), ("image_ids", pa.list_(pa.string())),
    ("species", pa.string()), ("genus", pa.string()), ("latent", pa.int32()),
    ("boxes", pa.list_(pa.list_(BOX_TYPE))), ("measurements", pa.list_(pa.list_(MEASUREMENT_TYPE))),
    ("description", pa.string()), ("model", pa.string()), ("prompt_version", pa.string()),
    ("status", pa.string()), ("latency_s", pa.float64()),
    ("body_part", pa.string()), ("body_part_raw", pa.string()), ("body_part_known", pa.bool_()),
    ("is_background", pa.bool_()), ("traits", pa.list_(TRAIT_TYPE)), ("common_traits", pa.list_(pa.string())),
    ("parsed_as", pa.string()), ("raw_answer", pa.string()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("attempts", pa.int32()), ("error", pa.string()),
    ("evidence", TRAIT_EVIDENCE_TYPE), ("confidence", pa.float64()),
])
RENDERINGS_FIELD = pa.field("renderings", pa.list_(pa.binary()))  # traits/ with annotate.save_renderings
ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("annotation_id", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
ERRORS = "errors"  # the output folder of ERRORS_SCHEMA rows


@dataclass(frozen=True)
class ImageFormat:
    """An image format as its first bytes tell it (never its file name): Pillow's name for it, its
    MIME type and its file suffix."""
    pillow: str
    mime: str
    suffix: str
    magic: bytes
    """A pattern matched at the start of the bytes."""


IMAGE_FORMATS = (
    ImageFormat("JPEG", "image/jpeg", "jpg", rb"\xff\xd8\xff"),
    ImageFormat("PNG", "image/png", "png", rb"\x89PNG\r\n\x1a\n"),
    ImageFormat("WEBP", "image/webp", "webp", rb"RIFF.{4}WEBP"),
    ImageFormat("GIF", "image/gif", "gif", rb"GIF8[79]a"),
    ImageFormat("TIFF", "image/tiff", "tif", rb"II\*\x00|MM\x00\*"),
)


def image_format(data: bytes) -> ImageFormat | None:
    """The format whose signature ``data`` starts with, or None."""
    head = bytes(data[:16])
    return next((f for f in IMAGE_FORMATS if re.match(f.magic, head, re.DOTALL)), None)


@dataclass(frozen=True)
class Stage:
    name: str
    input: str | None
    """The output folder it reads (None: the source)."""
    output: str
    """Its output folder under the build's output root."""
    schema: pa.Schema
    resume_key: str | None = None
    """Row id by which a killed run's output is kept and only the missing rows are redone; None:
    a partial output is cleared and the stage redone (it is cheap)."""
    reads: tuple[str, ...] = ()
    """The config keys (a key, or a whole section) whose values its rows depend on; runtime keys
    under them never count (pipeline.fingerprint)."""
    reads_stages: tuple[str, ...] = ()
    """The stages whose outputs it reads (their fingerprints are part of its own)."""


STAGES: tuple[Stage, ...] = (
    Stage("index", None, f"{STATE}/index", INDEX_SCHEMA, reads=("source",)),
    Stage("encode", f"{STATE}/index", "activations", ACTIVATIONS_SCHEMA, resume_key="image_id",
          reads=("preprocess", "backbone", "sae"), reads_stages=("index",)),
    Stage("count", "activations", "counts", COUNTS_SCHEMA, reads=("counting",), reads_stages=("index", "encode")),
    Stage("select", "counts", "selected", SELECTED_SCHEMA, reads=("contrast",), reads_stages=("index", "count")),
    Stage("candidates", "activations", "candidates", CANDIDATES_SCHEMA,
          reads=("contrast.max_latents_per_species", "contrast.score", "candidates", "annotate.min_on_specimen",
                 "preprocess"), reads_stages=("encode", "select")),
    Stage("annotate", "candidates", "traits", TRAITS_SCHEMA, resume_key="annotation_id",
          reads=("annotate", "preprocess"), reads_stages=("candidates",)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
STAGE = {stage.name: stage for stage in STAGES}
# Every folder a build writes, in stage order, then errors/.
TABLES: dict[str, pa.Schema] = {**{s.output: s.schema for s in STAGES if not s.output.startswith(STATE)},
                                ERRORS: ERRORS_SCHEMA}
