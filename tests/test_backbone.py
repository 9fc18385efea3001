"""The backbone checked, not assumed: our layer-``backbone.layer`` patch features against DINOv2's own
code, and DINOv2 with registers end to end.

The paper read DINOv2 through the original torch-hub code (facebookresearch/dinov2). Its model code
is on PyPI as ``dinov2`` (setup.sh installs it without its dependencies; its ViT needs only torch),
an implementation independent of transformers'. A tiny random Dinov2Model's weights are copied into
it, and both read the same pixels. (timm's port would serve too, but imports torchvision, which no
registry offers for this CPU torch.)"""

import numpy as np
import pytest
import torch
from dinov2.models.vision_transformer import DinoVisionTransformer
from transformers import AutoModel

from pipeline.encoding import IMAGENET_MEAN, IMAGENET_STD, FiringEncoder, PatchFeatures
from pipeline.sae import SAESpec, SparseAutoencoder, save_sae
from pipeline.demo.tiny_models import make_tiny_dinov2

LAYER = 2


def torch_hub_copy(hf_model) -> DinoVisionTransformer:
    """The original DINOv2 ViT with the weights of a transformers Dinov2Model (every key mapped, strict)."""
    cfg, sd = hf_model.config, hf_model.state_dict()
    model = DinoVisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
                                  depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                                  mlp_ratio=cfg.mlp_ratio, init_values=1.0, block_chunks=0).eval()
    ours = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
            "mask_token": sd["embeddings.mask_token"].reshape(model.mask_token.shape),
            "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(cfg.num_hidden_layers):
        hf, hub = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = hf + "attention."
        ours[hub + "attn.qkv.weight"] = torch.cat([sd[attn + f"{p}_proj.weight"] for p in "qkv"])
        ours[hub + "attn.qkv.bias"] = torch.cat([sd[attn + f"{p}_proj.bias"] for p in "qkv"])
        ours[hub + "attn.proj.weight"], ours[hub + "attn.proj.bias"] = sd[attn + "o_proj.weight"], sd[attn + "o_proj.bias"]
        ours[hub + "ls1.gamma"], ours[hub + "ls2.gamma"] = sd[hf + "layer_scale1.lambda1"], sd[hf + "layer_scale2.lambda1"]
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                ours[f"{hub}{name}.{p}"] = sd[f"{hf}{name}.{p}"]
    model.load_state_dict(ours, strict=True)
    return model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = make_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2-tiny", seed=5)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():  # layer scales away from their init, so a block's scaling is checked too
        for block in model.encoder.layer:
            block.layer_scale1.lambda1.uniform_(0.5, 1.5)
            block.layer_scale2.lambda1.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder, torch_hub_copy(model)


@pytest.mark.parametrize("size", [224, 280])  # the trained input, and one where position embeddings are interpolated
def test_patch_features_equal_the_original_dinov2_code(backbone, size):
    folder, hub = backbone
    pixels = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ours = PatchFeatures(str(folder), LAYER)(pixels)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        (theirs,) = hub.get_intermediate_layers(x, n=[LAYER], norm=False)  # block LAYER's output, before the norm
    difference = float((ours - theirs).abs().max())
    print(f"\n[DINOv2 torch-hub code vs ours, {size}²] largest feature difference {difference:.2e} "
          f"(features up to {float(theirs.abs().max()):.1f})")
    assert ours.shape == theirs.shape == (2, (size // 14) ** 2, 64)
    assert difference < 1e-4


def test_a_dinov2_with_registers_drops_its_register_tokens(tmp_path):
    folder = make_tiny_dinov2(tmp_path / "dinov2-reg", registers=4)
    features = PatchFeatures(str(folder), LAYER)
    assert features.n_prefix == 5  # CLS + 4 registers
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    model = AutoModel.from_pretrained(folder).eval()
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states[LAYER + 1][:, 5:]
    assert torch.allclose(features(pixels), expected, atol=1e-5)
    torch.manual_seed(0)
    sae = save_sae(SparseAutoencoder(SAESpec(d=64, m=128)), tmp_path / "sae")
    out = FiringEncoder(str(folder), LAYER, str(sae), threshold=0.1)({"image_id": np.array(["a", "b"], object),
                                                                       "pixels": pixels})
    assert out.num_rows == 2 and max(max(p) for p in out["patch"].to_pylist()) < 256
