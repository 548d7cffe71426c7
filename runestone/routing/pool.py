"""ProviderPool: the requests in flight and who serves them.

Each request runs in its own task, inside the cancel scope of the client connection that asked for it
(DESIGN.md: a stream task belongs to the request's cancel scope, so a client that leaves cancels its
upstream at once). What the pool owns is the table of those requests: the request path writes its
entry synchronously when it starts and removes it in a ``finally`` when it ends, the way Erlang
processes update a public ETS table with ``ets:update_counter`` instead of messaging its owner — the hot
path never waits on a mailbox. The :class:`ProviderPool` actor reads the table for state dumps and
for draining a provider that is being unregistered. The table is made by whoever builds the tree, so a
restarted ProviderPool finds the requests that kept running while it was down.
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
    """Requests in flight; written by request tasks, synchronously."""

    requests: dict[str, InFlightRequest] = attrs.Factory(dict)
    _idle: dict[str, trio.Event] = attrs.Factory(dict)
    total_started: int = 0

    def add(self, entry: InFlightRequest) -> None:
        self.requests[entry.request_id] = entry
        self.total_started += 1

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def provider_done(self, provider: str) -> None:
        # Wakes a drain waiting for this provider; cheap when nobody waits.
        event = self._idle.get(provider)
        if event is not None:
            event.set()

    async def wait_idle(self, provider: str, in_flight: dict[str, int], deadline: float) -> bool:
        """Wait until ``in_flight[provider]`` is zero or ``deadline`` passes; True when it drained.

        The wake-up event is removed when the wait ends, so providers that came and went leave nothing.
        """
        event = None
        try:
            with trio.move_on_at(deadline):
                while in_flight.get(provider, 0) > 0:
                    event = self._idle[provider] = trio.Event()
                    await event.wait()
                return True
            return in_flight.get(provider, 0) == 0
        finally:
            if event is not None and self._idle.get(provider) is event:
                del self._idle[provider]


@attrs.frozen
class PoolSnapshot:
    """What a state dump shows of the ProviderPool."""

    #: Requests being served: id, provider, model, endpoint, stream, attempts, age in seconds.
    in_flight: list[dict]
    #: Requests started since the process started.
    total_started: int


class ProviderPool(Actor):
    """The actor owning the in-flight table: dumps it, and drains providers on request."""

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
