"""Translation between the gateway's OpenAI chat format and Amazon Bedrock's Converse API.

A ``bedrock`` provider sends the canonical chat body as a Converse body (:func:`openai_to_converse_request`;
the model id goes in the URL, ``POST /model/{modelId}/converse`` or ``/converse-stream``) and turns what
comes back into OpenAI shapes: a whole answer (:func:`converse_to_openai_response`), the events of a
ConverseStream one ``chat.completion.chunk`` at a time (:class:`ConverseToOpenAIStream`, fed the events
botocore's decoder took out of the AWS event-stream framing), or an error (:func:`bedrock_error_info`).
:func:`converse_request_to_openai` goes the other way, for the fake Bedrock server.

The shapes follow the service model botocore ships (``bedrock-runtime`` 2023-09-30): ``system`` text
blocks, ``messages`` with ``text``/``image``/``document``/``toolUse``/``toolResult``/``reasoningContent``
blocks, ``inferenceConfig`` (``maxTokens``, ``temperature``, ``topP``, ``stopSequences``), ``toolConfig``
(``tools[].toolSpec``, ``toolChoice`` auto/any/tool), ``outputConfig.textFormat`` for a JSON schema, and
``additionalModelRequestFields`` for the model's own parameters (Claude's ``thinking``). Reasoning maps as
:mod:`runestone.wire.reasoning` describes: Bedrock's ``reasoningText`` (text and signature) is Anthropic's
thinking block, its ``redactedContent`` is ``redacted_thinking``'s ``data``, both carried verbatim. Blobs are
base64 strings in Converse's JSON, as they are in OpenAI's data URLs. Plain dicts throughout.
"""

from __future__ import annotations

import attrs
import orjson

from .anthropic_upstream import (ChunkTranslator, chat_messages, data_url_parts, text_parts, tool_arguments,
                                 unsupported_part, user_parts)
from .errors import ErrorInfo, InvalidRequest, loads_or_none
from .reasoning import check_thinking_blocks, put_thinking, reasoning_of, thinking_for

__all__ = [
    "BEDROCK_ERRORS",
    "ConverseToOpenAIStream",
    "bedrock_error_info",
    "converse_request_to_openai",
    "converse_to_openai_response",
    "openai_to_converse_request",
]

_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}
_DOCUMENT_FORMATS = {"application/pdf": "pdf", "text/csv": "csv", "application/msword": "doc",
                     "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
                     "application/vnd.ms-excel": "xls",
                     "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
                     "text/html": "html", "text/plain": "txt", "text/markdown": "md"}
_JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
_CACHE_POINT = {"cachePoint": {"type": "default"}}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(param, message)


# -- request: OpenAI -> Converse ----------------------------------------------------------------------

def _text_of(content, param: str) -> str:
    return "".join(text_parts(content, param))


def _data_url(url, param: str) -> tuple[str, str]:
    """(media type, base64 data) of a ``data:`` URL; Bedrock takes bytes, not links."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _bad(param, "Bedrock takes images and files as bytes: send a base64 data URL "
                   "(data:<media type>;base64,<data>), not a link")
    media_type, data = data_url_parts(url, param)
    return media_type.split(";")[0].lower(), data


def _user_blocks(content, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    blocks: list[dict] = []
    for kind, value, p, part in user_parts(content, param):
        if kind == "text":
            blocks.append({"text": value})
        elif kind == "image_url":
            media, data = _data_url(value, f"{p}.image_url")
            fmt = _IMAGE_FORMATS.get(media)
            if fmt is None:
                raise _bad(f"{p}.image_url", f"image type {media!r} is not one Bedrock takes (png, jpeg, gif, webp)")
            blocks.append({"image": {"format": fmt, "source": {"bytes": data}}})
        elif kind == "file":
            media, data = _data_url(value.get("file_data"), f"{p}.file.file_data")
            fmt = _DOCUMENT_FORMATS.get(media)
            if fmt is None:
                raise _bad(f"{p}.file", f"document type {media!r} is not one Bedrock takes")
            blocks.append({"document": {"format": fmt, "name": f"document {len(blocks) + 1}", "source": {"bytes": data}}})
        else:
            raise unsupported_part(kind, p, "Bedrock")
        if part.get("cache_control") is not None:
            blocks.append(dict(_CACHE_POINT))
    return blocks


def _reasoning_blocks(msg: dict, i: int) -> list[dict]:
    """An assistant turn's reasoning as Converse blocks: its thinking blocks verbatim, else its text."""
    blocks = msg.get("thinking_blocks")
    if blocks is not None:
        out = []
        for block in check_thinking_blocks(blocks, f"messages[{i}].thinking_blocks"):
            if block["type"] == "thinking":
                text = {"text": block["thinking"]}
                if block.get("signature"):
                    text["signature"] = block["signature"]
                out.append({"reasoningContent": {"reasoningText": text}})
            else:
                out.append({"reasoningContent": {"redactedContent": block["data"]}})
        return out
    text = reasoning_of(msg)
    return [{"reasoningContent": {"reasoningText": {"text": text}}}] if text else []


def _push(out: list, role: str, blocks: list[dict]) -> None:
    """Append a turn, merged into the previous one of the same role (Converse alternates roles)."""
    if not blocks:
        return
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def openai_to_converse_request(body: dict, *, default_max_tokens: int = 4096) -> dict:
    """Build a Converse body from an OpenAI chat request (the model id is not in it: it goes in the URL).

    - ``system``/``developer`` messages become ``system`` text blocks (a ``cache_control`` part is followed
      by a ``cachePoint``); ``tool`` messages become ``toolResult`` blocks of a user turn; turns of one role
      in a row are merged, as Converse needs alternating roles.
    - Images and files must be base64 data URLs (Bedrock takes bytes); a link is a 400.
    - ``tool_choice``: ``auto``→auto, ``required``→any, a named function→tool; ``none`` leaves the tools out
      unless the history holds tool blocks (Bedrock then requires ``toolConfig``, and has no "none").
    - ``max_completion_tokens``/``max_tokens``, ``temperature``, ``top_p``, ``stop`` go in ``inferenceConfig``.
    - ``response_format``: ``json_schema`` becomes ``outputConfig.textFormat``; ``json_object`` a system
      instruction asking for only a JSON object (Converse has no such mode).
    - ``thinking`` or ``reasoning_effort`` become ``additionalModelRequestFields.thinking`` (Claude's
      parameter on Bedrock; ``maxTokens`` is then always sent, from ``default_max_tokens`` if need be).
    - Parameters with no Converse equivalent (``n``, ``seed``, ``logprobs``, penalties...) are dropped.
    """
    system: list[dict] = []
    out: list[dict] = []
    has_tool_blocks = False
    for i, msg in chat_messages(body):
        role = msg.get("role")
        content = msg.get("content")
        param = f"messages[{i}].content"
        if role == "user":
            _push(out, "user", _user_blocks(content, param))
        elif role == "assistant":
            blocks = _reasoning_blocks(msg, i)
            text = _text_of(content, param) if content else ""
            if text:
                blocks.append({"text": text})
            for j, call in enumerate(msg.get("tool_calls") or ()):
                has_tool_blocks = True
                if not isinstance(call, dict):
                    raise _bad(f"messages[{i}].tool_calls[{j}]", "each tool call must be an object")
                fn = call.get("function") or {}
                blocks.append({"toolUse": {
                    "toolUseId": call.get("id") or f"tooluse_{i}_{j}", "name": fn.get("name") or "",
                    "input": tool_arguments(fn.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments")}})
            _push(out, "assistant", blocks)
        elif role == "tool":
            has_tool_blocks = True
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"messages[{i}].tool_call_id", "tool messages need a tool_call_id")
            _push(out, "user", [{"toolResult": {"toolUseId": call_id, "content": [{"text": _text_of(content, param)}]}}])
        elif role in ("system", "developer"):
            if isinstance(content, list):
                for k, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _bad(f"{param}[{k}]", "system content parts must be text")
                    if part["text"]:
                        system.append({"text": part["text"]})
                        if part.get("cache_control") is not None:
                            system.append(dict(_CACHE_POINT))
            elif isinstance(content, str):
                if content:
                    system.append({"text": content})
            else:
                raise _bad(param, "content must be a string or an array of text parts")
        else:
            raise _bad(f"messages[{i}].role", f"role {role!r} is not supported")

    req: dict = {"messages": out}
    response_format = body.get("response_format")
    output_config = None
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            system.append({"text": _JSON_INSTRUCTION})
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema") or {"type": "object"}
            fmt = {"schema": orjson.dumps(schema).decode()}
            if spec.get("name"):
                fmt["name"] = spec["name"]
            if spec.get("description"):
                fmt["description"] = spec["description"]
            output_config = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": fmt}}}
    if system:
        req["system"] = system

    inference: dict = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    thinking = thinking_for(body, max_tokens or default_max_tokens)
    if thinking is not None and not max_tokens:
        max_tokens = default_max_tokens
    if max_tokens:
        inference["maxTokens"] = max_tokens
    if body.get("temperature") is not None:
        inference["temperature"] = min(float(body["temperature"]), 1.0)
    if body.get("top_p") is not None:
        inference["topP"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        inference["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if inference:
        req["inferenceConfig"] = inference

    tools = body.get("tools")
    tool_choice = body.get("tool_choice")
    if tools and (tool_choice != "none" or has_tool_blocks):
        specs = []
        for k, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not fn.get("name"):
                raise _bad(f"tools[{k}]", "only function tools with a name are supported")
            spec = {"name": fn["name"]}
            if fn.get("description"):
                spec["description"] = fn["description"]
            spec["inputSchema"] = {"json": fn.get("parameters") or {"type": "object", "properties": {}}}
            specs.append({"toolSpec": spec})
        config: dict = {"tools": specs}
        if tool_choice == "auto":
            config["toolChoice"] = {"auto": {}}
        elif tool_choice == "required":
            config["toolChoice"] = {"any": {}}
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            config["toolChoice"] = {"tool": {"name": tool_choice["function"].get("name")}}
        elif tool_choice not in (None, "none"):
            raise _bad("tool_choice", "tool_choice must be auto, none, required or a named function")
        req["toolConfig"] = config
    if output_config is not None:
        req["outputConfig"] = output_config
    if thinking is not None:
        req["additionalModelRequestFields"] = {"thinking": thinking}
    return req


# -- response: Converse -> OpenAI ---------------------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


def _openai_usage(u: dict | None) -> dict:
    u = u if isinstance(u, dict) else {}
    cache_read = u.get("cacheReadInputTokens") or 0
    # Converse's inputTokens leaves out the cached part of the prompt, as Anthropic's does.
    prompt = (u.get("inputTokens") or 0) + cache_read + (u.get("cacheWriteInputTokens") or 0)
    completion = u.get("outputTokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cache_read}}


def _thinking_block(reasoning: dict) -> dict | None:
    if not isinstance(reasoning, dict):
        return None
    text = reasoning.get("reasoningText")
    if isinstance(text, dict):
        return {"type": "thinking", "thinking": text.get("text") or "", "signature": text.get("signature") or ""}
    if isinstance(reasoning.get("redactedContent"), str):
        return {"type": "redacted_thinking", "data": reasoning["redactedContent"]}
    return None


def converse_to_openai_response(obj: dict, *, model: str, request_id: str, created: int) -> dict:
    """A Converse answer as a ``chat.completion``: text joined into ``content`` (None when the answer is only
    tool calls), ``toolUse`` as ``tool_calls``, ``reasoningContent`` as ``reasoning_content`` and
    ``thinking_blocks``."""
    message_in = ((obj.get("output") or {}).get("message") or {}) if isinstance(obj.get("output"), dict) else {}
    texts: list[str] = []
    calls: list[dict] = []
    thinking: list[dict] = []
    for block in message_in.get("content") or ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            calls.append({"id": use.get("toolUseId"), "type": "function",
                          "function": {"name": use.get("name"), "arguments": orjson.dumps(use.get("input") or {}).decode()}})
        elif "reasoningContent" in block:
            t = _thinking_block(block["reasoningContent"])
            if t is not None:
                thinking.append(t)
    message = put_thinking({"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                            "refusal": None}, thinking)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _FINISH_REASONS.get(obj.get("stopReason"), "stop")}],
        "usage": _openai_usage(obj.get("usage")),
    }


@attrs.define
class ConverseToOpenAIStream(ChunkTranslator):
    """ConverseStream events in, OpenAI ``chat.completion.chunk`` dicts out; one per response.

    ``feed(event_type, payload)`` takes each event as botocore's decoder gave it (the ``:event-type`` header
    and the decoded JSON payload). ``messageStart`` gives the role chunk, ``contentBlockStart`` a tool call's
    id and name, ``contentBlockDelta`` text, argument, reasoning text, signature or redacted fragments,
    ``messageStop`` the finish chunk, ``metadata`` (always last) the usage, and with ``include_usage`` the
    usage-only chunk. ``done`` turns true at ``metadata``; ``stopped`` at ``messageStop``.
    """

    done: bool = False
    stopped: bool = False
    _tools: dict[int, int] = attrs.Factory(dict)  # contentBlockIndex -> tool call index
    _thinking: dict[int, int] = attrs.Factory(dict)  # contentBlockIndex -> thinking block index

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk_of([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def _thinking_index(self, block: int) -> int:
        index = self._thinking.get(block)
        if index is None:
            index = self._thinking[block] = len(self._thinking)
        return index

    def feed(self, event: str, data: dict) -> list[dict]:
        if event == "contentBlockDelta":
            delta = data.get("delta") or {}
            block = data.get("contentBlockIndex", 0)
            text = delta.get("text")
            if isinstance(text, str):
                return [self._chunk({"content": text})] if text else []
            use = delta.get("toolUse")
            if isinstance(use, dict):
                index = self._tools.get(block)
                fragment = use.get("input")
                if index is None or not fragment:
                    return []
                return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})]
            reasoning = delta.get("reasoningContent")
            if isinstance(reasoning, dict):
                index = self._thinking_index(block)
                if isinstance(reasoning.get("text"), str):
                    t = reasoning["text"]
                    return [self._chunk({"reasoning_content": t,
                                         "thinking_blocks": [{"index": index, "type": "thinking", "thinking": t}]})]
                if isinstance(reasoning.get("signature"), str):
                    return [self._chunk({"thinking_blocks": [{"index": index, "type": "thinking",
                                                              "signature": reasoning["signature"]}]})]
                if isinstance(reasoning.get("redactedContent"), str):
                    return [self._chunk({"thinking_blocks": [{"index": index, "type": "redacted_thinking",
                                                              "data": reasoning["redactedContent"]}]})]
            return []  # citations, images, tool results of server tools: no chat counterpart
        if event == "contentBlockStart":
            use = (data.get("start") or {}).get("toolUse")
            if isinstance(use, dict):
                index = self._tools[data.get("contentBlockIndex", 0)] = len(self._tools)
                call = {"index": index, "id": use.get("toolUseId"), "type": "function",
                        "function": {"name": use.get("name"), "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if event == "contentBlockStop":
            return []
        if event == "messageStart":
            return [self._chunk({"role": "assistant", "content": ""})]
        if event == "messageStop":
            self.stopped = True
            return [self._chunk({}, _FINISH_REASONS.get(data.get("stopReason"), "stop"))]
        if event == "metadata":
            self.usage = _openai_usage(data.get("usage"))
            self.done = True
            if self.include_usage:
                return [self._usage_chunk(self.usage)]
            return []
        return []  # events added later are ignored, as the SDKs do


# -- errors -------------------------------------------------------------------------------------------

#: Bedrock's exceptions (botocore's service model): HTTP status, OpenAI-vocabulary type, code.
BEDROCK_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "ValidationException": (400, "invalid_request_error", None),
    "AccessDeniedException": (403, "permission_error", None),
    "UnrecognizedClientException": (403, "authentication_error", "invalid_api_key"),
    "InvalidSignatureException": (403, "authentication_error", "invalid_api_key"),
    "ExpiredTokenException": (403, "authentication_error", "invalid_api_key"),
    "ResourceNotFoundException": (404, "not_found_error", "model_not_found"),
    "ModelTimeoutException": (408, "timeout_error", "upstream_timeout"),
    "ModelErrorException": (424, "api_error", "upstream_error"),
    "ThrottlingException": (429, "rate_limit_error", "rate_limit_exceeded"),
    "ModelNotReadyException": (429, "rate_limit_error", "model_not_ready"),
    "ServiceQuotaExceededException": (400, "invalid_request_error", "quota_exceeded"),
    "InternalServerException": (500, "api_error", "upstream_error"),
    "ModelStreamErrorException": (424, "api_error", "upstream_error"),
    "ServiceUnavailableException": (503, "overloaded_error", "upstream_overloaded"),
}


def _exception_name(name: str | None) -> str | None:
    """``ThrottlingException`` from ``ThrottlingException:http://internal...`` or ``throttlingException``."""
    if not name:
        return None
    name = name.split(":", 1)[0].strip()
    return name[:1].upper() + name[1:] if name else None


def bedrock_error_info(status: int, error_type: str | None, body: bytes) -> ErrorInfo:
    """A Bedrock error (HTTP status, the ``x-amzn-ErrorType`` header or a stream's ``:exception-type``, the
    body ``{"message": ...}``) as the neutral :class:`ErrorInfo`; unknown names are classified by status."""
    name = _exception_name(error_type)
    message = None
    doc = loads_or_none(body)
    if isinstance(doc, dict):
        message = doc.get("message") or doc.get("Message")
        if name is None and isinstance(doc.get("__type"), str):
            name = _exception_name(doc["__type"].rsplit("#", 1)[-1])
    known = BEDROCK_ERRORS.get(name or "")
    if known is not None:
        status = status if status >= 400 else known[0]
        type_, code = known[1], known[2]
    else:
        if status < 400:
            status = 500
        type_ = "invalid_request_error" if status < 500 else "api_error"
        code = None
    if not isinstance(message, str) or not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"Bedrock answered HTTP {status}" + (f" ({name})" if name else "") + (f": {text}" if text else "")
    return ErrorInfo(status, message[:2000], type_, None, code)


# -- the other way: Converse -> OpenAI chat (the fake Bedrock server) ---------------------------------

def _openai_parts(blocks: list, param: str) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Converse content blocks as (chat parts, tool calls, tool results, thinking blocks)."""
    parts, calls, results, thinking = [], [], [], []
    for k, block in enumerate(blocks):
        p = f"{param}[{k}]"
        if not isinstance(block, dict) or len(block) != 1:
            raise _bad(p, "each content block must be an object with exactly one member")
        (kind, value), = block.items()
        if kind == "text":
            if not isinstance(value, str):
                raise _bad(f"{p}.text", "text must be a string")
            parts.append({"type": "text", "text": value})
        elif kind == "image":
            fmt = value.get("format") if isinstance(value, dict) else None
            data = (value.get("source") or {}).get("bytes") if isinstance(value, dict) else None
            if fmt not in ("png", "jpeg", "gif", "webp") or not isinstance(data, str):
                raise _bad(p, "image needs a format (png, jpeg, gif, webp) and source.bytes")
            parts.append({"type": "image_url", "image_url": {"url": f"data:image/{fmt};base64,{data}"}})
        elif kind == "document":
            parts.append({"type": "text", "text": f"[document {value.get('name') if isinstance(value, dict) else ''}]"})
        elif kind == "toolUse":
            if not isinstance(value, dict) or not isinstance(value.get("toolUseId"), str) or not value.get("name"):
                raise _bad(p, "toolUse needs toolUseId, name and input")
            calls.append({"id": value["toolUseId"], "type": "function",
                          "function": {"name": value["name"], "arguments": orjson.dumps(value.get("input") or {}).decode()}})
        elif kind == "toolResult":
            if not isinstance(value, dict) or not isinstance(value.get("toolUseId"), str):
                raise _bad(p, "toolResult needs toolUseId and content")
            texts = []
            for item in value.get("content") or ():
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    texts.append(item["text"])
                elif isinstance(item, dict) and "json" in item:
                    texts.append(orjson.dumps(item["json"]).decode())
            results.append({"role": "tool", "tool_call_id": value["toolUseId"], "content": "\n".join(texts)})
        elif kind == "reasoningContent":
            t = _thinking_block(value)
            if t is None:
                raise _bad(p, "reasoningContent needs reasoningText or redactedContent")
            thinking.append(t)
        elif kind == "cachePoint":
            continue
        else:
            raise _bad(p, f"content block {kind!r} is not supported")
    return parts, calls, results, thinking


def converse_request_to_openai(body: dict, model: str) -> dict:
    """A Converse body as an OpenAI chat request (what the fake Bedrock model answers); a 400 naming the field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty array")
    out: list[dict] = []
    for k, block in enumerate(body.get("system") or ()):
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            out.append({"role": "system", "content": block["text"]})
        elif not (isinstance(block, dict) and "cachePoint" in block):
            raise _bad(f"system[{k}]", "system blocks must be text or cachePoint")
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("user", "assistant"):
            raise _bad(f"messages[{i}].role", "role must be user or assistant")
        content = msg.get("content")
        if not isinstance(content, list):
            raise _bad(f"messages[{i}].content", "content must be an array of content blocks")
        parts, calls, results, thinking = _openai_parts(content, f"messages[{i}].content")
        if role == "user":
            out.extend(results)
            if parts:
                text_only = all(p["type"] == "text" for p in parts)
                out.append({"role": "user", "content": "".join(p["text"] for p in parts) if text_only else parts})
        else:
            m: dict = {"role": "assistant", "content": "".join(p.get("text", "") for p in parts) or None}
            if calls:
                m["tool_calls"] = calls
            if thinking:
                m["thinking_blocks"] = thinking
            out.append(m)
    req: dict = {"model": model, "messages": out}
    inference = body.get("inferenceConfig") or {}
    for src, dst in (("maxTokens", "max_tokens"), ("temperature", "temperature"), ("topP", "top_p"),
                     ("stopSequences", "stop")):
        if inference.get(src) is not None:
            req[dst] = inference[src]
    tool_config = body.get("toolConfig")
    if isinstance(tool_config, dict):
        tools = []
        for k, tool in enumerate(tool_config.get("tools") or ()):
            spec = tool.get("toolSpec") if isinstance(tool, dict) else None
            if not isinstance(spec, dict) or not spec.get("name"):
                raise _bad(f"toolConfig.tools[{k}]", "each tool needs a toolSpec with a name")
            fn = {"name": spec["name"], "parameters": (spec.get("inputSchema") or {}).get("json") or {}}
            if spec.get("description"):
                fn["description"] = spec["description"]
            tools.append({"type": "function", "function": fn})
        req["tools"] = tools
        choice = tool_config.get("toolChoice")
        if isinstance(choice, dict):
            if "any" in choice:
                req["tool_choice"] = "required"
            elif isinstance(choice.get("tool"), dict):
                req["tool_choice"] = {"type": "function", "function": {"name": choice["tool"].get("name")}}
            else:
                req["tool_choice"] = "auto"
    fmt = ((body.get("outputConfig") or {}).get("textFormat") or {})
    schema = ((fmt.get("structure") or {}).get("jsonSchema") or {}).get("schema")
    if isinstance(schema, str):
        try:
            req["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": orjson.loads(schema)}}
        except orjson.JSONDecodeError:
            raise _bad("outputConfig.textFormat.structure.jsonSchema.schema", "schema must be JSON text") from None
    thinking = (body.get("additionalModelRequestFields") or {}).get("thinking")
    if thinking is not None:
        req["thinking"] = thinking
    return req
