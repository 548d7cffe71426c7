"""Stored responses and the response cache across a fleet: three ``runestone serve`` processes, one Redis.

A response stored through one instance is continued (``previous_response_id``), read and deleted through
the others; an answer cached by one instance is a hit on another without reaching the upstream again.
While Redis is down, each instance keeps working on its own: responses are stored and continued locally,
nothing turns into a 5xx.
"""

from __future__ import annotations

import httpx
import trio

from fleettest import Fleet
from gatewaytest import fake_requests, provider_toml

CONFIG = ("[telemetry]\nusage_ledger = false\n[cache]\nenabled = true\nttl_ms = 600000\n"
          + provider_toml("fake", "fake", models=["fake-model"]))
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "cache me"}]}


async def _respond(http, instance, text: str, previous: str | None = None) -> dict:
    body = {"model": "fake-model", "input": text, "store": True}
    if previous is not None:
        body["previous_response_id"] = previous
    r = await http.post(instance.url + "/v1/responses", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_previous_response_id_and_reads_on_any_instance(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            first = await _respond(http, fleet[0], "my name is Ada")
            second = await _respond(http, fleet[1], "what is my name?", previous=first["id"])
            third = await _respond(http, fleet[2], "and again?", previous=second["id"])
            items = (await http.get(f"{fleet[0].url}/v1/responses/{third['id']}/input_items")).json()["data"]
            texts = [part.get("text") for item in items for part in (item.get("content") or [])
                     if isinstance(part, dict)]
            assert "my name is Ada" in texts and "what is my name?" in texts and "and again?" in texts
            r = await http.get(f"{fleet[2].url}/v1/responses/{first['id']}")
            assert r.status_code == 200 and r.json()["id"] == first["id"]
            r = await http.delete(f"{fleet[1].url}/v1/responses/{first['id']}")
            assert r.status_code == 200, r.text
            for inst in fleet.instances:
                r = await http.get(f"{inst.url}/v1/responses/{first['id']}")
                assert r.status_code == 404 and r.json()["error"]["code"]
            r = await http.post(fleet[2].url + "/v1/responses",
                                json={"model": "fake-model", "input": "x", "previous_response_id": first["id"]})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "previous_response_not_found"


async def test_cached_answer_is_a_hit_on_another_instance(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory()
    config = ("[telemetry]\nusage_ledger = false\n[cache]\nenabled = true\nttl_ms = 600000\n"
              + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="k",
                              models=["fake-model"]))
    async with Fleet(tmp_path, redis_server.url, config) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            async def upstream_requests() -> int:
                return await fake_requests(upstream.port, http=http)

            r = await http.post(fleet[0].url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-runestone-cache"] == "miss"
            assert await upstream_requests() == 1
            with trio.fail_after(30):  # the background write reaches Redis
                while not redis_server.command("KEYS", "runestone:cache:*"):
                    await trio.sleep(0.02)
            for inst in fleet.instances[1:]:
                r2 = await http.post(inst.url + "/v1/chat/completions", json=CHAT)
                assert r2.status_code == 200 and r2.headers["x-runestone-cache"] == "hit", r2.headers
                assert r2.json() == r.json()
            assert await upstream_requests() == 1
            cluster = (await fleet[1].detailed(http))["cluster"]
            assert cluster["status"] == "ok"


async def test_redis_down_each_instance_keeps_its_own(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            shared = await _respond(http, fleet[0], "stored while Redis is up")
            redis_server.kill()
            with trio.fail_after(30):
                while (await fleet[0].detailed(http))["cluster"]["redis"]["state"] == "up":
                    await trio.sleep(0.02)
            detailed = await fleet[0].detailed(http)
            assert detailed["cluster"]["status"] == "degraded" and detailed["status"] == "degraded"
            assert "runestone_redis_up 0" in (await http.get(fleet[0].url + "/metrics")).text
            local = await _respond(http, fleet[0], "stored while Redis is down")
            follow = await _respond(http, fleet[0], "continued on the same instance", previous=local["id"])
            assert follow["status"] == "completed"
            r = await http.post(fleet[0].url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
            # A response only Redis held is not found meanwhile: a clear 404, never a 5xx.
            r = await http.get(f"{fleet[1].url}/v1/responses/{shared['id']}")
            assert r.status_code == 404
            r = await http.delete(f"{fleet[1].url}/v1/responses/{shared['id']}")
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            redis_server.start()
            await fleet.wait_shared()
            again = await _respond(http, fleet[2], "shared again")
            r = await http.get(f"{fleet[1].url}/v1/responses/{again['id']}")
            assert r.status_code == 200
