"""The data contract is declared once (pipeline.contract) and what a build writes is exactly it."""

from dataclasses import fields

import pyarrow.dataset as ds

from pipeline.annotation.record import Annotation
from pipeline.contract import ERRORS, ERRORS_SCHEMA, RENDERINGS_FIELD, STAGES, STATE, TABLES, TRAITS_SCHEMA

# DESIGN §5's required columns: the declared schemas may add columns, never drop these.
REQUIRED = {
    "activations": {"image_id", "species", "genus", "latent", "patch", "value"},
    "counts": {"rank", "taxon", "latent", "count"},
    "selected": {"species", "genus", "latent", "f_species", "f_genus"},
    "candidates": {"image_id", "species", "genus", "latent", "patches", "boxes"},
    "traits": {"annotation_id", "image_ids", "species", "genus", "latent", "boxes", "measurements",
               "description", "model", "prompt_version", "status"},
    "errors": {"image_id", "annotation_id", "stage", "reason", "detail"},
}


def test_declared_schemas_hold_the_required_columns():
    assert set(TABLES) == set(REQUIRED)
    for name, schema in TABLES.items():
        assert REQUIRED[name] <= set(schema.names), (name, REQUIRED[name] - set(schema.names))


def test_stages_read_what_an_earlier_stage_wrote():
    written = set()
    for stage in STAGES:
        assert stage.input is None or stage.input in written, stage
        assert stage.resume_key is None or stage.resume_key in stage.schema.names, stage
        written.add(stage.output)
    assert STAGES[0].output.startswith(STATE) and [s.name for s in STAGES][1:] == [
        "encode", "count", "select", "candidates", "annotate"]


def test_the_annotation_record_is_the_traits_row():
    assert [f.name for f in fields(Annotation)] == TRAITS_SCHEMA.names


def test_a_build_writes_exactly_the_declared_schemas(demo_build):
    out, _ = demo_build
    for name, schema in TABLES.items():
        written = ds.dataset(out / name, format="parquet").schema
        expected = schema.append(RENDERINGS_FIELD) if name == "traits" else schema  # the demo saves renderings
        assert [(f.name, f.type) for f in written] == [(f.name, f.type) for f in expected], name


def test_errors_exists_with_its_schema_when_nothing_was_rejected(demo_build):
    out, manifest = demo_build
    errors = ds.dataset(out / ERRORS, format="parquet").to_table()
    assert manifest["summary"]["errors"] == 0 and errors.num_rows == 0 and errors.schema.equals(ERRORS_SCHEMA)
