"""Request validation for the OpenAI-compatible routes: clear 400s that name the field, nothing else.

Validation checks what the gateway itself relies on (``model``, ``messages``, ``stream``, the
``runestone`` routing object) and the types of the common sampling parameters, so that a wrong type is
refused here with the field's name rather than by an upstream in its own words. Every other field passes
through untouched to providers that accept it.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..routing.executor import GatewayError
from ..routing.policies import NO_REQUIREMENTS, Requirements, parse_requirements

__all__ = ["parse_json_object", "validate_chat", "validate_embeddings", "ChatShape"]

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


def bad(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value" if "must" in message else None)


def parse_json_object(raw: bytes) -> dict:
    if not raw:
        raise GatewayError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the request body is not valid JSON ({exc.msg}, at byte {exc.pos}); send a JSON "
                           "object encoded as UTF-8", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, f"the request body must be a JSON object, not a JSON {_kind(body)}",
                           code="invalid_json")
    return body


def _kind(value: Any) -> str:
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

    __slots__ = ("model", "stream", "include_usage", "requirements", "capability")

    def __init__(self, model: str, stream: bool, include_usage: bool, requirements: Requirements,
                 capability: frozenset[str]) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self.requirements = requirements
        self.capability = capability


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model", "'model' is required: name a model (GET /v1/models lists them) or a failover group")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", f"'model' must be a non-empty string, not a {_kind(model)}")
    return model


def _requirements(body: dict) -> Requirements:
    extra = body.pop("runestone", None)
    if extra is None:
        return NO_REQUIREMENTS
    try:
        return parse_requirements(extra)
    except (ValueError, TypeError) as exc:
        raise bad("runestone", f"invalid 'runestone' routing object: {exc}") from None


def _check_typed(body: dict) -> None:
    for name, value in body.items():
        spec = _TYPED.get(name)
        if spec is None or value is None:
            continue
        types, what = spec
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise bad(name, f"'{name}' must be {what}, not a {_kind(value)}")
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
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object, not a {_kind(msg)}")
        role = msg.get("role")
        if role not in _ROLES:
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
                      f"messages[{i}].content must be a string or an array of content parts, not a {_kind(content)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be a boolean, not a {_kind(stream)}")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "'stream_options' must be an object such as {\"include_usage\": true}")
        iu = options.get("include_usage", False)
        if not isinstance(iu, bool):
            raise bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
        include_usage = iu and stream
    _check_typed(body)
    requirements = _requirements(body)
    caps = []
    if body.get("tools"):
        caps.append("tools")
    if vision:
        caps.append("vision")
    if stream:
        caps.append("streaming")
    return ChatShape(model, stream, include_usage, requirements, frozenset(caps))


def validate_embeddings(body: dict) -> tuple[str, Requirements]:
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
        raise bad("input", f"'input' must be a string or an array of strings, not a {_kind(inp)}")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be \"float\" or \"base64\"")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192):
        raise bad("dimensions", "'dimensions' must be an integer between 1 and 8192")
    return model, _requirements(body)
