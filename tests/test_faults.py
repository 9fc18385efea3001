"""Faults mid-build: each faulty run must finish with the same outputs as a clean one (the
session's demo_build), table by table after sorting (tests/tables.py).

- an encoder actor that dies mid-batch (the build's fault switch encoder.fail_once_after_batches),
  on the session Ray: Ray Data restarts the actor and retries the batch;
- a worker node removed mid-build, on a ray.cluster_utils.Cluster of its own in a subprocess
  (tests/fault_cluster_build.py): the session Ray of this process cannot host a second cluster.

The third fault, annotator replicas killed mid-build, needs the Serve app of tests/test_serve_app.py
and is tested there."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.common import gcs_actors
from tests.tables import assert_same_build

REPO = Path(__file__).resolve().parents[1]


def test_assert_same_build_sees_what_differs(demo_build, tmp_path):
    """The comparison the fault tests rest on: blind to file layout, row order and latency_s; not
    to a lost, duplicated or changed row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tests.tables import SORT_KEYS

    clean_out, _ = demo_build
    copy = tmp_path / "copy"
    for name in SORT_KEYS:
        if (clean_out / name).exists():
            shutil.copytree(clean_out / name, copy / name)

    def rewrite(name, change):  # the whole table as one file, changed
        table = pa.concat_tables([pq.read_table(p) for p in sorted((copy / name).rglob("*.parquet"))])
        shutil.rmtree(copy / name)
        (copy / name).mkdir()
        pq.write_table(change(table), copy / name / "one.parquet")

    rewrite("activations", lambda t: t.take(pa.array(range(t.num_rows - 1, -1, -1))))  # reversed, one file
    rewrite("traits", lambda t: t.set_column(t.schema.get_field_index("latency_s"), "latency_s",
                                             pc.add(t["latency_s"], 1.0)))
    assert_same_build(clean_out, copy)
    for name, change, says in [
        ("activations", lambda t: t.slice(1), "104 rows in a, 103 in b"),
        ("counts", lambda t: pa.concat_tables([t, t.slice(0, 1)]), "duplicate keys a 0, b 1"),
        ("traits", lambda t: t.set_column(t.schema.get_field_index("description"), "description",
                                          pa.array(["x"] * t.num_rows)), "differs in ['description']"),
    ]:
        saved = tmp_path / "saved"
        shutil.copytree(copy / name, saved)
        rewrite(name, change)
        with pytest.raises(AssertionError, match=re.escape(says)):
            assert_same_build(clean_out, copy)
        shutil.rmtree(copy / name)
        shutil.move(saved, copy / name)
    assert_same_build(clean_out, copy)


def test_encoder_actor_dies_mid_batch(ray_local, demo_dir, demo_build, tmp_path):
    """The first encoder actor to finish its 2nd batch exits (os._exit) before returning it; Ray
    Data restarts the actor (max_restarts=-1) and retries the lost batch (max_task_retries=-1)."""
    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    clean_out, clean_manifest = demo_build
    out = tmp_path / "build"
    before = {a["actor_id"] for a in gcs_actors()}
    started = time.monotonic()
    manifest = Build(demo_build_config(demo_dir, [
        f"output={out}", "encoder.num_gpus=1", "encoder.num_cpus=0.25", "encoder.batch_size=8",
        "encoder.fail_once_after_batches=2"])).run()
    wall = time.monotonic() - started

    assert (out / "_build" / "faults" / "encoder").exists()   # the switch fired
    # ... and really killed the actor: the encoder pool's actor (the build's only GPU user) was
    # restarted by Ray. Without the fault its num_restarts stays 0.
    new = [a for a in gcs_actors() if a["actor_id"] not in before]
    encoders = [a for a in new if a["required_resources"].get("GPU", 0) > 0]
    assert encoders and all("EncodeActor" in a["repr_name"] for a in encoders), new
    restarts = sum(a["num_restarts"] for a in encoders)
    assert restarts >= 1, encoders
    print(f"\n[faults] encoder actor fault: {len(encoders)} encoder actor(s), {restarts} restart(s); "
          f"build {wall:.1f} s (clean {clean_manifest['wall_s']:.1f} s; encode "
          f"{manifest['stages']['encode']['wall_s']:.1f} s vs {clean_manifest['stages']['encode']['wall_s']:.1f} s)")

    assert manifest["status"] == "succeeded" and manifest["stages"]["errors"]["rows"] == 0
    assert manifest["stages"]["encode"]["rows"] == clean_manifest["stages"]["encode"]["rows"]
    assert_same_build(clean_out, out)


CLUSTER_TIMEOUT_S = 420  # ~1.5 min on an idle 2-core machine; 2+ min seen with other Ray clusters running


def test_worker_node_removed_mid_build(demo_dir, demo_build, load_factor, tmp_path):
    """A ray.cluster_utils.Cluster (head without GPU + two 1-GPU workers) in a subprocess runs the
    demo build (encoder.max_actors=2, encoder.batch_size=4: 7 encode shards of 4 batches; each
    batch slowed by 0.3 s, as on a real backbone, so that the encode stage lasts long enough to be
    interrupted); once the first activations/ file is written and the encode stage is not finished,
    the worker node hosting an encoder actor is killed (no drain). Ray restarts
    the lost actor on the node left (max_restarts=-1), retries its batches, and the build finishes
    with the clean build's outputs. With --new-node on-stall the script would add a fresh GPU node
    (as an autoscaler would) if the encode stage made no progress for 30 s after the removal; in
    our runs it never had to, and the test reports which happened."""
    from tests.ray_cluster_procs import alive, marked_processes

    clean_out, _ = demo_build
    timeout_s = CLUSTER_TIMEOUT_S * load_factor
    out, result_file, log = tmp_path / "build", tmp_path / "result.json", tmp_path / "cluster.log"
    # Short (Unix socket paths under it stay below ~107 bytes) and this run's own: the cluster's
    # session and its address file live there, and its processes are found by it.
    ray_tmp = tempfile.mkdtemp(prefix="rayf", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [sys.executable, "-m", "tests.fault_cluster_build", "--demo-dir", str(demo_dir), "--output", str(out),
           "--result", str(result_file), "--new-node", "on-stall", "--timeout-s", str(timeout_s - 60)]
    started = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: the script and what it started
            proc.wait(timeout=30)
        # Ray workers are not all in the script's process group: end whatever of this cluster is
        # left, found by its temp dir (in every one of its processes' command line or environment).
        stray = alive(marked_processes([ray_tmp]))
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            failed = bool(json.loads(result_file.read_text()).get("error"))
        except (OSError, ValueError):
            failed = True
        logs = Path(ray_tmp, "ray", "session_latest", "logs")
        if failed and logs.is_dir():  # kept for a look at what went wrong
            shutil.copytree(logs, tmp_path / "ray-logs", ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))
            print(f"\n[faults] the cluster's Ray logs: {tmp_path / 'ray-logs'}")
        shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.monotonic() - started
    tail = log.read_text(errors="replace")[-6000:]
    assert proc.returncode is not None and result_file.exists(), f"no result after {wall:.0f} s; log:\n{tail}"
    result = json.loads(result_file.read_text())
    assert not result.get("error"), (f"{result['error']} (bound {CLUSTER_TIMEOUT_S} s × {load_factor:.1f}, how much "
                                     f"slower this run's clean demo build was than on an idle machine)\nlog:\n{tail}")
    assert not stray, f"the script left processes of its cluster behind: {stray}"

    removed = result["removed"]
    events = {e["event"]: e for e in result["events"]}
    print(f"\n[faults] node {removed['node_id'][:8]} removed {removed['t_after_build_start_s']:.1f} s into the build, "
          f"{removed['activations_files']} of {result['activations_files_final']} activations/ files written; "
          f"lost actor back after {result.get('victim_actor_back_s')} s, next file after "
          f"{result.get('first_file_after_removal_s')} s; new node: {result['new_node'] or 'not needed'}; "
          f"encode done {result['encode_done_s']:.1f} s, build {result['build_s']:.1f} s, script {wall:.0f} s")
    # Mid-encode: some shards written, more written after the node was gone.
    assert 1 <= removed["activations_files"] < result["activations_files_final"] and not removed["encode_done"]
    assert "node removed" in events and removed["victim_actors"]
    # The lost encoder actor came back on a node that is still there (restarted by Ray), or the
    # pool replaced it with a new one.
    after = {a["actor_id"]: a for a in result["encoder_actors_after"]}
    before = {a["actor_id"] for a in removed["encoder_actors_before"]}
    restarted = [a for a in removed["victim_actors"] if after[a]["num_restarts"] >= 1 and after[a]["node_id"] != removed["node_id"]]
    replaced = [a for a in after if a not in before]
    assert restarted or replaced, result["encoder_actors_after"]

    assert result["status"] == "succeeded" and result["manifest_summary"]["errors"] == 0
    assert_same_build(clean_out, out)
