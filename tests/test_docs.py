"""README.md and docs/*.md against the code: every relative link resolves (to a file of the repository,
and a #anchor into a Markdown file to one of its headings), and every config key the docs name exists
in the project's pydantic config models. Fast, no Ray.

A config key is a dotted name in backticks (`contrast.t_freq`, `storage.max_attempts: 8`,
`--set annotate.llm.kind=serve`, `ray.*`) or after --set in a code block, whose first segment is a
field of one of the config sections (pipeline/config.py, pipeline/review/config.py): it must resolve
field by field through the nested sections, from that section. A field typed as a dict (free-form
options) ends the resolution. `model.safetensors` (a file name) and `ray.cluster_utils` (a module) are
not keys."""

from __future__ import annotations

import importlib.util
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

import pipeline.config
import pipeline.review.config  # noqa: F401  (its sections register as Section subclasses)

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")

SEGMENT = r"[a-z_][a-z0-9_]*"
KEY = rf"{SEGMENT}(?:\.{SEGMENT})+"
SPAN_KEY = re.compile(rf"({KEY}|{SEGMENT}(?=\.\*))(?:\.\*)?(?:\s*[:=]\s*.*)?", re.S)  # `a.b`, `a.*`, `a.b: v`, `a.b=v`
SET_KEY = re.compile(rf"--set\s+({KEY})=")
# A dotted name ending so is a file (`model.safetensors`, `train.yaml`), never a key.
FILE_SUFFIXES = {"csv", "gz", "html", "jpg", "jpeg", "json", "jsonl", "md", "npy", "parquet", "png", "pt", "py",
                 "safetensors", "sh", "svg", "tar", "txt", "webp", "xml", "yaml", "yml", "zip"}


def without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked (links and headings inside them are not ones)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub("code", text)


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation but - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_targets(text: str) -> list[str]:
    prose = without_code(text)
    return [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REF_DEF.finditer(prose)]


def broken_links(page: Path, text: str, repo: Path = REPO) -> list[str]:
    """'target: why' for each relative link of ``page`` (whose text is ``text``) that does not resolve."""
    problems = []
    for target in link_targets(text):
        if not target or SCHEME.match(target):  # http(s), mailto, ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        if path:
            dest = (repo / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
            dest = dest.resolve()
            if not dest.is_relative_to(repo.resolve()):
                problems.append(f"{target}: outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{target}: no such file")
                continue
        else:
            dest = page.resolve()
        if anchor and dest.suffix == ".md" and (dest == page.resolve() or dest.is_file()):
            if anchor not in anchors(text if dest == page.resolve() else dest.read_text()):
                problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(repo.resolve())}")
    return problems


# --------------------------------------------------------------------------- config keys


def sections() -> list[type[BaseModel]]:
    """Every config section the project defines (pipeline/config.py, pipeline/review/config.py)."""
    out, todo = [], [pipeline.config.Section]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith(("pipeline.", "actors.")):
                out.append(sub)
    return out


def _members(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def _section_of(annotation) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _free_form(annotation) -> bool:
    """A dict (or Any) field: whatever follows it in a dotted name is the user's own key."""
    return any(member is typing.Any or member is dict or typing.get_origin(member) is dict
               for member in _members(annotation))


def resolves(model: type[BaseModel], parts: list[str]) -> bool:
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i == len(parts) - 1:
            return True
        nested = _section_of(field.annotation)
        if nested is None:
            return _free_form(field.annotation)
        model = nested
    return True


def is_module_path(name: str) -> bool:
    """`ray.cluster_utils`: an installed package's submodule (found on disk; nothing is imported)."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None or not rest:
        return False
    for location in spec.submodule_search_locations or []:
        base = Path(location).joinpath(*rest)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def named_keys(text: str) -> list[str]:
    """The dotted names the text gives as config keys (before knowing whether they are)."""
    fenced = "\n".join(m.group(0) for m in FENCE.finditer(text))
    prose = FENCE.sub("", text)
    keys = [m.group(1) for m in SET_KEY.finditer(fenced)]
    for span in CODE_SPAN.finditer(prose):
        content = span.group(2).strip()
        match = SPAN_KEY.fullmatch(content)
        if match:
            keys.append(match.group(1))
        keys += [m.group(1) for m in SET_KEY.finditer(content)]
    return keys


def unknown_keys(text: str) -> list[str]:
    """Each dotted name the text gives as a config key that no config section has."""
    models = sections()
    first = {name for model in models for name in model.model_fields}
    problems = []
    for key in dict.fromkeys(named_keys(text)):
        parts = key.split(".")
        if parts[0] not in first:
            continue  # not a config key: a file, a module, a manifest field, ...
        if any(resolves(model, parts) for model in models if parts[0] in model.model_fields):
            continue
        if parts[-1] in FILE_SUFFIXES or is_module_path(key):
            continue
        problems.append(key)
    return problems


# --------------------------------------------------------------------------- the tests


def test_pages_exist():
    assert (REPO / "README.md").is_file()
    assert len(PAGES) > 1, "docs/*.md: no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    problems = broken_links(page, page.read_text())
    assert not problems, f"{page.relative_to(REPO)}: broken links:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_exist(page):
    problems = unknown_keys(page.read_text())
    assert not problems, (f"{page.relative_to(REPO)} names config keys no config section has "
                          f"(pipeline/config.py, pipeline/review/config.py):\n  " + "\n  ".join(problems))


def test_docs_name_config_keys():
    # The extraction is not vacuous: the keys a reader meets first are found, and resolve.
    named = {key for page in PAGES for key in named_keys(page.read_text())}
    assert {"annotate.llm.kind", "contrast.t_freq", "storage.max_attempts"} <= named


# --------------------------------------------------------------------------- the checks themselves


def test_checker_catches_a_misspelt_key():
    assert unknown_keys("`contrast.t_frq` and `--set annotate.llm.kidn=serve`") == ["contrast.t_frq",
                                                                                    "annotate.llm.kidn"]
    assert unknown_keys("```bash\nsae-traits build --set encoder.num_gpu=0\n```") == ["encoder.num_gpu"]


def test_checker_accepts_keys_files_and_modules():
    text = ("`annotate.llm.kind`, `llm.model`, `contrast.lone_species: family`, `ray.*`, `sae.kind` (the trainer), "
            "`storage.options.anything` (free-form), `source.taxonomy_text_members.species`, "
            "`model.safetensors`, `train.yaml`, `ray.cluster_utils`, `manifest.json`, `pipeline.config.Section`, "
            "`train.l1_warmup_steps`, `per_build`, `--set link_builds=false`")
    assert unknown_keys(text) == []
    assert unknown_keys("`source.splits.x`, `contrast.t_freq.x`") == ["source.splits.x", "contrast.t_freq.x"]


def test_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "build.md").write_text("# Running a build\n\n## Data on S3 (and faults)\n")
    readme = tmp_path / "README.md"
    text = ("[ok](docs/build.md) [ok](docs/build.md#data-on-s3-and-faults) [ok](#sae-traits) [web](https://x.org/y) "
            "[gone](docs/nope.md) [bad anchor](docs/build.md#resuming) [self](#nowhere)\n"
            "`[in code](docs/nope2.md)`\n\n# sae-traits\n\n[ref]: docs/missing.md\n")
    assert broken_links(readme, text, tmp_path) == [
        "docs/nope.md: no such file", "docs/build.md#resuming: no heading #resuming in docs/build.md",
        "#nowhere: no heading #nowhere in README.md", "docs/missing.md: no such file"]


def test_slug_is_githubs():
    assert slug("Trait annotation (batch builds and the ad-hoc endpoint)") == \
        "trait-annotation-batch-builds-and-the-ad-hoc-endpoint"
    assert slug("`sae-traits build`: resuming, and `--overwrite`") == "sae-traits-build-resuming-and---overwrite"
    assert slug("SAE checkpoints & the hub") == "sae-checkpoints--the-hub"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
