"""OpenAI's wire format: request validation, the SSE encoding of a stream, and the legacy completions API.

Validation checks what the gateway itself relies on (``model``, ``messages``, ``stream``) and the types of
the common sampling parameters, so that a wrong type is refused here with the field's name (an
:class:`~runestone.wire.errors.InvalidRequest`, a 400) rather than by an upstream in its own words. Every
other field passes through untouched to providers that accept it. Integers may be written as integral
floats (``1.0``: a JSON Schema integer) and are normalised to ``int`` in place. The ``runestone`` routing
object is taken out of the body and handed back raw; routing parses it.

The stream encoders frame the pipeline's chunk payloads as ``data: {chunk}\\n\\n`` events, one write per
upstream read, ending with ``data: [DONE]`` or, after a failure, an error event and no ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import InvalidRequest, openai_error_object

__all__ = ["DONE", "ChatShape", "parse_json_object", "sse_error_event", "sse_chunks", "validate_chat",
           "validate_embeddings"]

DONE = b"data: [DONE]\n\n"

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# field -> (accepted types, description for the message)
_TYPED: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": ((int, float), "a number between 0 and 2"),
    "top_p": ((int, float), "a number between 0 and 1"),
    "n": ((int,), "an integer >= 1"),
    "max_tokens": ((int,), "an integer >= 1"),
    "max_completion_tokens": ((int,), "an integer >= 1"),
    "presence_penalty": ((int, float), "a number between -2 and 2"),
    "frequency_penalty": ((int, float), "a number between -2 and 2"),
    "seed": ((int,), "an integer"),
    "user": ((str,), "a string"),
    "stop": ((str, list), "a string or an array of up to 4 strings"),
    "tools": ((list,), "an array of tool objects"),
    "tool_choice": ((str, dict), "\"none\", \"auto\", \"required\" or an object naming a function"),
    "response_format": ((dict,), "an object such as {\"type\": \"json_object\"}"),
    "logit_bias": ((dict,), "an object mapping token ids to numbers"),
    "metadata": ((dict,), "an object of string pairs"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "logprobs": ((bool,), "a boolean"),
    "top_logprobs": ((int,), "an integer between 0 and 20"),
}
_RANGES = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "n": (1, 128),
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_logprobs": (0, 20),
}


_INTEGERS = frozenset(name for name, (types, _) in _TYPED.items() if types == (int,))


def bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(param, message, "invalid_value" if "must" in message else None)


def parse_json_object(raw: bytes) -> dict:
    if not raw:
        raise InvalidRequest(None, "the request body is empty; send a JSON object", "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(None, f"the request body is not valid JSON ({exc.msg}, at byte {exc.pos}); send a "
                             "JSON object encoded as UTF-8", "invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest(None, f"the request body must be a JSON object, not a JSON {kind_of(body)}",
                             "invalid_json")
    return body


def integral(value: Any) -> Any:
    """``value`` as an int when it is an integral float (``1.0``), else unchanged."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


class ChatShape:
    """What the request path needs to know of a validated chat body."""

    __slots__ = ("model", "stream", "include_usage", "routing", "capability")

    def __init__(self, model: str, stream: bool, include_usage: bool, routing: Any,
                 capability: frozenset[str]) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        #: The raw ``runestone`` routing object the client sent (None if none), taken out of the body.
        self.routing = routing
        #: What the body needs of a provider: "tools", "vision" (streaming is served by every provider).
        self.capability = capability


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model", "'model' is required: name a model (GET /v1/models lists them) or a failover group")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", f"'model' must be a non-empty string, not a {kind_of(model)}")
    return model


def check_typed(body: dict) -> None:
    """The common sampling fields' types and ranges; integral floats become ints in place."""
    for name, value in body.items():
        spec = _TYPED.get(name)
        if spec is None or value is None:
            continue
        types, what = spec
        if name in _INTEGERS and isinstance(value, float):
            value = integral(value)
            if isinstance(value, int):
                body[name] = value
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise bad(name, f"'{name}' must be {what}, not a {kind_of(value)}")
        rng = _RANGES.get(name)
        if rng is not None:
            low, high = rng
            if value < low or (high is not None and value > high):
                raise bad(name, f"'{name}' must be {what}; got {value}")
    stop = body.get("stop")
    if isinstance(stop, list) and (len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise bad("stop", "'stop' must be a string or an array of up to 4 strings")


def validate_chat(body: dict) -> ChatShape:
    """Validate a chat.completions body in place (``runestone`` is removed); 400 naming the field."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "'messages' is required: an array of {\"role\", \"content\"} objects")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty array of message objects")
    vision = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object, not a {kind_of(msg)}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}; "
                      f"got {role!r}" if isinstance(role, str) else f"messages[{i}].role is required")
        content = msg.get("content")
        if content is None:
            # Only an assistant turn may omit content (it carried tool calls, or a refusal).
            if role != "assistant":
                raise bad(f"messages[{i}].content", f"messages[{i}].content is required for role {role!r}")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad(f"messages[{i}].content[{j}]",
                              f"messages[{i}].content[{j}] must be an object with a 'type' (e.g. \"text\")")
                if part["type"] in ("image_url", "input_image"):
                    vision = True
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content",
                      f"messages[{i}].content must be a string or an array of content parts, not a {kind_of(content)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be a boolean, not a {kind_of(stream)}")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}")
        iu = options.get("include_usage", False)
        if not isinstance(iu, bool):
            raise bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
        include_usage = iu and stream
    check_typed(body)
    routing = body.pop("runestone", None)
    caps = []
    if body.get("tools"):
        caps.append("tools")
    if vision:
        caps.append("vision")
    return ChatShape(model, stream, include_usage, routing, frozenset(caps))


def validate_embeddings(body: dict) -> tuple[str, Any]:
    """Validate an embeddings body in place; returns the model and the raw ``runestone`` object."""
    model = _model(body)
    inp = body.get("input")
    if inp is None:
        raise bad("input", "'input' is required: a string or an array of strings")
    if isinstance(inp, str):
        if not inp:
            raise bad("input", "'input' must not be empty")
    elif isinstance(inp, list):
        if not inp:
            raise bad("input", "'input' must not be an empty array")
        if len(inp) > 2048:
            raise bad("input", "'input' may hold at most 2048 items")
        for i, item in enumerate(inp):
            if isinstance(item, str):
                continue
            if isinstance(item, int) and not isinstance(item, bool):
                continue  # an array of token ids
            if isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                continue
            raise bad(f"input[{i}]", f"input[{i}] must be a string or an array of token ids")
    else:
        raise bad("input", f"'input' must be a string or an array of strings, not a {kind_of(inp)}")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be \"float\" or \"base64\"")
    dims = integral(body.get("dimensions"))
    if dims is not None and isinstance(dims, int):
        body["dimensions"] = dims
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192):
        raise bad("dimensions", "'dimensions' must be an integer between 1 and 8192")
    return model, body.pop("runestone", None)


# -- streams ------------------------------------------------------------------------------------------

def sse_chunks(payloads: list, last: bool) -> bytes:
    """One upstream read's chunk payloads as OpenAI SSE events (and ``[DONE]`` when it was the last)."""
    if not payloads:
        return DONE if last else b""
    return b"".join((b"data: ", b"\n\ndata: ".join(payloads), _THEN_DONE if last else b"\n\n"))


_THEN_DONE = b"\n\n" + DONE


def sse_error_event(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """The honest end of a failed stream: an error event the SDKs raise on, and no ``[DONE]`` after it."""
    return b"data: " + orjson.dumps({"error": openai_error_object(message, type, param, code)}) + b"\n\n"
