"""The hot path's side of telemetry: emit events without ever waiting.

:class:`Telemetry` is the one object request code holds. ``emit`` hands an
event to the ``TelemetryHandler`` with a non-blocking ``try_cast``; when the
mailbox is full, or the handler is down between a crash and its restart, the
event is counted in ``dropped`` and forgotten. Nothing here raises into the
request or yields to the scheduler. The handler is found by name on every
emit (through the runtime's named reference), so a restarted handler is picked
up without anyone re-wiring. Gauges that must be exact at any instant (cache
hits and misses) are plain ints kept here rather than events, since only the
single-threaded request code writes them; the handler reads them when it
renders ``/metrics``, with the requests in flight per provider, which this
sender only reads (their one owner is ``runestone.routing.pool.InFlightTable``).
With a ``ledger``, each ``RequestFinished``
is also added to it here (an O(1) append): a usage row never waits in, nor is
lost with, the handler's mailbox, nor while the handler restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .events import RequestFinished
from .messages import Metrics

__all__ = ["HANDLER_NAME", "ExtraGauges", "Telemetry"]

HANDLER_NAME = "telemetry_handler"


@attrs.frozen
class ExtraGauges:
    """Values the handler does not own, passed to it for one ``/metrics`` render."""

    in_flight: dict[str, int] = attrs.field(factory=dict)
    dropped: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    breaker_states: dict[str, str] | None = None
    actor_restarts: dict[str, int] | None = None


def _resolver(target: Any) -> Callable[[], Any]:
    """A function returning the handler's ref (or None) from what we were given."""
    if hasattr(target, "try_cast"):
        return lambda: target
    if callable(target):
        return target
    from runestone.runtime import NamedRef

    ref = NamedRef(target, HANDLER_NAME)
    return lambda: ref


class Telemetry:
    """Non-blocking sender of telemetry events, plus exact hot-path gauges.

    ``target`` is a runtime registry (the handler is looked up by the name
    ``"telemetry_handler"``), an actor ref with ``try_cast``, or a zero-argument
    callable returning such a ref or None. ``ledger`` (a
    :class:`~runestone.telemetry.ledger.UsageLedger`) gets a row per
    ``RequestFinished`` emitted. ``in_flight`` is the live per-provider
    count of attempts in flight, owned by whoever serves them (the
    in-flight table's ``counts``), read here for gauges. All methods except
    :meth:`metrics_text` are
    synchronous, O(1) and never raise.
    """

    __slots__ = ("_resolve", "_casts", "ledger", "tap", "dropped", "in_flight", "cache_hits", "cache_misses")

    def __init__(self, target: Any, ledger: Any = None, in_flight: Mapping[str, int] | None = None,
                 max_pending: int | None = 10_000):
        from runestone.runtime import Coalescer

        self._resolve = _resolver(target)
        #: Events go to the handler in batches: one mailbox trip for all those sent while the last waits; at
        #: most ``max_pending`` events wait (the handler's mailbox size: as many as single casts could).
        self._casts = Coalescer(self._resolve, max_pending=max_pending)
        self.ledger = ledger
        #: Called with every event, synchronously on the emitting task, before it is cast (the access log
        #: and traces: telemetry/observe.py); None when nobody listens. Must be cheap; what it raises is ignored.
        self.tap: Callable[[Any], None] | None = None
        #: Events that could not be handed to the handler.
        self.dropped = 0
        #: provider -> attempts being served right now (read only: the in-flight table writes it).
        self.in_flight: Mapping[str, int] = in_flight if in_flight is not None else {}
        self.cache_hits = 0
        self.cache_misses = 0

    def emit(self, event: Any) -> None:
        """Hand ``event`` to the handler now, or count it as dropped (its ledger row is kept either way)."""
        ledger = self.ledger
        if ledger is not None and type(event) is RequestFinished:
            ledger.add(event)
        tap = self.tap
        if tap is not None:
            try:
                tap(event)
            except Exception:
                pass
        if not self._casts.try_cast(event):
            # A dead or missing handler (or a full mailbox) must cost the request nothing but a count.
            self.dropped += 1

    def cache_result(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1

    def gauges(self, breaker_states: dict[str, str] | None = None,
               actor_restarts: dict[str, int] | None = None) -> ExtraGauges:
        """A copy of this sender's gauges, to pass to the handler's ``metrics`` call."""
        return ExtraGauges(
            in_flight=dict(self.in_flight),
            dropped=self.dropped,
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            breaker_states=breaker_states,
            actor_restarts=actor_restarts,
        )

    async def metrics_text(self, *, timeout: float = 5.0, breaker_states: dict[str, str] | None = None,
                           actor_restarts: dict[str, int] | None = None) -> bytes:
        """The full ``/metrics`` body: asks the handler to render with our gauges.

        Not for the hot path: it waits on the handler's mailbox (``call``).
        Raises whatever the ref's ``call`` raises when the handler is down.
        """
        ref = self._resolve()
        if ref is None:
            raise LookupError(f"{HANDLER_NAME} is not running")
        return await ref.call(Metrics(self.gauges(breaker_states, actor_restarts)), timeout=timeout)

    def snapshot(self) -> dict[str, Any]:
        return {
            "dropped": self.dropped,
            "in_flight": dict(self.in_flight),
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }
