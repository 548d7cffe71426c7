"""The control plane's HTTP routes under ``/admin/`` and its ``/v1/control`` WebSocket: each decodes a
request, calls :class:`~runestone.control.plane.ControlPlane` and encodes the answer (the operations, their
checks, drains and persistence are there).

HTTP: ``GET|POST /admin/providers``, ``GET|PATCH|DELETE /admin/providers/{name}``, ``GET|POST /admin/groups``,
``GET|PATCH|DELETE /admin/groups/{name}``, ``POST /admin/circuits/{name}/reset``, ``GET /admin/state``.
WebSocket ``/v1/control``: the upgrade, authentication and message framing here; each message is handled by
:class:`~runestone.control.socket.ControlSocket` (the protocol: operations, results, the live feed).
Everything here needs the admin key.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote

import attrs
import orjson
import trio

from ..control.plane import ControlPlane, _bad
from ..control.socket import ControlSession, ControlSocket
from ..http.server import Request, Response, WebSocketAccept
from ..routing.executor import GatewayError
from .api import Caller
from .deps import FrontDeps
from .ws import MessageConnection, serve_connection

__all__ = ["ControlPlane", "AdminRoutes", "install"]

_JSON = (b"content-type", b"application/json")


# -- HTTP -------------------------------------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, [_JSON], orjson.dumps(obj, default=str))


class ControlConnection(MessageConnection):
    """A ``/v1/control`` socket: a message connection carrying one :class:`ControlSession`."""

    def __init__(self, ws, **kw) -> None:
        super().__init__(ws, **kw)
        self.session = ControlSession(self.send)

    def statistics(self):
        return attrs.evolve(super().statistics(), active=self.session.ops)


class AdminRoutes:
    """The HTTP and WebSocket faces of one :class:`ControlPlane`."""

    def __init__(self, front, deps: FrontDeps) -> None:
        self.front = front
        self.plane = deps.control
        self.socket = ControlSocket(deps.control, deps.registry, deps.control_ops)
        self.max_message_bytes = deps.config.server.max_ws_message_bytes
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
        max_bytes = self.max_message_bytes

        async def handler(ws) -> None:
            conn = ControlConnection(ws, max_message_bytes=max_bytes)
            await serve_connection(conn, authed, self._admin, "the admin key", self._dispatch, self.connections)

        return WebSocketAccept(handler, max_message_size=max_bytes)

    async def _dispatch(self, conn: ControlConnection, caller: Caller, msg: dict, nursery: trio.Nursery) -> None:
        await self.socket.handle(conn.session, msg, nursery)


def install(front, deps: FrontDeps) -> AdminRoutes:
    routes = AdminRoutes(front, deps)
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
    return routes
