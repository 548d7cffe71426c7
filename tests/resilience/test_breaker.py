"""The circuit breaker state machine and the hot path's check, driven with plain time values."""

import pytest
import trio

from runestone.resilience.breaker import (
    ALLOW,
    ASK,
    DENY,
    BreakerSettings,
    CircuitBreaker,
    Transition,
    check,
)


def make(**kw) -> CircuitBreaker:
    return CircuitBreaker("p1", BreakerSettings(**kw))


def fail(b: CircuitBreaker, n: int, now: float = 0.0) -> list[Transition]:
    out = []
    for _ in range(n):
        out += b.record_failure(now)
    return out


def test_closed_lets_everything_through_and_counts():
    b = make()
    assert all(b.acquire(t) for t in range(10))
    b.record_success(1.0)
    b.record_failure(2.0)
    v = b.view()
    assert (v.state, v.successes, v.failures, v.consecutive_failures) == ("closed", 1, 1, 1)


def test_opens_after_consecutive_failures_exactly_at_threshold():
    b = make(failure_threshold=3, minimum_requests=10)
    assert fail(b, 2, now=5.0) == []
    assert b.state == "closed"
    [t] = b.record_failure(7.0)
    assert t == Transition("p1", "closed", "open", "consecutive_failures", 7.0)
    v = b.view()
    assert (v.state, v.opened_at, v.retry_at) == ("open", 7.0, 37.0)


def test_a_success_breaks_the_consecutive_run():
    b = make(failure_threshold=3, minimum_requests=10)
    fail(b, 2)
    b.record_success(0.0)
    assert fail(b, 2) == []
    assert b.state == "closed"
    assert b.view().consecutive_failures == 2


def test_failure_rate_over_window_opens_once_minimum_reached():
    b = make(failure_threshold=100, window_size=10, minimum_requests=6, failure_rate_threshold=0.5)
    # Alternate: never two failures in a row, rate 50%.
    for i in range(5):
        assert (b.record_failure(float(i)) if i % 2 == 0 else b.record_success(float(i))) == []
    # 5 outcomes, 3 failures: rate 60% but under minimum_requests.
    assert b.state == "closed"
    assert b.record_success(5.0) == []  # 6 outcomes, 3 failures: 50%, but a success never opens
    [t] = b.record_failure(6.0)  # 7 outcomes, 4 failures
    assert (t.to_state, t.reason) == ("open", "failure_rate")


def test_failure_rate_window_slides_and_forgets_old_failures():
    b = make(failure_threshold=100, window_size=4, minimum_requests=4, failure_rate_threshold=0.75)
    fail(b, 2)
    for _ in range(4):
        b.record_success(0.0)  # pushes both failures out of the window
    v = b.view()
    assert (v.window_outcomes, v.window_failures) == (4, 0)
    assert fail(b, 2) == []  # 2 of 4
    [t] = b.record_failure(0.0)  # 3 of 4 = 75%
    assert t.reason == "failure_rate"


def test_open_denies_until_recovery_timeout_then_half_opens():
    b = make(failure_threshold=1, recovery_timeout=10.0)
    b.record_failure(100.0)
    assert not b.acquire(100.0)
    assert not b.acquire(109.999)
    assert b.drain_transitions() == []
    assert b.acquire(110.0)
    assert b.drain_transitions() == [Transition("p1", "open", "half_open", "recovery_timeout", 110.0)]
    assert b.drain_transitions() == []
    assert b.view().probes_in_flight == 1


def test_half_open_limits_probes_in_flight():
    b = make(failure_threshold=1, recovery_timeout=1.0, half_open_limit=2)
    b.record_failure(0.0)
    assert b.acquire(1.0)
    assert b.acquire(1.0)
    assert not b.acquire(1.0)  # both slots taken
    b.release(1.5)  # a probe whose client went away
    assert b.acquire(1.5)
    assert not b.acquire(1.5)


def test_half_open_closes_after_success_threshold():
    b = make(failure_threshold=1, recovery_timeout=1.0, success_threshold=2)
    b.record_failure(0.0)
    assert b.acquire(1.0)
    assert b.record_success(2.0) == []
    assert b.state == "half_open"
    assert b.acquire(2.0)
    [t] = b.record_success(3.0)
    assert t == Transition("p1", "half_open", "closed", "probes_succeeded", 3.0)
    v = b.view()
    assert (v.state, v.retry_at, v.consecutive_failures, v.window_outcomes) == ("closed", None, 0, 0)


def test_half_open_single_failure_reopens_with_a_new_timeout():
    b = make(failure_threshold=1, recovery_timeout=5.0, success_threshold=3)
    b.record_failure(0.0)
    assert b.acquire(5.0)
    b.record_success(5.5)
    assert b.acquire(6.0)
    [t] = b.record_failure(6.0)
    assert (t.from_state, t.to_state, t.reason) == ("half_open", "open", "probe_failed")
    assert b.view().retry_at == 11.0
    assert not b.acquire(10.0)
    assert b.acquire(11.0)
    assert b.view().half_open_successes == 0


def test_lost_probe_slots_are_reclaimed_after_probe_timeout():
    b = make(failure_threshold=1, recovery_timeout=1.0, probe_timeout=60.0)
    b.record_failure(0.0)
    assert b.acquire(1.0)
    assert not b.acquire(60.9)
    assert b.acquire(61.0)  # the first probe never reported back


def test_outcomes_while_open_count_in_totals_only():
    b = make(failure_threshold=1, recovery_timeout=10.0)
    b.record_failure(0.0)
    assert b.record_success(1.0) == []
    assert b.record_failure(2.0) == []
    v = b.view()
    assert (v.state, v.successes, v.failures, v.retry_at) == ("open", 1, 2, 10.0)


def test_disabled_breaker_never_opens():
    b = make(enabled=False, failure_threshold=1)
    assert fail(b, 50) == []
    assert b.acquire(0.0)
    assert b.view().failures == 50


def test_reset_closes_and_reports():
    b = make(failure_threshold=1)
    b.record_failure(0.0)
    [t] = b.reset(3.0)
    assert (t.from_state, t.to_state, t.reason) == ("open", "closed", "reset")
    v = b.view()
    assert (v.state, v.failures, v.successes) == ("closed", 0, 0)
    assert b.reset(4.0) == []  # already closed: nothing changed state


def test_reconfigure_keeps_newest_window_outcomes():
    b = make(failure_threshold=100, window_size=10, minimum_requests=2)
    fail(b, 1)
    for _ in range(3):
        b.record_success(0.0)
    b.reconfigure(BreakerSettings(failure_threshold=100, window_size=3, minimum_requests=2))
    v = b.view()
    assert (v.window_outcomes, v.window_failures) == (3, 0)


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_threshold": 0},
        {"half_open_limit": 0},
        {"recovery_timeout": -1},
        {"failure_rate_threshold": 0},
        {"failure_rate_threshold": 1.5},
        {"window_size": 5, "minimum_requests": 6},
    ],
)
def test_settings_reject_nonsense(kw):
    with pytest.raises(ValueError):
        BreakerSettings(**kw)


def test_check_reads_views_without_the_owner():
    b = make(failure_threshold=1, recovery_timeout=10.0, half_open_limit=1, probe_timeout=30.0)
    views = {"p1": b.view()}
    assert check(views, "p1", 0.0) == ALLOW
    assert check(views, "unknown", 0.0) == ALLOW
    assert check({}, "p1", 0.0) == ALLOW
    b.record_failure(0.0)
    views = {"p1": b.view()}
    assert check(views, "p1", 9.0) == DENY
    assert check(views, "p1", 10.0) == ASK
    b.acquire(10.0)
    views = {"p1": b.view()}
    assert check(views, "p1", 10.0) == DENY  # the only probe slot is taken
    assert check(views, "p1", 40.0) == ASK  # ... until it is due to be reclaimed
    b.release(11.0)
    assert check({"p1": b.view()}, "p1", 11.0) == ASK


async def test_breaker_with_trio_mock_clock(autojump_clock):
    b = make(failure_threshold=2, recovery_timeout=30.0)
    fail(b, 2, now=trio.current_time())
    assert not b.acquire(trio.current_time())
    await trio.sleep(29.0)
    assert not b.acquire(trio.current_time())
    await trio.sleep(1.0)
    assert b.acquire(trio.current_time())
    assert b.state == "half_open"


def test_from_view_restores_state_timing_and_totals():
    b = make(failure_threshold=2, recovery_timeout=10.0)
    b.record_success(0.0)
    fail(b, 2, now=4.0)
    restored = CircuitBreaker.from_view(b.view(), b.settings)
    v = restored.view()
    assert (v.state, v.opened_at, v.retry_at, v.failures, v.successes) == ("open", 4.0, 14.0, 2, 1)
    assert not restored.acquire(13.0)
    assert restored.acquire(14.0)


def test_settings_from_config_converts_milliseconds():
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        enabled=True,
        failure_threshold=3,
        recovery_timeout_ms=1500,
        half_open_limit=2,
        success_threshold=1,
        window_size=10,
        failure_rate_threshold=0.6,
        minimum_requests=5,
    )
    s = BreakerSettings.from_config(cfg)
    assert s == BreakerSettings(
        failure_threshold=3,
        recovery_timeout=1.5,
        half_open_limit=2,
        success_threshold=1,
        window_size=10,
        failure_rate_threshold=0.6,
        minimum_requests=5,
    )


@pytest.mark.parametrize("pattern", ["", "F", "FF", "FSF", "SFFSF", "FFFFF", "FSFSFFF"])
@pytest.mark.parametrize("count", [1, 3, 19, 20, 21, 64])
def test_a_count_of_successes_does_what_as_many_single_successes_do(pattern, count):
    # Closed (threshold out of reach), with failures before in the window: the window, its failures, the
    # totals and the consecutive run end the same.
    one, many = (make(failure_threshold=100, window_size=20, minimum_requests=20, failure_rate_threshold=1.0)
                 for _ in range(2))
    for b in (one, many):
        for c in pattern:
            b.record_success(0.0) if c == "S" else b.record_failure(0.0)
    for _ in range(count):
        assert one.record_success(0.0) == []
    assert many.record_successes(count, 0.0) == []
    assert list(many.window) == list(one.window)
    assert (many.window_failures, many.successes, many.failures, many.consecutive_failures) == (
        one.window_failures, one.successes, one.failures, one.consecutive_failures)
    assert many.window_failures == sum(many.window)


def test_a_count_of_successes_on_a_half_open_breaker_is_taken_as_that_many_probes():
    b = make(failure_threshold=1, recovery_timeout=1.0, success_threshold=2, half_open_limit=2)
    b.record_failure(0.0)
    assert b.acquire(2.0) and b.state == "half_open"
    moved = b.record_successes(2, 2.0)
    assert [(t.from_state, t.to_state, t.reason) for t in moved] == [("half_open", "closed", "probes_succeeded")]
    assert b.successes == 2
