"""Per-key limits: requests per minute and per hour, concurrent requests, tokens per minute.

Each client key has token buckets (capacity = the limit, refilled continuously at limit/period), so a
key may burst up to its limit and then proceeds at the sustained rate; a concurrency counter; and a
tokens-per-minute bucket that requests draw from *after* they finish (the usage is only known then), so a
key over its token budget is refused until the bucket refills. A refused request gets a 429 in OpenAI's
shape with ``Retry-After`` and the ``x-ratelimit-*`` headers OpenAI sends; an admitted one gets the
headers too. With ``limits.queue`` on, an excess request waits instead, in its key's FIFO queue (bounded
by ``queue_size``, with a deadline of ``queue_timeout_ms``), so one noisy key queues behind itself and never
in front of another key. All limits are 0 = off; everything runs on trio's clock (MockClock in tests).

The configured limits are every key's defaults; :meth:`KeyLimiter.admit` takes a key's own
:class:`LimitValues` instead (a managed key's or a team's, runestone.governance), so one limiter holds the
buckets of keys and teams alike, each under its own name.
"""

from __future__ import annotations

import math
from collections import deque

import attrs
import trio

from ..routing.executor import GatewayError

__all__ = ["KeyLimiter", "Lease", "LimitValues"]


@attrs.frozen
class LimitValues:
    """One key's (or team's) limits; 0 = off."""

    rpm: int = 0
    rph: int = 0
    tpm: int = 0
    max_concurrent: int = 0

    def __bool__(self) -> bool:
        return bool(self.rpm or self.rph or self.tpm or self.max_concurrent)


@attrs.define(slots=True)
class _Bucket:
    capacity: float
    rate: float  # per second
    level: float
    stamp: float

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def reset_in(self) -> float:
        return (self.capacity - self.level) / self.rate


@attrs.define
class _KeyState:
    limits: LimitValues
    minute: _Bucket | None
    hour: _Bucket | None
    tokens: _Bucket | None
    active: int = 0
    waiters: deque = attrs.Factory(deque)
    #: Who the limits are of, as a refusal names them ("this key", "team 'eng'").
    label: str = "this key"


class Lease:
    """An admitted request; ``release()`` exactly once when it is finished (idempotent).

    ``headers`` (the ``x-ratelimit-*`` ones) are made when first read, as the key's buckets are then: a
    lease whose headers nobody sends (a team's, beside its key's) costs nothing to make them.
    """

    __slots__ = ("_limiter", "_key", "_st", "_headers", "_done")

    def __init__(self, limiter: "KeyLimiter", key: str, st: "_KeyState") -> None:
        self._limiter = limiter
        self._key = key
        self._st = st
        self._headers = None
        self._done = False

    @property
    def headers(self) -> list:
        headers = self._headers
        if headers is None:
            headers = self._headers = self._limiter._headers(self._st)
        return headers

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._limiter._release(self._key)

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        """The tokens the request used count against the key's tokens-per-minute bucket."""
        if tokens_in or tokens_out:
            self._limiter.record_tokens(self._key, tokens_in + tokens_out)


def _reset_text(seconds: float) -> bytes:
    # OpenAI's format: "1s", "6m0s", "250ms". Formatted as bytes: these are made for every admitted request.
    if seconds < 1:
        ms = math.ceil(seconds * 1000)
        return b"%dms" % (ms if ms > 1 else 1)
    s = math.ceil(seconds)
    return b"%dm%ds" % (s // 60, s % 60) if s >= 60 else b"%ds" % s


def _bucket_headers(b: "_Bucket", names: tuple[bytes, bytes, bytes]) -> tuple:
    level = b.level
    return ((names[0], b"%d" % b.capacity), (names[1], b"%d" % level if level > 0 else b"0"),
            (names[2], _reset_text((b.capacity - level) / b.rate)))


_REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def _buckets(limits: LimitValues, now: float) -> tuple:
    rpm, rph, tpm = limits.rpm, limits.rph, limits.tpm
    return (_Bucket(rpm, rpm / 60.0, rpm, now) if rpm else None,
            _Bucket(rph, rph / 3600.0, rph, now) if rph else None,
            _Bucket(tpm, tpm / 60.0, tpm, now) if tpm else None)


class KeyLimiter:
    def __init__(self, cfg) -> None:
        self.rpm = cfg.requests_per_minute
        self.rph = cfg.requests_per_hour
        self.tpm = cfg.tokens_per_minute
        self.max_concurrent = cfg.max_concurrent_per_tenant
        #: Every key's limits unless it has its own.
        self.defaults = LimitValues(self.rpm, self.rph, self.tpm, self.max_concurrent)
        self.queue = cfg.queue
        self.queue_size = cfg.queue_size
        self.queue_timeout = cfg.queue_timeout_ms / 1000
        self.enabled = bool(self.defaults)
        self._keys: dict[str, _KeyState] = {}
        self.refused = 0
        self.queued = 0

    def _state(self, key: str, now: float, limits: LimitValues | None = None, label: str = "this key") -> _KeyState:
        st = self._keys.get(key)
        if limits is None:
            limits = self.defaults
        if st is None:
            st = self._keys[key] = _KeyState(limits, *_buckets(limits, now), label=label)
        elif st.limits is not limits and st.limits != limits:
            # The key's limits were changed (PATCH): fresh buckets at the new limits; in-flight requests stay.
            st.limits = limits
            st.minute, st.hour, st.tokens = _buckets(limits, now)
        return st

    def _blocked(self, st: _KeyState, now: float) -> tuple[float, str] | None:
        """None when a request may start now; else (seconds to wait, which limit)."""
        max_concurrent = st.limits.max_concurrent
        if max_concurrent and st.active >= max_concurrent:
            return math.inf, "concurrent requests"
        if st.minute is not None and st.minute.refill(now) < 1:
            return st.minute.wait_for(1), "requests per minute"
        if st.hour is not None and st.hour.refill(now) < 1:
            return st.hour.wait_for(1), "requests per hour"
        if st.tokens is not None and st.tokens.refill(now) < 0:
            return st.tokens.wait_for(0.0), "tokens per minute"
        return None

    def _headers(self, st: _KeyState) -> list:
        headers = []
        b = st.minute or st.hour
        if b is not None:
            headers += _bucket_headers(b, _REQUEST_HEADERS)
        t = st.tokens
        if t is not None:
            headers += _bucket_headers(t, _TOKEN_HEADERS)
        return headers

    def _take(self, key: str, st: _KeyState) -> Lease:
        if st.minute is not None:
            st.minute.level -= 1
        if st.hour is not None:
            st.hour.level -= 1
        st.active += 1
        return Lease(self, key, st)

    async def admit_request(self, request, plan) -> Lease:
        """The pipeline's admission (runestone.routing.executor.Admission): the caller's key's limits."""
        return await self.admit(request.key_id or "open")

    def try_admit(self, key: str, limits: LimitValues | None = None, label: str = "this key") -> Lease | None:
        """A lease if ``key`` may make a request this instant (never waits, never refuses), else None."""
        now = trio.current_time()
        st = self._state(key, now, limits, label)
        if st.waiters or self._blocked(st, now) is not None:
            return None
        return self._take(key, st)

    async def admit(self, key: str, limits: LimitValues | None = None, label: str = "this key") -> Lease:
        """Admit a request for ``key`` now, after a fair wait (queue mode), or raise a 429 GatewayError.

        ``limits`` are the key's own (default: the configured ones); ``label`` names whose they are.
        """
        now = trio.current_time()
        st = self._state(key, now, limits, label)
        blocked = None if st.waiters else self._blocked(st, now)
        if blocked is None and not st.waiters:
            return self._take(key, st)
        if not self.queue:
            raise self._refusal(st, blocked, key)
        if len(st.waiters) >= self.queue_size:
            raise self._refusal(st, (blocked[0] if blocked else 0.0, "queue"), key)
        # Wait our turn: FIFO per key; the head of the queue wakes when capacity may be back.
        me = trio.Event()
        st.waiters.append(me)
        self.queued += 1
        deadline = now + self.queue_timeout
        try:
            with trio.move_on_at(deadline):
                while True:
                    if st.waiters[0] is me:
                        now = trio.current_time()
                        blocked = self._blocked(st, now)
                        if blocked is None:
                            st.waiters.popleft()
                            lease = self._take(key, st)
                            self._wake_head(st)
                            return lease
                        wait = blocked[0]
                        with trio.move_on_after(wait if math.isfinite(wait) else math.inf):
                            await me.wait()
                        me = self._renew(st, me)
                    else:
                        await me.wait()
                        me = self._renew(st, me)
            raise self._refusal(st, self._blocked(st, trio.current_time()) or (0.0, "queue"), key, waited=True)
        finally:
            if me in st.waiters:
                st.waiters.remove(me)
                self._wake_head(st)

    @staticmethod
    def _renew(st: _KeyState, me: trio.Event) -> trio.Event:
        if not me.is_set():
            return me
        fresh = trio.Event()
        for i, w in enumerate(st.waiters):
            if w is me:
                st.waiters[i] = fresh
                break
        return fresh

    @staticmethod
    def _wake_head(st: _KeyState) -> None:
        if st.waiters:
            st.waiters[0].set()

    def _release(self, key: str) -> None:
        st = self._keys.get(key)
        if st is not None:
            st.active -= 1
            self._wake_head(st)

    def record_tokens(self, key: str, tokens: int) -> None:
        st = self._keys.get(key)
        if st is not None and st.tokens is not None and tokens:
            st.tokens.refill(trio.current_time())
            st.tokens.level -= tokens  # may go negative: the key then waits until it has paid its debt back

    def _refusal(self, st: _KeyState, blocked: tuple[float, str], key: str, *, waited: bool = False) -> GatewayError:
        self.refused += 1
        wait, which = blocked
        headers = self._headers(st)
        if math.isfinite(wait) and wait > 0:
            headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            headers.append((b"retry-after-ms", str(max(1, math.ceil(wait * 1000))).encode()))
        else:
            headers.append((b"retry-after", b"1"))
        lim, label = st.limits, st.label
        if which == "concurrent requests":
            msg = (f"rate limit reached: {label} already has {st.active} requests in flight (limit "
                   f"{lim.max_concurrent}); wait for one to finish")
        elif which == "queue":
            msg = f"rate limit reached and the queue is full for {label} ({self.queue_size} waiting); retry later"
        else:
            limit = {"requests per minute": lim.rpm, "requests per hour": lim.rph,
                     "tokens per minute": lim.tpm}[which]
            msg = f"rate limit reached: {limit} {which} for {label}; retry after {max(wait, 0.001):.3g}s"
        if waited:
            msg += f" (waited {self.queue_timeout:g}s in the queue)"
        return GatewayError(429, msg, "rate_limit_error", code="rate_limit_exceeded", headers=headers)
