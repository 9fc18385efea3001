"""Tiny random-weight models for the offline demo and the tests.

They are saved with ``save_pretrained`` and loaded back through the very same
``from_pretrained(local_dir)`` path as the real hub models: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2Tokenizer)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from pipeline.annotation.llm_transformers import QWEN_CHAT_TEMPLATE


def make_tiny_dinov2(folder: str | Path, *, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                     image_size: int = 224, registers: int = 0, seed: int = 0) -> Path:
    """A DINOv2 with the real patch size (14) and input (224 → 16×16 patches) but few, narrow
    blocks (``registers`` > 0: a DINOv2 with that many register tokens). Random weights keep each
    patch token close to a random linear image of its pixels, which is enough for the SAE to find
    coloured parts."""
    folder = Path(folder)
    torch.manual_seed(seed)
    shape = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=hidden_size * 4, image_size=image_size, patch_size=14)
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**shape, num_register_tokens=registers)).eval() \
            .save_pretrained(folder)
    else:
        Dinov2Model(Dinov2Config(**shape)).eval().save_pretrained(folder)
    return folder


# Qwen's special tokens, in Qwen's own order (ids 151643… in the real vocabulary; 0… here).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

_BPE_TEXT = """You are a helpful assistant. Describe the insect part inside the red box.
The head is dark brown with long thin antennae and large compound eyes.
The thorax is black and shiny; the legs are yellow with dark tarsi and fine hairs.
The wings are clear with dark veins; the abdomen is striped orange and black.
{"part": "head", "colour": "brown", "texture": "smooth", "shape": "round"}
Body part: pronotum, scutellum, elytra, femur, tibia, mandible, ovipositor, setae, spots, bands.
0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ( ) [ ] { } " ' - + = / *"""


def make_qwen_bpe_tokenizer(*, vocab_size: int = 512):
    """A small byte-level BPE trained on a few built-in lines, laid out like Qwen's (NFC, Qwen's split
    regex, byte-level), with Qwen's special tokens first (ids 0–13). Returns a ``Qwen2Tokenizer``
    whose eos is ``<|im_end|>`` and pad ``<|endoftext|>`` as in the Instruct models."""

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_BPE_TEXT.splitlines() * 4, trainer)
    # Qwen2Tokenizer rebuilds its BPE from vocab + merges with the same normalizer/pre-tokenizer.
    spec = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=QWEN_SPECIAL_TOKENS[1:], chat_template=QWEN_CHAT_TEMPLATE)


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The config fields that name special tokens, read from a tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def make_tiny_qwen2_5_vl(folder: str | Path, *, seed: int = 0, head_dim: int = 16) -> Path:
    """A random-weight Qwen2.5-VL (text: hidden 64, 2 layers; vision: hidden 32, 2 blocks) with the real
    patch 14 / merge 2 / temporal patch 2, its BPE tokenizer, chat template and a PIL
    ``Qwen2VLImageProcessor`` capped at 112×112 px (≤ 16 image tokens). Loads offline with
    ``AutoTokenizer`` / ``AutoImageProcessor`` / ``AutoModelForImageTextToText.from_pretrained(folder)``.

    ``head_dim`` is the text attention's head size (64 // head_dim query heads, half as many KV heads):
    16 by default; vLLM's CPU attention backend takes only 32 or more (``head_dim=32``: 2 heads, 1 KV head)."""
    if head_dim not in (16, 32, 64):
        raise ValueError(f"head_dim must be 16, 32 or 64 (a divisor of the hidden size 64), got {head_dim}")
    folder = Path(folder)
    heads = 64 // head_dim
    # head_dim/2 rotary frequencies split over (t, h, w) like Qwen's [16, 24, 24] of 64: [2, 3, 3] for 16
    t_freqs = head_dim // 8
    mrope_section = [t_freqs, (head_dim // 2 - t_freqs) // 2, (head_dim // 2 - t_freqs) // 2]
    torch.manual_seed(seed)
    tokenizer = make_qwen_bpe_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
                         bos_token_id=pad, eos_token_id=eos, pad_token_id=pad),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        tie_word_embeddings=True, **qwen_token_ids(tokenizer))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # 56×56 … 112×112 px: each image is 4×4 … 8×8 patches, i.e. 4 … 16 <|image_pad|> tokens after the 2×2 merge.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return folder


# A CLIP small enough to fine-tune on a CPU in seconds (open_clip's model_cfg; vocab_size stays
# 49,408, the size of open_clip's own BPE vocabulary, which ships in its wheel).
TINY_OPEN_CLIP = {"model_cfg": {"embed_dim": 32,
                                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                               "patch_size": 8},
                                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                                             "layers": 2}}}


def make_tiny_open_clip(folder: str | Path) -> Path:
    """A folder open_clip loads as ``local-dir:FOLDER`` — its config only, so random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP, indent=1))
    return folder
