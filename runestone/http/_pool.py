"""The connections of one origin: how many are open, which are idle, who waits for a slot.

``FastTransport`` (in ``client``) keeps one :class:`_OriginPool` per origin and decides when to
reuse, open or close a connection; the pool is the state those decisions read and write, and
:meth:`_OriginPool.release` is where a connection whose response ended cleanly goes back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs
import trio
from trio.lowlevel import ParkingLot

if TYPE_CHECKING:
    from ._connection_client import _UpstreamConnection


@attrs.define(eq=False)
class _OriginPool:
    """The connections of one origin. Owned by the transport; every task using the transport
    touches it, but only between checkpoints, so no lock is needed."""

    origin: str
    host: str
    port: int
    tls: bool
    max_idle: int
    closed: bool = False
    """Set when the transport closes: connections are then closed instead of kept."""
    idle: list[_UpstreamConnection] = attrs.Factory(list)
    """Most recently used last: reuse pops from the end, expiry trims from the front."""
    open: int = 0
    """Slots taken: connections open (idle included) or being opened."""
    waiters: ParkingLot = attrs.Factory(ParkingLot)
    busy: set = attrs.Factory(set)
    """Connections handed out and not yet released or closed (``aclose(abort_in_use=True)`` closes them)."""

    def release(self, conn: _UpstreamConnection) -> None:
        """Keep ``conn``, whose last response ended cleanly, for the next request."""
        self.busy.discard(conn)
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.reused = True
        conn.cap = math.inf
        conn.idle_since = trio.current_time()
        self.idle.append(conn)
        if self.waiters:
            self.waiters.unpark()

