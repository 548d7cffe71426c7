"""Admission across the fleet beyond the limits themselves: two ``runestone serve`` processes, one redis-server.

- Cached answers count fleet-wide: with a shared RPM of 3, one request repeated (and answered from the
  response cache) through both instances is admitted exactly 3 times in all.
- ``x-ratelimit-*`` headers on fleet-admitted requests: what instance B sends reflects the requests and
  the tokens spent through A.
- ``[limits] queue`` with the fleet: a request over the fleet's concurrency limit waits on its instance
  until the holder on the other instance finishes, then is served.
- The admin views and ``/v1/key`` show the fleet's spend (Redis's period hash), not one instance's.

Waits are polls or events under generous bounds (they catch a hang, not slowness); nothing asserts how
long anything took.
"""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
import trio
import trio_websocket

from fleettest import ADMIN, ASK, Fleet, priced_config, until
from runestone.front.auth import key_id_of

CLIENT = {"authorization": "Bearer client-key"}
#: client-key's subject in Redis (runestone.cluster.limits)
SUBJECT = f"runestone:lim:static:{key_id_of('client-key')}"


def _config(upstream_port: int, extra: str = "") -> str:
    return priced_config(upstream_port, ["client-key"], extra)


async def test_cached_answers_count_against_the_fleets_rate_limit(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory()
    config = _config(upstream.port, "[cache]\nenabled = true\n[limits]\nrequests_per_minute = 3\n")
    async with Fleet(tmp_path, redis_server.url, config, size=2, headers=ADMIN) as fleet:
        a, b = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            statuses, caches = [], []
            for inst in (a, a, b, b, a, b, a, b, a):  # the second (through A) is a hit from A's own cache
                r = await http.post(inst.url + "/v1/chat/completions", headers=CLIENT, json=ASK)
                statuses.append(r.status_code)
                caches.append(r.headers.get("x-runestone-cache"))
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            assert caches[1] == "hit", caches
            assert statuses.count(200) == 3 and statuses.count(429) == 6, (statuses, caches)


async def test_rate_limit_headers_through_b_reflect_requests_made_through_a(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory()
    # one request per 36 s and 8000 tokens a minute (133 a second) refill far slower than these requests go
    config = _config(upstream.port, "[limits]\nrequests_per_hour = 100\ntokens_per_minute = 8000\n")
    big = {**ASK, "messages": [{"role": "user", "content": "word " * 4000}]}
    async with Fleet(tmp_path, redis_server.url, config, size=2, headers=ADMIN) as fleet:
        a, b = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            for body in (big, ASK, ASK):
                r = await http.post(a.url + "/v1/chat/completions", headers=CLIENT, json=body)
                assert r.status_code == 200, r.text
                assert r.headers["x-ratelimit-limit-requests"] == "100"
            used = r.json()["usage"]["total_tokens"]

            async def settled() -> bool:  # A's settlements (the tokens) are in Redis
                return (redis_server.command("ZCARD", SUBJECT + ":holds") == 0
                        and redis_server.command("EXISTS", SUBJECT + ":tpm") == 1)

            await until("A's requests settled in Redis", settled)
            r = await http.post(b.url + "/v1/chat/completions", headers=CLIENT, json=ASK)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "100"
            assert r.headers["x-ratelimit-remaining-requests"] == "96"  # three through A, this one through B
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert r.headers["x-ratelimit-limit-tokens"] == "8000"
            # the big request's ~4000 tokens (and two small ones) were spent through A
            assert used > 0 and int(r.headers["x-ratelimit-remaining-tokens"]) <= 7000, dict(r.headers)


async def test_a_queued_request_waits_for_the_fleets_concurrency_and_is_served(tmp_path, redis_server,
                                                                               gated_factory):
    upstream, gate, _ = await gated_factory(after=1)
    # one request in flight fleet-wide; a second waits (a bound far above what it needs: only a hang trips it)
    config = _config(upstream.port, "[limits]\nmax_concurrent_per_tenant = 1\nqueue = true\n"
                                    "queue_timeout_ms = 120000\n")
    async with Fleet(tmp_path, redis_server.url, config, size=2, headers=ADMIN) as fleet:
        a, b = fleet.instances
        async with httpx.AsyncClient(timeout=180) as http:
            outcomes: dict[str, tuple] = {}

            async def first() -> None:  # a stream through A, held by the gate after its first frame
                async with http.stream("POST", a.url + "/v1/chat/completions", headers=CLIENT,
                                       json={**ASK, "stream": True}) as r:
                    body = b"".join([chunk async for chunk in r.aiter_bytes()])
                outcomes["first"] = (r.status_code, body)

            async def second() -> None:  # the same key through B, over the fleet's limit while the first runs
                r = await http.post(b.url + "/v1/chat/completions", headers=CLIENT, json=ASK)
                outcomes["second"] = (r.status_code, r.text)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                with trio.fail_after(60):
                    await gate.wait_held(1)
                nursery.start_soon(second)

                async def b_waits() -> bool:
                    assert "second" not in outcomes, outcomes["second"]  # refused at once: not queued
                    return (await b.detailed(http))["cluster"]["limits"].get("queued_admissions") == 1

                await until("the second request waiting on B", b_waits)
                gate.open()
            assert outcomes["first"][0] == 200 and b"[DONE]" in outcomes["first"][1]
            assert outcomes["second"][0] == 200, outcomes["second"]
            # nothing waits any more, and no hold is left in Redis
            assert (await b.detailed(http))["cluster"]["limits"]["queued_admissions"] == 0

            async def no_holds() -> bool:
                return redis_server.command("ZCARD", SUBJECT + ":holds") == 0

            await until("both holds given back", no_holds)


async def test_a_stream_longer_than_the_hold_ttl_keeps_its_concurrency_place(tmp_path, redis_server,
                                                                             gated_factory):
    upstream, gate, _ = await gated_factory(after=1)
    # holds of 2 s (renewed every 2/3 s while their request runs); one request in flight fleet-wide
    config = "hold_ttl_ms = 2000\n" + _config(upstream.port, "[limits]\nmax_concurrent_per_tenant = 1\n")
    async with Fleet(tmp_path, redis_server.url, config, size=2, headers=ADMIN) as fleet:
        a, b = fleet.instances
        async with httpx.AsyncClient(timeout=60) as http:
            outcome: list = []

            async def long_stream() -> None:  # through A, held by the gate after its first frame
                async with http.stream("POST", a.url + "/v1/chat/completions", headers=CLIENT,
                                       json={**ASK, "stream": True}) as r:
                    body = b"".join([chunk async for chunk in r.aiter_bytes()])
                outcome.append((r.status_code, body))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_stream)
                with trio.fail_after(60):
                    await gate.wait_held(1)
                [lease, first_expiry] = redis_server.command("ZRANGE", SUBJECT + ":holds", 0, -1, "WITHSCORES")

                async def first_expiry_passed() -> bool:  # the wall clock Redis and the instances judge by
                    return time.time() * 1000 > float(first_expiry) + 500

                await until("the hold's first expiry passed", first_expiry_passed)
                # still held: renewed by A, so a request through B is over the fleet's concurrency
                assert float(redis_server.command("ZSCORE", SUBJECT + ":holds", lease)) > float(first_expiry)
                r = await http.post(b.url + "/v1/chat/completions", headers=CLIENT, json=ASK)
                assert r.status_code == 429, r.text
                assert "1 requests in flight across the fleet" in r.json()["error"]["message"]
                assert (await a.detailed(http))["cluster"]["limits"]["renewed_holds"] >= 1
                gate.open()
            assert outcome[0][0] == 200 and b"[DONE]" in outcome[0][1]

            async def b_admitted() -> bool:  # the stream's end gave its place back
                r = await http.post(b.url + "/v1/chat/completions", headers=CLIENT, json=ASK)
                return r.status_code == 200

            await until("a request through B admitted after the stream ended", b_admitted)


async def test_spend_made_through_a_is_shown_by_bs_admin_views_and_v1_key(tmp_path, redis_server, fake_factory):
    upstream, _ = await fake_factory(text="aaa bbb ccc", chunks=1)
    async with Fleet(tmp_path, redis_server.url, _config(upstream.port), size=2, headers=ADMIN) as fleet:
        a, b = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(a.url + "/admin/teams", headers=ADMIN,
                                json={"name": "eng", "budget": {"usd": 10, "period": "month"}})
            assert r.status_code == 201, r.text
            r = await http.post(a.url + "/admin/keys", headers=ADMIN,
                                json={"name": "k", "team": "eng", "budget": {"usd": 5, "period": "day"}})
            assert r.status_code == 201, r.text
            kid, secret = r.json()["id"], r.json()["secret"]
            for _ in range(3):
                r = await http.post(a.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                                    json=ASK)
                assert r.status_code == 200, r.text
            # what A itself recorded (A served every request): the fleet's spend
            spent = (await http.get(f"{a.url}/admin/keys/{kid}", headers=ADMIN)).json()["spend"]["spent_usd"]
            assert spent > 0

            async def b_shows_it() -> bool:  # once B heard of the key and A's settlements reached Redis
                r = await http.get(f"{b.url}/admin/keys/{kid}", headers=ADMIN)
                return r.status_code == 200 and r.json()["spend"]["spent_usd"] == spent

            await until("A's spend shown by B", b_shows_it)
            key = (await http.get(f"{b.url}/admin/keys/{kid}", headers=ADMIN)).json()
            assert key["spend_source"] == "fleet" and key["spend"]["requests"] == 3
            assert key["spend"]["remaining_usd"] == pytest.approx(5 - spent)
            team = (await http.get(f"{b.url}/admin/teams/eng", headers=ADMIN)).json()
            assert team["spend"]["spent_usd"] == spent and team["spend_source"] == "fleet"
            listed = (await http.get(f"{b.url}/admin/keys", headers=ADMIN)).json()["data"]
            assert [k["spend"]["spent_usd"] for k in listed if k["id"] == kid] == [spent]
            teams = (await http.get(f"{b.url}/admin/teams", headers=ADMIN)).json()["data"]
            assert [t["spend"]["spent_usd"] for t in teams if t["name"] == "eng"] == [spent]
            own = (await http.get(f"{b.url}/v1/key", headers={"authorization": f"Bearer {secret}"})).json()
            assert own["spend"]["spent_usd"] == spent and own["team_spend"]["spent_usd"] == spent
            assert own["spend_source"] == "fleet"
            # the control socket's views are the same as the HTTP ones
            async with trio_websocket.open_websocket_url(
                    f"{b.url.replace('http', 'ws', 1)}/v1/control",
                    extra_headers=[(b"authorization", ADMIN["authorization"].encode())]) as control:
                for op, fields in (("get_key", {"key_id": kid}), ("get_team", {"name": "eng"}),
                                   ("list_keys", {}), ("list_teams", {})):
                    await control.send_message(orjson.dumps({"type": op, "id": op, **fields}).decode())
                    reply = orjson.loads(await control.get_message())
                    docs = reply["result"] if isinstance(reply["result"], list) else [reply["result"]]
                    assert [d["spend"]["spent_usd"] for d in docs if d.get("id", d.get("name")) in (kid, "eng")] \
                        == [spent], (op, reply)
                    assert all(d["spend_source"] == "fleet" for d in docs), (op, reply)

            redis_server.kill()  # B's own spend then, and it says so (never an error)
            key = (await http.get(f"{b.url}/admin/keys/{kid}", headers=ADMIN)).json()
            assert key["spend_source"] == "local" and key["spend"]["spent_usd"] == 0
