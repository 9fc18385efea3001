"""A fault-injecting HTTP reverse proxy for tests and benchmarks: put it in front of an S3 server
(tests/s3_server.py) or a model server (benchmarks/bench_vllm_serving.py) and point the client at
``proxy.url``. A seeded, fixed share of the requests gets a fault instead of a plain answer; every
other request is forwarded and its answer sent back byte for byte.

    with FaultProxy(moto_url, share=0.10, seed=1) as proxy:
        ... build with storage.endpoint_url=proxy.url ...
        proxy.counts()   # {"requests": 1246, "forwarded": 1151, "500": 32, "503": 32, "drop": 31, "cut": 31, ...}

Whether the n-th request that arrives is faulted comes from random.Random(seed): the same sequence
every run (which request is the n-th depends on how concurrent clients race). Faults are of the
kinds in turn (so that each is injected about share/len(kinds) of the time):

- ``500``: an S3 InternalError (status 500, S3's XML error body); the request is not forwarded;
- ``503``: an S3 SlowDown (status 503, XML body); not forwarded;
- ``drop``: the request is read, then the connection is closed without an answer (not forwarded);
- ``cut``: the request is forwarded (the server acts on it), then the answer is cut off half-way
  (half of its body, or half of its head when it has no body) and the connection closed.

``proxy.unreachable = True`` makes it a store that cannot be reached: every connection (new or kept
alive) is closed as soon as it is accepted or its next request arrives, nothing is forwarded;
``proxy.unreachable_after(pattern)`` does so once a forwarded request ("METHOD /path") matches the
regular expression (e.g. the first output file of a stage written), and ``proxy.unreachable_since``
tells when (time.monotonic()).

Threaded standard library only (ThreadingHTTPServer; one upstream connection per request). Requests
are read whole (Content-Length or chunked) before they are forwarded, answers streamed back in
64 KiB pieces; HTTP/1.1 keep-alive with the client as it asks.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "drop", "cut")
ERRORS = {
    "500": ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": ("Slow Down", "SlowDown", "Please reduce your request rate."),
}
# Hop-by-hop headers: about one connection, never forwarded (RFC 9110 7.6.1). Transfer-Encoding is
# kept: request bodies are forwarded in the framing they came in.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "upgrade", "expect"}
PIECE = 64 * 1024


class FaultProxy:
    def __init__(self, upstream: str, share: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 host: str = "127.0.0.1"):
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be within [0, 1]")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be among {KINDS}, got {kinds}")
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port or 80)
        self.share = share
        self.kinds = tuple(kinds)
        self._unreachable = False
        self.unreachable_since: float | None = None
        self._trigger: re.Pattern | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._faults_by_request: Counter[str] = Counter()
        self._faults = 0
        self._server = _Server((host, 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._server.server_address[1]}"

    # -- life ------------------------------------------------------------------------------------------

    def start(self) -> str:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reachable or not -------------------------------------------------------------------------

    @property
    def unreachable(self) -> bool:
        return self._unreachable

    @unreachable.setter
    def unreachable(self, value: bool) -> None:
        with self._lock:
            self._unreachable = bool(value)
            self.unreachable_since = time.monotonic() if value else None
            self._trigger = None

    def unreachable_after(self, pattern: str) -> None:
        """Become unreachable right after answering the first request whose "METHOD /path" matches."""
        with self._lock:
            self._trigger = re.compile(pattern)

    # -- what happened -------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """requests (received, faulted or not), forwarded (sent to the server: plain ones and cuts),
        one count per fault kind, refused (connections closed while unreachable), faults (all kinds)."""
        with self._lock:
            out = {"requests": 0, "forwarded": 0, **{k: 0 for k in KINDS}, "refused": 0, **self._counts}
            out["faults"] = sum(out[k] for k in KINDS)
            return out

    def faults_by_request(self) -> dict[str, int]:
        """'METHOD kind' → count, e.g. {'PUT cut': 7, 'GET 503': 12}: which requests were hit."""
        with self._lock:
            return dict(self._faults_by_request)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._faults_by_request.clear()

    # -- for the handler -----------------------------------------------------------------------------

    def _decide(self, method: str) -> str | None:
        """The fault for the next request (None: forward it), from the seeded sequence."""
        with self._lock:
            self._counts["requests"] += 1
            if self.share and self._rng.random() < self.share:
                kind = self.kinds[self._faults % len(self.kinds)]
                self._faults += 1
                self._counts[kind] += 1
                self._faults_by_request[f"{method} {kind}"] += 1
                return kind
            return None

    def _forwarded(self, method: str, path: str) -> None:
        with self._lock:
            self._counts["forwarded"] += 1
            if self._trigger is not None and self._trigger.search(f"{method} {path}"):
                self._trigger = None
                self._unreachable = True
                self.unreachable_since = time.monotonic()

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # Ray workers open many connections at once: none refused by a full backlog
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultProxy"
    timeout = 60  # an idle client connection is closed after this

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        # Head and body go out in separate writes: without this, Nagle's algorithm and the client's
        # delayed ACK hold each answer back ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.proxy.unreachable:
            self.proxy._count("refused")
            self.close_connection = True
            self._refused = True
        else:
            self._refused = False

    def handle(self) -> None:
        if self._refused:
            return
        super().handle()

    def log_message(self, format, *args) -> None:  # quiet: the counts tell what happened
        pass

    def handle_expect_100(self) -> bool:
        # The body is read before anything is decided: the client may send it.
        self.send_response_only(100)
        self.end_headers()
        return True

    def _body(self) -> bytes:
        """The request body, raw (chunked bodies in their chunked framing)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline(65537)
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)  # data + CRLF
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        proxy = self.proxy
        if proxy.unreachable:
            proxy._count("refused")
            self.close_connection = True
            return
        body = self._body()
        kind = proxy._decide(self.command)
        if kind in ERRORS:
            self._s3_error(kind)
            return
        if kind == "drop":
            self.close_connection = True
            return
        self._forward(body, cut=kind == "cut")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay

    def _s3_error(self, kind: str) -> None:
        reason, code, message = ERRORS[kind]
        resource = re.sub(r"[<>&]", "", self.path.split("?", 1)[0])
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>").encode()
        self.send_response_only(int(kind), reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(xml)))
        if kind == "503":
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)
        self.wfile.flush()

    def _forward(self, body: bytes, cut: bool) -> None:
        host, port = self.proxy.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Connection", "close")
            conn.endheaders(body or None)  # one send for head and body (no Nagle delay)
            resp = conn.getresponse()
            self._answer(resp, cut)
        finally:
            conn.close()
        self.proxy._forwarded(self.command, self.path)

    def _answer(self, resp: http.client.HTTPResponse, cut: bool) -> None:
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        has_body = self.command != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
        chunked = has_body and resp.chunked
        length = resp.length  # None when chunked or close-delimited
        if has_body and not chunked and length is None:
            self.close_connection = True  # delimited by the close, as the server sent it
        head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        if self.close_connection:
            head += "Connection: close\r\n"
        head = (head + "\r\n").encode("latin-1")
        if cut:
            self.close_connection = True
            data = resp.read() if has_body else b""
            if data:
                self.wfile.write(head)
                self.wfile.write(data[: len(data) // 2])
            else:
                self.wfile.write(head[: len(head) // 2])
            self.wfile.flush()
            self._abort()
            return
        out = head
        if has_body:
            while piece := resp.read(PIECE):
                self.wfile.write(out + (f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece))
                out = b""
            if chunked:
                out += b"0\r\n\r\n"
        self.wfile.write(out)
        self.wfile.flush()

    def _abort(self) -> None:
        """Close the connection now (the rest of the answer never comes)."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


__all__ = ["FaultProxy", "KINDS"]
