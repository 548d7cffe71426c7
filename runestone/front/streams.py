"""Front doors' stream encoding: a :class:`~runestone.routing.executor.Streaming` as one API's bytes.

:func:`encoded` is the one relay loop every HTTP front door uses: one write per upstream read (each
:class:`~runestone.routing.executor.Chunks` becomes at most one item), the failure's error event in the
API's shape, and ``aclose()`` of the stream however the loop ends (the client left, the server stopped).
It holds no cancel scope: the stream bounds each of its own reads by the request's deadline. A committed
stream's first read is in hand, so its response says ``first_ready`` (the head goes out with it); when the
request ended with its last read (``Streaming.ended``) that read's bytes are a ``LastItem``, written with the
end of the body: a whole answer that came in one upstream read is one write.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from ..http import LastItem, header_block
from ..routing.errors import GatewayError
from ..routing.executor import Chunks, Failed, Streaming
from ..wire.anthropic import AnthropicEventStream
from ..wire.errors import anthropic_type
from ..wire.openai import sse_chunks, sse_error_event

__all__ = ["SSE_HEADERS", "Encoded", "Relay", "anthropic_failure", "encoded", "openai_failure", "openai_sse"]

#: An event stream's headers, as one block of header lines (written with one append).
SSE_HEADERS = [header_block((
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
))]


def openai_failure(error: GatewayError) -> bytes:
    return sse_error_event(error.message, error.type, error.param, error.code)


def anthropic_failure(error: GatewayError) -> bytes:
    return AnthropicEventStream.error(anthropic_type(error.status, error.type), error.message)


class Relay:
    """A response body made by ``items`` (an async generator reading ``streaming``) that closes ``streaming``
    however it ends, even when the server closes it before its first item: an async generator that never
    started does not run its ``finally`` on ``aclose()``, and the stream (its upstream connection, its
    in-flight count, its admission lease, its ledger record) would be left open."""

    __slots__ = ("_items", "_streaming")

    def __init__(self, items: AsyncIterator[bytes], streaming: Streaming) -> None:
        self._items = items
        self._streaming = streaming

    def __aiter__(self) -> "Relay":
        return self

    def __anext__(self):
        return self._items.__anext__()

    async def aclose(self) -> None:
        try:
            await self._items.aclose()
        finally:
            await self._streaming.aclose()


def encoded(streaming: Streaming, feed: Callable[[list, bool], bytes],
            failure: Callable[[GatewayError], bytes]) -> "Encoded":
    """``streaming``'s events through ``feed(payloads, last)`` and ``failure(error)``, as write-ready bytes."""
    return Encoded(streaming, feed, failure)


class Encoded:
    """The relay loop of :func:`encoded`: one layer between the upstream read and the client's write (no
    generator), whose ``aclose()`` closes ``streaming`` however the loop ended, as :class:`Relay`'s does."""

    __slots__ = ("_streaming", "_feed", "_failure")

    def __init__(self, streaming: Streaming, feed, failure) -> None:
        self._streaming = streaming
        self._feed = feed
        self._failure = failure

    def __aiter__(self) -> "Encoded":
        return self

    async def __anext__(self) -> bytes:
        streaming = self._streaming
        while True:
            event = await streaming.__anext__()  # StopAsyncIteration after the end event ends the body
            cls = event.__class__
            if cls is Chunks:
                data = self._feed(event.payloads, event.last)
                if event.last and streaming.ended:
                    # The request is over and recorded: these bytes and the end of the body go in one write.
                    return LastItem(data)
                if data:
                    return data
            elif cls is Failed:
                return self._failure(event.error)

    async def aclose(self) -> None:
        await self._streaming.aclose()


def openai_sse(streaming: Streaming) -> Encoded:
    """A chat stream as OpenAI's SSE: the upstream's chunk payloads framed, then ``[DONE]``."""
    return encoded(streaming, sse_chunks, openai_failure)

