"""The response cache: keys, TTL and LRU under a MockClock, and the hit/miss header end to end."""

import httpx
import pytest
import trio

from gatewaytest import fake_requests, provider_toml
from runestone.front.cache import ResponseCache
from runestone.runtime import Registry
from runestone.telemetry.sender import Telemetry

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "max_tokens": 20}


def test_key_covers_the_semantic_fields_only():
    cache = ResponseCache(60, 10)
    key = cache.key(BODY)
    reordered = {"max_tokens": 20, "temperature": 0.2, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert cache.key(reordered) == key
    assert cache.key({**BODY, "user": "ann", "metadata": {"a": "b"}, "stream": False}) == key
    for change in ({"temperature": 0.3}, {"max_tokens": 21}, {"model": "n"}, {"seed": 1}, {"stop": ["x"]},
                   {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "none"},
                   {"response_format": {"type": "json_object"}}, {"n": 2}, {"top_p": 0.5},
                   {"messages": [{"role": "user", "content": "hi!"}]}):
        assert cache.key({**BODY, **change}) != key, change
    assert cache.key(BODY, "tenant-a") != cache.key(BODY, "tenant-b") != key


def test_key_follows_the_alias_in_use():
    aliases = {"fast": "m"}
    cache = ResponseCache(60, 10, resolve_alias=lambda name: aliases.get(name, name))
    assert cache.key({**BODY, "model": "fast"}) == cache.key(BODY)
    aliases["fast"] = "other"
    assert cache.key({**BODY, "model": "fast"}) != cache.key(BODY)


async def test_entries_expire_after_the_ttl(autojump_clock):
    telemetry = Telemetry(Registry())
    cache = ResponseCache(10.0, 10, telemetry=telemetry)
    key = cache.key(BODY)
    assert cache.get(key) is None
    cache.put(key, b'{"answer": 1}', "p")
    await trio.sleep(9.9)
    entry = cache.get(key)
    assert entry is not None and entry.body == b'{"answer": 1}' and entry.provider == b"p"
    await trio.sleep(0.2)  # a hit does not extend the entry's life
    assert cache.get(key) is None
    assert len(cache) == 0
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.expirations) == (1, 2, 1)
    assert (telemetry.cache_hits, telemetry.cache_misses) == (1, 2)
    cache.put(key, b"again", "p")  # stored afresh after expiry
    assert cache.get(key).body == b"again"


async def test_least_recently_used_is_evicted_first(autojump_clock):
    cache = ResponseCache(60.0, 2)
    a, b, c = (cache.key({**BODY, "seed": i}) for i in range(3))
    cache.put(a, b"a")
    await trio.sleep(1)
    cache.put(b, b"b")
    await trio.sleep(1)
    assert cache.get(a).body == b"a"  # a is now the most recently used
    cache.put(c, b"c")
    assert len(cache) == 2
    assert cache.get(b) is None
    assert cache.get(a).body == b"a" and cache.get(c).body == b"c"
    assert cache.statistics().evictions == 1
    cache.put(a, b"a2")  # replacing an entry does not evict another
    assert len(cache) == 2 and cache.statistics().evictions == 1 and cache.get(a).body == b"a2"


def test_oversized_answers_are_not_stored():
    cache = ResponseCache(60.0, 2, max_entry_bytes=8)
    key = cache.key(BODY)
    assert not cache.put(key, b"x" * 9)
    assert cache.get(key) is None


@pytest.mark.parametrize(("ttl", "entries"), [(0, 1), (1, 0)])
def test_bounds_must_be_positive(ttl, entries):
    with pytest.raises(ValueError):
        ResponseCache(ttl, entries)


async def test_hit_and_miss_headers_end_to_end(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    gw = await gateway_factory(
        "[cache]\nenabled = true\nttl_ms = 60000\nmax_entries = 100\n"
        + provider_toml("up-openai", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk",
                        models=["gpt-4o-mini"]),
        env={"RUNESTONE_API_KEYS": "k1,k2"})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
    k1 = {"authorization": "Bearer k1"}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        first = await http.post("/v1/chat/completions", json=body, headers=k1)
        assert first.status_code == 200 and first.headers["x-runestone-cache"] == "miss"
        second = await http.post("/v1/chat/completions", json={**body, "user": "someone"}, headers=k1)
        assert second.status_code == 200 and second.headers["x-runestone-cache"] == "hit"
        assert second.content == first.content
        assert second.headers["x-runestone-provider"] == "up-openai" and second.headers["x-request-id"]
        assert await fake_requests(upstream.port, http=http) == 1

        # Opting out: no-cache asks upstream again (and refreshes the entry), no-store bypasses the cache.
        fresh = await http.post("/v1/chat/completions", json=body, headers={**k1, "cache-control": "no-cache"})
        assert fresh.headers["x-runestone-cache"] == "miss"
        bypass = await http.post("/v1/chat/completions", json=body, headers={**k1, "cache-control": "no-store"})
        assert bypass.status_code == 200 and "x-runestone-cache" not in bypass.headers
        assert await fake_requests(upstream.port, http=http) == 3

        # Another key does not see the first key's entries; a changed field is another entry; streams pass by.
        other = await http.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer k2"})
        assert other.headers["x-runestone-cache"] == "miss"
        warmer = await http.post("/v1/chat/completions", json={**body, "temperature": 1}, headers=k1)
        assert warmer.headers["x-runestone-cache"] == "miss"
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True}, headers=k1)
        assert streamed.status_code == 200 and "x-runestone-cache" not in streamed.headers
        assert await fake_requests(upstream.port, http=http) == 6

        # Errors are not cached.
        bad = {**body, "model": "no-such-model"}
        for _ in range(2):
            r = await http.post("/v1/chat/completions", json=bad, headers=k1)
            assert r.status_code == 404 and "x-runestone-cache" not in r.headers

        metrics = (await http.get("/metrics")).text
    assert 'runestone_cache_total{result="hit"} 1' in metrics
    assert 'runestone_cache_total{result="miss"} 3'  # no-cache and no-store do not look up in metrics


async def test_cache_is_off_by_default(gateway_factory, fake_only_toml):
    gw = await gateway_factory(fake_only_toml)
    assert gw.app.front.cache is None
    async with httpx.AsyncClient(base_url=gw.url) as http:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
        for _ in range(2):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and "x-runestone-cache" not in r.headers
