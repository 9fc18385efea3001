#!/usr/bin/env python
"""The build on a simulated multi-node cluster vs one node, and the cost of resume (not a test).

    python benchmarks/bench_cluster.py [--images-per-species N] [--out DIR] [--repeats R] [--set KEY=VALUE]

Prints two results (final lines ``RESULT cluster: ...`` and ``RESULT resume: ...``) and writes
them, with every figure, to DIR/bench_cluster.json:

- cluster  The demo build on a ray.cluster_utils.Cluster of one node (head: 2 CPUs, 2 fake GPUs)
           vs three nodes (a head that takes no work, CPU 0 as in cluster.yaml, plus two workers
           of 1 CPU + 1 fake GPU each): the same total resources, data, SAE and build config.
           Per run: build wall, encode-stage wall, images/s over the encode stage and over the
           whole build, and how the work spread over the nodes. Ratio: images/s three / one.
           On one machine the simulated nodes share the same cores, so the ratio shows the cost
           of distribution (more raylets, cross-node object transfers), never a speed-up.
- resume   On the one-node cluster after its build: a rerun over the finished build, and a resume
           of a build killed at the start of annotate (_build/stages/annotate.json, traits/ and
           manifest.json removed), each as a fraction of the full build's wall.

Choices (printed again beside the tables):
- Build config: demo_build_config + encoder.num_gpus=1, encoder.num_cpus=0.25, encoder.max_actors=2,
  report=false, ray.address=<the cluster> (the build connects itself, as `--set ray.address=...`
  would), encoder.batch_size=8 (--encoder-batch-size) so the images make several shards (a shard
  is SHARD_BATCHES=4 batches: one encode task and file) for the two encoders to share; a fresh
  output per run; --set adds overrides to both layouts. Every node gets a 256 MiB object store.
- Timing: each build's wall is Build(cfg).run() in this process, connecting to the cluster
  included; its stdout/stderr go to DIR/logs (so no progress bars). Cluster start-up is timed
  apart. The rerun over a finished build runs with the driver disconnected (the build returns
  before touching Ray, as the CLI would); the annotate resume connects as a new Ray job (a killed
  driver's successor: new worker processes, models loaded again). --repeats R alternates the
  layouts R times and the ratio takes each layout's best. Beside each build: the CPU seconds of
  this process tree, and the share of the machine other processes used meanwhile (a busy machine
  makes every figure noisy).
- Spread: actors from the GCS actor table (the node each ran on), tasks from the GCS task events
  (finished ones, by node, with their RUNNING -> FINISHED seconds), both filtered to the build's
  job: what ray.util.state.list_actors/list_tasks report, read without the dashboard (not
  installed here: no aiohttp). Images per node: the build's decode_task / EncodeActor /
  AnnotateActor are wrapped (same names, same work) to append (node, rows) to a file per call.
- Stuck builds: a build still running after --build-timeout-s (300) is reported with its
  unfinished tasks and each node's free resources, its cluster shut down, and no further builds
  run. (E.g. --set encoder.min_actors=2 on the three nodes: two encoders hold 0.25 CPU of each
  1-CPU worker, and a decode task, which needs 1 CPU, fits on no node.)
- Data: prepare_demo once (synthetic data, tiny DINOv2, the demo SAE trained on Ray Train in a
  local Ray of 2 CPUs, shut down before the clusters start) in DIR/demo-ipsN, reused by later runs.

All Ray processes of this script live under a fresh RAY_TMPDIR (/tmp/raybench*, removed at the
end unless --keep-ray-logs), so no other Ray on the machine can join them and they join no other;
implicit ray.init() is off (RAY_ENABLE_AUTO_CONNECT=0); each Cluster is shut down in a finally
block, and the script checks at the end that none of its Ray processes is left.
Default (12 images per species: 104 images) ~4 min on a 2-core CPU machine (~1 min of it
preparing the demo, skipped when DIR already holds it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray workers import the package from the checkout.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

# (benchmarks.common imports no Ray: main sets RAY_TMPDIR before Ray is first imported.)
from benchmarks.common import (RESULTS, cpu_busy_fraction, gcs_actors, header, machine_info,  # noqa: E402
                               print_summary, print_table, process_tree, record)

OBJECT_STORE = 256 * 2**20  # per node; the demo's blocks are a few MB
TASK_EVENTS_FLUSH_S = 3.0  # workers report task events to the GCS every second


# --------------------------------------------------------------------------- output helpers

@contextlib.contextmanager
def captured(log: Path):
    """stdout and stderr of this process (and of anything it prints through fds 1/2: Ray's logs,
    the build's stage lines) go to ``log``; stderr is then no tty, so the build shows no bars."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system, own + reaped children) summed over this process and all its
    descendants: the driver, the clusters' GCS, raylets, agents and workers."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / tick


# --------------------------------------------------------------------------- the build's stage callables, wrapped

def _record(stage: str, batch, path: str) -> None:
    import ray

    rows = batch.num_rows if hasattr(batch, "num_rows") else len(next(iter(batch.values()), []))
    line = json.dumps({"stage": stage, "node": ray.get_runtime_context().get_node_id(), "rows": int(rows)})
    with open(path, "a") as f:
        f.write(line + "\n")


def make_wrappers(rows_log: str):
    """decode_task (pipeline.execution), EncodeActor and AnnotateActor (as pipeline.build names
    them), each appending (node, rows) to ``rows_log`` after each call; same names, so Ray's task
    and actor names stay the build's."""
    from pipeline import build as b
    from pipeline import execution

    decode = execution.decode_task

    def decode_task(batch, **kwargs):
        good = decode(batch, **kwargs)
        _record("decode", good, rows_log)
        return good

    class EncodeActor(b.EncodeActor):
        def __call__(self, batch):
            out = super().__call__(batch)
            _record("encode", out, rows_log)
            return out

    class AnnotateActor(b.AnnotateActor):
        def __call__(self, batch):
            out = super().__call__(batch)
            _record("annotate", out, rows_log)
            return out

    return {"decode_task": decode_task, "EncodeActor": EncodeActor, "AnnotateActor": AnnotateActor}


@contextlib.contextmanager
def wrapped_stages(rows_log: Path):
    from pipeline import build as b
    from pipeline import execution

    homes = {"decode_task": execution, "EncodeActor": b, "AnnotateActor": b}
    originals = {k: getattr(module, k) for k, module in homes.items()}
    for k, v in make_wrappers(str(rows_log)).items():
        setattr(homes[k], k, v)
    try:
        yield
    finally:
        for k, v in originals.items():
            setattr(homes[k], k, v)


# --------------------------------------------------------------------------- where the work ran

def gcs_task_events(job_id: str) -> list[dict]:
    """The job's task attempts from the GCS task events: name, type, actor, node, whether it
    finished, and its seconds from RUNNING to FINISHED/FAILED."""
    from ray._private.state import state
    from ray.core.generated import common_pb2, gcs_pb2

    running, finished, failed = common_pb2.RUNNING, common_pb2.FINISHED, common_pb2.FAILED
    merged: dict[tuple[bytes, int], dict] = {}
    for raw in state._connect_and_get_accessor().get_task_events():
        e = gcs_pb2.TaskEvents.FromString(raw)
        if e.job_id.hex() != job_id:
            continue
        t = merged.setdefault((e.task_id, e.attempt_number), {"name": "", "type": "", "actor_id": "", "node_id": "",
                                                             "ts": {}})
        if e.HasField("task_info"):
            t["name"] = e.task_info.name or t["name"]
            t["type"] = common_pb2.TaskType.Name(e.task_info.type)
            t["actor_id"] = e.task_info.actor_id.hex() if e.task_info.actor_id else t["actor_id"]
        if e.HasField("state_updates"):
            if e.state_updates.node_id:
                t["node_id"] = e.state_updates.node_id.hex()
            t["ts"].update(dict(e.state_updates.state_ts_ns))
    out = []
    for t in merged.values():
        ts = t.pop("ts")
        end = ts.get(finished) or ts.get(failed)
        t["finished"] = finished in ts
        t["busy_s"] = (end - ts[running]) / 1e9 if end and running in ts else 0.0
        out.append(t)
    return out


def actor_kind(a: dict) -> str:
    name = f"{a['class_name']} {a['repr_name']}"
    if "EncodeActor" in name:
        return "encode"
    if "AnnotateActor" in name:
        return "annotate"
    if "FooterReader" in name:
        return "footer"  # Ray Data's Parquet reader: a pool of 0-CPU actors per read_parquet, SPREAD
    return "other"  # Ray Data's control actors (_StatsActor, _AutoscalingCoordinatorActor, ActorLocationTracker)


def task_kind(t: dict, actor_kinds: dict[str, str]) -> str:
    if t["type"] == "ACTOR_CREATION_TASK" or t["type"] == "DRIVER_TASK":
        return "skip"  # actors are counted from the actor table (a creation task carries no node)
    if t["type"] == "ACTOR_TASK":
        kind = actor_kinds.get(t["actor_id"], "other")
        # encode/annotate: count the pool's work calls (submit), not its get_location pings
        return kind if kind not in ("encode", "annotate") or t["name"].endswith(".submit") else "other"

    if "decode_task" in t["name"]:
        return "decode"
    return "other map"  # from_arrow/read, the count and candidates stages' map and shuffle tasks, writes


def work_spread(job_id: str, nodes: dict[str, str], rows_log: Path) -> dict:
    """Per node (by label): actors by kind, finished tasks and their busy seconds by kind, and the
    rows each wrapped stage produced there."""
    actors, tasks = gcs_actors(job_id), gcs_task_events(job_id)
    kinds = {a["actor_id"]: actor_kind(a) for a in actors}
    label = {nid: name for nid, name in nodes.items()}
    per: dict[str, dict] = {name: defaultdict(float) for name in nodes.values()}

    def slot(node_id: str) -> dict:
        return per.setdefault(label.get(node_id, f"unknown {node_id[:8]}"), defaultdict(float))

    for a in actors:
        slot(a["node_id"])[f"actors {actor_kind(a)}"] += 1
    by_name: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    used: set[str] = set()
    for t in tasks:
        kind = task_kind(t, kinds)
        if kind == "skip" or not t["finished"]:
            continue
        s = slot(t["node_id"])
        if kind in ("encode", "annotate") and t["actor_id"] not in used:
            used.add(t["actor_id"])
            s[f"used {kind}"] += 1  # pool actors that did work (a pool may start an actor that gets none)
        s[f"tasks {kind}"] += 1
        s[f"busy_s {kind}"] += t["busy_s"]
        key = (label.get(t["node_id"], t["node_id"][:8]), t["name"])
        by_name[key][0] += 1
        by_name[key][1] += t["busy_s"]
    if rows_log.exists():
        for line in rows_log.read_text().splitlines():
            r = json.loads(line)
            slot(r["node"])[f"rows {r['stage']}"] += r["rows"]
    unfinished = sorted(t["name"] for t in tasks if not t["finished"] and task_kind(t, kinds) != "skip")
    return {"per_node": {k: dict(v) for k, v in per.items()},
            "tasks_by_name": [{"node": n, "name": name, "finished": c, "busy_s": round(s, 3)}
                              for (n, name), (c, s) in sorted(by_name.items())],
            "actors": [{k: a[k] for k in ("class_name", "repr_name", "state", "num_restarts", "required_resources")}
                       | {"node": label.get(a["node_id"], a["node_id"][:8])} for a in actors],
            "task_attempts_seen": len(tasks), "task_attempts_not_finished": len(unfinished),
            "not_finished_names": unfinished}


# --------------------------------------------------------------------------- the runs

def build_config(demo: Path, output: Path, address: str, args):
    from pipeline.demo.run import demo_build_config

    overrides = [f"output={output}", "encoder.num_gpus=1", "encoder.num_cpus=0.25", "encoder.max_actors=2",
                 f"encoder.batch_size={args.encoder_batch_size}", "report=false", f"ray.address={address}"]
    if args.decode_batch_size:
        overrides.append(f"preprocess.batch_size={args.decode_batch_size}")
    return demo_build_config(demo, overrides + args.overrides)


def cpu_snapshot() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process tree) now."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    return busy, tree_cpu_seconds()


class BuildTimeout(RuntimeError):
    pass


def timed_build(cfg, log: Path, rows_log: Path | None = None, timeout_s: float = 300) -> tuple[float, dict]:
    """Build(cfg).run() in a thread, so a build that stops making progress (e.g. a task no node can
    place) ends this run after ``timeout_s`` instead of hanging the benchmark."""
    import threading

    from pipeline.graph import Build

    outcome: dict = {}

    def build() -> None:
        try:
            outcome["manifest"] = Build(cfg).run()
        except BaseException as exc:  # re-raised in the caller
            outcome["error"] = exc

    with captured(log), (wrapped_stages(rows_log) if rows_log else contextlib.nullcontext()):
        t = time.perf_counter()
        thread = threading.Thread(target=build, daemon=True, name="build")
        thread.start()
        thread.join(timeout_s)
        wall = time.perf_counter() - t
    if thread.is_alive():
        raise BuildTimeout(f"the build did not finish in {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return wall, outcome["manifest"]


def stuck_state(nodes: dict[str, str]) -> dict:
    """Why a build stopped: the job's task attempts not finished (by name) and each node's free resources."""
    import ray
    from ray._private.state import state

    job = ray.get_runtime_context().get_job_id()
    pending: dict[str, int] = defaultdict(int)
    for t in gcs_task_events(job):
        if not t["finished"] and t["type"] != "DRIVER_TASK":
            pending[t["name"]] += 1
    free = {nodes.get(nid, nid[:8]): {k: round(v, 2) for k, v in res.items() if k in ("CPU", "GPU")}
            for nid, res in state.available_resources_per_node().items()}
    return {"not_finished": dict(pending), "free_resources": free}


def start_cluster(layout: str):
    """one: head 2 CPU + 2 GPU. three: head CPU 0 (takes no work) + two workers of 1 CPU + 1 GPU."""
    from ray.cluster_utils import Cluster

    if layout == "one":
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "num_gpus": 2, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        nodes = {cluster.head_node.node_id: "head"}
    else:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        nodes = {cluster.head_node.node_id: "head"}
        for i in (1, 2):
            node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE)
            nodes[node.node_id] = f"worker{i}"
    cluster.wait_for_nodes()
    return cluster, nodes


LAYOUT_NAMES = {"one": "one node", "three": "three nodes"}


def run_layout(layout: str, rep: int, demo: Path, out: Path, args, with_resume: bool) -> dict:
    import ray

    name = LAYOUT_NAMES[layout]
    tag = f"{layout}-node-{rep + 1}"
    output = out / "builds" / tag
    shutil.rmtree(output, ignore_errors=True)
    rows_log, log = out / "logs" / f"{tag}.rows.jsonl", out / "logs" / f"{tag}.log"
    rows_log.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    busy = cpu_busy_fraction()
    cluster = None
    res: dict = {"layout": name, "run": rep + 1, "cpu_busy_before": round(busy, 3), "log": str(log),
                 "output": str(output)}
    try:
        t = time.perf_counter()
        with captured(log):
            cluster, nodes = start_cluster(layout)
        res["cluster_start_s"] = round(time.perf_counter() - t, 2)
        res["nodes"] = {label: nid for nid, label in nodes.items()}
        cfg = build_config(demo, output, cluster.address, args)
        machine0, ours0 = cpu_snapshot()
        try:
            wall, manifest = timed_build(cfg, log, rows_log, args.build_timeout_s)
        except BuildTimeout as exc:
            res["error"], res["stuck"] = str(exc), stuck_state(nodes)
            print(f"  {name} (run {rep + 1}): {exc}; not finished: {res['stuck']['not_finished']}; free resources "
                  f"per node: {res['stuck']['free_resources']}; log {log}", flush=True)
            return res
        machine1, ours1 = cpu_snapshot()
        encode = manifest["stages"]["encode"]
        n = manifest["summary"]["images_encoded"]
        ours = ours1 - ours0
        res.update(build_s=round(wall, 3), manifest_wall_s=manifest["wall_s"], images=n,
                   stages={k: v.get("wall_s") for k, v in manifest["stages"].items()},
                   encode_s=encode["wall_s"], encode_img_s=n / encode["wall_s"], build_img_s=n / wall,
                   cpu_s=round(ours, 1), others_cpu_share=max(0.0, (machine1 - machine0 - ours) / (wall * os.cpu_count())),
                   annotations=manifest["summary"]["annotations"],
                   latents_selected=manifest["summary"]["latents_selected"])
        job = ray.get_runtime_context().get_job_id()
        time.sleep(TASK_EVENTS_FLUSH_S)
        res["spread"] = work_spread(job, nodes, rows_log)
        print(f"  {name} (run {rep + 1}): cluster up in {res['cluster_start_s']:.1f} s; build {wall:.1f} s "
              f"(encode {encode['wall_s']:.1f} s) for {n} images; other processes used "
              f"{res['others_cpu_share']:.0%} of the CPUs meanwhile; log {log}", flush=True)
        if with_resume:
            res["resume"] = resume_runs(cfg, output, log, wall, manifest, args.build_timeout_s)
    finally:
        with captured(log):
            shutdown(cluster)
    return res


def shutdown(cluster) -> None:
    """Disconnect the driver, then end every node of the cluster (Cluster.shutdown refuses while a
    driver is connected; a stuck build's thread may still hold the connection a moment)."""
    import ray

    for attempt in range(5):
        ray.shutdown()
        if cluster is None:
            return
        try:
            cluster.shutdown()
            return
        except ValueError:
            if attempt == 4:
                raise
            time.sleep(1)


def resume_runs(cfg, output: Path, log: Path, full_s: float, full: dict, timeout_s: float) -> dict:
    import ray

    ray.shutdown()  # the first build's driver ends (its job with it)
    t_rerun, again = timed_build(cfg, log, timeout_s=timeout_s)
    assert again["wall_s"] == full["wall_s"], "the rerun did not return the finished build's manifest"
    rerun_touched_ray = ray.is_initialized()

    for p in (output / "_build" / "stages" / "annotate.json", output / "manifest.json"):
        p.unlink()
    shutil.rmtree(output / "traits")
    t_resume, resumed = timed_build(cfg, log, timeout_s=timeout_s)
    ray.shutdown()
    redone = [k for k, v in resumed["stages"].items() if k in ("index", "encode", "count", "select", "candidates",
                                                                 "annotate") and not v.get("resumed")]
    same = resumed["summary"]["annotations"] == full["summary"]["annotations"]
    print(f"  one node, rerun over the finished build {t_rerun * 1e3:.0f} ms; resume at annotate "
          f"{t_resume:.1f} s (stages redone: {', '.join(redone)})", flush=True)
    return {"full_build_s": round(full_s, 3), "rerun_finished_s": round(t_rerun, 4), "rerun_connected_to_ray": rerun_touched_ray,
            "resume_annotate_s": round(t_resume, 3), "resume_stages_redone": redone,
            "annotate_stage_s_full": full["stages"]["annotate"]["wall_s"],
            "annotate_stage_s_resumed": resumed["stages"]["annotate"]["wall_s"],
            "resume_same_annotations": same, "annotations": resumed["summary"]["annotations"],
            "rerun_fraction": t_rerun / full_s, "resume_annotate_fraction": t_resume / full_s}


def prepare(demo: Path, images_per_species: int, log: Path) -> float:
    """The demo data, tiny DINOv2 and trained SAE, once (a local Ray of 2 CPUs, shut down after)."""
    import logging

    import ray

    if (demo / "models" / "sae" / "config.json").exists() and (demo / "data").exists():
        print(f"  demo data and SAE reused from {demo}", flush=True)
        return 0.0
    from pipeline.demo.run import prepare_demo

    t = time.perf_counter()
    with captured(log):
        # address="local": a fresh Ray of our own (under our RAY_TMPDIR), never one another process started.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        try:
            prepare_demo(demo, images_per_species=images_per_species, log=print)
        finally:
            ray.shutdown()
    took = time.perf_counter() - t
    print(f"  demo data + SAE prepared in {demo} in {took:.0f} s (trained on Ray Train)", flush=True)
    return took


def leftover_processes() -> list[str]:
    """Processes of this script's Ray: descendants of this process, or any whose command line names
    our RAY_TMPDIR (a raylet or GCS reparented after its parent died)."""
    tmp = os.environ["RAY_TMPDIR"]
    me = os.getpid()
    found = {p for p in process_tree(me) if p != me}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if tmp.encode() in f.read():
                        found.add(int(entry))
            except OSError:
                continue
    out = []
    for pid in sorted(found):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid} {cmd[:120]}")
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- report

SPREAD_COLS = [("encoder actors", "actors encode"), ("... that worked", "used encode"),
               ("annotate actors", "actors annotate"), ("... that worked", "used annotate"),
               ("FooterReader actors", "actors footer"), ("other actors", "actors other"), ("decode tasks", "tasks decode"), ("decode s", "busy_s decode"),
               ("images decoded", "rows decode"), ("encode submits", "tasks encode"), ("encode s", "busy_s encode"),
               ("images encoded", "rows encode"), ("other map tasks", "tasks other map"),
               ("other map s", "busy_s other map"), ("annotate submits", "tasks annotate"),
               ("annotate s", "busy_s annotate"), ("annotations", "rows annotate")]


def best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def report(runs: dict[str, list[dict]]) -> None:
    all_runs = sorted(runs["one"] + runs["three"], key=lambda r: (r["run"], r["layout"] != "one node"))
    ok = {layout: [r for r in rs if "error" not in r] for layout, rs in runs.items()}
    header("cluster: three simulated nodes vs one node, same resources (2 CPUs, 2 fake GPUs)")
    print_table(["layout", "run", "cluster up s", "build s", "encode s", "images", "encode img/s", "build img/s",
                 "Ray+driver CPU s", "others' CPU share"],
                [[r["layout"], r["run"], r["cluster_start_s"], r["build_s"], r["encode_s"], r["images"],
                  r["encode_img_s"], r["build_img_s"], r["cpu_s"], f"{r['others_cpu_share']:.0%}"]
                 if "error" not in r else [r["layout"], r["run"], r.get("cluster_start_s", "-"), "STUCK", "-", "-", "-",
                                           "-", "-", "-"] for r in all_runs])
    for r in all_runs:
        if "error" in r:
            print(f"  {r['layout']} run {r['run']}: {r['error']}; task attempts not finished: "
                  f"{r['stuck']['not_finished']}; free resources per node: {r['stuck']['free_resources']}")
        else:
            print(f"  stage walls (s), {r['layout']} run {r['run']}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items() if v is not None))
    print("  build s = Build(cfg).run() in this process, connecting to the cluster included; encode img/s = images / "
          "encode-stage wall (encoder actors' start-up and model load included). Ray+driver CPU s: user+system "
          "seconds of this process and all its descendants (GCS, raylets, workers) over the build. others' CPU "
          "share: the rest of the machine's busy time over the build (other users' processes), as a share of "
          f"{os.cpu_count()} CPUs x the build's wall: above ~10 % the timings are noisy.")
    for layout in ("one", "three"):
        if not ok[layout]:
            continue
        r = ok[layout][0]
        per = r["spread"]["per_node"]
        print(f"\n  where the work ran, {r['layout']} run {r['run']} (finished tasks; s = their summed "
              "RUNNING->FINISHED seconds):")
        print_table(["node"] + [c for c, _ in SPREAD_COLS],
                    [[node] + [round(v.get(k, 0.0), 1) if k.startswith("busy_s") else int(v.get(k, 0))
                               for _, k in SPREAD_COLS] for node, v in per.items()])
        if r["spread"]["task_attempts_not_finished"]:
            print(f"  (task attempts seen but not finished: {', '.join(r['spread']['not_finished_names'])})")
    print("\n  actors: the GCS actor table (the node each actor ran on, dead ones included); tasks: the GCS task events; "
          "both filtered to the build's job. encode/annotate submits: the pool actors' work calls (one per block "
          "bundle handed to an actor); other map: reads, the count and candidates stages' map/shuffle tasks, "
          "writes; FooterReader: Ray Data's Parquet footer readers (0-CPU actors, a pool per read_parquet, "
          "SPREAD); other actors: Ray Data's control actors. images/annotations: rows returned on that node by the "
          "build's decode_task / EncodeActor / AnnotateActor (wrapped to record them). Per task name: the JSON.")
    print(f"  NOTE: the three simulated nodes are processes on this one machine sharing its {os.cpu_count()} cores: "
          "the ratio shows what distribution costs (more raylets, cross-node object transfers, placement), not a "
          "speed-up; real nodes would add their own cores.")
    if ok["one"] and ok["three"]:
        one_b, three_b = best(ok["one"], "build_img_s"), best(ok["three"], "build_img_s")
        one_e, three_e = best(ok["one"], "encode_img_s"), best(ok["three"], "encode_img_s")
        enc_ratio = three_e["encode_img_s"] / one_e["encode_img_s"]
        build_ratio = three_b["build_img_s"] / one_b["build_img_s"]
        n = min(len(ok["one"]), len(ok["three"]))
        record(f"RESULT cluster: images/s three nodes / one node: encode stage {enc_ratio:.3f}x, whole build "
               f"{build_ratio:.3f}x{f' (best of {n} runs each)' if n > 1 else ''}  [one machine's cores shared by "
               "all nodes: overhead/distribution, not speed-up]")
    else:
        stuck = ", ".join(f"{r['layout']} run {r['run']}" for r in all_runs if "error" in r)
        record(f"RESULT cluster: no ratio: stuck build(s) ({stuck}); see the lines above")

    res = runs["one"][0].get("resume") if runs["one"] else None
    header("resume: a rerun over a finished build, a resume at the start of annotate (one node, run 1)")
    if res is None:
        record("RESULT resume: skipped (the one-node build did not finish)")
        return
    print_table(["run", "seconds", "fraction of the full build"],
                [["full build (first run)", res["full_build_s"], "1.000"],
                 ["rerun over the finished build", res["rerun_finished_s"], f"{res['rerun_fraction']:.1e}"],
                 ["resume after a kill at annotate start", res["resume_annotate_s"], f"{res['resume_annotate_fraction']:.3f}"]])
    print(f"  resume at annotate: removed _build/stages/annotate.json, traits/ and manifest.json; stages redone: "
          f"{', '.join(res['resume_stages_redone'])}; annotate stage {res['annotate_stage_s_resumed']:.1f} s "
          f"(first run {res['annotate_stage_s_full']:.1f} s); same annotations as the first run: "
          f"{res['resume_same_annotations']}. It connects as a new Ray job (new worker processes, as a restarted "
          f"driver's would). The rerun returns before touching Ray (connected: {res['rerun_connected_to_ray']}).")
    record(f"RESULT resume: rerun of a finished build {res['rerun_fraction']:.1e} of the full build "
           f"({res['rerun_finished_s'] * 1e3:.1f} ms); resume at annotate {res['resume_annotate_fraction']:.3f} "
           f"({res['resume_annotate_s']:.1f} s of {res['full_build_s']:.1f} s)")


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-species", type=int, default=12,
                        help="demo images per species (8 species + 8 unlabelled images); default 12")
    parser.add_argument("--encoder-batch-size", type=int, default=8,
                        help="encoder.batch_size (a shard, one encode task and file, is 4 batches); default 8")
    parser.add_argument("--decode-batch-size", type=int, default=None,
                        help="preprocess.batch_size, rows per decode task; default: the demo config's")
    parser.add_argument("--repeats", type=int, default=1,
                        help="builds per layout, alternated one/three; the ratio takes each layout's best; default 1")
    parser.add_argument("--build-timeout-s", type=float, default=300,
                        help="a build still running after this is reported as stuck and its cluster shut down")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="another build config override for both layouts (repeatable)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "sae-traits-bench-cluster"),
                        help="folder for the demo data (reused), the builds, logs and bench_cluster.json")
    parser.add_argument("--keep-ray-logs", action="store_true", help="keep Ray's temp dir (/tmp/raybench*: session logs)")
    args = parser.parse_args(argv)
    own_tmpdir = "RAY_TMPDIR" not in os.environ
    if own_tmpdir:  # before ray is imported (machine_info imports it): Ray reads it for its temp dir
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raybench", dir="/tmp")
    # No implicit ray.init(): every connection here is explicit (a stuck build's thread, left running
    # after a timeout, must not start a Ray of its own once its cluster is gone). Read when ray is imported.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    assert "ray" not in sys.modules, "ray imported before RAY_TMPDIR / RAY_ENABLE_AUTO_CONNECT were set"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    machine_info()
    import ray

    print(f"ray temp dir: {os.environ['RAY_TMPDIR']}; output: {out}")
    started = time.perf_counter()
    demo = out / f"demo-ips{args.images_per_species}"
    runs: dict[str, list[dict]] = {"one": [], "three": []}
    prep_s = None
    left: list[str] = []
    try:
        header("setup")
        prep_s = prepare(demo, args.images_per_species, out / "logs" / "prepare_demo.log")
        for rep in range(args.repeats):
            for layout in ("one", "three"):
                runs[layout].append(run_layout(layout, rep, demo, out, args, with_resume=layout == "one" and rep == 0))
                if "error" in runs[layout][-1]:
                    break  # a stuck build's thread is still in this process: no further builds here
            else:
                continue
            print("  later runs skipped: a build got stuck", flush=True)
            break
        report(runs)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        time.sleep(2)
        left = leftover_processes()
        print(("\nleft-over Ray processes of this script:\n  " + "\n  ".join(left)) if left
              else "\nno Ray process of this script is left", flush=True)
        payload = {"args": vars(args), "ray_tmpdir": os.environ["RAY_TMPDIR"], "ray_version": ray.__version__,
                   "cpu_count": os.cpu_count(), "results": RESULTS, "runs": runs, "left_over_processes": left,
                   "prepare_demo_s": prep_s, "total_s": round(time.perf_counter() - started, 1)}
        (out / "bench_cluster.json").write_text(json.dumps(payload, indent=2, default=str))
        print(f"results: {out / 'bench_cluster.json'}")
        if own_tmpdir and not left and not args.keep_ray_logs:
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    print_summary()
    print(f"total {time.perf_counter() - started:.0f} s")
    stuck = any("error" in r for rs in runs.values() for r in rs)
    return 0 if not left and not stuck else 1


if __name__ == "__main__":
    sys.exit(main())
