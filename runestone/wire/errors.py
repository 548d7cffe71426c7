"""Errors as the wire formats carry them: one neutral description, each API's body, the upstream's own words.

:class:`InvalidRequest` is what a decoder raises for a body its API refuses: a 400 naming the field, in the
route's own shape. :class:`ErrorInfo` is an error as a client will see it, independent of any API; the
``type`` vocabulary is OpenAI's (``invalid_request_error``, ``authentication_error``, ``permission_error``,
``not_found_error``, ``rate_limit_error``, ``api_error``, ``server_error``, ``timeout_error``,
``overloaded_error``), which Anthropic's nearly shares; :func:`anthropic_type` maps the rest.
:func:`parse_upstream_error` reads an upstream's error body (OpenAI's or Anthropic's shape, or anything
else) so that the client gets the upstream's status, type, code, param and message unchanged, and
:func:`scrub` removes the gateway's own credentials (and anything that looks like one) from upstream text
before it goes anywhere.
"""

from __future__ import annotations

import re

import attrs
import orjson

__all__ = [
    "ErrorInfo",
    "InvalidRequest",
    "UpstreamErrorBody",
    "anthropic_error_body",
    "anthropic_type",
    "loads_or_none",
    "openai_error_body",
    "openai_error_object",
    "parse_upstream_error",
    "scrub",
]


class InvalidRequest(ValueError):
    """A request body its API refuses: answered 400 (or ``status``) naming ``param``, changing nothing."""

    def __init__(self, param: str | None, message: str, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        self.status = status


@attrs.frozen
class ErrorInfo:
    """An error as a client sees it, in no particular API's shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


def openai_error_object(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"message": message, "type": type, "param": param, "code": code}


def openai_error_body(info: ErrorInfo) -> bytes:
    """OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": openai_error_object(info.message, info.type, info.param, info.code)})


# Anthropic's error types (docs: "Errors"); OpenAI-vocabulary types without a twin map by status.
_ANTHROPIC_TYPES = frozenset({"invalid_request_error", "authentication_error", "billing_error", "permission_error",
                              "not_found_error", "request_too_large", "rate_limit_error", "api_error",
                              "timeout_error", "overloaded_error"})
_ANTHROPIC_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                        403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                        429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                        529: "overloaded_error"}


def anthropic_type(status: int, type: str | None) -> str:
    if type in _ANTHROPIC_TYPES:
        return type  # type: ignore[return-value]
    if type == "server_error" and status not in (503, 504, 529):
        return "api_error"
    return _ANTHROPIC_BY_STATUS.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def anthropic_error_body(info: ErrorInfo) -> bytes:
    """Anthropic's ``{"type": "error", "error": {"type", "message"}}``; a ``param`` is named in the message."""
    message = info.message
    if info.param and not message.startswith(info.param):
        message = f"{info.param}: {message}"
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type(info.status, info.type),
                                                      "message": message}})


# -- upstream error bodies ----------------------------------------------------------------------------

@attrs.frozen
class UpstreamErrorBody:
    """What an upstream said about its error; ``None`` fields it did not say."""

    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    #: "openai", "anthropic" or None (not a known error shape: a proxy's page, plain text).
    shape: str | None = None


_MAX_TEXT = 2000


def _str(value, limit: int = 200) -> str | None:
    if isinstance(value, str) and value:
        return value[:limit]
    if isinstance(value, int) and not isinstance(value, bool):  # some servers send numeric codes
        return str(value)
    return None


def loads_or_none(raw: bytes | str):
    """``raw`` as JSON, or None when it is empty or not JSON (an upstream's error body may be an HTML page)."""
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def parse_upstream_error(body: bytes, secrets=()) -> UpstreamErrorBody:
    """The upstream's error as it said it, scrubbed of ``secrets`` and credential-like text.

    OpenAI's ``{"error": {"message", "type", "code", "param"}}`` and Anthropic's ``{"type": "error",
    "error": {"type", "message"}}`` are read field by field; anything else (an HTML page from a proxy)
    becomes a shortened message.
    """
    doc = loads_or_none(body)
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            message = err.get("message")
            message = scrub(message[:_MAX_TEXT], secrets) if isinstance(message, str) and message else "no details"
            shape = "anthropic" if doc.get("type") == "error" else "openai"
            return UpstreamErrorBody(message, _str(err.get("type")), _str(err.get("code")),
                                     _str(err.get("param")), shape)
        if isinstance(err, str) and err:
            return UpstreamErrorBody(scrub(err[:_MAX_TEXT], secrets))
        message = doc.get("message") or doc.get("detail")
        if isinstance(message, str) and message:
            return UpstreamErrorBody(scrub(message[:_MAX_TEXT], secrets))
    text = body[:200].decode("utf-8", "replace").strip()
    return UpstreamErrorBody(scrub(text, secrets) or "no details")


# -- credentials --------------------------------------------------------------------------------------

# What looks like a credential in free text: bearer tokens, OpenAI/Anthropic-style keys, api-key headers
# and query parameters echoed back.
_CREDENTIAL = re.compile(
    rb"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"
    rb"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}"
    rb"|((?:x-)?api[-_]?key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/=-]{8,}"
    rb"|(key=)[A-Za-z0-9._~+/=-]{8,}"
)
_REDACTED = "[redacted]"


def _redact(m: "re.Match[bytes]") -> bytes:
    prefix = m.group(1) or m.group(2) or m.group(3) or b""
    return prefix + b"[redacted]"


def scrub(text: str, secrets=()) -> str:
    """``text`` without the given secrets (the gateway's provider keys) nor anything shaped like a key."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, _REDACTED)
    if not text:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if _CREDENTIAL.search(raw) is None:
        return text
    return _CREDENTIAL.sub(_redact, raw).decode("utf-8", "replace")
