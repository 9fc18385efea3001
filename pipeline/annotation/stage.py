"""The annotate stage: candidates/ → annotation units → traits/ rows.

A unit is one LLM request: a complete consensus group of candidates/ (three images of one species
where the same latent fires — the paper's three-image prompt) when ``annotate.images_per_prompt``
is 3, else one candidate image. :class:`AnnotateUnits` is the per-batch callable: for each unit
it loads the images, measures the zones, renders them (:class:`~pipeline.annotation.renderings.UnitImages`)
and asks its describer — a :class:`~pipeline.annotation.describer.TraitDescriber` in this process
(kinds none, openai, transformers) or the annotator Serve app through a
:class:`~pipeline.annotation.describer.RemoteDescriber` (kind serve).

The stage's units all run on one long-lived event loop of its own (a daemon thread, started on the
first batch), bounded by the describer's share of ``annotate.max_in_flight``. The callable may be
called from several threads at once — as the annotate actor is, ``annotate.max_concurrent_batches``
calls at a time — and then the batches' units share that one pool of request slots: while one
batch's last requests back off and retry, the next batch's keep the server busy. A batch is never
a barrier for the others."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from dataclasses import replace

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.annotation.describer import RemoteDescriber, TraitDescriber
from pipeline.annotation.record import Annotation, annotations_table
from pipeline.annotation.renderings import UnitImages
from pipeline.annotation.units import prompt_version_for, skip_reason, unit_annotation_id, unit_evidence
from pipeline.config import AnnotateConfig, PreprocessConfig, SourceConfig
from pipeline.contract import RENDERINGS_FIELD
from pipeline.errors import ImageRejected, Rejected, error_detail


class AnnotateUnits:
    """Callable over a batch of units (pyarrow, from :func:`~pipeline.annotation.units.unit_table`) → (traits rows, rejected).
    A unit's ``annotation_id`` is taken from its row (the build's units carry it:
    :func:`~pipeline.annotation.units.with_annotation_ids`), computed only for a unit without one.
    Thread-safe: concurrent calls overlap on the stage's one event loop (see the module docstring)."""

    def __init__(self, cfg: AnnotateConfig, source: SourceConfig, preprocess: PreprocessConfig,
                 max_in_flight: int | None = None):
        self.cfg = cfg
        self.images = UnitImages(cfg, source, preprocess)
        self.reader, self.rendering = self.images.reader, self.images.rendering
        in_flight = max_in_flight or cfg.max_in_flight
        # kind serve only sends the rendered images to the deployment, which words the prompt the
        # same way (told the rendering and the taxon switch on every call).
        self.describer = (RemoteDescriber(cfg.llm.app_name, in_flight, cfg.llm.max_retries, cfg.llm.backoff_s)
                          if cfg.llm.kind == "serve" else
                          TraitDescriber(cfg.llm, render=self.rendering.prompt_render, include_taxon=cfg.include_taxon,
                                         vocabulary=cfg.vocabulary, max_in_flight=in_flight))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    def load_rgb(self, row: dict) -> np.ndarray:
        """A member's image (:meth:`UnitImages.load`; benchmarks/ call it)."""
        return self.images.load(row)

    def prepare(self, unit: dict) -> tuple[list[bytes], list[list[dict]], list[list[dict]]]:
        """(rendered images, boxes per member, measurements per member): :meth:`UnitImages.prepare`."""
        return self.images.prepare(unit)

    async def annotate_unit(self, unit: dict) -> tuple[Annotation, list[bytes], Rejected | None]:
        members = unit["members"]
        image_ids = [r["image_id"] for r in members]
        version = prompt_version_for(self.cfg, len(members))
        aid = unit.get("annotation_id") or unit_annotation_id(self.cfg, unit)
        described = dict(annotation_id=aid, image_ids=image_ids, species=unit["species"], genus=unit["genus"],
                         latent=unit["latent"], boxes=[r["boxes"] for r in members], measurements=[[] for _ in members],
                         evidence=unit_evidence(members), confidence=unit.get("confidence"))
        if (skipped := skip_reason(unit.get("grounded"), unit.get("confidence"), self.cfg.min_confidence)) is not None:
            # never paid for: no image is read either
            return replace(Annotation.not_asked(skipped, prompt_version=version), **described), [], None
        try:  # in a thread: rendering is CPU work, and the event loop must keep the requests moving
            images, described["boxes"], described["measurements"] = await asyncio.to_thread(self.prepare, unit)
        except storage.StorageUnavailable:  # the store, not this unit: stop (a rerun resumes)
            raise
        except Exception as exc:  # one unreadable image fails its unit, not the batch
            reason = exc.reason if isinstance(exc, ImageRejected) else "annotate_failed"
            failed = replace(Annotation.failed(reason, model=None, prompt_version=version, detail=error_detail(exc)),
                             **described)
            return failed, [], Rejected(stage="annotate", reason=reason, detail=failed.error, image_id=image_ids[0],
                                        annotation_id=aid)
        kwargs = {"render": self.rendering.prompt_render, "include_taxon": self.cfg.include_taxon,
                  "vocabulary": self.cfg.vocabulary} if self.cfg.llm.kind == "serve" else {}
        answer = await self.describer.describe(images, species=unit["species"], genus=unit["genus"],
                                               measurements=described["measurements"], request_id=aid, **kwargs)
        # A deployment that failed to answer names no prompt version: the one asked for.
        annotation = replace(answer, **described, prompt_version=answer.prompt_version or version)
        rejected = None
        if annotation.status == "failed":  # still failing after the retries: recorded, the row stays
            reason = "llm_" + (annotation.error or "failed").split(":")[0]
            rejected = Rejected(stage="annotate", reason=reason, detail=annotation.error or "", image_id=image_ids[0],
                                annotation_id=aid)
        return annotation, images, rejected

    async def annotate_all(self, units: list[dict]):
        tasks = [asyncio.ensure_future(self.annotate_unit(u)) for u in units]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:  # StorageUnavailable (or a bug): the rest of this batch stops asking too
            for task in tasks:
                task.cancel()
            raise

    def request_loop(self) -> asyncio.AbstractEventLoop:
        """The stage's event loop, on a daemon thread of its own from the first call on. One loop
        for every batch, so the describer's in-flight slots (one semaphore per loop) and its HTTP
        connections are shared by all the batches in flight; stopped, with the describer's
        connections closed, when the stage is collected."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=run_until_stopped, args=(self._loop,), name="annotate-requests",
                                 daemon=True).start()
                weakref.finalize(self, stop_loop, self._loop, self.describer)
        return self._loop

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, list[Rejected]]:
        results = asyncio.run_coroutine_threadsafe(self.annotate_all(batch.to_pylist()), self.request_loop()).result()
        table = annotations_table([a for a, _, _ in results])
        if self.cfg.save_renderings:
            table = table.append_column(RENDERINGS_FIELD, pa.array([p for _, p, _ in results], RENDERINGS_FIELD.type))
        return table, [rej for _, _, rej in results if rej is not None]


def run_until_stopped(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def stop_loop(loop: asyncio.AbstractEventLoop, describer: TraitDescriber | RemoteDescriber) -> None:
    """Close the describer's connections on its loop, then stop the loop (its thread closes it)."""
    async def close_then_stop():
        try:
            if isinstance(describer, TraitDescriber):
                await describer.close()
        finally:
            loop.stop()
    with contextlib.suppress(RuntimeError):  # closed already (at interpreter exit)
        asyncio.run_coroutine_threadsafe(close_then_stop(), loop)
