"""The in-flight table, the one owner of per-provider in-flight counts: counting, and a drain that waits
for a provider's count to reach zero without polling and leaves nothing behind."""

import trio
import trio.testing

from runestone.routing.pool import InFlightTable


def test_counts_per_provider_never_go_negative_and_stay_at_zero():
    table = InFlightTable()
    table.attempt_started("a")
    table.attempt_started("a")
    table.attempt_started("b")
    table.attempt_ended("a")
    table.attempt_ended("b")
    table.attempt_ended("b")  # an extra end must not go negative
    assert table.counts == {"a": 1, "b": 0}  # kept at zero: a vanishing series reads as a reset
    assert (table.count("a"), table.count("b"), table.count("never")) == (1, 0, 0)


async def test_wait_idle_wakes_when_the_last_attempt_ends_and_forgets_its_event(autojump_clock):
    table = InFlightTable()
    for provider in ("a", "a", "b"):
        table.attempt_started(provider)
    start = trio.current_time()
    woke = []

    async def drain(provider, grace):
        drained = await table.wait_idle(provider, start + grace)
        woke.append((provider, drained, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain, "a", 10)
        nursery.start_soon(drain, "a", 10)  # two drains of one provider share its wake-up
        nursery.start_soon(drain, "b", 5)
        await trio.sleep(1)
        table.attempt_ended("a")  # one left: nobody wakes
        await trio.sleep(1)
        table.attempt_started("a")
        table.attempt_ended("a")
        await trio.sleep(1)
        assert woke == []
        table.attempt_ended("a")  # the last one: both drains of "a" wake now, not at a later poll
    # "a" drained at 3 s, its last end; "b" gave up at its 5 s deadline.
    assert sorted(woke) == [("a", True, 3.0), ("a", True, 3.0), ("b", False, 5.0)]
    assert table._idle == {}


async def test_wait_idle_on_an_idle_provider_returns_at_once(autojump_clock):
    table = InFlightTable()
    start = trio.current_time()
    assert await table.wait_idle("nobody", start + 10) is True
    assert trio.current_time() == start
    table.attempt_started("x")
    assert await table.wait_idle("x", start) is False  # the deadline has passed
    assert table._idle == {}
