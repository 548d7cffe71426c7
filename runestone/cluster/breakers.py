"""Circuit breakers fleet-wide: a breaker that opens on one instance opens on all of them.

:class:`FleetBreakers` sits beside the ``CircuitBreakerManager`` and changes nothing in how a breaker
decides. It sees the manager's own transitions (it wraps the ``emit`` the manager is given) and shares the
ones others must follow: *open until T* (T in wall-clock time, so instances on several machines agree) and
*closed*. Each goes out in one pipelined round trip, ``HSET``/``HDEL`` in the hash ``runestone:breakers``
(the fleet's current picture, read back by an instance that starts or reconnects) and ``PUBLISH`` on the
channel of the same name. Every other instance's subscription feeds it to its manager as one cast,
``FleetTransition``, which the breaker follows (``CircuitBreaker.follow``: transitions with reason
``"fleet"``, which are never published again). Pub/sub carries a message in milliseconds, so a breaker open
on one instance is open on the others well within a second.

Half-open probes are budgeted fleet-wide: before granting a probe slot the manager asks
:meth:`FleetBreakers.probe_gate`, an atomic script on a counter per provider
(``runestone:breaker-probes:<provider>``, at most ``half_open_limit`` at once, expiring after
``probe_timeout`` should an instance die holding one); the slot is given back when the probe's outcome
arrives. One round trip, and only for a request that would probe: the hot path of a closed breaker never
touches Redis.

While Redis is down, breakers are local: transitions are kept (the newest per provider) and published when
Redis is back, the probe gate answers yes (this instance's own half-open limit applies), and on every
reconnect the hash is read back, so what the others decided meanwhile is followed within a second or so of
Redis coming back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import trio

from runestone.cluster.redis import RedisClient, RedisError, Script
from runestone.resilience.breaker import CLOSED, OPEN
from runestone.resilience.breaker_manager import FleetTransition
from runestone.telemetry.events import BreakerTransition

__all__ = ["FleetBreakers", "CHANNEL", "STATE_KEY", "instance_id"]

log = logging.getLogger("runestone.cluster")

CHANNEL = "runestone:breakers"
STATE_KEY = "runestone:breakers"
_PROBE_KEY = "runestone:breaker-probes:"
#: Seconds between attempts to catch up (publish what is kept, read the fleet's picture) while that fails.
_RETRY = 0.5

_TAKE_PROBE = Script("""
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end
return 1
""")
_GIVE_PROBE = Script("""
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 0
""")


def instance_id() -> str:
    """This process's name in the fleet: host, pid and a random part (a restarted pid is a new instance)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class FleetBreakers:
    """Shares breaker transitions through ``redis``; feeds remote ones to the manager through ``manager``
    (anything with ``try_cast``, e.g. a ``NamedRef``). ``views`` is the manager's published cell, read for
    the retry time of a breaker that opened."""

    def __init__(self, redis: RedisClient, views: Any, manager: Any, *, instance: str | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.views = views
        self.manager = manager
        self.instance = instance or instance_id()
        self.wall = wall
        #: provider -> the newest local transition not yet published (kept while Redis is down).
        self._unsent: dict[str, dict] = {}
        #: provider -> fleet-wide probe slots to give back.
        self._gives: dict[str, int] = {}
        self._wake = trio.Event()
        self._catch_up = True  # read the fleet's picture at the first connection
        self.published = 0
        self.followed = 0

    # -- hooks the manager is built with ---------------------------------------------------------------

    def observe(self, emit: Callable[[object], None]) -> Callable[[object], None]:
        """``emit`` that also shares the manager's own breaker transitions."""

        def emit_and_share(event: object) -> None:
            emit(event)
            if isinstance(event, BreakerTransition) and event.reason != "fleet":
                self._local(event)

        return emit_and_share

    async def probe_gate(self, provider: str, limit: int, ttl: float) -> bool:
        """May this instance send a half-open probe to ``provider``? At most ``limit`` run fleet-wide."""
        try:
            return await _TAKE_PROBE(self.redis, [_PROBE_KEY + provider], [limit, max(1, int(ttl * 1000))]) == 1
        except RedisError:
            return True  # Redis away: this instance's own half-open limit is the only one

    def probe_done(self, provider: str) -> None:
        """A probe's outcome arrived: give its fleet-wide slot back (in the background; while Redis is away
        the slot is not given back but expires)."""
        self._gives[provider] = self._gives.get(provider, 0) + 1
        self._wake.set()

    # -- the task -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(self.redis.listen, [CHANNEL], self._on_message, on_connect=self._on_connect))
            task_status.started(self)
            await self._publisher()

    def snapshot(self) -> dict:
        return {"instance": self.instance, "unsent": len(self._unsent), "published": self.published,
                "followed": self.followed, "redis": self.redis.state}

    def _local(self, event: BreakerTransition) -> None:
        if event.to_state == OPEN:
            view = (self.views.value or {}).get(event.provider)
            retry_at = getattr(view, "retry_at", None)
            if retry_at is None:
                return
            until = self.wall() + max(0.0, retry_at - trio.current_time())
            message = {"i": self.instance, "p": event.provider, "s": OPEN, "u": until}
        elif event.to_state == CLOSED:
            message = {"i": self.instance, "p": event.provider, "s": CLOSED}
        else:
            return  # half open is each instance's own step
        self._unsent[event.provider] = message
        self._wake.set()

    def _on_connect(self) -> None:
        self._catch_up = True
        self._wake.set()

    def _on_message(self, _channel: bytes, data: bytes) -> None:
        try:
            message = orjson.loads(data)
            if message["i"] == self.instance:
                return
            self._follow(message)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("fleet breakers: ignoring a malformed message (%s)", exc)

    def _follow(self, message: dict) -> None:
        state = message["s"]
        retry_in = None
        if state == OPEN:
            retry_in = float(message["u"]) - self.wall()
            if retry_in <= 0:
                return  # its open period is over: this instance probes on its own
        elif state != CLOSED:
            return
        if self.manager.try_cast(FleetTransition(str(message["p"]), state, retry_in)):
            self.followed += 1

    async def _publisher(self) -> None:
        while True:
            if not self._unsent and not self._gives and not self._catch_up:
                self._wake = trio.Event()
                await self._wake.wait()
            try:
                if self._catch_up:
                    await self._read_fleet()
                await self._publish_unsent()
            except RedisError:
                # kept for later; the next connection's on_connect (or this retry) catches up
                await trio.sleep(_RETRY)

    async def _publish_unsent(self) -> None:
        while self._gives:
            provider, count = self._gives.popitem()  # dropped if this fails: the slots expire anyway
            await self.redis.pipeline([_GIVE_PROBE.call([_PROBE_KEY + provider]) for _ in range(count)])
        while self._unsent:
            provider, message = next(iter(self._unsent.items()))
            data = orjson.dumps(message)
            store = ("HSET", STATE_KEY, provider, data) if message["s"] == OPEN else ("HDEL", STATE_KEY, provider)
            for reply in await self.redis.pipeline([store, ("PUBLISH", CHANNEL, data)]):
                if isinstance(reply, RedisError):
                    raise reply
            self.published += 1
            if self._unsent.get(provider) is message:  # a newer one may have replaced it meanwhile
                del self._unsent[provider]

    async def _read_fleet(self) -> None:
        entries = await self.redis.execute("HGETALL", STATE_KEY)
        self._catch_up = False
        for i in range(0, len(entries), 2):
            try:
                message = orjson.loads(entries[i + 1])
            except orjson.JSONDecodeError:
                continue
            if message.get("i") != self.instance and message.get("p") not in self._unsent:
                try:
                    self._follow(message)
                except (KeyError, TypeError, ValueError):
                    continue
