"""Response cache for non-streaming chat requests: exact match, TTL, LRU, off unless configured.

The key is a digest of the request's semantic fields (everything but those that only label or frame the
request: ``user``, ``metadata``, ``stream``, ``stream_options``, ``store``), dumped canonically with sorted
keys, plus the model the alias in use resolves to (so re-pointing an alias is not answered from the old
target) and the caller's key id (so one tenant cannot learn what another asked by timing a hit). Entries
live ``ttl`` seconds of ``trio.current_time()`` and at most ``max_entries`` are kept, least recently used
first out. A request with ``cache-control: no-cache`` is not answered from the cache but its answer is
stored; ``no-store`` bypasses the cache both ways. Hits and misses of lookups are counted on the
telemetry sender; every response the cache has seen carries ``x-runestone-cache: hit|miss``.

A hit is a request like any other for the caller's key: ``admit`` (the governance's ``admit_cached``)
counts it against the key's and team's rate limits and request counts, and a usage row records it with
provider ``cache`` and cost 0 (it cost nothing upstream). When ``admit`` says no (a limit is reached, the
model is no longer allowed), the request goes through the pipeline instead, which refuses or queues it
exactly as it would any request.

The cache is shared by the connection tasks of one trio thread; no method but ``lookup`` awaits, so each
is atomic. With ``[cluster] redis_url`` the cache has a second tier shared by the fleet (``shared``,
runestone/cluster/responses.py): a local miss asks Redis in one round trip (a hit found there is kept
locally for the rest of its TTL) and every stored answer is also written there in the background. While
Redis is away the cache is this instance's alone.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict

import attrs
import orjson
import trio

from ..http.server import Request, Response
from ..telemetry.events import RequestFinished
from ..telemetry.observe import note_finish_reasons, observing
from .deps import FrontDeps

__all__ = ["CacheStatistics", "ResponseCache", "install"]

_JSON = (b"content-type", b"application/json")
_HIT = (b"x-runestone-cache", b"hit")
_MISS = (b"x-runestone-cache", b"miss")
_NOT_SEMANTIC = frozenset({"user", "metadata", "stream", "stream_options", "store"})


@attrs.frozen
class CacheStatistics:
    """A view of the cache for state dumps and tests."""

    #: Entries held now (expired ones included until looked up or evicted).
    entries: int
    #: Lookups answered from the cache.
    hits: int
    #: Lookups that found nothing usable (absent or expired).
    misses: int
    #: Entries dropped to keep ``max_entries``.
    evictions: int
    #: Entries found expired on lookup and dropped.
    expirations: int


@attrs.define(slots=True)
class _Entry:
    expires: float
    body: bytes
    provider: bytes


class ResponseCache:
    """Exact-match cache of chat answers; see the module docstring for keys and bounds."""

    def __init__(self, ttl: float, max_entries: int, *, telemetry=None, resolve_alias=None,
                 max_entry_bytes: int = 1 << 20) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("the cache needs ttl > 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self._telemetry = telemetry
        self._resolve = resolve_alias
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        #: ``await admit(key_id, model) -> bool``: may this caller be answered from the cache now (and count it)?
        self.admit = None
        #: The fleet's tier (``fetch(key)``, ``push(key, body, provider, ttl)``), or None.
        self.shared = None

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, body: dict, key_id: str | None = None) -> bytes:
        """The cache key of a (validated) chat body for the caller ``key_id``."""
        fields = {k: v for k, v in body.items() if k not in _NOT_SEMANTIC}
        model = fields.get("model")
        if self._resolve is not None and isinstance(model, str):
            fields["model"] = self._resolve(model)
        h = hashlib.blake2b(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS), digest_size=20)
        if key_id is not None:
            h.update(b"\0" + key_id.encode())
        return h.digest()

    def get(self, key: bytes) -> _Entry | None:
        """The live entry for ``key`` (now most recently used), or None; counts a hit or a miss."""
        return self._counted(key, self._live(key))

    def _live(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= trio.current_time():
            del self._entries[key]
            self.expirations += 1
            entry = None
        return entry

    def _counted(self, key: bytes, entry: _Entry | None) -> _Entry | None:
        hit = entry is not None
        if hit:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        if self._telemetry is not None:
            self._telemetry.cache_result(hit)
        return entry

    def put(self, key: bytes, body: bytes, provider: str = "", *, ttl: float | None = None) -> bool:
        """Store an answer (for ``ttl`` seconds, default the cache's); False (not stored) when it is larger
        than ``max_entry_bytes``."""
        if len(body) > self.max_entry_bytes:
            return False
        entries = self._entries
        entries[key] = _Entry(trio.current_time() + (self.ttl if ttl is None else ttl), body, provider.encode())
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1
        return True

    def clear(self) -> None:
        self._entries.clear()

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(len(self._entries), self.hits, self.misses, self.evictions, self.expirations)

    # -- the chat route's two calls -----------------------------------------------------------------------

    async def lookup(self, request: Request, body: dict, key_id: str | None,
                     request_id: str | None = None) -> tuple[bytes | None, Response | None]:
        """Before routing: ``(key to store under or None, the cached response or None)``."""
        directive = request.header(b"cache-control")
        lookup = True
        if directive:
            directive = directive.lower()
            if b"no-store" in directive:
                return None, None
            lookup = b"no-cache" not in directive
        key = self.key(body, key_id)
        if lookup:
            entry = self._live(key)
            if entry is None and self.shared is not None:
                found = await self.shared.fetch(key)
                if found is not None and self.put(key, found[0], found[1], ttl=found[2]):
                    entry = self._entries[key]
            model = body.get("model")
            if entry is not None and self.admit is not None and not await self.admit(key_id, model):
                entry = None  # the pipeline serves it, and refuses or queues it as the caller's limits say
            entry = self._counted(key, entry)
            if entry is not None:
                if observing():  # the span of a hit has the finish reasons of the answer it repeats
                    note_finish_reasons(orjson.loads(entry.body).get("choices"))
                if self._telemetry is not None:
                    self._telemetry.emit(RequestFinished(
                        request_id or "req_" + os.urandom(12).hex(), key_id, "cache", model, "chat", False, "ok", 200,
                        None, 0.0, None, 0, 0, 0.0, 0, 0, "cache", time.time()))
                return key, Response(200, [_JSON, (b"x-runestone-provider", entry.provider), _HIT], entry.body)
        return key, None

    def store(self, key: bytes | None, response: Response, provider: str) -> Response:
        """After a fresh answer: keep it under ``key`` (if any) and mark the response a miss."""
        if key is not None:
            if self.put(key, response.body, provider) and self.shared is not None:
                self.shared.push(key, response.body, provider, self.ttl)
            response.headers.append(_MISS)
        return response


def install(front, deps: FrontDeps):
    """Give the front a cache when ``[cache] enabled``; otherwise the chat route runs without one. Returns
    the cache's shared tier (its writer task is a child of the tree) with ``[cluster] redis_url``, else None."""
    cfg = deps.config.cache
    if not cfg.enabled:
        return None
    front.cache = ResponseCache(cfg.ttl_ms / 1000, cfg.max_entries, telemetry=deps.telemetry,
                                resolve_alias=deps.gateway.resolve_alias)
    front.cache.admit = deps.governance.admit_cached
    # with [cluster] redis_url: its writer task runs in the tree (Application._children: fleet_cache)
    front.cache.shared = deps.shared_cache
    return deps.shared_cache
