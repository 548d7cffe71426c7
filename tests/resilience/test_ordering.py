"""One ordering mechanism for router policies, failover strategies and pools, and one breaker predicate."""

import random

from runestone.resilience import ordering
from runestone.resilience.breaker import BreakerView, check, refuses
from runestone.resilience.failover import STRATEGIES, ProviderInfo, RouteState, order_candidates
from runestone.resilience.ordering import (COST, IN_FLIGHT, NAME, PRIORITY, breakers_last, rotated, sorted_by,
                                           split_refused, weighted_first, weighted_shuffle)
from runestone.routing.policies import POLICIES, route
from runestone.routing.splits import Pool, PoolSpec

A = ProviderInfo("a", priority=2, weight=1.0, models=frozenset({"m"}))
B = ProviderInfo("b", priority=1, weight=3.0, models=frozenset({"m"}))
C = ProviderInfo("c", priority=1, weight=0.0, models=frozenset({"m"}))
ALL = [A, B, C]

ORDERINGS = (ordering.SortedBy, ordering.Rotated, ordering.WeightedShuffle, ordering.WeightedFirst)


def test_every_policy_strategy_and_pool_orders_through_the_one_mechanism():
    for table in (POLICIES, STRATEGIES):
        for name, policy in table.items():
            assert isinstance(policy, ORDERINGS), name
            ordered = policy(ALL, RouteState(), rotation=1, rng=random.Random(1))
            assert sorted(p.name for p in ordered) == ["a", "b", "c"], name
    assert isinstance(Pool(PoolSpec("p", ("a", "b"))).ordering, ordering.WeightedFirst)
    # The cost key is one key, whether a router policy or a failover strategy sorts by it.
    assert POLICIES["cost"] == STRATEGIES["cost"] == sorted_by(COST, PRIORITY, NAME)


def test_orderings_have_a_readable_repr():
    assert repr(STRATEGIES["cost"]) == "sorted_by(cost, priority, name)"
    assert repr(STRATEGIES["least_loaded"]) == "rotated(in_flight)"
    assert repr(STRATEGIES["round_robin"]) == "rotated()"
    assert repr(POLICIES["default"]) == "sorted_by(priority, weight, name)"
    assert repr(POLICIES["enhanced"]) == "sorted_by(score, priority, name)"
    assert repr(weighted_shuffle()) == "weighted_shuffle()" and repr(weighted_first()) == "weighted_first()"


def test_the_orderings_themselves():
    state = RouteState(in_flight={"a": 0, "b": 2, "c": 0}, cost={"b": 0.1, "c": 0.1})
    assert [p.name for p in sorted_by(PRIORITY)(ALL, state)] == ["b", "c", "a"]  # stable
    assert [p.name for p in sorted_by(COST, PRIORITY, NAME)(ALL, state)] == ["b", "c", "a"]
    assert [p.name for p in rotated()(ALL, state, rotation=4)] == ["b", "c", "a"]
    assert [p.name for p in rotated(IN_FLIGHT)(ALL, state, rotation=1)] == ["c", "a", "b"]
    # weight 0 never goes first while another can; after the drawn one, heaviest first
    for seed in range(20):
        firsts = weighted_first()(ALL, state, rng=random.Random(seed))
        assert firsts[0].name in ("a", "b") and [p.name for p in firsts[1:]] == [
            n for n in ("b", "a", "c") if n != firsts[0].name]
        assert weighted_shuffle()(ALL, state, rng=random.Random(seed))[-1].name == "c"


def half_open_full(name: str) -> BreakerView:
    return BreakerView(provider=name, state="half_open", probes_in_flight=1, half_open_limit=1,
                       probe_deadline=100.0)


def test_one_breaker_predicate_for_filtering_and_ordering():
    breakers = {"b": half_open_full("b"), "a": BreakerView("a", "open", opened_at=0.0, retry_at=5.0)}
    assert refuses(breakers, "b", 1.0) and check(breakers, "b", 1.0) == "deny"
    assert refuses(breakers, "a", 1.0) and not refuses(breakers, "a", 5.0)  # due for a probe: worth asking
    assert not refuses(breakers, "b", 100.0)  # its probe slot is due to be reclaimed
    assert not refuses(breakers, "c", 1.0) and not refuses({}, "b", 1.0)
    kept, refused = split_refused(ALL, breakers, 1.0)
    assert [p.name for p in kept] == ["c"] and [p.name for p in refused] == ["a", "b"]
    assert [p.name for p in breakers_last(ALL, breakers, None)] == ["c", "a", "b"]  # no now: open refuses

    # A half-open breaker whose only probe slot is taken: the router skips it, and so (now) do the failover
    # strategies and pools, which put it last instead of trying it first and being refused.
    state = RouteState(breakers=breakers)
    decision = route("m", ALL, state, now=1.0)
    assert decision.providers == ("c",) and decision.skipped == {"a": "circuit_open", "b": "circuit_open"}
    assert order_candidates("priority", ALL, state, now=1.0) == ["c", "b", "a"]
    pool = Pool(PoolSpec("p", ("b", "c"), (1.0, 1.0)), rng=random.Random(3))
    assert {tuple(pool.order({"b": 1, "c": 1}, breakers, now=1.0)) for _ in range(20)} == {("c", "b")}
