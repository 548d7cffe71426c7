"""Graceful shutdown of a real ``runestone serve`` process: SIGTERM lets in-flight streams finish, refuses
new connections, flushes the ledger and exits 0; a second signal stops at once.

The gateway's streams come from a gated fake upstream in the test's process: they wait at its gate while the
test signals, so they are still in flight then whatever the machine's speed. Waits are for a state (the log
line, a refused connection) under a deadline that only a hang reaches."""

import os
import signal
import subprocess
import sys
import textwrap

import httpx
import orjson
import trio

from gatewaytest import free_port, wait_ready

BODY = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "slow please"}]}


def _spawn(tmp_path, port: int, drain_ms: int, upstream_port: int) -> subprocess.Popen:
    cfg = tmp_path / "runestone.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        drain_timeout_ms = {drain_ms}
        [data]
        dir = "{tmp_path / 'data'}"
        [[providers]]
        name = "up"
        type = "openai"
        [providers.config]
        base_url = "http://127.0.0.1:{upstream_port}/v1"
        api_key = "sk-up"
        models = ["fake-model"]
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    return subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", str(cfg), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"), env=env)


async def _logged(tmp_path, text: str) -> str:
    """The first line of the gateway's log that contains ``text``, once it is there."""
    with trio.fail_after(120):  # only a hang trips this
        while True:
            hit = [ln for ln in (tmp_path / "log").read_text().splitlines() if text in ln]
            if hit:
                return hit[0]
            await trio.sleep(0.02)


async def _refused(url: str) -> httpx.Response | None:
    """Wait until a new connection is no longer served: None if refused, else the 503 it got."""
    with trio.fail_after(120):  # only a hang (or a listener that stays open) trips this
        while True:
            try:
                async with httpx.AsyncClient(base_url=url, timeout=60) as fresh:
                    late = await fresh.get("/health")
            except httpx.TransportError:
                return None  # refused: the listener is closed
            if late.status_code == 503:
                return late
            await trio.sleep(0.02)


async def _stream(http, started: trio.Event, results: list) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=BODY) as r:
        assert r.status_code == 200
        body = b""
        async for chunk in r.aiter_bytes():
            if not started.is_set():
                started.set()
            body += chunk
    results.append(body)


async def _streams_running(nursery, http, results: list, count: int) -> None:
    """Start ``count`` streams in ``nursery`` (their bodies go to ``results``); return once each has its first bytes."""
    starts = [trio.Event() for _ in range(count)]
    for ev in starts:
        nursery.start_soon(_stream, http, ev, results)
    for ev in starts:
        await ev.wait()


async def test_sigterm_lets_streams_finish_and_exits_zero(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=6)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=300_000, upstream_port=upstream.port)
    try:
        await wait_ready(url, proc)
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async with trio.open_nursery() as n:
                await _streams_running(n, http, results, 3)
                proc.send_signal(signal.SIGTERM)
                await _logged(tmp_path, "received SIGTERM: stopping gracefully")
                # Draining: the three streams wait at the gate while new connections are refused.
                await _refused(url)
                assert gate.held == 3 and not results
                gate.open()
        assert len(results) == 3
        for body in results:
            assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
        assert await trio.to_thread.run_sync(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_second_signal_stops_at_once(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=6)  # the stream waits at the gate, which never opens
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=300_000, upstream_port=upstream.port)
    try:
        await wait_ready(url, proc)
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            started = trio.Event()
            async with trio.open_nursery() as n:

                async def stream():
                    try:
                        await _stream(http, started, results)
                    except httpx.HTTPError:
                        results.append(b"cut")

                n.start_soon(stream)
                await started.wait()
                proc.send_signal(signal.SIGTERM)
                # Two signals sent before the first is handled would be one.
                await _logged(tmp_path, "received SIGTERM: stopping gracefully")
                proc.send_signal(signal.SIGTERM)
                # Well short of the 300 s drain: only the second signal can end it this soon.
                code = await trio.to_thread.run_sync(proc.wait, 120)
        assert code == 0
        assert results and not results[0].rstrip().endswith(b"data: [DONE]")  # it did not wait for the stream
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigusr1_writes_the_state_dump_to_the_log(tmp_path):
    import json

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=1000, upstream_port=free_port())
    try:
        await wait_ready(url, proc)
        proc.send_signal(signal.SIGUSR1)
        line = await _logged(tmp_path, "state dump: ")
        dump = json.loads(line.split("state dump: ", 1)[1])
        tree = dump["tree"]
        assert tree["name"] == "runestone" and tree["kind"] == "supervisor"
        ids = [c.get("id") or c["name"] for c in tree["children"]]
        assert "telemetry_handler" in ids and "enhanced_provider_supervisor" in ids and ids[-1] == "front"
        assert proc.poll() is None  # the dump does not stop the process
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigterm_ends_streams_longer_than_the_drain_with_an_error_event(tmp_path, gated_factory):
    # The streams wait at a gate that never opens: they outlive the 2 s drain. Each must end with an SSE error
    # event saying the gateway is stopping (not a cut body), and the ledger records them as the gateway's 503,
    # not as clients that left (499).
    upstream, gate, _ = await gated_factory(chunks=6)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=2000, upstream_port=upstream.port)
    try:
        await wait_ready(url, proc)
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async with trio.open_nursery() as n:
                await _streams_running(n, http, results, 3)
                proc.send_signal(signal.SIGTERM)
        assert len(results) == 3
        for body in results:
            last = body.rstrip().rsplit(b"\n\n", 1)[-1]
            assert b"[DONE]" not in body and last.startswith(b"data: "), body[-300:]
            assert orjson.loads(last[6:])["error"]["code"] == "gateway_stopping"
        assert await trio.to_thread.run_sync(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "usage.sqlite3")
    try:
        kinds = [row[0] for row in db.execute("SELECT http_status FROM usage WHERE status = 'error'")]
    finally:
        db.close()
    assert kinds == [503] * 3
