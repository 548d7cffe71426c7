"""``CircuitBreaker.follow``: what a breaker does with another instance's transition (no Redis here)."""

from runestone.resilience.breaker import CLOSED, HALF_OPEN, OPEN, BreakerSettings, CircuitBreaker


def test_follows_open_and_closed_but_not_half_open():
    b = CircuitBreaker("p", BreakerSettings(failure_threshold=3))
    [t] = b.follow(OPEN, 50.0, now=10.0)
    assert (t.from_state, t.to_state, t.reason) == (CLOSED, OPEN, "fleet")
    assert b.state == OPEN and b.retry_at == 50.0 and not b.acquire(49.0)
    assert b.follow(OPEN, 40.0, now=11.0) == [] and b.retry_at == 50.0  # an earlier end does not shorten it
    assert b.follow(OPEN, 60.0, now=11.0) == [] and b.retry_at == 60.0
    assert b.follow(HALF_OPEN, None, now=12.0) == [] and b.state == OPEN
    [t] = b.follow(CLOSED, None, now=13.0)
    assert (t.from_state, t.to_state) == (OPEN, CLOSED) and b.acquire(13.0)
    assert b.follow(CLOSED, None, now=14.0) == []


def test_half_open_breaker_reopens_on_a_remote_open():
    b = CircuitBreaker("p", BreakerSettings(failure_threshold=1, recovery_timeout=5.0))
    b.record_failure(0.0)
    assert b.acquire(6.0) and b.state == HALF_OPEN
    [t] = b.follow(OPEN, 20.0, now=6.5)
    assert (t.from_state, t.to_state) == (HALF_OPEN, OPEN) and b.probes_in_flight == 0 and b.retry_at == 20.0


def test_disabled_breaker_follows_nothing():
    b = CircuitBreaker("p", BreakerSettings(enabled=False))
    assert b.follow(OPEN, 50.0, now=0.0) == [] and b.state == CLOSED
