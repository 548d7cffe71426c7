"""A small deterministic token estimator, and token counts of OpenAI chat and Anthropic Messages bodies.

No real tokenizer ships with the gateway, so this one stands in wherever a count is needed without an
upstream to ask: the fake models' ``usage`` and their ``logprobs`` tokens, and the gateway's estimate for
``/v1/messages/count_tokens``. A token is a word (with its leading space) of up to 8 letters, up to 3
digits, up to 2 punctuation marks, or a run of whitespace, in the spirit of GPT-2's pre-tokenizer; the
tokens of a text concatenate back to it (:func:`split_tokens`). English prose comes out at roughly one
token per word, a little under what real tokenizers count.

The two body counters agree with each other across the gateway's translation: an Anthropic body counts
the same as the OpenAI chat body ``anthropic_request_to_openai`` makes of it, so a client that asks
``count_tokens`` and then sends the request through the fake sees the same ``input_tokens`` twice.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = [
    "IMAGE_TOKENS",
    "MESSAGE_TOKENS",
    "REPLY_TOKENS",
    "count_anthropic_messages",
    "count_openai_chat",
    "estimate_tokens",
    "split_tokens",
]

_TOKEN = re.compile(r" ?[^\W\d_]{1,8}| ?\d{1,3}| ?[^\w\s]{1,2}| ?_{1,4}|\s+(?!\S)|\s+|.", re.S)

#: Framing of each message (role and separators), as OpenAI's cookbook counts it.
MESSAGE_TOKENS = 3
#: The assistant turn every reply is primed with.
REPLY_TOKENS = 3
#: An image or a file part, whatever its size (OpenAI's low-detail image cost).
IMAGE_TOKENS = 85


def split_tokens(text: str) -> list[str]:
    """``text`` as tokens; ``"".join(split_tokens(text)) == text``."""
    return _TOKEN.findall(text)


def estimate_tokens(text: str) -> int:
    """How many tokens :func:`split_tokens` makes of ``text``."""
    return len(_TOKEN.findall(text)) if text else 0


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def _tool_tokens(name, description, schema) -> int:
    return (estimate_tokens(name if isinstance(name, str) else "")
            + estimate_tokens(description if isinstance(description, str) else "")
            + estimate_tokens(_json(schema if schema is not None else {})))


def _openai_parts(content) -> int:
    if isinstance(content, str):
        return estimate_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                total += estimate_tokens(part["text"])
            elif isinstance(part.get("refusal"), str):
                total += estimate_tokens(part["refusal"])
            elif part.get("type") in ("image_url", "input_image", "file", "input_file", "input_audio"):
                total += IMAGE_TOKENS
    return total


def count_openai_chat(body: dict) -> int:
    """Input tokens of an OpenAI chat body: each message's framing and content, tool calls, tool definitions."""
    total = REPLY_TOKENS
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        total += MESSAGE_TOKENS + _openai_parts(msg.get("content"))
        if isinstance(msg.get("name"), str):
            total += 1
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                args = fn.get("arguments")
                total += estimate_tokens(fn.get("name") or "") + estimate_tokens(args if isinstance(args, str) else _json(args))
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            total += _tool_tokens(fn.get("name"), fn.get("description"), fn.get("parameters"))
    return total


def _anthropic_text(content) -> str:
    # As the translation reads a system prompt or a tool result: text blocks joined by newlines.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def count_anthropic_messages(body: dict) -> int:
    """Input tokens of an Anthropic Messages (or ``count_tokens``) body, counted as :func:`count_openai_chat`
    counts its OpenAI translation: the system prompt and each tool result are messages of their own."""
    total = REPLY_TOKENS
    system = _anthropic_text(body.get("system"))
    if system:
        total += MESSAGE_TOKENS + estimate_tokens(system)
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            total += MESSAGE_TOKENS + estimate_tokens(content)
            continue
        if not isinstance(content, list):
            continue
        rest = 0
        has_rest = False
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                rest += estimate_tokens(block["text"])
                has_rest = True
            elif kind in ("image", "document"):
                rest += IMAGE_TOKENS
                has_rest = True
            elif kind == "tool_result":
                result = _anthropic_text(block.get("content"))
                total += MESSAGE_TOKENS + estimate_tokens("Error: " + result if block.get("is_error") else result)
            elif kind == "tool_use":
                total += estimate_tokens(block.get("name") or "") + estimate_tokens(_json(block.get("input") or {}))
                has_rest = True
            elif kind in ("thinking", "redacted_thinking"):
                has_rest = True  # a turn of its own; earlier turns' thinking is not counted as input
        if msg.get("role") == "assistant":
            # The assistant's text blocks are joined into one string.
            texts = "".join(b.get("text") or "" for b in content if isinstance(b, dict) and b.get("type") == "text")
            rest = estimate_tokens(texts)
        if has_rest:
            total += MESSAGE_TOKENS + rest
    for tool in body.get("tools") or ():
        if isinstance(tool, dict):
            total += _tool_tokens(tool.get("name"), tool.get("description"), tool.get("input_schema"))
    return total
