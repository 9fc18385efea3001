"""The ad-hoc endpoint's request handling without Ray: each kind of input that once answered 500
(found by fuzzing the running app) is a 4xx that says what is wrong; bodies are bounded in size
and in time; the app refuses to serve the network without a token."""

import asyncio
import json
from pathlib import Path

import pytest
import requests
from starlette.exceptions import HTTPException  # FastAPI's is a subclass; Starlette's form parser raises this one
from starlette.requests import Request

from pipeline.config import AnnotatorAppConfig, ConfigError
from pipeline.endpoint import (MAX_TEXT_CHARS, BuildCatalog, RequestLimits, check_open_access, max_body_bytes, read_request,
                               text_field)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = RequestLimits(max_upload_bytes=10_000, body_read_timeout_s=5)


def request(body: bytes, content_type: str, *, chunks: int = 1, delay_s: float = 0.0,
            headers: list[tuple[bytes, bytes]] = (), declared: int | None = None) -> Request:
    """An ASGI request whose body arrives in ``chunks`` pieces, ``delay_s`` apart."""
    size = -(-len(body) // chunks) or 1
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    received = []

    async def receive():
        if len(received) == len(pieces):
            return {"type": "http.disconnect"}
        await asyncio.sleep(delay_s)
        received.append(pieces[len(received)])
        return {"type": "http.request", "body": received[-1], "more_body": len(received) < len(pieces)}

    head = [(b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body) if declared is None else declared).encode()), *headers]
    req = Request({"type": "http", "method": "POST", "path": "/annotate", "headers": head, "app": None}, receive)
    req.chunks_received = received
    return req


def refused(req: Request, limits: RequestLimits = LIMITS) -> HTTPException:
    with pytest.raises(HTTPException) as err:
        asyncio.run(read_request(req, limits))
    return err.value


def multipart(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


@pytest.mark.parametrize("body, status, says", [
    (b'{"image_base64": "AAAA", "species": "\xff"}', 400, "not UTF-8"),           # was UnicodeDecodeError → 500
    (b"[" * 30_000 + b"]" * 30_000, 400, "nested too deeply"),                      # was RecursionError → 500
    (json.dumps({"image_base64": "AAAA", "build": "a\x00b"}).encode(), 400, "build: control characters"),
    (b'{"image_base64": "AAAA", "build": "\\ud800"}', 400, "build: not valid Unicode"),  # a lone surrogate
    (b'{"image_base64": "AAAA", "species": "Aus\\nbus"}', 400, "species: control characters"),
    (b"{not json", 400, "not valid JSON"),
])
def test_json_bodies_that_cannot_be_read_are_4xx(body, status, says):
    err = refused(request(body, "application/json"))
    assert err.status_code == status and says in err.detail


def test_multipart_is_exact_on_binary_and_strict_on_fields():
    payload = bytes(range(256)) * 4 + b"\r\n--x\r\n\r\n"
    body, content_type = multipart({"image": ("a.png", payload, "image/png")}, {"species": " Aus bus "})
    assert asyncio.run(read_request(request(body, content_type, chunks=7), LIMITS)) == \
        {"image": payload, "species": "Aus bus"}
    cases = [
        (multipart({"image": ("a.png", payload), "colour": (None, "red")}), 422, "unknown form field(s) ['colour']"),
        (multipart({"species": (None, "Aus bus")}), 400, "no image"),
        (multipart([("image", (None, "not a file part")), ("genus", (None, "Aus"))]), 400, "image: send the photo as a file part"),
        (multipart({"image": ("a.png", payload), "genus": ("g.txt", b"Aus")}), 400, "genus: send it as a text field"),
        (multipart([("image", ("a.png", payload)), ("image", ("b.png", payload))]), 400, "image: send it once"),
        (multipart({"image": ("a.png", payload), "species": (None, "x" * 5000)}), 400, "species: 5000 characters > maxLength 4096"),
    ]
    for (body, content_type), status, says in cases:
        err = refused(request(body, content_type))
        assert err.status_code == status and says in err.detail, (says, err.detail)


def test_rfc_2231_parameters_are_refused_not_a_500():
    """RFC 7578 (4.2) has no place for RFC 2231 ``name*=`` / ``boundary*=`` in a form: once a 500
    (AttributeError in the hand-written parser), now Starlette's 400."""
    body = (b"--abc\r\nContent-Disposition: form-data; name*=utf-8''image; filename=\"a.png\"\r\n\r\nPNG\r\n"
            b"--abc--\r\n")
    for content_type in ("multipart/form-data; boundary*=utf-8''abc", "multipart/form-data; boundary=abc",
                         "multipart/form-data"):
        assert refused(request(body, content_type)).status_code == 400


def test_an_oversize_body_is_refused_from_its_declared_length_before_a_byte_is_read():
    req = request(b"x" * 200_000, "application/json")
    assert refused(req).status_code == 413 and req.chunks_received == []
    # A body longer than it says (or chunked): cut off as soon as it passes the limit.
    body, content_type = multipart({"image": ("a.png", b"x" * 200_000)})
    req = request(body, content_type, chunks=100, declared=0)
    err = refused(req)
    assert err.status_code == 413 and "max_upload_bytes" in err.detail
    assert sum(map(len, req.chunks_received)) <= max_body_bytes(LIMITS.max_upload_bytes) + len(body) // 100 + 1  # the rest never read


@pytest.mark.parametrize("declared", ["9" * 19, "9" * 30, "9" * 5000, "0" * 30 + "1" + "0" * 18])
def test_an_absurd_declared_length_is_413_not_a_conversion_error(declared):
    """Lengths past int64 (and past Python's 4,300-digit int conversion) are over any limit."""
    req = request(b"{}", "application/json", headers=[], declared=None)
    req.scope["headers"] = [(b"content-type", b"application/json"), (b"content-length", declared.encode())]
    err = refused(req)
    assert err.status_code == 413 and req.chunks_received == []


def json_body(fields: dict) -> tuple[bytes, str]:
    return json.dumps({"image_base64": "AAAA", **fields}).encode(), "application/json"


def form_body(fields: dict) -> tuple[bytes, str]:
    return multipart({"image": ("a.png", b"\x00\x00\x00")}, fields)


@pytest.mark.parametrize("value, status, says", [
    ("\x85Aus", 400, "control characters"), ("Aus\x0b", 400, "control characters"), ("\x1fAus bus", 400, "control characters"),
    ("Aus\tbus", 400, "control characters"), ("x" * (MAX_TEXT_CHARS + 1), 400, "maxLength 4096"),
    ("é" * (MAX_TEXT_CHARS + 1), 400, "maxLength 4096"), ("x" * 100_000, 400, ""),
    (" Aus bus ", None, "Aus bus"), ("\u00a0Aus bus", None, "Aus bus"), ("é" * MAX_TEXT_CHARS, None, "é" * MAX_TEXT_CHARS),
])
def test_one_text_field_rule_for_every_encoding(value, status, says):
    """The same species value answers the same in a JSON body and in a form: control characters are
    refused at the ends as in the middle (nothing is stripped before the check), the schema's
    maxLength counts characters in both, and the spaces around a good value are stripped in both."""
    for body, content_type in (json_body({"species": value}), form_body({"species": value})):
        if status is None:
            assert asyncio.run(read_request(request(body, content_type), LIMITS))["species"] == says
        else:
            err = refused(request(body, content_type))
            assert err.status_code == status and says in err.detail, (content_type, err.detail)


def test_a_json_key_given_twice_is_refused_like_a_repeated_form_field():
    body = b'{"image_base64": "AAAA", "species": "Aus bus", "species": "Aus cus"}'
    err = refused(request(body, "application/json"))
    assert err.status_code == 400 and err.detail == "species: send it once per request"
    err = refused(request(*form_body([("species", "Aus bus"), ("species", "Aus cus")])))
    assert err.status_code == 400 and err.detail == "species: send it once per request"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_json_body_not_in_utf8_is_refused(encoding):
    """json.loads of bytes guesses UTF-16 and UTF-32; the contract (and the front) say UTF-8."""
    body = json.dumps({"image_base64": "AAAA", "species": "Aus bus"}).encode(encoding)
    err = refused(request(body, "application/json"))
    assert err.status_code == 400 and "not UTF-8" in err.detail


def test_the_largest_photo_fits_the_body_limit_in_either_encoding():
    """max_body_bytes is computed, not guessed: a photo of max_upload_bytes with every text field at
    its longest and worst-escaped (astral characters as \\uXXXX pairs) still fits, as JSON or a form."""
    photo = bytes(range(256)) * (LIMITS.max_upload_bytes // 256) + b"x" * (LIMITS.max_upload_bytes % 256)
    worst = "\U0001F41E" * MAX_TEXT_CHARS  # 🐞: 4 bytes of UTF-8, 12 as escaped JSON
    import base64
    as_json = json.dumps({"image_base64": base64.b64encode(photo).decode(), "species": worst, "genus": worst,
                          "build": worst}, indent=1).encode()  # ensure_ascii: every character escaped
    as_form, _ = multipart({"image": ("a-long-file-name.png", photo)}, {"species": worst, "genus": worst, "build": worst})
    limit = max_body_bytes(LIMITS.max_upload_bytes)
    assert len(as_form) < len(as_json) <= limit, (len(as_form), len(as_json), limit)


def test_a_body_that_arrives_too_slowly_is_cut_off():
    body, content_type = multipart({"image": ("a.png", b"x" * 1000)})
    slow = RequestLimits(max_upload_bytes=10_000, body_read_timeout_s=0.3)
    err = refused(request(body, content_type, chunks=10, delay_s=0.1), slow)
    assert err.status_code == 408 and "body_read_timeout_s=0.3" in err.detail
    asyncio.run(read_request(request(body, content_type, chunks=2, delay_s=0.1), slow))  # in time: read




def test_a_build_path_that_no_file_system_takes_is_400(tmp_path):
    catalog = BuildCatalog(str(tmp_path), None)
    for bad in ("a\x00b", "\udcff", "x\n"):
        with pytest.raises(HTTPException) as err:
            catalog.resolve(bad)
        assert err.value.status_code == 400
    assert text_field("genus", " Aus ") == "Aus"  # ordinary text passes


def test_a_link_loop_in_builds_root_is_400_never_500(tmp_path):
    """A build folder, its manifest or a candidates/ file that is a link to itself (or in a ring):
    the same 400 as any unusable build, not the RuntimeError of resolving it."""
    root = tmp_path / "builds"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")                     # the folder itself
    (root / "ring-a").symlink_to(root / "ring-b")
    (root / "ring-b").symlink_to(root / "ring-a")
    for name, link in (("manifest", "manifest.json"), ("candidate", "candidates/part-0.parquet")):
        (root / name / "candidates").mkdir(parents=True)
        (root / name / link).symlink_to(root / name / link)      # a file inside it
    catalog = BuildCatalog(str(root), None)
    for build in ("loop", "ring-a", "manifest", "candidate"):
        with pytest.raises(HTTPException) as err:
            catalog.selected(build, "Aus bus")
        assert err.value.status_code == 400 and build in err.value.detail, (build, err.value.detail)


@pytest.mark.parametrize("host, token, allow_anonymous, opens", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True), ("::1", None, False, True),
    ("0.0.0.0", None, False, False), ("10.0.0.5", None, False, False), ("head.example.org", None, False, False),
    ("0.0.0.0", "t0ken", False, True), ("0.0.0.0", None, True, True),
])
def test_the_network_gets_the_endpoint_only_with_a_token(host, token, allow_anonymous, opens):
    cfg = AnnotatorAppConfig.model_validate({"sae": {"checkpoint": "x"}, "annotate": {"llm": {"kind": "openai", "base_url": "http://x/v1", "model": "m"}},
                                             "allow_anonymous": allow_anonymous})
    if opens:
        check_open_access(host, cfg, token)
    else:
        with pytest.raises(ConfigError, match=f"listens on {host}.*SAE_TRAITS_TOKEN.*allow_anonymous: true"):
            check_open_access(host, cfg, token)


@pytest.mark.parametrize("headers, token, status", [
    (["Bearer t0ken"], "t0ken", None), (["Bearer t0ken", "Bearer wrong"], "t0ken", 400),
    (["Bearer wrong", "Bearer t0ken"], "t0ken", 400), (["Bearer t0ken", "Bearer t0ken"], "t0ken", 400),
    ([], "t0ken", 401), (["Bearer wrong"], "t0ken", 401), (["Basic t0ken"], "t0ken", 401),
    ([], None, None), (["Bearer a", "Bearer b"], None, 400),
])
def test_exactly_one_authorization_header(headers, token, status):
    from pipeline.endpoint import check_bearer

    if status is None:
        check_bearer(headers, token)
        return
    with pytest.raises(HTTPException) as err:
        check_bearer(headers, token)
    assert err.value.status_code == status
    assert ("send exactly one" in err.value.detail) == (status == 400)


def test_build_names_are_relative_to_builds_root_and_no_link_in_a_build_leads_out(tmp_path):
    root, elsewhere = tmp_path / "builds", tmp_path / "elsewhere"
    for folder in (root / "demo" / "candidates", elsewhere / "candidates"):
        folder.mkdir(parents=True)
        (folder.parent / "manifest.json").write_text("{}")
        (folder / "part-0.parquet").write_bytes(b"x")
    catalog = BuildCatalog(str(root), None)
    assert catalog.resolve("demo") == (root / "demo").resolve()  # not the server's working directory
    assert catalog.resolve(str(root / "demo")) == (root / "demo").resolve()
    (root / "linked").symlink_to(elsewhere)  # the folder itself leads out
    (root / "inner" / "candidates").mkdir(parents=True)
    (root / "inner" / "manifest.json").symlink_to(elsewhere / "manifest.json")  # a file in it leads out
    (root / "deep" / "candidates").mkdir(parents=True)
    (root / "deep" / "manifest.json").write_text("{}")
    (root / "deep" / "candidates" / "part-0.parquet").symlink_to(elsewhere / "candidates" / "part-0.parquet")
    for name in ("../elsewhere", str(elsewhere), "linked", "inner", "deep"):
        with pytest.raises(HTTPException) as err:
            catalog.resolve(name)
        assert err.value.status_code == 403 and "outside builds_root" in err.value.detail, name


def test_a_photo_cut_short_in_its_header_is_truncated_like_one_cut_later():
    """The endpoint answers 400 for both (REJECT_STATUS maps only other reasons); a build's errors/
    says truncated for both."""
    import io

    from PIL import Image

    from pipeline.config import PreprocessConfig
    from pipeline.endpoint import REJECT_STATUS
    from pipeline.errors import ImageRejected
    from pipeline.preprocessing import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buf, "JPEG")
    jpeg = buf.getvalue()
    reasons = []
    for data in (jpeg[:200], jpeg[:20], jpeg[: len(jpeg) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        with pytest.raises(ImageRejected) as err:
            decode_image(data, PreprocessConfig())
        reasons.append(err.value.reason)
    assert reasons == ["truncated"] * 4 and REJECT_STATUS.get("truncated", 400) == 400


def test_the_published_contract_has_no_cdn_pages_and_lists_every_status_of_the_probe():
    from actors.serve_app import api
    from pipeline.endpoint import openapi_document

    assert api.docs_url is None and api.redoc_url is None  # FastAPI's pages load scripts from a public CDN
    try:
        doc = openapi_document(api, token_required=True)
        assert set(doc["paths"]["/healthz"]["get"]["responses"]) == {"200", "503"}
        assert {"400", "401", "503"} <= set(doc["paths"]["/annotate"]["post"]["responses"])
    finally:
        api.openapi_schema = None  # the app's own replica builds it with its token setting


@pytest.mark.parametrize("value, says", [
    (b"Aus \xe9bus", "species: not UTF-8 text"),            # latin-1 bytes: was decoded as latin-1 and accepted
    ("Aus \x85bus".encode(), "species: control characters"),  # C1 (NEL), in UTF-8: was let through
    ("Aus bus\x9b".encode(), "species: control characters"),
])
def test_multipart_text_fields_are_utf_8_without_controls_as_in_json(value, says):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nPNGDATA\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"species\"\r\n\r\n").encode() + value + f"\r\n--{boundary}--\r\n".encode()
    err = refused(request(body, f"multipart/form-data; boundary={boundary}"))
    assert err.status_code == 400 and says in err.detail, err.detail
    good = body.replace(value, "Aus ébus".encode())
    assert asyncio.run(read_request(request(good, f"multipart/form-data; boundary={boundary}"), LIMITS))["species"] == "Aus ébus"
    json_err = refused(request(b'{"image_base64": "AAAA", "species": "' + value + b'"}', "application/json"))
    assert json_err.status_code == 400 and ("not UTF-8" in json_err.detail or says in json_err.detail)


def test_admission_sheds_beyond_slots_and_queue_with_a_body_that_names_no_setting():
    from pipeline.endpoint import Admission

    async def scenario():
        admission = Admission(slots=2, queued=1, retry_after_s=2)
        release = asyncio.Event()
        order = []

        async def work(name):
            try:
                async with admission.slot():
                    order.append(f"in {name}")
                    await release.wait()
            except HTTPException as exc:
                order.append(f"shed {name}")
                return exc

        tasks = [asyncio.create_task(work(n)) for n in "abcd"]
        await asyncio.sleep(0.05)
        assert order == ["in a", "in b", "shed d"] and admission.waiting == 1  # c waits, d is shed
        release.set()
        results = await asyncio.gather(*tasks)
        assert order[-1] == "in c" and admission.waiting == 0
        return results[3]

    shed = asyncio.run(scenario())
    assert shed.status_code == 503 and shed.headers == {"Retry-After": "2"}
    assert "queue is full" in shed.detail and "=" not in shed.detail  # no internal settings


def test_headers_over_the_limit_are_431_on_every_route():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.endpoint import HeaderLimit

    app = FastAPI()
    app.add_middleware(HeaderLimit)
    app.state.max_header_bytes = 2048
    app.get("/healthz")(lambda: {"status": "ok"})
    client = TestClient(app)
    assert client.get("/healthz").status_code == 200
    r = client.get("/healthz", headers={"x-junk": "j" * 4096})
    assert r.status_code == 431 and "max_header_bytes=2048" in r.json()["detail"]
    assert client.get("/openapi.json", headers={"x-junk": "j" * 4096}).status_code == 431
    app.post("/annotate")(lambda: {})
    app.state.max_header_bytes = 16 * 1024  # the config's default
    r = client.post("/annotate", json={}, headers={"x-junk": "j" * 20_000})
    assert r.status_code == 431 and "max_header_bytes=16384" in r.json()["detail"]


@pytest.mark.parametrize("name", ["local_cpu.yaml", "qwen2_5_vl_72b.yaml"])
def test_the_front_takes_its_limits_from_the_serve_config_it_fronts(name, tmp_path, capsys):
    """`sae-traits front --print-env`: the front's body limit, body timeout and header limit are the
    app's own settings (a changed max_upload_bytes moves the front's limit with it); Serve's address
    is the config's http_options; a config the app would refuse is refused naming the key."""
    import yaml

    from pipeline.front import main as front

    config = yaml.safe_load((ROOT / "serve_configs" / name).read_text())
    app = next(a for a in config["applications"] if a["import_path"] == "actors.serve_app:build_annotator_app")
    app["args"].update(max_upload_bytes=1_000_000, body_read_timeout_s=7, max_header_bytes=8192)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    assert front(["--config", str(tmp_path / "serve.yaml"), "--listen", ":9443", "--print-env"]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.split())
    http = config.get("http_options", {})
    assert env == {"FRONT_LISTEN": ":9443", "FRONT_HEADER_TIMEOUT": "10s", "FRONT_BODY_TIMEOUT": "7s",
                   "FRONT_MAX_HEADER": "8192", "FRONT_MAX_BODY_BYTES": str(max_body_bytes(1_000_000)),
                   "SERVE_ADDRESS": f"{'127.0.0.1' if http.get('host', '127.0.0.1') in ('0.0.0.0', '::') else http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"}
    app["args"]["max_upload_bytes"] = 0
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    assert front(["--config", str(tmp_path / "serve.yaml"), "--print-env"]) == 2
    assert "max_upload_bytes" in capsys.readouterr().err
