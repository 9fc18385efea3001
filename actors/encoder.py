"""The encoder actors, each a thin host around library code in :mod:`pipeline.encoding`.

- :class:`EncodeActor` — the build's encode stage: a FiringEncoder plus the tests' fault switch
  (``encoder.fail_once_after_batches``);
- :class:`PatchActivations` — the SAE trainer's view of the backbone: patch features, one row per patch.

Both run in the encoder pool that :func:`pipeline.execution.encode_images` sets up."""

from __future__ import annotations

import os

import numpy as np

from pipeline import storage
from pipeline.config import BackboneConfig, PreprocessConfig, SAEConfig, StorageConfig, fsspec_options
from pipeline.encoding import FiringEncoder, PatchFeatures
from pipeline.errors import write_errors
from pipeline.preprocessing import DeviceDecoder

DeviceDecode = tuple[PreprocessConfig, int, "tuple[str, StorageConfig] | None"]
"""decode: gpu — (preprocess, patch size, errors_to) from :func:`pipeline.execution.encode_images`."""


def device_decoder(device_decode: DeviceDecode | None, device) -> DeviceDecoder | None:
    return None if device_decode is None else DeviceDecoder(device_decode[0], device_decode[1], device)


def decode_on_device(decoder: DeviceDecoder | None, batch: dict, errors_to) -> dict:
    """A decode: gpu batch's bytes → pixels on the device; images that do not decode go to the
    errors/ of ``errors_to`` (as a decode task's would), or are dropped when it is None."""
    if decoder is None:
        return batch
    batch, rejected = decoder(batch)
    if errors_to is not None:
        write_errors(errors_to[0], fsspec_options(errors_to[1], errors_to[0]), rejected)
    return batch


class EncodeActor:
    """Decoded batch → activations/ rows (firings above τ). ``fault_marker``: with
    ``fail_once_after_batches`` (encoder.fail_once_after_batches), the tests' fault switch: the
    first actor of the build to reach that batch claims the marker (a file) and dies."""

    def __init__(self, backbone: BackboneConfig, sae: SAEConfig, storage: StorageConfig,
                 fail_once_after_batches: int | None = None, fault_marker: str | None = None,
                 device_decode: DeviceDecode | None = None):
        self.encoder = FiringEncoder.from_sections(backbone, sae, storage)
        self.storage, self.fault_marker = storage, fault_marker
        self.fail_after, self.batches = fail_once_after_batches, 0
        self.decoder = device_decoder(device_decode, self.encoder.device)
        self.errors_to = device_decode[2] if device_decode else None

    def __call__(self, batch):
        out = self.encoder(decode_on_device(self.decoder, batch, self.errors_to))
        self.batches += 1
        if self.batches == self.fail_after and self.claim_fault():
            os._exit(1)  # dies holding a finished batch: Ray Data must restart the actor and redo it
        return out

    def claim_fault(self) -> bool:
        """True the first time per build, so the injected fault fires once."""
        fs, marker = storage.filesystem(self.fault_marker, fsspec_options(self.storage, self.fault_marker))
        return storage.claim_once(fs, marker)


class PatchActivations:
    """A batch with uint8 ``pixels`` [B, S, S, 3] → ``{"x": float32 [B·P, d]}``, one row per patch
    (patches of an image stay adjacent; the trainer's shuffle buffer mixes them)."""

    def __init__(self, model: str, layer: int, dtype: str = "auto", storage=None, revision: str | None = None,
                 device_decode: DeviceDecode | None = None):
        self.features = PatchFeatures(model, layer, dtype, storage, revision)
        self.decoder = device_decoder(device_decode, self.features.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = decode_on_device(self.decoder, batch, None)  # images that do not decode are not trained on
        if not len(batch["pixels"]):
            return {"x": np.zeros((0, self.features.hidden_size), np.float32)}
        feats = self.features(batch["pixels"])
        return {"x": feats.reshape(-1, feats.shape[-1]).float().cpu().numpy()}
