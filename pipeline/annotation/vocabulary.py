"""The controlled vocabularies of body parts (insect anatomy by default; birds and vascular
plants bundled too, in ``pipeline/vocabularies/``; ``annotate.vocabulary`` chooses) and of trait
attributes.

Body parts are mapped onto a small vocabulary (:meth:`Vocabulary.normalize_body_part`) so
annotations can be grouped and counted; the model's own words are kept in ``body_part_raw``.
Decisions (the examples are insect anatomy):
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

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ATTRIBUTES = ("shape", "size", "colour", "texture", "marking", "other")

# --- controlled vocabulary ------------------------------------------------------------------

VOCABULARIES = Path(__file__).resolve().parents[1] / "vocabularies"  # the bundled ones: <name>.yaml
EMPTY_PART = {"", "none", "n/a", "na", "null", "unknown", "-", "not applicable"}


def _plural(phrase: str) -> str | None:
    """Regular English plural, or None where the word is Latin or already plural (those are listed)."""
    if phrase.endswith(("s", "ae", "a", "i", "al", "ar", "ic")):
        return None
    return phrase + ("es" if phrase.endswith(("x", "ch", "sh")) else "s")


@dataclass(frozen=True)
class Vocabulary:
    """A group's body parts (canonical term → synonyms), read from a YAML file: ``name``,
    ``organism`` (the word the prompts use: "an insect specimen"), ``parts`` (with ``background``
    among them) and ``weak`` (terms that win only when nothing more specific is named)."""

    name: str
    organism: str
    parts: dict[str, list[str]]
    weak: frozenset[str]
    synonyms: dict[str, str] = field(init=False, repr=False, compare=False)
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        table = {}  # phrase → canonical term, with regular plurals of each phrase's last word added
        for canonical, synonyms in self.parts.items():
            for phrase in [canonical, *synonyms]:
                for form in (phrase, _plural(phrase)):
                    if form:
                        table.setdefault(form, canonical)
        object.__setattr__(self, "synonyms", table)
        object.__setattr__(self, "pattern", re.compile(
            r"\b(?:" + "|".join(sorted(map(re.escape, table), key=len, reverse=True)) + r")\b"))

    @property
    def an_organism(self) -> str:
        return f"{'an' if self.organism[:1] in 'aeiou' else 'a'} {self.organism}"

    def best_match(self, phrase: str) -> str | None:
        best = None  # (specific, length, position) — see the module docstring
        for m in self.pattern.finditer(phrase):
            canonical = self.synonyms[m.group()]
            key = (canonical not in self.weak, len(m.group()), m.start())
            if best is None or key > best[0]:
                best = (key, canonical)
        return best[1] if best else None

    def normalize_body_part(self, term: str | None) -> tuple[str, bool]:
        """(canonical term, True) when the phrase names a vocabulary term, else (the phrase stripped,
        False). "Antennae" → ("antenna", True); "the left hind leg" → ("leg", True)."""
        raw = (term or "").strip().strip(".,;:*_\"'`").strip()
        simple = simplify(raw)
        if not simple:
            return raw, False
        head = simple.split(" of ", 1)[0] if " of " in simple else None
        canonical = (self.best_match(head) if head else None) or self.best_match(simple)
        return (canonical, True) if canonical else (raw, False)


@functools.lru_cache(maxsize=16)
def vocabulary_path(name_or_path: str) -> Path:
    """The YAML file of a bundled vocabulary's name, or the path itself."""
    bundled = "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml"))
    return VOCABULARIES / f"{name_or_path}.yaml" if bundled else Path(name_or_path)


def load_vocabulary(name_or_path: str) -> Vocabulary:
    """A bundled vocabulary by name (insect, bird, plant) or a YAML file of the same shape."""
    path = vocabulary_path(name_or_path)
    if not path.is_file():
        bundled = sorted(p.stem for p in VOCABULARIES.glob("*.yaml"))
        raise ValueError(f"no vocabulary {name_or_path!r}: name one of {bundled} or a YAML file")
    data = yaml.safe_load(path.read_text()) or {}
    parts = data.get("parts")
    if not isinstance(parts, dict) or "background" not in parts or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in parts.values()):
        raise ValueError(f"vocabulary {path}: parts must map each term to a list of synonyms, background included")
    weak = frozenset(data.get("weak") or ())
    if not weak <= set(parts):
        raise ValueError(f"vocabulary {path}: weak terms {sorted(weak - set(parts))} are not among its parts")
    return Vocabulary(name=str(data.get("name") or path.stem), organism=str(data.get("organism") or path.stem),
                      parts={k: list(v) for k, v in parts.items()}, weak=weak)


INSECT = load_vocabulary("insect")  # the default (the paper's BIOSCAN-5M insects)
BODY_PARTS = INSECT.parts


def simplify(term: str) -> str:
    """Lower case, hyphens and punctuation to spaces, single spaces ("Fore-wing." → "fore wing")."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", term.lower()).split())


def normalize_body_part(term: str | None, vocabulary: Vocabulary = INSECT) -> tuple[str, bool]:
    """:meth:`Vocabulary.normalize_body_part` of ``vocabulary`` (insect anatomy by default)."""
    return vocabulary.normalize_body_part(term)


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
