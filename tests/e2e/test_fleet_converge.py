"""Concurrent changes to one name on two instances converge: three ``runestone serve`` processes, one Redis.

Two instances change the same key (a PATCH of its ``models``, each with other models) or register the same
provider name with different settings at the same moment (both requests released together by one event,
over connections opened beforehand). Each applies its own change first; the stream is the order, so every
instance of the three ends in the state the stream's last entry for that name carries. The rounds repeat,
each a new race. Polled a bounded number of times; nothing asserts how long it took.
"""

from __future__ import annotations

import orjson
import trio

import httpx

from fleettest import Fleet
from gatewaytest import provider_toml

CONFIG = ('[auth]\napi_keys = ["static-key"]\nadmin_key = "admin-key"\n[telemetry]\nusage_ledger = false\n'
          + provider_toml("base", "fake", models=["base-model"]))
ADMIN = {"authorization": "Bearer admin-key"}
ROUNDS = 4
#: Polls of every instance before the test gives up (0.05 s apart: about 20 s, far past the 2 s promised).
POLLS = 400


async def _together(*calls) -> list:
    """Run the calls at the same moment: each waits on one event, set once all are waiting."""
    go = trio.Event()
    waiting = 0
    results: list = [None] * len(calls)

    async def one(i, call) -> None:
        nonlocal waiting
        waiting += 1
        await go.wait()
        results[i] = await call()

    async with trio.open_nursery() as n:
        for i, call in enumerate(calls):
            n.start_soon(one, i, call)
        while waiting < len(calls):
            await trio.sleep(0)
        go.set()
    return results


async def _last_entry(redis_server, stream: str, subject, count: int) -> dict:
    """The last entry of ``stream`` for which ``subject(change)`` holds, once there are ``count`` of them."""
    for _ in range(POLLS):
        entries = redis_server.command("XRANGE", stream, "-", "+")
        changes = [orjson.loads(dict(zip(f[::2], f[1::2]))[b"c"]) for _, f in entries]
        mine = [c for c in changes if subject(c)]
        if len(mine) >= count:
            assert len(mine) == count, mine
            return mine[-1]
        await trio.sleep(0.05)
    raise AssertionError(f"{count} entries never reached the stream {stream}")


async def _converged(read, instances, want, what: str) -> None:
    """Poll ``read(inst)`` on every instance until all show ``want`` (bounded in count)."""
    seen: list = []
    for _ in range(POLLS):
        seen = [await read(inst) for inst in instances]
        if all(v == want for v in seen):
            return
        await trio.sleep(0.05)
    raise AssertionError(f"{what}: not every instance came to {want} (last seen: {seen})")


async def test_two_patches_of_one_key_at_once_end_the_same_on_every_instance(tmp_path, redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        a, b, c = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(a.url + "/admin/keys", headers=ADMIN, json={"name": "raced"})
            assert r.status_code == 201, r.text
            kid = r.json()["id"]

            async def models(inst):
                r = await http.get(f"{inst.url}/admin/keys/{kid}", headers=ADMIN)
                return tuple(r.json()["models"] or ()) if r.status_code == 200 else None

            await _converged(models, fleet.instances, (), "the key created on A")
            for round_ in range(ROUNDS):
                def patch(inst, model):
                    return lambda: http.patch(f"{inst.url}/admin/keys/{kid}", headers=ADMIN, json={"models": [model]})

                replies = await _together(patch(a, f"a-model-{round_}"), patch(b, f"b-model-{round_}"))
                assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
                last = await _last_entry(redis_server, "runestone:governance",
                                         lambda ch: ch.get("id") == kid and ch["op"] == "update_key",
                                         2 * (round_ + 1))
                # The stream's last wins, on every instance (the two that raced included).
                await _converged(models, fleet.instances, tuple(last["patch"]["models"]), f"round {round_}")


async def test_one_provider_name_registered_on_two_instances_at_once_ends_the_same_everywhere(tmp_path,
                                                                                            redis_server):
    async with Fleet(tmp_path, redis_server.url, CONFIG, headers=ADMIN) as fleet:
        a, b, c = fleet.instances
        async with httpx.AsyncClient(timeout=30) as http:
            for round_ in range(ROUNDS):
                name = f"raced{round_}"

                async def models(inst):
                    r = await http.get(f"{inst.url}/admin/providers/{name}", headers=ADMIN)
                    return tuple(r.json()["config"]["models"]) if r.status_code == 200 else None

                def register(inst, model):
                    return lambda: http.post(inst.url + "/admin/providers", headers=ADMIN, json={
                        "name": name, "type": "fake", "config": {"models": [model]}})

                replies = await _together(register(a, f"a-model-{round_}"), register(b, f"b-model-{round_}"))
                # Each is applied where it was made (or, had the other's entry come first, refused there as a
                # name already taken): either way the stream orders them.
                assert all(r.status_code in (201, 409) for r in replies), [r.text for r in replies]
                last = await _last_entry(redis_server, "runestone:control",
                                         lambda ch: ch.get("provider", {}).get("name") == name,
                                         sum(r.status_code == 201 for r in replies))
                final = tuple(last["provider"]["config"]["models"])
                await _converged(models, fleet.instances, final, f"round {round_}")
                # And it serves that model on every instance.
                model = final[0]
                for inst in fleet.instances:
                    for _ in range(POLLS):
                        r = await http.post(inst.url + "/v1/chat/completions", headers={
                            "authorization": "Bearer static-key"},
                            json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
                        if r.status_code == 200:
                            break
                        await trio.sleep(0.05)
                    assert r.status_code == 200, r.text
