"""Graceful shutdown of a real ``runestone serve`` process: SIGTERM lets in-flight streams finish, refuses
new connections, flushes the ledger and exits 0; a second signal stops at once."""

import os
import signal
import subprocess
import sys
import textwrap

import httpx
import trio

from gatewaytest import free_port, wait_ready

BODY = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "slow please"}]}


def _spawn(tmp_path, port: int, drain_ms: int) -> subprocess.Popen:
    cfg = tmp_path / "runestone.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        drain_timeout_ms = {drain_ms}
        [data]
        dir = "{tmp_path / 'data'}"
        [[providers]]
        name = "fake"
        type = "fake"
        [providers.config]
        models = ["fake-model"]
        chunks = 6
        chunk_delay_ms = 150
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    return subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", str(cfg), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"), env=env)


async def _stream(http, started: trio.Event, results: list) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=BODY) as r:
        assert r.status_code == 200
        body = b""
        async for chunk in r.aiter_bytes():
            if not started.is_set():
                started.set()
            body += chunk
    results.append(body)


async def test_sigterm_lets_streams_finish_and_exits_zero(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=10_000)
    try:
        await wait_ready(url, proc)
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            async with trio.open_nursery() as n:
                starts = [trio.Event() for _ in range(3)]
                for ev in starts:
                    n.start_soon(_stream, http, ev, results)
                for ev in starts:
                    await ev.wait()
                proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.3)  # the front has stopped accepting by now
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=2) as fresh:
                        late = await fresh.get("/health")
                except httpx.TransportError:
                    late = None  # refused: the listener is closed
                assert late is None or late.status_code == 503, "a new connection was served while draining"
        assert len(results) == 3
        for body in results:
            assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_second_signal_stops_at_once(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=60_000)
    try:
        await wait_ready(url, proc)
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
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
                await trio.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                code = await trio.to_thread.run_sync(proc.wait, 10)
        assert code == 0
        assert results and not results[0].rstrip().endswith(b"data: [DONE]")  # it did not wait for the stream
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigusr1_writes_the_state_dump_to_the_log(tmp_path):
    import json

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(tmp_path, port, drain_ms=1000)
    try:
        await wait_ready(url, proc)
        proc.send_signal(signal.SIGUSR1)
        line = None
        for _ in range(200):  # bounded: the dump is written within a few ms
            text = (tmp_path / "log").read_text()
            hit = [ln for ln in text.splitlines() if "state dump: " in ln]
            if hit:
                line = hit[0]
                break
            await trio.sleep(0.02)
        assert line is not None, "no state dump in the log"
        dump = json.loads(line.split("state dump: ", 1)[1])
        tree = dump["tree"]
        assert tree["name"] == "runestone" and tree["kind"] == "supervisor"
        ids = [c.get("id") or c["name"] for c in tree["children"]]
        assert "telemetry_handler" in ids and "enhanced_provider_supervisor" in ids and ids[-1] == "front"
        assert proc.poll() is None  # the dump does not stop the process
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
