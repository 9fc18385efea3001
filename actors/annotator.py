"""The trait annotator: rendering, prompt, the LLM call, answer parsing and provenance.

One library behind both the build's annotate stage and the Serve deployments:

    regions, measurements = regions_and_measurements(rgb, patches, geom)
    annotator = TraitAnnotator(llm_config, render="overlay")
    images = annotator.render(rgb, regions)               # PNG bytes for one image
    answer = await annotator.describe(images, measurements=[measurements])

``describe`` never raises for a model problem: a request that still fails after the backend's
retries comes back with ``status: failed`` and the reason, so a batch keeps every row. Statuses:
ok, background (kept: the paper's model sometimes calls a zone background), unparsed (the raw
answer is kept) and failed."""

from __future__ import annotations

import os

import numpy as np

from actors.llm_types import Backend, LLMRequestFailed
from pipeline.boxes import region_masks
from pipeline.config import LLMConfig
from pipeline.measurements import describe_measurements, measure_region, segment_specimen
from pipeline.preprocessing import Geometry
from pipeline.renderings import encode_image, render_crop, render_overlay

TEMPLATE_VERSION = "template-v1"  # kind none: descriptions templated from the measurements
MAX_IMAGES = 3  # what the Serve config lets vLLM take per prompt (limit_mm_per_prompt)


def prompt_render(render: str, mllm_only: bool) -> str:
    """The rendering a prompt is worded for: the MLLM-only baseline has prompts of its own."""
    return "mllm_only" if mllm_only else render


def make_backend(llm: LLMConfig, max_in_flight: int = 32) -> Backend | None:
    """The model behind ``llm.kind`` (None for kind none; kind serve is a DeploymentHandle, not a backend)."""
    if llm.kind == "openai":
        from actors.llm_openai import OpenAIBackend

        return OpenAIBackend(llm.base_url, llm.model, api_key=os.environ.get(llm.api_key_env), timeout_s=llm.timeout_s,
                             max_retries=llm.max_retries, backoff_s=llm.backoff_s, max_in_flight=max_in_flight)
    if llm.kind == "transformers":
        from actors.llm_transformers import TransformersBackend

        return TransformersBackend(llm.model, device=llm.device, dtype=llm.dtype, max_pixels=llm.max_pixels)
    if llm.kind == "none":
        return None
    raise ValueError(f"annotate.llm.kind: {llm.kind!r} has no local backend")


def regions_and_measurements(rgb: np.ndarray, patches, geom: Geometry) -> tuple[list[tuple[dict, np.ndarray]], list[dict]]:
    """The zone of ``patches`` as connected regions — (box in original pixels, mask) — and each
    region's model-free measurements."""
    regions = region_masks(patches, geom)
    specimen = segment_specimen(rgb)
    return regions, [measure_region(rgb, specimen, mask, box) for box, mask in regions]


def describe_failure(reason: str, *, model: str, prompt_version: str, attempts: int = 0, detail: str = "") -> dict:
    return {**EMPTY_ANSWER, "status": "failed", "model": model, "prompt_version": prompt_version,
            "attempts": attempts, "error": f"{reason}: {detail}" if detail else reason}


EMPTY_ANSWER = {"status": None, "description": None, "body_part": None, "body_part_raw": None,
                "body_part_known": None, "is_background": None, "traits": [], "common_traits": [],
                "parsed_as": None, "raw_answer": None, "model": None, "prompt_version": None, "latency_s": None,
                "prompt_tokens": None, "completion_tokens": None, "attempts": None, "error": None}


class TraitAnnotator:
    def __init__(self, llm: LLMConfig, *, render: str = "overlay", mllm_only: bool = False,
                 include_taxon: bool = False, max_in_flight: int = 32, crop_margin: float = 0.15,
                 image_format: str = "png", backend: Backend | None = None):
        self.llm, self.render_kind, self.mllm_only = llm, render, mllm_only
        self.include_taxon, self.crop_margin, self.image_format = include_taxon, crop_margin, image_format
        self.backend = backend if backend is not None else make_backend(llm, max_in_flight)
        self.model = self.backend.model if self.backend is not None else "none"

    def render(self, rgb: np.ndarray, regions: list[tuple[dict, np.ndarray]], max_crops: int = MAX_IMAGES) -> list[bytes]:
        """Encoded images for one image: the whole image (MLLM-only baseline), the zone outlined and
        upscaled (overlay), or a crop per region, largest first (crop, at most ``max_crops``)."""
        fmt = self.image_format
        if self.mllm_only:
            return [encode_image(rgb, fmt)]
        if self.render_kind == "overlay":
            return [render_overlay(rgb, np.logical_or.reduce([m for _, m in regions]), fmt=fmt)]
        by_area = sorted(regions, key=lambda r: -int(r[1].sum()))[:max_crops]
        return [render_crop(rgb, box, margin_frac=self.crop_margin, fmt=fmt) for box, _ in by_area]

    async def describe(self, images: list[bytes], *, species: str | None = None, genus: str | None = None,
                       measurements: list[list[dict]] | None = None, request_id: str | None = None,
                       render: str | None = None, mllm_only: bool | None = None,
                       include_taxon: bool | None = None) -> dict:
        """One annotation from rendered ``images`` (1 to 3); ``measurements`` per image feed the
        templated description of kind none. ``render``, ``mllm_only`` and ``include_taxon``
        override this annotator's settings for the call (a build that renders its own images
        says how, so a shared Serve deployment words the prompt to match)."""
        if self.backend is None:
            text = " ".join(describe_measurements(None, m) for m in measurements or [])
            return {**EMPTY_ANSWER, "status": "ok", "description": text or None, "model": "none",
                    "prompt_version": TEMPLATE_VERSION, "latency_s": 0.0, "attempts": 0}
        from actors.answers import parse_answer
        from actors.prompts import build_request, prompt_version

        render = prompt_render(render or self.render_kind, self.mllm_only if mllm_only is None else mllm_only)
        include_taxon = self.include_taxon if include_taxon is None else include_taxon
        version = prompt_version(render, len(images), include_taxon=include_taxon)
        request = build_request(images, render=render, species=species, genus=genus, include_taxon=include_taxon,
                                json_schema=self.llm.json_schema, max_tokens=self.llm.max_tokens, request_id=request_id)
        try:
            result = await self.backend.complete(request)
        except LLMRequestFailed as exc:
            return describe_failure(exc.reason, model=self.model, prompt_version=version, attempts=exc.attempts,
                                    detail=exc.detail)
        answer = parse_answer(result.text, len(images))
        status = ("unparsed" if answer["parsed_as"] == "unparsed" else
                  "background" if answer["is_background"] else "ok")
        return {**EMPTY_ANSWER, **{k: answer[k] for k in ("body_part", "body_part_raw", "body_part_known",
                                                           "is_background", "traits", "common_traits", "parsed_as")},
                "status": status, "description": description_text(answer, len(images)), "raw_answer": result.text,
                "model": result.model, "prompt_version": version, "latency_s": result.latency_s,
                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "attempts": result.attempts}

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()


def description_text(answer: dict, n_images: int) -> str | None:
    """The annotation's text: the common traits of a consensus answer (the paper's annotation),
    else the region's traits, prefixed with the body part."""
    items = answer["common_traits"] if n_images > 1 and answer["common_traits"] else \
        [f"{t['attribute']}: {t['value']}" for t in answer["traits"]]
    if answer["is_background"]:
        return "background"
    if not items and not answer["body_part"]:
        return None
    return f"{answer['body_part'] or 'region'}: " + "; ".join(items)
