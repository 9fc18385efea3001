import json
import random

import pytest

from pipeline.annotation.answers import parse_answer, split_items
from pipeline.annotation.vocabulary import BODY_PARTS, normalize_attribute, normalize_body_part

KEYS = {"is_background", "body_part", "body_part_raw", "body_part_known", "traits", "common_traits", "regions",
        "parsed_as"}


def _values(traits):
    return [t["value"] for t in traits]


def _attributes(traits):
    return {t["value"]: t["attribute"] for t in traits}


# --- JSON answers ---------------------------------------------------------------------------

def test_plain_json_single():
    text = json.dumps({"is_background": False, "body_part": "Antennae", "traits": [
        {"attribute": "shape", "value": "filiform"}, {"attribute": "color", "value": "dark brown"}]})
    r = parse_answer(text, 1)
    assert set(r) == KEYS and r["parsed_as"] == "json"
    assert (r["is_background"], r["body_part"], r["body_part_raw"], r["body_part_known"]) == (False, "antenna", "Antennae", True)
    assert r["traits"] == [{"attribute": "shape", "value": "filiform"}, {"attribute": "colour", "value": "dark brown"}]
    assert r["common_traits"] == [] and r["regions"] == []


def test_json_in_a_fence_with_prose_and_trailing_commas():
    text = ('Sure! Here is the annotation:\n```json\n{\n  "is_background": false,\n  "body_part": "left hind leg",\n'
            '  "traits": [\n    {"attribute": "Shape", "value": "slender, with a swollen femur"},\n'
            '    {"attribute": "markings", "value": "pale ring on tibia"},\n  ],\n}\n```\nLet me know if you need more.')
    r = parse_answer(text, 1)
    assert r["parsed_as"] == "json" and r["body_part"] == "leg" and r["body_part_raw"] == "left hind leg"
    assert _attributes(r["traits"]) == {"slender, with a swollen femur": "shape", "pale ring on tibia": "marking"}


def test_python_style_quotes_and_literals():
    text = ("{'is_background': False, 'body_part': 'fore-wing', 'traits': "
            "[{'attribute': 'pattern', 'value': \"the insect's dark stigma\"}, {'attribute': 'sculpture', 'value': 'smooth'}]}")
    r = parse_answer(text, 1)
    assert r["parsed_as"] == "json" and r["body_part"] == "forewing" and r["is_background"] is False
    assert r["traits"] == [{"attribute": "marking", "value": "the insect's dark stigma"},
                           {"attribute": "texture", "value": "smooth"}]


def test_json_with_escaped_quotes_and_prose_around():
    text = 'The answer is {"is_background": false, "body_part": "scutellum", "traits": [{"attribute": "other", ' \
           '"value": "so-called \\"shield\\" {plate}"}]} as requested.'
    r = parse_answer(text, 1)
    assert r["parsed_as"] == "json" and r["body_part"] == "scutellum"
    assert _values(r["traits"]) == ['so-called "shield" {plate}']


def test_consensus_json_cut_off_by_max_tokens_keeps_what_is_complete():
    text = ('{"regions": [{"image": 1, "is_background": false, "body_part": "antenna", "traits": [{"attribute": "shape", '
            '"value": "filiform"}]}, {"image": 2, "is_background": false, "body_part": "antennae", "traits": []}, '
            '{"image": 3, "is_background": true, "body_part": "background", "traits": []}], "is_background": false, '
            '"body_part": "antenna", "common_traits": ["elongated filiform antennae", "dark bro')
    r = parse_answer(text, 3)
    assert r["parsed_as"] == "json" and r["body_part"] == "antenna"
    assert r["common_traits"] == ["elongated filiform antennae"]  # the half-written trait is dropped
    assert [(x["image"], x["body_part"], x["is_background"]) for x in r["regions"]] == [
        (1, "antenna", False), (2, "antenna", False), (3, "background", True)]


def test_consensus_json_without_summary_is_summarised_from_regions():
    regions = [{"image": k, "is_background": False, "body_part": part, "traits": []}
               for k, part in [(1, "compound eyes"), (2, "eye"), (3, "head")]]
    r = parse_answer(json.dumps({"regions": regions, "common_traits": ["large", "red"]}), 3)
    assert (r["is_background"], r["body_part"], r["common_traits"]) == (False, "compound eye", ["large", "red"])
    all_background = [{**x, "is_background": True, "body_part": ""} for x in regions]
    r = parse_answer(json.dumps({"regions": all_background, "common_traits": []}), 3)
    assert (r["is_background"], r["body_part"]) == (True, "background")
    assert all(x["body_part"] == "background" for x in r["regions"])


def test_loose_json_shapes():
    """Traits as strings or as an {attribute: value} dict, "yes"/"no" booleans, spaced keys."""
    r = parse_answer('{"Is background": "no", "Body part": "Elytra", "traits": {"colour": "metallic green", '
                     '"texture": "punctate"}}', 1)
    assert (r["is_background"], r["body_part"]) == (False, "elytron")
    assert r["traits"] == [{"attribute": "colour", "value": "metallic green"}, {"attribute": "texture", "value": "punctate"}]
    r = parse_answer('{"is_background": false, "body_part": "tibia", "traits": ["covered in dense setae", "pale yellow"]}', 1)
    assert _attributes(r["traits"]) == {"covered in dense setae": "texture", "pale yellow": "colour"}


def test_schema_example_round_trips():
    answer = {"regions": [{"image": k, "is_background": False, "body_part": "mesonotum",
                           "traits": [{"attribute": "marking", "value": "three dark stripes"}]} for k in (1, 2, 3)],
              "is_background": False, "body_part": "mesonotum", "common_traits": ["three longitudinal dark stripes"]}
    r = parse_answer(json.dumps(answer), 3)
    assert r["parsed_as"] == "json" and r["body_part"] == "mesonotum" and len(r["regions"]) == 3
    assert r["common_traits"] == ["three longitudinal dark stripes"]
    assert r["regions"][0]["traits"] == [{"attribute": "marking", "value": "three dark stripes"}]


# --- free-text answers ----------------------------------------------------------------------

REFERENCE_LAYOUT = """[Image 1]: Body part: antenna. Traits: long, filiform, dark brown with pale tip.
[Image 2]: Body part: Antennae. Traits: long and thread-like; dark brown.
[Image 3]: Body part: left antenna. Traits: filiform, brown, pale apex.
[Common Traits Across All Three Images]: - elongated filiform antennae; - dark brown colouration"""


@pytest.mark.parametrize("text", [REFERENCE_LAYOUT, REFERENCE_LAYOUT.replace("\n", " "), REFERENCE_LAYOUT.lower()])
def test_reference_layout(text):
    r = parse_answer(text, 3)
    assert r["parsed_as"] == "text"
    assert (r["is_background"], r["body_part"], r["body_part_known"]) == (False, "antenna", True)
    assert r["common_traits"] == ["elongated filiform antennae", "dark brown colouration"]
    assert [x["image"] for x in r["regions"]] == [1, 2, 3]
    assert [x["body_part_raw"].lower() for x in r["regions"]] == ["antenna", "antennae", "left antenna"]
    assert _attributes(r["regions"][0]["traits"]) == {"long": "size", "filiform": "shape",
                                                      "dark brown with pale tip": "colour"}
    assert _values(r["regions"][1]["traits"]) == ["long and thread-like", "dark brown"]


def test_markdown_headers_bullets_and_a_background_image():
    text = """**Image 1:**
**Body part:** Compound eyes
**Traits:**
- Shape: large, oval
- Color: reddish brown
- Texture: finely faceted

**Image 2:**
**Body part:** compound eye
**Traits:**
- oval
- reddish

### Image 3
**Is background:** Yes

**Common traits:**
1. Large oval compound eyes
2. Reddish-brown coloration
"""
    r = parse_answer(text, 3)
    assert r["parsed_as"] == "text" and r["body_part"] == "compound eye"
    assert r["regions"][0]["traits"] == [{"attribute": "shape", "value": "large, oval"},
                                         {"attribute": "colour", "value": "reddish brown"},
                                         {"attribute": "texture", "value": "finely faceted"}]
    assert (r["regions"][2]["is_background"], r["regions"][2]["body_part"], r["regions"][2]["traits"]) == (
        True, "background", [])
    assert r["common_traits"] == ["Large oval compound eyes", "Reddish-brown coloration"]


def test_numbered_image_headings_and_a_common_traits_heading():
    text = """1. Image 1 - Body part: hind wing. Traits: membranous, clear with brown veins.
2. Image 2 - Body part: hindwing. Traits: membranous; clear.
3. Image 3 - Body part: Hind Wings. Traits: transparent; venation reduced.

## Traits common to all three images:
* membranous, transparent hindwing
* brown venation"""
    r = parse_answer(text, 3)
    assert [x["body_part"] for x in r["regions"]] == ["hindwing"] * 3
    assert r["body_part"] == "hindwing"
    assert r["common_traits"] == ["membranous, transparent hindwing", "brown venation"]


def test_single_image_labelled_sentence():
    text = "Is background: No. Body part: Forewing. Description: Elongate, translucent with dark brown veins; " \
           "a dark spot near the apex."
    r = parse_answer(text, 1)
    assert (r["parsed_as"], r["is_background"], r["body_part"], r["body_part_raw"]) == ("text", False, "forewing", "Forewing")
    assert r["traits"] == [{"attribute": "colour", "value": "Elongate, translucent with dark brown veins"},
                           {"attribute": "marking", "value": "a dark spot near the apex"}]


def test_single_image_description_on_following_lines():
    text = "Body part: the left hind leg (femur and tibia)\n- Shape: slender\n- Colour: pale yellow\n" \
           "- Texture: covered in fine setae"
    r = parse_answer(text, 1)
    assert (r["is_background"], r["body_part"], r["body_part_known"]) == (False, "leg", True)
    assert r["body_part_raw"] == "the left hind leg (femur and tibia)"
    assert r["traits"] == [{"attribute": "shape", "value": "slender"}, {"attribute": "colour", "value": "pale yellow"},
                           {"attribute": "texture", "value": "covered in fine setae"}]


@pytest.mark.parametrize("text", [
    "This region is background.",
    "The outlined area shows only the plain white background; no part of the insect is visible.",
    "IS BACKGROUND: YES\nBODY PART: NONE",
    "Is background: yes. Body part: N/A.",
    "Body part: Background",
    '{"is_background": true, "body_part": "", "traits": []}',
    '{"is_background": false, "body_part": "backdrop", "traits": [{"attribute": "colour", "value": "white"}]}',
])
def test_background_answers_are_recognised(text):
    r = parse_answer(text, 1)
    assert (r["is_background"], r["body_part"], r["body_part_known"], r["traits"]) == (True, "background", True, [])
    assert r["parsed_as"] in ("json", "text")


def test_negated_background_and_unlabelled_prose():
    r = parse_answer("This is not background; it is the tip of the left antenna, pale yellow.", 1)
    assert (r["is_background"], r["body_part"], r["parsed_as"]) == (False, "antenna", "text")
    assert not any("background" in v for v in _values(r["traits"]))
    r = parse_answer("The red outline surrounds the pronotum, which is shiny black with coarse punctures.", 1)
    assert (r["is_background"], r["body_part"]) == (False, "pronotum")
    r = parse_answer("Is background: No. Body part: gonostylus. Description: curved.", 1)
    assert (r["body_part"], r["body_part_raw"], r["body_part_known"]) == ("gonostylus", "gonostylus", False)


def test_single_image_answers_have_no_regions_or_common_traits():
    region = {"image": 1, "is_background": False, "body_part": "claw", "traits": [{"attribute": "shape", "value": "bifid"}]}
    r = parse_answer(json.dumps({"regions": [region], "common_traits": ["bifid claw"]}), 1)
    assert (r["body_part"], r["traits"], r["regions"], r["common_traits"]) == (
        "claw", [{"attribute": "shape", "value": "bifid"}], [], [])


def test_consensus_keeps_one_region_per_image_number():
    text = "Image 1: Body part: head\nImage 2: Body part: head\nImage 2: Body part: thorax\nImage 7: Body part: leg"
    r = parse_answer(text, 3)
    assert [(x["image"], x["body_part"]) for x in r["regions"]] == [(1, "head"), (2, "head")]


@pytest.mark.parametrize("text", ["", "   \n", "asdf qwerty {{{ [[[ '''", "I'm sorry, I can't help with that.",
                                  "{}", '{"foo": 1}', "```json\n```", "[1, 2, 3]", "null", "{" * 5000, "[" * 5000 + "]"])
def test_garbage_is_unparsed_not_an_error(text):
    r = parse_answer(text, 3)
    assert set(r) == KEYS and r["parsed_as"] == "unparsed"
    assert r["body_part"] is None and r["is_background"] is None and r["traits"] == r["common_traits"] == r["regions"] == []


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = list("{}[]\"':,;.-*#\n \\") + ["true", "Image 1:", "Body part:", "background", "Traits:", "antenna",
                                              "```json", "[Common traits]:", "is_background", "1."]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for n in (1, 3):
            r = parse_answer(text, n)
            assert set(r) == KEYS and r["parsed_as"] in ("json", "text", "unparsed")
    assert parse_answer(None, 1)["parsed_as"] == "unparsed"


def test_split_items():
    assert split_items("long, filiform, dark brown with pale tip.") == ["long", "filiform", "dark brown with pale tip"]
    assert split_items("- a; - b\n* c\n2) d") == ["a", "b", "c", "d"]
    assert split_items("The forewing is elongate and translucent, with dark veins and a dark spot near the apex.") == [
        "The forewing is elongate and translucent, with dark veins and a dark spot near the apex"]
    assert split_items("Shape: large, oval") == ["Shape: large, oval"]
    assert split_items("- membranous, transparent\n- brown veins") == ["membranous, transparent", "brown veins"]


# --- vocabulary -----------------------------------------------------------------------------

@pytest.mark.parametrize("term,expected", [
    ("antenna", "antenna"), ("Antennae", "antenna"), ("the left antenna", "antenna"), ("tip of the antenna", "antenna"),
    ("eyes", "compound eye"), ("Compound Eyes", "compound eye"), ("ocelli", "ocellus"),
    ("mouth parts", "mouthparts"), ("mandibles", "mandible"), ("maxillary palps", "palp"), ("proboscis", "proboscis"),
    ("thoracic segments", "thorax"), ("mesosoma", "thorax"), ("pronotum", "pronotum"), ("scutum", "mesonotum"),
    ("scutellum", "scutellum"),
    ("dark forewing", "forewing"), ("front wing", "forewing"), ("fore-wing", "forewing"), ("Fore wings", "forewing"),
    ("hind wing", "hindwing"), ("hindwings", "hindwing"), ("wings", "wing"), ("wing", "wing"),
    ("elytra", "elytron"), ("hemelytra", "hemelytron"), ("halteres", "haltere"), ("wing veins", "wing venation"),
    ("forewing venation", "wing venation"),
    ("legs", "leg"), ("hind leg", "leg"), ("right fore leg", "leg"), ("coxae", "coxa"), ("trochanter", "trochanter"),
    ("femora", "femur"), ("femur of the hind leg", "femur"), ("tibiae", "tibia"), ("tarsi", "tarsus"),
    ("tarsal claws", "claw"), ("abdominal segments", "abdomen"), ("gaster", "abdomen"), ("abdominal tergites", "tergite"),
    ("sternites", "sternite"), ("ovipositor", "ovipositor"), ("male genitalia", "genitalia"), ("cerci", "cercus"),
    ("bristles", "setae"), ("fine hairs", "setae"), ("whole body", "whole body"), ("entire specimen", "whole body"),
    ("the insect's thorax", "thorax"), ("BACKGROUND", "background"), ("white backdrop", "background"),
    ("  Head.  ", "head"),
])
def test_normalize_body_part(term, expected):
    assert normalize_body_part(term) == (expected, True)


@pytest.mark.parametrize("term,kept", [("gonostylus", "gonostylus"), ("  Mystery blob. ", "Mystery blob"), ("", ""),
                                       (None, "")])
def test_unknown_body_parts_are_kept_verbatim(term, kept):
    assert normalize_body_part(term) == (kept, False)


def test_vocabulary_covers_the_required_terms():
    required = ["head", "compound eye", "ocellus", "antenna", "mouthparts", "mandible", "palp", "proboscis", "thorax",
                "pronotum", "mesonotum", "scutellum", "forewing", "hindwing", "elytron", "hemelytron", "haltere",
                "wing venation", "leg", "coxa", "trochanter", "femur", "tibia", "tarsus", "claw", "abdomen", "tergite",
                "sternite", "ovipositor", "genitalia", "cercus", "setae", "whole body", "background", "wing"]
    assert set(required) <= set(BODY_PARTS)
    assert all(normalize_body_part(term) == (term, True) for term in BODY_PARTS)


@pytest.mark.parametrize("name,expected", [
    ("shape", "shape"), ("Size", "size"), ("length", "size"), ("color", "colour"), ("Colour", "colour"),
    ("colouration", "colour"), ("markings", "marking"), ("pattern", "marking"), ("colour pattern", "marking"),
    ("spots", "marking"), ("sculpture", "texture"), ("surface", "texture"), ("Surface texture", "texture"),
    ("color/pattern", "marking"), ("smell", "other"), ("", "other"), (None, "other"), ("OTHER", "other"),
])
def test_normalize_attribute(name, expected):
    assert normalize_attribute(name) == expected
