"""Retries and failover through the gateway, with faults injected by the fake upstream and time on a MockClock.

A primary that answers 500 or 429, hangs past its ``timeout_ms`` or drops the connection before answering
is failed over invisibly to a healthy secondary, through a failover group used as the model name and
through plain model routing, streamed or not. Coming back to the same provider waits at least what its
``Retry-After`` asked. The request has ONE deadline however many providers hang. The legacy provider
names ``openai``/``anthropic`` resolve to ``openai-default``/``anthropic-default``.
"""

from __future__ import annotations

import functools

import httpx
import openai
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml
from runestone.http.server import serve_http
from runestone.providers.fake_server import FakeKnobs, make_fake_handler

MODEL = "gpt-4o-mini"
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def _openai(name: str, port: int, **config) -> str:
    return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", models=[MODEL],
                         **config)


async def _recording_fake(nursery, **knobs):
    """A fake upstream whose chat requests are timestamped on the trio clock as they arrive."""
    fake = make_fake_handler(FakeKnobs(**knobs))
    arrivals: list[float] = []

    async def handler(request):
        if request.path == "/v1/chat/completions":
            arrivals.append(trio.current_time())
        return await fake(request)

    server = await nursery.start(functools.partial(serve_http, handler, "127.0.0.1", 0))
    return server, fake, arrivals


@pytest.mark.parametrize("stream", [False, True])
async def test_a_retry_waits_at_least_the_upstreams_retry_after(clock, gateway_factory, nursery, stream):
    server, fake, arrivals = await _recording_fake(nursery, fault_status=429, retry_after=2)
    gw = await gateway_factory("[telemetry]\nusage_ledger = false\n" + _openai("solo", server.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        # Refuse the first attempt only: the fake's knobs are read per request.
        async def heal():
            while not arrivals:
                await trio.testing.wait_all_tasks_blocked(0.001)
            fake.knobs.fault_status = 0

        nursery.start_soon(heal)
        backoffs = _record_backoffs(gw.app.gateway)
        r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK, "stream": stream})
        assert r.status_code == 200, r.text
        assert r.headers["x-runestone-provider"] == "solo"
        assert len(arrivals) == 2
        # One backoff, given the upstream's Retry-After (its jittered own part is at most base_delay, 0.1 s),
        # and the retry did wait it. (No upper bound on the pause: under load, MockClock's autojump may jump
        # to any other timer while real socket I/O is slow.)
        assert [retry_after for _, retry_after in backoffs] == [2]
        assert arrivals[1] - arrivals[0] >= 2.0


async def test_a_retry_after_beyond_the_deadline_is_answered_at_once(clock, gateway_factory, nursery):
    server, fake, arrivals = await _recording_fake(nursery, fault_status=429, retry_after=30)
    gw = await gateway_factory("[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 10000\n"
                               "[telemetry]\nusage_ledger = false\n" + _openai("solo", server.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        started = trio.current_time()
        r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK})
        elapsed = trio.current_time() - started
    # Waiting 30 s inside a 10 s deadline is pointless: the client gets the 429 and the pause to honour.
    assert r.status_code == 429
    assert r.headers["retry-after"] == "30"
    assert r.json()["error"]["type"] == "requests"  # the upstream's own words, unchanged
    assert len(arrivals) == 1
    assert elapsed < 0.5


FAULTS = {
    "500": dict(fault_status=500),
    "429": dict(fault_status=429),
    "hang": dict(hang=True),
    "drop_before_response": dict(drop_before_response=True),
}


def _record_backoffs(gateway) -> list:
    """Every backoff the gateway's retry policy computes, as (failures, retry_after)."""
    calls: list = []
    policy = gateway.retry

    class Recording:
        def __getattr__(self, name):
            return getattr(policy, name)

        def delay(self, failures, retry_after=None):
            calls.append((failures, retry_after))
            return policy.delay(failures, retry_after)

    gateway.retry = Recording()
    return calls


@pytest.mark.parametrize("routing", ["group", "plain"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_failover_to_a_healthy_provider(clock, gateway_factory, fake_factory, fault, routing):
    bad, bad_knobs = await fake_factory(**FAULTS[fault])
    good, _ = await fake_factory()
    group = ('[[failover.groups]]\nname = "chat"\nproviders = ["primary", "secondary"]\nstrategy = "priority"\n'
             if routing == "group" else "")
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        + group
        + _openai("primary", bad.port, priority=1, timeout_ms=500)
        + _openai("secondary", good.port, priority=2)
    )
    model = "chat" if routing == "group" else MODEL
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    backoffs = _record_backoffs(gw.app.gateway)
    for stream in (False, True):
        started = trio.current_time()
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=ASK, stream=stream)
        elapsed = trio.current_time() - started
        assert raw.headers["x-runestone-provider"] == "secondary"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            text = raw.parse().choices[0].message.content
        assert text.startswith("Echo: hello")
        if fault == "hang":
            assert elapsed >= 0.5  # the primary's own timeout, then the secondary
    # Failover is immediate: no backoff is computed before a provider not yet tried. (Counted, not timed:
    # under load, MockClock's autojump may jump to any timer while real socket I/O is slow.)
    assert backoffs == []
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"http://127.0.0.1:{bad.port}/_fake/stats")).json()
    assert sum(stats["faults"].values()) >= 2
    assert stats["streams"]["started"] == 0


async def test_every_provider_failing_answers_once_with_the_last_reason(clock, gateway_factory, fake_factory):
    first, _ = await fake_factory(fault_status=500)
    second, _ = await fake_factory(fault_status=502)
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        '[[failover.groups]]\nname = "chat"\nproviders = ["primary", "secondary"]\nmax_attempts = 3\n'
        + _openai("primary", first.port, priority=1) + _openai("secondary", second.port, priority=2)
    )
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        for stream in (False, True):
            r = await http.post("/chat/completions", json={"model": "chat", "messages": ASK, "stream": stream})
            assert r.status_code == 502
            err = r.json()["error"]
            # primary, secondary, then primary again after its backoff: the group's three attempts.
            assert err["message"].startswith("provider 'primary': upstream returned 500: injected fault")
            assert err["message"].endswith("(after 3 attempts)")
            assert err["code"] == "upstream_500" and err["type"] == "api_error"
            assert r.headers["x-runestone-provider"] == "primary"
    async with httpx.AsyncClient() as http:
        counts = [(await http.get(f"http://127.0.0.1:{s.port}/_fake/stats")).json()["faults"]
                  for s in (first, second)]
    assert counts == [{"500": 4}, {"502": 2}]


async def test_one_deadline_for_the_whole_request(clock, gateway_factory, fake_factory):
    hangs = [await fake_factory(hang=True) for _ in range(3)]
    gw = await gateway_factory(
        '[server]\nhost = "127.0.0.1"\nport = 0\nrequest_timeout_ms = 1000\n'
        "[telemetry]\nusage_ledger = false\n"
        + "".join(_openai(f"h{i}", s.port, priority=i, timeout_ms=400) for i, (s, _) in enumerate(hangs))
        + _openai("slowest", hangs[0][0].port, priority=9)  # per-attempt timeout 60 s: only the deadline stops it
    )
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        for stream in (False, True):
            started = trio.current_time()
            r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK, "stream": stream})
            elapsed = trio.current_time() - started
            assert r.status_code == 504, r.text
            err = r.json()["error"]
            assert err["type"] == "timeout_error" and err["code"] == "request_timeout"
            assert "1s" in err["message"]
            assert r.headers["x-runestone-provider"] == "h2"  # the last one tried
            # 0.4 + 0.4 + the 0.2 left: one deadline, not 3 x 0.4 s nor 60 s for the fourth provider.
            assert 1.0 <= elapsed < 1.05
        for stream in (False, True):
            started = trio.current_time()
            r = await http.post("/chat/completions", json={"model": f"slowest:{MODEL}", "messages": ASK,
                                                           "stream": stream})
            assert r.status_code == 504
            assert 1.0 <= trio.current_time() - started < 1.05
    assert gw.app.inflight.requests == {}


async def test_legacy_provider_names_resolve_to_the_default_providers(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    base = f"http://127.0.0.1:{upstream.port}"
    gw = await gateway_factory(
        provider_toml("openai-default", "openai", base_url=base + "/v1", api_key="k", models=[MODEL], priority=2)
        + provider_toml("anthropic-default", "anthropic", base_url=base, api_key="k",
                        models=["claude-haiku-4-5", MODEL], priority=1)
    )
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    for model, provider in (("openai:gpt-4o-mini", "openai-default"),
                            ("anthropic:claude-haiku-4-5", "anthropic-default"),
                            ("openai-default:gpt-4o-mini", "openai-default")):
        for stream in (False, True):
            raw = await client.chat.completions.with_raw_response.create(model=model, messages=ASK, stream=stream)
            assert raw.headers["x-runestone-provider"] == provider
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK)
    assert raw.headers["x-runestone-provider"] == "anthropic-default"
    # A client's routing wishes may use the legacy names too.
    for wish in ({"exclude": ["anthropic"]}, {"prefer": ["openai"]}):
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK,
                                                                     extra_body={"runestone": wish})
        assert raw.headers["x-runestone-provider"] == "openai-default", wish
