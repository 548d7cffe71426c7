"""One connection of the HTTP server: httptools' callbacks, reading, writing, the client watch, drain, linger.

A :class:`_Connection` is owned by the task the server starts for it (``run()``): it reads
from the socket, feeds httptools' ``HttpRequestParser`` (this object is the parser's
callback target), builds a :class:`Request` per head, calls the server's handler and
writes the :class:`Response` (or hands the socket to the WebSocket handler). Requests on a
connection are answered strictly in order. The per-request path is kept small: one
``read(2)``, a handful of parser callbacks, one ``write(2)`` for a small response, no
cancel scope. Timeouts are deadlines the server's watchdog enforces: the connection says
what it waits for (a :class:`Phase`) and until when (``deadline``); the watchdog calls
``expire()`` when that passes, and ``watch_handler()`` for a handler that runs long.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import socket
from collections import deque
from typing import TYPE_CHECKING

import httptools
import trio

from . import _server_wire as wire
from ._messages import LastItem, Request, Response
from .errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    HttpError,
    RequestTimeout,
    _HeadersTooLarge,
    _VersionNotSupported,
)
from .websocket import WebSocketAccept, run_websocket, valid_websocket_key

if TYPE_CHECKING:
    from .server import HttpServer

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

@enum.unique
class Phase(enum.IntEnum):
    """What a connection is waiting for, which decides what happens when its deadline passes.

    ``GONE`` and ``STOPPED`` are never a connection's phase, only why it was cancelled
    (``_expired_phase``): each reason has its own value, so no check of one can take the other.
    """

    BUSY = 0
    """The handler runs or the server works: no deadline."""
    IDLE = 1
    """Keep-alive wait for the next request: close silently."""
    HEAD = 2
    """A request head is incomplete: answer 408, close."""
    WRITING = 3
    """A write is blocked on a client that does not read: drop the connection."""
    GONE = 4
    """The client closed the connection while its handler ran: close, nothing to answer."""
    STOPPED = 5
    """Closed by ``request_stop()`` while idle."""


# Module-level names for the hot path: a global lookup, not an attribute lookup on the enum class.
_BUSY = Phase.BUSY
_IDLE = Phase.IDLE
_HEAD = Phase.HEAD
_WRITING = Phase.WRITING
_GONE = Phase.GONE
_STOPPED = Phase.STOPPED

_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_NO_BODY_STATUSES = frozenset((204, 304))


class _PeerGone(Exception):
    """A write failed or timed out: the client is not there to answer any more."""


def _error_response(server: HttpServer, status: int, message: str, target: bytes,
                    error_type: str = "invalid_request_error") -> Response:
    return Response(status, [(b"content-type", b"application/json")],
                    server.error_body(status, message, error_type, target))


_INTERNAL_ERROR_BODY = wire.error_body("internal server error", "server_error")


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

    The server's watchdog (``HttpServer._expire_deadlines``) reads three attributes, written only
    here: ``deadline`` (when what the connection waits for expires), ``handler_since`` (when a
    handler that may run long started) and ``watching`` (the scope of the client watch, while one
    runs); it acts only through ``expire()``, ``close_if_idle()`` and ``watch_handler()``.
    Plain attributes rather than methods, since the watchdog scans every connection on each tick.
    """

    __slots__ = (
        "_server", "_limits", "_stream", "client", "_parser", "_ready", "_parsing", "_in_head",
        "_url", "_head_raw", "_error", "_error_request", "_upgrade_tail", "_eof",
        "_reading", "_read_done", "_response_started", "_served", "_fd", "_scope", "_phase",
        "deadline", "_expired_phase", "handler_since", "watching",
    )

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self._server = server
        self._limits = server.limits
        self._stream = stream
        try:
            peer = stream.socket.getpeername()
            self.client = (peer[0], peer[1])
        except (OSError, IndexError, TypeError):
            self.client = None
        self._parser = httptools.HttpRequestParser(self)
        self._ready: deque[Request] = deque()
        self._parsing: Request | None = None
        self._in_head = False
        self._url = b""
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
        self.deadline = trio.current_time() + self._limits.header_timeout
        self._expired_phase = _BUSY
        #: When the handler of a request whose body is in started (None when no handler runs).
        self.handler_since: float | None = None
        #: The cancel scope of the watch on a long-running handler, while one runs.
        self.watching: trio.CancelScope | None = None

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self, self.client)
        self._in_head = True
        self._url = b""
        self._head_raw = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            raise BadRequest(f"request line exceeds the limit of {self._limits.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The headers' size is judged at the end of the head (on_headers_complete); until then the raw bytes
        # read bound it (see _feed), and their count is bounded here.
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        headers = self._parsing.headers
        headers.append((name.lower(), value))
        if len(headers) > self._limits.max_headers:
            raise _HeadersTooLarge(f"request has more than {self._limits.max_headers} headers")

    def on_headers_complete(self) -> None:
        request = self._parsing
        parser = self._parser
        limits = self._limits
        headers = request.headers
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1")
        hosts = 0
        size = 4 * len(headers)  # ": " and CRLF, as each header line is counted
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                request._content_length = int(value)
            elif name == b"expect" and value.lower() == b"100-continue":
                request._expect_continue = True
        if size > limits.max_header_bytes:
            raise _HeadersTooLarge(f"request headers exceed the limit of {limits.max_header_bytes} bytes")
        if hosts != 1 and (hosts or version == "1.1"):
            # RFC 9112 section 3.2: HTTP/1.1 needs exactly one Host; HTTP/1.0 may omit it.
            raise BadRequest("an HTTP/1.1 request needs a Host header" if not hosts
                             else "a request may carry only one Host header")
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
        self.deadline = math.inf
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
        self.deadline = trio.current_time() + self._limits.write_timeout
        try:
            await self._stream.send_all(memoryview(data)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone() from exc
        finally:
            self._phase = phase
            self.deadline = math.inf

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
                self._parser = None  # it holds our bound callbacks: a cycle only the collector would free
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
            deadline = self.deadline
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
            self.deadline = deadline
            data = await self._read()
            self._phase = _BUSY
            self.deadline = math.inf
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
                    # watch_handler); a quick one costs nothing more than these two stores.
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
        self.handler_since = trio.current_time()
        server = self._server
        wake = server._wake
        if wake is not None:
            server._wake = None
            wake.set()

    def _end_watch(self) -> None:
        self.handler_since = None
        watching = self.watching
        if watching is not None:
            self.watching = None
            watching.cancel()

    async def watch_handler(self) -> None:
        """Watch the client of a handler that has run for a while (started by the server's watchdog).

        If the client closes the connection before its answer, the connection is cancelled, and with it
        the handler, so an upstream request it waits on is closed at once instead of running on for
        nobody. Only for a request whose body is in, so that nothing else reads the socket meanwhile;
        bytes that arrive instead of an end of file (a pipelined request) end the watch.
        """
        if self.handler_since is None or self.watching is not None:
            return
        with trio.CancelScope() as scope:
            self.watching = scope
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
            if gone and self.handler_since is not None:
                self._eof = True
                self._expired_phase = _GONE
                self._scope.cancel()
        if self.watching is scope:
            self.watching = None

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
            # (watch_handler): a client that leaves cancels the producer at once, even while it waits on
            # its upstream. Only when nothing else reads the socket (the request body is in).
            watch = request._complete
            if watch:
                self._begin_watch()
            try:
                iterator = stream.__aiter__()
                send = self._send
                frame = wire.chunk if chunked else None
                ended = False
                if response.first_ready:
                    # The first item is at hand: it goes out with the head, in one write.
                    try:
                        item = await iterator.__anext__()
                    except StopAsyncIteration:
                        item = LastItem()
                    except BaseException:
                        await send(head)
                        raise
                    ended = item.__class__ is LastItem
                    parts = [head]  # joined once: the item is the whole answer, as a rule
                    if item and frame is not None:
                        parts += (b"%x\r\n" % len(item), item, b"\r\n")
                    elif item:
                        parts.append(item)
                    if ended and chunked:
                        parts.append(wire.LAST_CHUNK)
                    head = b"".join(parts)
                await send(head)
                if not ended:
                    checkpoint = trio.lowlevel.checkpoint
                    if response.first_ready:
                        await checkpoint()
                    async for item in iterator:
                        if item.__class__ is LastItem:
                            if frame is not None:
                                await send(frame(item) + wire.LAST_CHUNK if item else wire.LAST_CHUNK)
                            elif item:
                                await send(item)
                            ended = True
                            break
                        if item:
                            await send(frame(item) if frame is not None else item)
                            # A write that fits the socket buffer does not yield: let the
                            # other tasks run between two items, as a trio stream would, so
                            # a producer that never waits cannot starve them.
                            await checkpoint()
                    if chunked and not ended:
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

