"""The upstream HTTP/1.1 client: a keep-alive connection pool per origin on trio sockets, parsing with httptools.

Every call the gateway makes to a model provider goes through ``Transport.stream``,
most of them streaming server-sent events, so this module is a hot path: the
request is written with one ``send``; on plain TCP the socket is driven directly
(non-blocking ``recv`` first, ``wait_readable`` only when the kernel has nothing
yet) rather than through trio's stream layers, which cost about ten times more
per read; read and write timeouts are kept by one task per trio run (``_IODeadlines``)
instead of a cancel scope per operation. TLS goes through ``trio.SSLStream``. Each
body chunk handed to the caller is the de-chunked data of one socket read, so a
relay can forward it at once. Pooled connections idle for more than 50 ms are
checked for a peer close (or stray bytes) before reuse; a reused connection that
dies before any response byte arrives is replaced and the request sent once more. ``FastTransport`` is the default
transport; ``HttpxTransport`` (in ``httpx_transport``) implements the same seam
for proxies and HTTP/2, and ``make_transport`` picks one by name.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import httptools
import trio
from trio.lowlevel import ParkingLot, checkpoint_if_cancelled, notify_closing, wait_readable, wait_writable

from .errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    LocalResourceError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    WriteTimeout,
    local_resource_kind,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "FastTransport",
    "OriginStatistics",
    "PoolLimits",
    "Timeouts",
    "Transport",
    "TransportStatistics",
    "UpstreamResponse",
    "make_transport",
]

HeaderList = Sequence[tuple[bytes | str, bytes | str]]

_RECV_SIZE = 65536
_USER_AGENT = b"runestone/0.1"
_TARGET_CACHE_SIZE = 1024
# Idle connections of an origin nobody calls any more are closed by a sweep that
# runs at most this often, on the way into a request (there is no background task).
_SWEEP_INTERVAL = 5.0
# A connection back in the pool for less than this is reused without first checking that the peer has not
# closed it (a syscall per reuse, under load): servers close idle connections after seconds, not
# milliseconds, and one that closed it all the same is caught by the resend on a new connection.
_TRUST_IDLE = 0.05

_positive = attrs.validators.gt(0)


@attrs.frozen
class Timeouts:
    """Timeouts in seconds. ``read`` bounds the gap between two reads, not the whole response,
    so a long stream that keeps producing never times out."""

    connect: float = attrs.field(default=10.0, validator=_positive)
    read: float = attrs.field(default=60.0, validator=_positive)
    write: float = attrs.field(default=30.0, validator=_positive)
    pool: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen
class PoolLimits:
    """Per-origin pool limits. ``max_connections`` counts connections open, being opened and idle."""

    max_connections: int = attrs.field(default=100, validator=_positive)
    max_idle: int = attrs.field(default=32, validator=attrs.validators.ge(0))
    idle_expiry: float = attrs.field(default=60.0, validator=_positive)


@attrs.frozen
class OriginStatistics:
    """One origin's pool at the moment ``FastTransport.statistics()`` was called."""

    origin: str
    """``scheme://host:port``."""
    open: int
    """Connections open or being opened (idle ones included)."""
    idle: int
    """Open connections waiting in the pool for the next request."""
    in_use: int
    """Connections carrying a request, or being opened for one."""
    waiting: int
    """Requests waiting for a free connection slot."""


@attrs.frozen
class TransportStatistics:
    """All origins the transport has talked to, in first-use order."""

    origins: tuple[OriginStatistics, ...]

    def origin(self, origin: str) -> OriginStatistics | None:
        """The statistics of ``scheme://host:port``, or None if never used."""
        for stats in self.origins:
            if stats.origin == origin:
                return stats
        return None


class UpstreamResponse:
    """A response whose head has arrived and whose body is read on demand.

    ``status`` is the final status (1xx interim responses are skipped) and
    ``headers`` the response headers in wire order, names lowercased.
    Iterating yields the body as it arrives, de-chunked, one item per socket
    read. ``aclose()`` is idempotent; after a body read to its end it returns
    the connection to the pool, otherwise it closes the connection.
    """

    __slots__ = ("headers", "status")

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        raise NotImplementedError

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        return b"".join([chunk async for chunk in self])

    def set_deadline(self, deadline: float | None) -> None:
        """Bound the body reads from now on by ``deadline`` (trio's clock; None: only by the read timeout)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'status', '?')}>"


class Transport:
    """The seam between provider code and HTTP: one streaming request method.

    ``stream()`` returns an async context manager; entering it sends the
    request and waits for the response head, leaving it closes the response
    (``UpstreamResponse.aclose``). Every failure is a ``TransportError``.
    ``deadline`` (a time on trio's clock) bounds every wait of the exchange
    (for a pool slot, connecting, writing, each read of the head and of the
    body) besides its own timeout: past it the wait fails with that phase's
    ``TransportTimeout``, whose message says the deadline passed.
    ``UpstreamResponse.set_deadline`` moves it for the body reads that follow.
    A deadline costs no cancel scope: callers need none around the exchange.
    Cancellation at any point closes the connection at once: a connection
    in an unknown state never goes back to the pool. A transport is also an
    async context manager closing itself on exit.
    """

    def stream(
        self,
        method: str,
        url: str,
        headers: HeaderList,
        body: bytes = b"",
        *,
        timeouts: Timeouts | None = None,
        deadline: float | None = None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        raise NotImplementedError

    async def aclose(self, *, abort_in_use: bool = False) -> None:
        """Close the transport; with ``abort_in_use`` also the connections requests are still using."""
        raise NotImplementedError

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def make_transport(kind: str = "fast", **kw: Any) -> Transport:
    """The transport named by configuration: ``"fast"`` (``FastTransport``) or ``"httpx"`` (``HttpxTransport``).
    Keyword arguments go to the constructor."""
    if kind == "fast":
        return FastTransport(**kw)
    if kind == "httpx":
        from .httpx_transport import HttpxTransport

        return HttpxTransport(**kw)
    raise ValueError(f"unknown transport {kind!r}: expected 'fast' or 'httpx'")


class _ConnectionLost(RemoteProtocolError):
    """The connection failed before a single response byte arrived; safe to retry if it was a reused one."""


# One module-level poller: registering an fd is a dict operation, only poll() is a syscall,
# and unlike select() it works for descriptors above FD_SETSIZE.
_poller = select.poll()
_POLL_ANY = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def _readable_now(fd: int) -> bool:
    _poller.register(fd, _POLL_ANY)
    try:
        return bool(_poller.poll(0))
    finally:
        _poller.unregister(fd)


class _IODeadlines:
    """Read and write timeouts for every connection of one trio run, kept by one system task.

    A cancel scope around each read costs about 9 µs of a 32 µs request
    (entering it registers a deadline with the run, leaving it unregisters
    it). Instead a reader or writer stamps its connection with a deadline and
    adds it to ``armed``, which costs a set insertion; this task sleeps until
    the earliest deadline it knows of, and closes every connection whose
    deadline has passed. Closing the socket wakes the waiting task with
    ``ClosedResourceError``, which it reports as ``ReadTimeout`` or
    ``WriteTimeout``: a timed-out connection is never reused anyway. Deadlines usually only move later (each read pushes
    its own forward), so arming rarely has to wake this task early.
    """

    __slots__ = ("_scope", "armed", "wake_at")

    def __init__(self) -> None:
        self.armed: set[_Connection] = set()
        self.wake_at = math.inf
        self._scope = trio.CancelScope()

    def arm(self, conn: _Connection, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        if conn.cap < deadline:
            deadline = conn.cap
        conn.deadline = deadline
        self.armed.add(conn)
        if deadline < self.wake_at:
            self.wake_at = self._scope.deadline = deadline

    def tighten(self, conn: _Connection, deadline: float) -> None:
        """A wait in progress on ``conn`` ends by ``deadline`` too (its cap was lowered while it waited)."""
        if conn in self.armed and deadline < conn.deadline:
            conn.deadline = deadline
            if deadline < self.wake_at:
                self.wake_at = self._scope.deadline = deadline

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.wake_at) as self._scope:
                await trio.sleep_forever()
            now = trio.current_time()
            wake_at = math.inf
            for conn in list(self.armed):
                if conn.deadline <= now:
                    self.armed.discard(conn)
                    conn.timed_out = True
                    try:
                        conn.close()
                    except OSError:  # pragma: no cover - close() of a socket failing is not actionable here
                        pass
                elif conn.deadline < wake_at:
                    wake_at = conn.deadline
            self.wake_at = wake_at


_io_deadlines: trio.lowlevel.RunVar[_IODeadlines] = trio.lowlevel.RunVar("runestone.http.io_deadlines")


def _current_io_deadlines() -> _IODeadlines:
    try:
        return _io_deadlines.get()
    except LookupError:
        keeper = _IODeadlines()
        trio.lowlevel.spawn_system_task(keeper.run, name="runestone.http I/O deadlines")
        _io_deadlines.set(keeper)
        return keeper


class _Connection:
    """One connection to an origin, carrying one request at a time. ``close()`` is synchronous and
    frees the pool slot, so it is safe in any ``except`` or ``finally``, cancelled or not.
    A connection belongs to the trio run that opened it (its I/O deadlines are kept there)."""

    __slots__ = ("cap", "closed", "deadline", "deadlines", "idle_since", "pool", "reused", "timed_out")

    def __init__(self, pool: _OriginPool) -> None:
        self.pool = pool
        self.reused = False
        self.closed = False
        self.timed_out = False
        self.idle_since = 0.0
        self.deadline = math.inf
        #: The exchange's own deadline (``stream(deadline=...)``): no wait of it lasts past this.
        self.cap = math.inf
        self.deadlines = _current_io_deadlines()

    def timeout_message(self, otherwise: str) -> str:
        """What a timed-out wait reports: the exchange's deadline if that is what passed, else ``otherwise``."""
        if self.cap <= trio.current_time():
            return f"the request's deadline passed while waiting for {self.pool.origin}"
        return otherwise

    async def send_all(self, data: bytes, timeout: float) -> None:
        raise NotImplementedError

    async def receive(self, timeout: float) -> bytes:
        raise NotImplementedError

    def dead_while_idle(self) -> bool:
        """Whether the idle socket became readable: the peer closed it, reset it, or sent stray bytes."""
        raise NotImplementedError

    def _close_socket(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_socket()
        pool = self.pool
        pool.busy.discard(self)
        pool.open -= 1
        if pool.waiters:
            pool.waiters.unpark()


class _PlainConnection(_Connection):
    __slots__ = ("_sock",)

    def __init__(self, pool: _OriginPool, sock: socket.socket) -> None:
        super().__init__(pool)
        self._sock = sock

    async def send_all(self, data: bytes, timeout: float) -> None:
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {exc}") from exc
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            while view:
                await wait_writable(sock)
                try:
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {exc}") from exc
        except trio.ClosedResourceError:
            if self.timed_out:
                message = f"writing the request to {self.pool.origin} took longer than {timeout:g} s"
                raise WriteTimeout(self.timeout_message(message)) from None
            raise RemoteProtocolError(f"the connection to {self.pool.origin} was closed by its transport") from None
        finally:
            deadlines.armed.discard(self)

    async def receive(self, timeout: float) -> bytes:
        sock = self._sock
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc}") from exc
        else:
            # Data was already there, so nothing yielded: still honour a pending cancellation.
            await checkpoint_if_cancelled()
            return data
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            while True:
                await wait_readable(sock)
                try:
                    return sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc}") from exc
        except trio.ClosedResourceError:
            if self.timed_out:
                raise ReadTimeout(self.timeout_message(f"{self.pool.origin} sent nothing for {timeout:g} s")) from None
            # Closed under us by aclose(abort_in_use=True): the exchange failed, as a transport error.
            raise RemoteProtocolError(f"the connection to {self.pool.origin} was closed by its transport") from None
        finally:
            deadlines.armed.discard(self)

    def dead_while_idle(self) -> bool:
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def _close_socket(self) -> None:
        sock = self._sock
        if sock.fileno() != -1:
            notify_closing(sock)
            sock.close()


class _TLSConnection(_Connection):
    __slots__ = ("_raw", "_stream")

    def __init__(self, pool: _OriginPool, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__(pool)
        self._stream = stream
        self._raw = stream.transport_stream.socket

    async def send_all(self, data: bytes, timeout: float) -> None:
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self.timed_out:
                message = f"writing the request to {self.pool.origin} took longer than {timeout:g} s"
                raise WriteTimeout(self.timeout_message(message)) from None
            cause = exc.__cause__ or exc
            raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {cause}") from exc
        finally:
            deadlines.armed.discard(self)

    async def receive(self, timeout: float) -> bytes:
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            return await self._stream.receive_some(_RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self.timed_out:
                raise ReadTimeout(self.timeout_message(f"{self.pool.origin} sent nothing for {timeout:g} s")) from None
            raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc.__cause__ or exc}") from exc
        finally:
            deadlines.armed.discard(self)

    def dead_while_idle(self) -> bool:
        fd = self._raw.fileno()
        return fd == -1 or _readable_now(fd)

    def _close_socket(self) -> None:
        # No close_notify: the connection is either idle with nothing owed, or in an unknown
        # state; HTTP/1.1 framing, not TLS closure, says whether a response was complete.
        self._raw.close()


@attrs.define(eq=False)
class _OriginPool:
    """The connections of one origin. Owned by the transport; every task using the transport
    touches it, but only between checkpoints, so no lock is needed."""

    origin: str
    host: str
    port: int
    tls: bool
    max_idle: int
    closed: bool = False
    """Set when the transport closes: connections are then closed instead of kept."""
    idle: list[_Connection] = attrs.Factory(list)
    """Most recently used last: reuse pops from the end, expiry trims from the front."""
    open: int = 0
    """Slots taken: connections open (idle included) or being opened."""
    waiters: ParkingLot = attrs.Factory(ParkingLot)
    busy: set = attrs.Factory(set)
    """Connections handed out and not yet released or closed (``aclose(abort_in_use=True)`` closes them)."""

    def release(self, conn: _Connection) -> None:
        """Keep ``conn``, whose last response ended cleanly, for the next request."""
        self.busy.discard(conn)
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.reused = True
        conn.cap = math.inf
        conn.idle_since = trio.current_time()
        self.idle.append(conn)
        if self.waiters:
            self.waiters.unpark()


def _delimited_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response body runs until the connection closes (RFC 9112 §6.3, rule 8)."""
    for name, value in headers:
        if name == b"content-length":
            return False
        if name == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
            return False
    return True


class _FastResponse(UpstreamResponse):
    """The response of a ``FastTransport`` exchange; also the httptools parser's callback target.

    A fresh parser per response costs a quarter of a microsecond and keeps HEAD
    (whose body the parser cannot know to skip) from poisoning the next response.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_head_done",
        "_informational",
        "_is_head",
        "_keep_alive",
        "_parser",
        "_read_timeout",
        "_received",
    )

    def __init__(self, conn: _Connection, is_head: bool, read_timeout: float) -> None:
        self.status = 0
        self.headers = []
        self._conn: _Connection | None = conn
        self._is_head = is_head
        self._read_timeout = read_timeout
        self._chunks: list[bytes] = []
        self._received = False
        self._head_done = False
        self._complete = False
        self._informational = False
        self._keep_alive = False
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            # Bytes after the end of the response: stop parsing; the connection is not reused.
            raise RemoteProtocolError("data after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            # 1xx interim response (100 Continue, 103 Early Hints): the final one follows.
            self._informational = True
            self.headers = []
            return
        self.status = status
        # Asked here: httptools no longer knows once the message is complete.
        self._keep_alive = parser.should_keep_alive()
        self._head_done = True
        if self._is_head:
            self._complete = True

    def on_body(self, body: bytes) -> None:
        if self._complete:  # a body after a HEAD response
            self._keep_alive = False
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
        else:
            self._complete = True

    # reading

    async def _pump(self) -> None:
        """Read once from the socket and feed the parser. Raises on timeout, on a lost connection
        and on a malformed response; marks the body complete at a legitimate EOF."""
        conn = self._conn
        if conn is None:
            raise TransportError("the response was closed before its body was read")
        try:
            data = await conn.receive(self._read_timeout)
        except _ConnectionLost as exc:
            if self._received:
                raise RemoteProtocolError(str(exc)) from exc.__cause__
            raise
        if not data:
            self._at_eof(conn)
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise RemoteProtocolError(f"{conn.pool.origin} switched protocols, which was not asked for") from exc
        except httptools.HttpParserError as exc:
            if not self._complete:
                cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
                raise RemoteProtocolError(f"malformed response from {conn.pool.origin}: {cause}") from exc
            self._keep_alive = False

    def _at_eof(self, conn: _Connection) -> None:
        origin = conn.pool.origin
        if not self._received:
            raise _ConnectionLost(f"{origin} closed the connection before sending a response")
        if not self._head_done:
            raise RemoteProtocolError(f"{origin} closed the connection in the middle of the response head")
        if not _delimited_by_close(self.headers):
            raise RemoteProtocolError(f"{origin} closed the connection before the response body ended")
        self._complete = True
        self._keep_alive = False

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            if self._complete:
                raise StopAsyncIteration
            try:
                while not chunks and not self._complete:
                    await self._pump()
            except BaseException:
                self._abort()
                raise
            if not chunks:
                raise StopAsyncIteration
        if len(chunks) == 1:
            data = chunks[0]
        else:
            data = b"".join(chunks)
        chunks.clear()
        return data

    async def read(self) -> bytes:
        chunks = self._chunks
        try:
            while not self._complete:
                await self._pump()
        except BaseException:
            self._abort()
            raise
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    def set_deadline(self, deadline: float | None) -> None:
        conn = self._conn
        if conn is not None:
            conn.cap = math.inf if deadline is None else deadline
            if deadline is not None:
                conn.deadlines.tighten(conn, deadline)

    def _abort(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()

    async def aclose(self) -> None:
        """Return the connection to the pool if the response ended cleanly, else close it. Never blocks."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._complete and self._keep_alive:
            conn.pool.release(conn)
        else:
            conn.close()


class _Exchange:
    """The context manager ``FastTransport.stream`` returns: a plain class, cheaper than a generator-based one."""

    __slots__ = ("_args", "_response", "_transport")

    def __init__(self, transport: FastTransport, args: tuple[Any, ...]) -> None:
        self._transport = transport
        self._args = args
        self._response: _FastResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        self._response = response = await self._transport._start(*self._args)
        return response

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        response = self._response
        if response is not None:
            self._response = None
            await response.aclose()


_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing is ours to set from the body we send; a caller's value could only contradict it.
_DROPPED = frozenset({b"content-length", b"transfer-encoding"})
_HOST = b"host"
_USER_AGENT_NAME = b"user-agent"


def _build_request(method: str, target: bytes, host: bytes, headers: HeaderList, body: bytes) -> bytes:
    """The request head (and body) as one bytes object, ready for one ``send``."""
    method_b = _METHODS.get(method)
    if method_b is None:
        if not method or not method.isascii() or " " in method:
            raise LocalProtocolError(f"invalid HTTP method {method!r}")
        method_b = method.encode("ascii")
    parts = [method_b, b" ", target, b" HTTP/1.1\r\n"]
    lines = 2  # the request line and the blank line ending the head
    need_host = need_agent = True
    try:
        for name, value in headers:
            if name.__class__ is not bytes:
                name = name.encode("ascii")
            if value.__class__ is not bytes:
                value = value.encode("latin-1")
            lower = name.lower()
            if lower in _DROPPED:
                continue
            if lower == _HOST:
                need_host = False
            elif lower == _USER_AGENT_NAME:
                need_agent = False
            parts += (name, b": ", value, b"\r\n")
            lines += 1
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"header not encodable: {exc}") from None
    if need_host:
        parts += (b"Host: ", host, b"\r\n")
        lines += 1
    if need_agent:
        parts += (b"User-Agent: ", _USER_AGENT, b"\r\n")
        lines += 1
    if body or method in _BODY_METHODS:
        parts.append(b"Content-Length: %d\r\n" % len(body))
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One count per byte value instead of a check per header: any CR or LF inside a name
    # or value shows up as a surplus over the line endings we wrote ourselves.
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise LocalProtocolError("header names and values must not contain CR or LF")
    return head + body if body else head


_default_context: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    """One verifying context for every transport that was given none: loading the system
    CA store takes milliseconds, and a context is safe to share."""
    global _default_context
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context


class FastTransport(Transport):
    """The default transport: a keep-alive HTTP/1.1 pool per origin (scheme, host, port).

    Connection slots are limited per origin by ``PoolLimits.max_connections``;
    a request waits for a slot at most ``Timeouts.pool`` (``PoolTimeout``).
    An idle connection is reused newest-first, after a check that the peer has
    not closed it if it was idle for more than 50 ms (under load connections come
    back within milliseconds, and the check is a syscall); idle connections past
    ``idle_expiry`` are closed. If a
    reused connection fails before any response byte arrives (the server
    closed it just as the request left), the request is sent once more on a
    new connection; requests are assumed safe to resend in that case, as no
    byte of them was processed by a server that answered nothing.
    ``https`` uses ``ssl_context`` or, by default, ``ssl.create_default_context()``
    (certificate and host name verified, SNI sent). A transport is used within
    one ``trio.run``: connections keep their I/O deadlines in the run that
    opened them.
    """

    def __init__(
        self,
        *,
        limits: PoolLimits = PoolLimits(),
        timeouts: Timeouts = Timeouts(),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limits = limits
        self._timeouts = timeouts
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _OriginPool] = {}
        self._targets: dict[str, tuple[_OriginPool, bytes, bytes]] = {}
        self._closed = False
        self._next_sweep = float("-inf")

    def __repr__(self) -> str:
        return f"<FastTransport origins={len(self._pools)} {self._limits!r} {self._timeouts!r}>"

    def stream(
        self,
        method: str,
        url: str,
        headers: HeaderList,
        body: bytes = b"",
        *,
        timeouts: Timeouts | None = None,
        deadline: float | None = None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        return _Exchange(self, (method, url, headers, body, timeouts or self._timeouts,
                                math.inf if deadline is None else deadline))

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            origins=tuple(
                OriginStatistics(
                    origin=pool.origin,
                    open=pool.open,
                    idle=len(pool.idle),
                    in_use=pool.open - len(pool.idle),
                    waiting=len(pool.waiters),
                )
                for pool in self._pools.values()
            )
        )

    async def aclose(self, *, abort_in_use: bool = False) -> None:
        """Close idle connections now and in-use ones when their response ends (or now, with
        ``abort_in_use``: their readers then fail with a transport error); later ``stream`` calls fail.
        Tasks waiting for a slot are woken and fail."""
        self._closed = True
        for pool in self._pools.values():
            pool.closed = True
            idle, pool.idle = pool.idle, []
            for conn in idle:
                conn.close()
            if abort_in_use:
                for conn in list(pool.busy):
                    conn.close()
            pool.waiters.unpark_all()
        await checkpoint_if_cancelled()

    # internals

    def _resolve(self, url: str) -> tuple[_OriginPool, bytes, bytes]:
        """Pool, Host header and request target of ``url``; cached, as a few URLs are called over and over."""
        try:
            parts = urlsplit(url)
            explicit_port = parts.port
        except ValueError as exc:
            raise LocalProtocolError(f"invalid URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme == "https":
            tls, default_port = True, 443
        elif scheme == "http":
            tls, default_port = False, 80
        else:
            raise LocalProtocolError(f"unsupported URL scheme in {url!r}: expected http or https")
        host = parts.hostname
        if not host:
            raise LocalProtocolError(f"URL {url!r} has no host")
        if parts.username is not None:
            raise LocalProtocolError("credentials in the URL are not sent; pass an Authorization header instead")
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        port = explicit_port or default_port
        host_header = f"[{host}]" if ":" in host else host
        if explicit_port is not None and explicit_port != default_port:
            host_header = f"{host_header}:{port}"
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        if not target.isascii() or any(c in target for c in " \r\n\t"):
            raise LocalProtocolError(f"URL {url!r} must be percent-encoded (no spaces, controls or non-ASCII)")
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            bracketed = f"[{host}]" if ":" in host else host
            pool = self._pools[key] = _OriginPool(
                origin=f"{scheme}://{bracketed}:{port}", host=host, port=port, tls=tls, max_idle=self._limits.max_idle
            )
        entry = (pool, host_header.encode("ascii"), target.encode("ascii"))
        if len(self._targets) >= _TARGET_CACHE_SIZE:
            self._targets.clear()
        self._targets[url] = entry
        return entry

    def _sweep(self, now: float) -> None:
        expiry = self._limits.idle_expiry
        for pool in self._pools.values():
            idle = pool.idle
            while idle and now - idle[0].idle_since >= expiry:
                idle.pop(0).close()
        self._next_sweep = now + min(expiry, _SWEEP_INTERVAL)

    async def _start(
        self, method: str, url: str, headers: HeaderList, body: bytes, timeouts: Timeouts, deadline: float
    ) -> _FastResponse:
        await checkpoint_if_cancelled()
        if self._closed:
            raise TransportError("the transport is closed")
        entry = self._targets.get(url)
        if entry is None:
            entry = self._resolve(url)
        pool, host, target = entry
        request = _build_request(method, target, host, headers, body)
        is_head = method == "HEAD"
        conn = await self._acquire(pool, timeouts, deadline, reuse=True)
        try:
            return await self._exchange(conn, request, is_head, timeouts, deadline)
        except _ConnectionLost as exc:
            if not conn.reused:
                raise RemoteProtocolError(str(exc)) from exc.__cause__
        # The server dropped a kept-alive connection as we reused it: once more, on a new one.
        conn = await self._acquire(pool, timeouts, deadline, reuse=False)
        try:
            return await self._exchange(conn, request, is_head, timeouts, deadline)
        except _ConnectionLost as exc:
            raise RemoteProtocolError(str(exc)) from exc.__cause__

    async def _exchange(
        self, conn: _Connection, request: bytes, is_head: bool, timeouts: Timeouts, deadline: float
    ) -> _FastResponse:
        """Send the request and read up to the end of the response head; close ``conn`` on any failure."""
        conn.cap = deadline
        try:
            await conn.send_all(request, timeouts.write)
            response = _FastResponse(conn, is_head, timeouts.read)
            # With other requests in flight, let their tasks run before the first read: the answer can hardly
            # be there yet, and usually is by the time they are done, which spares a failed read and a wait.
            if len(conn.pool.busy) > 1:
                await trio.lowlevel.checkpoint()
            while not response._head_done:
                await response._pump()
        except BaseException:
            conn.close()
            raise
        return response

    async def _acquire(self, pool: _OriginPool, timeouts: Timeouts, cap: float, *, reuse: bool) -> _Connection:
        """An idle connection (``reuse``) or a new one, waiting up to ``timeouts.pool`` (and at most until
        ``cap``) for a slot."""
        limits = self._limits
        deadline: float | None = None
        while True:
            now = trio.current_time()
            if now >= self._next_sweep:
                self._sweep(now)
            if pool.idle:
                if reuse:
                    idle = pool.idle
                    while idle:
                        conn = idle.pop()
                        idle_for = now - conn.idle_since
                        if idle_for < limits.idle_expiry and (idle_for < _TRUST_IDLE or not conn.dead_while_idle()):
                            pool.busy.add(conn)
                            return conn
                        conn.close()
                elif pool.open >= limits.max_connections and pool.idle:
                    # A fresh connection is wanted and the pool is full: make room.
                    pool.idle.pop(0).close()
            if pool.open < limits.max_connections:
                break
            if self._closed:
                raise TransportError("the transport is closed")
            if deadline is None:
                deadline = min(trio.current_time() + timeouts.pool, cap)
            with trio.CancelScope(deadline=deadline) as scope:
                await pool.waiters.park()
            if scope.cancelled_caught:
                if cap <= trio.current_time():
                    raise PoolTimeout(f"the request's deadline passed while waiting for a connection to {pool.origin}")
                raise PoolTimeout(
                    f"all {limits.max_connections} connections to {pool.origin} stayed busy for {timeouts.pool:g} s"
                )
            if self._closed:
                raise TransportError("the transport is closed")
        pool.open += 1
        try:
            conn = await self._connect(pool, timeouts.connect, cap)
            pool.busy.add(conn)
            return conn
        except BaseException:
            pool.open -= 1
            if pool.waiters:
                pool.waiters.unpark()
            raise

    async def _connect(self, pool: _OriginPool, timeout: float, cap: float) -> _Connection:
        with trio.CancelScope(deadline=min(trio.current_time() + timeout, cap)):
            try:
                stream = await trio.open_tcp_stream(pool.host, pool.port)
            except OSError as exc:
                kind = local_resource_kind(exc)
                if kind is not None:
                    # Our own socket() or connect() failed: the origin was never asked.
                    raise LocalResourceError(f"no connection to {pool.origin}: out of local resources ({kind})",
                                             kind) from exc
                raise ConnectError(f"cannot connect to {pool.origin}: {exc}") from exc
            if not pool.tls:
                # Leave trio's stream for the bare socket (see the module docstring).
                sock = socket.socket(fileno=stream.socket.detach())
                sock.setblocking(False)
                return _PlainConnection(pool, sock)
            context = self._ssl_context or _default_ssl_context()
            tls_stream = trio.SSLStream(stream, context, server_hostname=pool.host, https_compatible=True)
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                stream.socket.close()
                raise ConnectError(f"TLS handshake with {pool.origin} failed: {exc.__cause__ or exc}") from exc
            except BaseException:
                stream.socket.close()
                raise
            return _TLSConnection(pool, tls_stream)
        if cap <= trio.current_time():
            raise ConnectTimeout(f"the request's deadline passed while connecting to {pool.origin}")
        raise ConnectTimeout(f"no connection to {pool.origin} within {timeout:g} s")
