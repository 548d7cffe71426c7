"""The HTTP/1.1 server: one trio task per connection, parsing with httptools, WebSocket on the same port.

``serve_http(handler, host, port)`` accepts connections and runs, for each, a loop that
reads from the socket, feeds httptools' ``HttpRequestParser`` and calls ``handler`` with
a :class:`Request` once a request head is complete. The handler returns a
:class:`Response` (a body, or an async iterable streamed chunk by chunk) or, for a
WebSocket request, a :class:`WebSocketAccept`. Requests on a connection are answered
strictly in order: bytes of pipelined requests are parsed when they arrive but their
handlers only run after the previous response is written. The server enforces the size
limits and timeouts in :class:`Limits`, answers what it refuses in OpenAI's error shape,
and never lets a handler's failure take it down. The per-request path is kept small:
one ``read(2)``, a handful of parser callbacks, one ``write(2)`` for a small
response, no cancel scope (one watchdog task per server enforces every connection's
deadline). Nothing here knows about LLMs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import attrs
import httptools
import orjson
import trio

from runestone.http import _server_wire as wire
from runestone.http.errors import LOCAL_RESOURCE_ERRNOS, local_resource_errors
from runestone.http.websocket import WebSocketAccept, run_websocket, valid_websocket_key

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "Handler",
    "HttpError",
    "HttpServer",
    "Limits",
    "Request",
    "RequestTimeout",
    "Response",
    "ServerStatistics",
    "WebSocketAccept",
    "serve_http",
]

logger = logging.getLogger("runestone.http")

_RECEIVE_SIZE = 65536
# An unread request body is read and discarded after the response only up to this many
# more bytes; beyond it closing the connection is cheaper than reusing it.
_DRAIN_LIMIT = 262144
# When the server closes a connection the client may still be sending; closing with
# unread bytes makes the kernel send a reset that can destroy the response in flight.
# So the server half-closes, then reads and discards for a bounded time before closing.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 262144
_SMALL_BODY = 65536
_LISTEN_BACKLOG = 1024
# What a connection is waiting for, which decides what happens when its deadline passes.
_BUSY = 0  # the handler runs or the server works: no deadline
_IDLE = 1  # keep-alive wait for the next request: close silently
_HEAD = 2  # a request head is incomplete: answer 408, close
_WRITING = 3  # a write is blocked on a client that does not read: drop the connection
_GONE = 4  # the client closed the connection while its handler ran: close, nothing to answer

#: A handler running longer than this gets its client watched for a disconnect (by the watchdog, whose tick
#: is at most this): so a client that leaves is noticed within twice this, and quick requests pay nothing.
_WATCH_AFTER = 0.03
_STOPPED = 4  # closed by request_stop() while idle
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_NO_BODY_STATUSES = frozenset((204, 304))


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


class HttpError(Exception):
    """A request the server refuses; it answers ``status`` with ``message`` and closes.

    Raised by :meth:`Request.body` and :meth:`Request.iter_body`; a handler that lets it
    propagate gets the matching error response sent for it.
    """

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HttpError):
    """The request is malformed (400)."""

    status = 400


class RequestTimeout(HttpError):
    """The client was too slow sending the request head or body (408)."""

    status = 408


class BodyTooLarge(HttpError):
    """The request body exceeds ``Limits.max_body_bytes`` (413)."""

    status = 413


class _HeadersTooLarge(HttpError):
    status = 431


class _VersionNotSupported(HttpError):
    status = 505


class ClientDisconnected(Exception):
    """The client closed the connection before the request body was complete."""


class _PeerGone(Exception):
    """A write failed or timed out: the client is not there to answer any more."""


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
        "_body", "_discard",
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

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}{'?' if self.query else ''}{self.query} HTTP/{self.http_version}>"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase bytes), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

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
    """

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(
        self,
        status: int = 200,
        headers=(),
        body: bytes = b"",
        stream: AsyncIterable[bytes] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream

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


def _default_error_body(status: int, message: str, error_type: str, target: bytes) -> bytes:
    return wire.error_body(message, error_type)


def _error_response(server: "HttpServer", status: int, message: str, target: bytes,
                    error_type: str = "invalid_request_error") -> Response:
    return Response(status, [(b"content-type", b"application/json")],
                    server.error_body(status, message, error_type, target))


_INTERNAL_ERROR_BODY = wire.error_body("internal server error", "server_error")


@attrs.frozen
class ServerStatistics:
    """A snapshot of an :class:`HttpServer`'s counters."""

    connections_open: int
    """Connections being served now (WebSocket ones included, refused ones not)."""
    connections_total: int
    """Connections served since the start."""
    connections_refused: int
    """Connections answered 503 because ``max_connections`` were open."""
    requests_total: int
    """Requests answered (or abandoned when the client went away) since the start."""
    requests_in_flight: int
    """Requests whose handler or response is running now."""
    websockets_open: int
    """Connections handed over to a WebSocket handler now."""
    stopping: bool
    """Whether ``request_stop()`` was called."""


class HttpServer:
    """A running server, as given to ``task_status.started()`` by :func:`serve_http`."""

    def __init__(self, handler: Handler, host: str, port: int, limits: Limits,
                 error_body: ErrorBody | None = None) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self.error_body = error_body or _default_error_body
        self._handler = handler
        self._stopping = False
        self._connections: set[_Connection] = set()
        self._accept_scope: trio.CancelScope | None = None
        self._connection_scope: trio.CancelScope | None = None
        self._system: trio.Nursery | None = None
        #: Set by a handler starting while the watchdog sleeps its long tick (see _expire_deadlines).
        self._wake: trio.Event | None = None
        self._connections_total = 0
        self._connections_refused = 0
        self._requests_total = 0
        self._requests_in_flight = 0
        self._websockets_open = 0

    def __repr__(self) -> str:
        return f"<HttpServer {self.host}:{self.port}{' stopping' if self._stopping else ''}>"

    def request_stop(self) -> None:
        """Begin a graceful stop; returns at once, :func:`serve_http` returns when done.

        The listening socket is closed (new connections are refused), idle keep-alive
        connections are closed, requests in flight finish with ``connection: close``.
        What is still running ``Limits.drain_timeout`` seconds later is cancelled.
        Idempotent.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._connection_scope is not None:
            self._connection_scope.deadline = trio.current_time() + self.limits.drain_timeout
        for connection in self._connections:
            connection.close_if_idle()

    async def _expire_deadlines(self) -> None:
        """Enforce the connections' timeouts, with a resolution of ``tick`` seconds, and watch the clients
        of long-running handlers.

        While handlers run it ticks every ``_WATCH_AFTER`` seconds, so that one running longer than that
        gets a watch on its client (see ``_Connection._watch_handler``); otherwise every ``tick``, and a
        handler starting then wakes it (``_wake``).
        """
        limits = self.limits
        tick = min(1.0, min(limits.header_timeout, limits.keepalive_timeout, limits.write_timeout) / 10)
        connections = self._connections
        while True:
            if any(c._handler_since is not None and c._watching is None for c in connections):
                await trio.sleep(min(tick, _WATCH_AFTER))
            else:
                self._wake = wake = trio.Event()
                with trio.move_on_after(tick):
                    await wake.wait()
                self._wake = None
            now = trio.current_time()
            expired = [connection for connection in connections if connection._deadline <= now]
            for connection in expired:
                connection.expire()
            started_before = now - _WATCH_AFTER
            for connection in connections:
                since = connection._handler_since
                if since is not None and since <= started_before and connection._watching is None:
                    self._system.start_soon(connection._watch_handler)

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections_open=len(self._connections),
            connections_total=self._connections_total,
            connections_refused=self._connections_refused,
            requests_total=self._requests_total,
            requests_in_flight=self._requests_in_flight,
            websockets_open=self._websockets_open,
            stopping=self._stopping,
        )


def _is_websocket(request: Request) -> bool:
    # Only what wsproto will accept counts as a WebSocket request; anything else is an
    # ordinary request the handler may answer (the connection then closes).
    if request.method != "GET" or request.http_version != "1.1":
        return False
    upgrade = connection = key = version = host = None
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = value
        elif name == b"connection":
            connection = value if connection is None else connection + b"," + value
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"host":
            host = value
    if not (
        upgrade is not None
        and upgrade.strip().lower() == b"websocket"
        and connection is not None
        and b"upgrade" in (token.strip() for token in connection.lower().split(b","))
    ):
        return False
    if key is None or not valid_websocket_key(key):
        # RFC 6455 section 4.2.1: a handshake the server cannot accept is answered 400.
        raise BadRequest("a WebSocket upgrade needs a Sec-WebSocket-Key that is the base64 encoding of 16 bytes")
    return version == b"13" and host is not None


class _Connection:
    """The state of one connection, owned by its task; also httptools' callback target.

    Reading happens only when something needs bytes: the next request head, the body
    the handler reads, the post-response drain, or the peer watch during a streamed
    response. At most one task reads at a time; another that needs bytes waits for that
    read's outcome instead of reading concurrently.
    """

    __slots__ = (
        "_server", "_limits", "_stream", "_client", "_parser", "_ready", "_parsing", "_in_head",
        "_url", "_head_size", "_head_raw", "_error", "_error_request", "_upgrade_tail", "_eof",
        "_reading", "_read_done", "_response_started", "_served", "_fd", "_scope", "_phase",
        "_deadline", "_expired_phase", "_handler_since", "_watching",
    )

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self._server = server
        self._limits = server.limits
        self._stream = stream
        try:
            peer = stream.socket.getpeername()
            self._client = (peer[0], peer[1])
        except (OSError, IndexError, TypeError):
            self._client = None
        self._parser = httptools.HttpRequestParser(self)
        self._ready: deque[Request] = deque()
        self._parsing: Request | None = None
        self._in_head = False
        self._url = b""
        self._head_size = 0
        self._head_raw = 0
        self._error: HttpError | None = None
        self._error_request: Request | None = None
        self._upgrade_tail: bytes | None = None
        self._eof = False
        self._reading = False
        self._read_done: trio.Event | None = None
        self._response_started = False
        self._served = 0
        self._fd = stream.socket.fileno()
        # One cancel scope for the connection's life: timeouts are deadlines the server's
        # watchdog checks (see HttpServer._expire_deadlines), because entering a trio
        # cancel scope per read and per write would cost more than the rest of a request.
        self._scope = trio.CancelScope()
        self._phase = _HEAD
        self._deadline = trio.current_time() + self._limits.header_timeout
        self._expired_phase = _BUSY
        #: When the handler of a request whose body is in started (None when no handler runs).
        self._handler_since: float | None = None
        #: The cancel scope of the watch on a long-running handler, while one runs.
        self._watching: trio.CancelScope | None = None

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self, self._client)
        self._in_head = True
        self._url = b""
        self._head_size = 0
        self._head_raw = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            raise BadRequest(f"request line exceeds the limit of {self._limits.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        name = name.lower()
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        headers = request.headers
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        limits = self._limits
        if self._head_size > limits.max_header_bytes:
            raise _HeadersTooLarge(f"request headers exceed the limit of {limits.max_header_bytes} bytes")
        if len(headers) > limits.max_headers:
            raise _HeadersTooLarge(f"request has more than {limits.max_headers} headers")
        if name == b"content-length":
            request._content_length = int(value)
        elif name == b"expect" and value.lower() == b"100-continue":
            request._expect_continue = True

    def on_headers_complete(self) -> None:
        request = self._parsing
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1")
        hosts = 0
        for name, _ in request.headers:
            if name == b"host":
                hosts += 1
        if hosts != 1 and (hosts or version == "1.1"):
            # RFC 9112 section 3.2: HTTP/1.1 needs exactly one Host; HTTP/1.0 may omit it.
            raise BadRequest("an HTTP/1.1 request needs a Host header" if not hosts
                             else "a request may carry only one Host header")
        limits = self._limits
        if request._content_length > limits.max_body_bytes:
            raise BodyTooLarge(f"request body exceeds the limit of {limits.max_body_bytes} bytes")
        method = parser.get_method()
        request.method = _METHODS.get(method) or method.decode("ascii")
        url = self._url
        if url[:1] != b"/" and url != b"*":
            # absolute-form, as proxies send it: keep path and query only
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise BadRequest("invalid request target") from None
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query is not None else b"")
        path, _, query = url.partition(b"?")
        request.path = path.decode("latin-1")
        if query:
            request.query = query.decode("latin-1")
        request.http_version = version
        request.keep_alive = parser.should_keep_alive()
        if version == "1.0":
            request._expect_continue = False
        if parser.should_upgrade():
            request.websocket = _is_websocket(request)
        self._in_head = False
        self._ready.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        request._received += len(body)
        if request._received > self._limits.max_body_bytes:
            raise BodyTooLarge(f"request body exceeds the limit of {self._limits.max_body_bytes} bytes")
        if not request._discard:
            request._chunks.append(body)

    def on_message_complete(self) -> None:
        self._parsing._complete = True
        self._parsing = None

    # -- reading ------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The parser stops after an upgrade request: what follows is not HTTP.
            self._upgrade_tail = data[upgrade.args[0]:]
        except httptools.HttpParserError as exc:
            self._fail(_protocol_error(exc))
        else:
            if self._in_head:
                # httptools keeps an incomplete header line to itself; count raw bytes so
                # that a never-ending header cannot grow without bound (the first read of
                # a head may also hold the previous body, hence the slack of one read).
                self._head_raw += len(data)
                if self._head_raw > self._limits.max_header_bytes + _RECEIVE_SIZE:
                    self._fail(_HeadersTooLarge(
                        f"request headers exceed the limit of {self._limits.max_header_bytes} bytes"))

    def _fail(self, error: HttpError) -> None:
        self._error = error
        # An error after a head was complete belongs to that request's body: its handler
        # sees it when reading the body. Before that, it is the connection's answer once
        # the requests before it are answered.
        parsing = self._parsing
        self._error_request = parsing if parsing is not None and not self._in_head else None
        self._parsing = None

    async def _receive(self, timeout: float) -> None:
        """One socket read fed to the parser, or the outcome of another task's read.

        Sets ``_eof`` at end of file or when the socket broke. Raises ``trio.TooSlowError``
        if no read completed within ``timeout``.
        """
        if self._reading:
            event = self._read_done
            if event is None:
                event = self._read_done = trio.Event()
            with trio.fail_after(timeout):
                await event.wait()
            return
        self._reading = True
        try:
            if timeout == math.inf:
                data = await self._read()
            else:
                with trio.fail_after(timeout):
                    data = await self._read()
        finally:
            self._reading = False
            event = self._read_done
            if event is not None:
                self._read_done = None
                event.set()
        if data:
            self._feed(data)
        else:
            self._eof = True

    async def receive_body(self, request: Request) -> None:
        """One more read for ``request``'s body (or the outcome of a concurrent one); see Request.body."""
        if self._error_request is request:
            error = self._error
            raise type(error)(error.message)
        if request._complete:
            return
        if self._eof:
            raise ClientDisconnected("the client closed the connection before sending the whole body")
        if request._expect_continue:
            request._expect_continue = False
            if not self._response_started:
                await self._send(wire.CONTINUE)
        try:
            await self._receive(self._limits.body_timeout)
        except trio.TooSlowError:
            raise RequestTimeout(
                f"no request body data received for {self._limits.body_timeout:g} seconds") from None

    async def _read(self) -> bytes:
        """One read of the socket, ``b""`` at end of file or when the connection broke. Always a checkpoint.

        It reads the bare socket (trio's stream layers cost more than the rest of the read) and waits for
        readability only if that found nothing. While other requests are in flight it yields first: the
        bytes a client sends right after its answer usually arrive while the other connections run, which
        spares a failed ``read(2)`` and an epoll registration.
        """
        fd = self._fd
        early = self._server._requests_in_flight > 0
        if early:
            await trio.lowlevel.checkpoint()
        try:
            data = os.read(fd, _RECEIVE_SIZE)
        except BlockingIOError:
            pass
        except OSError:
            return b""
        else:
            if not early:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        sock = self._stream.socket
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                return b""
            try:
                return os.read(fd, _RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    def close_if_idle(self) -> None:
        """Close the connection now if it waits for a request of which no byte came yet."""
        if self._parsing is None and (self._phase == _IDLE or self._phase == _HEAD):
            self._expired_phase = _STOPPED
            self._scope.cancel()

    def expire(self) -> None:
        """The deadline of what the connection waits for has passed (called by the watchdog)."""
        self._deadline = math.inf
        self._expired_phase = self._phase
        self._scope.cancel()

    # -- writing ------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        """Write all of ``data``; raises _PeerGone if the client is gone or does not read.

        Most writes fit in the socket buffer: they are one ``write(2)`` without a trip
        through the scheduler. Only a write the kernel cannot take at once waits, under
        ``Limits.write_timeout``. Not a checkpoint when the fast path succeeds.
        """
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _PeerGone() from exc
        if sent == len(data):
            return
        phase = self._phase
        self._phase = _WRITING
        self._deadline = trio.current_time() + self._limits.write_timeout
        try:
            await self._stream.send_all(memoryview(data)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone() from exc
        finally:
            self._phase = phase
            self._deadline = math.inf

    # -- the connection's life ----------------------------------------------------------

    async def run(self) -> None:
        linger = True
        try:
            with self._scope:
                try:
                    while True:
                        request = await self._next_request()
                        if request is None:
                            break
                        if not await self._serve(request):
                            break
                except _PeerGone:
                    linger = False
                except ClientDisconnected:
                    pass
            if self._scope.cancelled_caught:
                expired = self._expired_phase
                if expired == _WRITING:
                    linger = False
                elif expired == _HEAD:
                    with trio.move_on_after(self._limits.write_timeout):
                        try:
                            await self._refuse(RequestTimeout(
                                f"request head not received within {self._limits.header_timeout:g} seconds"))
                        except _PeerGone:
                            linger = False
        finally:
            try:
                if linger and not self._eof:
                    await self._linger()
            finally:
                # also when cancelled (hard stop, drain deadline) while lingering
                await trio.aclose_forcefully(self._stream)

    async def _next_request(self) -> Request | None:
        """The next request whose head is complete, or None when the connection should close.

        Waits under a deadline the watchdog enforces: the keep-alive timeout while no
        byte of a request came, then the header timeout (from the connection's start for
        its first request).
        """
        ready = self._ready
        if ready:
            # answered from bytes already read: still let other connections run
            await trio.lowlevel.checkpoint()
            return ready.popleft()
        server = self._server
        limits = self._limits
        if self._served == 0:
            phase = _HEAD
            deadline = self._deadline
        elif self._parsing is not None:
            phase = _HEAD
            deadline = trio.current_time() + limits.header_timeout
        else:
            phase = _IDLE
            deadline = trio.current_time() + limits.keepalive_timeout
        while True:
            if self._error is not None:
                await self._refuse(self._error)
                return None
            if self._eof or self._upgrade_tail is not None:
                return None
            if self._parsing is None and server._stopping:
                return None
            self._phase = phase
            self._deadline = deadline
            data = await self._read()
            self._phase = _BUSY
            self._deadline = math.inf
            if not data:
                self._eof = True
                return None
            self._feed(data)
            if ready:
                return ready.popleft()
            if phase == _IDLE:
                phase = _HEAD
                deadline = trio.current_time() + limits.header_timeout

    async def _refuse(self, error: HttpError) -> None:
        response = _error_response(self._server, error.status, error.message, self._url)
        head = wire.build_head(response.status, response.headers, wire.content_length_line(len(response.body)),
                               wire.CLOSE)
        await self._send(head + response.body)

    async def _serve(self, request: Request) -> bool:
        """Answer ``request``; True if the connection may carry another one."""
        server = self._server
        server._requests_in_flight += 1
        self._response_started = False
        keep = True
        try:
            try:
                if request.method == "CONNECT":
                    raise BadRequest("the CONNECT method is not supported")
                if request._complete and not request.websocket:
                    # The server's watchdog watches the client of a handler that runs long (see
                    # _watch_handler); a quick one costs nothing more than these two stores.
                    self._begin_watch()
                    try:
                        response = await server._handler(request)
                    finally:
                        self._end_watch()
                else:
                    response = await server._handler(request)
            except HttpError as error:
                response = _error_response(server, error.status, error.message, request.path.encode())
                keep = False
            except (ClientDisconnected, _PeerGone):
                raise
            except Exception:
                logger.exception("handler failed on %s %s", request.method, request.path)
                response = Response(500, [(b"content-type", b"application/json")], _INTERNAL_ERROR_BODY)
            if response.__class__ is not Response:
                if request.websocket and isinstance(response, WebSocketAccept):
                    await self._run_websocket(request, response)
                    return False
                if not isinstance(response, Response):
                    logger.error("handler returned %r for %s %s, not a Response", response, request.method,
                                 request.path)
                    response = Response(500, [(b"content-type", b"application/json")], _INTERNAL_ERROR_BODY)
            if (
                not request.keep_alive
                or server._stopping
                or self._upgrade_tail is not None
                or (self._error is not None and self._error_request is request)
            ):
                keep = False
            elif not request._complete and (
                request._expect_continue
                or (request._content_length >= 0
                    and request._content_length - request._received > _DRAIN_LIMIT)
            ):
                # The client waits for 100 Continue before sending the body, or the rest
                # is too big to be worth reading: do not reuse the connection.
                keep = False
            if response.stream is None:
                await self._write(request, response, keep)
            else:
                keep = await self._write_stream(request, response, keep)
            if keep and not request._complete:
                keep = await self._drain(request)
            return keep
        finally:
            server._requests_in_flight -= 1
            server._requests_total += 1
            self._served += 1

    def _begin_watch(self) -> None:
        """Something long may run now for this connection: let the watchdog watch its client after a while."""
        self._handler_since = trio.current_time()
        server = self._server
        wake = server._wake
        if wake is not None:
            server._wake = None
            wake.set()

    def _end_watch(self) -> None:
        self._handler_since = None
        watching = self._watching
        if watching is not None:
            self._watching = None
            watching.cancel()

    async def _watch_handler(self) -> None:
        """Watch the client of a handler that has run for a while (started by the server's watchdog).

        If the client closes the connection before its answer, the connection is cancelled, and with it
        the handler, so an upstream request it waits on is closed at once instead of running on for
        nobody. Only for a request whose body is in, so that nothing else reads the socket meanwhile;
        bytes that arrive instead of an end of file (a pipelined request) end the watch.
        """
        if self._handler_since is None or self._watching is not None:
            return
        with trio.CancelScope() as scope:
            self._watching = scope
            try:
                await trio.lowlevel.wait_readable(self._stream.socket)
                with socket.socket(fileno=os.dup(self._fd)) as peek:
                    gone = not peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                gone = False
            except OSError:
                gone = True
            except (trio.ClosedResourceError, trio.BusyResourceError):
                gone = False
            if gone and self._handler_since is not None:
                self._eof = True
                self._expired_phase = _GONE
                self._scope.cancel()
        if self._watching is scope:
            self._watching = None

    async def _write(self, request: Request, response: Response, keep: bool) -> None:
        status = response.status
        body = response.body
        if status in _NO_BODY_STATUSES or status < 200:
            framing = b""
            body = b""
        else:
            framing = wire.content_length_line(len(body))
            if request.method == "HEAD":
                body = b""
        try:
            head = wire.build_head(status, response.headers, framing, wire.KEEP_ALIVE if keep else wire.CLOSE)
        except ValueError:
            logger.exception("invalid response from handler on %s %s", request.method, request.path)
            head = wire.build_head(500, [(b"content-type", b"application/json")],
                                   wire.content_length_line(len(_INTERNAL_ERROR_BODY)),
                                   wire.KEEP_ALIVE if keep else wire.CLOSE)
            body = _INTERNAL_ERROR_BODY if request.method != "HEAD" else b""
        self._response_started = True
        if len(body) <= _SMALL_BODY:
            await self._send(head + body if body else head)
        else:
            await self._send(head)
            await self._send(body)

    async def _write_stream(self, request: Request, response: Response, keep: bool) -> bool:
        stream = response.stream
        iterator = None
        try:
            chunked = request.http_version == "1.1"
            if not chunked:
                keep = False
            status = response.status
            bodiless = request.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
            framing = wire.CHUNKED if chunked and not bodiless else b""
            try:
                head = wire.build_head(status, response.headers, framing, wire.KEEP_ALIVE if keep else wire.CLOSE)
            except ValueError:
                logger.exception("invalid response from handler on %s %s", request.method, request.path)
                await self._write(request, Response(500, [(b"content-type", b"application/json")],
                                                    _INTERNAL_ERROR_BODY), False)
                return False
            self._response_started = True
            if bodiless:
                await self._send(head)
                return keep
            failure: BaseException | None = None
            completed = False
            # A stream that lasts gets its client watched by the server's watchdog, as a long handler does
            # (_watch_handler): a client that leaves cancels the producer at once, even while it waits on
            # its upstream. Only when nothing else reads the socket (the request body is in).
            watch = request._complete
            if watch:
                self._begin_watch()
            try:
                iterator = stream.__aiter__()
                await self._send(head)
                send = self._send
                frame = wire.chunk if chunked else None
                checkpoint = trio.lowlevel.checkpoint
                async for item in iterator:
                    if item:
                        await send(frame(item) if frame is not None else item)
                        # A write that fits the socket buffer does not yield: let the
                        # other tasks run between two items, as a trio stream would, so
                        # a producer that never waits cannot starve them.
                        await checkpoint()
                if chunked:
                    await send(wire.LAST_CHUNK)
                completed = True
            except Exception as exc:
                failure = exc
            finally:
                if watch:
                    self._end_watch()
            if failure is not None:
                if isinstance(failure, _PeerGone):
                    raise failure
                if not isinstance(failure, (ClientDisconnected, HttpError)):
                    # (the others are the client's doing: a body cut short or refused)
                    logger.error("response stream failed on %s %s", request.method, request.path,
                                 exc_info=failure)
                return False
            return keep and completed and not self._eof
        finally:
            await _close_stream(stream, iterator)

    async def _drain(self, request: Request) -> bool:
        """Read and discard the rest of an unread body; True if the connection can go on."""
        request._discard = True
        request._chunks.clear()
        limit = request._received + _DRAIN_LIMIT
        while not request._complete:
            if self._error is not None or self._eof or request._received > limit:
                return False
            try:
                await self._receive(self._limits.body_timeout)
            except trio.TooSlowError:
                return False
        return self._error is None

    async def _linger(self) -> None:
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                await self._stream.send_eof()
                received = 0
                while received < _LINGER_BYTES:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        break
                    received += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass

    async def _run_websocket(self, request: Request, accept: WebSocketAccept) -> None:
        server = self._server
        target = request.path + ("?" + request.query if request.query else "")
        parts = [b"GET %s HTTP/1.1\r\n" % target.encode("latin-1")]
        for name, value in request.headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        tail = self._upgrade_tail or b""
        self._upgrade_tail = b""
        server._websockets_open += 1
        try:
            await run_websocket(
                self._stream,
                b"".join(parts),
                tail,
                accept,
                handshake_timeout=self._limits.header_timeout,
                close_timeout=self._limits.write_timeout,
            )
        finally:
            server._websockets_open -= 1
            self._eof = True


def _protocol_error(exc: httptools.HttpParserError) -> HttpError:
    cause = exc.__context__
    if isinstance(cause, HttpError):
        return cause
    if isinstance(cause, ValueError):
        return BadRequest("invalid Content-Length header")
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return BadRequest("invalid HTTP method")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return BadRequest("invalid request target")
    detail = exc.args[0] if exc.args else "unparsable request"
    return BadRequest(f"malformed HTTP request: {detail}")


async def _close_stream(stream, iterator) -> None:
    for candidate in (iterator, stream):
        aclose = getattr(candidate, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                logger.exception("closing a response stream failed")
            return


async def _serve_connection(server: HttpServer, connection: _Connection) -> None:
    try:
        await connection.run()
    except Exception:
        logger.exception("connection from %s failed", connection._client)
    finally:
        server._connections.discard(connection)


async def _refuse_connection(server: HttpServer, stream: trio.SocketStream) -> None:
    server._connections_refused += 1
    body = wire.error_body("the server is at its connection limit; retry later", "server_error")
    head = wire.build_head(503, [(b"content-type", b"application/json"), (b"retry-after", b"1")],
                           wire.content_length_line(len(body)), wire.CLOSE)
    with trio.move_on_after(min(_LINGER_SECONDS, server.limits.write_timeout)):
        try:
            await stream.send_all(head + body)
            await stream.send_eof()
            received = 0
            while received < _LINGER_BYTES:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _listen(host: str, port: int) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(_LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: Limits = Limits(),
    error_body: ErrorBody | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 (and WebSocket upgrades) on ``host:port`` until stopped.

    Calls ``task_status.started(server)`` once the socket listens (``server.port`` is the
    real port when ``port`` is 0). Returns after ``server.request_stop()`` once every
    connection is done or ``limits.drain_timeout`` passed. Cancelling it is a hard stop:
    every connection is closed at once.
    """
    sock = await _listen(host, port)
    server = HttpServer(handler, host, sock.getsockname()[1], limits, error_body)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as system:
            server._system = system
            system.start_soon(server._expire_deadlines)
            await _accept_and_serve(server, listener, task_status)
            system.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(listener)


async def _accept_and_serve(server: HttpServer, listener: trio.SocketListener, task_status) -> None:
    """Accept connections until request_stop(), then wait for the open ones to finish."""
    limits = server.limits
    async with trio.open_nursery() as connections:
        server._connection_scope = connections.cancel_scope
        with trio.CancelScope() as accept_scope:
            server._accept_scope = accept_scope
            task_status.started(server)
            starved = False
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors or memory (as trio's serve_listeners does): the pending
                    # connection stays in the backlog, so retrying at once would spin. Pause, log
                    # once per episode; connections already open are served meanwhile.
                    kind = LOCAL_RESOURCE_ERRNOS.get(exc.errno)  # type: ignore[arg-type]
                    if kind is None:
                        raise
                    local_resource_errors["accept", kind] += 1
                    if not starved:
                        starved = True
                        logger.error("accept failed (%s): the gateway is out of local resources; new "
                                     "connections wait in the backlog, retried every 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                if starved:
                    starved = False
                    logger.warning("accepting connections again")
                if len(server._connections) >= limits.max_connections:
                    connections.start_soon(_refuse_connection, server, stream)
                else:
                    # Registered before the task starts so that a burst of accepts
                    # cannot overshoot max_connections.
                    connection = _Connection(server, stream)
                    server._connections.add(connection)
                    server._connections_total += 1
                    connections.start_soon(_serve_connection, server, connection)
        # Stop accepting: close the socket so that new connections are refused by the
        # kernel rather than left waiting in the backlog.
        await listener.aclose()
