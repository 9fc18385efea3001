"""The annotate stage: candidates → traits/ rows (measurements, renderings, description).

With ``annotate.llm.kind: none`` (the default until the annotator issue) the description is
templated from the model-free measurements. The LLM backends slot in behind
:meth:`AnnotateCandidates.describe` without changing the rest of the stage."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.boxes import region_masks
from pipeline.candidates import BOX_TYPE
from pipeline.config import AnnotateConfig, PreprocessConfig, SourceConfig
from pipeline.errors import ImageRejected, Rejected
from pipeline.measurements import describe_measurements, measure_region, segment_specimen
from pipeline.preprocessing import Geometry, decode_image
from pipeline.renderings import render_crop, render_overlay
from pipeline.sources import ImageReader

PROMPT_VERSION = "template-v1"
MEASUREMENT_TYPE = pa.struct([
    ("area_px", pa.int64()), ("area_frac_specimen", pa.float64()),
    ("box_w_px", pa.int32()), ("box_h_px", pa.int32()),
    ("elongation", pa.float64()), ("orientation_deg", pa.float64()),
    ("axial_pos", pa.float64()), ("lateral_pos", pa.float64()),
    ("colour_r", pa.int32()), ("colour_g", pa.int32()), ("colour_b", pa.int32()), ("colour_name", pa.string()),
])
TRAITS_SCHEMA = pa.schema([
    ("annotation_id", pa.string()), ("image_ids", pa.list_(pa.string())),
    ("species", pa.string()), ("genus", pa.string()), ("latent", pa.int32()),
    ("boxes", pa.list_(pa.list_(BOX_TYPE))), ("measurements", pa.list_(pa.list_(MEASUREMENT_TYPE))),
    ("description", pa.string()), ("model", pa.string()), ("prompt_version", pa.string()),
    ("status", pa.string()), ("latency_s", pa.float64()),
])
RENDERINGS_FIELD = pa.field("renderings", pa.list_(pa.binary()))


def annotation_id(species: str, latent: int, image_ids: list[str]) -> str:
    """Stable across runs: the same request always has the same id (resume, de-duplication)."""
    return storage.stable_digest([PROMPT_VERSION, species, str(latent), *image_ids])


class AnnotateCandidates:
    """Callable over a candidates/ batch (pyarrow) → (traits rows, rejected)."""

    def __init__(self, cfg: AnnotateConfig, source: SourceConfig, preprocess: PreprocessConfig):
        self.cfg = cfg
        self.preprocess = preprocess
        self.reader = ImageReader(source)

    def load_rgb(self, row: dict) -> np.ndarray:
        try:
            data = self.reader.read(row["path"], row["source_file"], row["source_row"])
        except FileNotFoundError as exc:
            raise ImageRejected("missing_file", str(exc)) from None
        return np.asarray(decode_image(data, self.preprocess))

    def render(self, rgb: np.ndarray, regions: list[tuple[dict, np.ndarray]]) -> list[bytes]:
        if self.cfg.render == "overlay":
            union = np.logical_or.reduce([m for _, m in regions])
            return [render_overlay(rgb, union)]
        return [render_crop(rgb, box, margin_frac=self.cfg.crop_margin) for box, _ in regions]

    def describe(self, measurements: list[dict]) -> tuple[str, str]:
        """(description, model name). The LLM backends replace this."""
        return describe_measurements(None, measurements), "none"

    def annotate_one(self, row: dict) -> tuple[dict, list[bytes]]:
        start = time.perf_counter()
        geom = Geometry.from_row(row)
        rgb = self.load_rgb(row)
        if rgb.shape[:2] != (geom.orig_h, geom.orig_w):
            raise ImageRejected("changed_on_disk", f"image is {rgb.shape[1]}x{rgb.shape[0]}, "
                                f"was {geom.orig_w}x{geom.orig_h} when encoded")
        regions = region_masks(row["patches"], geom)
        specimen = segment_specimen(rgb)
        measurements = [measure_region(rgb, specimen, mask, box) for box, mask in regions]
        description, model = self.describe(measurements)
        traits = {
            "annotation_id": annotation_id(row["species"], row["latent"], [row["image_id"]]),
            "image_ids": [row["image_id"]], "species": row["species"], "genus": row["genus"],
            "latent": row["latent"], "boxes": [[box for box, _ in regions]], "measurements": [measurements],
            "description": description, "model": model, "prompt_version": PROMPT_VERSION, "status": "ok",
            "latency_s": time.perf_counter() - start,
        }
        # Renderings are for the LLM and for saving; a templated description needs neither.
        wanted = self.cfg.save_renderings or self.cfg.llm.kind != "none"
        return traits, self.render(rgb, regions) if wanted else []

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, list[Rejected]]:
        rows, renderings, rejected = [], [], []
        for row in batch.to_pylist():
            try:
                traits, pngs = self.annotate_one(row)
            except Exception as exc:  # one bad candidate must not kill the batch
                reason = exc.reason if isinstance(exc, ImageRejected) else "annotate_failed"
                aid = annotation_id(row["species"], row["latent"], [row["image_id"]])
                rejected.append(Rejected(stage="annotate", reason=reason, detail=f"{type(exc).__name__}: {exc}",
                                         image_id=row["image_id"], annotation_id=aid))
                traits = {"annotation_id": aid, "image_ids": [row["image_id"]], "species": row["species"],
                          "genus": row["genus"], "latent": row["latent"], "boxes": [row["boxes"]],
                          "measurements": [[]], "description": None, "model": None,
                          "prompt_version": PROMPT_VERSION, "status": "failed", "latency_s": None}
                pngs = []
            rows.append(traits)
            renderings.append(pngs)
        table = pa.Table.from_pylist(rows, schema=TRAITS_SCHEMA)
        if self.cfg.save_renderings:
            table = table.append_column(RENDERINGS_FIELD, pa.array(renderings, RENDERINGS_FIELD.type))
        return table, rejected
