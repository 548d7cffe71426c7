"""Budget reservations and settled spend survive a SIGKILL (the budget journal, runestone.governance.journal).

A real gateway process with a managed key in a team (both with budgets) and ``[budgets] flush_ms = 200``
(spend is checkpointed to the key store several times during the run, so replay starts from a checkpoint
with journal segments after it). Four clients keep it busy with answers of known cost while three
streams are held open by the upstream (their reservations are in flight for sure); then SIGKILL, and a
restart on the same data directory. After it: the key's and the team's settled spend is what the clients
received, give or take the answers settled in the instant before the kill that were still on their way
(at most one per client: a whole number of answers, never less than received), no reservation is held,
and the log has the one recovery line with its counts (the held streams among the released).
"""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest
import trio

from gatewaytest import free_port, provider_toml, start_gateway_process, wait_ready

ADMIN = {"authorization": "Bearer ak-budget-kill"}
WORKERS = 4
HELD = 3
ENOUGH = 200
#: The upstream's answer is 4 output tokens at $0.001 each (input is free): every answer costs this.
ANSWER_USD = 0.004
PRICING = '[pricing."fake-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n'


async def test_a_sigkill_loses_no_settled_spend_and_leaves_no_reservation_held(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(after=1, text="aaa bbb ccc ddd", chunks=1)
    data = tmp_path / "data"
    config = tmp_path / "runestone.toml"
    config.write_text(f'[data]\ndir = "{data}"\n[auth]\nadmin_key = "ak-budget-kill"\n[budgets]\nflush_ms = 200\n'
                      + PRICING + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up",
                         models=["fake-model"]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    received: list[float] = []  # the cost of each answer a client got, from its usage
    held = 0
    killed = False

    proc = start_gateway_process(str(config), port, tmp_path / "log1")
    try:
        await wait_ready(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.post("/admin/teams", headers=ADMIN, json={"name": "kill", "budget": {"usd": 1000,
                                                                                                "period": "month"}})
            assert r.status_code == 201, r.text
            r = await http.post("/admin/keys", headers=ADMIN, json={"name": "k", "team": "kill",
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
                nonlocal held
                try:
                    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                                           headers=auth) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_bytes():
                            held += 1  # its first chunk is here; the upstream holds the rest
                            await trio.sleep_forever()
                except httpx.TransportError:
                    pass

            async with trio.open_nursery() as n:
                for _ in range(HELD):
                    n.start_soon(held_stream)
                with trio.fail_after(60):
                    await gate.wait_held(HELD)
                for _ in range(WORKERS):
                    n.start_soon(worker)
                with trio.fail_after(120):  # bounded: a slow machine only takes longer to get there
                    while len(received) < ENOUGH or held < HELD:
                        await trio.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                n.cancel_scope.cancel()
        assert await trio.to_thread.run_sync(proc.wait, 20) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.open()

    proc = start_gateway_process(str(config), port, tmp_path / "log2")  # the same data directory, after the kill
    try:
        await wait_ready(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            key = (await http.get(f"/admin/keys/{key_id}", headers=ADMIN)).json()["spend"]
            team = (await http.get("/admin/teams/kill", headers=ADMIN)).json()["spend"]
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    got = sum(received)
    assert all(c == pytest.approx(ANSWER_USD) for c in received)
    # Settled spend: what the clients received, plus at most one answer per client settled just before the kill
    # and not delivered (the pipeline settles, then the answer is written).
    extra = round((key["spent_usd"] - got) / ANSWER_USD, 6)
    assert extra == int(extra) and 0 <= extra <= WORKERS, (key, got)
    assert team["spent_usd"] == pytest.approx(key["spent_usd"])
    # No reservation held: everything not spent remains.
    assert key["reserved_usd"] == 0 and team["reserved_usd"] == 0
    assert key["remaining_usd"] == pytest.approx(500 - key["spent_usd"])
    # Every request admitted was counted: the answered ones, the held streams, the workers' last ones.
    assert len(received) + HELD <= key["requests"] <= len(received) + HELD + WORKERS
    log = (tmp_path / "log2").read_text()
    m = re.search(r"budget journal replayed .*?: (\d+) settled reservation\(s\) charged .*?; (\d+) reservation\(s\) "
                  r"in flight at the stop released", log)
    assert m, log
    settled, released = int(m.group(1)), int(m.group(2))
    assert HELD <= released <= HELD + WORKERS
    # How many settlements the replay charges depends on how many came after the last 200 ms checkpoint (none,
    # on a slow enough machine): that the replay charges them is tests/governance/test_journal.py's to show.
    print(f"received {len(received)} answers (${got:.3f}); settled ${key['spent_usd']:.3f} ({extra:.0f} in transit "
          f"at the kill); the replay charged {settled} and released {released}")
