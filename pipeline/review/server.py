"""``sae-traits review serve``: the rating page of a review folder (stdlib http.server).

    GET  /                      the page (page.html, this package's one file of HTML, CSS and JS)
    GET  /api/review            the items (items/items.json), the flags and the rating scale
    GET  /api/ratings/NAME      that reviewer's current ratings {item: {rating, flags}}
    POST /api/ratings/NAME      {item, rating, flags}: appended to ratings/NAME.jsonl and fsynced,
                                then answered {saved, rated, total}
    GET  /items/FILE            an item's image (only the files items.json names)

Nothing else of the folder is served: key.json, the other reviewers' files and the scores stay
on disk. Bad requests get a 4xx with a JSON ``detail`` naming the field."""

from __future__ import annotations

import json
import mimetypes
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlparse

from pipeline.console import PREFIX
from pipeline.review.config import FLAG_LABELS, FLAGS, RATINGS, ReviewServeConfig
from pipeline.review.folder import Rating, ReviewFolder, check_reviewer

MAX_BODY_BYTES = 4096  # a rating is a few dozen bytes


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: ReviewServeConfig):
        self.folder = ReviewFolder(cfg.review)
        self.folder.ratings_dir.mkdir(exist_ok=True)
        items = self.folder.items()
        self.item_ids = {it["item"] for it in items}
        self.images = {name for it in items for name in it["images"]}
        self.review = json.dumps({"items": items, "ratings": list(RATINGS),
                                  "flags": [{"key": f, "label": FLAG_LABELS[f]} for f in FLAGS]}).encode()
        self.page = resources.files("pipeline.review").joinpath("page.html").read_bytes()
        super().__init__((cfg.host, cfg.port), ReviewHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # one line per request is noise for a reviewer's terminal
        pass

    def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def answer_json(self, obj, status: int = 200) -> None:
        self.answer(status, json.dumps(obj).encode())

    def refuse(self, status: int, detail: str) -> None:
        self.answer_json({"detail": detail}, status)

    def reviewer(self, path: str) -> str | None:
        """The NAME of /api/ratings/NAME (refused, answered, None when it is not a reviewer name)."""
        try:
            return check_reviewer(unquote(path.removeprefix("/api/ratings/")))
        except ValueError as exc:
            self.refuse(HTTPStatus.BAD_REQUEST, str(exc))
            return None

    def do_GET(self):
        path = urlparse(self.path).path
        srv = self.server
        if path in ("/", "/index.html"):
            self.answer(200, srv.page, "text/html; charset=utf-8")
        elif path == "/api/review":
            self.answer(200, srv.review)
        elif path.startswith("/api/ratings/"):
            if (name := self.reviewer(path)) is not None:
                ratings = srv.folder.ratings_file(name).read(srv.item_ids)
                self.answer_json({"ratings": {i: {"rating": r.rating, "flags": list(r.flags)}
                                              for i, r in ratings.items()}})
        elif path.startswith("/items/") and (name := unquote(path.removeprefix("/items/"))) in srv.images:
            self.answer(200, (srv.folder.items_dir / name).read_bytes(),
                        mimetypes.guess_type(name)[0] or "application/octet-stream")
        else:
            self.refuse(HTTPStatus.NOT_FOUND, f"{path}: not found")

    def do_POST(self):
        path = urlparse(self.path).path
        if not path.startswith("/api/ratings/"):
            return self.refuse(HTTPStatus.NOT_FOUND, f"{path}: not found")
        if (name := self.reviewer(path)) is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self.refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a rating is at most {MAX_BODY_BYTES} bytes")
        try:
            rating = Rating.parse(json.loads(self.rfile.read(length) or b"null"), self.server.item_ids)
        except ValueError as exc:  # json's errors are ValueErrors too
            return self.refuse(HTTPStatus.BAD_REQUEST, str(exc))
        ratings_file = self.server.folder.ratings_file(name)
        ratings_file.append(rating, reviewer=name, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        rated = sum(r.rating is not None for r in ratings_file.read(self.server.item_ids).values())
        self.answer_json({"saved": rating.record(), "rated": rated, "total": len(self.server.item_ids)})


def serve(cfg: ReviewServeConfig, log=print) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    server = ReviewServer(cfg)
    log(f"{PREFIX} review: {len(server.item_ids)} items of {cfg.review}; reviewers open {server.url} "
        f"(ratings go to {server.folder.ratings_dir}/NAME.jsonl; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
