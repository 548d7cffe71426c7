"""A provider failing after the first byte reached the client: an honest end, never a silent truncation.

The stream is already committed, so no failover can splice another answer into it: the client gets the
chunks that were relayed, then one SSE error event in OpenAI's shape (which the openai SDK raises as
``APIError``), and no ``[DONE]``. The healthy provider next in the group is never asked.
"""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _gateway(gateway_factory, fake_factory, ptype: str, fault: str):
    # Paced chunks, so the fault comes after the gateway relayed the first ones.
    bad, _ = await fake_factory(chunk_delay_ms=10, chunks=8, **{fault: True})
    good, _ = await fake_factory()
    model = MODELS[ptype]

    def up(name, port, priority):
        base = f"http://127.0.0.1:{port}" + ("/v1" if ptype == "openai" else "")
        return provider_toml(name, ptype, base_url=base, api_key="k", models=[model], priority=priority)

    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        '[[failover.groups]]\nname = "chat"\nproviders = ["primary", "secondary"]\nstrategy = "priority"\n'
        + up("primary", bad.port, 1) + up("secondary", good.port, 2)
    )
    return gw, bad, good


async def _requests(port: int) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/_fake/stats")).json()["requests"]


@pytest.mark.parametrize("fault", ["drop_mid_stream", "stream_error", "malformed_sse"])
@pytest.mark.parametrize("ptype", ["openai", "anthropic"])
async def test_failure_after_the_first_byte_ends_the_stream_with_an_error_event(clock, gateway_factory,
                                                                                 fake_factory, ptype, fault):
    gw, bad, good = await _gateway(gateway_factory, fake_factory, ptype, fault)
    ask = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "tell me more"}]}

    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json=ask)
    assert r.status_code == 200
    assert r.headers["x-runestone-provider"] == "primary"
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert "[DONE]" not in events
    *chunks, last = [orjson.loads(e) for e in events]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    relayed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert relayed.startswith("Echo: tell me more")
    assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert set(last) == {"error"}
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert "provider 'primary'" in last["error"]["message"]
    assert "Traceback" not in r.text

    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(**ask)
    received = ""
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert received == relayed
    assert "provider 'primary'" in caught.value.message

    # No failover once the first byte was sent: the secondary never saw a request.
    assert not [k for k in await _requests(good.port) if k.startswith("POST")]
    assert gw.app.inflight.requests == {}


async def test_a_non_streamed_answer_cut_short_fails_over(clock, gateway_factory, fake_factory):
    # A non-streamed request has sent nothing to its client yet when its upstream breaks: fail over.
    gw, bad, good = await _gateway(gateway_factory, fake_factory, "openai", "drop_mid_stream")
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json={"model": "chat", "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert r.headers["x-runestone-provider"] == "primary"
        # The fake drops only streams; a breaking non-streamed upstream is a dropped connection.
        async with httpx.AsyncClient() as admin:
            await admin.post(f"http://127.0.0.1:{bad.port}/_fake/knobs",
                             json={"drop_mid_stream": False, "drop_before_response": True})
        r = await http.post("/chat/completions", json={"model": "chat", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
        assert r.status_code == 200
        assert r.headers["x-runestone-provider"] == "secondary"
        assert r.json()["choices"][0]["message"]["content"].startswith("Echo: hi")
