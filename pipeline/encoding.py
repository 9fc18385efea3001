"""The encode stage's library: model-ready pixels → DINOv2 patch features → SAE codes → firings above τ.

:class:`FiringEncoder` is a callable over a batch; :mod:`actors.encoder` hosts it in a Ray Data
actor pool (``num_gpus=...``), and a test calls it as a plain object. Only firings leave it, as
compact lists per image — never the dense [patches, latents] code (≈25 MB/image at full size).
:class:`PatchFeatures` alone is the SAE trainer's view of the backbone."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoModel

from pipeline import storage
from pipeline.config import BackboneConfig, ConfigError, PreprocessConfig, SAEConfig, StorageConfig, fsspec_options
from pipeline.contract import ACTIVATIONS_SCHEMA, GEOMETRY_SCHEMA, INDEX_SCHEMA
from pipeline.sae import CheckpointError, load_sae

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Columns carried from the decode stage into activations/ (typed, so every block has one schema).
PASSTHROUGH = {f.name: f.type for f in (*INDEX_SCHEMA, *GEOMETRY_SCHEMA)}
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is visible (bf16 unless told otherwise), else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), DTYPES.get(dtype, torch.bfloat16)
    return torch.device("cpu"), torch.float32 if dtype in ("auto", "float16", "bfloat16") else DTYPES[dtype]


def backbone_config(model: str, storage_options: dict | None = None, revision: str | None = None) -> dict:
    """The backbone's ``config.json`` (a local or remote folder read directly; a hub model through the
    hub's cache), without loading its weights."""
    hub = storage.hub_reference(model)
    if hub is not None:
        return AutoConfig.from_pretrained(hub[0], revision=revision).to_dict()
    fs, path = storage.filesystem(model, storage_options)
    with fs.open(storage.join(path.rstrip("/"), "config.json"), "rb") as f:
        return json.load(f)


def backbone_patch_px(backbone: BackboneConfig, preprocess: PreprocessConfig, storage_section=None,
                      config: dict | None = None) -> int:
    """The backbone's patch size, read from its config (``config``, when the caller has read it) and
    checked against ``preprocess.image_size`` (the patch grid must tile the input exactly); a
    ConfigError names both keys otherwise."""
    config = config or backbone_config(backbone.model, fsspec_options(storage_section, backbone.model), backbone.revision)
    if config.get("model_type") not in DINOV2_MODEL_TYPES:
        raise ConfigError(f"backbone.model: {backbone.model} is a {config.get('model_type')!r} model, not DINOv2")
    patch_px = int(config["patch_size"])
    if preprocess.image_size % patch_px:
        raise ConfigError(f"preprocess.image_size: {preprocess.image_size} is not a multiple of the patch size "
                          f"{patch_px} of backbone.model {backbone.model}; use e.g. "
                          f"{preprocess.image_size // patch_px * patch_px} or {(preprocess.image_size // patch_px + 1) * patch_px}")
    return patch_px


# A backbone folder holds one of these (transformers' single-file and sharded layouts).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_models(backbone: BackboneConfig, sae: SAEConfig, preprocess: PreprocessConfig, storage_section=None) -> int:
    """Before Ray starts, what the encode actors will load: the backbone's patch grid
    (:func:`backbone_patch_px`), its weights present (a folder, local or remote), and the SAE
    checkpoint loaded the way the actors load it and checked against the backbone's width. Anything
    wrong is a ConfigError naming the key, the path and what is wrong; returns the patch size."""
    config = backbone_config(backbone.model, fsspec_options(storage_section, backbone.model), backbone.revision)
    patch_px = backbone_patch_px(backbone, preprocess, storage_section, config)
    if storage.hub_reference(backbone.model) is None:
        fs, folder = storage.filesystem(backbone.model, fsspec_options(storage_section, backbone.model))
        if not any(fs.exists(storage.join(folder.rstrip("/"), name)) for name in WEIGHT_FILES):
            raise ConfigError(f"backbone.model: {backbone.model} has a config.json but no weights "
                              f"(none of {', '.join(WEIGHT_FILES)})")
    options = fsspec_options(storage_section, sae.checkpoint)
    try:
        loaded = load_sae(sae.checkpoint, options, sae.subtract_b_dec, sae.revision)
    except ConfigError:
        raise
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(str(exc) if str(exc).startswith("sae.checkpoint") else f"sae.checkpoint: {exc}") from None
    except Exception as exc:  # a truncated, empty or foreign file: whatever torch or safetensors said, and its size
        raise ConfigError(f"sae.checkpoint: {sae.checkpoint} cannot be read as an SAE ({storage.describe_size(sae.checkpoint, options)}"
                          f"; {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); a "
                          "project checkpoint is a folder of config.json + model.safetensors (sae-traits train-sae "
                          "writes one), a saev file starts with a JSON header line") from None
    hidden = config["hidden_size"]
    if loaded.spec.d != hidden:
        raise ConfigError(f"sae.checkpoint: {sae.checkpoint} takes inputs of size d={loaded.spec.d} but backbone.model "
                          f"{backbone.model} has hidden size {hidden}")
    return patch_px


def torch_hub_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2's own position-embedding interpolation (facebookresearch/dinov2, the torch-hub code the
    paper read): bicubic with a scale factor of (n + 0.1) / √N per axis, where transformers sizes the
    grid to n instead — which moves every position embedding slightly at any input but the trained
    one (up to 0.02 in a tiny model's block output). Bound to a ``Dinov2Embeddings``."""
    n_positions = self.position_embeddings.shape[1] - 1
    if embeddings.shape[1] - 1 == n_positions and height == width:
        return self.position_embeddings
    side, dim = int(math.sqrt(n_positions)), embeddings.shape[-1]
    patch = self.patch_embeddings.patch_size[0]
    grid = self.position_embeddings[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, scale_factor=((height // patch + 0.1) / side, (width // patch + 0.1) / side), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(self.position_embeddings.dtype)
    return torch.cat((self.position_embeddings[:, :1], grid), dim=1)


def load_backbone(model: str, layer: int, device: torch.device, dtype: torch.dtype,
                  storage_options: dict | None = None, revision: str | None = None) -> tuple[torch.nn.Module, int]:
    """A DINOv2 model cut after block ``layer`` (later blocks are never needed), and how many
    prefix tokens (CLS + registers) precede the patch tokens. ``model`` is a hub model (at
    ``revision``; transformers fetches only the files it needs into the hub's cache), a local
    folder or a remote folder (s3://...), copied to this node's cache first."""
    hub = storage.hub_reference(model)
    source = hub[0] if hub is not None else storage.local_copy(model, storage_options)  # hub: files as needed
    backbone = AutoModel.from_pretrained(source, dtype=dtype, revision=revision)
    if backbone.config.model_type not in DINOV2_MODEL_TYPES:
        raise ValueError(f"backbone.model: {model} is a {backbone.config.model_type!r} model, not DINOv2")
    n_layers = len(backbone.encoder.layer)
    if not 0 <= layer < n_layers:
        raise ValueError(f"backbone.layer: {layer} is out of range for a {n_layers}-block model (0..{n_layers - 1})")
    backbone.encoder.layer = backbone.encoder.layer[: layer + 1]
    backbone.config.num_hidden_layers = layer + 1
    if backbone.config.model_type == "dinov2":  # (with registers, transformers already matches the hub's code)
        backbone.embeddings.interpolate_pos_encoding = types.MethodType(torch_hub_pos_encoding, backbone.embeddings)
    n_prefix = 1 + getattr(backbone.config, "num_register_tokens", 0)
    return backbone.to(device).eval(), n_prefix


class PatchFeatures:
    """uint8 pixels [B, S, S, 3] → DINOv2 residual stream after block ``layer``, patch tokens
    only [B, P, d] (ImageNet normalisation done on the device). ``storage``: the config's storage
    section (StorageConfig or its dict), for a model on s3://."""

    def __init__(self, model: str, layer: int, dtype: str = "auto", storage=None, revision: str | None = None):
        self.device, self.dtype = pick_device_dtype(dtype)
        self.backbone, self.n_prefix = load_backbone(model, layer, self.device, self.dtype,
                                                     fsspec_options(storage, model), revision)
        self.hidden_size = self.backbone.config.hidden_size
        self.patch_px = int(self.backbone.config.patch_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``pixels``: numpy from a decode task, or a tensor already on the device (decode: gpu)."""
        if pixels.shape[1] % self.patch_px or pixels.shape[2] % self.patch_px:
            raise ValueError(f"preprocess.image_size: pixels of {pixels.shape[2]}x{pixels.shape[1]} do not tile "
                             f"into the backbone's {self.patch_px}-px patches")
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        x = pixels.to(self.device, non_blocking=True)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        out = self.backbone(pixel_values=x.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[-1][:, self.n_prefix:, :]


class FiringEncoder:
    """Callable over a batch (dict of numpy arrays with a uint8 ``pixels`` [B, S, S, 3] column);
    returns a pyarrow table: the pass-through columns plus ``latent`` list<int32>, ``patch``
    list<int16>, ``value`` list<float32> and ``n_firings``. ``storage``: the config's storage
    section (StorageConfig or its dict), for a backbone or SAE checkpoint on s3://."""

    def __init__(self, model: str, layer: int, sae_checkpoint: str, threshold: float,
                 dtype: str = "auto", sae_chunk_images: int = 32, storage=None, subtract_b_dec: bool | None = None,
                 revision: str | None = None, sae_revision: str | None = None):
        self.features = PatchFeatures(model, layer, dtype, storage, revision)
        self.device, self.dtype = self.features.device, self.features.dtype
        self.sae = load_sae(sae_checkpoint, fsspec_options(storage, sae_checkpoint), subtract_b_dec,
                            sae_revision).to(self.device, self.dtype).eval()
        if self.sae.spec.d != self.features.hidden_size:
            raise ValueError(f"sae.checkpoint: SAE input size d={self.sae.spec.d} but the backbone's "
                             f"hidden size is {self.features.hidden_size}")
        self.threshold = threshold
        self.sae_chunk_images = sae_chunk_images  # bounds the dense code held on the device

    @classmethod
    def from_sections(cls, backbone: BackboneConfig, sae: SAEConfig, storage: StorageConfig | None) -> FiringEncoder:
        """The encoder a config's ``backbone`` and ``sae`` sections describe (a build's, the endpoint's)."""
        return cls(backbone.model, backbone.layer, sae.checkpoint, sae.threshold, dtype=backbone.dtype, storage=storage,
                   subtract_b_dec=sae.subtract_b_dec, revision=backbone.revision, sae_revision=sae.revision)

    @torch.inference_mode()
    def firings(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """→ (offsets [B+1], latent [F] int32, patch [F] int16, value [F] float32), sorted by
        image, then patch, then latent."""
        feats = self.features(pixels)
        counts, latents, patches, values = [], [], [], []
        for start in range(0, feats.shape[0], self.sae_chunk_images):
            codes = self.sae.encode(feats[start:start + self.sae_chunk_images])  # [b, P, m]
            img, patch, latent = torch.nonzero(codes > self.threshold, as_tuple=True)
            values.append(codes[img, patch, latent].float().cpu())
            counts.append(torch.bincount(img, minlength=codes.shape[0]).cpu())
            latents.append(latent.to(torch.int32).cpu())
            patches.append(patch.to(torch.int16).cpu())
        offsets = np.zeros(feats.shape[0] + 1, np.int32)
        np.cumsum(torch.cat(counts).numpy(), out=offsets[1:])
        return offsets, torch.cat(latents).numpy(), torch.cat(patches).numpy(), torch.cat(values).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        if n:
            offsets, latent, patch, value = self.firings(batch["pixels"])
        else:
            offsets, latent, patch, value = (np.zeros(1, np.int32), np.zeros(0, np.int32),
                                             np.zeros(0, np.int16), np.zeros(0, np.float32))
        offs = pa.array(offsets, pa.int32())
        columns = {k: _column(batch[k], t) if k in batch else pa.nulls(n, t) for k, t in PASSTHROUGH.items()}
        columns["latent"] = pa.ListArray.from_arrays(offs, pa.array(latent, pa.int32()))
        columns["patch"] = pa.ListArray.from_arrays(offs, pa.array(patch, pa.int16()))
        columns["value"] = pa.ListArray.from_arrays(offs, pa.array(value, pa.float32()))
        columns["n_firings"] = pa.array(np.diff(offsets), pa.int32())
        return pa.table(columns, schema=ACTIVATIONS_SCHEMA)


def _column(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    if values.dtype == object:
        return pa.array(list(values), type=type_, from_pandas=True)
    return pa.array(values, from_pandas=True).cast(type_)
