"""The front door: one HTTP handler serving the OpenAI-compatible API, health, metrics and the admin API.

``Front.handle`` is the handler given to the project's HTTP server. It finds the route by exact path
(a dict lookup; a few prefixes for paths with ids), authenticates, and calls the route. Routes raise
:class:`~runestone.routing.executor.GatewayError` to refuse; anything else that escapes a route is
logged and answered with a generic 500 in OpenAI's shape, never a traceback. The hot route,
``POST /v1/chat/completions``, does: read body, one ``orjson.loads``, validation, a route decision on
published snapshots, and the attempt — no mailbox waits.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable

import attrs
import trio

from ..http.server import BodyTooLarge, ClientDisconnected, HttpError, Request, Response
from ..routing.executor import Gateway, GatewayError
from .auth import KeyRing
from .errors import error_response, gateway_error_response
from .validate import parse_json_object, validate_chat, validate_embeddings

__all__ = ["Front", "RouteTable"]

log = logging.getLogger("runestone.front")

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

# Every provider type streams; only tools and vision narrow the choice.
_ALWAYS = frozenset({"streaming"})

Route = Callable[[Request, "Caller"], Awaitable[Any]]


class Caller:
    """Who is calling: the key id (None in open mode) and whether the admin key was presented."""

    __slots__ = ("key_id", "admin", "request_id")

    def __init__(self, key_id: str | None, admin: bool, request_id: str) -> None:
        self.key_id = key_id
        self.admin = admin
        self.request_id = request_id


class RouteTable:
    """Exact (method, path) routes plus prefix routes; ``public`` routes need no key."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], tuple[Route, str]] = {}
        self.prefix: list[tuple[str, str, Route, str]] = []
        #: Routes that spend model capacity: per-key limits apply to them.
        self.limited: set = set()
        self.paths: dict[str, list[str]] = {}

    def add(self, method: str, path: str, route: Route, access: str = "client", *, limited: bool = False) -> None:
        """``access``: "public" (no key), "client" (a client key) or "admin" (the admin key).

        ``limited``: the route calls a model, so the caller's per-key limits apply.
        """
        if limited:
            self.limited.add(route)
        if path.endswith("*"):
            self.prefix.append((method, path[:-1], route, access))
        else:
            self.exact[(method, path)] = (route, access)
        self.paths.setdefault(path.rstrip("*"), []).append(method)

    def find(self, method: str, path: str):
        hit = self.exact.get((method, path))
        if hit is not None:
            return hit
        if method == "HEAD":
            hit = self.exact.get(("GET", path))
            if hit is not None:
                return hit
        for m, prefix, route, access in self.prefix:
            if path.startswith(prefix) and (m == method or (method == "HEAD" and m == "GET")):
                return route, access
        return None

    def allowed(self, path: str) -> list[str]:
        methods = set(self.paths.get(path, ()))
        for m, prefix, _, _ in self.prefix:
            if path.startswith(prefix):
                methods.add(m)
        return sorted(methods)


class Front:
    def __init__(self, gateway: Gateway, keys: KeyRing, *, max_body_bytes: int) -> None:
        self.gateway = gateway
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.routes = RouteTable()
        #: Per-key limits (runestone.front.limits.KeyLimiter), set by the app when any limit is configured.
        self.limiter = None
        #: The response cache of non-streaming chat (front/cache.py installs it when enabled), or None.
        self.cache = None
        r = self.routes.add
        r("POST", "/v1/chat/completions", self.chat, limited=True)
        r("POST", "/chat/completions", self.chat, limited=True)
        r("POST", "/v1/embeddings", self.embeddings, limited=True)
        r("GET", "/v1/models", self.models)
        r("GET", "/v1/models/*", self.model)

    # -- dispatch -------------------------------------------------------------------------------------

    async def handle(self, request: Request):
        rid = request.header(b"x-request-id")
        if rid and len(rid) <= 128 and rid.isascii() and rid.replace(b"-", b"").replace(b"_", b"").isalnum():
            request_id = rid.decode()
        else:
            request_id = "req_" + os.urandom(12).hex()
        rid_header = (b"x-request-id", request_id.encode())
        try:
            found = self.routes.find(request.method, request.path)
            if found is None:
                allowed = self.routes.allowed(request.path)
                if allowed:
                    return error_response(405, f"{request.method} is not allowed on {request.path}; use "
                                          f"{' or '.join(allowed)}", code="method_not_allowed",
                                          headers=[(b"allow", ", ".join(allowed).encode()), rid_header])
                return error_response(404, f"no route for {request.method} {request.path}; the API lives under "
                                      "/v1 (see GET /openapi.json)", code="not_found", headers=[rid_header])
            route, access = found
            caller = self.authenticate(request, access, request_id)
            if self.limiter is not None and route in self.routes.limited:
                response = await self.run_limited(route, request, caller)
            else:
                response = await route(request, caller)
        except GatewayError as exc:
            return gateway_error_response(exc, [rid_header])
        except BodyTooLarge:
            return error_response(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes",
                                  code="request_too_large", headers=[rid_header])
        except HttpError as exc:  # the body was refused while reading it (too slow, malformed)
            return error_response(exc.status, exc.message, headers=[rid_header])
        except (trio.Cancelled, ClientDisconnected):
            raise
        except Exception:
            log.exception("request %s: %s %s failed", request_id, request.method, request.path)
            return error_response(500, "the gateway failed to handle this request; it was logged with id "
                                  f"{request_id}", "server_error", code="internal_error", headers=[rid_header])
        if isinstance(response, Response):
            response.headers.append(rid_header)
        return response

    async def run_limited(self, route, request: Request, caller: "Caller"):
        """Run ``route`` under the caller's per-key limits (a 429 GatewayError when refused)."""
        limiter = self.limiter
        if limiter is None:
            return await route(request, caller)
        lease = await limiter.admit(caller.key_id or "open")
        try:
            response = await route(request, caller)
        except BaseException:
            lease.release()
            raise
        if isinstance(response, Response):
            response.headers += lease.headers
            if response.stream is not None:
                response.stream = _release_after(response.stream, lease)
                return response
        lease.release()
        return response

    def authenticate(self, request: Request, access: str, request_id: str) -> Caller:
        if access == "public":
            return Caller(None, False, request_id)
        keys = self.keys
        token = keys.bearer(request.header(b"authorization"))
        if token is None:
            api_key = request.header(b"x-api-key")  # Anthropic-style clients
            if api_key:
                token = api_key.strip()
        if access == "admin":
            if keys.is_admin(token):
                return Caller("admin", True, request_id)
            if not keys.has_admin and keys.open_mode:
                return Caller(None, True, request_id)
            if not keys.has_admin:
                raise GatewayError(403, "the admin API is closed: set RUNESTONE_ADMIN_KEY to open it",
                                   "permission_error", code="admin_disabled")
            raise GatewayError(401, "this endpoint needs the admin key as 'Authorization: Bearer <admin key>'",
                               "authentication_error", code="invalid_api_key")
        key_id = keys.client(token)
        if key_id is not None:
            return Caller(key_id, key_id == "admin", request_id)
        if keys.open_mode:
            return Caller(None, False, request_id)
        if token is None:
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                               code="missing_api_key")
        raise GatewayError(401, "invalid API key: the key given is not one of this gateway's client keys",
                           "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        return parse_json_object(await request.body())

    # -- routes ---------------------------------------------------------------------------------------

    def require_model(self, model: str) -> None:
        """A 404 naming the way to list models, unless some provider, group, pool, split or alias serves it."""
        if not self.gateway.known_model(model):
            raise self._unknown_model(model)

    def _unknown_model(self, model: str) -> GatewayError:
        return GatewayError(404, f"the model {model!r} does not exist or no registered provider serves it; "
                            "list the available models and failover groups with GET /v1/models",
                            param="model", code="model_not_found")

    async def chat(self, request: Request, caller: Caller) -> Response:
        body = await self.read_json(request)
        shape = validate_chat(body)
        gw = self.gateway
        model = shape.model
        self.require_model(model)
        requirements = shape.requirements
        needs = shape.capability - _ALWAYS
        if needs and not needs <= requirements.require:
            requirements = attrs.evolve(requirements, require=requirements.require | needs)
        cache = self.cache
        if cache is not None and not shape.stream:
            cache_key, cached = cache.lookup(request, body, caller.key_id)
            if cached is not None:
                return cached
        plan = gw.plan(model, body, requirements)
        ctx = gw.begin(caller.request_id, caller.key_id, "chat", model, shape.stream)
        if not shape.stream:
            target, result = await gw.complete(ctx, body, plan)
            response = Response(200, [_JSON, *ctx.answer_headers(target.provider),
                                      (b"x-runestone-route", _route_header(ctx.route_reason))], result.body)
            return response if cache is None else cache.store(cache_key, response, target.provider)
        answer = await gw.open_stream(ctx, body, plan, shape.include_usage)
        headers = [*_SSE_HEADERS, *ctx.answer_headers(answer.provider),
                   (b"x-runestone-route", _route_header(ctx.route_reason))]
        return Response(200, headers, stream=gw.relay(ctx, answer))

    async def embeddings(self, request: Request, caller: Caller) -> Response:
        body = await self.read_json(request)
        model, requirements = validate_embeddings(body)
        gw = self.gateway
        self.require_model(model)
        plan = gw.plan(model, body, requirements, "embeddings")
        ctx = gw.begin(caller.request_id, caller.key_id, "embeddings", model, False)
        target, result = await gw.complete(ctx, body, plan, kind="embed")
        return Response(200, [_JSON, (b"x-runestone-provider", target.provider.encode())], result.body)

    def model_list(self) -> list[dict]:
        gw = self.gateway
        seen: dict[str, dict] = {}
        for entry in gw.providers.value.values():
            if entry.draining:
                continue
            for m in sorted(entry.info.models):
                if m.endswith("*") or m in seen:
                    continue
                seen[m] = {"id": m, "object": "model", "created": 0, "owned_by": entry.name}
        for name in sorted(gw.groups.groups.value or ()):
            seen.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": "runestone:group"})
        for alias in sorted(gw.aliases.value or ()):
            seen.setdefault(alias, {"id": alias, "object": "model", "created": 0, "owned_by": "runestone:alias"})
        for name, owner in gw.splits.models():  # a pool's or split's name shadows a model's when routing
            seen[name] = {"id": name, "object": "model", "created": 0, "owned_by": owner}
        return list(seen.values())

    async def models(self, request: Request, caller: Caller) -> Response:
        return Response.json({"object": "list", "data": self.model_list()})

    async def model(self, request: Request, caller: Caller) -> Response:
        from urllib.parse import unquote

        model_id = unquote(request.path[len("/v1/models/"):])
        for m in self.model_list():
            if m["id"] == model_id:
                return Response.json(m)
        raise self._unknown_model(model_id)


async def transformed(relay, feed):
    """Relay ``relay``'s items through ``feed`` (bytes -> bytes, b"" to write nothing), e.g. chat SSE into
    another API's stream format. The relay's own cleanup (upstream close, telemetry) always runs."""
    try:
        async for item in relay:
            data = feed(item)
            if data:
                yield data
    finally:
        await relay.aclose()


async def _release_after(stream, lease):
    """Relay ``stream`` and give the limiter's lease back when it ends, however it ends."""
    try:
        async for data in stream:
            yield data
    finally:
        lease.release()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _route_header(reason: str) -> bytes:
    # Header values must be visible ASCII; route reasons are ours, but model names come from clients.
    return reason.encode("ascii", "replace")[:200].replace(b"\r", b" ").replace(b"\n", b" ")
