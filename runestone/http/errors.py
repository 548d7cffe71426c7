"""The exceptions of the http package: the upstream client's tree and the server's.

**The client** (``FastTransport``, ``HttpxTransport``, ``MockTransport``). Every transport
raises only these, so provider code catches one tree whatever transport the configuration picks.
Callers usually catch a base class: ``TransportTimeout`` to treat all timeouts
alike, ``TransportError`` for "the upstream could not be reached or did not
answer properly" (a retry or failover candidate). HTTP error statuses are not
exceptions: a 4xx or 5xx response is a response. ``LocalResourceError`` is the one
branch that says nothing about the upstream: the gateway itself ran out of something
(file descriptors, memory, its own pool's slots), so a caller must not hold it
against the provider.

    TransportError
    ├── ConnectError            DNS, TCP connect or TLS handshake failed
    ├── LocalResourceError      the gateway ran out: EMFILE, ENFILE, ENOMEM, ENOBUFS
    │                           creating or connecting a socket, or a full pool
    ├── TransportTimeout
    │   ├── ConnectTimeout      no connection within ``Timeouts.connect``
    │   ├── ReadTimeout         no bytes from the server within ``Timeouts.read``
    │   ├── WriteTimeout        the request could not be written within ``Timeouts.write``
    │   └── PoolTimeout         no free connection slot within ``Timeouts.pool``
    │                           (also a LocalResourceError, kind "pool_full")
    ├── RemoteProtocolError     malformed response, or the connection was lost
    │                           before the response (or its body) ended
    └── LocalProtocolError      the request itself is invalid (bad URL, CR/LF in a header)

**The server** (``serve_http``). ``Request.body()`` and ``Request.iter_body()`` raise these; a
handler that lets an ``HttpError`` propagate gets its answer sent for it.

    HttpError                   a request the server refuses: it answers ``status`` and closes
    ├── BadRequest              400: malformed request, framing or WebSocket handshake
    ├── RequestTimeout          408: the head or body came too slowly (``Limits``)
    ├── BodyTooLarge            413: the body exceeds ``Limits.max_body_bytes``
    ├── _HeadersTooLarge        431: the head exceeds ``Limits.max_header_bytes`` or ``max_headers``
    └── _VersionNotSupported    505: not HTTP/1.0 or HTTP/1.1

    ClientDisconnected          the client closed the connection before its body was complete

``ClientDisconnected`` is deliberately not an ``HttpError``: there is nobody left to answer, so
it has no status, and a handler's ``except HttpError`` (which answers the client in its API's
error shape) must not catch it. A handler may let it propagate; the server then closes the
connection without writing. (``_PeerGone``, a failed or timed-out write, never leaves the
server: it stays in ``_connection``.)
"""

from __future__ import annotations

import errno
from collections import Counter

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "ConnectError",
    "ConnectTimeout",
    "HttpError",
    "LOCAL_RESOURCE_ERRNOS",
    "LocalProtocolError",
    "LocalResourceError",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "RequestTimeout",
    "TransportError",
    "TransportTimeout",
    "WriteTimeout",
    "local_resource_errors",
    "local_resource_kind",
]

#: The errnos that mean the gateway's own process or host is out of a resource, by kind.
LOCAL_RESOURCE_ERRNOS: dict[int, str] = {
    errno.EMFILE: "emfile",
    errno.ENFILE: "enfile",
    errno.ENOMEM: "enomem",
    errno.ENOBUFS: "enobufs",
}
_RESOURCE = {
    "emfile": "file descriptors (EMFILE: the process's open-file limit)",
    "enfile": "file descriptors (ENFILE: the system's open-file limit)",
    "enomem": "memory (ENOMEM)",
    "enobufs": "socket buffers (ENOBUFS)",
    "pool_full": "connection slots (its pool for the upstream is full)",
}

#: Local resource errors met since the process started, by ``(op, kind)``: op "connect" for the
#: upstream client, "accept" for the server. /metrics shows it; only ever incremented.
local_resource_errors: Counter[tuple[str, str]] = Counter()


def local_resource_kind(exc: BaseException | None) -> str | None:
    """The kind of local exhaustion behind ``exc`` ("emfile", ...), or None.

    Looks through causes, contexts and exception groups: trio reports a failed
    ``open_tcp_stream`` as an ``OSError`` caused by a group of per-address errors,
    and httpx wraps that twice more.
    """
    stack = [exc]
    seen = 0
    while stack and seen < 32:
        e = stack.pop()
        if e is None:
            continue
        seen += 1
        if isinstance(e, OSError):
            kind = LOCAL_RESOURCE_ERRNOS.get(e.errno)  # type: ignore[arg-type]
            if kind is not None:
                return kind
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        stack.append(e.__cause__ or e.__context__)
    return None


class TransportError(Exception):
    """The request did not produce a complete HTTP response."""


class ConnectError(TransportError):
    """No connection to the origin: name resolution, TCP connect or TLS handshake failed."""


class LocalResourceError(TransportError):
    """The gateway could not make the request for want of a local resource; the upstream
    was never asked. ``kind`` is "emfile", "enfile", "enomem", "enobufs" or "pool_full";
    ``resource`` says in words what ran out. Counted in ``local_resource_errors``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        local_resource_errors["connect", kind] += 1

    @property
    def resource(self) -> str:
        return _RESOURCE.get(self.kind, self.kind)


class TransportTimeout(TransportError):
    """Base of the four timeouts of ``Timeouts``."""


class ConnectTimeout(TransportTimeout):
    """Connecting (resolution, TCP and TLS together) took longer than ``Timeouts.connect``."""


class ReadTimeout(TransportTimeout):
    """The server sent nothing for ``Timeouts.read`` seconds while a response was awaited or streamed."""


class WriteTimeout(TransportTimeout):
    """The request could not be handed to the socket within ``Timeouts.write``."""


class PoolTimeout(TransportTimeout, LocalResourceError):
    """Every connection slot of the origin stayed busy for ``Timeouts.pool`` seconds: the
    gateway's own limit (``PoolLimits.max_connections``) was reached, so it is local too."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "pool_full")


class RemoteProtocolError(TransportError):
    """The server broke HTTP/1.1: malformed response, or it closed or reset the
    connection before the response or its body ended."""


class LocalProtocolError(TransportError):
    """The request cannot be sent as given: unsupported or malformed URL, CR or LF
    in a header, non-ASCII header name."""


# -- the server's --------------------------------------------------------------------------


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
