"""The in-flight table: a drain's wait leaves nothing behind, whether it drained or timed out."""

import trio

from runestone.routing.pool import InFlightTable


async def test_wait_idle_forgets_its_wake_up_event(autojump_clock):
    table = InFlightTable()
    in_flight = {"a": 1, "b": 1}

    async def finish_a():
        await trio.sleep(1)
        in_flight["a"] = 0
        table.provider_done("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_a)
        assert await table.wait_idle("a", in_flight, trio.current_time() + 10) is True
    assert await table.wait_idle("b", in_flight, trio.current_time() + 5) is False
    assert table._idle == {}
