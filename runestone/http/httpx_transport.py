"""The httpx-backed transport: the same seam as ``FastTransport`` for what the fast one does not do.

Configuration picks it (``client.make_transport("httpx", ...)``) when a provider needs an
HTTP proxy or HTTP/2. It costs about 1.7 ms more CPU per request than the fast
transport, so it is not the default. It wraps one ``httpx.AsyncClient``, sends
the same default headers as the fast transport (``User-Agent: runestone/0.1``
and ``Accept-Encoding: identity``, so body bytes are what the server sent in
both), and turns every httpx exception into the ``runestone.http.errors`` tree.
Proxy settings come from configuration only: environment variables such as
``HTTPS_PROXY`` are ignored (``trust_env=False``), so a deployment behaves the
same wherever it runs.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator

import httpx
import trio

from .transport import HeaderList, PoolLimits, Timeouts, Transport, UpstreamResponse
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

__all__ = ["HttpxTransport"]

# Most specific first: httpx.ProxyError and httpx.ReadError are TransportErrors too.
_ERRORS: tuple[tuple[type[Exception], type[TransportError]], ...] = (
    (httpx.ConnectTimeout, ConnectTimeout),
    (httpx.ReadTimeout, ReadTimeout),
    (httpx.WriteTimeout, WriteTimeout),
    (httpx.PoolTimeout, PoolTimeout),
    (httpx.ConnectError, ConnectError),
    (httpx.ProxyError, ConnectError),
    (httpx.RemoteProtocolError, RemoteProtocolError),
    (httpx.LocalProtocolError, LocalProtocolError),
    (httpx.UnsupportedProtocol, LocalProtocolError),
    (httpx.InvalidURL, LocalProtocolError),
    # ReadError, WriteError, CloseError: the connection broke under us.
    (httpx.NetworkError, RemoteProtocolError),
)
_CAUGHT = (httpx.HTTPError, httpx.InvalidURL)
_DROPPED = frozenset({"content-length", "transfer-encoding"})


def _translate(exc: Exception) -> TransportError:
    message = str(exc) or type(exc).__name__
    kind = local_resource_kind(exc)
    if kind is not None:
        return LocalResourceError(f"{message}: out of local resources ({kind})", kind)
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(message)
    return TransportError(message)


def _name(name: bytes | str) -> str:
    return name.decode("ascii", "replace").lower() if isinstance(name, bytes) else name.lower()


_DEADLINE_PASSED = "the request's deadline passed while waiting for the upstream"


class _HttpxResponse(UpstreamResponse):
    __slots__ = ("_chunks", "_deadline", "_response")

    def __init__(self, response: httpx.Response, deadline: float) -> None:
        self.status = response.status_code
        self.headers = [(name.lower(), value) for name, value in response.headers.raw]
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()
        self._deadline = deadline

    def set_deadline(self, deadline: float | None) -> None:
        self._deadline = math.inf if deadline is None else deadline

    async def __anext__(self) -> bytes:
        try:
            # (httpx is not the hot path: a cancel scope per read is affordable here)
            with trio.move_on_at(self._deadline):
                return await self._chunks.__anext__()
        except _CAUGHT as exc:
            raise _translate(exc) from exc
        except httpx.StreamClosed:
            raise TransportError("the response was closed before its body was read") from None
        raise ReadTimeout(_DEADLINE_PASSED)

    async def aclose(self) -> None:
        """httpx returns the connection to its pool if the body was read to the end, else closes it."""
        await self._response.aclose()


def _httpx_timeout(timeouts: Timeouts) -> httpx.Timeout:
    return httpx.Timeout(connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool)


class HttpxTransport(Transport):
    """A ``Transport`` on ``httpx.AsyncClient``: for proxies (``proxy="http://..."``) and HTTP/2.

    ``limits.max_connections`` and ``limits.max_idle`` bound the whole client
    (httpx pools per origin but counts across origins). ``http2=True`` needs
    the ``h2`` package; without it construction fails with ``ImportError``.
    Redirects are not followed, as with the fast transport.
    """

    def __init__(
        self,
        *,
        proxy: str | None = None,
        http2: bool = False,
        verify: bool | ssl.SSLContext = True,
        timeouts: Timeouts = Timeouts(),
        limits: PoolLimits = PoolLimits(),
    ) -> None:
        if http2:
            try:
                import h2  # noqa: F401
            except ImportError:
                raise ImportError(
                    "HttpxTransport(http2=True) needs the 'h2' package, which is not installed; "
                    "install httpx[http2] or turn HTTP/2 off"
                ) from None
        self._timeouts = timeouts
        self._client = httpx.AsyncClient(
            proxy=proxy,
            http2=http2,
            verify=verify,
            timeout=_httpx_timeout(timeouts),
            limits=httpx.Limits(
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_idle,
                keepalive_expiry=limits.idle_expiry,
            ),
            headers={"user-agent": "runestone/0.1", "accept-encoding": "identity"},
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"<HttpxTransport {self._timeouts!r}>"

    async def _start(self, method: str, url: str, headers: HeaderList, body: bytes, timeouts: Timeouts,
                     deadline: float | None) -> UpstreamResponse:
        """Builds and sends the request on entry, so that every error surfaces from ``async with``,
        as with the fast transport."""
        if deadline is None:
            deadline = math.inf
        client = self._client
        try:
            request = client.build_request(
                method,
                url,
                headers=[(name, value) for name, value in headers if _name(name) not in _DROPPED],
                content=body or None,
                timeout=_httpx_timeout(timeouts),
            )
            response = None
            with trio.move_on_at(deadline):
                response = await client.send(request, stream=True)
        except _CAUGHT as exc:
            raise _translate(exc) from exc
        except RuntimeError as exc:
            if not client.is_closed:
                raise
            raise TransportError("the transport is closed") from exc
        if response is None:
            raise ReadTimeout(_DEADLINE_PASSED)
        return _HttpxResponse(response, deadline)

    async def aclose(self, *, abort_in_use: bool = False) -> None:
        """Close the client; httpx closes its whole pool, in-use connections included, either way."""
        await self._client.aclose()
