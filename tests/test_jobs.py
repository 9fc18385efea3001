"""`ray job submit` of the demo build, as a user does it, to a real two-node Ray cluster on this
machine: a head with no GPU (`ray start --head`) and a worker declaring one fake GPU
(`ray start --address ... --num-gpus=1`). The build must join that cluster through the
RAY_ADDRESS the job gets (not start a Ray of its own), and its encoder actor (num_gpus=1) must run
on the GPU node. The cluster is separate from the pytest session's Ray: its own ports and temp dir;
only the processes started here are ended (never `ray stop`)."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.demo.run import demo_build_config
from pipeline.demo.specimens import METADATA_RELPATH
from tests.ray_cluster_procs import LocalRayCluster, alive

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # ~1.5 min on an idle 2-core machine; 4 min seen with other Ray builds running


@pytest.fixture
def job_cluster(request, demo_dir, tmp_path):
    """Head (1 CPU, no GPU) + GPU worker (2 CPUs, 1 fake GPU); torn down even when the test fails
    (its Ray logs are then kept in tmp_path/ray-logs). Asks for demo_dir first so the demo SAE
    trains before this cluster competes for the CPUs."""
    failed_before = request.session.testsfailed
    cluster = LocalRayCluster(log_dir=tmp_path)
    try:
        cluster.start_head(num_cpus=1, num_gpus=0)
        cluster.add_worker("gpu", num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        left = cluster.stop()
        if request.session.testsfailed > failed_before:
            cluster.save_logs(tmp_path / "ray-logs")
            print(f"\n[test_jobs] Ray logs of the failed test: {tmp_path / 'ray-logs'}")
        cluster.remove_temp_dirs()
        if left:
            pytest.fail(f"processes of the test's Ray cluster still alive after teardown: {left}")


def ray_cli(cluster, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([cluster.ray_cli(), *args], capture_output=True, text=True, timeout=timeout,
                          env=cluster.process_env(), cwd=REPO)


def wait_for_job(client, submission_id, timeout):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(submission_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} or time.monotonic() > deadline:
            return status
        time.sleep(2)


def test_ray_job_submit_runs_the_demo_build_on_the_cluster(job_cluster, demo_dir, load_factor, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    cluster = job_cluster
    out = tmp_path / "build"
    cfg = demo_build_config(demo_dir, [f"output={out}", "encoder.num_gpus=1"])
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    started = time.monotonic()
    submit = ray_cli(cluster, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                     "--submission-id", "demo-build", "--no-wait", "--",
                     "python", "-m", "pipeline.build", "--config", str(config))
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "Job 'demo-build' submitted successfully" in submit.stdout + submit.stderr

    client = JobSubmissionClient(cluster.dashboard_url)
    status = wait_for_job(client, "demo-build", JOB_TIMEOUT_S * load_factor)
    logs = client.get_job_logs("demo-build")
    job_s = time.monotonic() - started
    print(f"\n[test_jobs] job {status} in {job_s:.0f} s")
    assert status == JobStatus.SUCCEEDED, f"job {status} after {job_s:.0f} s; logs:\n{logs[-8000:]}"
    # What a user sees from the CLI.
    cli_status = ray_cli(cluster, "job", "status", "--address", cluster.dashboard_url, "demo-build")
    assert "Job 'demo-build' succeeded" in cli_status.stdout + cli_status.stderr, cli_status.stdout + cli_status.stderr
    assert "[sae-traits] stage encode" in logs and "[sae-traits] stage annotate" in logs

    # The build's outputs (written by the job on the cluster's nodes).
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    with open(demo_dir / "data" / METADATA_RELPATH, newline="") as f:
        n_images = sum(1 for _ in csv.DictReader(f))
    assert pq.read_table(out / "activations").num_rows == n_images == manifest["stages"]["encode"]["rows"]
    assert pq.read_table(out / "traits").num_rows > 0
    assert manifest["stages"]["errors"]["rows"] == 0

    # The job ran on this cluster and its encoder on the GPU node: the cluster's own state API
    # lists the job's actors with the node each ran on (a Ray started by the job would show none).
    nodes = list_nodes(address=cluster.dashboard_url, raise_on_missing_output=False)
    gpu_nodes = [n.node_id for n in nodes if n.resources_total.get("GPU", 0) > 0]
    head = [n.node_id for n in nodes if n.is_head_node]
    assert len(gpu_nodes) == 1 and len(head) == 1 and gpu_nodes != head
    job = client.get_job_info("demo-build")
    assert job.driver_node_id == head[0]        # `ray job submit` runs the driver on the head
    actors = list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", job.job_id)], detail=True,
                         limit=1000, raise_on_missing_output=False)
    # The encoder pool is the build's only GPU user (encoder.num_gpus=1; annotate.num_gpus=0).
    on_gpu = [a for a in actors if (a.required_resources or {}).get("GPU", 0) > 0]
    names = sorted({f"{a.class_name} {a.repr_name or ''}".strip() for a in actors})
    assert on_gpu, f"no actor of the job asked for a GPU; the job's actors: {names}"
    assert any("Encode" in f"{a.class_name} {a.repr_name}" for a in on_gpu), names
    for a in on_gpu:
        assert a.required_resources["GPU"] == 1 and a.node_id == gpu_nodes[0], a
    print(f"[test_jobs] GPU actors {[(a.repr_name or a.class_name, a.node_id[:8]) for a in on_gpu]} "
          f"on the GPU node {gpu_nodes[0][:8]}; driver on the head {head[0][:8]}")

    # The uploaded working dir: the repo's code without the gitignored .venv, and small.
    # Each node unpacks it into its own temp dir (the head for the driver, the worker for the encoder).
    packages = [pkg for d in cluster.temp_dirs
                for pkg in Path(d, "session_latest", "runtime_resources", "working_dir_files").glob("_ray_pkg_*") if pkg.is_dir()]
    assert len(packages) == 2, packages
    for pkg in packages:
        assert (pkg / "pipeline" / "build.py").is_file() and not (pkg / ".venv").exists()
        size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
        assert size < 20 * 2**20, f"{pkg} holds {size / 2**20:.1f} MiB"
    print(f"[test_jobs] working_dir package: {size / 2**20:.1f} MiB")

    # Stop the cluster here too (the fixture's teardown then has nothing left to do) and check
    # that no raylet or GCS server of this cluster is left.
    procs = cluster.processes()
    assert any("raylet" in c for c in alive(procs).values()) and any("gcs_server" in c for c in alive(procs).values())
    left = cluster.stop()
    assert not left, left
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines()
                if any(d in line for d in cluster.temp_dirs) and ("raylet" in line or "gcs_server" in line)]
    assert not alive(procs)
    print(f"[test_jobs] {len(procs)} cluster processes stopped; total {time.monotonic() - started:.0f} s", file=sys.stderr)
