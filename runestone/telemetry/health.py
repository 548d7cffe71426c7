"""Health scores: how well each provider is doing, from what it actually did.

Inputs per provider are the outcomes of its last ``window`` upstream attempts
made in the last ``max_age`` seconds, the latencies of its last
``latency_window`` successful attempts (time to first token for streamed
attempts, whole duration otherwise: what a client waits before anything
happens), and its circuit breaker's state. The score,
in [0, 1]::

    success  = (ok + prior) / (attempts + prior)      # over the last `window` attempts of the last `max_age` s
    latency  = 1                      if p50 <= latency_ref
               latency_ref / p50      otherwise        # 2 x the reference -> 0.5
    score    = success * ((1 - latency_weight) + latency_weight * latency)
    breaker open      -> score = 0
    breaker half_open -> score = min(score, half_open_cap)

With the defaults (``prior`` 2, ``latency_ref`` 1 s, ``latency_weight`` 0.3,
``half_open_cap`` 0.5) success is the ceiling of the score and slowness takes
at most 30 % off it; ``prior`` keeps one early failure from condemning a new
provider (1 failure of 1 -> 0.67, 3 of 3 -> 0.4). Status: ``healthy`` at
score >= ``healthy`` (0.8), ``degraded`` at >= ``degraded`` (0.5), else
``unhealthy``. Alerts: ``provider_unhealthy`` when the status enters
unhealthy, ``provider_failed`` when the breaker opens, ``provider_recovered``
when a provider so alerted is healthy again; each transition alerts once. A
breaker closing again clears the outcome window (its probes succeeded; the
failures that opened it are not held against the provider twice).

Recovery: an outcome counts for ``max_age`` (30 s) at most, so old failures
cannot hold a provider down for good once it gets no traffic. The router
sets a provider below its health threshold aside and gives it one passive
probe every 5 s (``runestone.resilience.failover.ProbeSchedule``); each probe
is an attempt recorded here, and recording drops the outcomes older than
``max_age``. A provider that heals therefore has its success term back at
1.0 (a score of at least 0.7 whatever its latency: above the default
threshold of 0.5) at the first probe made ``max_age`` after its last
failure: within 30 s + 5 s = 35 s of healing, after at most 7 successful
probes. While it stays broken its probes keep failing and keep it down
(a failure every 5 s: 6 or 7 in the window, score at most 2 / 8 = 0.25),
and five in a row open its breaker (the default ``failure_threshold``),
whose own half-open probes take over.
Percentiles are nearest-rank over the latency window, kept sorted on insert
so each attempt costs O(log n) comparisons and a small memmove, not a sort.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping

import attrs

from .events import ProviderStatusEvent

__all__ = ["HealthParams", "HealthTable", "HealthTracker", "HealthView", "LatencyWindow", "ProviderHealth"]

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"


@attrs.frozen
class HealthParams:
    """Tuning of the health score; see the module docstring for the formula."""

    window: int = 100
    #: Seconds an outcome counts; older ones are dropped when the next attempt is recorded.
    max_age: float = 30.0
    latency_window: int = 200
    latency_ref: float = 1.0
    latency_weight: float = 0.3
    prior: float = 2.0
    half_open_cap: float = 0.5
    #: Weight of the newest sample in ``ttft_ewma`` (reported, not scored).
    ewma_alpha: float = 0.2
    healthy: float = 0.8
    degraded: float = 0.5

    def status_of(self, score: float) -> str:
        if score >= self.healthy:
            return HEALTHY
        if score >= self.degraded:
            return DEGRADED
        return UNHEALTHY


@attrs.frozen
class HealthView:
    """A provider's health as the router and ``/health`` see it.

    ``success_rate`` is raw (ok / attempts) over the window, 1.0 with no
    attempts yet; ``p50``/``p95``/``p99`` are seconds over the latency window
    (None before the first success); ``requests``/``errors`` count attempts
    since the provider was first seen by this handler; ``ttft_ewma`` is the
    moving average (seconds) of the same samples as the percentiles.
    """

    score: float
    status: str
    success_rate: float
    p50: float | None
    p95: float | None
    p99: float | None
    requests: int
    errors: int
    breaker: str = "closed"
    ttft_ewma: float | None = None


class HealthTable(Mapping):
    """What the handler publishes: provider -> :class:`HealthView`, read-only.

    Built once per publish, with the two plain maps the router wants ready
    made so a request never builds one: ``scores`` (provider -> score) and
    ``ttft_ewma_ms`` (provider -> moving average in milliseconds, measured
    providers only).
    """

    __slots__ = ("_views", "scores", "ttft_ewma_ms")

    def __init__(self, views: Mapping[str, HealthView] | None = None):
        self._views = dict(views or {})
        self.scores = {name: v.score for name, v in self._views.items()}
        self.ttft_ewma_ms = {
            name: v.ttft_ewma * 1000.0 for name, v in self._views.items() if v.ttft_ewma is not None
        }

    def __getitem__(self, provider: str) -> HealthView:
        return self._views[provider]

    def __iter__(self):
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        return f"HealthTable({self.scores!r})"


class LatencyWindow:
    """The last ``size`` samples, in arrival order and sorted, for percentiles."""

    __slots__ = ("size", "_order", "_sorted")

    def __init__(self, size: int):
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, value: float) -> None:
        if len(self._order) >= self.size:
            old = self._order.popleft()
            del self._sorted[bisect_left(self._sorted, old)]
        self._order.append(value)
        insort(self._sorted, value)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, ``q`` in (0, 100]; None when empty."""
        return nearest_rank(self._sorted, q)


def nearest_rank(s: list[float], q: float) -> float | None:
    """The nearest-rank percentile ``q`` (in (0, 100]) of the sorted ``s``; None when it is empty."""
    if not s:
        return None
    # ceil(q/100 * n) as a 1-based rank, done in integers to dodge float fuzz.
    rank = -(-int(q * len(s)) // 100)
    return s[min(len(s), max(rank, 1)) - 1]


@attrs.define
class ProviderHealth:
    """Mutable health state of one provider, owned by the handler's task."""

    #: ``(recorded at, 1 ok / 0 failed)``, oldest first.
    outcomes: deque = attrs.field(factory=deque)
    ok_in_window: int = 0
    latencies: LatencyWindow = attrs.field(factory=lambda: LatencyWindow(200))
    requests: int = 0
    errors: int = 0
    breaker: str = "closed"
    ttft_ewma: float | None = None
    score: float = 1.0
    status: str = HEALTHY
    alerted: bool = False


class HealthTracker:
    """Health of every known provider; feeds on attempts and breaker moves.

    ``record_*`` return the alert events their input caused (usually none);
    the caller forwards them. Not thread-safe: one task owns it.
    """

    __slots__ = ("params", "providers", "status_changes")

    def __init__(self, params: HealthParams | None = None):
        self.params = params or HealthParams()
        self.providers: dict[str, ProviderHealth] = {}
        #: Status transitions so far (any, alerting or not): lets the owner
        #: notice a change worth publishing at once.
        self.status_changes = 0

    def _get(self, provider: str) -> ProviderHealth:
        h = self.providers.get(provider)
        if h is None:
            h = self.providers[provider] = ProviderHealth(latencies=LatencyWindow(self.params.latency_window))
        return h

    def add_provider(self, provider: str) -> None:
        self._get(provider)

    def remove_provider(self, provider: str) -> None:
        self.providers.pop(provider, None)

    def record_attempt(
        self, provider: str, ok: bool, latency: float, ttft: float | None = None, now: float | None = None
    ) -> list[ProviderStatusEvent]:
        """One finished attempt at time ``now`` (the owner's clock; None: this one never ages out)."""
        h = self._get(provider)
        outcomes = h.outcomes
        if now is not None:
            oldest = now - self.params.max_age
            while outcomes and outcomes[0][0] < oldest:
                h.ok_in_window -= outcomes.popleft()[1]
        else:
            now = math.inf
        if len(outcomes) >= self.params.window:
            h.ok_in_window -= outcomes.popleft()[1]
        outcomes.append((now, 1 if ok else 0))
        h.requests += 1
        if ok:
            h.ok_in_window += 1
            sample = latency if ttft is None else ttft
            h.latencies.add(sample)
            ewma = h.ttft_ewma
            h.ttft_ewma = sample if ewma is None else ewma + self.params.ewma_alpha * (sample - ewma)
        else:
            h.errors += 1
        return self._rescore(provider, h)

    def record_breaker(self, provider: str, to_state: str) -> list[ProviderStatusEvent]:
        h = self._get(provider)
        was = h.breaker
        h.breaker = to_state
        if to_state == "closed" and was != "closed":
            # The failures that opened the breaker are paid for; its probes
            # showed the provider is back, so it starts over with a clean window.
            h.outcomes.clear()
            h.ok_in_window = 0
        alerts = self._rescore(provider, h)
        if to_state == "open" and was != "open":
            alerts.append(ProviderStatusEvent("provider_failed", provider, h.score))
            h.alerted = True
        return alerts

    def score_of(self, h: ProviderHealth) -> float:
        p = self.params
        if h.breaker == "open":
            return 0.0
        n = len(h.outcomes)
        success = (h.ok_in_window + p.prior) / (n + p.prior) if n + p.prior > 0 else 1.0
        latency = 1.0
        p50 = h.latencies.percentile(50)
        if p50 is not None and p50 > p.latency_ref:
            latency = p.latency_ref / p50
        score = success * ((1.0 - p.latency_weight) + p.latency_weight * latency)
        if h.breaker == "half_open" and score > p.half_open_cap:
            score = p.half_open_cap
        return score

    def _rescore(self, provider: str, h: ProviderHealth) -> list[ProviderStatusEvent]:
        h.score = score = self.score_of(h)
        status = self.params.status_of(score)
        if status == h.status:
            return []
        h.status = status
        self.status_changes += 1
        if status == UNHEALTHY:
            h.alerted = True
            return [ProviderStatusEvent("provider_unhealthy", provider, score)]
        if status == HEALTHY and h.alerted:
            h.alerted = False
            return [ProviderStatusEvent("provider_recovered", provider, score)]
        return []

    def view(self, provider: str) -> HealthView | None:
        h = self.providers.get(provider)
        if h is None:
            return None
        n = len(h.outcomes)
        lat = h.latencies
        return HealthView(
            score=h.score,
            status=h.status,
            success_rate=h.ok_in_window / n if n else 1.0,
            p50=lat.percentile(50),
            p95=lat.percentile(95),
            p99=lat.percentile(99),
            requests=h.requests,
            errors=h.errors,
            breaker=h.breaker,
            ttft_ewma=h.ttft_ewma,
        )

    def views(self) -> dict[str, HealthView]:
        return {name: self.view(name) for name in self.providers}

    def table(self) -> HealthTable:
        """An immutable snapshot of every provider's health, for publishing."""
        return HealthTable(self.views())
