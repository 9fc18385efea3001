"""The one reader of a finished build (pipeline.finished): what it refuses, naming the folder, at
every door that opens a build (report, export, review, the endpoint's catalogue); tables read by
name, file by file, in batches, by columns and rows; the resolved config; and that reading never
writes into the build. The demo build: every contract table reads, and the build's own report
(written after the manifest) passed the status check."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fastapi import HTTPException

from pipeline.config import BuildConfig, ConfigError
from pipeline.contract import CANDIDATES_SCHEMA, TABLES
from pipeline.demo.run import demo_build_config
from pipeline.endpoint import BuildCatalog
from pipeline.finished import FinishedBuild, NotFinished


def manifest(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(fields))
    return folder


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def small_build(tmp_path) -> Path:
    """A finished build of two tables: selected/ in two files (the second without a column), and counts/ empty."""
    out = manifest(tmp_path / "build", status="succeeded", config={"output": "x"}, stages={"select": {"rows": 5}})
    (out / "selected").mkdir()
    rows = [{"species": f"S{k}", "latent": k, "score": k / 10} for k in range(5)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), out / "selected" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]).drop_columns(["score"]), out / "selected" / "part-1.parquet")
    (out / "counts").mkdir()
    return out


def test_a_folder_without_a_finished_build_is_refused_naming_it(tmp_path):
    with pytest.raises(NotFinished, match=f"build: {tmp_path / 'none'} is not a finished sae-traits build "
                                          r"\(no manifest.json"):
        FinishedBuild.open(str(tmp_path / "none"))
    running = manifest(tmp_path / "running", status="running")
    with pytest.raises(NotFinished, match=f"build: {running}/manifest.json does not record a finished build "
                                          r"\(status 'running'\)"):
        FinishedBuild.open(str(running))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "manifest.json").write_text("{not json")
    with pytest.raises(NotFinished, match="manifest.json cannot be read"):
        FinishedBuild.open(str(garbled))
    assert issubclass(NotFinished, ConfigError)  # the CLIs print it as a config error (exit status 2)


def test_every_door_refuses_an_unfinished_build(tmp_path, capsys):
    """The report, the export, a review's sample and the endpoint's catalogue open builds the same way."""
    from pipeline.export import main as export_main
    from pipeline.report import main as report_main
    from pipeline.review.__main__ import main as review_main

    running = str(manifest(tmp_path / "builds" / "running", status="running"))
    for main, args in ((report_main, ["--build", running]),
                       (export_main, ["--build", running, "--format", "hf", "--out", str(tmp_path / "hf")]),
                       (review_main, ["sample", "--build", running, "--out", str(tmp_path / "review")])):
        capsys.readouterr()
        assert main(args) == 2
        assert f"build: {running}/manifest.json does not record a finished build" in capsys.readouterr().err
    with pytest.raises(HTTPException) as err:
        BuildCatalog(str(tmp_path / "builds"), None).selected(running, "S0")
    assert err.value.status_code == 400 and "not a finished build" in err.value.detail
    assert not (tmp_path / "hf").exists() and not (tmp_path / "review").exists()
    assert sorted(p.name for p in Path(running).iterdir()) == ["manifest.json"]  # nothing written into it


def test_tables_read_by_name_columns_and_rows(small_build):
    build = FinishedBuild.open(str(small_build))
    assert build.manifest["stages"] == {"select": {"rows": 5}} and build.path("x", "y").endswith("/build/x/y")
    assert build.has("selected") and not build.has("traits") and build.num_rows("selected") == 5
    assert build.columns("selected") == ["species", "latent", "score"] and build.columns("traits") == []

    whole = build.read("selected")
    assert whole.column("latent").to_pylist() == [0, 1, 2, 3, 4]
    assert whole.column("score").to_pylist() == [0.0, 0.1, 0.2, None, None]  # a file without it: nulls
    assert build.read("selected", ["latent"]).column_names == ["latent"]
    assert build.read("selected", ["species", "latent"], lambda t: pc.greater(t["latent"], 2)).to_pylist() == \
        [{"species": "S3", "latent": 3}, {"species": "S4", "latent": 4}]
    assert [t.column_names for t in build.tables("selected", ["latent", "score"])] == [["latent", "score"], ["latent"]]
    assert [t.num_rows for t in build.batches("selected", ["latent"], batch_rows=2)] == [2, 1, 2]

    # absent or empty: the contract's empty table, projected to the columns asked for
    assert build.read("candidates", ["species", "latent", "nope"]).schema == \
        pa.schema([CANDIDATES_SCHEMA.field("species"), CANDIDATES_SCHEMA.field("latent")])
    assert build.read("selected", ["latent"], lambda t: pc.less(t["latent"], 0)).num_rows == 0
    assert build.read("counts").schema == TABLES["counts"] and build.read("traits").num_rows == 0
    assert build.read("not-a-table").num_columns == 0 and list(build.tables("traits")) == []


def test_the_resolved_config(small_build, tmp_path):
    build = FinishedBuild.open(str(small_build))
    assert build.resolved == {"output": "x"}
    with pytest.raises(ConfigError, match=f"build: the config in {small_build}/manifest.json is not one this "
                                          "version reads"):
        build.config
    bare = FinishedBuild.open(str(manifest(tmp_path / "bare", status="succeeded")))
    with pytest.raises(NotFinished, match=r"does not record a finished build \(no config\)"):
        bare.resolved
    cfg = demo_build_config(tmp_path / "demo")
    good = FinishedBuild.open(str(manifest(tmp_path / "good", status="succeeded", config=cfg.model_dump(mode="json"))))
    assert isinstance(good.config, BuildConfig) and good.config == cfg and good.config is good.config


def test_reading_never_writes_into_the_build(small_build):
    before = files_of(small_build)
    build = FinishedBuild.open(str(small_build))
    build.read("selected"), build.columns("selected"), list(build.batches("selected")), build.read("traits")
    assert files_of(small_build) == before


def test_the_demo_build_reads_whole_and_its_report_passed_the_check(demo_build):
    """build.py writes manifest.json, then the report: the report's status check sees a finished build."""
    out, written = demo_build
    build = FinishedBuild.open(str(out))
    assert build.manifest == written and build.resolved == written["config"]
    assert build.config.output == str(out) and build.config.report
    for name, schema in TABLES.items():
        table = build.read(name)
        assert table.num_rows == build.num_rows(name) == sum(t.num_rows for t in build.tables(name)), name
        assert set(schema.names) <= set(table.column_names), name
    assert (out / "report" / "index.html").is_file()
