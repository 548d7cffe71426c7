"""Failover strategies' orderings, group specs, and the selector's round-robin rotation."""

import random
from collections import Counter

import pytest

from runestone.resilience.breaker import BreakerView
from runestone.resilience.failover import (
    GroupSelector,
    GroupSpec,
    ProviderInfo,
    RouteState,
    order_candidates,
)
from runestone.runtime import Published

A = ProviderInfo("a", priority=2, weight=1.0)
B = ProviderInfo("b", priority=1, weight=3.0)
C = ProviderInfo("c", priority=1, weight=0.0)
D = ProviderInfo("d", priority=0, weight=1.0)
ALL = [A, B, C, D]
EMPTY = RouteState()


def open_view(name: str, retry_at: float) -> BreakerView:
    return BreakerView(provider=name, state="open", opened_at=0.0, retry_at=retry_at)


def test_round_robin_rotates_through_every_position():
    orders = [order_candidates("round_robin", ALL, EMPTY, rotation=r) for r in range(5)]
    assert orders == [
        ["a", "b", "c", "d"],
        ["b", "c", "d", "a"],
        ["c", "d", "a", "b"],
        ["d", "a", "b", "c"],
        ["a", "b", "c", "d"],
    ]


def test_priority_lower_first_ties_keep_the_given_order():
    assert order_candidates("priority", ALL, EMPTY) == ["d", "b", "c", "a"]
    assert order_candidates("priority", [C, B], EMPTY) == ["c", "b"]


def test_priority_group_tries_its_members_in_the_listed_order_unless_priorities_differ():
    # Members configured alike (every provider's priority defaults to 100): the order the group lists.
    z, m, a = ProviderInfo("z", priority=100), ProviderInfo("m", priority=100), ProviderInfo("a", priority=100)
    cell = Published({"g": GroupSpec("g", ("z", "m", "a"), strategy="priority", max_attempts=3)})
    sel = GroupSelector(cell)
    assert sel.select("g", [a, m, z], EMPTY) == ["z", "m", "a"]
    assert sel.select("g", {"a": a, "m": m, "z": z}, EMPTY) == ["z", "m", "a"]
    # An explicit priority still wins over the listing; equal ones keep it.
    cell.publish({"g": GroupSpec("g", ("z", "m", "a"), strategy="priority", max_attempts=3)})
    assert sel.select("g", [a, m, ProviderInfo("z", priority=200)], EMPTY) == ["m", "a", "z"]
    # The default group lists nobody: by priority, then by name, whatever the registration order.
    assert GroupSelector(Published({})).select("default", [z, m, a], EMPTY) == ["a", "m", "z"]


def test_load_balanced_follows_weights():
    rng = random.Random(1)
    first = Counter(order_candidates("load_balanced", [A, B, C], EMPTY, rng=rng)[0] for _ in range(2000))
    # weights a=1, b=3, c=0: b first ~75%, a ~25%, c never
    assert first["c"] == 0
    assert 0.68 < first["b"] / 2000 < 0.82
    last = Counter(order_candidates("load_balanced", [A, B, C], EMPTY, rng=rng)[-1] for _ in range(200))
    assert last == {"c": 200}


def test_least_loaded_fewest_in_flight_ties_rotate():
    state = RouteState(in_flight={"a": 3, "b": 0, "c": 1, "d": 0})
    assert order_candidates("least_loaded", ALL, state, rotation=0) == ["b", "d", "c", "a"]
    assert order_candidates("least_loaded", ALL, state, rotation=2) == ["d", "b", "c", "a"]


def test_fastest_first_measured_then_unmeasured_then_open_breakers():
    state = RouteState(
        ttft_ewma={"a": 300.0, "b": 120.0, "c": 50.0},
        breakers={"c": open_view("c", retry_at=100.0)},
    )
    assert order_candidates("fastest_first", ALL, state, now=10.0) == ["b", "a", "d", "c"]
    # once c is due for a probe it takes its place again
    assert order_candidates("fastest_first", ALL, state, now=100.0) == ["c", "b", "a", "d"]


def test_cost_cheapest_first_unknown_last():
    state = RouteState(cost={"a": 0.001, "b": 0.01, "d": 0.001})
    assert order_candidates("cost", ALL, state) == ["d", "a", "b", "c"]


def test_open_breakers_go_last_in_every_strategy():
    state = RouteState(breakers={"d": open_view("d", 50.0), "b": open_view("b", 50.0)})
    assert order_candidates("priority", ALL, state, now=0.0) == ["c", "a", "d", "b"]
    assert order_candidates("round_robin", ALL, state, rotation=1, now=0.0) == ["c", "a", "b", "d"]


def test_unknown_strategy_and_empty():
    assert order_candidates("priority", [], EMPTY) == []
    with pytest.raises(ValueError):
        order_candidates("random_walk", ALL, EMPTY)


def test_group_spec_validation():
    GroupSpec("default")  # the default group may leave providers implicit
    with pytest.raises(ValueError):
        GroupSpec("g")
    with pytest.raises(ValueError):
        GroupSpec("g", ("a", "a"))
    with pytest.raises(ValueError):
        GroupSpec("g", ("a",), strategy="nope")
    with pytest.raises(ValueError):
        GroupSpec("g", ("a",), max_attempts=0)
    assert GroupSpec("g", ["a", "b"]).providers == ("a", "b")


def test_provider_info_model_patterns():
    p = ProviderInfo("p", models={"gpt-4o", "claude-*"})
    assert p.serves("gpt-4o") and p.serves("claude-3-haiku")
    assert not p.serves("gpt-4") and not p.serves("llama")
    assert ProviderInfo("any", models={"*"}).serves("whatever")
    assert not ProviderInfo("none").serves("gpt-4o")


def test_selector_round_robin_advances_per_call_and_per_group():
    cell = Published()
    cell.publish({"g": GroupSpec("g", ("a", "b", "c"), strategy="round_robin", max_attempts=3)})
    sel = GroupSelector(cell)
    firsts = [sel.select("g", ALL, EMPTY)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    # a group only ever offers its own members, in at most max_attempts
    assert sorted(sel.select("g", ALL, EMPTY)) == ["a", "b", "c"]
    assert sel.rotations == {"g": 7}


def test_selector_truncates_to_max_attempts_and_skips_unregistered():
    cell = Published({"g": GroupSpec("g", ("x", "a", "b", "d"), strategy="priority", max_attempts=2)})
    sel = GroupSelector(cell)
    assert sel.select("g", ALL, EMPTY) == ["d", "b"]
    assert sel.select("g", {p.name: p for p in ALL}, EMPTY) == ["d", "b"]


def test_selector_default_group_covers_all_providers():
    sel = GroupSelector(Published({}))
    assert sel.select("default", ALL, EMPTY) == ["d", "b", "c"]  # priority, default max_attempts 3
    with pytest.raises(LookupError):
        sel.select("missing", ALL, EMPTY)


def test_selector_puts_unhealthy_after_healthy_but_before_open():
    cell = Published({"g": GroupSpec("g", ("a", "b", "c", "d"), strategy="priority", max_attempts=4, health_threshold=0.5)})
    sel = GroupSelector(cell)
    state = RouteState(health={"d": 0.1, "b": 0.9}, breakers={"c": open_view("c", 99.0)})
    sel.probes.claim("d", 0.0)  # d's passive probe was just taken (see the next test)
    assert sel.select("g", ALL, state, now=0.0) == ["b", "a", "d", "c"]


def test_selector_gives_a_member_below_the_threshold_one_passive_probe_every_5s():
    cell = Published({"g": GroupSpec("g", ("a", "b", "c", "d"), strategy="priority", max_attempts=4,
                                     health_threshold=0.5)})
    sel = GroupSelector(cell)
    state = RouteState(health={"d": 0.1, "a": 0.2}, breakers={"c": open_view("c", 999.0)})
    # Set aside at t=100: its first probe at once, then none for 5 s, then the next one.
    firsts = {t: sel.select("g", ALL, state, now=t) for t in (100.0, 100.1, 102.0, 104.9, 105.0, 105.05, 105.1, 110.0)}
    assert firsts[100.0] == ["d", "b", "a", "c"]  # d is due first (priority order); a's probe waits
    assert firsts[100.1] == ["a", "b", "d", "c"]  # a's own probe
    assert firsts[102.0] == firsts[104.9] == ["b", "d", "a", "c"]
    assert [firsts[t][0] for t in (105.0, 105.05, 105.1, 110.0)] == ["d", "b", "a", "d"]
    # Without a clock, or when no healthy member is admitted (all are tried anyway), no probe is spent.
    assert sel.select("g", ALL, state) == ["b", "d", "a", "c"]
    everyone_down = RouteState(health={"a": 0.1, "b": 0.1, "d": 0.1}, breakers=state.breakers)
    assert sel.select("g", ALL, everyone_down, now=200.0) == ["d", "b", "a", "c"]
    assert sel.probes.last == {"d": 110.0, "a": 105.1}


def test_group_spec_from_config_and_configured_default():
    from types import SimpleNamespace

    group = SimpleNamespace(name="g", providers=("a", "b"), strategy="cost", max_attempts=2, health_threshold=0.3)
    assert GroupSpec.from_config(group) == GroupSpec("g", ("a", "b"), "cost", 2, 0.3)
    defaults = SimpleNamespace(strategy="round_robin", max_attempts=4, health_threshold=0.5, groups=())
    default = GroupSpec.from_config(defaults, "default")
    assert default == GroupSpec("default", (), "round_robin", 4, 0.5)
    sel = GroupSelector(Published(), default=default)
    assert [sel.select("default", ALL, EMPTY)[0] for _ in range(4)] == ["a", "b", "c", "d"]
