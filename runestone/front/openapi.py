"""``GET /openapi.json``: an OpenAPI 3.1 description of the gateway's HTTP API.

The description is built from the routes actually registered (so a route nobody documented still shows
up, with a generic shape) plus request schemas for the model routes. The fuzz tests read it to know what
to attack; clients may read it to generate code. Built once per process, on first request.
"""

from __future__ import annotations

import orjson

from .. import __version__
from ..config import ROUTER_POLICY_REGISTRY
from ..http.server import Response
from .deps import FrontDeps

__all__ = ["install", "build_openapi"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
    },
}

_RUNESTONE = {
    "type": "object",
    "description": "Routing wishes; stripped before the request goes upstream.",
    "properties": {
        "policy": {"type": "string", "enum": list(ROUTER_POLICY_REGISTRY)},
        "max_cost": {"type": "number", "minimum": 0},
        "max_latency_ms": {"type": "number", "minimum": 0},
        "require": {"type": "array", "items": {"type": "string", "enum": ["streaming", "tools", "vision", "embeddings"]}},
        "prefer": {"type": "array", "items": {"type": "string"}},
        "exclude": {"type": "array", "items": {"type": "string"}},
    },
}

_CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "seed": {"type": "integer"},
        "user": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "response_format": {"type": "object"},
        "runestone": _RUNESTONE,
    },
}

_EMBEDDINGS = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1, "maximum": 8192},
    },
}

_COMPLETIONS = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"},
    },
}

_MESSAGES = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                     "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                                    "content": {"oneOf": [{"type": "string"},
                                                          {"type": "array", "items": {"type": "object"}}]}}}},
        "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "stream": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
}

_BODIES = {
    "/v1/chat/completions": _CHAT,
    "/chat/completions": _CHAT,
    "/v1/embeddings": _EMBEDDINGS,
    "/v1/completions": _COMPLETIONS,
    "/v1/messages": _MESSAGES,
}

_SUMMARIES = {
    "/v1/chat/completions": "Chat completion (OpenAI format), streaming or not",
    "/v1/embeddings": "Embeddings",
    "/v1/completions": "Legacy text completion",
    "/v1/messages": "Anthropic Messages API",
    "/v1/messages/count_tokens": "Anthropic token count (the upstream's, or the gateway's estimate)",
    "/v1/responses": "OpenAI Responses API, streaming or not",
    "/v1/responses/input_tokens": "Input token count of a Responses request",
    "/v1/responses/{id}": "A stored response; /input_items lists its input items",
    "/v1/models": "List models, failover groups and aliases",
    "/v1/usage": "Usage summary from the ledger",
    "/health": "Liveness",
    "/health/ready": "Readiness",
    "/metrics": "Prometheus metrics",
    "/openapi.json": "This document",
}


def build_openapi(routes) -> dict:
    paths: dict = {}
    entries = [(m, p, a) for (m, p), (_, a) in routes.exact.items()]
    entries += [(m, prefix + "{id}", a) for m, prefix, _, a in routes.prefix]
    for method, path, access in sorted(entries, key=lambda e: (e[1], e[0])):
        op: dict = {
            "summary": _SUMMARIES.get(path, f"{method} {path}"),
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "Bad request", "content": {"application/json": {"schema": _ERROR}}},
                "401": {"description": "Missing or invalid key", "content": {"application/json": {"schema": _ERROR}}},
                "404": {"description": "Not found", "content": {"application/json": {"schema": _ERROR}}},
                "429": {"description": "Rate limited", "content": {"application/json": {"schema": _ERROR}}},
            },
        }
        if access != "public":
            op["security"] = [{"admin": []}] if access == "admin" else [{"bearer": []}]
        if "{id}" in path:
            op["parameters"] = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if method in ("POST", "PUT", "PATCH"):
            schema = _BODIES.get(path, {"type": "object"})
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Runestone", "version": __version__,
                 "description": "An OpenAI-compatible LLM gateway. Errors use OpenAI's error shape."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "a client key"},
            "admin": {"type": "http", "scheme": "bearer", "description": "the admin key (RUNESTONE_ADMIN_KEY)"},
        }},
        "paths": paths,
    }


def install(front, deps: FrontDeps) -> None:
    cached: list[bytes] = []

    async def openapi(request, caller) -> Response:
        if not cached:
            cached.append(orjson.dumps(build_openapi(front.routes)))
        return Response(200, [(b"content-type", b"application/json")], cached[0])

    front.routes.add("GET", "/openapi.json", openapi, "public")
