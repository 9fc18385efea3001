"""Versioned MLLM prompts and the request builder (DESIGN §2 "MLLM prompts", §3.3 and §3.6).

One prompt per (rendering, one image or several):

| name               | render      | images | asks for                                                  |
|--------------------|-------------|--------|-----------------------------------------------------------|
| single             | overlay     | 1      | the red-outlined region: background? body part, traits     |
| consensus          | overlay     | 3      | each outlined region, then the traits common to all three  |
| crop-single        | crop        | 1      | the crop is the region (no outline)                       |
| crop-consensus     | crop        | 2-3    | several crops (boxes of one image, or one per image)       |
| mllm-only          | mllm_only   | 1      | paper baseline: whole image, no boxes                     |
| mllm-only-consensus| mllm_only   | 3      | baseline with three whole images                          |

Every prompt asks for one JSON object (see :func:`answer_schema`); vLLM can enforce it through
``response_format``, and :mod:`pipeline.annotation.answers` reads whatever comes back when it cannot.

Layout of a request (prefix caching, DESIGN §3.6): the fixed instruction text comes first, then
the images, then per-request text (the optional taxon hint). vLLM's cache key for a multimodal
block includes the image hash, so only what precedes the first image is shared between requests.

Versions: a prompt's version is ``<label>.<hash>``, the hash covering the instruction text and the
JSON schema it asks for. Editing the wording therefore always changes the version (and with it
the annotation ids that include it) — nobody has to remember to bump it; the hand-written label
(``single-v1``) is bumped when a change is a redesign worth naming.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from pipeline.annotation.llm import ChatRequest
from pipeline.annotation.vocabulary import ATTRIBUTES, INSECT, Vocabulary
from pipeline.contract import image_format

TEMPERATURE = 0.01
# The paper's budgets were for free text; JSON (keys, quotes, braces) costs more tokens for the
# same content, so a consensus answer may hit 256 and be cut short (the parser salvages what it
# can; ChatResult.finish_reason == "length" tells). Callers can raise it with max_tokens=.
MAX_TOKENS_ONE_IMAGE = 196
MAX_TOKENS_SEVERAL_IMAGES = 256
RENDERS = ("overlay", "crop", "mllm_only")
LLM_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what OpenAI-compatible chat APIs take as image_url
# Bounds in the answer schema. An engine that enforces the schema (vLLM's guided decoding) needs
# them to end an answer whose model never stops on its own (random weights do not), and they cap a
# real model's answer at what the prompts ask for (at most 8 traits alone, 10 for the MLLM-only
# baseline that shares its schema; 5 per region and 5 common traits in a consensus).
MAX_BODY_PART_CHARS, MAX_TRAIT_CHARS, MAX_COMMON_TRAIT_CHARS = 40, 60, 80
MAX_TRAITS_ONE_IMAGE, MAX_TRAITS_PER_REGION, MAX_COMMON_TRAITS = 10, 5, 5
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


# --- the answer we ask for -------------------------------------------------------------------

def _closed_object(properties: dict) -> dict:
    """An object schema in OpenAI "strict" form: every property required, nothing else allowed."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def answer_schema(images_per_prompt: int) -> dict:
    """JSON Schema of the answer: one region for a single image; per-image ``regions`` plus the
    shared ``body_part`` and ``common_traits`` for several (the common traits are the annotation).
    Property order is generation order: describe each region before summarising."""
    if images_per_prompt not in (1, 2, 3):
        raise ValueError(f"images_per_prompt must be 1, 2 or 3, got {images_per_prompt}")
    trait = _closed_object({"attribute": {"type": "string", "enum": list(ATTRIBUTES)},
                            "value": {"type": "string", "maxLength": MAX_TRAIT_CHARS}})
    part = {"type": "string", "maxLength": MAX_BODY_PART_CHARS}

    def region(max_traits: int) -> dict:
        return {"is_background": {"type": "boolean"}, "body_part": part,
                "traits": {"type": "array", "items": trait, "maxItems": max_traits}}

    if images_per_prompt == 1:
        return _closed_object(region(MAX_TRAITS_ONE_IMAGE))
    indexed = _closed_object({"image": {"type": "integer", "enum": list(range(1, images_per_prompt + 1))},
                              **region(MAX_TRAITS_PER_REGION)})
    return _closed_object({
        "regions": {"type": "array", "items": indexed, "minItems": images_per_prompt, "maxItems": images_per_prompt},
        "is_background": {"type": "boolean"},
        "body_part": part,
        "common_traits": {"type": "array", "items": {"type": "string", "maxLength": MAX_COMMON_TRAIT_CHARS},
                          "maxItems": MAX_COMMON_TRAITS},
    })


def response_format(images_per_prompt: int) -> dict:
    """The OpenAI ``response_format`` that makes vLLM decode only answers matching the schema."""
    name = "trait_region" if images_per_prompt == 1 else f"trait_consensus_{images_per_prompt}"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": answer_schema(images_per_prompt), "strict": True}}


# --- the prompts ----------------------------------------------------------------------------

_ROLE = "You are annotating the morphology of {organism} specimens in photographs for a trait database."
_NO_OUTSIDE = ("Describe only what is visible in the image{s}. Do not use outside knowledge about the species, "
               "its relatives or its habits, and do not guess at anything you cannot see.")
_ONE_JSON = ('Answer with one JSON object and nothing else:\n'
             '{{"is_background": true or false, "body_part": "<body part, or \\"background\\">", '
             '"traits": [{{"attribute": "shape|size|colour|texture|marking|other", "value": "<a few words>"}}]}}\n'
             'Give at most 8 traits. If the region is background, give an empty traits list.')
_MANY_JSON = ('Answer with one JSON object and nothing else:\n'
              '{{"regions": [{{"image": <1 to {n}>, "is_background": true or false, "body_part": "<body part, or '
              '\\"background\\">", "traits": [{{"attribute": "shape|size|colour|texture|marking|other", '
              '"value": "<a few words>"}}]}}, ... one entry per image, in order], '
              '"is_background": <true only if every region is background>, '
              '"body_part": "<the body part the regions share>", '
              '"common_traits": ["<a trait visible in {all_n} regions>", ...]}}\n'
              'Give at most 5 traits per region and at most 5 common traits.')
_MLLM_ONLY_ONE_JSON = ('Answer with one JSON object and nothing else:\n'
                       '{{"is_background": false, "body_part": "whole body", '
                       '"traits": [{{"attribute": "shape|size|colour|texture|marking|other", '
                       '"value": "<body part>: <a few words>"}}]}}\n'
                       'Set is_background to true only if no {organism} is visible. Give at most 10 traits.')
_MLLM_ONLY_MANY_JSON = ('Answer with one JSON object and nothing else:\n'
                        '{{"regions": [{{"image": <1 to {n}>, "is_background": false, "body_part": "whole body", '
                        '"traits": [{{"attribute": "shape|size|colour|texture|marking|other", '
                        '"value": "<body part>: <a few words>"}}]}}, ... one entry per image, in order], '
                        '"is_background": false, "body_part": "whole body", '
                        '"common_traits": ["<body part>: <a trait visible in {all_n} specimens>", ...]}}\n'
                        'Give at most 5 traits per specimen and at most 5 common traits.')


@dataclass(frozen=True)
class Prompt:
    name: str
    """What the prompt is for: ``single``, ``consensus``, ``crop-single``, ..."""
    label: str
    """Hand-written name and design generation, e.g. ``single-v1``; bumped on a redesign."""
    text: str
    """Instruction template; ``{n}``, ``{count}`` and ``{all_n}`` are the number of images as a
    digit, a word and "both"/"all three"; ``{organism}`` / ``{an_organism}`` the vocabulary's group."""
    images_per_prompt: int
    """1 or 3: which answer schema the prompt asks for (crop-consensus also takes 2 images)."""

    def worded_for(self, vocabulary: Vocabulary) -> str:
        """The template naming ``vocabulary``'s organism ("an insect specimen", "a bird specimen")."""
        return self.text.replace("{organism}", vocabulary.organism).replace("{an_organism}", vocabulary.an_organism)

    def version_for(self, vocabulary: Vocabulary) -> str:
        """label.hash of the worded template and the answer schema (insect wording: the versions
        recorded before other vocabularies existed)."""
        schema = json.dumps(answer_schema(self.images_per_prompt), sort_keys=True)
        return f"{self.label}.{_short_hash(self.worded_for(vocabulary) + schema)}"

    @property
    def version(self) -> str:
        return self.version_for(INSECT)

    def instruction(self, n_images: int, vocabulary: Vocabulary = INSECT) -> str:
        count = COUNT_WORDS[n_images]
        return self.worded_for(vocabulary).format(n=n_images, count=count,
                                                  all_n="both" if n_images == 2 else f"all {count}")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


PROMPTS: dict[str, Prompt] = {p.name: p for p in [
    Prompt("single", "single-v1", "\n".join([
        _ROLE,
        "The image below shows {an_organism} specimen. Red outlines mark one region of the image (it may be drawn as "
        "several outlined patches).",
        "First decide whether the outlined region is background (the surface or backdrop around the specimen) "
        "rather than part of the {organism}. If it is part of the {organism}, name the body part inside the red outlines "
        "and describe that region: its shape, size, colour, texture and markings. Do not describe the red outlines themselves.",
        _NO_OUTSIDE.format(s=""),
        _ONE_JSON]), 1),
    Prompt("consensus", "consensus-v1", "\n".join([
        _ROLE,
        "The {count} images below show {count} specimens of the same species. In each image, red outlines mark "
        "a region where the same visual feature was detected.",
        "For each image, decide whether the outlined region is background (the surface or backdrop around the "
        "specimen) rather than part of the {organism}; if it is part of the {organism}, name the body part inside the outline "
        "and describe that region: its shape, size, colour, texture and markings. Do not describe the red outlines.",
        "Then list the traits that are common to {all_n} regions. The common traits are the annotation, "
        "so include a trait only if you can see it in every image.",
        _NO_OUTSIDE.format(s="s"),
        _MANY_JSON]), 3),
    Prompt("crop-single", "crop-single-v1", "\n".join([
        _ROLE,
        "The image below is a close-up crop of one region of {an_organism} specimen photograph; there is no outline. "
        "The region fills the image; a small margin around it may show neighbouring parts, so describe what is "
        "at the centre.",
        "First decide whether the region is background (the surface or backdrop around the specimen) rather than "
        "part of the {organism}. If it is part of the {organism}, name the body part and describe it: its shape, size, "
        "colour, texture and markings.",
        _NO_OUTSIDE.format(s=""),
        _ONE_JSON]), 1),
    Prompt("crop-consensus", "crop-consensus-v1", "\n".join([
        _ROLE,
        "The {count} images below are close-up crops of regions where the same visual feature was detected in "
        "specimens of one species; the crops may come from one specimen or from different ones. There are no "
        "outlines: each region fills its image, and a small margin may show neighbouring parts, so describe what "
        "is at the centre.",
        "For each image, decide whether the region is background (the surface or backdrop around the specimen) "
        "rather than part of the {organism}; if it is part of the {organism}, name the body part and describe it: its "
        "shape, size, colour, texture and markings.",
        "Then list the traits that are common to {all_n} regions. The common traits are the annotation, "
        "so include a trait only if you can see it in every image.",
        _NO_OUTSIDE.format(s="s"),
        _MANY_JSON]), 3),
    Prompt("mllm-only", "mllm-only-v1", "\n".join([
        _ROLE,
        "The image below shows {an_organism} specimen.",
        "Describe the visible morphological traits of the specimen: the body parts you can see and their shape, "
        "size, colour, texture and markings.",
        _NO_OUTSIDE.format(s=""),
        _MLLM_ONLY_ONE_JSON]), 1),
    Prompt("mllm-only-consensus", "mllm-only-consensus-v1", "\n".join([
        _ROLE,
        "The {count} images below show {count} specimens of the same species.",
        "For each specimen, describe its visible morphological traits: the body parts you can see and their "
        "shape, size, colour, texture and markings. Then list the traits that are common to {all_n} "
        "specimens; include a trait only if you can see it in every image.",
        _NO_OUTSIDE.format(s="s"),
        _MLLM_ONLY_MANY_JSON]), 3),
]}

# Optional context after the images. Off by default: the paper's prompt gives the model no
# outside-knowledge hint (naming the taxon invites recalled rather than observed traits).
TAXON_HINT = ("For reference only, the specimen{s} {verb} identified as {taxon}. "
              "Still describe only what is visible.")
TAXON_HINT_VERSION = f"taxon-v1.{_short_hash(TAXON_HINT)}"
PROMPT_VERSIONS = {name: p.version for name, p in PROMPTS.items()}


# (render, number of images) → prompt. Overlay and the baseline follow the paper (1 or 3 images);
# crop also takes 2, since the several boxes of one image are sent as several crops.
PROMPT_FOR = {("overlay", 1): "single", ("overlay", 3): "consensus",
              ("crop", 1): "crop-single", ("crop", 2): "crop-consensus", ("crop", 3): "crop-consensus",
              ("mllm_only", 1): "mllm-only", ("mllm_only", 3): "mllm-only-consensus"}


def select_prompt(render: str, n_images: int) -> Prompt:
    """The prompt for a rendering and image count; refuses counts no prompt was written for."""
    if render not in RENDERS:
        raise ValueError(f"render must be one of {RENDERS}, got {render!r}")
    if (render, n_images) not in PROMPT_FOR:
        counts = [str(n) for r, n in PROMPT_FOR if r == render]
        raise ValueError(f"render {render!r} takes {' or '.join(counts)} images, got {n_images}")
    return PROMPTS[PROMPT_FOR[render, n_images]]


def prompt_version(render: str = "overlay", n_images: int = 1, *, include_taxon: bool = False,
                   vocabulary: Vocabulary = INSECT) -> str:
    """The version recorded with an annotation (``traits.prompt_version``)."""
    version = select_prompt(render, n_images).version_for(vocabulary)
    return f"{version}+{TAXON_HINT_VERSION}" if include_taxon else version


# --- images ---------------------------------------------------------------------------------

def sniff_image_mime(data: bytes) -> str:
    """The true MIME type from the magic number (the reference labelled PNGs as JPEG, §3.3), of the
    formats an OpenAI-compatible server takes."""
    fmt = image_format(data)
    if fmt is None or fmt.pillow not in LLM_IMAGE_FORMATS:
        raise ValueError(f"not a PNG, JPEG, WebP or GIF image: first bytes {bytes(data[:12])!r}")
    return fmt.mime


def image_part(data: bytes) -> dict:
    url = f"data:{sniff_image_mime(data)};base64,{base64.b64encode(bytes(data)).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def _taxon_phrase(species: str | None, genus: str | None) -> str:
    if species and genus:
        return f"the species {species} (genus {genus})"
    return f"the species {species}" if species else f"the genus {genus}"


# --- the request ----------------------------------------------------------------------------

def build_request(images: list[bytes], *, render: str = "overlay", species: str | None = None,
                  genus: str | None = None, include_taxon: bool = False, json_schema: bool = True,
                  max_tokens: int | None = None, request_id: str | None = None,
                  vocabulary: Vocabulary = INSECT) -> ChatRequest:
    """One chat request: instruction text, then the images (``Image k:`` labels between them when
    there are several, so the answer's ``image`` numbers mean something), then the taxon hint.

    ``json_schema=False`` leaves out ``response_format`` (for backends that cannot constrain
    decoding); the text asks for the same JSON either way. ``max_tokens`` defaults to the paper's
    196 (one image) / 256 (several)."""
    images = list(images)
    prompt = select_prompt(render, len(images))
    parts: list[dict] = [{"type": "text", "text": prompt.instruction(len(images), vocabulary)}]
    for k, data in enumerate(images, 1):
        if len(images) > 1:
            parts.append({"type": "text", "text": f"Image {k}:"})
        try:
            parts.append(image_part(data))
        except ValueError as exc:
            raise ValueError(f"image {k} of {len(images)}: {exc}") from None
    if include_taxon:
        if not (species or genus):
            raise ValueError("include_taxon=True needs species= or genus=")
        hint = TAXON_HINT.format(s="" if len(images) == 1 else "s", verb="is" if len(images) == 1 else "are",
                                      taxon=_taxon_phrase(species, genus))
        parts.append({"type": "text", "text": hint})
    n = len(images)
    return ChatRequest(
        messages=[{"role": "user", "content": parts}],
        max_tokens=max_tokens if max_tokens is not None else MAX_TOKENS_ONE_IMAGE if n == 1 else MAX_TOKENS_SEVERAL_IMAGES,
        temperature=TEMPERATURE,
        response_format=response_format(n) if json_schema else None,
        request_id=request_id,
    )
