"""Anthropic ``/v1/messages`` spoken by clients of the gateway, served by any provider.

A client using the Anthropic SDK against the gateway sends a Messages body; :func:`anthropic_request_to_openai`
turns it into the gateway's internal OpenAI chat request, so the same routing, failover and providers serve
it. The OpenAI answer comes back as a ``chat.completion`` (:func:`openai_response_to_anthropic`), a stream of
``chat.completion.chunk`` (:class:`OpenAIToAnthropicStream`, which emits Anthropic's events in the order the
real API sends them), framed as Anthropic's SSE by :class:`AnthropicEventStream`. Errors are
:func:`runestone.wire.errors.anthropic_error_body`. Plain dicts throughout.

Reasoning (see :mod:`runestone.wire.reasoning`): the ``thinking`` parameter is checked and kept as the
canonical body's ``thinking``; ``thinking`` and ``redacted_thinking`` blocks of an assistant turn become its
``thinking_blocks`` (each block exactly as the client sent it, so a signed block reaches an Anthropic
upstream byte for byte) and ``reasoning_content`` (their text). Back the other way, an answer's
``thinking_blocks`` are its first content blocks, and reasoning without them (an OpenAI-compatible
upstream's ``reasoning_content``) is a thinking block with an empty signature.
"""

from __future__ import annotations

import os

import attrs
import orjson

from .anthropic_upstream import TranslationError
from .reasoning import put_thinking, reasoning_of

__all__ = [
    "InboundError",
    "AnthropicEventStream",
    "OpenAIToAnthropicStream",
    "anthropic_request_to_openai",
    "openai_response_to_anthropic",
]


class InboundError(TranslationError):
    """A ``/v1/messages`` body is invalid; ``param`` names the field (``messages[2].content[0].type``)."""


def _block_text(block: dict, param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InboundError(f"{param}.text", "text must be a string")
    return text


def _text(content, param: str) -> str:
    """Plain text of a string or of an array of text blocks (system prompt, tool results)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InboundError(param, "must be a string or an array of content blocks")
    texts = []
    for k, block in enumerate(content):
        if not isinstance(block, dict):
            raise InboundError(f"{param}[{k}]", "content blocks must be objects")
        kind = block.get("type")
        if kind == "text":
            texts.append(_block_text(block, f"{param}[{k}]"))
        elif kind not in ("image", "document"):
            raise InboundError(f"{param}[{k}].type", f"block type {kind!r} is not allowed here")
        # Images inside tool results have no place in an OpenAI tool message; only the text goes through.
    return "\n".join(texts) if len(texts) > 1 else (texts[0] if texts else "")


def _source_url(block: dict, param: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InboundError(f"{param}.source", "source is required")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise InboundError(f"{param}.source", "base64 sources need media_type and data")
        return f"data:{media_type};base64,{data}"
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise InboundError(f"{param}.source.url", "url must be a non-empty string")
        return url
    raise InboundError(f"{param}.source.type", f"source type {kind!r} is not supported")


def _require_int(body: dict, name: str, *, minimum: int) -> int:
    value = body.get(name)
    if isinstance(value, float) and value.is_integer():  # 1.0 is a JSON Schema integer
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InboundError(name, f"{name} must be an integer >= {minimum}")
    return value


def _thinking_param(thinking) -> dict:
    """The ``thinking`` parameter, checked as the Messages API does."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, float) and budget.is_integer():
            budget = int(budget)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
            raise InboundError("thinking.budget_tokens", "thinking.budget_tokens must be an integer >= 1024")
        # budget_tokens < max_tokens is the upstream's to judge: with interleaved thinking it may be more.
        return {**thinking, "budget_tokens": budget}
    if kind in ("disabled", "adaptive"):
        return thinking
    raise InboundError("thinking.type", "thinking.type must be one of enabled, disabled, adaptive")


def anthropic_request_to_openai(body: dict) -> dict:
    """Build an OpenAI chat request from an Anthropic Messages body, validating as the real API does.

    ``tool_result`` blocks become ``tool`` messages placed before the rest of their user turn (OpenAI
    wants them right after the assistant's tool calls); images in tool results are dropped. Thinking
    blocks and ``thinking`` are kept (module docstring); ``top_k`` and cache hints are dropped; server tools (typed tools
    such as ``web_search_...``) are refused since no OpenAI provider can run them. A streaming request
    asks for ``stream_options.include_usage`` so the final ``message_delta`` can report usage.
    """
    if not isinstance(body, dict):
        raise InboundError(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InboundError("model", "model is required")
    max_tokens = _require_int(body, "max_tokens", minimum=1)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InboundError("messages", "messages must be a non-empty array")

    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        text = _text(system, "system")
        if text:
            out.append({"role": "system", "content": text})

    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InboundError(f"messages[{i}]", "each message must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ("user", "assistant"):
            raise InboundError(f"messages[{i}].role", "role must be 'user' or 'assistant'")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InboundError(f"messages[{i}].content", "content must be a string or an array of content blocks")
        param = f"messages[{i}].content"
        if role == "user":
            parts: list[dict] = []
            for k, block in enumerate(content):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": _block_text(block, f"{param}[{k}]")})
                elif kind == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _source_url(block, f"{param}[{k}]")}})
                elif kind == "document":
                    parts.append({"type": "file", "file": {"file_data": _source_url(block, f"{param}[{k}]")}})
                elif kind == "tool_result":
                    tool_use_id = block.get("tool_use_id")
                    if not isinstance(tool_use_id, str) or not tool_use_id:
                        raise InboundError(f"{param}[{k}].tool_use_id", "tool_use_id is required")
                    result = _text(block.get("content"), f"{param}[{k}].content")
                    if block.get("is_error"):
                        result = "Error: " + result
                    out.append({"role": "tool", "tool_call_id": tool_use_id, "content": result})
                else:
                    raise InboundError(f"{param}[{k}].type", f"block type {kind!r} is not supported in user turns")
            if parts:
                if all(p["type"] == "text" for p in parts):
                    out.append({"role": "user", "content": "".join(p["text"] for p in parts) if len(parts) == 1 else parts})
                else:
                    out.append({"role": "user", "content": parts})
        else:
            texts: list[str] = []
            tool_calls: list[dict] = []
            thinking: list[dict] = []
            for k, block in enumerate(content):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    texts.append(_block_text(block, f"{param}[{k}]"))
                elif kind == "tool_use":
                    name = block.get("name")
                    if not isinstance(name, str) or not name:
                        raise InboundError(f"{param}[{k}].name", "tool_use blocks need a name")
                    tool_calls.append(
                        {
                            "id": block.get("id") or f"call_{i}_{k}",
                            "type": "function",
                            "function": {"name": name, "arguments": orjson.dumps(block.get("input") or {}).decode()},
                        }
                    )
                elif kind == "thinking":
                    for name in ("thinking", "signature"):
                        if not isinstance(block.get(name), str):
                            raise InboundError(f"{param}[{k}].{name}", f"{name} must be a string")
                    thinking.append(block)
                elif kind == "redacted_thinking":
                    if not isinstance(block.get("data"), str) or not block["data"]:
                        raise InboundError(f"{param}[{k}].data", "data must be a non-empty string")
                    thinking.append(block)
                else:
                    raise InboundError(f"{param}[{k}].type", f"block type {kind!r} is not supported in assistant turns")
            msg_out = put_thinking({"role": "assistant", "content": "".join(texts) if texts else None}, thinking)
            if tool_calls:
                msg_out["tool_calls"] = tool_calls
            if texts or tool_calls or thinking:
                out.append(msg_out)

    req: dict = {"model": model, "messages": out, "max_tokens": max_tokens}
    thinking_param = body.get("thinking")
    if thinking_param is not None:
        req["thinking"] = _thinking_param(thinking_param)

    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InboundError("tools", "tools must be an array")
        converted = []
        for k, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
                raise InboundError(f"tools[{k}].type", "only custom (client) tools are supported")
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise InboundError(f"tools[{k}].name", "name is required")
            fn: dict = {"name": name}
            description = tool.get("description")
            if description is not None and not isinstance(description, str):
                raise InboundError(f"tools[{k}].description", "description must be a string")
            if description:
                fn["description"] = description
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise InboundError(f"tools[{k}].input_schema", "input_schema is required")
            fn["parameters"] = schema
            converted.append({"type": "function", "function": fn})
        req["tools"] = converted

    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        kind = tool_choice.get("type") if isinstance(tool_choice, dict) else None
        if kind == "auto":
            req["tool_choice"] = "auto"
        elif kind == "any":
            req["tool_choice"] = "required"
        elif kind == "none":
            req["tool_choice"] = "none"
        elif kind == "tool":
            name = tool_choice.get("name")
            if not isinstance(name, str) or not name:
                raise InboundError("tool_choice.name", "name is required when type is 'tool'")
            req["tool_choice"] = {"type": "function", "function": {"name": name}}
        else:
            raise InboundError("tool_choice.type", "type must be one of auto, any, tool, none")
        if tool_choice.get("disable_parallel_tool_use") and tools:
            req["parallel_tool_calls"] = False

    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InboundError("stop_sequences", "stop_sequences must be an array of strings")
        if stop:
            req["stop"] = stop
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise InboundError(name, f"{name} must be a number between 0 and 1")
            req[name] = value
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InboundError("stream", "stream must be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InboundError("metadata", "metadata must be an object")
    if metadata and metadata.get("user_id") is not None:
        user_id = metadata["user_id"]
        if not isinstance(user_id, str) or len(user_id) > 256:
            raise InboundError("metadata.user_id", "metadata.user_id must be a string of at most 256 characters")
        req["user"] = user_id
    return req


_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _message_id(openai_id) -> str:
    if not isinstance(openai_id, str) or not openai_id:
        return "msg_gateway"
    if openai_id.startswith("msg_"):
        return openai_id
    return "msg_" + openai_id.removeprefix("chatcmpl-")


def _anthropic_usage(usage: dict | None) -> dict:
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    # Anthropic's input_tokens excludes cache reads, which it reports on their own.
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _parse_arguments(arguments) -> dict:
    # Anthropic's input is an object; arguments a model produced that are not one cannot be repaired here.
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments) if arguments else {}
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _answer_thinking(message: dict) -> list[dict]:
    """An answer's reasoning as Anthropic blocks: its thinking blocks as they are, else its text unsigned."""
    blocks = message.get("thinking_blocks")
    if isinstance(blocks, list) and blocks:
        return [b for b in blocks if isinstance(b, dict)]
    text = reasoning_of(message)
    return [{"type": "thinking", "thinking": text, "signature": ""}] if text else []


def openai_response_to_anthropic(resp: dict, *, model: str) -> dict:
    """Turn a ``chat.completion`` into an Anthropic message (first choice only; Anthropic has no ``n``)."""
    choices = resp.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict] = _answer_thinking(message)
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if not text and message.get("refusal"):
        text = message["refusal"]
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": _parse_arguments(fn.get("arguments"))})
    return {
        "id": _message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(resp.get("usage")),
    }


_TEXT_BLOCK = 1
_TOOL_BLOCK = 2
_THINKING_BLOCK = 3


@attrs.define
class OpenAIToAnthropicStream:
    """Translate OpenAI ``chat.completion.chunk`` dicts into Anthropic stream events; one per response.

    Events come in the order the real API sends them: ``message_start``; then per content block
    ``content_block_start`` (the first one followed by a ``ping``), its deltas, ``content_block_stop``;
    then ``message_delta`` with ``stop_reason`` and cumulative usage; then ``message_stop``.
    ``message_delta`` waits for the usage chunk OpenAI sends after the finish chunk (requested by
    :func:`anthropic_request_to_openai`); :meth:`finish`, called when the upstream stream ends, emits
    whatever was not sent, so a stream without a usage chunk still ends properly.

    Anthropic blocks cannot be reopened: tool-call argument fragments arriving for a call after another
    block has started (interleaved parallel calls, which OpenAI does not send) are dropped.

    Reasoning opens thinking blocks: ``thinking_blocks`` fragments (one block per fragment index:
    ``thinking_delta``, ``signature_delta``; a redacted block whole at its start), or else plain
    ``reasoning_content`` text as one unsigned thinking block.
    """

    model: str
    message_id: str
    input_tokens: int = 0
    _started: bool = False
    _pinged: bool = False
    _finished: bool = False
    _stop_reason: str | None = None
    _output_tokens: int = 0
    _cache_read: int = 0
    _usage_seen: bool = False
    _block: int = -1
    _block_kind: int = 0
    _block_open: bool = False
    _tool_blocks: dict[int, int] = attrs.Factory(dict)
    _thinking_fragment: int | None = None

    def _start(self, events: list) -> None:
        self._started = True
        events.append(
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": self.message_id,
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
                    },
                },
            )
        )

    def _close_block(self, events: list) -> None:
        if self._block_open:
            self._block_open = False
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self._block}))

    def _open_block(self, events: list, kind: int, block: dict) -> None:
        self._close_block(events)
        self._block += 1
        self._block_kind = kind
        self._block_open = True
        events.append(("content_block_start", {"type": "content_block_start", "index": self._block, "content_block": block}))
        if not self._pinged:
            self._pinged = True
            events.append(("ping", {"type": "ping"}))

    def _end(self, events: list) -> None:
        self._close_block(events)
        if not self._pinged:
            self._pinged = True
            events.append(("ping", {"type": "ping"}))
        self._finished = True
        usage = {"output_tokens": self._output_tokens}
        if self._usage_seen:
            usage["input_tokens"] = self.input_tokens
            usage["cache_read_input_tokens"] = self._cache_read
        events.append(
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None}, "usage": usage},
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))

    def feed(self, chunk: dict) -> list[tuple[str, dict]]:
        if self._finished:
            return []
        events: list[tuple[str, dict]] = []
        if not self._started:
            self._start(events)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                fragments = delta.get("thinking_blocks")
                if fragments:
                    for fragment in fragments:
                        if isinstance(fragment, dict):
                            self._thinking_delta(events, fragment)
                else:
                    reasoning = reasoning_of(delta)
                    if reasoning:
                        self._thinking_delta(events, {"thinking": reasoning})
                text = delta.get("content") or delta.get("refusal")
                if text:
                    if not (self._block_open and self._block_kind == _TEXT_BLOCK):
                        self._open_block(events, _TEXT_BLOCK, {"type": "text", "text": ""})
                    events.append(
                        (
                            "content_block_delta",
                            {"type": "content_block_delta", "index": self._block, "delta": {"type": "text_delta", "text": text}},
                        )
                    )
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    for call in tool_calls:
                        self._tool_delta(events, call)
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                self._stop_reason = _STOP_REASONS.get(finish_reason, "end_turn")
                self._close_block(events)
        usage = chunk.get("usage")
        if usage:
            self._usage_seen = True
            au = _anthropic_usage(usage)
            self.input_tokens = au["input_tokens"]
            self._output_tokens = au["output_tokens"]
            self._cache_read = au["cache_read_input_tokens"]
        if self._stop_reason is not None and self._usage_seen:
            self._end(events)
        return events

    def _thinking_delta(self, events: list, fragment: dict) -> None:
        # A fragment without an index (plain reasoning text) continues the open thinking block.
        index = fragment.get("index")
        redacted = fragment.get("type") == "redacted_thinking"
        if not (self._block_open and self._block_kind == _THINKING_BLOCK
                and (index is None or self._thinking_fragment == index)):
            self._thinking_fragment = index
            start = {"type": "redacted_thinking", "data": fragment.get("data") or ""} if redacted else \
                {"type": "thinking", "thinking": "", "signature": ""}
            self._open_block(events, _THINKING_BLOCK, start)
        if redacted:
            return
        for name, kind in (("thinking", "thinking_delta"), ("signature", "signature_delta")):
            piece = fragment.get(name)
            if piece:
                events.append(("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                       "delta": {"type": kind, name: piece}}))

    def _tool_delta(self, events: list, call: dict) -> None:
        index = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._tool_blocks.get(index)
        if block is None:
            block = self._tool_blocks[index] = self._block + 1
            self._open_block(
                events,
                _TOOL_BLOCK,
                {"type": "tool_use", "id": call.get("id") or f"toolu_{self.message_id}_{index}", "name": fn.get("name") or "", "input": {}},
            )
        arguments = fn.get("arguments")
        if arguments and block == self._block and self._block_open:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": arguments}},
                )
            )

    def finish(self) -> list[tuple[str, dict]]:
        """Close the message: open block, ``message_delta``, ``message_stop``; nothing if already closed."""
        if self._finished:
            return []
        events: list[tuple[str, dict]] = []
        if not self._started:
            self._start(events)
        self._end(events)
        return events


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# -- the stream encoder ---------------------------------------------------------------------------------

def sse_event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicEventStream:
    """Encodes a stream's chat chunk payloads as Anthropic's SSE events; one per response.

    The translator is made from the first chunk (its id names the message). The end of the upstream
    stream closes the message (``message_delta``, ``message_stop``) if the chunks did not; a failure ends
    the stream with Anthropic's ``error`` event and nothing after it, as the real API does.
    """

    __slots__ = ("model", "_translator")

    def __init__(self, model: str) -> None:
        self.model = model
        self._translator: OpenAIToAnthropicStream | None = None

    def _tr(self, chat_id) -> OpenAIToAnthropicStream:
        tr = self._translator
        if tr is None:
            if isinstance(chat_id, str) and chat_id:
                message_id = chat_id if chat_id.startswith("msg_") else "msg_" + chat_id.removeprefix("chatcmpl-")
            else:
                message_id = "msg_" + os.urandom(12).hex()
            tr = self._translator = OpenAIToAnthropicStream(model=self.model, message_id=message_id)
        return tr

    def feed(self, payloads: list, last: bool) -> bytes:
        out: list[bytes] = []
        for data in payloads:
            obj = orjson.loads(data)
            out.extend(sse_event(n, d) for n, d in self._tr(obj.get("id")).feed(obj))
        if last:
            out.extend(sse_event(n, d) for n, d in self._tr(None).finish())
        return b"".join(out)

    @staticmethod
    def error(error_type: str, message: str) -> bytes:
        return sse_event("error", {"type": "error", "error": {"type": error_type, "message": message}})
