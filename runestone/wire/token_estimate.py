"""The gateway's one token estimate: a request's input tokens, and a text's, wherever a count is needed
without a tokenizer.

No real tokenizer ships with the gateway. Every count that is not an upstream's own comes from here: the
budget reservation's and the ``cost`` routing policy's input estimate, the ``count_tokens`` /
``input_tokens`` answer when no upstream can count (``x-runestone-token-count: estimate``), the usage of
an upstream that reports none (Gemini embeddings; an OpenAI-compatible server that ignores
``stream_options.include_usage`` or sends no ``usage``: :func:`estimate_output_tokens`), and the fake models' ``usage``, ``logprobs`` and length
cut. So the same request is the same number everywhere.

The rule, as OpenAI documents it and as gateways without a tokenizer use it:

- a text is about 4 bytes of UTF-8 a token (4 characters of English, OpenAI's rule of thumb; byte-level
  BPE tokenizers merge bytes, so CJK text, 3 bytes a character, comes out near their count instead of
  at a third of it): ``ceil(bytes / 4)``;
- each chat message adds :data:`MESSAGE_TOKENS` (OpenAI's 3 of framing, plus the role), a ``name`` its
  tokens plus 1, and every request :data:`REPLY_TOKENS` (the assistant turn the reply is primed with),
  as OpenAI's cookbook and LiteLLM count them;
- an image, audio or file part is a flat :data:`IMAGE_TOKENS` whatever its size (OpenAI's low-detail
  image; the gateway does not decode media);
- a tool call is its name and arguments text; a tool definition and a ``json_schema`` response format
  their JSON text;
- a completions ``prompt`` and an embeddings ``input`` are their texts; a token array is its length.

Checked against o200k_base: English prose and code come out within about 15% of the tokenizer's count,
CJK about 10% above it, Cyrillic (2 bytes a letter) about 1.7 times it; digit runs, emoji and base64 are
under-counted (about half).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "IMAGE_TOKENS",
    "MESSAGE_TOKENS",
    "REPLY_TOKENS",
    "estimate_input_tokens",
    "estimate_output_tokens",
    "estimate_text_tokens",
    "split_tokens",
]

#: Tokens of framing per chat message: OpenAI's 3 (start, separator, end) plus the role.
MESSAGE_TOKENS = 4
#: The assistant turn every reply is primed with.
REPLY_TOKENS = 3
#: An image, audio or file part, whatever its size (OpenAI's low-detail image cost).
IMAGE_TOKENS = 85

_MEDIA = frozenset(("image_url", "input_image", "file", "input_file", "input_audio"))


def estimate_text_tokens(text: str) -> int:
    """``ceil(utf-8 bytes / 4)``: 0 for the empty string."""
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (n + 3) >> 2


def split_tokens(text: str) -> list[str]:
    """``text`` in :func:`estimate_text_tokens` pieces, each about 4 bytes of UTF-8 (a character is never
    cut); ``"".join(split_tokens(text)) == text``."""
    if text.isascii():
        return [text[i:i + 4] for i in range(0, len(text), 4)]
    pieces: list[str] = []
    start, size, group = 0, 0, 0
    for i, ch in enumerate(text):
        size += len(ch.encode("utf-8", "surrogatepass"))
        g = (size + 3) >> 2
        if g != group and i > start:
            pieces.append(text[start:i])
            start = i
        group = g
    if text:
        pieces.append(text[start:])
    return pieces


def _json_tokens(value: Any) -> int:
    try:
        return estimate_text_tokens(orjson.dumps(value).decode())
    except TypeError:
        return estimate_text_tokens(str(value))


def _content_tokens(content: Any) -> int:
    if content.__class__ is str:
        return estimate_text_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                total += estimate_text_tokens(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    total += estimate_text_tokens(part["text"])
                elif isinstance(part.get("refusal"), str):
                    total += estimate_text_tokens(part["refusal"])
                elif part.get("type") in _MEDIA:
                    total += IMAGE_TOKENS
    return total


def _texts_tokens(value: Any) -> int:
    # A completions prompt or an embeddings input: a string, strings, a token array or token arrays.
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if not isinstance(value, list):
        return 0
    if value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return len(value)
    return sum(_texts_tokens(item) for item in value)


def _message_tokens(msg: dict) -> int:
    content = msg.get("content")
    total = MESSAGE_TOKENS + (estimate_text_tokens(content) if content.__class__ is str else _content_tokens(content))
    name = msg.get("name")
    if name.__class__ is str:
        total += 1 + estimate_text_tokens(name)
    calls = msg.get("tool_calls")
    if calls:
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                args = fn.get("arguments")
                fname = fn.get("name")
                total += (estimate_text_tokens(fname if isinstance(fname, str) else "")
                          + (estimate_text_tokens(args) if isinstance(args, str) else _json_tokens(args or {})))
    return total


#: The fields besides ``messages`` that count as input (see :func:`estimate_input_tokens`).
_OTHER_INPUT = frozenset(("tools", "response_format", "prompt", "input"))


def estimate_input_tokens(body: dict) -> int:
    """Input tokens of a canonical (OpenAI-shaped) request body: a chat body's messages, their tool calls,
    the tool definitions and a ``json_schema`` response format; a completions ``prompt``; an embeddings
    ``input``. Fields of another shape count 0 (validation judges them, not this)."""
    total = 0
    messages = body.get("messages")
    if messages.__class__ is list:
        total = REPLY_TOKENS
        for msg in messages:
            if msg.__class__ is not dict:
                continue
            content = msg.get("content")
            if content.__class__ is str and len(msg) == 2:  # the common shape: a role and a text, inlined
                n = len(content) if content.isascii() else len(content.encode("utf-8", "surrogatepass"))
                total += MESSAGE_TOKENS + ((n + 3) >> 2)
            else:
                total += _message_tokens(msg)
    if _OTHER_INPUT.isdisjoint(body):  # the common chat body: its messages are its whole input
        return total
    tools = body.get("tools")
    if tools:
        for tool in tools if isinstance(tools, list) else ():
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict):
                total += _json_tokens(fn)
    fmt = body.get("response_format")
    if fmt.__class__ is dict and fmt.get("type") == "json_schema":
        total += _json_tokens(fmt.get("json_schema") or {})
    for field in ("prompt", "input"):
        value = body.get(field)
        if value is not None:
            total += _texts_tokens(value)
    return total


#: Fields whose text an answer's output tokens are made of (chat, completions, Responses and Messages
#: answers alike): message and part texts, refusals, reasoning and tool-call arguments.
_OUTPUT_TEXT = frozenset(("content", "text", "refusal", "reasoning_content", "arguments", "thinking",
                          "output_text", "partial_json"))


def _output_tokens(value: Any, depth: int = 0) -> int:
    if depth > 32:  # a bound on nesting (an upstream's answer, not ours)
        return 0
    total = 0
    if value.__class__ is dict:
        for key, item in value.items():
            if item.__class__ is str:
                if key in _OUTPUT_TEXT:
                    total += estimate_text_tokens(item)
            elif item.__class__ in (dict, list):
                total += _output_tokens(item, depth + 1)
    elif value.__class__ is list:
        for item in value:
            total += _output_tokens(item, depth + 1)
    return total


def estimate_output_tokens(answer: bytes | dict) -> int:
    """Output tokens of an answer whose upstream reported no usage: the texts it carries (message and part
    contents, refusals, reasoning, tool-call arguments), at least 1. Bytes that are not JSON count by their
    length."""
    if isinstance(answer, (bytes, bytearray, memoryview)):
        try:
            answer = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return max(1, (len(answer) + 3) >> 2)
    return max(1, _output_tokens(answer))
