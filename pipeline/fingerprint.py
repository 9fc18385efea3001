"""What a stage's output depends on, as one digest: its fingerprint.

A stage's fingerprint digests the values of the config keys it reads (:attr:`Stage.reads`, less
the runtime keys, which change no result), the fingerprints of the stages it reads, the data
contract's version, and the identity of what it reads from outside the build:
- the source's images: each image's id with the size and modification time (ETag on s3) of the
  file that holds its bytes — an image file, or the Parquet manifest or tar shard of its row;
  one listing per folder, no image is read;
- the backbone's and the SAE's files: a content digest (SHA-256 of every file), computed once
  and cached by path, size and modification time (a hub reference: the commit it resolves to);
- the annotate stage's vocabulary file.
Two builds whose stage fingerprints agree wrote the same rows in that stage (timing columns aside):
markers and the manifest record them, and reuse across builds (issue 24) compares them."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import defaultdict
from typing import Any, NamedTuple

import pyarrow as pa

from pipeline import storage
from pipeline.annotation.vocabulary import vocabulary_path
from pipeline.config import BuildConfig, flat_config, runtime_keys
from pipeline.contract import CONTRACT_VERSION, INDEX_SCHEMA, STAGE, STAGES

RUNTIME = runtime_keys(BuildConfig)
DIGESTS = "digests.json"  # the content-digest cache, under storage.cache_dir()
IMAGE_KEYS = pa.schema([("image_id", pa.string()), ("image_key", pa.string()), ("encode_key", pa.string())])
REQUEST_KEYS = pa.schema([("annotation_id", pa.string()), ("request_key", pa.string())])
# annotate keys that decide which units exist or are sent, not what one asks
UNIT_GROUPING = ("annotate.images_per_prompt", "annotate.min_confidence")
# Keys annotate reads that reach a request only through its boxes (in the request key already):
# how the model input is decoded changes the firings, and what lies on the specimen the regions
# outlined, not the question asked about a box.
ONLY_THROUGH_BOXES = ("preprocess.decode", "annotate.min_on_specimen")


def digest(value: Any, n: int = 32) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


def key_values(config: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """The dumped config's values under ``keys`` (a key or a section's ``prefix.``), runtime keys left out."""
    return {k: v for k, v in sorted(flat_config(config).items())
            if any(k == key or k.startswith(f"{key}.") for key in keys) and not k.startswith(RUNTIME)}


def file_identities(fs, paths: list[str]) -> dict[str, str]:
    """path → "size:mtime" (local) or "size:ETag" (object stores), from one listing per folder;
    "missing" for a path the listing does not hold."""
    folders: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        folders[posixpath.dirname(path)].add(path)
    found: dict[str, str] = {}
    for folder, wanted in folders.items():
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:
            continue
        for e in entries:
            name = fs._strip_protocol(e["name"])
            if name in wanted:
                stamp = e.get("ETag") or e.get("mtime") or e.get("LastModified")
                found[name] = f"{e.get('size')}:{stamp}"
    return {p: found.get(fs._strip_protocol(p), "missing") for p in paths}


def image_identities(index: pa.Table, fs) -> pa.Array:
    """Per index row: the identity of the file that holds its bytes (:func:`file_identities`)."""
    holders = [p if p is not None else f for p, f in zip(index.column("path").to_pylist(),
                                                         index.column("source_file").to_pylist())]
    known = file_identities(fs, sorted(set(holders)))
    return pa.array([known[h] for h in holders], pa.string())


def images_digest(index: pa.Table, identities: pa.Array) -> str:
    """One digest of the index's ids, rows and :func:`image_identities` (the index stage's outside identity)."""
    ids = index.column("image_id").to_pylist()
    rows = index.column("source_row").to_pylist()
    return digest(sorted(zip(ids, rows, identities.to_pylist()), key=lambda r: r[0]))


def content_digest(url: str, options: dict | None = None, revision: str | None = None) -> str:
    """SHA-256 over a file's (or a folder's files') bytes, cached by path, size and mtime/ETag; a
    hub reference is its resolved commit (the hub's content address)."""
    if storage.hub_reference(url) is not None:
        return f"hub:{url}@{storage.hub_commit(url, revision) or revision or 'main'}"
    fs, path = storage.filesystem(url, options)
    if not fs.exists(path):  # not needed by this run (its stage finished earlier): nothing to identify
        return f"missing:{url}"
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    stamps = file_identities(fs, files)
    cache_file = storage.cache_dir() / DIGESTS
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    parts = []
    for f in files:
        key = f"{url}|{f}|{stamps[f]}"
        if key not in cache:
            h = hashlib.sha256()
            with fs.open(f, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    h.update(chunk)
            cache[key] = h.hexdigest()
        parts.append((posixpath.relpath(f, path) if f != path else "", cache[key]))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache))
    tmp.replace(cache_file)
    return digest(parts)


def outside_identities(cfg: BuildConfig, index: pa.Table, images: pa.Array) -> dict[str, dict[str, str]]:
    """By stage, the identities of what it reads from outside the build (see the module's docstring);
    ``images``: :func:`image_identities` of the index."""
    return {
        "index": {"source": images_digest(index, images)},
        "encode": {"backbone.model": content_digest(cfg.backbone.model, cfg.options_for(cfg.backbone.model),
                                                    cfg.backbone.revision),
                   "sae.checkpoint": content_digest(cfg.sae.checkpoint, cfg.options_for(cfg.sae.checkpoint),
                                                    cfg.sae.revision)},
        "annotate": {"annotate.vocabulary": content_digest(str(vocabulary_path(cfg.annotate.vocabulary)))},
    }


class Fingerprints(NamedTuple):
    stages: dict[str, str]
    """Every stage's fingerprint, in stage order."""
    images: pa.Table
    """Per index row (:data:`IMAGE_KEYS`): its image key (id, where its bytes are and their
    identity) and its encode key (the image key, its index row and everything encode reads)."""
    request: str
    """The part of every request key that the config and the vocabulary file make (:func:`request_keys`)."""


def fingerprints(cfg: BuildConfig, index: pa.Table) -> Fingerprints:
    """The build's stage fingerprints and per-item keys (the source is listed once)."""
    source_fs, _ = storage.filesystem(cfg.source.root, cfg.source.fsspec_options)
    identities = image_identities(index, source_fs)
    config, outside = cfg.model_dump(mode="json"), outside_identities(cfg, index, identities)
    prints: dict[str, str] = {}
    for stage in STAGES:
        prints[stage.name] = digest({"contract": CONTRACT_VERSION, "stage": stage.name,
                                     "keys": key_values(config, stage.reads), "outside": outside.get(stage.name, {}),
                                     "inputs": {name: prints[name] for name in stage.reads_stages}})
    encode = digest({"contract": CONTRACT_VERSION, "keys": key_values(config, STAGE["encode"].reads),
                     "outside": outside["encode"]})
    columns = {name: index.column(name).to_pylist() for name in INDEX_SCHEMA.names}
    image_keys, encode_keys = [], []
    for i, identity in enumerate(identities.to_pylist()):
        image = digest([columns["image_id"][i], columns["path"][i], columns["source_file"][i],
                        columns["source_row"][i], identity])
        image_keys.append(image)
        encode_keys.append(digest([image, encode, *(columns[name][i] for name in INDEX_SCHEMA.names)]))
    images = pa.table([index.column("image_id"), pa.array(image_keys), pa.array(encode_keys)], schema=IMAGE_KEYS)
    # A request does not depend on how units are grouped (a single of a 3-image build is the same
    # request as in a 1-image build: the member count is in the annotation_id's prompt version).
    request_config = {k: v for k, v in key_values(config, STAGE["annotate"].reads).items()
                      if k not in UNIT_GROUPING + ONLY_THROUGH_BOXES}
    request = digest({"contract": CONTRACT_VERSION, "keys": request_config, "outside": outside["annotate"]})
    return Fingerprints(prints, images, request)


def request_keys(units: pa.Table, images: pa.Table, request: str) -> pa.Array:
    """Per unit (:func:`pipeline.annotation.units.with_annotation_ids` rows), its request key: a
    digest of its annotation_id, the config part ``request`` (:attr:`Fingerprints.request`), and
    each member image's key with its boxes — what the LLM is asked, so an answer is reused only for
    the same question."""
    image_key = dict(zip(images["image_id"].to_pylist(), images["image_key"].to_pylist()))
    members = units["members"].combine_chunks()
    flat, offsets = members.flatten(), members.offsets.to_numpy()
    ids, boxes = flat.field("image_id").to_pylist(), flat.field("boxes").to_pylist()
    keys = [digest([annotation, request, [(image_key.get(ids[j]), boxes[j]) for j in range(start, end)]])
            for annotation, start, end in zip(units["annotation_id"].to_pylist(), offsets[:-1], offsets[1:])]
    return pa.array(keys, pa.string())
