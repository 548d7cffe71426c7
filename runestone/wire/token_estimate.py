"""The gateway's own estimate of a request's input tokens, for providers that cannot count them.

A tokenizer-free rule of thumb, the one OpenAI gives for English text: about 4 characters a token. Each
message adds 3 tokens of framing, an image a flat 85 (OpenAI's low-detail image), tool definitions and
tool calls are counted by their JSON text. It is deterministic and cheap, and it is an estimate: answers
built on it say so (``x-runestone-token-count: estimate``).
"""

from __future__ import annotations

import orjson

__all__ = ["estimate_chat_tokens"]

_PER_MESSAGE = 3
_PER_IMAGE = 85


def _chars(text: str) -> int:
    return (len(text) + 3) // 4


def _content(content) -> int:
    if isinstance(content, str):
        return _chars(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                total += _chars(part["text"])
            elif part.get("type") in ("image_url", "input_image"):
                total += _PER_IMAGE
            elif part.get("type") == "file":
                total += _chars(orjson.dumps(part.get("file")).decode())
    return total


def estimate_chat_tokens(chat: dict) -> int:
    """Input tokens of a canonical chat body: its messages, their tool calls and the tool definitions."""
    total = 0
    for msg in chat.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        total += _PER_MESSAGE + _content(msg.get("content"))
        for call in msg.get("tool_calls") or ():
            if isinstance(call, dict):
                total += _chars(orjson.dumps(call.get("function") or {}).decode())
    tools = chat.get("tools")
    if tools:
        total += _chars(orjson.dumps(tools).decode())
    fmt = chat.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        total += _chars(orjson.dumps(fmt.get("json_schema") or {}).decode())
    return total
