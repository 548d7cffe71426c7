"""Client-facing errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the gateway makes goes through :func:`error_response`, with a message a person can act on
(what was wrong, and what to do instead). Nothing here ever includes a traceback or a secret.
"""

from __future__ import annotations

import orjson

from ..http.server import Response
from ..routing.executor import GatewayError

__all__ = ["ApiError", "error_response", "gateway_error_response"]

_JSON = (b"content-type", b"application/json")


class ApiError(GatewayError):
    """Raised anywhere in a route to answer with an error; same fields as GatewayError."""


def error_response(status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                   code: str | None = None, headers=()) -> Response:
    body = orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})
    return Response(status, [_JSON, *headers], body)


def gateway_error_response(exc: GatewayError, extra_headers=()) -> Response:
    headers = [*exc.headers, *extra_headers]
    if exc.provider:
        headers.append((b"x-runestone-provider", exc.provider.encode()))
    return error_response(exc.status, exc.message, exc.type, param=exc.param, code=exc.code, headers=headers)
