"""OpenAI's legacy completions API (``POST /v1/completions``) as a one-message chat, and back.

A prompt becomes ``messages=[{"role": "user", "content": prompt}]`` with the sampling fields passed on,
so routing, breakers, failover and every provider type serve it exactly as they serve chat; the answer
(a ``chat.completion`` or its chunks) is rewritten as ``text_completion`` objects. Only one prompt per
request is served: an array of several is refused with a 400 naming ``prompt``, because splitting it
into several upstream requests would bill, route and fail them apart while the client sees one. The
legacy fields a chat model cannot honour (``suffix``, ``best_of`` > 1, ``logprobs``) are refused the
same way rather than silently dropped; ``echo`` is honoured by the gateway itself.
"""

from __future__ import annotations

import orjson

from .openai import DONE, bad, kind_of

__all__ = ["chat_body_from_completion", "text_completion_from_chat", "TextCompletionStream"]

_DATA = b"data: "

# Fields of the legacy API handled here and not passed on to the chat body.
_LEGACY_ONLY = frozenset({"prompt", "echo", "suffix", "best_of", "logprobs"})


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "'prompt' is required: a string (or an array holding one string)")
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, (int, list)) and not isinstance(t, bool) for t in prompt):
            raise bad("prompt", "'prompt' must hold text: arrays of token ids are not supported by this gateway")
        if len(prompt) != 1:
            raise bad("prompt", f"'prompt' must be a string or an array of exactly one string; got an array of "
                      f"{len(prompt)} items: send one request per prompt (use 'n' for several completions)")
        prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt", "'prompt' must hold text: arrays of token ids are not supported by this gateway")
    if not isinstance(prompt, str):
        raise bad("prompt", f"'prompt' must be a string, not a {kind_of(prompt)}")
    return prompt


def chat_body_from_completion(body: dict) -> tuple[dict, str, bool]:
    """The chat body for a completions body, the prompt, and whether to echo it.

    Raises InvalidRequest (400, naming the field) for what this route cannot serve. Fields it does not
    know pass on unchanged, as on the chat route.
    """
    if "messages" in body:
        raise bad("messages", "'messages' belongs to POST /v1/chat/completions; this route takes 'prompt'")
    prompt = _prompt(body)
    for name in ("tools", "tool_choice", "functions"):
        if body.get(name) is not None:
            raise bad(name, f"'{name}' is not supported on /v1/completions; use POST /v1/chat/completions")
    suffix = body.get("suffix")
    if suffix:
        raise bad("suffix", "'suffix' (fill-in-the-middle) is not supported: chat models cannot honour it")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("best_of", "'best_of' must be 1 or left out: the gateway returns every completion it asks for; "
                  "use 'n' instead")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs != 0:
        raise bad("logprobs", "'logprobs' is not supported on /v1/completions; use POST /v1/chat/completions with "
                  "\"logprobs\": true")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise bad("echo", f"'echo' must be a boolean, not a {kind_of(echo)}")
    chat = {k: v for k, v in body.items() if k not in _LEGACY_ONLY}
    chat["messages"] = [{"role": "user", "content": prompt}]
    return chat, prompt, echo


def _completion_id(chat_id) -> str:
    if not isinstance(chat_id, str) or not chat_id:
        return "cmpl-gateway"
    return "cmpl-" + chat_id.removeprefix("chatcmpl-")


def text_completion_from_chat(resp: dict, *, echo_prompt: str | None = None) -> dict:
    """A ``chat.completion`` as a ``text_completion``: one choice per chat choice, same indices."""
    choices = []
    for c in resp.get("choices") or ():
        message = c.get("message") or {}
        text = message.get("content")
        if isinstance(text, list):  # content parts, from providers that answer so
            text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
        text = text or message.get("refusal") or ""
        if echo_prompt is not None:
            text = echo_prompt + text
        choices.append({"text": text, "index": c.get("index", 0), "logprobs": None,
                        "finish_reason": c.get("finish_reason")})
    out = {
        "id": _completion_id(resp.get("id")),
        "object": "text_completion",
        "created": resp.get("created") or 0,
        "model": resp.get("model") or "",
        "choices": choices,
    }
    if resp.get("system_fingerprint"):
        out["system_fingerprint"] = resp["system_fingerprint"]
    usage = resp.get("usage")
    if usage is not None:
        out["usage"] = usage
    return out


class TextCompletionStream:
    """Rewrites a stream's chat chunk payloads as ``text_completion`` SSE chunks; one per response.

    Each call takes one upstream read's payloads and returns the bytes for one write. Chunks with nothing
    to say (the role-only first chunk) are dropped; ``[DONE]`` ends the stream as in chat.
    """

    __slots__ = ("_id", "_created", "_model", "_echo", "_n")

    def __init__(self, echo_prompt: str | None, n: int) -> None:
        self._id: str | None = None
        self._created = 0
        self._model = ""
        self._echo = echo_prompt
        self._n = n

    def _head(self, obj: dict) -> None:
        self._id = _completion_id(obj.get("id"))
        self._created = obj.get("created") or 0
        self._model = obj.get("model") or ""

    def _chunk(self, choices: list, usage=None) -> bytes:
        out = {"id": self._id, "object": "text_completion", "created": self._created, "model": self._model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return _DATA + orjson.dumps(out) + b"\n\n"

    def feed(self, payloads: list, last: bool) -> bytes:
        out: list[bytes] = []
        for data in payloads:
            obj = orjson.loads(data)
            if self._id is None:
                self._head(obj)
                if self._echo is not None:
                    out.append(self._chunk([{"text": self._echo, "index": i, "logprobs": None, "finish_reason": None}
                                            for i in range(self._n)]))
            choices = []
            for c in obj.get("choices") or ():
                delta = c.get("delta")
                text = delta.get("content") if delta else None
                finish = c.get("finish_reason")
                if not text and finish is None:
                    continue
                choices.append({"text": text or "", "index": c.get("index", 0), "logprobs": None,
                                "finish_reason": finish})
            usage = obj.get("usage")
            if choices or usage:
                out.append(self._chunk(choices, usage))
        if last:
            out.append(DONE)
        return b"".join(out)
