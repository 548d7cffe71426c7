"""Control-plane changes fleet-wide: a provider or group changed through any instance is changed on all.

:class:`FleetControl` hears of every change the instance's control plane makes (register, update and
unregister a provider; create, update and delete a failover group), whether it came through the admin API
or the control socket, once it is applied here, and appends it to the Redis stream ``runestone:control``
(``XADD``: the stream's ids order the fleet's changes). Every instance reads the stream on a connection of
its own (``XREAD BLOCK``) and applies the others' changes in stream order through the same plane
operations, validated again and persisted in its own control store, so a change is in force everywhere
within about a second and survives a restart of any instance. The id of the last entry handled is kept in
the data directory (``fleet_control.json``): a restarted instance reads on from there, a new one replays
the stream from its start (which keeps the newest ``MAX_ENTRIES`` changes; give Redis persistence, AOF or
RDB, for the stream to outlive a Redis restart).

A change is carried as the operation's name and the arguments the operation was called with (the admin
API's JSON), so another instance validates it exactly as this one did; a change another instance refuses
(say, a provider registered twice at once on two instances) is logged there and skipped. Secrets in a
provider's settings travel through Redis: protect it (``requirepass``, TLS with ``rediss://``).

While Redis is down, changes apply locally at once and wait, in order, to be appended when Redis is back;
the reader resumes from its last id, so nothing published meanwhile by others is missed.

The hook is on today's ``runestone.front.admin.ControlPlane`` (its six change operations are wrapped).
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import trio

from runestone.cluster.breakers import instance_id
from runestone.cluster.redis import RedisClient, RedisError
from runestone.routing.executor import GatewayError

__all__ = ["FleetControl", "STREAM", "OPERATIONS"]

log = logging.getLogger("runestone.cluster")

STREAM = "runestone:control"
#: The stream keeps about this many of the newest changes (XADD MAXLEN ~).
MAX_ENTRIES = 10_000
#: The control plane's operations that change something.
OPERATIONS = ("register_provider", "update_provider", "unregister_provider", "create_group", "update_group",
              "delete_group")
#: Seconds an XREAD waits on the server for new entries; and between attempts while Redis is away.
_BLOCK = 1.0
_RETRY = 0.5
#: Changes kept while Redis is away; past this the oldest are dropped (and logged): each is in force here.
_MAX_QUEUED = 10_000


class FleetControl:
    """Shares ``plane``'s changes through ``redis``; the read position is kept in ``data_dir``."""

    def __init__(self, redis: RedisClient, plane: Any, data_dir: Path, *, instance: str | None = None) -> None:
        self.redis = redis
        self.plane = plane
        self.instance = instance or instance_id()
        self.offset_path = Path(data_dir) / "fleet_control.json"
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = trio.Event()
        self._apply = {}
        for op in OPERATIONS:
            original = getattr(plane, op)
            self._apply[op] = original  # remote changes go to the original: they are not published again
            setattr(plane, op, self._shared(op, original))
        self.last_id = self._load_offset()
        self.published = 0
        self.applied = 0
        self.refused = 0

    def _shared(self, op: str, original):
        async def changed(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)  # raised: nothing changed, nothing to share
            self._queue.append(orjson.dumps({"op": op, "args": args, "kwargs": kwargs}))
            if len(self._queue) > _MAX_QUEUED:
                self._queue.popleft()
                log.error("fleet control: more than %d changes waiting for Redis; the oldest is not shared",
                          _MAX_QUEUED)
            self._wake.set()
            return result

        return changed

    # -- the read position ----------------------------------------------------------------------------

    def _load_offset(self) -> str:
        try:
            return str(orjson.loads(self.offset_path.read_bytes())["last_id"])
        except FileNotFoundError:
            return "0"
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("fleet control: %s is unreadable (%s); replaying the stream from its start",
                        self.offset_path, exc)
            return "0"

    def _save_offset(self) -> None:
        self.offset_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.offset_path.with_suffix(f".{os.getpid()}.tmp")  # workers may share the data directory
        tmp.write_bytes(orjson.dumps({"last_id": self.last_id}))
        os.replace(tmp, self.offset_path)

    # -- tasks ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._reader)
            task_status.started(self)

    def snapshot(self) -> dict:
        return {"instance": self.instance, "last_id": self.last_id, "waiting": len(self._queue),
                "published": self.published, "applied": self.applied, "refused": self.refused}

    async def _publisher(self) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            try:
                while self._queue:
                    data = self._queue[0]
                    await self.redis.execute("XADD", STREAM, "MAXLEN", "~", MAX_ENTRIES, "*",
                                             "i", self.instance, "c", data, timeout=2.0)
                    self._queue.popleft()
                    self.published += 1
            except RedisError:
                await trio.sleep(_RETRY)  # kept, in order, until Redis takes them

    async def _reader(self) -> None:
        while True:
            try:
                async with self.redis.connection() as conn:
                    while True:
                        reply = await conn.execute("XREAD", "COUNT", 100, "BLOCK", int(_BLOCK * 1000),
                                                   "STREAMS", STREAM, self.last_id,
                                                   timeout=_BLOCK + self.redis.connect_timeout + 1.0)
                        if reply:
                            await self._handle(reply[0][1])
            except (RedisError, OSError) as exc:
                log.debug("fleet control: reading the stream failed (%s); again shortly", exc)
            await trio.sleep(_RETRY)

    async def _handle(self, entries: list) -> None:
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            if values.get(b"i", b"").decode() != self.instance:
                await self._apply_one(entry_id.decode(), values.get(b"c"))
            self.last_id = entry_id.decode()
        await trio.to_thread.run_sync(self._save_offset)

    async def _apply_one(self, entry_id: str, data: bytes | None) -> None:
        try:
            change = orjson.loads(data or b"")
            apply = self._apply[change["op"]]
            args, kwargs = list(change.get("args") or ()), dict(change.get("kwargs") or {})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("fleet control: entry %s is not a change this version knows; skipped", entry_id)
            self.refused += 1
            return
        try:
            await apply(*args, **kwargs)
            self.applied += 1
            log.info("fleet control: applied %s from the fleet (%s)", change["op"], entry_id)
        except GatewayError as exc:
            self.refused += 1
            log.warning("fleet control: %s from the fleet (%s) refused here: %s", change["op"], entry_id, exc)
