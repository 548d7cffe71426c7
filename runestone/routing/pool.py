"""What is in flight, and its one owner: the requests being served and the attempts per provider.

Each request runs in its own task, inside the cancel scope of the client connection that asked for it
(DESIGN.md: a stream task belongs to the request's cancel scope, so a client that leaves cancels its
upstream at once). :class:`InFlightTable` is the one structure that records what they are doing: the
request rows (by id) and the count of attempts each provider is serving right now, which routing reads
for load and concurrency limits, ``/metrics`` and health pages show, and a drain waits on. The request
path writes it synchronously, the way Erlang processes update a public ETS table with
``ets:update_counter`` instead of messaging its owner: the hot path never waits on a mailbox, and under
trio each write is atomic. The :class:`ProviderPool` actor holds the table for state dumps. The table is
made by whoever builds the tree, so a restarted ProviderPool finds the requests that kept running while
it was down.
"""

from __future__ import annotations

import attrs
import trio

from ..runtime import Actor

__all__ = ["InFlightRequest", "InFlightTable", "ProviderPool", "PoolSnapshot"]


@attrs.define(slots=True)
class InFlightRequest:
    """One request being served; ``provider`` changes as it fails over."""

    request_id: str
    model: str
    key_id: str | None
    endpoint: str
    stream: bool
    started: float
    provider: str | None = None
    attempts: int = 0


@attrs.define
class InFlightTable:
    """Requests in flight and attempts per provider; written by request tasks, synchronously.

    ``counts`` is shared read-only with everyone who shows or routes by load (it is the same dict, so a
    reader never sees a stale copy); only :meth:`attempt_started` and :meth:`attempt_ended` write it.
    A provider's count stays at zero rather than being deleted: a series that vanishes and returns reads
    as a reset to Prometheus.
    """

    requests: dict[str, InFlightRequest] = attrs.Factory(dict)
    #: provider -> attempts being served right now (a request counts once, on the provider it is trying).
    counts: dict[str, int] = attrs.Factory(dict)
    _idle: dict[str, trio.Event] = attrs.Factory(dict)
    total_started: int = 0

    def add(self, entry: InFlightRequest) -> None:
        self.requests[entry.request_id] = entry
        self.total_started += 1

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def attempt_started(self, provider: str) -> None:
        counts = self.counts
        counts[provider] = counts.get(provider, 0) + 1

    def attempt_ended(self, provider: str) -> None:
        """One attempt on ``provider`` ended; at zero, wakes whoever waits for it to drain."""
        counts = self.counts
        n = counts.get(provider, 0) - 1
        if n > 0:
            counts[provider] = n
            return
        counts[provider] = 0
        event = self._idle.get(provider)  # cheap when nobody waits
        if event is not None:
            event.set()

    def count(self, provider: str) -> int:
        return self.counts.get(provider, 0)

    async def wait_idle(self, provider: str, deadline: float) -> bool:
        """Wait until ``provider`` serves no attempt or ``deadline`` passes; True when it drained.

        Event-driven: woken by the :meth:`attempt_ended` that brings the count to zero, never polling.
        Cancelling the caller abandons the wait (nothing else changes). The wake-up event is removed
        when the wait ends, so providers that came and went leave nothing.
        """
        counts = self.counts
        idle = self._idle
        event = None
        try:
            with trio.move_on_at(deadline):
                while counts.get(provider, 0) > 0:
                    # Several drains of one provider share its event; a set one is spent.
                    event = idle.get(provider)
                    if event is None or event.is_set():
                        event = idle[provider] = trio.Event()
                    await event.wait()
            return counts.get(provider, 0) == 0
        finally:
            if event is not None and idle.get(provider) is event and not event.statistics().tasks_waiting:
                del idle[provider]


@attrs.frozen
class PoolSnapshot:
    """What a state dump shows of the ProviderPool."""

    #: Requests being served: id, provider, model, endpoint, stream, attempts, age in seconds.
    in_flight: list[dict]
    #: Requests started since the process started.
    total_started: int


class ProviderPool(Actor):
    """The actor holding the in-flight table for state dumps. It takes no messages (the request path
    writes the table directly; drains wait on ``InFlightTable.wait_idle``), so any message gets the
    runtime's unknown-message policy."""

    def __init__(self, table: InFlightTable, *, registry=None, name: str = "provider_pool") -> None:
        super().__init__(name, registry=registry)
        self.table = table

    def snapshot(self) -> PoolSnapshot:
        now = trio.current_time()
        rows = [
            {
                "request_id": r.request_id,
                "provider": r.provider,
                "model": r.model,
                "endpoint": r.endpoint,
                "stream": r.stream,
                "attempts": r.attempts,
                "age_s": round(now - r.started, 3),
            }
            for r in list(self.table.requests.values())[:1000]
        ]
        return PoolSnapshot(
            in_flight=rows,
            total_started=self.table.total_started,
        )
