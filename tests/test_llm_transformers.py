"""TransformersBackend on a tiny random-weight Qwen2.5-VL built in a temporary folder and loaded back
through ``from_pretrained(local_dir)``: round trips, prompt layout (order, image token counts),
refusal of remote images, failures, one generate at a time. Nothing is downloaded."""

import ast
import asyncio
import base64
import io
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.annotation import llm_transformers
from pipeline.annotation.llm_transformers import TransformersBackend
from pipeline.annotation.llm import ChatRequest, LLMRequestFailed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from pipeline.demo.tiny_models import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "qwen2_5_vl-tiny")


@pytest.fixture(scope="session")
def backend(tiny_qwen):
    return TransformersBackend(tiny_qwen)


def data_url(width: int, height: int, colour=(180, 40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    return [{"role": "system", "content": "You describe insects."}, {"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "Describe the head in the red box."}
# (width, height) → tokens: smart_resize to multiples of 28 within 56²…112² px, then (h/14·w/14)/2².
SIZES = [((56, 56), 4), ((140, 84), 15), ((112, 112), 16)]


def run(backend, request):
    return asyncio.run(backend.complete(request))


def test_loads_through_from_pretrained_of_the_local_folder(tiny_qwen, monkeypatch):
    calls = []
    for name in ("AutoConfig", "AutoModelForImageTextToText", "AutoTokenizer", "AutoImageProcessor"):
        cls = getattr(llm_transformers, name)
        original = cls.from_pretrained

        def spy(path, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, path))
            return _original(path, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    fresh = TransformersBackend(tiny_qwen, model_name="tiny")
    # (AutoConfig is also called from inside the others: compare as a set.)
    assert set(calls) == {(name, str(tiny_qwen)) for name in
                          ("AutoConfig", "AutoModelForImageTextToText", "AutoTokenizer", "AutoImageProcessor")}
    assert type(fresh.hf_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert fresh.model == "tiny" and fresh.native_qwen
    cuda = torch.cuda.is_available()  # auto: CUDA + bf16 when there is a GPU, else CPU + fp32
    assert (fresh.device.type, fresh.dtype) == (("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32))


@pytest.mark.parametrize("n_images", [1, 3])
def test_round_trip_is_deterministic_when_greedy(backend, tiny_qwen, n_images):
    images = [image_part(data_url(*size)) for size, _ in SIZES[:n_images]]
    request = ChatRequest(messages=user(TEXT, *images), max_tokens=12, temperature=0.0,
                          response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    first, second = run(backend, request), run(backend, request)
    assert isinstance(first.text, str) and first.text
    assert first.model == str(tiny_qwen)
    assert first.prompt_tokens > sum(n for _, n in SIZES[:n_images]) and 0 < first.completion_tokens <= 12
    assert first.latency_s > 0 and first.finish_reason in ("stop", "length")
    assert first.extra["response_format"] is False  # ignored: no constrained decoding here
    assert "<|" not in first.text  # special tokens stripped
    assert (second.text, second.completion_tokens) == (first.text, first.completion_tokens)


def test_prompt_keeps_the_order_of_text_and_images(backend):
    tok = backend.tokenizer
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    text_ids = tok(TEXT["text"], add_special_tokens=False)["input_ids"]

    def position_of_text(ids: list[int]) -> int:
        return next(i for i in range(len(ids)) if ids[i:i + len(text_ids)] == text_ids)

    ids = backend.encode(user(TEXT, image_part(data_url(56, 56))))["input_ids"][0].tolist()
    assert position_of_text(ids) + len(text_ids) <= ids.index(start)
    ids = backend.encode(user(image_part(data_url(56, 56)), TEXT))["input_ids"][0].tolist()
    assert position_of_text(ids) > ids.index(end)


def test_image_pad_count_follows_the_grid_arithmetic(backend):
    inputs = backend.encode(user(TEXT, *(image_part(data_url(*size)) for size, _ in SIZES)))
    ids = inputs["input_ids"][0].tolist()
    start, end, pad = backend.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    spans = [ids[i + 1:ids.index(end, i)] for i, t in enumerate(ids) if t == start]
    merge = backend.image_processor.merge_size
    from_grid = [int(t * h * w) // merge**2 for t, h, w in inputs["image_grid_thw"].tolist()]
    assert [len(s) for s in spans] == from_grid == [n for _, n in SIZES]
    assert all(set(s) == {pad} for s in spans) and ids.count(pad) == sum(from_grid)
    assert inputs["pixel_values"].shape[0] == sum(n * merge**2 for n in from_grid)
    assert inputs["mm_token_type_ids"].sum().item() == sum(from_grid)  # what 5.x's 3D rope reads


def test_max_pixels_caps_the_image_tokens(tiny_qwen):
    capped = TransformersBackend(tiny_qwen, max_pixels=56 * 56)
    inputs = capped.encode(user(TEXT, image_part(data_url(112, 112))))
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56×56 px → 4 image tokens instead of 16


@pytest.mark.parametrize("url", ["http://example.org/bee.png", "https://example.org/bee.png", "file:///etc/passwd"])
def test_non_data_image_urls_are_refused_without_fetching(tiny_qwen, monkeypatch, url):
    fresh = TransformersBackend(tiny_qwen)

    def no_network(*args, **kwargs):
        raise AssertionError("the backend tried to open a connection")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(fresh.hf_model, "generate", no_network)
    with pytest.raises(LLMRequestFailed) as err:
        run(fresh, ChatRequest(messages=user(TEXT, image_part(url))))
    assert err.value.reason == "bad_request" and "never fetched" in err.value.detail


def test_generate_errors_become_llm_request_failed(tiny_qwen, monkeypatch):
    fresh = TransformersBackend(tiny_qwen)

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(fresh.hf_model, "generate", broken)
    with pytest.raises(LLMRequestFailed) as err:
        run(fresh, ChatRequest(messages=user(TEXT, image_part(data_url(56, 56)))))
    assert err.value.reason == "generate_failed" and "out of memory" in err.value.detail


def test_one_generate_at_a_time_and_sampling_settings(tiny_qwen, monkeypatch):
    fresh = TransformersBackend(tiny_qwen)
    original, active, seen = fresh.hf_model.generate, [0], []
    guard = threading.Lock()

    def spy(**kwargs):
        with guard:
            active[0] += 1
            seen.append((active[0], kwargs["max_new_tokens"], kwargs["do_sample"], kwargs.get("temperature")))
        time.sleep(0.05)  # long enough for overlapping calls to show
        try:
            return original(**kwargs)
        finally:
            with guard:
                active[0] -= 1
    monkeypatch.setattr(fresh.hf_model, "generate", spy)
    requests = [ChatRequest(messages=user(TEXT, image_part(data_url(56, 56))), max_tokens=3 + i, temperature=t)
                for i, t in enumerate([0.0, 0.01, 0.8])]

    async def all_at_once():
        return await asyncio.gather(*(fresh.complete(r) for r in requests))
    results = asyncio.run(all_at_once())
    assert all(r.completion_tokens <= q.max_tokens for r, q in zip(results, requests))
    assert max(a for a, *_ in seen) == 1
    assert sorted(s[1:] for s in seen) == [(3, False, None), (4, False, None), (5, True, 0.8)]


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", ["pipeline/annotation/llm_transformers.py", "pipeline/annotation/llm.py",
                                  "pipeline/demo/tiny_models.py",
                                  "benchmarks/bench_llm_transformers.py"])
def test_gpu_benchmark_modules_need_neither_pydantic_nor_ray(path):
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "tokenizers", "PIL", "actors", "pipeline"}
    assert top_level_imports(ROOT / path) <= allowed
