"""OpenAI's Responses API spoken by clients of the gateway, served by any provider through chat completions.

:func:`validate_responses` checks a ``POST /v1/responses`` body by the API's rules and normalises its
``input`` into a list of items with ids (a string becomes one user message); :func:`responses_to_chat`
turns those items, with the items of a stored conversation before them (``previous_response_id``), into
the canonical chat body every provider serves. The answer comes back as a ``chat.completion``
(:func:`chat_to_response`) or a stream of ``chat.completion.chunk`` payloads (:class:`ResponsesEventStream`,
which emits the documented events in the real API's order, each with its ``sequence_number``).

What chat completions cannot carry is refused with a 400 naming the field, never dropped: built-in tools
(``web_search``, ``file_search``, ...), ``background``, ``conversation``, prompt templates, item references,
file ids, audio. A native provider (:data:`NATIVE_ONLY` lists what only it can honour) gets the body as
the client wrote it. Plain dicts throughout; the module imports nothing of Runestone's but ``wire``.

Reasoning (see :mod:`runestone.wire.reasoning`): an answer's ``reasoning_content`` is a ``reasoning`` item
(its text a ``reasoning_text`` part); its ``thinking_blocks`` (a signed Anthropic or Bedrock reasoning) ride
in the item's ``encrypted_content``, encoded by the gateway (:func:`encode_thinking`: a prefix, then the
blocks as base64 JSON). A ``reasoning`` item passed back (in ``input`` or a stored conversation) goes on the
assistant turn after it as ``reasoning_content`` (its text, else its summary) and, when the gateway wrote
its ``encrypted_content``, the ``thinking_blocks`` unchanged. A reasoning item with neither text nor the
gateway's encrypted content (OpenAI's own encrypted reasoning) has no chat form: it is kept in the store
and reaches only a native provider.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from typing import Any

import orjson

from .errors import InvalidRequest
from .openai import check_typed, integral, kind_of
from .reasoning import ThinkingBlocks, check_thinking_blocks, reasoning_of

__all__ = [
    "NATIVE_ONLY",
    "ResponsesEventStream",
    "ResponsesRequest",
    "chat_to_response",
    "decode_thinking",
    "encode_thinking",
    "failed_response",
    "new_id",
    "responses_to_chat",
    "sse_event",
    "validate_responses",
]


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _bad(param: str | None, message: str, code: str | None = "invalid_value") -> InvalidRequest:
    return InvalidRequest(param, message, code)


#: Fields the gateway reads or passes on, and what each must be (None: checked by its own code below).
_FIELDS: dict[str, str | None] = {
    "model": None, "input": None, "instructions": None, "tools": None, "tool_choice": None,
    "parallel_tool_calls": "bool", "text": None, "max_output_tokens": None, "temperature": "number",
    "top_p": "number", "metadata": None, "user": "str", "reasoning": None, "store": "bool",
    "previous_response_id": None, "stream": "bool", "include": None, "top_logprobs": None, "truncation": None,
    "service_tier": "str", "safety_identifier": "str", "prompt_cache_key": "str", "max_tool_calls": None,
    "stream_options": None, "background": None, "conversation": None, "prompt": None, "runestone": None,
    "prompt_cache_retention": "str",
}
_CHECKS = {"bool": (bool, "a boolean"), "number": ((int, float), "a number"), "str": (str, "a string")}

#: Built-in tool types: run by OpenAI's Responses API itself, so only a native provider can honour them.
NATIVE_ONLY = frozenset({
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
    "file_search", "computer", "computer_use_preview", "code_interpreter", "image_generation", "mcp",
    "local_shell", "shell", "custom", "apply_patch", "tool_search",
})

_INPUT_ROLES = frozenset({"user", "assistant", "system", "developer"})


class ResponsesRequest:
    """A validated Responses body: what the gateway needs of it, and the body itself (``runestone`` taken out)."""

    __slots__ = ("body", "model", "stream", "store", "previous_response_id", "items", "routing", "capability",
                 "native_only")

    def __init__(self, body: dict, model: str, stream: bool, store: bool, previous_response_id: str | None,
                 items: list[dict], routing: Any, capability: frozenset[str], native_only: list[str]) -> None:
        self.body = body
        self.model = model
        self.stream = stream
        #: Keep the response and its input in the gateway's store (default true, as OpenAI).
        self.store = store
        self.previous_response_id = previous_response_id
        #: This request's input as items with ids (what ``GET .../input_items`` lists).
        self.items = items
        #: The raw ``runestone`` routing object, or None.
        self.routing = routing
        #: What the body needs of a provider: "tools", "vision".
        self.capability = capability
        #: Params (``tools[2].type`` ...) only a provider speaking Responses natively can honour.
        self.native_only = native_only


# -- validation -----------------------------------------------------------------------------------------

def _text_of_parts(content, param: str, allowed: frozenset[str]) -> list[dict]:
    """Content parts of an input message, checked; a string becomes one text part."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _bad(param, f"{param} must be a string or an array of content parts, not a {kind_of(content)}")
    parts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _bad(p, f"{p} must be an object with a 'type'")
        kind = part.get("type")
        if kind not in allowed:
            if kind in ("input_text", "output_text", "input_image", "input_file", "refusal", "input_audio"):
                raise _bad(f"{p}.type", f"{p}.type {kind!r} is not allowed in this message's role")
            raise _bad(f"{p}.type", f"{p}.type must be one of {', '.join(sorted(allowed))}; got {kind!r}")
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise _bad(f"{p}.text", f"{p}.text must be a string")
        elif kind == "refusal":
            if not isinstance(part.get("refusal"), str):
                raise _bad(f"{p}.refusal", f"{p}.refusal must be a string")
        elif kind == "input_image":
            if part.get("file_id") is not None:
                raise _bad(f"{p}.file_id", f"{p}.file_id: this gateway has no Files API; send the image as "
                           "image_url (an https or data: URL)", "unsupported_value")
            if not isinstance(part.get("image_url"), str) or not part["image_url"]:
                raise _bad(f"{p}.image_url", f"{p}.image_url must be a non-empty string (an https or data: URL)")
            detail = part.get("detail")
            if detail is not None and detail not in ("auto", "low", "high"):
                raise _bad(f"{p}.detail", f"{p}.detail must be \"auto\", \"low\" or \"high\"")
        elif kind == "input_file":
            if part.get("file_id") is not None or part.get("file_url") is not None:
                which = "file_id" if part.get("file_id") is not None else "file_url"
                raise _bad(f"{p}.{which}", f"{p}.{which}: this gateway has no Files API; send the file inline "
                           "as file_data", "unsupported_value")
            if not isinstance(part.get("file_data"), str):
                raise _bad(f"{p}.file_data", f"{p}.file_data must be a string (a data: URL)")
        parts.append(part)
    return parts


_USER_PARTS = frozenset({"input_text", "input_image", "input_file"})
_SYSTEM_PARTS = frozenset({"input_text"})
_ASSISTANT_PARTS = frozenset({"output_text", "refusal", "input_text"})


def _item(item: Any, i: int) -> dict:
    """One input item, checked, with an id (as ``input_items`` lists it)."""
    p = f"input[{i}]"
    if not isinstance(item, dict):
        raise _bad(p, f"{p} must be an object (a message or an item such as function_call_output)")
    kind = item.get("type")
    if kind is None or kind == "message":
        role = item.get("role")
        if role not in _INPUT_ROLES:
            raise _bad(f"{p}.role", f"{p}.role must be one of assistant, developer, system, user; got {role!r}")
        allowed = _ASSISTANT_PARTS if role == "assistant" else _USER_PARTS if role == "user" else _SYSTEM_PARTS
        parts = _text_of_parts(item.get("content"), f"{p}.content", allowed)
        if role == "assistant":
            parts = [{"type": "output_text", "text": q["text"], "annotations": q.get("annotations") or []}
                     if q["type"] == "input_text" else q for q in parts]
        out = {"id": item.get("id") if isinstance(item.get("id"), str) else new_id("msg_"), "type": "message",
               "role": role, "content": parts, "status": "completed"}
        return out
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str) or (name != "arguments" and not item[name]):
                raise _bad(f"{p}.{name}", f"{p}.{name} must be a {'non-empty ' if name != 'arguments' else ''}string")
        return {"id": item.get("id") if isinstance(item.get("id"), str) else new_id("fc_"), "type": "function_call",
                "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"],
                "status": "completed"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise _bad(f"{p}.call_id", f"{p}.call_id must be a non-empty string: the call_id of the function_call")
        output = item.get("output")
        if isinstance(output, list):
            _text_of_parts(output, f"{p}.output", frozenset({"input_text"}))
        elif not isinstance(output, str):
            raise _bad(f"{p}.output", f"{p}.output must be a string or an array of input_text parts")
        return {"id": item.get("id") if isinstance(item.get("id"), str) else new_id("fco_"),
                "type": "function_call_output", "call_id": item["call_id"], "output": output, "status": "completed"}
    if kind == "reasoning":
        if not isinstance(item.get("summary", []), list):
            raise _bad(f"{p}.summary", f"{p}.summary must be an array")
        if item.get("content") is not None and not isinstance(item["content"], list):
            raise _bad(f"{p}.content", f"{p}.content must be an array of reasoning_text parts")
        encrypted = item.get("encrypted_content")
        if encrypted is not None:
            if not isinstance(encrypted, str):
                raise _bad(f"{p}.encrypted_content", f"{p}.encrypted_content must be a string")
            if encrypted.startswith(_THINKING_PREFIX) and decode_thinking(encrypted) is None:
                raise _bad(f"{p}.encrypted_content", f"{p}.encrypted_content was changed: it is not the "
                           "reasoning this gateway returned")
        out = dict(item)
        out.setdefault("id", new_id("rs_"))
        out.setdefault("summary", [])
        return out
    if kind == "item_reference":
        raise _bad(f"{p}.type", f"{p}: item references are not supported by this gateway; send the item itself, "
                   "or continue a stored conversation with previous_response_id", "unsupported_value")
    raise _bad(f"{p}.type", f"{p}.type {kind!r} is not supported by this gateway; items may be messages, "
               "function_call, function_call_output and reasoning", "unsupported_value")


# -- reasoning items and the canonical body's thinking blocks -------------------------------------------

_THINKING_PREFIX = "runestone.thinking.v1:"


def encode_thinking(blocks: list[dict]) -> str:
    """Signed thinking blocks as a reasoning item's ``encrypted_content`` (opaque to the client)."""
    return _THINKING_PREFIX + base64.urlsafe_b64encode(orjson.dumps(blocks)).decode()


def decode_thinking(encrypted: Any) -> list[dict] | None:
    """The thinking blocks :func:`encode_thinking` wrote, or None for anything else (OpenAI's own content)."""
    if not isinstance(encrypted, str) or not encrypted.startswith(_THINKING_PREFIX):
        return None
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(encrypted[len(_THINKING_PREFIX):].encode()))
        return check_thinking_blocks(blocks, "encrypted_content")
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None


def gateway_reasoning(item: dict) -> bool:
    """True for a reasoning item whose ``encrypted_content`` the gateway wrote (no native upstream reads it)."""
    return item.get("type") == "reasoning" and decode_thinking(item.get("encrypted_content")) is not None


def _reasoning_item(text: str | None, blocks: list[dict] | None, status: str = "completed") -> dict:
    item = {"id": new_id("rs_"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else [], "status": status}
    if blocks:
        item["encrypted_content"] = encode_thinking(blocks)
    return item


def _tools(tools: Any, native_only: list[str]) -> None:
    if not isinstance(tools, list):
        raise _bad("tools", f"'tools' must be an array of tool objects, not a {kind_of(tools)}")
    names = set()
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(p, f"{p} must be an object")
        kind = tool.get("type")
        if kind == "function":
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"{p}.name", f"{p}.name is required: the function's name (Responses tools are flat: "
                           "{\"type\": \"function\", \"name\", \"parameters\"})")
            if name in names:
                raise _bad(f"{p}.name", f"{p}.name {name!r} is given twice")
            names.add(name)
            params = tool.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"{p}.parameters", f"{p}.parameters must be a JSON Schema object")
            if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
                raise _bad(f"{p}.strict", f"{p}.strict must be a boolean")
        elif isinstance(kind, str) and kind in NATIVE_ONLY:
            native_only.append(f"{p}.type")
        else:
            raise _bad(f"{p}.type", f"{p}.type {kind!r} is not a tool type this gateway knows")


def _text_format(text: Any) -> None:
    if not isinstance(text, dict):
        raise _bad("text", "'text' must be an object such as {\"format\": {\"type\": \"json_object\"}}")
    fmt = text.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _bad("text.format", "'text.format' must be an object with a 'type'")
        kind = fmt.get("type")
        if kind == "json_schema":
            if not isinstance(fmt.get("name"), str) or not fmt["name"]:
                raise _bad("text.format.name", "'text.format.name' is required for json_schema")
            if not isinstance(fmt.get("schema"), dict):
                raise _bad("text.format.schema", "'text.format.schema' must be a JSON Schema object")
            if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
                raise _bad("text.format.strict", "'text.format.strict' must be a boolean")
        elif kind not in ("text", "json_object"):
            raise _bad("text.format.type", "'text.format.type' must be \"text\", \"json_object\" or \"json_schema\"")
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise _bad("text.verbosity", "'text.verbosity' must be \"low\", \"medium\" or \"high\"")


def _tool_choice(choice: Any, native_only: list[str]) -> None:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"name\": ...}")
        return
    if not isinstance(choice, dict):
        raise _bad("tool_choice", f"'tool_choice' must be a string or an object, not a {kind_of(choice)}")
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise _bad("tool_choice.name", "'tool_choice.name' must name one of the function tools")
    elif kind == "allowed_tools":
        if choice.get("mode") not in ("auto", "required") or not isinstance(choice.get("tools"), list):
            raise _bad("tool_choice", "'tool_choice' allowed_tools needs a mode (auto or required) and tools")
    elif isinstance(kind, str) and (kind in NATIVE_ONLY or kind in ("mcp", "custom")):
        native_only.append("tool_choice.type")
    else:
        raise _bad("tool_choice.type", f"'tool_choice.type' {kind!r} is not a tool choice this gateway knows")


def _non_negative_int(body: dict, name: str, low: int, high: int | None = None) -> None:
    value = integral(body.get(name))
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(name, f"'{name}' must be an integer {rng}")
    body[name] = value


def validate_responses(body: dict) -> ResponsesRequest:
    """Validate a Responses body in place (``runestone`` is taken out); a 400 naming the field."""
    for name, value in body.items():
        if name not in _FIELDS:
            raise _bad(name, f"unknown parameter '{name}': the Responses API has no such field", "unknown_parameter")
        check = _FIELDS[name]
        if check is not None and value is not None:
            types, what = _CHECKS[check]
            if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)) \
                    or not isinstance(value, types):
                raise _bad(name, f"'{name}' must be {what}, not a {kind_of(value)}")
    model = body.get("model")
    if model is None:
        raise _bad("model", "'model' is required: name a model (GET /v1/models lists them) or a failover group")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model", f"'model' must be a non-empty string, not a {kind_of(model)}")
    for name, why in (("background", "background responses are not supported by this gateway"),
                      ("conversation", "the Conversations API is not supported by this gateway; continue a stored "
                       "conversation with previous_response_id"),
                      ("prompt", "prompt templates are not supported by this gateway; send instructions and input")):
        if body.get(name) not in (None, False):
            raise _bad(name, f"'{name}': {why}", "unsupported_value")
    inp = body.get("input")
    if inp is None:
        raise _bad("input", "'input' is required: a string or an array of input items")
    if isinstance(inp, str):
        items = [{"id": new_id("msg_"), "type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": inp}], "status": "completed"}]
    elif isinstance(inp, list):
        items = [_item(it, i) for i, it in enumerate(inp)]
    else:
        raise _bad("input", f"'input' must be a string or an array of input items, not a {kind_of(inp)}")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", "'instructions' must be a string")
    native_only: list[str] = []
    if body.get("tools") is not None:
        _tools(body["tools"], native_only)
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], native_only)
    if body.get("text") is not None:
        _text_format(body["text"])
    _non_negative_int(body, "max_output_tokens", 1)
    _non_negative_int(body, "top_logprobs", 0, 20)
    _non_negative_int(body, "max_tool_calls", 1)
    for name, (low, high) in (("temperature", (0, 2)), ("top_p", (0, 1))):
        value = body.get(name)
        if value is not None and not low <= value <= high:
            raise _bad(name, f"'{name}' must be a number between {low} and {high}; got {value}")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()):
            raise _bad("metadata", "'metadata' must be an object of at most 16 string pairs (keys up to 64 "
                       "characters, values up to 512)")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _bad("reasoning", "'reasoning' must be an object such as {\"effort\": \"low\"}")
        effort = reasoning.get("effort")
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise _bad("reasoning.effort", "'reasoning.effort' must be none, minimal, low, medium, high or xhigh")
    include = body.get("include")
    if include is not None and (not isinstance(include, list) or not all(isinstance(x, str) for x in include)):
        raise _bad("include", "'include' must be an array of strings")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled"):
        if truncation == "auto":
            native_only.append("truncation")
        else:
            raise _bad("truncation", "'truncation' must be \"auto\" or \"disabled\"")
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise _bad("previous_response_id", "'previous_response_id' must be the id of a stored response")
    store = body.get("store")
    caps = set()
    if body.get("tools"):
        caps.add("tools")
    if any(p.get("type") == "input_image" for it in items if it["type"] == "message" for p in it["content"]):
        caps.add("vision")
    routing = body.pop("runestone", None)
    return ResponsesRequest(body, model, bool(body.get("stream")), store is not False, prev, items, routing,
                            frozenset(caps), native_only)


# -- to chat --------------------------------------------------------------------------------------------

def _chat_content(parts: list[dict]):
    """Input content parts as chat content: a string when all text, else chat's parts."""
    if all(p["type"] in ("input_text", "output_text") for p in parts):
        return "".join(p["text"] for p in parts) if len(parts) != 1 else parts[0]["text"]
    out = []
    for p in parts:
        kind = p["type"]
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": p["text"]})
        elif kind == "input_image":
            image = {"url": p["image_url"]}
            if p.get("detail"):
                image["detail"] = p["detail"]
            out.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            file = {"file_data": p["file_data"]}
            if p.get("filename"):
                file["filename"] = p["filename"]
            out.append({"type": "file", "file": file})
    return out


def _output_text(output) -> str:
    if isinstance(output, str):
        return output
    return "".join(p.get("text", "") for p in output if isinstance(p, dict))


def items_to_messages(items: list[dict]) -> list[dict]:
    """Response items (stored history, then this input) as chat messages.

    An assistant message and the function calls after it make one assistant turn with ``tool_calls``, as
    chat wants; reasoning items go on the assistant turn after them (module docstring).
    """
    messages: list[dict] = []
    texts: list[str] = []  # reasoning waiting for its assistant turn
    blocks: list[dict] = []

    def assistant(message: dict) -> dict:
        if texts:
            message["reasoning_content"] = "".join(texts)
        if blocks:
            message["thinking_blocks"] = list(blocks)
        texts.clear()
        blocks.clear()
        messages.append(message)
        return message

    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item["role"]
            if role == "assistant":
                text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
                assistant({"role": "assistant", "content": text})
            else:
                messages.append({"role": role, "content": _chat_content(item["content"])})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or ()
            texts.extend(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            blocks.extend(decode_thinking(item.get("encrypted_content")) or ())
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not (texts or blocks):
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                assistant({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _output_text(item["output"])})
    return messages


def responses_to_chat(request: ResponsesRequest, history: list[dict] = ()) -> dict:
    """The canonical chat body for ``request``, continuing ``history`` (a stored conversation's items)."""
    body = request.body
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    messages += items_to_messages([*history, *request.items])
    if not messages:
        raise _bad("input", "'input' holds nothing a model can answer (only reasoning items)")
    chat: dict = {"model": request.model, "messages": messages}
    if request.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        chat["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t["name"]), ("description", t.get("description")),
                              ("parameters", t.get("parameters")), ("strict", t.get("strict"))) if v is not None}}
            for t in tools if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        chat["tool_choice"] = {"type": "allowed_tools", "allowed_tools": {
            "mode": choice["mode"], "tools": [{"type": "function", "function": {"name": t.get("name")}}
                                              for t in choice["tools"] if isinstance(t, dict)]}}
    for name in ("parallel_tool_calls", "temperature", "top_p", "user", "service_tier", "safety_identifier",
                 "prompt_cache_key"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    text = body.get("text") or {}
    fmt = text.get("format") or {}
    if fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {"name": fmt["name"], "schema": fmt["schema"]}
        for k in ("strict", "description"):
            if fmt.get(k) is not None:
                schema[k] = fmt[k]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    if text.get("verbosity"):
        chat["verbosity"] = text["verbosity"]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort:
        chat["reasoning_effort"] = effort
    if body.get("top_logprobs") or "message.output_text.logprobs" in (body.get("include") or ()):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    check_typed(chat)
    return chat


# -- the answer -----------------------------------------------------------------------------------------

def _usage(u: dict | None) -> dict | None:
    if not isinstance(u, dict):
        return None
    pin = int(u.get("prompt_tokens") or 0)
    pout = int(u.get("completion_tokens") or 0)
    cached = int(((u.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    reasoning = int(((u.get("completion_tokens_details") or {}).get("reasoning_tokens")) or 0)
    return {"input_tokens": pin, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": pout, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(u.get("total_tokens") or pin + pout)}


def response_skeleton(request: ResponsesRequest, response_id: str, created_at: int, model: str | None = None) -> dict:
    """The Response object before any output: the request's settings echoed, status ``in_progress``."""
    body = request.body
    text = dict(body.get("text") or {})
    text.setdefault("format", {"type": "text"})
    reasoning = body.get("reasoning") or {}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"), "model": model or request.model, "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": body.get("service_tier") or "default", "store": request.store,
        "temperature": body.get("temperature", 1.0), "text": text, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation") or "disabled", "usage": None,
        "user": body.get("user"), "metadata": body.get("metadata") or {},
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _finish(response: dict, finish_reason: str | None) -> None:
    reason = _INCOMPLETE.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    if reason is None:
        response["completed_at"] = int(time.time())


def _text_part(text: str, logprobs=None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _logprobs(choice: dict) -> list:
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not content:
        return []
    return [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes") or [],
             "top_logprobs": [{"token": x.get("token", ""), "logprob": x.get("logprob", 0.0),
                               "bytes": x.get("bytes") or []} for x in t.get("top_logprobs") or ()]}
            for t in content if isinstance(t, dict)]


def chat_to_response(request: ResponsesRequest, completion: dict, response_id: str, created_at: int) -> dict:
    """A ``chat.completion`` as the Response object (its first choice: Responses has no ``n``)."""
    response = response_skeleton(request, response_id, created_at, completion.get("model"))
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    status = "incomplete" if finish in _INCOMPLETE else "completed"
    output = response["output"]
    reasoning = reasoning_of(message)
    blocks = message.get("thinking_blocks") if isinstance(message.get("thinking_blocks"), list) else None
    if reasoning or blocks:
        output.append(_reasoning_item(reasoning, blocks))
    content = message.get("content")
    refusal = message.get("refusal")
    if refusal:
        output.append({"id": new_id("msg_"), "type": "message", "role": "assistant", "status": status,
                       "content": [{"type": "refusal", "refusal": refusal}]})
    elif isinstance(content, str) and (content or not message.get("tool_calls")):
        output.append({"id": new_id("msg_"), "type": "message", "role": "assistant", "status": status,
                       "content": [_text_part(content, _logprobs(choice))]})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append({"id": new_id("fc_"), "type": "function_call", "call_id": call.get("id") or new_id("call_"),
                       "name": fn.get("name", ""), "arguments": fn.get("arguments") or "", "status": "completed"})
    _finish(response, finish)
    response["usage"] = _usage(completion.get("usage"))
    return response


def failed_response(response: dict, message: str, code: str | None) -> dict:
    """``response`` as failed: OpenAI's ``error`` object (its ``code`` vocabulary is small: server_error
    unless the gateway's error was a rate limit)."""
    failed = dict(response)
    failed["status"] = "failed"
    failed["error"] = {"code": "rate_limit_exceeded" if code == "rate_limit_exceeded" else "server_error",
                       "message": message}
    return failed


def sse_event(event: dict) -> bytes:
    """One Responses stream event as SSE: ``event: <type>`` and its JSON."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class ResponsesEventStream:
    """``chat.completion.chunk`` payloads in, the Responses stream events out, in the real API's order.

    ``response.created`` and ``response.in_progress`` open the stream; each output item is announced
    (``response.output_item.added``, for a message also ``response.content_part.added``), grows by deltas
    (``response.output_text.delta``, ``response.function_call_arguments.delta``, ``response.reasoning_text.delta``)
    and is closed in output order at the end (``.done`` events, ``response.content_part.done``,
    ``response.output_item.done``), then ``response.completed`` or ``response.incomplete`` carries the whole
    Response. :meth:`failure` ends a stream cut short with ``response.failed``. ``response`` is the final
    object (for the store) once the stream ended.
    """

    def __init__(self, request: ResponsesRequest, response_id: str, created_at: int) -> None:
        self._response = response_skeleton(request, response_id, created_at)
        self._seq = 0
        self._started = False
        self._items: list[dict] = []  # output items as they grow, in output order
        self._message: dict | None = None
        self._reasoning: dict | None = None
        self._calls: dict[int, dict] = {}  # chat tool call index -> its function_call item
        self._thinking = ThinkingBlocks()
        self._finish: str | None = None
        self._usage: dict | None = None
        self._model_seen = False
        #: The final Response object once the stream ended (completed, incomplete or failed).
        self.response: dict | None = None

    def _event(self, out: list, kind: str, **fields) -> None:
        fields["type"] = kind
        fields["sequence_number"] = self._seq
        self._seq += 1
        out.append(sse_event(fields))

    def _snapshot(self) -> dict:
        return dict(self._response, output=[])

    def _open(self, out: list, item: dict, part: dict | None = None) -> None:
        index = len(self._items)
        item["_index"] = index
        self._items.append(item)
        announced = {k: v for k, v in item.items() if not k.startswith("_")}
        if item["type"] == "message":
            announced["content"] = []
        elif item["type"] == "reasoning":
            announced["content"] = []
        elif item["type"] == "function_call":
            announced["arguments"] = ""
        self._event(out, "response.output_item.added", output_index=index, item=announced)
        if part is not None:
            self._event(out, "response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=part)

    def _message_item(self, out: list) -> dict:
        if self._message is None:
            self._message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                             "content": [], "_text": [], "_logprobs": []}
            self._open(out, self._message, _text_part(""))
        return self._message

    def feed(self, payloads: list, last: bool) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._event(out, "response.created", response=self._snapshot())
            self._event(out, "response.in_progress", response=self._snapshot())
        for raw in payloads:
            chunk = orjson.loads(raw)
            if not self._model_seen and isinstance(chunk.get("model"), str):
                self._model_seen = True
                self._response["model"] = chunk["model"]
            if chunk.get("usage"):
                self._usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                self._delta(out, choice)
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
        if last:
            self._close(out)
        return b"".join(out)

    def _delta(self, out: list, choice: dict) -> None:
        delta = choice.get("delta") or {}
        reasoning = reasoning_of(delta)
        fragments = delta.get("thinking_blocks")
        if reasoning or fragments:
            if self._reasoning is None:
                self._reasoning = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress",
                                   "_text": []}
                self._open(out, self._reasoning, {"type": "reasoning_text", "text": ""})
            self._thinking.feed(fragments)
        if reasoning:
            r = self._reasoning
            r["_text"].append(reasoning)
            self._event(out, "response.reasoning_text.delta", item_id=r["id"], output_index=r["_index"],
                        content_index=0, delta=reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            # Opened at its first text, not at the role chunk: a turn that only calls tools has no message.
            msg = self._message_item(out)
            msg["_text"].append(content)
            logprobs = _logprobs(choice)
            msg["_logprobs"] += logprobs
            self._event(out, "response.output_text.delta", item_id=msg["id"], output_index=msg["_index"],
                        content_index=0, delta=content, logprobs=logprobs)
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            fn = call.get("function") or {}
            item = self._calls.get(index)
            if item is None:
                item = {"id": new_id("fc_"), "type": "function_call", "call_id": call.get("id") or new_id("call_"),
                        "name": fn.get("name") or "", "arguments": "", "status": "in_progress", "_args": []}
                self._calls[index] = item
                self._open(out, item)
            args = fn.get("arguments")
            if args:
                item["_args"].append(args)
                self._event(out, "response.function_call_arguments.delta", item_id=item["id"],
                            output_index=item["_index"], delta=args)

    def _done_item(self, out: list, item: dict, status: str) -> dict:
        index = item["_index"]
        kind = item["type"]
        final = {k: v for k, v in item.items() if not k.startswith("_")}
        final["status"] = status
        if kind == "message":
            text = "".join(item["_text"])
            part = _text_part(text, item["_logprobs"])
            self._event(out, "response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text, logprobs=item["_logprobs"])
            self._event(out, "response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
            final["content"] = [part]
        elif kind == "reasoning":
            text = "".join(item["_text"])
            part = {"type": "reasoning_text", "text": text}
            self._event(out, "response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text)
            self._event(out, "response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part)
            final["content"] = [part]
            final["status"] = "completed"
            if self._thinking:
                final["encrypted_content"] = encode_thinking(self._thinking.blocks())
        else:
            final["arguments"] = "".join(item["_args"])
            final["status"] = "completed"
            self._event(out, "response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=final["name"], arguments=final["arguments"])
        self._event(out, "response.output_item.done", output_index=index, item=final)
        return final

    def _close(self, out: list) -> None:
        response = self._response
        if not self._items:
            self._message_item(out)  # an answer with no content is still one (empty) message, as chat's is
        status = "incomplete" if self._finish in _INCOMPLETE else "completed"
        response["output"] = [self._done_item(out, item, status) for item in self._items]
        _finish(response, self._finish)
        response["usage"] = self._usage
        self.response = response
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        self._event(out, kind, response=response)

    def failure(self, message: str, code: str | None) -> bytes:
        """The stream was cut: ``response.failed`` with what was produced so far, and the error."""
        out: list[bytes] = []
        if not self._started:
            self._started = True
            self._event(out, "response.created", response=self._snapshot())
        partial = [{k: v for k, v in item.items() if not k.startswith("_")} for item in self._items]
        for item, src in zip(partial, self._items):
            if item["type"] == "message":
                item["content"] = [_text_part("".join(src["_text"]))]
            elif item["type"] == "function_call":
                item["arguments"] = "".join(src["_args"])
            item["status"] = "incomplete"
        response = failed_response(dict(self._response, output=partial, usage=self._usage), message, code)
        self.response = response
        self._event(out, "response.failed", response=response)
        return b"".join(out)
