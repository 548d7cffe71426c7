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

Layout, as hypercorn splits its trio server: this module holds the listener, the accept loop,
the watchdog and the graceful stop (:class:`HttpServer`); ``_connection`` one connection's
engine; ``_messages`` what a handler sees (:class:`Request`, :class:`Response`,
:class:`Limits`); ``errors`` the exceptions. The names a handler needs are re-exported here.
"""

from __future__ import annotations

import logging

import attrs
import trio

from . import _server_wire as wire
from ._connection import _LINGER_BYTES, _LINGER_SECONDS, _RECEIVE_SIZE, _Connection
from ._messages import ErrorBody, Handler, Limits, Request, Response
from .errors import (
    LOCAL_RESOURCE_ERRNOS,
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    HttpError,
    RequestTimeout,
    local_resource_errors,
)
from .websocket import WebSocketAccept

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

_LISTEN_BACKLOG = 1024

#: A handler running longer than this gets its client watched for a disconnect (by the watchdog, whose tick
#: is at most this): so a client that leaves is noticed within twice this, and quick requests pay nothing.
_WATCH_AFTER = 0.03


def _default_error_body(status: int, message: str, error_type: str, target: bytes) -> bytes:
    return wire.error_body(message, error_type)


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
        gets a watch on its client (see ``_Connection.watch_handler``); otherwise every ``tick``, and a
        handler starting then wakes it (``_wake``).
        """
        limits = self.limits
        tick = min(1.0, min(limits.header_timeout, limits.keepalive_timeout, limits.write_timeout) / 10)
        connections = self._connections
        while True:
            if any(c.handler_since is not None and c.watching is None for c in connections):
                await trio.sleep(min(tick, _WATCH_AFTER))
            else:
                self._wake = wake = trio.Event()
                with trio.move_on_after(tick):
                    await wake.wait()
                self._wake = None
            now = trio.current_time()
            expired = [connection for connection in connections if connection.deadline <= now]
            for connection in expired:
                connection.expire()
            started_before = now - _WATCH_AFTER
            for connection in connections:
                since = connection.handler_since
                if since is not None and since <= started_before and connection.watching is None:
                    self._system.start_soon(connection.watch_handler)

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



async def _serve_connection(server: HttpServer, connection: _Connection) -> None:
    try:
        await connection.run()
    except Exception:
        logger.exception("connection from %s failed", connection.client)
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


async def _listen(host: str, port: int, reuse_port: bool = False) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Several processes listen on this port, each with its own accept queue, and the kernel spreads
            # new connections over them (runestone.cluster.workers says why this and not one shared socket).
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
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
    reuse_port: bool = False,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 (and WebSocket upgrades) on ``host:port`` until stopped.

    Calls ``task_status.started(server)`` once the socket listens (``server.port`` is the
    real port when ``port`` is 0). Returns after ``server.request_stop()`` once every
    connection is done or ``limits.drain_timeout`` passed. Cancelling it is a hard stop:
    every connection is closed at once. ``reuse_port`` sets ``SO_REUSEPORT``, so that other
    processes of the same user can listen on the same port beside this one.
    """
    sock = await _listen(host, port, reuse_port)
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
