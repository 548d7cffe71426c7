"""Local exhaustion is the gateway's own fault: a ``runestone serve`` process at its file-descriptor limit.

The gateway runs with a low ``RLIMIT_NOFILE``; the test holds idle connections to it until every descriptor
it may open is in use (read from ``/proc/<pid>/fd``: no timing involved). Its upstream connect() then fails
with EMFILE: clients get the gateway's own 503 saying it ran out of local resources, the provider's breaker
stays closed and its health untouched, ``/metrics`` counts it, and the accept loop backs off instead of
crashing while an established connection keeps being served. Once the held connections are gone, requests
succeed at once: nothing was held against the provider.
"""

import os
import resource
import socket
import subprocess
import sys
import textwrap

import httpx
import trio
from gatewaytest import provider_toml

FD_LIMIT = 96
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _low_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_emfile_is_a_local_503_and_never_opens_the_breaker(tmp_path, fake_factory) -> None:
    fake, _ = await fake_factory()
    port = _free_port()
    cfg = tmp_path / "runestone.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        header_timeout_ms = 600000
        keepalive_timeout_ms = 600000
        [data]
        dir = "{tmp_path / 'data'}"
        [circuit_breaker]
        failure_threshold = 3
    """) + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{fake.port}/v1", api_key="sk-test",
                         models=["fake-model"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    proc = subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", str(cfg), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"), env=env,
                            preexec_fn=_low_fd_limit)
    held: list[trio.SocketStream] = []
    url = f"http://127.0.0.1:{port}"
    # One connection, opened before the exhaustion and kept alive: the only way in while accept() fails.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            for _ in range(200):  # bounded: the process starting
                assert proc.poll() is None, (tmp_path / "log").read_text()
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
            else:
                raise AssertionError("gateway did not start")
            assert _open_fds(proc.pid) < FD_LIMIT - 10, "the gateway already uses nearly all its descriptors"

            # Exhaust: more connections than descriptors left; the surplus waits in the listen backlog.
            for _ in range(FD_LIMIT - _open_fds(proc.pid) + 8):
                held.append(await trio.open_tcp_stream("127.0.0.1", port))
            for _ in range(400):  # bounded: the gateway accepting them
                if _open_fds(proc.pid) >= FD_LIMIT:
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError(f"the gateway did not reach its descriptor limit ({_open_fds(proc.pid)} open)")

            # Twice the breaker's threshold of requests, each failing on the gateway's own connect().
            for _ in range(6):
                r = await http.post("/v1/chat/completions", json=BODY)
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert error["type"] == "server_error" and error["code"] == "gateway_overloaded", error
                assert "ran out of local resources" in error["message"], error
                assert "file descriptors" in error["message"], error

            provider = (await http.get("/health/providers")).json()["providers"]["up"]
            assert provider["circuit_state"] == "closed", provider
            assert provider["errors"] == 0 and provider["health_score"] == 1.0, provider
            metrics = (await http.get("/metrics")).text
            connect = _sample(metrics, 'runestone_local_resource_errors_total{op="connect",kind="emfile"}')
            assert connect >= 6, metrics
            # The accept loop met EMFILE too, and kept going (this very connection is still served).
            assert _sample(metrics, 'runestone_local_resource_errors_total{op="accept",kind="emfile"}') >= 1
            assert proc.poll() is None

            # The pressure goes away: requests succeed, with no circuit to wait for.
            for stream in held:
                await stream.aclose()
            held.clear()
            for _ in range(400):  # bounded: the gateway closing the connections it held
                r = await http.post("/v1/chat/completions", json=BODY)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["error"]["code"] == "gateway_overloaded", r.text
                await trio.sleep(0.05)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
            provider = (await http.get("/health/providers")).json()["providers"]["up"]
            assert provider["circuit_state"] == "closed", provider
        log = (tmp_path / "log").read_text()
        assert log.count("accept failed") == 1, log  # logged once for the episode, not every 100 ms
    finally:
        for stream in held:
            await stream.aclose()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
