"""The ad-hoc endpoint's request handling without Ray: each kind of input that once answered 500
(found by fuzzing the running app) is a 4xx that says what is wrong."""

import asyncio
import json

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from pipeline.endpoint import BuildCatalog, check_text, read_request


def request(body: bytes, content_type: str) -> Request:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/annotate", "headers": headers}, receive)


def refused(body: bytes, content_type: str) -> HTTPException:
    with pytest.raises(HTTPException) as err:
        asyncio.run(read_request(request(body, content_type), 10_000))
    return err.value


@pytest.mark.parametrize("body, status, says", [
    (b'{"image_base64": "AAAA", "species": "\xff"}', 400, "not UTF-8"),           # was UnicodeDecodeError → 500
    (b"[" * 30_000 + b"]" * 30_000, 400, "nested too deeply"),                      # was RecursionError → 500
    (json.dumps({"image_base64": "AAAA", "build": "a\x00b"}).encode(), 400, "build: control characters"),
    (b'{"image_base64": "AAAA", "build": "\\ud800"}', 400, "build: not valid Unicode"),  # a lone surrogate
    (b'{"image_base64": "AAAA", "species": "Aus\\nbus"}', 400, "species: control characters"),
    (b"{not json", 400, "not valid JSON"),
])
def test_json_bodies_that_cannot_be_read_are_4xx(body, status, says):
    err = refused(body, "application/json")
    assert err.status_code == status and says in err.detail


def test_an_rfc_2231_boundary_is_read_not_a_500():
    body = (b"--abc\r\nContent-Disposition: form-data; name=\"species\"\r\n\r\nAus bus\r\n"
            b"--abc\r\nContent-Disposition: form-data; name*=utf-8''image\r\n\r\nPNGDATA\r\n--abc--\r\n")
    fields = asyncio.run(read_request(request(body, "multipart/form-data; boundary*=utf-8''abc"), 10_000))
    assert fields == {"species": "Aus bus", "image": b"PNGDATA"}
    err = refused(body, "multipart/form-data; boundary=" + "x" * 71)
    assert err.status_code == 400 and "boundary" in err.detail


def test_a_build_path_that_no_file_system_takes_is_400(tmp_path):
    catalog = BuildCatalog(str(tmp_path), None)
    for bad in ("a\x00b", "\udcff", "x\n"):
        with pytest.raises(HTTPException) as err:
            catalog.resolve(bad)
        assert err.value.status_code == 400
    check_text("genus", "Aus")  # ordinary text passes
