"""cluster.yaml: Ray's own launcher schema accepts it (offline, no AWS credentials: DESIGN §6), it has
the node types the issue asks for, and it can host serve_configs/qwen2_5_vl_72b.yaml (pipeline.cluster_check).
Every check has a broken twin that must be refused."""

import copy
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cluster_check import (hosting, llm_configs, llm_problems, main, node_problems, replica_bundles,
                                    replicas_per_node, validate_cluster)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
QWEN_YAML = ROOT / "serve_configs" / "qwen2_5_vl_72b.yaml"


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def qwen() -> dict:
    (llm,) = llm_configs(yaml.safe_load(QWEN_YAML.read_text()))
    return llm


# --------------------------------------------------------------------------- Ray's launcher schema

def test_ray_schema_accepts_cluster_yaml_offline(cluster, monkeypatch):
    # No credentials and no boto3: prepare_config only merges ray/autoscaler/aws/defaults.yaml.
    # (bootstrap_aws, which `ray up` runs next, is the part that talks to AWS; it is not called.)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setitem(sys.modules, "boto3", None)  # any `import boto3` now raises
    monkeypatch.setitem(sys.modules, "botocore", None)
    raw = copy.deepcopy(cluster)
    prepared = validate_cluster(cluster)
    assert cluster == raw  # the file's dict is not modified
    # Ray's defaults were filled in where the file is silent, ours kept where it is not.
    assert prepared["cluster_synced_files"] == [] and prepared["upscaling_speed"] == 1.0
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["head_setup_commands"] == cluster["setup_commands"] + cluster["head_setup_commands"]
    assert not any("ray-3.0.0.dev0" in c for c in prepared["worker_setup_commands"])  # not Ray's default install


def test_validate_config_alone_refuses_the_raw_yaml(cluster):
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(cluster))


def _set(path: str, value):
    def mutate(config):
        *keys, last = path.split("/")
        node = config
        for key in keys:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return mutate


SCHEMA_ERROR = jsonschema.ValidationError


@pytest.mark.parametrize("mutate, error", [
    (_set("not_a_ray_key", 1), SCHEMA_ERROR),                                   # unknown top-level key
    (_set("available_node_types/gpu_worker/resources/GPU", 0.5), SCHEMA_ERROR),  # resources: integers
    (_set("available_node_types/gpu_worker/resources/CPU", "192"), SCHEMA_ERROR),
    (_set("available_node_types/head/resources/CPU", -1), SCHEMA_ERROR),         # ... and >= 0
    (_set("available_node_types/cpu_worker/node_config", KeyError), SCHEMA_ERROR),  # required per node type
    (_set("available_node_types/gpu_worker/resources", KeyError), SCHEMA_ERROR),
    (_set("available_node_types/gpu_worker/min_workers", "0"), SCHEMA_ERROR),
    (_set("available_node_types/gpu_worker/num_gpus", 8), SCHEMA_ERROR),         # unknown node-type key
    (_set("head_node_type", "no_such_type"), ValueError),                         # checks after the schema
    (_set("available_node_types/gpu_worker/min_workers", 99), ValueError),        # sum(min_workers) > max_workers
], ids=["unknown-key", "float-gpu", "string-cpu", "negative-cpu", "no-node-config", "no-resources",
        "string-min-workers", "unknown-node-key", "unknown-head-type", "min-over-max"])
def test_ray_schema_refuses_broken_copies(cluster, mutate, error):
    mutate(cluster)
    with pytest.raises(error):
        validate_cluster(cluster)


# --------------------------------------------------------------------------- what the issue asks of the file

def test_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # takes no work
    assert "GPU" not in head["resources"]
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"] == {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    cpu = types["cpu_worker"]
    assert cpu["min_workers"] == 0 and "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] > 0
    assert re.match(r"(c|m)7i\.", cpu["node_config"]["InstanceType"])
    # Every node names its AMI: Ray's fallback is an Ubuntu 18.04 DLAMI, too old for H100s.
    assert all(t["node_config"].get("ImageId", "").startswith("ami-") for t in types.values())
    assert cluster["max_workers"] >= gpu["max_workers"]


def test_setup_installs_this_repo_with_the_gpu_extra(cluster):
    assert cluster["file_mounts"]["~/sae-traits"] == "."
    assert ".gitignore" in cluster["rsync_filter"]  # .venv/ and outputs stay home
    install = [c for c in cluster["setup_commands"] if "install" in c and "-e" in c]
    assert len(install) == 1 and '-e "$HOME/sae-traits[gpu]"' in install[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[data,serve\]==([\d.]+)"', pyproject).group(1)
    # the GPU extra brings Ray Serve LLM (and its vLLM) at the same Ray version as the project pins
    assert re.search(rf'^gpu = \["ray\[llm\]=={re.escape(ray_pin)}"\]', pyproject, re.M)
    # The head's autoscaler needs boto3 in the same venv as `ray start`.
    assert any("boto3" in c and "~/venv/bin/python" in c for c in cluster["head_setup_commands"])
    # Every node and the local client share a token (RAY_AUTH_MODE=token on the nodes).
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"])


def test_knobs_are_marked_edit():
    lines = CLUSTER_YAML.read_text().splitlines()
    for knob in ("region:", "ImageId: &ami", "max_workers:", "VolumeSize", "InstanceType:"):
        hits = [line for line in lines if knob in line and not line.lstrip().startswith("#")]
        assert hits, knob
        assert all("# edit:" in line for line in hits), [h for h in hits if "# edit:" not in h]


# --------------------------------------------------------------------------- it can host the 72B Serve config

def test_replica_bundles_as_ray_builds_them(qwen):
    tp = qwen["engine_kwargs"]["tensor_parallel_size"]
    bundles = replica_bundles(qwen)
    assert len(bundles) == tp
    assert bundles[0] == {"CPU": 4 + 1, "GPU": 1, "accelerator_type:H100": 0.001}  # + the replica actor's CPU
    assert all(b == {"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001} for b in bundles[1:])


def test_cluster_hosts_qwen_72b(cluster, qwen):
    prepared = validate_cluster(cluster)
    assert llm_problems(prepared, qwen) == []
    hosts, capacity = hosting(prepared, qwen)
    assert list(hosts) == ["gpu_worker"]  # neither the CPU-0 head nor the CPU workers
    gpu = cluster["available_node_types"]["gpu_worker"]
    engine, autoscaling = qwen["engine_kwargs"], qwen["deployment_config"]["autoscaling_config"]
    tp = engine["tensor_parallel_size"] * engine.get("pipeline_parallel_size", 1)
    assert gpu["resources"]["GPU"] >= tp
    assert gpu["resources"][f"accelerator_type:{qwen['accelerator_type']}"] >= 1
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= autoscaling["min_replicas"] * tp
    assert capacity == gpu["max_workers"] * 2 >= autoscaling["max_replicas"]  # two TP-4 replicas per node
    assert main([str(CLUSTER_YAML), str(QWEN_YAML)]) == 0


def _gpu_node(prepared, **resources):
    prepared["available_node_types"]["gpu_worker"]["resources"].update(resources)
    return prepared


@pytest.mark.parametrize("change, expected", [
    (lambda c, q: _gpu_node(c, GPU=2), "GPU 2 < tensor_parallel_size"),                 # TP 4 on 2 GPUs
    (lambda c, q: q.update(accelerator_type="A100"), "accelerator_type:A100"),            # no A100 nodes
    (lambda c, q: _gpu_node(c, CPU=16), "STRICT_PACK needs"),                             # 17 CPUs per replica
    (lambda c, q: q["placement_group_config"]["bundle_per_worker"].update(CPU=48), "STRICT_PACK needs"),
    (lambda c, q: c["available_node_types"]["gpu_worker"].update(max_workers=0), "min_replicas 1 > 0"),
    (lambda c, q: q["deployment_config"]["autoscaling_config"].update(max_replicas=9), "max_replicas 9 > 8"),
    (lambda c, q: (c.update(max_workers=1), q["deployment_config"]["autoscaling_config"].update(max_replicas=3)),
     "max_replicas 3 > 2"),                                                     # global cap: 1 node of 2 replicas
], ids=["gpu-2-tp-4", "wrong-accelerator", "cpu-short", "bundle-cpu", "no-gpu-nodes", "too-many-replicas",
        "global-max-workers"])
def test_hosting_check_refuses_what_cannot_fit(cluster, qwen, change, expected):
    prepared = validate_cluster(cluster)
    change(prepared, qwen)
    problems = llm_problems(prepared, qwen)
    assert problems and any(expected in p for p in problems), problems


def test_node_check_gpu_2_fails_tp_4(qwen):
    node = {"resources": {"CPU": 192, "GPU": 2, "accelerator_type:H100": 1}}
    assert any("GPU 2" in p for p in node_problems(node, qwen))
    node["resources"]["GPU"] = 4
    assert node_problems(node, qwen) == []


def test_cli_fails_on_a_cluster_that_cannot_host(tmp_path, cluster):
    cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 2
    broken = tmp_path / "cluster.yaml"
    broken.write_text(yaml.safe_dump(cluster))
    assert main([str(broken), str(QWEN_YAML)]) == 1


# --------------------------------------------------------------------------- the 32B and 7B configs

SERVE_CONFIGS = {name: ROOT / "serve_configs" / f"{name}.yaml" for name in ("qwen2_5_vl_72b", "qwen2_5_vl_32b", "qwen2_5_vl_7b")}
LLM = "applications[llm].args.llm_configs[0]"
# What may differ between the three files: the model and how many GPUs a replica and a node take.
MODEL_KEYS = {f"{LLM}.model_loading_config.model_id", f"{LLM}.model_loading_config.model_source",
              f"{LLM}.engine_kwargs.tensor_parallel_size", f"{LLM}.deployment_config.autoscaling_config.max_replicas",
              "applications[annotator].args.annotate.llm.model"}


def _leaves(node, path: str = "") -> dict:
    """{dotted path: value} of every leaf; the applications by name, other lists by index."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{path}.{key}" if path else key).items()}
    if isinstance(node, list):
        named = all(isinstance(i, dict) and "name" in i for i in node) and node
        return {k: v for n, sub in enumerate(node)
                for k, v in _leaves(sub, f"{path}[{sub['name'] if named else n}]").items()}
    return {path: node}


def test_the_serve_configs_differ_only_in_the_model_and_its_gpus():
    """Equal outside MODEL_KEYS, so a fix to one file that is not made to the others fails here."""
    leaves = {name: _leaves(yaml.safe_load(path.read_text())) for name, path in SERVE_CONFIGS.items()}
    base = leaves["qwen2_5_vl_72b"]
    for name, other in leaves.items():
        assert other.keys() == base.keys(), (name, other.keys() ^ base.keys())
        differing = {k for k in base if other[k] != base[k]}
        assert differing <= MODEL_KEYS, (name, differing - MODEL_KEYS)
        assert other[f"{LLM}.model_loading_config.model_id"] == other["applications[annotator].args.annotate.llm.model"]
    assert [leaves[n][f"{LLM}.engine_kwargs.tensor_parallel_size"] for n in SERVE_CONFIGS] == [4, 2, 1]


@pytest.mark.parametrize("name, per_node", [("qwen2_5_vl_72b", 2), ("qwen2_5_vl_32b", 4), ("qwen2_5_vl_7b", 8)])
def test_cluster_hosts_each_serve_config(cluster, name, per_node):
    """Ray's own schemas accept the file; on cluster.yaml's 8×H100 nodes a replica fits, `per_node`
    replicas share a node (TP 4, 2, 1) and max_replicas fits one node's worth."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig as ServeLLMConfig
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIGS[name].read_text())
    ServeDeploySchema.model_validate(config)
    (llm,) = llm_configs(config)
    ServeLLMConfig.model_validate(llm)
    prepared = validate_cluster(cluster)
    assert llm_problems(prepared, llm) == []
    hosts, capacity = hosting(prepared, llm)
    assert list(hosts) == ["gpu_worker"]
    assert replicas_per_node(prepared["available_node_types"]["gpu_worker"], llm) == per_node
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == per_node <= capacity
    assert main([str(CLUSTER_YAML), str(SERVE_CONFIGS[name])]) == 0


def test_on_smaller_nodes_the_check_names_max_replicas_to_edit(cluster):
    """One 4-GPU node (e.g. 4×L40S): a replica of each still fits — the 7B four to the node, the 32B
    two, the 72B one — but each file's max_replicas (one 8-GPU node's worth) does not, and the check
    says so with the number that fits."""
    prepared = validate_cluster(cluster)
    node = prepared["available_node_types"]["gpu_worker"]
    node["resources"].update(GPU=4, CPU=48)
    node["max_workers"] = 1
    for name, per_node in {"qwen2_5_vl_72b": 1, "qwen2_5_vl_32b": 2, "qwen2_5_vl_7b": 4}.items():
        (llm,) = llm_configs(yaml.safe_load(SERVE_CONFIGS[name].read_text()))
        assert replicas_per_node(node, llm) == per_node
        max_replicas = llm["deployment_config"]["autoscaling_config"]["max_replicas"]
        assert llm_problems(prepared, llm) == [f"max_replicas {max_replicas} > {per_node}, the replicas node types "
                                               "['gpu_worker'] hold at their max_workers"]
