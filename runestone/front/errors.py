"""Client-facing errors, in the shape of the API the client speaks.

Routing raises :class:`~runestone.routing.errors.GatewayError` and decoders raise
:class:`~runestone.wire.errors.InvalidRequest`, neither in any wire format; this module alone turns them
into responses: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (:func:`error_response`,
:func:`gateway_error_response`) or Anthropic's ``{"type": "error", "error": {"type", "message"}}``
(:func:`anthropic_response`). Nothing here ever includes a traceback or a secret.
"""

from __future__ import annotations

from ..http.server import Response
from ..routing.errors import GatewayError
from ..wire.errors import ErrorInfo, InvalidRequest, anthropic_error_body, openai_error_body

__all__ = ["anthropic_response", "error_response", "gateway_error", "gateway_error_response", "http_error_body",
           "is_anthropic_path"]

#: Paths of Anthropic's API: refusals there are in Anthropic's shape, whatever refuses.
ANTHROPIC_PREFIX = b"/v1/messages"


def is_anthropic_path(target: bytes) -> bool:
    return target.startswith(ANTHROPIC_PREFIX)


def http_error_body(status: int, message: str, error_type: str, target: bytes) -> bytes:
    """The HTTP server's own refusals (malformed request, body over the limit) in the path's API's shape."""
    info = ErrorInfo(status, message, "request_too_large" if status == 413 else error_type)
    return anthropic_error_body(info) if is_anthropic_path(target) else openai_error_body(info)

_JSON = (b"content-type", b"application/json")


def gateway_error(exc: InvalidRequest) -> GatewayError:
    """A decoder's refusal as the request path's error (a 400 naming the field)."""
    return GatewayError(exc.status, exc.message, param=exc.param, code=exc.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                   code: str | None = None, headers=()) -> Response:
    return Response(status, [_JSON, *headers], openai_error_body(ErrorInfo(status, message, type, param, code)))


def _headers(exc: GatewayError, extra) -> list:
    headers = [_JSON, *exc.headers, *extra]
    if exc.provider:
        headers.append((b"x-runestone-provider", exc.provider.encode()))
    return headers


def gateway_error_response(exc: GatewayError, extra_headers=()) -> Response:
    """OpenAI's shape."""
    info = ErrorInfo(exc.status, exc.message, exc.type, exc.param, exc.code)
    return Response(exc.status, _headers(exc, extra_headers), openai_error_body(info))


def anthropic_response(exc: GatewayError | InvalidRequest, extra_headers=()) -> Response:
    """Anthropic's shape."""
    if isinstance(exc, InvalidRequest):
        exc = gateway_error(exc)
    info = ErrorInfo(exc.status, exc.message, exc.type, exc.param, exc.code)
    return Response(exc.status, _headers(exc, extra_headers), anthropic_error_body(info))
