"""Keys and teams fleet-wide: three ``runestone serve`` processes and one redis-server.

A key created through one instance's admin API works on the other two; models patched on a second are
refused on the third; revoked on the third it is a 401 on the first; a rotation (with grace) and a team's
budget change reach every instance; after a restart of all three everything holds from their own stores;
the stream carries digests, never a secret. While Redis is down a key created on one instance works there
at once and on the others once Redis is back. Everything is polled under generous bounds (they catch a
hang, not slowness); nothing asserts how long it took.
"""

from __future__ import annotations

import hashlib

import httpx
import trio

from fleettest import Fleet
from gatewaytest import provider_toml

CONFIG = ('[auth]\napi_keys = ["static-key"]\nadmin_key = "admin-key"\n[telemetry]\nusage_ledger = false\n'
          '[pricing."base-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n'
          + provider_toml("base", "fake", models=["base-model"]))
ADMIN = {"authorization": "Bearer admin-key"}
BOUND = 20.0


async def _status(http, inst, secret: str) -> int:
    r = await http.post(inst.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                        json={"model": "base-model", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 4})
    return r.status_code


async def _until(http, instances, secret: str, want: int, what: str) -> None:
    got: list[int] = []
    with trio.move_on_after(BOUND):
        while True:
            got = [await _status(http, inst, secret) for inst in instances]
            if all(s == want for s in got):
                return
            await trio.sleep(0.05)
    raise AssertionError(f"{what}: not every instance answered {want} within {BOUND} s (last: {got})")


async def _admin(http, inst, method: str, path: str, body=None, status: int = 200) -> dict:
    r = await http.request(method, inst.url + path, headers=ADMIN, json=body)
    assert r.status_code == status, r.text
    return r.json()


async def test_key_and_team_changes_reach_every_instance_and_survive_a_restart(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        a, b, c = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            await _admin(http, a, "POST", "/admin/teams", {"name": "eng", "budget": {"usd": 100, "period": "month"}},
                         201)
            first = await _admin(http, a, "POST", "/admin/keys", {"name": "first", "team": "eng"}, 201)
            await _until(http, [a, b, c], first["secret"], 200, "a key created on A")

            await _admin(http, b, "PATCH", f"/admin/keys/{first['id']}", {"models": ["other-model"]})
            await _until(http, [c, a], first["secret"], 403, "models patched on B")

            await _admin(http, c, "DELETE", f"/admin/keys/{first['id']}")
            await _until(http, [a, b], first["secret"], 401, "revoked on C")

            second = await _admin(http, b, "POST", "/admin/keys", {"name": "second", "team": "eng"}, 201)
            await _until(http, [a, c], second["secret"], 200, "a second key created on B")
            rotated = await _admin(http, a, "POST", f"/admin/keys/{second['id']}/rotate", {"grace_ms": 3_600_000})
            await _until(http, [b, c], rotated["secret"], 200, "the rotated secret")
            assert [await _status(http, inst, second["secret"]) for inst in (b, c)] == [200, 200]  # in its grace

            await _admin(http, a, "PATCH", "/admin/teams/eng", {"budget": {"usd": 0, "period": "month"}})
            await _until(http, [b, c], rotated["secret"], 429, "the team's budget cut to 0 on A")
            view = await _admin(http, c, "GET", "/admin/teams/eng")
            assert view["budget"] == {"usd": 0.0, "period": "month"}

            entries = redis_server.command("XRANGE", "runestone:governance", "-", "+")
            raw = repr(entries)
            assert len(entries) == 7, raw  # team, key, patch, revoke, key, rotation, team patch
            for secret in (first["secret"], second["secret"], rotated["secret"]):
                assert secret not in raw
            assert hashlib.sha256(rotated["secret"].encode()).hexdigest() in raw  # what travels instead

            for inst in (b, c):
                detailed = await inst.detailed(http)
                assert detailed["cluster"]["governance"]["applied"] >= 5, detailed["cluster"]
                assert detailed["cluster"]["governance"]["waiting"] == 0
            metrics = (await http.get(b.url + "/metrics", headers=ADMIN)).text
            assert 'runestone_fleet_key_changes_total{outcome="applied"}' in metrics, metrics[-2000:]

            redis_server.command("DEL", "runestone:governance")  # only their stores have the keys now
            await fleet.restart()
            await _until(http, [a, b, c], first["secret"], 401, "the revocation after a restart")
            await _until(http, [a, b, c], rotated["secret"], 429, "the team's budget after a restart")
            await _admin(http, c, "PATCH", "/admin/teams/eng", {"budget": {"usd": 100, "period": "month"}})
            await _until(http, [a, b, c], rotated["secret"], 200, "the team's budget raised on C after a restart")


async def test_a_key_created_while_redis_is_down_works_there_at_once_and_everywhere_once_back(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        a, b, c = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            redis_server.kill()
            with trio.fail_after(30):
                while (await a.detailed(http))["cluster"]["redis"]["state"] == "up":
                    await trio.sleep(0.02)
            key = await _admin(http, a, "POST", "/admin/keys", {"name": "offline"}, 201)
            assert await _status(http, a, key["secret"]) == 200  # in force here at once
            assert (await a.detailed(http))["cluster"]["governance"]["waiting"] == 1
            assert await _status(http, b, key["secret"]) == 401
            redis_server.start()
            await fleet.wait_shared()
            await _until(http, [b, c], key["secret"], 200, "the key created while Redis was down")
            assert (await a.detailed(http))["cluster"]["governance"]["waiting"] == 0
