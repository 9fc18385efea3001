"""Typed, validated configuration: one config per entry point, built from shared sections.

    BuildConfig          python -m pipeline.build      source, preprocess, backbone, sae, encoder,
                                                       counting, contrast, candidates, annotate, ray, storage
    TrainSAEConfig       python -m pipeline.train_sae  source, preprocess, backbone, encoder, sae (the
                                                       trainer's SAETrainSpec), train, ray, storage
    AnnotatorAppConfig   actors.serve_app              annotate, backbone, sae, preprocess, storage
                                                       + the deployments' resources and the endpoint's limits

Shaped like Ray Serve LLM's ``LLMConfig``: pydantic models with ``extra="forbid"``, one docstring
per field, nested sections. Load with :func:`load_config` from a YAML file plus ``--set a.b=c``
overrides; every validation error is re-raised as :class:`ConfigError` naming the dotted key.
Whether a key may change between a run and its resume is said on the field (:func:`runtime`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from pipeline import storage
from pipeline.annotation.vocabulary import load_vocabulary


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def runtime(default: Any = PydanticUndefined, **kwargs) -> Any:
    """A field that says where or how fast a run goes, never what it computes: it may change
    between an interrupted run and its resume (a whole section when the field is one)."""
    return Field(default, json_schema_extra={"runtime": True}, **kwargs)


def fixed(default: Any = PydanticUndefined, **kwargs) -> Any:
    """A section whose every key is fixed for a resume in this entry point, even those its own
    fields call :func:`runtime` (e.g. the trainer's encoder pool: batch sizes shape its data order)."""
    return Field(default, json_schema_extra={"runtime": False}, **kwargs)


def runtime_keys(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Dotted keys (a section's as a ``prefix.``) that a resume may change, from the fields' markers."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        marker = (field.json_schema_extra or {}).get("runtime") if isinstance(field.json_schema_extra, dict) else None
        section = _section(field)
        if marker is True:
            keys.append(f"{prefix}{name}." if section else f"{prefix}{name}")
        elif marker is None and section:
            keys += runtime_keys(section, f"{prefix}{name}.")
    return tuple(keys)


class StorageConfig(Section):
    """How ``s3://`` paths are reached: every s3:// input (source, SAE checkpoint, backbone) and
    output of the run. Without this section boto's own chain applies (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, ~/.aws, instance roles) in each process that opens a path. Local paths and
    hub ids are not affected."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, moto, ...), e.g. http://127.0.0.1:9000; null: AWS
    itself, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL where set."""
    region: str | None = None
    """Region name (e.g. eu-west-1); null: AWS_DEFAULT_REGION or the profile's."""
    anon: bool = False
    """Unsigned requests (public buckets): no credentials are looked up."""
    key_env: str | None = None
    """Name of the environment variable holding the access key id (with secret_env); null: boto's
    own chain. Read when a path is opened, in that process — the driver and every Ray worker — so
    set it on every node (or in the job's runtime_env). The key never enters a config or manifest."""
    secret_env: str | None = None
    """Name of the environment variable holding the secret access key (with key_env)."""
    token_env: str | None = None
    """Name of the environment variable holding a session token (temporary credentials), if any."""
    max_attempts: int = Field(default=8, ge=1)
    """Attempts per s3 request, the first one included. A failed attempt — a 5xx answer (500
    InternalError, 503 SlowDown, ...), throttling, a connection refused, dropped or cut off — is
    retried after an exponential backoff with jitter (a random share of 1, 2, 4, 8, 16, 20, 20 s);
    an answer about the object (404, 403, ...) is not. Each retry is logged (``[sae-traits]
    retrying s3 ...``, logger pipeline.storage, WARNING). A request whose attempts are all spent
    ends the build with an error naming its s3:// path; what was written stays, and rerunning the
    command resumes. With 8, a store failing one request in ten in every way it can (500, 503,
    connection dropped, answer cut off) leaves the build as it would be (tests/test_s3_faults.py)."""
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    """botocore's retry mode: standard (as above), adaptive (standard plus client-side rate
    limiting after throttling), legacy (botocore's older rules). Set here rather than by
    AWS_RETRY_MODE / AWS_MAX_ATTEMPTS or ~/.aws/config on each node, so every process of a build
    retries alike."""
    give_up_after_s: float = Field(default=30.0, gt=0)
    """An outage, not a hiccup: once every s3 request of a process to the store has failed for
    this long in a row (no answer, or 5xx; not one answered in between), failed attempts are no
    longer retried, so an unreachable store ends the build in about this time (plus the backoff
    in progress) with an error naming the path, instead of after every request's attempts. Raise
    it to ride out longer outages (with max_attempts high enough to last them)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Further s3fs keyword arguments, applied last (e.g. {config_kwargs: {connect_timeout: 5}},
    {client_kwargs: {verify: false}}; a config_kwargs.retries given here replaces max_attempts and
    retry_mode). Values here are written to the build's manifest: keep real credentials in the
    *_env variables."""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> StorageConfig:
        if bool(self.key_env) != bool(self.secret_env):
            raise ValueError("set key_env and secret_env together")
        if self.anon and (self.key_env or self.token_env):
            raise ValueError("anon: unsigned requests take no credentials (unset key_env / secret_env / token_env)")
        return self


def fsspec_options(storage_section: Any, url: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for opening ``url``: the storage section (a StorageConfig, its
    dict, or None) turned into s3fs arguments for an s3:// URL — nothing for any other URL — then
    ``overrides`` (e.g. ``source.storage_options``) over them. The retry policy (max_attempts,
    retry_mode) becomes botocore's ``config_kwargs.retries``, give_up_after_s an argument of
    :class:`pipeline.storage.S3FileSystem` (the s3fs every s3:// path is opened with). Credentials named by
    ``key_env`` / ``secret_env`` / ``token_env`` are read from this process's environment now."""
    out: dict[str, Any] = {}
    if storage.protocol(url) in storage.S3_PROTOCOLS:
        # Many processes write a build: a directory listing cached in one of them goes stale.
        out["use_listings_cache"] = False
        if storage_section is not None:
            cfg = storage_section if isinstance(storage_section, StorageConfig) else \
                validate(StorageConfig, dict(storage_section), prefix="storage.")
            if cfg.endpoint_url:
                out["endpoint_url"] = cfg.endpoint_url
            if cfg.region:
                out["client_kwargs"] = {"region_name": cfg.region}
            if cfg.anon:
                out["anon"] = True
            if "retries" not in (cfg.options.get("config_kwargs") or {}):
                out["config_kwargs"] = {"retries": {"mode": cfg.retry_mode, "total_max_attempts": cfg.max_attempts}}
            out["give_up_after_s"] = cfg.give_up_after_s  # an argument of storage.S3FileSystem
            for field, kwarg in (("key_env", "key"), ("secret_env", "secret"), ("token_env", "token")):
                name = getattr(cfg, field)
                if name:
                    value = os.environ.get(name)
                    if not value:
                        raise ConfigError(f"storage.{field}: environment variable {name} is not set in this process "
                                          f"(needed to open {url}; set it on every node)")
                    out[kwarg] = value
            out = merge(out, cfg.options)
    return merge(out, overrides) if overrides else out


class SourceConfig(Section):
    format: Literal["bioscan", "imagefolder", "parquet", "webdataset"] = "bioscan"
    """bioscan: the BIOSCAN-5M layout of the bioscan-dataset package; imagefolder:
    <root>/<Genus_species>/<file>; parquet: a manifest with an image path or bytes column (a
    Hugging Face dataset's Parquet files included); webdataset: tar shards of samples."""
    root: str
    """bioscan: the folder holding bioscan5m/; imagefolder: the class folders' parent; parquet:
    the manifest file or folder; webdataset: a shard, a folder of .tar shards or a glob
    (shards-*.tar). Local path or any fsspec URL."""
    splits: list[str] | None = None
    """bioscan only: splits to read (e.g. [train, val, test]); null reads every split."""
    limit: int | None = Field(default=None, ge=1)
    """Read at most this many rows (after de-duplication); for quick trial runs."""
    id_column: str = "image_id"
    """parquet only: the column with the dataset's own stable image identifier."""
    path_column: str | None = "path"
    """parquet only: column with image paths (absolute, or relative to the manifest's folder)."""
    bytes_column: str | None = None
    """parquet only: column with encoded image bytes, or the struct of ``bytes`` and ``path`` that the
    ``datasets`` library writes for an Image feature (e.g. ``image``); used instead of path_column when set."""
    species_column: str = "species"
    """parquet: the species column; webdataset: the species key of the taxonomy JSON member."""
    genus_column: str = "genus"
    family_column: str = "family"
    image_members: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)
    """webdataset only: the member extensions that hold a sample's image (the first present is read)."""
    taxonomy_member: str | None = "json"
    """webdataset only: the member extension of a JSON object holding species_column, genus_column and
    family_column; null: read the ranks from taxonomy_text_members."""
    taxonomy_text_members: dict[Literal["species", "genus", "family"], str] = Field(default_factory=dict)
    """webdataset only: rank → the member extension of a text member naming it, e.g. {species: sci.txt}
    (used for the ranks the JSON member does not give). A species of two words gives the genus too."""
    storage_options: dict[str, Any] = runtime(default_factory=dict)
    """Passed to fsspec when opening root, over the storage section's options for it (keys given
    here win): e.g. a source in another store than the outputs."""

    # The enclosing config's storage section (set by BuildConfig / TrainSAEConfig; travels with a
    # pickled SourceConfig into Ray tasks, never into a dump or manifest).
    _storage: Any = PrivateAttr(default=None)

    @property
    def fsspec_options(self) -> dict[str, Any]:
        """fsspec options for root: the storage section's (s3 URLs only) with storage_options over them."""
        return fsspec_options(self._storage, self.root, self.storage_options)


class PreprocessConfig(Section):
    geometry: Literal["squash", "pad", "center_crop"] = "squash"
    """squash: resize to image_size² (whole specimen kept, aspect changed); pad: letterbox to a
    square; center_crop: the paper's Resize(256)+CenterCrop(224), for parity (cuts the ends of
    wide specimens). Boxes are always mapped back to exact original pixels."""
    image_size: int = Field(default=224, ge=14)
    """Model input side in pixels; must be a multiple of the backbone's patch size."""
    resize_shorter: int = Field(default=256, ge=14)
    """center_crop only: the shorter side after the first resize."""
    pad_value: int = Field(default=255, ge=0, le=255)
    """pad only: grey level of the letterbox (white suits specimen photos)."""
    max_pixels: int = Field(default=40_000_000, ge=1)
    """Images with more pixels are refused from their header, before decoding (decompression bombs)."""
    max_bytes: int = Field(default=64 * 2**20, ge=1)
    """Files larger than this are refused without decoding."""
    formats: list[Literal["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "JPEG2000"]] | None = None
    """Image formats accepted, told apart by their bytes (Pillow's format names); null: every format
    Pillow reads. Others are refused as not_an_image before any decoder runs."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """cpu: decode tasks decode and resize every image (a JPEG at 1/2, 1/4 or 1/8 scale where the
    input allows). gpu: they only read the bytes and check the headers; the encode actors decode
    JPEGs with nvJPEG on their GPU and resize there (other formats on the actor's CPU), so a GPU
    needs far fewer CPU cores. Both give the same geometry; the pixels differ by a grey level or
    two, so the choice is part of what encode's output depends on."""
    batch_size: int = runtime(default=64, ge=1)
    """Rows per decode task batch."""


class BackboneConfig(Section):
    model: str = "facebook/dinov2-base"
    """A DINOv2 model (Dinov2Model or with registers): a Hugging Face hub id (or hf://<org>/<repo>),
    a local folder or a remote one (s3://...)."""
    revision: str | None = None
    """hub models: the branch, tag or commit to load (null: main); the commit it resolves to is
    recorded in the build's manifest."""
    layer: int = Field(default=10, ge=0)
    """0-based transformer block whose output (residual stream, before the final LayerNorm) is
    read: 10 is hidden_states[11] = hidden_states[-2] of DINOv2-base."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""


class SAEConfig(Section):
    checkpoint: str | None = None
    """SAE checkpoint: a project folder (config.json + model.safetensors) or a saev file (the 0.1
    layout, or header schemas 1 to 5); local, remote (s3://...) or on the Hugging Face hub (hf://...)."""
    threshold: float = 0.9
    """τ: a latent fires on a patch when its code is above this (raw units of that SAE)."""
    revision: str | None = None
    """A checkpoint on the Hugging Face hub (hf://<org>/<repo>/<file> for one file, hf://<org>/<repo>
    or <org>/<repo> for a project folder): the branch, tag or commit (null: main); the commit it
    resolves to is recorded in the build's manifest."""
    subtract_b_dec: bool | None = None
    """Only for a saev schema-1 file, whose header cannot say it: true when its encode subtracts b_dec
    (saev before commit e7ca004, 2025-07-31), false when not. Every other layout says it itself."""


class EncoderConfig(Section):
    batch_size: int = runtime(default=64, ge=1)
    """Images per encoder call."""
    num_gpus: float = runtime(default=1.0, ge=0)
    """GPUs per encoder actor (0 runs on the CPU)."""
    num_cpus: float = runtime(default=1.0, ge=0)
    """CPUs reserved per encoder actor."""
    min_actors: int = runtime(default=1, ge=1)
    max_actors: int = runtime(default=1, ge=1)
    """Actor pool bounds; Ray Data scales between them."""
    fail_once_after_batches: int | None = runtime(default=None, ge=1)
    """Fault injection for tests: the first encoder actor to finish this many batches exits
    mid-batch (before returning it), once per build. Ray Data restarts it and retries the batch."""

    @model_validator(mode="after")
    def _pool_bounds(self) -> EncoderConfig:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class CountingConfig(Section):
    unit: Literal["patches", "images"] = "patches"
    """patches (the paper): a count is the number of (image, patch) firings; images: number of
    images where the latent fires at least once."""


class ContrastConfig(Section):
    t_freq: float = Field(default=3e-3, gt=0, lt=1)
    """t of Algorithm 1: keep (s, z) when f_s(z) > t, f_g(z) > t and f_s(z) > f_g(z)."""
    score: Literal["evidence", "ratio", "difference", "log_ratio_weighted"] = "evidence"
    """Orders a species' selected latents (which of them go forward to be annotated): evidence (the
    default: contrast together with how well the latent's zones sit on the specimen, in one place,
    one piece, most of the species' photos and no other genus; pipeline.evidence, docs/quality.md),
    or by frequency alone: ratio f_s / f_g (the paper's), difference f_s - f_g, or f_s · log(f_s / f_g).
    selected/ is ranked by ratio for evidence; candidates/ holds the evidence ranking (latent_rank)."""
    max_latents_per_species: int = Field(default=10, ge=1)
    """At most this many selected latents per species go forward to be annotated (best first by score:
    candidates/ forward); selected/ keeps every pair the rule selects, candidates/ measures them all."""
    lone_species: Literal["none", "family"] = "none"
    """A species that is the only one of its genus in the build has f_s = f_g, so the paper's
    strict rule selects nothing for it (none). family: contrast it against its family instead."""


class CandidatesConfig(Section):
    top_images: int = Field(default=9, ge=1)
    """Images kept per selected (species, latent), strongest summed activation first; a zone with no
    region on the specimen (annotate.min_on_specimen) is passed over for the next image, up to twice
    as many images read."""
    group_size: int = Field(default=3, ge=1)
    """Images per consensus group (the paper's three-image prompt)."""
    evidence: bool = True
    """Measure each candidate zone's evidence on its image (pipeline.evidence): what ranks by evidence,
    keeps background zones from being sent and gives every trait its confidence. false: no image is
    read before annotate, every zone is described whole and no row has a confidence (the paper's
    behaviour; contrast.score evidence needs it)."""


class LLMConfig(Section):
    kind: Literal["none", "openai", "transformers", "serve"] = "none"
    """none: descriptions templated from the measurements (no model); openai: any OpenAI-compatible
    chat-completions server (the Ray Serve LLM app, `vllm serve`, SGLang) at base_url; transformers:
    a local Hugging Face VLM (model) in each annotate actor; serve: the annotator Serve app's
    TraitDescriber deployment, through a DeploymentHandle."""
    base_url: str | None = runtime(default=None)
    """openai: the server's API root, e.g. http://127.0.0.1:8000/llm/v1."""
    model: str | None = None
    """openai: the served model name; transformers: a hub id or local folder."""
    api_key_env: str = runtime(default="OPENAI_API_KEY")
    """openai: environment variable holding the API key (the key itself never enters a config or manifest)."""
    timeout_s: float = runtime(default=120.0, gt=0)
    """openai: per-attempt timeout."""
    max_retries: int = runtime(default=5, ge=0)
    """openai: retries on 429 / 5xx / timeouts / connection errors / malformed answers; serve: on a
    replica dying or restarting."""
    backoff_s: float = runtime(default=1.0, ge=0)
    """openai and serve: first retry delay; doubles per retry (with jitter), at least the server's Retry-After."""
    json_schema: bool = True
    """Send the answer's JSON schema as response_format (vLLM constrains decoding to it)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """null: the paper's 196 (one image) / 256 (three)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """transformers: where the model runs."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """transformers: auto = bfloat16 on CUDA, float32 on CPU."""
    max_pixels: int | None = Field(default=None, ge=3136)
    """transformers: cap on pixels per image given to the vision tower (null: the processor's own)."""
    app_name: str = runtime(default="annotator")
    """serve: the Serve application that holds the TraitDescriber deployment."""

    @model_validator(mode="after")
    def _needs(self) -> LLMConfig:
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("kind openai needs base_url and model")
        if self.kind == "transformers" and not self.model:
            raise ValueError("kind transformers needs model")
        return self


class AnnotateConfig(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    render: Literal["overlay", "crop"] = "overlay"
    """overlay: red outline of the zone, upscaled 2× (the paper); crop: each box plus a margin."""
    images_per_prompt: Literal[1, 3] = 3
    """3: the paper's consensus prompt over a candidates/ consensus group (its best setting);
    candidates outside a complete group still go one by one. 1: every image alone."""
    mllm_only: bool = False
    """The paper's MLLM-only baseline: whole images, no boxes drawn (same candidates and grouping)."""
    include_taxon: bool = False
    """Name the species in the prompt (after the images). Off, as in the paper: observed, not recalled, traits."""
    min_on_specimen: float = Field(default=0.5, ge=0, le=1)
    """A zone's region is described only when at least this share of its pixels lies on the specimen
    (the measurements' segmentation); a zone with no such region is background: never sent, the next
    candidate image takes its place, and a pair with none left gets a row of status background. 0:
    every region, as the paper."""
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    """Units whose confidence (pipeline.evidence.unit_confidence, known before any request) is under
    this are not sent: their rows get status low_confidence."""
    vocabulary: str = "insect"
    """The group annotated: the organism the prompts name and the body parts answers are normalised
    to. Bundled (pipeline/vocabularies/): insect (the default, the paper's), bird (the parts of
    fine-grained bird datasets), plant (vascular plants, herbarium sheets); or a YAML file of the
    same shape, readable on every node."""
    max_in_flight: int = runtime(default=32, ge=1)
    """LLM requests outstanding at once over the whole annotate stage (the Serve app: per describer replica)."""
    max_concurrent_batches: int = runtime(default=4, ge=1)
    """Batches each annotate actor works on at once (as in Ray Data LLM): their units share the
    actor's max_in_flight requests, so while one batch's last requests back off and retry the
    next batch's keep the server busy. 1: one batch at a time, each a barrier."""
    num_actors: int = runtime(default=1, ge=1)
    """Annotate actors for the LLM kinds (each holds max_in_flight / num_actors requests; with
    transformers each loads the model). kind none uses one actor per CPU."""
    num_gpus: float = runtime(default=0, ge=0)
    """GPUs per annotate actor (transformers on a GPU)."""
    num_cpus: float = runtime(default=1, gt=0)
    """CPUs reserved per annotate actor (rendering is CPU work; an openai/serve actor mostly waits)."""
    crop_margin: float = Field(default=0.15, ge=0)
    image_format: Literal["jpeg", "png"] = "jpeg"
    """How renderings are encoded for the LLM (and saved): jpeg (quality 95; ~20x faster to encode
    than PNG and ~6x smaller, which otherwise bounds the stage) or png (lossless)."""
    save_renderings: bool = False
    """Also write the renderings in a renderings column of traits/ (one list per annotation)."""
    batch_size: int = runtime(default=16, ge=1)
    """Candidates per annotate batch (LLM kinds take at least 4 × the actor's in-flight share)."""

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_loads(cls, value: str) -> str:
        load_vocabulary(value)  # a ValueError naming what is bundled
        return value


class RayConfig(Section):
    address: str | None = None
    """Cluster to join; null: RAY_ADDRESS if set (as under `ray job submit`), else a Ray already
    running on this machine, else a new local one."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    """Set either to always start a fresh local Ray with these resources (for fake GPUs in
    tests, or to cap a laptop run); ray.address is then ignored."""
    wait_for_resources_s: float = Field(default=600, ge=0)
    """An actor pool that fits only a node type the autoscaler has not started yet waits this long
    for it (saying so once a minute), then the run stops naming the keys. A pool that no node can
    ever hold stops the run at once."""


class BuildRayConfig(RayConfig):
    small_build_images: int = Field(default=5000, ge=0)
    """A build of at most this many images runs count, select, candidates and its annotate stage
    when templated (llm.kind none) or asking an OpenAI-compatible server (openai) in its driver, on
    whole tables, instead of Ray Data tasks, shuffles and actor pools, whose fixed costs (seconds a
    stage) would dominate; the same rows either way. 0: always Ray. Encode (the GPU pool) and the
    transformers and serve kinds always run on Ray."""


class LeasedOutput(Section):
    """What a driver that writes an output folder (a build, the SAE trainer) shares: its lease."""

    output_lease_s: float = runtime(default=60.0, ge=5)
    """One driver writes an output at a time (docs/build.md, "One writer per output"). A holder on
    another machine, whose process cannot be checked from here and whose Ray cluster does not
    answer, is taken over only once its lease has not been refreshed (every 2 s) for this long."""


class BuildConfig(LeasedOutput):
    source: SourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    counting: CountingConfig = Field(default_factory=CountingConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    ray: BuildRayConfig = runtime(default_factory=BuildRayConfig)
    storage: StorageConfig = runtime(default_factory=StorageConfig)
    report: bool = runtime(default=True)
    """Write the browsable HTML report (OUT/report/, see pipeline.report) at the end of the build."""
    output: str = runtime()
    """Output root of the build (local path or fsspec URL); may change on resume (a moved folder)."""
    reuse: list[str] = runtime(default_factory=list)
    """Earlier finished builds (local or fsspec URLs) whose results this build takes instead of
    computing them: whole stages with the same fingerprint, images already encoded, LLM answers
    to the same requests (docs/reuse.md). Changes no result (also --reuse OUT, repeatable)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> BuildConfig:
        if self.sae.checkpoint is None:
            raise ValueError("sae.checkpoint is required")
        if self.source.format == "parquet" and not (self.source.path_column or self.source.bytes_column):
            raise ValueError("source: set path_column or bytes_column for a parquet manifest")
        if self.contrast.score == "evidence" and not self.candidates.evidence:
            raise ValueError("contrast.score: evidence ranks by the evidence that candidates.evidence: false turns "
                             "off; set contrast.score to ratio, difference or log_ratio_weighted")
        self.source._storage = self.storage
        return self

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for the build's own outputs (from the storage section; none for a local output)."""
        return self.options_for(self.output)

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec options for any other path of the build (sae.checkpoint, backbone.model, ...)."""
        return fsspec_options(self.storage, url)


# --------------------------------------------------------------------------- the SAE trainer

class SAETrainSpec(Section):
    kind: Literal["relu", "topk", "batchtopk"] = "relu"
    """relu: the paper's ReLU + L1; topk / batchtopk: k active latents per patch (per patch on
    average across a batch), no L1 — not in the paper, a fixed L0 instead of a tuned α."""
    k: int | None = Field(default=None, ge=1)
    """Active latents per patch for topk / batchtopk."""
    expansion: int = Field(default=32, ge=1)
    """m = expansion · d latents (the paper: 32 → 24,576 for DINOv2-base)."""
    alpha: float = Field(default=4e-4, ge=0)
    """L1 coefficient α (the paper's default 4e-4); relu only."""
    scale: Literal["none", "unit_mean_norm"] = "none"
    """none: raw activations (the paper); unit_mean_norm: scale so the mean patch norm is 1.
    The scale is stored in the checkpoint and the build's encoder applies it identically."""

    @model_validator(mode="after")
    def _k_for_topk(self) -> SAETrainSpec:
        if self.kind != "relu" and self.k is None:
            raise ValueError(f"k is required for a {self.kind} SAE")
        return self


class TrainLoop(Section):
    batch_size: int = Field(default=16384, ge=1)
    """Patches per step over all workers (the paper: 16,384); each worker takes batch_size / num_workers."""
    steps: int = runtime(default=1000, ge=1)
    """Optimizer steps (ignored when total_patches is set)."""
    total_patches: int | None = runtime(default=None, ge=1)
    """Train on this many patches instead: steps = ceil(total_patches / batch_size) (the paper: ~100M)."""
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=500, ge=0)
    """Linear learning-rate warm-up."""
    l1_warmup_steps: int = Field(default=0, ge=0)
    """α rises linearly from 0 to sae.alpha over this many steps (0: no warm-up)."""
    seed: int = 0
    """Seeds the SAE's initial weights and the shuffle order."""
    max_images: int | None = Field(default=None, ge=1)
    """Image sources: read at most this many images."""
    init_patches: int = Field(default=65536, ge=1)
    """Patches (the first batches) whose mean initialises b_dec, and whose spread gives the
    activation scale and the data variance behind the normalised MSE."""
    shuffle_buffer: int = Field(default=131072, ge=0)
    """Patches in each worker's local shuffle buffer, so a batch mixes many images' patches
    (0: no shuffling). At d = 768 in fp32, 131,072 patches take 400 MB."""
    cache: bool = False
    """Keep the activations in Ray's object store after the first pass. For small sources trained
    for many epochs (the demo); off, every epoch streams them from the source again."""
    log_every: int = runtime(default=50, ge=1)
    checkpoint_every: int = runtime(default=500, ge=1)
    keep_checkpoints: int = runtime(default=2, ge=1)
    """Periodic checkpoints kept under output/ray_train (the newest ones)."""
    dead_after_patches: int = Field(default=1_000_000, ge=1)
    """A latent that has not fired for this many patches counts as dead (metrics; AuxK loss)."""
    aux_k: int = Field(default=256, ge=1)
    """topk / batchtopk: dead latents used by the AuxK loss per patch."""
    aux_alpha: float = Field(default=1 / 32, ge=0)
    """topk / batchtopk: weight of the AuxK loss."""
    dense_fraction: float = Field(default=0.1, gt=0, le=1)
    """A latent firing on more than this fraction of a batch's patches counts as dense (metrics)."""
    num_workers: int = Field(default=1, ge=1)
    """Ray Train data-parallel workers; gradients are averaged over them every step."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); off: CPU workers (gloo)."""
    cpus_per_worker: float = Field(default=1, gt=0)
    threads: int | None = Field(default=None, ge=1)
    """torch threads per worker (null: what Ray gives the worker, i.e. its CPUs)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. Weights and optimizer state stay fp32."""
    max_failures: int = runtime(default=0, ge=-1)
    """Ray Train restarts the workers from the last checkpoint this many times after a failure (-1: always)."""
    fail_at_step: int | None = runtime(default=None, ge=1)
    """Fault injection for tests: a worker raises right after the checkpoint of this step
    (once: not again after resuming from that checkpoint)."""

    @property
    def n_steps(self) -> int:
        return math.ceil(self.total_patches / self.batch_size) if self.total_patches else self.steps

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainLoop:
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by num_workers ({self.num_workers})")
        return self


class TrainSourceConfig(SourceConfig):
    format: Literal["bioscan", "imagefolder", "parquet", "webdataset", "activations"] = "bioscan"
    """Image sources as in the build (features come from the backbone, streamed, never dumped),
    or activations: a folder (or file) of precomputed patch activations — .npy arrays [n, d]
    (float32 or float16) or Parquet files whose first fixed-size-list column holds one
    activation per row."""


class TrainSAEConfig(LeasedOutput):
    source: TrainSourceConfig
    # Fixed on resume, batch sizes included: the blocks they make shape the shuffled batches.
    preprocess: PreprocessConfig = fixed(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    encoder: EncoderConfig = fixed(default_factory=EncoderConfig)
    """The backbone actor pool for image sources (batch_size, num_gpus, min/max_actors); its SAE is not used."""
    sae: SAETrainSpec = Field(default_factory=SAETrainSpec)
    train: TrainLoop = Field(default_factory=TrainLoop)
    ray: RayConfig = runtime(default_factory=RayConfig)
    storage: StorageConfig = runtime(default_factory=StorageConfig)
    """How s3:// sources and backbones are reached (the output stays a local folder)."""
    output: str
    """Checkpoint folder (local path)."""

    @model_validator(mode="after")
    def _share_storage(self) -> TrainSAEConfig:
        self.source._storage = self.storage
        return self


# --------------------------------------------------------------------------- exports of a finished build

CAPTION_FIELDS = ("species", "genus", "description", "body_part")


class ClipConfig(Section):
    """Image–caption shards for CLIP training (export format clip, and sae-traits downstream)."""
    caption_template: str = "A photo of {species} with {description}"
    """The caption of an (image, ok annotation) sample — the paper's; fields {species}, {genus},
    {description} (the trait text) and {body_part}."""
    control_template: str = "A photo of {species}"
    """The species-only control's caption of the same images (fields as above, less the traits)."""
    image: Literal["original", "rendering", "crop"] = "original"
    """original: the source photo as it is (a JPEG's own bytes); rendering: the image the model was
    sent (boxes outlined); crop: the photo cropped around the boxes (annotate.crop_margin)."""
    held_out_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of each species' images held out for the zero-shot test (by image id, seeded; a
    species with one image is trained on only). No held-out image is in a training shard."""
    split_seed: int = 0
    """Seed of the train / held-out split."""
    samples_per_shard: int = Field(default=1000, ge=1)
    """Samples per WebDataset tar shard."""

    @field_validator("caption_template", "control_template")
    @classmethod
    def _known_fields(cls, template: str, info) -> str:
        allowed = CAPTION_FIELDS if info.field_name == "caption_template" else ("species", "genus")
        try:
            template.format(**{k: "" for k in allowed})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{template!r} is not a template of the fields {', '.join(allowed)} ({exc!r})") from None
        return template


class ExportConfig(Section):
    """``python -m pipeline.export``: a finished build's traits/ as a Hugging Face dataset folder (hf),
    a Darwin Core Archive (dwca) or image–caption WebDataset shards for CLIP training (clip). The
    build is only read; its source images are reached with the build's own config (manifest.json)."""
    build: str
    """The finished build's output folder (local path or fsspec URL, e.g. s3://bucket/builds/run1)."""
    format: Literal["hf", "dwca", "clip"]
    """hf: a folder that datasets.load_dataset reads as it is (Parquet data files and a dataset card),
    ready for push_to_hub; dwca: a Darwin Core Archive (a .zip: Occurrence core, MeasurementOrFact
    extension); clip: WebDataset shards of trait captions, of a species-only control and of the
    held-out images (the clip section; docs/downstream.md)."""
    out: str
    """hf and clip: the folder; dwca: the .zip file. Local path or fsspec URL."""
    overwrite: bool = False
    """Replace what is at out; otherwise an existing file or non-empty folder there is refused."""
    include_background: bool = False
    """Also export annotations with status background (the model called the zone background, or no zone
    lay on the specimen: not described)."""
    include_failed: bool = False
    """Also export annotations with status failed (no answer after the retries: no description)."""
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    """Only annotations whose confidence is at least this (docs/quality.md; 0.65 keeps the trusted
    ones); rows without a confidence (a build made with candidates.evidence false) are always exported."""
    image: Literal["rendering", "crop"] = "rendering"
    """hf: what the image columns hold. rendering: the images the model was sent (from traits/ when the
    build saved them with annotate.save_renderings, else made again from the source images by the
    annotate stage's code); crop: each image cropped around its boxes (annotate.crop_margin), no outline."""
    rows_per_file: int = Field(default=1000, ge=1)
    """hf: annotations per Parquet data file (the hub's viewer and streaming like files of a few hundred MB)."""
    threads: int = Field(default=8, ge=1)
    """hf: threads reading and rendering source images, when they are made again."""
    title: str | None = None
    """The dataset's title (card and EML); null: "sae-traits trait annotations of <the source root's name>"."""
    license: str = "unknown"
    """A placeholder until set: the licence, as a Hugging Face hub licence id (cc-by-4.0, cc0-1.0, ...),
    written in the card's YAML and the EML's intellectualRights."""
    creator: str | None = None
    """dwca: the EML's creator and contact (a person or organisation); null: a placeholder."""
    basis_of_record: Literal["PreservedSpecimen", "FossilSpecimen", "LivingSpecimen", "MaterialSample",
                             "MaterialEntity", "MaterialCitation", "HumanObservation", "MachineObservation",
                             "Occurrence"] = "PreservedSpecimen"
    """dwca: the occurrences' basisOfRecord (Darwin Core vocabulary; BIOSCAN's specimens are preserved)."""
    media_base_url: str | None = Field(default=None, pattern=r"^https?://")
    """dwca: the public http(s) URL of the build's source.root, for associatedMedia (this URL + the image's
    path under source.root); null: only images the build read from a store (s3://, https://) get one."""
    clip: ClipConfig = Field(default_factory=ClipConfig)
    """clip: the captions, the image and the held-out split."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How s3:// build and out paths are reached (the source images: the build's own storage section)."""

    @field_validator("out")
    @classmethod
    def _archive_is_a_zip(cls, out: str, info) -> str:
        if info.data.get("format") == "dwca" and not out.lower().endswith(".zip"):  # format is validated first
            raise ValueError(f"a Darwin Core Archive is one .zip file (got {out})")
        return out


# --------------------------------------------------------------------------- the downstream check

class FineTuneConfig(Section):
    """open_clip's trainer (``python -m open_clip_train.main``) as both fine-tunes run it: the same
    steps, seed and hyper-parameters for the trait captions and the species-only control."""
    epochs: int = Field(default=10, ge=1)
    """Epochs; a killed fine-tune resumes from its last finished epoch."""
    samples_per_epoch: int | None = Field(default=None, ge=1)
    """Samples an epoch draws from the shards (--train-num-samples); null: the training samples."""
    batch_size: int = Field(default=256, ge=1)
    """Per GPU (or for the CPU); an epoch has samples_per_epoch / (batch_size x GPUs) steps."""
    lr: float = Field(default=1e-5, gt=0)
    wd: float = Field(default=0.2, ge=0)
    warmup: int = Field(default=100, ge=0)
    """Warm-up steps of the cosine schedule (open_clip's default, 10,000, suits pre-training)."""
    seed: int = 0
    workers: int = Field(default=4, ge=0)
    """Data loader processes per GPU; lowered so every one gets shards holding a full batch."""
    precision: Literal["auto", "amp", "amp_bf16", "fp32"] = "auto"
    """auto: amp on CUDA, fp32 on the CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when a GPU is visible."""
    gpus: int | None = Field(default=None, ge=1)
    """GPUs of this node to train on (torchrun, one process each); null: every visible one."""
    extra_args: list[str] = Field(default_factory=list)
    """More flags for open_clip's trainer, passed as they are (e.g. ["--grad-checkpointing"])."""


class ZeroShotConfig(Section):
    templates: Literal["openai", "simple"] = "openai"
    """openai: the OpenAI ImageNet templates BioCLIP averages over ("a photo of a {c}." ...);
    simple: open_clip's short list."""
    batch_size: int = Field(default=64, ge=1)


class DownstreamConfig(Section):
    """``sae-traits downstream``: the paper's downstream check on a finished build — caption shards
    (export format clip), a fine-tune of a starting CLIP on the trait captions and one on the
    species-only control with open_clip's own trainer, and zero-shot species classification of the
    held-out images by the starting model and both fine-tunes."""
    build: str
    """The finished build's output folder (local path or fsspec URL)."""
    out: str
    """A local folder: shards/, the trainer's runs/, downstream.md and downstream.json. A rerun
    with the same config skips what is done and resumes a killed fine-tune."""
    model: str = "hf-hub:imageomics/bioclip"
    """The starting model: an open_clip model name (with pretrained), hf-hub:ORG/REPO (BioCLIP;
    the hub's cache offline) or local-dir:FOLDER (open_clip_config.json, with weights or without:
    then random weights, seeded, for tests)."""
    pretrained: str = ""
    """For a model name: an open_clip pretrained tag or a checkpoint file; ignored by hf-hub: and
    local-dir: models, which carry their weights."""
    clip: ClipConfig = Field(default_factory=ClipConfig)
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How an s3:// build is reached (its source images: the build's own storage section)."""

    @field_validator("out")
    @classmethod
    def _local(cls, out: str) -> str:
        if "://" in out:
            raise ValueError(f"{out} is not a local folder: open_clip's trainer writes its runs locally")
        return out


# --------------------------------------------------------------------------- the annotator Serve app

class AnnotatorAppConfig(Section):
    """The args of ``actors.serve_app:build_annotator_app`` in a Serve config file: the build's own
    sections (an SAE, backbone or preprocessing set here means what it means in a build) plus the
    deployments' resources and the endpoint's limits."""
    annotate: AnnotateConfig
    """How regions are rendered and described: llm (kind openai, an OpenAI-compatible server such
    as the llm application of serve_configs/qwen2_5_vl_72b.yaml, or transformers, loaded in each
    describer replica), render, include_taxon, crop_margin, image_format, and max_in_flight (LLM
    requests outstanding per describer replica). The batch-only keys (images_per_prompt,
    num_actors, batch_size, save_renderings, ...) are not used here."""
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    """The DINOv2 the SAE was trained on (model, layer, dtype)."""
    sae: SAEConfig = Field(default_factory=SAEConfig)
    """The SAE (checkpoint, required) and τ (threshold: the same τ as the builds named)."""
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    """How a photo becomes the model's square input (geometry, image_size) and the pixel limit
    checked from its header (max_pixels); boxes are exact either way."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How an s3:// SAE checkpoint or backbone is reached."""
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
    endpoint_max_ongoing_requests: int = Field(default=8, ge=1)
    """Requests one AnnotateEndpoint replica works on at once (each waits on the encoder and the
    LLM): its request slots. A request takes one only once its body has arrived, and probes never do."""
    endpoint_max_queued_requests: int = Field(default=32, ge=0)
    """Requests (their bodies read) that may wait for a slot; more are shed with 503 and
    ``Retry-After`` instead of letting latency grow without bound."""
    endpoint_max_connections: int = Field(default=256, ge=1)
    """Requests one replica holds at once in any state — reading a body (at most
    body_read_timeout_s), waiting for a slot, in one, or a probe (Serve's max_ongoing_requests);
    as many more wait in Serve's router, and beyond that Serve sheds with its own 503. Bodies in
    memory: up to this x max_upload_bytes."""
    shed_retry_after_s: float = Field(default=2, ge=0)
    """The ``Retry-After`` a shed request is given."""
    body_read_timeout_s: float = Field(default=30, gt=0)
    """A request body must arrive within this many seconds (408 otherwise), so slow clients cannot
    hold the request slots."""
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    """Requests whose headers together are larger are refused (431)."""
    builds_root: str | None = None
    """Requests may only name builds under this local folder; null: any local folder the server can read."""
    image_formats: list[Literal["JPEG", "PNG", "WEBP", "TIFF"]] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "TIFF"])
    """What an uploaded photo may be, told apart by its bytes: the formats specimen photos come in
    (an EPS, say, would otherwise reach Ghostscript where it is installed)."""
    max_upload_bytes: int = Field(default=16 * 2**20, ge=1)
    """Larger uploads are refused (413) before they are read in full (and decoding refuses larger photos)."""
    max_latents: int = Field(default=3, ge=1)
    """Latents described per request (each is one LLM call)."""
    auth_token_env: str | None = "SAE_TRAITS_TOKEN"
    """When this environment variable is set on the server, /annotate needs ``Authorization: Bearer <its value>``."""
    allow_anonymous: bool = False
    """Serve /annotate without a token although Serve's HTTP proxy listens beyond loopback. Off: the
    app refuses to start there unless the token variable is set (the endpoint drives the LLM)."""

    @field_validator("annotate")
    @classmethod
    def _llm_kind(cls, annotate: AnnotateConfig) -> AnnotateConfig:
        if annotate.llm.kind not in ("openai", "transformers"):
            raise ValueError(f"llm.kind {annotate.llm.kind!r} cannot serve: use openai (an LLM server) or "
                             "transformers (a local model); none has no model and serve would call this app itself")
        return annotate

    @model_validator(mode="after")
    def _cross_checks(self) -> AnnotatorAppConfig:
        if self.sae.checkpoint is None:
            raise ValueError("sae.checkpoint is required")
        if self.describer_max_replicas < self.describer_min_replicas:
            raise ValueError("describer_max_replicas must be >= describer_min_replicas")
        return self

    @property
    def decode(self) -> PreprocessConfig:
        """The preprocessing of an uploaded photo: the preprocess section, files capped at max_upload_bytes
        and limited to image_formats."""
        return self.preprocess.model_copy(update={"max_bytes": min(self.preprocess.max_bytes, self.max_upload_bytes),
                                                  "formats": list(self.image_formats)})


# --------------------------------------------------------------------------- loading

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` → nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is already set to a value")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(model: type[ConfigT], data: dict[str, Any], prefix: str = "") -> ConfigT:
    """Validate ``data``; errors become one ConfigError whose lines start with the dotted key
    (after ``prefix``, for a section validated on its own: "storage.")."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else prefix.rstrip(".") or "<config>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{key}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(model: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None) -> ConfigT:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return validate(model, merge(data, parse_overrides(overrides or [])))


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict, may_change: tuple[str, ...] = ()) -> str:
    """The keys on which two dumped configs differ (except those starting with ``may_change``),
    as "key: old → new; ..." ('' when they agree) — what a refused resume tells the user."""
    old, new = flat_config(old), flat_config(new)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(may_change))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in differ)


DOCS = "docs/"  # where --help sends a reader for every key's meaning


def add_config_arguments(parser, model: type[BaseModel] | None = None, docs: str | None = None) -> None:
    """--config and --set; with ``model``, --help ends with its sections (one line each) and the docs page."""
    if model is not None:
        sections = [f"  {name:<11} " + (", ".join(_section(field).model_fields) if _section(field) else
                                         _first_line(field.description)) for name, field in model.model_fields.items()]
        parser.epilog = "\n".join(["config keys, by section (--set SECTION.KEY=VALUE):", *sections,
                                    f"every key, its default and meaning: {DOCS}{docs or ''} and pipeline/config.py"])
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set contrast.t_freq=0.01 (repeatable)")


def flag_overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """A command's own flags (--build, --out, --overwrite ...) as overrides of the keys they name, to
    be given after the --set ones: each as a JSON value (valid YAML: a string stays a string); a
    flag not given (None) or a switch left off (False) is no override."""
    return [f"{key}={json.dumps(value)}" for key in keys
            if (value := getattr(args, key, None)) is not None and value is not False]  # (0 == False: a given 0 counts)


def _section(field) -> type[Section] | None:
    return field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Section) else None


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].split(". ")[0].rstrip(".")
