"""The front door: one HTTP handler serving the OpenAI-compatible API, health, metrics and the admin API.

``Front.handle`` is the handler given to the project's HTTP server. It finds the route by exact path
(a dict lookup; a few prefixes for paths with ids), authenticates, and calls the route. Routes raise
:class:`~runestone.routing.errors.GatewayError` or :class:`~runestone.wire.errors.InvalidRequest` to
refuse; anything else that escapes a route is logged and answered with a generic 500 in OpenAI's shape,
never a traceback. A model route decodes its wire format into a
:class:`~runestone.routing.executor.ModelRequest`, calls the one pipeline (``Gateway.serve``) and encodes
the answer: the hot route, ``POST /v1/chat/completions``, does one ``orjson.loads``, validation, a route
decision on published snapshots and the attempt — no mailbox waits.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Awaitable, Callable

import trio

from ..http.server import BodyTooLarge, ClientDisconnected, HttpError, Request, Response
from ..routing.errors import GatewayError
from ..routing.executor import Completed, Gateway, ModelRequest
from ..routing.policies import NO_REQUIREMENTS, Requirements, parse_requirements
from ..wire.errors import InvalidRequest
from ..wire.openai import parse_json_object, validate_chat, validate_embeddings
from .auth import KeyRing
from .errors import anthropic_response, error_response, gateway_error_response, is_anthropic_path
from .streams import SSE_HEADERS, openai_sse

__all__ = ["Front", "RouteTable"]

log = logging.getLogger("runestone.front")

_JSON = (b"content-type", b"application/json")


# Request ids: a random prefix per process and a counter, unique without a getrandom() syscall per request.
_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def requirements_of(routing) -> Requirements:
    """The client's ``runestone`` routing object, parsed; a 400 naming it when it is wrong."""
    if routing is None:
        return NO_REQUIREMENTS
    try:
        return parse_requirements(routing)
    except (ValueError, TypeError) as exc:
        raise GatewayError(400, f"invalid 'runestone' routing object: {exc}", param="runestone",
                           code="invalid_value") from None

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
        self.paths: dict[str, list[str]] = {}

    def add(self, method: str, path: str, route: Route, access: str = "client") -> None:
        """``access``: "public" (no key), "client" (a client key) or "admin" (the admin key).

        Per-key limits are not the route's business: the pipeline admits every model request.
        """
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
        #: The response cache of non-streaming chat (front/cache.py installs it when enabled), or None.
        self.cache = None
        r = self.routes.add
        r("POST", "/v1/chat/completions", self.chat)
        r("POST", "/chat/completions", self.chat)
        r("POST", "/v1/embeddings", self.embeddings)
        r("GET", "/v1/models", self.models)
        r("GET", "/v1/models/*", self.model)

    # -- dispatch -------------------------------------------------------------------------------------

    async def handle(self, request: Request):
        rid = request.header(b"x-request-id")
        if rid and len(rid) <= 128 and rid.isascii() and rid.replace(b"-", b"").replace(b"_", b"").isalnum():
            request_id = rid.decode()
        else:
            request_id = _next_request_id()
        rid_header = (b"x-request-id", request_id.encode())
        try:
            found = self.routes.find(request.method, request.path)
            if found is None:
                allowed = self.routes.allowed(request.path)
                if allowed:
                    exc = GatewayError(405, f"{request.method} is not allowed on {request.path}; use "
                                       f"{' or '.join(allowed)}", code="method_not_allowed",
                                       headers=[(b"allow", ", ".join(allowed).encode())])
                else:
                    exc = GatewayError(404, f"no route for {request.method} {request.path}; see GET /openapi.json "
                                       "for the routes this gateway serves", "not_found_error", code="not_found")
                if is_anthropic_path(request.path.encode()):
                    return anthropic_response(exc, [rid_header])
                return gateway_error_response(exc, [rid_header])
            route, access = found
            caller = self.authenticate(request, access, request_id)
            response = await route(request, caller)
        except GatewayError as exc:
            return gateway_error_response(exc, [rid_header])
        except InvalidRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=[rid_header])
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

    def _unknown_model(self, model: str) -> GatewayError:
        return GatewayError(404, f"the model {model!r} does not exist or no registered provider serves it; "
                            "list the available models and failover groups with GET /v1/models",
                            "not_found_error", param="model", code="model_not_found")

    async def chat(self, request: Request, caller: Caller) -> Response:
        body = await self.read_json(request)
        shape = validate_chat(body)
        cache = self.cache
        if cache is not None and not shape.stream:
            cache_key, cached = await cache.lookup(request, body, caller.key_id, caller.request_id)
            if cached is not None:
                return cached
        result = await self.gateway.serve(ModelRequest(
            caller.request_id, caller.key_id, "chat", shape.model, body, "chat", shape.stream, shape.include_usage,
            requirements_of(shape.routing), shape.capability))
        if type(result) is Completed:
            response = Response(200, [_JSON, *result.headers], result.body)
            return response if cache is None else cache.store(cache_key, response, result.provider)
        return Response(200, [*SSE_HEADERS, *result.headers],
                        stream=openai_sse(result), first_ready=True)

    async def embeddings(self, request: Request, caller: Caller) -> Response:
        body = await self.read_json(request)
        model, routing = validate_embeddings(body)
        result = await self.gateway.serve(ModelRequest(
            caller.request_id, caller.key_id, "embeddings", model, body, "embed", requirements=requirements_of(routing)))
        return Response(200, [_JSON, *result.headers], result.body)

    def model_list(self) -> list[dict]:
        gw = self.gateway
        seen: dict[str, dict] = {}
        for entry in gw.providers.value.values():
            if entry.draining:
                continue
            for m in sorted(entry.info.models):
                if m.endswith("*") or m in seen:
                    continue
                seen[m] = {"id": m, "object": "model", "created": 0, "owned_by": entry.name,
                           "source": "discovered" if m in entry.discovered else "configured"}
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
