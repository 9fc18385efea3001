"""A local Hugging Face vision-language model as an LLM backend (no server): one generate at a time.

The :class:`pipeline.annotation.llm.Backend` for a model loaded in-process with ``from_pretrained`` — a hub id
or a local folder (the tests' tiny random Qwen2.5-VL goes through the very same path). The Qwen2-VL /
Qwen2.5-VL family is handled natively: its tokenizer renders the chat, a ``Qwen2VLImageProcessor``
(the PIL one where torchvision is missing) cuts each image into patches, and each ``<|image_pad|>``
is repeated grid_t·grid_h·grid_w / merge² times — what ``Qwen2_5_VLProcessor`` does, without its
video processor (which wants torchvision). Other VLMs go through ``AutoProcessor`` +
``AutoModelForImageTextToText``.

Imports only torch, transformers, PIL and the standard library (plus pipeline.annotation.llm): the GPU
benchmark runs it where pydantic and Ray are not installed.

    backend = TransformersBackend("Qwen/Qwen2.5-VL-3B-Instruct")
    result = await backend.complete(ChatRequest(messages=[...]))
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
# From its module: transformers 5.17's top-level AutoImageProcessor is a stub that demands torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from pipeline.annotation.llm import ChatRequest, ChatResult, LLMRequestFailed

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
GREEDY_BELOW = 0.01
"""Temperatures at or below this decode greedily (the annotator's 0.01 means "deterministic")."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Qwen2.5-VL's chat template, written out (used when a tokenizer ships none): a default system turn,
# then each content part in its order; an image part becomes <|vision_start|><|image_pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pick_device_dtype(device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """auto: CUDA when visible, else CPU; bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow there)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dev, DTYPES[dtype]


def decode_image_url(url: str) -> Image.Image:
    """A ``data:<mime>;base64,...`` URL → RGB PIL image. Any other URL (http, https, file) is refused:
    a backend that fetched would hide network failures and let a prompt reach arbitrary hosts."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "no scheme"
        raise LLMRequestFailed("bad_request", f"only data: image URLs are accepted, not {scheme!r} (never fetched)")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise LLMRequestFailed("bad_request", f"image data URL is not base64: {header[:40]!r}")
    try:
        return Image.open(io.BytesIO(base64.b64decode(payload, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, OSError) as err:
        raise LLMRequestFailed("bad_request", f"image data URL does not decode: {err}") from None


def to_hf_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI chat messages → the chat-template form (``{"type": "text"|"image", ...}`` parts in their
    order) and the decoded images in the order they appear."""
    out, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": message["role"], "content": [{"type": "text", "text": content or ""}]})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                ref = part["image_url"]
                images.append(decode_image_url(ref["url"] if isinstance(ref, dict) else ref))
                parts.append({"type": "image", "image": images[-1]})
            else:
                raise LLMRequestFailed("bad_request", f"unsupported content part type {kind!r}")
        out.append({"role": message["role"], "content": parts})
    return out, images


class TransformersBackend:
    """The :class:`pipeline.annotation.llm.Backend` for a Hugging Face VLM in this process.

    - ``device``/``dtype`` "auto": CUDA + bf16 when a GPU is visible, else CPU + fp32.
    - ``max_pixels`` caps the image processor's resized area (Qwen: ``size["longest_edge"]``), i.e. the
      number of image tokens; None keeps the model's own setting.
    - ``model_name`` is what results report as ``model`` (default: ``model_path`` as given).
    - Greedy decoding when ``temperature <= 0.01``, else sampling at that temperature; other
      sampling settings (top_p, top_k, repetition_penalty) are the model's ``generation_config``,
      as ``vllm serve`` uses them by default.
    - ``response_format`` is ignored: there is no constrained decoding here; the annotator's
      tolerant parser reads the free text (``extra["response_format"]`` is False to say so).
    - One ``generate`` at a time per model: all run, in arrival order, on the backend's one
      long-lived worker thread; the input preparation (image decoding, patching) runs before, in
      ``asyncio.to_thread``, so it overlaps the generate in progress. The event loop never blocks.
    """

    def __init__(self, model_path: str | Path, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                 max_pixels: int | None = None, model_name: str | None = None):
        path = str(model_path)
        self.device, self.dtype = pick_device_dtype(device, dtype)
        config = AutoConfig.from_pretrained(path)
        hf_model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype)
        if config.model_type in QWEN_VL_TYPES:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # from_pretrained kwargs reach the processor's __init__, which maps max_pixels to size["longest_edge"].
            image_processor = AutoImageProcessor.from_pretrained(path, **({"max_pixels": max_pixels} if max_pixels else {}))
            self._setup(hf_model, model_name or path, tokenizer=tokenizer, image_processor=image_processor)
        else:
            self._setup(hf_model, model_name or path, processor=AutoProcessor.from_pretrained(path))

    @classmethod
    def from_components(cls, hf_model, model_name: str, *, tokenizer=None, image_processor=None,
                        processor=None) -> TransformersBackend:
        """A backend around an already-built model (the benchmark's random-weight 3B); the model is
        used on the device and in the dtype it already has."""
        self = cls.__new__(cls)
        param = next(hf_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._setup(hf_model, model_name, tokenizer=tokenizer, image_processor=image_processor, processor=processor)
        return self

    def _setup(self, hf_model, model_name: str, *, tokenizer=None, image_processor=None, processor=None) -> None:
        self.model = model_name
        self.hf_model = hf_model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.image_processor = image_processor
        self.native_qwen = processor is None
        if self.native_qwen and not self.tokenizer.chat_template:
            self.tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        # transformers ≥ 5.x computes Qwen's 3D rope positions from mm_token_type_ids; older ones from the ids.
        get_rope_index = getattr(getattr(hf_model, "model", hf_model), "get_rope_index", None)
        self._wants_mm_types = get_rope_index is not None and "mm_token_type_ids" in inspect.signature(get_rope_index).parameters
        eos = hf_model.generation_config.eos_token_id
        self._stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # One long-lived thread runs every generate: one at a time per model whatever the event loop, and
        # CUDA's per-thread state is set up once. In a fresh thread per request (asyncio.run + to_thread)
        # a 1-token generate of the 3B took 190 ms instead of 70 ms on an H100.
        self._generate_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    # -- public API -------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """OpenAI messages → the tensors ``generate`` receives (``input_ids``, ``attention_mask``,
        ``pixel_values``, ``image_grid_thw``, …) on the model's device. Raises LLMRequestFailed
        ("bad_request") for a message it cannot take."""
        return self._to_device(self._encode_on_cpu(messages))

    def _encode_on_cpu(self, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """As :meth:`encode`, on the CPU (a worker thread's part; the generate thread moves it)."""
        conversation, images = to_hf_messages(messages)
        if not self.native_qwen:
            return dict(self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, return_tensors="pt"))
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise LLMRequestFailed("bad_request", f"chat template placed {len(pieces) - 1} image slots for {len(images)} images")
        inputs = {}
        if images:
            inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            # Each image's single pad becomes one token per merged patch, in image order.
            counts = (inputs["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
        tokens = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if self._wants_mm_types:
            ids = inputs["input_ids"]
            image_id, video_id = self.tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD])
            inputs["mm_token_type_ids"] = (ids == image_id).int() + 2 * (ids == video_id).int()
        return inputs

    async def complete(self, request: ChatRequest) -> ChatResult:
        """One chat completion; raises LLMRequestFailed ("bad_request" for inputs it cannot take,
        "generate_failed" when generation raises). ``latency_s`` is the wall time of this call,
        waiting for the model included (as an HTTP server's queueing is); ``extra["generate_s"]`` is
        the generate alone."""
        start = time.perf_counter()
        # Image decoding and patching run in any worker thread, overlapping the generate in progress.
        inputs = await asyncio.to_thread(self._encode_on_cpu, request.messages)
        loop = asyncio.get_running_loop()
        text, n_prompt, n_new, finish, generate_s = await loop.run_in_executor(
            self._generate_thread, self._generate, inputs, request)
        return ChatResult(text=text, model=self.model, latency_s=time.perf_counter() - start, prompt_tokens=n_prompt,
                          completion_tokens=n_new, finish_reason=finish,
                          extra={"generate_s": generate_s, "response_format": False})

    async def close(self) -> None:
        """Nothing per event loop to release; the model stays loaded (callers may close after each batch)."""

    # -- worker threads ---------------------------------------------------------------------

    def _to_device(self, inputs) -> dict[str, torch.Tensor]:
        """Tensors to the model's device; pixels (the floating ones) also to its dtype."""
        return {k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def _generate(self, inputs: dict[str, torch.Tensor], request: ChatRequest) -> tuple[str, int, int, str, float]:
        """On the generate thread: inputs to the device, generate, decode the new tokens."""
        if request.temperature <= GREEDY_BELOW:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": float(request.temperature)}
        t0 = time.perf_counter()
        try:
            inputs = self._to_device(inputs)
            with torch.inference_mode():
                out = self.hf_model.generate(**inputs, max_new_tokens=request.max_tokens, **sampling)
        except Exception as err:  # OOM, shape errors, …: one failed request, not a dead actor
            raise LLMRequestFailed("generate_failed", f"{type(err).__name__}: {err}") from err
        generate_s = time.perf_counter() - t0
        n_prompt = int(inputs["input_ids"].shape[1])
        new = out[0, n_prompt:].tolist()
        finish = "stop" if new and new[-1] in self._stop_ids else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True), n_prompt, len(new), finish, generate_s
