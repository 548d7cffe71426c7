"""The provider seam: one small interface between the request path and an upstream model API.

An *adapter* knows one wire format (OpenAI, Anthropic, the built-in fake). The request path hands it an
OpenAI-shaped chat body (already validated, ``model`` set to the upstream model) and gets back either a
finished ``chat.completion`` or a :class:`ChatStream`: an async iterator of ``bytes`` that are OpenAI SSE
events ready to write to the client (``data: {chunk}\\n\\n`` … ``data: [DONE]\\n\\n``). Each item is what
one upstream read produced, so relaying it is one socket write (DESIGN.md: write once per upstream read).

Failures are :class:`~runestone.resilience.errors.UpstreamError`; an adapter raises them for anything the
upstream did wrong, including a stream that ends before its end marker or carries a malformed chunk, so the
breaker, retry and failover logic judge them all the same way.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Protocol

import attrs
import orjson

from ..http.errors import (
    ConnectError,
    LocalResourceError,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
)
from ..resilience.errors import UpstreamError
from .sse import SSEError, SSEParser

__all__ = [
    "Adapter",
    "ChatStream",
    "ChatResult",
    "Usage",
    "UpstreamStream",
    "usage_from",
    "transport_error",
    "upstream_http_error",
    "DONE",
]

DONE = b"data: [DONE]\n\n"


@attrs.define(slots=True)
class Usage:
    """Token counts one request consumed, as the upstream reported them (0 when it did not)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@attrs.frozen
class ChatResult:
    """A finished non-streaming answer: the client-ready JSON bytes and what the ledger needs."""

    body: bytes
    usage: Usage


class ChatStream(Protocol):
    """An open upstream stream; iterate for SSE bytes, always ``aclose()`` (idempotent).

    ``usage`` is filled in as the upstream reports it; ``finished`` turns true once the upstream's end
    marker was seen (the last item yielded then ends with ``data: [DONE]``).
    """

    usage: Usage
    finished: bool

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    """What a provider type implements. ``body`` is OpenAI-shaped; ``include_usage`` is the client's wish."""

    async def complete(self, body: dict, *, request_id: str) -> ChatResult: ...

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool) -> ChatStream: ...

    async def embed(self, body: dict) -> ChatResult: ...

    async def list_models(self) -> list[str]: ...

    async def aclose(self, *, abort_in_use: bool = True) -> None: ...


class UpstreamStream:
    """The part every wire format's stream shares: the open upstream response, its SSE parser, usage and
    the end marker flag; ``aclose()`` closes the upstream exchange (idempotent). Subclasses implement
    ``__anext__``."""

    __slots__ = ("_provider", "_cm", "_it", "_parser", "usage", "finished", "_closed")

    def __init__(self, provider: str, cm, response) -> None:
        self._provider = provider
        self._cm = cm
        self._it = response.__aiter__()
        self._parser = SSEParser()
        self.usage = Usage()
        self.finished = False
        self._closed = False

    def __aiter__(self):
        return self

    async def _events(self, end_marker: str) -> list:
        """The events completed by the next upstream read(s); never an empty list.

        A stream that ends before ``end_marker``, a transport failure and malformed framing are
        UpstreamErrors, so the breaker and failover judge them like any other failure.
        """
        provider = self._provider
        while True:
            try:
                raw = await self._it.__anext__()
            except StopAsyncIteration:
                raise UpstreamError(provider, "stream_cut", f"upstream stream ended before {end_marker}") from None
            except TransportError as exc:
                raise transport_error(provider, exc) from None
            try:
                events = self._parser.feed(raw)
            except SSEError as exc:
                raise UpstreamError(provider, "malformed", f"upstream sent a malformed event stream: {exc}") from None
            if events:
                return events

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._cm.__aexit__(None, None, None)


def usage_from(provider: str, u: Any, usage: Usage) -> None:
    """Copy an OpenAI-shaped ``usage`` object's counts into ``usage``."""
    if not isinstance(u, dict):
        raise UpstreamError(provider, "malformed", "upstream usage is not an object")
    usage.prompt_tokens = int(u.get("prompt_tokens") or 0)
    usage.completion_tokens = int(u.get("completion_tokens") or 0)


def transport_error(provider: str, exc: BaseException) -> UpstreamError:
    """Classify a transport failure once, for breaker, retry and the client's error message."""
    if isinstance(exc, LocalResourceError):  # before timeouts: PoolTimeout is both
        return UpstreamError(provider, "local", f"out of {exc.resource}")
    if isinstance(exc, TransportTimeout):
        return UpstreamError(provider, "timeout", f"upstream timed out ({type(exc).__name__})")
    if isinstance(exc, ConnectError):
        return UpstreamError(provider, "connect", f"could not connect to upstream: {exc}")
    if isinstance(exc, RemoteProtocolError):
        return UpstreamError(provider, "protocol", f"upstream broke the HTTP protocol: {exc}")
    if isinstance(exc, TransportError):
        return UpstreamError(provider, "connect", f"upstream connection failed: {exc}")
    return UpstreamError(provider, "connect", f"upstream connection failed: {type(exc).__name__}")


def _error_message(body: bytes) -> str:
    # Both OpenAI and Anthropic wrap the reason in {"error": {"message": ...}}; anything else is shown
    # truncated so that a proxy's HTML page does not flood the client's error.
    try:
        data = orjson.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    except orjson.JSONDecodeError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return text or "no details"


def upstream_http_error(provider: str, status: int, headers, body: bytes) -> UpstreamError:
    """An upstream HTTP error status as an UpstreamError, with its reason and requested pause."""
    from ..resilience.retry import parse_retry_after

    return UpstreamError(
        provider,
        "http",
        f"upstream returned {status}: {_error_message(body)}",
        status=status,
        retry_after=parse_retry_after(headers),
    )


def new_created() -> int:
    return int(time.time())


def loads_object(provider: str, data: bytes, what: str) -> dict[str, Any]:
    """Parse an upstream JSON object; anything else is a ``malformed`` upstream error, never skipped."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(provider, "malformed", f"upstream sent invalid JSON in {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise UpstreamError(provider, "malformed", f"upstream sent a {type(obj).__name__} where {what} should be an object")
    return obj
