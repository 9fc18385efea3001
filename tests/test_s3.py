"""s3:// everywhere, against a moto S3 server (a real HTTP endpoint on 127.0.0.1): the storage
section → fsspec options, the per-node copy of remote models, Ray Data Parquet through the
pyarrow wrapper, and a whole demo build that reads its images, backbone and SAE from S3 and
writes every table there — equal to the local clean build.

Ray workers of the session Ray do not see environment variables set after it started, so the
build gets its endpoint and (fake) credentials through config keys; the AWS_* variable path is
tested in-process."""

import json
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.config import BuildConfig, ConfigError, fsspec_options, load_config, validate
from tests.s3_server import FAKE_KEY, FAKE_SECRET, client, demo_on_s3, storage_keys, upload

MINIMAL = {"source": {"format": "bioscan", "root": "s3://data/bioscan"}, "sae": {"checkpoint": "s3://models/sae"},
           "output": "s3://builds/run1"}


def section(endpoint: str) -> dict:
    """The storage section a test build uses: endpoint and fake credentials as config keys."""
    return {"endpoint_url": endpoint, "options": {"key": FAKE_KEY, "secret": FAKE_SECRET}}


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket name (the server lives for the session)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client(s3_server).mkdir(name)
    return name


# --------------------------------------------------------------------------- storage section → fsspec options

def test_storage_section_becomes_s3fs_arguments(monkeypatch):
    monkeypatch.setenv("MY_S3_KEY", "AKIA-from-env")
    monkeypatch.setenv("MY_S3_SECRET", "secret-from-env")
    monkeypatch.setenv("MY_S3_TOKEN", "token-from-env")
    cfg = {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key_env": "MY_S3_KEY",
           "secret_env": "MY_S3_SECRET", "token_env": "MY_S3_TOKEN",
           "options": {"client_kwargs": {"verify": False}, "config_kwargs": {"connect_timeout": 5}}}
    retries = {"retries": {"mode": "standard", "total_max_attempts": 8}}  # the section's default retry policy
    assert fsspec_options(cfg, "s3://bucket/key") == {
        "use_listings_cache": False, "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1", "verify": False},
        "config_kwargs": {"connect_timeout": 5, **retries}, "give_up_after_s": 30.0,
        "key": "AKIA-from-env", "secret": "secret-from-env", "token": "token-from-env"}
    assert fsspec_options({"anon": True}, "s3://public/x") == {"use_listings_cache": False, "anon": True,
                                                               "config_kwargs": retries, "give_up_after_s": 30.0}
    policy = fsspec_options({"max_attempts": 3, "retry_mode": "adaptive", "give_up_after_s": 5}, "s3://b/x")
    assert policy["config_kwargs"] == {"retries": {"mode": "adaptive", "total_max_attempts": 3}}
    assert policy["give_up_after_s"] == 5
    # botocore's own retries config in the options replaces the policy (not merged into it).
    mine = {"options": {"config_kwargs": {"retries": {"max_attempts": 2}}}}
    assert fsspec_options(mine, "s3://b/x")["config_kwargs"] == {"retries": {"max_attempts": 2}}
    # Only s3:// URLs get s3 options: local paths, hub ids and other stores get none.
    for url in ("/data/x", "file:///data/x", "facebook/dinov2-base", "gs://bucket/x", "memory://x"):
        assert fsspec_options(cfg, url) == {}, url
    # Per-path overrides (source.storage_options) win over the section.
    assert fsspec_options(cfg, "s3://b/x", {"endpoint_url": "http://other:1"})["endpoint_url"] == "http://other:1"
    assert fsspec_options(None, "/local", {"auto_mkdir": True}) == {"auto_mkdir": True}


def test_credentials_are_read_when_a_path_is_opened_and_never_dumped(monkeypatch):
    cfg = validate(BuildConfig, {**MINIMAL, "storage": {"key_env": "MY_S3_KEY", "secret_env": "MY_S3_SECRET"}})
    with pytest.raises(ConfigError, match="storage.key_env: environment variable MY_S3_KEY is not set"):
        cfg.storage_options
    monkeypatch.setenv("MY_S3_KEY", "AKIA-SECRET-VALUE")
    monkeypatch.setenv("MY_S3_SECRET", "very-secret")
    assert cfg.storage_options["key"] == "AKIA-SECRET-VALUE" and cfg.storage_options["secret"] == "very-secret"
    dumped = cfg.model_dump_json()
    assert "MY_S3_KEY" in dumped and "AKIA-SECRET-VALUE" not in dumped and "very-secret" not in dumped


@pytest.mark.parametrize("storage_section,key", [
    ({"endpoint_url": "127.0.0.1:9000"}, "storage.endpoint_url"),
    ({"endpont_url": "http://x"}, "storage.endpont_url"),
    ({"key_env": "K"}, "storage: Value error, set key_env and secret_env together"),
    ({"anon": True, "key_env": "K", "secret_env": "S"}, "storage: Value error, anon"),
    ({"options": "endpoint_url=x"}, "storage.options"),
])
def test_bad_storage_keys_are_named(storage_section, key):
    with pytest.raises(ConfigError) as err:
        validate(BuildConfig, {**MINIMAL, "storage": storage_section})
    assert key in str(err.value)
    with pytest.raises(ConfigError) as err:  # the helper refuses the same dict, naming the same key
        fsspec_options(storage_section, "s3://b/x")
    assert key in str(err.value)


def test_storage_keys_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(MINIMAL))
    cfg = load_config(BuildConfig, path, ["storage.endpoint_url=http://127.0.0.1:9000", "storage.region=eu-west-1"])
    assert cfg.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="storage.endpoint_url"):
        load_config(BuildConfig, path, ["storage.endpoint_url=localhost"])


def test_outputs_and_source_take_the_section_and_the_source_its_own_keys_on_top():
    import pickle

    cfg = validate(BuildConfig, {**MINIMAL, "storage": {"endpoint_url": "http://a:1", "region": "r1"},
                                 "source": {**MINIMAL["source"], "storage_options": {"endpoint_url": "http://b:2"}}})
    assert cfg.storage_options["endpoint_url"] == "http://a:1"            # the output
    assert cfg.options_for(cfg.sae.checkpoint)["endpoint_url"] == "http://a:1"
    source = cfg.source.fsspec_options
    assert source["endpoint_url"] == "http://b:2" and source["client_kwargs"] == {"region_name": "r1"}
    # The section travels with a pickled SourceConfig (as into a Ray task) but not into a dump.
    assert pickle.loads(pickle.dumps(cfg.source)).fsspec_options == source
    assert "_storage" not in cfg.source.model_dump()
    local = validate(BuildConfig, {**MINIMAL, "output": "/tmp/out", "storage": {"endpoint_url": "http://a:1"}})
    assert local.storage_options == {}


def test_aws_environment_variables_reach_s3_without_a_storage_section(s3_server, bucket, monkeypatch):
    client(s3_server).pipe(f"{bucket}/env/hello.txt", b"hello")
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{bucket}/env/hello.txt"
    fs, path = storage.filesystem(url, fsspec_options(None, url) | {"skip_instance_cache": True})
    assert fs.cat(path) == b"hello"
    # The same through the section's *_env keys (credentials in variables of our own naming).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("BUILD_S3_KEY", FAKE_KEY)
    monkeypatch.setenv("BUILD_S3_SECRET", FAKE_SECRET)
    opts = fsspec_options({"endpoint_url": s3_server, "key_env": "BUILD_S3_KEY", "secret_env": "BUILD_S3_SECRET"}, url)
    fs, path = storage.filesystem(url, opts | {"skip_instance_cache": True})
    assert fs.cat(path) == b"hello"


# --------------------------------------------------------------------------- local copies of remote models

def test_local_copy_downloads_once_then_never_asks_the_store(s3_server, bucket, tmp_path):
    fs = client(s3_server)
    fs.pipe({f"{bucket}/model/config.json": b'{"a": 1}', f"{bucket}/model/weights/part-0.bin": b"0" * 1000,
             f"{bucket}/single.pt": b"saev"})
    opts = fsspec_options(section(s3_server), f"s3://{bucket}/model")
    cache = tmp_path / "cache"
    folder = Path(storage.local_copy(f"s3://{bucket}/model", opts, cache))
    assert folder.name == "model" and json.loads((folder / "config.json").read_text()) == {"a": 1}
    assert (folder / "weights" / "part-0.bin").read_bytes() == b"0" * 1000
    single = Path(storage.local_copy(f"s3://{bucket}/single.pt", opts, cache))
    assert single.read_bytes() == b"saev"
    fs.rm(f"{bucket}/model", recursive=True)
    fs.rm(f"{bucket}/single.pt")
    assert storage.local_copy(f"s3://{bucket}/model/", opts, cache) == str(folder)  # no request: nothing left there
    assert storage.local_copy(f"s3://{bucket}/single.pt", opts, cache) == str(single)
    assert not list(cache.glob("*.partial"))
    # Local paths and hub ids are what the loaders take as they are.
    assert storage.local_copy(str(tmp_path), opts, cache) == str(tmp_path)
    assert storage.local_copy("facebook/dinov2-base", opts, cache) == "facebook/dinov2-base"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.local_copy(f"s3://{bucket}/nothing-here", opts, cache)


def test_local_copy_is_atomic_and_made_once_per_node(s3_server, bucket, tmp_path, monkeypatch):
    fs = client(s3_server)
    fs.pipe({f"{bucket}/m/config.json": b"{}", f"{bucket}/m/model.safetensors": b"w" * 5000})
    url, cache = f"s3://{bucket}/m", tmp_path / "cache"
    opts = fsspec_options(section(s3_server), url)

    # A download that dies half-way leaves nothing a later call (or another actor) would take for a copy.
    real = storage._download

    def dies_half_way(fs_, path, dest, url_):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise ConnectionError("network gone")

    monkeypatch.setattr(storage, "_download", dies_half_way)
    with pytest.raises(ConnectionError):
        storage.local_copy(url, opts, cache)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no copy, no partial folder

    # Concurrent callers: one downloads, the others wait on the lock and never see a partial copy.
    calls, release, started = [], threading.Event(), threading.Event()

    def slow(fs_, path, dest, url_):
        calls.append(path)
        real(fs_, path, dest, url_)
        started.set()
        assert release.wait(30)

    monkeypatch.setattr(storage, "_download", slow)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(storage.local_copy(url, opts, cache))) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(30)
    time.sleep(0.2)
    finals = [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    assert finals == [] and len(list(cache.glob("*.partial"))) == 1  # complete files, but not in place yet
    release.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1
    copy = Path(results[0])
    assert (copy / "model.safetensors").read_bytes() == b"w" * 5000 and not list(cache.glob("*.partial"))


def test_sae_and_backbone_load_from_s3(s3_server, bucket, tmp_path, tiny_dinov2, monkeypatch):
    import torch

    from pipeline.encoding import PatchFeatures
    from pipeline.sae import SAESpec, SparseAutoencoder, load_sae, sae_config_json, save_sae, save_saev

    monkeypatch.setenv("SAE_TRAITS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec(d=64, m=256, metadata={"note": "on s3"}))
    save_sae(sae, tmp_path / "sae")
    save_saev(sae, tmp_path / "sae.pt")
    fs = client(s3_server)
    upload(fs, tmp_path / "sae", f"{bucket}/sae")
    fs.put_file(str(tmp_path / "sae.pt"), f"{bucket}/saev/sae.pt")
    upload(fs, Path(tiny_dinov2), f"{bucket}/dinov2-tiny")
    cfg = section(s3_server)

    url = f"s3://{bucket}/sae"
    spec = sae_config_json(url, fsspec_options(cfg, url))
    assert spec["d"] == 64 and spec["m"] == 256 and spec["metadata"] == {"note": "on s3"}
    assert sae_config_json(tmp_path / "sae") == spec                      # a local folder: the same reader
    assert sae_config_json(f"s3://{bucket}/saev/sae.pt", fsspec_options(cfg, url)) is None
    assert sae_config_json(tmp_path / "sae.pt") is None
    for remote in (url, f"s3://{bucket}/saev/sae.pt"):
        loaded = load_sae(remote, fsspec_options(cfg, remote))
        assert torch.equal(loaded.W_enc, sae.W_enc) and torch.equal(loaded.b_dec, sae.b_dec)

    remote = PatchFeatures(f"s3://{bucket}/dinov2-tiny", 1, storage=cfg)
    local = PatchFeatures(str(tiny_dinov2), 1)
    pixels = torch.randint(0, 255, (2, 56, 56, 3), dtype=torch.uint8).numpy()
    assert torch.equal(remote(pixels), local(pixels))


# --------------------------------------------------------------------------- Ray Data and the source on S3

def test_ray_data_parquet_round_trip_through_the_arrow_wrapper(ray_local, s3_server, bucket):
    import ray.data

    url = f"s3://{bucket}/out"
    opts = fsspec_options(section(s3_server), url)
    arrow_fs, root = storage.arrow_filesystem(url, opts)
    ds = ray.data.range(500, override_num_blocks=4).map_batches(lambda b: {"id": b["id"], "sq": b["id"] ** 2})
    ds.write_parquet(storage.join(root, "table"), filesystem=arrow_fs)
    back = ray.data.read_parquet(storage.join(root, "table"), filesystem=arrow_fs).take_all()
    assert sorted((r["id"], r["sq"]) for r in back) == [(i, i * i) for i in range(500)]
    fs, path = storage.filesystem(url, opts)
    assert storage.count_rows(fs, storage.join(path, "table")) == 500
    assert storage.read_table(fs, storage.join(path, "table")).num_rows == 500
    storage.write_table(fs, storage.join(path, "one", "t.parquet"), pa.table({"x": [1, 2]}))
    assert storage.read_table(fs, storage.join(path, "one")).to_pydict() == {"x": [1, 2]}


def test_source_index_and_image_bytes_from_s3(demo_dir, s3_server, bucket):
    from pipeline.demo.run import demo_build_config
    from pipeline.sources import ImageReader, build_index

    upload(client(s3_server), demo_dir / "data", f"{bucket}/data")
    local = demo_build_config(demo_dir)
    remote = validate(BuildConfig, {**local.model_dump(mode="json"), "source": {"format": "bioscan", "root": f"s3://{bucket}/data"},
                                    "storage": section(s3_server)})
    li, _ = build_index(local.source)
    ri, _ = build_index(remote.source)
    assert ri.drop(["path"]).equals(li.drop(["path"]))
    row = ri.to_pylist()[0]
    assert row["path"].startswith(f"{bucket}/data/")
    local_row = li.to_pylist()[0]
    assert ImageReader(remote.source).read(row["path"]) == Path(local_row["path"]).read_bytes()


# --------------------------------------------------------------------------- the whole build on S3

def sorted_rows(table: pa.Table, key, drop=()) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in table.to_pylist()), key=key)


def test_demo_build_reads_from_and_writes_to_s3_like_the_local_build(demo_dir, demo_build, s3_server):
    """Images, backbone and SAE on S3; every table and the manifest on S3; endpoint and
    credentials only through config keys (the session Ray's workers know no AWS variables)."""
    clean_out, clean_manifest = demo_build
    fs = client(s3_server)
    run = uuid.uuid4().hex[:8]  # fresh paths: local_copy's node cache is keyed by URL

    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    output = f"s3://builds/{run}/demo"
    cfg = demo_build_config(demo_dir, [*demo_on_s3(fs, demo_dir, run), f"output={output}",
                                       "encoder.num_gpus=1", "encoder.num_cpus=0.25", *storage_keys(s3_server)])
    start = time.perf_counter()
    manifest = Build(cfg).run()
    print(f"\nS3 demo build: {time.perf_counter() - start:.1f} s")

    root = f"builds/{run}/demo"

    def remote(name):
        return storage.read_table(fs, f"{root}/{name}")

    def local(name):
        return storage.read_table(fsspec_local(), str(clean_out / name))

    by_id = lambda r: r["image_id"]  # noqa: E731
    assert sorted_rows(remote("activations"), by_id, drop={"path"}) == sorted_rows(local("activations"), by_id, drop={"path"})
    key = lambda r: (r["rank"], r["taxon"], r["latent"])  # noqa: E731
    assert sorted_rows(remote("counts"), key) == sorted_rows(local("counts"), key)
    key = lambda r: (r["species"], r["latent"])  # noqa: E731
    assert sorted_rows(remote("selected"), key) == sorted_rows(local("selected"), key)
    key = lambda r: (r["image_id"], r["latent"])  # noqa: E731
    assert sorted_rows(remote("candidates"), key, drop={"path"}) == sorted_rows(local("candidates"), key, drop={"path"})
    key = lambda r: r["annotation_id"]  # noqa: E731
    timing = {"latency_s", "path"}
    traits = sorted_rows(remote("traits"), key, drop=timing)
    assert traits and traits == sorted_rows(local("traits"), key, drop=timing)
    assert storage.count_rows(fs, f"{root}/errors") == storage.count_rows(fsspec_local(), str(clean_out / "errors")) == 0

    written = json.loads(fs.cat(f"{root}/manifest.json"))
    assert written["status"] == "succeeded" == manifest["status"]
    rows = lambda m: {name: stage.get("rows") for name, stage in m["stages"].items()}  # noqa: E731
    assert rows(written) == rows(clean_manifest)
    assert written["config"]["storage"]["endpoint_url"] == s3_server
    # The SAE's config.json is read from S3 into the manifest, as it is from a local folder.
    assert {k: written["sae"].get(k) for k in ("d", "m", "metadata")} == \
           {k: clean_manifest["sae"].get(k) for k in ("d", "m", "metadata")}


def fsspec_local():
    import fsspec

    return fsspec.filesystem("file")
