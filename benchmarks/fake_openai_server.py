"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

A real aiohttp server on 127.0.0.1 (an ephemeral port) in a background thread, so clients talk
real HTTP to it. It behaves like a model server with a fixed per-request latency ``latency_s``
and at most ``capacity`` requests processed at once (the rest wait their turn), so its ideal
throughput is ``capacity / latency_s``.

Each request is named by a *marker*: the first ``marker=<word>`` in its text parts, else its
``X-Request-Id`` header. The answer is deterministic, by default ``{"marker": "<word>", "words":
<n words in the prompt>}``, or what ``answer(marker, text, body)`` returns; with usage counts.

Faults are scripted per request with ``faults``: either a dict ``marker -> [fault, fault, ...]``
(the n-th arrival of that marker gets the n-th fault, then ``ok``), or a function
``(index, marker, body) -> fault | None`` (index = arrival order from 0). A fault is one of

    ok            the normal answer after latency_s
    http_<code>   that status at once; http_429/http_503 carry Retry-After: ``retry_after``
    http_429:<v>  ... with Retry-After: <v>; ``http_429:date+2`` sends an HTTP date 2 s ahead
    malformed     200 with a body that is not JSON (after latency_s)
    no_choices    200 with JSON lacking ``choices`` (after latency_s)
    hang          holds a capacity slot for ``hang_s`` (or until the client gives up)
    drop          closes the connection without answering

With ``supports_response_format=False`` a request carrying ``response_format`` gets a 400 that
names it, as from a server without structured output. Every request is recorded in
``received`` (a :class:`Received` each); ``max_open`` is the most requests the server held at
once (queued or processing), ``max_processing`` the most processed at once.

    with FakeOpenAIServer(latency_s=0.5, capacity=16) as server:
        backend = OpenAIBackend(server.base_url, "fake-vlm")

``python benchmarks/fake_openai_server.py --port 8000 --latency 0.5 --capacity 16`` serves by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

MARKER = re.compile(r"marker=([\w.-]+)")
Faults = dict[str, list[str]] | Callable[[int, str | None, dict | None], str | None]


@dataclass
class Received:
    index: int
    marker: str | None
    fault: str
    arrived_s: float
    """time.monotonic() at arrival (the same clock in every thread)."""
    finished_s: float | None = None
    outcome: str = "open"
    """``answered`` (the fault's response went out), ``dropped``, ``cancelled`` (the client left first) or ``open``."""
    body: dict | None = None


def request_text(body: dict | None) -> str:
    """All text parts of a chat body, joined."""
    parts = []
    for message in (body or {}).get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(parts)


def expected_answer(marker: str | None, text: str) -> str:
    """The fake model's deterministic answer to a prompt (tests compare against it)."""
    return json.dumps({"marker": marker, "words": len(text.split())})


class FakeOpenAIServer:
    def __init__(self, *, latency_s: float = 0.0, capacity: int = 64, faults: Faults | None = None,
                 retry_after: str = "1", hang_s: float = 30.0, supports_response_format: bool = True,
                 model: str = "fake-vlm", port: int = 0,
                 answer: Callable[[str | None, str, dict | None], str] | None = None):
        self.latency_s, self.capacity, self.faults = latency_s, capacity, faults
        self.answer = answer or (lambda marker, text, body: expected_answer(marker, text))
        self.retry_after, self.hang_s = retry_after, hang_s
        self.supports_response_format, self.model, self.port = supports_response_format, model, port
        self.received: list[Received] = []
        self.max_open = self.max_processing = 0
        self._open = self._processing = 0
        self._arrivals: Counter = Counter()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget what was received (between phases of one test); faults restart from the top."""
        self.received, self._arrivals = [], Counter()
        self.max_open = self.max_processing = 0

    async def _serve(self) -> None:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that gives up frees its capacity slot, as in vLLM.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        self._capacity = asyncio.Semaphore(self.capacity)

    # -- what the script says ---------------------------------------------------------------

    def successes(self) -> Counter:
        """Marker -> number of normal answers sent (each request should have exactly one)."""
        return Counter(r.marker for r in self.received if r.fault == "ok" and r.outcome == "answered")

    def arrivals(self, marker: str) -> list[Received]:
        return [r for r in self.received if r.marker == marker]

    def _fault_for(self, index: int, marker: str | None, body: dict | None) -> str:
        if callable(self.faults):
            return self.faults(index, marker, body) or "ok"
        script = (self.faults or {}).get(marker, [])
        nth = self._arrivals[marker]
        self._arrivals[marker] += 1
        return script[nth] if nth < len(script) else "ok"

    # -- handlers ---------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._open += 1
        self.max_open = max(self.max_open, self._open)
        try:
            try:
                body = await request.json()
            except ValueError:
                body = None
            text = request_text(body)
            match = MARKER.search(text)
            # no marker in the text: the client's X-Request-Id (the annotate stage sends the annotation_id)
            marker = match.group(1) if match else request.headers.get("X-Request-Id")
            if body is not None and "response_format" in body and not self.supports_response_format:
                fault = "http_400:response_format"
            else:
                fault = self._fault_for(len(self.received), marker, body)
            record = Received(len(self.received), marker, fault, time.monotonic(), body=body)
            self.received.append(record)
            try:
                response = await self._respond(request, fault, marker, text, body)
                record.outcome = "answered"
                return response
            except asyncio.CancelledError:
                record.outcome = "dropped" if fault == "drop" else "cancelled"
                raise
            finally:
                record.finished_s = time.monotonic()
        finally:
            self._open -= 1

    async def _respond(self, request: web.Request, fault: str, marker: str | None, text: str,
                       body: dict | None) -> web.StreamResponse:
        kind, _, arg = fault.partition(":")
        if kind == "drop":
            request.transport.abort()  # the client sees the connection reset, no status line
            raise asyncio.CancelledError  # nothing left to answer on
        if kind.startswith("http_"):
            status = int(kind[5:])
            headers = {}
            if status in (429, 503):
                after = arg or self.retry_after
                if after.startswith("date+"):
                    after = email.utils.formatdate(time.time() + float(after[5:]), usegmt=True)
                headers["Retry-After"] = after
            message = "response_format / json_schema is not supported" if arg == "response_format" else f"fake {status}"
            return web.json_response({"object": "error", "message": message, "code": status}, status=status, headers=headers)

        async with self._capacity:  # the model is busy with at most `capacity` requests
            self._processing += 1
            self.max_processing = max(self.max_processing, self._processing)
            try:
                await asyncio.sleep(self.hang_s if kind == "hang" else self.latency_s)
            finally:
                self._processing -= 1
        if kind == "malformed":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if kind == "no_choices":
            return web.json_response({"id": "x", "object": "chat.completion", "model": self.model})
        answer = self.answer(marker, text, body)
        return web.json_response(self._completion(answer, prompt_tokens=len(text.split())))

    def _completion(self, answer: str, prompt_tokens: int) -> dict[str, Any]:
        completion_tokens = len(answer.split())
        return {"id": f"chatcmpl-{len(self.received)}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--capacity", type=int, default=16)
    args = parser.parse_args()
    with FakeOpenAIServer(latency_s=args.latency, capacity=args.capacity, port=args.port) as server:
        print(f"serving {server.base_url} (latency {args.latency} s, capacity {args.capacity}); Ctrl-C stops")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
