"""Stored responses and the response cache in Redis, so any instance of a fleet finds them.

:class:`SharedResponseStore` is the Responses API's store (``previous_response_id``, ``GET``/``DELETE
/v1/responses/{id}``) with the same interface as the SQLite ``ResponseStore`` it wraps. A response is one
Redis string, ``runestone:response:<owner>:<id>`` (owner-scoped, so another key's id is simply not found),
holding the response and its input items, expiring after ``retention_days`` (Redis's TTL is the retention;
``max_stored`` bounds the local store only). A put is one ``SET`` and a read one ``GET``.

:class:`SharedCacheTier` is the response cache's second tier: on a local miss the chat route's lookup asks
Redis (``GET`` and ``PTTL`` in one round trip; a hit is kept locally for the rest of its TTL), and every
answer stored locally is also written to Redis by a background task (batched ``SET ... PX``: never on the
request's path).

While Redis is down or slow (calls refused at once, or a deadline of 0.25 s), both fall back to this
instance alone: a response is stored in the local SQLite store and found there by this instance (only:
others see it once it is stored again), reads that cannot reach Redis look locally, the cache is local.
Deleting a response while Redis is unreachable deletes the local copy; one held only in Redis cannot be
deleted then, and the route says so with a 503 (retry shortly). Nothing is copied back when Redis returns:
what was stored meanwhile stays on its instance until it expires.
"""

from __future__ import annotations

import collections
import logging

import orjson
import trio

from runestone.cluster.redis import RedisClient, RedisError, RedisReplyError, RedisUnavailable
from runestone.front.response_store import ResponseStore, StoredResponse
from runestone.routing.executor import GatewayError

__all__ = ["SharedCacheTier", "SharedResponseStore"]

log = logging.getLogger("runestone.cluster")

_RESPONSE = "runestone:response:"
_CACHE = "runestone:cache:"
#: Cache writes waiting for the background task; past this the oldest are dropped (they are only a cache).
_MAX_QUEUED = 1024


class SharedResponseStore:
    """Stored responses in Redis, with ``local`` (a :class:`ResponseStore`) while Redis is away."""

    def __init__(self, redis: RedisClient, local: ResponseStore, *, retention_days: int = 30) -> None:
        self.redis = redis
        self.local = local
        self.retention_ms = retention_days * 86_400_000
        self.stored_locally = 0

    @staticmethod
    def _key(owner: str | None, response_id: str) -> str:
        return f"{_RESPONSE}{owner or ''}:{response_id}"

    async def put(self, owner: str | None, response: dict, input_items: list) -> None:
        data = orjson.dumps({"response": response, "input_items": input_items})
        command = ["SET", self._key(owner, response["id"]), data]
        if self.retention_ms:
            command += ["PX", self.retention_ms]
        try:
            await self.redis.execute(*command)
            return
        except RedisError as exc:
            log.warning("response %s stored on this instance only: %s", response.get("id"), exc)
        self.stored_locally += 1
        await self.local.put(owner, response, input_items)

    async def get(self, owner: str | None, response_id: str) -> StoredResponse | None:
        try:
            data = await self.redis.execute("GET", self._key(owner, response_id))
        except RedisError:
            data = None
        if data is not None:
            try:
                item = orjson.loads(data)
                return StoredResponse(item["response"], item["input_items"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("stored response %s in Redis is unreadable; ignoring it", response_id)
        return await self.local.get(owner, response_id)  # stored here while Redis was away, or not at all

    async def delete(self, owner: str | None, response_id: str) -> bool:
        local = await self.local.delete(owner, response_id)
        try:
            removed = await self.redis.execute("DEL", self._key(owner, response_id))
        except RedisUnavailable:
            if local:
                return True
            raise GatewayError(503, "stored responses are shared through Redis, which cannot be reached now; "
                               "retry shortly", "server_error", code="store_unavailable") from None
        except RedisReplyError:
            removed = 0
        return bool(removed) or local

    async def count(self) -> int:
        """Responses held on this instance (those in Redis are counted by Redis)."""
        return await self.local.count()

    async def close(self) -> None:
        await self.local.close()

    def snapshot(self) -> dict:
        return {"stored_locally": self.stored_locally}


class SharedCacheTier:
    """The response cache's Redis tier; :meth:`run` is the task that writes stored answers."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._queue: collections.deque[tuple[str, bytes, int]] = collections.deque(maxlen=_MAX_QUEUED)
        self._wake = trio.Event()
        self.hits = 0
        self.written = 0
        self.dropped = 0

    @staticmethod
    def _key(key: bytes) -> str:
        return _CACHE + key.hex()

    async def fetch(self, key: bytes) -> tuple[bytes, str, float] | None:
        """``(body, provider, seconds left)`` of an answer another instance stored, or None (absent, or
        Redis away)."""
        try:
            data, ttl_ms = await self.redis.pipeline([("GET", self._key(key)), ("PTTL", self._key(key))])
        except RedisError:
            return None
        if not isinstance(data, bytes) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            return None
        provider, sep, body = data.partition(b"\n")
        if not sep:
            return None
        self.hits += 1
        return body, provider.decode(errors="replace"), ttl_ms / 1000

    def push(self, key: bytes, body: bytes, provider: str, ttl: float) -> None:
        """Write an answer to Redis in the background (dropped while Redis is away)."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append((self._key(key), provider.encode() + b"\n" + body, max(1, int(ttl * 1000))))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = list(self._queue)
            self._queue.clear()
            try:
                await self.redis.pipeline([("SET", k, v, "PX", ttl) for k, v, ttl in batch])
                self.written += len(batch)
            except RedisError:
                self.dropped += len(batch)  # a cache: what cannot be shared now is simply not shared

    def snapshot(self) -> dict:
        return {"hits": self.hits, "written": self.written, "dropped": self.dropped, "queued": len(self._queue)}
