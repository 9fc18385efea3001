"""The annotator Serve application: trait descriptions for batch builds and for ad-hoc photos.

    serve run serve_configs/local_cpu.yaml        # or: serve deploy serve_configs/qwen2_5_vl_72b.yaml

Three deployments, built by :func:`build_annotator_app` (import path
``actors.serve_app:build_annotator_app``, args validated by :class:`pipeline.config.AnnotatorAppConfig`),
each a thin host around library code:

| deployment       | holds                                     | called by                                   |
|------------------|-------------------------------------------|---------------------------------------------|
| TraitDescriber   | a :class:`~pipeline.annotation.describer.TraitDescriber` (HTTP client of the LLM app, or a local VLM) | builds (``annotate.llm.kind: serve``, through a RemoteDescriber) and the endpoint |
| PatchEncoder     | DINOv2 + SAE (:class:`~pipeline.encoding.FiringEncoder`), requests batched | the endpoint |
| AnnotateEndpoint | FastAPI ingress: ``GET /healthz``, ``POST /annotate`` (:mod:`pipeline.endpoint`) | people |

``POST /annotate`` takes one photo (multipart field ``image``, or JSON ``image_base64``) with optional
``species``, ``genus`` and ``build`` (a finished build's output folder). It encodes the photo, picks
the latents to describe — that species' selected latents that fire here (best rank first), else
the latents firing most strongly — boxes their zones in original pixels, and asks the describer
about each. An optional bearer token guards the endpoint. The request slots are the app's own
(:class:`~pipeline.endpoint.Admission`): a request takes one only once its body has arrived, and
``/healthz`` never takes one, so neither slow clients nor a busy app hold up a probe."""


import asyncio
import os
import uuid
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.context import _get_global_client

from pipeline.annotation.describer import DEPLOYMENT, TraitDescriber
from pipeline.annotation.measurements import regions_and_measurements
from pipeline.annotation.record import Annotation
from pipeline.annotation.renderings import Rendering
from pipeline.config import AnnotatorAppConfig, fsspec_options, validate
from pipeline.encoding import FiringEncoder, backbone_patch_px
from pipeline.endpoint import (ANSWER_FIELDS, REJECT_STATUS, Admission, BuildCatalog, HeaderLimit, RequestLimits,
                               check_bearer, check_open_access,
                               choose_latents, openapi_document, read_request, sae_fingerprint)
from pipeline.errors import ImageRejected
from pipeline.preprocessing import Geometry, decode_image, prepare_bytes


@serve.deployment(name=DEPLOYMENT)
class TraitDescriberDeployment:
    """Rendered images → one :class:`~pipeline.annotation.record.Annotation` (TraitDescriber.describe)."""

    def __init__(self, cfg: AnnotatorAppConfig):
        ann = cfg.annotate
        self.describer = TraitDescriber(ann.llm, render=Rendering.of(ann).prompt_render,
                                        include_taxon=ann.include_taxon, vocabulary=ann.vocabulary,
                                        max_in_flight=ann.max_in_flight)

    async def describe(self, images: list[bytes], species: str | None = None, genus: str | None = None,
                       measurements: list[list[dict]] | None = None, request_id: str | None = None,
                       render: str | None = None, include_taxon: bool | None = None,
                       vocabulary: str | None = None) -> Annotation:
        return await self.describer.describe(images, species=species, genus=genus, measurements=measurements,
                                             request_id=request_id, render=render, include_taxon=include_taxon,
                                             vocabulary=vocabulary)

    def model(self) -> str:
        return self.describer.model


@serve.deployment(name="PatchEncoder")
class PatchEncoder:
    """uint8 pixels [S, S, 3] of one image → its firings above τ: ``{latent, patch, value}`` arrays.
    Concurrent requests are encoded as one batch."""

    def __init__(self, cfg: AnnotatorAppConfig):
        self.encoder = FiringEncoder.from_sections(cfg.backbone, cfg.sae, cfg.storage)
        self.encode_batch.set_max_batch_size(cfg.encoder_max_batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, images: list[np.ndarray]) -> list[dict]:
        offsets, latent, patch, value = self.encoder.firings(np.stack(images))
        return [{"latent": latent[a:b], "patch": patch[a:b], "value": value[a:b]}
                for a, b in zip(offsets[:-1], offsets[1:])]

    async def encode(self, pixels: np.ndarray) -> dict:
        return await self.encode_batch(pixels)


# No /docs or /redoc: FastAPI's pages load their scripts from a public CDN (a third party in the page,
# and nothing at all on an offline cluster); the OpenAPI document itself is at /openapi.json.
api = FastAPI(title="sae-traits annotator", description="Trait descriptions of a specimen photo from SAE latents.",
              docs_url=None, redoc_url=None)
api.add_middleware(HeaderLimit)  # max_header_bytes on every route, probes included


@serve.deployment(name="AnnotateEndpoint")
@serve.ingress(api)
class AnnotateEndpoint:
    def __init__(self, cfg: AnnotatorAppConfig, encoder, describer):
        self.cfg, self.encoder, self.describer = cfg, encoder, describer
        self.decode = cfg.decode
        self.rendering = Rendering.of(cfg.annotate)  # renders only; the describer holds the model
        self.token = os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None
        # Where Serve's HTTP proxy listens is known only to the controller (no public API reads it).
        check_open_access(_get_global_client().http_config.host, cfg, self.token)
        self.limits = RequestLimits.of(cfg)
        api.state.max_header_bytes = cfg.max_header_bytes
        self.admission = Admission(cfg.endpoint_max_ongoing_requests, cfg.endpoint_max_queued_requests,
                                   cfg.shed_retry_after_s)
        api.openapi = lambda: openapi_document(api, token_required=bool(self.token))
        self.builds = BuildCatalog(cfg.builds_root,
                                   sae_fingerprint(cfg.sae.checkpoint, fsspec_options(cfg.storage, cfg.sae.checkpoint),
                                                   cfg.sae.revision))
        self.patch_px = backbone_patch_px(cfg.backbone, cfg.preprocess, cfg.storage)  # the PatchEncoder's grid

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.post("/annotate")
    async def annotate(self, request: Request) -> dict:
        check_bearer(request.headers.getlist("authorization"), self.token)
        fields = await read_request(request, self.limits)  # the whole body, under its deadline: before a slot
        async with self.admission.slot():
            return await self.annotate_photo(fields)

    async def annotate_photo(self, fields: dict) -> dict:
        species, genus = fields.get("species") or None, fields.get("genus") or None
        selected = self.builds.selected(fields["build"], species) if fields.get("build") else None
        try:  # decoding a large photo takes a while: off the event loop
            rgb, pixels, geom = await asyncio.to_thread(self.prepare, fields["image"])
        except ImageRejected as exc:
            raise HTTPException(REJECT_STATUS.get(exc.reason, 400), f"image: {exc.reason}: {exc.detail}") from None
        firing = await self.encoder.encode.remote(pixels)
        latents, rule, reason = choose_latents(firing["latent"], firing["value"], selected, self.cfg.max_latents,
                                               build=fields.get("build"), species=species)
        request_id = uuid.uuid4().hex[:16]
        annotations = await asyncio.gather(*(
            self.annotate_latent(rgb, geom, firing, z, species=species, genus=genus, request_id=f"{request_id}-{z}")
            for z in latents))
        return {"request_id": request_id,
                "image": {"width": geom.orig_w, "height": geom.orig_h, "geometry": asdict(geom)},
                "latent_rule": rule, "latent_rule_reason": reason, "n_firings": int(len(firing["latent"])),
                "annotations": [a for a in annotations if a is not None]}

    def prepare(self, data: bytes) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """Bytes → original RGB [H, W, 3], model input [S, S, 3] and their geometry: the input as a
        build makes it (a reduced decode), the original whole for the renderings."""
        pixels, geom = prepare_bytes(data, self.decode, self.patch_px)
        return np.asarray(decode_image(data, self.decode)), pixels, geom

    async def annotate_latent(self, rgb: np.ndarray, geom: Geometry, firing: dict, latent: int, **kw) -> dict | None:
        on = firing["latent"] == latent
        patches = firing["patch"][on]

        def regions_and_images():  # CPU work off the event loop, so other requests keep flowing
            regions, measurements = regions_and_measurements(rgb, patches, geom)
            return regions, measurements, self.rendering.images(rgb, regions) if regions else []

        regions, measurements, images = await asyncio.to_thread(regions_and_images)
        if not regions:  # the zone lies entirely in letterbox padding
            return None
        answer = await self.describer.describe.remote(images, measurements=[measurements], **kw)
        return {"latent": int(latent), "n_patches": int(on.sum()), "activation": float(firing["value"][on].sum()),
                "boxes": [box for box, _ in regions], "measurements": measurements,
                **{k: getattr(answer, k) for k in ANSWER_FIELDS}}


def build_annotator_app(args: dict) -> serve.Application:
    """The annotator application from its YAML ``args`` (ConfigError naming the key when invalid).
    One parameter only: Serve calls the builder named by an import path with the args dict."""
    cfg = validate(AnnotatorAppConfig, args or {})
    encoder = PatchEncoder.options(
        ray_actor_options={"num_cpus": cfg.encoder_num_cpus, "num_gpus": cfg.encoder_num_gpus},
        max_ongoing_requests=4 * cfg.encoder_max_batch_size).bind(cfg)  # room to fill a batch
    describer = TraitDescriberDeployment.options(
        ray_actor_options={"num_cpus": cfg.describer_num_cpus, "num_gpus": cfg.describer_num_gpus},
        max_ongoing_requests=cfg.describer_max_ongoing_requests,
        autoscaling_config={"min_replicas": cfg.describer_min_replicas, "max_replicas": cfg.describer_max_replicas,
                            "target_ongoing_requests": cfg.describer_target_ongoing_requests}).bind(cfg)
    # Serve's own limits are the connections: what a replica holds, and what the router queues while
    # it picks one (a burst passes through it loosely); the request slots are the app's own (Admission).
    return AnnotateEndpoint.options(
        ray_actor_options={"num_cpus": cfg.endpoint_num_cpus}, max_ongoing_requests=cfg.endpoint_max_connections,
        max_queued_requests=cfg.endpoint_max_connections,
        backpressure_config=BackpressureConfig(retry_after_s=cfg.shed_retry_after_s)).bind(cfg, encoder, describer)
