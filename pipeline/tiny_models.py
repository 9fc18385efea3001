"""Tiny random-weight models for the offline demo and the tests.

They are saved with ``save_pretrained`` and loaded back through the very same
``from_pretrained(local_dir)`` path as the real hub models: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model


def make_tiny_dinov2(folder: str | Path, *, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                     image_size: int = 224, seed: int = 0) -> Path:
    """A DINOv2 with the real patch size (14) and input (224 → 16×16 patches) but few, narrow
    blocks. Random weights keep each patch token close to a random linear image of its pixels,
    which is enough for the SAE to find coloured parts."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=hidden_size * 4, image_size=image_size, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(folder)
    return folder
