"""Sources the big organismal image sets come in: WebDataset tar shards (read shard by shard in Ray
tasks, members by their offsets) and a Hugging Face dataset's Parquet files (the `datasets`
library's own Image column). Bad members are rows in errors/; the images, given as a WebDataset,
build the same tables as the demo's own BIOSCAN layout."""

import io
import json
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.graph import Build
from pipeline.config import ConfigError, SourceConfig
from pipeline.contract import STAGE
from pipeline.demo.run import demo_build_config
from pipeline.sources import ImageReader, build_index
from tests.tables import assert_same_build, sorted_rows

# Where the pixels came from differs by source; everything computed from them must not.
WHERE = ("path", "source_file", "source_row", "split")


def jpeg(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], cut_at: int | None = None) -> Path:
    """A tar of samples (key, {extension: bytes}); ``cut_at``: keep only that many bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut_at] if cut_at else data)
    return path


def taxonomy(species=None, genus=None, family=None) -> bytes:
    return json.dumps({"species": species, "genus": genus, "family": family}).encode()


def test_shards_are_indexed_member_by_member_and_bad_samples_are_recorded(tmp_path):
    long_key = "deep/" * 30 + "specimen-1"  # a name over 100 characters: a pax header before the member
    write_shard(tmp_path / "a.tar", [
        ("s1", {"jpg": jpeg(), "json": taxonomy("Aus bus", "Aus", "Aidae")}),
        (long_key, {"png": jpeg((0, 0, 200)), "json": taxonomy("Cus dus")}),           # genus from the binomial
        ("no-tax", {"jpg": jpeg()}),
        ("no-image", {"json": taxonomy("Aus bus")}),
        ("bad-json", {"jpg": jpeg(), "json": b"{nope"}),
    ])
    write_shard(tmp_path / "b.tar", [("t1", {"webp": jpeg(), "sci.txt": b" Eus fus \n"}),
                                     ("t2", {"jpg": jpeg((1, 2, 3)), "jpeg": jpeg(), "json": taxonomy(None, "Gus")})])
    big = jpeg(size=(200, 200))
    write_shard(tmp_path / "c.tar", [("cut-1", {"jpg": big, "json": taxonomy("Aus bus")})], cut_at=512 + len(big) // 2)
    cfg = SourceConfig(format="webdataset", root=str(tmp_path / "*.tar"), taxonomy_text_members={"species": "sci.txt"})
    index, rejected = build_index(cfg)
    rows = {r["image_id"]: r for r in index.to_pylist()}
    assert set(rows) == {"s1", long_key, "t1", "t2"}
    assert (rows["s1"]["species"], rows["s1"]["genus"], rows["s1"]["family"]) == ("Aus bus", "Aus", "Aidae")
    assert (rows[long_key]["species"], rows[long_key]["genus"]) == ("Cus dus", "Cus")
    assert (rows["t1"]["species"], rows["t1"]["genus"]) == ("Eus fus", "Eus")
    assert (rows["t2"]["species"], rows["t2"]["genus"]) == (None, "Gus")
    assert {r.image_id: r.reason for r in rejected} == {
        "no-tax": "missing_taxonomy_member", "no-image": "missing_image_member", "bad-json": "bad_taxonomy_member",
        "cut-1": "truncated_shard"}
    assert all(r.stage == "source" for r in rejected)
    reader = ImageReader(cfg)
    for row in index.to_pylist():  # each image member read back by its offset, exactly
        data = reader.read(row["path"], row["source_file"], row["source_row"])
        assert Image.open(io.BytesIO(data)).size in ((40, 30),)
    assert reader.read(None, rows["t2"]["source_file"], rows["t2"]["source_row"]) == jpeg((1, 2, 3))  # jpg before jpeg


def test_compressed_or_missing_shards_are_refused_naming_the_key(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError, match="source.root: .*x.tar.gz is not a plain .tar shard"):
        build_index(SourceConfig(format="webdataset", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="source.root: no WebDataset shards"):
        build_index(SourceConfig(format="webdataset", root=str(tmp_path / "none-*.tar")))


def test_a_parquet_file_written_by_the_datasets_library_is_a_source(tmp_path):
    import datasets

    images = [Image.new("RGB", (40, 30), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    ds = datasets.Dataset.from_dict(
        {"image": images, "bioscan_process_id": ["p1", "p2", "p3"], "scientific_name": ["Aus bus", "Aus cus", None],
         "genus_name": ["Aus", "Aus", "Bus"]},
        features=datasets.Features({"image": datasets.Image(), "bioscan_process_id": datasets.Value("string"),
                                    "scientific_name": datasets.Value("string"), "genus_name": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "train-00000.parquet"))
    cfg = SourceConfig(format="parquet", root=str(tmp_path), bytes_column="image", path_column=None,
                       id_column="bioscan_process_id", species_column="scientific_name", genus_column="genus_name")
    index, rejected = build_index(cfg)
    assert not rejected
    assert index.column("image_id").to_pylist() == ["p1", "p2", "p3"]
    assert index.column("species").to_pylist() == ["Aus bus", "Aus cus", None]
    reader = ImageReader(cfg)
    for row, original in zip(index.to_pylist(), images):
        img = Image.open(io.BytesIO(reader.read(row["path"], row["source_file"], row["source_row"]))).convert("RGB")
        assert img.getpixel((5, 5)) == original.getpixel((5, 5))


@pytest.fixture(scope="module")
def demo_as_webdataset(demo_build, tmp_path_factory):
    """The demo's images and taxonomy as 4 WebDataset shards (keys = the BIOSCAN process ids), plus
    bad samples of every kind in a fifth, and a sixth shard cut off mid-member."""
    clean, _ = demo_build
    index = pq.read_table(clean / STAGE["index"].output).to_pylist()
    root = tmp_path_factory.mktemp("wds")
    for k in range(4):
        write_shard(root / f"demo-{k:05d}.tar", [
            (r["image_id"], {"jpg": Path(r["path"]).read_bytes(), "json": taxonomy(r["species"], r["genus"], r["family"])})
            for r in index[k::4]])
    write_shard(root / "demo-00004.tar", [("BAD-CORRUPT", {"jpg": b"\xff\xd8 not really", "json": taxonomy("Aus bus")}),
                                          ("BAD-NOTAX", {"jpg": Path(index[0]["path"]).read_bytes()})])
    first = Path(index[0]["path"]).read_bytes()
    write_shard(root / "demo-00005.tar", [("BAD-CUT", {"jpg": first, "json": taxonomy("Aus bus")})],
                cut_at=512 + len(first) // 2)  # mid-image
    return root, len(index)


def test_a_webdataset_builds_the_same_tables_as_the_same_images_in_bioscan_layout(ray_local, demo_dir, demo_build,
                                                                                   demo_as_webdataset, tmp_path):
    clean, clean_manifest = demo_build
    root, n = demo_as_webdataset
    out = tmp_path / "build"
    started = time.perf_counter()
    manifest = Build(demo_build_config(demo_dir, [f"output={out}", "source.format=webdataset", f"source.root={root}"])).run()
    wall = time.perf_counter() - started
    assert manifest["summary"]["images_encoded"] == n
    assert_same_build(clean, out, ignore={t: WHERE for t in ("activations", "candidates", "traits")},
                      tables=["activations", "counts", "selected", "candidates", "traits"])
    errors = {(r["stage"], r["image_id"], r["reason"]) for r in sorted_rows(out, "errors")}
    assert errors == {("decode", "BAD-CORRUPT", "not_an_image"), ("source", "BAD-NOTAX", "missing_taxonomy_member"),
                      ("source", "BAD-CUT", "truncated_shard")}
    stages = {k: manifest["stages"][k]["wall_s"] for k in ("index", "encode")}
    print(f"webdataset build: {n} images, index {stages['index']} s, encode {stages['encode']} s "
          f"(bioscan layout: index {clean_manifest['stages']['index']['wall_s']} s, "
          f"encode {clean_manifest['stages']['encode']['wall_s']} s); whole build {wall:.1f} s")
