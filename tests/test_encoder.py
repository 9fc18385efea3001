import json

import numpy as np
import pytest
import torch
from transformers import Dinov2Model

from pipeline.encoding import FiringEncoder
from pipeline.sae import SAESpec, SparseAutoencoder, save_sae

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec(d=64, m=256))
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "sae")


def batch_of(pixels):
    n = len(pixels)
    cols = {k: np.array([f"{k}{i}" for i in range(n)], dtype=object) for k in ("image_id", "species", "genus")}
    return {**cols, "pixels": pixels, "orig_w": np.full(n, 300), "orig_h": np.full(n, 200)}


@pytest.mark.parametrize("layer", [1, 2])
def test_firings_equal_the_dense_formula_above_threshold(tiny_dinov2, sae_dir, layer):
    rng = np.random.default_rng(layer)
    pixels = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    threshold = 0.5
    encoder = FiringEncoder(str(tiny_dinov2), layer, str(sae_dir), threshold, sae_chunk_images=2)
    table = encoder(batch_of(pixels))

    # Dense reference: the full, uncut model; hidden_states[layer + 1] is block `layer`'s output.
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = torch.tensor(((pixels / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        feats = model(pixel_values=x, output_hidden_states=True).hidden_states[layer + 1][:, 1:]
        codes = encoder.sae.encode(feats).numpy()
    assert feats.shape == (3, 256, 64)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        patch, latent = np.nonzero(codes[i] > threshold)
        assert row["n_firings"] == len(patch) > 0
        assert row["patch"] == patch.tolist() and row["latent"] == latent.tolist()
        np.testing.assert_allclose(row["value"], codes[i][patch, latent], rtol=1e-4, atol=1e-5)
        assert row["image_id"] == f"image_id{i}" and row["orig_w"] == 300
    assert table.schema.field("patch").type.value_type.bit_width == 16


def test_shape_mismatch_between_backbone_and_sae_is_refused(tiny_dinov2, tmp_path):
    save_sae(SparseAutoencoder(SAESpec(d=32, m=64)), tmp_path / "sae")
    with pytest.raises(ValueError, match="d=32.*64"):
        FiringEncoder(str(tiny_dinov2), 2, str(tmp_path / "sae"), 0.9)


def test_layer_out_of_range_names_the_key(tiny_dinov2, sae_dir):
    with pytest.raises(ValueError, match="backbone.layer"):
        FiringEncoder(str(tiny_dinov2), 7, str(sae_dir), 0.9)


def test_patch_size_is_read_from_the_backbone_and_checked_against_image_size(tiny_dinov2, tmp_path):
    from pipeline.config import BackboneConfig, ConfigError, PreprocessConfig
    from pipeline.encoding import backbone_patch_px
    from pipeline.demo.tiny_models import make_tiny_dinov2

    assert backbone_patch_px(BackboneConfig(model=str(tiny_dinov2)), PreprocessConfig(image_size=224)) == 14
    with pytest.raises(ConfigError, match=r"preprocess.image_size: 230 .* patch size 14 of backbone.model .* 224 or 238"):
        backbone_patch_px(BackboneConfig(model=str(tiny_dinov2)), PreprocessConfig(image_size=230))
    # A backbone of 16-px patches: its own size, not DINOv2's 14.
    config = json.loads((tiny_dinov2 / "config.json").read_text())
    other = make_tiny_dinov2(tmp_path / "p16")
    (other / "config.json").write_text(json.dumps({**config, "patch_size": 16}))
    assert backbone_patch_px(BackboneConfig(model=str(other)), PreprocessConfig(image_size=224)) == 16
