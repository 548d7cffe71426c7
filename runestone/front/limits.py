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

from ..http import HEAD_LINES
from ..routing.executor import GatewayError

__all__ = ["KeyLimiter", "Lease", "LimitValues", "add_tokens", "release_state"]


@attrs.frozen
class LimitValues:
    """One key's (or team's) limits; 0 = off."""

    rpm: int = 0
    rph: int = 0
    tpm: int = 0
    max_concurrent: int = 0

    def __bool__(self) -> bool:
        return bool(self.rpm or self.rph or self.tpm or self.max_concurrent)


_MS_TEXT = tuple(b"%dms" % max(ms, 1) for ms in range(1001))


class _Bucket:
    """A token bucket kept as the time it is full again (GCRA's "theoretical arrival time", ``tat``): its
    level at ``now`` is ``capacity - (tat - now) * rate`` (``capacity`` once ``tat <= now``), so it refills
    by itself and a check is one comparison. Exactly the bucket refilled continuously at ``rate`` and
    capped at ``capacity``; the level may go below 0 (a debt of tokens, paid back at ``rate``).

    ``slack`` is how far ahead ``tat`` may be while ``need`` tokens are still there: blocked iff
    ``tat - now > slack``."""

    __slots__ = ("capacity", "rate", "interval", "tat", "slack", "names", "limit_text", "full", "shown",
                 "shown_remaining", "shown_reset", "full_lines", "lines_form", "lines", "lines_remaining",
                 "lines_reset")

    def __init__(self, capacity: float, rate: float, now: float, need: float,
                 names: tuple[bytes, bytes, bytes] = (b"", b"", b"")) -> None:
        self.capacity = capacity
        self.rate = rate
        self.interval = 1.0 / rate
        self.tat = now
        self.slack = (capacity - need) / rate
        #: Its ``x-ratelimit-*`` header names (limit, remaining, reset) and the limit header's value.
        self.names = names
        self.limit_text = b"%d" % capacity
        #: Its three headers when it is full (as _bucket_headers makes them at ``ahead`` 0).
        self.full = ((names[0], self.limit_text), (names[1], b"%d" % capacity), (names[2], _MS_TEXT[0]))
        #: Its last three headers otherwise, and the remaining and reset they show: made again when those change.
        self.shown: tuple = ()
        self.shown_remaining = self.shown_reset = -1
        #: ``full`` and ``shown`` as one (HEAD_LINES, lines) pair each, in a tuple (_bucket_headers' ``lines``),
        #: made from ``lines_form`` (the lines with the remaining and the reset left to fill in).
        self.lines_form = b"%s: %s\r\n%s: %%d\r\n%s: %%s\r\n" % (names[0], self.limit_text, names[1], names[2])
        self.full_lines = ((HEAD_LINES, self.lines_form % (capacity, _MS_TEXT[0])),)
        self.lines: tuple = ()
        self.lines_remaining = self.lines_reset = -1

    def level(self, now: float) -> float:
        ahead = self.tat - now
        return self.capacity if ahead <= 0 else self.capacity - ahead * self.rate

    def wait(self, now: float) -> float:
        """Seconds until ``need`` tokens are there (0 if now)."""
        w = self.tat - now - self.slack
        return w if w > 0 else 0.0

    def reset_in(self, now: float) -> float:
        """Seconds until it is full."""
        ahead = self.tat - now
        return ahead if ahead > 0 else 0.0

    def take(self, amount: float, now: float) -> None:
        tat = self.tat
        self.tat = (tat if tat > now else now) + amount * self.interval


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
    #: The buckets a request must fit (those of minute, hour, tokens that exist), and those it takes from
    #: (minute, hour): made with the buckets (see :func:`_set_buckets`).
    checked: tuple = ()
    counted: tuple = ()
    #: ``limits.max_concurrent``, kept with the limits.
    most: int = 0

    def __attrs_post_init__(self) -> None:
        _set_buckets(self, self.minute, self.hour, self.tokens)


def _set_buckets(st: _KeyState, minute: _Bucket | None, hour: _Bucket | None, tokens: _Bucket | None) -> None:
    st.most = st.limits.max_concurrent
    st.minute, st.hour, st.tokens = minute, hour, tokens
    st.counted = tuple(b for b in (minute, hour) if b is not None)
    st.checked = st.counted + ((tokens,) if tokens is not None else ())


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

    @property
    def state(self):
        """The limiter state this lease holds a request on."""
        return self._st

    def release(self) -> None:
        if not self._done:
            self._done = True
            release_state(self._st)

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        """The tokens the request used count against the key's tokens-per-minute bucket."""
        if tokens_in or tokens_out:
            add_tokens(self._st, tokens_in + tokens_out, trio.current_time())


def release_state(st: _KeyState) -> None:
    """A request admitted on ``st`` is over."""
    st.active -= 1
    if st.waiters:
        st.waiters[0].set()


def add_tokens(st: _KeyState, tokens: int, now: float) -> None:
    """``tokens`` used by a finished request count against ``st``'s tokens-per-minute bucket."""
    t = st.tokens
    if t is not None and tokens:
        t.take(tokens, now)  # may go below 0: the key then waits until it has paid its debt back


def _reset_text(seconds: float) -> bytes:
    # OpenAI's format: "1s", "6m0s", "250ms". Formatted as bytes: these are made for every admitted request.
    if seconds < 1:
        return _MS_TEXT[math.ceil(seconds * 1000)]
    s = math.ceil(seconds)
    return b"%dm%ds" % (s // 60, s % 60) if s >= 60 else b"%ds" % s


def _bucket_headers(b: _Bucket, now: float, lines: bool = False) -> tuple:
    """``b``'s three headers at ``now``: its limit, what remains, when it is full again. With ``lines``, as
    one ``(HEAD_LINES, lines)`` pair (in a tuple) for the HTTP server to write as they are (the names are
    ours, the values digits and units). Each form is made once per distinct value."""
    ahead = b.tat - now
    if ahead <= 0:
        return b.full_lines if lines else b.full
    level = b.capacity - ahead * b.rate
    remaining = int(level) if level > 0 else 0  # what b"%d" % level shows
    reset = math.ceil(ahead * 1000) if ahead < 1 else -math.ceil(ahead)  # milliseconds, or -seconds from 1 s
    if lines:
        if remaining == b.lines_remaining and reset == b.lines_reset:
            return b.lines
        text = _MS_TEXT[reset] if reset >= 0 else _reset_text(ahead)
        made = b.lines = ((HEAD_LINES, b.lines_form % (remaining, text)),)
        b.lines_remaining, b.lines_reset = remaining, reset
        return made
    if remaining == b.shown_remaining and reset == b.shown_reset:
        return b.shown  # what they showed last time: the same bytes
    names = b.names
    shown = b.shown = ((names[0], b.limit_text), (names[1], b"%d" % remaining),
                       (names[2], _MS_TEXT[reset] if reset >= 0 else _reset_text(ahead)))
    b.shown_remaining, b.shown_reset = remaining, reset
    return shown


_REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def _buckets(limits: LimitValues, now: float) -> tuple:
    rpm, rph, tpm = limits.rpm, limits.rph, limits.tpm
    return (_Bucket(rpm, rpm / 60.0, now, 1, _REQUEST_HEADERS) if rpm else None,
            _Bucket(rph, rph / 3600.0, now, 1, _REQUEST_HEADERS) if rph else None,
            _Bucket(tpm, tpm / 60.0, now, 0, _TOKEN_HEADERS) if tpm else None)


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
            _set_buckets(st, *_buckets(limits, now))
        return st

    def _blocked(self, st: _KeyState, now: float) -> tuple[float, str] | None:
        """None when a request may start now; else (seconds to wait, which limit)."""
        max_concurrent = st.limits.max_concurrent
        if max_concurrent and st.active >= max_concurrent:
            return math.inf, "concurrent requests"
        b = st.minute
        if b is not None and b.tat - now > b.slack:
            return b.wait(now), "requests per minute"
        b = st.hour
        if b is not None and b.tat - now > b.slack:
            return b.wait(now), "requests per hour"
        b = st.tokens
        if b is not None and b.tat - now > b.slack:
            return b.wait(now), "tokens per minute"
        return None

    @staticmethod
    def _headers(st: _KeyState, now: float | None = None, lines: bool = False) -> tuple:
        """The ``x-ratelimit-*`` headers of ``st`` at ``now`` (a tuple of pairs: shared, not to be changed);
        with ``lines``, one prebuilt ``(HEAD_LINES, lines)`` pair per bucket (see _bucket_headers)."""
        if now is None:
            now = trio.current_time()
        b = st.minute or st.hour
        t = st.tokens
        if b is not None:
            if t is not None:
                return _bucket_headers(b, now, lines) + _bucket_headers(t, now, lines)
            return _bucket_headers(b, now, lines)
        return _bucket_headers(t, now, lines) if t is not None else ()

    def state(self, key: str, limits: LimitValues, label: str) -> _KeyState:
        """``key``'s limiter state at ``limits`` (made or brought up to date): for :meth:`take`. A state lives
        as long as the limiter, so a caller may keep it."""
        return self._state(key, trio.current_time(), limits, label)

    def take(self, states: tuple, now: float) -> None:
        """Admit one request on every state in ``states`` at once (none queues: ``queue`` is off), or raise
        the first one's 429 and take nothing. The caller ends it with :func:`release_state` on each."""
        for st in states:  # _blocked's checks, inline
            most = st.most
            if most and st.active >= most:
                raise self._refusal(st, self._blocked(st, now), "")
            for b in st.checked:
                if b.tat - now > b.slack:
                    raise self._refusal(st, self._blocked(st, now), "")
        for st in states:
            for b in st.counted:
                tat = b.tat
                b.tat = (tat if tat > now else now) + b.interval
            st.active += 1

    def _take(self, key: str, st: _KeyState, now: float) -> Lease:
        if st.minute is not None:
            st.minute.take(1, now)
        if st.hour is not None:
            st.hour.take(1, now)
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
        return self._take(key, st, now)

    async def admit(self, key: str, limits: LimitValues | None = None, label: str = "this key") -> Lease:
        """Admit a request for ``key`` now, after a fair wait (queue mode), or raise a 429 GatewayError.

        ``limits`` are the key's own (default: the configured ones); ``label`` names whose they are.
        """
        now = trio.current_time()
        st = self._state(key, now, limits, label)
        blocked = None if st.waiters else self._blocked(st, now)
        if blocked is None and not st.waiters:
            return self._take(key, st, now)
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
                            lease = self._take(key, st, now)
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

    def record_tokens(self, key: str, tokens: int) -> None:
        st = self._keys.get(key)
        if st is not None:
            add_tokens(st, tokens, trio.current_time())

    def _refusal(self, st: _KeyState, blocked: tuple[float, str], key: str, *, waited: bool = False) -> GatewayError:
        self.refused += 1
        wait, which = blocked
        headers = list(self._headers(st))
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
