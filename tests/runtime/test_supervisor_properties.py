"""Property: whatever children do, a supervisor's view matches reality and its intensity holds.

Random trees (strategy, restart types, intensity, period) meet random sequences
of child crashes, normal exits and pauses. After every step the supervisor's
``which_children()`` must match both the tasks really alive and a model of
Erlang's rules, and it must escalate exactly when the model's restart count
within the period exceeds the intensity.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from runestone.runtime import Registry, Supervisor, SupervisorEscalation
from runtime_world import World, run_with_watchdog

STEP = st.one_of(
    st.tuples(st.sampled_from(["crash", "crash", "exit"]), st.integers(0, 3)),
    st.tuples(st.sampled_from(["crash", "exit"]), st.integers(0, 3)),
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
        self.history: list[float] = []
        self.restarts = 0
        self.escalated = False

    def exit(self, id: str, crashed: bool, now: float) -> None:
        restart = self.types[id]
        if restart == "temporary" or (restart == "transient" and not crashed):
            if restart == "temporary":
                self.present.remove(id)
                del self.status[id]
            else:
                self.status[id] = "stopped"
            return
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
                self.present.remove(member)
                del self.status[member]
            else:
                self.status[member] = "running"
                self.starts[member] += 1


async def scenario(strategy, restart_types, intensity, period, steps) -> None:
    world = World()
    ids = [f"c{i}" for i in range(len(restart_types))]
    model = Model(dict(zip(ids, restart_types)), strategy, intensity, period)
    specs = [world.spec(id, restart=model.types[id]) for id in ids]
    sup = Supervisor("prop", specs, strategy=strategy, intensity=intensity, period=period, registry=Registry())
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
            candidates = [id for id in model.present if model.status[id] == "running"]
            if not candidates:
                continue
            id = candidates[arg % len(candidates)]
            control = world.alive[id]
            control.crash() if kind == "crash" else control.exit()
            await wait_all_tasks_blocked()
            model.exit(id, kind == "crash", trio.current_time())

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


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
    restart_types=st.lists(st.sampled_from(["permanent", "transient", "temporary"]), min_size=1, max_size=5),
    intensity=st.integers(0, 4),
    period=st.sampled_from([1.0, 5.0, 10.0]),
    steps=st.lists(STEP, min_size=4, max_size=25),
)
def test_supervisor_view_matches_reality_and_intensity_is_enforced(strategy, restart_types, intensity, period, steps):
    run_with_watchdog(
        scenario, strategy, restart_types, intensity, period, steps,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
