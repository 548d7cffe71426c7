"""The control plane's HTTP routes under ``/admin/`` and its ``/v1/control`` socket: each decodes a request,
calls :class:`~runestone.control.plane.ControlPlane` and encodes the answer (the operations, their checks,
drains and persistence are there).

HTTP: ``GET|POST /admin/providers``, ``GET|PATCH|DELETE /admin/providers/{name}``, ``GET|POST /admin/groups``,
``GET|PATCH|DELETE /admin/groups/{name}``, ``POST /admin/circuits/{name}/reset``, ``GET /admin/state``.
WebSocket ``/v1/control``: ``{"type": <operation>, "id", ...}`` answered by ``{"type": "result", "id", "op",
"result"}`` or ``{"type": "error", "id", "op", "error"}``; ``subscribe`` adds a live feed of telemetry
events as ``{"type": "event", "event"}`` messages. Everything here needs the admin key.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs, unquote

import attrs
import orjson
import trio

from ..control.plane import ControlPlane, _bad, _reason
from ..http.server import Request, Response, WebSocketAccept
from ..routing.executor import GatewayError
from ..wire.errors import openai_error_object
from ..runtime import ActorError
from .api import Caller
from .ws import MessageConnection, serve_connection, valid_id, ws_error

__all__ = ["ControlPlane", "AdminRoutes", "install"]

log = logging.getLogger("runestone.control")

_JSON = (b"content-type", b"application/json")
#: Control operations one socket may run at once.
MAX_OPS = 8
#: Live events buffered per subscriber; a subscriber slower than the feed misses events, it never slows it.
EVENT_BUFFER = 512
#: How often a subscription is renewed, so that a restarted telemetry handler resumes the feed.
RESUBSCRIBE = 5.0



# -- HTTP -------------------------------------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, [_JSON], orjson.dumps(obj, default=str))


class ControlConnection(MessageConnection):
    """A ``/v1/control`` socket: a message connection that may also carry the live event feed."""

    def __init__(self, ws, **kw) -> None:
        super().__init__(ws, **kw)
        self.subscription: trio.CancelScope | None = None
        self.ops = 0

    def statistics(self):
        return attrs.evolve(super().statistics(), active=self.ops)


class AdminRoutes:
    """The HTTP and WebSocket faces of one :class:`ControlPlane`."""

    def __init__(self, front, app) -> None:
        self.front = front
        self.app = app
        self.plane = ControlPlane(app)
        self.connections: set[MessageConnection] = set()

    # -- HTTP routes ----------------------------------------------------------------------------------

    @staticmethod
    def _name(request: Request, prefix: str, suffix: str = "") -> str:
        rest = request.path[len(prefix):]
        if suffix:
            if not rest.endswith(suffix):
                raise GatewayError(404, f"no route for {request.method} {request.path}", code="not_found")
            rest = rest[:-len(suffix)]
        name = unquote(rest)
        if not name or "/" in name:
            raise GatewayError(404, f"no route for {request.method} {request.path}", code="not_found")
        return name

    @staticmethod
    def _grace_param(request: Request) -> float | None:
        values = parse_qs(request.query).get("grace_ms")
        if not values:
            return None
        try:
            return float(values[0])
        except ValueError:
            raise _bad("'grace_ms' must be a number of milliseconds", param="grace_ms") from None

    async def list_providers(self, request: Request, caller: Caller) -> Response:
        return _json({"object": "list", "data": self.plane.list_providers()})

    async def get_provider(self, request: Request, caller: Caller) -> Response:
        return _json(self.plane.describe_provider(self._name(request, "/admin/providers/")))

    async def post_provider(self, request: Request, caller: Caller) -> Response:
        body = await self.front.read_json(request)
        return _json(await self.plane.register_provider(body), 201)

    async def patch_provider(self, request: Request, caller: Caller) -> Response:
        name = self._name(request, "/admin/providers/")
        body = await self.front.read_json(request)
        return _json(await self.plane.update_provider(name, body, self._grace_param(request)))

    async def delete_provider(self, request: Request, caller: Caller) -> Response:
        name = self._name(request, "/admin/providers/")
        return _json(await self.plane.unregister_provider(name, self._grace_param(request)))

    async def list_groups(self, request: Request, caller: Caller) -> Response:
        return _json({"object": "list", "data": await self.plane.list_groups()})

    async def get_group(self, request: Request, caller: Caller) -> Response:
        return _json(self.plane.describe_group(self._name(request, "/admin/groups/")))

    async def post_group(self, request: Request, caller: Caller) -> Response:
        body = await self.front.read_json(request)
        return _json(await self.plane.create_group(body), 201)

    async def patch_group(self, request: Request, caller: Caller) -> Response:
        name = self._name(request, "/admin/groups/")
        body = await self.front.read_json(request)
        return _json(await self.plane.update_group(name, body))

    async def delete_group(self, request: Request, caller: Caller) -> Response:
        return _json(await self.plane.delete_group(self._name(request, "/admin/groups/")))

    async def reset_circuit(self, request: Request, caller: Caller) -> Response:
        return _json(await self.plane.reset_circuit(self._name(request, "/admin/circuits/", "/reset")))

    async def state(self, request: Request, caller: Caller) -> Response:
        return _json(self.plane.dump_state())

    # -- the control socket ---------------------------------------------------------------------------

    def _admin(self, token: bytes) -> Caller | None:
        return Caller("admin", True, "control") if self.front.keys.is_admin(token) else None

    async def control(self, request: Request, caller: Caller) -> WebSocketAccept:
        if not request.websocket:
            raise GatewayError(426, f"{request.path} is a WebSocket endpoint: connect with a WebSocket client "
                               "(Upgrade: websocket)", code="upgrade_required", headers=[(b"upgrade", b"websocket")])
        keys = self.front.keys
        authed = None
        if keys.bearer(request.header(b"authorization")) is not None or request.header(b"x-api-key"):
            authed = self.front.authenticate(request, "admin", caller.request_id)
        elif not keys.has_admin:
            # No admin key: open loopback mode lets the local operator in, anything else is closed.
            authed = self.front.authenticate(request, "admin", caller.request_id)
        max_bytes = self.app.config.server.max_ws_message_bytes

        async def handler(ws) -> None:
            conn = ControlConnection(ws, max_message_bytes=max_bytes)
            await serve_connection(conn, authed, self._admin, "the admin key", self.dispatch, self.connections)

        return WebSocketAccept(handler, max_message_size=max_bytes)

    async def dispatch(self, conn: ControlConnection, caller: Caller, msg: dict, nursery: trio.Nursery) -> None:
        op = msg.get("type")
        rid = msg.get("id")
        if rid is not None and not valid_id(rid):
            await conn.send(ws_error(None, "'id' must be a string of 1 to 128 characters or an integer",
                                     "invalid_id", param="id"))
            return
        if op == "ping":
            await conn.send({"type": "pong", "id": rid})
            return
        if op in ("subscribe", "unsubscribe"):
            await self._run(conn, op, rid, self._subscribe(conn, nursery) if op == "subscribe"
                            else self._unsubscribe(conn))
            return
        runner = self._operation(op, msg)
        if runner is None:
            known = ", ".join(sorted(_OPERATIONS | set(getattr(self.app, "control_ops", ()))))
            await conn.send({**ws_error(rid, f"unknown operation {op!r}: expected one of {known}"
                                        if op is not None else f"a message needs a \"type\": one of {known}",
                                        "unknown_type", param="type"), "op": op})
            return
        if conn.ops >= MAX_OPS:
            await conn.send({**ws_error(rid, f"this connection already runs {MAX_OPS} operations; wait for one to "
                                        "finish", "too_many_operations", "rate_limit_error", status=429), "op": op})
            runner.close()
            return
        conn.ops += 1

        async def run() -> None:
            try:
                await self._run(conn, op, rid, runner)
            finally:
                conn.ops -= 1

        nursery.start_soon(run)

    def _operation(self, op: Any, msg: dict):
        plane = self.plane
        if op == "register_provider":
            return plane.register_provider(msg.get("provider"))
        if op == "update_provider":
            provider = msg.get("provider")
            name = msg.get("name")
            if name is None and isinstance(provider, dict):
                name = provider.get("name")
            return plane.update_provider(name, provider, msg.get("grace_ms"))
        if op == "unregister_provider":
            return plane.unregister_provider(msg.get("name"), msg.get("grace_ms"))
        if op == "list_providers":
            return _ready(plane.list_providers)
        if op == "create_group":
            return plane.create_group(msg.get("group"))
        if op == "update_group":
            group = msg.get("group")
            name = msg.get("name")
            if name is None and isinstance(group, dict):
                name = group.get("name")
            return plane.update_group(name, group)
        if op == "delete_group":
            return plane.delete_group(msg.get("name"))
        if op == "list_groups":
            return plane.list_groups()
        if op == "reset_circuit":
            return plane.reset_circuit(msg.get("name"))
        if op == "dump_state":
            return _ready(plane.dump_state)
        extra = getattr(self.app, "control_ops", {}).get(op) if isinstance(op, str) else None
        return extra(msg) if extra is not None else None

    async def _run(self, conn: ControlConnection, op: str, rid: Any, runner) -> None:
        try:
            result = await runner
        except GatewayError as exc:
            await conn.send({"type": "error", "id": rid, "op": op, "error": openai_error_object(exc.message, exc.type, exc.param, exc.code), "status": exc.status})
            return
        except Exception:
            log.exception("control operation %s failed", op)
            await conn.send({**ws_error(rid, f"the gateway failed to run {op}; it was logged", "internal_error",
                                        "server_error", status=500), "op": op})
            return
        await conn.send({"type": "result", "id": rid, "op": op, "result": result})

    async def _subscribe(self, conn: ControlConnection, nursery: trio.Nursery) -> dict:
        if conn.subscription is not None:
            return {"subscribed": True}
        ref = self.app.registry.whereis("telemetry_handler")
        if ref is None:
            raise GatewayError(503, "the live feed is unavailable while the telemetry handler restarts; retry "
                               "shortly", "server_error", code="telemetry_unavailable")
        send, recv = trio.open_memory_channel[dict](EVENT_BUFFER)
        try:
            await ref.call(("subscribe", send), timeout=5.0)
        except ActorError as exc:
            raise GatewayError(503, f"the live feed is unavailable ({_reason(exc)}); retry shortly", "server_error",
                               code="telemetry_unavailable") from None
        scope = conn.subscription = trio.CancelScope()
        nursery.start_soon(self._forward, conn, send, recv, scope)
        return {"subscribed": True}

    async def _unsubscribe(self, conn: ControlConnection) -> dict:
        scope, conn.subscription = conn.subscription, None
        if scope is not None:
            scope.cancel()
        return {"subscribed": False}

    async def _forward(self, conn: ControlConnection, send, recv, scope: trio.CancelScope) -> None:
        """Relay the feed to ``conn`` until unsubscribed or closed; then leave the handler's list."""
        registry = self.app.registry
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
                                await ref.call(("subscribe", send), timeout=2.0)
                        continue
                    await conn.send({"type": "event", "event": event})
        finally:
            send.close()
            ref = registry.whereis("telemetry_handler")
            if ref is not None:
                # The handler drops a closed channel at its next event anyway; this makes it prompt.
                with trio.CancelScope(shield=True), contextlib.suppress(ActorError):
                    await ref.call(("unsubscribe", send), timeout=2.0)


_OPERATIONS = frozenset({
    "register_provider", "update_provider", "unregister_provider", "list_providers", "create_group",
    "update_group", "delete_group", "list_groups", "reset_circuit", "dump_state", "subscribe", "unsubscribe",
    "ping",
})


async def _ready(fn):
    return fn()


def install(front, app) -> None:
    routes = AdminRoutes(front, app)
    app.control = routes.plane
    add = front.routes.add
    add("GET", "/admin/providers", routes.list_providers, "admin")
    add("POST", "/admin/providers", routes.post_provider, "admin")
    add("GET", "/admin/providers/*", routes.get_provider, "admin")
    add("PATCH", "/admin/providers/*", routes.patch_provider, "admin")
    add("DELETE", "/admin/providers/*", routes.delete_provider, "admin")
    add("GET", "/admin/groups", routes.list_groups, "admin")
    add("POST", "/admin/groups", routes.post_group, "admin")
    add("GET", "/admin/groups/*", routes.get_group, "admin")
    add("PATCH", "/admin/groups/*", routes.patch_group, "admin")
    add("DELETE", "/admin/groups/*", routes.delete_group, "admin")
    add("POST", "/admin/circuits/*", routes.reset_circuit, "admin")
    add("GET", "/admin/state", routes.state, "admin")
    add("GET", "/v1/control", routes.control, "public")
