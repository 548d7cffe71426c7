"""The resilience actors, run on the real runtime: CircuitBreakerManager and FailoverManager."""

from contextlib import asynccontextmanager

import pytest
import trio

from runestone.resilience.breaker import ALLOW, ASK, DENY, BreakerSettings, BreakerView, check
from runestone.resilience.breaker_manager import (Acquire, CircuitBreakerManager, Configure, GetState, Outcome,
                                                  Release, Remove, Reset, Successes, SuccessTally, outcome)
from runestone.resilience.failover import GroupSelector, GroupSpec, ProviderInfo, RouteState
from runestone.resilience.failover_manager import (CreateGroup, DeleteGroup, FailoverManager, FailoverStats, GetGroup,
                                                   GetStats, GroupOutcome, GroupStats, ListGroups, ProviderStats,
                                                   ResetStats, UpdateGroup)
from runestone.runtime import ActorDead, Published, Registry, Rejected, unwrap
from runestone.telemetry.events import BreakerTransition, FailoverEvent

FAST = BreakerSettings(failure_threshold=2, recovery_timeout=10.0, success_threshold=2, half_open_limit=1)


@asynccontextmanager
async def running(actor):
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        try:
            yield ref
        finally:
            ref.request_stop()


def breaker_manager(cell=None, **kw):
    events = []
    mgr = CircuitBreakerManager(
        cell if cell is not None else Published(), emit=events.append, registry=Registry(), settings=FAST, **kw
    )
    return mgr, events


async def test_outcome_casts_update_the_published_views_and_emit_transitions(autojump_clock):
    mgr, events = breaker_manager()
    async with running(mgr) as ref:
        assert mgr.views.value == {}
        ref.cast(Outcome("p1", True))
        ref.cast(Outcome("p1", False))
        await ref.call(GetState("p1"))  # the mailbox is FIFO: the casts are handled
        view = mgr.views.value["p1"]
        assert (view.state, view.successes, view.failures, view.consecutive_failures) == ("closed", 1, 1, 1)
        assert events == []
        ref.cast(Outcome("p1", False))
        opened = await ref.call(GetState("p1"))
        assert opened.state == "open"
        assert mgr.views.value["p1"] == opened
        assert events == [BreakerTransition("p1", "closed", "open", "consecutive_failures")]
        assert check(mgr.views.value, "p1", trio.current_time()) == DENY


async def test_a_tally_of_successes_is_sent_at_its_limit_before_other_outcomes_and_on_the_tick(autojump_clock):
    sent = []
    tally = SuccessTally(lambda m: sent.append(m) or True, limit=3)
    tally.add("p1")
    tally.add("p1")
    tally.add("p2")
    assert sent == []
    tally.add("p1")  # the third: at the limit
    assert sent == [Successes("p1", 3)]
    tally.send("p2")  # before another outcome of p2
    tally.send("p2")  # nothing counted: nothing sent
    assert sent == [Successes("p1", 3), Successes("p2", 1)]
    tally.add("p1")
    tally.discard("p1")  # its breaker was reset
    tally.flush()
    assert sent == [Successes("p1", 3), Successes("p2", 1)]

    # The manager's tick flushes the request path's tally into its own mailbox, in order, and counts them.
    mgr, events = breaker_manager()
    real = SuccessTally(lambda m: mgr.ref.try_cast(m))
    mgr.successes = real
    async with running(mgr) as ref:
        ref.cast(Outcome("p1", False))
        for _ in range(5):
            real.add("p1")
        assert (await ref.call(GetState("p1"))).successes == 0
        await trio.sleep(0.3)
        await ref.call(GetState("p1"))
        view = await ref.call(GetState("p1"))
        assert (view.successes, view.failures, view.consecutive_failures, view.window_outcomes) == (5, 1, 0, 6)
        real.add("p1")
        await ref.call(Reset("p1"))  # an operator's reset forgets the count, as it zeroes the totals
        await trio.sleep(0.3)
        assert (await ref.call(GetState("p1"))).successes == 0
    assert events == []


async def gate(views, ref, provider):
    """The request path's two steps: the published view, then ``Acquire`` only when it says ASK."""
    verdict = check(views.value, provider, trio.current_time())
    if verdict != ASK:
        return verdict
    return "probe" if await ref.call(Acquire(provider)) else DENY


async def test_probe_cycle_through_acquire(autojump_clock):
    mgr, events = breaker_manager()
    async with running(mgr) as ref:
        ref.cast(Outcome("p1", False))
        ref.cast(Outcome("p1", False))
        await ref.call(GetState(None))
        assert await gate(mgr.views, ref, "p1") == DENY
        await trio.sleep(10.0)
        assert check(mgr.views.value, "p1", trio.current_time()) == ASK
        assert await gate(mgr.views, ref, "p1") == "probe"
        assert mgr.views.value["p1"].state == "half_open"
        # the only slot is taken: the published view says so, no call needed
        assert await gate(mgr.views, ref, "p1") == DENY
        ref.cast(Release("p1"))  # that probe's client went away
        await ref.call(GetState("p1"))
        assert await gate(mgr.views, ref, "p1") == "probe"
        ref.cast(Outcome("p1", True))
        await ref.call(GetState("p1"))
        assert mgr.views.value["p1"].half_open_successes == 1
        assert await gate(mgr.views, ref, "p1") == "probe"
        ref.cast(Outcome("p1", True))
        closed = await ref.call(GetState("p1"))
        assert closed.state == "closed"
        assert await gate(mgr.views, ref, "p1") == ALLOW
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        ("closed", "open", "consecutive_failures"),
        ("open", "half_open", "recovery_timeout"),
        ("half_open", "closed", "probes_succeeded"),
    ]


async def test_failed_probe_reopens(autojump_clock):
    mgr, events = breaker_manager()
    async with running(mgr) as ref:
        for _ in range(2):
            ref.cast(Outcome("p1", False))
        await trio.sleep(10.0)
        assert await ref.call(Acquire("p1")) is True
        ref.cast(Outcome("p1", False))
        view = await ref.call(GetState("p1"))
        assert view.state == "open"
        assert view.retry_at == pytest.approx(trio.current_time() + 10.0)
    assert events[-1] == BreakerTransition("p1", "half_open", "open", "probe_failed")


async def test_reset_configure_remove_and_refusals(autojump_clock):
    mgr, events = breaker_manager(providers=("p1", "p2"), overrides={"p2": BreakerSettings(failure_threshold=1)})
    async with running(mgr) as ref:
        assert set(mgr.views.value) == {"p1", "p2"}
        ref.cast(Outcome("p2", False))
        assert (await ref.call(GetState("p2"))).state == "open"  # its own threshold of 1
        view = await ref.call(Reset("p2"))
        assert (view.state, view.failures) == ("closed", 0)
        assert events[-1] == BreakerTransition("p2", "open", "closed", "reset")
        assert mgr.views.value["p2"].state == "closed"

        view = await ref.call(Configure("p1", BreakerSettings(failure_threshold=1)))
        assert view.state == "closed"
        ref.cast(Outcome("p1", False))
        assert (await ref.call(GetState("p1"))).state == "open"

        assert await ref.call(GetState("nobody")) is None
        everything = await ref.call(GetState(None))
        assert set(everything) == {"p1", "p2"} and isinstance(everything["p1"], BreakerView)
        assert await ref.call(Remove("p1")) is True
        assert await ref.call(Remove("p1")) is False
        assert "p1" not in mgr.views.value

        refused = await ref.call(Reset("nobody"))
        assert refused.code == "not_found"
        with pytest.raises(LookupError):
            unwrap(refused)
        with pytest.raises(TypeError):
            Configure("p2", {"failure_threshold": 1})  # a bad message cannot even be built
        # Anything that is not one of its messages (the old tuples included) gets the runtime's policy.
        assert (await ref.call(("configure", "p2", FAST))).code == "invalid"
        assert (await ref.call(("get_state", "p2"))).code == "invalid"
        ref.cast(("failure", "p2"))
        ref.cast("garbage")
        assert (await ref.call(GetState("p2"))).state == "closed"  # the cast tuple was not a failure
        assert ref.alive and mgr.lifecycle.unknown_messages == 4


def test_outcome_messages_are_built_once_per_provider():
    assert outcome("p", True) is outcome("p", True) and outcome("p", True) == Outcome("p", True)
    assert outcome("p", False) == Outcome("p", False) and outcome("q", True).provider == "q"


async def test_restarted_manager_resumes_from_the_published_views(autojump_clock):
    cell = Published()
    mgr, _ = breaker_manager(cell)
    async with running(mgr) as ref:
        ref.cast(Outcome("p1", False))
        ref.cast(Outcome("p1", False))
        opened = await ref.call(GetState("p1"))
    assert not ref.alive
    async with running(mgr) as ref2:  # the same object runs again, as a supervisor restarts it
        assert ref2 is not ref
        view = await ref2.call(GetState("p1"))
        assert (view.state, view.retry_at, view.failures) == ("open", opened.retry_at, 2)


# -- failover manager ---------------------------------------------------------

PROVIDERS = [ProviderInfo("a", priority=0), ProviderInfo("b", priority=1), ProviderInfo("c", priority=2)]


def failover_manager(**kw):
    events = []
    selector = GroupSelector(Published())
    mgr = FailoverManager(selector, emit=events.append, registry=Registry(), **kw)
    return mgr, events


async def test_group_crud_is_published_for_select():
    mgr, _ = failover_manager(groups=[GroupSpec("g", ("a", "b"), strategy="priority")])
    async with running(mgr) as ref:
        assert set(mgr.selector.groups.value) == {"g"}
        assert mgr.selector.select("g", PROVIDERS, RouteState()) == ["a", "b"]
        assert mgr.selector.select("default", PROVIDERS, RouteState()) == ["a", "b", "c"]

        rr = GroupSpec("rr", ("c", "b", "a"), strategy="round_robin")
        assert await ref.call(CreateGroup(rr)) == rr
        assert [mgr.selector.select("rr", PROVIDERS, RouteState())[0] for _ in range(4)] == ["c", "b", "a", "c"]
        assert (await ref.call(CreateGroup(rr))).code == "conflict"

        updated = GroupSpec("g", ("b", "c"), strategy="priority", max_attempts=1)
        assert await ref.call(UpdateGroup(updated)) == updated
        assert mgr.selector.select("g", PROVIDERS, RouteState()) == ["b"]
        assert (await ref.call(UpdateGroup(GroupSpec("zz", ("a",))))).code == "not_found"

        assert await ref.call(GetGroup("g")) == updated
        assert (await ref.call(GetGroup("default"))).name == "default"
        assert set(await ref.call(ListGroups())) == {"g", "rr"}
        assert await ref.call(DeleteGroup("rr")) == rr
        assert (await ref.call(DeleteGroup("rr"))).code == "not_found"
        with pytest.raises(LookupError):
            mgr.selector.select("rr", PROVIDERS, RouteState())
        with pytest.raises(TypeError):
            CreateGroup("not a spec")
        assert (await ref.call(("create_group", rr))).code == "invalid"  # the old tuple form: not understood


async def test_outcomes_make_stats_and_events():
    mgr, events = failover_manager(groups=[GroupSpec("g", ("a", "b", "c"))])
    async with running(mgr) as ref:
        ref.cast(GroupOutcome("g", ("a",), True))
        ref.cast(GroupOutcome("g", ("a", "b"), True))
        ref.cast(GroupOutcome("g", ("a", "b", "c"), False))
        ref.cast(GroupOutcome("g", ("a", "a"), True))  # a retry on the same provider: no fallback
        with pytest.raises(ValueError):
            GroupOutcome("g", (), True)  # nonsense cannot be built
        ref.cast(("outcome", "g", "a", True, 1))  # the old tuple: dropped by the runtime's policy
        stats = await ref.call(GetStats("g"))
        assert isinstance(stats, FailoverStats)
        assert stats.group == GroupStats(requests=4, attempts=8, successes=3, failures=5, fallbacks=1, exhausted=1)
        assert stats.providers == {
            "a": ProviderStats(attempts=5, successes=2, failures=3, fallbacks=0, exhausted=0),
            "b": ProviderStats(attempts=2, successes=1, failures=1, fallbacks=1, exhausted=0),
            "c": ProviderStats(attempts=1, successes=0, failures=1, fallbacks=0, exhausted=1),
        }
        assert events == [
            FailoverEvent("fallback_success", "g", "a", "b", 2),
            FailoverEvent("fallback_exhausted", "g", "c", None, 3),
        ]
        assert set(await ref.call(GetStats(None))) == {"g"}
        assert (await ref.call(GetStats("default"))).group == GroupStats()
        assert (await ref.call(GetStats("nope"))).code == "not_found"
        await ref.call(ResetStats(None))
        ref.cast(GroupOutcome("g", ["a", "b"], False))  # exhausted: the last one tried is "b"
        stats = await ref.call(GetStats("g"))
        assert stats.group == GroupStats(requests=1, attempts=2, successes=0, failures=2, fallbacks=0, exhausted=1)
        assert stats.providers["b"] == ProviderStats(attempts=1, successes=0, failures=1, fallbacks=0, exhausted=1)
        assert stats.providers["a"] == ProviderStats(attempts=1, successes=0, failures=1, fallbacks=0, exhausted=0)
        await ref.call(ResetStats("g"))
        assert (await ref.call(GetStats("g"))).group == GroupStats()
        assert "g" in mgr.snapshot()["groups"]
        assert mgr.lifecycle.unknown_messages == 1


async def test_restarted_failover_manager_keeps_runtime_groups():
    mgr, _ = failover_manager(groups=[GroupSpec("g", ("a",))])
    async with running(mgr) as ref:
        await ref.call(CreateGroup(GroupSpec("h", ("b",))))
        await ref.call(DeleteGroup("g"))
    async with running(mgr) as ref:
        assert set(await ref.call(ListGroups())) == {"h"}


async def test_supervised_manager_crash_keeps_open_breakers(autojump_clock):
    from runestone.runtime import NamedRef, Supervisor

    registry = Registry()
    cell = Published()
    emitted = []

    def flaky_emit(event):
        if not emitted:
            emitted.append("boom")
            raise RuntimeError("telemetry sink broke")
        emitted.append(event)

    mgr = CircuitBreakerManager(cell, emit=flaky_emit, registry=registry, settings=FAST)
    sup = Supervisor("sup", [mgr.child_spec()], registry=registry)
    named = NamedRef(registry, "circuit_breaker_manager")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        named.cast(Outcome("p1", False))
        named.cast(Outcome("p1", False))  # opens the breaker, then emitting crashes the actor
        with trio.fail_after(5):
            while mgr.lifecycle.restarts == 0 or not named.alive:
                await trio.sleep(0.01)
        view = await named.call(GetState("p1"))
        assert (view.state, view.failures) == ("open", 2)
        assert cell.value["p1"].state == "open"
        await trio.sleep(10.0)
        assert await gate(cell, named, "p1") == "probe"
        assert emitted[-1] == BreakerTransition("p1", "open", "half_open", "recovery_timeout")
        sup.request_stop()
