"""A SIGKILL under load loses at most the last flush interval of usage rows.

The gateway runs as a real process with the default ``ledger_flush_ms = 200``; four clients keep it busy
(streamed and not), each request with its own ``x-request-id``, and note the moment each answer was complete
(``time.monotonic``, one clock for every process of the machine). The gateway is then killed with SIGKILL and
started again on the same data directory. Every request answered more than one flush interval before the kill
must have its row in the ledger (the check allows a generous slack on top of the interval, so that a busy
machine cannot make it fail; it is no timing assertion), no row may be there twice, and none that nobody sent.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import httpx
import trio

from gatewaytest import free_port, provider_toml, start_gateway_process, wait_ready

FLUSH_S = 0.2
SLACK_S = 3.0
WORKERS = 4
ENOUGH = 300  # rows answered before the window that may be lost, at the kill


async def test_a_sigkill_loses_at_most_the_last_flush_interval_of_rows(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "runestone.toml"
    config.write_text(f'[data]\ndir = "{data}"\n[auth]\napi_keys = ["kill-key"]\n'
                      f"[telemetry]\nledger_flush_ms = {int(FLUSH_S * 1000)}\n"
                      + provider_toml("fake", "fake", models=["fake-model"]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sent: set[str] = set()
    answered: list[tuple[str, float]] = []
    killed = False

    async def worker(http, w: int) -> None:
        for i in range(100_000):
            if killed:
                return
            rid = f"kill-w{w}-{i}"
            sent.add(rid)
            body = {"model": "fake-model", "stream": i % 2 == 1, "messages": [{"role": "user", "content": rid}]}
            try:
                r = await http.post("/v1/chat/completions", json=body,
                                    headers={"authorization": "Bearer kill-key", "x-request-id": rid})
            except httpx.TransportError:
                return  # the gateway is gone
            if r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]")):
                answered.append((rid, time.monotonic()))

    proc = start_gateway_process(str(config), port, tmp_path / "log1")
    try:
        await wait_ready(url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with trio.open_nursery() as n:
                for w in range(WORKERS):
                    n.start_soon(worker, http, w)
                with trio.fail_after(120):  # bounded: a slow machine only takes longer to get there
                    while sum(1 for _, t in answered if t < time.monotonic() - FLUSH_S - SLACK_S) < ENOUGH:
                        await trio.sleep(0.05)
                kill_at = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        assert await trio.to_thread.run_sync(proc.wait, 20) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()

    proc = start_gateway_process(str(config), port, tmp_path / "log2")  # the same ledger, after the kill
    try:
        await wait_ready(url, proc)
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    with sqlite3.connect(data / "usage.sqlite3") as c:
        rows = [r[0] for r in c.execute("SELECT request_id FROM usage")]
    stored = set(rows)
    assert len(rows) == len(stored)  # none twice
    assert stored <= sent  # none that nobody sent
    due = {rid for rid, t in answered if t < kill_at - FLUSH_S - SLACK_S}
    assert len(due) >= ENOUGH
    assert due <= stored, f"{len(due - stored)} rows answered long before the kill are missing"
    lost = [kill_at - t for rid, t in answered if rid not in stored]
    print(f"answered {len(answered)}, stored {len(stored)}, lost {len(lost)} answered rows "
          f"(oldest {max(lost, default=0):.3f} s before the kill)")
