"""Keys and teams fleet-wide: a key or team changed through any instance is changed on all.

:class:`FleetGovernance` is :class:`~runestone.cluster.control.FleetControl`'s design on another stream,
``runestone:governance``: it hears of every key and team change this instance's
:class:`~runestone.governance.Governance` makes (create, update, revoke and rotate a key; create, update and
delete a team), whether through the admin API, the control socket or the CLI (which speaks to the control
socket), once it is in force and persisted here (``Governance.subscribe``), and appends it to the stream.
Every instance reads the stream on a connection of its own (``XREAD BLOCK``) and applies the others'
changes in stream order through ``Governance.apply_change``: validated again, persisted in its own key
store (its SQLite file, or the shared Postgres database, where the write is the same row again) and
installed in memory; they are not published again. The stream is the order, as for control changes
(:mod:`runestone.cluster.control`): every change carries the key's or team's whole resulting record and
applying it converges to it (nothing is written when the record is held already), an instance applies its
own change again when its entry comes back behind another instance's to the same key or team, so
concurrent changes end the same on every instance, the stream's later entry winning; a change made while
Redis was away is ordered when it is published. A revocation is in force on every instance within
about a second (the readers block on the server and wake at the new entry) and is final: a change to a
key that arrives after its revocation keeps it revoked.

A change is plain JSON and never carries a secret: a new or rotated key travels as its SHA-256 digest
(and, within a rotation's grace, the previous secret's digest and the end of the grace); a patch as the
validated patch the admin API was given. The read position is kept in the data directory
(``fleet_governance.json``): a restarted instance reads on from there, a new one replays the stream from
its start (the newest ``MAX_ENTRIES`` changes). While Redis is down changes apply locally at once and wait,
in order, to be appended when Redis is back; the reader resumes from its last id. A change from the fleet
that this instance's store cannot take (its disk, or the Postgres server, failing) is tried again for up to
``_PERSIST_FOR`` seconds before it is refused and logged; the changes after it wait meanwhile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import trio

from runestone.cluster.control import _RETRY, FleetControl
from runestone.cluster.redis import RedisClient
from runestone.routing.errors import GatewayError

__all__ = ["FleetGovernance", "STREAM"]

log = logging.getLogger("runestone.cluster")

STREAM = "runestone:governance"
#: Seconds a change from the fleet is tried again while this instance's key store cannot be written.
_PERSIST_FOR = 30.0


class FleetGovernance(FleetControl):
    """Shares ``governance``'s key and team changes through ``redis``; the read position is kept in ``data_dir``."""

    stream = STREAM
    offset_file = "fleet_governance.json"
    encode = staticmethod(orjson.dumps)

    def __init__(self, redis: RedisClient, governance: Any, data_dir: Path, *, instance: str | None = None) -> None:
        super().__init__(redis, governance, data_dir, instance=instance)

    async def _apply_one(self, entry_id: str, data: bytes | None, own: bool = False) -> None:
        try:
            change = orjson.loads(data or b"")
            if not isinstance(change, dict):
                raise TypeError("not a JSON object")
            op = await self._apply_persisted(change)
            if op is None:
                return  # in force here already
        except GatewayError as exc:
            self.refused += 1
            log.warning("fleet governance: %s from the fleet (%s) refused here: %s",
                        change.get("op"), entry_id, exc)
            return
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            self.refused += 1
            log.warning("fleet governance: entry %s is not a change this instance takes (%s: %s); skipped",
                        entry_id, type(exc).__name__, exc)
            return
        self.applied += 1
        log.info("fleet governance: applied %s %s(%s)", op, "again, in stream order, after another instance's "
                 "change to the same key or team " if own else "from the fleet ", entry_id)

    async def _apply_persisted(self, change: dict) -> str | None:
        """``apply_change``, tried again while this instance's store cannot be written (the Postgres server
        restarting, say), for up to ``_PERSIST_FOR`` seconds: the stream's later changes wait behind it."""
        with trio.move_on_after(_PERSIST_FOR) as scope:
            while True:
                try:
                    return await self.plane.apply_change(change)
                except GatewayError as exc:
                    if exc.code != "persistence_failed":
                        raise
                    log.warning("fleet governance: %s not persisted here yet (%s); trying again", change.get("op"),
                                exc)
                await trio.sleep(_RETRY)
        assert scope.cancelled_caught
        return await self.plane.apply_change(change)  # the last try: its error is the refusal
