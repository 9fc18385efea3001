"""The controlled vocabulary of insect anatomy and of trait attributes.

Body parts are mapped onto a small vocabulary (:func:`normalize_body_part`) so annotations can be
grouped and counted; the model's own words are kept in ``body_part_raw``. Decisions:
- a phrase is matched by the vocabulary term it contains ("the left antenna" → antenna), the
  longest term winning, ties going to the later one (English puts the head noun last:
  "forewing venation" → wing venation); in "X of Y" the X part is tried first ("femur of the hind
  leg" → femur, "tip of the antenna" → antenna); generic words (body, specimen, insect) only win
  when nothing more specific is named;
- positions are not parts: left/right and fore/mid/hind legs all map to ``leg`` (the qualifier
  stays in ``body_part_raw``); forewing and hindwing are different structures and stay apart,
  and a plain "wing" stays ``wing`` (one outline often cannot tell them apart);
- a region the model calls background is ``is_background=True, body_part="background"``, whichever
  of the two it stated.
"""

from __future__ import annotations

import re

ATTRIBUTES = ("shape", "size", "colour", "texture", "marking", "other")

# --- controlled vocabulary ------------------------------------------------------------------

BODY_PARTS: dict[str, list[str]] = {
    "head": ["head", "heads", "head capsule", "cephalic", "face", "frons", "vertex", "gena", "genae", "clypeus"],
    "compound eye": ["compound eye", "eye", "ocular"],
    "ocellus": ["ocellus", "ocelli", "ocellar", "simple eye", "ocellar triangle"],
    "antenna": ["antenna", "antennae", "antennas", "antennal", "scape", "flagellum", "antennomere", "antennal club"],
    "mouthparts": ["mouthparts", "mouthpart", "mouth parts", "mouth", "labium", "labrum", "maxilla", "maxillae"],
    "mandible": ["mandible", "mandibles", "mandibular", "jaw", "jaws"],
    "palp": ["palp", "palps", "palpus", "palpi", "maxillary palp", "labial palp"],
    "proboscis": ["proboscis", "proboscises", "proboscides", "beak", "labellum", "labella"],
    "thorax": ["thorax", "thoraces", "thoracic", "thoracic segment", "prothorax", "mesothorax", "metathorax",
               "mesosoma", "alitrunk", "propodeum"],
    "pronotum": ["pronotum", "pronota", "pronotal"],
    # The scutum most insects show dorsally is the mesoscutum, the main plate of the mesonotum.
    "mesonotum": ["mesonotum", "mesonota", "scutum", "mesoscutum"],
    "scutellum": ["scutellum", "scutella", "scutellar"],
    "forewing": ["forewing", "fore wing", "front wing", "anterior wing", "tegmen", "tegmina"],
    "hindwing": ["hindwing", "hind wing", "rear wing", "posterior wing"],
    "wing": ["wing", "wing membrane", "wing tip", "wing margin"],
    "elytron": ["elytron", "elytra", "elytral", "wing cover", "wing case"],
    "hemelytron": ["hemelytron", "hemelytra", "hemielytron", "hemielytra"],
    "haltere": ["haltere", "halter", "halteres"],
    "wing venation": ["wing venation", "venation", "wing vein", "vein", "pterostigma", "stigma"],
    "leg": ["leg", "foreleg", "fore leg", "front leg", "midleg", "mid leg", "middle leg", "hindleg", "hind leg",
            "rear leg"],
    "coxa": ["coxa", "coxae", "coxal"],
    "trochanter": ["trochanter", "trochanters"],
    "femur": ["femur", "femora", "femoral", "hind femur"],
    "tibia": ["tibia", "tibiae", "tibias", "tibial", "tibial spur"],
    "tarsus": ["tarsus", "tarsi", "tarsal", "tarsomere", "tarsal segment"],
    "claw": ["claw", "tarsal claw", "unguis", "ungues"],
    "abdomen": ["abdomen", "abdomens", "abdominal", "abdominal segment", "metasoma", "gaster", "petiole",
                "opisthosoma"],
    "tergite": ["tergite", "tergum", "terga", "abdominal tergite", "dorsal plate"],
    "sternite": ["sternite", "sternum", "sterna", "abdominal sternite", "ventral plate"],
    "ovipositor": ["ovipositor", "sting"],
    "genitalia": ["genitalia", "genital", "terminalia", "hypopygium", "aedeagus"],
    "cercus": ["cercus", "cerci"],
    "setae": ["setae", "seta", "hair", "bristle", "chaetae", "pubescence", "pilosity"],
    "whole body": ["whole body", "entire body", "body", "whole specimen", "entire specimen", "specimen", "insect",
                   "habitus"],
    "background": ["background", "backdrop", "substrate", "mounting surface", "scale bar"],
}
_WEAK = {"whole body"}  # only wins when no specific part is named ("the insect's thorax" → thorax)
EMPTY_PART = {"", "none", "n/a", "na", "null", "unknown", "-", "not applicable"}


def _plural(phrase: str) -> str | None:
    """Regular English plural, or None where the word is Latin or already plural (those are listed)."""
    if phrase.endswith(("s", "ae", "a", "i", "al", "ar", "ic")):
        return None
    return phrase + ("es" if phrase.endswith(("x", "ch", "sh")) else "s")


def _synonym_table() -> dict[str, str]:
    """phrase → canonical term, with regular plurals of each phrase's last word added."""
    table = {}
    for canonical, synonyms in BODY_PARTS.items():
        for phrase in [canonical, *synonyms]:
            for form in (phrase, _plural(phrase)):
                if form:
                    table.setdefault(form, canonical)
    return table


_SYNONYMS = _synonym_table()
_SYNONYM_RE = re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, _SYNONYMS), key=len, reverse=True)) + r")\b")


def simplify(term: str) -> str:
    """Lower case, hyphens and punctuation to spaces, single spaces ("Fore-wing." → "fore wing")."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", term.lower()).split())


def _best_match(phrase: str) -> str | None:
    best = None  # (specific, length, position) — see the module docstring
    for m in _SYNONYM_RE.finditer(phrase):
        canonical = _SYNONYMS[m.group()]
        key = (canonical not in _WEAK, len(m.group()), m.start())
        if best is None or key > best[0]:
            best = (key, canonical)
    return best[1] if best else None


def normalize_body_part(term: str | None) -> tuple[str, bool]:
    """(canonical term, True) when the phrase names a vocabulary term, else (the phrase stripped,
    False). "Antennae" → ("antenna", True); "the left hind leg" → ("leg", True)."""
    raw = (term or "").strip().strip(".,;:*_\"'`").strip()
    simple = simplify(raw)
    if not simple:
        return raw, False
    head = simple.split(" of ", 1)[0] if " of " in simple else None
    canonical = (_best_match(head) if head else None) or _best_match(simple)
    return (canonical, True) if canonical else (raw, False)


# --- trait attributes -----------------------------------------------------------------------

_ATTRIBUTE_WORDS = {
    "shape": ["shape", "form", "outline", "morphology", "structure", "profile", "contour"],
    "size": ["size", "length", "width", "breadth", "proportion", "dimension", "height", "thickness"],
    "colour": ["colour", "color", "coloration", "colouration", "colouring", "coloring", "pigmentation", "hue", "tint",
               "tone", "shade"],
    "texture": ["texture", "surface", "sculpture", "sculpturing", "microsculpture", "vestiture", "pubescence",
                "sheen", "lustre", "luster", "gloss", "finish", "hairiness"],
    "marking": ["marking", "pattern", "patterning", "spot", "stripe", "band", "banding", "maculation", "mark"],
}
_ATTRIBUTE_OF = {w: a for a, words in _ATTRIBUTE_WORDS.items() for w in words}
# Free-text traits carry no attribute; these words give a best guess (first family that matches).
_GUESS_WORDS = [
    ("marking", r"spots?|spotted|stripes?|striped|bands?|banded|patch(?:es)?|mark(?:s|ings?)?|patterns?|mottled|"
                r"dots?|dotted|speckled|ringed|tipped"),
    ("colour", r"colou?r\w*|black\w*|brown\w*|white|yellow\w*|orange|red\w*|green\w*|blue\w*|grey|gray|"
               r"golden|silver\w*|tan|ochre|amber|cream|pale|dark|darker|light|translucent|transparent|"
               r"hyaline|infuscated|metallic|iridescent"),
    ("texture", r"smooth|shiny|glossy|matte?|dull|hairy|setose|pubescent|punctate|punctured|rough|granular|"
                r"striate|wrinkled|rugose|velvety|covered|sculptured|textured"),
    ("shape", r"elongated?|oval|ovate|round(?:ed)?|filiform|clavate|clubbed|triangular|cylindrical|tapering|"
              r"tapered|curved|flattened|conical|segmented|serrate|pectinate|elbowed|geniculate|slender|"
              r"bulbous|narrow(?:ing)?|pointed|rounded|convex|concave|straight|bent|shaped|spherical"),
    ("size", r"long|short|large|small|tiny|broad|wide|big|length|width|mm|thick|thin|stout"),
]
_GUESS_RES = [(a, re.compile(rf"\b(?:{words})\b", re.I)) for a, words in _GUESS_WORDS]


def normalize_attribute(name: str | None) -> str:
    """"color" → colour, "markings"/"pattern" → marking, "sculpture"/"surface" → texture; unknown → other."""
    words = re.findall(r"[a-z]+", str(name or "").lower())
    if words[:2] in (["colour", "pattern"], ["color", "pattern"]):
        return "marking"
    for word in words:
        for candidate in (word, word[:-1] if word.endswith("s") else word, word[:-2] if word.endswith("es") else word):
            if candidate in _ATTRIBUTE_OF:
                return _ATTRIBUTE_OF[candidate]
            if candidate in ATTRIBUTES:
                return candidate
    return "other"


def guess_attribute(value: str) -> str:
    for attribute, pattern in _GUESS_RES:
        if pattern.search(value):
            return attribute
    return "other"
