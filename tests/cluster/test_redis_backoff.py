"""The client's reconnect schedule on a MockClock: while Redis cannot be reached it tries again with a
capped exponential backoff, so it never hammers the server and never waits longer than ``backoff_max``
between attempts (shared operation resumes within about a second of Redis coming back)."""

import pytest
import trio
import trio.testing

from runestone.cluster import redis as redis_module
from runestone.cluster.redis import RedisClient, RedisUnavailable


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_backoff_is_capped_and_bounded(monkeypatch, clock):
    attempts: list[float] = []

    async def refused(address):
        attempts.append(trio.current_time())
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(redis_module._Wire, "open", staticmethod(refused))
    client = RedisClient("redis://127.0.0.1:1/0", backoff_min=0.05, backoff_max=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await trio.sleep(30)
        assert client.state == "down" and "refused" in client.statistics().last_error
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8])
    assert max(gaps) == pytest.approx(1.0)  # capped
    assert len(attempts) <= 35  # about one a second once capped: never a tight loop
