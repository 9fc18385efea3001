"""The demo build on a ray.cluster_utils.Cluster of its own, with a worker node removed mid-encode.

    RAY_TMPDIR=/tmp/rayfXXXX python -m tests.fault_cluster_build --demo-dir D --output OUT --result R.json

Head: 1 CPU, no GPU (the driver's node). Two workers: 1 CPU + 1 fake GPU each, so the encoder
pool (encoder.num_gpus=1, max_actors=2) puts one actor on each. The build runs in a thread; once
some activations/ files exist and the encode stage is not finished, the worker node hosting an
encoder actor is killed (Cluster.remove_node, no graceful drain: a lost machine). The tiny demo
model encodes everything in about a second, so each encoder batch is made --encode-delay-s slower
(slow_encoder, a worker_process_setup_hook; results unchanged) to leave a window. With
--new-node on-stall, a fresh GPU node joins (as an autoscaler would) if the encode stage makes
no progress for --stall-s after the removal; never: no new node; at-once: right after the removal.

Every Ray process of this cluster is a child of this script and is ended in the finally block
(Cluster.shutdown removes exactly its nodes; no `ray stop`). RAY_TMPDIR (set by the caller, or a
fresh /tmp/rayf* here) holds the cluster's session and its ray_current_cluster file, so no other
Ray on the machine can find it and `ray.init()` elsewhere never joins it; the caller also uses it
to find and kill stray processes. Writes a JSON result: timings, the node removed, at what point,
the actors' states, and the build's manifest summary or the error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchmarks.common import gcs_actors

OBJECT_STORE = 100 * 1024 * 1024  # per node; the demo's blocks are a few MB


def slow_encoder() -> None:
    """runtime_env worker_process_setup_hook (runs in every worker of the build's job): each
    encoder batch takes FAULT_ENCODE_DELAY_S longer, as on a real backbone, so the encode stage
    lasts long enough for a node to be lost in the middle of it (the tiny demo model encodes the
    whole demo in about a second). Only the timing changes, never a result."""
    import pipeline.graph as build

    delay = float(os.environ.get("FAULT_ENCODE_DELAY_S") or 0)
    original = build.EncodeActor.__call__
    if delay <= 0 or getattr(original, "slowed", False):
        return

    def call(self, batch):
        time.sleep(delay)
        return original(self, batch)

    call.slowed = True
    build.EncodeActor.__call__ = call


def encoder_actors() -> list[dict]:
    """The build's encoder pool actors: its only GPU users."""
    return [a for a in gcs_actors() if a["required_resources"].get("GPU", 0) > 0]


def parquet_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.parquet")) if folder.exists() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--new-node", choices=["never", "at-once", "on-stall"], default="on-stall")
    parser.add_argument("--stall-s", type=float, default=30.0)
    parser.add_argument("--timeout-s", type=float, default=240.0)
    parser.add_argument("--min-files", type=int, default=1,
                        help="remove a node once this many activations/ files are written")
    parser.add_argument("--encode-delay-s", type=float, default=0.3, help="added to every encoder batch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    # Before ray is imported: Ray reads RAY_TMPDIR for its temp dir (sessions, ray_current_cluster).
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rayf", dir="/tmp")
    # A Ray call in the build thread after the driver disconnected (a failed run's teardown) must
    # fail, not start or join a Ray of its own.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    # The cluster's workers (children of its raylets, children of this process) import this module
    # too (slow_encoder, the setup hook), and with it benchmarks.common.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    out = Path(args.output)
    result: dict = {"ray_tmpdir": os.environ["RAY_TMPDIR"], "new_node_mode": args.new_node, "events": []}
    t0 = time.monotonic()

    def event(what: str, **info) -> None:
        info = {"t": round(time.monotonic() - t0, 2), "event": what, **info}
        result["events"].append(info)
        print(f"[fault_cluster_build] {json.dumps(info)}", flush=True)

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={
            "worker_process_setup_hook": "tests.fault_cluster_build.slow_encoder",
            "env_vars": {"FAULT_ENCODE_DELAY_S": str(args.encode_delay_s)}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        head_id = cluster.head_node.node_id
        assert ray.get_runtime_context().get_node_id() == head_id, "the driver must sit on the head"
        event("cluster up", head=head_id, workers=[w.node_id for w in workers])

        cfg = demo_build_config(Path(args.demo_dir), [f"output={out}", "encoder.num_gpus=1", "encoder.num_cpus=0.25",
                                                      "encoder.max_actors=2", "encoder.batch_size=4", "report=false",
                                                      *args.overrides])
        outcome: dict = {}

        def build() -> None:
            try:
                outcome["manifest"] = Build(cfg).run()
            except BaseException as exc:  # reported in the result
                outcome["error"] = "".join(traceback.format_exception(exc))

        thread = threading.Thread(target=build, daemon=True, name="build")
        build_started = time.monotonic()
        thread.start()

        # Wait for the moment: activations/ files written, encode not finished, an encoder actor alive on a worker.
        encode_done = out / "_build" / "stages" / "encode.json"
        deadline = time.monotonic() + args.timeout_s
        victim, last_seen = None, None
        while victim is None and thread.is_alive() and time.monotonic() < deadline:
            files = parquet_files(out / "activations")
            if encode_done.exists():
                break
            actors = encoder_actors()
            alive = [a for a in actors if a["state"] == "ALIVE"]
            on = {a["node_id"] for a in alive}
            seen = (files, tuple(sorted((a["actor_id"][:8], a["state"]) for a in actors)))
            if seen != last_seen:
                event("waiting", activations_files=files, encoder_actors=seen[1])
                last_seen = seen
            if files >= args.min_files and on:
                victim = next(w for w in workers if w.node_id in on)
                break
            time.sleep(0.1)
        if victim is None:
            raise RuntimeError("no moment to remove a node: " + ("the build ended" if not thread.is_alive() else
                                                                  "the encode stage finished" if encode_done.exists() else "timed out"))
        files_before = parquet_files(out / "activations")
        actors_before = encoder_actors()
        encode_done_before = encode_done.exists()
        cluster.remove_node(victim, allow_graceful=False)
        removed_at = time.monotonic()
        victim_actors = [a["actor_id"] for a in actors_before if a["state"] == "ALIVE" and a["node_id"] == victim.node_id]
        event("node removed", node=victim.node_id, activations_files=files_before,
              encoder_actors=[(a["actor_id"][:8], a["state"], a["node_id"][:8]) for a in actors_before])
        result["removed"] = {"node_id": victim.node_id, "activations_files": files_before,
                             "encode_done": encode_done_before, "victim_actors": victim_actors,
                             "t_after_build_start_s": round(removed_at - build_started, 2),
                             "encoder_actors_before": actors_before}

        new_node = None
        last_files, last_progress = files_before, removed_at
        while thread.is_alive() and time.monotonic() < deadline:
            files = parquet_files(out / "activations")
            if files != last_files:
                if "first_file_after_removal_s" not in result:
                    result["first_file_after_removal_s"] = round(time.monotonic() - removed_at, 2)
                last_files, last_progress = files, time.monotonic()
            if "victim_actor_back_s" not in result and not encode_done.exists():
                back = [a for a in encoder_actors() if a["actor_id"] in victim_actors and a["state"] == "ALIVE"
                        and a["node_id"] != victim.node_id]
                if back:  # the lost actor, restarted by Ray on a node that is left
                    result["victim_actor_back_s"] = round(time.monotonic() - removed_at, 2)
                    event("lost actor restarted", actor=back[0]["actor_id"][:8], node=back[0]["node_id"][:8],
                          num_restarts=back[0]["num_restarts"])
            stalled = not encode_done.exists() and time.monotonic() - last_progress > args.stall_s
            if new_node is None and (args.new_node == "at-once" or (args.new_node == "on-stall" and stalled)):
                event("adding a node", reason="at-once" if args.new_node == "at-once" else
                      f"no encode progress for {args.stall_s:.0f} s", activations_files=files,
                      encoder_actors=[(a["actor_id"][:8], a["state"], a["node_id"][:8]) for a in encoder_actors()])
                new_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE)
                event("node added", node=new_node.node_id)
            if encode_done.exists() and "encode_done_s" not in result:
                result["encode_done_s"] = round(time.monotonic() - build_started, 2)
                result["activations_files_final"] = parquet_files(out / "activations")
                event("encode finished", activations_files=result["activations_files_final"])
            time.sleep(0.2)
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        result["new_node"] = new_node.node_id if new_node is not None else None
        result["build_s"] = round(time.monotonic() - build_started, 2)
        result["after_removal_s"] = round(time.monotonic() - removed_at, 2)
        result["encoder_actors_after"] = encoder_actors()
        if thread.is_alive():
            result["error"] = f"the build did not finish in {args.timeout_s:.0f} s"
        elif "error" in outcome:
            result["error"] = outcome["error"]
        else:
            result["manifest_summary"] = outcome["manifest"]["summary"]
            result["status"] = outcome["manifest"]["status"]
        event("done", status=result.get("status"), error=(result.get("error") or "")[-300:] or None)
    except BaseException as exc:
        result["error"] = "".join(traceback.format_exception(exc))
    finally:
        result["total_s"] = round(time.monotonic() - t0, 2)
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        ray.shutdown()
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:  # whatever Cluster's bookkeeping says, every node's processes go
                traceback.print_exc()
                for node in cluster.list_all_nodes():
                    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
