"""The one pipeline without HTTP: Gateway.serve over scripted adapters, planning and attempts observed directly.

The gateway runs in-process on the embedded tree (providers of type ``fake``); each provider's adapter is
then swapped for a :class:`Scripted` one that answers from a list, so every attempt's outcome is chosen
by the test and recorded (which provider was called, in what order). No socket is opened for a model call.
"""

from __future__ import annotations

import attrs
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml
from runestone.providers.base import ChatResult, Usage
from runestone.resilience.errors import UpstreamError
from runestone.routing.errors import GatewayError
from runestone.routing.executor import Chunks, Completed, Done, Failed, ModelRequest, Streaming

MODEL = "m"


def _ok(provider: str) -> ChatResult:
    body = {"id": "c", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {provider}"},
                         "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    return ChatResult(orjson.dumps(body), Usage(3, 2))


async def _hang(provider: str, deadline: float | None):
    """An upstream that never answers, bounded as every adapter bounds its waits: by the deadline."""
    if deadline is None:
        await trio.sleep_forever()
    await trio.sleep_until(deadline)
    raise UpstreamError(provider, "timeout", "no answer before the deadline")


class _Stream:
    def __init__(self, provider: str, items: list, end):
        self._provider = provider
        self._items = list(items)
        self._end = end
        self._deadline = None
        self.usage = Usage(3, len(items))
        self.finished = False
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._items:
            item = self._items.pop(0)
            if not self._items and self._end is None:
                self.finished = True
            return item
        if isinstance(self._end, BaseException):
            raise self._end
        if self._end == "hang":
            await _hang(self._provider, self._deadline)
        raise StopAsyncIteration

    def set_deadline(self, deadline):
        self._deadline = deadline

    @property
    def at_end(self):
        return self.finished

    async def drain(self):
        pass

    async def aclose(self):
        self.closed = True


@attrs.define
class Scripted:
    """An adapter answering each call with the next entry of ``script``: "ok", an exception, "hang",
    or ("stream", n_chunks, end) where end is None (finished), an exception, or "hang"."""

    name: str
    calls: list
    script: list = attrs.Factory(list)
    streams: list = attrs.Factory(list)

    def _next(self):
        self.calls.append(self.name)
        return self.script.pop(0) if self.script else "ok"

    async def complete(self, body, *, request_id, deadline=None):
        step = self._next()
        if step == "hang":
            await _hang(self.name, deadline)
        if isinstance(step, BaseException):
            raise step
        return _ok(self.name)

    async def open_stream(self, body, *, request_id, include_usage, deadline=None):
        step = self._next()
        if isinstance(step, BaseException):
            raise step
        _, n, end = step if isinstance(step, tuple) else ("stream", 2, None)
        chunk = orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": MODEL,
                              "choices": [{"index": 0, "delta": {"content": self.name}, "finish_reason": None}]})
        stream = _Stream(self.name, [[chunk]] * n, end)
        self.streams.append(stream)
        return stream

    async def embed(self, body, deadline=None):
        return _ok(self.name)

    async def list_models(self):
        return [MODEL]

    async def aclose(self, *, abort_in_use=True):
        return None


def http(provider: str, status: int, **kw) -> UpstreamError:
    return UpstreamError(provider, "http", f"status {status}", status=status, **kw)


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
async def world(gateway_factory):
    """A gateway with providers a, b, c (priorities 1, 2, 3) serving MODEL, a priority group "g" listing
    them, and a scripted adapter in front of each; returns (app, adapters, calls)."""
    toml = ("[telemetry]\nusage_ledger = false\n[retry]\nmax_attempts = 1\nbase_delay_ms = 0\n"
            "[circuit_breaker]\nfailure_threshold = 1\nrecovery_timeout_ms = 60000\n"
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 5000\n"
            '[[failover.groups]]\nname = "g"\nproviders = ["a", "b", "c"]\nstrategy = "priority"\n')
    for i, name in enumerate("abc"):
        toml += provider_toml(name, "fake", models=[MODEL], priority=i + 1)
    gw = await gateway_factory(toml)
    app = gw.app
    calls: list = []
    adapters = {}
    for name in "abc":
        entry = app.gateway.providers.value[name]
        adapters[name] = Scripted(name, calls)
        app.gateway.providers.put(attrs.evolve(entry, adapter=adapters[name]))
    return app, adapters, calls


def ask(model: str = MODEL, stream: bool = False) -> ModelRequest:
    return ModelRequest("req-1", None, "chat", model, {"model": model, "messages": [{"role": "user", "content": "x"}]},
                        stream=stream)


async def _breaker_open(app, provider):
    # The breaker manager publishes its views every 250 ms (of the MockClock: a jump, not a wait).
    for _ in range(20):
        view = (app.breaker_views.value or {}).get(provider)
        if view is not None and view.state == "open":
            return
        await trio.sleep(0.1)
    raise AssertionError(f"{provider}'s breaker did not open: {app.breaker_views.value}")


def _settled(app):
    assert not app.gateway.inflight.requests
    assert all(v == 0 for v in app.telemetry.in_flight.values()), app.telemetry.in_flight


async def test_a_failure_fails_over_in_priority_order(world):
    app, adapters, calls = world
    adapters["a"].script = [http("a", 500)]
    result = await app.gateway.serve(ask())
    assert type(result) is Completed and result.provider == "b"
    assert calls == ["a", "b"]
    assert (b"x-runestone-provider", b"b") in result.headers
    _settled(app)


async def test_a_client_fault_ends_the_request_with_the_upstreams_words(world):
    from runestone.wire.errors import UpstreamErrorBody

    app, adapters, calls = world
    detail = UpstreamErrorBody("too long", "invalid_request_error", "context_length_exceeded", "messages", "openai")
    adapters["a"].script = [http("a", 400, detail=detail)]
    with pytest.raises(GatewayError) as info:
        await app.gateway.serve(ask())
    err = info.value
    assert (err.status, err.message, err.type, err.code, err.param) == (
        400, "too long", "invalid_request_error", "context_length_exceeded", "messages")
    assert calls == ["a"]
    _settled(app)


async def test_a_group_member_refused_by_its_breaker_does_not_skip_the_next(clock, world):
    app, adapters, calls = world
    adapters["a"].script = [http("a", 500)]
    assert (await app.gateway.serve(ask("g"))).provider == "b"
    await _breaker_open(app, "a")
    calls.clear()
    adapters["b"].script = [http("b", 500)]
    result = await app.gateway.serve(ask("g"))
    # a is refused by its open breaker; b is tried next (not skipped), fails, and c answers.
    assert calls == ["b", "c"] and result.provider == "c"
    _settled(app)


async def test_unknown_models_and_no_candidates_change_nothing(world):
    app, adapters, calls = world
    with pytest.raises(GatewayError) as info:
        await app.gateway.serve(ask("nope"))
    assert info.value.status == 404 and info.value.code == "model_not_found"
    assert calls == [] and not app.gateway.inflight.requests


async def test_the_deadline_bounds_every_attempt_together(clock, world):
    app, adapters, calls = world
    adapters["a"].script = ["hang"]
    adapters["b"].script = ["hang"]
    adapters["c"].script = ["hang"]
    started = trio.current_time()
    with pytest.raises(GatewayError) as info:
        await app.gateway.serve(ask())
    assert info.value.status == 504
    assert trio.current_time() - started <= 5.0 + 0.5
    _settled(app)


async def test_a_stream_commits_after_its_first_read_and_ends_once(world):
    app, adapters, calls = world
    adapters["a"].script = [("stream", 0, UpstreamError("a", "stream_cut", "cut before any event"))]
    adapters["b"].script = [("stream", 3, UpstreamError("b", "stream_cut", "cut mid-stream"))]
    streaming = await app.gateway.serve(ask(stream=True))
    assert isinstance(streaming, Streaming) and streaming.provider == "b"
    events = [e async for e in streaming]
    await streaming.aclose()
    assert [type(e) for e in events] == [Chunks, Chunks, Chunks, Failed]
    assert events[-1].error.status == 502
    assert adapters["b"].streams[0].closed
    _settled(app)


async def test_a_stream_the_client_leaves_is_recorded_once_and_closed(world):
    app, adapters, calls = world
    adapters["a"].script = [("stream", 5, "hang")]
    streaming = await app.gateway.serve(ask(stream=True))
    first = await streaming.__anext__()
    assert type(first) is Chunks and not first.last
    await streaming.aclose()
    await streaming.aclose()  # idempotent
    assert adapters["a"].streams[0].closed
    _settled(app)
    # A finished stream ends with Done after the last Chunks.
    adapters["a"].script = [("stream", 2, None)]
    streaming = await app.gateway.serve(ask(stream=True))
    events = [e async for e in streaming]
    await streaming.aclose()
    assert [type(e) for e in events] == [Chunks, Chunks, Done] and events[1].last
    _settled(app)


async def test_a_stream_body_closed_before_its_first_item_still_ends_the_request(world):
    # The server closes a response body it could not start writing (the client left before the head went
    # out): the stream must still be closed and the request recorded.
    from runestone.front.streams import openai_sse

    app, adapters, calls = world
    adapters["a"].script = [("stream", 5, "hang")]
    streaming = await app.gateway.serve(ask(stream=True))
    body = openai_sse(streaming)
    await body.aclose()
    assert adapters["a"].streams[0].closed
    _settled(app)


async def test_successes_reach_the_breaker_counted_in_one_cast_and_each_counts(clock, world):
    from runestone.resilience.breaker_manager import Successes
    from runestone.runtime import Batch

    app, adapters, calls = world
    gw = app.gateway
    casts = []
    breaker = gw.breaker_ref

    class Counting:
        def try_cast(self, message):
            assert type(message) is Batch
            casts.extend(message)
            return breaker.try_cast(message)

    gw._outcomes._resolve = Counting
    before = app.breaker_views.value["a"].successes
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(gw.serve, ask())
    await trio.sleep(1)  # the manager flushes the tally and publishes its views every 250 ms (MockClock: a jump)
    # A cast per success was a mailbox trip and a handler pass each: they are counted, then sent as one.
    assert casts == [Successes("a", 50)]
    assert app.breaker_views.value["a"].successes - before == 50
    _settled(app)


async def test_a_providers_outcomes_reach_its_breaker_in_the_order_they_happened(clock, world):
    from runestone.resilience.breaker import BreakerSettings
    from runestone.resilience.breaker_manager import Configure, GetState

    app, adapters, calls = world
    gw = app.gateway
    await gw.breaker_ref.call(Configure("a", BreakerSettings(failure_threshold=3, recovery_timeout=60.0)))
    before = await gw.breaker_ref.call(GetState("a"))
    # Two successes (counted on the request path), then a failure (cast at once): the failure must not
    # overtake them, or the successes would reset its consecutive-failure count when the tally came.
    adapters["a"].script = ["ok", "ok", http("a", 500)]
    for _ in range(3):
        await gw.serve(ask())
    await trio.sleep(1)
    view = await gw.breaker_ref.call(GetState("a"))
    assert (view.successes - before.successes, view.failures - before.failures) == (2, 1)
    assert (view.state, view.consecutive_failures) == ("closed", 1)
    # A success after it resets the count, as before.
    await gw.serve(ask())
    await trio.sleep(1)
    assert (await gw.breaker_ref.call(GetState("a"))).consecutive_failures == 0
    _settled(app)
