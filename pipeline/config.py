"""Typed, validated configuration for the build (and the helpers the other entry points share).

Shaped like Ray Serve LLM's ``LLMConfig``: pydantic models with ``extra="forbid"``, one docstring
per field, nested sections. Load with :func:`load_config` from a YAML file plus ``--set a.b=c``
overrides; every validation error is re-raised as :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


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
    options: dict[str, Any] = Field(default_factory=dict)
    """Further s3fs keyword arguments, applied last (e.g. {config_kwargs: {connect_timeout: 5}},
    {client_kwargs: {verify: false}}). Values here are written to the build's manifest: keep
    real credentials in the *_env variables."""

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


class SourceConfig(Section):
    format: Literal["bioscan", "imagefolder", "parquet"] = "bioscan"
    """bioscan: the BIOSCAN-5M layout of the bioscan-dataset package; imagefolder:
    <root>/<Genus_species>/<file>; parquet: a manifest with an image path or bytes column."""
    root: str
    """bioscan: the folder holding bioscan5m/; imagefolder: the class folders' parent; parquet:
    the manifest file or folder. Local path or any fsspec URL."""
    splits: list[str] | None = None
    """bioscan only: splits to read (e.g. [train, val, test]); null reads every split."""
    limit: int | None = Field(default=None, ge=1)
    """Read at most this many rows (after de-duplication); for quick trial runs."""
    id_column: str = "image_id"
    """parquet only: the column with the dataset's own stable image identifier."""
    path_column: str | None = "path"
    """parquet only: column with image paths (absolute, or relative to the manifest's folder)."""
    bytes_column: str | None = None
    """parquet only: column with encoded image bytes; used instead of path_column when set."""
    species_column: str = "species"
    genus_column: str = "genus"
    family_column: str = "family"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec when opening root, over the storage section's options for it (keys given
    here win): e.g. a source in another store than the outputs."""

    # The enclosing config's storage section (set by BuildConfig / TrainSAEConfig; travels with a
    # pickled SourceConfig into Ray tasks, never into a dump or manifest).
    _storage: Any = PrivateAttr(default=None)

    @property
    def fsspec_options(self) -> dict[str, Any]:
        """fsspec options for root: the storage section's (s3 URLs only) with storage_options over them."""
        from pipeline import storage

        return storage.fsspec_options(self._storage, self.root, self.storage_options)


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
    batch_size: int = Field(default=64, ge=1)
    """Rows per decode task batch."""


class BackboneConfig(Section):
    model: str = "facebook/dinov2-base"
    """Hugging Face hub id or local directory of a DINOv2 model (Dinov2Model or with registers)."""
    layer: int = Field(default=10, ge=0)
    """0-based transformer block whose output (residual stream, before the final LayerNorm) is
    read: 10 is hidden_states[11] = hidden_states[-2] of DINOv2-base."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""


class SAEConfig(Section):
    checkpoint: str | None = None
    """SAE checkpoint: a project folder (config.json + model.safetensors) or a saev file."""
    threshold: float = 0.9
    """τ: a latent fires on a patch when its code is above this (raw units of that SAE)."""


class EncoderConfig(Section):
    batch_size: int = Field(default=64, ge=1)
    """Images per encoder call."""
    num_gpus: float = Field(default=1.0, ge=0)
    """GPUs per encoder actor (0 runs on the CPU)."""
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs reserved per encoder actor."""
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    """Actor pool bounds; Ray Data scales between them."""
    fail_once_after_batches: int | None = Field(default=None, ge=1)
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
    score: Literal["ratio", "difference", "log_ratio_weighted"] = "ratio"
    """Orders a species' selected latents: f_s / f_g (default: favours latents specific to the
    species over ones that are merely common everywhere), f_s - f_g, or f_s · log(f_s / f_g)."""
    max_latents_per_species: int = Field(default=10, ge=1)
    """At most this many selected latents per species go forward (best score first)."""
    lone_species: Literal["none", "family"] = "none"
    """A species that is the only one of its genus in the build has f_s = f_g, so the paper's
    strict rule selects nothing for it (none). family: contrast it against its family instead."""


class CandidatesConfig(Section):
    top_images: int = Field(default=9, ge=1)
    """Images kept per selected (species, latent), strongest summed activation first."""
    group_size: int = Field(default=3, ge=1)
    """Images per consensus group (the paper's three-image prompt)."""


class LLMConfig(Section):
    kind: Literal["none", "openai", "transformers", "serve"] = "none"
    """none: descriptions templated from the measurements (no model); openai: any OpenAI-compatible
    chat-completions server (the Ray Serve LLM app, `vllm serve`, SGLang) at base_url; transformers:
    a local Hugging Face VLM (model) in each annotate actor; serve: the annotator Serve app's
    TraitDescriber deployment, through a DeploymentHandle."""
    base_url: str | None = None
    """openai: the server's API root, e.g. http://127.0.0.1:8000/llm/v1."""
    model: str | None = None
    """openai: the served model name; transformers: a hub id or local folder."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (the key itself never enters a config or manifest)."""
    timeout_s: float = Field(default=120.0, gt=0)
    """openai: per-attempt timeout."""
    max_retries: int = Field(default=5, ge=0)
    """openai: retries on 429 / 5xx / timeouts / connection errors / malformed answers; serve: on a
    replica dying or restarting."""
    backoff_s: float = Field(default=1.0, ge=0)
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
    app_name: str = "annotator"
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
    max_in_flight: int = Field(default=32, ge=1)
    """LLM requests outstanding at once over the whole annotate stage."""
    num_actors: int = Field(default=1, ge=1)
    """Annotate actors for the LLM kinds (each holds max_in_flight / num_actors requests; with
    transformers each loads the model). kind none uses one actor per CPU."""
    num_gpus: float = Field(default=0, ge=0)
    """GPUs per annotate actor (transformers on a GPU)."""
    num_cpus: float = Field(default=1, gt=0)
    """CPUs reserved per annotate actor (rendering is CPU work; an openai/serve actor mostly waits)."""
    crop_margin: float = Field(default=0.15, ge=0)
    image_format: Literal["jpeg", "png"] = "jpeg"
    """How renderings are encoded for the LLM (and saved): jpeg (quality 95; ~20x faster to encode
    than PNG and ~6x smaller, which otherwise bounds the stage) or png (lossless)."""
    save_renderings: bool = False
    """Also write the renderings in a renderings column of traits/ (one list per annotation)."""
    batch_size: int = Field(default=16, ge=1)
    """Candidates per annotate batch (LLM kinds take at least 4 × the actor's in-flight share)."""


class RayConfig(Section):
    address: str | None = None
    """Cluster to join; null: RAY_ADDRESS if set (as under `ray job submit`), else a Ray already
    running on this machine, else a new local one."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    """Set either to always start a fresh local Ray with these resources (for fake GPUs in
    tests, or to cap a laptop run); ray.address is then ignored."""


class BuildConfig(Section):
    source: SourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    counting: CountingConfig = Field(default_factory=CountingConfig)
    contrast: ContrastConfig = Field(default_factory=ContrastConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    report: bool = True
    """Write the browsable HTML report (OUT/report/, see pipeline.report) at the end of the build."""
    output: str
    """Output root of the build (local path or fsspec URL)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> BuildConfig:
        if self.sae.checkpoint is None:
            raise ValueError("sae.checkpoint is required")
        if self.source.format == "parquet" and not (self.source.path_column or self.source.bytes_column):
            raise ValueError("source: set path_column or bytes_column for a parquet manifest")
        self.source._storage = self.storage
        return self

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for the build's own outputs (from the storage section; none for a local output)."""
        return self.options_for(self.output)

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec options for any other path of the build (sae.checkpoint, backbone.model, ...)."""
        from pipeline import storage

        return storage.fsspec_options(self.storage, url)


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


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set contrast.t_freq=0.01 (repeatable)")
