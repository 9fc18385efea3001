import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, SourceConfig
from pipeline.sources import ImageReader, build_index
from pipeline.demo.specimens import BIOSCAN_COLUMNS, generate_demo_dataset


@pytest.fixture(scope="module")
def bioscan_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bioscan")
    generate_demo_dataset(root, images_per_species=4, n_unlabelled=3, seed=1)
    return root


def jpeg(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def test_bioscan_index_paths_follow_the_split_and_chunk_layout(bioscan_root):
    index, rejected = build_index(SourceConfig(format="bioscan", root=str(bioscan_root)))
    assert not rejected
    rows = index.to_pylist()
    for row in rows:
        assert row["path"].endswith(f"/{row['image_id']}.jpg")
        parts = row["path"].split("/cropped_256/")[1].split("/")
        assert parts[0] == row["split"]
        # chunk folders only for train/pretrain in the demo data; val/test sit directly in the split
        assert len(parts) == (3 if row["split"] in ("train", "pretrain") else 2)
        assert ImageReader(SourceConfig(format="bioscan", root=str(bioscan_root))).read(row["path"])[:2] == b"\xff\xd8"
    unlabelled = [r for r in rows if r["split"] == "pretrain"]
    assert unlabelled and all(r["species"] is None and r["genus"] is None for r in unlabelled)
    assert all(r["genus"] is not None and r["family"] is not None for r in rows if r["species"])


def test_bioscan_splits_filter(bioscan_root):
    index, _ = build_index(SourceConfig(format="bioscan", root=str(bioscan_root), splits=["val", "test"]))
    assert set(index["split"].to_pylist()) == {"val", "test"}


def test_bioscan_uses_the_real_genus_column_not_the_first_word(tmp_path):
    meta = tmp_path / "bioscan5m/metadata/csv"
    meta.mkdir(parents=True)
    row = {c: "" for c in BIOSCAN_COLUMNS} | {"processid": "P1", "genus": "Realgenus", "species": "Other epithet",
                                              "family": "Fam", "split": "test"}
    (meta / "BIOSCAN_5M_Insect_Dataset_metadata.csv").write_text(
        ",".join(BIOSCAN_COLUMNS) + "\n" + ",".join(row[c] for c in BIOSCAN_COLUMNS) + "\n")
    index, _ = build_index(SourceConfig(format="bioscan", root=str(tmp_path)))
    assert index.to_pylist()[0]["genus"] == "Realgenus"


def test_missing_bioscan_metadata_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="source.root"):
        build_index(SourceConfig(format="bioscan", root=str(tmp_path)))


def test_imagefolder(tmp_path):
    for label, name in [("Apis_mellifera", "a.jpg"), ("Apis_mellifera", "b.png"), ("Bombus_terrestris", "sub/c.jpg")]:
        path = tmp_path / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg())
    (tmp_path / "README.txt").write_text("not an image")
    index, _ = build_index(SourceConfig(format="imagefolder", root=str(tmp_path)))
    rows = {r["image_id"]: r for r in index.to_pylist()}
    assert set(rows) == {"Apis_mellifera/a.jpg", "Apis_mellifera/b.png", "Bombus_terrestris/sub/c.jpg"}
    assert rows["Bombus_terrestris/sub/c.jpg"]["species"] == "Bombus terrestris"
    assert rows["Bombus_terrestris/sub/c.jpg"]["genus"] == "Bombus"


def test_parquet_manifest_with_paths_and_with_bytes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(jpeg((1, 2, 3)))
    pq.write_table(pa.table({"image_id": ["x"], "path": ["img/x.jpg"], "species": ["A b"], "genus": ["A"]}),
                   tmp_path / "paths.parquet")
    index, _ = build_index(SourceConfig(format="parquet", root=str(tmp_path / "paths.parquet")))
    row = index.to_pylist()[0]
    assert row["path"] == str(tmp_path / "img" / "x.jpg") and row["family"] is None

    blobs = [jpeg((i, 0, 0)) for i in range(7)]
    pq.write_table(pa.table({"image_id": [f"i{i}" for i in range(7)], "image": blobs,
                             "species": ["A b"] * 7, "genus": ["A"] * 7}),
                   tmp_path / "bytes.parquet", row_group_size=3)
    cfg = SourceConfig(format="parquet", root=str(tmp_path / "bytes.parquet"), bytes_column="image", path_column=None)
    index, _ = build_index(cfg)
    reader = ImageReader(cfg)
    got = [reader.read(r["path"], r["source_file"], r["source_row"]) for r in index.to_pylist()]
    assert got == blobs  # every row's own bytes, across row groups


def test_parquet_manifest_unknown_column_is_named(tmp_path):
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match="source.id_column"):
        build_index(SourceConfig(format="parquet", root=str(tmp_path / "m.parquet")))


def test_duplicate_image_ids_are_kept_once_and_recorded(tmp_path):
    pq.write_table(pa.table({"image_id": ["a", "b", "a", "c", "b"], "path": ["1", "2", "3", "4", "5"]}),
                   tmp_path / "m.parquet")
    index, rejected = build_index(SourceConfig(format="parquet", root=str(tmp_path / "m.parquet")))
    assert index["image_id"].to_pylist() == ["a", "b", "c"]
    assert [p.rsplit("/", 1)[1] for p in index["path"].to_pylist()] == ["1", "2", "4"]  # first occurrence wins
    assert sorted(r.image_id for r in rejected) == ["a", "b"]
    assert {r.reason for r in rejected} == {"duplicate_image_id"}
