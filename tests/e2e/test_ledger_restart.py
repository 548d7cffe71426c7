"""The usage ledger loses nothing: 1,000 requests with a SIGTERM partway through and a restart.

The gateway runs as a real process (``runestone serve``); SIGTERM must stop it gracefully (in-flight
requests finish, the ledger is flushed, exit 0). The ledger's totals must then equal the usage that the
fake provider reported in the responses the clients actually received.
"""

import signal
import textwrap
import time

import httpx
import trio

from gatewaytest import free_port, start_gateway_process, wait_ready

TOTAL = 1000
WORKERS = 8


async def test_ledger_totals_survive_sigterm_and_restart(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "runestone.toml"
    config.write_text(textwrap.dedent(f"""
        [data]
        dir = "{data}"
        [auth]
        api_keys = ["ledger-key"]
        admin_key = "ledger-admin"
        [telemetry]
        ledger_flush_ms = 60000
        ledger_batch = 100000
        [[providers]]
        name = "fake"
        type = "fake"
        [providers.config]
        models = ["fake-model"]
    """))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": "Bearer ledger-key"}
    got = {"requests": 0, "tokens_in": 0, "tokens_out": 0}
    sent = 0

    async def run_batch(limit: int) -> None:
        nonlocal sent

        async def worker(http):
            nonlocal sent
            while sent < limit:
                sent += 1
                body = {"model": "fake-model", "messages": [{"role": "user", "content": f"request {sent}"}]}
                try:
                    r = await http.post("/v1/chat/completions", json=body, headers=headers)
                except httpx.TransportError:
                    sent -= 1  # refused while stopping: not served, so not recorded; send it again later
                    return
                if r.status_code == 200:
                    usage = r.json()["usage"]
                    got["requests"] += 1
                    got["tokens_in"] += usage["prompt_tokens"]
                    got["tokens_out"] += usage["completion_tokens"]
                else:
                    sent -= 1
                    return

        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with trio.open_nursery() as n:
                for _ in range(WORKERS):
                    n.start_soon(worker, http)

    proc = start_gateway_process(str(config), port, tmp_path / "log1")
    try:
        await wait_ready(url, proc)
        async with trio.open_nursery() as n:
            n.start_soon(run_batch, TOTAL)
            with trio.fail_after(300):  # only a hang trips this
                while sent < TOTAL // 2:
                    await trio.sleep(0.005)
            proc.send_signal(signal.SIGTERM)  # mid-traffic: with a 60 s flush interval, only shutdown flushes
        assert await trio.to_thread.run_sync(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    first = got["requests"]
    assert TOTAL // 4 < first < TOTAL

    proc = start_gateway_process(str(config), port, tmp_path / "log2")
    try:
        await wait_ready(url, proc)
        await run_batch(TOTAL)
        assert got["requests"] == TOTAL
        async with httpx.AsyncClient(base_url=url) as http:
            usage = (await http.get("/v1/usage", headers={"authorization": "Bearer ledger-admin"})).json()
        totals = usage["totals"]
        assert totals["requests"] == TOTAL
        assert totals["tokens_in"] == got["tokens_in"]
        assert totals["tokens_out"] == got["tokens_out"]
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(0)
