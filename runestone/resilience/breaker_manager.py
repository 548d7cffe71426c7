"""The ``CircuitBreakerManager`` actor: owns one breaker per provider and publishes their views.

Outcomes arrive as casts from the request path (``("success", p)``,
``("failure", p)``, ``("release", p)``), so reporting never waits. After every
change the manager publishes a fresh immutable ``Mapping[str, BreakerView]``
into a ``Published`` cell that the request path reads through ``check``; only
a breaker that is open and due for a probe, or half open, sends a request to
``call(("acquire", p))``, where the manager reserves the probe slot
atomically. Every state change is emitted as a telemetry ``BreakerTransition``.
The cell is made by whoever builds the tree: a restarted manager finds the
last views there and resumes from them, so a crash does not close open breakers.

Calls (replies in parentheses; a refused call replies ``Rejected``)::

    ("acquire", p)              -> bool
    ("get_state", p)            -> BreakerView | None (unknown provider)
    ("get_state", None)         -> Mapping[str, BreakerView]
    ("reset", p | None)         -> BreakerView | Mapping (None: every breaker)
    ("configure", p, settings)  -> BreakerView (None: the default for providers without their own)
    ("remove", p)               -> bool (was there one)

A fleet (``[cluster] redis_url``, runestone/cluster/breakers.py) adds one cast, :class:`FleetTransition`
(another instance's breaker moved: follow it), and two hooks: ``probe_gate`` (an async
``(provider, limit, ttl) -> bool`` asked before a half-open probe slot is granted, so probes are
budgeted fleet-wide; it answers True when it cannot ask) and ``probe_done`` (told, without blocking, when
a probe's outcome arrives, to give the fleet-wide slot back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import trio

from runestone.resilience.breaker import (
    ALLOW,
    ASK,
    DENY,
    CLOSED,
    HALF_OPEN,
    BreakerSettings,
    BreakerView,
    CircuitBreaker,
    Transition,
    check,
)
from runestone.runtime import Actor, Published, Rejected
from runestone.telemetry.events import BreakerTransition

# ALLOW and DENY are re-exported for callers comparing ``admit``'s answers.
__all__ = ["CircuitBreakerManager", "FleetTransition", "NAME", "PROBE", "ALLOW", "DENY", "admit"]

NAME = "circuit_breaker_manager"

#: ``admit``'s answer when the caller holds a half-open probe slot.
PROBE = "probe"

log = logging.getLogger("runestone.resilience")

_EMPTY_VIEWS: Mapping[str, BreakerView] = MappingProxyType({})
#: Seconds between batched publications of counters that routing does not read.
_DIRTY_INTERVAL = 0.25


def _drop(_event: object) -> None:
    pass


@attrs.frozen
class FleetTransition:
    """Cast: another instance's breaker for ``provider`` moved to ``state`` ("open" until ``retry_in``
    seconds from now, or "closed"); this manager follows it (``CircuitBreaker.follow``)."""

    provider: str
    state: str
    retry_in: float | None = None


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
    ) -> None:
        super().__init__(NAME, registry=registry, mailbox_size=mailbox_size)
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
        self._publish()
        self._dirty: set[str] = set()
        self.nursery.start_soon(self._publish_dirty)

    async def _publish_dirty(self) -> None:
        # Successes of a closed breaker change only its counters, which no reader routes by: they are
        # published in a batch every _DIRTY_INTERVAL instead of once per request.
        while True:
            await trio.sleep(_DIRTY_INTERVAL)
            if self._dirty:
                self._publish()

    # -- messages ----------------------------------------------------------

    async def handle_cast(self, message: Any) -> None:
        if isinstance(message, FleetTransition):
            self._follow(message)
            return
        try:
            verb, provider = message
        except (TypeError, ValueError):
            log.warning("circuit breaker manager: ignoring malformed cast %r", message)
            return
        now = trio.current_time()
        if verb == "success":
            breaker = self._breaker(provider)
            self._probe_done(breaker)
            transitions = breaker.record_success(now)
        elif verb == "failure":
            breaker = self._breaker(provider)
            self._probe_done(breaker)
            transitions = breaker.record_failure(now)
        elif verb == "release":
            breaker = self.breakers.get(provider)
            if breaker is None:
                return
            self._probe_done(breaker)
            breaker.release(now)
            transitions = None
        else:
            log.warning("circuit breaker manager: ignoring unknown cast %r", message)
            return
        if verb == "success" and not transitions and breaker.state == CLOSED:
            self._dirty.add(provider)
            return
        # Published before emitting: if emitting fails and this actor restarts,
        # it resumes from the new state rather than lose the transition.
        self._publish_one(breaker)
        if transitions:
            self._emit(transitions)

    async def handle_call(self, message: Any) -> Any:
        verb = message[0] if isinstance(message, tuple) and message else None
        now = trio.current_time()
        if verb == "acquire" and len(message) == 2:
            breaker = self._breaker(message[1])
            allowed = breaker.acquire(now)
            if allowed and breaker.state == HALF_OPEN and self.probe_gate is not None:
                settings = breaker.settings
                if not await self.probe_gate(breaker.provider, settings.half_open_limit, settings.probe_timeout):
                    breaker.release(trio.current_time())  # another instance holds the fleet's probe slots
                    allowed = False
            self._publish_one(breaker)
            self._emit(breaker.drain_transitions())
            return allowed
        if verb == "get_state" and len(message) == 2:
            provider = message[1]
            if provider is None:
                return self._views()
            breaker = self.breakers.get(provider)
            return None if breaker is None else breaker.view()
        if verb == "reset" and len(message) == 2:
            provider = message[1]
            targets = list(self.breakers.values()) if provider is None else [self.breakers.get(provider)]
            if targets == [None]:
                return Rejected("not_found", f"no circuit breaker for provider {provider!r}")
            transitions = [t for breaker in targets for t in breaker.reset(now)]
            self._publish()
            self._emit(transitions)
            return self._views() if provider is None else targets[0].view()
        if verb == "configure" and len(message) == 3:
            provider, settings = message[1], message[2]
            if not isinstance(settings, BreakerSettings):
                return Rejected("invalid", f"configure needs BreakerSettings, got {type(settings).__name__}")
            if provider is None:
                self.default_settings = settings
                for name, breaker in self.breakers.items():
                    if name not in self.overrides:
                        breaker.reconfigure(settings)
                self._publish()
                return self._views()
            self.overrides[provider] = settings
            breaker = self._breaker(provider)
            breaker.reconfigure(settings)
            self._publish_one(breaker)
            return breaker.view()
        if verb == "remove" and len(message) == 2:
            provider = message[1]
            self.overrides.pop(provider, None)
            existed = self.breakers.pop(provider, None) is not None
            if existed:
                self._publish()
            return existed
        return Rejected("invalid", f"circuit breaker manager does not understand {message!r}")

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
        self._emit(transitions)

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

    def _emit(self, transitions: list[Transition]) -> None:
        emit = self.emit
        for t in transitions:
            emit(BreakerTransition(t.provider, t.from_state, t.to_state, t.reason))


async def admit(views: Published, manager: Any, provider: str, *, timeout: float = 1.0) -> str:
    """The request path's gate before an attempt on ``provider``.

    Returns ``"allow"`` (go; nothing reserved), ``"probe"`` (go; a half-open
    probe slot is held: report the outcome, or cast ``("release", provider)``
    if the attempt ends without one that counts) or ``"deny"`` (skip it). Waits
    on the manager only when the published view says a probe may be possible;
    if the manager cannot answer in ``timeout`` the answer is ``"deny"``, the
    safe side for a provider that was failing.
    """
    verdict = check(views.value, provider, trio.current_time())
    if verdict != ASK:
        return verdict
    try:
        granted = await manager.call(("acquire", provider), timeout)
    except Exception:
        return DENY
    return PROBE if granted is True else DENY
