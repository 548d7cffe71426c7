"""The defects the one pipeline fixed, each observed from outside over real sockets (MockClock for time).

A streamed half-open probe, a slow consumer's deadline, the price lookup, Anthropic's rules on
/v1/messages, malformed bodies, integral floats, and upstream errors passed through as the upstream said them.
"""

from __future__ import annotations

import httpx
import orjson
import pytest
import trio
import trio.testing

from gatewaytest import provider_toml
from runestone.routing.executor import Chunks, Done, Failed, ModelRequest

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
LEDGER_OFF = "[telemetry]\nusage_ledger = false\n"


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def _openai(name: str, port: int, **extra) -> str:
    return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test-key-0001",
                         models=[MODEL], **extra)


async def _breaker(app, provider: str, want: str) -> None:
    for _ in range(200):
        view = (app.breaker_views.value or {}).get(provider)
        if view is not None and view.state == want:
            return
        await trio.testing.wait_all_tasks_blocked(0.001)
    raise AssertionError(f"breaker of {provider} is {view and view.state}, expected {want}")


async def test_a_streamed_half_open_probe_is_served_and_closes_the_breaker(clock, gateway_factory, fake_factory):
    primary, knobs = await fake_factory(fault_status=500)
    gw = await gateway_factory(
        LEDGER_OFF + "[circuit_breaker]\nfailure_threshold = 2\nrecovery_timeout_ms = 5000\nhalf_open_limit = 1\n"
        "success_threshold = 2\n" + _openai("primary", primary.port))
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        for _ in range(2):  # each request retries the one provider: its failures open the breaker
            r = await http.post("/chat/completions", json=BODY)
            assert r.status_code in (502, 503)
        await _breaker(app, "primary", "open")
        knobs.fault_status = 0
        clock.jump(6)
        for n in (1, 2):
            r = await http.post("/chat/completions", json={**BODY, "stream": True})
            assert r.status_code == 200, r.text
            assert r.text.endswith("data: [DONE]\n\n")
            if n == 1:
                await _breaker(app, "primary", "half_open")
        await _breaker(app, "primary", "closed")
    assert app.telemetry.in_flight.get("primary", 0) == 0
    assert not app.gateway.inflight.requests


async def test_a_slow_consumer_is_never_cancelled_by_its_deadline_and_gets_a_timeout_event(
        clock, gateway_factory, fake_factory):
    # The consumer (the server writing to a slow client, a WebSocket queue) is away from the stream for
    # longer than the request's deadline: its own wait is not cancelled, and the next read says timeout.
    upstream, _ = await fake_factory(chunks=20, chunk_delay_ms=100)
    gw = await gateway_factory(LEDGER_OFF + "[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 1000\n"
                               + _openai("up", upstream.port))
    streaming = await gw.app.gateway.serve(ModelRequest("req-slow", None, "chat", MODEL, dict(BODY), stream=True))
    events = []
    slept = 0
    try:
        async for event in streaming:
            events.append(event)
            if len(events) == 2:
                before = trio.current_time()
                await trio.sleep(5)  # with a scope held across the yield, this sleep was cancelled
                slept = trio.current_time() - before
    finally:
        await streaming.aclose()
    assert slept >= 5
    assert all(type(e) is Chunks for e in events[:-1])
    assert type(events[-1]) is Failed and events[-1].error.type == "timeout_error"
    assert not gw.app.gateway.inflight.requests
    assert gw.app.telemetry.in_flight.get("up", 0) == 0


async def test_a_client_that_stops_reading_times_out_alone(clock, gateway_factory, fake_factory):
    upstream, _ = await fake_factory(chunks=400, chunk_delay_ms=5, text="x" * 4000)
    quick, _ = await fake_factory(chunks=4)
    gw = await gateway_factory(LEDGER_OFF + "[server]\nhost = \"127.0.0.1\"\nport = 0\nrequest_timeout_ms = 1500\n"
                               + _openai("up", upstream.port)
                               + provider_toml("quick", "openai", base_url=f"http://127.0.0.1:{quick.port}/v1",
                                               api_key="k", models=["fake-model"]))
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n")
    body = orjson.dumps({**BODY, "stream": True})
    slow = await trio.open_tcp_stream("127.0.0.1", gw.port)
    await slow.send_all(request % len(body) + body)
    # The slow client reads nothing while a bystander streams to the end on its own connection.
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json={**BODY, "stream": True, "model": "fake-model"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    await trio.sleep(3)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r2 = await http.post("/chat/completions", json={**BODY, "stream": True, "model": "fake-model"})
    assert r2.status_code == 200 and r2.text.endswith("data: [DONE]\n\n")
    got = b""
    with trio.move_on_after(10):
        while True:
            data = await slow.receive_some(65536)
            if not data:
                break
            got += data
            if b'"timeout_error"' in got:
                break
    await slow.aclose()
    assert b'"timeout_error"' in got
    assert gw.app.restart_counts().get("front", 0) == 0


async def test_accounting_uses_the_provider_specific_price(gateway_factory, fake_factory):
    # gpt-4o-mini has a price in the default table; "up/gpt-4o-mini" overrides it for this provider only.
    upstream, _ = await fake_factory()
    gw = await gateway_factory('[pricing."up/gpt-4o-mini"]\ninput_per_mtok = 1000000.0\noutput_per_mtok = 0.0\n'
                               + _openai("up", upstream.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json=BODY)
        assert r.status_code == 200
        tokens_in = r.json()["usage"]["prompt_tokens"]
        usage = (await http.get("/usage")).json()
    assert usage["totals"]["cost"] == pytest.approx(tokens_in * 1.0)


async def test_messages_are_judged_by_anthropics_rules(gateway_factory, fake_only_toml):
    gw = await gateway_factory(LEDGER_OFF + fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        ok = {"model": "fake-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        r = await http.post("/messages", json={**ok, "stop_sequences": ["a", "b", "c", "d", "e"]})
        assert r.status_code == 200, r.text
        r = await http.post("/messages", json={**ok, "max_tokens": 50.0})
        assert r.status_code == 200, r.text
        bad_bodies = [
            ({**ok, "system": [{"type": "text", "text": 5}]}, "system[0].text"),
            ({**ok, "messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": [{"type": "text", "text": ["x"]}]}]},
             "messages[1].content[0].text"),
            ({**ok, "messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": {"a": 1}}]}]}]},
             "messages[0].content[0].content[0].text"),
            ({**ok, "messages": [{"role": {"x": 1}, "content": "hi"}]}, "messages[0].role"),
        ]
        for body, param in bad_bodies:
            r = await http.post("/messages", json=body)
            assert r.status_code == 400, r.text
            err = r.json()
            assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
            assert param in err["error"]["message"]
        r = await http.post("/messages", json={"model": "no-such", "max_tokens": 5, "messages": ok["messages"]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


async def test_malformed_chat_bodies_are_400s_and_integral_floats_are_integers(gateway_factory, fake_only_toml):
    gw = await gateway_factory(LEDGER_OFF + fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        for role in ({"a": 1}, ["user"], 5):
            r = await http.post("/chat/completions", json={"model": "fake-model",
                                                           "messages": [{"role": role, "content": "hi"}]})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages[0].role"
        r = await http.post("/chat/completions", json={"model": "fake-model", "n": 1.0, "seed": 3.0,
                                                       "max_tokens": 40.0, "max_completion_tokens": 40.0,
                                                       "logprobs": True, "top_logprobs": 2.0,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        r = await http.post("/chat/completions", json={"model": "fake-model", "n": 1.5,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await http.post("/embeddings", json={"model": "fake-embedding", "input": "hi", "dimensions": 8.0})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 8


# -- upstream errors, passed through and scrubbed --------------------------------------------------------

SECRET = "sk-live-gateway-credential-7f3a9c"


async def _echoing_upstream(nursery, mode: dict):
    """An upstream that echoes the credential it received in every error form it can take."""
    from runestone.http.server import Response, serve_http

    async def handler(request):
        auth = (request.header(b"authorization") or b"").decode()
        kind = mode["kind"]
        if kind == "401":
            body = {"error": {"message": f"Incorrect API key provided: {auth[7:]}", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}
            return Response(401, [(b"content-type", b"application/json")], orjson.dumps(body))
        if kind == "500":
            body = {"error": {"message": f"internal error while using header {auth}", "type": "server_error",
                              "param": None, "code": None}}
            return Response(500, [(b"content-type", b"application/json")], orjson.dumps(body))
        if kind == "html502":
            return Response(502, [(b"content-type", b"text/html")],
                            f"<html><body>Bad gateway for {auth}</body></html>".encode())
        if kind == "context":
            body = {"error": {"message": "This model's maximum context length is 8192 tokens.",
                              "type": "invalid_request_error", "param": "messages",
                              "code": "context_length_exceeded"}}
            return Response(400, [(b"content-type", b"application/json")], orjson.dumps(body))

        async def stream():
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            await trio.sleep(0.05)
            err = {"error": {"message": f"stream broke; key was {SECRET}", "type": "server_error"}}
            yield b"data: " + orjson.dumps(err) + b"\n\n"

        return Response(200, [(b"content-type", b"text/event-stream")], stream=stream())

    return await nursery.start(serve_http, handler, "127.0.0.1", 0)


async def test_upstream_errors_reach_the_client_unchanged_and_without_the_gateways_credential(
        nursery, gateway_factory):
    mode = {"kind": "401"}
    upstream = await _echoing_upstream(nursery, mode)
    gw = await gateway_factory(LEDGER_OFF + "[circuit_breaker]\nenabled = false\n[failover]\nhealth_threshold = 0.0\n"
                               + provider_toml(
        "echo", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key=SECRET, models=[MODEL]))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json=BODY)
        assert SECRET not in r.text
        # The upstream refused the gateway's credential: the gateway's problem, not the client's key.
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "provider_auth_failed"
        mode["kind"] = "500"
        r = await http.post("/chat/completions", json=BODY)
        assert r.status_code == 502 and SECRET not in r.text and "[redacted]" in r.text
        mode["kind"] = "html502"
        r = await http.post("/chat/completions", json=BODY)
        assert r.status_code == 502 and SECRET not in r.text
        mode["kind"] = "stream"
        r = await http.post("/chat/completions", json={**BODY, "stream": True})
        assert r.status_code == 200 and '"error"' in r.text and "[DONE]" not in r.text
        assert SECRET not in r.text
        mode["kind"] = "context"
        r = await http.post("/chat/completions", json=BODY)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": {"message": "This model's maximum context length is 8192 tokens.",
                                      "type": "invalid_request_error", "param": "messages",
                                      "code": "context_length_exceeded"}}
        # The same refusal through /v1/messages, in Anthropic's shape.
        r = await http.post("/messages", json={"model": MODEL, "max_tokens": 5,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        assert r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "messages: This model's maximum context length is 8192 tokens."}}
    dump = orjson.dumps(gw.app.dump_state(), default=str).decode()
    assert SECRET not in dump


async def test_graceful_stop_ends_a_long_stream_with_an_error_event(clock, gateway_factory, fake_factory):
    upstream, _ = await fake_factory(chunks=100, chunk_delay_ms=200)
    gw = await gateway_factory("[server]\nhost = \"127.0.0.1\"\nport = 0\ndrain_timeout_ms = 2000\n"
                               + _openai("up", upstream.port))
    body = b""
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        async with http.stream("POST", "/chat/completions", json={**BODY, "stream": True}) as r:
            assert r.status_code == 200
            async for data in r.aiter_bytes():
                if not body:
                    gw.app.request_stop()
                body += data
    text = body.decode()
    assert "[DONE]" not in text
    last = text.strip().rsplit("\n\n", 1)[-1]
    assert last.startswith("data: ") and orjson.loads(last[6:])["error"]["code"] == "gateway_stopping"


async def test_anthropic_paths_refuse_in_anthropics_shape(gateway_factory, fake_only_toml):
    gw = await gateway_factory(LEDGER_OFF + fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.get("/messages")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post("/messages/batches", json={})
        assert r.status_code == 404
        assert r.json() == {"type": "error", "error": {"type": "not_found_error", "message": r.json()["error"]["message"]}}
        r = await http.post("/messages", content=b"x" * (4 * 1024 * 1024 + 10))
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = await http.get("/nothing")  # OpenAI's routes keep OpenAI's shape
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_a_finished_stream_gives_its_upstream_connection_back(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(chunks=20, coalesce=True)
    gw = await gateway_factory(LEDGER_OFF + _openai("up", upstream.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        for _ in range(3):
            r = await http.post("/chat/completions", json={**BODY, "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    transport = gw.app.gateway.providers.value["up"].adapter._transport
    stats = transport.statistics().origin(f"http://127.0.0.1:{upstream.port}")
    # One connection served all three streams: each was read to its end and went back to the pool.
    assert (stats.open, stats.idle) == (1, 1)


async def test_a_stream_that_came_in_one_upstream_read_is_answered_in_one_write(gateway_factory, fake_factory,
                                                                                monkeypatch):
    from runestone.http import _connection

    upstream, _ = await fake_factory(chunks=20, coalesce=True)
    gw = await gateway_factory(LEDGER_OFF + _openai("up", upstream.port))
    writes = []
    send = _connection._Connection._send

    async def counted(self, data):
        if self._stream.socket.getsockname()[1] == gw.port:  # the gateway's writes, not the fake upstream's
            # what was recorded when the client's bytes went out: the request in flight or not
            writes.append((bytes(data), len(gw.app.gateway.inflight.requests)))
        await send(self, data)

    monkeypatch.setattr(_connection._Connection, "_send", counted)
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        for _ in range(2):
            writes.clear()
            r = await http.post("/chat/completions", json={**BODY, "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and r.text.count("data: ") > 20
            # head, 20 chunks, [DONE] and the end of the body: one write, made once the request was recorded
            assert len(writes) == 1, [(w[0][:60], w[0][-60:]) for w in writes]
            data, in_flight = writes[0]
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert in_flight == 0
    stats = gw.app.gateway.providers.value["up"].adapter._transport.statistics().origin(
        f"http://127.0.0.1:{upstream.port}")
    assert (stats.open, stats.idle) == (1, 1)  # and the upstream connection went back to the pool


async def test_the_default_plan_is_reused_until_a_snapshot_changes(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    gw = await gateway_factory(LEDGER_OFF + _openai("up", upstream.port))
    gateway = gw.app.gateway
    first = gateway.plan(MODEL, dict(BODY))
    assert gateway.plan(MODEL, dict(BODY)) is first
    gateway.breakers.publish(dict(gateway.breakers.value or {}))  # a republished breaker view
    again = gateway.plan(MODEL, dict(BODY))
    assert again is not first and again.targets == first.targets
