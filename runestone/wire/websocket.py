"""What the gateway's WebSocket APIs (``/v1/ws``, ``/v1/control``) share on the wire: a client's message
id, and the ``error`` message (OpenAI's error object under ``error``, with the HTTP status it stands for)."""

from __future__ import annotations

from typing import Any

from .errors import openai_error_object

__all__ = ["valid_id", "ws_error"]


def valid_id(value: Any) -> bool:
    """Client ids: a string of 1 to 128 characters or an integer (not a boolean)."""
    if isinstance(value, str):
        return 0 < len(value) <= 128
    return isinstance(value, int) and not isinstance(value, bool)


def ws_error(id: Any, message: str, code: str | None, type: str = "invalid_request_error", *,
             param: str | None = None, status: int | None = None) -> dict:
    """An ``error`` message: OpenAI's error object under ``error``, and the HTTP status it stands for."""
    out = {"type": "error", "id": id, "error": openai_error_object(message, type, param, code)}
    if status is not None:
        out["status"] = status
    return out
