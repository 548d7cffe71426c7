"""What a handler of the HTTP server sees: the request, the response it answers, and the server's limits.

:class:`Request` is built by the connection (``_connection``) as httptools parses a head;
its body is read on demand through that connection. :class:`Response` is a plain slotted
record the connection writes. :class:`Limits` is the server's configuration, checked when
built. Nothing here does I/O of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import orjson

from .websocket import WebSocketAccept

if TYPE_CHECKING:
    from ._connection import _Connection

__all__ = ["ErrorBody", "Handler", "LastItem", "Limits", "Request", "Response"]


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class Limits:
    """Size limits and timeouts the server enforces on every connection (seconds, bytes)."""

    max_request_line: int = attrs.field(default=8192, validator=_positive)
    """Longest request target; longer is answered 400."""
    max_header_bytes: int = attrs.field(default=65536, validator=_positive)
    """Largest request head (target and header lines); larger is answered 431."""
    max_headers: int = attrs.field(default=100, validator=_positive)
    """Most header lines in a request; more is answered 431."""
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """Largest request body: a larger ``Content-Length`` is answered 413 before any body
    byte is read; a chunked body is cut off with 413 when it grows past the limit."""
    header_timeout: float = attrs.field(default=10.0, validator=_positive)
    """A request head must be complete this long after its first byte (after the
    connection opened, for the first request); otherwise 408 and close."""
    body_timeout: float = attrs.field(default=30.0, validator=_positive)
    """Longest wait for more body bytes while the handler reads the body; otherwise 408."""
    keepalive_timeout: float = attrs.field(default=75.0, validator=_positive)
    """Longest idle time between requests on a connection; then it is closed silently."""
    write_timeout: float = attrs.field(default=30.0, validator=_positive)
    """Longest a single write may wait for a client that does not read; then close."""
    max_connections: int = attrs.field(default=10000, validator=_positive)
    """Open connections beyond this are accepted, answered 503 and closed."""
    drain_timeout: float = attrs.field(default=10.0, validator=_positive)
    """After ``request_stop()``, how long in-flight responses may take before they are cancelled."""


class Request:
    """One HTTP request; ``headers`` names are lowercased bytes, values as received.

    ``path`` is the raw (percent-encoded) path without the query, ``query`` the raw query
    string (``''`` if none), both decoded as latin-1. ``keep_alive`` is whether the client
    allows the connection to be reused; ``websocket`` whether this is a valid WebSocket
    upgrade request (answer it with :class:`WebSocketAccept` to accept it).
    """

    __slots__ = (
        "method", "path", "query", "http_version", "headers", "client", "keep_alive", "websocket",
        "_conn", "_chunks", "_received", "_complete", "_expect_continue", "_content_length",
        "_body", "_discard", "_index",
    )

    def __init__(self, conn: _Connection, client: tuple[str, int] | None) -> None:
        self._conn = conn
        self.client = client
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.path = ""
        self.query = ""
        self.http_version = "1.1"
        self.keep_alive = True
        self.websocket = False
        self._chunks: list[bytes] = []
        self._received = 0
        self._complete = False
        self._expect_continue = False
        self._content_length = -1
        self._body: bytes | None = None
        self._discard = False
        self._index: dict[bytes, bytes] | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}{'?' if self.query else ''}{self.query} HTTP/{self.http_version}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase bytes), or None."""
        index = self._index
        if index is None:
            # Made at the first lookup (a request's handler asks for a few): the first value of each name.
            index = self._index = dict(reversed(self.headers))
        return index.get(name)

    async def body(self) -> bytes:
        """The whole request body (what :meth:`iter_body` has not yet yielded).

        Sends ``100 Continue`` first if the client asked for it and no response has
        started. Raises :class:`BodyTooLarge`, :class:`RequestTimeout` (no body bytes for
        ``Limits.body_timeout``), :class:`BadRequest` (malformed chunked body) or
        :class:`ClientDisconnected`. Calling it again returns the same bytes.
        """
        if self._body is not None:
            return self._body
        while not self._complete:
            await self._conn.receive_body(self)
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._body = body
        return body

    def iter_body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives: each item is what one socket read brought.

        Same errors and ``100 Continue`` behaviour as :meth:`body`.
        """
        return _BodyIterator(self)


class _BodyIterator:
    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        request = self._request
        if request._body is not None:
            body, request._body = request._body, b""
            if body:
                return body
            raise StopAsyncIteration
        chunks = request._chunks
        while not chunks:
            if request._complete:
                request._body = b""
                raise StopAsyncIteration
            await request._conn.receive_body(request)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data



class LastItem(bytes):
    """A stream item that is the body's last (it may be empty): the server writes it and the end of the body
    in one write, then closes the stream without reading it again."""

    __slots__ = ()


@attrs.define(eq=False, repr=False)
class Response:
    """What a handler answers: a status, headers and either ``body`` or ``stream``.

    With ``stream`` the body is written as it comes, chunked (HTTP/1.1) or delimited by
    closing the connection (HTTP/1.0); each item is one socket write, and the stream is
    not advanced until that write completed. If the stream raises, the connection is
    closed without the terminating chunk, so the client sees a truncated body, never a
    clean end. The stream's ``aclose()`` is always called, also when the client went
    away (a failed write or end-of-file on the socket cancels the stream promptly).
    The server adds ``date``, ``server``, ``content-length`` or ``transfer-encoding``
    and ``connection``; handler headers of those framing names are dropped.
    ``headers`` is a fresh list for each response unless given, so a caller may append to it.

    Two hints save writes on the hot path: with ``first_ready`` (the stream's first item is at hand, so
    waiting for it costs nothing) the head goes out in the same write as that first item; an item that is
    a :class:`LastItem` goes out with the end of the body.
    """

    status: int = 200
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytes = b""
    stream: AsyncIterable[bytes] | None = None
    first_ready: bool = False

    def __repr__(self) -> str:
        kind = "stream" if self.stream is not None else f"{len(self.body)} bytes"
        return f"<Response {self.status} {kind}>"

    @staticmethod
    def json(obj, status: int = 200, headers=()) -> Response:
        """A response whose body is ``obj`` serialised by orjson, ``content-type: application/json``."""
        return Response(status, [(b"content-type", b"application/json"), *headers], orjson.dumps(obj))


Handler = Callable[[Request], Awaitable[Response | WebSocketAccept]]


#: ``error_body(status, message, error_type, target) -> bytes``: the JSON body of the server's own refusals
#: (malformed HTTP, a body over the limit, a timeout); ``target`` is the request target as received, so
#: that an application can answer each of its APIs in that API's error shape.
ErrorBody = Callable[[int, str, str, bytes], bytes]
