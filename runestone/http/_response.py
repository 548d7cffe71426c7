"""The response of a ``FastTransport`` exchange: httptools' callback target and the body reads.

Each body chunk handed to the caller is the de-chunked data of one socket read, so a relay can
forward it at once. ``aclose()`` hands the connection back to its pool (``_pool``) only after a
body that ended cleanly on a connection that may be kept; anything else closes it.
"""

from __future__ import annotations

import math

import httptools

from ._connection_client import _ConnectionLost, _UpstreamConnection
from .errors import RemoteProtocolError, TransportError
from .transport import UpstreamResponse


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

    def __init__(self, conn: _UpstreamConnection, is_head: bool, read_timeout: float) -> None:
        self.status = 0
        self.headers = []
        self._conn: _UpstreamConnection | None = conn
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

    def _at_eof(self, conn: _UpstreamConnection) -> None:
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

    @property
    def at_end(self) -> bool:
        return self._complete and not self._chunks

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
            self._parser = None
            conn.close()

    async def aclose(self) -> None:
        """Return the connection to the pool if the response ended cleanly, else close it. Never blocks."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        # The parser holds this response's bound callbacks: a cycle that only the collector would free
        # (with the headers, chunks and parser: ~15 objects a request, a young collection every ~70).
        self._parser = None
        if self._complete and self._keep_alive:
            conn.pool.release(conn)
        else:
            conn.close()

