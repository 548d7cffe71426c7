"""Errors of the upstream HTTP client, shared by every transport.

Both transports (the fast one on httptools and the httpx one) raise only these,
so provider code catches one tree whatever transport the configuration picks.
Callers usually catch a base class: ``TransportTimeout`` to treat all timeouts
alike, ``TransportError`` for "the upstream could not be reached or did not
answer properly" (a retry or failover candidate). HTTP error statuses are not
exceptions: a 4xx or 5xx response is a response.

    TransportError
    ├── ConnectError            DNS, TCP connect or TLS handshake failed
    ├── TransportTimeout
    │   ├── ConnectTimeout      no connection within ``Timeouts.connect``
    │   ├── ReadTimeout         no bytes from the server within ``Timeouts.read``
    │   ├── WriteTimeout        the request could not be written within ``Timeouts.write``
    │   └── PoolTimeout         no free connection slot within ``Timeouts.pool``
    ├── RemoteProtocolError     malformed response, or the connection was lost
    │                           before the response (or its body) ended
    └── LocalProtocolError      the request itself is invalid (bad URL, CR/LF in a header)
"""

from __future__ import annotations

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "LocalProtocolError",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "TransportError",
    "TransportTimeout",
    "WriteTimeout",
]


class TransportError(Exception):
    """The request did not produce a complete HTTP response."""


class ConnectError(TransportError):
    """No connection to the origin: name resolution, TCP connect or TLS handshake failed."""


class TransportTimeout(TransportError):
    """Base of the four timeouts of ``Timeouts``."""


class ConnectTimeout(TransportTimeout):
    """Connecting (resolution, TCP and TLS together) took longer than ``Timeouts.connect``."""


class ReadTimeout(TransportTimeout):
    """The server sent nothing for ``Timeouts.read`` seconds while a response was awaited or streamed."""


class WriteTimeout(TransportTimeout):
    """The request could not be handed to the socket within ``Timeouts.write``."""


class PoolTimeout(TransportTimeout):
    """Every connection slot of the origin stayed busy for ``Timeouts.pool`` seconds."""


class RemoteProtocolError(TransportError):
    """The server broke HTTP/1.1: malformed response, or it closed or reset the
    connection before the response or its body ended."""


class LocalProtocolError(TransportError):
    """The request cannot be sent as given: unsupported or malformed URL, CR or LF
    in a header, non-ASCII header name."""
