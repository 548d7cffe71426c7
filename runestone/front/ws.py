"""The WebSocket API, ``/v1/ws``: many chat streams over one connection, told apart by the client's ids.

A client sends ``{"type": "chat", "id", "request": {chat body}}`` and receives the OpenAI stream as
``{"type": "chunk", "id", "chunk": {chat.completion.chunk}}`` messages, ended by exactly one
``{"type": "done", "id", "usage"}`` or ``{"type": "error", "id", "error"}``. ``{"type": "cancel", "id"}``
stops a stream at once: its task is cancelled, which closes the upstream request, and its end is an
``error`` with code ``cancelled``. ``{"type": "ping"}`` is answered ``{"type": "pong"}`` (WebSocket pings are
answered by trio-websocket itself). A client authenticates as on HTTP, with ``Authorization: Bearer``
on the upgrade request, or, for browsers that cannot set headers, with ``{"type": "auth", "key"}`` as its
first message within :data:`AUTH_TIMEOUT` seconds.

:class:`MessageConnection` is the machinery shared with the control socket (``front/admin.py``): JSON
text messages in, a bounded outgoing queue drained by one writer task out. Streams never write to the
socket themselves: a task cancelled in the middle of a socket write would leave half a frame on the
wire and break every other stream of the connection, whereas a task cancelled while waiting on the
queue leaves nothing behind. The queue is what gives backpressure: when the client reads slowly the
writer waits on the socket, the queue fills, and each stream waits to enqueue its next chunk instead of
reading further from its upstream, so memory per connection stays bounded by the queue and the stream
limit. A stream is served by the one pipeline; each chunk payload is spliced into its ``chunk`` message
without being parsed again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio
import trio_websocket

from ..http.server import Request, WebSocketAccept
from ..routing.errors import GatewayError
from ..routing.executor import Chunks, Failed, ModelRequest
from ..wire.errors import InvalidRequest, openai_error_object
from ..wire.openai import validate_chat
from ..wire.websocket import valid_id, ws_error
from .api import Caller, requirements_of
from .errors import gateway_error
from .deps import FrontDeps

__all__ = ["AUTH_TIMEOUT", "MessageConnection", "ConnectionStatistics", "WebSocketRoutes", "install", "ws_error"]

log = logging.getLogger("runestone.front.ws")

#: Seconds a client without an ``Authorization`` header has to send its ``auth`` message.
AUTH_TIMEOUT = 5.0
#: Messages waiting for the writer, per connection.
OUT_QUEUE = 64
#: Streams one connection may run at once.
MAX_STREAMS = 32
#: Seconds allowed for the closing handshake when the gateway closes a connection with a code.
CLOSE_TIMEOUT = 5.0

# Close codes (RFC 6455, 7.4.1).
CLOSE_POLICY = 1008
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_BIG = 1009



def _gateway_error(id: Any, exc: GatewayError) -> dict:
    out = {"type": "error", "id": id, "error": openai_error_object(exc.message, exc.type, exc.param, exc.code),
           "status": exc.status}
    if exc.provider:
        out["provider"] = exc.provider
    return out


@attrs.frozen
class ConnectionStatistics:
    """One WebSocket connection as a state dump shows it."""

    #: The authenticated key id (None before authentication, or in open mode).
    key_id: str | None
    #: Tasks running for this connection's requests (streams, control operations).
    active: int
    #: Messages waiting in the outgoing queue, and its capacity.
    queued: int
    queue_capacity: int
    #: Messages received and sent since the connection opened.
    received: int
    sent: int


class _Closed(Exception):
    """The connection is closed or being closed: stop reading."""


class MessageConnection:
    """One WebSocket connection exchanging JSON objects as text messages.

    Owned by the connection's handler task: :meth:`receive` is called from that task only; :meth:`send`
    from any task of the connection. :meth:`writer` must run (in the connection's nursery) for sends to
    make progress.
    """

    def __init__(self, ws: Any, *, max_message_bytes: int, queue_size: int = OUT_QUEUE) -> None:
        self.ws = ws
        self.max_message_bytes = max_message_bytes
        self._out, self._out_recv = trio.open_memory_channel[bytes](queue_size)
        self.queue_capacity = queue_size
        self.key_id: str | None = None
        self.received = 0
        self.queued = 0
        self.sent = 0
        self.active: dict[Any, trio.CancelScope] = {}
        #: Set by the writer once everything queued was sent, for a task waiting in _flushed().
        self._drained: trio.Event | None = None

    async def send(self, message: dict | bytes) -> None:
        """Queue one message (a dict, or JSON bytes); waits while the queue is full (backpressure)."""
        if not isinstance(message, bytes):
            message = orjson.dumps(message, default=str)
        await self._out.send(message)
        self.queued += 1

    async def writer(self) -> None:
        """Send queued messages in order until the connection closes (then return)."""
        ws = self.ws
        try:
            async for payload in self._out_recv:
                # Our messages are built from JSON that orjson parsed or wrote, so this never replaces anything.
                await ws.send_message(payload.decode("utf-8", "replace"))
                self.sent += 1
                if self._drained is not None and self.sent >= self.queued:
                    self._drained.set()
        except trio_websocket.ConnectionClosed:
            return

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; waits for a frame being written to finish first (the library's send lock)."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(code, reason[:120])

    async def receive(self) -> dict:
        """The next JSON object from the client.

        Answers a message that is not a JSON object with an ``error`` (the connection stays up) and reads
        on. Closes the connection with 1003 on a binary message and 1009 on one over the size limit. A
        text frame that is not UTF-8 never gets here: wsproto rejects it (1007) and trio-websocket then
        drops the connection. Raises ``_Closed`` once the connection is closed.
        """
        ws = self.ws
        limit = self.max_message_bytes
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                raise _Closed() from None
            self.received += 1
            if not isinstance(message, str):
                await self.close(CLOSE_UNSUPPORTED, "binary messages are not supported: send JSON as text")
                raise _Closed()
            # A str of n characters is between n and 4n bytes of UTF-8: encode only when it matters.
            if len(message) > limit or (len(message) * 4 > limit and len(message.encode()) > limit):
                await self.close(CLOSE_TOO_BIG, f"message exceeds the limit of {limit} bytes")
                raise _Closed()
            try:
                obj = orjson.loads(message)
            except orjson.JSONDecodeError as exc:
                await self.send(ws_error(None, f"the message is not valid JSON ({exc.msg}, at byte {exc.pos}); "
                                         "send one JSON object per message", "invalid_json"))
                continue
            if not isinstance(obj, dict):
                await self.send(ws_error(None, "a message must be a JSON object with a \"type\"", "invalid_message"))
                continue
            return obj

    async def authenticate(self, check: Callable[[bytes], Caller | None], what: str) -> Caller | None:
        """Wait for an ``auth`` message and check its key; None (connection closed) on failure or timeout."""
        with trio.move_on_after(AUTH_TIMEOUT):
            try:
                msg = await self.receive()
            except _Closed:
                return None
            key = msg.get("key")
            if msg.get("type") != "auth":
                await self.send(ws_error(msg.get("id"), f"authenticate first: send {{\"type\": \"auth\", \"key\": "
                                         f"<{what}>}} or connect with 'Authorization: Bearer <{what}>'",
                                         "authentication_required", "authentication_error", status=401))
            elif not isinstance(key, str) or not key:
                await self.send(ws_error(msg.get("id"), "'key' must be a non-empty string", "invalid_api_key",
                                         "authentication_error", param="key", status=401))
            else:
                caller = check(key.encode())
                if caller is not None:
                    self.key_id = caller.key_id
                    await self.send({"type": "authenticated", "id": msg.get("id"), "key_id": caller.key_id})
                    return caller
                await self.send(ws_error(msg.get("id"), f"invalid key: it is not {what}", "invalid_api_key",
                                         "authentication_error", status=401))
            # Give the writer a chance to deliver the reason before the close frame.
            with trio.move_on_after(1.0):
                await self._flushed()
            await self.close(CLOSE_POLICY, "authentication failed")
            return None
        await self.close(CLOSE_POLICY, f"no auth message within {AUTH_TIMEOUT:g}s")
        return None

    async def _flushed(self) -> None:
        """Until the writer has sent every queued message (before closing a connection that failed to
        authenticate: never on a hot path)."""
        while self.sent < self.queued:
            self._drained = trio.Event()
            await self._drained.wait()

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(self.key_id, len(self.active), self._out.statistics().current_buffer_used,
                                    self.queue_capacity, self.received, self.sent)


async def serve_connection(conn: MessageConnection, caller: Caller | None,
                           check: Callable[[bytes], Caller | None], what: str,
                           dispatch: Callable[[MessageConnection, Caller, dict, trio.Nursery], Awaitable[None]],
                           registry: set) -> None:
    """Run one connection: authenticate if needed, then read and dispatch until it closes.

    Every task the connection starts runs in the nursery opened here, so when the client goes away (or
    the server stops) they are all cancelled before this returns: nothing outlives its connection.
    """
    registry.add(conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.writer)
            try:
                if caller is None:
                    caller = await conn.authenticate(check, what)
                if caller is not None:
                    conn.key_id = caller.key_id
                    while True:
                        msg = await conn.receive()
                        await dispatch(conn, caller, msg, nursery)
            except _Closed:
                pass
            finally:
                nursery.cancel_scope.cancel()
    finally:
        registry.discard(conn)


class WebSocketRoutes:
    """``/v1/ws``: chat streams over WebSocket through the same Gateway as the HTTP route."""

    def __init__(self, front, deps: FrontDeps, *, max_streams: int = MAX_STREAMS,
                 queue_size: int = OUT_QUEUE) -> None:
        self.front = front
        self.gateway = front.gateway
        self.keys = front.keys
        self.max_streams = max_streams
        self.queue_size = queue_size
        self.max_message_bytes = deps.config.server.max_ws_message_bytes
        self.connections: set[MessageConnection] = set()

    # -- the upgrade ----------------------------------------------------------------------------------

    def _client(self, token: bytes) -> Caller | None:
        key_id = self.keys.client(token)
        if key_id is None:
            return None
        return Caller(key_id, key_id == "admin", "ws")

    async def route(self, request: Request, caller: Caller) -> WebSocketAccept:
        if not request.websocket:
            raise GatewayError(426, f"{request.path} is a WebSocket endpoint: connect with a WebSocket client "
                               "(Upgrade: websocket)", code="upgrade_required", headers=[(b"upgrade", b"websocket")])
        authed = None
        keys = self.keys
        if keys.bearer(request.header(b"authorization")) is not None or request.header(b"x-api-key"):
            # A key on the upgrade request is checked now: a wrong one is refused with HTTP 401.
            authed = self.front.authenticate(request, "client", caller.request_id)
        elif keys.open_mode:
            authed = Caller(None, False, caller.request_id)

        async def handler(ws) -> None:
            conn = MessageConnection(ws, max_message_bytes=self.max_message_bytes, queue_size=self.queue_size)
            await serve_connection(conn, authed, self._client, "a client API key", self.dispatch, self.connections)

        return WebSocketAccept(handler, max_message_size=self.max_message_bytes)

    # -- messages -------------------------------------------------------------------------------------

    async def dispatch(self, conn: MessageConnection, caller: Caller, msg: dict, nursery: trio.Nursery) -> None:
        kind = msg.get("type")
        if kind == "chat":
            await self.start_chat(conn, caller, msg, nursery)
        elif kind == "cancel":
            sid = msg.get("id")
            scope = conn.active.get(sid) if valid_id(sid) else None
            if scope is None:
                await conn.send(ws_error(sid if valid_id(sid) else None,
                                         f"no stream with id {sid!r} is running; nothing to cancel", "unknown_id",
                                         param="id"))
            else:
                scope.cancel()
        elif kind == "ping":
            await conn.send({"type": "pong", "id": msg.get("id")} if "id" in msg else {"type": "pong"})
        elif kind == "auth":
            await conn.send(ws_error(msg.get("id"), "this connection is already authenticated", "already_authenticated"))
        else:
            await conn.send(ws_error(msg.get("id"), f"unknown message type {kind!r}: expected chat, cancel or ping"
                                     if kind is not None else "a message needs a \"type\": chat, cancel or ping",
                                     "unknown_type", param="type"))

    async def start_chat(self, conn: MessageConnection, caller: Caller, msg: dict, nursery: trio.Nursery) -> None:
        sid = msg.get("id")
        if not valid_id(sid):
            await conn.send(ws_error(None, "a chat message needs an 'id': a string of 1 to 128 characters or an "
                                     "integer, unique among your running streams", "invalid_id", param="id"))
            return
        if sid in conn.active:
            await conn.send(ws_error(sid, f"a stream with id {sid!r} is already running on this connection; use "
                                     "another id or wait for its done/error", "duplicate_id", param="id"))
            return
        if len(conn.active) >= self.max_streams:
            await conn.send(ws_error(sid, f"this connection already runs {self.max_streams} streams, the most it "
                                     "may; wait for one to end or open another connection", "too_many_streams",
                                     "rate_limit_error", status=429))
            return
        body = msg.get("request")
        if not isinstance(body, dict):
            await conn.send(ws_error(sid, "'request' must be a chat completion request object (the body of POST "
                                     "/v1/chat/completions)", "invalid_request", param="request"))
            return
        scope = trio.CancelScope()
        conn.active[sid] = scope
        nursery.start_soon(self.stream, conn, caller, sid, body, scope)

    async def stream(self, conn: MessageConnection, caller: Caller, sid: Any, body: dict,
                     scope: trio.CancelScope) -> None:
        """One chat stream, from request to its one ``done`` or ``error`` message.

        The id is released before the final message is queued, so a client that sees the end may reuse
        the id at once. A cancel (``scope``) closes the upstream stream before the ``cancelled`` error is
        queued; cancellation of the whole connection ends the task without a final message.
        """
        final: dict | bytes | None = None
        try:
            with scope:
                try:
                    final = await self._chat(conn, caller, sid, body)
                except Exception:
                    # A bug here must end this stream only, not every stream of the connection.
                    log.exception("websocket stream %r failed", sid)
                    final = ws_error(sid, "the gateway failed to handle this stream; it was logged", "internal_error",
                                     "server_error", status=500)
        finally:
            conn.active.pop(sid, None)
        if scope.cancelled_caught:
            final = ws_error(sid, "the stream was cancelled at the client's request", "cancelled", status=499)
        if final is not None:
            await conn.send(final)

    async def _chat(self, conn: MessageConnection, caller: Caller, sid: Any, body: dict) -> dict:
        """One stream through the one pipeline (per-key limits apply for its whole length); its final message."""
        try:
            shape = validate_chat(body)
            streaming = await self.gateway.serve(ModelRequest(
                "ws_" + os.urandom(12).hex(), caller.key_id, "chat", shape.model, body, "chat", True,
                shape.include_usage, requirements_of(shape.routing), shape.capability))
        except InvalidRequest as exc:
            return _gateway_error(sid, gateway_error(exc))
        except GatewayError as exc:
            return _gateway_error(sid, exc)
        prefix = b'{"type":"chunk","id":' + orjson.dumps(sid) + b',"chunk":'
        send = conn.send
        try:
            async for event in streaming:
                if type(event) is Chunks:
                    for payload in event.payloads:
                        await send(prefix + payload + b"}")
                elif type(event) is Failed:
                    return _gateway_error(sid, event.error)
        finally:
            await streaming.aclose()
        return {"type": "done", "id": sid, "usage": streaming.usage.as_openai(), "provider": streaming.provider,
                "model": streaming.model}

    def snapshot(self) -> list[ConnectionStatistics]:
        return [c.statistics() for c in list(self.connections)]


def install(front, deps: FrontDeps) -> WebSocketRoutes:
    routes = WebSocketRoutes(front, deps)
    front.routes.add("GET", "/v1/ws", routes.route, "public")
    return routes
