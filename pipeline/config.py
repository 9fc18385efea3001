"""Typed, validated configuration for the build (and the helpers the other entry points share).

Shaped like Ray Serve LLM's ``LLMConfig``: pydantic models with ``extra="forbid"``, one docstring
per field, nested sections. Load with :func:`load_config` from a YAML file plus ``--set a.b=c``
overrides; every validation error is re-raised as :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


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
    """Passed to fsspec when opening root (credentials, endpoint_url, ...)."""


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
    """openai: retries on 429 / 5xx / timeouts / connection errors / malformed answers."""
    backoff_s: float = Field(default=1.0, ge=0)
    """openai: first retry delay; doubles per retry (with jitter), at least the server's Retry-After."""
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
    output: str
    """Output root of the build (local path or fsspec URL)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> BuildConfig:
        if self.sae.checkpoint is None:
            raise ValueError("sae.checkpoint is required")
        if self.source.format == "parquet" and not (self.source.path_column or self.source.bytes_column):
            raise ValueError("source: set path_column or bytes_column for a parquet manifest")
        return self


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


def validate(model: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """Validate ``data``; errors become one ConfigError whose lines start with the dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<config>"
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


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set contrast.t_freq=0.01 (repeatable)")
