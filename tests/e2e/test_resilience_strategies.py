"""Each failover strategy's choice, observed through the ``x-runestone-provider`` header of real requests.

The members are built-in ``fake`` providers so that nothing but the gateway's own choice decides who
answers; priorities and weights are set so that each strategy picks differently from the others.
"""

from __future__ import annotations

import collections

import httpx
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml

ASK = [{"role": "user", "content": "hello"}]


def _group(name: str, strategy: str, providers=("p1", "p2", "p3")) -> str:
    members = ", ".join(f'"{p}"' for p in providers)
    return f'[[failover.groups]]\nname = "{name}"\nproviders = [{members}]\nstrategy = "{strategy}"\n'


def _fake(name: str, **config) -> str:
    return provider_toml(name, "fake", models=["fake-model"], **config)


async def _who(http: httpx.AsyncClient, model: str, stream: bool = False) -> str:
    r = await http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "stream": stream})
    assert r.status_code == 200, r.text
    return r.headers["x-runestone-provider"]


async def test_round_robin_priority_load_balanced_and_cost(gateway_factory):
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        + _group("rr", "round_robin") + _group("prio", "priority") + _group("lb", "load_balanced")
        + _group("cheap", "cost")
        # Priority alone would pick p2; weight alone p3; price alone p1.
        + '[pricing."p1/fake-model"]\ninput_per_mtok = 0.1\noutput_per_mtok = 0.2\n'
        + '[pricing."p2/fake-model"]\ninput_per_mtok = 10.0\noutput_per_mtok = 30.0\n'
        + '[pricing."p3/fake-model"]\ninput_per_mtok = 2.0\noutput_per_mtok = 6.0\n'
        + _fake("p1", priority=3, weight=1.0)
        + _fake("p2", priority=1, weight=1.0)
        + _fake("p3", priority=2, weight=1000.0)
    )
    async with httpx.AsyncClient(base_url=gw.url) as http:
        # round_robin: the listed order, one step further for each request, streamed or not.
        assert [await _who(http, "rr", stream=i % 2 == 1) for i in range(7)] == \
            ["p1", "p2", "p3", "p1", "p2", "p3", "p1"]
        # priority: the lowest number, every time.
        assert {await _who(http, "prio") for _ in range(5)} == {"p2"}
        # load_balanced: by weight; p3 carries 1000/1002 of it.
        counts = collections.Counter([await _who(http, "lb") for _ in range(40)])
        assert counts["p3"] >= 36, counts
        # cost: the cheapest estimate for this request at each member's own model.
        assert {await _who(http, "cheap", stream=s) for s in (False, True)} == {"p1"}


async def test_least_loaded_goes_to_the_provider_with_fewest_requests_in_flight(gateway_factory):
    # Streams stay open (the second chunk is a minute away) until their client leaves.
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n" + _group("least", "least_loaded")
        + "".join(_fake(p, chunk_delay_ms=60_000) for p in ("p1", "p2", "p3"))
    )
    body = orjson.dumps({"model": "least", "stream": True, "messages": ASK})
    held: dict[str, trio.SocketStream] = {}

    async def hold() -> str:
        sock = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await sock.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body))
        head = b""
        with trio.fail_after(10):
            while b"data: " not in head:
                head += await sock.receive_some(65536)
        provider = head.split(b"x-runestone-provider: ")[1].split(b"\r\n")[0].decode()
        held[provider] = sock
        return provider

    # With nothing in flight each gets one: the tie keeps the round-robin order.
    assert [await hold() for _ in range(3)] == ["p1", "p2", "p3"]
    in_flight = gw.app.telemetry.in_flight
    assert [in_flight[p] for p in ("p1", "p2", "p3")] == [1, 1, 1]
    # p2's client leaves: p2 is now the least loaded, though round robin would say p1.
    await held.pop("p2").aclose()
    with trio.fail_after(10):
        while in_flight["p2"]:
            await trio.sleep(0.001)
    assert await hold() == "p2"
    # Now p1 and p3 end: the next two go to them, in rotation order, before anyone gets a second.
    await held.pop("p1").aclose()
    await held.pop("p3").aclose()
    with trio.fail_after(10):
        while in_flight["p1"] or in_flight["p3"]:
            await trio.sleep(0.001)
    assert sorted([await hold(), await hold()]) == ["p1", "p3"]
    assert [in_flight[p] for p in ("p1", "p2", "p3")] == [1, 1, 1]
    for sock in held.values():
        await sock.aclose()


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_fastest_first_follows_the_measured_time_to_first_token(clock, gateway_factory):
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n" + _group("quick", "fastest_first", ("slow", "fast"))
        + _fake("slow", priority=1, ttfb_ms=800)
        + _fake("fast", priority=2, ttfb_ms=50)
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        # Nothing measured yet: priority decides.
        assert await _who(http, "quick") == "slow"
        assert await _who(http, "fast:fake-model", stream=True) == "fast"
        # Health (with the TTFT averages) is published on the telemetry tick.
        with trio.fail_after(5):
            while len(getattr(gw.app.health.value, "ttft_ewma_ms", {})) < 2:
                await trio.sleep(0.1)
        ttft = gw.app.health.value.ttft_ewma_ms
        assert ttft["slow"] >= 800 and 50 <= ttft["fast"] < 100
        assert [await _who(http, "quick", stream=s) for s in (False, True, False)] == ["fast"] * 3
