"""The circuit breaker: a pure per-provider state machine, and the hot path's read of it.

``CircuitBreaker`` knows nothing of tasks or clocks: every method takes ``now``
(``trio.current_time()`` in the gateway, plain numbers in tests) and returns what
changed, so the owning actor (``CircuitBreakerManager``) can publish a fresh
``BreakerView`` and emit the ``Transition`` events. The request path never calls
the actor while a breaker is closed: it reads the published views through
``check`` (and ``refuses``, the same answer as a predicate: the only breaker
predicate there is) and only asks the actor when a probe slot must be reserved.

States: ``closed`` lets everything through and watches outcomes; it opens after
``failure_threshold`` consecutive failures, or when the failure rate over the last
``window_size`` outcomes reaches ``failure_rate_threshold`` with at least
``minimum_requests`` of them. ``open`` refuses everything until ``retry_at``
(``opened_at + recovery_timeout``); the first ``acquire`` after that moves it to
``half_open``, which lets ``half_open_limit`` probes run at once: one failing
probe reopens it, ``success_threshold`` successful ones close it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import attrs

from runestone.resilience.errors import UpstreamError, counts_as_failure, is_retryable


__all__ = [
    "BreakerSettings",
    "BreakerView",
    "CircuitBreaker",
    "Transition",
    "check",
    "refuses",
    "counts_as_failure",
    "is_retryable",
    "UpstreamError",
    "CLOSED",
    "OPEN",
    "HALF_OPEN",
    "ALLOW",
    "DENY",
    "ASK",
]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# What ``check`` tells the request path.
ALLOW = "allow"
DENY = "deny"
ASK = "ask"


def _positive_int(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _rate(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


@attrs.frozen
class BreakerSettings:
    """How one provider's breaker trips and recovers. Times are in seconds."""

    enabled: bool = True
    failure_threshold: int = attrs.field(default=5, validator=_positive_int)
    recovery_timeout: float = attrs.field(default=30.0, validator=_non_negative)
    half_open_limit: int = attrs.field(default=1, validator=_positive_int)
    success_threshold: int = attrs.field(default=2, validator=_positive_int)
    window_size: int = attrs.field(default=20, validator=_positive_int)
    failure_rate_threshold: float = attrs.field(default=0.5, validator=_rate)
    minimum_requests: int = attrs.field(default=10, validator=_positive_int)
    #: A half-open probe slot not given back within this many seconds is reclaimed:
    #: its outcome was lost, and a lost outcome must not keep the breaker half open.
    probe_timeout: float = attrs.field(default=120.0, validator=_non_negative)

    @classmethod
    def from_config(cls, cfg: Any) -> BreakerSettings:
        """From the ``[circuit_breaker]`` configuration (its times are in milliseconds)."""
        return cls(
            enabled=cfg.enabled,
            failure_threshold=cfg.failure_threshold,
            recovery_timeout=cfg.recovery_timeout_ms / 1000.0,
            half_open_limit=cfg.half_open_limit,
            success_threshold=cfg.success_threshold,
            window_size=cfg.window_size,
            failure_rate_threshold=cfg.failure_rate_threshold,
            minimum_requests=cfg.minimum_requests,
        )

    def __attrs_post_init__(self) -> None:
        if self.minimum_requests > self.window_size:
            # The rate rule could then never fire; say so rather than silently ignore it.
            raise ValueError(
                f"minimum_requests ({self.minimum_requests}) must not exceed window_size ({self.window_size})"
            )


@attrs.frozen
class BreakerView:
    """An immutable picture of one breaker, published for readers outside its owner."""

    provider: str
    #: "closed", "open" or "half_open".
    state: str = CLOSED
    #: When it last opened (``None`` if it never has).
    opened_at: float | None = None
    #: While open: the earliest time a probe may go (``opened_at + recovery_timeout``).
    retry_at: float | None = None
    consecutive_failures: int = 0
    #: Probes currently running while half open.
    probes_in_flight: int = 0
    #: How many probes may run at once while half open.
    half_open_limit: int = 1
    #: While half open: when probe slots not given back are reclaimed.
    probe_deadline: float = 0.0
    #: Successful probes so far in the current half-open period.
    half_open_successes: int = 0
    #: Outcomes in the sliding window, and how many of them failed.
    window_outcomes: int = 0
    window_failures: int = 0
    #: Totals since the breaker was created or reset.
    failures: int = 0
    successes: int = 0
    enabled: bool = True


@attrs.frozen
class Transition:
    """A breaker changed state; emitted as a telemetry event."""

    event: ClassVar[str] = "circuit_breaker_transition"

    provider: str
    from_state: str
    to_state: str
    #: "consecutive_failures", "failure_rate", "recovery_timeout", "probe_failed",
    #: "probes_succeeded", "reset" or "fleet" (followed from another instance: runestone/cluster/breakers.py).
    reason: str
    at: float


@attrs.define
class CircuitBreaker:
    """One provider's breaker. Owned by one task; not shared.

    Outcomes of requests that started before the breaker opened may arrive while
    it is open: they are added to the totals and change nothing else. While half
    open, any outcome is taken as a probe's outcome, since only probes are let
    through then.
    """

    provider: str
    settings: BreakerSettings = attrs.field(factory=BreakerSettings)
    state: str = CLOSED
    opened_at: float | None = None
    retry_at: float | None = None
    consecutive_failures: int = 0
    probes_in_flight: int = 0
    half_open_successes: int = 0
    # A probe whose outcome never arrives would hold its slot forever and keep the
    # breaker half open for good; slots not given back by this time are reclaimed.
    probe_deadline: float = 0.0
    failures: int = 0
    successes: int = 0
    window: deque = attrs.field(init=False)
    window_failures: int = attrs.field(init=False, default=0)
    # Transitions made by ``acquire``; handed out by ``drain_transitions``.
    _pending: list = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.window = deque(maxlen=self.settings.window_size)

    @classmethod
    def from_view(cls, view: BreakerView, settings: BreakerSettings) -> CircuitBreaker:
        """Rebuild a breaker from its last published view (after its owner restarted).

        State, timings and totals come back; the sliding window and probe slots
        do not (the probes' outcomes may still arrive and are then taken as such).
        """
        return cls(
            view.provider,
            settings,
            state=view.state,
            opened_at=view.opened_at,
            retry_at=view.retry_at,
            consecutive_failures=view.consecutive_failures,
            half_open_successes=view.half_open_successes,
            failures=view.failures,
            successes=view.successes,
        )

    # -- questions -------------------------------------------------------------

    def acquire(self, now: float) -> bool:
        """May a request go to this provider now?

        Closed: yes. Open: no until ``retry_at``; then the breaker moves to half
        open (a transition kept for ``drain_transitions``) and the caller gets a
        probe slot. Half open: yes while fewer than ``half_open_limit`` probes
        run; a yes reserves a slot, which the caller gives back by reporting the
        outcome (``record_success``/``record_failure``) or ``release``.
        """
        state = self.state
        if state == CLOSED or not self.settings.enabled:
            return True
        if state == OPEN:
            if now < self.retry_at:  # type: ignore[operator]
                return False
            self._pending.append(self._move(HALF_OPEN, "recovery_timeout", now))
        if self.probes_in_flight >= self.settings.half_open_limit:
            if now < self.probe_deadline:
                return False
            self.probes_in_flight = 0
        self.probes_in_flight += 1
        self.probe_deadline = now + self.settings.probe_timeout
        return True

    def drain_transitions(self) -> list[Transition]:
        """Transitions made by ``acquire`` since the last drain, oldest first."""
        pending = self._pending
        if not pending:
            return []
        self._pending = []
        return pending

    def view(self) -> BreakerView:
        return BreakerView(
            provider=self.provider,
            state=self.state,
            opened_at=self.opened_at,
            retry_at=self.retry_at,
            consecutive_failures=self.consecutive_failures,
            probes_in_flight=self.probes_in_flight,
            probe_deadline=self.probe_deadline,
            half_open_limit=self.settings.half_open_limit,
            half_open_successes=self.half_open_successes,
            window_outcomes=len(self.window),
            window_failures=self.window_failures,
            failures=self.failures,
            successes=self.successes,
            enabled=self.settings.enabled,
        )

    # -- outcomes --------------------------------------------------------------

    def record_success(self, now: float) -> list[Transition]:
        """A request succeeded. Returns the transitions it caused (at most one)."""
        self.successes += 1
        state = self.state
        if state == CLOSED:
            self.consecutive_failures = 0
            self._push(False)
            return []
        if state == HALF_OPEN:
            if self.probes_in_flight:
                self.probes_in_flight -= 1
            self.half_open_successes += 1
            if self.half_open_successes >= self.settings.success_threshold:
                return [self._move(CLOSED, "probes_succeeded", now)]
        return []

    def record_successes(self, count: int, now: float) -> list[Transition]:
        """``count`` requests succeeded (one ``Successes`` message); what ``count`` calls of ``record_success``
        would do, the usual case (closed) without a loop over the window."""
        if self.state != CLOSED:
            transitions: list[Transition] = []
            for _ in range(count):
                transitions += self.record_success(now)
            return transitions
        self.successes += count
        self.consecutive_failures = 0
        window = self.window
        if count >= window.maxlen:
            window.clear()
            self.window_failures = 0
            window.extend([False] * window.maxlen)
            return []
        for _ in range(count):
            self._push(False)
        return []

    def record_failure(self, now: float) -> list[Transition]:
        """A request failed in a way that counts (see ``counts_as_failure``).

        Returns the transitions it caused (at most one).
        """
        self.failures += 1
        state = self.state
        if state == CLOSED:
            self.consecutive_failures += 1
            self._push(True)
            if not self.settings.enabled:
                return []
            settings = self.settings
            if self.consecutive_failures >= settings.failure_threshold:
                return [self._move(OPEN, "consecutive_failures", now)]
            outcomes = len(self.window)
            if (
                outcomes >= settings.minimum_requests
                and self.window_failures >= settings.failure_rate_threshold * outcomes
            ):
                return [self._move(OPEN, "failure_rate", now)]
            return []
        if state == HALF_OPEN:
            self.consecutive_failures += 1
            return [self._move(OPEN, "probe_failed", now)]
        return []

    def release(self, now: float) -> None:
        """A request that held a probe slot ended without an outcome that counts
        (the client went away, or it failed for a reason that is not the
        provider's): give the slot back."""
        if self.state == HALF_OPEN and self.probes_in_flight:
            self.probes_in_flight -= 1

    def reset(self, now: float) -> list[Transition]:
        """Back to closed with empty counters (an operator's decision)."""
        from_state = self.state
        self.failures = 0
        self.successes = 0
        transitions = self.drain_transitions()
        transition = self._move(CLOSED, "reset", now)
        if from_state != CLOSED:
            transitions.append(transition)
        return transitions

    def follow(self, state: str, retry_at: float | None, now: float) -> list[Transition]:
        """Another instance's breaker for this provider moved to ``state`` (shared through Redis): open it
        here too until ``retry_at`` (kept if this one already waits longer), or close it. Half open is each
        instance's own step (its probes are budgeted fleet-wide), so it is not followed. A disabled breaker
        follows nothing. Returns the transition made (reason ``"fleet"``), if any."""
        if not self.settings.enabled:
            return []
        if state == OPEN and retry_at is not None:
            if self.state == OPEN:
                self.retry_at = max(self.retry_at or retry_at, retry_at)
                return []
            transition = self._move(OPEN, "fleet", now)
            self.retry_at = retry_at
            return [transition]
        if state == CLOSED and self.state != CLOSED:
            return [self._move(CLOSED, "fleet", now)]
        return []

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Take new settings, keeping the state; the window is resized, keeping its newest outcomes."""
        self.settings = settings
        if settings.window_size != self.window.maxlen:
            self.window = deque(self.window, maxlen=settings.window_size)
            self.window_failures = sum(self.window)

    # -- internals -------------------------------------------------------------

    def _push(self, failed: bool) -> None:
        window = self.window
        if len(window) == window.maxlen and window[0]:
            self.window_failures -= 1
        window.append(failed)
        if failed:
            self.window_failures += 1

    def _move(self, to_state: str, reason: str, now: float) -> Transition:
        from_state = self.state
        self.state = to_state
        self.probes_in_flight = 0
        self.half_open_successes = 0
        if to_state == OPEN:
            self.opened_at = now
            self.retry_at = now + self.settings.recovery_timeout
        elif to_state == CLOSED:
            self.retry_at = None
            self.consecutive_failures = 0
            self.window.clear()
            self.window_failures = 0
        return Transition(self.provider, from_state, to_state, reason, now)


def check(views: Any, provider: str, now: float) -> str:
    """The request path's breaker check, on the published views; never blocks.

    Returns ``ALLOW`` (go ahead, nothing to reserve), ``DENY`` (skip this
    provider), or ``ASK`` (a probe may be possible: call the manager's
    ``("acquire", provider)``, which decides atomically). A provider without a
    breaker is allowed.
    """
    view = views.get(provider) if views else None
    if view is None:
        return ALLOW
    state = view.state
    if state == CLOSED or not view.enabled:
        return ALLOW
    if state == OPEN:
        return DENY if now < view.retry_at else ASK
    # The published probe count may lag the manager by a few messages; its answer
    # is authoritative, so a full-looking breaker is still worth asking once its
    # slots are due to be reclaimed.
    if view.probes_in_flight < view.half_open_limit or now >= view.probe_deadline:
        return ASK
    return DENY


def refuses(views: Any, provider: str, now: float) -> bool:
    """The one breaker predicate of ordering and filtering: does ``provider``'s breaker refuse an attempt
    at ``now`` (``check`` says ``DENY``)? An open breaker due for a probe, or a half-open one with a probe
    slot that may be free, does not: whether the slot is free is the manager's to decide (``Acquire``).
    """
    return check(views, provider, now) == DENY
