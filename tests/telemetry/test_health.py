"""Health scores follow the documented formula; each status transition alerts once."""

import random

import pytest

from runestone.telemetry.health import HealthParams, HealthTracker, LatencyWindow


def kinds(events):
    return [e.kind for e in events]


def test_new_provider_is_healthy_with_full_score():
    t = HealthTracker()
    t.add_provider("a")
    v = t.view("a")
    assert (v.score, v.status, v.success_rate, v.p50, v.requests) == (1.0, "healthy", 1.0, None, 0)


def test_success_rate_with_prior():
    t = HealthTracker(HealthParams(prior=2.0))
    for ok in (True, False, True, True):
        t.record_attempt("a", ok, 0.1)
    v = t.view("a")
    assert v.success_rate == 0.75
    assert v.score == pytest.approx((3 + 2) / (4 + 2))
    assert (v.requests, v.errors) == (4, 1)


def test_latency_factor_decays_past_the_reference():
    p = HealthParams(latency_ref=1.0, latency_weight=0.3, prior=0.0)
    t = HealthTracker(p)
    for _ in range(5):
        t.record_attempt("fast", True, 0.9)
        t.record_attempt("slow", True, 4.0)
    assert t.view("fast").score == pytest.approx(1.0)
    assert t.view("slow").score == pytest.approx(0.7 + 0.3 * 0.25)
    assert t.view("slow").status == "degraded"


def test_streamed_attempts_are_scored_on_time_to_first_token():
    t = HealthTracker(HealthParams(prior=0.0))
    t.record_attempt("a", True, latency=20.0, ttft=0.3)
    assert t.view("a").p50 == 0.3
    assert t.view("a").score == 1.0


def test_failed_attempts_do_not_count_as_latency():
    t = HealthTracker()
    t.record_attempt("a", False, 0.001)
    assert t.view("a").p50 is None


def test_window_forgets_old_outcomes():
    t = HealthTracker(HealthParams(window=10, prior=0.0))
    for _ in range(10):
        t.record_attempt("a", False, 0.1)
    assert t.view("a").score == 0.0
    for _ in range(10):
        t.record_attempt("a", True, 0.1)
    assert t.view("a").success_rate == 1.0
    assert t.view("a").score == 1.0
    assert (t.view("a").requests, t.view("a").errors) == (20, 10)


def test_old_outcomes_age_out_so_a_probed_provider_recovers_within_35s_of_healing():
    """A burst fills the window with failures; a healed provider gets a passive probe every 5 s (the
    router's rule) and is back above the 0.5 threshold at the first probe 30 s after its last failure."""
    t = HealthTracker()  # the defaults: window 100, max_age 30 s, prior 2
    for i in range(100):
        t.record_attempt("a", False, 0.1, now=1000.0 + i * 0.01)
    assert t.view("a").score == pytest.approx(2 / 102) and t.view("a").status == "unhealthy"
    # Still broken: probes every 5 s keep failing and keep it down.
    for k in range(1, 13):
        t.record_attempt("a", False, 0.1, now=1001.0 + 5 * k)
        assert t.view("a").score <= 0.25
    last_failure = 1061.0
    healed = last_failure + 0.5
    alerts, scores = [], []
    now = last_failure
    above = None
    while t.view("a").score < 1.0:
        now += 5.0
        alerts += t.record_attempt("a", True, 0.1, now=now)
        scores.append(t.view("a").score)
        if above is None and scores[-1] >= 0.5:
            above = now
    assert above is not None and above - healed <= 35.0
    assert now - healed <= 35.0 and len(scores) <= 7  # the last failure aged out: the window is all probes
    assert scores == sorted(scores) and t.view("a").status == "healthy"
    assert kinds(alerts) == ["provider_recovered"]
    # The counters are totals, not the window.
    assert (t.view("a").requests, t.view("a").errors) == (112 + len(scores), 112)


def test_outcomes_without_a_time_never_age_out():
    t = HealthTracker(HealthParams(max_age=1.0))
    for _ in range(3):
        t.record_attempt("a", False, 0.1)
    t.record_attempt("b", False, 0.1, now=0.0)
    t.record_attempt("b", True, 0.1, now=10.0)
    assert t.view("a").score == pytest.approx(2 / 5)
    assert t.view("b").success_rate == 1.0


def test_unhealthy_then_recovered_each_alert_once():
    t = HealthTracker(HealthParams(window=10, prior=2.0))
    alerts = []
    # (0+2)/(n+2): 1 fail -> 0.67 degraded, 2 -> 0.5 degraded, 3 -> 0.4 unhealthy.
    for i in range(6):
        alerts += t.record_attempt("a", False, 0.1)
        if i == 1:
            assert t.view("a").status == "degraded" and alerts == []
    assert kinds(alerts) == ["provider_unhealthy"]
    assert alerts[0].provider == "a" and alerts[0].score == pytest.approx(2 / 5)
    alerts.clear()
    for _ in range(10):
        alerts += t.record_attempt("a", True, 0.1)
    assert kinds(alerts) == ["provider_recovered"]
    assert t.view("a").status == "healthy"


def test_degraded_and_back_does_not_alert():
    t = HealthTracker(HealthParams(window=10, prior=2.0))
    alerts = t.record_attempt("a", False, 0.1)
    assert t.view("a").status == "degraded"
    for _ in range(10):
        alerts += t.record_attempt("a", True, 0.1)
    assert t.view("a").status == "healthy"
    assert alerts == []


def test_breaker_open_fails_half_open_caps_closed_restores():
    t = HealthTracker(HealthParams(half_open_cap=0.5))
    for _ in range(3):
        t.record_attempt("a", True, 0.1)
    alerts = t.record_breaker("a", "open")
    assert kinds(alerts) == ["provider_unhealthy", "provider_failed"]
    assert t.view("a").score == 0.0 and t.view("a").breaker == "open"
    assert t.record_breaker("a", "open") == []  # repeated: already alerted
    assert t.record_breaker("a", "half_open") == []  # 0.5: degraded, still not recovered
    assert t.view("a").score == 0.5 and t.view("a").status == "degraded"
    t.record_attempt("a", True, 0.1)
    assert t.view("a").score == 0.5
    assert kinds(t.record_breaker("a", "closed")) == ["provider_recovered"]
    assert t.view("a").score == 1.0


def test_breaker_close_clears_the_failures_that_opened_it():
    t = HealthTracker(HealthParams(window=50, prior=2.0))
    for _ in range(20):
        t.record_attempt("a", False, 0.1)
    t.record_breaker("a", "open")
    t.record_breaker("a", "half_open")
    t.record_breaker("a", "closed")
    v = t.view("a")
    assert (v.status, v.success_rate, v.errors) == ("healthy", 1.0, 20)


def test_failed_provider_recovers_only_once_healthy():
    t = HealthTracker(HealthParams(window=10, prior=0.0))
    t.record_attempt("a", True, 0.1)
    t.record_breaker("a", "open")
    t.record_breaker("a", "half_open")
    assert kinds(t.record_breaker("a", "closed")) == ["provider_recovered"]  # window cleared
    t2 = HealthTracker(HealthParams(window=10, prior=0.0, latency_ref=0.1))
    for _ in range(3):
        t2.record_attempt("slow", True, 10.0)  # 0.7 + 0.3*0.01 -> degraded
    assert kinds(t2.record_breaker("slow", "open")) == ["provider_unhealthy", "provider_failed"]
    t2.record_breaker("slow", "half_open")
    assert t2.record_breaker("slow", "closed") == []  # degraded: not yet recovered
    assert t2.view("slow").status == "degraded"


def test_thresholds_are_parameters():
    t = HealthTracker(HealthParams(healthy=0.95, degraded=0.9, prior=0.0, window=10))
    for ok in [True] * 9 + [False]:
        t.record_attempt("a", ok, 0.1)
    assert t.view("a").status == "degraded"
    t.record_attempt("a", False, 0.1)
    assert t.view("a").status == "unhealthy"


def test_remove_provider():
    t = HealthTracker()
    t.record_attempt("a", True, 0.1)
    t.remove_provider("a")
    assert t.view("a") is None and dict(t.views()) == {}


def test_latency_window_percentiles_match_sorting():
    rng = random.Random(7)
    w = LatencyWindow(50)
    seen = []
    for _ in range(300):
        x = rng.random()
        w.add(x)
        seen.append(x)
        recent = sorted(seen[-50:])
        n = len(recent)
        for q in (50, 95, 99):
            rank = max(1, -(-q * n // 100))
            assert w.percentile(q) == recent[rank - 1]
    assert len(w) == 50


def test_latency_window_nearest_rank_small():
    w = LatencyWindow(10)
    assert w.percentile(50) is None
    for x in (4.0, 1.0, 3.0, 2.0):
        w.add(x)
    assert (w.percentile(50), w.percentile(95), w.percentile(99)) == (2.0, 4.0, 4.0)


def test_ttft_ewma_and_published_table():
    t = HealthTracker(HealthParams(ewma_alpha=0.5))
    t.record_attempt("a", True, latency=9.0, ttft=0.2)
    t.record_attempt("a", True, latency=9.0, ttft=0.4)
    t.record_attempt("a", False, latency=0.0)
    t.add_provider("b")
    table = t.table()
    assert table["a"].ttft_ewma == pytest.approx(0.3)
    assert table.ttft_ewma_ms == {"a": pytest.approx(300.0)}
    assert table.scores == {"a": table["a"].score, "b": 1.0}
    assert sorted(table) == ["a", "b"] and len(table) == 2
    t.record_attempt("b", False, 0.1)
    assert table.scores["b"] == 1.0  # a published table never changes under its readers
    with pytest.raises(TypeError):
        table["c"] = table["a"]
