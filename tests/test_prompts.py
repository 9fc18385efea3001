import base64
import dataclasses
import io
import re

import pytest
from PIL import Image

from pipeline.annotation import prompts
from pipeline.annotation.prompts import (PROMPT_FOR, PROMPTS, answer_schema, build_request, prompt_version, response_format,
                            select_prompt, sniff_image_mime)


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 80, 40)).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _image_bytes("PNG"), _image_bytes("JPEG")


def _parts(request):
    (message,) = request.messages
    assert message["role"] == "user"
    return message["content"]


def _first_image_index(parts) -> int:
    return next(i for i, p in enumerate(parts) if p["type"] == "image_url")


# --- layout: instruction first, images, then per-request text ----------------------------------

@pytest.mark.parametrize("render,n", list(PROMPT_FOR))
def test_instruction_text_comes_before_the_first_image(render, n):
    parts = _parts(build_request([PNG] * n, render=render))
    first = _first_image_index(parts)
    assert first >= 1 and parts[0]["type"] == "text"
    assert parts[0]["text"] == select_prompt(render, n).instruction(n)
    assert sum(p["type"] == "image_url" for p in parts) == n
    # Identical requests up to the first image, whatever the images: that prefix is what vLLM can cache.
    other = _parts(build_request([JPEG] * n, render=render, species="Aus bus", genus="Aus", request_id="x"))
    assert other[:_first_image_index(other)] == parts[:first]


def test_taxon_hint_is_off_by_default_and_goes_after_the_images():
    plain = _parts(build_request([PNG] * 3, render="overlay", species="Apis mellifera", genus="Apis"))
    assert not any("Apis" in p.get("text", "") for p in plain)

    parts = _parts(build_request([PNG] * 3, render="overlay", species="Apis mellifera", genus="Apis", include_taxon=True))
    last_image = max(i for i, p in enumerate(parts) if p["type"] == "image_url")
    assert parts[-1]["type"] == "text" and last_image == len(parts) - 2
    assert "Apis mellifera" in parts[-1]["text"] and "genus Apis" in parts[-1]["text"]
    assert not any("Apis" in p.get("text", "") for p in parts[:last_image])
    assert "genus Apis" in _parts(build_request([PNG], genus="Apis", include_taxon=True))[-1]["text"]
    with pytest.raises(ValueError, match="species= or genus="):
        build_request([PNG], include_taxon=True)


def test_several_images_are_numbered_in_order():
    parts = _parts(build_request([PNG, JPEG, PNG], render="overlay"))
    labels = [p["text"] for p in parts[1:] if p["type"] == "text"]
    assert labels == ["Image 1:", "Image 2:", "Image 3:"]
    assert [p["type"] for p in parts[1:]] == ["text", "image_url"] * 3
    assert all(p["type"] != "text" or not p["text"].startswith("Image") for p in _parts(build_request([PNG])))


@pytest.mark.parametrize("render,n", [("overlay", 2), ("overlay", 4), ("crop", 4), ("mllm_only", 2), ("overlay", 0),
                                      ("heatmap", 1)])
def test_refuses_image_counts_and_renderings_without_a_prompt(render, n):
    with pytest.raises(ValueError, match="render"):
        build_request([PNG] * n, render=render)


# --- images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                      ("WEBP", "image/webp")])
def test_mime_type_comes_from_the_bytes(fmt, mime):
    if fmt == "WEBP":
        pytest.importorskip("PIL.WebPImagePlugin")
    data = _image_bytes(fmt)
    assert sniff_image_mime(data) == mime
    url = _parts(build_request([data]))[1]["image_url"]["url"]
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix)
    assert base64.b64decode(url[len(prefix):]) == data


def test_png_is_never_labelled_jpeg():
    """The reference implementation sent PNG bytes as image/jpeg (DESIGN §3.3)."""
    urls = [p["image_url"]["url"] for p in _parts(build_request([PNG, JPEG, PNG], render="crop"))
            if p["type"] == "image_url"]
    assert [u.split(";")[0] for u in urls] == ["data:image/png", "data:image/jpeg", "data:image/png"]


@pytest.mark.parametrize("data", [b"hello world, not an image", b"", _image_bytes("BMP"), b"\x89PNX\r\n"])
def test_unknown_bytes_are_refused_with_what_was_seen(data):
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or GIF") as err:
        sniff_image_mime(data)
    assert repr(data[:12]) in str(err.value)
    with pytest.raises(ValueError, match="image 2 of 3"):
        build_request([PNG, data, PNG])


# --- sampling and response format ----------------------------------------------------------

def test_sampling_defaults_and_overrides():
    one, three = build_request([PNG]), build_request([PNG] * 3)
    assert (one.temperature, one.max_tokens) == (0.01, 196)
    assert (three.temperature, three.max_tokens) == (0.01, 256)
    assert build_request([PNG, PNG], render="crop").max_tokens == 256
    assert build_request([PNG], max_tokens=512, request_id="ann-1").max_tokens == 512
    assert build_request([PNG], request_id="ann-1").request_id == "ann-1"
    assert one.response_format == response_format(1)
    assert three.response_format["json_schema"]["schema"] == answer_schema(3)
    assert build_request([PNG], json_schema=False).response_format is None


def test_response_format_is_openai_json_schema():
    for n in (1, 2, 3):
        fmt = response_format(n)
        assert fmt["type"] == "json_schema"
        assert set(fmt["json_schema"]) == {"name", "schema", "strict"} and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["name"].replace("_", "").isalnum()
    with pytest.raises(ValueError):
        answer_schema(4)


def _objects(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            yield schema
        for value in schema.values():
            yield from _objects(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _objects(value)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_schema_is_in_strict_form(n):
    """OpenAI strict mode (and the least surprising guided decoding): every object closed, every
    property required."""
    objects = list(_objects(answer_schema(n)))
    assert len(objects) == (2 if n == 1 else 3)
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])


# A tiny validator for the keywords answer_schema uses (no jsonschema dependency).
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _errors(value, schema, path="$"):
    kind = schema["type"]
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, _TYPES[kind])
    if not ok:
        return [f"{path}: expected {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    errors = []
    if kind == "object":
        errors += [f"{path}: missing {k}" for k in schema["required"] if k not in value]
        errors += [f"{path}: unexpected {k}" for k in value if k not in schema["properties"]]
        for k, sub in schema["properties"].items():
            if k in value:
                errors += _errors(value[k], sub, f"{path}.{k}")
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            errors += _errors(item, schema["items"], f"{path}[{i}]")
    return errors


SINGLE_ANSWER = {"is_background": False, "body_part": "forewing", "traits": [
    {"attribute": "shape", "value": "elongate, rounded apex"}, {"attribute": "colour", "value": "translucent"},
    {"attribute": "marking", "value": "dark spot near apex"}]}
BACKGROUND_ANSWER = {"is_background": True, "body_part": "background", "traits": []}
CONSENSUS_ANSWER = {
    "regions": [{"image": k, "is_background": False, "body_part": "antenna",
                 "traits": [{"attribute": "shape", "value": "filiform"}]} for k in (1, 2, 3)],
    "is_background": False, "body_part": "antenna", "common_traits": ["long filiform antennae", "dark brown"]}


def test_example_answers_validate():
    assert _errors(SINGLE_ANSWER, answer_schema(1)) == []
    assert _errors(BACKGROUND_ANSWER, answer_schema(1)) == []
    assert _errors(CONSENSUS_ANSWER, answer_schema(3)) == []
    two = {**CONSENSUS_ANSWER, "regions": CONSENSUS_ANSWER["regions"][:2]}
    assert _errors(two, answer_schema(2)) == []


@pytest.mark.parametrize("answer,n", [
    ({**SINGLE_ANSWER, "traits": [{"attribute": "smell", "value": "x"}]}, 1),      # attribute outside the enum
    ({k: v for k, v in SINGLE_ANSWER.items() if k != "body_part"}, 1),            # missing key
    ({**SINGLE_ANSWER, "common_traits": []}, 1),                                  # single answers have none
    ({**CONSENSUS_ANSWER, "regions": CONSENSUS_ANSWER["regions"][:2]}, 3),        # one region per image
    ({**CONSENSUS_ANSWER, "regions": [{**CONSENSUS_ANSWER["regions"][0], "image": 4}] * 3}, 3),
    ({**CONSENSUS_ANSWER, "is_background": "no"}, 3),
])
def test_wrong_answers_do_not_validate(answer, n):
    assert _errors(answer, answer_schema(n))


def test_schema_agrees_with_jsonschema_when_installed():
    jsonschema = pytest.importorskip("jsonschema")
    for n, answer in [(1, SINGLE_ANSWER), (1, BACKGROUND_ANSWER), (3, CONSENSUS_ANSWER)]:
        jsonschema.Draft202012Validator.check_schema(answer_schema(n))
        jsonschema.validate(answer, answer_schema(n))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**CONSENSUS_ANSWER, "regions": []}, answer_schema(3))


# --- wording and versions -------------------------------------------------------------------

@pytest.mark.parametrize("render,n", list(PROMPT_FOR))
def test_prompt_asks_for_every_key_of_its_schema(render, n):
    text = select_prompt(render, n).instruction(n)
    keys = set()
    for obj in _objects(answer_schema(n)):
        keys |= set(obj["properties"])
    assert all(f'"{k}"' in text for k in keys), [k for k in keys if f'"{k}"' not in text]
    assert "outside knowledge" in text
    assert "{" in text and "{{" not in text  # the template was formatted


def test_wording_matches_the_rendering():
    for n in (1, 3):
        assert "red outline" in select_prompt("overlay", n).instruction(n)
        assert "background" in select_prompt("overlay", n).instruction(n)
    for n in (1, 2, 3):
        text = select_prompt("crop", n).instruction(n)
        assert not re.search(r"\bred\b", text) and "no outline" in text
    for n in (1, 3):
        assert "outline" not in select_prompt("mllm_only", n).instruction(n)
    assert "common to all three regions" in select_prompt("overlay", 3).instruction(3)
    assert "common to both regions" in select_prompt("crop", 2).instruction(2)


def test_versions_name_the_prompt_and_change_with_its_text():
    versions = {name: p.version for name, p in PROMPTS.items()}
    assert len(set(versions.values())) == len(versions) == 6
    for name, p in PROMPTS.items():
        label, digest = p.version.split(".")
        assert label == p.label and label.startswith(name + "-v")
        assert len(digest) == 8 and int(digest, 16) >= 0
        assert dataclasses.replace(p, text=p.text.replace("specimen", "sample", 1)).version != p.version
        assert dataclasses.replace(p, text=p.text + " ").version != p.version
        assert dataclasses.replace(p, label=p.label.replace("-v1", "-v2")).version != p.version
    assert prompts.PROMPT_VERSIONS == versions


def test_prompt_version_reports_what_build_request_sent():
    assert prompt_version() == PROMPTS["single"].version
    assert prompt_version("overlay", 3) == PROMPTS["consensus"].version
    assert prompt_version("crop", 1) == PROMPTS["crop-single"].version
    assert prompt_version("crop", 2) == prompt_version("crop", 3) == PROMPTS["crop-consensus"].version
    assert prompt_version("mllm_only", 1) == PROMPTS["mllm-only"].version
    assert prompt_version("mllm_only", 3) == PROMPTS["mllm-only-consensus"].version
    with_taxon = prompt_version("overlay", 3, include_taxon=True)
    assert with_taxon.startswith(PROMPTS["consensus"].version + "+taxon-v1.")
    with pytest.raises(ValueError):
        prompt_version("overlay", 2)
