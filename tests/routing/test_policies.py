"""Router policies: filters, orderings, client requirements."""

import pytest

from runestone.resilience.breaker import BreakerView
from runestone.resilience.failover import ProbeSchedule, ProviderInfo, RouteState
from runestone.routing.policies import (
    NO_REQUIREMENTS,
    Requirements,
    enhanced_score,
    parse_requirements,
    route,
)

M = "gpt-4o"
A = ProviderInfo("a", priority=1, weight=1.0, models={M})
B = ProviderInfo("b", priority=0, weight=1.0, models={M}, max_concurrency=2)
C = ProviderInfo("c", priority=1, weight=5.0, models={M}, capabilities={"streaming"})
D = ProviderInfo("d", priority=2, weight=1.0, models={"claude-3"})
ALL = [A, B, C, D]
EMPTY = RouteState()


def r(state=EMPTY, *, policy="default", req=NO_REQUIREMENTS, threshold=0.0, now=0.0, model=M, cands=ALL):
    return route(model, cands, state, policy=policy, requirements=req, health_threshold=threshold, now=now)


def test_default_orders_by_priority_then_weight_and_only_serving_providers():
    d = r()
    assert d.providers == ("b", "c", "a")
    assert d.reason == "policy=default"
    assert d.skipped == {} and d.alternatives == ()


def test_no_provider_for_model():
    d = r(model="llama")
    assert d.providers == ()
    assert "no provider serves model 'llama'" in d.reason


def test_skips_open_breakers_until_due():
    view = BreakerView(provider="b", state="open", opened_at=0.0, retry_at=30.0)
    state = RouteState(breakers={"b": view})
    d = r(state, now=10.0)
    assert d.providers == ("c", "a")
    assert d.skipped == {"b": "circuit_open"}
    assert r(state, now=30.0).providers == ("b", "c", "a")


def test_skips_full_providers():
    d = r(RouteState(in_flight={"b": 2, "a": 50}))
    assert d.providers == ("c", "a")  # a has no limit
    assert d.skipped == {"b": "at_capacity"}
    assert r(RouteState(in_flight={"b": 1})).providers[0] == "b"


def test_requirements_filter_capabilities_cost_latency_exclude():
    req = Requirements(require=frozenset({"tools"}))
    d = r(req=req)
    assert d.providers == ("b", "a")
    assert d.skipped == {"c": "missing_capability:tools"}

    state = RouteState(cost={"a": 0.5, "b": 2.0}, ttft_ewma={"a": 900.0, "c": 100.0})
    assert r(state, req=Requirements(max_cost=1.0)).skipped == {"b": "over_max_cost"}
    d = r(state, req=Requirements(max_latency_ms=500.0))
    assert d.providers == ("b", "c") and d.skipped == {"a": "over_max_latency"}
    d = r(req=Requirements(exclude=frozenset({"b", "c"})))
    assert d.providers == ("a",) and d.skipped == {"b": "excluded", "c": "excluded"}


def test_everything_ruled_out_is_reported():
    d = r(req=Requirements(exclude=frozenset({"a", "b", "c"})))
    assert d.providers == ()
    assert "ruled out" in d.reason
    assert set(d.skipped) == {"a", "b", "c"}


def test_unhealthy_set_aside_unless_nothing_else():
    state = RouteState(health={"b": 0.2, "c": 0.9})
    d = r(state, threshold=0.5)
    assert d.providers == ("c", "a")
    assert d.alternatives == ("b",)
    state = RouteState(health={"a": 0.1, "b": 0.2, "c": 0.3})
    d = r(state, threshold=0.5)
    assert d.providers == ("b", "c", "a")
    assert d.alternatives == ()
    assert "health threshold" in d.reason


def test_a_provider_set_aside_for_health_gets_one_passive_probe_every_5s():
    probes = ProbeSchedule()
    state = RouteState(health={"b": 0.2, "a": 0.3, "c": 0.9}, probes=probes)
    # b and a are set aside; b (priority 0) is probed first, at once, then a on the next request.
    d = r(state, threshold=0.5, now=50.0)
    assert (d.providers, d.alternatives, d.probe) == (("b", "c"), ("a",), "b")
    assert "passive probe of b" in d.reason
    d = r(state, threshold=0.5, now=50.0)
    assert (d.providers, d.alternatives, d.probe) == (("a", "c"), ("b",), "a")
    # Then neither until 5 s have passed since its own probe: a bounded share whatever the traffic.
    decisions = [r(state, threshold=0.5, now=50.0 + i * 0.01) for i in range(1, 500)]
    assert all((x.providers, x.probe) == (("c",), None) for x in decisions)
    assert r(state, threshold=0.5, now=55.0).probe == "b"
    assert r(state, threshold=0.5, now=55.0).probe == "a"
    assert r(state, threshold=0.5, now=59.9).probe is None
    # A client's prefer list still comes first; its exclude list is never probed.
    d = r(state, threshold=0.5, now=60.0, req=Requirements(prefer=("c",)))
    assert (d.providers, d.probe) == (("c", "b"), "b")
    d = r(state, threshold=0.5, now=65.0, req=Requirements(exclude=frozenset({"b"})))
    assert (d.providers, d.probe) == (("a", "c"), "a")
    assert probes.last == {"b": 60.0, "a": 65.0}
    # Without a schedule (state.probes None) nobody is probed: today's set-aside as it was.
    assert r(RouteState(health={"b": 0.2}), threshold=0.5, now=0.0).providers == ("c", "a")


def test_no_probe_is_spent_when_only_providers_below_the_threshold_are_left():
    probes = ProbeSchedule()
    state = RouteState(health={"a": 0.1, "b": 0.2, "c": 0.3}, probes=probes)
    d = r(state, threshold=0.5, now=0.0)
    assert (d.providers, d.probe) == (("b", "c", "a"), None)
    assert probes.last == {}


def test_health_policy_orders_by_score():
    state = RouteState(health={"a": 0.99, "b": 0.5, "c": 0.7})
    assert r(state, policy="health").providers == ("a", "c", "b")


def test_cost_policy_cheapest_first_unpriced_last():
    state = RouteState(cost={"a": 0.001, "c": 0.002})
    assert r(state, policy="cost").providers == ("a", "c", "b")


def test_enhanced_blend_formula_and_order():
    state = RouteState(health={"a": 1.0, "b": 0.6, "c": 1.0}, ttft_ewma={"a": 500.0, "c": 100.0}, in_flight={"b": 1})
    # a: 0.4 + 0.3*0.5 + 0.2*1 + 0.1*0.5 = 0.8
    assert enhanced_score(A, state, 0) == pytest.approx(0.8)
    # b: 0.4*0.6 + 0.3*0.5 (unmeasured) + 0.2*(1 - 1/2) + 0.1*1 = 0.59
    assert enhanced_score(B, state, 0) == pytest.approx(0.59)
    # c: 0.4 + 0.3*(500/600) + 0.2 + 0.1*0.5 = 0.9
    assert enhanced_score(C, state, 0) == pytest.approx(0.9)
    assert r(state, policy="enhanced").providers == ("c", "a", "b")


def test_prefer_moves_named_first_in_order_and_client_policy_wins():
    d = r(req=Requirements(prefer=("a", "zzz", "c")))
    assert d.providers == ("a", "c", "b")
    state = RouteState(cost={"a": 0.001, "b": 0.5, "c": 0.01})
    d = r(state, req=Requirements(policy="cost"))
    assert d.providers == ("a", "c", "b") and d.reason == "policy=cost"
    with pytest.raises(ValueError):
        r(policy="fastest")


def test_parse_requirements_valid():
    assert parse_requirements(None) is NO_REQUIREMENTS
    assert parse_requirements({}) is NO_REQUIREMENTS
    req = parse_requirements(
        {
            "policy": "enhanced",
            "max_cost": 0,
            "max_latency_ms": 800,
            "require": ["tools", "streaming"],
            "prefer": ["a", "b"],
            "exclude": "c",
        }
    )
    assert req == Requirements(
        policy="enhanced",
        max_cost=0.0,
        max_latency_ms=800.0,
        require=frozenset({"tools", "streaming"}),
        prefer=("a", "b"),
        exclude=frozenset({"c"}),
    )


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ([], "runestone must be an object"),
        ({"polcy": "cost"}, "runestone.polcy"),
        ({"policy": "cheap"}, "runestone.policy"),
        ({"max_cost": "1"}, "runestone.max_cost"),
        ({"max_cost": -1}, "runestone.max_cost"),
        ({"max_cost": True}, "runestone.max_cost"),
        ({"max_latency_ms": 0}, "runestone.max_latency_ms"),
        ({"max_latency_ms": float("inf")}, "runestone.max_latency_ms"),
        ({"require": ["telepathy"]}, "runestone.require"),
        ({"require": [1]}, "runestone.require"),
        ({"prefer": {"a": 1}}, "runestone.prefer"),
        ({"exclude": [""]}, "runestone.exclude"),
    ],
)
def test_parse_requirements_names_the_bad_field(obj, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_requirements(obj)
