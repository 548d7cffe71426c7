"""The ``fake`` provider type: a model inside the gateway, so the embedded default config serves with no key.

It answers as :mod:`.fake_content`'s fake model does (``n``, ``stop``, ``max_tokens``, ``logprobs``,
``response_format``, ``tool_choice``; the same answers as ``runestone fake-provider``), streams in
``chunks`` pieces with an optional time to first byte and delay between chunks (config knobs ``chunks``,
``ttfb_ms``, ``chunk_delay_ms``), and serves embeddings. A request a real API would refuse is an upstream
400. Sleeps go through trio, so tests under MockClock see its timing exactly. Like the HTTP adapters it bounds
its own waits by the attempt's ``deadline`` (a sleep that would pass it fails as an upstream timeout when it
does), and its streams take ``set_deadline``: the pipeline opens no cancel scope for it.
"""

from __future__ import annotations

import random

import orjson
import trio

from ..resilience.errors import UpstreamError
from ..telemetry.observe import note_finish_reasons
from .base import ChatResult, Usage, new_created
from .fake_content import FakeAnswer, FakeRequestError, fake_answer, fake_embeddings, openai_completion, openai_stream_frames

__all__ = ["FakeAdapter"]


async def _wait(provider: str, seconds: float, deadline: float | None) -> None:
    """Sleep ``seconds``, or until ``deadline`` and then fail as an upstream that did not answer in time."""
    if deadline is not None and trio.current_time() + seconds >= deadline:
        await trio.sleep_until(deadline)
        raise UpstreamError(provider, "timeout", "the fake model did not answer before the deadline")
    await trio.sleep(seconds)


class FakeStream:
    __slots__ = ("_provider", "_pieces", "_i", "_ttfb", "_delay", "_deadline", "_finish", "usage", "finished",
                 "_closed")

    def __init__(self, provider: str, pieces: list[list[bytes]], usage: Usage, ttfb: float, delay: float,
                 deadline: float | None = None, finish=()) -> None:
        self._provider = provider
        self._pieces = pieces
        self._finish = [{"finish_reason": reason} for reason in finish]
        self._i = 0
        self._ttfb = ttfb
        self._delay = delay
        self._deadline = deadline
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
            await _wait(self._provider, wait, self._deadline)
        self._i = i + 1
        if self._i == len(self._pieces):
            self.finished = True
            note_finish_reasons(self._finish)  # on the request's task, as an upstream stream's last read is
        return self._pieces[i]

    def set_deadline(self, deadline: float | None) -> None:
        """Bound the reads from now on by ``deadline`` (trio's clock): past it a read fails as a timeout."""
        self._deadline = deadline

    @property
    def at_end(self) -> bool:
        return self.finished

    async def drain(self) -> None:
        """Nothing is left to read after the last piece."""

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

    def _answer(self, body: dict) -> FakeAnswer:
        try:
            return fake_answer(body, chunks=self._chunks, text=self._text)
        except FakeRequestError as exc:
            raise self._bad_request(exc) from None

    def _bad_request(self, exc: FakeRequestError) -> UpstreamError:
        # What an OpenAI upstream's 400 becomes: the client's fault, answered at once, no breaker count.
        return UpstreamError(self.name, "http", f"upstream returned 400: {exc.message}", status=400)

    def _head(self, body: dict, request_id: str) -> dict:
        return {"id": request_id, "created": new_created(), "model": body["model"], "system_fingerprint": "fp_runestone_fake"}

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        self._maybe_fail()
        answer = self._answer(body)
        if self._ttfb:
            await _wait(self.name, self._ttfb, deadline)
        resp = openai_completion(answer, self._head(body, request_id))
        note_finish_reasons(resp["choices"])
        return ChatResult(orjson.dumps(resp), Usage(answer.prompt_tokens, answer.completion_tokens))

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> FakeStream:
        self._maybe_fail()
        answer = self._answer(body)
        opening, pieces, closing = openai_stream_frames(answer, self._head(body, request_id),
                                                        include_usage=include_usage, framed=False)
        # One read per content piece, as an upstream's would be: the role chunk rides with the first
        # piece, the finish and usage chunks with the last. Each read is a list of chunk payloads.
        out = [[p] for p in pieces] or [[]]
        out[0] = opening + out[0]
        out[-1] = out[-1] + closing
        return FakeStream(self.name, out, Usage(answer.prompt_tokens, answer.completion_tokens), self._ttfb,
                          self._delay, deadline, [c.finish_reason for c in answer.choices])

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult:
        try:
            resp = fake_embeddings(body, body["model"])
        except FakeRequestError as exc:
            raise self._bad_request(exc) from None
        tokens = resp["usage"]["prompt_tokens"]
        return ChatResult(orjson.dumps(resp), Usage(tokens, 0))

    async def list_models(self) -> list[str]:
        self._maybe_fail()
        return list(self._models)

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        return None
