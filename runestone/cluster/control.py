"""Control-plane changes fleet-wide: a provider or group changed through any instance is changed on all.

:class:`FleetControl` hears of every change the instance's control plane makes (register, update and
unregister a provider; create, update and delete a failover group), whether it came through the admin API
or the control socket, once it is applied here, and appends it to the Redis stream ``runestone:control``
(``XADD``). Every instance reads the stream on a connection of its own (``XREAD BLOCK``) and applies the
others' changes in stream order through the same plane operations, validated again and persisted in its own
control store, so a change is in force everywhere within about a second and survives a restart of any
instance. The id of the last entry handled is kept in the data directory (``fleet_control.json``): a
restarted instance reads on from there, a new one replays the stream from its start (which keeps the newest
``MAX_ENTRIES`` changes; give Redis persistence, AOF or RDB, for the stream to outlive a Redis restart).

The stream is the order. An entry carries the whole resulting record (a provider in its dict form with its
secrets, a group in its dict form, or the name removed), and applying it *converges* to it: the provider
or group is registered, updated or removed as it takes for this instance to hold that record (nothing, when
it holds it already), so a replay is idempotent and the last writer in stream order wins on every instance.
A change is applied where it is made first (its caller learns the outcome at once) and published after;
when its own entry comes back on the stream behind an entry of another instance's for the same name (two
instances changed one name at the same moment), the instance applies its own again, so that it too ends in
stream order; otherwise its own entry is already in force and is skipped. An entry that arrives while a
change to the same name is still running here waits for it (``_CONVERGE_FOR`` seconds at most) rather than
being refused. The hook is the plane's own (``ControlPlane.subscribe``: each change once it is applied, in
force and persisted); the fleet's changes go through ``ControlPlane.apply(change, origin="fleet")``, the one
path by which anything changes, and are not published again. The provider is validated again where it
arrives (against that instance's ``[admin] upstream_hosts``); an entry an instance cannot take is logged
there and skipped. Secrets in a provider's settings travel through Redis: protect it (``requirepass``, TLS
with ``rediss://``).

While Redis is down, changes apply locally at once and wait, in order, to be appended when Redis is back;
the reader resumes from its last id, so nothing published meanwhile by others is missed. What wins then is
still the stream's order, which is the order of *publication*: a change made on an instance cut off from
Redis is ordered when it is appended, after every change the others published meanwhile, so it wins over
them for its name (and every instance, the one that made it included, ends in that state).
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
from runestone.config import ConfigError, provider_spec_from_dict, provider_spec_to_dict
from runestone.control import (
    CreateGroup,
    DeleteGroup,
    RegisterProvider,
    UnregisterProvider,
    UpdateGroup,
    UpdateProvider,
)
from runestone.control.store import group_to_dict
from runestone.resilience.failover import GroupSpec
from runestone.routing.executor import GatewayError

__all__ = ["FleetControl", "STREAM", "encode_change", "decode_change"]

log = logging.getLogger("runestone.cluster")

STREAM = "runestone:control"
#: The stream keeps about this many of the newest changes (XADD MAXLEN ~).
MAX_ENTRIES = 10_000
#: The origin this module gives the changes it applies (ControlPlane.apply); they are not published again.
ORIGIN = "fleet"
#: Seconds an XREAD waits on the server for new entries; and between attempts while Redis is away.
_BLOCK = 1.0
_RETRY = 0.5
#: Changes kept while Redis is away; past this the oldest are dropped (and logged): each is in force here.
_MAX_QUEUED = 10_000
#: Seconds an entry from the fleet waits for a change to the same name running here (409) before it is refused.
_CONVERGE_FOR = 30.0


def subject_of(data: bytes) -> str:
    """What an encoded change is about, as ``"<kind>:<name>"`` (``provider:p``, ``group:g``, ``key:<id>``,
    ``team:t``): entries about the same subject are ordered by the stream; ``""`` for one that names none."""
    try:
        item = orjson.loads(data)
        kind = str(item["op"]).partition("_")[2]
        record = item.get(kind)
        name = item.get("id") or item.get("name")
        if name is None and isinstance(record, dict):
            name = record.get("id") or record.get("name")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return ""
    return f"{kind}:{name}" if name is not None else ""


def encode_change(change: Any) -> bytes:
    """A control change as the JSON the stream carries."""
    match change:
        case RegisterProvider(spec=spec):
            data = {"op": "register_provider", "provider": provider_spec_to_dict(spec, redact=False)}
        case UpdateProvider(spec=spec, grace=grace):
            data = {"op": "update_provider", "provider": provider_spec_to_dict(spec, redact=False), "grace": grace}
        case UnregisterProvider(name=name, grace=grace):
            data = {"op": "unregister_provider", "name": name, "grace": grace}
        case CreateGroup(spec=group):
            data = {"op": "create_group", "group": group_to_dict(group)}
        case UpdateGroup(spec=group):
            data = {"op": "update_group", "group": group_to_dict(group)}
        case DeleteGroup(name=name):
            data = {"op": "delete_group", "name": name}
        case _:
            raise TypeError(f"not a control change: {change!r}")
    return orjson.dumps(data)


def decode_change(data: bytes, upstream_hosts: Any = ()) -> Any:
    """The change :func:`encode_change` wrote; ValueError (or ConfigError) when it is not one."""
    item = orjson.loads(data)
    op = item["op"]
    if op in ("register_provider", "update_provider"):
        spec = provider_spec_from_dict(item["provider"], upstream_hosts)
        return RegisterProvider(spec) if op == "register_provider" else UpdateProvider(spec, float(item["grace"]))
    if op == "unregister_provider":
        return UnregisterProvider(str(item["name"]), float(item["grace"]))
    if op in ("create_group", "update_group"):
        group = GroupSpec(**item["group"])
        return CreateGroup(group) if op == "create_group" else UpdateGroup(group)
    if op == "delete_group":
        return DeleteGroup(str(item["name"]))
    raise ValueError(f"unknown control change {op!r}")


class FleetControl:
    """Shares ``plane``'s changes through ``redis``; the read position is kept in ``data_dir``."""

    #: The stream, and the file in the data directory keeping the read position (a subclass shares another
    #: plane's changes on its own: runestone.cluster.governance).
    stream = STREAM
    offset_file = "fleet_control.json"
    encode = staticmethod(encode_change)

    def __init__(self, redis: RedisClient, plane: Any, data_dir: Path, *, instance: str | None = None,
                 upstream_hosts: Any = ()) -> None:
        self.redis = redis
        self.plane = plane
        self.instance = instance or instance_id()
        self.upstream_hosts = upstream_hosts
        self.offset_path = Path(data_dir) / self.offset_file
        self._queue: collections.deque[bytes] = collections.deque()
        #: subject -> this instance's changes to it not yet read back from the stream.
        self._own: collections.Counter[str] = collections.Counter()
        self._wake = trio.Event()
        plane.subscribe(self._applied)
        self.last_id = self._load_offset()
        self.published = 0
        self.applied = 0
        self.refused = 0

    def _applied(self, change: Any, origin: str) -> None:
        if origin == ORIGIN:
            return  # the fleet's own, applied here
        data = self.encode(change)
        self._queue.append(data)
        self._own[subject_of(data)] += 1
        if len(self._queue) > _MAX_QUEUED:
            self._settle_own(subject_of(self._queue.popleft()))
            log.error("fleet control: more than %d changes waiting for Redis; the oldest is not shared",
                      _MAX_QUEUED)
        self._wake.set()

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
                    await self.redis.execute("XADD", self.stream, "MAXLEN", "~", MAX_ENTRIES, "*",
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
                                                   "STREAMS", self.stream, self.last_id,
                                                   timeout=_BLOCK + self.redis.connect_timeout + 1.0)
                        if reply:
                            await self._handle(reply[0][1])
            except (RedisError, OSError) as exc:
                log.debug("fleet control: reading the stream failed (%s); again shortly", exc)
            await trio.sleep(_RETRY)

    def _settle_own(self, subject: str) -> bool:
        """One of our changes to ``subject`` is read back (or dropped); True when it is the last one of ours
        on its way, whose state this instance must end in (a later one of ours would override it)."""
        self._own[subject] -= 1
        if self._own[subject] > 0:
            return False
        del self._own[subject]
        return True

    async def _handle(self, entries: list) -> None:
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            data = values.get(b"c")
            if values.get(b"i", b"").decode() != self.instance:
                await self._apply_one(entry_id.decode(), data)
            elif self._settle_own(subject_of(data or b"")):
                # In force here already, unless an entry of another instance's for the same name, earlier in
                # the stream, was applied after it: converging to it is then a change, else nothing.
                await self._apply_one(entry_id.decode(), data, own=True)
            self.last_id = entry_id.decode()
        await trio.to_thread.run_sync(self._save_offset)

    async def _apply_one(self, entry_id: str, data: bytes | None, own: bool = False) -> None:
        try:
            change = decode_change(data or b"", self.upstream_hosts)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError) as exc:
            log.warning("fleet control: entry %s is not a change this instance takes (%s); skipped", entry_id, exc)
            self.refused += 1
            return
        try:
            applied = await self._converge(change)
        except GatewayError as exc:
            self.refused += 1
            log.warning("fleet control: %s from the fleet (%s) refused here: %s", type(change).__name__, entry_id,
                        exc)
        else:
            if applied is not None:
                self.applied += 1
                log.info("fleet control: applied %s %s(%s)", type(applied).__name__,
                         "again, in stream order, after another instance's change to the same name " if own
                         else "from the fleet ", entry_id)

    def _as_step(self, change: Any) -> Any:
        """The plane change that takes this instance to the state ``change`` leaves (None: it is there)."""
        app = self.plane.app
        match change:
            case RegisterProvider(spec=spec) | UpdateProvider(spec=spec):
                current = app.catalog.get(spec.name)
                if current == spec:
                    return None
                if current is None and spec.name not in app.providers.value:
                    return RegisterProvider(spec)
                grace = change.grace if isinstance(change, UpdateProvider) else self.plane.default_grace
                return UpdateProvider(spec, grace)
            case UnregisterProvider(name=name):
                return change if name in app.catalog or name in app.providers.value else None
            case CreateGroup(spec=group) | UpdateGroup(spec=group):
                current = (app.selector.groups.value or {}).get(group.name)
                if current == group:
                    return None
                return CreateGroup(group) if current is None else UpdateGroup(group)
            case DeleteGroup(name=name):
                return change if name in (app.selector.groups.value or {}) else None
        return change

    async def _converge(self, change: Any) -> Any:
        """Apply the step to ``change``'s state, waiting while a change to the same name runs here (409)."""
        with trio.move_on_after(_CONVERGE_FOR):
            while True:
                step = self._as_step(change)
                if step is None:
                    return None
                try:
                    await self.plane.apply(step, origin=ORIGIN)
                    return step
                except GatewayError as exc:
                    if exc.code != "change_in_progress":
                        raise
                await trio.sleep(_RETRY / 5)
        step = self._as_step(change)
        if step is not None:
            await self.plane.apply(step, origin=ORIGIN)  # the last try: its error is the refusal
        return step
