"""Actors: call/cast, timeouts, crashes, graceful stop, registry cleanup."""

from __future__ import annotations

import functools
import math

import pytest
import trio
import trio.testing

from runestone.runtime import (
    Actor,
    ActorDead,
    ActorRef,
    CallTimeout,
    MailboxFull,
    NamedRef,
    Registry,
)



class Recorder(Actor):
    """Counts casts, answers calls, and can be told to block, crash or nap."""

    async def init(self) -> None:
        self.total = 0
        self.seen: list[object] = []
        self.release = trio.Event()
        self.terminated: list[BaseException | None] = []

    async def handle_call(self, message):
        self.seen.append(message)
        if message == "total":
            return self.total
        if message == "block":
            await self.release.wait()
            return "released"
        if message == "boom":
            raise ValueError("boom in handler")
        if isinstance(message, tuple) and message[0] == "nap":
            await trio.sleep(message[1])
            return "rested"
        return ("echo", message)

    async def handle_cast(self, message) -> None:
        self.seen.append(message)
        if message == "crash":
            raise KeyError("crash in cast")
        self.total += message

    async def terminate(self, reason) -> None:
        self.terminated.append(reason)


async def run_capturing(actor: Actor, outcome: list, *, task_status=trio.TASK_STATUS_IGNORED):
    """Run an actor, recording how run() ended instead of letting it fail the nursery."""
    try:
        await actor.run(task_status=task_status)
    except Exception as exc:
        outcome.append(exc)
    else:
        outcome.append("returned")


async def test_calls_and_casts_are_served_one_at_a_time_in_order():
    registry = Registry()
    actor = Recorder("rec", registry=registry)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert isinstance(ref, ActorRef) and ref.alive and ref.name == "rec"
        assert registry.whereis("rec") is ref
        ref.cast(1)
        ref.cast(2)
        assert ref.try_cast(3)
        assert await ref.call("total") == 6
        assert await ref.call("hi") == ("echo", "hi")
        assert actor.seen == [1, 2, 3, "total", "hi"]
        ref.request_stop()
    assert not ref.alive
    assert registry.whereis("rec") is None
    assert actor.terminated == [None]


async def test_call_timeout_raises_and_the_actor_keeps_running(autojump_clock):
    actor = Recorder("slow", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        start = trio.current_time()
        with pytest.raises(CallTimeout) as info:
            await ref.call(("nap", 10), timeout=1.5)
        assert trio.current_time() - start == pytest.approx(1.5)
        assert "slow" in str(info.value)
        assert ref.alive
        # The timed-out request is still served; the next call waits behind it.
        assert await ref.call("total", timeout=20) == 0
        assert trio.current_time() - start == pytest.approx(10)
        ref.request_stop()


async def test_calls_with_different_timeouts_each_expire_on_time(autojump_clock):
    actor = Recorder("mixed", registry=Registry())
    expired: dict[float, float] = {}

    async def caller(timeout: float) -> None:
        t0 = trio.current_time()
        with pytest.raises(CallTimeout):
            await ref.call("block", timeout=timeout)
        expired[timeout] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        async with trio.open_nursery() as callers:
            for timeout in (5.0, 1.0, 3.0, 1.0):
                callers.start_soon(caller, timeout)
        assert expired == pytest.approx({5.0: 5.0, 1.0: 1.0, 3.0: 3.0})
        actor.release.set()
        assert await ref.call("total") == 0
        ref.request_stop()


async def test_one_off_timeouts_do_not_pile_up(autojump_clock):
    actor = Recorder("varied", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        for i in range(200):
            assert await ref.call("total", timeout=1 + i / 1000) == 0
        assert len(ref._timer.queues) <= 16
        ref.request_stop()


async def test_call_without_timeout_waits_as_long_as_it_takes(autojump_clock):
    actor = Recorder("patient", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert await ref.call(("nap", 3600), timeout=math.inf) == "rested"
        ref.request_stop()


async def test_call_cast_to_a_stopped_actor_raise_actor_dead():
    actor = Recorder("gone", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        ref.request_stop()
    with pytest.raises(ActorDead, match="gone"):
        await ref.call("total")
    with pytest.raises(ActorDead):
        ref.cast(1)
    assert ref.try_cast(1) is False
    ref.request_stop()  # idempotent on a dead ref


async def test_handler_crash_fails_the_caller_with_actor_dead_and_run_raises():
    registry = Registry()
    actor = Recorder("crashy", registry=registry)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, outcome)
        with pytest.raises(ActorDead, match="ValueError: boom in handler") as info:
            await ref.call("boom")
        assert isinstance(info.value.reason, ValueError)
        assert info.value.__cause__ is info.value.reason
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)
    assert not ref.alive
    assert registry.whereis("crashy") is None
    assert actor.terminated == [outcome[0]]
    assert actor.lifecycle.last_error is outcome[0]
    with pytest.raises(ActorDead, match="crashed: ValueError"):
        await ref.call("total")


async def test_cast_crash_fails_queued_calls_without_hanging():
    actor = Recorder("castcrash", registry=Registry())
    outcome: list = []
    results: list = []

    async def queued_call() -> None:
        try:
            await ref.call("total")
        except ActorDead as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, outcome)
        async with trio.open_nursery() as callers:
            ref.cast("crash")
            callers.start_soon(queued_call)
            callers.start_soon(queued_call)
    assert isinstance(outcome[0], KeyError)
    assert len(results) == 2
    assert all("KeyError" in str(exc) for exc in results)


async def test_a_call_pending_when_the_actor_crashes_gets_actor_dead():
    """The call in hand, and those queued behind it, fail when a background task crashes the actor."""

    class Doomed(Recorder):
        async def init(self) -> None:
            await super().init()
            self.fuse = trio.Event()
            self.nursery.start_soon(self.bomb)

        async def bomb(self) -> None:
            await self.fuse.wait()
            raise RuntimeError("background task failed")

    actor = Doomed("doomed", registry=Registry())
    outcome: list = []
    errors: list = []

    async def caller(message) -> None:
        try:
            await ref.call(message)
        except ActorDead as exc:
            errors.append((message, exc))

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, outcome)
        async with trio.open_nursery() as callers:
            callers.start_soon(caller, "block")
            await trio.testing.wait_all_tasks_blocked()
            callers.start_soon(caller, "total")
            await trio.testing.wait_all_tasks_blocked()
            actor.fuse.set()
    assert isinstance(outcome[0], RuntimeError)  # reported bare, not as a group
    assert sorted(message for message, _ in errors) == ["block", "total"]
    assert all("background task failed" in str(exc) for _, exc in errors)


async def test_cast_raises_mailbox_full_and_try_cast_returns_false():
    actor = Recorder("tiny", registry=Registry(), mailbox_size=2)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert ref.mailbox_capacity == 2
        nursery.start_soon(ref.call, "block")
        await trio.testing.wait_all_tasks_blocked()  # the actor now holds "block"
        ref.cast(1)
        ref.cast(2)
        assert ref.mailbox_depth == 2
        with pytest.raises(MailboxFull, match="tiny"):
            ref.cast(3)
        assert ref.try_cast(3) is False
        actor.release.set()
        assert await ref.call("total") == 3
        ref.request_stop()


async def test_call_into_a_full_mailbox_waits_for_room_within_its_timeout(autojump_clock):
    actor = Recorder("queue", registry=Registry(), mailbox_size=1)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        nursery.start_soon(functools.partial(ref.call, ("nap", 5), timeout=60))
        await trio.testing.wait_all_tasks_blocked()
        ref.cast(7)  # mailbox now full
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await ref.call("total", timeout=2)
        assert trio.current_time() - start == pytest.approx(2)
        # Room appears at t=5; the reply comes within the remaining time.
        assert await ref.call("total", timeout=10) == 7
        assert trio.current_time() - start == pytest.approx(5)
        ref.request_stop()


async def test_call_into_a_full_mailbox_fails_when_the_actor_stops():
    actor = Recorder("stopping", registry=Registry(), mailbox_size=1)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        nursery.start_soon(ref.call, "block")
        await trio.testing.wait_all_tasks_blocked()
        ref.cast(1)

        async def stop_later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            ref.request_stop()
            actor.release.set()

        nursery.start_soon(stop_later)
        with pytest.raises(ActorDead):
            await ref.call("total")


async def test_cancelled_caller_abandons_its_call():
    actor = Recorder("abandon", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        with trio.move_on_after(0) as scope:
            await ref.call("total")
        assert scope.cancelled_caught
        # The abandoned request was still served and its reply dropped quietly.
        assert await ref.call("hi") == ("echo", "hi")
        assert actor.seen == ["total", "hi"]
        ref.request_stop()


async def test_request_stop_finishes_the_message_in_hand_then_fails_the_queue(autojump_clock):
    actor = Recorder("graceful", registry=Registry())
    outcome: list = []
    replies: list = []

    async def call_and_keep(message) -> None:
        try:
            replies.append(await ref.call(message, timeout=60))
        except ActorDead as exc:
            replies.append(exc)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, outcome)
        nursery.start_soon(call_and_keep, ("nap", 5))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call_and_keep, "total")
        await trio.testing.wait_all_tasks_blocked()
        ref.request_stop()
        assert not ref.alive
        assert actor.lifecycle.status == "stopping"
        with pytest.raises(ActorDead):
            ref.cast(1)
    assert outcome == ["returned"]
    assert replies[0] == "rested"
    assert isinstance(replies[1], ActorDead) and replies[1].reason is None
    assert actor.seen == [("nap", 5)]
    assert actor.terminated == [None]
    assert actor.lifecycle.status == "stopped"


async def test_registry_is_cleaned_on_crash_and_on_cancellation():
    registry = Registry()
    actor = Recorder("cleanup", registry=registry)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run_capturing, actor, outcome)
        ref.cast("crash")
    assert registry.whereis("cleanup") is None
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert registry.whereis("cleanup") is ref
        nursery.cancel_scope.cancel()
    assert registry.whereis("cleanup") is None
    assert not ref.alive
    assert isinstance(actor.terminated[-1], trio.Cancelled)
    assert actor.lifecycle.runs == 2 and actor.lifecycle.restarts == 1


async def test_init_failure_propagates_from_start_and_leaves_no_name():
    class BadInit(Recorder):
        async def init(self) -> None:
            await super().init()
            raise OSError("cannot open store")

    registry = Registry()
    actor = BadInit("badinit", registry=registry)
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="cannot open store"):
            await nursery.start(actor.run)
    assert registry.whereis("badinit") is None
    assert actor.terminated and isinstance(actor.terminated[0], OSError)


async def test_background_tasks_die_with_the_actor():
    cancelled: list[bool] = []

    class WithHelper(Recorder):
        async def init(self) -> None:
            await super().init()
            self.nursery.start_soon(self.helper)

        async def helper(self) -> None:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append(True)
                raise

    actor = WithHelper("helper", registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        ref.request_stop()
    assert cancelled == [True]
    assert actor.nursery is None


async def test_a_name_held_by_a_running_actor_cannot_be_taken():
    registry = Registry()
    first = Recorder("dup", registry=registry)
    second = Recorder("dup", registry=registry)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(first.run)
        with pytest.raises(ValueError, match="dup"):
            await nursery.start(second.run)
        with pytest.raises(RuntimeError, match="already running"):
            await nursery.start(first.run)
        assert registry.whereis("dup") is ref
        ref.request_stop()


async def test_named_ref_resolves_at_each_use():
    registry = Registry()
    named = NamedRef(registry, "svc")
    assert not named.alive
    with pytest.raises(ActorDead, match="no actor is registered"):
        await named.call("total")
    with pytest.raises(ActorDead):
        named.cast(1)
    assert named.try_cast(1) is False
    actor = Recorder("svc", registry=registry)
    for _ in range(2):  # two incarnations of the same actor object
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(actor.run)
            assert named.resolve() is ref and named.alive
            named.cast(5)
            assert named.try_cast(1)
            assert await named.call("total") == 6  # init() rebuilt the state
            named.request_stop()
        assert not named.alive


async def test_registry_unregister_only_removes_the_matching_binding():
    registry = Registry()
    a, b = object(), object()
    registry.register("x", a)
    registry.unregister("x", b)
    assert registry.whereis("x") is a
    registry.register("y", b)
    assert registry.names() == ["x", "y"]
    registry.unregister("x", a)
    registry.unregister("y")
    assert registry.names() == []
