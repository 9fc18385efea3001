"""The annotator Serve application: trait descriptions for batch builds and for ad-hoc photos.

    serve run serve_configs/local_cpu.yaml        # or: serve deploy serve_configs/qwen2_5_vl_72b.yaml

Three deployments, built by :func:`build_annotator_app` (import path
``actors.serve_app:build_annotator_app``, args validated by :class:`AnnotatorAppConfig`):

| deployment       | holds                                     | called by                                   |
|------------------|-------------------------------------------|---------------------------------------------|
| TraitDescriber   | a :class:`~actors.annotator.TraitAnnotator` (HTTP client of the LLM app, or a local VLM) | builds (``annotate.llm.kind: serve``, through a DeploymentHandle) and the endpoint |
| PatchEncoder     | DINOv2 + SAE (:class:`~actors.encoder.FiringEncoder`), requests batched | the endpoint |
| AnnotateEndpoint | FastAPI ingress: ``GET /healthz``, ``POST /annotate`` | people |

``POST /annotate`` takes one photo (multipart field ``image``, or JSON ``image_base64``) with optional
``species``, ``genus`` and ``build`` (a finished build's output folder). It encodes the photo, picks
the latents to describe — that species' selected latents that fire here (best rank first), else
the latents firing most strongly — boxes their zones in original pixels, and asks the describer
about each. The caller's input is never trusted: sizes are capped before decoding, unknown fields
are refused (an ``image_url`` is never fetched), a named build must be a finished one under
``builds_root``, and an optional bearer token guards the endpoint."""


import asyncio
import base64
import binascii
import email.message
import hmac
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve

from actors.annotator import TraitAnnotator, regions_and_measurements
from pipeline.config import BackboneConfig, LLMConfig, PreprocessConfig, Section, validate
from pipeline.errors import ImageRejected
from pipeline.preprocessing import Geometry, decode_image, prepare_pixels


class AnnotatorAppConfig(Section):
    """The args of ``actors.serve_app:build_annotator_app`` in a Serve config file."""
    llm: LLMConfig
    """The model that describes regions: kind openai (an OpenAI-compatible server, e.g. the llm
    application of serve_configs/qwen2_5_vl_72b.yaml) or transformers (loaded in each describer replica)."""
    render: Literal["overlay", "crop"] = "overlay"
    """overlay: the zone outlined in red, upscaled 2× (the paper); crop: each region's box plus a margin."""
    include_taxon: bool = False
    """Name the species in the prompt. Off, as in the paper: observed, not recalled, traits."""
    max_in_flight: int = Field(default=32, ge=1)
    """LLM requests outstanding at once per describer replica."""
    crop_margin: float = Field(default=0.15, ge=0)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    """The DINOv2 the SAE was trained on (model, layer, dtype)."""
    sae_checkpoint: str
    """SAE checkpoint: a project folder (config.json + model.safetensors) or a saev file."""
    threshold: float = 0.9
    """τ: a latent fires on a patch when its code is above this (the same τ as the builds named)."""
    geometry: Literal["squash", "pad", "center_crop"] = "squash"
    """How a photo becomes the model's square input (see preprocess.geometry); boxes are exact either way."""
    image_size: int = Field(default=224, ge=14)
    encoder_num_gpus: float = Field(default=0, ge=0)
    """GPUs per PatchEncoder replica (0: encode on the CPU)."""
    encoder_num_cpus: float = Field(default=1, ge=0)
    encoder_max_batch_size: int = Field(default=16, ge=1)
    """Concurrent requests the encoder runs as one batch."""
    describer_num_gpus: float = Field(default=0, ge=0)
    """GPUs per TraitDescriber replica (kind transformers on a GPU; 0 for kind openai)."""
    describer_num_cpus: float = Field(default=1, ge=0)
    describer_min_replicas: int = Field(default=1, ge=0)
    describer_max_replicas: int = Field(default=1, ge=1)
    describer_target_ongoing_requests: float = Field(default=16, gt=0)
    """Autoscaling target per describer replica; set explicitly (Ray's default never scales up)."""
    describer_max_ongoing_requests: int = Field(default=64, ge=1)
    endpoint_num_cpus: float = Field(default=1, ge=0)
    builds_root: str | None = None
    """Requests may only name builds under this local folder; null: any local folder the server can read."""
    max_upload_bytes: int = Field(default=16 * 2**20, ge=1)
    """Larger uploads are refused (413) before they are read in full."""
    max_pixels: int = Field(default=40_000_000, ge=1)
    """Photos with more pixels are refused from their header, before decoding (decompression bombs)."""
    max_latents: int = Field(default=3, ge=1)
    """Latents described per request (each is one LLM call)."""
    auth_token_env: str | None = "SAE_TRAITS_TOKEN"
    """When this environment variable is set on the server, /annotate needs ``Authorization: Bearer <its value>``."""

    @field_validator("llm")
    @classmethod
    def _llm_kind(cls, llm: LLMConfig) -> LLMConfig:
        if llm.kind not in ("openai", "transformers"):
            raise ValueError(f"kind {llm.kind!r} cannot serve: use openai (an LLM server) or transformers "
                             "(a local model); none has no model and serve would call this app itself")
        return llm

    @model_validator(mode="after")
    def _replicas(self) -> "AnnotatorAppConfig":
        if self.describer_max_replicas < self.describer_min_replicas:
            raise ValueError("describer_max_replicas must be >= describer_min_replicas")
        return self

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(geometry=self.geometry, image_size=self.image_size, max_pixels=self.max_pixels,
                                max_bytes=self.max_upload_bytes)


# --------------------------------------------------------------------------- request handling (no Ray)

JSON_FIELDS = ("image_base64", "species", "genus", "build")
FORM_FIELDS = ("image", "species", "genus", "build")
# ImageRejected reasons (pipeline.preprocessing.decode_image) → HTTP status.
REJECT_STATUS = {"too_large": 413, "too_many_pixels": 413, "not_an_image": 415}


class AnnotateJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    species: str | None = None
    genus: str | None = None
    build: str | None = None


def check_bearer(header: str | None, token: str | None) -> None:
    """401 unless ``header`` is ``Bearer <token>`` (nothing to check when no token is configured)."""
    if not token:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "unauthorized: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


async def read_request(request: Request, max_upload_bytes: int) -> dict:
    """The request's fields, ``image`` as bytes; 4xx naming what is wrong."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        body = await read_body(request, max_upload_bytes + 64 * 1024)  # the envelope around the file
        fields = parse_multipart(body, content_type)
        unknown = sorted(set(fields) - set(FORM_FIELDS))
        if unknown:
            raise HTTPException(422, f"unknown form field(s) {unknown}; allowed: {list(FORM_FIELDS)}")
        if len(fields.get("image", [])) > 1:
            raise HTTPException(400, "image: send one image per request")
        out = {k: v[0] if k == "image" else v[0].decode("utf-8", "replace").strip() for k, v in fields.items()}
    elif kind == "application/json":
        body = await read_body(request, max_upload_bytes * 4 // 3 + 64 * 1024)  # base64 is 4/3 the bytes
        try:
            parsed = AnnotateJSON.model_validate(json.loads(body))
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"body is not valid JSON: {exc}") from None
        except ValidationError as exc:
            raise HTTPException(422, json_field_errors(exc)) from None
        out = parsed.model_dump(exclude_none=True)
        if "image_base64" in out:
            try:
                out["image"] = base64.b64decode(out.pop("image_base64"), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HTTPException(400, f"image_base64: not valid base64 ({exc})") from None
    else:
        raise HTTPException(415, f"content-type {kind or 'missing'}: send multipart/form-data (field 'image') "
                                 "or application/json (field 'image_base64')")
    if not out.get("image"):
        raise HTTPException(400, "no image: send the photo as multipart field 'image' or JSON 'image_base64'")
    if len(out["image"]) > max_upload_bytes:
        raise HTTPException(413, f"image: {len(out['image'])} bytes > max_upload_bytes={max_upload_bytes}")
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {declared} bytes is over the limit (max_upload_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload is over {limit} bytes (max_upload_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[bytes]]:
    """multipart/form-data → {field name: [values]} (standard library only, exact on binary parts)."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary")
    fields: dict[str, list[bytes]] = {}
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        raise HTTPException(400, "malformed multipart body (no closing boundary)")
    for part in parts[1:-1]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            raise HTTPException(400, "malformed multipart part (no blank line after its headers)")
        headers = email.message.Message()
        for line in head.decode("latin-1").split("\r\n")[1:]:  # [0] is the rest of the boundary line
            name, _, v = line.partition(":")
            if name:
                headers[name.strip()] = v.strip()
        field = headers.get_param("name", header="content-disposition")
        if not field:
            raise HTTPException(400, "multipart part without a name")
        fields.setdefault(str(field), []).append(value)
    return fields


def json_field_errors(exc: ValidationError) -> str:
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        return (f"unknown field(s) {unknown}; allowed: {list(JSON_FIELDS)}"
                + (" (URLs are never fetched: send the image itself)" if any("url" in u for u in unknown) else ""))
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def choose_latents(latent: np.ndarray, value: np.ndarray, selected: list[int] | None, max_latents: int, *,
                   build: str | None = None, species: str | None = None) -> tuple[list[int], str, str]:
    """(latents to describe, rule, why). Rule ``selected``: the species' selected latents (best
    rank first) that fire in this image; else ``strongest``: largest summed activation here."""
    firing = set(np.unique(latent).tolist())
    if selected:
        chosen = [z for z in selected if z in firing][:max_latents]
        if chosen:
            return chosen, "selected", f"the species' selected latents in {build} that fire in this image"
        reason = f"none of the species' {len(selected)} selected latents fires in this image"
    elif not build:
        reason = "no build named"
    elif not species:
        reason = "no species given"
    else:
        reason = f"species {species!r} has no selected latents in {build}"
    if not firing:
        return [], "strongest", f"{reason}; no latent fires above the threshold"
    sums = np.bincount(latent, weights=value)
    order = sorted(firing, key=lambda z: (-sums[z], z))
    return [int(z) for z in order[:max_latents]], "strongest", f"{reason}: latents with the largest summed activation"


def sae_fingerprint(checkpoint: str) -> dict | None:
    """What identifies an SAE across copies: its shape and training metadata (project folders only)."""
    from pipeline.build import sae_metadata  # what a build's manifest records of its SAE

    meta = sae_metadata(checkpoint)
    return {k: meta[k] for k in ("d", "m", "metadata")} if "d" in meta else None


class BuildCatalog:
    """Finished builds named by requests → each species' selected latents, best rank first
    (cached per build and manifest version)."""

    def __init__(self, builds_root: str | None, sae: dict | None):
        self.root = Path(builds_root).resolve() if builds_root else None
        self.sae = sae
        self.cache: dict[tuple[str, float], dict[str, list[int]]] = {}

    def resolve(self, build: str) -> Path:
        if "://" in build:
            raise HTTPException(400, f"build: {build!r} is a URL; name a local build folder (URLs are never fetched)")
        path = Path(build).resolve()
        if self.root is not None and not path.is_relative_to(self.root):
            raise HTTPException(403, f"build: {build} is outside builds_root")
        return path

    def selected(self, build: str, species: str | None) -> list[int] | None:
        path = self.resolve(build)
        manifest_file = path / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text())
            mtime = manifest_file.stat().st_mtime
        except (OSError, ValueError):
            manifest, mtime = {}, 0.0
        if manifest.get("status") != "succeeded" or not (path / "selected").is_dir():
            raise HTTPException(400, f"build: {build} is not a finished build (no manifest.json with status "
                                     "succeeded and a selected/ folder)")
        built_with = (manifest.get("sae") or {})
        if self.sae and built_with.get("m") is not None and \
                {k: built_with.get(k) for k in ("d", "m", "metadata")} != self.sae:
            raise HTTPException(400, f"build: {build} was made with another SAE than this app's; its latent "
                                     "numbers would name other features")
        key = (str(path), mtime)
        if key not in self.cache:
            import pyarrow.parquet as pq

            rows = pq.read_table(path / "selected", columns=["species", "latent", "rank_in_species"]).to_pylist()
            by_species: dict[str, list[tuple[int, int]]] = {}
            for r in rows:
                by_species.setdefault(r["species"], []).append((r["rank_in_species"], r["latent"]))
            if len(self.cache) >= 8:  # a few builds at a time; the oldest goes
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = {s: [z for _, z in sorted(v)] for s, v in by_species.items()}
        return self.cache[key].get(species) if species else None


# --------------------------------------------------------------------------- deployments

@serve.deployment(name="TraitDescriber")
class TraitDescriber:
    """Rendered PNGs → one trait annotation (the :meth:`TraitAnnotator.describe` answer dict)."""

    def __init__(self, cfg: AnnotatorAppConfig):
        self.annotator = TraitAnnotator(cfg.llm, render=cfg.render, include_taxon=cfg.include_taxon,
                                        max_in_flight=cfg.max_in_flight, crop_margin=cfg.crop_margin)

    async def describe(self, images: list[bytes], species: str | None = None, genus: str | None = None,
                       measurements: list[list[dict]] | None = None, request_id: str | None = None,
                       render: str | None = None, mllm_only: bool | None = None,
                       include_taxon: bool | None = None) -> dict:
        return await self.annotator.describe(images, species=species, genus=genus, measurements=measurements,
                                             request_id=request_id, render=render, mllm_only=mllm_only,
                                             include_taxon=include_taxon)

    def model(self) -> str:
        return self.annotator.model


@serve.deployment(name="PatchEncoder")
class PatchEncoder:
    """uint8 pixels [S, S, 3] of one image → its firings above τ: ``{latent, patch, value}`` arrays.
    Concurrent requests are encoded as one batch."""

    def __init__(self, cfg: AnnotatorAppConfig):
        from actors.encoder import FiringEncoder

        self.encoder = FiringEncoder(cfg.backbone.model, cfg.backbone.layer, cfg.sae_checkpoint, cfg.threshold,
                                     dtype=cfg.backbone.dtype)
        self.encode_batch.set_max_batch_size(cfg.encoder_max_batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, images: list[np.ndarray]) -> list[dict]:
        offsets, latent, patch, value = self.encoder.firings(np.stack(images))
        return [{"latent": latent[a:b], "patch": patch[a:b], "value": value[a:b]}
                for a, b in zip(offsets[:-1], offsets[1:])]

    async def encode(self, pixels: np.ndarray) -> dict:
        return await self.encode_batch(pixels)


api = FastAPI(title="sae-traits annotator", description="Trait descriptions of a specimen photo from SAE latents.")


@serve.deployment(name="AnnotateEndpoint")
@serve.ingress(api)
class AnnotateEndpoint:
    def __init__(self, cfg: AnnotatorAppConfig, encoder, describer):
        self.cfg, self.encoder, self.describer = cfg, encoder, describer
        self.preprocess = cfg.preprocess()
        # Renders only (kind none loads no model); the describer holds the real one.
        self.renderer = TraitAnnotator(LLMConfig(kind="none"), render=cfg.render, crop_margin=cfg.crop_margin)
        self.token = os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None
        self.builds = BuildCatalog(cfg.builds_root, sae_fingerprint(cfg.sae_checkpoint))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.post("/annotate")
    async def annotate(self, request: Request) -> dict:
        check_bearer(request.headers.get("authorization"), self.token)
        fields = await read_request(request, self.cfg.max_upload_bytes)
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
        """Bytes → original RGB [H, W, 3], model input [S, S, 3] and their geometry."""
        img = decode_image(data, self.preprocess)
        pixels, geom = prepare_pixels(img, self.preprocess)
        return np.asarray(img), pixels, geom

    async def annotate_latent(self, rgb: np.ndarray, geom: Geometry, firing: dict, latent: int, **kw) -> dict | None:
        on = firing["latent"] == latent
        patches = firing["patch"][on]

        def regions_and_images():  # CPU work off the event loop, so other requests keep flowing
            regions, measurements = regions_and_measurements(rgb, patches, geom)
            return regions, measurements, self.renderer.render(rgb, regions) if regions else []

        regions, measurements, images = await asyncio.to_thread(regions_and_images)
        if not regions:  # the zone lies entirely in letterbox padding
            return None
        answer = await self.describer.describe.remote(images, measurements=[measurements], **kw)
        return {"latent": int(latent), "n_patches": int(on.sum()), "activation": float(firing["value"][on].sum()),
                "boxes": [box for box, _ in regions], "measurements": measurements,
                **{k: answer.get(k) for k in ("status", "description", "body_part", "traits", "common_traits", "model",
                                              "prompt_version", "latency_s", "error")}}


def build_annotator_app(args: dict) -> serve.Application:
    """The annotator application from its YAML ``args`` (ConfigError naming the key when invalid).
    One parameter only: Serve calls the builder named by an import path with the args dict."""
    cfg = validate(AnnotatorAppConfig, args or {})
    encoder = PatchEncoder.options(
        ray_actor_options={"num_cpus": cfg.encoder_num_cpus, "num_gpus": cfg.encoder_num_gpus},
        max_ongoing_requests=4 * cfg.encoder_max_batch_size).bind(cfg)  # room to fill a batch
    describer = TraitDescriber.options(
        ray_actor_options={"num_cpus": cfg.describer_num_cpus, "num_gpus": cfg.describer_num_gpus},
        max_ongoing_requests=cfg.describer_max_ongoing_requests,
        autoscaling_config={"min_replicas": cfg.describer_min_replicas, "max_replicas": cfg.describer_max_replicas,
                            "target_ongoing_requests": cfg.describer_target_ongoing_requests}).bind(cfg)
    return AnnotateEndpoint.options(ray_actor_options={"num_cpus": cfg.endpoint_num_cpus}).bind(cfg, encoder, describer)
