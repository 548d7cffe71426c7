"""Variant assignment, pool ordering, per-variant metrics and the configuration of pools and splits."""

from __future__ import annotations

import collections
import random

import pytest

from runestone.config import ConfigError, load_config
from runestone.resilience.breaker import BreakerView
from runestone.routing.splits import (
    NamedRoutes,
    PinnedArm,
    Pool,
    PoolSpec,
    Split,
    SplitSpec,
    UnknownVariant,
    VariantMetrics,
    VariantSpec,
    stable_unit,
)


def _split(name="exp-1", weights=(0.8, 0.2), seed=1) -> Split:
    variants = [VariantSpec("control", "fake-model", weights[0]), VariantSpec("candidate", "fast", weights[1])]
    return Split(SplitSpec(name, variants), random.Random(seed))


# -- variant choice ---------------------------------------------------------------------------------------


def test_random_assignment_follows_the_weights():
    split = _split()
    counts = collections.Counter(split.choose().name for _ in range(20_000))
    assert 0.78 < counts["control"] / 20_000 < 0.82
    assert counts["control"] + counts["candidate"] == 20_000
    assert [a.ratio for a in split.arms] == pytest.approx([0.8, 0.2])


def test_three_arms_and_a_zero_weight_arm_that_takes_only_forced_requests():
    spec = SplitSpec("exp", [VariantSpec("a", "m1", 1), VariantSpec("off", "m2", 0), VariantSpec("b", "m3", 3)])
    split = Split(spec, random.Random(5))
    counts = collections.Counter(split.choose().name for _ in range(8_000))
    assert counts["off"] == 0
    assert 0.23 < counts["a"] / 8_000 < 0.27
    # Every point of [0, 1) lands in a weighted arm, the edges included.
    assert {split.arm_at(u).name for u in (0.0, 0.2499, 0.25, 0.999999999, 1.0 - 2 ** -53)} == {"a", "b"}
    assert split.choose(forced="off").name == "off"
    assert split.choose(user="someone", forced="off").name == "off"


def test_a_user_stays_in_one_arm_across_requests_instances_and_processes():
    first, second = _split(seed=1), _split(seed=99)
    users = [f"user-{i}" for i in range(4_000)]
    arms = {u: first.choose(user=u).name for u in users}
    # Stable: the rng is not consulted, a second split instance agrees, and so does a repeat.
    assert all(second.choose(user=u).name == arms[u] for u in users)
    assert all(first.choose(user=u).name == arms[u] for u in users[:200])
    share = sum(a == "control" for a in arms.values()) / len(users)
    assert 0.77 < share < 0.83
    # Not Python's salted hash(): the same value in every process.
    assert stable_unit(b"exp-1", "alice") == stable_unit(b"exp-1", "alice")
    assert 0.0 <= stable_unit(b"exp-1", "alice") < 1.0


def test_stickiness_is_independent_between_splits():
    a, b = _split("exp-a", (0.5, 0.5)), _split("exp-b", (0.5, 0.5))
    users = [f"u{i}" for i in range(4_000)]
    both = sum(a.choose(user=u).name == "candidate" and b.choose(user=u).name == "candidate" for u in users)
    # Independent halves: a quarter of the users are in both candidates (identical hashing would give a half).
    assert 0.21 < both / len(users) < 0.29


def test_an_empty_or_non_string_user_falls_back_to_random():
    split = _split(weights=(0.5, 0.5), seed=3)
    for user in ("", None, 12345, ["x"]):
        assert {split.choose(user=user).name for _ in range(60)} == {"control", "candidate"}


def test_forcing_an_unknown_variant_names_the_ones_that_exist():
    split = _split()
    with pytest.raises(UnknownVariant, match="split 'exp-1' has no variant 'treatment'.*'control', 'candidate'"):
        split.choose(forced="treatment")
    pinned = PinnedArm(split.by_variant["candidate"])
    assert pinned.choose(user="alice").name == "candidate"
    assert pinned.choose(forced="candidate").name == "candidate"
    with pytest.raises(UnknownVariant, match="pins variant 'candidate'"):
        pinned.choose(forced="control")


def test_arm_header_and_label():
    arm = _split().by_variant["candidate"]
    assert arm.label == "exp-1/candidate" and arm.header == b"exp-1/candidate"
    assert (arm.split, arm.model, arm.weight) == ("exp-1", "fast", 0.2)


@pytest.mark.parametrize("make, message", [
    (lambda: SplitSpec("exp", []), "has no variants"),
    (lambda: SplitSpec("exp", [VariantSpec("a", "m"), VariantSpec("a", "n")]), "names a variant twice"),
    (lambda: SplitSpec("exp", [VariantSpec("a", "m", 0)]), "weights are all 0"),
    (lambda: SplitSpec("e/x", [VariantSpec("a", "m")]), "without '/'"),
    (lambda: VariantSpec("a", "m", -1), "weight must be a number >= 0"),
    (lambda: VariantSpec("a", "m", float("nan")), "weight must be a number >= 0"),
    (lambda: VariantSpec("a", " "), "needs a model"),
    (lambda: PoolSpec("p", ["a", "a"]), "distinct providers"),
    (lambda: PoolSpec("p", ["a", "b"], [1]), "1 weights for 2 providers"),
    (lambda: PoolSpec("p", ["a", "b"], [0, 0]), "not all 0"),
    (lambda: PoolSpec("p", ["a"], [1], 0), "max_attempts"),
])
def test_bad_specs_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_named_routes_index_every_name_and_refuse_clashes_and_splits_of_splits():
    routes = NamedRoutes.build([PoolSpec("pool-a", ["p1", "p2"], [3, 1])],
                               [SplitSpec("exp-1", [VariantSpec("control", "pool-a"), VariantSpec("b", "m")])])
    assert set(routes.by_name) == {"pool-a", "exp-1", "exp-1/control", "exp-1/b"}
    assert routes.by_name["exp-1/b"].arm is routes.splits["exp-1"].by_variant["b"]
    assert routes.models() == [("pool-a", "runestone:pool"), ("exp-1", "runestone:split")]
    with pytest.raises(ValueError, match="given to two pools or splits"):
        NamedRoutes.build([PoolSpec("x", ["p1"])], [SplitSpec("x", [VariantSpec("a", "m")])])
    for target in ("exp-1", "exp-1/a"):
        with pytest.raises(ValueError, match="routes to the split"):
            NamedRoutes.build([], [SplitSpec("exp-1", [VariantSpec("a", "m")]),
                                   SplitSpec("exp-2", [VariantSpec("b", target)])])


# -- pools ------------------------------------------------------------------------------------------------


def _pool(weights=(3, 1), providers=("p1", "p2"), seed=2, **kw) -> Pool:
    return Pool(PoolSpec("pool-a", providers, weights, **kw), random.Random(seed))


def test_pool_first_pick_follows_the_weights_then_the_rest_by_weight():
    pool = _pool()
    routable = {"p1": object(), "p2": object()}
    orders = [tuple(pool.order(routable)) for _ in range(8_000)]
    share = sum(o[0] == "p1" for o in orders) / len(orders)
    assert 0.73 < share < 0.77
    assert set(orders) == {("p1", "p2"), ("p2", "p1")}
    three = _pool((1, 5, 2), ("a", "b", "c"))
    firsts = collections.Counter()
    for _ in range(4_000):
        order = three.order({"a": 1, "b": 1, "c": 1})
        firsts[order[0]] += 1
        # After the drawn one, the others heaviest first.
        assert order[1:] == [n for n in ("b", "c", "a") if n != order[0]]
    assert 0.59 < firsts["b"] / 4_000 < 0.66 and 0.10 < firsts["a"] / 4_000 < 0.15


def test_pool_skips_unregistered_and_draining_members_and_puts_open_breakers_last():
    pool = _pool((3, 1, 1), ("p1", "p2", "p3"))
    assert pool.order({"p2": 1}) == ["p2"]
    assert pool.order({}) == []
    breakers = {"p1": BreakerView("p1", "open", opened_at=0.0, retry_at=30.0)}
    assert {tuple(pool.order({"p1": 1, "p2": 1, "p3": 1}, breakers, now=1.0)) for _ in range(50)} == {
        ("p2", "p3", "p1"), ("p3", "p2", "p1")}
    # Due for a probe: routable again.
    assert any(pool.order({"p1": 1, "p2": 1}, breakers, now=31.0)[0] == "p1" for _ in range(50))
    everything_open = {n: BreakerView(n, "open", opened_at=0.0, retry_at=30.0) for n in ("p1", "p2", "p3")}
    assert pool.order({"p1": 1, "p2": 1, "p3": 1}, everything_open, now=1.0) == ["p1", "p2", "p3"]


def test_pool_zero_weight_member_is_only_a_fallback():
    pool = _pool((0, 1), seed=4)
    assert {tuple(pool.order({"p1": 1, "p2": 1})) for _ in range(200)} == {("p2", "p1")}
    assert pool.order({"p1": 1}) == ["p1"]
    assert pool.max_attempts == 2 and _pool(max_attempts=5).max_attempts == 5
    described = _pool().describe()
    assert [(p["name"], p["share"]) for p in described["providers"]] == [("p1", 0.75), ("p2", 0.25)]


# -- metrics ----------------------------------------------------------------------------------------------


def test_metrics_count_outcomes_tokens_and_cost():
    m = VariantMetrics(window=100)
    m.record("ok", 200, 0.100, None, 10, 20, 0.5)
    m.record("ok", 200, 0.300, 0.05, 5, 5, 0.25)
    m.record("error", 502, 0.010, None, 0, 0, 0.0)
    m.record("error", 499, 0.020, 0.01, 3, 1, 0.125)
    s = m.stats()
    assert (s.requests, s.ok, s.errors, s.cancelled) == (4, 2, 1, 1)
    assert s.error_rate == pytest.approx(1 / 3)
    assert s.latency_mean_ms == pytest.approx(200.0)
    assert (s.latency_p50_ms, s.latency_p95_ms, s.latency_samples) == (pytest.approx(100.0), pytest.approx(300.0), 2)
    assert s.ttft_mean_ms == pytest.approx(50.0)
    assert (s.tokens_in, s.tokens_out, s.cost) == (18, 26, pytest.approx(0.875))
    m.reset()
    s = m.stats()
    assert (s.requests, s.error_rate, s.latency_p50_ms, s.latency_mean_ms, s.cost) == (0, 0.0, None, None, 0.0)
    assert m.window == 100


def test_latency_percentiles_cover_a_bounded_window_of_recent_requests():
    m = VariantMetrics(window=100)
    for _ in range(1_000):
        m.record("ok", 200, 5.0, None, 0, 0, 0.0)
    for i in range(1, 101):
        m.record("ok", 200, i / 1000, None, 0, 0, 0.0)
    s = m.stats()
    assert s.latency_samples == 100 and len(m.latencies) == 100
    # Nearest rank over the last 100 (1..100 ms); the mean is over every success since start.
    assert s.latency_p50_ms == pytest.approx(50.0) and s.latency_p95_ms == pytest.approx(95.0)
    assert s.latency_mean_ms == pytest.approx((5000.0 * 1000 + 5050) / 1100)


def test_split_describe_reports_each_variant_and_observed_share():
    split = _split()
    split.by_variant["control"].metrics.record("ok", 200, 0.1, None, 1, 1, 0.0)
    split.by_variant["control"].metrics.record("ok", 200, 0.1, None, 1, 1, 0.0)
    split.by_variant["candidate"].metrics.record("error", 500, 0.1, None, 0, 0, 0.0)
    d = split.describe()
    assert d["id"] == "exp-1" and d["requests"] == 3
    control, candidate = d["variants"]
    assert control["observed_share"] == pytest.approx(2 / 3) and control["ratio"] == pytest.approx(0.8)
    assert candidate["metrics"]["error_rate"] == 1.0 and candidate["metrics"]["latency_p50_ms"] is None
    split.reset()
    assert split.describe()["requests"] == 0


# -- configuration ----------------------------------------------------------------------------------------

_PROVIDERS = '''
[[providers]]
name = "p1"
type = "fake"
[[providers]]
name = "p2"
type = "fake"
[[failover.groups]]
name = "g1"
providers = ["p1"]
'''


def _load(tmp_path, text: str):
    path = tmp_path / "runestone.toml"
    path.write_text(_PROVIDERS + text)
    return load_config(str(path), env={})


def test_pools_and_splits_load_and_build(tmp_path):
    cfg = _load(tmp_path, '''
[[pools]]
name = "pool-a"
providers = ["p1", "p2"]
weights = [3, 1]
[[splits]]
name = "exp-1"
variants = [{name = "control", model = "fake-model", weight = 0.8}, {name = "candidate", model = "pool-a", weight = 0.2}]
[[splits]]
name = "exp-2"
[[splits.variants]]
name = "only"
model = "p1:fake-model"
''')
    assert cfg.pools[0].weights == (3.0, 1.0) and cfg.pools[0].max_attempts is None
    assert [v.weight for v in cfg.splits[1].variants] == [1.0]
    routes = NamedRoutes.from_config(cfg)
    assert [(m.name, m.weight) for m in routes.pools["pool-a"].members] == [("p1", 3.0), ("p2", 1.0)]
    assert routes.splits["exp-1"].by_variant["candidate"].model == "pool-a"


@pytest.mark.parametrize("text, problem", [
    ('[[pools]]\nname = "pa"\nproviders = ["p1", "p9"]\n',
     'pools[0].providers[1] = "p9": must be the name of a configured provider (p1, p2)'),
    ('[[pools]]\nname = "pa"\nproviders = ["p1", "p2"]\nweights = [1]\n',
     'pools[0].weights = [1.0]: must be an array of 2 weights, one per provider'),
    ('[[pools]]\nname = "pa"\nproviders = ["p1"]\nweights = [-1]\n',
     'pools[0].weights = [-1.0]: must be an array of numbers in 0..1000000, not all 0'),
    ('[[pools]]\nname = "pa"\nproviders = ["p1"]\nweights = {p1 = 3}\n',
     'pools[0].weights = {"p1" = 3}: must be an array of numbers in 0..1000000, not all 0'),
    ('[[pools]]\nname = "g1"\nproviders = ["p1"]\n',
     'pools[0].name = "g1": must be unique (already the name of failover.groups[0])'),
    ('[[pools]]\nname = "pa"\nproviders = []\n',
     'pools[0].providers = []: must be a non-empty array of distinct provider names'),
    ('[[pools]]\nname = "pa"\nproviders = ["p1"]\nmax_attempts = 0\n',
     'pools[0].max_attempts = 0: must be an integer in 1..100'),
    ('[[splits]]\nname = "exp"\nvariants = []\n', 'splits[0].variants = []: must be a non-empty array of variants'),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a", model = "m", weight = -0.5}]\n',
     'splits[0].variants[0].weight = -0.5: must be a number in 0..1000000'),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a", model = "m", weight = 0}, {name = "b", model = "n", weight = 0}]\n',
     "splits[0].variants[1].weight = 0.0: must be a number > 0 when every other variant's weight is 0"),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a", model = "m"}, {name = "a", model = "n"}]\n',
     'splits[0].variants[1].name = "a": must be unique in the split (already the name of variants[0])'),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a/b", model = "m"}]\n',
     'splits[0].variants[0].name = "a/b": must be a name of 1 to 64 letters, digits, \'-\', \'_\' or \'.\''),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a", modle = "m"}]\n',
     'unknown key splits[0].variants[0].modle (did you mean model?)'),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a"}]\n',
     'splits[0].variants[0].model is required: must be a non-empty string'),
    ('[[splits]]\nname = "exp"\nvariants = [{name = "a", model = "exp"}]\n',
     'splits[0].variants[0].model = "exp": must be a model, provider:model, alias, failover group or pool, '
     'not a split'),
    ('[[pools]]\nname = "x"\nproviders = ["p1"]\n[[splits]]\nname = "x"\nvariants = [{name = "a", model = "m"}]\n',
     'splits[0].name = "x": must be unique (already the name of pools[0])'),
])
def test_bad_pool_and_split_lines(tmp_path, text, problem):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    # One line naming the first problem; every problem found is listed.
    assert problem in info.value.problems
    assert str(info.value) == "config error: " + info.value.problems[0] and "\n" not in str(info.value)
