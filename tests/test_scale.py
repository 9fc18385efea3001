"""The scale benchmark's own path at a small N (benchmarks/bench_scale.py runs it at 25,000 and
100,000 images): synthetic firings written as the encode stage writes them, and the build resumed
from "encode done" through count → select → candidates → annotate (kind none) → report."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.graph import Build
from pipeline.config import BuildConfig, validate
from pipeline.contract import ACTIVATIONS_SCHEMA, STAGE, STATE

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_firings_build_from_encode_done(ray_local, tmp_path):
    bench = bench_module()
    sae = bench.random_sae(tmp_path / "sae")
    out = tmp_path / "build"
    generated = bench.prepare(out, n_images=300, firings=200, sae=sae)
    files = sorted((out / STAGE["encode"].output).glob("*.parquet"))
    assert len(files) == generated["files"] == 1 and pq.read_schema(files[0]).equals(ACTIVATIONS_SCHEMA)
    activations = pq.read_table(files[0])
    assert activations.num_rows == 300 and pc.max(pc.list_flatten(activations["patch"])).as_py() <= 255
    assert pc.max(pc.list_flatten(activations["latent"])).as_py() < 24_576
    config = json.loads((out / STATE / "config.json").read_text())
    config["ray"] = {"num_cpus": None}  # the session's Ray
    build = Build(validate(BuildConfig, config))
    manifest = build.run()
    assert manifest["stages"]["index"]["resumed"] and manifest["stages"]["encode"]["resumed"]
    # Every firing of a labelled image is counted once under its species (counting.unit patches).
    counts = pq.read_table(out / "counts").filter(pc.equal(pc.field("rank"), "species"))
    labelled = activations.filter(pc.is_valid(activations["species"]))
    assert pc.sum(counts["count"]).as_py() == int(np.sum(labelled["n_firings"].to_numpy()))
    assert manifest["summary"]["latents_selected"] > 0 and sum(manifest["summary"]["annotations"].values()) > 0
    build.write_report()
    assert (out / "report" / "index.html").exists()
