"""Offline checks of cluster.yaml, before paying for nodes: Ray's own launcher schema, and whether the
LLM deployments of a Serve config fit on the node types (no AWS credentials, no vLLM, no Ray cluster).

    python -m pipeline.cluster_check cluster.yaml serve_configs/qwen2_5_vl_72b.yaml

The placement group of one Serve LLM replica is computed as Ray 2.60 does it
(ray/llm/_internal/serve/engines/vllm/vllm_models.py `placement_bundles` and
core/server/llm_server.py `get_deployment_options`): `bundle_per_worker` repeated
tensor_parallel_size × pipeline_parallel_size times, each with `accelerator_type:<X>: 0.001` when the
config names an accelerator, and the replica actor's own {CPU: 1} added to the first bundle.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def validate_cluster(config: dict) -> dict:
    """Ray's launcher schema check, as `ray up` does it before touching the cloud: fill Ray's defaults
    (prepare_config), then validate (jsonschema, raises on error). Returns the filled-in config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def llm_configs(serve_config: dict) -> list[dict]:
    """Every Serve LLM config (`args.llm_configs` entries) of a Serve deploy config."""
    return [llm for app in serve_config.get("applications", []) for llm in (app.get("args") or {}).get("llm_configs", [])]


def num_devices(llm: dict) -> int:
    engine = llm.get("engine_kwargs") or {}
    return int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))


def replica_bundles(llm: dict) -> list[dict]:
    """The placement-group bundles of one replica (see the module docstring)."""
    pg = llm.get("placement_group_config") or {}
    accel = llm.get("accelerator_type")
    if pg.get("bundle_per_worker") is not None:
        bundles = [dict(pg["bundle_per_worker"]) for _ in range(num_devices(llm))]
    elif pg:
        bundles = [dict(b) for b in pg.get("bundles") or []]
    else:
        bundles = [{"GPU": 1} for _ in range(num_devices(llm))]
    for bundle in bundles:
        if accel:
            bundle.setdefault(f"accelerator_type:{accel}", 0.001)
    actor = (llm.get("deployment_config") or {}).get("ray_actor_options") or {}
    replica = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
    if not bundles:
        return [replica]
    bundles[0] = {k: bundles[0].get(k, 0) + replica.get(k, 0) for k in bundles[0].keys() | replica.keys()}
    return bundles


def _total(bundles: list[dict]) -> dict:
    total: dict = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return total


def node_problems(node_type: dict, llm: dict) -> list[str]:
    """Why one replica of `llm` can't be placed on one node of `node_type` (empty: it can)."""
    res = node_type.get("resources") or {}
    bundles = replica_bundles(llm)
    need = _total(bundles)
    problems = []
    if res.get("GPU", 0) < num_devices(llm):
        problems.append(f"GPU {res.get('GPU', 0)} < tensor_parallel_size × pipeline_parallel_size = {num_devices(llm)}")
    if llm.get("accelerator_type") and res.get(f"accelerator_type:{llm['accelerator_type']}", 0) <= 0:
        problems.append(f"no 'accelerator_type:{llm['accelerator_type']}' resource")
    strategy = (llm.get("placement_group_config") or {}).get("strategy", "PACK")
    if strategy == "STRICT_PACK":  # all bundles of a replica on this one node
        short = {k: v for k, v in need.items() if v > 0 and res.get(k, 0) < v}
        if short:
            problems.append(f"STRICT_PACK needs {need}, the node has {res}")
    else:  # each bundle on some node; checked against this node type alone
        for bundle in bundles:
            if any(v > 0 and res.get(k, 0) < v for k, v in bundle.items()):
                problems.append(f"bundle {bundle} does not fit in {res}")
    return problems


def replicas_per_node(node_type: dict, llm: dict) -> int:
    res = node_type.get("resources") or {}
    need = _total(replica_bundles(llm))
    return min((math.floor(res.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0), default=0)


def hosting(prepared_cluster: dict, llm: dict) -> tuple[dict, int]:
    """The worker node types one replica of `llm` fits on, and how many replicas they hold together at
    their max_workers (capped by the cluster's max_workers)."""
    head, global_max = prepared_cluster["head_node_type"], prepared_cluster["max_workers"]
    hosts = {n: t for n, t in prepared_cluster["available_node_types"].items() if n != head and not node_problems(t, llm)}
    return hosts, sum(min(t.get("max_workers", global_max), global_max) * replicas_per_node(t, llm) for t in hosts.values())


def llm_problems(prepared_cluster: dict, llm: dict) -> list[str]:
    """Why the cluster (a `validate_cluster` result) can't host `llm` at its min and max replica counts."""
    hosts, capacity = hosting(prepared_cluster, llm)
    if not hosts:
        head = prepared_cluster["head_node_type"]
        return [f"{name}: " + ("the head takes no work" if name == head else "; ".join(node_problems(t, llm)))
                for name, t in prepared_cluster["available_node_types"].items()]
    deployment = llm.get("deployment_config") or {}
    autoscaling = deployment.get("autoscaling_config")
    wanted = ({k: autoscaling.get(k, 1) for k in ("min_replicas", "max_replicas")} if autoscaling
              else {"num_replicas": deployment.get("num_replicas", 1)})
    return [f"{key} {n} > {capacity}, the replicas node types {sorted(hosts)} hold at their max_workers"
            for key, n in wanted.items() if isinstance(n, int) and n > capacity]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m pipeline.cluster_check", description=__doc__.split("\n\n")[0],
                                     epilog="docs: docs/cluster.md")
    parser.add_argument("cluster", nargs="?", default="cluster.yaml", help="the Ray cluster launcher file")
    parser.add_argument("serve_configs", nargs="*", default=["serve_configs/qwen2_5_vl_72b.yaml"],
                        help="Serve config files whose LLM deployments must fit")
    args = parser.parse_args(argv)
    cluster_path, serve_paths = args.cluster, args.serve_configs
    prepared = validate_cluster(yaml.safe_load(Path(cluster_path).read_text()))
    failed = False
    for path in serve_paths:
        for llm in llm_configs(yaml.safe_load(Path(path).read_text())):
            model = llm["model_loading_config"]["model_id"]
            problems = llm_problems(prepared, llm)
            failed |= bool(problems)
            hosts, capacity = hosting(prepared, llm)
            print(f"{path}: {model}: " + ("; ".join(problems) if problems else
                                          f"fits on {sorted(hosts)}, up to {capacity} replicas at max_workers"))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
