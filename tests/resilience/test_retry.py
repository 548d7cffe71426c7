"""The retry policy: backoff and jitter, Retry-After, and when never to retry."""

import random
from email.utils import format_datetime
from datetime import datetime, timezone

import httpx
import pytest

from runestone.resilience.errors import UpstreamError
from runestone.resilience.retry import RetryPolicy, parse_retry_after, retry_policy


class FixedRng:
    """uniform(a, b) returns a + fraction * (b - a)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.calls = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + self.fraction * (b - a)


def err(status: int = 503, retry_after=None) -> UpstreamError:
    return UpstreamError("p1", "http", "x", status=status, retry_after=retry_after)


def test_exponential_backoff_without_jitter_is_capped():
    p = retry_policy(base_delay=0.5, factor=2.0, max_delay=3.0, jitter=False)
    assert [p.delay(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert p.backoff(10_000) == 3.0  # no overflow for huge attempt numbers


def test_full_jitter_is_uniform_between_zero_and_backoff():
    p = retry_policy(base_delay=1.0, factor=2.0, max_delay=10.0, jitter="full")
    rng = FixedRng(0.25)
    assert p.delay(3, rng=rng) == 1.0
    assert rng.calls == [(0.0, 4.0)]
    real = random.Random(7)
    samples = [p.delay(3, rng=real) for _ in range(200)]
    assert all(0.0 <= s <= 4.0 for s in samples)
    assert min(samples) < 1.0 and max(samples) > 3.0


def test_equal_jitter_keeps_at_least_half():
    p = retry_policy(base_delay=1.0, factor=2.0, max_delay=10.0, jitter="equal")
    assert p.delay(2, rng=FixedRng(0.0)) == 1.0
    assert p.delay(2, rng=FixedRng(1.0)) == 2.0


def test_retry_after_is_a_floor_that_beats_max_delay():
    p = retry_policy(base_delay=0.1, max_delay=1.0, jitter=False)
    assert p.delay(1, retry_after=7.0) == 7.0
    assert p.delay(1, retry_after=0.01) == 0.1  # shorter than the backoff: backoff wins


def test_call_uses_error_retry_after_and_respects_deadline():
    p = retry_policy(max_attempts=3, base_delay=0.1, jitter=False)
    assert p(err(429, retry_after=2.0), 1) == 2.0
    assert p(err(429, retry_after=2.0), 1, time_left=2.5) == 2.0
    assert p(err(429, retry_after=2.0), 1, time_left=1.5) is None  # would outlive the request
    assert p(err(503), 1, time_left=10.0) == 0.1


def test_should_retry_only_retryable_and_within_attempts():
    p = retry_policy(max_attempts=3)
    assert p.should_retry(err(503), 1, False)
    assert p.should_retry(err(503), 2, False)
    assert not p.should_retry(err(503), 3, False)
    assert not p.should_retry(err(400), 1, False)
    assert not p.should_retry(err(422), 1, False)
    # 401/403 from an upstream refuse the gateway's own credential: another provider may take the request.
    assert p.should_retry(err(401), 1, False)
    assert p.should_retry(UpstreamError("p1", "stream_cut", "eof"), 1, False)
    assert p.should_retry(TimeoutError(), 1, False)
    assert not p.should_retry(ValueError("our bug"), 1, False)


@pytest.mark.parametrize("error", [err(503), err(429), TimeoutError(), UpstreamError("p", "stream_cut", "x")])
def test_never_retry_once_bytes_reached_the_client(error):
    p = retry_policy(max_attempts=10)
    assert not p.should_retry(error, 1, True)
    assert p(error, 1, bytes_sent_to_client=True) is None


def test_factory_repr_and_validation():
    p = retry_policy(max_attempts=5, jitter="equal")
    assert isinstance(p, RetryPolicy)
    assert repr(p) == "retry_policy(max_attempts=5, base_delay=0.1, factor=2.0, max_delay=5.0, jitter='equal')"
    assert retry_policy() == RetryPolicy()
    assert RetryPolicy(jitter=True).jitter == "full"
    for bad in ({"max_attempts": 0}, {"factor": 0.5}, {"base_delay": -1}, {"jitter": "sometimes"}):
        with pytest.raises(ValueError):
            retry_policy(**bad)


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"Retry-After": "1.5"}) == 1.5
    assert parse_retry_after([(b"Retry-After-Ms", b"250")]) == 0.25
    # milliseconds win over seconds, whatever the order
    assert parse_retry_after([("retry-after", "9"), ("retry-after-ms", "100")]) == 0.1
    assert parse_retry_after(httpx.Headers({"retry-after": "4"})) == 4.0
    assert parse_retry_after({"retry-after": "-5"}) == 0.0
    assert parse_retry_after({}) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "2"}) == 2.0


def test_parse_retry_after_http_date():
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    later = format_datetime(datetime(2024, 5, 1, 12, 0, 30, tzinfo=timezone.utc), usegmt=True)
    assert later == "Wed, 01 May 2024 12:00:30 GMT"
    assert parse_retry_after({"retry-after": later}, now=now) == 30.0
    assert parse_retry_after({"retry-after": later}, now=now + 60) == 0.0


def test_policy_from_config_converts_milliseconds():
    from types import SimpleNamespace

    cfg = SimpleNamespace(max_attempts=4, base_delay_ms=250, max_delay_ms=2000, backoff_factor=3.0, jitter=False)
    assert RetryPolicy.from_config(cfg) == retry_policy(
        max_attempts=4, base_delay=0.25, max_delay=2.0, factor=3.0, jitter="none"
    )
