"""The upstream HTTP/1.1 client: a keep-alive connection pool per origin on trio sockets, parsing with httptools.

Every call the gateway makes to a model provider goes through ``Transport.stream``,
most of them streaming server-sent events, so this is a hot path: the
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

Layout, as httpcore splits its engine: ``transport`` is the seam (``Transport``, ``UpstreamResponse``,
``Timeouts``, ``PoolLimits``, ``MockTransport``); this module is ``FastTransport`` (resolving a URL,
acquiring a connection, the exchange) and ``make_transport``; ``_pool`` one origin's connections;
``_connection_client`` one connection (plain or TLS) and the I/O deadlines; ``_response`` the
response and its body reads. The seam's names are re-exported here.
"""

from __future__ import annotations

import math
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from trio.lowlevel import checkpoint_if_cancelled

from ._connection_client import _ConnectionLost, _PlainConnection, _TLSConnection, _UpstreamConnection
from ._pool import _OriginPool
from ._response import _FastResponse
from .errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    LocalResourceError,
    PoolTimeout,
    RemoteProtocolError,
    TransportError,
    local_resource_kind,
)
from .httpx_transport import HttpxTransport
from .transport import HeaderList, PoolLimits, Timeouts, Transport, UpstreamResponse

__all__ = [
    "FastTransport",
    "OriginStatistics",
    "PoolLimits",
    "PreparedHeaders",
    "Timeouts",
    "Transport",
    "TransportStatistics",
    "UpstreamResponse",
    "make_transport",
    "prepared_headers",
]

_USER_AGENT = b"runestone/0.1"
_TARGET_CACHE_SIZE = 1024
# Idle connections of an origin nobody calls any more are closed by a sweep that
# runs at most this often, on the way into a request (there is no background task).
_SWEEP_INTERVAL = 5.0
# A connection back in the pool for less than this is reused without first checking that the peer has not
# closed it (a syscall per reuse, under load): servers close idle connections after seconds, not
# milliseconds, and one that closed it all the same is caught by the resend on a new connection.
_TRUST_IDLE = 0.05


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



_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing is ours to set from the body we send; a caller's value could only contradict it.
_DROPPED = frozenset({b"content-length", b"transfer-encoding"})
_HOST = b"host"
_USER_AGENT_NAME = b"user-agent"


class PreparedHeaders(tuple):
    """Request headers that do not change between requests (a provider's content type, accept and
    credential), as the pairs they are and as the header lines :class:`FastTransport` writes, made once
    (:func:`prepared_headers`). Any transport takes them as a tuple of pairs."""

    #: The header lines, the Host and User-Agent lines still to add (none given), and how many lines.
    lines: bytes
    need_host: bool
    need_agent: bool
    count: int


def prepared_headers(headers: HeaderList) -> tuple:
    """``headers`` as :class:`PreparedHeaders`; as a plain tuple when one of them cannot be encoded (each
    request that sends them then fails with the LocalProtocolError that says why). A CR or LF in them is
    caught where every head is checked, in :func:`_build_request`, prepared or not."""
    parts: list[bytes] = []
    try:
        count, need_host, need_agent = _header_lines(headers, parts)
    except LocalProtocolError:
        return tuple(headers)
    pairs = PreparedHeaders(tuple(headers))
    pairs.lines, pairs.need_host, pairs.need_agent, pairs.count = b"".join(parts), need_host, need_agent, count
    return pairs


def _header_lines(headers, parts: list) -> tuple[int, bool, bool]:
    """Append ``headers``' lines to ``parts`` (framing names dropped); (lines, need Host, need User-Agent)."""
    lines = 0
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
    return lines, need_host, need_agent


def _build_request(method: str, target: bytes, host: bytes, headers: HeaderList, body: bytes) -> bytes:
    """The request head (and body) as one bytes object, ready for one ``send``."""
    method_b = _METHODS.get(method)
    if method_b is None:
        if not method or not method.isascii() or " " in method:
            raise LocalProtocolError(f"invalid HTTP method {method!r}")
        method_b = method.encode("ascii")
    parts = [method_b, b" ", target, b" HTTP/1.1\r\n"]
    if headers.__class__ is PreparedHeaders:
        parts.append(headers.lines)
        need_host, need_agent = headers.need_host, headers.need_agent
        lines = headers.count + 2  # the request line and the blank line ending the head
    else:
        lines, need_host, need_agent = _header_lines(headers, parts)
        lines += 2
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
        self, method: str, url: str, headers: HeaderList, body: bytes, timeouts: Timeouts, deadline: float | None
    ) -> _FastResponse:
        await checkpoint_if_cancelled()
        if deadline is None:
            deadline = math.inf
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
        self, conn: _UpstreamConnection, request: bytes, is_head: bool, timeouts: Timeouts, deadline: float
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

    async def _acquire(self, pool: _OriginPool, timeouts: Timeouts, cap: float, *, reuse: bool) -> _UpstreamConnection:
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

    async def _connect(self, pool: _OriginPool, timeout: float, cap: float) -> _UpstreamConnection:
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


#: The transports configuration may name, each built with the keyword arguments ``make_transport`` gets.
_TRANSPORTS: dict[str, Callable[..., Transport]] = {"fast": FastTransport, "httpx": HttpxTransport}


def make_transport(kind: str = "fast", **kw: Any) -> Transport:
    """The transport named by configuration: ``"fast"`` (``FastTransport``) or ``"httpx"`` (``HttpxTransport``).
    Keyword arguments go to the constructor."""
    factory = _TRANSPORTS.get(kind)
    if factory is None:
        raise ValueError(f"unknown transport {kind!r}: expected " + " or ".join(map(repr, _TRANSPORTS)))
    return factory(**kw)
