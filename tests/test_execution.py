"""Pools checked before they wait: a pool no node can ever hold stops the run naming the key; one
that fits only a node type not up yet is asked for and waited on, then refused the same way."""

import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.execution import PoolAsk, ensure_placeable, never_fits

ENCODE = PoolAsk("encode", {"GPU": 1, "CPU": 1}, {"GPU": "encoder.num_gpus", "CPU": "encoder.num_cpus"})
LAPTOP = [{"CPU": 8.0, "memory": 1e10}]
P5 = {"gpu_worker": {"CPU": 192.0, "GPU": 8.0}}


def test_a_gpu_pool_on_a_cluster_without_gpus_names_the_key_and_the_fix():
    assert never_fits(ENCODE, LAPTOP, {}) == (
        "encoder.num_gpus=1 but this Ray cluster has no GPU and cannot add one; set encoder.num_gpus=0 to run on the CPU")
    assert "none of its node types (cpu_worker) has it" in never_fits(ENCODE, LAPTOP, {"cpu_worker": {"CPU": 64.0}})
    assert never_fits(ENCODE, LAPTOP, P5) == ""  # an autoscaler can add one
    assert never_fits(ENCODE, [{"CPU": 2.0, "GPU": 1.0}], {}) == ""


def test_too_many_cpus_or_gpus_per_actor_say_how_many_there_are():
    big = PoolAsk("annotate", {"GPU": 0, "CPU": 16}, {"GPU": "annotate.num_gpus", "CPU": "annotate.num_cpus"})
    assert never_fits(big, LAPTOP, {}) == ("annotate.num_cpus=16 but this Ray cluster has at most 8 CPU per node and "
                                           "cannot add one; set annotate.num_cpus to at most 8")
    split = PoolAsk("encode", {"GPU": 1, "CPU": 4}, ENCODE.keys)  # GPUs and CPUs on different nodes only
    assert "no node has all of it" in never_fits(split, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}], {})


class FakeCluster:
    """Nodes that come up after ``up_after_s`` of a fake clock."""

    def __init__(self, up_after_s: float | None):
        self.now, self.up_after_s, self.lines = 0.0, up_after_s, []

    def nodes(self):
        up = self.up_after_s is not None and self.now >= self.up_after_s
        return LAPTOP + ([{"CPU": 192.0, "GPU": 8.0}] if up else [])

    def sleep(self, s):
        self.now += s


def wait(cluster, wait_s, monkeypatch):
    requested = []
    monkeypatch.setattr("pipeline.execution.request_resources", lambda bundles: requested.append(bundles))
    ensure_placeable([ENCODE], wait_s, nodes=cluster.nodes, node_types=lambda: P5, clock=lambda: cluster.now,
                     sleep=cluster.sleep, log=cluster.lines.append)
    return requested


def test_a_pool_waits_for_the_node_type_it_fits_and_says_so_once_a_minute(monkeypatch):
    cluster = FakeCluster(up_after_s=150)
    requested = wait(cluster, 600, monkeypatch)
    assert requested == [[{"GPU": 1, "CPU": 1}], []]  # asked the autoscaler, then withdrew the ask
    assert cluster.lines == [f"[sae-traits] stage encode: waiting for a node with GPU:1, CPU:1 — {m} min so far "
                             "(up to ray.wait_for_resources_s=600)" for m in (0, 1, 2)]


def test_a_node_that_never_comes_up_stops_the_run_naming_the_keys(monkeypatch):
    with pytest.raises(ConfigError, match=r"encode: waited 30 s for a node with GPU:1, CPU:1 \(encoder.num_gpus, "
                                          r"encoder.num_cpus\); node types that have one: gpu_worker"):
        wait(FakeCluster(up_after_s=None), 30, monkeypatch)


def test_the_readmes_config_on_a_machine_without_a_gpu_stops_at_once(demo_dir, tmp_path):
    """The hang users met: encoder.num_gpus left at 1, a local Ray with no GPU."""
    from pipeline.demo.run import demo_build_config

    cfg = demo_build_config(demo_dir, [f"output={tmp_path / 'out'}", "encoder.num_gpus=1", "ray.num_cpus=2",
                                       "ray.num_gpus=0"])
    (tmp_path / "build.yaml").write_text(__import__("yaml").safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", "--config", str(tmp_path / "build.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("encoder.num_gpus=1 but this Ray cluster has no GPU and cannot add one; set encoder.num_gpus=0 to run "
            "on the CPU") in proc.stderr
    assert not (tmp_path / "out" / "activations").exists()
