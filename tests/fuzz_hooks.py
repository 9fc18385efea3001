"""schemathesis hooks for the endpoint's fuzz test (tests/test_serve_app.py): a bounded share of the
positive ``POST /annotate`` cases carry a real photo instead of the random bytes the schema allows
(it cannot say what a photo is), so the fuzzer also reaches the success path; the rest stay as
generated. Loaded by the CLI from ``SCHEMATHESIS_HOOKS=tests.fuzz_hooks``."""

import base64
import io
import itertools
import threading

import schemathesis
from PIL import Image, ImageDraw

PHOTOS = 24  # at most this many photos, each a full encode + LLM call on the CPU
EVERY = 3  # one positive POST case in EVERY gets one
_cases, _lock, _sent = itertools.count(), threading.Lock(), [0]


def photo(i: int) -> bytes:
    """A small specimen-like photo, JPEG or PNG, different each time."""
    img = Image.new("RGB", (200 + 10 * (i % 7), 150), "white")
    ImageDraw.Draw(img).ellipse((40, 40 + i % 20, 160, 110), fill=(120 + 5 * i % 100, 70, 30))
    buf = io.BytesIO()
    img.save(buf, "JPEG" if i % 2 else "PNG")
    return buf.getvalue()


def printable(value):
    return "".join(ch for ch in value if ch.isprintable())[:200] if isinstance(value, str) else value


@schemathesis.hook
def map_case(ctx, case):
    meta = case._meta
    if (case.method.upper() != "POST" or meta is None or meta.generation.mode != "positive"
            or not isinstance(case.body, dict) or not ({"image", "image_base64"} & set(case.body))):
        return case
    with _lock:
        if _sent[0] >= PHOTOS or next(_cases) % EVERY:
            return case
        data = photo(_sent[0])
        _sent[0] += 1
    if "image_base64" in case.body:
        case.body["image_base64"] = base64.b64encode(data).decode()
    else:
        case.body["image"] = data
    case.body.pop("build", None)  # a generated build name is refused before the photo is looked at
    for field in ("species", "genus"):  # text the app refuses (control characters) would too
        if field in case.body:
            case.body[field] = printable(case.body[field])
    return case
