"""Session-wide heavy fixtures: a local Ray with declared fake GPUs, tiny random-weight models,
the demo dataset with its trained SAE. Nothing is downloaded."""

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s by default; the tests' runs last seconds.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray exports metrics (vLLM's prefix-cache counters among them, tests/test_vllm_serving.py) every
# 10 s by default; the tests read them after a few seconds of traffic.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray that declares 1 GPU: the encoder pool asks for num_gpus=1 exactly as in
    production and the actor falls back to the CPU (no CUDA here)."""
    import ray

    # address="local": always a fresh Ray, never a cluster a test (or anyone) started with `ray start`.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    from pipeline.demo.tiny_models import make_tiny_dinov2

    return make_tiny_dinov2(tmp_path_factory.mktemp("models") / "dinov2-tiny")


@pytest.fixture(scope="session")
def demo_dir(ray_local, tmp_path_factory):
    """Demo data (12 images per species) + tiny backbone + demo SAE trained on Ray Train."""
    from pipeline.demo.run import prepare_demo

    out = tmp_path_factory.mktemp("demo")
    prepare_demo(out, images_per_species=12, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def demo_build(ray_local, demo_dir, tmp_path_factory):
    """(output folder, manifest) of a clean demo build (annotate.llm.kind none) on the session Ray."""
    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    out = tmp_path_factory.mktemp("clean") / "build"
    # encoder.num_cpus below 1: decode tasks must still fit if the Serve app's tests hold part of the 2 CPUs.
    manifest = Build(demo_build_config(demo_dir, [f"output={out}", "encoder.num_gpus=1", "encoder.num_cpus=0.25"])).run()
    return out, manifest


# The demo_build fixture's wall time on an idle 2-core machine. Tests that wait for a build scale
# their liveness bounds by how much slower this run's own clean build was (load_factor): a busy
# machine slows both alike, and a bound that load alone can break says nothing about the code.
DEMO_BUILD_IDLE_S = 10.0  # measured: 9.0-9.9 s (count..annotate run in the driver for a build this small)


@pytest.fixture(scope="session")
def load_factor(demo_build) -> float:
    """How much slower than on an idle machine this test run builds (at least 1)."""
    _, manifest = demo_build
    return max(1.0, manifest["wall_s"] / DEMO_BUILD_IDLE_S)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (http://127.0.0.1:PORT) of a moto S3 server, a process of its own that Ray
    workers reach over HTTP; any key/secret (s3_server.FAKE_KEY / FAKE_SECRET) is accepted."""
    import shutil

    from tests.s3_server import MotoS3Server

    with MotoS3Server() as server:
        yield server.url
    shutil.rmtree(TEST_MODEL_CACHE, ignore_errors=True)


# Set before the session Ray starts, so its workers inherit them: botocore never probes the EC2
# instance-metadata address for credentials, and remote models copied by storage.local_copy go to
# a cache of this test run (removed by the s3_server fixture), not ~/.cache/sae-traits.
TEST_MODEL_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sae-traits-test-cache-{os.getpid()}")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# The Hugging Face hub cache of this test run (tests/test_hub.py fills it; nothing is downloaded).
os.environ.setdefault("HF_HUB_CACHE", os.path.join(TEST_MODEL_CACHE, "hub"))
os.environ.setdefault("SAE_TRAITS_CACHE", TEST_MODEL_CACHE)
