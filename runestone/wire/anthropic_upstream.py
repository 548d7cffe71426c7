"""Translation between the gateway's OpenAI chat format and Anthropic's Messages API, for Anthropic upstreams.

The gateway speaks OpenAI's ``/v1/chat/completions`` to its clients; an Anthropic provider sends the request
upstream as a ``/v1/messages`` body (:func:`openai_to_anthropic_request`), and turns what comes back into
OpenAI shapes: a whole message (:func:`anthropic_to_openai_response`), a stream of events, one
``chat.completion.chunk`` at a time (:class:`AnthropicToOpenAIStream`), or an error
(:func:`anthropic_error_to_openai`). Everything works on plain dicts as decoded by orjson; the streaming
translator does a dict lookup and builds one small dict per upstream event, nothing more.

Reasoning travels as :mod:`runestone.wire.reasoning` describes the canonical body: the request's
``thinking`` (or ``reasoning_effort``, as a budget) becomes Anthropic's ``thinking``; an assistant turn's
``thinking_blocks`` go first in its content exactly as they came (Anthropic verifies their signatures),
and reasoning without them is a 400 (it cannot be signed); thinking and redacted_thinking blocks in an
answer come back as ``reasoning_content`` and ``thinking_blocks`` (streamed as fragments with an index).
"""

from __future__ import annotations

import attrs
import orjson

from .errors import InvalidRequest, loads_or_none
from .reasoning import check_thinking_blocks, put_thinking, reasoning_of, signed_by, thinking_for

__all__ = [
    "AnthropicToOpenAIStream",
    "ChunkTranslator",
    "TranslationError",
    "chat_messages",
    "data_url_parts",
    "text_parts",
    "tool_arguments",
    "unsupported_part",
    "user_parts",
    "UpstreamStreamError",
    "anthropic_error_to_openai",
    "anthropic_to_openai_response",
    "openai_to_anthropic_request",
]


class TranslationError(InvalidRequest):
    """A request cannot be expressed in the other API's format; the client should get a 400 naming ``param``."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(param, message)


@attrs.frozen
class _ErrorMapping:
    anthropic_status: int
    openai_status: int
    openai_type: str
    openai_code: str | None


# Anthropic's documented error types. Upstream failures (500, 504, 529) become gateway-side statuses: the
# client did nothing wrong, the upstream did, so they read as 502/504/503 with OpenAI's "server_error" type.
_ANTHROPIC_ERRORS = {
    "invalid_request_error": _ErrorMapping(400, 400, "invalid_request_error", None),
    "authentication_error": _ErrorMapping(401, 401, "authentication_error", "invalid_api_key"),
    "billing_error": _ErrorMapping(402, 402, "billing_error", "insufficient_quota"),
    "permission_error": _ErrorMapping(403, 403, "permission_error", None),
    "not_found_error": _ErrorMapping(404, 404, "invalid_request_error", "not_found"),
    "request_too_large": _ErrorMapping(413, 413, "invalid_request_error", "request_too_large"),
    "rate_limit_error": _ErrorMapping(429, 429, "rate_limit_error", "rate_limit_exceeded"),
    "api_error": _ErrorMapping(500, 502, "server_error", "upstream_error"),
    "timeout_error": _ErrorMapping(504, 504, "server_error", "upstream_timeout"),
    "overloaded_error": _ErrorMapping(529, 503, "server_error", "upstream_overloaded"),
}
_STATUS_TO_TYPE = {m.anthropic_status: t for t, m in _ANTHROPIC_ERRORS.items()}


def _mapping_for(status: int, type_: str | None) -> _ErrorMapping:
    m = _ANTHROPIC_ERRORS.get(type_) if type_ else None
    if m is not None:
        return m
    m = _ANTHROPIC_ERRORS.get(_STATUS_TO_TYPE.get(status, ""))
    if m is not None:
        return m
    if 400 <= status < 500:
        return _ErrorMapping(status, status, "invalid_request_error", None)
    return _ErrorMapping(status, 502, "server_error", "upstream_error")


class UpstreamStreamError(Exception):
    """Anthropic sent an ``error`` event in the middle of a stream (e.g. ``overloaded_error``).

    ``status`` is the HTTP status Anthropic uses for that error type (529 for ``overloaded_error``), ``type``
    Anthropic's error type, ``message`` its message. :meth:`to_openai` gives what a client should see.
    """

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.status = status
        self.type = type
        self.message = message

    def to_openai(self) -> tuple[int, dict]:
        m = _mapping_for(self.status, self.type)
        return m.openai_status, {"message": self.message, "type": m.openai_type, "param": None, "code": m.openai_code}


def anthropic_error_to_openai(status: int, body: bytes) -> tuple[int, dict]:
    """Map an Anthropic error response to ``(status to send, OpenAI error object)``.

    ``body`` is the raw response body; a body that is not Anthropic's ``{"type": "error", "error": {...}}``
    (an HTML page from a proxy, say) is classified by status alone and quoted, shortened, in the message.
    """
    type_ = message = None
    doc = loads_or_none(body)
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            type_ = err.get("type")
            message = err.get("message")
    m = _mapping_for(status, type_ if isinstance(type_, str) else None)
    if not isinstance(message, str) or not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"upstream answered HTTP {status}" + (f": {text}" if text else "")
    return m.openai_status, {"message": message, "type": m.openai_type, "param": None, "code": m.openai_code}


# ---------------------------------------------------------------------------------------------------------
# request: OpenAI -> Anthropic


def _text_of(content, param: str) -> str:
    """Plain text of an OpenAI ``content`` (string or array of text parts), for system and tool messages."""
    return "\n".join(text_parts(content, param))


def _image_block(url, param: str) -> dict:
    if not isinstance(url, str) or not url:
        raise TranslationError(param, "image_url.url must be a non-empty string")
    if url.startswith("data:"):
        media_type, data = data_url_parts(url, param)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content, param: str):
    """An OpenAI user content: a string stays a string, parts become Anthropic content blocks."""
    if isinstance(content, str):
        return content
    blocks = []
    for kind, value, p, part in user_parts(content, param):
        if kind == "text":
            block = {"type": "text", "text": value}
        elif kind == "image_url":
            block = _image_block(value, f"{p}.image_url")
        elif kind == "file":
            data = value.get("file_data")
            if not isinstance(data, str) or not data.startswith("data:"):
                raise TranslationError(f"{p}.file", "only inline file_data (a base64 data URL) can be sent")
            media, b64 = data_url_parts(data, f"{p}.file.file_data")
            block = {"type": "document", "source": {"type": "base64", "media_type": media.split(";")[0], "data": b64}}
        else:
            raise unsupported_part(kind, p)
        cache_control = part.get("cache_control")
        if cache_control is not None:
            block["cache_control"] = cache_control
        blocks.append(block)
    return blocks


def _push(out: list, role: str, content) -> None:
    """Append a turn, merging it into the previous one of the same role (Anthropic alternates roles)."""
    if out and out[-1]["role"] == role:
        prev = out[-1]["content"]
        if isinstance(prev, str):
            prev = out[-1]["content"] = [{"type": "text", "text": prev}] if prev else []
        if isinstance(content, str):
            if content:
                prev.append({"type": "text", "text": content})
        else:
            prev.extend(content)
    else:
        out.append({"role": role, "content": content})


def chat_messages(body: dict):
    """``(index, message)`` for each message of an OpenAI chat body, as the translations read them; a 400 when
    ``messages`` is not an array or (when reached) a message is not an object."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages", "messages must be an array")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TranslationError(f"messages[{i}]", "each message must be an object")
        yield i, msg


def text_parts(content, param: str) -> list[str]:
    """The texts of an OpenAI ``content`` that may hold only text (a system or tool message): a string is one
    text, an array its ``text`` (or ``refusal``) parts, None none; anything else a 400 naming it."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise TranslationError(param, "content must be a string or an array of content parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get(kind) if kind in ("text", "refusal") else None
        if not isinstance(text, str):
            raise TranslationError(f"{param}[{k}]", "only text parts are allowed here")
        texts.append(text)
    return texts


def user_parts(content, param: str):
    """``(kind, value, param of the part, part)`` for each part of an OpenAI user content array, checked as
    every translation checks it: a ``text`` with its string (empty ones are skipped: no API takes them), an
    ``image_url`` with its URL, a ``file`` with its object ({} unless one), any other kind with the part for
    the caller to take or refuse (:func:`unsupported_part`); a 400 when ``content`` is not an array."""
    if not isinstance(content, list):
        raise TranslationError(param, "content must be a string or an array of content parts")
    for k, part in enumerate(content):
        p = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TranslationError(f"{p}.text", "text must be a string")
            if text:
                yield kind, text, p, part
        elif kind == "image_url":
            image = part.get("image_url")
            yield kind, image.get("url") if isinstance(image, dict) else image, p, part
        elif kind == "file":
            file = part.get("file")
            yield kind, file if isinstance(file, dict) else {}, p, part
        else:
            yield kind, part, p, part


def unsupported_part(kind, param: str, upstream: str = "this provider") -> TranslationError:
    """The 400 for a user content part of a kind the upstream does not take."""
    return TranslationError(f"{param}.type", f"content part type {kind!r} is not supported by {upstream}")


def data_url_parts(url: str, param: str) -> tuple[str, str]:
    """(media type with its parameters, base64 data) of a ``data:`` URL, which every translation takes images
    and files as; a 400 naming ``param`` unless it is ``data:<media type>;base64,<data>``."""
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise TranslationError(param, "data URLs must be base64 encoded (data:<media type>;base64,<data>)")
    return header[5:-7], data


def tool_arguments(arguments, param: str) -> dict:
    """An OpenAI tool call's ``arguments`` (a JSON text, or already an object) as the object every other
    format sends (Anthropic's ``input``, Gemini's ``args``, Bedrock's ``input``); 400 naming ``param``."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        raise TranslationError(param, "tool call arguments must be a JSON object") from None
    if not isinstance(value, dict):
        raise TranslationError(param, "tool call arguments must be a JSON object")
    return value


def _thinking_blocks(msg: dict, i: int) -> list[dict]:
    """An assistant turn's signed thinking blocks, unchanged; unsigned reasoning has no Anthropic form."""
    blocks = msg.get("thinking_blocks")
    if blocks is not None:
        param = f"messages[{i}].thinking_blocks"
        for j, block in enumerate(check_thinking_blocks(blocks, param)):
            if block["type"] == "thinking" and not block.get("signature"):
                raise TranslationError(f"{param}[{j}].signature", "this thinking block has no signature (it came "
                                       "from another provider), and Anthropic accepts only the signed blocks it "
                                       "wrote: leave it out of the conversation")
            if block["type"] == "thinking" and signed_by(block) != "anthropic":
                raise TranslationError(f"{param}[{j}].signature", f"this thinking block was signed by "
                                       f"{signed_by(block)}, and Anthropic accepts only the signed blocks it "
                                       "wrote: leave it out of the conversation")
        return list(blocks)
    if reasoning_of(msg) is not None:
        raise TranslationError(f"messages[{i}].reasoning_content", "Anthropic accepts reasoning only as the signed "
                               "thinking blocks it wrote: send the assistant message back with the thinking_blocks "
                               "the gateway returned beside reasoning_content, or without reasoning_content")
    return []


def openai_to_anthropic_request(body: dict, *, model: str, default_max_tokens: int = 4096, stream: bool) -> dict:
    """Build an Anthropic ``/v1/messages`` body from an OpenAI chat completion request.

    - ``system``/``developer`` messages become the top-level ``system`` (joined by blank lines; kept as
      text blocks when a part carries ``cache_control``), wherever they appear in the conversation.
    - ``tool`` messages become ``tool_result`` blocks of a user turn; consecutive turns of one role are
      merged, as Anthropic needs alternating roles and ``tool_result`` blocks first in their turn.
    - ``tool_choice``: ``auto``→auto, ``required``→any, a named function→tool, ``none``→tools omitted
      (or ``{"type": "none"}`` with tools kept if the history has tool blocks, which Anthropic requires
      tool definitions for). ``parallel_tool_calls: false``→``disable_parallel_tool_use``.
    - ``temperature`` is clamped to Anthropic's 0..1 (OpenAI allows up to 2).
    - ``response_format`` ``json_object``/``json_schema`` is best effort: an instruction appended to the
      system prompt asking for only a JSON object (conforming to the given schema). Nothing enforces it.
    - Parameters with no Anthropic equivalent (``n``, ``seed``, ``logprobs``, penalties, ``logit_bias``,
      ``stream_options``, legacy ``functions``...) are dropped.

    Raises :class:`TranslationError` naming the offending field when a message cannot be expressed.
    """
    system_parts: list[dict] = []
    out: list[dict] = []
    has_tool_blocks = False
    for i, msg in chat_messages(body):
        role = msg.get("role")
        content = msg.get("content")
        if role == "user":
            _push(out, "user", _user_blocks(content, f"messages[{i}].content"))
        elif role == "assistant":
            blocks: list[dict] = _thinking_blocks(msg, i)
            if content:
                text = _text_of(content, f"messages[{i}].content")
                if text:
                    blocks.append({"type": "text", "text": text})
            tool_calls = msg.get("tool_calls")
            if tool_calls:
                has_tool_blocks = True
                for j, call in enumerate(tool_calls):
                    fn = call.get("function") or {}
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call.get("id") or f"toolu_{i}_{j}",
                            "name": fn.get("name") or "",
                            "input": tool_arguments(fn.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments"),
                        }
                    )
            if blocks:
                _push(out, "assistant", blocks)
        elif role == "tool":
            has_tool_blocks = True
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise TranslationError(f"messages[{i}].tool_call_id", "tool messages need a tool_call_id")
            result = {"type": "tool_result", "tool_use_id": call_id, "content": _text_of(content, f"messages[{i}].content")}
            _push(out, "user", [result])
        elif role in ("system", "developer"):
            if isinstance(content, list):
                for k, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise TranslationError(f"messages[{i}].content[{k}]", "system content parts must be text")
                    if part.get("text"):
                        block = {"type": "text", "text": part["text"]}
                        if part.get("cache_control") is not None:
                            block["cache_control"] = part["cache_control"]
                        system_parts.append(block)
            elif isinstance(content, str):
                if content:
                    system_parts.append({"type": "text", "text": content})
            else:
                raise TranslationError(f"messages[{i}].content", "content must be a string or an array of text parts")
        else:
            raise TranslationError(f"messages[{i}].role", f"role {role!r} is not supported")

    req: dict = {"model": model}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    req["max_tokens"] = max_tokens
    req["messages"] = out
    thinking = thinking_for(body, max_tokens)
    if thinking is not None:
        req["thinking"] = thinking

    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            system_parts.append({"type": "text", "text": "Respond with a single valid JSON object and nothing else."})
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            system_parts.append(
                {
                    "type": "text",
                    "text": "Respond with a single valid JSON object and nothing else. It must conform to this "
                    "JSON Schema: " + orjson.dumps(schema).decode(),
                }
            )
    if system_parts:
        if any("cache_control" in p for p in system_parts):
            req["system"] = system_parts
        else:
            req["system"] = "\n\n".join(p["text"] for p in system_parts)

    tools = body.get("tools")
    tool_choice = body.get("tool_choice")
    if tools:
        choice: dict | None
        if tool_choice is None or tool_choice == "auto":
            choice = {"type": "auto"} if tool_choice is not None or body.get("parallel_tool_calls") is False else None
        elif tool_choice == "required":
            choice = {"type": "any"}
        elif tool_choice == "none":
            choice = {"type": "none"} if has_tool_blocks else None
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            choice = {"type": "tool", "name": tool_choice["function"].get("name")}
        else:
            raise TranslationError("tool_choice", "tool_choice must be auto, none, required or a named function")
        if tool_choice != "none" or has_tool_blocks:
            converted = []
            for k, tool in enumerate(tools):
                fn = tool.get("function") if isinstance(tool, dict) else None
                if not isinstance(fn, dict) or not fn.get("name"):
                    raise TranslationError(f"tools[{k}]", "only function tools with a name are supported")
                t = {"name": fn["name"]}
                if fn.get("description"):
                    t["description"] = fn["description"]
                t["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
                converted.append(t)
            req["tools"] = converted
            if choice is not None:
                if body.get("parallel_tool_calls") is False and choice["type"] != "none":
                    choice["disable_parallel_tool_use"] = True
                req["tool_choice"] = choice

    stop = body.get("stop")
    if stop:
        req["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if temperature is not None:
        req["temperature"] = min(float(temperature), 1.0)
    top_p = body.get("top_p")
    if top_p is not None:
        req["top_p"] = top_p
    user = body.get("user")
    if user:
        req["metadata"] = {"user_id": user}
    if stream:
        req["stream"] = True
    return req


# ---------------------------------------------------------------------------------------------------------
# response: Anthropic -> OpenAI

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}


def _openai_usage(input_tokens: int, output_tokens: int, cache_creation: int, cache_read: int) -> dict:
    # OpenAI's prompt_tokens counts the whole prompt; Anthropic splits cache writes and reads out of it.
    prompt = input_tokens + cache_creation + cache_read
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output_tokens,
        "total_tokens": prompt + output_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def anthropic_to_openai_response(msg: dict, *, model: str, request_id: str, created: int) -> dict:
    """Turn an Anthropic message into a ``chat.completion``.

    Text blocks are concatenated into ``content`` (``None`` when the answer is only tool calls);
    ``tool_use`` blocks become ``tool_calls`` with JSON-string arguments; thinking and redacted_thinking
    blocks become ``reasoning_content`` (their text) and ``thinking_blocks`` (unchanged); server-tool blocks
    have no OpenAI equivalent and are left out.
    """
    texts: list[str] = []
    tool_calls: list[dict] = []
    thinking: list[dict] = []
    for block in msg.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind in ("thinking", "redacted_thinking"):
            thinking.append(block)
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()},
                }
            )
    message = put_thinking({"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None,
                            "refusal": None}, thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = msg.get("usage") or {}
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_REASONS.get(msg.get("stop_reason"), "stop"),
            }
        ],
        "usage": _openai_usage(
            usage.get("input_tokens") or 0,
            usage.get("output_tokens") or 0,
            usage.get("cache_creation_input_tokens") or 0,
            usage.get("cache_read_input_tokens") or 0,
        ),
    }


@attrs.define
class ChunkTranslator:
    """What every upstream stream translator into OpenAI chunks shares: the chunks' id, created and model;
    with ``include_usage`` a ``"usage": None`` on each chunk and a last usage-only chunk."""

    model: str
    request_id: str
    created: int
    include_usage: bool
    usage: dict | None = None

    def _chunk_of(self, choices: list) -> dict:
        chunk = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage_chunk(self, usage: dict) -> dict:
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}


@attrs.define
class AnthropicToOpenAIStream(ChunkTranslator):
    """Translate an Anthropic event stream into OpenAI ``chat.completion.chunk`` dicts; one per response.

    Feed every event in order with its decoded data. The first chunk (at ``message_start``) carries
    ``delta.role``; the chunk with ``finish_reason`` is emitted at ``message_delta``; with
    ``include_usage`` every chunk has ``"usage": None`` and a last chunk with ``"choices": []`` and the
    usage is emitted at ``message_stop``, as OpenAI does with ``stream_options.include_usage``.
    ``done`` turns true at ``message_stop``: a stream that ends before that was cut short upstream.
    Unknown event types are ignored (Anthropic documents that new ones may appear); an ``error`` event
    raises :class:`UpstreamStreamError`.
    """

    finish_reason: str | None = None
    done: bool = False
    _input_tokens: int = 0
    _output_tokens: int = 0
    _cache_creation: int = 0
    _cache_read: int = 0
    _tool_index: dict[int, int] = attrs.Factory(dict)
    _thinking_index: dict[int, int] = attrs.Factory(dict)

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk_of([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def _take_usage(self, usage: dict) -> None:
        # Counts in message_delta are cumulative; a missing or null field keeps what message_start said.
        v = usage.get("input_tokens")
        if v is not None:
            self._input_tokens = v
        v = usage.get("output_tokens")
        if v is not None:
            self._output_tokens = v
        v = usage.get("cache_creation_input_tokens")
        if v is not None:
            self._cache_creation = v
        v = usage.get("cache_read_input_tokens")
        if v is not None:
            self._cache_read = v
        self.usage = _openai_usage(self._input_tokens, self._output_tokens, self._cache_creation, self._cache_read)

    def feed(self, event: str, data: dict) -> list[dict]:
        if event == "content_block_delta":
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                text = delta.get("text")
                return [self._chunk({"content": text})] if text else []
            if kind == "input_json_delta":
                fragment = delta.get("partial_json")
                index = self._tool_index.get(data.get("index"))
                if not fragment or index is None:
                    return []
                return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})]
            if kind == "thinking_delta":
                text = delta.get("thinking")
                index = self._thinking_index.get(data.get("index"))
                if not text or index is None:
                    return []
                return [self._chunk({"reasoning_content": text,
                                     "thinking_blocks": [{"index": index, "type": "thinking", "thinking": text}]})]
            if kind == "signature_delta":
                index = self._thinking_index.get(data.get("index"))
                if not delta.get("signature") or index is None:
                    return []
                return [self._chunk({"thinking_blocks": [{"index": index, "type": "thinking",
                                                          "signature": delta["signature"]}]})]
            return []  # citations_delta: no OpenAI equivalent
        if event == "content_block_start":
            block = data.get("content_block") or {}
            kind = block.get("type")
            if kind == "tool_use":
                index = self._tool_index[data.get("index")] = len(self._tool_index)
                call = {"index": index, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            if kind == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if kind in ("thinking", "redacted_thinking"):
                index = self._thinking_index[data.get("index")] = len(self._thinking_index)
                fragment = {k: v for k, v in block.items() if v != ""}
                if kind == "thinking" and len(fragment) == 1:
                    return []  # an empty start: its text and signature follow as deltas
                fragment["index"] = index
                delta = {"thinking_blocks": [fragment]}
                if block.get("thinking"):
                    delta["reasoning_content"] = block["thinking"]
                return [self._chunk(delta)]
            return []
        if event in ("ping", "content_block_stop"):
            return []
        if event == "message_start":
            message = data.get("message") or {}
            self._take_usage(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if event == "message_delta":
            self._take_usage(data.get("usage") or {})
            stop_reason = (data.get("delta") or {}).get("stop_reason")
            self.finish_reason = _FINISH_REASONS.get(stop_reason, "stop")
            return [self._chunk({}, self.finish_reason)]
        if event == "message_stop":
            self.done = True
            if self.include_usage:
                return [self._usage_chunk(self.usage or _openai_usage(0, 0, 0, 0))]
            return []
        if event == "error":
            err = data.get("error") or {}
            type_ = err.get("type") or "api_error"
            status = _mapping_for(0, type_).anthropic_status
            raise UpstreamStreamError(status or 500, type_, err.get("message") or "upstream stream failed")
        return []
