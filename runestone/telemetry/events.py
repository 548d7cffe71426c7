"""Telemetry events: the immutable facts the rest of the gateway reports.

The request path, the breaker, the failover manager and the supervisors build
these and hand them to :class:`runestone.telemetry.Telemetry`, which casts them
to the ``TelemetryHandler`` without ever blocking. They are slotted attrs classes
without validators because one or two are built per request: construction must
cost a plain ``__init__`` and nothing else. They are not ``frozen``: a frozen
class's ``__init__`` sets each field through ``object.__setattr__`` (2.1 us for a
``RequestFinished`` against 0.36 us); an event is a fact all the same, and no
one changes it once it is built. Every event has a
``kind`` (a class constant, or a field where one class carries several kinds)
and ``to_dict()``, the plain-data form forwarded to live subscribers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

__all__ = [
    "ActorRestarted",
    "AttemptFinished",
    "BreakerTransition",
    "BudgetExceeded",
    "Event",
    "FailoverEvent",
    "ProviderRegistered",
    "ProviderStatusEvent",
    "ProviderUnregistered",
    "RequestFinished",
    "RetryScheduled",
]


class _EventBase:
    """Shared ``to_dict``; subclasses get ``_field_names`` from ``_event``."""

    __slots__ = ()
    kind: ClassVar[str]
    _field_names: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``kind`` first, then every field); safe to JSON-encode."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in self._field_names:
            out[name] = getattr(self, name)
        return out


def _event(kind: str | None):
    """Make a slotted event class (see the module docstring); ``kind`` None means it is a field."""

    def wrap(cls):
        cls = attrs.define(cls, slots=True)
        cls._field_names = tuple(f.name for f in attrs.fields(cls) if f.name != "kind")
        if kind is not None:
            cls.kind = kind
        return cls

    return wrap


@_event("request_finished")
class RequestFinished(_EventBase):
    """One client request is over, successfully or not (one per request).

    ``latency`` and ``ttft`` are seconds measured on the request's clock;
    ``ttft`` is None when no token reached the client (errors, non-streamed
    bodies may set it to ``latency``). ``wall_time`` is ``time.time()`` at the
    end, used by the usage ledger for per-day accounting. ``cost`` is in USD;
    0.0 lets the handler price the tokens from its pricing table.
    """

    request_id: str
    key_id: str | None
    provider: str
    model: str
    endpoint: str  # "chat" | "embeddings" | "completions" | "messages"
    stream: bool
    status: str  # "ok" | "error"
    http_status: int
    error_type: str | None
    latency: float
    ttft: float | None
    tokens_in: int
    tokens_out: int
    cost: float
    retries: int
    failovers: int
    route_reason: str
    wall_time: float
    #: The model the client named (an alias, group, split or model); ``model`` is the one that served.
    model_asked: str = ""
    #: Upstream attempts made (0 when no provider could be tried).
    attempts: int = 0


@_event("attempt_finished")
class AttemptFinished(_EventBase):
    """One upstream attempt is over; these feed the providers' health scores.

    A request that was retried or failed over produces several of these and
    one :class:`RequestFinished`.
    """

    provider: str
    model: str
    ok: bool
    error_type: str | None
    latency: float
    ttft: float | None


@_event("breaker_transition")
class BreakerTransition(_EventBase):
    """A provider's circuit breaker moved (``closed``/``half_open``/``open``)."""

    provider: str
    from_state: str
    to_state: str
    reason: str


@_event("retry_scheduled")
class RetryScheduled(_EventBase):
    """A retry of ``attempt`` (1-based) will run after ``delay`` seconds."""

    provider: str
    attempt: int
    delay: float
    reason: str


@_event(None)
class FailoverEvent(_EventBase):
    """Failover-group outcome; ``kind`` is ``failover``, ``fallback_success``
    or ``fallback_exhausted``. ``to_provider`` is None when nothing was left."""

    kind: str
    group: str
    from_provider: str | None
    to_provider: str | None
    attempts: int


@_event(None)
class ProviderStatusEvent(_EventBase):
    """Health alert; ``kind`` is ``provider_unhealthy``, ``provider_recovered``
    or ``provider_failed``; ``score`` is the health score at that moment."""

    kind: str
    provider: str
    score: float


@_event("actor_restarted")
class ActorRestarted(_EventBase):
    """A supervisor restarted actor ``name``; ``restarts`` is its running count.

    Each event counts as one restart in the metrics, whatever ``restarts`` says.
    """

    name: str
    restarts: int


@_event("provider_registered")
class ProviderRegistered(_EventBase):
    """A provider joined the gateway (at start or hot-registered)."""

    name: str


@_event("provider_unregistered")
class ProviderUnregistered(_EventBase):
    """A provider left; its health entry and gauges are dropped."""

    name: str


@_event("budget_exceeded")
class BudgetExceeded(_EventBase):
    """A request was refused before dispatch: its worst-case cost did not fit a budget.

    ``budget`` is whose: ``"key"`` or ``"team"``; amounts are USD; ``resets_at`` ISO 8601 UTC (None for a
    total budget). Never carries a secret: the key is named by its id.
    """

    key_id: str
    team: str | None
    budget: str
    period: str
    limit_usd: float
    remaining_usd: float
    requested_usd: float
    resets_at: str | None
    model: str
    wall_time: float


Event = (
    RequestFinished
    | AttemptFinished
    | BreakerTransition
    | RetryScheduled
    | FailoverEvent
    | ProviderStatusEvent
    | ActorRestarted
    | BudgetExceeded
    | ProviderRegistered
    | ProviderUnregistered
)
