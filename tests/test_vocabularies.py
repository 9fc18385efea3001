"""Other taxa: the body-part vocabulary is a data file chosen by annotate.vocabulary (insect by
default; bird and plant bundled); the prompts name the group, and the answers are normalised to
its parts — in the stage as in the parser."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.fake_openai_server import FakeOpenAIServer
from pipeline.annotation.answers import parse_answer
from pipeline.annotation.prompts import PROMPTS, build_request, select_prompt
from pipeline.annotation.stage import AnnotateUnits
from pipeline.annotation.units import annotation_units
from pipeline.annotation.vocabulary import INSECT, VOCABULARIES, load_vocabulary
from pipeline.config import AnnotateConfig, ConfigError, validate
from pipeline.demo.run import demo_build_config


@pytest.mark.parametrize("name", sorted(p.stem for p in VOCABULARIES.glob("*.yaml")))
def test_each_bundled_vocabulary_maps_its_own_terms_to_themselves(name):
    vocabulary = load_vocabulary(name)
    assert vocabulary.name == name and "background" in vocabulary.parts and vocabulary.weak <= set(vocabulary.parts)
    assert all(vocabulary.normalize_body_part(term) == (term, True) for term in vocabulary.parts)


@pytest.mark.parametrize("name, phrase, part", [
    ("insect", "upper mandible", "mandible"), ("bird", "upper mandible", "beak"),
    ("bird", "the left wing coverts", "wing"), ("bird", "dark eye ring", "eye"), ("bird", "the whole bird", "whole body"),
    ("plant", "serrated leaf margin", "leaf margin"), ("plant", "petals", "petal"),
    ("plant", "the herbarium sheet", "background"), ("plant", "stamens of the flower", "stamen"),
])
def test_a_phrase_is_named_in_the_vocabulary_of_its_group(name, phrase, part):
    assert load_vocabulary(name).normalize_body_part(phrase) == (part, True)
    answer = parse_answer(json.dumps({"is_background": False, "body_part": phrase, "traits": []}), 1,
                          load_vocabulary(name))
    assert (answer["body_part"], answer["body_part_raw"]) == (part, phrase)


def test_prompts_name_the_group_and_insect_prompts_keep_their_versions():
    bird = load_vocabulary("bird")
    for prompt in PROMPTS.values():
        assert "insect" not in prompt.instruction(prompt.images_per_prompt, bird)
        assert "bird" in prompt.instruction(prompt.images_per_prompt, bird)
        assert prompt.version_for(bird) != prompt.version == prompt.version_for(INSECT)
    assert "shows a bird specimen" in select_prompt("overlay", 1).instruction(1, bird)
    assert "shows an insect specimen" in select_prompt("overlay", 1).instruction(1)


def test_an_unknown_vocabulary_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"annotate.vocabulary: .*no vocabulary 'fungus'.*\['bird', 'insect', 'plant'\]"):
        validate(AnnotateConfig, {"vocabulary": "fungus"}, prefix="annotate.")
    bad = tmp_path / "v.yaml"
    bad.write_text("parts: {cap: [pileus]}\n")
    with pytest.raises(ConfigError, match="annotate.vocabulary: .*background"):
        validate(AnnotateConfig, {"vocabulary": str(bad)}, prefix="annotate.")
    good = tmp_path / "fungus.yaml"
    good.write_text("organism: fungus\nparts: {cap: [pileus], gills: [lamellae], background: [background]}\n")
    assert validate(AnnotateConfig, {"vocabulary": str(good)}).vocabulary == str(good)
    assert "a fungus specimen" in build_request([b"\x89PNG\r\n\x1a\n"], vocabulary=load_vocabulary(str(good))
                                                ).messages[0]["content"][0]["text"]


def test_the_stage_words_and_reads_by_the_configured_vocabulary(demo_dir, demo_build):
    """The demo's candidates annotated as birds against a test server answering in bird words."""
    out, _ = demo_build
    units = annotation_units(pq.read_table(out / "candidates").to_pylist(), images_per_prompt=1)[:4]
    answer = json.dumps({"is_background": False, "body_part": "upper mandible", "traits": [
        {"attribute": "colour", "value": "yellow"}]})
    with FakeOpenAIServer(answer=lambda marker, text, body: answer) as server:
        cfg = demo_build_config(demo_dir)
        annotate = validate(AnnotateConfig, {"llm": {"kind": "openai", "base_url": server.base_url, "model": "m"},
                                             "images_per_prompt": 1, "vocabulary": "bird"})
        table, _ = AnnotateUnits(annotate, cfg.source, cfg.preprocess)(pa.Table.from_pylist(units))
        prompts = [p["text"] for r in server.received for p in r.body["messages"][0]["content"] if p["type"] == "text"]
    rows = table.to_pylist()
    assert [r["body_part"] for r in rows] == ["beak"] * len(units) and all(r["body_part_known"] for r in rows)
    assert all("bird specimen" in t and "insect" not in t for t in prompts)
    assert {r["prompt_version"] for r in rows} == {select_prompt("overlay", 1).version_for(load_vocabulary("bird"))}
