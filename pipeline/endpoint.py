"""The ad-hoc endpoint's request handling, without Ray: reading and checking a request, the bearer
token, the finished builds a request may name, and which latents to describe.

:mod:`actors.serve_app` hosts it in the AnnotateEndpoint deployment. The caller's input is never
trusted: sizes are capped before decoding, unknown fields are refused (an ``image_url`` is never
fetched), a named build must be a finished one under ``builds_root``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from pipeline.config import AnnotatorAppConfig, ConfigError
from pipeline.finished import MANIFEST, FinishedBuild, NotFinished
from pipeline.sae import sae_metadata

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
TEXT_FIELDS = ("species", "genus", "build")
# The answer's fields an endpoint response carries for each latent described.
ANSWER_FIELDS = ("status", "description", "body_part", "traits", "common_traits", "model", "prompt_version",
                 "latency_s", "error")

JSON_FIELDS = ("image_base64", "species", "genus", "build")
FORM_FIELDS = ("image", "species", "genus", "build")
MAX_TEXT_CHARS = 4096  # a species, genus or build path (the schema's maxLength); more is not a name
# The largest body a photo of max_upload_bytes comes in, whichever the encoding (max_body_bytes): the
# photo as JSON base64 (4 bytes per 3, padded), each text field at its worst as JSON (an astral
# character is two \uXXXX escapes: 12 bytes), and room for the keys, quotes, whitespace and, in a
# form, the part headers. A form carries the photo's bytes as they are, so a JSON body is the larger.
JSON_BYTES_PER_CHAR = 12
UTF8_BYTES_PER_CHAR = 4
BODY_FRAMING_BYTES = 16 * 1024
# ImageRejected reasons (pipeline.preprocessing.decode_image) → HTTP status.
REJECT_STATUS = {"too_large": 413, "too_many_pixels": 413, "not_an_image": 415}


class AnnotateJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = None
    species: str | None = None
    genus: str | None = None
    build: str | None = None


def check_bearer(headers: list[str], token: str | None) -> None:
    """400 for more than one ``Authorization`` header (which one would count is a guess); 401
    unless the one there is ``Bearer <token>`` (nothing to check when no token is configured)."""
    if len(headers) > 1:
        raise HTTPException(400, f"authorization: {len(headers)} Authorization headers; send exactly one")
    if not token:
        return
    scheme, _, given = (headers[0] if headers else "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "unauthorized: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def max_body_bytes(max_upload_bytes: int) -> int:
    """The largest request body the endpoint reads for a photo of ``max_upload_bytes``: one limit for
    both encodings (a multipart body of the same photo is smaller), and the front proxy's."""
    base64 = 4 * -(-max_upload_bytes // 3)
    return base64 + len(TEXT_FIELDS) * MAX_TEXT_CHARS * JSON_BYTES_PER_CHAR + BODY_FRAMING_BYTES


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost before it is refused (AnnotatorAppConfig's limits)."""

    max_upload_bytes: int
    body_read_timeout_s: float

    @classmethod
    def of(cls, cfg: AnnotatorAppConfig) -> RequestLimits:
        return cls(cfg.max_upload_bytes, cfg.body_read_timeout_s)


LOOPBACK_NAMES = ("localhost",)


def check_open_access(host: str, cfg: AnnotatorAppConfig, token: str | None) -> None:
    """Refuse to serve /annotate to the network without a token: when Serve's HTTP proxy listens
    beyond loopback, a token must be set unless the config says ``allow_anonymous: true``."""
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be reached from outside
        loopback = False
    if not loopback and not token and not cfg.allow_anonymous:
        raise ConfigError(
            f"Serve's HTTP proxy listens on {host} (beyond this machine) and /annotate has no token: set "
            f"{cfg.auth_token_env or 'auth_token_env'} in the application's environment (runtime_env.env_vars), "
            "or set allow_anonymous: true to serve it to anyone who can reach the port")


class HeaderLimit:
    """ASGI middleware: 431 on every route (probes, the schema) for headers over the app's
    ``max_header_bytes`` (``app.state.max_header_bytes``, set by the replica from its config)."""

    def __init__(self, app, default: int = 16 * 1024):
        self.app, self.default = app, default

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            limit = getattr(scope["app"].state, "max_header_bytes", self.default) if "app" in scope else self.default
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if size > limit:
                answer = JSONResponse({"detail": f"request headers are {size} bytes > max_header_bytes={limit}"}, 431)
                return await answer(scope, receive, send)
        return await self.app(scope, receive, send)


class Admission:
    """The endpoint's request slots, inside the app: ``/annotate`` takes one only once its body is
    read (:func:`read_request`, under ``body_read_timeout_s``), so a slow client holds none, and
    probes never take one. At most ``queued`` requests wait for a slot; more are shed with 503 and
    ``Retry-After``, with a body that names no internal setting."""

    def __init__(self, slots: int, queued: int, retry_after_s: float):
        self.free = asyncio.Semaphore(slots)
        self.queued, self.waiting, self.retry_after_s = queued, 0, retry_after_s

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.free.locked():
            if self.waiting >= self.queued:
                raise HTTPException(503, "busy: every request slot is taken and the queue is full; send it again "
                                         "after Retry-After seconds", headers={"Retry-After": f"{self.retry_after_s:g}"})
            self.waiting += 1
            try:
                await self.free.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.free.acquire()
        try:
            yield
        finally:
            self.free.release()


def bounded(request: Request, limit: int, timeout_s: float) -> Request:
    """The request, its body refused with 413 from its declared length before a byte is read, or as
    soon as more than ``limit`` bytes arrive; and with 408 when the whole body has not arrived within
    ``timeout_s`` (so slow clients cannot hold the replica's request slots)."""
    declared = request.headers.get("content-length", "")
    # (a length of more digits than the limit's is over it: an absurd one is never converted)
    if declared.isdigit() and (len(declared.lstrip("0")) > len(str(limit)) or int(declared) > limit):
        raise HTTPException(413, f"upload of {declared} bytes is over the limit of {limit} (max_upload_bytes)")
    loop = asyncio.get_running_loop()
    deadline, size = loop.time() + timeout_s, 0

    async def receive() -> dict:
        nonlocal size
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            raise HTTPException(408, f"the body did not arrive within body_read_timeout_s={timeout_s:g}") from None
        size += len(message.get("body", b""))
        if size > limit:
            raise HTTPException(413, f"upload is over {limit} bytes (max_upload_bytes)")
        return message

    return Request(request.scope, receive)


async def read_request(request: Request, limits: RequestLimits) -> dict:
    """The request's fields, ``image`` as bytes; 4xx naming what is wrong. Multipart bodies are
    parsed by Starlette's form parser (python-multipart), which refuses what RFC 7578 does not
    allow in a form (RFC 2231 ``name*=`` / ``boundary*=`` parameters among them) with 400."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    body = bounded(request, max_body_bytes(limits.max_upload_bytes), limits.body_read_timeout_s)
    if kind == "multipart/form-data":
        out = await read_form(body)
    elif kind == "application/json":
        out = read_json(await body.body())
    else:
        raise HTTPException(415, f"content-type {kind or 'missing'}: send multipart/form-data (field 'image') "
                                 "or application/json (field 'image_base64')")
    for name in TEXT_FIELDS:
        if name in out:
            out[name] = text_field(name, out[name])
    if not out.get("image"):
        raise HTTPException(400, "no image: send the photo as multipart field 'image' or JSON 'image_base64'")
    if len(out["image"]) > limits.max_upload_bytes:
        raise HTTPException(413, f"image: {len(out['image'])} bytes > max_upload_bytes={limits.max_upload_bytes}")
    return out


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, strict on text fields: their bytes must be UTF-8, as in a JSON
    body (Starlette falls back to latin-1, which makes some text of any bytes). Overrides its
    part-end callback, which the pinned Starlette (fastapi<0.137) has kept since 0.13."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            return super().on_part_end()
        try:
            value = bytes(part.data).decode("utf-8")
        except UnicodeDecodeError:
            raise MultiPartException(f"{part.field_name}: not UTF-8 text") from None
        self.items.append((part.field_name, value))


async def read_form(request: Request) -> dict:
    """multipart/form-data → fields: ``image`` a file part (bytes), the others UTF-8 text."""
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            form = await StrictMultiPartParser(request.headers, stream, max_files=2, max_fields=len(FORM_FIELDS) + 1,
                                               max_part_size=MAX_TEXT_CHARS * UTF8_BYTES_PER_CHAR).parse()
    except MultiPartException as exc:
        raise HTTPException(400, exc.message) from None
    try:
        names = [name for name, _ in form.multi_items()]
        unknown = sorted(set(names) - set(FORM_FIELDS))
        if unknown:
            raise HTTPException(422, f"unknown form field(s) {unknown}; allowed: {list(FORM_FIELDS)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise HTTPException(400, f"{repeated[0]}: send it once per request")
        out = {}
        for name, value in form.multi_items():
            is_file = isinstance(value, StarletteUploadFile)
            if (name == "image") != is_file:
                raise HTTPException(400, "image: send the photo as a file part (curl -F image=@photo.jpg)"
                                    if name == "image" else f"{name}: send it as a text field, not a file")
            out[name] = await value.read() if is_file else value  # text: text_field checks it, as JSON's
        return out
    finally:
        await form.close()


def once_each(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's members, refused (400) when a key is given twice: which one counts is a guess
    (a repeated form field is refused the same way)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise HTTPException(400, f"{repeated[0]}: send it once per request")
    return dict(pairs)


def read_json(body: bytes) -> dict:
    """A UTF-8 JSON body → fields, ``image_base64`` decoded to ``image``. (``json.loads`` of bytes
    would guess UTF-16 and UTF-32 too: the body is decoded as UTF-8 first.)"""
    if b"\x00" in body:  # never in UTF-8 JSON (a NUL in a string is escaped); all over UTF-16 and UTF-32
        raise HTTPException(400, "body is not UTF-8 JSON (it has NUL bytes: UTF-16 or UTF-32?)")
    try:
        parsed = AnnotateJSON.model_validate(json.loads(body.decode("utf-8"), object_pairs_hook=once_each))
    except ValidationError as exc:  # (a ValueError too: first)
        raise HTTPException(422, json_field_errors(exc)) from None
    except UnicodeDecodeError:
        raise HTTPException(400, "body is not UTF-8 JSON") from None
    except RecursionError:
        raise HTTPException(400, "body is JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError and the like
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None
    out = parsed.model_dump(exclude_none=True)
    if "image_base64" in out:
        try:
            out["image"] = base64.b64decode(out.pop("image_base64"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(400, f"image_base64: not valid base64 ({exc})") from None
    return out


def text_field(name: str, value: str) -> str:
    """A text field as the endpoint uses it, whichever the encoding it came in: 400 for characters
    no file system or log should see — control characters (NUL included) anywhere, the ends
    included, and characters with no UTF-8 form (lone surrogates) — and for more than the schema's
    ``maxLength`` characters; then the spaces around it stripped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, f"{name}: not valid Unicode text (a lone surrogate)") from None
    if CONTROL.search(value):
        raise HTTPException(400, f"{name}: control characters are not allowed")
    if len(value) > MAX_TEXT_CHARS:
        raise HTTPException(400, f"{name}: {len(value)} characters > maxLength {MAX_TEXT_CHARS}")
    return value.strip()


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


def sae_fingerprint(checkpoint: str, storage_options: dict | None = None, revision: str | None = None) -> dict | None:
    """What identifies an SAE across copies: its shape and training metadata (project folders only),
    as a build's manifest records them."""
    meta = sae_metadata(checkpoint, storage_options, revision)
    return {k: meta[k] for k in ("d", "m", "metadata")} if "d" in meta else None


class BuildCatalog:
    """Finished builds named by requests → each species' selected latents, best rank first
    (cached per build and manifest version)."""

    def __init__(self, builds_root: str | None, sae: dict | None):
        self.root = Path(builds_root).resolve() if builds_root else None
        self.sae = sae
        self.cache: dict[tuple[str, float], dict[str, list[int]]] = {}

    def resolve(self, build: str) -> Path:
        """The build folder a request names: relative to builds_root (when set), and refused (403)
        when it, or any file a request would read in it (its manifest, candidates/), resolves to a
        place outside builds_root — a symbolic link inside the folder included."""
        if "://" in build:
            raise HTTPException(400, f"build: {build!r} is a URL; name a local build folder (URLs are never fetched)")
        build = text_field("build", build)
        try:
            path = (self.root / build if self.root is not None else Path(build)).resolve()
            read = [path / MANIFEST, *sorted((path / "candidates").rglob("*"))] if self.root is not None else []
            outside = next((f for f in read if not f.resolve().is_relative_to(self.root)), None)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a link loop (Python < 3.13)
            raise HTTPException(400, f"build: {build!r} is not a usable path ({type(exc).__name__})") from None
        if self.root is not None and (not path.is_relative_to(self.root) or outside is not None):
            raise HTTPException(403, f"build: {build} is outside builds_root"
                                     + (" (a link in it points out)" if path.is_relative_to(self.root) else ""))
        return path

    def selected(self, build: str, species: str | None) -> list[int] | None:
        path = self.resolve(build)
        try:
            finished = FinishedBuild.open(str(path))
            mtime = (path / MANIFEST).stat().st_mtime
            if not finished.has("candidates"):
                raise NotFinished("no candidates/")
        except (NotFinished, OSError, RuntimeError):  # (RuntimeError: a link loop)
            raise HTTPException(400, f"build: {build} is not a finished build (no manifest.json with status "
                                     "succeeded and a candidates/ folder)") from None
        built_with = (finished.manifest.get("sae") or {})
        if self.sae and built_with.get("m") is not None and \
                {k: built_with.get(k) for k in ("d", "m", "metadata")} != self.sae:
            raise HTTPException(400, f"build: {build} was made with another SAE than this app's; its latent "
                                     "numbers would name other features")
        key = (str(path), mtime)
        if key not in self.cache:
            # The latents that went forward in that build, best first (candidates/ ranks every selected pair).
            rows = finished.read("candidates", ["species", "latent", "latent_rank", "forward"],
                                 lambda t: pc.fill_null(t["forward"], False)).to_pylist()
            by_species: dict[str, set[tuple[int, int]]] = {}
            for r in rows:
                by_species.setdefault(r["species"], set()).add((r["latent_rank"], r["latent"]))
            if len(self.cache) >= 8:  # a few builds at a time; the oldest goes
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = {s: [z for _, z in sorted(v)] for s, v in by_species.items()}
        return self.cache[key].get(species) if species else None


# --------------------------------------------------------------------------- the published contract

ERROR_STATUS = {
    400: "the request cannot be read (malformed body, bad base64, a field given twice, control characters)",
    401: "no or a wrong bearer token", 403: "build is outside builds_root (or a link in it leads out)",
    408: "the body did not arrive within body_read_timeout_s",
    413: "the upload or the photo's pixel count is over the limit", 415: "not an accepted content type or image format",
    422: "an unknown field", 431: "request headers over max_header_bytes",
}
TEXT = {"type": "string", "maxLength": MAX_TEXT_CHARS}
ANSWER_SCHEMA = {"type": "object", "required": ["latent", "boxes", "status"], "properties": {
    "latent": {"type": "integer"}, "n_patches": {"type": "integer"}, "activation": {"type": "number"},
    "boxes": {"type": "array", "items": {"type": "object"}}, "measurements": {"type": "array"},
    **{k: {} for k in ANSWER_FIELDS}, "status": {"type": "string"}}}
RESPONSE_SCHEMA = {"type": "object", "required": ["request_id", "image", "latent_rule", "annotations"], "properties": {
    "request_id": {"type": "string"}, "image": {"type": "object"}, "latent_rule": {"enum": ["selected", "strongest"]},
    "latent_rule_reason": {"type": "string"}, "n_firings": {"type": "integer"},
    "annotations": {"type": "array", "items": ANSWER_SCHEMA}}}


def openapi_document(app: FastAPI, token_required: bool) -> dict:
    """The app's OpenAPI document with what ``POST /annotate`` really takes and answers: its two
    bodies (``/annotate`` reads the raw request, so FastAPI cannot see them), its error codes and,
    when a token is set, the bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error = {"application/json": {"schema": {"type": "object", "required": ["detail"],
                                              "properties": {"detail": {"type": "string"}}}}}
    operation = doc["paths"]["/annotate"]["post"]
    operation["requestBody"] = {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"], "additionalProperties": False,
            "properties": {"image": {"type": "string", "format": "binary",
                                     "description": "the photo: JPEG, PNG, WebP or TIFF"},
                           **{k: TEXT for k in TEXT_FIELDS}}}},
        "application/json": {"schema": {
            "type": "object", "required": ["image_base64"], "additionalProperties": False,
            "properties": {"image_base64": {"type": "string", "format": "byte"}, **{k: TEXT for k in TEXT_FIELDS}}}}}}
    operation["responses"] = {
        "200": {"description": "the photo's latents and their descriptions",
                "content": {"application/json": {"schema": RESPONSE_SCHEMA}}},
        **{str(code): {"description": why, "content": error} for code, why in ERROR_STATUS.items()
           if code != 401 or token_required},
        "503": {"description": "shed: every request slot is taken and endpoint_max_queued_requests wait; "
                               "send it again after Retry-After", "content": error}}
    if token_required:
        doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        operation["security"] = [{"bearer": []}]
    health = doc["paths"]["/healthz"]["get"]["responses"]
    health["200"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
    health["503"] = {"description": "the app's replica is busy or not up (its queue is full, or it is starting)",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}
    app.openapi_schema = doc
    return doc
