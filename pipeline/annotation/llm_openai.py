"""An OpenAI-compatible chat-completions client: many requests in flight, retries, timeouts.

Serves every HTTP model server we target (Ray Serve LLM, ``vllm serve``, SGLang) through
``POST {base_url}/chat/completions``. The reference code called the model serially with no
timeout and no retry (DESIGN §3.3); here

- a semaphore keeps up to ``max_in_flight`` requests on the wire, so the server's continuous
  batching has work to batch (a slot is held only while an attempt is on the wire, not during
  backoff);
- each attempt has a timeout; 429, 5xx, timeouts, connection errors and malformed bodies are
  retried with exponential backoff and jitter, honouring ``Retry-After`` (up to ``max_backoff_s``);
  other 4xx fail at once;
- a server that rejects ``response_format`` (400 naming it) is asked again without it, and never
  again with it (the tolerant parser then takes over);
- the aiohttp session is made lazily inside the running event loop, one per loop, so the backend
  can be built in one place and used in another loop — e.g. a Ray Data actor that runs
  ``asyncio.run`` per batch. Sessions of loops that have since closed are dropped.

    backend = OpenAIBackend("http://head:8000/v1", "Qwen/Qwen2.5-VL-72B-Instruct")
    results = backend.complete_many(requests)   # sync; ChatResult or LLMRequestFailed per request
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from pipeline.annotation.llm import ChatRequest, ChatResult, LLMRequestFailed

RETRY_STATUSES = {429} | set(range(500, 600))
RESPONSE_FORMAT_WORDS = ("response_format", "json_schema", "guided_json", "structured output")



def backoff_delay_s(failures: int, backoff_s: float, max_backoff_s: float = 60, retry_after_s: float | None = None) -> float:
    """Exponential backoff with jitter (half fixed, half random, so retries of a burst spread out
    but never come back at once); a server's Retry-After is a floor, capped at max_backoff_s."""
    base = min(max_backoff_s, backoff_s * 2 ** (failures - 1))
    delay = base * (0.5 + 0.5 * random.random())
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_backoff_s))
    return delay


class _Retryable(Exception):
    """One failed attempt that is worth another: ``reason`` as in LLMRequestFailed,
    ``retry_after_s`` from the server's Retry-After header if it sent one."""

    def __init__(self, reason: str, detail: str, retry_after_s: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry_after_s = reason, detail, retry_after_s


class _ResponseFormatRejected(Exception):
    """A 400 that names response_format: the server cannot constrain decoding."""


@dataclass
class _LoopState:
    session: aiohttp.ClientSession
    in_flight: asyncio.Semaphore


class OpenAIBackend:
    """The :class:`pipeline.annotation.llm.Backend` for an OpenAI-compatible HTTP server.

    ``base_url`` ends in ``/v1`` (``http://host:8000/v1``). ``max_retries`` counts retries, so a
    request makes at most ``max_retries + 1`` attempts (plus one if the response_format fallback
    fires). ``max_in_flight`` bounds attempts on the wire per event loop."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120,
                 max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 60, max_in_flight: int = 32):
        if max_in_flight < 1 or max_retries < 0:
            raise ValueError(f"need max_in_flight >= 1 and max_retries >= 0, got {max_in_flight=} {max_retries=}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_in_flight = max_in_flight
        self.response_format_supported = True
        """Turns False for good once the server rejects a response_format."""
        self._per_loop: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    # -- public API -------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> ChatResult:
        """One chat completion, retried as the module docstring says; raises LLMRequestFailed."""
        state = self._loop_state()
        attempts, failures, dropped_rf = 0, 0, False
        while True:
            attempts += 1
            body = self._body(request, with_response_format=self.response_format_supported)
            try:
                async with state.in_flight:
                    result = await self._attempt(state.session, body, request.request_id)
            except _ResponseFormatRejected:
                # Ask again at once without it; this extra attempt is not a failure.
                self.response_format_supported, dropped_rf = False, True
                continue
            except LLMRequestFailed as err:  # a 4xx that no retry will fix
                err.attempts = attempts
                raise
            except _Retryable as err:
                failures += 1
                if failures > self.max_retries:
                    raise LLMRequestFailed(err.reason, err.detail, attempts) from None
                await asyncio.sleep(self._delay_s(failures, err.retry_after_s))
                continue
            result.attempts = attempts
            result.extra["response_format"] = "response_format" in body
            if dropped_rf:
                result.extra["response_format_dropped"] = True
            return result

    async def complete_all(self, requests: list[ChatRequest]) -> list[ChatResult | LLMRequestFailed]:
        """All requests concurrently (bounded by max_in_flight), results in request order; a request
        that failed for good is its LLMRequestFailed in place (an error record, not a crash)."""
        async def one(request):
            try:
                return await self.complete(request)
            except LLMRequestFailed as err:
                return err
        return list(await asyncio.gather(*(one(r) for r in requests)))

    def complete_many(self, requests: list[ChatRequest]) -> list[ChatResult | LLMRequestFailed]:
        """Sync :meth:`complete_all` in a fresh event loop whose session is closed at the end — the
        shape a Ray Data ``map_batches`` callable wants. Not callable from inside a running loop."""
        async def run():
            try:
                return await self.complete_all(requests)
            finally:
                await self.close()
        return asyncio.run(run())

    async def close(self) -> None:
        """Close the running loop's session (and forget those of closed loops)."""
        self._drop_closed_loops()
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.session.close()

    # -- one attempt ------------------------------------------------------------------------

    def _body(self, request: ChatRequest, *, with_response_format: bool) -> dict[str, Any]:
        body = {"model": self.model, "messages": request.messages,
                "max_tokens": request.max_tokens, "temperature": request.temperature}
        if with_response_format and request.response_format is not None:
            body["response_format"] = request.response_format
        return body

    async def _attempt(self, session: aiohttp.ClientSession, body: dict, request_id: str | None) -> ChatResult:
        headers = {"X-Request-Id": request_id} if request_id else {}
        start = time.perf_counter()
        try:
            async with session.post(self.url, json=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                raw = await resp.read()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except asyncio.TimeoutError:  # also aiohttp's ServerTimeoutError (a ClientConnectionError too)
            raise _Retryable("timeout", f"no answer within {self.timeout_s} s") from None
        except aiohttp.ClientError as err:  # refused, reset, dropped mid-body, ...
            raise _Retryable("connection", f"{type(err).__name__}: {err}") from None
        latency_s = time.perf_counter() - start
        text = raw.decode("utf-8", "replace")

        if status != 200:
            if status in RETRY_STATUSES:
                wait = parse_retry_after(retry_after) if status in (429, 503) else None
                raise _Retryable(f"http_{status}", text[:500], wait)
            if (status == 400 and "response_format" in body
                    and any(word in text.lower() for word in RESPONSE_FORMAT_WORDS)):
                raise _ResponseFormatRejected(text[:500])
            raise LLMRequestFailed(f"http_{status}", text[:500])  # attempts filled in below
        return self._parse(text, latency_s)

    def _parse(self, text: str, latency_s: float) -> ChatResult:
        try:
            payload = json.loads(text)
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("bad_response", text[:500]) from None
        if not isinstance(content, str):  # null content: a refusal or tool call we did not ask for
            raise _Retryable("bad_response", text[:500])
        usage = payload.get("usage") or {}
        return ChatResult(text=content, model=payload.get("model") or self.model, latency_s=latency_s,
                          prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                          finish_reason=choice.get("finish_reason"))

    def _delay_s(self, failures: int, retry_after_s: float | None) -> float:
        return backoff_delay_s(failures, self.backoff_s, self.max_backoff_s, retry_after_s)

    # -- one session per event loop ---------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None or state.session.closed:
            self._drop_closed_loops()
            connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=0)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            state = self._per_loop[loop] = _LoopState(aiohttp.ClientSession(connector=connector, headers=headers),
                                                      asyncio.Semaphore(self.max_in_flight))
        return state

    def __del__(self) -> None:
        # A backend left behind by asyncio.run-per-batch callers: close what can be closed quietly.
        self._drop_closed_loops()

    def _drop_closed_loops(self) -> None:
        """A session whose loop has closed can no longer be awaited; closing its connector
        synchronously marks it closed (no 'Unclosed session' warnings), its sockets go with GC."""
        for loop in [lp for lp in self._per_loop if lp.is_closed()]:
            session = self._per_loop.pop(loop).session  # held until closed, or __del__ warns first
            with contextlib.suppress(Exception):
                session.connector._close()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None
