"""The resilience actors, run on the real runtime: CircuitBreakerManager and FailoverManager."""

from contextlib import asynccontextmanager

import pytest
import trio

from runestone.resilience.breaker import ASK, DENY, BreakerSettings, BreakerView, check
from runestone.resilience.breaker_manager import PROBE, CircuitBreakerManager, admit
from runestone.resilience.failover import GroupSelector, GroupSpec, ProviderInfo, RouteState
from runestone.resilience.failover_manager import FailoverManager, FailoverStats, GroupStats, ProviderStats
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
        ref.cast(("success", "p1"))
        ref.cast(("failure", "p1"))
        await ref.call(("get_state", "p1"))  # the mailbox is FIFO: the casts are handled
        view = mgr.views.value["p1"]
        assert (view.state, view.successes, view.failures, view.consecutive_failures) == ("closed", 1, 1, 1)
        assert events == []
        ref.cast(("failure", "p1"))
        opened = await ref.call(("get_state", "p1"))
        assert opened.state == "open"
        assert mgr.views.value["p1"] == opened
        assert events == [BreakerTransition("p1", "closed", "open", "consecutive_failures")]
        assert check(mgr.views.value, "p1", trio.current_time()) == DENY


async def test_probe_cycle_through_admit(autojump_clock):
    mgr, events = breaker_manager()
    async with running(mgr) as ref:
        ref.cast(("failure", "p1"))
        ref.cast(("failure", "p1"))
        await ref.call(("get_state", None))
        assert await admit(mgr.views, ref, "p1") == DENY
        await trio.sleep(10.0)
        assert check(mgr.views.value, "p1", trio.current_time()) == ASK
        assert await admit(mgr.views, ref, "p1") == PROBE
        assert mgr.views.value["p1"].state == "half_open"
        # the only slot is taken: the published view says so, no call needed
        assert await admit(mgr.views, ref, "p1") == DENY
        ref.cast(("release", "p1"))  # that probe's client went away
        await ref.call(("get_state", "p1"))
        assert await admit(mgr.views, ref, "p1") == PROBE
        ref.cast(("success", "p1"))
        await ref.call(("get_state", "p1"))
        assert mgr.views.value["p1"].half_open_successes == 1
        assert await admit(mgr.views, ref, "p1") == PROBE
        ref.cast(("success", "p1"))
        closed = await ref.call(("get_state", "p1"))
        assert closed.state == "closed"
        assert await admit(mgr.views, ref, "p1") == "allow"
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        ("closed", "open", "consecutive_failures"),
        ("open", "half_open", "recovery_timeout"),
        ("half_open", "closed", "probes_succeeded"),
    ]


async def test_failed_probe_reopens(autojump_clock):
    mgr, events = breaker_manager()
    async with running(mgr) as ref:
        for _ in range(2):
            ref.cast(("failure", "p1"))
        await trio.sleep(10.0)
        assert await ref.call(("acquire", "p1")) is True
        ref.cast(("failure", "p1"))
        view = await ref.call(("get_state", "p1"))
        assert view.state == "open"
        assert view.retry_at == pytest.approx(trio.current_time() + 10.0)
    assert events[-1] == BreakerTransition("p1", "half_open", "open", "probe_failed")


async def test_reset_configure_remove_and_refusals(autojump_clock):
    mgr, events = breaker_manager(providers=("p1", "p2"), overrides={"p2": BreakerSettings(failure_threshold=1)})
    async with running(mgr) as ref:
        assert set(mgr.views.value) == {"p1", "p2"}
        ref.cast(("failure", "p2"))
        assert (await ref.call(("get_state", "p2"))).state == "open"  # its own threshold of 1
        view = await ref.call(("reset", "p2"))
        assert (view.state, view.failures) == ("closed", 0)
        assert events[-1] == BreakerTransition("p2", "open", "closed", "reset")
        assert mgr.views.value["p2"].state == "closed"

        view = await ref.call(("configure", "p1", BreakerSettings(failure_threshold=1)))
        assert view.state == "closed"
        ref.cast(("failure", "p1"))
        assert (await ref.call(("get_state", "p1"))).state == "open"

        assert await ref.call(("get_state", "nobody")) is None
        everything = await ref.call(("get_state", None))
        assert set(everything) == {"p1", "p2"} and isinstance(everything["p1"], BreakerView)
        assert await ref.call(("remove", "p1")) is True
        assert await ref.call(("remove", "p1")) is False
        assert "p1" not in mgr.views.value

        refused = await ref.call(("reset", "nobody"))
        assert refused.code == "not_found"
        with pytest.raises(LookupError):
            unwrap(refused)
        assert isinstance(await ref.call(("configure", "p2", {"failure_threshold": 1})), Rejected)
        assert isinstance(await ref.call(("fly",)), Rejected)
        ref.cast("garbage")  # ignored, not a crash
        assert await ref.call(("get_state", "p2")) is not None
        assert ref.alive


async def test_restarted_manager_resumes_from_the_published_views(autojump_clock):
    cell = Published()
    mgr, _ = breaker_manager(cell)
    async with running(mgr) as ref:
        ref.cast(("failure", "p1"))
        ref.cast(("failure", "p1"))
        opened = await ref.call(("get_state", "p1"))
    assert not ref.alive
    async with running(mgr) as ref2:  # the same object runs again, as a supervisor restarts it
        assert ref2 is not ref
        view = await ref2.call(("get_state", "p1"))
        assert (view.state, view.retry_at, view.failures) == ("open", opened.retry_at, 2)


async def test_admit_denies_when_the_manager_cannot_answer(autojump_clock):
    cell = Published()
    mgr, _ = breaker_manager(cell)
    async with running(mgr) as ref:
        ref.cast(("failure", "p1"))
        ref.cast(("failure", "p1"))
        await ref.call(("get_state", "p1"))
    await trio.sleep(10.0)
    assert check(cell.value, "p1", trio.current_time()) == ASK
    with pytest.raises(ActorDead):
        await ref.call(("acquire", "p1"))
    assert await admit(cell, ref, "p1") == DENY


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
        assert mgr.select("g", PROVIDERS, RouteState()) == ["a", "b"]
        assert mgr.select("default", PROVIDERS, RouteState()) == ["a", "b", "c"]

        rr = GroupSpec("rr", ("c", "b", "a"), strategy="round_robin")
        assert await ref.call(("create_group", rr)) == rr
        assert [mgr.select("rr", PROVIDERS, RouteState())[0] for _ in range(4)] == ["c", "b", "a", "c"]
        assert (await ref.call(("create_group", rr))).code == "conflict"

        updated = GroupSpec("g", ("b", "c"), strategy="priority", max_attempts=1)
        assert await ref.call(("update_group", updated)) == updated
        assert mgr.select("g", PROVIDERS, RouteState()) == ["b"]
        assert (await ref.call(("update_group", GroupSpec("zz", ("a",))))).code == "not_found"

        assert await ref.call(("get_group", "g")) == updated
        assert (await ref.call(("get_group", "default"))).name == "default"
        assert set(await ref.call(("list_groups",))) == {"g", "rr"}
        assert await ref.call(("delete_group", "rr")) == rr
        assert (await ref.call(("delete_group", "rr"))).code == "not_found"
        with pytest.raises(LookupError):
            mgr.select("rr", PROVIDERS, RouteState())
        assert (await ref.call(("create_group", "not a spec"))).code == "invalid"


async def test_outcomes_make_stats_and_events():
    mgr, events = failover_manager(groups=[GroupSpec("g", ("a", "b", "c"))])
    async with running(mgr) as ref:
        ref.cast(("outcome", "g", "a", True, 1))
        ref.cast(("outcome", "g", "b", True, 2, ("a",)))
        ref.cast(("outcome", "g", "c", False, 3, ("a", "b")))
        ref.cast(("outcome", "g", "a", True, 2, ("a",)))  # a retry on the same provider: no fallback
        ref.cast(("outcome", "g", "a", True, 0))  # nonsense, ignored
        stats = await ref.call(("get_stats", "g"))
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
        assert set(await ref.call(("get_stats", None))) == {"g"}
        assert (await ref.call(("get_stats", "default"))).group == GroupStats()
        assert (await ref.call(("get_stats", "nope"))).code == "not_found"
        await ref.call(("reset_stats", None))
        # an exhausted request may list its final attempt among the failed ones too
        ref.cast(("outcome", "g", "b", False, 2, ("a", "b")))
        stats = await ref.call(("get_stats", "g"))
        assert stats.group == GroupStats(requests=1, attempts=2, successes=0, failures=2, fallbacks=0, exhausted=1)
        assert stats.providers["b"] == ProviderStats(attempts=1, successes=0, failures=1, fallbacks=0, exhausted=1)
        assert stats.providers["a"] == ProviderStats(attempts=1, successes=0, failures=1, fallbacks=0, exhausted=0)
        await ref.call(("reset_stats", "g"))
        assert (await ref.call(("get_stats", "g"))).group == GroupStats()
        assert "g" in mgr.snapshot()["groups"]


async def test_restarted_failover_manager_keeps_runtime_groups():
    mgr, _ = failover_manager(groups=[GroupSpec("g", ("a",))])
    async with running(mgr) as ref:
        await ref.call(("create_group", GroupSpec("h", ("b",))))
        await ref.call(("delete_group", "g"))
    async with running(mgr) as ref:
        assert set(await ref.call(("list_groups",))) == {"h"}


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
        named.cast(("failure", "p1"))
        named.cast(("failure", "p1"))  # opens the breaker, then emitting crashes the actor
        with trio.fail_after(5):
            while mgr.lifecycle.restarts == 0 or not named.alive:
                await trio.sleep(0.01)
        view = await named.call(("get_state", "p1"))
        assert (view.state, view.failures) == ("open", 2)
        assert cell.value["p1"].state == "open"
        await trio.sleep(10.0)
        assert await admit(cell, named, "p1") == PROBE
        assert emitted[-1] == BreakerTransition("p1", "open", "half_open", "recovery_timeout")
        sup.request_stop()
