"""S3 that fails now and then (issue 14): the demo build from and to the moto S3 server through
benchmarks/fault_proxy.py, which answers a seeded share of the requests (the driver's and every Ray
worker's) with a 500 InternalError, a 503 SlowDown, a dropped connection or an answer cut off
half-way (after the server acted on the request).

- SHARE of the requests faulted: the build ends with the clean build's tables (nothing lost or
  duplicated), the proxy injected faults of every kind, and the retries are in the log;
- a store that becomes unreachable mid-build (right after the first activations/ file is
  written): the build ends within UNREACHABLE_S with an error naming the s3:// path (the
  storage section's give_up_after_s at work), then, with the store back, the same command
  resumes and ends with the clean build's tables.

The session's moto server is shared (inputs are uploaded to it directly, not through a proxy);
each test has inputs and output of its own, under a fresh run id (local_copy's node cache is
keyed by URL and endpoint).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from benchmarks.fault_proxy import KINDS, FaultProxy
from pipeline import storage
from tests.s3_server import client, demo_on_s3, download, storage_keys
from tests.tables import assert_same_build

SHARE = 0.10  # of all requests, the driver's and the Ray workers' alike
SEED = 14
# report=false: the report reads the tables compared here (tests/test_s3.py builds it on S3).
BASE = ["encoder.num_gpus=1", "encoder.num_cpus=0.25", "report=false"]
# Image paths name the store they were read from: the one column a build on S3 differs in.
ON_S3 = {"activations": ["path"], "candidates": ["path"], "traits": ["path"]}
RETRY = "[sae-traits] retrying s3 "
UNREACHABLE_S = 40  # the bound on the time from the store going away to the build's error
GIVE_UP_S = 10  # storage.give_up_after_s of the unreachable-store build (the default, 30 s, is only slower)
REPO = Path(__file__).resolve().parents[1]


def worker_logs() -> dict[Path, int]:
    """The session Ray's worker stderr files and their sizes now (its workers do not log to the
    driver; their log lines land there)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # the session Ray's own folder
    return {path: path.stat().st_size for path in logs.glob("worker-*.err")}


def retry_lines(caplog, since: dict[Path, int]) -> tuple[list[str], list[str]]:
    """The retry log lines of the test so far: (the driver's, the Ray workers' written after ``since``)."""
    driver = [r.getMessage() for r in caplog.records if r.name == "pipeline.storage" and RETRY in r.getMessage()]
    workers = []
    for path in worker_logs():
        with path.open("rb") as f:
            f.seek(since.get(path, 0))
            workers += [line for line in f.read().decode(errors="replace").splitlines() if RETRY in line]
    return driver, workers


def test_demo_build_through_a_store_that_fails_one_request_in_ten(demo_dir, demo_build, s3_server, tmp_path, caplog):
    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    caplog.set_level(logging.WARNING, logger="pipeline.storage")
    clean_out, clean_manifest = demo_build
    run = uuid.uuid4().hex[:8]
    inputs = demo_on_s3(client(s3_server), demo_dir, run)
    logs = worker_logs()
    with FaultProxy(s3_server, share=SHARE, seed=SEED) as proxy:
        cfg = demo_build_config(demo_dir, [*inputs, f"output=s3://builds/{run}/demo", *BASE, *storage_keys(proxy.url)])
        start = time.perf_counter()
        manifest = Build(cfg).run()
        wall = time.perf_counter() - start
        counts, hit = proxy.counts(), proxy.faults_by_request()
    driver, workers = retry_lines(caplog, logs)
    print(f"\n[s3 faults] {counts['faults']} of {counts['requests']} requests faulted "
          f"({counts['faults'] / counts['requests']:.1%}): " + ", ".join(f"{k} {counts[k]}" for k in KINDS)
          + f"; by request {dict(sorted(hit.items()))}; retries logged: driver {len(driver)}, "
          f"Ray workers {len(workers)}; build {wall:.1f} s, manifest wall_s {manifest['wall_s']:.1f} s (clean local "
          f"build {clean_manifest['wall_s']:.1f} s); "
          "stages " + ", ".join(f"{n} {s['wall_s']:.1f} s ({clean_manifest['stages'][n]['wall_s']:.1f})"
                                for n, s in manifest["stages"].items() if "wall_s" in s))

    # The faults reached the build: every kind, about SHARE of the requests.
    assert all(counts[k] > 0 for k in KINDS), counts
    assert 0.5 * SHARE < counts["faults"] / counts["requests"] < 1.5 * SHARE, counts
    # ... and retried, in the log (the driver's and the workers'): every 5xx answer by botocore (one
    # line each), and an answer cut off mid-body by s3fs reading it again. A request whose
    # connection dropped before any answer is re-sent once by aiohttp itself, silently (idempotent
    # methods, RFC 9112 9.3.1): it is in the log only when that second try fails too.
    logged = len(driver) + len(workers)
    assert driver and workers
    assert counts["500"] + counts["503"] <= logged <= counts["faults"], (logged, counts)
    # ... and changed nothing: the clean build's tables and row counts.
    assert manifest["status"] == "succeeded" and manifest["stages"]["errors"]["rows"] == 0
    rows = lambda m: {name: stage.get("rows") for name, stage in m["stages"].items()}  # noqa: E731
    assert rows(manifest) == rows(clean_manifest)
    assert_same_build(clean_out, download(client(s3_server), f"builds/{run}/demo", tmp_path / "build"), ignore=ON_S3)


def test_unreachable_store_ends_the_build_naming_the_path_and_a_rerun_resumes(ray_local, demo_dir, demo_build, load_factor,
                                                                              s3_server, tmp_path, capsys):
    """The failing run is a driver process of its own on the session Ray, as from the command line:
    its exit ends its job's workers. (A driver that lives on, as pytest would, leaves their s3fs
    requests running in each worker's fsspec thread after Ray Data has cancelled their tasks: one
    of them may write its shard once the store is back, after a rerun has listed what is written.)"""
    from pipeline.build import main
    from pipeline.demo.run import demo_build_config
    from tests.ray_cluster_procs import alive, descendants

    clean_out, _ = demo_build
    run = uuid.uuid4().hex[:8]
    inputs = demo_on_s3(client(s3_server), demo_dir, run)
    out = f"builds/{run}/demo"
    raylet = ray_local._private.worker._global_node.all_processes["raylet"][0].process.pid
    with FaultProxy(s3_server) as proxy:
        # batch_size 8: 13 encoder batches (one activations/ file each), so that the store can go away mid-stage.
        cfg = demo_build_config(demo_dir, [*inputs, f"output=s3://{out}", *BASE, "encoder.batch_size=8",
                                           *storage_keys(proxy.url), f"storage.give_up_after_s={GIVE_UP_S}"])
        config = tmp_path / "build.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        proxy.unreachable_after(rf"^PUT /{out}/activations/[^?]+\.parquet")
        workers_before = descendants([raylet])
        address = ray_local.get_runtime_context().gcs_address
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            driver = subprocess.Popen([sys.executable, "-m", "pipeline.build", "--config", str(config),
                                       "--set", f"ray.address={address}"], cwd=REPO, stdout=stdout, stderr=stderr)
            try:
                code = driver.wait(timeout=300 * load_factor)
            finally:
                if driver.poll() is None:
                    driver.kill()
        ended = time.monotonic()
        err = (tmp_path / "stderr").read_text()
        assert proxy.unreachable_since is not None, f"the store never went away:\n{err[-3000:]}"
        took = ended - proxy.unreachable_since
        kept = [p for p in client(s3_server).find(f"{out}/activations") if p.endswith(".parquet")]
        kept_rows = storage.count_rows(client(s3_server), f"{out}/activations")
        # The store stays away until the failed job's workers are gone (Ray ends them with their driver).
        job_workers = {pid: t for pid, t in descendants([raylet]).items() if pid not in workers_before}
        deadline = time.monotonic() + 60
        while alive(job_workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(job_workers)
        with capsys.disabled():
            print(f"\n[s3 unreachable] exit {code} {took:.1f} s after the store went away ({proxy.counts()['refused']} "
                  f"connections refused); activations/ files kept: {len(kept)}; the error:\n{err.strip()[-1000:]}")
        assert code == 3, err[-3000:]
        # storage.give_up_after_s (GIVE_UP_S) plus the backoff in progress and the driver's exit; on a loaded
        # machine the processes themselves are slower by this run's load factor.
        assert took < UNREACHABLE_S * load_factor, (took, load_factor)
        # The last words: the path of the request that failed last (one of this run's), what it got, the way on.
        error = err[err.rindex("error: "):] if "error: " in err else err[-3000:]
        assert error.startswith("error: storage unreachable: ") and "s3://" in error and "retries spent" in error, error
        assert run in error.splitlines()[0], error
        assert "what was written is kept: rerun the same command" in error and "it resumes" in error, error
        assert "Traceback" not in err  # nor before it: a lease refresh cut off by the exit stays in the log
        assert 1 <= len(kept) < 13
        assert not left, f"workers of the failed job still running: {left}"

        proxy.unreachable = False
        start = time.perf_counter()
        capsys.readouterr()
        assert main(["--config", str(config)]) == 0
        resumed = capsys.readouterr().out
        with capsys.disabled():
            print(f"[s3 unreachable] rerun {time.perf_counter() - start:.1f} s")
    assert "stage index: done in an earlier run" in resumed
    assert f"stage encode: resuming, {kept_rows} rows written earlier" in resumed
    assert_same_build(clean_out, download(client(s3_server), out, tmp_path / "build"), ignore=ON_S3)
