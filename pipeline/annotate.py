"""The annotate stage: candidates/ → annotation units → traits/ rows.

A unit is one LLM request: a complete consensus group of candidates/ (three images of one species
where the same latent fires — the paper's three-image prompt) when ``annotate.images_per_prompt``
is 3, else one candidate image. For each unit the stage loads the images, measures the zones,
renders them (overlay / crop / whole image for the MLLM-only baseline) and asks the describer —
:class:`actors.annotator.TraitAnnotator` in this process (kinds none, openai, transformers) or the
annotator Serve app through a DeploymentHandle (kind serve). All units of a batch are in flight
together, bounded by the backend's share of ``annotate.max_in_flight``."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np
import pyarrow as pa

from actors.annotator import (EMPTY_ANSWER, TEMPLATE_VERSION, TraitAnnotator, describe_failure, prompt_render,
                              regions_and_measurements)
from pipeline import storage
from pipeline.candidates import BOX_TYPE
from pipeline.config import AnnotateConfig, PreprocessConfig, SourceConfig
from pipeline.errors import ImageRejected, Rejected
from pipeline.preprocessing import Geometry, decode_image
from pipeline.sources import ImageReader

MEASUREMENT_TYPE = pa.struct([
    ("area_px", pa.int64()), ("area_frac_specimen", pa.float64()),
    ("box_w_px", pa.int32()), ("box_h_px", pa.int32()),
    ("elongation", pa.float64()), ("orientation_deg", pa.float64()),
    ("axial_pos", pa.float64()), ("lateral_pos", pa.float64()),
    ("colour_r", pa.int32()), ("colour_g", pa.int32()), ("colour_b", pa.int32()), ("colour_name", pa.string()),
])
TRAIT_TYPE = pa.struct([("attribute", pa.string()), ("value", pa.string())])
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
])
RENDERINGS_FIELD = pa.field("renderings", pa.list_(pa.binary()))


def annotation_id(prompt_version: str, species: str, latent: int, image_ids: list[str]) -> str:
    """Stable across runs: the same request always has the same id (resume, de-duplication)."""
    return storage.stable_digest([prompt_version, species, str(latent), *image_ids])


def annotation_units(candidates: list[dict], images_per_prompt: int) -> list[dict]:
    """Candidate rows → units {species, genus, latent, members: [rows, strongest first]}: one per
    complete consensus group when ``images_per_prompt`` is 3, one per remaining candidate."""
    groups, units = defaultdict(list), []
    for row in candidates:
        if images_per_prompt > 1 and row.get("consensus_group") is not None:
            groups[row["species"], row["latent"], row["consensus_group"]].append(row)
        else:
            units.append([row])
    units += [sorted(g, key=lambda r: r["image_rank"]) for _, g in sorted(groups.items())]
    return [{"species": m[0]["species"], "genus": m[0]["genus"], "latent": m[0]["latent"], "members": m} for m in units]


def prompt_version_for(cfg: AnnotateConfig, n_images: int) -> str:
    """The version the describer will record for a unit of ``n_images``, known before asking it."""
    from actors.prompts import prompt_version

    if cfg.llm.kind == "none":
        return TEMPLATE_VERSION
    return prompt_version(prompt_render(cfg.render, cfg.mllm_only), n_images, include_taxon=cfg.include_taxon)


def unit_annotation_id(cfg: AnnotateConfig, unit: dict) -> str:
    """A unit's annotation_id: the build writes it next to the unit (Ray Data's checkpoint key for
    resume), the stage recomputes it for its rows; both through here."""
    members = unit["members"]
    return annotation_id(prompt_version_for(cfg, len(members)), unit["species"], unit["latent"],
                         [r["image_id"] for r in members])


class ServeDescriber:
    """kind serve: the annotator Serve app's TraitDescriber, called through a DeploymentHandle,
    with at most ``max_in_flight`` calls outstanding from this actor. A call that meets a replica
    dying or restarting (or a deployment briefly unavailable) is retried with backoff, like an
    HTTP 503, up to ``max_retries`` times."""

    def __init__(self, app_name: str, max_in_flight: int, max_retries: int = 5, backoff_s: float = 1.0):
        from ray import serve

        self.handle = serve.get_deployment_handle("TraitDescriber", app_name=app_name)
        self.max_in_flight, self.max_retries, self.backoff_s = max_in_flight, max_retries, backoff_s
        self._slots: dict[int, asyncio.Semaphore] = {}  # one per event loop (asyncio.run per batch)

    async def describe(self, images, **kwargs) -> dict:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        from actors.llm_openai import backoff_delay_s

        loop = id(asyncio.get_running_loop())
        slots = self._slots.setdefault(loop, asyncio.Semaphore(self.max_in_flight))
        async with slots:
            for attempt in range(1, self.max_retries + 2):
                try:
                    return await self.handle.describe.remote(images, **kwargs)
                except (RayActorError, BackPressureError, DeploymentUnavailableError) as exc:
                    if attempt > self.max_retries:
                        error = exc
                        break
                    await asyncio.sleep(backoff_delay_s(attempt, self.backoff_s))
                except Exception as exc:  # the deployment refused: a failed row, the batch goes on
                    error = exc
                    break
            return describe_failure("serve_call_failed", model=None, prompt_version=None, attempts=attempt,
                                    detail=f"{type(error).__name__}: {error}")


class AnnotateCandidates:
    """Callable over a batch of units (pyarrow, from :func:`annotation_units`) → (traits rows, rejected)."""

    def __init__(self, cfg: AnnotateConfig, source: SourceConfig, preprocess: PreprocessConfig,
                 max_in_flight: int | None = None):
        self.cfg, self.preprocess = cfg, preprocess
        self.reader = ImageReader(source)
        in_flight = max_in_flight or cfg.max_in_flight
        # The local annotator renders and numbers prompts for every kind; kind serve only sends
        # the rendered images to the deployment, which words the prompt the same way.
        local_llm = cfg.llm if cfg.llm.kind != "serve" else cfg.llm.model_copy(update={"kind": "none"})
        self.annotator = TraitAnnotator(local_llm, render=cfg.render, mllm_only=cfg.mllm_only,
                                        include_taxon=cfg.include_taxon, max_in_flight=in_flight,
                                        crop_margin=cfg.crop_margin, image_format=cfg.image_format)
        self.describer = (ServeDescriber(cfg.llm.app_name, in_flight, cfg.llm.max_retries, cfg.llm.backoff_s)
                          if cfg.llm.kind == "serve" else self.annotator)

    def load_rgb(self, row: dict) -> np.ndarray:
        try:
            data = self.reader.read(row["path"], row["source_file"], row["source_row"])
        except FileNotFoundError as exc:
            raise ImageRejected("missing_file", str(exc)) from None
        rgb = np.asarray(decode_image(data, self.preprocess))
        geom = Geometry.from_row(row)
        if rgb.shape[:2] != (geom.orig_h, geom.orig_w):
            raise ImageRejected("changed_on_disk", f"image is {rgb.shape[1]}x{rgb.shape[0]}, "
                                f"was {geom.orig_w}x{geom.orig_h} when encoded")
        return rgb

    def prepare(self, unit: dict) -> tuple[list[bytes], list[list[dict]], list[list[dict]]]:
        """(rendered images, boxes per member, measurements per member). A consensus unit sends one
        rendering per member (the largest crop with render crop); a single image may send up to 3 crops."""
        images, boxes, measurements = [], [], []
        single = len(unit["members"]) == 1
        for row in unit["members"]:
            rgb = self.load_rgb(row)
            regions, measured = regions_and_measurements(rgb, row["patches"], Geometry.from_row(row))
            images += self.annotator.render(rgb, regions, max_crops=3 if single else 1)
            boxes.append([box for box, _ in regions])
            measurements.append(measured)
        return images, boxes, measurements

    async def annotate_unit(self, unit: dict) -> tuple[dict, list[bytes], Rejected | None]:
        members = unit["members"]
        image_ids = [r["image_id"] for r in members]
        version = prompt_version_for(self.cfg, len(members))
        aid = unit_annotation_id(self.cfg, unit)
        row = {"annotation_id": aid, "image_ids": image_ids, "species": unit["species"], "genus": unit["genus"],
               "latent": unit["latent"], "boxes": [r["boxes"] for r in members], "measurements": [[] for _ in members]}
        try:  # in a thread: rendering is CPU work, and the event loop must keep the requests moving
            images, row["boxes"], row["measurements"] = await asyncio.to_thread(self.prepare, unit)
        except Exception as exc:  # one unreadable image fails its unit, not the batch
            reason = exc.reason if isinstance(exc, ImageRejected) else "annotate_failed"
            answer = describe_failure(reason, model=None, prompt_version=version, detail=f"{type(exc).__name__}: {exc}")
            return {**row, **_answer_columns(answer)}, [], Rejected(
                stage="annotate", reason=reason, detail=answer["error"], image_id=image_ids[0], annotation_id=aid)
        kwargs = {"render": self.cfg.render, "mllm_only": self.cfg.mllm_only, "include_taxon": self.cfg.include_taxon} \
            if self.cfg.llm.kind == "serve" else {}
        answer = await self.describer.describe(images, species=unit["species"], genus=unit["genus"],
                                               measurements=row["measurements"], request_id=aid, **kwargs)
        answer["prompt_version"] = answer["prompt_version"] or version  # a deployment that failed to answer says none
        rejected = None
        if answer["status"] == "failed":  # still failing after the retries: recorded, the row stays
            reason = "llm_" + (answer["error"] or "failed").split(":")[0]
            rejected = Rejected(stage="annotate", reason=reason, detail=answer["error"] or "", image_id=image_ids[0],
                                annotation_id=aid)
        return {**row, **_answer_columns(answer)}, images, rejected

    async def annotate_all(self, units: list[dict]):
        return await asyncio.gather(*(self.annotate_unit(u) for u in units))

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, list[Rejected]]:
        results = asyncio.run(self.annotate_all(batch.to_pylist()))
        table = pa.Table.from_pylist([r for r, _, _ in results], schema=TRAITS_SCHEMA)
        if self.cfg.save_renderings:
            table = table.append_column(RENDERINGS_FIELD, pa.array([p for _, p, _ in results], RENDERINGS_FIELD.type))
        return table, [rej for _, _, rej in results if rej is not None]


def _answer_columns(answer: dict) -> dict:
    return {k: answer.get(k) for k in EMPTY_ANSWER if k in TRAITS_SCHEMA.names}
