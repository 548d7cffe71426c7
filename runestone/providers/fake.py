"""The ``fake`` provider type: a model inside the gateway, so the embedded default config serves with no key.

It answers deterministically (see :mod:`.fake_content`), streams in ``chunks`` pieces with an optional
time to first byte and delay between chunks (config knobs ``chunks``, ``ttfb_ms``, ``chunk_delay_ms``),
makes a tool call when the request offers tools, and serves embeddings. Sleeps go through trio, so tests
under MockClock see its timing exactly.
"""

from __future__ import annotations

import base64
import random
import struct

import orjson
import trio

from ..resilience.errors import UpstreamError
from .base import ChatResult, Usage, new_created
from .fake_content import count_tokens, fake_embedding, fake_reply_chunks, fake_tool_call

__all__ = ["FakeAdapter"]


class FakeStream:
    __slots__ = ("_pieces", "_i", "_ttfb", "_delay", "usage", "finished", "_closed")

    def __init__(self, pieces: list[list[bytes]], usage: Usage, ttfb: float, delay: float) -> None:
        self._pieces = pieces
        self._i = 0
        self._ttfb = ttfb
        self._delay = delay
        self.usage = usage
        self.finished = False
        self._closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[bytes]:
        i = self._i
        if self._closed or i >= len(self._pieces):
            raise StopAsyncIteration
        wait = self._ttfb if i == 0 else self._delay
        if wait:
            await trio.sleep(wait)
        self._i = i + 1
        if self._i == len(self._pieces):
            self.finished = True
        return self._pieces[i]

    async def aclose(self) -> None:
        self._closed = True


class FakeAdapter:
    def __init__(self, name: str, config, transport=None, timeouts=None) -> None:
        self.name = name
        self._chunks = max(1, int(getattr(config, "chunks", None) or 8))
        self._ttfb = (getattr(config, "ttfb_ms", None) or 0) / 1000
        self._delay = (getattr(config, "chunk_delay_ms", None) or 0) / 1000
        self._text = getattr(config, "text", None) or None
        self._models = list(getattr(config, "models", None) or ["fake-model"])
        # Fault injection: a share of model requests fails with fail_status, as an upstream error would.
        self._fail_rate = float(getattr(config, "fail_rate", 0.0) or 0.0)
        self._fail_status = int(getattr(config, "fail_status", 500) or 500)
        self._rng = random.Random(0)

    def _maybe_fail(self) -> None:
        if self._fail_rate and self._rng.random() < self._fail_rate:
            raise UpstreamError(self.name, "http", f"injected failure ({self._fail_status})",
                                status=self._fail_status)

    def _answer(self, body: dict):
        messages = body.get("messages") or []
        call = None
        if body.get("tools"):
            call = fake_tool_call(body["tools"], body.get("tool_choice"))
        pieces = [] if call else fake_reply_chunks(messages, self._chunks, self._text)
        prompt_tokens = count_tokens(messages)
        if call:
            completion_tokens = count_tokens(call["name"]) + count_tokens(orjson.dumps(call["arguments"]).decode())
        else:
            completion_tokens = count_tokens("".join(pieces))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "tool_calls" if call else "stop"
        if not call and isinstance(limit, int) and 0 < limit < completion_tokens:
            # Honour the budget the way a model does: stop early and say so.
            keep = max(1, len(pieces) * limit // completion_tokens)
            pieces = pieces[:keep]
            completion_tokens = count_tokens("".join(pieces))
            finish = "length"
        return pieces, call, Usage(prompt_tokens, completion_tokens), finish

    async def complete(self, body: dict, *, request_id: str) -> ChatResult:
        self._maybe_fail()
        pieces, call, usage, finish = self._answer(body)
        if self._ttfb:
            await trio.sleep(self._ttfb)
        message: dict = {"role": "assistant", "content": None if call else "".join(pieces), "refusal": None}
        if call:
            message["tool_calls"] = [{
                "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": orjson.dumps(call["arguments"]).decode()},
            }]
        resp = {
            "id": request_id,
            "object": "chat.completion",
            "created": new_created(),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage.as_openai(),
            "system_fingerprint": "fp_runestone_fake",
        }
        return ChatResult(orjson.dumps(resp), usage)

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool) -> FakeStream:
        self._maybe_fail()
        pieces, call, usage, finish = self._answer(body)
        head = {"id": request_id, "object": "chat.completion.chunk", "created": new_created(), "model": body["model"],
                "system_fingerprint": "fp_runestone_fake"}
        dumps = orjson.dumps

        def chunk(delta: dict, finish_reason=None) -> bytes:
            c = dict(head)
            c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if include_usage:
                c["usage"] = None
            return dumps(c)

        # One item per simulated upstream read: a list of chunk payloads.
        out: list[list[bytes]] = []
        if call:
            out.append([chunk({"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": ""}}]})])
            out.append([chunk({"tool_calls": [{"index": 0, "function": {
                "arguments": dumps(call["arguments"]).decode()}}]})])
        else:
            out.append([chunk({"role": "assistant", "content": "", "refusal": None})])
            for p in pieces:
                out.append([chunk({"content": p})])
        # The finish chunk rides with the last content piece: one write, as an upstream read would be.
        out[-1].append(chunk({}, finish))
        if include_usage:
            u = dict(head)
            u["choices"] = []
            u["usage"] = usage.as_openai()
            out[-1].append(dumps(u))
        # The role chunk goes with the first content piece.
        if len(out) > 1:
            out[0:2] = [out[0] + out[1]]
        return FakeStream(out, usage, self._ttfb, self._delay)

    async def embed(self, body: dict) -> ChatResult:
        inputs = body["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        dims = body.get("dimensions") or 256
        b64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                text = orjson.dumps(text).decode()  # token arrays: embed their JSON text deterministically
            tokens += count_tokens(text)
            vec = fake_embedding(text, dims)
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        resp = {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return ChatResult(orjson.dumps(resp), Usage(tokens, 0))

    async def list_models(self) -> list[str]:
        self._maybe_fail()
        return list(self._models)

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        return None
