"""End to end on the demo data, on a real local Ray with a declared (fake) GPU: the encoder
pool asks for num_gpus=1 as in production and the actor runs on the CPU."""

import csv
import io
import json
import shutil
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.graph import ROW_GROUP_ROWS, Build, format_summary
from pipeline.config import BuildConfig
from pipeline.demo.quality import best_latents, planted_parts
from pipeline.demo.run import demo_build_config
from pipeline.demo.specimens import METADATA_RELPATH, image_relpath
from tests.test_contract import REQUIRED as CONTRACT  # DESIGN §5's required columns


def run_build(demo_dir, data_root, output, *overrides):
    cfg = demo_build_config(demo_dir, [f"source.root={data_root}", f"output={output}", "encoder.num_gpus=1", *overrides])
    return Build(cfg).run()


def table(out, name):
    return pq.read_table(out / name) if (out / name).exists() else None


@pytest.fixture(scope="module")
def clean_build(demo_build):
    return demo_build


def test_every_table_has_the_contract_columns(clean_build, demo_dir):
    out, manifest = clean_build
    for name, columns in CONTRACT.items():
        if name == "errors":
            continue
        t = table(out, name)
        assert t is not None and t.num_rows > 0, name
        assert columns <= set(t.column_names), (name, columns - set(t.column_names))
        assert manifest["stages"][{"activations": "encode", "counts": "count", "selected": "select",
                                   "traits": "annotate"}.get(name, name)]["rows"] == t.num_rows
    written = json.loads((out / "manifest.json").read_text())
    assert written["status"] == "succeeded" and written["config"]["sae"]["threshold"] == 0.9
    assert all("wall_s" in s for n, s in written["stages"].items() if n != "errors")
    assert written["stages"]["errors"]["rows"] == 0
    # The SAE's final training figures (from the Ray Train run in demo_dir) travel into the manifest.
    trained = json.loads((demo_dir / "models" / "sae" / "config.json").read_text())["metadata"]["final"]
    assert written["sae"]["metadata"]["final"] == trained and trained["step"] == 599 and trained["nmse"] < 1
    traits = table(out, "traits").to_pylist()
    assert {t["status"] for t in traits} == {"ok"}
    t = traits[0]
    assert t["measurements"][0] and t["description"].startswith("Region 1")
    rendering = Image.open(io.BytesIO(t["renderings"][0]))
    assert rendering.format == "JPEG" and rendering.width % 2 == 0  # annotate.image_format; upscaled 2x


def test_tables_are_written_in_whole_row_groups(clean_build):
    """Every file the build writes holds its rows in row groups of ROW_GROUP_ROWS (the last shorter; the
    demo's files are smaller), not one per block: a groupby's tiny blocks made candidates/ a footer
    of 10^4 row groups at scale."""
    out, _ = clean_build
    files = [f for name in ("activations", "counts", "selected", "candidates", "traits") for f in (out / name).glob("*.parquet")]
    assert files
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_row_groups == max(1, -(-meta.num_rows // ROW_GROUP_ROWS)), (f, meta.num_row_groups, meta.num_rows)


def test_summary_counts_what_the_tables_hold(clean_build, capsys):
    out, manifest = clean_build
    summary = manifest["summary"]
    traits = table(out, "traits").column("status").to_pylist()
    assert summary["images_read"] == summary["images_indexed"] == summary["images_encoded"] == table(out, "activations").num_rows
    assert summary["latents_selected"] == table(out, "selected").num_rows > 0
    assert summary["species_with_latents"] == len(set(table(out, "selected").column("species").to_pylist()))
    assert summary["candidates"] == table(out, "candidates").num_rows
    assert summary["annotations"] == {s: traits.count(s) for s in set(traits)} and summary["errors"] == 0
    assert list(summary["stages"]) == ["index", "encode", "count", "select", "candidates", "annotate"]
    assert all(s["wall_s"] >= 0 and not s["resumed"] for s in summary["stages"].values())
    text = format_summary(summary)
    n = summary["images_read"]
    assert f"images: {n} read, {n} encoded, 0 rejected" in text and f"annotations: ok {len(traits)}" in text
    assert f"  encode      {n:>10}" in text


def test_planted_parts_are_found(clean_build, demo_dir):
    out, _ = clean_build
    index = table(out, "activations").select(["species", "genus"]).to_pylist()
    per_genus = defaultdict(set)
    for r in index:
        if r["species"]:
            per_genus[r["genus"]].add(r["species"])
    with_congeners = {s for ss in per_genus.values() if len(ss) > 1 for s in ss}
    lone = {s for ss in per_genus.values() if len(ss) == 1 for s in ss}
    stats = {s: (st["hits"], st["zones"]) for s, st in
             best_latents(out, planted_parts(demo_dir / "data" / "ground_truth.csv")).items()}
    print("\nplanted part found by each species' best latent (its described zones on the part / zones):")
    for species, (h, n) in sorted(stats.items()):
        print(f"  {species:<28} {h}/{n}")
    assert with_congeners <= set(stats)                       # every such species got latents
    assert not (lone & set(stats))                            # the paper's rule: nothing for a lone species
    hits = sum(stats[s][0] for s in with_congeners)
    total = sum(stats[s][1] for s in with_congeners)
    # Most zones of the best latents lie on the part: at least half of each zone's boxes sit mostly
    # inside the part's box (pipeline.demo.quality), in >= 80 % of them overall.
    assert total >= 3 * len(with_congeners) and hits / total >= 0.8, stats


# --------------------------------------------------------------------------- bad input

def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_bad_inputs_are_recorded_and_good_images_processed_as_in_a_clean_run(clean_build, demo_dir, tmp_path, decode):
    """Also with preprocess.decode=gpu, where the decode tasks only check the bytes and the encode
    actors decode them (on this CPU with Pillow where a GPU has nvJPEG, then resample in torch):
    the same rejections, one of them (an image with no scan data) found by the actor, and the
    same geometry; the firings to within the grey level the resample may differ by."""
    clean_out, _ = clean_build
    data = tmp_path / "data"
    shutil.copytree(demo_dir / "data", data)
    with open(data / METADATA_RELPATH, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    template = next(r for r in rows if r["split"] == "val")
    good_jpeg = (data / image_relpath(template["split"], "", template["processid"])).read_bytes()
    specimen = Image.open(io.BytesIO(good_jpeg))
    rgba = specimen.convert("RGBA")
    rgba.putalpha(200)
    files = {  # processid → (bytes or None for a missing file, expected error reason or None = converted)
        "BAD-EMPTY": (b"", "empty_file"),
        "BAD-TRUNC": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "BAD-TEXT": (b"<html>not an image</html>" * 40, "not_an_image"),
        "BAD-MISSING": (None, "missing_file"),
        "BAD-TINY": (encode(Image.new("RGB", (12, 9), (9, 9, 9)), "JPEG"), "too_small"),
        "BAD-BOMB": (encode(Image.new("1", (9000, 9000)), "PNG"), "too_many_pixels"),
        "BAD-NOSCAN": (good_jpeg[:good_jpeg.index(b"\xff\xda")] + b"\xff\xd9", "decode_failed"),
        "OK-I16": (encode(Image.fromarray((np.asarray(specimen.convert("L")).astype(np.uint16) * 257)), "PNG"), None),
        "OK-CMYK": (encode(specimen.convert("CMYK"), "JPEG"), None),
        "OK-GREY": (encode(specimen.convert("L"), "JPEG"), None),
        "OK-RGBA": (encode(rgba, "PNG"), None),
    }
    for pid, (blob, _) in files.items():
        # Unlabelled rows: encoded, but they take no part in the contrast, so the counts and
        # selection must equal the clean run's exactly.
        rows.append({**template, "processid": pid, "species": "", "genus": "", "split": "val", "chunk": ""})
        if blob is not None:
            (data / image_relpath("val", "", pid)).write_bytes(blob)
    rows.append(dict(rows[0]))  # a duplicate image_id
    with open(data / METADATA_RELPATH, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "build"
    manifest = run_build(demo_dir, data, out, "annotate.save_renderings=false", f"preprocess.decode={decode}")

    errors = {(r["image_id"], r["reason"]) for r in table(out, "errors").to_pylist()}
    expected = {(pid, reason) for pid, (_, reason) in files.items() if reason}
    expected.add((rows[0]["processid"], "duplicate_image_id"))
    assert errors == expected
    assert manifest["stages"]["errors"]["rows"] == len(expected)  # each recorded once

    dirty = {r["image_id"]: r for r in table(out, "activations").to_pylist()}
    clean = {r["image_id"]: r for r in table(clean_out, "activations").to_pylist()}
    assert set(dirty) == set(clean) | {pid for pid, (_, reason) in files.items() if reason is None}
    assert all(dirty[p]["n_firings"] > 0 and dirty[p]["orig_w"] == specimen.width for p in files if p.startswith("OK"))
    firings = ("latent", "patch", "value", "n_firings")
    both = either = 0
    for image_id, row in clean.items():
        same = {k: v for k, v in dirty[image_id].items() if k != "path"}  # the data folder moved
        if decode == "cpu":
            assert same == {k: v for k, v in row.items() if k != "path"}, image_id  # exactly as in the clean run
            continue
        assert {k: v for k, v in same.items() if k not in firings} == \
            {k: v for k, v in row.items() if k not in (*firings, "path")}, image_id
        a, b = set(zip(row["patch"], row["latent"])), set(zip(same["patch"], same["latent"]))
        both, either = both + len(a & b), either + len(a | b)
    if decode == "gpu":
        assert both / either >= 0.95, (both, either)

    def sorted_rows(out_dir, name, key):
        return sorted(table(out_dir, name).to_pylist(), key=key)
    if decode == "cpu":  # the same firings: the same counts and selection
        key = lambda r: (r["rank"], r["taxon"], r["latent"])
        assert sorted_rows(out, "counts", key) == sorted_rows(clean_out, "counts", key)
        key = lambda r: (r["species"], r["latent"])
        assert sorted_rows(out, "selected", key) == sorted_rows(clean_out, "selected", key)

    # The end-of-build summary counts the rejections by stage (one duplicate row at the index, seven images at decode).
    summary = manifest["summary"]
    assert summary["images_rejected"] == {"decode": 7, "source": 1}
    assert summary["images_read"] == summary["images_indexed"] + 1 == summary["images_encoded"] + 8
    assert "rejected (decode 7, source 1)" in format_summary(summary)


def test_an_image_size_off_the_patch_grid_is_refused_before_anything_is_written(demo_dir, tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "off-grid"
    cfg = demo_build_config(demo_dir, [f"output={out}", "preprocess.image_size=230"])
    with pytest.raises(ConfigError, match=r"preprocess.image_size: 230 is not a multiple of the patch size 14"):
        Build(cfg).run()
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"sae.checkpoint: .*/sae cannot be read as an SAE \(a folder: config.json [0-9,]+ bytes, "
                  r"model.safetensors 3,000 bytes; .*a project checkpoint is a folder of config.json \+ model.safetensors"),
    ("empty saev file", r"sae.checkpoint: .*/sae.pt is neither a project folder nor a saev file \(first line is not JSON\)"),
    ("backbone without weights", r"backbone.model: .*/dinov2-tiny has a config.json but no weights \(none of "
                                 r"model.safetensors, "),
])
def test_a_broken_checkpoint_or_backbone_is_refused_before_ray_starts(demo_dir, tmp_path, damage, message):
    """A truncated SAE (its first 3,000 bytes), an empty saev file, a backbone folder without its weights:
    refused in the driver naming the key and the path, before anything is written (they failed in the
    encode actors once Ray had started)."""
    from pipeline.config import ConfigError

    sae, backbone = tmp_path / "sae", tmp_path / "dinov2-tiny"
    sae.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(demo_dir / "models" / "sae" / name, sae / name)
    shutil.copytree(demo_dir / "models" / "dinov2-tiny", backbone)
    if damage == "truncated":
        weights = sae / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])
    elif damage == "empty saev file":
        (sae := tmp_path / "sae.pt").write_bytes(b"")
    else:
        (backbone / "model.safetensors").unlink()
    out = tmp_path / "out"
    cfg = demo_build_config(demo_dir, [f"output={out}", f"sae.checkpoint={sae}", f"backbone.model={backbone}"])
    with pytest.raises(ConfigError, match=message):
        Build(cfg).run()
    assert not out.exists()


def test_a_dinov2_with_registers_builds_end_to_end(demo_dir, tmp_path):
    from pipeline.demo.tiny_models import make_tiny_dinov2

    backbone = make_tiny_dinov2(tmp_path / "dinov2-reg", registers=4)  # same width as the demo SAE's d
    out = tmp_path / "build"
    manifest = Build(demo_build_config(demo_dir, [f"output={out}", f"backbone.model={backbone}", "encoder.num_gpus=1",
                                                  "report=false"])).run()
    activations = pq.read_table(out / "activations", columns=["patch", "patch_px"]).to_pylist()
    assert manifest["status"] == "succeeded" and manifest["summary"]["images_encoded"] == len(activations) > 0
    assert {a["patch_px"] for a in activations} == {14} and max(max(a["patch"]) for a in activations) < 256


def test_a_small_build_runs_its_table_stages_in_the_driver_with_the_rows_of_the_ray_path(clean_build, tmp_path):
    """The demo is small (ray.small_build_images): count, select, candidates and the templated annotate
    ran in the driver. The same build with ray.small_build_images=0 runs them on Ray Data (shuffles,
    actor pools) from the same activations/, and every table is the same."""
    from tests.tables import assert_same_build

    out, manifest = clean_build
    assert {n: manifest["stages"][n]["runs_on"] for n in ("encode", "count", "select", "candidates", "annotate")} == {
        "encode": "ray", "count": "driver", "select": "driver", "candidates": "driver", "annotate": "driver"}
    on_ray = tmp_path / "on_ray"
    shutil.copytree(out, on_ray, ignore=shutil.ignore_patterns(
        "counts", "selected", "candidates", "traits", "report", "logs", "manifest.json", "count.json", "select.json",
        "candidates.json", "annotate.json"))
    cfg = json.loads((out / "_build" / "config.json").read_text())
    cfg["output"], cfg["ray"]["small_build_images"] = str(on_ray), 0
    (on_ray / "_build" / "config.json").write_text(json.dumps(cfg))
    again = Build(BuildConfig.model_validate(cfg)).run()
    assert {n: again["stages"][n]["runs_on"] for n in ("count", "select", "candidates", "annotate")} == {
        "count": "ray", "select": "ray", "candidates": "ray", "annotate": "ray"}
    assert_same_build(out, on_ray)
