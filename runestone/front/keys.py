"""Keys and teams over HTTP and the control socket, and ``GET /v1/key`` for a caller.

HTTP (the admin key): ``POST|GET /admin/keys``, ``GET|PATCH|DELETE /admin/keys/{id}`` (DELETE revokes at
once), ``POST /admin/keys/{id}/rotate`` (body ``{"grace_ms"}``: how long the old secret still works),
``POST|GET /admin/teams``, ``GET|PATCH|DELETE /admin/teams/{name}``. A new or rotated key's secret is in
that one answer (``"secret"``) and nowhere else, ever. The control socket ``/v1/control`` has the same as
operations: ``create_key {key}``, ``list_keys``, ``get_key {key_id}``, ``update_key {key_id, key}``,
``revoke_key {key_id}``, ``rotate_key {key_id, grace_ms}`` (``id`` is the message's own, as for every operation), ``create_team {team}``, ``list_teams``, ``get_team {name}``,
``update_team {name, team}``, ``delete_team {name}``. The operations are :class:`~runestone.governance.Governance`'s.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import orjson

from ..http.server import Request, Response
from ..routing.errors import GatewayError
from ..wire.openai import parse_json_object
from .deps import FrontDeps

__all__ = ["KeyRoutes", "install"]

_JSON = (b"content-type", b"application/json")
_KEY_ID = re.compile(r"^key_[0-9a-f]{12}$")
_TEAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, [_JSON], orjson.dumps(obj))


def _no_route(request: Request) -> GatewayError:
    return GatewayError(404, f"no route for {request.method} {request.path}", "not_found_error", code="not_found")


class KeyRoutes:
    def __init__(self, front, deps: FrontDeps) -> None:
        self.front = front
        self.gov = deps.governance

    # -- path parts -----------------------------------------------------------------------------------

    @staticmethod
    def _part(request: Request, prefix: str, pattern: re.Pattern, suffix: str = "") -> str:
        rest = request.path[len(prefix):]
        if suffix:
            if not rest.endswith(suffix):
                raise _no_route(request)
            rest = rest[:-len(suffix)]
        name = unquote(rest)
        if not pattern.match(name):
            raise _no_route(request)
        return name

    def _key_id(self, request: Request, suffix: str = "") -> str:
        key_id = self._part(request, "/admin/keys/", _KEY_ID, suffix)
        if key_id not in self.gov.keys:
            raise GatewayError(404, f"no key with id {key_id!r}; list them with GET /admin/keys", "not_found_error",
                               param="id", code="not_found")
        return key_id

    def _team(self, request: Request) -> str:
        return self._part(request, "/admin/teams/", _TEAM)

    def _can_issue(self) -> None:
        if not self.front.keys.has_admin:
            raise GatewayError(403, "set an admin key (RUNESTONE_ADMIN_KEY) before issuing keys: the first managed key "
                               "ends open mode, and with it an admin API that needs no key", "permission_error",
                               code="admin_key_required")

    # -- keys -----------------------------------------------------------------------------------------

    async def create_key(self, data: Any) -> dict:
        self._can_issue()
        return await self.gov.create_key(data)

    async def post_key(self, request: Request, caller) -> Response:
        return _json(await self.create_key(await self.front.read_json(request)), 201)

    async def list_keys(self, request: Request, caller) -> Response:
        return _json({"object": "list", "data": await self.gov.keys_view()})

    async def get_key(self, request: Request, caller) -> Response:
        return _json(await self.gov.key_view(self._key_id(request)))

    async def patch_key(self, request: Request, caller) -> Response:
        key_id = self._key_id(request)
        return _json(await self.gov.update_key(key_id, await self.front.read_json(request)))

    async def delete_key(self, request: Request, caller) -> Response:
        return _json(await self.gov.revoke_key(self._key_id(request)))

    async def rotate(self, request: Request, caller) -> Response:
        key_id = self._key_id(request, "/rotate")
        raw = await request.body()
        body = parse_json_object(raw) if raw.strip() else {}
        if set(body) - {"grace_ms"}:
            raise GatewayError(400, "a rotation takes only {\"grace_ms\": <how long the old secret still works>}",
                               param=sorted(set(body) - {"grace_ms"})[0], code="invalid_value")
        return _json(await self.gov.rotate_key(key_id, body.get("grace_ms")))

    # -- teams ----------------------------------------------------------------------------------------

    async def post_team(self, request: Request, caller) -> Response:
        return _json(await self.gov.create_team(await self.front.read_json(request)), 201)

    async def list_teams(self, request: Request, caller) -> Response:
        return _json({"object": "list", "data": await self.gov.teams_view()})

    async def get_team(self, request: Request, caller) -> Response:
        return _json(await self.gov.team_view(self._team(request)))

    async def patch_team(self, request: Request, caller) -> Response:
        name = self._team(request)
        return _json(await self.gov.update_team(name, await self.front.read_json(request)))

    async def delete_team(self, request: Request, caller) -> Response:
        return _json(await self.gov.delete_team(self._team(request)))

    # -- the caller's own key -------------------------------------------------------------------------

    async def own_key(self, request: Request, caller) -> Response:
        return _json(await self.gov.own_view(caller.key_id))

    # -- the control socket ---------------------------------------------------------------------------

    def operations(self) -> dict:
        gov = self.gov
        return {
            "create_key": lambda m: self.create_key(m.get("key")),
            "list_keys": lambda m: gov.keys_view(),
            "get_key": lambda m: gov.key_view(m.get("key_id")),
            "update_key": lambda m: gov.update_key(m.get("key_id"), m.get("key")),
            "revoke_key": lambda m: gov.revoke_key(m.get("key_id")),
            "rotate_key": lambda m: gov.rotate_key(m.get("key_id"), m.get("grace_ms")),
            "create_team": lambda m: gov.create_team(m.get("team")),
            "list_teams": lambda m: gov.teams_view(),
            "get_team": lambda m: gov.team_view(m.get("name")),
            "update_team": lambda m: gov.update_team(m.get("name"), m.get("team")),
            "delete_team": lambda m: gov.delete_team(m.get("name")),
        }


def install(front, deps: FrontDeps) -> None:
    routes = KeyRoutes(front, deps)
    add = front.routes.add
    add("POST", "/admin/keys", routes.post_key, "admin")
    add("GET", "/admin/keys", routes.list_keys, "admin")
    add("GET", "/admin/keys/*", routes.get_key, "admin")
    add("PATCH", "/admin/keys/*", routes.patch_key, "admin")
    add("DELETE", "/admin/keys/*", routes.delete_key, "admin")
    add("POST", "/admin/keys/*", routes.rotate, "admin")
    add("POST", "/admin/teams", routes.post_team, "admin")
    add("GET", "/admin/teams", routes.list_teams, "admin")
    add("GET", "/admin/teams/*", routes.get_team, "admin")
    add("PATCH", "/admin/teams/*", routes.patch_team, "admin")
    add("DELETE", "/admin/teams/*", routes.delete_team, "admin")
    add("GET", "/v1/key", routes.own_key)
    deps.control_ops.update(routes.operations())
