"""The ``TelemetryHandler`` actor: owner of metrics, health scores and usage.

Every telemetry event arrives as a cast on its mailbox (sent without blocking
by :class:`~runestone.telemetry.Telemetry`) and is folded into the state this
actor alone owns: the metrics behind ``/metrics``, the per-provider health
scores, overall request statistics, and the writes of the usage ledger.
Health is published as an immutable ``HealthTable`` into a shared cell so the
router reads it without a mailbox: at once when a provider's status changes,
otherwise at most once per ``flush_interval``. A background task flushes the
ledger on a fixed schedule, every ``flush_interval`` (at once again if a write
took longer), and as soon as ``batch`` records wait; ``terminate`` (which the
runtime runs on every exit, crashes included) flushes what is left. The
ledger given as ``ledger`` outlives the handler (the application's, fed by the
sender on the request path), so a crash loses the in-memory metrics, never a
usage row: what a failed exit flush leaves is written by the next incarnation.
Flush failures are counted and logged, never a crash. Its calls are the
classes of :mod:`runestone.telemetry.messages`; its casts are the events. Live
subscribers get every event's ``to_dict()`` with ``send_nowait``: a slow
subscriber misses events, it never slows the handler.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from runestone.runtime import Actor

from .costs import Pricer
from .events import (
    ActorRestarted,
    AttemptFinished,
    BreakerTransition,
    BudgetExceeded,
    FailoverEvent,
    ProviderRegistered,
    ProviderStatusEvent,
    ProviderUnregistered,
    RequestFinished,
    RetryScheduled,
)
from .health import HealthParams, HealthTracker, HealthView, nearest_rank
from .ledger import UsageLedger
from .messages import Flush, Health, Metrics, Subscribe, Summary, Unsubscribe, Usage
from .metrics import MetricLabels, TelemetryMetrics, render_prometheus
from .sender import HANDLER_NAME, ExtraGauges

__all__ = ["OverallSummary", "TelemetryHandler", "TelemetryStats"]

log = logging.getLogger(__name__)


@attrs.frozen
class OverallSummary:
    """Every request this incarnation of the handler has seen, all providers together."""

    requests: int
    """Finished client requests."""
    errors: int
    """Of those, how many ended in an error."""
    success_rate: float
    """``(requests - errors) / requests``; 1.0 before the first request."""
    tokens_in: int
    tokens_out: int
    cost: float
    """USD."""
    p50: float | None
    """Request latency percentiles in seconds over the last ``latency_window`` requests."""
    p95: float | None
    p99: float | None


@attrs.frozen
class TelemetryStats:
    """The handler's own state, for state dumps."""

    events: int
    """Events handled (all kinds)."""
    unknown_events: int
    """Messages that were neither a telemetry event nor a call of ``telemetry.messages``, over all runs."""
    bad_events: int
    """Events whose fields could not be recorded (wrong types), skipped."""
    subscribers: int
    """Live event feeds attached."""
    subscriber_drops: int
    """Events a full subscriber channel missed."""
    ledger_pending: int
    """Usage rows waiting for the next flush."""
    ledger_written: int
    """Usage rows committed since the ledger was made (across handler restarts, when it outlives them)."""
    ledger_errors: int
    """Background flushes that failed (rows are kept and retried)."""
    ledger_quarantined: int
    """Usage rows that could not be stored, kept in the quarantine file beside the database."""
    ledger_lost: int
    """Usage rows dropped: the buffer was full, or a quarantine line could not be written."""
    overall: OverallSummary
    health: Mapping[str, HealthView]
    breakers: Mapping[str, str]


class TelemetryHandler(Actor):
    """The telemetry actor (registered as ``"telemetry_handler"``).

    Casts: any event of :mod:`runestone.telemetry.events`.
    Calls (:mod:`runestone.telemetry.messages`):

    - ``Metrics(ExtraGauges | None)``: the ``/metrics`` body (bytes);
    - ``Health()``: ``{provider: HealthView}``;
    - ``Summary()``: :class:`OverallSummary`;
    - ``Usage(key_id, group_by, team)``: flushes, then
      ``{"ledger": bool, "key_id", "team", "rows": [...], "totals": {...}}``;
    - ``Subscribe(send_channel)`` / ``Unsubscribe(send_channel)``: bool;
    - ``Flush()``: rows written.

    Anything else gets the runtime's unknown-message policy (``Rejected`` for a call).

    ``pricing`` prices requests whose event carries ``cost == 0``;
    ``health_cell`` is a :class:`~runestone.runtime.Published` cell this handler
    owns: it publishes the health table into it. ``ledger`` is a
    :class:`~runestone.telemetry.ledger.UsageLedger` that outlives this handler
    and that someone else feeds (the sender, ``Telemetry(..., ledger=)``): the
    handler opens, flushes and closes it. Without it, ``ledger_path`` makes the
    handler a ledger of its own, fed from the events it handles (a crash whose
    exit flush fails loses its buffer); both None keep no ledger.
    ``labels`` bounds the metrics' label values (:class:`MetricLabels`; the
    default keeps the first 100 names of each kind).
    """

    def __init__(
        self,
        name: str = HANDLER_NAME,
        *,
        registry: Any = None,
        mailbox_size: int | None = 10_000,
        ledger_path: str | None = None,
        ledger: UsageLedger | None = None,
        flush_interval: float = 0.5,
        batch: int = 500,
        health_params: HealthParams | None = None,
        pricing: Mapping[str, Any] | None = None,
        health_cell: Any = None,
        latency_window: int = 1000,
        labels: MetricLabels | None = None,
    ):
        super().__init__(name, registry=registry, mailbox_size=mailbox_size)
        self.ledger_path = ledger_path
        self._given_ledger = ledger
        self.flush_interval = flush_interval
        self.batch = batch
        self.health_params = health_params or HealthParams()
        self.pricing = pricing
        self.health_cell = health_cell
        self.latency_window = latency_window
        self.labels = labels

    async def init(self) -> None:
        self.metrics = TelemetryMetrics(labels=self.labels or MetricLabels())
        self.health = HealthTracker(self.health_params)
        self.ledger: UsageLedger | None = None
        self._feeds_ledger = False
        self.subscribers: list[Any] = []
        self.subscriber_drops = 0
        self.events = 0
        self.bad_events = 0
        self.ledger_errors = 0
        self._price = Pricer(self.pricing)
        self._requests = 0
        self._errors = 0
        self._tokens_in = 0
        self._tokens_out = 0
        self._cost = 0.0
        #: The last requests' latencies in arrival order: sorted when a summary is asked (rarely), not kept
        #: sorted on every request.
        self._latencies: deque[float] = deque(maxlen=self.latency_window)
        self._health_dirty = False
        ledger = self._given_ledger
        if ledger is None and self.ledger_path is not None:
            ledger = UsageLedger(self.ledger_path, pricing=self.pricing, batch=self.batch)
            self._feeds_ledger = True
        if ledger is not None:
            await ledger.open()
            self.ledger = ledger
        self._publish()
        self.nursery.start_soon(self._background)

    # -- casts ----------------------------------------------------------------

    async def handle_cast(self, msg: Any) -> None:
        """Fold one event in. A malformed event is counted and skipped: it must
        not crash the handler and wipe every metric with it."""
        # The two events of every request come first: a class pattern is one type check.
        match msg:
            case AttemptFinished():
                handler = self._on_attempt
            case RequestFinished():
                handler = self._on_request
            case BreakerTransition():
                handler = self._on_breaker
            case RetryScheduled():
                handler = self.metrics.record_retry
            case FailoverEvent():
                handler = self.metrics.record_failover
            case ActorRestarted():
                handler = self.metrics.record_restart
            case ProviderRegistered():
                handler = self._on_registered
            case ProviderUnregistered():
                handler = self._on_unregistered
            case ProviderStatusEvent() | BudgetExceeded():
                # Status alerts from elsewhere (active checks) and budget refusals (their counts are the
                # governance's) are only forwarded to live feeds.
                handler = _ignore
            case _:
                self.unknown_cast(msg)
                return
        self.events += 1
        if self.subscribers:
            # Before handling, so a feed shows an event before the alert it causes.
            self._forward(msg)
        try:
            handler(msg)
        except Exception:
            self.bad_events += 1
            if self.bad_events == 1 or self.bad_events % 1000 == 0:
                log.exception("telemetry event %s could not be recorded (%d so far)", type(msg).__name__,
                              self.bad_events)

    def _on_request(self, ev: RequestFinished) -> None:
        if self._feeds_ledger:
            # First: add never raises, so a record the metrics choke on still reaches the ledger (which
            # checks it and stores or quarantines it).
            self.ledger.add(ev)
        cost = self._price(ev.cost, ev.provider, ev.model, ev.tokens_in, ev.tokens_out)
        self.metrics.record_request(ev, cost)
        self._requests += 1
        if ev.status != "ok":
            self._errors += 1
        self._tokens_in += ev.tokens_in
        self._tokens_out += ev.tokens_out
        self._cost += cost
        self._latencies.append(ev.latency)

    def _on_attempt(self, ev: AttemptFinished) -> None:
        self.metrics.record_attempt(ev)
        changes = self.health.status_changes
        self._health_moved(
            self.health.record_attempt(ev.provider, ev.ok, ev.latency, ev.ttft, now=trio.current_time()), changes)

    def _on_breaker(self, ev: BreakerTransition) -> None:
        self.metrics.record_breaker(ev)
        changes = self.health.status_changes
        self._health_moved(self.health.record_breaker(ev.provider, ev.to_state), changes)

    def _on_registered(self, ev: ProviderRegistered) -> None:
        # A registration (an update too: it stops the provider and starts it with new settings) starts
        # afresh, as unregistering and registering again does: what the old settings did is not its record.
        self.health.remove_provider(ev.name)
        self.health.add_provider(ev.name)
        self._publish()

    def _on_unregistered(self, ev: ProviderUnregistered) -> None:
        self.health.remove_provider(ev.name)
        self.metrics.forget_provider(ev.name)
        self._publish()

    def _health_moved(self, alerts: list[ProviderStatusEvent], changes_before: int) -> None:
        if self.health.status_changes == changes_before and not alerts:
            self._health_dirty = True
            return
        # A status change reaches the router now, not at the next tick.
        self._publish()
        for alert in alerts:
            log.warning("%s: %s (score %.2f)", alert.kind, alert.provider, alert.score)
            if self.subscribers:
                self._forward(alert)

    def _forward(self, ev: Any) -> None:
        data = ev.to_dict()
        gone = None
        for channel in self.subscribers:
            try:
                channel.send_nowait(data)
            except trio.WouldBlock:
                self.subscriber_drops += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                gone = gone or []
                gone.append(channel)
        if gone:
            self.subscribers = [c for c in self.subscribers if c not in gone]

    def _publish(self) -> None:
        self._health_dirty = False
        if self.health_cell is not None:
            self.health_cell.publish(self.health.table())

    # -- calls ----------------------------------------------------------------

    async def handle_call(self, msg: Any) -> Any:
        match msg:
            case Metrics(extra=extra):
                return self.render_metrics(extra)
            case Summary():
                return self.overall()
            case Health():
                return self.health.views()
            case Usage(key_id=key_id, group_by=group_by, team=team):
                return await self.usage(key_id, group_by, team)
            case Subscribe(channel=channel):
                if channel not in self.subscribers:
                    self.subscribers.append(channel)
                return True
            case Unsubscribe(channel=channel):
                if channel in self.subscribers:
                    self.subscribers.remove(channel)
                    return True
                return False
            case Flush():
                return await self._flush()
            case _:
                return self.unknown_call(msg)

    def render_metrics(self, extra: ExtraGauges | None) -> bytes:
        if extra is None:
            extra = ExtraGauges()
        return render_prometheus(
            self.metrics,
            in_flight=extra.in_flight,
            dropped=extra.dropped,
            cache_hits=extra.cache_hits,
            cache_misses=extra.cache_misses,
            breaker_states=extra.breaker_states,
            actor_restarts=extra.actor_restarts,
            ledger_quarantined=self.ledger.quarantined if self.ledger is not None else 0,
        )

    def overall(self) -> OverallSummary:
        n = self._requests
        lat = sorted(self._latencies)
        return OverallSummary(
            requests=n,
            errors=self._errors,
            success_rate=(n - self._errors) / n if n else 1.0,
            tokens_in=self._tokens_in,
            tokens_out=self._tokens_out,
            cost=self._cost,
            p50=nearest_rank(lat, 50),
            p95=nearest_rank(lat, 95),
            p99=nearest_rank(lat, 99),
        )

    async def usage(self, key_id: str | None, group_by: Sequence[str] = ("model", "day"),
                    team: str | None = None) -> dict[str, Any]:
        """Usage from the ledger (of ``key_id``, of ``team``), flushed first so the answer includes every
        request seen."""
        if self.ledger is None:
            return {"ledger": False, "key_id": key_id, "team": team, "rows": [], "totals": None}
        await self._flush()
        try:
            rows = await self.ledger.summary(key_id, group_by, team)
            totals = await self.ledger.totals(key_id, team)
        except Exception as exc:
            # The database is down or too slow: the caller gets a clear "unavailable", the handler lives on.
            return {"ledger": True, "key_id": key_id, "team": team, "rows": [], "totals": None,
                    "unavailable": f"{type(exc).__name__}: {exc}"[:300]}
        return {"ledger": True, "key_id": key_id, "team": team, "rows": rows, "totals": totals}

    # -- background and shutdown ---------------------------------------------

    async def _flush(self) -> int:
        if self.ledger is None:
            return 0
        try:
            return await self.ledger.flush()
        except Exception as exc:
            # The rows stay buffered (bounded) for the next try; a broken disk
            # must not take telemetry down with it.
            self.ledger_errors += 1
            if self.ledger_errors == 1 or self.ledger_errors % 100 == 0:
                log.error("usage ledger flush failed (%d times): %s: %s", self.ledger_errors,
                          type(exc).__name__, exc)
            return 0

    async def _background(self) -> None:
        # A fixed schedule: a row waits at most one interval for its flush to start, or one write when a
        # write takes longer than the interval.
        interval = self.flush_interval
        tick = trio.current_time() + interval
        while True:
            ledger = self.ledger
            with trio.move_on_at(tick):
                if ledger is None:
                    await trio.sleep_forever()
                await ledger.batch_full.wait()
            now = trio.current_time()
            if now >= tick:
                tick = max(tick + interval, now)
            await self._flush()
            if self._health_dirty:
                self._publish()

    async def terminate(self, reason: Any) -> None:
        """Write out the ledger buffer and close the database, even if being cancelled. What a failed write
        leaves stays in the ledger's buffer: a ledger given to the handler keeps it for the next start."""
        ledger = getattr(self, "ledger", None)
        self.ledger = None
        if ledger is None:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 10.0
            try:
                await ledger.close()
            except Exception as exc:
                if self._feeds_ledger:
                    log.error("usage ledger lost %d rows at shutdown: %s: %s", ledger.pending, type(exc).__name__,
                              exc)
                else:
                    log.error("usage ledger: %d rows stay buffered for the handler's next start (lost if the "
                              "gateway is stopping): %s: %s", ledger.pending, type(exc).__name__, exc)

    def snapshot(self) -> TelemetryStats | None:
        """The state of the running incarnation; None before the first ``init``."""
        if not hasattr(self, "metrics"):
            return None
        ledger = self.ledger
        return TelemetryStats(
            events=self.events,
            unknown_events=self.lifecycle.unknown_messages,
            bad_events=self.bad_events,
            subscribers=len(self.subscribers),
            subscriber_drops=self.subscriber_drops,
            ledger_pending=ledger.pending if ledger else 0,
            ledger_written=ledger.written if ledger else 0,
            ledger_errors=self.ledger_errors,
            ledger_quarantined=ledger.quarantined if ledger else 0,
            ledger_lost=ledger.lost if ledger else 0,
            overall=self.overall(),
            health=self.health.views(),
            breakers=dict(self.metrics.breaker_states),
        )


def _ignore(_event: Any) -> None:
    """An event that is only forwarded to live feeds."""
