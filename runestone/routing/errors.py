"""The request path's refusals, in no wire format: the front door maps each to its own API's error shape.

A :class:`GatewayError` says what happened as a client should hear it: an HTTP status, a message a person
can act on, a ``type`` from the shared vocabulary (OpenAI's names: ``invalid_request_error``,
``authentication_error``, ``permission_error``, ``not_found_error``, ``rate_limit_error``, ``api_error``,
``server_error``, ``timeout_error``; ``runestone.wire.errors`` maps them to Anthropic's), the ``param`` and
``code`` when there is one, extra response headers, and the provider that gave the answer when one did.
When an upstream refused the request, its own status, type, code, param and message are carried
unchanged (already scrubbed of the gateway's credentials where the upstream's text entered).
"""

from __future__ import annotations

__all__ = ["GatewayError"]


class GatewayError(Exception):
    """A request the gateway answers with an error."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: list | None = None, provider: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []
        self.provider = provider

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, {self.type!r}, code={self.code!r})"
