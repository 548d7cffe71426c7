"""The fake model: what the in-process ``fake`` provider and ``runestone fake-provider`` answer, and how
an answer is written in OpenAI's wire format.

Both fakes must answer like a well-mannered model without being one, and agree with each other: the
same request always gets the same answer. :func:`fake_answer` takes an OpenAI chat body (the Anthropic
side of the fake server translates its body first) and honours ``n``, ``stop``, ``max_tokens``/
``max_completion_tokens`` (finish ``length``), ``logprobs``/``top_logprobs``, ``response_format``
(``json_object``: a JSON object; ``json_schema``: an instance of the schema, see :mod:`.fake_schema`),
``seed``, ``tools``, ``tool_choice`` and reasoning (``reasoning_effort``, or Anthropic's ``thinking``, see
:func:`fake_reasoning`). With ``tool_choice`` ``auto`` (or absent) it calls a tool only
when the last turn is the user's, and answers in text after a tool result, so agent loops end. Its text
is ``"Echo: "``, the first words of the last user message (or tool result), and filler words picked by a
checksum of them. Token counts come from the gateway's one estimate (:mod:`runestone.wire.token_estimate`),
so ``usage``, ``logprobs`` and the gateway's ``count_tokens`` estimate agree. A request a real API would refuse raises :class:`FakeRequestError`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import random
import struct
import zlib
from collections import OrderedDict
from typing import Any

import attrs
import orjson

from ..wire.token_estimate import estimate_input_tokens, estimate_text_tokens, split_tokens
from .fake_schema import schema_instance

__all__ = [
    "FakeAnswer",
    "FakeChoice",
    "FakeRequestError",
    "FakeToolCall",
    "fake_answer",
    "fake_embedding",
    "fake_embeddings",
    "fake_reasoning",
    "fake_reply_chunks",
    "thinking_signature",
    "check_thinking",
    "openai_completion",
    "openai_stream_frames",
]

_FILLER = (
    "the quick brown fox jumps over a lazy dog while runes glow softly on ancient stone "
    "and patient ravens count every word twice before the river carries them home"
).split()

_MIN_WORDS = 12
_ECHO_WORDS = 8
_MAX_N = 128
_MAX_TOP_LOGPROBS = 20
_DONE = b"data: [DONE]\n\n"


class FakeRequestError(Exception):
    """A request the real API would answer with a 400: ``param`` names the field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@attrs.frozen
class FakeToolCall:
    id: str
    name: str
    #: The arguments as the JSON text a model writes.
    arguments: str
    #: ``arguments`` in the pieces a stream sends.
    pieces: tuple[str, ...]


@attrs.frozen
class FakeChoice:
    """One choice of an answer: text in stream pieces (empty for a tool call) or one tool call."""

    index: int
    pieces: tuple[str, ...]
    #: OpenAI logprob entries per piece (one per token), or None when logprobs were not asked for.
    piece_logprobs: tuple[tuple[dict, ...], ...] | None
    tool_call: FakeToolCall | None
    #: ``stop``, ``length`` or ``tool_calls``.
    finish_reason: str
    #: The stop string that ended the text, if one did.
    stop_sequence: str | None
    completion_tokens: int
    #: The reasoning before the answer (when asked for), and whether it is redacted (Anthropic's encrypted form).
    reasoning: str | None = None
    redacted: bool = False

    @property
    def reasoning_tokens(self) -> int:
        return estimate_text_tokens(self.reasoning) if self.reasoning else 0

    @property
    def reasoning_pieces(self) -> tuple[str, ...]:
        """The reasoning in the pieces a stream sends (none when redacted: its text is never shown)."""
        if not self.reasoning or self.redacted:
            return ()
        return tuple("".join(g) for g in _group(split_tokens(self.reasoning), 3))

    @property
    def thinking_block(self) -> dict | None:
        """The reasoning as Anthropic's signed block (``thinking`` or ``redacted_thinking``), or None."""
        if not self.reasoning:
            return None
        if self.redacted:
            return {"type": "redacted_thinking", "data": redacted_data(self.reasoning)}
        return {"type": "thinking", "thinking": self.reasoning, "signature": thinking_signature(self.reasoning)}

    @property
    def text(self) -> str | None:
        return None if self.tool_call else "".join(self.pieces)

    def openai_logprobs(self) -> dict | None:
        if self.piece_logprobs is None or self.tool_call:
            return None
        return {"content": [e for piece in self.piece_logprobs for e in piece], "refusal": None}


@attrs.frozen
class FakeAnswer:
    choices: tuple[FakeChoice, ...]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        """Output tokens, reasoning included (as every vendor counts and bills them)."""
        return sum(c.completion_tokens + c.reasoning_tokens for c in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.reasoning_tokens for c in self.choices)

    def openai_usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }


# -- reading the request ---------------------------------------------------------------------------------


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prompt_text(messages) -> str:
    """The text the fake answers: the last user message or tool result."""
    for msg in reversed(messages or ()):
        if isinstance(msg, dict) and msg.get("role") in ("user", "tool"):
            return _content_text(msg.get("content"))
    return ""


def _last_role(messages) -> str | None:
    for msg in reversed(messages or ()):
        if isinstance(msg, dict):
            return msg.get("role")
    return None


def _positive_int(body: dict, name: str, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        raise FakeRequestError(name, f"Invalid value for '{name}': expected an integer >= 1{bound}.")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise FakeRequestError("stop", "Invalid value for 'stop': expected a string or an array of strings.")


def _top_logprobs(body: dict) -> int | None:
    """None when logprobs are off, else how many alternatives each token lists."""
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= _MAX_TOP_LOGPROBS):
        raise FakeRequestError("top_logprobs", f"Invalid value for 'top_logprobs': expected an integer between 0 and {_MAX_TOP_LOGPROBS}.")
    if not body.get("logprobs"):
        if top:
            raise FakeRequestError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        return None
    return top or 0


def _response_format(body: dict) -> tuple[str, dict | None]:
    fmt = body.get("response_format")
    if fmt is None:
        return "text", None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema":
        # Chat nests the schema in "json_schema"; the Responses API's text.format has it flat.
        spec = fmt.get("json_schema") if "json_schema" in fmt or "schema" not in fmt else fmt
        if not isinstance(spec, dict):
            raise FakeRequestError("response_format.json_schema", "Missing required parameter: 'response_format.json_schema'.")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise FakeRequestError("response_format.json_schema.schema", "'response_format.json_schema.schema' must be an object.")
        return kind, schema if schema is not None else {"type": "object"}
    raise FakeRequestError("response_format.type", "Invalid value for 'response_format.type': expected 'text', 'json_object' or 'json_schema'.")


def _tool_name_and_schema(tool) -> tuple[str | None, Any]:
    if not isinstance(tool, dict):
        return None, None
    fn = tool.get("function")
    if isinstance(fn, dict):  # OpenAI chat: {"type": "function", "function": {...}}
        return fn.get("name"), fn.get("parameters")
    # Anthropic {"name", "input_schema"}, or the Responses API's flat {"type": "function", "name", "parameters"}
    return tool.get("name"), tool.get("input_schema", tool.get("parameters"))


def _choose_tool(body: dict, messages) -> tuple[str, Any] | None:
    """The tool the fake calls, or None when it answers in text; see the module docstring."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    mode, forced = "auto", None
    if isinstance(choice, str):
        mode = {"any": "required"}.get(choice, choice)
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("auto", "none"):
            mode = kind
        elif kind == "any":
            mode = "required"
        else:  # {"type": "function", "function": {"name"}}, {"type": "function", "name"}, {"type": "tool", "name"}
            fn = choice.get("function")
            forced = fn.get("name") if isinstance(fn, dict) else choice.get("name")
            mode = "required"
    if mode not in ("auto", "none", "required"):
        raise FakeRequestError("tool_choice", "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a named function.")
    named = [(name, schema) for name, schema in map(_tool_name_and_schema, tools) if isinstance(name, str) and name]
    if mode == "required" and not named:
        raise FakeRequestError("tool_choice", "'tool_choice' requires 'tools' to be set.")
    if forced is not None:
        for name, schema in named:
            if name == forced:
                return name, schema
        raise FakeRequestError("tool_choice", f"Invalid value for 'tool_choice': no function named {forced!r} in 'tools'.")
    if mode == "none" or not named or (mode == "auto" and _last_role(messages) != "user"):
        return None
    prompt = _prompt_text(messages).lower()
    for name, schema in named:  # the tool the user names, else the first one
        if name.lower() in prompt:
            return name, schema
    return named[0]


def _schema_in_messages(messages) -> dict | None:
    """A JSON Schema written into the prompt (as JSON-mode clients such as instructor do), if any."""
    decoder = orjson.loads
    for msg in messages or ():
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user"):
            continue
        text = _content_text(msg.get("content"))
        start = text.find("{")
        tries = 0
        while start >= 0 and tries < 64:
            tries += 1
            end = _matching_brace(text, start)
            if end < 0:
                break
            try:
                value = decoder(text[start:end + 1])
            except orjson.JSONDecodeError:
                start = text.find("{", start + 1)
                continue
            if isinstance(value, dict) and ("properties" in value or value.get("type") == "object" or "$defs" in value):
                return value
            start = text.find("{", end + 1)
    return None


def _matching_brace(text: str, start: int) -> int:
    """The index of the ``}`` closing the ``{`` at ``start`` (strings respected), or -1."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


# -- reasoning ---------------------------------------------------------------------------------------------

#: Anthropic's documented test string: a prompt holding it gets its thinking back redacted.
REDACTED_TRIGGER = "ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_46C9A13E193C177646C7398A98432ECCCE4C1253"
_SIGNING_KEY = b"runestone-fake-thinking"
_REDACTED_MARK = b"fake-redacted:"


def _reasoning_asked(body: dict) -> bool:
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort not in ("none", "minimal"):
        return True
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def fake_reasoning(messages) -> str:
    """The fake's reasoning before an answer: what it was asked, in a sentence."""
    echoed = _prompt_text(messages).split()[:_ECHO_WORDS]
    return "Thinking: the question is " + (" ".join(echoed) or "(nothing)") + "; I answer it plainly."


def _mac(data: bytes) -> bytes:
    return hmac.new(_SIGNING_KEY, data, hashlib.sha256).digest()


def thinking_signature(thinking: str) -> str:
    """The signature the fake gives a thinking block: a MAC of its text, so a changed byte fails to verify."""
    return base64.b64encode(_mac(thinking.encode())).decode()


def redacted_data(thinking: str) -> str:
    payload = _REDACTED_MARK + thinking.encode()
    return base64.b64encode(payload + _mac(payload)).decode()


def check_thinking(messages) -> str | None:
    """Why the thinking blocks of a canonical history are refused (a signature that does not verify), or None."""
    for i, msg in enumerate(messages or ()):
        if not isinstance(msg, dict):
            continue
        for j, block in enumerate(msg.get("thinking_blocks") or ()):
            if not isinstance(block, dict):
                return f"messages.{i}.content.{j}: thinking blocks must be objects"
            if block.get("type") == "thinking":
                text, signature = block.get("thinking"), block.get("signature")
                if not isinstance(text, str) or not isinstance(signature, str) or \
                        not hmac.compare_digest(signature, thinking_signature(text)):
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
            else:
                try:
                    raw = base64.b64decode(block.get("data") or "", validate=True)
                except (ValueError, TypeError):
                    raw = b""
                payload, mac = raw[:-32], raw[-32:]
                if not payload.startswith(_REDACTED_MARK) or not hmac.compare_digest(mac, _mac(payload)):
                    return f"messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block"
    return None


# -- making the answer -----------------------------------------------------------------------------------


def _echo(messages, variant: int, min_words: int) -> str:
    prompt = _prompt_text(messages)
    echoed = prompt.split()[:_ECHO_WORDS]
    words = ["Echo:", *echoed] if echoed else ["Echo:", "(nothing)"]
    start = zlib.crc32(prompt.encode()) + 7 * variant
    size = len(_FILLER)
    words += [_FILLER[(start + i) % size] for i in range(max(min_words, _MIN_WORDS) - len(words))]
    return " ".join(words) + "."


def _group(tokens: list[str], n_chunks: int) -> list[list[str]]:
    """``tokens`` in ``n_chunks`` runs (fewer when there are fewer tokens), none empty."""
    n = len(tokens)
    k = max(1, min(n_chunks, n))
    return [tokens[i * n // k:(i + 1) * n // k] for i in range(k)] if n else []


def fake_reply_chunks(messages: list, n_chunks: int = 8, text: str | None = None) -> list[str]:
    """The plain-text reply to ``messages`` (or ``text`` when given) in the pieces a stream sends.

    The pieces are ``n_chunks`` runs of whole tokens (fewer when the reply has fewer tokens) and
    concatenate to the reply; the reply has at least ``max(n_chunks, 12)`` words unless ``text`` is fixed.
    """
    reply = text if text is not None else _echo(messages, 0, n_chunks)
    return ["".join(g) for g in _group(split_tokens(reply), n_chunks)]


def _request_seed(messages, user_seed) -> int:
    digest = hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    seed = int.from_bytes(digest, "little")
    if isinstance(user_seed, int) and not isinstance(user_seed, bool):
        seed ^= zlib.crc32(str(user_seed).encode())
    return seed


def _logprob(token: str, position: int, index: int) -> float:
    return -round((zlib.crc32(f"{index}:{position}:{token}".encode()) % 2500) / 1000 + 0.0001, 4)


def _logprob_entry(token: str, position: int, index: int, top: int) -> dict:
    lp = _logprob(token, position, index)
    entry = {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []}
    if top:
        lead = " " if token.startswith(" ") else ""
        alternatives = [token]
        k = zlib.crc32(f"{position}:{token}".encode())
        while len(alternatives) < top:
            alt = lead + _FILLER[k % len(_FILLER)]
            k += 1
            if alt not in alternatives:
                alternatives.append(alt)
            elif k % len(_FILLER) == 0:
                alternatives.append(f"{lead}{len(alternatives)}")
        # The chosen token is the likeliest; the others trail off below it.
        entry["top_logprobs"] = [{"token": t, "logprob": round(lp - 0.75 * j, 4) if j else lp, "bytes": list(t.encode())}
                                 for j, t in enumerate(alternatives)]
    return entry


def _text_choice(index: int, text: str, stops: list[str], limit: int | None, n_chunks: int, top: int | None) -> FakeChoice:
    stop_sequence = None
    cut = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (cut is None or at < cut):
            cut, stop_sequence = at, stop
    if cut is not None:
        text = text[:cut]
    tokens = split_tokens(text)
    finish = "stop"
    if limit is not None and len(tokens) > limit:
        tokens, finish, stop_sequence = tokens[:limit], "length", None
    groups = _group(tokens, n_chunks)
    logprobs = None
    if top is not None:
        logprobs, position = [], 0
        for group in groups:
            logprobs.append(tuple(_logprob_entry(t, position + j, index, top) for j, t in enumerate(group)))
            position += len(group)
        logprobs = tuple(logprobs)
    return FakeChoice(index, tuple("".join(g) for g in groups), logprobs, None, finish, stop_sequence, len(tokens))


def _tool_choice(index: int, name: str, schema, seed: int, n_chunks: int) -> FakeChoice:
    arguments = schema_instance(schema, seed) if isinstance(schema, dict) else {}
    if not isinstance(arguments, dict):
        arguments = {}
    text = orjson.dumps(arguments).decode()
    digest = hashlib.blake2b(f"{name}:{text}:{index}".encode(), digest_size=8).hexdigest()
    pieces = tuple("".join(g) for g in _group(split_tokens(text), n_chunks))
    call = FakeToolCall(f"call_{digest}", name, text, pieces)
    return FakeChoice(index, (), None, call, "tool_calls", None, estimate_text_tokens(name) + estimate_text_tokens(text))


_CACHE_SIZE = 256
_answers: OrderedDict[tuple, FakeAnswer] = OrderedDict()
_STREAM_KEYS = ("stream", "stream_options")


def fake_answer(body: dict, *, chunks: int = 8, text: str | None = None) -> FakeAnswer:
    """The fake model's answer to an OpenAI chat body; ``chunks`` pieces per streamed choice, ``text`` fixes
    the plain-text reply. Raises :class:`FakeRequestError` for what a real API refuses.

    The answer depends on nothing but its arguments (streaming or not aside), so the last few are kept:
    a benchmark that repeats one request finds the fake nearly free, as a real upstream costs the
    gateway's machine nothing. Answers are frozen; the callers only read them.
    """
    try:
        key = (orjson.dumps({k: v for k, v in body.items() if k not in _STREAM_KEYS}, option=orjson.OPT_SORT_KEYS),
               chunks, text)
    except TypeError:
        return _answer(body, chunks, text)
    answer = _answers.get(key)
    if answer is None:
        answer = _answers[key] = _answer(body, chunks, text)
        if len(_answers) > _CACHE_SIZE:
            _answers.popitem(last=False)
    else:
        _answers.move_to_end(key)
    return answer


_JSON_INSTRUCTION = "Respond with a single valid JSON object"


def _asks_for_json(messages: list) -> bool:
    for m in messages:
        if isinstance(m, dict) and m.get("role") in ("system", "developer") and \
                _JSON_INSTRUCTION in _content_text(m.get("content")):
            return True
    return False


def _answer(body: dict, chunks: int, text: str | None) -> FakeAnswer:
    messages = body.get("messages") or []
    n = _positive_int(body, "n", _MAX_N) or 1
    top = _top_logprobs(body)
    kind, schema = _response_format(body)
    stops = _stops(body)
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    tool = _choose_tool(body, messages)
    seed = _request_seed(messages, body.get("seed"))
    user_seed = body.get("seed") if isinstance(body.get("seed"), int) else 0
    if kind == "text" and _asks_for_json(messages):
        # A system instruction to answer in JSON (how the gateway asks an Anthropic upstream for
        # response_format) is followed as json_object would be.
        kind = "json_object"
    if kind == "json_object":
        schema = _schema_in_messages(messages)
    reasoning = fake_reasoning(messages) if _reasoning_asked(body) else None
    redacted = reasoning is not None and REDACTED_TRIGGER in _prompt_text(messages)
    choices = []
    for index in range(n):
        choice_seed = zlib.crc32(f"{seed}:{index}".encode())
        if tool is not None:
            choices.append(attrs.evolve(_tool_choice(index, tool[0], tool[1], choice_seed, chunks),
                                        reasoning=reasoning, redacted=redacted))
            continue
        if schema is not None:
            reply = orjson.dumps(schema_instance(schema, choice_seed)).decode()
        elif kind == "json_object":
            reply = orjson.dumps({"answer": _echo(messages, index + user_seed, 0)}).decode()
        elif text is not None:
            reply = text
        else:
            reply = _echo(messages, index + user_seed, chunks)
        choices.append(attrs.evolve(_text_choice(index, reply, stops, limit, chunks, top),
                                    reasoning=reasoning, redacted=redacted))
    return FakeAnswer(tuple(choices), estimate_input_tokens(body))


# -- OpenAI's wire format --------------------------------------------------------------------------------


def _openai_message(choice: FakeChoice) -> dict:
    message: dict = {"role": "assistant", "content": choice.text, "refusal": None, "annotations": []}
    if choice.reasoning and not choice.redacted:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_call:
        call = choice.tool_call
        message["tool_calls"] = [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]
    return message


def openai_completion(answer: FakeAnswer, head: dict) -> dict:
    """The ``chat.completion`` object; ``head`` holds ``id``, ``created``, ``model`` and any extra top-level fields."""
    return {
        "id": head["id"],
        "object": "chat.completion",
        **{k: v for k, v in head.items() if k != "id"},
        "choices": [{"index": c.index, "message": _openai_message(c), "logprobs": c.openai_logprobs(),
                     "finish_reason": c.finish_reason} for c in answer.choices],
        "usage": answer.openai_usage(),
    }


def openai_stream_frames(answer: FakeAnswer, head: dict, *, include_usage: bool,
                         framed: bool = True) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """The SSE events of the streamed answer as (opening, body, closing), one ``chat.completion.chunk`` each.

    Opening: each choice's role chunk (and its tool call's id and name); body: the content or argument
    pieces, choices interleaved piece by piece; closing: each choice's finish chunk, the usage chunk when
    ``include_usage``, and ``[DONE]``. With ``framed`` False: the chunk payloads alone (no ``data:`` framing,
    no ``[DONE]``), as the in-process adapter hands them to the pipeline.
    """
    base = {"id": head["id"], "object": "chat.completion.chunk", **{k: v for k, v in head.items() if k != "id"}}
    dumps = orjson.dumps
    # The chunks differ only in their choice: the rest is serialised once (the fake is a benchmark's upstream).
    start, end = (b"data: ", b"\n\n") if framed else (b"", b"")
    prefix = start + dumps(base)[:-1] + b',"choices":[{"index":'
    suffix = (b'}],"usage":null}' if include_usage else b"}]}") + end

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
        return b"".join((prefix, str(index).encode(), b',"delta":', dumps(delta), b',"logprobs":', dumps(logprobs),
                         b',"finish_reason":', dumps(finish_reason), suffix))

    opening, body, closing = [], [], []
    for c in answer.choices:
        opening.append(chunk(c.index, {"role": "assistant", "content": None if c.tool_call else "", "refusal": None}))
        if c.tool_call:
            call = c.tool_call
            opening.append(chunk(c.index, {"tool_calls": [{"index": 0, "id": call.id, "type": "function",
                                                            "function": {"name": call.name, "arguments": ""}}]}))
    for k in range(max((len(c.reasoning_pieces) for c in answer.choices), default=0)):
        for c in answer.choices:
            if k < len(c.reasoning_pieces):
                body.append(chunk(c.index, {"reasoning_content": c.reasoning_pieces[k]}))
    rounds = max((len(c.tool_call.pieces if c.tool_call else c.pieces) for c in answer.choices), default=0)
    for k in range(rounds):
        for c in answer.choices:
            if c.tool_call:
                if k < len(c.tool_call.pieces):
                    body.append(chunk(c.index, {"tool_calls": [{"index": 0, "function": {"arguments": c.tool_call.pieces[k]}}]}))
            elif k < len(c.pieces):
                logprobs = None if c.piece_logprobs is None else {"content": list(c.piece_logprobs[k]), "refusal": None}
                body.append(chunk(c.index, {"content": c.pieces[k]}, logprobs=logprobs))
    for c in answer.choices:
        closing.append(chunk(c.index, {}, c.finish_reason))
    if include_usage:
        closing.append(start + dumps({**base, "choices": [], "usage": answer.openai_usage()}) + end)
    if framed:
        closing.append(_DONE)
    return opening, body, closing


# -- embeddings ------------------------------------------------------------------------------------------


def _embedding_items(inputs) -> list[tuple[str, int]]:
    """(the text a vector is seeded from, its token count) per input item.

    A string is one item; an array of strings or of token arrays is one item per element; an array of
    integers is ONE pre-tokenised item.
    """
    def tokens_item(tokens: list) -> tuple[str, int]:
        return " ".join(map(str, tokens)), len(tokens)

    def is_token_array(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(inputs, str) and inputs:
        return [(inputs, estimate_text_tokens(inputs))]
    if is_token_array(inputs):
        return [tokens_item(inputs)]
    if isinstance(inputs, list) and inputs:
        items = []
        for i, item in enumerate(inputs):
            if isinstance(item, str) and item:
                items.append((item, estimate_text_tokens(item)))
            elif is_token_array(item):
                items.append(tokens_item(item))
            else:
                raise FakeRequestError(f"input[{i}]", f"'input[{i}]' must be a non-empty string or array of integers.")
        return items
    raise FakeRequestError("input", "'input' must be a non-empty string, array of strings, array of integers or array of integer arrays.")


def fake_embeddings(body: dict, model: str, default_dims: int = 256) -> dict:
    """The embeddings response: one unit vector per input item, seeded by its text."""
    items = _embedding_items(body.get("input"))
    dims = body.get("dimensions") if body.get("dimensions") is not None else default_dims
    if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
        raise FakeRequestError("dimensions", "'dimensions' must be a positive integer.")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, (text, _) in enumerate(items):
        vec = fake_embedding(text, dims)
        embedding = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(n for _, n in items)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def fake_embedding(text: str, dims: int = 256) -> list[float]:
    """A unit vector of ``dims`` floats seeded by a hash of ``text``: equal texts, equal vectors."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")
    rng = random.Random(seed)
    gauss = rng.gauss
    vec = [gauss(0.0, 1.0) for _ in range(max(dims, 1))]
    norm = math.sqrt(math.fsum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
