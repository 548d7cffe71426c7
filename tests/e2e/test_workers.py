"""``runestone serve --workers N`` as real processes on loopback: a parent and its workers on one port.

Both workers answer (distinct pids over many connections); a worker killed with SIGKILL is restarted while
the other keeps answering, and only the requests the killed one held fail, with a connection error; SIGTERM
stops both gracefully (streams finish, or end with ``gateway_stopping`` past the drain) and a second one at
once; SIGUSR1 writes one dump naming every worker; past the restart intensity the parent stops the rest and
exits 1; more than one worker without ``[cluster] redis_url`` is refused in one line.

The streams wait at a gate in the test's own fake upstream while the test acts, so "in flight" does not
depend on the machine's speed. Every wait is for a state of the real processes (a log line, a pid in
``/health/detailed``, a refused connection, an exit) under a deadline that only a hang reaches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager

import httpx
import orjson
import trio

from gatewaytest import free_port, provider_toml

BODY = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "slow please"}]}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
HANG = 120  # seconds: only a hang reaches this


def _config(tmp_path, upstream_port: int, *, drain_ms: int = 300_000, redis: bool = True) -> str:
    cfg = tmp_path / "runestone.toml"
    # No Redis listens on port 1: the workers must start without reaching it.
    cluster = '[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n' if redis else ""
    cfg.write_text(f"""{cluster}
[server]
drain_timeout_ms = {drain_ms}
keepalive_timeout_ms = 300000
[data]
dir = "{tmp_path / 'data'}"
""" + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-up",
                    models=["fake-model"]))
    return str(cfg)


def _spawn(tmp_path, config: str, port: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    log = open(tmp_path / "log", "ab")
    return subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", config, "--port",
                             str(port), *extra], stdout=log, stderr=log, env=env)


def _log(tmp_path) -> str:
    return (tmp_path / "log").read_text(errors="replace")


async def _logged(tmp_path, text: str, count: int = 1) -> list[str]:
    """The log's lines containing ``text``, once there are ``count`` of them."""
    with trio.fail_after(HANG):
        while True:
            hits = [ln for ln in _log(tmp_path).splitlines() if text in ln]
            if len(hits) >= count:
                return hits
            await trio.sleep(0.05)


async def _exit_code(proc: subprocess.Popen) -> int:
    return await trio.to_thread.run_sync(proc.wait, HANG)


@asynccontextmanager
async def _cluster(tmp_path, upstream_port: int, *extra: str, drain_ms: int = 300_000):
    """``serve --workers 2`` (and ``extra``), once the parent says both workers are ready: yields the
    process, its URL and a list whose clients are closed at the end; the process is killed if still there."""
    port = free_port()
    proc = _spawn(tmp_path, _config(tmp_path, upstream_port, drain_ms=drain_ms), port, "--workers", "2", *extra)
    clients: list[httpx.AsyncClient] = []
    try:
        with trio.fail_after(HANG):
            while "with 2 worker(s)" not in _log(tmp_path):
                assert proc.poll() is None, f"the parent exited with {proc.returncode}:\n{_log(tmp_path)[-3000:]}"
                await trio.sleep(0.05)
        yield proc, f"http://127.0.0.1:{port}", clients
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(HANG)
        for client in clients:
            await client.aclose()


def _pinned(url: str) -> httpx.AsyncClient:
    """A client that keeps exactly one connection, so each of its requests goes to the same worker."""
    return httpx.AsyncClient(base_url=url, timeout=HANG,
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))


async def _who(client: httpx.AsyncClient) -> dict:
    response = await client.get("/health/detailed")
    assert response.status_code == 200
    return response.json()["worker"]


async def _clients_on_each(url: str, per_worker: int, opened: list) -> dict[int, list[httpx.AsyncClient]]:
    """Fresh connections until each of the two workers holds ``per_worker`` of them: pid -> clients (each
    also added to ``opened``, for closing)."""
    by_pid: dict[int, list[httpx.AsyncClient]] = {}
    for _ in range(200):  # the kernel spreads connections by hash: 200 fresh ones reach both
        client = _pinned(url)
        opened.append(client)
        pid = (await _who(client))["pid"]
        held = by_pid.setdefault(pid, [])
        if len(held) < per_worker:
            held.append(client)
        if len(by_pid) == 2 and all(len(c) == per_worker for c in by_pid.values()):
            break
    assert len(by_pid) == 2 and all(len(c) == per_worker for c in by_pid.values()), {
        pid: len(c) for pid, c in by_pid.items()}
    return by_pid


async def _stream(client: httpx.AsyncClient, started: trio.Event, outcome: list) -> None:
    """One stream on ``client``'s connection; ``outcome`` gets its body, or the connection error that cut it."""
    try:
        async with client.stream("POST", "/v1/chat/completions", json=BODY) as r:
            assert r.status_code == 200
            body = b""
            async for chunk in r.aiter_bytes():
                started.set()
                body += chunk
        outcome.append(body)
    except httpx.TransportError as exc:
        outcome.append(exc)


async def _streams(nursery, clients) -> list[list]:
    """A stream on each client, started in ``nursery``; returns their outcome lists once each has begun."""
    outcomes, starts = [], []
    for client in clients:
        outcome, started = [], trio.Event()
        outcomes.append(outcome)
        starts.append(started)
        nursery.start_soon(_stream, client, started, outcome)
    for started in starts:
        await started.wait()
    return outcomes


async def _refused(url: str) -> None:
    """Wait until new connections are refused (every worker stopped listening)."""
    with trio.fail_after(HANG):
        while True:
            try:
                async with httpx.AsyncClient(base_url=url, timeout=HANG) as fresh:
                    await fresh.get("/health")
            except httpx.TransportError:
                return
            await trio.sleep(0.02)


async def _pid_of_index(url: str, index: int, not_pid: int | None = None) -> int:
    """The pid of the worker ``index`` (other than ``not_pid``), asked over fresh connections until it answers."""
    with trio.fail_after(HANG):
        while True:
            async with httpx.AsyncClient(base_url=url, timeout=HANG) as fresh:
                try:
                    who = await _who(fresh)
                except httpx.TransportError:
                    who = {}
            if who.get("index") == index and who.get("pid") != not_pid:
                return who["pid"]
            await trio.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _stopped(body) -> bool:
    return isinstance(body, bytes) and body.rstrip().endswith(b"data: [DONE]")


async def test_more_than_one_worker_needs_a_redis_url(tmp_path):
    port = free_port()
    proc = _spawn(tmp_path, _config(tmp_path, free_port(), redis=False), port, "--workers", "2")
    assert await _exit_code(proc) == 2
    lines = _log(tmp_path).strip().splitlines()
    assert len(lines) == 1 and "[cluster] redis_url" in lines[0] and "RUNESTONE_REDIS_URL" in lines[0], lines


async def test_two_workers_both_answer_and_say_who_they_are(tmp_path):
    async with _cluster(tmp_path, free_port()) as (proc, url, _):
        seen: dict[int, dict] = {}
        for _ in range(200):  # fresh connections, each hashed by the kernel to one worker
            async with httpx.AsyncClient(base_url=url, timeout=HANG) as fresh:
                who = await _who(fresh)
            seen[who["pid"]] = who
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        assert sorted(w["index"] for w in seen.values()) == [0, 1]
        assert all(w["count"] == 2 and w["parent_pid"] == proc.pid for w in seen.values())
        assert proc.pid not in seen


async def test_a_killed_worker_is_restarted_and_only_its_requests_fail(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=6)
    async with _cluster(tmp_path, upstream.port) as (proc, url, opened):
        by_pid = await _clients_on_each(url, 2, opened)
        victim, survivor = sorted(by_pid)
        async with trio.open_nursery() as n:
            held = {pid: await _streams(n, clients) for pid, clients in by_pid.items()}
            os.kill(victim, signal.SIGKILL)
            # The victim's streams fail with a connection error (not a hang); the survivor's still wait.
            with trio.fail_after(HANG):
                while not all(held[victim]):
                    await trio.sleep(0.02)
            assert all(isinstance(o[0], httpx.TransportError) for o in held[victim]), held[victim]
            assert not any(held[survivor])
            line = (await _logged(tmp_path, "restarting worker-"))[0]
            # Every request on a fresh connection is answered meanwhile: by the survivor, or the new worker.
            for _ in range(30):
                async with httpx.AsyncClient(base_url=url, timeout=HANG) as fresh:
                    assert (await fresh.post("/v1/chat/completions", json=CHAT)).status_code == 200
            gate.open()
        assert all(_stopped(o[0]) for o in held[survivor]), held[survivor]
        # The killed worker's index is served again, by a new process.
        index = int(line.split("restarting worker-", 1)[1].split()[0])
        reborn = await _pid_of_index(url, index, not_pid=victim)
        assert reborn not in (victim, survivor) and proc.poll() is None


async def _drain_started(tmp_path, proc, nursery, by_pid) -> list[list]:
    """A stream on each pinned client, then SIGTERM to the parent once they run; their outcome lists,
    once both workers say they are stopping."""
    held = [o for clients in by_pid.values() for o in await _streams(nursery, clients)]
    proc.send_signal(signal.SIGTERM)
    await _logged(tmp_path, "[worker 0]: received SIGTERM: stopping gracefully")
    await _logged(tmp_path, "[worker 1]: received SIGTERM: stopping gracefully")
    return held


async def test_sigterm_stops_every_worker_gracefully(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=6)
    async with _cluster(tmp_path, upstream.port) as (proc, url, opened):
        by_pid = await _clients_on_each(url, 1, opened)
        async with trio.open_nursery() as n:
            held = await _drain_started(tmp_path, proc, n, by_pid)
            # Both workers drain at once: new connections are refused while a stream waits on each.
            await _refused(url)
            assert gate.held == 2 and not any(held)
            gate.open()
        assert all(_stopped(o[0]) for o in held), held
        assert await _exit_code(proc) == 0
        assert all(_gone(pid) for pid in by_pid)


async def test_sigterm_ends_streams_longer_than_the_drain_with_gateway_stopping(tmp_path, gated_factory):
    upstream, _gate, _ = await gated_factory(chunks=6)  # the gate never opens: the streams outlive the drain
    async with _cluster(tmp_path, upstream.port, drain_ms=2000) as (proc, url, opened):
        by_pid = await _clients_on_each(url, 1, opened)
        async with trio.open_nursery() as n:
            held = await _drain_started(tmp_path, proc, n, by_pid)
        for (body,) in held:
            last = body.rstrip().rsplit(b"\n\n", 1)[-1]
            assert b"[DONE]" not in body and last.startswith(b"data: "), body[-300:]
            assert orjson.loads(last[6:])["error"]["code"] == "gateway_stopping"
        assert await _exit_code(proc) == 0


async def test_a_second_sigterm_stops_the_workers_at_once(tmp_path, gated_factory):
    upstream, _gate, _ = await gated_factory(chunks=6)  # never opens; the drain is 300 s
    async with _cluster(tmp_path, upstream.port) as (proc, url, opened):
        by_pid = await _clients_on_each(url, 1, opened)
        async with trio.open_nursery() as n:
            held = await _drain_started(tmp_path, proc, n, by_pid)
            proc.send_signal(signal.SIGTERM)
            # Well short of the 300 s drain: only the second signal can end it this soon.
            assert await _exit_code(proc) == 0
        assert not any(_stopped(o[0]) for o in held)
        assert all(_gone(pid) for pid in by_pid)


async def test_sigusr1_writes_one_dump_of_every_worker(tmp_path):
    async with _cluster(tmp_path, free_port()) as (proc, url, _):
        pids = {await _pid_of_index(url, 0), await _pid_of_index(url, 1)}
        proc.send_signal(signal.SIGUSR1)
        line = (await _logged(tmp_path, "runestone.cluster: state dump: "))[0]
        dump = json.loads(line.split("state dump: ", 1)[1])
        assert dump["pid"] == proc.pid
        workers = dump["workers"]
        assert [w["index"] for w in workers] == [0, 1] and {w["pid"] for w in workers} == pids
        for w in workers:
            state = w["state"]
            assert state["pid"] == w["pid"] and state["worker"]["index"] == w["index"]
            assert state["tree"]["name"] == "runestone" and state["tree"]["children"]
        assert dump["supervisor"]["intensity"] == 5
        assert proc.poll() is None  # the dump stops nothing
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0


async def test_past_the_restart_intensity_the_parent_stops_the_rest_and_exits_1(tmp_path):
    extra = ("--restart-intensity", "1", "--restart-period", "300")
    async with _cluster(tmp_path, free_port(), *extra) as (proc, url, _):
        first = await _pid_of_index(url, 0)
        other = await _pid_of_index(url, 1)
        os.kill(first, signal.SIGKILL)
        second = await _pid_of_index(url, 0, not_pid=first)  # one restart is within the intensity
        os.kill(second, signal.SIGKILL)  # a second one within 300 s is not
        assert await _exit_code(proc) == 1
        assert "more than 1 worker restarts in 300 s" in _log(tmp_path)
        with trio.fail_after(HANG):
            while not _gone(other):  # the parent stopped the other worker before it exited
                await trio.sleep(0.05)
        assert "[worker 1]: received SIGTERM: stopping gracefully" in _log(tmp_path)


async def test_both_workers_write_every_request_to_the_one_ledger(tmp_path, gated_factory):
    # Two processes append to one usage.sqlite3 at the same time (WAL, and a wait for the write lock): no row
    # of either is lost, none is written twice.
    upstream, _gate, _ = await gated_factory()
    async with _cluster(tmp_path, upstream.port) as (proc, url, opened):
        by_pid = await _clients_on_each(url, 4, opened)
        ids: list[str] = []

        async def ten(client: httpx.AsyncClient) -> None:
            for _ in range(10):
                response = await client.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
                ids.append(response.headers["x-request-id"])

        async with trio.open_nursery() as n:
            for clients in by_pid.values():
                for client in clients:
                    n.start_soon(ten, client)
        proc.send_signal(signal.SIGTERM)  # each worker flushes its ledger as it stops
        assert await _exit_code(proc) == 0
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "usage.sqlite3")
    try:
        stored = [row[0] for row in db.execute("SELECT request_id FROM usage")]
    finally:
        db.close()
    assert len(ids) == 80 and sorted(stored) == sorted(ids)
