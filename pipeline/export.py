"""Exports of a finished build's traits/ in the formats others read: a Hugging Face dataset folder,
a Darwin Core Archive, and image–caption shards for CLIP training.

    python -m pipeline.export --build OUT --format hf --out DIR [--config FILE.yaml] [--set key=value ...]
    python -m pipeline.export --build OUT --format dwca --out FILE.zip
    python -m pipeline.export --build OUT --format clip --out DIR

- ``hf``: ``DIR/data/train-0000i-of-0000N.parquet`` (one row per annotation, images in the Hugging
  Face ``Image`` encoding, the features in each file's schema metadata) and ``DIR/README.md``, the
  dataset card: YAML header with ``dataset_info`` (the same features), ``configs``, a licence
  placeholder and the build's provenance. ``datasets.load_dataset(DIR)`` reads it as it is, and
  ``push_to_hub`` needs nothing more (``datasets`` itself is not needed to write it).
- ``dwca``: a zip with ``meta.xml``, ``eml.xml`` (title, method, provenance), an Occurrence core
  (one row per annotated image) and a MeasurementOrFact extension (one row per described or
  measured trait of an image), linked by the occurrenceID.
- ``clip``: WebDataset shards of (image, trait caption) samples, of a species-only control on the
  same images and of held-out images (:mod:`pipeline.captions`), for ``sae-traits downstream``.

Only annotations whose status is ok or unparsed are exported unless ``include_background`` /
``include_failed`` say otherwise, and only those whose confidence is at least ``min_confidence``
(rows without one — a build made with candidates.evidence false — always). Every exported row
carries its confidence and evidence: columns of the hf dataset, measurementRemarks in the dwca. Every path goes through fsspec (``build`` and ``out`` may be
``s3://...``); the build is only read. The options are :class:`pipeline.config.ExportConfig`."""

from __future__ import annotations

import argparse
import io
import json
import math
import posixpath
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline import storage
from pipeline.annotation.describer import TEMPLATE_VERSION
from pipeline.annotation.renderings import UnitImages
from pipeline.captions import write_caption_shards
from pipeline.config import (BuildConfig, ConfigError, ExportConfig, add_config_arguments, flag_overrides, fsspec_options,
                             load_config)
from pipeline.console import PREFIX, exit_code
from pipeline.contract import IMAGE_COLUMNS, RENDERINGS_FIELD, TRAITS_SCHEMA, image_format
from pipeline.evidence import confidence_band
from pipeline.finished import FinishedBuild

PAPER = ('"Automatic Image-Level Morphological Trait Annotation for Organismal Images" (ICLR 2026)')
MISSING_LOGGED = 10  # annotations without images named in the log (all are counted)
STATUSES_ALWAYS = ("ok", "unparsed")  # background and failed rows only when the config asks for them

# --------------------------------------------------------------------------- the build read


class ExportedBuild(FinishedBuild):
    """A finished build (:class:`pipeline.finished.FinishedBuild`) as an export reads it: its
    traits/ rows with the ``statuses`` the export takes, the images they describe, and the
    provenance the card and the EML give. Refuses (ConfigError on ``build``) a folder that holds no
    finished build, or one without traits/ or with a config this version does not read."""

    def __init__(self, fs, root: str, where: str | None = None, statuses: tuple[str, ...] = STATUSES_ALWAYS,
                 min_confidence: float = 0.0):
        super().__init__(fs, root, where)
        if not self.has("traits"):
            raise ConfigError(f"build: {self.where} has no traits/ table")
        _ = self.config  # read now: a config this version does not read is refused before anything is written
        self.statuses, self.min_confidence = statuses, min_confidence

    @classmethod
    def of(cls, cfg: ExportConfig) -> ExportedBuild:
        fs, root = storage.filesystem(cfg.build, fsspec_options(cfg.storage, cfg.build))
        return cls(fs, root, cfg.build, (*STATUSES_ALWAYS, *(["background"] if cfg.include_background else []),
                                         *(["failed"] if cfg.include_failed else [])), cfg.min_confidence)

    def exported(self, table: pa.Table) -> pa.Array:
        confident = pc.greater_equal(pc.fill_null(table["confidence"], 1.0), self.min_confidence)
        return pc.and_(pc.is_in(table["status"], pa.array(self.statuses, pa.string())), confident)

    def traits(self, columns: list[str] | None = None):
        """traits/ file by file (a file is one annotate batch), only the exported rows."""
        read = list(dict.fromkeys(["status", "confidence", *columns])) if columns is not None else None
        for table in self.tables("traits", read):
            if table.num_rows:
                yield table.filter(self.exported(table))

    def saved_renderings(self) -> bool:
        """Whether traits/ holds the renderings the model was sent (annotate.save_renderings)."""
        return RENDERINGS_FIELD.name in self.columns("traits")

    def exported_image_ids(self) -> tuple[int, list[str]]:
        """(exported annotations, the distinct images they describe, sorted)."""
        n, ids = 0, set()
        for table in self.traits(["image_ids"]):
            n += table.num_rows
            ids.update(pc.list_flatten(table["image_ids"]).to_pylist())
        return n, sorted(ids)

    def image_rows(self, image_ids: list[str], columns: list[str]) -> dict[str, dict]:
        """image_id → its activations/ row (``columns``), for the given images only."""
        wanted = pa.array(image_ids, pa.string())
        rows = self.read("activations", ["image_id", *columns], lambda t: pc.is_in(t["image_id"], wanted))
        return {r["image_id"]: r for r in rows.to_pylist()}

    def describer(self) -> str:
        llm = self.config.annotate.llm
        return "described by a template of the measurements (no language model)" if llm.kind == "none" \
            else f"described by the vision-language model {llm.model} (annotate.llm.kind {llm.kind})"

    def method(self) -> str:
        """How the annotations were made, in words (the card's and the EML's method)."""
        c = self.config
        per_prompt = (f"consensus groups of {c.candidates.group_size} images" if c.annotate.images_per_prompt > 1
                      else "one image")
        return (f"Trait annotations made with sae-traits, the method of {PAPER}. Patch features of the vision "
                f"backbone {c.backbone.model} (block {c.backbone.layer}) are encoded by the sparse autoencoder "
                f"{c.sae.checkpoint}; a latent fires on a patch when its code exceeds tau = {c.sae.threshold}. "
                f"Per species, the latents that fire more often in the species than in its genus (Algorithm 1, "
                f"t = {c.contrast.t_freq}, firings counted in {c.counting.unit}; at most "
                f"{c.contrast.max_latents_per_species} per species) go forward; each one's {c.candidates.top_images} "
                f"strongest images have the latent's activation zone boxed in original image pixels and measured "
                f"without a model (area, box size, elongation, orientation, position along and across the "
                f"specimen's long axis, mean colour), then rendered ({c.annotate.render}"
                f"{', whole images' if c.annotate.mllm_only else ''}) and {self.describer()}, "
                f"{per_prompt} per prompt. No trait labels were used as input.")

    def provenance(self) -> dict:
        """The build's provenance from its manifest: when, with what, from what."""
        m, c = self.manifest, self.config
        return {"build": str(c.output), "status": m.get("status"), "started": m.get("started"),
                "finished": m.get("finished"), "source": {"format": c.source.format, "root": c.source.root},
                "backbone": {"model": c.backbone.model, "revision": c.backbone.revision, "layer": c.backbone.layer},
                "sae": {"checkpoint": c.sae.checkpoint, "revision": c.sae.revision, "threshold": c.sae.threshold},
                "contrast": {"t_freq": c.contrast.t_freq, "counting_unit": c.counting.unit,
                             "lone_species": c.contrast.lone_species},
                "annotate": {"llm": c.annotate.llm.kind, "model": c.annotate.llm.model, "render": c.annotate.render,
                             "images_per_prompt": c.annotate.images_per_prompt, "mllm_only": c.annotate.mllm_only},
                "hub": m.get("hub") or {}, "versions": m.get("versions") or {}, "summary": {
                    k: v for k, v in (m.get("summary") or {}).items() if k != "stages"}}

    def published_config(self) -> dict:
        """The resolved config as published with an export: without where it ran (ray, storage: a
        storage section's options may hold credentials), which says nothing of how the data were made."""
        config = {k: v for k, v in self.resolved.items() if k not in ("ray", "storage")}
        return {**config, "source": {k: v for k, v in config["source"].items() if k != "storage_options"}}

    def title(self, cfg: ExportConfig) -> str:
        name = posixpath.basename(self.config.source.root.rstrip("/")) or self.config.source.root
        return cfg.title or f"sae-traits trait annotations of {name}"


def licence_text(cfg: ExportConfig) -> str:
    if cfg.license == ExportConfig.model_fields["license"].default:
        return (f"Licence: {cfg.license}, a placeholder. Set the licence of the source images and of this dataset "
                "(the export's license key) before publishing.")
    return f"Licence: {cfg.license}."


def prepare_out(cfg: ExportConfig, build: FinishedBuild):
    """The output's filesystem and path, refused when it holds something (unless overwrite) or
    when it is, or holds, the build itself (overwrite would delete it)."""
    fs, out = storage.filesystem(cfg.out, fsspec_options(cfg.storage, cfg.out))
    if type(fs) is type(build.fs):
        a, b = posixpath.normpath(out), posixpath.normpath(build.root)
        if a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b.rstrip("/") + "/"):
            raise ConfigError(f"out: {cfg.out} is the build folder, inside it, or holds it; export elsewhere")
    if fs.exists(out) and (fs.isfile(out) or fs.ls(out)):
        if not cfg.overwrite:
            raise ConfigError(f"out: {cfg.out} already exists; choose another out or set overwrite (--overwrite)")
        fs.rm(out, recursive=fs.isdir(out))
    return fs, out


# --------------------------------------------------------------------------- the images of an hf row

class Pictures:
    """The images of an annotation for the hf export (and a review's sample), in prompt order: the
    renderings the model was sent — from traits/ where the build saved them
    (annotate.save_renderings), else made again from the source images by the annotate stage's
    own code (:class:`~pipeline.annotation.renderings.UnitImages`: same zones, same rendering, same
    encoder, the same bytes); with ``crop``, a crop of each image around its boxes
    (annotate.crop_margin), with no outline. An image that cannot be read any more (moved, deleted)
    leaves the annotation without images, counted in ``missing`` and said in the card."""

    def __init__(self, build: FinishedBuild, log, has_saved: bool, *, crop: bool = False, threads: int = 8):
        self.crop, self.build, self.log = crop, build, log
        self.saved = has_saved and not crop
        self.missing = 0
        if not self.saved:
            fields = [*IMAGE_COLUMNS, "latent", "patches", "grounded_patches"]
            self.candidates = {(r["image_id"], r["latent"]): r for r in build.read("candidates", fields).to_pylist()}
            self.pool = ThreadPoolExecutor(threads)
            self.local = threading.local()

    def images(self) -> UnitImages:
        """This thread's reader and renderer of a unit's images (its image reader caches per thread)."""
        if not hasattr(self.local, "images"):
            c = self.build.config
            self.local.images = UnitImages(c.annotate, c.source, c.preprocess)
        return self.local.images

    def of(self, rows: list[dict]) -> list[list[bytes]]:
        if self.saved:
            made = [(r.get(RENDERINGS_FIELD.name) or [], "no renderings saved (a failed request)") for r in rows]
        else:
            made = list(self.pool.map(self.make, rows))
        for row, (images, why) in zip(rows, made):
            if not images:
                self.missing += 1
                if self.missing <= MISSING_LOGGED:
                    self.log(f"{PREFIX} export: no images for annotation {row['annotation_id']}: {why}"
                             + (" (further ones not logged; the card gives the count)"
                                if self.missing == MISSING_LOGGED else ""))
        return [images for images, _ in made]

    def close(self) -> None:
        if not self.saved:
            self.pool.shutdown()

    def make(self, row: dict) -> tuple[list[bytes], str | None]:
        """(images, why there are none)."""
        members = [self.candidates.get((i, row["latent"])) for i in row["image_ids"]]
        try:
            if None in members:
                raise LookupError("an image of the annotation is not in candidates/")
            unit = {"species": row["species"], "genus": row["genus"], "latent": row["latent"], "members": members}
            return (self.images().crops(unit, row["boxes"]) if self.crop else self.images().prepare(unit)[0]), None
        except Exception as exc:  # the source moved since the build: the row stays, without images
            return [], f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- hf: features and rows

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the datasets Image feature's storage
IMAGE_COLUMNS_HF = ("image", "images")
# Arrow type names that the datasets library spells otherwise.
HF_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}
# What each column of the hf export holds (the card's column table); the id column is named
# for the source (BIOSCAN: bioscan_process_id, as in the paper's BIOSCAN-Traits).
HF_COLUMN_DOCS = {
    "image": "the first image of the annotation (its strongest), as the model saw it (or cropped; see the card)",
    "images": "every image of the annotation in prompt order (a consensus group has one per member)",
    "trait_description": "the trait text: the common traits of a consensus group, or the region's traits",
    "species": "the species label of the images", "genus": "the genus label", "family": "the family label",
    "image_id": "the dataset's own id of the first image (BIOSCAN: processid)",
    "image_ids": "the dataset's ids of every image of the annotation, in prompt order",
    "annotation_id": "the build's stable id of the annotation (its traits/ row)",
    "latent": "the SAE latent whose activation zone is described",
    "body_part": "the body part, normalised to the insect-anatomy vocabulary (verbatim when unknown)",
    "body_part_known": "whether body_part is in the vocabulary",
    "traits": "the structured traits (attribute, value) of the answer",
    "common_traits": "the traits a consensus answer says all images share",
    "boxes": "per image, the zone's regions as boxes in original image pixels (x1, y1 exclusive)",
    "measurements": "per image, each region's model-free measurements (area, box size, elongation, "
                    "orientation, position along/across the specimen, mean colour)",
    "model": "the model that answered (none: templated from the measurements)",
    "prompt_version": "the prompt's label and hash", "status": "ok, unparsed, background or failed",
    "confidence": "how far to trust the annotation, 0 to 1, from its evidence before the model was asked "
                  "(sae-traits docs/quality.md; from 0.65 trusted)",
    "evidence": "what the confidence rests on: the latent's evidence over the species (support, specificity, "
                "contrast, consistency, ...) and each image's zone (share on the specimen, position, regions)",
}
TRAITS_COLUMNS_HF = ("species", "genus", "image_ids", "annotation_id", "latent", "body_part", "body_part_known",
                     "traits", "common_traits", "boxes", "measurements", "model", "prompt_version", "status",
                     "confidence", "evidence")


def id_column(build_cfg: BuildConfig) -> str:
    return "bioscan_process_id" if build_cfg.source.format == "bioscan" else "image_id"


def hf_schema(id_name: str) -> pa.Schema:
    named = {"image": IMAGE_TYPE, "images": pa.list_(IMAGE_TYPE), "trait_description": pa.string(),
             "family": pa.string(), id_name: pa.string(), **{c: TRAITS_SCHEMA.field(c).type for c in TRAITS_COLUMNS_HF}}
    order = ["image", "images", "trait_description", "species", "genus", "family", id_name,
             *(c for c in TRAITS_COLUMNS_HF if c not in ("species", "genus"))]
    return pa.schema([(c, named[c]) for c in order])


def feature_dict(t: pa.DataType, image: bool = False) -> dict:
    """A column's datasets feature in its JSON form (``Features.to_dict``), from its Arrow type."""
    if pa.types.is_list(t):
        return {"feature": feature_dict(t.value_type, image), "_type": "List"}
    if image:
        return {"_type": "Image"}
    if pa.types.is_struct(t):
        return {f.name: feature_dict(f.type) for f in t}
    return {"dtype": HF_DTYPES.get(str(t), str(t)), "_type": "Value"}


def feature_yaml(t: pa.DataType, image: bool = False) -> dict:
    """The same feature as the card's YAML writes it (``dataset_info.features``, the hub's form)."""
    if pa.types.is_list(t):
        inner = feature_yaml(t.value_type, image)
        # a list of a plain type or of a struct is written flat: `list: string`, `list: [fields]`
        return {"list": inner.get("dtype") or inner.get("struct") or inner}
    if image:
        return {"dtype": "image"}
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **feature_yaml(f.type)} for f in t]}
    return {"dtype": HF_DTYPES.get(str(t), str(t))}


def hf_features(schema: pa.Schema) -> tuple[dict, list]:
    """(JSON features for the Parquet metadata, YAML features for the card)."""
    def image(f):
        return f.name in IMAGE_COLUMNS_HF
    return ({f.name: feature_dict(f.type, image(f)) for f in schema},
            [{"name": f.name, **feature_yaml(f.type, image(f))} for f in schema])


def image_suffix(data: bytes) -> str:
    fmt = image_format(data)
    return fmt.suffix if fmt else "bin"


def hf_row(row: dict, pictures: list[bytes], family: str | None, id_name: str) -> dict:
    images = [{"bytes": p, "path": f"{row['annotation_id']}-{k}.{image_suffix(p)}"} for k, p in enumerate(pictures)]
    return {"image": images[0] if images else None, "images": images, "trait_description": row["description"],
            "family": family, id_name: row["image_ids"][0] if row["image_ids"] else None,
            **{c: row[c] for c in TRAITS_COLUMNS_HF}}


def size_category(n: int) -> str:
    """The hub's size_categories tag."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


# --------------------------------------------------------------------------- hf: the export

DATA_FILES = "data/train-*"


def export_hf(cfg: ExportConfig, build: ExportedBuild, log=print) -> dict:
    fs, out = prepare_out(cfg, build)
    n_rows, image_ids = build.exported_image_ids()
    families = {i: r["family"] for i, r in build.image_rows(image_ids, ["family"]).items()}
    pictures = Pictures(build, log, build.saved_renderings(), crop=cfg.image == "crop", threads=cfg.threads)
    id_name = id_column(build.config)
    schema = hf_schema(id_name)
    features, yaml_features = hf_features(schema)
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    n_files = max(1, math.ceil(n_rows / cfg.rows_per_file))
    written = {"files": 0, "bytes": 0, "nbytes": 0}

    def write(rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=100)  # small row groups: the hub's viewer pages through them
        data = sink.getvalue().to_pybytes()
        storage.publish(fs, storage.join(out, f"data/train-{written['files']:05d}-of-{n_files:05d}.parquet"), data)
        written["files"] += 1
        written["bytes"] += len(data)
        written["nbytes"] += table.nbytes

    pending: list[dict] = []
    read = None if pictures.saved else [c for c in TRAITS_SCHEMA.names if c != RENDERINGS_FIELD.name]
    for table in build.traits(read):
        rows = table.to_pylist()
        for row, pics in zip(rows, pictures.of(rows)):
            pending.append(hf_row(row, pics, families.get(row["image_ids"][0]) if row["image_ids"] else None, id_name))
        while len(pending) >= cfg.rows_per_file:
            write(pending[:cfg.rows_per_file])
            pending = pending[cfg.rows_per_file:]
    if pending or written["files"] == 0:  # an empty export still has one (empty) file to type its columns
        write(pending)
    pictures.close()
    card = dataset_card(cfg, build, yaml_features, n_rows, written, pictures.missing, id_name)
    storage.publish(fs, storage.join(out, "README.md"), card.encode())
    log(f"{PREFIX} export: {n_rows} annotations in {written['files']} Parquet files → {cfg.out}")
    return {"format": "hf", "out": cfg.out, "rows": n_rows, "files": written["files"],
            "images_missing": pictures.missing}


def dataset_card(cfg: ExportConfig, build: ExportedBuild, yaml_features: list, n_rows: int, written: dict,
                 missing: int, id_name: str) -> str:
    provenance = build.provenance()
    header = {
        "pretty_name": build.title(cfg), "license": cfg.license, "language": ["en"],
        "task_categories": ["image-to-text"], "tags": ["biology", "morphology", "traits", "sparse-autoencoder"],
        "size_categories": [size_category(n_rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "dataset_info": {"features": yaml_features,
                         "splits": [{"name": "train", "num_bytes": written["nbytes"], "num_examples": n_rows}],
                         "download_size": written["bytes"], "dataset_size": written["nbytes"]},
        "sae_traits": provenance,
    }
    docs = {**HF_COLUMN_DOCS, id_name: HF_COLUMN_DOCS["image_id"]}
    columns = "\n".join(f"| `{f['name']}` | {docs[f['name']]} |" for f in yaml_features)
    image = ("a crop of the source image around the zone's boxes (no outline)" if cfg.image == "crop"
             else "the rendering the model was sent (annotate.render: " + build.config.annotate.render + ")")
    missing_text = f" {missing} annotations have no image: their source image could not be read." if missing else ""
    return (f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {build.title(cfg)}\n\n{build.method()}\n\n"
            f"One row per trait annotation: {n_rows} annotations with status {', '.join(build.statuses)}.{missing_text} "
            f"The image columns hold {image}.\n\n"
            f"{licence_text(cfg)}\n\n"
            f"| column | meaning |\n|---|---|\n{columns}\n\n"
            "```python\nfrom datasets import load_dataset\nds = load_dataset(\"path/to/this/folder\")  # or the hub id\n```\n\n"
            f"## Provenance\n\nBuilt by sae-traits, {provenance['started']} to {provenance['finished']}, from "
            f"`{build.config.source.root}` ({build.config.source.format}). Versions: "
            + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items())
            + ".\n\n<details><summary>The build's resolved config (manifest.json)</summary>\n\n```json\n"
            + json.dumps(build.published_config(), indent=2) + "\n```\n</details>\n")


# --------------------------------------------------------------------------- dwca

DWC = "http://rs.tdwg.org/dwc/terms/"
OCCURRENCE_ROW_TYPE = DWC + "Occurrence"
MOF_ROW_TYPE = DWC + "MeasurementOrFact"
OCCURRENCE_FILE, MOF_FILE = "occurrence.txt", "measurementorfact.txt"
OCCURRENCE_TERMS = ("occurrenceID", "basisOfRecord", "scientificName", "genus", "family")
MOF_TERMS = ("measurementID", "measurementType", "measurementValue", "measurementUnit", "measurementDeterminedBy",
             "measurementDeterminedDate", "measurementMethod", "measurementRemarks")
# A zone region's measurements as MeasurementOrFact rows: (measurementType, measurementUnit,
# the traits/ measurement fields it is made of); a row is written when they all have a value.
ZONE_MEASURES = (
    ("zone area", "square pixels", ("area_px",)),
    ("zone area as a fraction of the specimen", "", ("area_frac_specimen",)),
    ("zone box width", "pixels", ("box_w_px",)),
    ("zone box height", "pixels", ("box_h_px",)),
    ("zone elongation", "", ("elongation",)),
    ("zone orientation", "degrees", ("orientation_deg",)),
    ("zone position along the specimen's long axis", "", ("axial_pos",)),
    ("zone position across the specimen's long axis", "", ("lateral_pos",)),
    ("zone mean colour", "sRGB hex", ("colour_r", "colour_g", "colour_b")),
    ("zone mean colour name", "", ("colour_name",)),
)
MOF_COLUMNS = ("annotation_id", "image_ids", "latent", "boxes", "measurements", "description", "model",
               "prompt_version", "status", "body_part", "traits", "confidence", "evidence")


def tsv_cell(value) -> str:
    """A field of the tab-separated files (no quoting in meta.xml): tabs and line breaks become spaces."""
    if value is None:
        return ""
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def box_text(b: dict) -> str:
    return f"{b['x0']},{b['y0']}-{b['x1']},{b['y1']}"


def measure_value(fields: tuple[str, ...], m: dict):
    values = [m.get(f) for f in fields]
    if any(v is None for v in values):
        return None
    return "#{:02x}{:02x}{:02x}".format(*values) if len(values) == 3 else values[0]


def mof_rows(row: dict, build: FinishedBuild, date: str | None):
    """A traits/ row → (occurrenceID, MeasurementOrFact fields) for each of its images: the
    description, each structured trait, and each region's measurements."""
    sae = build.config.sae
    method = (f"sae-traits: activation zone of SAE latent {row['latent']} ({sae.checkpoint}, tau {sae.threshold}); "
              f"annotation by model {row['model']}, prompt version {row['prompt_version']}")
    templated = row["prompt_version"] == TEMPLATE_VERSION  # kind none: no model wrote the text
    described = method + ("; templated from the zone's measurements, no model" if templated else "; described by the model")
    describer = "sae-traits (templated)" if templated else row["model"] or "unknown model"
    part = row["body_part"]
    zones = (row.get("evidence") or {}).get("zones") or []
    for k, image_id in enumerate(row["image_ids"]):
        boxes = row["boxes"][k] if k < len(row["boxes"]) else []
        measured = row["measurements"][k] if k < len(row["measurements"]) else []
        about = (f"annotation {row['annotation_id']} ({row['status']}) of {len(row['image_ids'])} image(s)"
                 + (f"; body part {part}" if part else "") + trust_remark(row.get("confidence"), zones, k))
        facts = []
        if row["description"]:
            facts.append(("trait description", row["description"], "", describer, described,
                          f"{about}; zone boxes (original pixels) {' '.join(map(box_text, boxes))}"))
        for trait in row["traits"] or []:
            facts.append((f"{part} {trait['attribute']}" if part else trait["attribute"], trait["value"], "",
                          describer, described, about))
        for r, (box, m) in enumerate(zip(boxes, measured)):
            where = f"{about}; region {r + 1} of {len(boxes)}, box {box_text(box)} (original pixels)"
            for kind, unit, fields in ZONE_MEASURES:
                value = measure_value(fields, m)
                if value is not None:
                    facts.append((kind, value, unit, "sae-traits", method + "; measured on the zone, model-free",
                                  where))
        for n, (kind, value, unit, by, how, remarks) in enumerate(facts):
            yield image_id, (f"{row['annotation_id']}:{image_id}:{n}", kind, value, unit, by, date, how, remarks)


def trust_remark(confidence: float | None, zones: list[dict], k: int) -> str:
    """The confidence of a described trait, for its measurementRemarks (Darwin Core's measurementAccuracy
    is the potential error of a value, not how far to trust a description), with the image's zone on the specimen."""
    if confidence is None:
        return ""
    zone = f", zone {zones[k]['on_specimen']:.0%} on the specimen" if k < len(zones) else ""
    return f"; confidence {confidence:.3f} ({confidence_band(confidence)}{zone}; sae-traits evidence)"


def media_url(path: str | None, cfg: ExportConfig, build: FinishedBuild, source_fs, source_root: str) -> str | None:
    """An image's associatedMedia: under media_base_url when set, else its own URL when the source
    was read from a store (s3://, https://); a local image has none."""
    if path is None:
        return None
    if cfg.media_base_url:
        relative = posixpath.relpath(path, source_root)
        return None if relative.startswith("..") else cfg.media_base_url.rstrip("/") + "/" + relative
    return source_fs.unstrip_protocol(path) if storage.is_remote(build.config.source.root) else None


def meta_xml(media: bool) -> bytes:
    archive = ET.Element("archive", {"xmlns": "http://rs.tdwg.org/dwc/text/", "metadata": "eml.xml"})
    layout = {"encoding": "UTF-8", "fieldsTerminatedBy": "\\t", "linesTerminatedBy": "\\n", "fieldsEnclosedBy": "",
              "ignoreHeaderLines": "1"}
    for tag, row_type, location, key, terms in (
            ("core", OCCURRENCE_ROW_TYPE, OCCURRENCE_FILE, "id", OCCURRENCE_TERMS + (("associatedMedia",) if media else ())),
            ("extension", MOF_ROW_TYPE, MOF_FILE, "coreid", ("occurrenceID",) + MOF_TERMS)):
        node = ET.SubElement(archive, tag, {**layout, "rowType": row_type})
        ET.SubElement(ET.SubElement(node, "files"), "location").text = location
        ET.SubElement(node, key, {"index": "0"})
        for i, term in enumerate(terms):
            if tag == "core" or i:  # the extension's column 0 is the core id, not a term of its own
                ET.SubElement(node, "field", {"index": str(i), "term": DWC + term})
    ET.indent(archive)
    return ET.tostring(archive, encoding="utf-8", xml_declaration=True)


def eml_xml(cfg: ExportConfig, build: ExportedBuild, n_occurrences: int, n_facts: int) -> bytes:
    """The archive's metadata (EML 2.1.1, GBIF profile): title, creator, licence, abstract, method, provenance."""
    ns = "eml://ecoinformatics.org/eml-2.1.1"
    ET.register_namespace("eml", ns)
    root = ET.Element(f"{{{ns}}}eml", {"packageId": storage.stable_digest([build.config.output, str(
        build.manifest.get("started"))]), "system": "sae-traits", "scope": "system", "xml:lang": "en"})
    dataset = ET.SubElement(root, "dataset")
    ET.SubElement(dataset, "title", {"xml:lang": "en"}).text = build.title(cfg)
    for tag in ("creator", "metadataProvider"):
        ET.SubElement(ET.SubElement(dataset, tag), "organizationName").text = cfg.creator or "Not specified (set creator)"
    ET.SubElement(dataset, "pubDate").text = (build.manifest.get("finished") or "")[:10]
    ET.SubElement(dataset, "language").text = "en"
    ET.SubElement(ET.SubElement(dataset, "abstract"), "para").text = (
        f"{n_occurrences} specimen images and {n_facts} trait descriptions and measurements of their "
        f"sparse-autoencoder activation zones (statuses {', '.join(build.statuses)}). {build.method()}")
    ET.SubElement(ET.SubElement(dataset, "intellectualRights"), "para").text = licence_text(cfg)
    ET.SubElement(ET.SubElement(dataset, "contact"), "organizationName").text = cfg.creator or "Not specified (set creator)"
    methods = ET.SubElement(dataset, "methods")
    for text in (build.method(), "Provenance (the build's manifest.json): "
                 + json.dumps(build.provenance(), sort_keys=True)):
        ET.SubElement(ET.SubElement(ET.SubElement(methods, "methodStep"), "description"), "para").text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


class Archive:
    """The zip being written: members stamped with the build's finish time (the same build gives the
    same archive), tab-separated files written row by row (traits/ is never held whole)."""

    def __init__(self, path: Path, build: FinishedBuild):
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
        finished = build.manifest.get("finished") or "1980-01-01T00:00:00"
        self.stamp = tuple(int(x) for x in (finished[:4], finished[5:7], finished[8:10], finished[11:13],
                                            finished[14:16], finished[17:19]))

    def member(self, name: str) -> zipfile.ZipInfo:
        return zipfile.ZipInfo(name, date_time=self.stamp)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.zip.writestr(self.member(name), data, compress_type=zipfile.ZIP_DEFLATED)

    def write_rows(self, name: str, header, rows) -> int:
        """A header line and one line per row (cells through :func:`tsv_cell`); returns the rows written."""
        n = 0
        member = self.member(name)
        member.compress_type = zipfile.ZIP_DEFLATED
        with self.zip.open(member, "w") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as f:
            f.write("\t".join(header) + "\n")
            for row in rows:
                f.write("\t".join(map(tsv_cell, row)) + "\n")
                n += 1
        return n


def export_dwca(cfg: ExportConfig, build: ExportedBuild, log=print) -> dict:
    fs, out = prepare_out(cfg, build)
    _, image_ids = build.exported_image_ids()
    images = build.image_rows(image_ids, ["species", "genus", "family", "path"])
    source_fs, source_root = storage.filesystem(build.config.source.root, build.config.source.fsspec_options)
    media = {i: media_url(r["path"], cfg, build, source_fs, source_root) for i, r in images.items()}
    media_term = ("associatedMedia",) if any(media.values()) else ()
    date = (build.manifest.get("finished") or "")[:10] or None
    facts = ((image_id, *fact) for table in build.traits(list(MOF_COLUMNS)) for row in table.to_pylist()
             for image_id, fact in mof_rows(row, build, date))
    occurrences = ((i, cfg.basis_of_record, *(images.get(i, {}).get(k) for k in ("species", "genus", "family")),
                    *([media.get(i)] if media_term else [])) for i in image_ids)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "archive.zip"
        archive = Archive(local, build)
        with archive.zip:
            n_facts = archive.write_rows(MOF_FILE, ("occurrenceID", *MOF_TERMS), facts)
            archive.write_rows(OCCURRENCE_FILE, OCCURRENCE_TERMS + media_term, occurrences)
            archive.write_bytes("meta.xml", meta_xml(bool(media_term)))
            archive.write_bytes("eml.xml", eml_xml(cfg, build, len(image_ids), n_facts))
        # the archive is whole or absent at out: written beside it and renamed (an upload is whole already)
        target = f"{out}.partial" if storage.is_local(fs) else out
        fs.makedirs(posixpath.dirname(out) or ".", exist_ok=True)
        fs.put_file(str(local), target)
        if target != out:
            fs.mv(target, out)
    log(f"{PREFIX} export: {len(image_ids)} occurrences and {n_facts} measurements or facts → {cfg.out}")
    return {"format": "dwca", "out": cfg.out, "occurrences": len(image_ids), "measurements_or_facts": n_facts}


# --------------------------------------------------------------------------- clip

def export_clip(cfg: ExportConfig, build: ExportedBuild, log=print) -> dict:
    fs, out = prepare_out(cfg, build)
    pictures = None if cfg.clip.image == "original" else Pictures(
        build, log, build.saved_renderings(), crop=cfg.clip.image == "crop", threads=cfg.threads)
    try:
        return {**write_caption_shards(cfg.clip, build, fs, out, pictures, log), "out": cfg.out}
    finally:
        if pictures is not None:
            pictures.close()


# --------------------------------------------------------------------------- entry point

EXPORTERS = {"hf": export_hf, "dwca": export_dwca, "clip": export_clip}


def export(cfg: ExportConfig, log=print) -> dict:
    """Write the export ``cfg`` asks for; returns its figures (rows, files, ...)."""
    return EXPORTERS[cfg.format](cfg, ExportedBuild.of(cfg), log)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", help="the finished build's output folder (key build)")
    parser.add_argument("--format", help="hf (a Hugging Face dataset folder), dwca (a Darwin Core Archive) or clip "
                                         "(image–caption WebDataset shards) (key format)")
    parser.add_argument("--out", help="hf and clip: the folder; dwca: the .zip file (key out)")
    parser.add_argument("--overwrite", action="store_true", help="replace what is at out (key overwrite)")
    parser.add_argument("--min-confidence", dest="min_confidence", type=float, metavar="X",
                        help="only annotations at least this confident, e.g. 0.65 (key min_confidence)")
    add_config_arguments(parser, ExportConfig, "export.md")
    args = parser.parse_args(argv)
    flags = flag_overrides(args, ("build", "format", "out", "overwrite", "min_confidence"))
    cfg = None
    try:
        cfg = load_config(ExportConfig, args.config, [*args.overrides, *flags])
        # progress on stderr, the figures alone on stdout (for scripts)
        print(json.dumps(export(cfg, log=lambda line: print(line, file=sys.stderr, flush=True)), indent=2))
    except Exception as exc:
        return exit_code(exc, cfg.out if cfg else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
