"""The seam between provider code and HTTP: ``Transport.stream``, what it returns, its settings, and a test double.

Provider adapters depend only on this module (and ``errors``): :class:`Transport` is one
streaming request method returning an :class:`UpstreamResponse`, configured by
:class:`Timeouts` and :class:`PoolLimits`. The implementations live beside it and this module
imports neither: ``FastTransport`` (``client``, the default) and ``HttpxTransport``
(``httpx_transport``, for proxies and HTTP/2); ``client.make_transport`` picks one by name.
:class:`MockTransport` is the seam's test double, as httpx ships one: a handler answers each
request in process, with the seam's deadline and timeout semantics, so adapter code runs
without sockets.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio

from .errors import ReadTimeout, RemoteProtocolError, TransportError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "HeaderList",
    "MockRequest",
    "MockResponse",
    "MockTransport",
    "PoolLimits",
    "Timeouts",
    "Transport",
    "UpstreamResponse",
]

HeaderList = Sequence[tuple[bytes | str, bytes | str]]


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




def _first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (any case) among ``headers`` (names lowercased), or None."""
    name = name.lower()
    for key, value in headers:
        if key == name:
            return value
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
        return _first_header(self.headers, name)

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

    @property
    def at_end(self) -> bool:
        """The body has been read to its end: no read follows, and ``aclose()`` will not block. False where
        an implementation cannot tell without reading."""
        return False

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
    A transport implements ``_start`` (``stream()`` calls it on entry) and sets ``_timeouts``.
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
        return _Exchange(self, (method, url, headers, body, timeouts or self._timeouts, deadline))

    #: The timeouts of an exchange that names none.
    _timeouts: Timeouts

    async def _start(self, method: str, url: str, headers: HeaderList, body: bytes, timeouts: Timeouts,
                     deadline: float | None) -> UpstreamResponse:
        """Send the request and wait for the response head (what entering ``stream()`` does)."""
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


class _Exchange:
    """The context manager ``stream()`` returns: ``transport._start(*args)`` on entry, the response's ``aclose()``
    on exit. A plain class, cheaper than a generator-based one."""

    __slots__ = ("_args", "_response", "_transport")

    def __init__(self, transport: Any, args: tuple[Any, ...]) -> None:
        self._transport = transport
        self._args = args
        self._response: UpstreamResponse | None = None

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


# -- the test double ----------------------------------------------------------------------


def _header_pairs(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[bytes, bytes]]:
    """Header pairs as bytes, names lowercased, as the transports hand response headers over."""
    return [
        (
            (name if isinstance(name, bytes) else name.encode("latin-1")).lower(),
            value if isinstance(value, bytes) else value.encode("latin-1"),
        )
        for name, value in headers
    ]


@attrs.frozen
class MockRequest:
    """One request a :class:`MockTransport` received, as its handler sees it."""

    method: str
    url: str
    """The URL as the caller passed it."""
    headers: tuple[tuple[bytes, bytes], ...]
    """The caller's headers in its order, as bytes, names lowercased."""
    body: bytes
    timeouts: Timeouts
    """The exchange's timeouts: the ones passed to ``stream()``, else the transport's."""
    deadline: float | None
    """The exchange's deadline on trio's clock, as passed to ``stream()``."""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        return _first_header(self.headers, name)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


@attrs.define
class MockResponse:
    """What a :class:`MockTransport` handler answers.

    ``body`` is the whole body (``bytes``), or its chunks: an iterable of bytes, or an async
    iterable (an async generator, say) whose every item is one chunk the caller reads as it
    comes. An async body that waits longer than the read timeout or past the deadline between two
    chunks makes that read fail as the real transports do; one that raises a ``TransportError``
    makes the read fail with it, as a connection broken mid-body would.
    """

    status: int = 200
    headers: list[tuple[bytes | str, bytes | str]] = attrs.Factory(list)
    body: bytes | Iterable[bytes] | AsyncIterable[bytes] = b""

    @staticmethod
    def json(obj: Any, status: int = 200, headers: HeaderList = ()) -> MockResponse:
        """A response whose body is ``obj`` serialised by orjson, ``content-type: application/json``."""
        return MockResponse(status, [(b"content-type", b"application/json"), *headers], orjson.dumps(obj))


#: ``handler(request) -> MockResponse`` (or an awaitable of one); it may raise a ``TransportError``.
MockHandler = Callable[[MockRequest], MockResponse | Awaitable[MockResponse]]


def _chunks_of(body: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The body's chunks as an async iterator: the handler's own one (so closing the response closes it)."""
    if isinstance(body, AsyncIterable):
        return body.__aiter__()
    chunks = [bytes(body)] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)

    async def replay() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return replay()


class _MockResponseStream(UpstreamResponse):
    __slots__ = ("_aborted", "_body", "_deadline", "_done", "_origin", "_read_timeout", "_scope", "_transport")

    def __init__(self, transport: MockTransport, answer: Any, origin: str, read_timeout: float,
                 deadline: float) -> None:
        self.status = answer.status
        self.headers = _header_pairs(answer.headers)
        self._transport = transport
        self._body = _chunks_of(answer.body)
        self._origin = origin
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._done = False
        self._aborted = False
        self._scope: trio.CancelScope | None = None

    def set_deadline(self, deadline: float | None) -> None:
        self._deadline = math.inf if deadline is None else deadline

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        body = self._body
        if self._aborted:
            raise RemoteProtocolError(f"the connection to {self._origin} was closed by its transport")
        if body is None:
            raise TransportError("the response was closed before its body was read")
        chunk = b""
        with trio.CancelScope(deadline=min(trio.current_time() + self._read_timeout, self._deadline)) as scope:
            self._scope = scope
            try:
                while not chunk:  # the real transports never hand over an empty chunk
                    chunk = await body.__anext__()
            except StopAsyncIteration:
                self._done = True
                raise
            finally:
                self._scope = None
        if self._aborted or scope.cancelled_caught:
            # As on a real connection closed under its reader: the rest of the body is lost.
            await self.aclose()
            if self._aborted:
                raise RemoteProtocolError(f"the connection to {self._origin} was closed by its transport")
            raise ReadTimeout(_timeout_message(self._deadline, self._origin,
                                               f"{self._origin} sent nothing for {self._read_timeout:g} s"))
        return chunk

    def abort(self) -> None:
        """Closed under the reader by ``MockTransport.aclose(abort_in_use=True)``: its read fails now."""
        self._aborted = True
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        body, self._body = self._body, None
        self._transport._open.discard(self)
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


def _timeout_message(deadline: float, origin: str, otherwise: str) -> str:
    if deadline <= trio.current_time():
        return f"the request's deadline passed while waiting for {origin}"
    return otherwise


class MockTransport(Transport):
    """A ``Transport`` whose every request ``handler(request)`` answers, in process, without a socket.

    The handler gets a :class:`MockRequest` and returns a :class:`MockResponse` (or is async and
    returns one; it may also raise a ``TransportError``, which ``stream()`` raises on entry). The seam's
    promises hold as with the real transports: the wait for an async handler (the response head)
    and each wait for a body chunk are bounded by ``Timeouts.read`` and by the exchange's
    ``deadline`` (``ReadTimeout``, saying the deadline passed when it did), which
    ``UpstreamResponse.set_deadline`` moves; response header names come lowercased;
    ``aclose(abort_in_use=True)`` makes responses still being read fail with a
    ``RemoteProtocolError``; a closed transport refuses new requests with a ``TransportError``.
    Every request is also kept in ``requests``, oldest first. Time is trio's clock, so a test
    under ``trio.testing.MockClock`` runs the timeouts instantly.
    """

    def __init__(self, handler: MockHandler, *, timeouts: Timeouts = Timeouts()) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self._timeouts = timeouts
        self._closed = False
        self._open: set[_MockResponseStream] = set()

    def __repr__(self) -> str:
        return f"<MockTransport {self.handler!r} requests={len(self.requests)}>"

    async def _start(self, method: str, url: str, headers: HeaderList, body: bytes, timeouts: Timeouts,
                     deadline: float | None) -> _MockResponseStream:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportError("the transport is closed")
        request = MockRequest(method, url, tuple(_header_pairs(headers)), body, timeouts, deadline)
        self.requests.append(request)
        cap = math.inf if deadline is None else deadline
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with trio.move_on_at(min(trio.current_time() + timeouts.read, cap)) as scope:
            answer = self.handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
        if scope.cancelled_caught:
            raise ReadTimeout(_timeout_message(cap, origin, f"{origin} sent nothing for {timeouts.read:g} s"))
        if not hasattr(answer, "status"):
            raise TypeError(f"the MockTransport handler returned {answer!r}, not a MockResponse")
        response = _MockResponseStream(self, answer, origin, timeouts.read, cap)
        self._open.add(response)
        return response

    async def aclose(self, *, abort_in_use: bool = False) -> None:
        """Refuse requests from now on; with ``abort_in_use`` also fail the responses still being read."""
        self._closed = True
        if abort_in_use:
            for response in list(self._open):
                response.abort()
        await trio.lowlevel.checkpoint()
