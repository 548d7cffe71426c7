"""The in-gateway fake provider bounds its own waits by the attempt's deadline, as the HTTP adapters do."""

from __future__ import annotations

import types

import pytest
import trio
import trio.testing

from runestone.providers.fake import FakeAdapter
from runestone.resilience.errors import UpstreamError

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


def fake(**config) -> FakeAdapter:
    return FakeAdapter("fake", types.SimpleNamespace(**config))


async def test_an_answer_later_than_the_deadline_is_a_timeout_at_the_deadline(clock):
    adapter = fake(ttfb_ms=5000)
    start = trio.current_time()
    with pytest.raises(UpstreamError) as caught:
        await adapter.complete(BODY, request_id="r", deadline=start + 1)
    assert caught.value.kind == "timeout" and trio.current_time() == start + 1
    result = await adapter.complete(BODY, request_id="r", deadline=trio.current_time() + 10)  # in time: answered
    assert result.usage.completion_tokens > 0


async def test_a_stream_read_later_than_its_deadline_is_a_timeout_and_the_deadline_can_move(clock):
    adapter = fake(chunks=4, chunk_delay_ms=1000)
    start = trio.current_time()
    stream = await adapter.open_stream(BODY, request_id="r", include_usage=False, deadline=start + 2.5)
    reads = [await stream.__anext__(), await stream.__anext__(), await stream.__anext__()]  # at 0, 1, 2 s
    assert all(reads) and not stream.finished
    with pytest.raises(UpstreamError) as caught:
        await stream.__anext__()  # due at 3 s
    assert caught.value.kind == "timeout" and trio.current_time() == start + 2.5
    stream.set_deadline(start + 10)
    assert await stream.__anext__() and stream.finished and stream.at_end
    await stream.drain()
    await stream.aclose()
