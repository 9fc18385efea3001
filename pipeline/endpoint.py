"""The ad-hoc endpoint's request handling, without Ray: reading and checking a request, the bearer
token, the finished builds a request may name, and which latents to describe.

:mod:`actors.serve_app` hosts it in the AnnotateEndpoint deployment. The caller's input is never
trusted: sizes are capped before decoding, unknown fields are refused (an ``image_url`` is never
fetched), a named build must be a finished one under ``builds_root``."""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import hmac
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.sae import sae_metadata
from pipeline.selection import going_forward

BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")  # RFC 2046 bchars, 1-70
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TEXT_FIELDS = ("species", "genus", "build")
# The answer's fields an endpoint response carries for each latent described.
ANSWER_FIELDS = ("status", "description", "body_part", "traits", "common_traits", "model", "prompt_version",
                 "latency_s", "error")

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
    else:
        raise HTTPException(415, f"content-type {kind or 'missing'}: send multipart/form-data (field 'image') "
                                 "or application/json (field 'image_base64')")
    for name in TEXT_FIELDS:
        if name in out:
            check_text(name, out[name])
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


def check_text(name: str, value: str) -> None:
    """400 for a text field no file system or log should see: control characters (NUL included) or
    characters that have no UTF-8 form (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, f"{name}: not valid Unicode text (a lone surrogate)") from None
    if CONTROL.search(value):
        raise HTTPException(400, f"{name}: control characters are not allowed")


def header_param(message: email.message.Message, param: str, header: str = "content-type") -> str | None:
    """A header parameter as text, RFC 2231 forms (``name*=utf-8''...``) included."""
    value = message.get_param(param, header=header)
    return email.utils.collapse_rfc2231_value(value) if value is not None else None


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[bytes]]:
    """multipart/form-data → {field name: [values]} (standard library only, exact on binary parts)."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header_param(header, "boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary")
    if not BOUNDARY.match(boundary):
        raise HTTPException(400, "multipart boundary is not 1-70 of the characters RFC 2046 allows")
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
        field = header_param(headers, "name", header="content-disposition")
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
        if "://" in build:
            raise HTTPException(400, f"build: {build!r} is a URL; name a local build folder (URLs are never fetched)")
        check_text("build", build)
        try:
            path = Path(build).resolve()
        except (OSError, ValueError) as exc:
            raise HTTPException(400, f"build: {build!r} is not a usable path ({type(exc).__name__})") from None
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
            # The latents that went forward in that build (selected/ holds every selected pair).
            cap = ((manifest.get("config") or {}).get("contrast") or {}).get("max_latents_per_species")
            rows = going_forward(pq.read_table(path / "selected", columns=["species", "latent", "rank_in_species"]),
                                 cap).to_pylist()
            by_species: dict[str, list[tuple[int, int]]] = {}
            for r in rows:
                by_species.setdefault(r["species"], []).append((r["rank_in_species"], r["latent"]))
            if len(self.cache) >= 8:  # a few builds at a time; the oldest goes
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = {s: [z for _, z in sorted(v)] for s, v in by_species.items()}
        return self.cache[key].get(species) if species else None
