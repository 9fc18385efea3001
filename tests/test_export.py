"""Exports of the demo build, read back with the libraries their users have: the Hugging Face
folder with `datasets.load_dataset` (offline), the Darwin Core Archive with python-dwca-reader.
Expected rows are counted from the build's own tables; bad invocations are refused naming the key."""

import io
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from datasets import Features, List, load_dataset
from datasets import Image as ImageFeature
from dwca.read import DwCAReader
from PIL import Image

from pipeline.annotation.renderings import crop_box
from pipeline.contract import MEASUREMENT_TYPE
from pipeline.export import DWC, MOF_ROW_TYPE, MOF_TERMS, OCCURRENCE_ROW_TYPE, OCCURRENCE_TERMS, ZONE_MEASURES, main
from tests.s3_server import FAKE_KEY, FAKE_SECRET, client, download, upload

EXCLUDED = {"background", "failed", "low_confidence"}  # what an export leaves out (the first two unless asked)


def export(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(list(map(str, args))) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def traits_of(build: Path, columns=None) -> pa.Table:
    return pq.read_table(build / "traits", columns=columns)


def exportable(traits: pa.Table, excluded=EXCLUDED) -> list[dict]:
    return [r for r in traits.to_pylist() if r["status"] not in excluded]


def card_of(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def load(folder: Path, tmp_path: Path):
    return load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf-cache"))


def raw_images(ds):
    """The dataset with its image columns undecoded ({bytes, path})."""
    return ds.cast_column("image", ImageFeature(decode=False)).cast_column("images", List(ImageFeature(decode=False)))


def families(build: Path) -> dict[str, str]:
    return dict(zip(*pq.read_table(build / "activations", columns=["image_id", "family"]).to_pydict().values()))


def copy_build(build: Path, dest: Path, traits: pa.Table) -> Path:
    """The build elsewhere with ``traits`` as its traits/ (in two files)."""
    shutil.copytree(build, dest, ignore=shutil.ignore_patterns("report", "_build", "traits"))
    (dest / "traits").mkdir()
    half = traits.num_rows // 2
    pq.write_table(traits.slice(0, half), dest / "traits" / "part-0.parquet")
    pq.write_table(traits.slice(half), dest / "traits" / "part-1.parquet")
    return dest


def with_statuses(traits: pa.Table, statuses: dict[int, str]) -> pa.Table:
    status = traits["status"].to_pylist()
    for i, s in statuses.items():
        status[i] = s
    return traits.set_column(traits.schema.get_field_index("status"), "status", pa.array(status, pa.string()))


# --------------------------------------------------------------------------- hf

def test_hf_export_loads_with_datasets(demo_build, tmp_path, capsys):
    build, manifest = demo_build
    out = tmp_path / "hf"
    figures = export(capsys, "--build", build, "--format", "hf", "--out", out)
    traits = traits_of(build)
    expected = exportable(traits)
    assert figures["rows"] == len(expected) > 0 and figures["images_missing"] == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]

    ds = load(out, tmp_path)
    assert len(ds) == len(expected)
    card = card_of(out)
    card_features = Features._from_yaml_list(card["dataset_info"]["features"])
    assert ds.features == card_features                               # every column typed as the card says
    assert list(ds.features) == list(card_features)
    metadata = pq.read_schema(next((out / "data").iterdir())).metadata[b"huggingface"]
    assert Features.from_dict(json.loads(metadata)["info"]["features"]) == card_features
    assert ds.features["image"] == ImageFeature() and ds.features["images"] == List(ImageFeature())
    assert {"trait_description", "species", "bioscan_process_id"} <= set(ds.features)  # BIOSCAN-Traits' columns

    assert card["license"] == "unknown" and "a placeholder" in (out / "README.md").read_text()
    assert card["configs"][0]["data_files"][0]["path"] == "data/train-*"
    published = json.loads((out / "README.md").read_text().split("```json\n")[1].split("\n```")[0])
    assert set(published) == set(manifest["config"]) - {"ray", "storage"}  # no store options, no credentials
    assert card["dataset_info"]["splits"][0]["num_examples"] == len(expected)
    assert card["sae_traits"]["started"] == manifest["started"]
    assert card["sae_traits"]["sae"]["checkpoint"] == manifest["config"]["sae"]["checkpoint"]

    by_id = {r["annotation_id"]: r for r in expected}
    family = families(build)
    for row in ds:
        t = by_id[row["annotation_id"]]
        assert isinstance(row["image"], Image.Image) and row["image"].size[0] > 0
        assert len(row["images"]) == len(t["renderings"]) and all(im.size[0] > 0 for im in row["images"])
        assert row["image"].size == Image.open(io.BytesIO(t["renderings"][0])).size
        assert (row["trait_description"], row["species"], row["genus"]) == (t["description"], t["species"], t["genus"])
        assert row["bioscan_process_id"] == t["image_ids"][0] and row["image_ids"] == t["image_ids"]
        assert row["family"] == family[t["image_ids"][0]]
        assert row["boxes"] == t["boxes"] and row["latent"] == t["latent"] and row["status"] == t["status"]
        assert (row["model"], row["prompt_version"]) == (t["model"], t["prompt_version"])
        assert row["confidence"] == t["confidence"] and row["evidence"] == t["evidence"]  # how far to trust it
    saved = {r["annotation_id"]: r["images"] for r in raw_images(ds)}
    assert all([im["bytes"] for im in saved[a]] == t["renderings"] for a, t in by_id.items())  # the bytes sent


def test_min_confidence_exports_only_the_trusted(demo_build, tmp_path, capsys):
    build, _ = demo_build
    rows = exportable(traits_of(build, ["annotation_id", "status", "confidence"]))
    cut = sorted(r["confidence"] for r in rows)[len(rows) // 2]  # about half of them
    export(capsys, "--build", build, "--format", "hf", "--out", tmp_path / "hf", "--min-confidence", cut)
    kept = set(pq.read_table(tmp_path / "hf" / "data", columns=["annotation_id"])["annotation_id"].to_pylist())
    assert kept == {r["annotation_id"] for r in rows if r["confidence"] >= cut} and 0 < len(kept) < len(rows)


def test_hf_export_without_saved_renderings_remakes_them_and_filters_statuses(demo_build, tmp_path, capsys):
    """A build that kept no renderings: the export makes them again from the source images, the
    same bytes as the ones the model was sent; background and failed rows only when asked."""
    build, _ = demo_build
    original = traits_of(build)
    traits = with_statuses(original.drop_columns(["renderings"]), {0: "failed", 1: "background", 2: "unparsed"})
    copy = copy_build(build, tmp_path / "build", traits)

    out = tmp_path / "hf"
    figures = export(capsys, "--build", copy, "--format", "hf", "--out", out, "--set", "rows_per_file=40")
    expected = exportable(traits)
    assert figures["rows"] == len(expected) == traits.num_rows - 2  # one failed, one background row left out
    n_files = -(-len(expected) // 40)
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-{i:05d}-of-{n_files:05d}.parquet"
                                                                 for i in range(n_files)]
    ds = load(out, tmp_path)
    assert Counter(ds["status"]) == Counter(r["status"] for r in expected)
    saved = {r["annotation_id"]: r["renderings"] for r in original.to_pylist()}
    for row in raw_images(ds):
        assert [im["bytes"] for im in row["images"]] == saved[row["annotation_id"]]
        assert row["image"]["bytes"] == saved[row["annotation_id"]][0]

    # the source images gone since the build: every row stays, without images, and the card says so
    moved = copy_build(copy, tmp_path / "moved", traits)
    candidates = pq.read_table(moved / "candidates")
    shutil.rmtree(moved / "candidates")
    (moved / "candidates").mkdir()
    gone = pc.binary_join_element_wise(str(tmp_path / "nowhere"), candidates["image_id"], "/")
    pq.write_table(candidates.set_column(candidates.schema.get_field_index("path"), "path", gone),
                   moved / "candidates" / "part-0.parquet")
    figures = export(capsys, "--build", moved, "--format", "hf", "--out", tmp_path / "hf-moved")
    assert figures["rows"] == figures["images_missing"] == len(expected)
    ds = load(tmp_path / "hf-moved", tmp_path)
    assert len(ds) == len(expected) and ds[0]["image"] is None and ds[0]["images"] == []
    assert f"{len(expected)} annotations have no image" in (tmp_path / "hf-moved" / "README.md").read_text()

    # every status, and crops of the source images around each image's boxes instead of the renderings
    crops = tmp_path / "crops"
    figures = export(capsys, "--build", copy, "--format", "hf", "--out", crops, "--set", "include_background=true",
                     "--set", "include_failed=true", "--set", "image=crop")
    assert figures["rows"] == traits.num_rows
    ds = load(crops, tmp_path)
    assert Counter(ds["status"]) == Counter(traits["status"].to_pylist())
    margin = json.loads((build / "manifest.json").read_text())["config"]["annotate"]["crop_margin"]
    shape = {r["image_id"]: (r["orig_h"], r["orig_w"])
             for r in pq.read_table(build / "candidates", columns=["image_id", "orig_w", "orig_h"]).to_pylist()}
    for row in ds.select(range(6)):
        assert len(row["images"]) == len(row["image_ids"])              # one crop per image
        for image_id, boxes, im in zip(row["image_ids"], row["boxes"], row["images"]):
            union = {k: (min if k.endswith("0") else max)(b[k] for b in boxes) for k in ("x0", "y0", "x1", "y1")}
            c = crop_box(union, shape[image_id], margin_frac=margin)
            assert im.size == (c["x1"] - c["x0"], c["y1"] - c["y0"])


# --------------------------------------------------------------------------- dwca

def expected_facts(rows: list[dict]) -> list[str]:
    """The occurrenceID of every MeasurementOrFact row an annotation gives: per image, its
    description, its structured traits and each region's measurements that have values."""
    out = []
    for r in rows:
        for k, image_id in enumerate(r["image_ids"]):
            regions = r["measurements"][k] if k < len(r["measurements"]) else []
            n = (r["description"] is not None) + len(r["traits"] or []) + sum(
                all(m[f] is not None for f in fields) for m in regions for _, _, fields in ZONE_MEASURES)
            out += [image_id] * n
    return out


def test_zone_measures_cover_every_measurement():
    assert sorted(f for _, _, fields in ZONE_MEASURES for f in fields) == sorted(MEASUREMENT_TYPE.names)


def test_dwca_export_reads_with_dwca_reader(demo_build, tmp_path, capsys):
    build, manifest = demo_build
    archive = tmp_path / "traits.zip"
    figures = export(capsys, "--build", build, "--format", "dwca", "--out", archive, "--set", "creator=Test Lab")
    rows = exportable(traits_of(build).drop_columns(["renderings"]))
    occurrences = sorted({i for r in rows for i in r["image_ids"]})
    facts = expected_facts(rows)
    assert (figures["occurrences"], figures["measurements_or_facts"]) == (len(occurrences), len(facts))

    labels = {r["image_id"]: r for r in pq.read_table(build / "activations",
                                                       columns=["image_id", "species", "genus", "family"]).to_pylist()}
    with DwCAReader(str(archive)) as dwca:
        core, (ext,) = dwca.descriptor.core, dwca.descriptor.extensions
        assert (core.type, ext.type) == (OCCURRENCE_ROW_TYPE, MOF_ROW_TYPE)
        assert core.terms == {DWC + t for t in OCCURRENCE_TERMS}         # no associatedMedia: local images
        assert ext.terms == {DWC + t for t in MOF_TERMS}
        cores = list(dwca)
        assert sorted(r.id for r in cores) == occurrences
        linked = [e for r in cores for e in r.extensions]
        assert len(linked) == len(facts) and Counter(e.core_id for e in linked) == Counter(facts)
        for r in cores:
            d = r.data
            assert d[DWC + "occurrenceID"] == r.id and d[DWC + "basisOfRecord"] == "PreservedSpecimen"
            assert (d[DWC + "scientificName"], d[DWC + "genus"], d[DWC + "family"]) == \
                tuple(labels[r.id][k] for k in ("species", "genus", "family"))
            assert all(e.core_id == r.id for e in r.extensions)
        by_annotation = {r["annotation_id"]: r for r in rows}
        for e in linked:
            t = by_annotation[e.data[DWC + "measurementID"].split(":")[0]]
            method = e.data[DWC + "measurementMethod"]
            assert f"SAE latent {t['latent']}" in method and t["model"] in method and t["prompt_version"] in method
            # how far the trait is to be trusted, with its own image's zone on the specimen
            zone = t["evidence"]["zones"][t["image_ids"].index(e.core_id)]
            assert (f"confidence {t['confidence']:.3f} (" in e.data[DWC + "measurementRemarks"]
                    and f"zone {zone['on_specimen']:.0%} on the specimen" in e.data[DWC + "measurementRemarks"])
        descriptions = [e for e in linked if e.data[DWC + "measurementType"] == "trait description"]
        assert len(descriptions) == sum(len(r["image_ids"]) for r in rows if r["description"] is not None)
        assert {e.data[DWC + "measurementUnit"] for e in linked} >= {"pixels", "square pixels", "degrees"}
        assert dwca.metadata.find("dataset/title").text
        assert dwca.metadata.find("dataset/creator/organizationName").text == "Test Lab"
        assert manifest["started"] in "".join(dwca.metadata.find("dataset/methods").itertext())  # provenance

    # images published at a URL: associatedMedia is that URL + the image's path under source.root
    export(capsys, "--build", build, "--format", "dwca", "--out", tmp_path / "media.zip",
           "--set", "media_base_url=https://example.org/specimens/")
    root = Path(manifest["config"]["source"]["root"])
    paths = dict(zip(*pq.read_table(build / "activations", columns=["image_id", "path"]).to_pydict().values()))
    with DwCAReader(str(tmp_path / "media.zip")) as dwca:
        assert DWC + "associatedMedia" in dwca.descriptor.core.terms
        for r in dwca:
            assert r.data[DWC + "associatedMedia"] == \
                f"https://example.org/specimens/{Path(paths[r.id]).relative_to(root).as_posix()}"


# --------------------------------------------------------------------------- storage

def test_exports_from_and_to_s3(demo_build, s3_server, tmp_path, capsys):
    """build and out on S3 (moto): tables and manifest read from there, both exports written there."""
    build, _ = demo_build
    traits = traits_of(build).drop_columns(["renderings"])  # renderings made again: 20 MB less to upload
    fs = client(s3_server)
    fs.mkdir("exports")
    upload(fs, copy_build(build, tmp_path / "build", traits), "exports/run1")
    keys = ["--set", f"storage.endpoint_url={s3_server}", "--set", f"storage.options.key={FAKE_KEY}",
            "--set", f"storage.options.secret={FAKE_SECRET}"]
    hf = export(capsys, "--build", "s3://exports/run1", "--format", "hf", "--out", "s3://exports/hf", *keys)
    dwca = export(capsys, "--build", "s3://exports/run1", "--format", "dwca", "--out", "s3://exports/run1.zip", *keys)
    ds = load(download(fs, "exports/hf", tmp_path / "hf"), tmp_path)
    assert len(ds) == hf["rows"] == len(exportable(traits))
    fs.get_file("exports/run1.zip", str(tmp_path / "run1.zip"))
    with DwCAReader(str(tmp_path / "run1.zip")) as archive:
        assert len(list(archive)) == dwca["occurrences"]


# --------------------------------------------------------------------------- refusals

def refused(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    return capsys.readouterr().err


def test_bad_invocations_are_refused_naming_the_key(demo_build, tmp_path, capsys):
    build, _ = demo_build
    err = refused(capsys, "--build", build, "--format", "csv", "--out", tmp_path / "x")
    assert "format: Input should be 'hf', 'dwca' or 'clip'" in err
    assert "format: Field required" in refused(capsys, "--build", build, "--out", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    err = refused(capsys, "--build", tmp_path / "empty", "--format", "hf", "--out", tmp_path / "x")
    assert "build: " in err and "is not a finished sae-traits build (no manifest.json" in err
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "manifest.json").write_text(json.dumps({"status": "running"}))
    err = refused(capsys, "--build", tmp_path / "running", "--format", "dwca", "--out", tmp_path / "x.zip")
    assert "build: " in err and "does not record a finished build" in err
    err = refused(capsys, "--build", build, "--format", "dwca", "--out", tmp_path / "archive.tar")
    assert "out: Value error, a Darwin Core Archive is one .zip file" in err
    assert "out: " in refused(capsys, "--build", build, "--format", "hf", "--out", build)  # would delete the build
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    err = refused(capsys, "--build", build, "--format", "hf", "--out", tmp_path / "taken")
    assert "out: " in err and "already exists" in err and (tmp_path / "taken" / "file").exists()
    assert "image: Input should be 'rendering' or 'crop'" in refused(
        capsys, "--build", build, "--format", "hf", "--out", tmp_path / "y", "--set", "image=overlay")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert pc.sum(pc.equal(traits_of(build, ["status"])["status"], "ok")).as_py() > 0  # the build is untouched


def test_an_export_that_cannot_read_or_write_ends_in_one_line(demo_build, tmp_path, monkeypatch, capsys):
    """Exit 3 and one line (docs/build.md#exit-codes), as for a build: an out on a read-only file
    system (a real tmpfs), a build on a store that does not answer; the report command alike."""
    from pipeline.report import main as report_main
    from tests.test_write_failures import tmpfs

    build, _ = demo_build
    with tmpfs(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert main(["--build", str(build), "--format", "dwca", "--out", f"{disk}/traits.zip"]) == 3
        err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {disk}/") and err.strip().endswith(
        "Read-only file system (errno 30); make the output writable and rerun the same command"), err
    assert len(err.strip().splitlines()) == 1

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    nobody = "http://127.0.0.1:9"  # the discard port: nothing listens
    for command, argv in ((main, ["--build", "s3://gone/build", "--format", "hf", "--out", tmp_path / "hf",
                                  "--set", f"storage.endpoint_url={nobody}", "--set", "storage.max_attempts=1"]),
                          (report_main, ["--build", "s3://gone/build", "--storage-options",
                                         json.dumps({"endpoint_url": nobody, "config_kwargs": {"retries": {"max_attempts": 1}}})])):
        capsys.readouterr()
        assert command(list(map(str, argv))) == 3
        err = capsys.readouterr().err
        error = err[err.index("error: "):]
        assert error.startswith("error: storage unreachable: s3://gone/build/") and "retries spent" in error, err
        assert error.strip().endswith("rerun the same command once the store answers again") and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
