"""A gateway killed under budgeted load, for the tests that show a SIGKILL loses no spend (the budget journal).

:func:`spend_then_sigkill` makes a team and a managed key in it (both with budgets) on a running gateway,
holds ``held`` streams open at the upstream's gate (their reservations are in flight for sure), keeps
``workers`` clients busy with answers of known cost until ``enough`` arrived, then SIGKILLs the gateway.
A plain module, imported by name as ``gatewaytest`` is.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio

from gatewaytest import free_port, provider_toml, start_gateway_process, wait_ready

#: The upstream's answer is 4 output tokens at $0.001 each (input is free): every answer costs this.
ANSWER_USD = 0.004
PRICING = '[pricing."fake-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n'


def budget_config(tmp_path, upstream, admin_key: str, extra: str) -> tuple[str, str, int]:
    """A config (data in ``tmp_path/data``, the gated ``upstream``, ``extra`` settings): (its path, url, port)."""
    config = tmp_path / "runestone.toml"
    config.write_text(f'[data]\ndir = "{tmp_path / "data"}"\n[auth]\nadmin_key = "{admin_key}"\n' + extra + PRICING
                      + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up",
                                      models=["fake-model"]))
    port = free_port()
    return str(config), f"http://127.0.0.1:{port}", port


async def spend_then_sigkill(url: str, proc, gate, *, admin: dict, team: str, workers: int, held: int,
                             enough: int) -> tuple[str, list[float]]:
    """(the key's id, the cost of each answer a client got, from its usage) once the gateway ``proc`` (just
    started) is ready, loaded and killed; it is killed, and the gate opened, whatever happens."""
    try:
        await wait_ready(url, proc)
        return await _load_and_kill(url, proc, gate, admin, team, workers, held, enough)
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.open()


async def _load_and_kill(url, proc, gate, admin, team, workers, held, enough) -> tuple[str, list[float]]:
    received: list[float] = []
    streams = 0
    killed = False
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/admin/teams", headers=admin, json={"name": team, "budget": {"usd": 1000,
                                                                                          "period": "month"}})
        assert r.status_code == 201, r.text
        r = await http.post("/admin/keys", headers=admin, json={"name": "k", "team": team,
                                                                "budget": {"usd": 500, "period": "total"}})
        assert r.status_code == 201, r.text
        key_id, secret = r.json()["id"], r.json()["secret"]
        auth = {"authorization": f"Bearer {secret}"}
        body = {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}

        async def worker() -> None:
            for _ in range(100_000):
                if killed:
                    return
                try:
                    r = await http.post("/v1/chat/completions", json=body, headers=auth)
                except httpx.TransportError:
                    return  # the gateway is gone
                assert r.status_code == 200, r.text
                received.append(r.json()["usage"]["completion_tokens"] * 0.001)

        async def held_stream() -> None:
            nonlocal streams
            try:
                async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                                       headers=auth) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        streams += 1  # its first chunk is here; the upstream holds the rest
                        await trio.sleep_forever()
            except httpx.TransportError:
                pass

        async with trio.open_nursery() as n:
            for _ in range(held):
                n.start_soon(held_stream)
            with trio.fail_after(60):
                await gate.wait_held(held)
            for _ in range(workers):
                n.start_soon(worker)
            with trio.fail_after(120):  # bounded: a slow machine only takes longer to get there
                while len(received) < enough or streams < held:
                    await trio.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            n.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(proc.wait, 20) == -signal.SIGKILL
    return key_id, received


async def spend_after_restart(config: str, url: str, port: int, log: Path, *, admin: dict, key_id: str,
                              team: str) -> tuple[dict, dict]:
    """Start the gateway again (same data directory), read the key's and the team's spend, stop it (SIGTERM)."""
    proc = start_gateway_process(config, port, log)
    try:
        await wait_ready(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            key = (await http.get(f"/admin/keys/{key_id}", headers=admin)).json()["spend"]
            team_spend = (await http.get(f"/admin/teams/{team}", headers=admin)).json()["spend"]
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return key, team_spend
