"""The one policy for a message an actor does not understand: a call gets ``Rejected``, a cast is dropped,
both are counted and logged, and the actor never crashes."""

from __future__ import annotations

import logging

import attrs
import trio

from runestone.runtime import Actor, Registry, Rejected, dump_state


@attrs.frozen
class Ping:
    n: int


class OnlyPings(Actor):
    """Understands ``Ping`` calls and casts; hands anything else to the runtime's policy."""

    async def init(self) -> None:
        self.pinged = 0

    async def handle_call(self, message):
        match message:
            case Ping(n):
                return n + 1
            case _:
                return self.unknown_call(message)

    async def handle_cast(self, message) -> None:
        match message:
            case Ping(n):
                self.pinged += n
            case _:
                self.unknown_cast(message)


class Silent(Actor):
    """Overrides no handler: the defaults apply the same policy."""


async def test_an_unknown_call_is_rejected_and_an_unknown_cast_dropped(caplog):
    caplog.set_level(logging.WARNING, logger="runestone.runtime")
    actor = OnlyPings("typed", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        reply = await ref.call(("ping", 1))
        assert type(reply) is Rejected and reply.code == "invalid"
        assert "tuple" in reply.message and "typed" in reply.message
        ref.cast("garbage")
        ref.cast(Ping(2))
        assert await ref.call(Ping(41)) == 42
        assert ref.alive and actor.pinged == 2
        assert actor.lifecycle.unknown_messages == 2
        node = dump_state(actor)
        assert node["unknown_messages"] == 2 and node["status"] == "running"
        ref.request_stop()
    # Logged once (the first), by type name only: a message may carry a secret.
    warnings = [r.getMessage() for r in caplog.records if "does not understand" in r.getMessage()]
    assert len(warnings) == 1 and "tuple" in warnings[0] and "ping" not in warnings[0].lower()


async def test_the_default_handlers_follow_the_same_policy():
    actor = Silent("silent", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        reply = await ref.call(Ping(1))
        assert type(reply) is Rejected and reply.code == "invalid" and "Ping" in reply.message
        ref.cast(Ping(1))
        ref.cast(None)
        assert type(await ref.call("anything")) is Rejected
        assert ref.alive and actor.lifecycle.unknown_messages == 4
        ref.request_stop()
    assert actor.lifecycle.last_error is None


async def test_a_flood_of_unknown_casts_logs_a_bounded_number_of_lines(caplog):
    caplog.set_level(logging.WARNING, logger="runestone.runtime")
    actor = Silent("flooded", registry=Registry(), mailbox_size=4096)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        for i in range(2500):
            ref.cast(i)
        assert type(await ref.call("sync")) is Rejected  # served after every queued cast
        ref.request_stop()
    assert actor.lifecycle.unknown_messages == 2501
    lines = [r for r in caplog.records if "does not understand" in r.getMessage()]
    assert len(lines) == 3  # the 1st, the 1000th and the 2000th
