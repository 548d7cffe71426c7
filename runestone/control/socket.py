"""The ``/v1/control`` protocol without its transport: one decoded message in, messages out.

A client sends ``{"type": <operation>, "id", ...}`` and is answered ``{"type": "result", "id", "op",
"result"}`` or ``{"type": "error", "id", "op", "error", "status"}`` (OpenAI's error object); ``ping`` is
answered ``{"type": "pong", "id"}``; ``subscribe`` adds a live feed of telemetry events as ``{"type":
"event", "event"}`` messages until ``unsubscribe`` or the end of the connection. The operations are the
:class:`~runestone.control.plane.ControlPlane`'s (:data:`OPERATIONS`) and any added to ``extra`` (the key
and team operations of ``front/keys.py``). A bad message gets an error naming the problem and changes
nothing; an operation that fails unexpectedly is logged and answered ``internal_error``. At most
:data:`MAX_OPS` operations run at once per connection, each in the connection's nursery, so none outlives
it.

:class:`ControlSocket` does this for any :class:`ControlSession` (how to send its client a message, and
what it runs); the WebSocket plumbing (authentication, framing, the writer task) is ``front/admin.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from ..routing.errors import GatewayError
from ..runtime import ActorError, Registry
from ..wire.websocket import valid_id, ws_error
from ..telemetry.messages import Subscribe, Unsubscribe
from .plane import ControlPlane, _reason

__all__ = ["EVENT_BUFFER", "MAX_OPS", "OPERATIONS", "RESUBSCRIBE", "ControlSession", "ControlSocket"]

log = logging.getLogger("runestone.control")

#: Control operations one connection may run at once.
MAX_OPS = 8
#: Live events buffered per subscriber; a subscriber slower than the feed misses events, it never slows it.
EVENT_BUFFER = 512
#: How often a subscription is renewed, so that a restarted telemetry handler resumes the feed.
RESUBSCRIBE = 5.0

#: The operations every control socket knows (the plane's, the feed's and ping).
OPERATIONS = frozenset({
    "register_provider", "update_provider", "unregister_provider", "list_providers", "create_group",
    "update_group", "delete_group", "list_groups", "reset_circuit", "dump_state", "subscribe", "unsubscribe",
    "ping",
})

#: An added operation: the message in, a coroutine for its result out.
ExtraOperation = Callable[[dict], Awaitable[Any]]


class ControlSession:
    """One client of the control socket: ``send`` queues a message to it (waiting while its queue is
    full); ``ops`` counts its operations running; ``subscription`` is its live feed's scope, if any."""

    def __init__(self, send: Callable[[dict], Awaitable[None]]) -> None:
        self.send = send
        self.ops = 0
        self.subscription: trio.CancelScope | None = None


class ControlSocket:
    """The control protocol over ``plane``; the live feed comes from the ``telemetry_handler`` found in
    ``registry`` (looked up at each use, so that a restarted handler is found); ``extra`` maps the name of
    an added operation to it (read at each message: operations may be added after start)."""

    def __init__(self, plane: ControlPlane, registry: Registry,
                 extra: Mapping[str, ExtraOperation] | None = None) -> None:
        self.plane = plane
        self.registry = registry
        self.extra: Mapping[str, ExtraOperation] = extra if extra is not None else {}

    async def handle(self, session: ControlSession, msg: dict, nursery: trio.Nursery) -> None:
        """Answer one message: at once for a bad one and ``ping``, else from a task started in ``nursery``
        (the connection's) that sends the result when the operation ends."""
        op = msg.get("type")
        rid = msg.get("id")
        if rid is not None and not valid_id(rid):
            await session.send(ws_error(None, "'id' must be a string of 1 to 128 characters or an integer",
                                        "invalid_id", param="id"))
            return
        if op == "ping":
            await session.send({"type": "pong", "id": rid})
            return
        if op in ("subscribe", "unsubscribe"):
            await self._run(session, op, rid, self._subscribe(session, nursery) if op == "subscribe"
                            else self._unsubscribe(session))
            return
        runner = self._operation(op, msg)
        if runner is None:
            known = ", ".join(sorted(OPERATIONS | set(self.extra)))
            await session.send({**ws_error(rid, f"unknown operation {op!r}: expected one of {known}"
                                           if op is not None else f"a message needs a \"type\": one of {known}",
                                           "unknown_type", param="type"), "op": op})
            return
        if session.ops >= MAX_OPS:
            await session.send({**ws_error(rid, f"this connection already runs {MAX_OPS} operations; wait for one "
                                           "to finish", "too_many_operations", "rate_limit_error", status=429),
                                "op": op})
            runner.close()
            return
        session.ops += 1

        async def run() -> None:
            try:
                await self._run(session, op, rid, runner)
            finally:
                session.ops -= 1

        nursery.start_soon(run)

    def _operation(self, op: Any, msg: dict):
        """The coroutine that runs operation ``op`` of ``msg``; None for an unknown operation."""
        plane = self.plane
        if op == "register_provider":
            return plane.register_provider(msg.get("provider"))
        if op == "update_provider":
            name, provider = _named(msg, "provider")
            return plane.update_provider(name, provider, msg.get("grace_ms"))
        if op == "unregister_provider":
            return plane.unregister_provider(msg.get("name"), msg.get("grace_ms"))
        if op == "list_providers":
            return _ready(plane.list_providers)
        if op == "create_group":
            return plane.create_group(msg.get("group"))
        if op == "update_group":
            return plane.update_group(*_named(msg, "group"))
        if op == "delete_group":
            return plane.delete_group(msg.get("name"))
        if op == "list_groups":
            return plane.list_groups()
        if op == "reset_circuit":
            return plane.reset_circuit(msg.get("name"))
        if op == "dump_state":
            return _ready(plane.dump_state)
        extra = self.extra.get(op) if isinstance(op, str) else None
        return extra(msg) if extra is not None else None

    async def _run(self, session: ControlSession, op: str, rid: Any, runner) -> None:
        try:
            result = await runner
        except GatewayError as exc:
            await session.send({**ws_error(rid, exc.message, exc.code, exc.type, param=exc.param,
                                           status=exc.status), "op": op})
            return
        except Exception:
            log.exception("control operation %s failed", op)
            await session.send({**ws_error(rid, f"the gateway failed to run {op}; it was logged", "internal_error",
                                           "server_error", status=500), "op": op})
            return
        await session.send({"type": "result", "id": rid, "op": op, "result": result})

    async def _subscribe(self, session: ControlSession, nursery: trio.Nursery) -> dict:
        if session.subscription is not None:
            return {"subscribed": True}
        ref = self.registry.whereis("telemetry_handler")
        if ref is None:
            raise GatewayError(503, "the live feed is unavailable while the telemetry handler restarts; retry "
                               "shortly", "server_error", code="telemetry_unavailable")
        send, recv = trio.open_memory_channel[dict](EVENT_BUFFER)
        try:
            await ref.call(Subscribe(send), timeout=5.0)
        except ActorError as exc:
            raise GatewayError(503, f"the live feed is unavailable ({_reason(exc)}); retry shortly", "server_error",
                               code="telemetry_unavailable") from None
        scope = session.subscription = trio.CancelScope()
        nursery.start_soon(self._forward, session, send, recv, scope)
        return {"subscribed": True}

    async def _unsubscribe(self, session: ControlSession) -> dict:
        scope, session.subscription = session.subscription, None
        if scope is not None:
            scope.cancel()
        return {"subscribed": False}

    async def _forward(self, session: ControlSession, send, recv, scope: trio.CancelScope) -> None:
        """Relay the feed to ``session`` until unsubscribed or closed; then leave the handler's list."""
        registry = self.registry
        try:
            with scope:
                while True:
                    with trio.move_on_after(RESUBSCRIBE) as idle:
                        event = await recv.receive()
                    if idle.cancelled_caught:
                        # Subscribing again is a no-op for a live handler and re-attaches to a restarted one.
                        ref = registry.whereis("telemetry_handler")
                        if ref is not None:
                            with contextlib.suppress(ActorError):
                                await ref.call(Subscribe(send), timeout=2.0)
                        continue
                    await session.send({"type": "event", "event": event})
        finally:
            send.close()
            ref = registry.whereis("telemetry_handler")
            if ref is not None:
                # The handler drops a closed channel at its next event anyway; this makes it prompt.
                with trio.CancelScope(shield=True), contextlib.suppress(ActorError):
                    await ref.call(Unsubscribe(send), timeout=2.0)


def _named(msg: dict, field: str) -> tuple[Any, Any]:
    """An update's target and its new settings: ``msg["name"]``, else the name inside ``msg[field]``."""
    body = msg.get(field)
    name = msg.get("name")
    if name is None and isinstance(body, dict):
        name = body.get("name")
    return name, body


async def _ready(fn):
    return fn()
