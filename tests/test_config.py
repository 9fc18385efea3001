import subprocess
import sys

import pytest
import yaml

from pipeline.config import BuildConfig, ConfigError, load_config, parse_overrides

MINIMAL = {"source": {"format": "bioscan", "root": "/data"}, "sae": {"checkpoint": "/sae"}, "output": "/out"}


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_follow_the_paper(tmp_path):
    cfg = load_config(BuildConfig, write(tmp_path, MINIMAL))
    assert cfg.backbone.model == "facebook/dinov2-base" and cfg.backbone.layer == 10
    assert cfg.sae.threshold == 0.9 and cfg.contrast.t_freq == 3e-3
    assert cfg.preprocess.geometry == "squash" and cfg.counting.unit == "patches"
    assert cfg.annotate.llm.kind == "none"


def test_set_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(BuildConfig, write(tmp_path, MINIMAL),
                      ["contrast.t_freq=0.01", "source.splits=[train, val]", "encoder.num_gpus=0.5"])
    assert cfg.contrast.t_freq == 0.01 and cfg.source.splits == ["train", "val"] and cfg.encoder.num_gpus == 0.5


@pytest.mark.parametrize("override,key", [
    (["contrast.t_freq=2"], "contrast.t_freq"),
    (["preprocess.geometry=stretch"], "preprocess.geometry"),
    (["sae.treshold=0.5"], "sae.treshold"),
    (["encoder.min_actors=4", "encoder.max_actors=2"], "encoder"),
    (["source.format=csv"], "source.format"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(BuildConfig, write(tmp_path, MINIMAL), override)
    assert key in str(err.value)


def test_missing_required_keys_are_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(BuildConfig, write(tmp_path, {"source": {"format": "bioscan"}}))
    msg = str(err.value)
    assert "source.root" in msg and "output" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["contrast.t_freq"])


def test_cli_refuses_a_malformed_config_before_ray_starts(tmp_path):
    path = write(tmp_path, {**MINIMAL, "contrast": {"t_freq": "lots"}})
    proc = subprocess.run([sys.executable, "-m", "pipeline.build", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "contrast.t_freq" in proc.stderr
    assert "ray" not in proc.stderr.lower()  # failed before any Ray start-up logging


def test_resume_may_change_only_the_keys_marked_runtime():
    """Said on the fields (pipeline.config.runtime / fixed); these are the keys that say where or how
    fast a run goes, never what it computes."""
    from pipeline.config import TrainSAEConfig, runtime_keys

    assert set(runtime_keys(BuildConfig)) == {
        "output", "output_lease_s", "reuse", "ray.", "storage.", "report", "source.storage_options", "preprocess.batch_size",
        "encoder.batch_size", "encoder.num_gpus", "encoder.num_cpus", "encoder.min_actors", "encoder.max_actors",
        "encoder.fail_once_after_batches", "annotate.max_in_flight", "annotate.max_concurrent_batches",
        "annotate.num_actors", "annotate.num_gpus",
        "annotate.num_cpus", "annotate.batch_size", "annotate.llm.base_url", "annotate.llm.api_key_env",
        "annotate.llm.timeout_s", "annotate.llm.max_retries", "annotate.llm.backoff_s", "annotate.llm.app_name"}
    # The trainer's encoder pool and preprocessing are fixed: their batch sizes shape the shuffled batches.
    assert set(runtime_keys(TrainSAEConfig)) == {
        "output_lease_s", "ray.", "storage.", "source.storage_options", "train.steps", "train.total_patches", "train.log_every",
        "train.checkpoint_every", "train.keep_checkpoints", "train.max_failures", "train.fail_at_step"}
