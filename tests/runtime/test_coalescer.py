"""Casts gathered by a Coalescer: one mailbox message for those sent while the last batch waits, each handled
in order as if cast alone; at most ``limit`` per batch; a dead incarnation's batch is closed, so the next cast
goes to the next one."""

from __future__ import annotations

import attrs
import trio
import trio.testing

from runestone.runtime import Actor, Batch, Coalescer, NamedRef, Registry


@attrs.frozen
class Note:
    n: int


@attrs.frozen
class Boom:
    pass


class Recorder(Actor):
    async def init(self) -> None:
        self.seen = []
        self.messages = 0

    async def handle_cast(self, message) -> None:
        match message:
            case Note(n):
                self.seen.append(n)
            case Boom():
                raise RuntimeError("boom")
            case _:
                self.unknown_cast(message)


class CountingRef:
    """Passes casts on to ``ref``, counting the mailbox messages (the batches)."""

    def __init__(self, ref):
        self.ref = ref
        self.batches = []

    @property
    def sizes(self):
        return [len(b) for b in self.batches]

    def try_cast(self, message):
        assert type(message) is Batch
        self.batches.append(message)
        return self.ref.try_cast(message)


async def test_casts_sent_while_a_batch_waits_share_it_and_keep_their_order():
    actor = Recorder("rec", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        counting = CountingRef(ref)
        casts = Coalescer(lambda: counting, limit=4)
        for n in range(10):  # no checkpoint: the actor cannot take any batch in hand yet
            assert casts.try_cast(Note(n))
        assert counting.sizes == [4, 4, 2]  # at most `limit` each
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == list(range(10))
        # The batches were taken in hand and closed: the next cast starts a new one.
        assert casts.try_cast(Note(10))
        assert counting.sizes == [4, 4, 2, 1]
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == list(range(11))
        ref.request_stop()


async def test_a_full_mailbox_drops_the_cast_and_the_next_batch_starts_again():
    actor = Recorder("rec", registry=Registry(), mailbox_size=1)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        casts = Coalescer(lambda: ref, limit=2)
        # One batch handed to the waiting actor, one queued (the mailbox holds one): 4 casts fit, then none.
        results = [casts.try_cast(Note(n)) for n in range(6)]
        assert results == [True, True, True, True, False, False]
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [0, 1, 2, 3]
        assert casts.try_cast(Note(6))
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [0, 1, 2, 3, 6]
        ref.request_stop()


async def test_a_batch_left_by_a_dead_incarnation_is_closed_and_the_next_goes_to_the_new_one():
    registry = Registry()
    actor = Recorder("rec", registry=registry)
    named = NamedRef(registry, "rec")
    casts = Coalescer(lambda: named)

    async def run_until_it_dies(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await actor.run(task_status=task_status)
        except RuntimeError:
            pass

    async with trio.open_nursery() as nursery:
        await nursery.start(run_until_it_dies)
        assert casts.try_cast(Boom())  # the actor dies handling it...
        assert casts.try_cast(Note(1))  # ...and this, in the same batch, is lost with it
        await trio.testing.wait_all_tasks_blocked()
    assert not casts.try_cast(Note(2))  # nobody holds the name: dropped, and said so
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert casts.try_cast(Note(3))
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [3]
        named.request_stop()


async def test_at_most_max_pending_casts_wait_and_room_comes_back_as_the_actor_takes_them():
    actor = Recorder("rec", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        counting = CountingRef(ref)
        casts = Coalescer(lambda: counting, limit=4, max_pending=6)
        results = [casts.try_cast(Note(n)) for n in range(10)]
        assert results == [True] * 6 + [False] * 4  # the mailbox had room; the bound on waiting casts had not
        assert counting.sizes == [4, 2]
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == list(range(6))
        assert all(casts.try_cast(Note(n)) for n in range(10, 16))  # taken in hand: room for 6 again
        assert not casts.try_cast(Note(16))
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [*range(6), *range(10, 16)]
        ref.request_stop()
