"""OpenAIBackend against a real HTTP fake server: concurrency, retries, timeouts, accounting.

Every request either succeeds with its own deterministic answer or raises LLMRequestFailed with
the right reason after exactly max_retries + 1 attempts; the server's log shows nothing lost and
nothing duplicated (one normal answer per successful request, one arrival per attempt)."""

import asyncio
import gc
import socket
import threading
import time
import warnings

import pytest

from benchmarks.fake_openai_server import FakeOpenAIServer, expected_answer
from pipeline.annotation.llm_openai import OpenAIBackend, parse_retry_after
from pipeline.annotation.llm import ChatRequest, ChatResult, LLMRequestFailed

SCHEMA = {"type": "json_schema", "json_schema": {"name": "trait", "schema": {"type": "object"}}}


def request(marker: str, **kw) -> ChatRequest:
    text = f"Describe the boxed region. marker={marker}"
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    return ChatRequest(messages=[{"role": "user", "content": content}], request_id=marker, **kw)


def answer(marker: str) -> str:
    return expected_answer(marker, f"Describe the boxed region. marker={marker}")


def backend(server, **kw) -> OpenAIBackend:
    kw = {"timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, **kw}
    return OpenAIBackend(server.base_url, "client-side-name", **kw)


def test_faults_every_request_accounted_for_once():
    recoverable = {  # each fails len(script) times, then succeeds (max_retries=3)
        "r0": ["http_500"], "r1": ["http_503"], "r2": ["http_429:0"], "r3": ["malformed"], "r4": ["no_choices"],
        "r5": ["drop"], "r6": ["hang"], "r7": ["http_500", "drop", "malformed"], "r8": ["hang", "http_502", "no_choices"],
    }
    hopeless = {  # marker -> (script, reason, attempts): retried to the end, or a 4xx failing at once
        "f0": (["http_500"] * 4, "http_500", 4), "f1": (["http_429:0"] * 4, "http_429", 4), "f2": (["hang"] * 4, "timeout", 4),
        "f3": (["drop"] * 4, "connection", 4), "f4": (["malformed"] * 4, "bad_response", 4),
        "f5": (["no_choices"] * 4, "bad_response", 4), "f6": (["http_400"], "http_400", 1), "f7": (["http_404"], "http_404", 1),
    }
    faults = {**recoverable, **{m: script for m, (script, _, _) in hopeless.items()}}
    markers = [f"m{i}" for i in range(60)] + list(faults)
    with FakeOpenAIServer(latency_s=0.05, capacity=16, faults=faults) as server:
        results = backend(server, max_in_flight=12, timeout_s=0.8).complete_many([request(m) for m in markers])

        assert len(results) == len(markers)
        for marker, result in zip(markers, results):
            arrivals = server.arrivals(marker)
            if marker in hopeless:
                assert isinstance(result, LLMRequestFailed), marker
                _, reason, attempts = hopeless[marker]
                assert (result.reason, result.attempts, len(arrivals)) == (reason, attempts, attempts), marker
            else:
                assert isinstance(result, ChatResult), (marker, result)
                assert result.text == answer(marker)
                assert result.attempts == len(arrivals) == 1 + len(faults.get(marker, []))
        succeeded = {m for m, r in zip(markers, results) if isinstance(r, ChatResult)}
        assert server.successes() == {m: 1 for m in succeeded}  # no duplicate completions
        assert len(server.received) == sum(r.attempts for r in results)  # no attempt unaccounted for


def test_result_fields_come_from_the_response():
    with FakeOpenAIServer(latency_s=0.05, model="served-model") as server:
        result = backend(server).complete_many([request("x")])[0]
    text = "Describe the boxed region. marker=x"
    assert result.model == "served-model"  # the server's name, not the client's
    assert (result.prompt_tokens, result.completion_tokens) == (len(text.split()), len(answer("x").split()))
    assert result.finish_reason == "stop" and result.attempts == 1
    assert 0.05 <= result.latency_s < 1.0


def test_max_in_flight_is_respected():
    with FakeOpenAIServer(latency_s=0.05, capacity=100) as server:
        results = backend(server, max_in_flight=5).complete_many([request(f"m{i}") for i in range(40)])
        assert all(isinstance(r, ChatResult) for r in results)
        assert server.max_open == 5  # never more than 5 on the wire, and the bound is used


def test_retry_after_is_honoured_and_capped():
    faults = {"secs": ["http_429:1"], "date": ["http_503:date+2"], "huge": ["http_429:100"]}
    with FakeOpenAIServer(faults=faults) as server:
        results = backend(server, max_backoff_s=1.5).complete_many([request(m) for m in faults])
        assert all(isinstance(r, ChatResult) and r.attempts == 2 for r in results)
        gap = {m: server.arrivals(m)[1].arrived_s - server.arrivals(m)[0].arrived_s for m in faults}
    assert gap["secs"] >= 1.0  # backoff alone would be ~10 ms
    assert gap["date"] >= 0.95  # an HTTP date 2 s ahead at 1 s resolution: more than 1 s away
    assert 1.45 <= gap["huge"] < 3  # capped at max_backoff_s


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: go now


def test_non_retryable_400_fails_at_once():
    with FakeOpenAIServer(faults={"bad": ["http_400", "ok"]}) as server:
        t0 = time.monotonic()
        with pytest.raises(LLMRequestFailed) as err:
            asyncio.run(backend(server, backoff_s=2.0).complete(request("bad")))
        assert time.monotonic() - t0 < 0.9  # a retry would have slept >= 1 s
    assert (err.value.reason, err.value.attempts, len(server.received)) == ("http_400", 1, 1)


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01)
    [failure] = client.complete_many([request("x")])
    assert (failure.reason, failure.attempts) == ("connection", 3)


def test_response_format_fallback():
    with FakeOpenAIServer(supports_response_format=False) as server:
        client = backend(server)
        results = client.complete_many([request(f"m{i}", response_format=SCHEMA) for i in range(8)])
        assert all(isinstance(r, ChatResult) and r.extra["response_format_dropped"] for r in results)
        assert not client.response_format_supported
        assert server.successes() == {f"m{i}": 1 for i in range(8)}
        server.reset()  # later requests go without it straight away
        [later] = client.complete_many([request("later", response_format=SCHEMA)])
        assert later.attempts == 1 and "response_format" not in server.received[0].body

    with FakeOpenAIServer(faults={"x": ["http_400"]}) as server:  # a 400 about something else: no fallback
        client = backend(server)
        [failed, ok] = client.complete_many([request("x", response_format=SCHEMA), request("y", response_format=SCHEMA)])
        assert failed.reason == "http_400" and ok.extra["response_format"] is True
        assert client.response_format_supported and server.arrivals("y")[0].body["response_format"] == SCHEMA


def test_one_backend_many_event_loops():
    """A Ray Data actor builds the backend once and runs asyncio.run per batch, maybe in a thread."""
    gc.collect()  # earlier tests' garbage is not this test's business
    with FakeOpenAIServer(latency_s=0.01) as server:
        client = backend(server)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in range(3):
                assert asyncio.run(client.complete(request(f"a{batch}"))).text == answer(f"a{batch}")
            assert client.complete_many([request("b")])[0].text == answer("b")
            out = []
            thread = threading.Thread(target=lambda: out.append(asyncio.run(client.complete(request("c")))))
            thread.start()
            thread.join()
            assert out[0].text == answer("c") and len(client._per_loop) == 1  # dead loops' sessions dropped
            asyncio.run(client.close())  # from any loop, also drops the closed loops' sessions
            assert not client._per_loop
            gc.collect()
        assert not [w for w in caught if "Unclosed" in str(w.message)]
