"""The ``CircuitBreakerManager`` actor: owns one breaker per provider and publishes their views.

Outcomes arrive as casts from the request path (:class:`Outcome`, :class:`Release`), so reporting never
waits. After every change the manager publishes a fresh immutable ``Mapping[str, BreakerView]`` into a
``Published`` cell that the request path reads through ``check`` (the one breaker predicate); only a
breaker that is open and due for a probe, or half open, makes a request call :class:`Acquire`, where the
manager reserves the probe slot atomically. Every state change goes through one method, ``_transitioned``,
which emits it as a telemetry ``BreakerTransition``. The cell is made by whoever builds the tree: a
restarted manager finds the last views there and resumes from them, so a crash does not close open breakers.

Messages (``@attrs.frozen``; anything else gets the runtime's unknown-message policy)::

    casts  Outcome(p, ok)                 a finished attempt that counts (``outcome(p, ok)`` reuses them)
           Successes(p, n)                n attempts that were not probes succeeded (a :class:`SuccessTally`'s)
           Release(p)                     a probe slot given back without an outcome that counts
    calls  Acquire(p)                  -> bool (a probe slot, or a closed breaker's go-ahead)
           GetState(p | None)          -> BreakerView | None (unknown provider); None: Mapping[str, BreakerView]
           Reset(p | None)             -> BreakerView | Mapping (None: every breaker); Rejected not_found
           Configure(p | None, settings) -> BreakerView | Mapping (None: the default for providers without their own)
           Remove(p)                   -> bool (was there one)

Most outcomes are successes of attempts that were not probes: the request path counts those in a
:class:`SuccessTally` (a dict add) and sends each provider's count as one ``Successes`` cast, before any
other outcome of that provider (so the manager sees a provider's outcomes in the order they happened), when
the count reaches the tally's limit, and when this manager's tick asks (every ``_DIRTY_INTERVAL``). A cast per
success cost about 4% of a non-streamed request's CPU at one connection (scripts/bench); the totals a
``GetState`` answers may now lag by up to one tick's successes, as the published views' already did.

A fleet (``[cluster] redis_url``, runestone/cluster/breakers.py) adds one cast, :class:`FleetTransition`
(another instance's breaker moved: follow it), and two hooks: ``probe_gate`` (an async
``(provider, limit, ttl) -> bool`` asked before a half-open probe slot is granted, so probes are
budgeted fleet-wide; it answers True when it cannot ask) and ``probe_done`` (told, without blocking, when
a probe's outcome arrives, to give the fleet-wide slot back). Local and fleet transitions alike leave
through ``_transitioned``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import trio

from runestone.resilience.breaker import CLOSED, HALF_OPEN, BreakerSettings, BreakerView, CircuitBreaker, Transition
from runestone.runtime import Actor, Published, Rejected
from runestone.telemetry.events import BreakerTransition

__all__ = ["Acquire", "CircuitBreakerManager", "Configure", "FleetTransition", "GetState", "NAME", "Outcome",
           "Release", "Remove", "Reset", "SuccessTally", "Successes", "outcome"]

NAME = "circuit_breaker_manager"


@attrs.frozen
class Outcome:
    """Cast: an attempt on ``provider`` that counts for its breaker succeeded (``ok``) or failed."""

    provider: str
    ok: bool


@attrs.frozen
class Successes:
    """Cast: ``count`` attempts on ``provider`` that were not probes succeeded (a :class:`SuccessTally`'s)."""

    provider: str
    count: int


@attrs.frozen
class Release:
    """Cast: the half-open probe slot ``provider``'s attempt held is given back, nothing learned."""

    provider: str


@attrs.frozen
class FleetTransition:
    """Cast: another instance's breaker for ``provider`` moved to ``state`` ("open" until ``retry_in``
    seconds from now, or "closed"); this manager follows it (``CircuitBreaker.follow``)."""

    provider: str
    state: str
    retry_in: float | None = None


@attrs.frozen
class Acquire:
    """Call: may an attempt go to ``provider`` now? Reserves a half-open probe slot; replies a bool."""

    provider: str


@attrs.frozen
class GetState:
    """Call: the view of ``provider``'s breaker (None if it has none), or every view when ``provider`` is None."""

    provider: str | None = None


@attrs.frozen
class Reset:
    """Call: close ``provider``'s breaker (every breaker when None) and clear its counts."""

    provider: str | None = None


@attrs.frozen
class Configure:
    """Call: give ``provider`` its own settings, or (``provider`` None) set the default of the others."""

    provider: str | None
    settings: BreakerSettings = attrs.field(validator=attrs.validators.instance_of(BreakerSettings))


@attrs.frozen
class Remove:
    """Call: forget ``provider``'s breaker and settings (it was unregistered); replies whether it had one."""

    provider: str


# Outcome messages are immutable, so the request path reuses one pair per provider instead of building
# one per attempt (bounded: provider names come from the control plane, but keep it safe).
_OUTCOMES: dict[str, tuple[Outcome, Outcome]] = {}


def outcome(provider: str, ok: bool) -> Outcome:
    """``Outcome(provider, ok)``, built once per provider."""
    pair = _OUTCOMES.get(provider)
    if pair is None:
        if len(_OUTCOMES) >= 4096:
            _OUTCOMES.clear()
        pair = _OUTCOMES[provider] = (Outcome(provider, False), Outcome(provider, True))
    return pair[ok]


class SuccessTally:
    """The request path's count of successful attempts that were not probes, per provider, sent as one
    :class:`Successes` cast through ``cast`` (the request path's outcome coalescer, so it keeps their order
    with the other outcomes it sends): when a provider's count reaches ``limit``, before any other outcome of
    that provider is cast (``send``), and when the manager's tick asks (``flush``). Only the request path's
    task and the manager's (the same thread) touch it. A count whose cast finds no room is dropped, as a
    dropped outcome was."""

    __slots__ = ("_cast", "counts", "limit")

    def __init__(self, cast: Callable[[Any], bool], limit: int = 64) -> None:
        self._cast = cast
        self.limit = limit
        self.counts: dict[str, int] = {}

    def add(self, provider: str) -> None:
        counts = self.counts
        n = counts.get(provider, 0) + 1
        if n < self.limit:
            counts[provider] = n
        else:
            counts.pop(provider, None)
            self._cast(Successes(provider, n))

    def send(self, provider: str) -> None:
        """Cast ``provider``'s count now (before another outcome of it)."""
        n = self.counts.pop(provider, 0)
        if n:
            self._cast(Successes(provider, n))

    def flush(self) -> None:
        """Cast every provider's count."""
        counts, self.counts = self.counts, {}
        cast = self._cast
        for provider, n in counts.items():
            cast(Successes(provider, n))

    def discard(self, provider: str | None = None) -> None:
        """Forget ``provider``'s count (every count: None): its breaker was reset or removed."""
        if provider is None:
            self.counts = {}
        else:
            self.counts.pop(provider, None)


log = logging.getLogger("runestone.resilience")

_EMPTY_VIEWS: Mapping[str, BreakerView] = MappingProxyType({})
#: Seconds between batched publications of counters that routing does not read.
_DIRTY_INTERVAL = 0.25


def _drop(_event: object) -> None:
    pass


class CircuitBreakerManager(Actor):
    """One breaker per provider; views published into ``views``.

    Providers get a breaker on first mention (an outcome or ``acquire``), with
    ``overrides[p]`` or else the default ``settings``. ``emit`` must not block
    (``Telemetry.emit``); it receives ``runestone.telemetry.events.BreakerTransition``.
    """

    # Every request casts an outcome here; a deep mailbox rides out bursts
    # rather than dropping them (a dropped failure is one the breaker never sees).
    mailbox_size = 4096

    def __init__(
        self,
        views: Published,
        *,
        emit: Callable[[object], None] = _drop,
        settings: BreakerSettings | None = None,
        overrides: Mapping[str, BreakerSettings] | None = None,
        providers: Iterable[str] = (),
        registry: Any = None,
        mailbox_size: int | None = None,
        probe_gate: Callable[[str, int, float], Any] | None = None,
        probe_done: Callable[[str], None] | None = None,
        successes: SuccessTally | None = None,
    ) -> None:
        super().__init__(NAME, registry=registry, mailbox_size=mailbox_size)
        #: The request path's tally of successes, flushed on this manager's tick (None: nobody tallies).
        self.successes = successes
        self.probe_gate = probe_gate
        self.probe_done = probe_done
        self.views = views
        self.emit = emit
        self.default_settings = settings if settings is not None else BreakerSettings()
        self.overrides: dict[str, BreakerSettings] = dict(overrides or {})
        self.initial_providers = tuple(providers)
        self.breakers: dict[str, CircuitBreaker] = {}

    async def init(self) -> None:
        self.breakers = {}
        previous = self.views.value or _EMPTY_VIEWS
        for name, view in previous.items():
            self.breakers[name] = CircuitBreaker.from_view(view, self._settings_for(name))
        for name in self.initial_providers:
            self._breaker(name)
        self._dirty: set[str] = set()
        self._publish()
        self.nursery.start_soon(self._publish_dirty)

    async def _publish_dirty(self) -> None:
        # Successes of a closed breaker change only its counters, which no reader routes by: they are
        # published in a batch every _DIRTY_INTERVAL instead of once per request.
        while True:
            await trio.sleep(_DIRTY_INTERVAL)
            if self.successes is not None:
                # Cast behind whatever waits in the mailbox: handled in order, published at the next tick.
                self.successes.flush()
            if self._dirty:
                self._publish()

    # -- messages ----------------------------------------------------------

    async def handle_cast(self, message: Any) -> None:
        now = trio.current_time()
        match message:
            case Successes(provider=provider, count=count):
                breaker = self._breaker(provider)
                if breaker.state == CLOSED:
                    breaker.record_successes(count, now)  # a closed breaker's successes move nothing
                    self._dirty.add(provider)
                    return
                # Attempts that began before it opened: each taken as a probe's outcome, as one by one.
                transitions = []
                for _ in range(count):
                    self._probe_done(breaker)
                    transitions += breaker.record_success(now)
            case Outcome(provider=provider, ok=True):
                breaker = self._breaker(provider)
                self._probe_done(breaker)
                transitions = breaker.record_success(now)
                if not transitions and breaker.state == CLOSED:
                    self._dirty.add(provider)
                    return
            case Outcome(provider=provider):
                breaker = self._breaker(provider)
                self._probe_done(breaker)
                transitions = breaker.record_failure(now)
            case Release(provider=provider):
                breaker = self.breakers.get(provider)
                if breaker is None:
                    return
                self._probe_done(breaker)
                breaker.release(now)
                transitions = None
            case FleetTransition():
                self._follow(message)
                return
            case _:
                self.unknown_cast(message)
                return
        # Published before emitting: if emitting fails and this actor restarts,
        # it resumes from the new state rather than lose the transition.
        self._publish_one(breaker)
        if transitions:
            self._transitioned(transitions)

    async def handle_call(self, message: Any) -> Any:
        now = trio.current_time()
        match message:
            case Acquire(provider=provider):
                breaker = self._breaker(provider)
                allowed = breaker.acquire(now)
                if allowed and breaker.state == HALF_OPEN and self.probe_gate is not None:
                    settings = breaker.settings
                    if not await self.probe_gate(breaker.provider, settings.half_open_limit, settings.probe_timeout):
                        breaker.release(trio.current_time())  # another instance holds the fleet's probe slots
                        allowed = False
                self._publish_one(breaker)
                self._transitioned(breaker.drain_transitions())
                return allowed
            case GetState(provider=None):
                return self._views()
            case GetState(provider=provider):
                breaker = self.breakers.get(provider)
                return None if breaker is None else breaker.view()
            case Reset(provider=provider):
                targets = list(self.breakers.values()) if provider is None else [self.breakers.get(provider)]
                if targets == [None]:
                    return Rejected("not_found", f"no circuit breaker for provider {provider!r}")
                if self.successes is not None:
                    self.successes.discard(provider)
                transitions = [t for breaker in targets for t in breaker.reset(now)]
                self._publish()
                self._transitioned(transitions)
                return self._views() if provider is None else targets[0].view()
            case Configure(provider=None, settings=settings):
                self.default_settings = settings
                for name, breaker in self.breakers.items():
                    if name not in self.overrides:
                        breaker.reconfigure(settings)
                self._publish()
                return self._views()
            case Configure(provider=provider, settings=settings):
                self.overrides[provider] = settings
                breaker = self._breaker(provider)
                breaker.reconfigure(settings)
                self._publish_one(breaker)
                return breaker.view()
            case Remove(provider=provider):
                self.overrides.pop(provider, None)
                if self.successes is not None:
                    self.successes.discard(provider)
                existed = self.breakers.pop(provider, None) is not None
                if existed:
                    self._publish()
                return existed
            case _:
                return self.unknown_call(message)

    def snapshot(self) -> Any:
        return {
            "default_settings": self.default_settings,
            "overrides": dict(self.overrides),
            "breakers": self._views(),
        }

    # -- internals ---------------------------------------------------------

    def _follow(self, message: FleetTransition) -> None:
        breaker = self._breaker(message.provider)
        now = trio.current_time()
        retry_at = None if message.retry_in is None else now + max(0.0, message.retry_in)
        transitions = breaker.follow(message.state, retry_at, now)
        self._publish_one(breaker)
        self._transitioned(transitions)

    def _probe_done(self, breaker: CircuitBreaker) -> None:
        if breaker.state == HALF_OPEN and breaker.probes_in_flight and self.probe_done is not None:
            self.probe_done(breaker.provider)

    def _settings_for(self, provider: str) -> BreakerSettings:
        return self.overrides.get(provider, self.default_settings)

    def _breaker(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = self.breakers[provider] = CircuitBreaker(provider, self._settings_for(provider))
        return breaker

    def _views(self) -> Mapping[str, BreakerView]:
        return MappingProxyType({name: b.view() for name, b in self.breakers.items()})

    def _publish(self) -> None:
        self._dirty = set()
        self.views.publish(self._views())

    def _publish_one(self, breaker: CircuitBreaker) -> None:
        self._dirty.discard(breaker.provider)
        # Copy-on-write: readers keep the mapping they loaded, untouched.
        current = self.views.value or _EMPTY_VIEWS
        updated = dict(current)
        updated[breaker.provider] = breaker.view()
        self.views.publish(MappingProxyType(updated))

    def _transitioned(self, transitions: list[Transition]) -> None:
        """The one place a breaker's state change leaves the manager (already published): telemetry today."""
        emit = self.emit
        for t in transitions:
            emit(BreakerTransition(t.provider, t.from_state, t.to_state, t.reason))

