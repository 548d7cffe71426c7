"""Deterministic model output for the in-process ``fake`` provider and the fake-provider server.

Both fakes must answer like a model without being one: the same request always gets the same reply, tool
call, token counts and embedding, so tests can assert exact content and the two fakes agree with each other.
Messages may be in OpenAI or Anthropic shape; both keep text in ``content`` as a string or as parts with
``{"type": "text", "text": ...}``, which is all this module reads.
"""

from __future__ import annotations

import hashlib
import math
import random
import zlib

__all__ = ["count_tokens", "fake_embedding", "fake_reply_chunks", "fake_tool_call"]

_FILLER = (
    "the quick brown fox jumps over a lazy dog while runes glow softly on ancient stone "
    "and patient ravens count every word twice before the river carries them home"
).split()

_MIN_WORDS = 12
_ECHO_WORDS = 8


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user_text(messages: list) -> str:
    for msg in reversed(messages or ()):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _content_text(msg.get("content"))
    return ""


def fake_reply_chunks(messages: list, n_chunks: int = 8, text: str | None = None) -> list[str]:
    """The reply to ``messages`` in ``n_chunks`` pieces whose concatenation is the whole reply.

    The reply is ``text`` when given, else ``"Echo: "`` and the first words of the last user message,
    followed by filler words picked by a checksum of that message, at least ``max(n_chunks, 12)`` words.
    Pieces split at word boundaries (a piece carries its leading space) and are never empty unless the
    reply has fewer characters than ``n_chunks``, in which case fewer pieces are returned.
    """
    n_chunks = max(n_chunks, 1)
    if text is None:
        prompt = _last_user_text(messages)
        echoed = prompt.split()[:_ECHO_WORDS]
        words = ["Echo:", *echoed] if echoed else ["Echo:", "(nothing)"]
        start = zlib.crc32(prompt.encode())
        i = 0
        while len(words) < max(n_chunks, _MIN_WORDS):
            words.append(_FILLER[(start + i) % len(_FILLER)])
            i += 1
        words[-1] += "."
    else:
        words = text.split(" ")
    tokens = [words[0]] + [" " + w for w in words[1:]]
    n = len(tokens)
    if n >= n_chunks:
        pieces = ["".join(tokens[k * n // n_chunks : (k + 1) * n // n_chunks]) for k in range(n_chunks)]
        if all(pieces):
            return pieces
    # Too few words (or runs of spaces) to split on: cut the text into equal character runs instead.
    text = "".join(tokens)
    size = len(text)
    if size == 0:
        return [""]
    n = min(n_chunks, size)
    return [text[k * size // n : (k + 1) * size // n] for k in range(n)]


def count_tokens(text_or_messages) -> int:
    """A cheap, deterministic token estimate: ~4 characters per token, plus 3 per message for framing."""
    if isinstance(text_or_messages, str):
        return (len(text_or_messages) + 3) // 4
    if isinstance(text_or_messages, list):
        total = 0
        for msg in text_or_messages:
            if isinstance(msg, dict):
                total += 3 + (len(_content_text(msg.get("content"))) + 3) // 4
            elif isinstance(msg, str):
                total += (len(msg) + 3) // 4
        return total
    return 0


def _example(schema, depth: int = 0):
    """A value satisfying the simple parts of a JSON schema: enum, const, type, required properties."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: _example(props.get(name), depth + 1) for name in schema.get("required") or ()}
    if kind == "string":
        return "fake"
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "array":
        return [_example(schema["items"], depth + 1)] * int(schema.get("minItems", 0)) if "items" in schema else []
    return None


def _tool_name_and_schema(tool) -> tuple[str | None, dict | None]:
    if not isinstance(tool, dict):
        return None, None
    fn = tool.get("function")
    if isinstance(fn, dict):  # OpenAI {"type": "function", "function": {...}}
        return fn.get("name"), fn.get("parameters")
    return tool.get("name"), tool.get("input_schema")  # Anthropic {"name", "input_schema"}


def fake_tool_call(tools: list, tool_choice=None) -> dict | None:
    """The tool call a fake model makes, or ``None`` when it should answer in text.

    ``tools`` may be OpenAI or Anthropic tool definitions; ``tool_choice`` in either API's shape. With
    tools and a choice other than none, the call is to the named tool if one is forced, else the first
    tool, with arguments holding the schema's required properties. Returns
    ``{"id": "call_<digest>", "name": str, "arguments": dict}``, ``id`` derived from name and arguments.
    """
    if not tools:
        return None
    forced = None
    if tool_choice == "none" or (isinstance(tool_choice, dict) and tool_choice.get("type") == "none"):
        return None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
    chosen = None
    for tool in tools:
        name, schema = _tool_name_and_schema(tool)
        if name and (forced is None or name == forced):
            chosen = (name, schema)
            break
    if chosen is None:
        return None
    name, schema = chosen
    arguments = _example(schema) if isinstance(schema, dict) else {}
    if not isinstance(arguments, dict):
        arguments = {}
    digest = hashlib.blake2b(f"{name}:{sorted(arguments.items())!r}".encode(), digest_size=8).hexdigest()
    return {"id": f"call_{digest}", "name": name, "arguments": arguments}


def fake_embedding(text: str, dims: int = 256) -> list[float]:
    """A unit vector of ``dims`` floats seeded by a hash of ``text``: equal texts, equal vectors."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")
    rng = random.Random(seed)
    gauss = rng.gauss
    vec = [gauss(0.0, 1.0) for _ in range(max(dims, 1))]
    norm = math.sqrt(math.fsum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
