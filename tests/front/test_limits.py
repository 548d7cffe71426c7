"""Per-key limits: token buckets, concurrency, tokens per minute, the fair queue — on MockClock — and the
429 a client sees over HTTP."""

import httpx
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml
from runestone.config import LimitsConfig
from runestone.front.limits import KeyLimiter
from runestone.routing.executor import GatewayError


def limiter(**kw) -> KeyLimiter:
    return KeyLimiter(LimitsConfig(**kw))


async def test_requests_per_minute_bucket_refills_continuously(autojump_clock):
    lim = limiter(requests_per_minute=3)
    for _ in range(3):
        (await lim.admit("a")).release()
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    e = err.value
    assert e.status == 429 and e.type == "rate_limit_error" and "3 requests per minute" in e.message
    headers = dict(e.headers)
    assert headers[b"retry-after"] == b"20"  # one request comes back every 60/3 s
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    (await lim.admit("b")).release()  # another key is unaffected
    await trio.sleep(20)
    lease = await lim.admit("a")
    assert dict(lease.headers)[b"x-ratelimit-remaining-requests"] == b"0"


async def test_limit_headers_follow_the_buckets_and_a_refusal_changes_no_other_answer(autojump_clock):
    # The headers are made once per distinct value (kept with the bucket): each answer still shows its own.
    lim = limiter(requests_per_minute=3, tokens_per_minute=100)

    def shown(lease) -> tuple:
        h = dict(lease.headers)
        return (h[b"x-ratelimit-remaining-requests"], h[b"x-ratelimit-reset-requests"],
                h[b"x-ratelimit-remaining-tokens"], h[b"x-ratelimit-reset-tokens"])

    first = await lim.admit("a")
    assert shown(first) == (b"2", b"20s", b"100", b"1ms")
    first.settle(30, 0, 0.0)  # 30 of 100 tokens: full again in 18 s
    first.release()
    second = await lim.admit("a")
    assert shown(second) == (b"1", b"40s", b"70", b"18s")
    await trio.sleep(0.7)  # the tokens' reset still shows 18 s, what remains is one more
    third = await lim.admit("a")
    assert shown(third) == (b"0", b"1m0s", b"71", b"18s")
    assert shown(first) == (b"2", b"20s", b"100", b"1ms")  # what an answer showed stays as it was
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    assert dict(err.value.headers)[b"retry-after"] == b"20"
    await trio.sleep(20)
    fourth = await lim.admit("a")
    assert shown(fourth) == (b"0", b"1m0s", b"100", b"1ms")
    for lease in (second, third, fourth):
        assert b"retry-after" not in dict(lease.headers)
        lease.release()


async def test_requests_per_hour(autojump_clock):
    lim = limiter(requests_per_hour=2)
    (await lim.admit("a")).release()
    (await lim.admit("a")).release()
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    assert dict(err.value.headers)[b"retry-after"] == b"1800"


async def test_concurrency_limit_counts_leases_until_released(autojump_clock):
    lim = limiter(max_concurrent_per_tenant=2)
    a1, a2 = await lim.admit("a"), await lim.admit("a")
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    assert "2 requests in flight" in err.value.message
    a1.release()
    a1.release()  # idempotent: must not free a second slot
    a3 = await lim.admit("a")
    with pytest.raises(GatewayError):
        await lim.admit("a")
    a2.release()
    a3.release()


async def test_tokens_per_minute_are_paid_after_the_fact(autojump_clock):
    lim = limiter(tokens_per_minute=600)
    (await lim.admit("a")).release()
    lim.record_tokens("a", 900)  # overdraws by 300 tokens: 30 s at 10 tokens/s to pay back
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    assert "tokens per minute" in err.value.message
    assert dict(err.value.headers)[b"retry-after"] == b"30"
    await trio.sleep(30.1)
    (await lim.admit("a")).release()


async def test_queue_waits_in_fifo_order_with_a_deadline(autojump_clock):
    lim = limiter(max_concurrent_per_tenant=1, queue=True, queue_size=2, queue_timeout_ms=5000)
    first = await lim.admit("a")
    order = []

    async def waiter(name, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        lease = await lim.admit("a")
        order.append((name, trio.current_time()))
        await trio.sleep(1)
        lease.release()

    async with trio.open_nursery() as n:
        t0 = trio.current_time()
        await n.start(waiter, "w1")
        await n.start(waiter, "w2")
        with pytest.raises(GatewayError) as full:  # the queue holds 2
            await lim.admit("a")
        assert "queue is full" in full.value.message
        await trio.sleep(2)
        first.release()
    assert [name for name, _ in order] == ["w1", "w2"]
    assert order[0][1] - t0 == pytest.approx(2)
    assert order[1][1] - t0 == pytest.approx(3)


async def test_queue_deadline_gives_429(autojump_clock):
    lim = limiter(max_concurrent_per_tenant=1, queue=True, queue_timeout_ms=2000)
    held = await lim.admit("a")
    t0 = trio.current_time()
    with pytest.raises(GatewayError) as err:
        await lim.admit("a")
    assert trio.current_time() - t0 == pytest.approx(2)
    assert "waited 2s" in err.value.message
    held.release()
    (await lim.admit("a")).release()  # the abandoned waiter left no trace in the queue


async def test_queue_waits_for_the_bucket_to_refill(autojump_clock):
    lim = limiter(requests_per_minute=1, queue=True, queue_timeout_ms=120_000)
    (await lim.admit("a")).release()
    t0 = trio.current_time()
    (await lim.admit("a")).release()
    assert trio.current_time() - t0 == pytest.approx(60)


async def test_http_429_with_openai_headers(gateway_factory):
    gw = await gateway_factory('[auth]\napi_keys = ["k1", "k2"]\n[limits]\nrequests_per_minute = 2\n'
                               + provider_toml("fake", "fake", models=["fake-model"]))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        h1 = {"authorization": "Bearer k1"}
        ok = await http.post("/v1/chat/completions", json=body, headers=h1)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await http.post("/v1/chat/completions", json=body, headers=h1)).status_code == 200
        refused = await http.post("/v1/chat/completions", json=body, headers=h1)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1 and "x-request-id" in refused.headers
        other = await http.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer k2"})
        assert other.status_code == 200  # limits are per key
        assert (await http.get("/v1/models", headers=h1)).status_code == 200  # listing models is not limited


async def test_concurrent_stream_limit_releases_when_the_stream_ends(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=3)  # the stream waits at the gate until the second is refused
    gw = await gateway_factory('[auth]\napi_keys = ["k1"]\n[limits]\nmax_concurrent_per_tenant = 1\n'
                               + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                               api_key="sk-up", models=["fake-model"]))
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    h = {"authorization": "Bearer k1"}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=h) as stream:
            assert stream.status_code == 200
            second = await http.post("/v1/chat/completions", json=body, headers=h)
            assert second.status_code == 429 and "1 requests in flight" in second.json()["error"]["message"]
            gate.open()
            assert (await stream.aread()).rstrip().endswith(b"data: [DONE]")
        third = await http.post("/v1/chat/completions", json=body, headers=h)
        assert third.status_code == 200
