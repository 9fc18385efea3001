"""Describers: rendered images of one unit → an :class:`~pipeline.annotation.record.Annotation`.

    describer = TraitDescriber(llm_config)                 # kinds none, openai, transformers
    annotation = await describer.describe(images, measurements=[measurements])

    RemoteDescriber(app_name, max_in_flight)                 # kind serve: the same describe(), answered
                                                             # by the annotator app's TraitDescriber deployment

A describer words the prompt (:mod:`~pipeline.annotation.prompts`), sends it to its backend
(:mod:`~pipeline.annotation.llm`), parses the answer (:mod:`~pipeline.annotation.answers`) and
records its provenance. ``describe`` never raises for a model problem: a request that still
fails after the retries comes back as a ``failed`` annotation with the reason, so a batch keeps
every row."""

from __future__ import annotations

import asyncio
import os

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from pipeline.annotation.answers import parse_answer
from pipeline.annotation.vocabulary import INSECT, Vocabulary, load_vocabulary
from pipeline.annotation.llm import Backend, LLMRequestFailed
from pipeline.annotation.llm_openai import OpenAIBackend, backoff_delay_s
from pipeline.annotation.llm_transformers import TransformersBackend
from pipeline.annotation.measurements import describe_measurements
from pipeline.annotation.prompts import build_request, prompt_version
from pipeline.annotation.record import Annotation
from pipeline.config import LLMConfig
from pipeline.errors import error_detail

TEMPLATE_VERSION = "template-v1"  # kind none: descriptions templated from the measurements
DEPLOYMENT = "TraitDescriber"  # the annotator app's deployment that hosts a TraitDescriber
ANSWER_FIELDS = ("body_part", "body_part_raw", "body_part_known", "is_background", "traits", "common_traits",
                 "parsed_as")


def make_backend(llm: LLMConfig, max_in_flight: int = 32) -> Backend | None:
    """The model behind ``llm.kind`` (None for kind none; kind serve is a RemoteDescriber, not a backend)."""
    if llm.kind == "openai":
        return OpenAIBackend(llm.base_url, llm.model, api_key=os.environ.get(llm.api_key_env), timeout_s=llm.timeout_s,
                             max_retries=llm.max_retries, backoff_s=llm.backoff_s, max_in_flight=max_in_flight)
    if llm.kind == "transformers":
        return TransformersBackend(llm.model, device=llm.device, dtype=llm.dtype, max_pixels=llm.max_pixels)
    if llm.kind == "none":
        return None
    raise ValueError(f"annotate.llm.kind: {llm.kind!r} has no local backend")


def unit_prompt_version(llm: LLMConfig, render: str, n_images: int, include_taxon: bool,
                        vocabulary: Vocabulary = INSECT) -> str:
    """The version a describer records for a prompt of ``n_images`` (``render`` as the prompt is worded:
    :attr:`Rendering.prompt_render`), known before asking."""
    return TEMPLATE_VERSION if llm.kind == "none" else prompt_version(render, n_images, include_taxon=include_taxon,
                                                                      vocabulary=vocabulary)


class TraitDescriber:
    """Rendered images (1 to 3) → one annotation, through ``llm``'s backend (or the templated
    description of the measurements for kind none)."""

    def __init__(self, llm: LLMConfig, *, render: str = "overlay", include_taxon: bool = False,
                 vocabulary: str = "insect", max_in_flight: int = 32, backend: Backend | None = None):
        self.llm, self.render, self.include_taxon, self.vocabulary = llm, render, include_taxon, vocabulary
        self.backend = backend if backend is not None else make_backend(llm, max_in_flight)
        self.model = self.backend.model if self.backend is not None else "none"

    async def describe(self, images: list[bytes], *, species: str | None = None, genus: str | None = None,
                       measurements: list[list[dict]] | None = None, request_id: str | None = None,
                       render: str | None = None, include_taxon: bool | None = None,
                       vocabulary: str | None = None) -> Annotation:
        """``measurements`` per image feed the templated description of kind none. ``render`` (as
        the prompt is worded: overlay, crop or mllm_only), ``include_taxon`` and ``vocabulary`` (a
        name or file, see annotate.vocabulary) override this describer's settings for the call (a
        build that renders its own images says how, so a shared Serve deployment words the prompt
        and reads the answer to match)."""
        if self.backend is None:
            text = " ".join(describe_measurements(None, m) for m in measurements or [])
            return Annotation(status="ok", description=text or None, model="none", prompt_version=TEMPLATE_VERSION,
                              latency_s=0.0, attempts=0)
        render = render or self.render
        include_taxon = self.include_taxon if include_taxon is None else include_taxon
        words = load_vocabulary(vocabulary or self.vocabulary)
        version = unit_prompt_version(self.llm, render, len(images), include_taxon, words)
        request = build_request(images, render=render, species=species, genus=genus, include_taxon=include_taxon,
                                json_schema=self.llm.json_schema, max_tokens=self.llm.max_tokens, request_id=request_id,
                                vocabulary=words)
        try:
            result = await self.backend.complete(request)
        except LLMRequestFailed as exc:
            return Annotation.failed(exc.reason, model=self.model, prompt_version=version, attempts=exc.attempts,
                                     detail=exc.detail)
        answer = parse_answer(result.text, len(images), words)
        status = ("unparsed" if answer["parsed_as"] == "unparsed" else
                  "background" if answer["is_background"] else "ok")
        return Annotation(**{k: answer[k] for k in ANSWER_FIELDS}, status=status,
                          description=description_text(answer, len(images)), raw_answer=result.text,
                          model=result.model, prompt_version=version, latency_s=result.latency_s,
                          prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                          attempts=result.attempts)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()


class RemoteDescriber:
    """kind serve: the annotator Serve app's TraitDescriber deployment, called through a
    DeploymentHandle, with at most ``max_in_flight`` calls outstanding from this process. A call
    that meets a replica dying or restarting (or a deployment briefly unavailable) is retried with
    backoff, like an HTTP 503, up to ``max_retries`` times."""

    def __init__(self, app_name: str, max_in_flight: int, max_retries: int = 5, backoff_s: float = 1.0):
        self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name)
        self.max_in_flight, self.max_retries, self.backoff_s = max_in_flight, max_retries, backoff_s
        self._slots: dict[int, asyncio.Semaphore] = {}  # one per event loop (asyncio.run per batch)

    async def describe(self, images, **kwargs) -> Annotation:
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
            return Annotation.failed("serve_call_failed", model=None, prompt_version=None, attempts=attempt,
                                     detail=error_detail(error))


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
