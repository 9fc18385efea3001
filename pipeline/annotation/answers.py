"""Reading MLLM answers: a tolerant parser of JSON and free text into one answer dict.

The prompts (:mod:`pipeline.annotation.prompts`) ask for JSON, and vLLM can enforce it; but a backend that
cannot constrain decoding, a truncated answer (max_tokens) or a model that ignores the format
still has to yield a trait row. :func:`parse_answer` therefore reads, in order: JSON (bare, in a
```json fence, inside prose, with trailing commas or Python-style quotes, or cut off mid-way),
then free text in the reference code's layout (``[Image 1]: Body part: ... Traits: ...`` and
``[Common Traits Across All Three Images]: ...``) and its usual variants. It never raises on a
bad answer: what it cannot read comes back as ``parsed_as="unparsed"`` (the caller keeps the raw
text).

Body parts and trait attributes are normalised by :mod:`pipeline.annotation.vocabulary`.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections import Counter

from pipeline.annotation.vocabulary import INSECT, EMPTY_PART, Vocabulary, guess_attribute, normalize_attribute, simplify

# --- the parsed answer ----------------------------------------------------------------------

def _region(is_background, body_part_raw, vocabulary: Vocabulary) -> dict:
    """is_background / body_part / body_part_raw / body_part_known, background either way."""
    raw = body_part_raw.strip() if isinstance(body_part_raw, str) else None
    empty = raw is None or raw.lower().strip(" .") in EMPTY_PART
    part, known = (None, False) if empty else vocabulary.normalize_body_part(raw)
    if is_background is True or part == "background":
        return {"is_background": True, "body_part": "background", "body_part_raw": None if empty else raw,
                "body_part_known": True}
    if part is not None and is_background is None:
        is_background = False  # a named body part is an answer to "is it background?"
    return {"is_background": is_background, "body_part": part, "body_part_raw": None if empty else raw,
            "body_part_known": known}


def _summarise(regions: list[dict], vocabulary: Vocabulary) -> dict:
    """Consensus-level background/body part when the answer did not state them: background only if
    every region is; otherwise the most frequent body part of the non-background regions."""
    if not regions:
        return _region(None, None, vocabulary)
    if all(r["is_background"] is True for r in regions):
        return _region(True, None, vocabulary)
    parts = [r["body_part"] for r in regions if r["is_background"] is not True and r["body_part"]]
    if not parts:
        return _region(None, None, vocabulary)
    part = Counter(parts).most_common(1)[0][0]
    return _region(False, next(r["body_part_raw"] for r in regions if r["body_part"] == part), vocabulary)


def _result(top: dict, traits: list, common: list, regions: list, parsed_as: str) -> dict:
    return {**top, "traits": traits, "common_traits": common, "regions": regions, "parsed_as": parsed_as}


def _unparsed() -> dict:
    return _result(_region(None, None, INSECT), [], [], [], "unparsed")  # (no part named)


def _found_anything(result: dict) -> bool:
    return (result["is_background"] is not None or result["body_part"] is not None or bool(result["traits"])
            or bool(result["common_traits"]) or bool(result["regions"]))


def parse_answer(text: str, images_per_prompt: int, vocabulary: Vocabulary = INSECT) -> dict:
    """The answer as {is_background, body_part (canonical), body_part_raw, body_part_known, traits
    [{attribute, value}], common_traits [str], regions [per image, for several images], parsed_as
    "json" | "text" | "unparsed"}. For several images the common traits are the annotation; a
    single-image answer has none."""
    if not isinstance(text, str) or not text.strip():
        return _unparsed()
    obj = _load_json_object(text)
    result = _fit(_from_json(obj, vocabulary), images_per_prompt) if obj is not None else None
    if result is None or not _found_anything(result):
        result = _fit(_from_text(text, vocabulary), images_per_prompt)
    return result if _found_anything(result) else _unparsed()


def _fit(result: dict, images_per_prompt: int) -> dict:
    """Hold the answer to the prompt's shape: one image → no regions or common traits (a lone
    region becomes the answer); several → at most one region per image number 1..n."""
    if images_per_prompt == 1:
        if len(result["regions"]) == 1 and not result["traits"]:
            result = {**result, **{k: v for k, v in result["regions"][0].items() if k != "image"}}
        return {**result, "regions": [], "common_traits": []}
    seen, regions = set(), []
    for region in result["regions"]:
        if 1 <= region["image"] <= images_per_prompt and region["image"] not in seen:
            seen.add(region["image"])
            regions.append(region)
    return {**result, "regions": regions}


# --- JSON, tolerantly -----------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|$)", re.S)
_STRING_OR_LITERAL_RE = re.compile(r"(\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*')|\b(true|false|null)\b")
_TRAILING_COMMA_RE = re.compile(r"(\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*')|,(\s*[}\]])")
_LOAD_ERRORS = (ValueError, SyntaxError, TypeError, RecursionError, MemoryError)


class _OutsideStrings:
    """Iterates (index, char) over the characters of ``text[start:]`` outside string literals
    ("..." and, with ``apostrophes``, '...' — an apostrophe after a letter is not a quote);
    ``open_quote`` tells afterwards whether the text ended inside a string."""

    def __init__(self, text: str, start: int = 0, apostrophes: bool = False):
        self.text, self.start, self.apostrophes = text, start, apostrophes
        self.open_quote = None

    def __iter__(self):
        quote, escaped, text = None, False, self.text
        for i in range(self.start, len(text)):
            ch = text[i]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch == '"' or (ch == "'" and self.apostrophes and not text[i - 1].isalnum()):
                quote = ch
            else:
                yield i, ch
        self.open_quote = quote


def _json_candidate(text: str) -> str | None:
    """The text of the first JSON object: inside a ``` fence if there is one, else from the first
    "{" to its matching "}" (or to the end, when the answer was cut off)."""
    fence = _FENCE_RE.search(text)
    if fence and "{" in fence.group(1):
        text = fence.group(1)
    start = text.find("{")
    if start < 0:
        return None
    depth = 0
    for i, ch in _OutsideStrings(text, start, apostrophes=True):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return text[start:]


def _loads(candidate: str):
    """json, then json without trailing commas, then Python literal syntax (single quotes,
    True/False) through ast.literal_eval, which evaluates literals only, never code."""
    try:
        return json.loads(candidate)
    except _LOAD_ERRORS:
        pass
    no_trailing = _TRAILING_COMMA_RE.sub(lambda m: m.group(1) or m.group(2), candidate)
    try:
        return json.loads(no_trailing)
    except _LOAD_ERRORS:
        pass
    python = _STRING_OR_LITERAL_RE.sub(
        lambda m: m.group(1) or {"true": "True", "false": "False", "null": "None"}[m.group(2)], candidate)
    try:
        with warnings.catch_warnings():  # garbage like "1.a" warns before it fails
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.literal_eval(python)
    except _LOAD_ERRORS:
        return None


def _close_truncated(candidate: str) -> list[str]:
    """Completions of an answer cut off mid-way (max_tokens), most complete first: close the open
    brackets as they are, then after dropping the tail back to each of the last commas or opening
    brackets. A string cut mid-way is dropped, not closed: "dark bro" is not a trait."""
    stack, cuts = [], []
    scan = _OutsideStrings(candidate)
    for i, ch in scan:
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
            cuts.append((i + 1, list(stack)))
        elif ch in "}]" and stack:
            stack.pop()
        elif ch == ",":
            cuts.append((i, list(stack)))
    quote = scan.open_quote
    completions = [] if quote else [candidate + "".join(reversed(stack))]
    return completions + [candidate[:i] + "".join(reversed(s)) for i, s in reversed(cuts[-8:])]


def _load_json_object(text: str) -> dict | None:
    candidate = _json_candidate(text)
    if candidate is None:
        return None
    for attempt in [candidate, *_close_truncated(candidate)]:
        obj = _loads(attempt)
        if isinstance(obj, dict):
            return obj
    return None


def _get(obj: dict, *names: str):
    """obj[name] for the first of names present, keys compared loosely ("Body part" = "body_part")."""
    loose = {re.sub(r"[\s\-]+", "_", str(k).strip().lower()): v for k, v in obj.items()}
    for name in names:
        if name in loose:
            return loose[name]
    return None


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"yes": True, "true": True, "no": False, "false": False}.get(value.strip().lower().rstrip("."))
    return None


def _as_text(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value).strip()


def _traits_from_json(value) -> list[dict]:
    """[{attribute, value}] from a list of dicts, a list of strings, an {attribute: value} dict or a
    string."""
    if isinstance(value, str):
        return [_trait_from_item(v) for v in split_items(value)]
    if isinstance(value, dict):
        value = [{"attribute": k, "value": v} for k, v in value.items()]
    traits = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict):
            val = _get(item, "value", "description", "trait", "text")
            attr = _get(item, "attribute", "type", "aspect", "category", "name")
            if val is None and len(item) == 1 and normalize_attribute(next(iter(item))) != "other":
                (attr, val), = item.items()  # {"colour": "dark brown"}
            if val is not None and _as_text(val):
                val = _as_text(val)
                traits.append({"attribute": normalize_attribute(attr) if attr else guess_attribute(val), "value": val})
        elif isinstance(item, str) and item.strip():
            traits.append(_trait_from_item(item))
    return traits


def _strings_from_json(value) -> list[str]:
    if isinstance(value, str):
        return split_items(value)
    out = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict):
            item = _get(item, "value", "description", "trait", "text") or ""
        if _as_text(item):
            out.append(_as_text(item))
    return out


def _region_from_json(obj: dict, vocabulary: Vocabulary) -> tuple[dict, list[dict]]:
    region = _region(_as_bool(_get(obj, "is_background", "background", "isbackground")),
                     _get(obj, "body_part", "bodypart", "part", "body_part_name"), vocabulary)
    traits = _traits_from_json(_get(obj, "traits", "trait", "description", "features", "descriptions"))
    return region, [] if region["is_background"] else traits


def _from_json(obj: dict, vocabulary: Vocabulary) -> dict:
    top, traits = _region_from_json(obj, vocabulary)
    common = _strings_from_json(_get(obj, "common_traits", "common", "shared_traits", "common_features",
                                     "traits_common_to_all"))
    regions = []
    listed = _get(obj, "regions", "images", "per_image", "region")
    for k, item in enumerate(listed if isinstance(listed, list) else [], 1):
        if isinstance(item, dict):
            region, region_traits = _region_from_json(item, vocabulary)
            index = _get(item, "image", "image_index", "index", "id")
            regions.append({"image": index if isinstance(index, int) else k, **region, "traits": region_traits})
    if regions and top["is_background"] is None and top["body_part"] is None:
        top = _summarise(regions, vocabulary)
    return _result(top, traits, common, regions, "json")


# --- free text ------------------------------------------------------------------------------

_IMAGE_HEADER = (r"\[\s*(?:image|img)\s*#?\s*(\d)\s*\][ \t]*[:.\-–—]?"            # [Image 1]: anywhere
                 r"|^[ \t]*(?:[-*•][ \t]*|\d+[.)][ \t]*)?(?:image|img|region|specimen)[ \t]*#?[ \t]*(\d)\b[ \t]*[:.)\-–—]?")
_COMMON_HEADER = (r"\[?\b(?:common|shared)[ \t]+(?:traits|features|characteristics)\b[^\n:\]]{0,60}\]?[ \t]*:"
                  r"|\[?\b(?:traits|features|characteristics)[ \t]+(?:common|shared)[ \t]+(?:to|across|by|among)"
                  r"\b[^\n:\]]{0,60}\]?[ \t]*:"
                  r"|^[ \t]*(?:common|shared)[ \t]+(?:traits|features|characteristics)\b[^\n:]{0,60}$")
_HEADER_RE = re.compile(rf"(?P<image>{_IMAGE_HEADER})|(?P<common>{_COMMON_HEADER})", re.I | re.M)
_LABEL = r"(?:is[ \t]+(?:it[ \t]+|this[ \t]+)?(?:a[ \t]+)?background\??|background\??|body[ \t_-]*part(?:[ \t]+name)?|" \
         r"traits?|description|visible[ \t]+traits|features|characteristics)[ \t]*[:\-–—][ \t]*"
_LABEL_RE = re.compile(rf"(?:^|(?<=[\s.;,(]))({_LABEL})", re.I | re.M)
_BACKGROUND_YES = re.compile(r"\b(?:is|are|shows?|contains?|depicts?|covers?|be|only|just|entirely|mostly)[ \t]+"
                             r"(?:(?:the|a|an|only|just|plain|white|empty|some|of|part|pure)[ \t]+){0,3}background\b", re.I)
_BACKGROUND_NO = re.compile(r"\b(?:not|n't|no)[ \t]+(?:(?:the|a|an|just|only|part|of)[ \t]+){0,3}background\b", re.I)
_BULLET_RE = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean_markdown(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("**", "").replace("__", "").replace("`", "")
    return re.sub(r"(?m)^[ \t]*#+[ \t]*", "", text)


def split_items(text: str) -> list[str]:
    """A list written as bullets, numbered lines, semicolons or sentences → its items. A single
    run-on line is split at commas too when every piece is short ("long, filiform, dark brown with
    pale tip" → 3 items); a sentence with a subordinate clause stays whole, and so does a labelled
    "Shape: large, oval". Where the writer made a list, their items are kept as they are."""
    pieces = []
    for line in re.split(r"\n|;|•", text):
        line = _BULLET_RE.sub("", line).strip().lstrip("-–—*").strip()
        pieces += [s.strip(" .") for s in _SENTENCE_END_RE.split(line) if s.strip(" .")]
    if len(pieces) == 1:
        parts = [p.strip(" .") for p in pieces[0].split(",")]
        labelled = ":" in " ".join(pieces[0].split()[:3])
        if len(parts) > 1 and not labelled and all(0 < len(p.split()) <= 6 for p in parts):
            return parts
    return pieces


def _trait_from_item(item: str) -> dict:
    """"Colour: pale yellow" → (colour, "pale yellow"); otherwise the attribute is guessed."""
    label, sep, rest = item.partition(":")
    if sep and rest.strip() and len(label.split()) <= 2 and normalize_attribute(label) != "other":
        return {"attribute": normalize_attribute(label), "value": rest.strip()}
    return {"attribute": guess_attribute(item), "value": item.strip()}


def _fields(section: str) -> dict:
    """Labelled fields of one section: {"background": ..., "body part": ..., "traits": ...}."""
    found, matches = {}, list(_LABEL_RE.finditer(section))
    for m, following in zip(matches, matches[1:] + [None]):
        label = simplify(m.group(1))
        key = "background" if "background" in label else "body part" if label.startswith("body") else "traits"
        value = section[m.end():following.start() if following else len(section)]
        found.setdefault(key, value.strip())
    found["before labels"] = section[:matches[0].start()] if matches else section
    return found


def _section_region(section: str, vocabulary: Vocabulary) -> tuple[dict, list[dict]]:
    """(region, traits) of one free-text section."""
    fields = _fields(section)
    is_background = None
    if "background" in fields:
        is_background = _as_bool(re.split(r"[\s.,;(]", fields["background"] + " ", maxsplit=1)[0])
    else:  # no "Is background:" label: look for "is (not) background" phrases
        if _BACKGROUND_NO.search(section):
            is_background = False
        elif _BACKGROUND_YES.search(section):
            is_background = True
    part_raw, traits_text = None, fields.get("traits")
    if "body part" in fields:
        # "Forewing. Description: ..." / "antenna, long and thin": the name ends at the first stop.
        name = re.match(r"[^.;,\n]*", fields["body part"])
        part_raw, rest = name.group().strip(), fields["body part"][name.end():].lstrip(" .;,\n")
        if traits_text is None and rest:
            traits_text = rest  # "Body part: antenna\n- long\n- dark" — the description follows the name
    if len(fields) == 1 and is_background is not True:
        # No labels at all ("The outline surrounds the left antenna, which is long."): take the part
        # named in the first sentence and the whole text as its description.
        first = _SENTENCE_END_RE.split(section.strip(), maxsplit=1)[0]
        part, known = vocabulary.normalize_body_part(re.sub(r"(?i)\bbody[ \t]+parts?\b|\bbackground\b", "", first))
        if known and part != "background":
            part_raw, traits_text = part, section
    # "This is not background" is an answer to the first question, not a trait.
    items = [i for i in split_items(traits_text or "") if not (_BACKGROUND_NO.search(i) or _BACKGROUND_YES.search(i))]
    traits = [_trait_from_item(i) for i in items]
    region = _region(is_background, part_raw, vocabulary)
    return region, ([] if region["is_background"] else traits)


def _from_text(text: str, vocabulary: Vocabulary) -> dict:
    text = _clean_markdown(text)
    headers = list(_HEADER_RE.finditer(text))
    bounds = [(m, m.end(), following.start() if following else len(text))
              for m, following in zip(headers, headers[1:] + [None])]
    image_sections = [(int(m.group(2) or m.group(3)), text[a:b]) for m, a, b in bounds if m.group("image")]
    common_sections = [text[a:b] for m, a, b in bounds if m.group("common")]
    regions = []
    for index, section in image_sections:
        region, traits = _section_region(section, vocabulary)
        regions.append({"image": index, **region, "traits": traits})
    common, top, traits = [], None, []
    if common_sections:
        fields = _fields(common_sections[0])
        common = split_items(fields.get("traits") or fields["before labels"])
        if "body part" in fields:  # "Common traits: Body part: antenna. Traits: ..."
            top = _section_region(common_sections[0], vocabulary)[0]
    if regions:
        top = top or _summarise(regions, vocabulary)
    else:  # no per-image sections: the text before any header is one region
        preamble_top, traits = _section_region(text[:headers[0].start()] if headers else text, vocabulary)
        top = top or preamble_top
    return _result(top, traits, common, regions, "text")
