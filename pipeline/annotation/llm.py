"""What every LLM backend takes and returns (the annotator's one interface to a model).

A request is an OpenAI chat-completions body (messages with ``text`` and ``image_url`` parts,
images as ``data:<mime>;base64,...`` URLs) plus sampling settings, so the same prompt feeds an
HTTP server (Ray Serve LLM, ``vllm serve``, SGLang) and a local Hugging Face model alike.

    class Backend(Protocol):
        model: str
        async def complete(self, request: ChatRequest) -> ChatResult: ...
        async def close(self) -> None: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = 196
    temperature: float = 0.01
    response_format: dict | None = None
    """An OpenAI ``response_format`` (``{"type": "json_schema", "json_schema": {...}}``); a
    backend that cannot constrain decoding ignores it and the tolerant parser takes over."""
    request_id: str | None = None
    """Stable id (the annotation_id) for logs and de-duplication."""


@dataclass
class ChatResult:
    text: str
    model: str
    latency_s: float
    """Wall time of the successful attempt."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)


class LLMRequestFailed(Exception):
    """A request that still failed after the backend's retries; ``reason`` is a short code
    (``timeout``, ``http_500``, ``http_429``, ``connection``, ``bad_response``, ...)."""

    def __init__(self, reason: str, detail: str = "", attempts: int = 1):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


class Backend(Protocol):
    model: str

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    async def close(self) -> None: ...
