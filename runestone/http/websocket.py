"""WebSocket on the HTTP server's port: the handler's acceptance and the hand-over to trio-websocket.

The HTTP server parses an ``Upgrade: websocket`` request like any other and asks the
handler. A handler that returns :class:`WebSocketAccept` takes the connection over: the
server replays the request head (and whatever bytes the client sent after it) into
trio-websocket through :class:`ReplayStream`, so that wsproto performs the handshake
itself and the handler gets an ordinary ``trio_websocket.WebSocketConnection`` with
subprotocols, ping/pong and close codes as that library provides them.
"""

from __future__ import annotations

import binascii
import logging
from base64 import b64decode
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio_websocket

logger = logging.getLogger("runestone.http")

WebSocketHandler = Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]


def _header_list(headers) -> list[tuple[bytes, bytes]]:
    return [
        (name.encode("latin-1") if isinstance(name, str) else name,
         value.encode("latin-1") if isinstance(value, str) else value)
        for name, value in headers
    ]


def valid_websocket_key(key: bytes) -> bool:
    """Is ``key`` a ``Sec-WebSocket-Key`` as RFC 6455 section 4.1 has it: base64 of 16 bytes (wsproto does not check)?"""
    if len(key) != 24:
        return False
    try:
        return len(b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


@attrs.frozen
class WebSocketAccept:
    """A handler's answer that accepts a WebSocket request.

    ``handler`` runs with the open connection; when it returns (or raises) the
    WebSocket is closed (code 1000, or 1011 if it raised) and so is the TCP connection.
    ``subprotocol`` must be one the client proposed (otherwise none is selected).
    """

    handler: WebSocketHandler
    subprotocol: str | None = None
    extra_headers: list[tuple[bytes, bytes]] = attrs.field(default=(), converter=_header_list)
    #: The largest message the connection takes; a larger one closes it with code 1009.
    max_message_size: int = 1024 * 1024


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first yields bytes already read from ``stream``, then reads it.

    The HTTP server has consumed the upgrade request from the socket before it knows the
    handler accepts it; this puts those bytes back in front of the socket for wsproto.
    ``head`` (the request head) is yielded at once; ``tail`` (bytes the client sent after
    the head, i.e. early frames) only after the handshake response was written, because
    wsproto's server handshake drops whatever arrives before it accepts.
    """

    def __init__(self, stream: trio.SocketStream, head: bytes, tail: bytes = b"") -> None:
        self._stream = stream
        self._buffered = head
        self._tail = tail
        self._answered = trio.Event()

    def __repr__(self) -> str:
        try:
            host, port, *_ = self._stream.socket.getpeername()
            return f"{host}:{port}"
        except OSError:
            return "<closed>"

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buffered = self._buffered
        if not buffered:
            if not self._tail:
                return await self._stream.receive_some(max_bytes)
            await self._answered.wait()
            buffered, self._tail = self._tail, b""
        else:
            await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(buffered):
            self._buffered = b""
            return buffered
        self._buffered = buffered[max_bytes:]
        return buffered[:max_bytes]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)
        self._answered.set()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self._buffered = self._tail = b""
        self._answered.set()
        await self._stream.aclose()


async def run_websocket(
    stream: trio.SocketStream,
    head: bytes,
    tail: bytes,
    accept: WebSocketAccept,
    *,
    handshake_timeout: float,
    close_timeout: float,
) -> None:
    """Complete the handshake on ``stream`` and run ``accept.handler`` to its end.

    ``head`` is the upgrade request head, ``tail`` any bytes read after it. Returns
    when the handler has returned and the WebSocket is closed; the stream is closed by
    then. A handshake not done within ``handshake_timeout`` (wsproto refusing the
    request) abandons the connection. Cancellation closes the stream without a close
    frame.
    """
    replaying = ReplayStream(stream, head, tail)
    async with trio.open_nursery() as nursery:
        connection = None
        with trio.move_on_after(handshake_timeout):
            request = await trio_websocket.wrap_server_stream(nursery, replaying,
                                                              max_message_size=accept.max_message_size)
            subprotocol = accept.subprotocol
            if subprotocol is not None and subprotocol not in request.proposed_subprotocols:
                logger.warning("websocket subprotocol %r was not proposed by the client; none selected", subprotocol)
                subprotocol = None
            connection = await request.accept(subprotocol=subprotocol, extra_headers=list(accept.extra_headers))
        if connection is None:
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(replaying)
        else:
            code = 1000
            try:
                await accept.handler(connection)
            except trio_websocket.ConnectionClosed:
                pass
            except Exception:
                logger.exception("websocket handler failed")
                code = 1011
            finally:
                with trio.move_on_after(close_timeout) as scope:
                    await connection.aclose(code)
                if scope.cancelled_caught:
                    await trio.aclose_forcefully(replaying)
                # The reader task ends once the stream is closed; cancel it in case the peer
                # never completed the closing handshake.
                nursery.cancel_scope.cancel()
