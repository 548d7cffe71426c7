"""Control changes fleet-wide: three ``runestone serve`` processes and one redis-server.

A provider registered through one instance's admin API serves on the other two, and on all three after all
are restarted; a fourth instance that joins later replays the stream and serves it too; a group created and
a provider unregistered through the control socket of another instance are changed everywhere. While Redis
is down a change applies on its own instance at once and reaches the others, in order, once Redis is back.
Everything is polled under generous bounds; nothing asserts how long it took.
"""

from __future__ import annotations

import json

import httpx
import trio
from trio_websocket import open_websocket_url

from fleettest import Fleet
from gatewaytest import provider_toml

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
CONFIG = KEYS + "[telemetry]\nusage_ledger = false\n" + provider_toml("base", "fake", models=["base-model"])
ADMIN = {"authorization": "Bearer admin-key"}
CLIENT = {"authorization": "Bearer client-key"}


async def _serves(http, inst, model: str) -> bool:
    r = await http.post(inst.url + "/v1/chat/completions", headers=CLIENT,
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code == 200


async def _until_all(http, instances, model: str, want: bool, what: str, bound: float = 20.0) -> None:
    with trio.move_on_after(bound):
        while True:
            if all([await _serves(http, inst, model) == want for inst in instances]):
                return
            await trio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {bound} s")


async def _control(inst, message: dict) -> dict:
    url = inst.url.replace("http://", "ws://") + "/v1/control"
    async with open_websocket_url(url, extra_headers=[("authorization", "Bearer admin-key")]) as ws:
        await ws.send_message(json.dumps(message))
        with trio.fail_after(30):
            while True:
                reply = json.loads(await ws.get_message())
                if reply.get("id") == message["id"]:
                    return reply


async def test_provider_registered_on_one_serves_on_all_and_after_restart(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            assert not await _serves(http, fleet[1], "late-model")
            r = await http.post(fleet[0].url + "/admin/providers", headers=ADMIN,
                                json={"name": "late", "type": "fake", "config": {"models": ["late-model"]}})
            assert r.status_code == 201, r.text
            assert await _serves(http, fleet[0], "late-model")
            await _until_all(http, fleet.instances, "late-model", True, "late-model served by all three")

            await fleet.restart()
            await _until_all(http, fleet.instances, "late-model", True, "late-model served after a restart")

            newcomer = fleet.new_instance()
            await newcomer.start()
            await _until_all(http, [newcomer], "late-model", True, "late-model replayed on a new instance")

            reply = await _control(fleet[1], {"type": "unregister_provider", "id": 1, "name": "late"})
            assert reply["type"] == "result", reply
            await _until_all(http, fleet.instances, "late-model", False, "late-model gone everywhere")
            for inst in fleet.instances:
                detailed = await inst.detailed(http)
                assert detailed["cluster"]["control"]["waiting"] == 0


async def test_changes_made_while_redis_is_down_are_shared_in_order_when_back(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        async with httpx.AsyncClient(timeout=30) as http:
            redis_server.kill()
            with trio.fail_after(30):
                while (await fleet[0].detailed(http))["cluster"]["redis"]["state"] == "up":
                    await trio.sleep(0.02)
            provider = {"name": "offline", "type": "fake", "config": {"models": ["offline-model"]}}
            r = await http.post(fleet[0].url + "/admin/providers", headers=ADMIN, json=provider)
            assert r.status_code == 201, r.text  # in force here at once
            assert await _serves(http, fleet[0], "offline-model")
            r = await http.delete(fleet[0].url + "/admin/providers/offline", headers=ADMIN)
            assert r.status_code == 200, r.text
            r = await http.post(fleet[0].url + "/admin/providers", headers=ADMIN,
                                json={**provider, "config": {"models": ["offline-model", "second-model"]}})
            assert r.status_code == 201, r.text
            assert not await _serves(http, fleet[1], "second-model")
            redis_server.start()
            await fleet.wait_shared()
            # register, unregister, register again: applied in that order, the last one wins everywhere
            await _until_all(http, fleet.instances, "second-model", True, "the queued changes shared")
            assert all([await _serves(http, inst, "offline-model") for inst in fleet.instances])
