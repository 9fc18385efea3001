#!/usr/bin/env python
"""Generation speed of TransformersBackend on a random-weight Qwen2.5-VL: one 448×448 image, batch 1.

    python benchmarks/bench_llm_transformers.py                 # Qwen2.5-VL-3B-Instruct shape, bf16, CUDA
    python benchmarks/bench_llm_transformers.py --config tiny   # the tests' tiny model on the CPU (smoke test)

Figures (each the median of ``--repeats`` runs after ``--warmup`` runs, all through ``complete``):
- preprocess  ``encode()`` alone: PNG decode, resize + patchify, chat template, tokenize.
- prefill     time to first token: ``complete(max_tokens=1)``; ``generate_s`` is the model alone
              (vision tower + prompt forward + one step), ``latency`` adds preprocessing.
- decode      ``complete(max_tokens=T)``; end-to-end tokens/s = T / latency and the steady decode
              rate (T - 1) / (generate_s(T) - generate_s(1)).

Choices:
- 3b is Qwen/Qwen2.5-VL-3B-Instruct's config.json on the hub, hard-coded (text: hidden 2048,
  36 layers, 16 heads, 2 KV heads, MLP 11008, vocab 151,936, rope θ 1e6, mrope [16, 24, 24], tied
  embeddings; vision: 32 blocks, hidden 1280, MLP 3420, 16 heads, out 2048, window 112, full
  attention in blocks 7/15/23/31, patch 14, merge 2) and its image processor defaults
  (min 56² px, max 12,845,056 px: 448×448 stays 448×448 → 32×32 patches → 256 image tokens).
- Random weights and the tests' tiny BPE tokenizer (~500 tokens, Qwen's special tokens at ids
  0–13, the config's token ids set to match): the model keeps the real 151,936-row embedding and
  LM head, so the work per token is the real model's; only the text is gibberish (and the prompt
  text tokenizes to more tokens than Qwen's tokenizer would make — the count is printed).
- eos is switched off so every run makes exactly T tokens (random weights would stop anywhere).
- 3b builds the model straight on the device (no save/load); tiny loads through from_pretrained.

Seen on an H100 (torch 2.11, transformers 5.17, 3b): preprocess 18 ms, prefill 117 ms, decode 37.9 tok/s
(26.4 ms/token), 7.2 GiB peak. HF generate is bound by kernel launches at batch 1: a profile showed the
GPU busy ~5 ms per decoded token.

Imports only torch, transformers, tokenizers, PIL and the project's model modules: it runs on a
GPU machine without pydantic or Ray (tested with transformers 5.17 and 5.24).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.annotation.llm_transformers import TransformersBackend  # noqa: E402
from pipeline.annotation.llm import ChatRequest  # noqa: E402
from pipeline.demo.tiny_models import make_qwen_bpe_tokenizer, make_tiny_qwen2_5_vl, qwen_token_ids  # noqa: E402

PROMPT = ("The image shows an insect specimen with one body part inside a red box. Describe the part in the box: "
          'its colour, texture and shape. Answer as JSON: {"part": ..., "colour": ..., "texture": ..., "shape": ...}.')

QWEN2_5_VL_3B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                          rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False, sliding_window=32768,
                          max_window_layers=70,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                            hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


def build_3b(device: torch.device) -> TransformersBackend:
    """Random-weight Qwen2.5-VL-3B built on the device in bf16, with the tiny tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = make_qwen_bpe_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(text_config=dict(QWEN2_5_VL_3B_TEXT, bos_token_id=pad, pad_token_id=pad),
                              vision_config=QWEN2_5_VL_3B_VISION, tie_word_embeddings=True, **qwen_token_ids(tokenizer))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: no fp32 copy of 3.75B weights
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = pad
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=12845056)
    return TransformersBackend.from_components(model, "random/Qwen2.5-VL-3B-Instruct-shape", tokenizer=tokenizer,
                                               image_processor=image_processor)


def specimen_url(size: int = 448) -> str:
    """A PNG data URL of a noisy 'specimen' with a red box (content does not matter to random weights)."""
    image = Image.effect_noise((size, size), 40).convert("RGB")
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size // 2, size // 2], outline=(255, 0, 0), width=4)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def median_of(fn, warmup: int, repeats: int) -> list:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["3b", "tiny"], default="3b")
    parser.add_argument("--tokens", type=int, default=None, help="decode length T (default 256 for 3b, 32 for tiny)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    tokens = args.tokens or (256 if args.config == "3b" else 32)

    t0 = time.perf_counter()
    if args.config == "3b":
        if not torch.cuda.is_available():
            sys.exit("--config 3b needs CUDA (a 3.75B-parameter model on a CPU takes minutes per answer); "
                     "use --config tiny for a smoke test")
        backend = build_3b(torch.device("cuda"))
    else:
        tmp = tempfile.TemporaryDirectory()
        backend = TransformersBackend(make_tiny_qwen2_5_vl(Path(tmp.name) / "qwen2_5_vl-tiny"), device="cpu")
    backend.hf_model.generation_config.eos_token_id = None  # every run makes exactly max_tokens tokens
    build_s = time.perf_counter() - t0
    cuda = backend.device.type == "cuda"
    n_params = sum(p.numel() for p in backend.hf_model.parameters())

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": specimen_url()}},
                                             {"type": "text", "text": PROMPT}]}]
    inputs = backend.encode(messages)
    n_image = int(inputs["image_grid_thw"].prod(-1).sum()) // backend.image_processor.merge_size ** 2

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def preprocess():
        t = time.perf_counter()
        backend.encode(messages)
        sync()
        return time.perf_counter() - t

    def complete(max_tokens):
        def once():
            result = asyncio.run(backend.complete(ChatRequest(messages=messages, max_tokens=max_tokens, temperature=0)))
            assert result.completion_tokens == max_tokens, result.completion_tokens
            return result.latency_s, result.extra["generate_s"]
        return once

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pre = median_of(preprocess, args.warmup, args.repeats)
    first = median_of(complete(1), args.warmup, args.repeats)
    full = median_of(complete(tokens), 1, args.repeats)
    med = statistics.median
    ttft_gen, ttft_e2e = med(g for _, g in first), med(lat for lat, _ in first)
    full_gen, full_e2e = med(g for _, g in full), med(lat for lat, _ in full)
    steady = (tokens - 1) / (full_gen - ttft_gen) if full_gen > ttft_gen else float("nan")  # nan: lost in noise

    model = backend.hf_model
    where = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"config      {args.config}: {n_params / 1e9:.2f}B params, {model.dtype}, {where}, "
          f"attention {model.config._attn_implementation}; built in {build_s:.1f} s")
    print(f"software    python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"prompt      1 image 448×448 → grid {inputs['image_grid_thw'][0].tolist()} → {n_image} image tokens; "
          f"{inputs['input_ids'].shape[1]} prompt tokens in all")
    print(f"preprocess  {med(pre) * 1e3:8.1f} ms   encode() (median of {args.repeats})")
    print(f"prefill     {ttft_gen * 1e3:8.1f} ms   time to first token, generate alone; {ttft_e2e * 1e3:.1f} ms end-to-end")
    print(f"decode      {tokens / full_e2e:8.1f} tok/s  {tokens} tokens in {full_e2e:.2f} s end-to-end; steady "
          f"{steady:.1f} tok/s ({1e3 / steady:.1f} ms/token)")
    if cuda:
        print(f"memory      {torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB peak allocated")
    print(f"RESULT llm_transformers[{args.config}]: prefill_ms={ttft_gen * 1e3:.1f} decode_tok_s={steady:.1f} "
          f"e2e_tok_s={tokens / full_e2e:.1f}")


if __name__ == "__main__":
    main()
