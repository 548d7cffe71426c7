"""Property: whatever children and callers do, a supervisor's view matches reality and its intensity holds.

Random trees (strategy, restart types, intensity and period, or OTP's defaults)
meet random sequences of child crashes, normal exits, ``shutdown`` exits,
failing starts, ``terminate_child``/``restart_child``/``delete_child`` calls and
pauses. After every step the supervisor's ``which_children()`` must match both
the tasks really alive and a model of Erlang's rules (``supervisor.erl``), and it
must escalate exactly when the model's restart count within the period exceeds
the intensity.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from runestone.runtime import Registry, Supervisor, SupervisorEscalation
from runtime_world import Crash, World, run_with_watchdog

EXITS = ("crash", "exit", "shutdown")
CALLS = ("terminate", "restart_child", "delete")

STEP = st.one_of(
    st.tuples(st.sampled_from(["crash", "crash", "exit", "shutdown"]), st.integers(0, 3)),
    st.tuples(st.sampled_from(CALLS), st.integers(0, 3)),
    st.tuples(st.just("fail_start"), st.tuples(st.integers(0, 3), st.integers(1, 2))),
    st.tuples(st.just("sleep"), st.sampled_from([0.5, 1.0, 2.5, 6.0])),
)


class Model:
    """Erlang's supervisor rules, written as plainly as possible."""

    def __init__(self, restart_types: dict[str, str], strategy: str, intensity: int, period: float) -> None:
        self.types = restart_types
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.present = list(restart_types)  # start order
        self.status = {id: "running" for id in restart_types}
        self.starts = {id: 1 for id in restart_types}
        self.fail = {id: 0 for id in restart_types}  # how many next starts fail
        self.history: list[float] = []
        self.restarts = 0
        self.escalated = False

    def _forget(self, id: str) -> None:
        self.present.remove(id)
        del self.status[id]

    def exit(self, id: str, how: str, now: float) -> None:
        restart = self.types[id]
        abnormal = how == "crash"  # "exit" is reason normal, "shutdown" is shutdown
        if restart == "temporary" or (restart == "transient" and not abnormal):
            if restart == "temporary":
                self._forget(id)
            else:
                self.status[id] = "stopped"
            return
        self.restart(id, now)

    def restart(self, id: str, now: float) -> None:
        """OTP's restart/2, with try_again_restart until a try works or the intensity runs out."""
        while True:
            self.history = [t for t in self.history if t >= now - self.period] + [now]
            if len(self.history) > self.intensity:
                self.escalated = True
                return
            self.restarts += 1
            if self.strategy == "one_for_one":
                group = [id]
            elif self.strategy == "one_for_all":
                group = list(self.present)
            else:
                group = self.present[self.present.index(id):]
            for member in group:
                if member != id and self.types[member] == "temporary":
                    self._forget(member)
            group = [member for member in group if member in self.status]
            for i, member in enumerate(group):
                if self.fail[member]:
                    self.fail[member] -= 1
                    self.status[member] = "restarting"
                    for later in group[i + 1:]:
                        self.status[later] = "stopped"
                    id = member
                    break
                self.status[member] = "running"
                self.starts[member] += 1
            else:
                return

    def call(self, kind: str, id: str) -> str | None:
        """A child call; returns the exception type name it must raise, if any."""
        status = self.status[id]
        if kind == "terminate":
            if self.types[id] == "temporary":
                self._forget(id)
            else:
                self.status[id] = "stopped"
            return None
        if status != "stopped":
            return "RuntimeError"
        if kind == "delete":
            self._forget(id)
            return None
        if self.fail[id]:
            self.fail[id] -= 1
            return "Crash"
        self.status[id] = "running"
        self.starts[id] += 1
        return None


async def scenario(strategy, restart_types, limits, steps) -> None:
    world = World()
    ids = [f"c{i}" for i in range(len(restart_types))]
    intensity, period = limits if limits is not None else (1, 5.0)  # OTP's defaults when none are given
    model = Model(dict(zip(ids, restart_types)), strategy, intensity, period)
    specs = [world.spec(id, restart=model.types[id]) for id in ids]
    flags = {} if limits is None else {"intensity": intensity, "period": period}
    sup = Supervisor("prop", specs, strategy=strategy, registry=Registry(), **flags)
    outcome: list[BaseException] = []

    async def run_sup(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await sup.run(task_status=task_status)
        except SupervisorEscalation as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_sup)
        for kind, arg in steps:
            if kind == "sleep":
                await trio.sleep(arg)
                continue
            if kind == "fail_start":
                index, count = arg
                id = ids[index % len(ids)]
                world.fail_start[id] = world.fail_start.get(id, 0) + count
                model.fail[id] += count
                continue
            if kind in EXITS:
                candidates = [id for id in model.present if model.status[id] == "running"]
                if not candidates:
                    continue
                id = candidates[arg % len(candidates)]
                control = world.alive[id]
                {"crash": control.crash, "exit": control.exit, "shutdown": control.shut_down}[kind]()
                await wait_all_tasks_blocked()
                model.exit(id, kind, trio.current_time())
            else:
                if not model.present:
                    continue
                id = model.present[arg % len(model.present)]
                expected = model.call(kind, id)
                call = {"terminate": sup.terminate_child, "restart_child": sup.restart_child,
                        "delete": sup.delete_child}[kind]
                if expected is None:
                    await call(id)
                else:
                    with pytest.raises(RuntimeError if expected == "RuntimeError" else Crash):
                        await call(id)
                await wait_all_tasks_blocked()

            if model.escalated:
                assert len(outcome) == 1, "intensity exceeded without escalating"
                assert world.alive == {}, "children left running after an escalation"
                return
            assert outcome == [], "escalated before the intensity was exceeded"
            infos = sup.which_children()
            assert [i.id for i in infos] == model.present
            assert {i.id: i.status for i in infos} == model.status
            running = {i.id: i.value for i in infos if i.status == "running"}
            assert running.keys() == world.alive.keys(), "supervisor and reality disagree on who runs"
            assert all(value is world.alive[id] for id, value in running.items()), "a stale incarnation"
            assert sup.restarts == model.restarts
            started = {id: 0 for id in ids}
            for event, who in world.log:
                started[who] += event == "start"
            assert started == model.starts, "the wrong children were restarted"
        sup.request_stop()
    assert outcome == []
    assert world.alive == {}


@settings(max_examples=80, deadline=None)
@given(
    strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
    restart_types=st.lists(st.sampled_from(["permanent", "transient", "temporary"]), min_size=1, max_size=5),
    limits=st.one_of(st.none(), st.tuples(st.integers(0, 4), st.sampled_from([1.0, 5.0, 10.0]))),
    steps=st.lists(STEP, min_size=4, max_size=25),
)
def test_supervisor_view_matches_reality_and_intensity_is_enforced(strategy, restart_types, limits, steps):
    run_with_watchdog(
        scenario, strategy, restart_types, limits, steps,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
