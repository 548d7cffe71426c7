"""Keys, teams and budgets that hold: the admin lifecycle, exact admission at a budget's edge under 200
concurrent requests, reservations given back on failure and disconnect, period resets on a MockClock-driven
wall clock, team and key limits together, model allow-lists, one counter on every path (cached answers too),
and keys and spend that outlive the process. Over real sockets with the official SDKs."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone

import anthropic
import httpx
import openai
import orjson
import pytest
import trio
import trio_websocket

from gatewaytest import fake_requests, provider_toml
from runestone.app import Application
from runestone.config import load_config
from runestone.http.server import Response, serve_http

ADMIN_KEY = "ak-governance-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
#: 1 output token costs $0.001 (input is free), so the fake's replies cost exactly what is reserved.
PRICING = '[pricing."fake-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n' \
          '[pricing."fake-embedding"]\ninput_per_mtok = 0.0\noutput_per_mtok = 0.0\n'
#: The fake's reply: 15 characters in one chunk, 4 tokens by its count; max_tokens=4 makes it exactly 4.
REPLY = "aaa bbb ccc ddd"
TOKEN_USD = 0.001
ASK = [{"role": "user", "content": "hi"}]


def _toml(base: str, extra: str = "") -> str:
    return (f'[auth]\nadmin_key = "{ADMIN_KEY}"\n' + PRICING + extra
            + provider_toml("up", "openai", base_url=base + "/v1", api_key="sk-up",
                            models=["fake-model", "fake-embedding"]))


async def _gateway(gateway_factory, fake_factory, extra: str = "", **knobs):
    upstream, fake = await fake_factory(text=REPLY, chunks=1, **knobs)
    gw = await gateway_factory(_toml(f"http://127.0.0.1:{upstream.port}", extra))
    return gw, fake


async def _admin(http: httpx.AsyncClient, method: str, path: str, body=None, status: int = 200) -> dict:
    r = await http.request(method, path, headers=ADMIN, json=body)
    assert r.status_code == status, r.text
    return r.json()


def _client(gw, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=secret, max_retries=0)


async def _chat(client, **kw):
    return await client.chat.completions.create(model="fake-model", messages=ASK, max_tokens=4, **kw)


class WallClock:
    """A wall clock the test moves: what budget periods and expiries are judged by."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- the admin lifecycle ----------------------------------------------------------------------------------


async def test_admin_lifecycle_create_use_patch_rotate_with_grace_revoke(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    wall = gw.app.governance.wall = WallClock(1_900_000_000.0)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        team = await _admin(http, "POST", "/admin/teams", {"name": "eng", "budget": {"usd": 5, "period": "month"}},
                            201)
        assert team["budget"] == {"usd": 5.0, "period": "month"} and team["keys"] == []
        created = await _admin(http, "POST", "/admin/keys", {
            "name": "ci bot", "team": "eng", "models": ["fake-model"], "budget": {"usd": 1, "period": "day"},
            "limits": {"rpm": 100}, "metadata": {"owner": "ops"}}, 201)
        secret, kid = created["secret"], created["id"]
        assert secret.startswith("rsk-") and kid.startswith("key_") and created["status"] == "active"
        described = await _admin(http, "GET", f"/admin/keys/{kid}")
        assert "secret" not in described and secret not in orjson.dumps(described).decode()
        assert described["team"] == "eng" and described["limits"]["rpm"] == 100
        assert described["spend"]["budget_usd"] == 1.0 and described["spend"]["resets_at"] == "2030-03-18T00:00:00Z"

        # Use: the SDK with the new secret; the spend is the real cost, on the key and on its team.
        client = _client(gw, secret)
        done = await _chat(client)
        assert done.choices[0].message.content == REPLY and done.usage.completion_tokens == 4
        described = await _admin(http, "GET", f"/admin/keys/{kid}")
        assert described["spend"]["spent_usd"] == pytest.approx(4 * TOKEN_USD)
        assert described["spend"]["requests"] == 1 and described["spend"]["reserved_usd"] == 0
        team = await _admin(http, "GET", "/admin/teams/eng")
        assert team["spend"]["spent_usd"] == pytest.approx(4 * TOKEN_USD) and team["keys"] == [kid]
        own = (await http.get("/v1/key", headers={"authorization": f"Bearer {secret}"})).json()
        assert own["id"] == kid and own["team"] == "eng" and own["spend"]["remaining_usd"] == pytest.approx(0.996)
        assert own["team_spend"]["remaining_usd"] == pytest.approx(4.996) and "secret" not in own

        # Patch: the budget shrinks below one request's reservation; refused before any upstream call.
        patched = await _admin(http, "PATCH", f"/admin/keys/{kid}", {"budget": {"usd": 0.006, "period": "day"}})
        assert patched["budget"] == {"usd": 0.006, "period": "day"} and patched["name"] == "ci bot"
        with pytest.raises(openai.RateLimitError) as refused:
            await _chat(client)
        body = refused.value.body
        assert body["type"] == "insufficient_quota" and body["code"] == "budget_exceeded"
        assert "this key ('ci bot')" in body["message"] and "$0.002000 left" in body["message"]
        assert "resets at 2030-03-18T00:00:00Z" in body["message"]
        await _admin(http, "PATCH", f"/admin/keys/{kid}", {"budget": None})

        # Rotate with a grace: both secrets work until it ends, then only the new one.
        rotated = await _admin(http, "POST", f"/admin/keys/{kid}/rotate", {"grace_ms": 60_000})
        new_secret = rotated["secret"]
        assert new_secret != secret and rotated["id"] == kid
        await _chat(client)
        await _chat(_client(gw, new_secret))
        wall.now += 61
        with pytest.raises(openai.AuthenticationError):
            await _chat(client)
        await _chat(_client(gw, new_secret))

        # Revoke: at once, including a connection that is already authenticated.
        async with trio_websocket.open_websocket_url(
                f"ws://127.0.0.1:{gw.port}/v1/ws",
                extra_headers=[(b"authorization", f"Bearer {new_secret}".encode())]) as ws:
            revoked = await _admin(http, "DELETE", f"/admin/keys/{kid}")
            assert revoked["status"] == "revoked"
            await ws.send_message(orjson.dumps({"type": "chat", "id": 1, "request": {
                "model": "fake-model", "messages": ASK, "max_tokens": 4}}).decode())
            answer = orjson.loads(await ws.get_message())
            assert answer["type"] == "error" and answer["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await _chat(_client(gw, new_secret))
        listed = await _admin(http, "GET", "/admin/keys")
        assert [k["status"] for k in listed["data"]] == ["revoked"]
        # A team with an active key cannot be deleted; with only revoked keys it can.
        assert (await _admin(http, "DELETE", "/admin/teams/eng"))["deleted"] is True


async def test_bad_admin_input_is_refused_and_changes_nothing(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for body, param in (({}, "name"), ({"name": "x", "budget": {"usd": -1}}, "budget.usd"),
                            ({"name": "x", "budget": {"usd": 1, "period": "year"}}, "budget.period"),
                            ({"name": "x", "limits": {"rpm": "many"}}, "limits.rpm"),
                            ({"name": "x", "team": "nobody"}, "team"), ({"name": "x", "secret": "mine"}, "secret"),
                            ({"name": "x", "expires_at": "soon"}, "expires_at"), ([], None)):
            r = await http.post("/admin/keys", headers=ADMIN, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert (await http.get("/admin/keys/key_000000000000", headers=ADMIN)).status_code == 404
        assert (await http.get("/admin/keys/key_%2F..%2Fstate", headers=ADMIN)).status_code == 404
        r = await http.post("/admin/keys", headers={"authorization": "Bearer not-admin"}, json={"name": "x"})
        assert r.status_code == 401
        assert (await _admin(http, "GET", "/admin/keys"))["data"] == []


# -- reserve, then settle ---------------------------------------------------------------------------------


async def test_exact_admission_under_200_concurrent_requests_at_the_budget_edge(gateway_factory, fake_factory):
    gw, fake = await _gateway(gateway_factory, fake_factory, ttfb_ms=20)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        # Each request reserves 4 output tokens = $0.004; the budget fits exactly ten of them.
        key = await _admin(http, "POST", "/admin/keys", {"name": "edge", "budget": {"usd": 0.04, "period": "total"}},
                           201)
        client = _client(gw, key["secret"])
        outcomes: list[str] = []

        async def one():
            try:
                await _chat(client)
                outcomes.append("ok")
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "budget_exceeded", exc.body
                outcomes.append("refused")

        async def upstream_chats() -> int:
            return await fake_requests(fake_port(gw), http=http)

        upstream_before = await upstream_chats()
        async with trio.open_nursery() as n:
            for _ in range(200):
                n.start_soon(one)
        assert outcomes.count("ok") == 10 and outcomes.count("refused") == 190
        spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
        assert spend["spent_usd"] == pytest.approx(0.04) and spend["spent_usd"] <= 0.04 + 1e-12
        assert spend["reserved_usd"] == 0 and spend["remaining_usd"] == 0 and spend["requests"] == 10
        # A refusal never reached the upstream.
        assert await upstream_chats() - upstream_before == 10


async def test_a_failed_request_and_a_client_disconnect_give_the_reservation_back(gateway_factory, fake_factory):
    gw, fake = await _gateway(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        # Room for one reservation at a time ($0.004 of $0.006).
        key = await _admin(http, "POST", "/admin/keys", {"name": "flaky", "budget": {"usd": 0.006, "period": "day"}},
                           201)
        client = _client(gw, key["secret"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fake_port(gw)}") as up:
            await up.post("/_fake/knobs", json={"fault_status": 500})
            for _ in range(3):
                with pytest.raises(openai.APIStatusError) as failed:
                    await _chat(client)
                assert failed.value.status_code in (502, 503)  # 503 once the breaker opened
            spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
            assert spend["spent_usd"] == 0 and spend["reserved_usd"] == 0
            await _admin(http, "POST", "/admin/circuits/up/reset")

            # A stream the client walks away from after its first chunk: nothing stays reserved.
            await up.post("/_fake/knobs", json={"fault_status": 0, "chunks": 4, "chunk_delay_ms": 200,
                                                "text": "one two three four"})
            async with httpx.AsyncClient(base_url=gw.v1, timeout=10) as raw:
                async with raw.stream("POST", "/chat/completions", headers={"authorization": f"Bearer {key['secret']}"},
                                      json={"model": "fake-model", "messages": ASK, "max_tokens": 4,
                                            "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            break
            with trio.fail_after(10):
                while gw.app.inflight.requests:
                    await trio.sleep(0.01)
            spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
            assert spend["reserved_usd"] == 0 and spend["requests"] == 4
            # The reservation came back: a whole one fits again.
            await up.post("/_fake/knobs", json={"chunks": 1, "chunk_delay_ms": 0, "text": REPLY})
            await _chat(client)


def fake_port(gw) -> int:
    base = gw.app.catalog["up"].config.base_url
    return int(base.rsplit(":", 1)[1].split("/")[0])


async def test_a_daily_budget_resets_at_midnight_utc_on_the_mock_clock(gateway_factory, fake_factory, autojump_clock):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    midnight = datetime(2031, 5, 7, tzinfo=timezone.utc).timestamp()
    # (No client timeout: the store's writes run on a thread, and while the loop waits for one the mock
    # clock jumps ahead.)
    async with httpx.AsyncClient(base_url=gw.url, timeout=None) as http:
        key = await _admin(http, "POST", "/admin/keys", {"name": "daily", "budget": {"usd": 0.008, "period": "day"}},
                           201)
        # From now the wall clock runs on trio's (mock) clock, from 60 s before midnight UTC.
        start = trio.current_time()
        gw.app.governance.wall = lambda: midnight - 60 + (trio.current_time() - start)
        client = _client(gw, key["secret"])
        await _chat(client)
        await _chat(client)
        with pytest.raises(openai.RateLimitError) as refused:
            await _chat(client)
        assert "resets at 2031-05-07T00:00:00Z" in refused.value.body["message"]
        assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
        await trio.sleep(61)
        await _chat(client)
        spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
        assert spend["period_start"] == "2031-05-07T00:00:00Z" and spend["requests"] == 1
        assert spend["spent_usd"] == pytest.approx(0.004)


# -- limits and allow-lists -------------------------------------------------------------------------------


async def test_team_and_key_limits_and_budgets_bind_together(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        await _admin(http, "POST", "/admin/teams", {"name": "small", "limits": {"rph": 3},
                                                    "budget": {"usd": 0.02, "period": "week"}}, 201)
        a = await _admin(http, "POST", "/admin/keys", {"name": "a", "team": "small", "limits": {"rph": 2}}, 201)
        b = await _admin(http, "POST", "/admin/keys", {"name": "b", "team": "small"}, 201)
        ca, cb = _client(gw, a["secret"]), _client(gw, b["secret"])
        await _chat(ca)
        await _chat(ca)
        with pytest.raises(openai.RateLimitError) as key_limit:
            await _chat(ca)
        assert "2 requests per hour for this key" in key_limit.value.body["message"]
        await _chat(cb)
        with pytest.raises(openai.RateLimitError) as team_limit:
            await _chat(cb)
        assert "3 requests per hour for team 'small'" in team_limit.value.body["message"]

        # The team's budget is shared: $0.012 spent by three requests, $0.008 left = two reservations.
        await _admin(http, "PATCH", "/admin/teams/small", {"limits": None})
        await _admin(http, "PATCH", f"/admin/keys/{a['id']}", {"limits": None})
        await _chat(cb)
        await _chat(ca)
        with pytest.raises(openai.RateLimitError) as team_budget:
            await _chat(cb)
        assert team_budget.value.body["code"] == "budget_exceeded"
        assert "team 'small' has $0.000000 left of its $0.020000 weekly budget" in team_budget.value.body["message"]
        team = await _admin(http, "GET", "/admin/teams/small")
        assert team["spend"]["spent_usd"] == pytest.approx(0.02) and team["spend"]["requests"] == 5


async def test_model_allow_lists_of_key_and_team(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        await _admin(http, "POST", "/admin/teams", {"name": "t", "models": ["fake-*"]}, 201)
        key = await _admin(http, "POST", "/admin/keys", {"name": "chat only", "team": "t", "models": ["fake-model"]},
                           201)
        other = await _admin(http, "POST", "/admin/keys", {"name": "all of team", "team": "t"}, 201)
        client = _client(gw, key["secret"])
        await _chat(client)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.embeddings.create(model="fake-embedding", input="x")
        assert denied.value.body["code"] == "model_not_allowed" and "not allowed for this key" in \
            denied.value.body["message"]
        await _client(gw, other["secret"]).embeddings.create(model="fake-embedding", input="x")
        await _admin(http, "PATCH", "/admin/teams/t", {"models": ["gpt-*"]})
        with pytest.raises(openai.PermissionDeniedError) as team_denied:
            await _chat(client)
        assert "not allowed for this key's team" in team_denied.value.body["message"]
        # In Anthropic's shape on /v1/messages.
        messages = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key["secret"], max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError) as anth:
            await messages.messages.create(model="fake-model", max_tokens=4, messages=ASK)
        assert anth.value.body["type"] == "error" and anth.value.body["error"]["type"] == "permission_error"


# -- one counter on every path ----------------------------------------------------------------------------


async def test_every_path_charges_the_one_counter(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory, extra="[cache]\nenabled = true\n")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        await _admin(http, "POST", "/admin/teams", {"name": "all", "budget": {"usd": 10, "period": "month"}}, 201)
        key = await _admin(http, "POST", "/admin/keys", {"name": "every path", "team": "all", "limits": {"rph": 11},
                                                        "budget": {"usd": 1, "period": "month"}}, 201)
        secret = key["secret"]
        client = _client(gw, secret)
        await _chat(client)  # 1: chat
        raw = await client.chat.completions.with_raw_response.create(model="fake-model", messages=ASK, max_tokens=4)
        assert raw.headers["x-runestone-cache"] == "hit"  # 2: the same chat, answered from the cache
        async for _ in await _chat(client, stream=True):  # 3: chat streamed
            pass
        await client.completions.create(model="fake-model", prompt="hi", max_tokens=4)  # 4: legacy completions
        async for _ in await client.completions.create(model="fake-model", prompt="hi", max_tokens=4, stream=True):
            pass  # 5
        anth = anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)
        await anth.messages.create(model="fake-model", max_tokens=4, messages=ASK)  # 6: messages
        async with anth.messages.stream(model="fake-model", max_tokens=4, messages=ASK) as stream:  # 7
            await stream.get_final_message()
        await client.embeddings.create(model="fake-embedding", input="hi")  # 8: embeddings
        async with trio_websocket.open_websocket_url(  # 9: a WebSocket stream
                f"ws://127.0.0.1:{gw.port}/v1/ws", extra_headers=[(b"authorization", f"Bearer {secret}".encode())]) as ws:
            await ws.send_message(orjson.dumps({"type": "chat", "id": 1, "request": {
                "model": "fake-model", "messages": ASK, "max_tokens": 4}}).decode())
            while orjson.loads(await ws.get_message())["type"] == "chunk":
                pass
        answer = await client.responses.create(model="fake-model", input="hi", max_output_tokens=4)  # 10: responses
        assert answer.usage.output_tokens == 4
        async with client.responses.stream(model="fake-model", input="hi", max_output_tokens=4) as stream:  # 11
            assert (await stream.get_final_response()).usage.output_tokens == 4
        # The twelfth request, whatever its path, is over the key's 11 requests per hour: one counter.
        with pytest.raises(openai.RateLimitError) as limited:
            await client.embeddings.create(model="fake-embedding", input="hi")
        assert "11 requests per hour for this key" in limited.value.body["message"]
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model="fake-model", input="hi", max_output_tokens=4)
        with pytest.raises(openai.RateLimitError):  # a cached answer is refused too (through the pipeline)
            await _chat(client)

        spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
        assert spend["requests"] == 11 and spend["reserved_usd"] == 0
        # Nine answers of 4 output tokens (the cache hit and the embeddings cost nothing).
        assert spend["spent_usd"] == pytest.approx(9 * 4 * TOKEN_USD)
        team = (await _admin(http, "GET", "/admin/teams/all"))["spend"]
        assert team["requests"] == 11 and team["spent_usd"] == pytest.approx(spend["spent_usd"])
        usage = (await http.get("/v1/usage", headers={"authorization": f"Bearer {secret}"},
                                params={"group_by": "team,endpoint,provider"})).json()
        rows = {(r["team"], r["endpoint"], r["provider"]): r for r in usage["rows"]}
        assert rows[("all", "chat", "cache")]["cost"] == 0 and rows[("all", "chat", "cache")]["requests"] == 1
        assert usage["totals"]["cost"] == pytest.approx(spend["spent_usd"])
        assert rows[("all", "responses", "up")]["requests"] == 2
        assert rows[("all", "responses", "up")]["cost"] == pytest.approx(2 * 4 * TOKEN_USD)
        # The refusals were not recorded as usage: eleven rows, one per answered request.
        assert sum(r["requests"] for r in usage["rows"] if r["provider"]) == 11
        by_team = (await http.get("/v1/usage", headers=ADMIN, params={"team": "all", "group_by": "key_id,day"})).json()
        assert by_team["rows"][0]["key_id"] == key["id"] and by_team["totals"]["requests"] == 11
        metrics = (await http.get("/metrics")).text
        assert 'runestone_budget_spend_usd_total{team="all"} 0.036' in metrics


async def _native_responses(request) -> Response:
    """An upstream speaking the Responses API itself: one answer of 2 output tokens (and 12 input ones)."""
    body = orjson.loads(await request.body())
    response = {"id": "resp_up", "object": "response", "created_at": 1, "status": "completed", "model": body["model"],
                "output": [{"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "usage": {"input_tokens": 12, "output_tokens": 2, "total_tokens": 14}}
    if not body.get("stream"):
        return Response.json(response)
    events = [{"type": "response.created", "response": {**response, "status": "in_progress", "output": []}},
              {"type": "response.completed", "response": response}]
    data = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps({**e, "sequence_number": i})
                    + b"\n\n" for i, e in enumerate(events))

    async def stream():
        yield data

    return Response(200, [(b"content-type", b"text/event-stream")], stream=stream())


async def test_the_responses_api_charges_the_one_counter_on_a_native_provider_too(gateway_factory, nursery):
    """A provider speaking Responses itself gets the client's body; its answer's usage is what is charged."""
    server = await nursery.start(lambda task_status: serve_http(_native_responses, "127.0.0.1", 0,
                                                                task_status=task_status))
    gw = await gateway_factory(f'[auth]\nadmin_key = "{ADMIN_KEY}"\n' + PRICING + provider_toml(
        "native", "openai", base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-up", models=["fake-model"],
        responses_api=True))
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        key = await _admin(http, "POST", "/admin/keys", {"name": "native", "limits": {"rph": 2},
                                                        "budget": {"usd": 1, "period": "month"}}, 201)
        client = _client(gw, key["secret"])
        assert (await client.responses.create(model="fake-model", input="hi", max_output_tokens=4)).usage.output_tokens == 2
        async with client.responses.stream(model="fake-model", input="hi", max_output_tokens=4) as stream:
            assert (await stream.get_final_response()).usage.output_tokens == 2
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model="fake-model", input="hi", max_output_tokens=4)
        spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
        assert spend["requests"] == 2 and spend["reserved_usd"] == 0
        assert spend["spent_usd"] == pytest.approx(2 * 2 * TOKEN_USD)


async def test_a_budget_refusal_is_on_the_live_feed_and_counted_per_team(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        await _admin(http, "POST", "/admin/teams", {"name": "feed", "budget": {"usd": 0.001, "period": "day"}}, 201)
        key = await _admin(http, "POST", "/admin/keys", {"name": "k", "team": "feed"}, 201)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{gw.port}/v1/control",
                                                     extra_headers=[(b"authorization", ADMIN["authorization"].encode())]
                                                     ) as control:
            await control.send_message(orjson.dumps({"type": "subscribe", "id": "s"}).decode())
            assert orjson.loads(await control.get_message())["type"] == "result"
            with pytest.raises(openai.RateLimitError):
                await _chat(_client(gw, key["secret"]))
            with trio.fail_after(10):
                while True:
                    msg = orjson.loads(await control.get_message())
                    if msg["type"] == "event" and msg["event"]["kind"] == "budget_exceeded":
                        break
        event = msg["event"]
        assert event["key_id"] == key["id"] and event["team"] == "feed" and event["budget"] == "team"
        assert event["requested_usd"] == pytest.approx(0.004) and event["remaining_usd"] == pytest.approx(0.001)
        metrics = (await http.get("/metrics")).text
        assert 'runestone_budget_refusals_total{team="feed",budget="team"} 1' in metrics
        assert key["id"] not in metrics  # per team, never per key


# -- the control socket and the CLI -----------------------------------------------------------------------


async def test_keys_and_teams_over_the_control_socket(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{gw.port}/v1/control",
                                                 extra_headers=[(b"authorization", ADMIN["authorization"].encode())]
                                                 ) as control:
        async def op(type_, **fields):
            await control.send_message(orjson.dumps({"type": type_, "id": type_, **fields}).decode())
            reply = orjson.loads(await control.get_message())
            assert reply["id"] == type_
            return reply

        assert (await op("create_team", team={"name": "ops"}))["result"]["name"] == "ops"
        created = (await op("create_key", key={"name": "sock", "team": "ops"}))["result"]
        assert created["secret"].startswith("rsk-")
        listed = (await op("list_keys"))["result"]
        assert [k["id"] for k in listed] == [created["id"]] and "secret" not in listed[0]
        rotated = (await op("rotate_key", key_id=created["id"], grace_ms=0))["result"]
        await _chat(_client(gw, rotated["secret"]))
        with pytest.raises(openai.AuthenticationError):
            await _chat(_client(gw, created["secret"]))
        assert (await op("update_key", key_id=created["id"], key={"models": ["x"]}))["result"]["models"] == ["x"]
        bad = await op("update_key", key_id=created["id"], key={"budget": "lots"})
        assert bad["type"] == "error" and bad["error"]["param"] == "budget"
        assert (await op("revoke_key", key_id=created["id"]))["result"]["status"] == "revoked"
        assert (await op("get_team", name="ops"))["result"]["keys"] == [created["id"]]
        assert (await op("delete_team", name="ops"))["result"]["deleted"] is True


# -- restarts ---------------------------------------------------------------------------------------------


async def test_keys_and_spend_survive_a_restart(tmp_path, fake_factory):
    upstream, _ = await fake_factory(text=REPLY, chunks=1)
    data = tmp_path / "data"
    path = tmp_path / "runestone.toml"
    path.write_text(textwrap.dedent(f'[server]\nhost = "127.0.0.1"\nport = 0\n[data]\ndir = "{data}"\n')
                    + _toml(f"http://127.0.0.1:{upstream.port}"))
    state: dict = {}

    async def run(work):
        app = Application(load_config(str(path), env={}))
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", timeout=10) as http:
                    await work(app, http)
            finally:
                app.request_stop()

    async def first(app, http):
        await _admin(http, "POST", "/admin/teams", {"name": "kept", "budget": {"usd": 1, "period": "month"}}, 201)
        key = await _admin(http, "POST", "/admin/keys", {"name": "kept", "team": "kept",
                                                        "budget": {"usd": 0.5, "period": "total"}}, 201)
        rotated = await _admin(http, "POST", f"/admin/keys/{key['id']}/rotate", {})
        state.update(id=key["id"], secret=rotated["secret"], old=key["secret"])
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key=rotated["secret"],
                                    max_retries=0)
        for _ in range(3):
            await client.chat.completions.create(model="fake-model", messages=ASK, max_tokens=4)

    async def second(app, http):
        described = await _admin(http, "GET", f"/admin/keys/{state['id']}")
        assert described["spend"]["spent_usd"] == pytest.approx(0.012) and described["spend"]["requests"] == 3
        team = await _admin(http, "GET", "/admin/teams/kept")
        assert team["spend"]["spent_usd"] == pytest.approx(0.012) and team["keys"] == [state["id"]]
        r = await http.get("/v1/key", headers={"authorization": f"Bearer {state['secret']}"})
        assert r.status_code == 200 and r.json()["spend"]["remaining_usd"] == pytest.approx(0.488)
        assert (await http.get("/v1/key", headers={"authorization": f"Bearer {state['old']}"})).status_code == 401
        # Managed keys close open mode: a request with no key is refused.
        assert (await http.get("/v1/models")).status_code == 401

    await run(first)
    stored = (data / "keys.sqlite3").read_bytes()
    assert state["secret"].encode() not in stored and state["old"].encode() not in stored
    await run(second)


async def test_keys_and_teams_commands(gateway_factory, fake_factory):
    from test_cli_control import run_cli

    gw, _ = await _gateway(gateway_factory, fake_factory)
    admin = ["--url", gw.url, "--admin-key", ADMIN_KEY]
    status, out, err, _ = await run_cli("teams", "create", "cli-team", "--budget-usd", "2", "--period", "week",
                                        "--rph", "50", *admin)
    assert (status, err, out) == (0, "", "created team cli-team\n")
    status, out, err, _ = await run_cli("keys", "create", "from cli", "--team", "cli-team", "--models",
                                        "fake-model", "--budget-usd", "1", "--period", "day", *admin)
    assert status == 0 and err == ""
    first, secret = out.splitlines()
    kid = first.split()[2]
    assert first == f"created key {kid} (from cli); its secret, shown this once:" and secret.startswith("rsk-")
    await _chat(_client(gw, secret))
    status, out, _, _ = await run_cli("keys", "list", *admin)
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "TEAM", "STATUS", "SPEND"] and lines[1].startswith(kid)
    assert "$0.0040 ($0.9960 left, day)" in lines[1] and secret not in out
    status, out, _, _ = await run_cli("keys", "update", kid, "--rpm", "7", *admin)
    assert status == 0 and orjson.loads(out)["limits"]["rpm"] == 7
    status, out, _, _ = await run_cli("keys", "rotate", kid, "--grace-ms", "60000", *admin)
    assert status == 0 and "the old secret works until" in out
    new = out.splitlines()[1]
    await _chat(_client(gw, new))
    status, out, _, _ = await run_cli("teams", "show", "cli-team", *admin)
    assert orjson.loads(out)["spend"]["requests"] == 2 and new not in out
    status, out, err, _ = await run_cli("keys", "revoke", kid, *admin)
    assert (status, out) == (0, f"revoked key {kid}\n")
    status, out, err, _ = await run_cli("keys", "show", "key_000000000000", *admin)
    assert status == 1 and "no key with id" in err
    status, out, err, _ = await run_cli("teams", "delete", "cli-team", *admin)
    assert (status, out) == (0, "deleted team cli-team\n")


# -- an upstream that reports no usage --------------------------------------------------------------------


async def test_an_answer_without_usage_is_charged_the_estimate_not_nothing(gateway_factory, fake_factory, caplog):
    """An OpenAI-compatible server that sends no ``usage`` (and ignores ``stream_options.include_usage``):
    the budget, the ledger and the key's tokens are charged the gateway's estimate, never $0."""
    from runestone.wire.token_estimate import estimate_input_tokens, estimate_text_tokens

    gw, _ = await _gateway(gateway_factory, fake_factory, report_usage=False)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        key = await _admin(http, "POST", "/admin/keys", {"name": "k", "budget": {"usd": 1, "period": "total"}}, 201)
        client = _client(gw, key["secret"])
        reply = await _chat(client)
        assert reply.usage is None and reply.choices[0].message.content == REPLY  # the client's answer as sent
        stream = await client.chat.completions.create(model="fake-model", messages=ASK, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert all(c.usage is None for c in chunks) and "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
        spend = (await _admin(http, "GET", f"/admin/keys/{key['id']}"))["spend"]
        assert spend["requests"] == 2 and spend["reserved_usd"] == 0
        # Non-stream: the reply's text, 15 bytes = 4 tokens; the stream: one token per relayed chunk
        # (role, content, finish: 3), each at $0.001 an output token.
        assert spend["spent_usd"] == pytest.approx((estimate_text_tokens(REPLY) + 3) * TOKEN_USD)
        usage = (await http.get("/v1/usage", headers=ADMIN, params={"group_by": "key_id"})).json()
        assert usage["totals"]["requests"] == 2
        assert usage["totals"]["tokens_in"] == 2 * estimate_input_tokens({"messages": ASK})
        assert usage["totals"]["tokens_out"] == estimate_text_tokens(REPLY) + 3
        assert usage["totals"]["cost"] == pytest.approx(spend["spent_usd"])
    assert sum("answered without token usage" in r.getMessage() for r in caplog.records) == 1  # once per provider
