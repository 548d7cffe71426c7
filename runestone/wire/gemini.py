"""Translation between the gateway's OpenAI chat format and Google's Gemini API (``generateContent``).

A ``gemini`` provider sends the request upstream as a ``models/{model}:generateContent`` body
(:func:`openai_to_gemini_request`) and turns what comes back into OpenAI shapes: a whole response
(:func:`gemini_to_openai_response`), the ``:streamGenerateContent?alt=sse`` stream one event at a time
(:class:`GeminiToOpenAIStream`), an error (:func:`gemini_error`), an embeddings answer
(:func:`gemini_to_openai_embeddings`) and a model listing (:func:`gemini_model_ids`). The other direction
(:func:`gemini_request_to_openai`, :func:`openai_answer_to_gemini`) lets the fake upstream speak Gemini from
the one fake model. Everything works on plain dicts as decoded by orjson.

Where the formats differ:

- Roles: OpenAI's ``assistant`` is Gemini's ``model``; ``system``/``developer`` messages become the
  ``systemInstruction``; ``tool`` results become ``functionResponse`` parts of a ``user`` turn, named after
  the call they answer (Gemini matches results by function name, OpenAI by call id); consecutive turns of one
  role are merged, so parallel calls' results travel together as Gemini wants.
- Tool call ids: Gemini's ``functionCall`` may carry no ``id``; the gateway then names it
  ``call_<digest of name, arguments and the call's place among the candidate's calls>``, the same on every read
  of the same answer, streamed or not.
- JSON Schema (tool parameters, ``response_format``) becomes Gemini's OpenAPI-subset ``Schema``: upper-case
  types, ``["string", "null"]`` as ``nullable``, local ``$ref``s inlined; keywords the subset lacks
  (``additionalProperties``, ``$schema``, ...) are dropped, a schema that cannot be expressed is a 400.
- Usage: ``completion_tokens`` counts the thoughts (``thoughtsTokenCount``, also shown as
  ``completion_tokens_details.reasoning_tokens``), as OpenAI counts reasoning tokens; ``prompt_tokens``
  includes ``toolUsePromptTokenCount``; cached prompt tokens are ``prompt_tokens_details.cached_tokens``.
- Finish reasons: ``STOP`` is ``stop`` (``tool_calls`` when the candidate called a function), ``MAX_TOKENS``
  is ``length``, the safety family (``SAFETY``, ``RECITATION``, ``BLOCKLIST``, ``PROHIBITED_CONTENT``,
  ``SPII``, ``IMAGE_SAFETY``) is ``content_filter``. A prompt Gemini blocked (``promptFeedback.blockReason``,
  no candidates) is a 400 with code ``content_filter``, the shape Azure OpenAI gives a filtered prompt.
- Thought parts (``thought: true``) are ``reasoning_content``, as OpenAI-compatible reasoning servers send it,
  and ``thinking_blocks`` (:mod:`.reasoning`): a run of thought parts is one block, ended by a part carrying a
  ``thoughtSignature``, whose signature is then ``gemini:<signature>``; a signed text part (Gemini puts the
  signature on an answer's last part) is a block with no text and the signature ``gemini-text:<signature>``.
  Request ``thinking``/``reasoning_effort`` become ``generationConfig.thinkingConfig`` (:func:`_thinking_config`).
- A ``functionCall`` part's ``thoughtSignature`` rides in its tool call id (:func:`call_id_signature`:
  ``<id>__thought__<URL-safe base64>``, LiteLLM's separator). OpenAI's chat shape has no field for it, and the
  id is what every front door's client sends back unchanged (chat ``tool_calls[].id`` and ``tool_call_id``,
  Anthropic ``tool_use.id``, Responses ``call_id``); it stays ``[A-Za-z0-9_-]``, which Anthropic's ids require.
  Google's own OpenAI-compatible ``extra_content.google.thought_signature`` is read as well. On the way back
  every signature returns to its part (Gemini 3 refuses a current-turn function call without one); another
  vendor's reasoning goes as unsigned thought text, a ``redacted_thinking`` block is a 400.
- Logprobs: ``logprobs``/``top_logprobs`` are ``responseLogprobs``/``logprobs``; a candidate's
  ``logprobsResult`` (``chosenCandidates`` with ``topCandidates`` step by step) is ``logprobs.content``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct

import attrs
import orjson

from .anthropic_upstream import (ChunkTranslator, TranslationError, chat_messages, data_url_parts, text_parts,
                                 tool_arguments, unsupported_part, user_parts)
from .errors import UpstreamErrorBody, loads_or_none, scrub
from .reasoning import (EFFORT_BUDGETS, GEMINI_TEXT_PREFIX, GEMINI_THOUGHT_PREFIX, check_thinking_blocks,
                        reasoning_of)

__all__ = [
    "GeminiToOpenAIStream",
    "TranslationError",
    "call_id_signature",
    "gemini_error",
    "gemini_model_ids",
    "gemini_request_to_openai",
    "gemini_to_openai_embeddings",
    "gemini_to_openai_response",
    "gemini_usage",
    "json_schema_to_gemini",
    "openai_answer_to_gemini",
    "openai_logprobs_to_gemini",
    "openai_to_gemini_embeddings",
    "openai_to_gemini_request",
]


# ---------------------------------------------------------------------------------------------------------
# JSON Schema -> Gemini Schema

_SCHEMA_TYPES = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER", "boolean": "BOOLEAN",
                 "array": "ARRAY", "object": "OBJECT", "null": "NULL"}
# What Gemini's Schema object has beyond type/properties/items/anyOf (which are converted, not copied).
_SCHEMA_COPIED = ("format", "title", "description", "nullable", "enum", "maxItems", "minItems", "required",
                  "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example",
                  "propertyOrdering", "default", "minimum", "maximum")
_MAX_SCHEMA_DEPTH = 32


def json_schema_to_gemini(schema, param: str, *, _root=None, _depth: int = 0) -> dict:
    """A JSON Schema (as OpenAI takes for tools and ``json_schema`` output) as Gemini's ``Schema`` object."""
    if not isinstance(schema, dict):
        raise TranslationError(param, "a JSON Schema must be an object")
    if _depth > _MAX_SCHEMA_DEPTH:
        raise TranslationError(param, f"the schema nests deeper than {_MAX_SCHEMA_DEPTH} levels (or its $refs loop)")
    root = schema if _root is None else _root
    ref = schema.get("$ref")
    if ref is not None:
        target = _resolve_ref(root, ref, param)
        return json_schema_to_gemini(target, param, _root=root, _depth=_depth + 1)
    out: dict = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise TranslationError(param, f"type {kind!r} cannot be expressed for Gemini: one type, optionally with null")
        if len(kinds) < len(kind):
            out["nullable"] = True
        kind = kinds[0]
    if kind is not None:
        mapped = _SCHEMA_TYPES.get(kind) if isinstance(kind, str) else None
        if mapped is None:
            raise TranslationError(param, f"type {kind!r} is not a JSON Schema type")
        out["type"] = mapped
    elif "const" in schema:
        out["type"] = "STRING"
    for key in _SCHEMA_COPIED:
        if key in schema:
            out.setdefault(key, schema[key])
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "enum" in out and out.get("type") not in (None, "STRING"):
        # Gemini's enum is for strings only; other enums keep their type and are checked by the client.
        del out["enum"]
    props = schema.get("properties")
    if isinstance(props, dict):
        out["properties"] = {name: json_schema_to_gemini(sub, f"{param}.properties.{name}", _root=root,
                                                         _depth=_depth + 1) for name, sub in props.items()}
    items = schema.get("items")
    if isinstance(items, dict):
        out["items"] = json_schema_to_gemini(items, f"{param}.items", _root=root, _depth=_depth + 1)
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            nulls = [a for a in alts if isinstance(a, dict) and a.get("type") == "null"]
            rest = [a for a in alts if a not in nulls]
            if nulls:
                out["nullable"] = True
            if len(rest) == 1:
                out.update({k: v for k, v in json_schema_to_gemini(rest[0], f"{param}.{key}[0]", _root=root,
                                                                   _depth=_depth + 1).items() if k not in out})
            elif rest:
                out["anyOf"] = [json_schema_to_gemini(a, f"{param}.{key}[{i}]", _root=root, _depth=_depth + 1)
                                for i, a in enumerate(rest)]
    return out


def _resolve_ref(root: dict, ref, param: str):
    if ref == "#":
        return root
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise TranslationError(param, f"$ref {ref!r} is not a local reference ('#/$defs/...'); Gemini takes none")
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise TranslationError(param, f"$ref {ref!r} points to nothing in the schema")
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------------
# thought signatures (see the module docstring)

#: Between a tool call's own id and the thought signature it carries (LiteLLM's separator, so ids it wrote read).
SIGNATURE_SEPARATOR = "__thought__"


def call_id_signature(call_id: str, signature: str | None) -> str:
    """A tool call id carrying ``signature`` (URL-safe base64 of its UTF-8, so the id stays ``[A-Za-z0-9_-]``)."""
    if not signature:
        return call_id
    packed = base64.urlsafe_b64encode(signature.encode()).decode().rstrip("=")
    return f"{call_id}{SIGNATURE_SEPARATOR}{packed}"


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """``(own id, thought signature or None)`` of a tool call id written by :func:`call_id_signature`."""
    head, sep, packed = call_id.partition(SIGNATURE_SEPARATOR)
    if not sep or not packed:
        return call_id, None
    try:
        return head, base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return call_id, None


def _signature_of(part: dict) -> str | None:
    sig = part.get("thoughtSignature", part.get("thought_signature"))
    return sig if isinstance(sig, str) and sig else None


class _Thoughts:
    """A candidate's thought parts as ``thinking_blocks`` and fragments of them: a run of thought parts is one
    block, ended by a part that carries a signature or by any other part; a signed text part is a block of its
    own (no thinking text, the signature prefixed :data:`GEMINI_TEXT_PREFIX`)."""

    __slots__ = ("index", "open")

    def __init__(self) -> None:
        self.index = -1
        self.open = False

    def fragment(self, part: dict) -> dict | None:
        """The ``thinking_blocks`` fragment of ``part`` (a thought or a signed text part), or None."""
        sig = _signature_of(part)
        if part.get("thought"):
            if not self.open:
                self.index += 1
                self.open = True
            frag: dict = {"index": self.index, "type": "thinking", "thinking": part.get("text") or ""}
            if sig:
                frag["signature"] = GEMINI_THOUGHT_PREFIX + sig
                self.open = False
            return frag
        self.open = False
        if sig and "text" in part:
            self.index += 1
            return {"index": self.index, "type": "thinking", "thinking": "", "signature": GEMINI_TEXT_PREFIX + sig}
        return None


def _model_parts(msg: dict, i: int) -> tuple[list[dict], str | None]:
    """The thought parts an assistant message gives back to Gemini, and the signature of its text part.

    ``thinking_blocks`` a Gemini answer gave (:data:`GEMINI_THOUGHT_PREFIX`/:data:`GEMINI_TEXT_PREFIX` signatures) go back as
    they came; another vendor's reasoning, or ``reasoning_content`` alone, goes as unsigned thought text.
    A redacted block (Anthropic's encrypted reasoning) has no counterpart: a 400 naming it.
    """
    blocks = msg.get("thinking_blocks")
    if blocks is None:
        text = reasoning_of(msg)
        return ([{"text": text, "thought": True}] if text else []), None
    parts, text_sig = [], None
    for j, block in enumerate(check_thinking_blocks(blocks, f"messages[{i}].thinking_blocks")):
        if block["type"] == "redacted_thinking":
            raise TranslationError(f"messages[{i}].thinking_blocks[{j}]",
                                   "a redacted_thinking block (Anthropic's encrypted reasoning) can only go back to "
                                   "an Anthropic or Bedrock provider; this one is Gemini")
        sig = block.get("signature") or ""
        if sig.startswith(GEMINI_TEXT_PREFIX):
            text_sig = sig[len(GEMINI_TEXT_PREFIX):]
            continue
        part: dict = {"text": block["thinking"], "thought": True}
        if sig.startswith(GEMINI_THOUGHT_PREFIX):
            part["thoughtSignature"] = sig[len(GEMINI_THOUGHT_PREFIX):]
        parts.append(part)
    return parts, text_sig


# ---------------------------------------------------------------------------------------------------------
# request: OpenAI -> Gemini


def _text_parts(content, param: str) -> list[dict]:
    return [{"text": t} for t in text_parts(content, param) if t]


def _data_url(url, param: str) -> dict:
    if not isinstance(url, str) or not url:
        raise TranslationError(param, "the url must be a non-empty string")
    if not url.startswith("data:"):
        raise TranslationError(param, "the Gemini API takes images and files inline: send a base64 data URL "
                                      "(data:<media type>;base64,<data>), not a link")
    media_type, data = data_url_parts(url, param)
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _user_parts(content, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content}]
    parts = []
    for kind, value, p, part in user_parts(content, param):
        if kind == "text":
            parts.append({"text": value})
        elif kind == "image_url":
            parts.append(_data_url(value, f"{p}.image_url"))
        elif kind == "file":
            parts.append(_data_url(value.get("file_data"), f"{p}.file"))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            fmt = audio.get("format")
            if not isinstance(audio.get("data"), str) or fmt not in ("wav", "mp3"):
                raise TranslationError(f"{p}.input_audio", "input_audio needs base64 data and a format (wav or mp3)")
            parts.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": audio["data"]}})
        else:
            raise unsupported_part(kind, p)
    return parts


def _push(out: list, role: str, parts: list) -> None:
    if not parts:
        return
    if out and out[-1]["role"] == role:
        out[-1]["parts"].extend(parts)
    else:
        out.append({"role": role, "parts": list(parts)})


def _tool_response(content, param: str) -> dict:
    """A tool message's content as a ``functionResponse.response`` object: a JSON object stays itself, anything
    else is ``{"output": text}`` (the key Gemini's function-calling guide names for a function's output)."""
    parts = _text_parts(content, param)
    text = "".join(p["text"] for p in parts)
    value = loads_or_none(text)
    return value if isinstance(value, dict) else {"output": text}


_DROPPED_SILENTLY = ("user", "stream_options", "parallel_tool_calls", "service_tier", "store", "metadata",
                     "prediction", "modalities", "audio", "logit_bias")


def _thinking_config(body: dict) -> dict | None:
    """Gemini's ``thinkingConfig`` for the canonical ``thinking`` (Anthropic's object) or ``reasoning_effort``.

    Thinking asked for comes back as thought summaries (``includeThoughts``), the budget as Anthropic's or
    :data:`~.reasoning.EFFORT_BUDGETS`' (adaptive thinking is Gemini's dynamic budget, -1); ``none`` and
    ``minimal`` efforts and disabled thinking are a budget of 0.
    """
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        kind = thinking.get("type")
        if kind == "disabled":
            return {"thinkingBudget": 0}
        if kind == "adaptive":
            return {"includeThoughts": True, "thinkingBudget": -1}
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                raise TranslationError("thinking.budget_tokens", "budget_tokens must be a non-negative integer")
            return {"includeThoughts": True, "thinkingBudget": budget}
        raise TranslationError("thinking.type", "thinking.type must be enabled, disabled or adaptive")
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise TranslationError("reasoning_effort", "reasoning_effort must be one of " + ", ".join(EFFORT_BUDGETS))
    budget = EFFORT_BUDGETS[effort] or 0
    return {"includeThoughts": True, "thinkingBudget": budget} if budget else {"thinkingBudget": 0}


def openai_to_gemini_request(body: dict) -> dict:
    """Build a Gemini ``generateContent`` body (the model goes in the URL) from an OpenAI chat request.

    Raises :class:`TranslationError` naming the field when the request cannot be expressed.
    """
    system: list[dict] = []
    contents: list[dict] = []
    call_names: dict[str, str] = {}
    for i, msg in chat_messages(body):
        role = msg.get("role")
        content = msg.get("content")
        if role == "user":
            _push(contents, "user", _user_parts(content, f"messages[{i}].content"))
        elif role == "assistant":
            parts, text_sig = _model_parts(msg, i)
            texts = _text_parts(content, f"messages[{i}].content")
            if text_sig and texts:
                texts[-1]["thoughtSignature"] = text_sig
            parts.extend(texts)
            for j, call in enumerate(msg.get("tool_calls") or ()):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise TranslationError(f"messages[{i}].tool_calls[{j}].function", "a tool call needs a function name")
                call_id = call.get("id")
                signature = None
                if isinstance(call_id, str) and call_id:
                    call_names[call_id] = fn["name"]
                    signature = split_call_id(call_id)[1]
                if signature is None:  # Google's own OpenAI-compatible endpoint puts it here
                    extra = call.get("extra_content")
                    google = extra.get("google") if isinstance(extra, dict) else None
                    signature = _signature_of(google) if isinstance(google, dict) else None
                part = {"functionCall": {"name": fn["name"], "args": tool_arguments(
                    fn.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments")}}
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            _push(contents, "model", parts)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise TranslationError(f"messages[{i}].tool_call_id", "tool messages need a tool_call_id")
            name = call_names.get(call_id)
            if name is None:
                raise TranslationError(f"messages[{i}].tool_call_id", f"no earlier assistant tool call has the id "
                                       f"{call_id!r}; Gemini needs the name of the function a result answers")
            _push(contents, "user", [{"functionResponse": {
                "name": name, "response": _tool_response(content, f"messages[{i}].content")}}])
        elif role in ("system", "developer"):
            system.extend(_text_parts(content, f"messages[{i}].content"))
        else:
            raise TranslationError(f"messages[{i}].role", f"role {role!r} is not supported")
    if not contents:
        raise TranslationError("messages", "the conversation needs at least one user or assistant message")

    req: dict = {"contents": contents}
    if system:
        req["systemInstruction"] = {"parts": system}

    tools = body.get("tools")
    tool_choice = body.get("tool_choice")
    if tools:
        declarations = []
        for k, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not fn.get("name"):
                raise TranslationError(f"tools[{k}]", "only function tools with a name are supported")
            decl = {"name": fn["name"]}
            if fn.get("description"):
                decl["description"] = fn["description"]
            params = fn.get("parameters")
            if params:
                converted = json_schema_to_gemini(params, f"tools[{k}].function.parameters")
                if converted.get("type") == "OBJECT" and not converted.get("properties"):
                    converted = None  # Gemini refuses an OBJECT without properties; no parameters means none
                if converted:
                    decl["parameters"] = converted
            declarations.append(decl)
        req["tools"] = [{"functionDeclarations": declarations}]
        mode = None
        if tool_choice == "auto":
            mode = {"mode": "AUTO"}
        elif tool_choice == "none":
            mode = {"mode": "NONE"}
        elif tool_choice == "required":
            mode = {"mode": "ANY"}
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            mode = {"mode": "ANY", "allowedFunctionNames": [tool_choice["function"].get("name")]}
        elif tool_choice is not None:
            raise TranslationError("tool_choice", "tool_choice must be auto, none, required or a named function")
        if mode is not None:
            req["toolConfig"] = {"functionCallingConfig": mode}

    config: dict = {}
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                         ("n", "candidateCount")):
        value = body.get(ours)
        if value is not None:
            config[theirs] = value
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    if body.get("logprobs"):
        config["responseLogprobs"] = True
        if body.get("top_logprobs"):
            config["logprobs"] = body["top_logprobs"]
    thinking = _thinking_config(body)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            config["responseMimeType"] = "application/json"
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            config["responseMimeType"] = "application/json"
            if isinstance(spec.get("schema"), dict):
                config["responseSchema"] = json_schema_to_gemini(spec["schema"], "response_format.json_schema.schema")
        elif kind not in (None, "text"):
            raise TranslationError("response_format.type", f"response_format {kind!r} is not supported")
    if config:
        req["generationConfig"] = config
    return req


def openai_to_gemini_embeddings(body: dict, model: str) -> dict:
    """An OpenAI embeddings body as ``batchEmbedContents``: one request per input string."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise TranslationError("input", "a gemini provider embeds strings: input must be a string or an array of strings")
    one: dict = {"model": f"models/{model}"}
    dims = body.get("dimensions")
    if dims is not None:
        one["outputDimensionality"] = dims
    return {"requests": [{**one, "content": {"parts": [{"text": s}]}} for s in inputs]}


# ---------------------------------------------------------------------------------------------------------
# response: Gemini -> OpenAI

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}


def _finish(reason, called: bool) -> str:
    mapped = _FINISH_REASONS.get(reason, "stop")
    return "tool_calls" if called and mapped == "stop" else mapped


def gemini_usage(meta) -> dict:
    """Gemini's ``usageMetadata`` as OpenAI's ``usage`` (see the module docstring for what is counted where)."""
    meta = meta if isinstance(meta, dict) else {}
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    thoughts = meta.get("thoughtsTokenCount") or 0
    completion = (meta.get("candidatesTokenCount") or 0) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": meta.get("cachedContentTokenCount") or 0},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


#: The counts of ``usageMetadata`` the gateway keeps (checked by the adapter where they enter).
USAGE_COUNTS = ("promptTokenCount", "toolUsePromptTokenCount", "thoughtsTokenCount", "candidatesTokenCount",
                "cachedContentTokenCount")


def _call_id(name: str, args_text: str, index: int, position: int) -> str:
    digest = hashlib.blake2b(f"{name}\x00{args_text}\x00{index}\x00{position}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


class PromptBlocked(Exception):
    """Gemini refused the prompt itself (``promptFeedback.blockReason``): the request's fault, a 400."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message or (f"the prompt was blocked by the Gemini API's safety filters (blockReason "
                                   f"{reason}); rephrase it and retry")

    def error_body(self) -> UpstreamErrorBody:
        return UpstreamErrorBody(self.message, "invalid_request_error", "content_filter", "messages", "gemini")


def _blocked(doc: dict) -> PromptBlocked | None:
    feedback = doc.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        reason = str(feedback["blockReason"])[:64]
        message = feedback.get("blockReasonMessage")
        return PromptBlocked(reason, message[:500] if isinstance(message, str) and message else None)
    return None


def _tool_call(part: dict, index: int, position: int) -> dict:
    """A ``functionCall`` part (the candidate's ``position``-th call) as an OpenAI tool call; its thought
    signature rides in the id."""
    fc = part["functionCall"]
    args = orjson.dumps(fc.get("args") or {}).decode()
    name = fc.get("name") or ""
    call_id = call_id_signature(fc.get("id") or _call_id(name, args, index, position), _signature_of(part))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _message_of(content, index: int) -> tuple[dict, bool]:
    """A candidate's ``content`` as an OpenAI assistant message; True when it called a function."""
    texts, thoughts, calls = [], [], []
    tracker = _Thoughts()
    blocks: dict[int, dict] = {}
    for part in (content or {}).get("parts") or ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("functionCall"), dict):
            tracker.open = False
            calls.append(_tool_call(part, index, len(calls)))
            continue
        frag = tracker.fragment(part)
        if frag is not None:
            block = blocks.setdefault(frag["index"], {"type": "thinking", "thinking": "", "signature": ""})
            block["thinking"] += frag["thinking"]
            block["signature"] += frag.get("signature", "")
        if "text" in part:
            (thoughts if part.get("thought") else texts).append(part.get("text") or "")
    message: dict = {"role": "assistant", "content": "".join(texts) if texts or not calls else None, "refusal": None}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if blocks:
        message["thinking_blocks"] = [blocks[k] for k in sorted(blocks)]
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def gemini_logprobs(result) -> list[dict] | None:
    """A candidate's ``logprobsResult`` as OpenAI's ``logprobs.content`` entries (None when there is none)."""
    if not isinstance(result, dict):
        return None
    chosen = result.get("chosenCandidates")
    if not isinstance(chosen, list):
        return None
    tops = result.get("topCandidates") if isinstance(result.get("topCandidates"), list) else []
    entries = []
    for step, cand in enumerate(chosen):
        if not isinstance(cand, dict):
            continue
        token = cand.get("token") if isinstance(cand.get("token"), str) else ""
        top = tops[step].get("candidates") if step < len(tops) and isinstance(tops[step], dict) else None
        entries.append({"token": token, "logprob": _logprob_value(cand), "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t.get("token") or "", "logprob": _logprob_value(t),
                                          "bytes": list((t.get("token") or "").encode())}
                                         for t in top or () if isinstance(t, dict) and isinstance(t.get("token", ""), str)]})
    return entries


def _logprob_value(cand: dict) -> float:
    value = cand.get("logProbability")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def gemini_to_openai_response(doc: dict, *, model: str, request_id: str, created: int) -> dict:
    """A ``GenerateContentResponse`` as a ``chat.completion``; raises :class:`PromptBlocked` for a blocked prompt."""
    candidates = doc.get("candidates")
    if not candidates:
        blocked = _blocked(doc)
        if blocked is not None:
            raise blocked
        candidates = []
    choices = []
    for k, cand in enumerate(candidates):
        if not isinstance(cand, dict):
            continue
        index = cand.get("index") if isinstance(cand.get("index"), int) else k
        message, called = _message_of(cand.get("content"), index)
        logprobs = gemini_logprobs(cand.get("logprobsResult"))
        choices.append({"index": index, "message": message,
                        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                        "finish_reason": _finish(cand.get("finishReason"), called)})
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": gemini_usage(doc.get("usageMetadata")),
    }


@attrs.define
class GeminiToOpenAIStream(ChunkTranslator):
    """Translate ``streamGenerateContent?alt=sse`` events into ``chat.completion.chunk`` dicts; one per response.

    Feed each event's decoded data in order. Each candidate's first chunk carries ``delta.role``; text parts
    become ``content`` deltas, thought parts ``reasoning_content``, a ``functionCall`` part a whole tool call
    (Gemini sends its arguments complete); a candidate's ``finishReason`` gives its finishing chunk.
    ``usageMetadata`` (cumulative, on every event) is kept; :meth:`end` gives the usage chunk when asked for
    (``include_usage``) and says whether the stream ended properly: every candidate finished. Gemini has no
    end marker of its own: its stream ends with the HTTP body.
    """

    _started: set = attrs.Factory(set)
    _finished: set = attrs.Factory(set)
    _tool_index: dict = attrs.Factory(dict)
    _called: set = attrs.Factory(set)
    _thoughts: dict = attrs.Factory(dict)

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        return self._chunk_of([{"index": index, "delta": delta,
                                 "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                                 "finish_reason": finish_reason}])

    def feed(self, doc: dict) -> list[dict]:
        meta = doc.get("usageMetadata")
        if isinstance(meta, dict):
            self.usage = gemini_usage(meta)
        candidates = doc.get("candidates")
        if not candidates:
            blocked = _blocked(doc)
            if blocked is not None:
                raise blocked
            return []
        out = []
        for k, cand in enumerate(candidates):
            if not isinstance(cand, dict):
                continue
            index = cand.get("index") if isinstance(cand.get("index"), int) else k
            first = index not in self._started
            if first:
                self._started.add(index)
                out.append(self._chunk(index, {"role": "assistant", "content": ""}))
            thoughts = self._thoughts.get(index)
            if thoughts is None:
                thoughts = self._thoughts[index] = _Thoughts()
            # An event's logprobs are those of its tokens: they go on its first text chunk (or one of their own).
            logprobs = gemini_logprobs(cand.get("logprobsResult"))
            for part in (cand.get("content") or {}).get("parts") or ():
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("functionCall"), dict):
                    thoughts.open = False
                    calls = self._tool_index.setdefault(index, 0)
                    self._tool_index[index] = calls + 1
                    self._called.add(index)
                    out.append(self._chunk(index, {"tool_calls": [{"index": calls, **_tool_call(part, index, calls)}]}))
                    continue
                delta: dict = {}
                text = part.get("text") if isinstance(part.get("text"), str) else ""
                if text:
                    delta["reasoning_content" if part.get("thought") else "content"] = text
                frag = thoughts.fragment(part)
                if frag is not None:
                    delta["thinking_blocks"] = [frag]
                if delta:
                    out.append(self._chunk(index, delta, logprobs=logprobs if "content" in delta else None))
                    if "content" in delta:
                        logprobs = None
            if logprobs:
                out.append(self._chunk(index, {}, logprobs=logprobs))
            reason = cand.get("finishReason")
            if reason and index not in self._finished:
                self._finished.add(index)
                out.append(self._chunk(index, {}, _finish(reason, index in self._called)))
        return out

    @property
    def complete(self) -> bool:
        """Every candidate that started has its finish reason: the stream said all it had to."""
        return bool(self._finished) and self._finished >= self._started

    def end(self) -> list[dict]:
        """The chunks after the last event: the usage chunk, when the client asked for it."""
        if not self.include_usage:
            return []
        return [self._usage_chunk(self.usage or gemini_usage(None))]


def gemini_to_openai_embeddings(doc: dict, model: str, encoding_format: str | None = None,
                                prompt_tokens: int = 0) -> dict:
    """``batchEmbedContents``'s ``{"embeddings": [{"values": [...]}]}`` as OpenAI's embeddings list.

    Gemini reports no token counts for embeddings; ``prompt_tokens`` is the caller's estimate.
    """
    data = []
    for i, item in enumerate(doc.get("embeddings") or ()):
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(values, list):
            values = []
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        else:
            vector = values
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def gemini_model_ids(doc: dict) -> list[str]:
    """The model ids of a ``models.list`` page (``models/gemini-2.5-flash`` -> ``gemini-2.5-flash``)."""
    ids = []
    for m in doc.get("models") or ():
        name = m.get("name") if isinstance(m, dict) else None
        if isinstance(name, str) and name:
            ids.append(name.removeprefix("models/"))
    return ids


# ---------------------------------------------------------------------------------------------------------
# errors

# google.rpc.Code names as Gemini sends them in ``error.status``, in OpenAI's type vocabulary.
_STATUS_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "not_found_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "CANCELLED": "api_error",
    "INTERNAL": "api_error",
    "UNAVAILABLE": "server_error",
    "DEADLINE_EXCEEDED": "timeout_error",
}
# Gemini API keys are "AIza" and 35 more characters; scrubbed wherever upstream text is kept.
_GOOGLE_KEY = re.compile(r"AIza[0-9A-Za-z_-]{20,}")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


def scrub_google(text: str, secrets=()) -> str:
    return _GOOGLE_KEY.sub("[redacted]", scrub(text, secrets))


@attrs.frozen
class GeminiError:
    """A Gemini error response, read: the status the gateway treats it as, the client's view, the pause asked."""

    status: int
    detail: UpstreamErrorBody
    retry_after: float | None = None


def gemini_error(status: int, body: bytes, secrets=()) -> GeminiError:
    """Read Gemini's ``{"error": {"code", "message", "status", "details"}}``.

    ``status`` (google.rpc's name) becomes the OpenAI type and the ``code``; a ``google.rpc.RetryInfo``
    ``retryDelay`` the pause; an ``ErrorInfo`` reason ``API_KEY_INVALID`` (which Gemini sends as a 400) is
    treated as the 401 it is, so the gateway reports its own credential refused rather than blaming the client.
    """
    doc = loads_or_none(body)
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        return GeminiError(status, UpstreamErrorBody(scrub_google(text, secrets) or "no details"))
    message = err.get("message")
    message = scrub_google(message[:2000], secrets) if isinstance(message, str) and message else "no details"
    rpc = err.get("status") if isinstance(err.get("status"), str) else None
    retry_after = None
    for d in err.get("details") or ():
        if not isinstance(d, dict):
            continue
        kind = d.get("@type") or ""
        if kind.endswith("google.rpc.ErrorInfo") and d.get("reason") == "API_KEY_INVALID":
            status = 401
        if kind.endswith("google.rpc.RetryInfo") and isinstance(d.get("retryDelay"), str):
            m = _DURATION.match(d["retryDelay"])
            if m:
                retry_after = float(m.group(1))
    type_ = _STATUS_TYPES.get(rpc or "")
    return GeminiError(status, UpstreamErrorBody(message, type_, rpc[:64].lower() if rpc else None, None, "gemini"),
                       retry_after)


# ---------------------------------------------------------------------------------------------------------
# the other direction, for the fake upstream: Gemini request -> OpenAI chat, OpenAI answer -> Gemini


def _schema_from_gemini(schema):
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out["type"] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: _schema_from_gemini(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = _schema_from_gemini(value)
        elif key == "anyOf" and isinstance(value, list):
            out["anyOf"] = [_schema_from_gemini(v) for v in value]
        elif key != "nullable":
            out[key] = value
    return out


def gemini_request_to_openai(body: dict, model: str) -> dict:
    """A ``generateContent`` body as an OpenAI chat body (the fake upstream answers it with the one fake model).

    Raises :class:`TranslationError` for what the Gemini API refuses (``contents`` missing or malformed).
    """
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise TranslationError("contents", "contents is not specified")
    messages: list[dict] = []
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        text = "".join(p.get("text") or "" for p in system.get("parts") or () if isinstance(p, dict))
        if text:
            messages.append({"role": "system", "content": text})
    pending: dict[str, list[str]] = {}
    counter = 0
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            raise TranslationError(f"contents[{i}].parts", "each content needs a parts array")
        role = content.get("role") or "user"
        if role not in ("user", "model", "function"):
            raise TranslationError(f"contents[{i}].role", f"Please use a valid role: user, model. (got {role!r})")
        texts, calls, results = [], [], []
        for k, part in enumerate(content["parts"]):
            if not isinstance(part, dict):
                raise TranslationError(f"contents[{i}].parts[{k}]", "each part must be an object")
            if "text" in part:
                if not part.get("thought"):
                    texts.append({"type": "text", "text": part["text"]})
            elif "inlineData" in part or "inline_data" in part:
                data = part.get("inlineData") or part.get("inline_data") or {}
                mime = data.get("mimeType") or data.get("mime_type")
                if not isinstance(data.get("data"), str) or not mime:
                    raise TranslationError(f"contents[{i}].parts[{k}].inlineData", "inlineData needs mimeType and data")
                texts.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data['data']}"}})
            elif isinstance(part.get("functionCall"), dict):
                fc = part["functionCall"]
                counter += 1
                call_id = f"call_{counter}"
                pending.setdefault(fc.get("name") or "", []).append(call_id)
                calls.append({"id": call_id, "type": "function", "function": {
                    "name": fc.get("name") or "", "arguments": orjson.dumps(fc.get("args") or {}).decode()}})
            elif isinstance(part.get("functionResponse"), dict):
                fr = part["functionResponse"]
                ids = pending.get(fr.get("name") or "") or []
                call_id = ids.pop(0) if ids else f"call_unmatched_{i}_{k}"
                response = fr.get("response") or {}
                output = response.get("output") if isinstance(response, dict) and len(response) == 1 else None
                results.append({"role": "tool", "tool_call_id": call_id,
                                "content": output if isinstance(output, str) else orjson.dumps(response).decode()})
        if role == "model":
            msg: dict = {"role": "assistant", "content": "".join(t["text"] for t in texts if t["type"] == "text") or None}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        else:
            messages.extend(results)
            if texts:
                messages.append({"role": "user", "content": texts})
    out: dict = {"model": model, "messages": messages}
    config = body.get("generationConfig") or body.get("generation_config") or {}
    if not isinstance(config, dict):
        raise TranslationError("generationConfig", "generationConfig must be an object")
    for theirs, ours in (("temperature", "temperature"), ("topP", "top_p"), ("seed", "seed"),
                         ("maxOutputTokens", "max_tokens"), ("candidateCount", "n"), ("stopSequences", "stop")):
        if config.get(theirs) is not None:
            out[ours] = config[theirs]
    if config.get("responseLogprobs"):
        out["logprobs"] = True
        if config.get("logprobs"):
            out["top_logprobs"] = config["logprobs"]
    elif config.get("logprobs"):
        raise TranslationError("generationConfig.logprobs", "logprobs is only valid if responseLogprobs is true")
    thinking = config.get("thinkingConfig") or config.get("thinking_config")
    if isinstance(thinking, dict) and thinking.get("includeThoughts"):
        budget = thinking.get("thinkingBudget")
        out["thinking"] = ({"type": "adaptive"} if budget in (None, -1)
                           else {"type": "enabled", "budget_tokens": budget})
    if config.get("responseMimeType") == "application/json":
        schema = config.get("responseSchema")
        out["response_format"] = ({"type": "json_schema", "json_schema": {"name": "response", "schema": _schema_from_gemini(schema)}}
                                  if isinstance(schema, dict) else {"type": "json_object"})
    tools = []
    for tool in body.get("tools") or ():
        for decl in (tool.get("functionDeclarations") or tool.get("function_declarations") or ()) if isinstance(tool, dict) else ():
            fn = {"name": decl.get("name")}
            if decl.get("description"):
                fn["description"] = decl["description"]
            fn["parameters"] = _schema_from_gemini(decl.get("parameters") or {"type": "object", "properties": {}})
            tools.append({"type": "function", "function": fn})
    if tools:
        out["tools"] = tools
        mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {})
        kind = mode.get("mode")
        if kind == "NONE":
            out["tool_choice"] = "none"
        elif kind == "ANY":
            names = mode.get("allowedFunctionNames") or []
            out["tool_choice"] = ({"type": "function", "function": {"name": names[0]}} if len(names) == 1 else "required")
    return out


_OPENAI_TO_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "content_filter": "SAFETY"}


def openai_logprobs_to_gemini(entries) -> dict:
    """OpenAI ``logprobs.content`` entries as Gemini's ``logprobsResult`` (the fake's answers carry them)."""
    chosen = [{"token": e["token"], "logProbability": e["logprob"]} for e in entries]
    result: dict = {"chosenCandidates": chosen, "logProbabilitySum": round(sum(e["logprob"] for e in entries), 4)}
    if any(e.get("top_logprobs") for e in entries):
        result["topCandidates"] = [{"candidates": [{"token": t["token"], "logProbability": t["logprob"]}
                                                   for t in e.get("top_logprobs") or ()]} for e in entries]
    return result


def openai_answer_to_gemini(choice_texts, *, finish: str, tool_call=None, index: int = 0, thought: str | None = None,
                            signature: str | None = None, logprobs=None) -> dict:
    """One Gemini candidate from the fake's answer: its thought summary, its text (or one function call), its
    finish reason; ``signature`` goes where Gemini puts it (the function call, else the last text part)."""
    parts = [{"text": thought, "thought": True}] if thought else []
    if tool_call is not None:
        parts.append({"functionCall": {"name": tool_call[0], "args": orjson.loads(tool_call[1])}})
    else:
        parts.extend({"text": t} for t in choice_texts)
    if signature and parts:
        parts[-1]["thoughtSignature"] = signature
    cand: dict = {"content": {"parts": parts, "role": "model"}, "index": index}
    if logprobs is not None:
        cand["logprobsResult"] = openai_logprobs_to_gemini(logprobs)
    if finish:
        cand["finishReason"] = _OPENAI_TO_GEMINI_FINISH.get(finish, "STOP")
    return cand
