"""Supervisors: strategies, restart types, intensity, escalation, shutdown order and grace, dynamic children."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from runestone.runtime import (
    Actor,
    ActorDead,
    ChildSpec,
    NamedRef,
    Registry,
    Shutdown,
    Supervisor,
    SupervisorEscalation,
)
from runtime_world import Crash, DeafControl, GracefulControl, SlowControl, World



async def run_capturing(sup: Supervisor, outcome: list, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        await sup.run(task_status=task_status)
    except Exception as exc:
        outcome.append(exc)
    else:
        outcome.append("returned")


def statuses(sup: Supervisor) -> dict[str, str]:
    return {info.id: info.status for info in sup.which_children()}


async def test_children_start_in_order_and_the_supervisor_reports_ready_last():
    world = World()
    registry = Registry()
    sup = Supervisor("root", [world.spec("a"), world.spec("b"), world.spec("c")], registry=registry)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(sup.run) is sup
        assert world.take_log() == [("start", "a"), ("start", "b"), ("start", "c")]
        infos = sup.which_children()
        assert [i.id for i in infos] == ["a", "b", "c"]
        assert all(i.status == "running" and i.restarts == 0 and i.kind == "worker" for i in infos)
        assert [i.value for i in infos] == [world.alive["a"], world.alive["b"], world.alive["c"]]
        assert registry.whereis("root") is sup
        sup.request_stop()
    assert registry.whereis("root") is None
    assert world.take_log() == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_one_for_one_restarts_only_the_failed_child():
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("b"), world.spec("c")], strategy="one_for_one")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        a, c = world.alive["a"], world.alive["c"]
        world.take_log()
        world.alive["b"].crash()
        await wait_all_tasks_blocked()
        assert world.take_log() == [("stop", "b"), ("start", "b")]
        assert world.alive["a"] is a and world.alive["c"] is c
        info = {i.id: i for i in sup.which_children()}
        assert info["b"].restarts == 1 and isinstance(info["b"].last_error, Crash)
        assert info["b"].value is world.alive["b"]
        assert sup.restarts == 1
        sup.request_stop()


async def test_one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order():
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("b"), world.spec("c")], strategy="one_for_all")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        world.take_log()
        world.alive["b"].crash()
        await wait_all_tasks_blocked()
        assert world.take_log() == [
            ("stop", "b"), ("stop", "c"), ("stop", "a"),
            ("start", "a"), ("start", "b"), ("start", "c"),
        ]
        assert statuses(sup) == {"a": "running", "b": "running", "c": "running"}
        assert [i.restarts for i in sup.which_children()] == [1, 1, 1]
        assert sup.restarts == 1
        sup.request_stop()


async def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it():
    world = World()
    specs = [world.spec("a"), world.spec("b"), world.spec("c"), world.spec("d")]
    sup = Supervisor("s", specs, strategy="rest_for_one")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        a = world.alive["a"]
        world.take_log()
        world.alive["b"].crash()
        await wait_all_tasks_blocked()
        assert world.take_log() == [
            ("stop", "b"), ("stop", "d"), ("stop", "c"),
            ("start", "b"), ("start", "c"), ("start", "d"),
        ]
        assert world.alive["a"] is a
        assert [i.restarts for i in sup.which_children()] == [0, 1, 1, 1]
        sup.request_stop()


@pytest.mark.parametrize(
    ("restart", "how", "expected"),
    [
        ("permanent", "exit", "restarted"),
        ("permanent", "crash", "restarted"),
        ("transient", "exit", "stopped"),
        ("transient", "crash", "restarted"),
        ("temporary", "exit", "removed"),
        ("temporary", "crash", "removed"),
    ],
)
async def test_restart_types(restart, how, expected):
    world = World()
    sup = Supervisor("s", [world.spec("x", restart=restart), world.spec("other")], intensity=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = world.alive["x"]
        getattr(first, how)()
        await wait_all_tasks_blocked()
        ids = [i.id for i in sup.which_children()]
        if expected == "restarted":
            assert world.alive["x"] is not first
            assert statuses(sup)["x"] == "running"
            assert sup.restarts == 1
        elif expected == "stopped":
            assert "x" not in world.alive
            assert statuses(sup)["x"] == "stopped"
            assert sup.restarts == 0
        else:
            assert "x" not in world.alive and ids == ["other"]
            assert sup.restarts == 0
        assert "other" in world.alive
        sup.request_stop()


async def test_one_for_all_drops_temporary_siblings_and_restarts_stopped_transient_ones():
    """As in Erlang: a group restart forgets temporary children and starts every other one."""
    world = World()
    specs = [world.spec("t", restart="temporary"), world.spec("tr", restart="transient"), world.spec("p")]
    sup = Supervisor("s", specs, strategy="one_for_all")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        world.alive["tr"].exit()
        await wait_all_tasks_blocked()
        assert statuses(sup) == {"t": "running", "tr": "stopped", "p": "running"}
        world.take_log()
        world.alive["p"].crash()
        await wait_all_tasks_blocked()
        assert world.take_log() == [("stop", "p"), ("stop", "t"), ("start", "tr"), ("start", "p")]
        assert statuses(sup) == {"tr": "running", "p": "running"}
        sup.request_stop()


async def test_exceeding_the_intensity_stops_all_children_and_escalates(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("b"), world.spec("c")], intensity=2, period=5)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        for _ in range(2):
            world.alive["b"].crash()
            await wait_all_tasks_blocked()
        assert outcome == [] and sup.restarts == 2
        world.take_log()
        world.alive["b"].crash("the last straw")
    (escalation,) = outcome
    assert isinstance(escalation, SupervisorEscalation)
    assert escalation.name == "s" and escalation.child_id == "b"
    assert isinstance(escalation.last_error, Crash) and "the last straw" in str(escalation)
    assert escalation.__cause__ is escalation.last_error
    assert world.take_log() == [("stop", "b"), ("stop", "c"), ("stop", "a")]
    assert world.alive == {}
    assert sup.restarts == 2
    assert sup.last_error is escalation
    assert all(i.status == "stopped" for i in sup.which_children())


async def test_restarts_older_than_the_period_are_forgotten(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("a")], intensity=1, period=5)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        for _ in range(5):
            world.alive["a"].crash()
            await wait_all_tasks_blocked()
            await trio.sleep(5.01)
        assert outcome == [] and sup.restarts == 5
        # Two restarts exactly `period` apart are within the same period (Erlang counts the boundary in).
        world.alive["a"].crash()
        await wait_all_tasks_blocked()
        await trio.sleep(5)
        world.alive["a"].crash()
    assert isinstance(outcome[0], SupervisorEscalation)
    assert sup.restarts == 6


async def test_intensity_zero_escalates_at_the_first_restart_but_not_at_a_normal_transient_exit(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("tr", restart="transient"), world.spec("p")], intensity=0)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        world.alive["tr"].exit()
        await wait_all_tasks_blocked()
        assert outcome == []
        world.alive["p"].exit()  # a permanent child is restarted even after a normal exit
    assert isinstance(outcome[0], SupervisorEscalation)
    assert outcome[0].last_error is None and sup.restarts == 0


async def test_escalation_travels_through_two_levels_of_supervisors(autojump_clock):
    world = World()
    inner = Supervisor("inner", [world.spec("w")], intensity=0)
    root = Supervisor("root", [world.spec("steady"), inner.child_spec()], intensity=1, period=60)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, root, outcome)
        steady = world.alive["steady"]
        world.alive["w"].crash("first")
        await wait_all_tasks_blocked()
        # inner gave up; root restarted it (and with it a fresh w); steady was not touched.
        info = {i.id: i for i in root.which_children()}
        assert info["inner"].restarts == 1 and info["inner"].status == "running"
        assert isinstance(info["inner"].last_error, SupervisorEscalation)
        assert info["inner"].kind == "supervisor" and info["inner"].value is inner
        assert world.alive["steady"] is steady and "w" in world.alive
        assert root.restarts == 1
        world.take_log()
        world.alive["w"].crash("second")
    (escalation,) = outcome
    assert isinstance(escalation, SupervisorEscalation) and escalation.name == "root"
    assert escalation.child_id == "inner"
    assert isinstance(escalation.last_error, SupervisorEscalation) and escalation.last_error.name == "inner"
    assert "second" in str(escalation.last_error.last_error)
    assert world.take_log() == [("stop", "w"), ("stop", "steady")]
    assert world.alive == {}


async def test_a_restart_whose_start_fails_counts_as_another_restart(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("b")], intensity=3, period=10)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        world.fail_start["b"] = 1
        world.alive["b"].crash()
        await wait_all_tasks_blocked()
        assert statuses(sup) == {"a": "running", "b": "running"}
        assert sup.restarts == 2
        assert {i.id: i.restarts for i in sup.which_children()} == {"a": 0, "b": 2}
        world.fail_start["b"] = 10
        world.take_log()
        world.alive["b"].crash()
    assert isinstance(outcome[0], SupervisorEscalation)
    assert "cannot start" in str(outcome[0].last_error)
    # 2 restarts earlier + 1 attempt now; the next attempt would be the 4th within 10 s.
    assert sup.restarts == 3
    assert world.take_log() == [("stop", "b"), ("failed", "b"), ("stop", "a")]


async def test_a_child_failing_during_the_initial_start_fails_run_after_stopping_the_others():
    world = World()
    world.fail_start["c"] = 1
    sup = Supervisor("s", [world.spec("a"), world.spec("b"), world.spec("c"), world.spec("d")])
    async with trio.open_nursery() as nursery:
        with pytest.raises(Crash, match="c: cannot start") as info:
            await nursery.start(sup.run)
    assert any("'c'" in note for note in info.value.__notes__)
    assert world.take_log() == [("start", "a"), ("start", "b"), ("failed", "c"), ("stop", "b"), ("stop", "a")]
    assert world.alive == {}
    assert sup.status == "stopped" and not sup.alive


async def test_shutdown_honours_each_childs_grace_in_reverse_order(autojump_clock):
    world = World()
    specs = [
        world.spec("polite", shutdown=10, control=GracefulControl),
        world.spec("deaf", shutdown=3, control=DeafControl),
        world.spec("brutal", shutdown=0, control=GracefulControl),
    ]
    sup = Supervisor("s", specs)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        controls = dict(world.alive)
        world.take_log()
        t0 = trio.current_time()
        sup.request_stop()
    assert world.take_log() == [("stop", "brutal"), ("stop", "deaf"), ("stop", "polite")]
    # brutal: cancelled at once, never asked; deaf: asked, then cancelled after exactly its grace.
    assert controls["brutal"].cancelled_at == t0
    assert [(i, t - t0) for i, t in world.stop_requests] == [("deaf", 0), ("polite", 3)]
    assert controls["deaf"].cancelled_at - t0 == 3
    assert controls["polite"].cancelled_at is None
    assert world.cancelled == ["brutal", "deaf"]


async def test_an_infinite_grace_waits_for_the_child(autojump_clock):
    returned_at: list[float] = []

    async def run_and_time(sup: Supervisor, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await sup.run(task_status=task_status)
        returned_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        world = World(nursery)
        sup = Supervisor("s", [world.spec("slow", shutdown=math.inf, control=SlowControl)])
        await nursery.start(run_and_time, sup)
        t0 = trio.current_time()
        sup.request_stop()
    assert returned_at == [t0 + SlowControl.delay]
    assert world.cancelled == []


async def test_dynamic_children_start_restart_and_terminate(autojump_clock):
    world = World()
    sup = Supervisor("dyn", [world.spec("fixed")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        value = await sup.start_child(world.spec("extra", shutdown=2, control=DeafControl))
        assert value is world.alive["extra"]
        assert [i.id for i in sup.which_children()] == ["fixed", "extra"]
        with pytest.raises(ValueError, match="extra"):
            await sup.start_child(world.spec("extra"))
        world.fail_start["bad"] = 1
        with pytest.raises(Exception, match="bad: cannot start"):
            await sup.start_child(world.spec("bad"))
        assert [i.id for i in sup.which_children()] == ["fixed", "extra"]

        world.alive["extra"].crash()
        await wait_all_tasks_blocked()
        assert statuses(sup)["extra"] == "running" and sup.restarts == 1

        t0 = trio.current_time()
        await sup.terminate_child("extra")
        assert trio.current_time() - t0 == 2  # asked, ignored, cancelled after its grace
        assert "extra" not in world.alive
        sup.request_stop()
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start_child(world.spec("late"))


async def test_terminate_child_keeps_the_spec_restart_child_starts_it_delete_child_forgets_it():
    """OTP: terminate_child stops the child and keeps its spec; restart_child starts a stopped child
    again (not counted as a restart); delete_child removes the spec of a stopped child only."""
    world = World()
    sup = Supervisor("dyn", [world.spec("fixed"), world.spec("w")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = world.alive["w"]
        await sup.terminate_child("w")
        assert "w" not in world.alive
        assert statuses(sup) == {"fixed": "running", "w": "stopped"}
        await sup.terminate_child("w")  # already stopped: nothing to do
        with pytest.raises(ValueError, match="w"):
            await sup.start_child(world.spec("w"))  # the id is still taken (OTP: already_present)

        again = await sup.restart_child("w")
        assert again is world.alive["w"] and again is not first
        assert statuses(sup)["w"] == "running"
        assert sup.restarts == 0 and {i.id: i.restarts for i in sup.which_children()}["w"] == 0
        with pytest.raises(RuntimeError, match="running"):
            await sup.restart_child("w")
        with pytest.raises(RuntimeError, match="running"):
            await sup.delete_child("w")
        assert "w" in world.alive

        await sup.terminate_child("w")
        world.fail_start["w"] = 1
        with pytest.raises(Exception, match="w: cannot start"):
            await sup.restart_child("w")
        assert statuses(sup)["w"] == "stopped"  # a failed restart_child keeps the spec
        await sup.delete_child("w")
        assert [i.id for i in sup.which_children()] == ["fixed"]
        for call in (sup.terminate_child, sup.delete_child, sup.restart_child):
            with pytest.raises(KeyError):
                await call("w")
        await sup.start_child(world.spec("w"))  # the id is free again
        assert statuses(sup) == {"fixed": "running", "w": "running"}
        sup.request_stop()
    with pytest.raises(RuntimeError, match="not running"):
        await sup.restart_child("w")


async def test_terminate_child_forgets_a_temporary_child_and_a_group_restart_starts_a_terminated_one():
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("t", restart="temporary"), world.spec("b")],
                     strategy="one_for_all")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.terminate_child("t")
        assert [i.id for i in sup.which_children()] == ["a", "b"]
        await sup.terminate_child("b")
        world.take_log()
        world.alive["a"].crash()
        await wait_all_tasks_blocked()
        # OTP: "the child process can later be restarted by the supervisor" - a group restart starts it.
        assert world.take_log() == [("stop", "a"), ("start", "a"), ("start", "b")]
        assert statuses(sup) == {"a": "running", "b": "running"}
        sup.request_stop()


async def test_the_default_intensity_is_otps_one_restart_in_five_seconds(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("a")])
    assert (sup.intensity, sup.period) == (1, 5.0)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        world.alive["a"].crash()
        await wait_all_tasks_blocked()
        await trio.sleep(5.01)
        world.alive["a"].crash()  # the first restart is out of the period by now
        await wait_all_tasks_blocked()
        assert outcome == [] and sup.restarts == 2
        await trio.sleep(4.99)
        world.alive["a"].crash()  # a second restart within 5 s: more than 1
    assert isinstance(outcome[0], SupervisorEscalation) and sup.restarts == 2


@asynccontextmanager
async def failing_restart(world: World):
    """A supervisor whose child ``b`` crashed and now fails every start, each try taking 1 s."""
    sup = Supervisor("s", [world.spec("a"), world.spec("b")], intensity=100, period=1000)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, sup, outcome)
        world.start_delay["b"] = 1.0
        world.fail_start["b"] = 1000
        world.alive["b"].crash()
        yield sup, outcome


async def test_a_stop_request_is_not_held_up_by_a_failing_restart(autojump_clock):
    """OTP's try_again_restart is a cast to itself: a stop request queued meanwhile goes first."""
    world = World()
    async with failing_restart(world) as (sup, outcome):
        await trio.sleep(2.5)  # two failed tries behind it, a third under way
        sup.request_stop()
    assert outcome == ["returned"], "the stop waited for the retries to run out"
    # The try in progress when the stop came finishes; none starts after it.
    assert world.take_log().count(("failed", "b")) == 3
    assert sup.restarts == 3 and world.alive == {}


async def test_terminate_child_ends_the_retries_of_a_failing_restart(autojump_clock):
    """The retry finds the child no longer restarting (terminated meanwhile) and is dropped, as in OTP."""
    world = World()
    async with failing_restart(world) as (sup, outcome):
        await trio.sleep(1.5)
        await sup.terminate_child("b")  # waits for the try under way, not for all of them
        tries = world.take_log().count(("failed", "b"))
        assert tries == 2 and statuses(sup) == {"a": "running", "b": "stopped"}
        await trio.sleep(10)
        assert world.take_log() == [] and outcome == []
        world.fail_start["b"] = 0
        await sup.restart_child("b")
        assert statuses(sup) == {"a": "running", "b": "running"}
        sup.request_stop()
    assert outcome == ["returned"]


async def test_a_failed_group_restart_leaves_the_rest_stopped_until_the_retry_starts_them(autojump_clock):
    world = World()
    sup = Supervisor("s", [world.spec("a"), world.spec("b"), world.spec("c")], strategy="one_for_all", intensity=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        world.fail_start["b"] = 1
        world.take_log()
        world.alive["a"].crash()
        await wait_all_tasks_blocked()
        assert world.take_log() == [
            ("stop", "a"), ("stop", "c"), ("stop", "b"),
            ("start", "a"), ("failed", "b"),  # c is not tried; b's retry restarts the whole group
            ("stop", "a"), ("start", "a"), ("start", "b"), ("start", "c"),
        ]
        assert statuses(sup) == {"a": "running", "b": "running", "c": "running"}
        assert sup.restarts == 2

        # Terminating the child whose start failed drops the retry: the rest of its group stays stopped
        # (OTP: pid undefined), not "restarting" forever, and can be started again.
        world.start_delay["b"] = 1.0
        world.fail_start["b"] = 1
        world.alive["a"].crash()
        await trio.sleep(0.5)  # b's start is under way
        await sup.terminate_child("b")
        assert statuses(sup) == {"a": "running", "b": "stopped", "c": "stopped"}
        assert sorted(world.alive) == ["a"]
        await sup.restart_child("c")
        assert statuses(sup) == {"a": "running", "b": "stopped", "c": "running"}
        sup.request_stop()


@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
async def test_an_exit_with_shutdown_is_not_abnormal(restart, caplog):
    """OTP: a transient child is restarted only after an abnormal exit; ``shutdown`` is not one."""
    world = World()
    sup = Supervisor("s", [world.spec("x", restart=restart), world.spec("other")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = world.alive["x"]
        first.shut_down()
        await wait_all_tasks_blocked()
        rows = {i.id: i for i in sup.which_children()}
        if restart == "permanent":
            assert world.alive["x"] is not first and sup.restarts == 1
        elif restart == "transient":
            assert "x" not in world.alive and rows["x"].status == "stopped" and sup.restarts == 0
            assert isinstance(rows["x"].last_error, Shutdown)
            assert not [r for r in caplog.records if r.levelname == "WARNING"], "a shutdown logged as a crash"
        else:
            assert "x" not in rows and sup.restarts == 0
        sup.request_stop()


async def test_a_transient_parent_does_not_restart_a_supervisor_that_gave_up(autojump_clock):
    """OTP: reaching the intensity, a supervisor exits with reason ``shutdown``, which a transient
    parent does not restart and a permanent one does (the two-level escalation test)."""
    world = World()
    inner = Supervisor("inner", [world.spec("w")], intensity=0)
    root = Supervisor("root", [world.spec("steady"), inner.child_spec(restart="transient")], intensity=5)
    outcome: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_capturing, root, outcome)
        world.alive["w"].crash()
        await wait_all_tasks_blocked()
        info = {i.id: i for i in root.which_children()}
        assert info["inner"].status == "stopped" and info["inner"].restarts == 0
        assert isinstance(info["inner"].last_error, SupervisorEscalation)
        assert isinstance(info["inner"].last_error, Shutdown)
        assert root.restarts == 0 and sorted(world.alive) == ["steady"] and not inner.alive
        root.request_stop()
    assert outcome == ["returned"]


async def test_a_supervisor_restart_starts_from_its_initial_children():
    world = World()
    inner = Supervisor("inner", [world.spec("w")], intensity=0)
    root = Supervisor("root", [inner.child_spec()])
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        await inner.start_child(world.spec("dynamic"))
        world.alive["w"].crash()
        await wait_all_tasks_blocked()
        assert [i.id for i in inner.which_children()] == ["w"]
        assert sorted(world.alive) == ["w"]
        root.request_stop()


class Counter(Actor):
    async def init(self) -> None:
        self.count = 0

    async def handle_call(self, message):
        if message == "boom":
            raise RuntimeError("boom")
        self.count += 1
        return self.count


async def test_named_ref_reaches_the_new_incarnation_after_a_restart():
    registry = Registry()
    actor = Counter("counter", registry=registry)
    sup = Supervisor("s", [actor.child_spec()], registry=registry)
    named = NamedRef(registry, "counter")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = registry.whereis("counter")
        assert sup.which_children()[0].value is first
        assert await named.call("inc") == 1
        assert await named.call("inc") == 2
        with pytest.raises(ActorDead, match="boom"):
            await named.call("boom")
        await wait_all_tasks_blocked()
        second = registry.whereis("counter")
        assert second is not None and second is not first and not first.alive
        assert sup.which_children()[0].value is second
        assert await named.call("inc") == 1  # a fresh state from init()
        assert actor.lifecycle.restarts == 1
        sup.request_stop()
    assert registry.names() == []


async def test_a_child_supervisor_is_stopped_gracefully_with_its_own_children(autojump_clock):
    world = World()
    inner = Supervisor("inner", [world.spec("x"), world.spec("y", shutdown=4, control=DeafControl)])
    root = Supervisor("root", [world.spec("first"), inner.child_spec(), world.spec("last")])
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        world.take_log()
        t0 = trio.current_time()
        root.request_stop()
    assert world.take_log() == [("stop", "last"), ("stop", "y"), ("stop", "x"), ("stop", "first")]
    assert trio.current_time() - t0 == 4


async def test_specs_and_supervisors_reject_bad_settings():
    async def start(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()

    with pytest.raises(ValueError):
        ChildSpec("x", start, restart="sometimes")
    with pytest.raises(ValueError):
        ChildSpec("x", start, shutdown=-1)
    with pytest.raises(ValueError):
        ChildSpec("x", start, kind="daemon")
    with pytest.raises(ValueError, match="strategy"):
        Supervisor("s", strategy="all_for_one")
    with pytest.raises(ValueError, match="intensity"):
        Supervisor("s", intensity=-1)
    with pytest.raises(ValueError, match="unique"):
        Supervisor("s", [ChildSpec("x", start), ChildSpec("x", start)])


async def test_a_child_that_returns_before_reporting_ready_fails_its_start():
    async def never_ready(*, task_status=trio.TASK_STATUS_IGNORED):
        return None

    sup = Supervisor("s", [ChildSpec("lazy", never_ready)], registry=Registry())
    async with trio.open_nursery() as nursery:
        with pytest.raises(RuntimeError, match="started"):
            await nursery.start(sup.run)
