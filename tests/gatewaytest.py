"""Helpers for tests that run the whole gateway: a started gateway's URLs, provider blocks of config, and the
gateway as a real process (``runestone serve``).

A plain module (not a conftest) so that test files can import it by name whatever other conftest files
pytest has loaded: ``from gatewaytest import provider_toml``.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys

import httpx
import trio


class Started:
    """A running gateway: the app, its base URL and ``v1`` URL."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.port = app.port
        self.url = f"http://127.0.0.1:{app.port}"
        self.v1 = self.url + "/v1"


def provider_toml(name: str, type: str, **config) -> str:
    """A ``[[providers]]`` block; config values are written as TOML literals."""
    lines = [f'[[providers]]\nname = "{name}"\ntype = "{type}"\n[providers.config]']
    for key, value in config.items():
        if isinstance(value, bool):
            lit = "true" if value else "false"
        elif isinstance(value, str):
            lit = f'"{value}"'
        elif isinstance(value, (list, tuple)):
            lit = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        else:
            lit = repr(value)
        lines.append(f"{key} = {lit}")
    return "\n".join(lines) + "\n"


class RecordingUpstream:
    """The fake upstream (``runestone fake-provider``'s handler), recording each model request as
    (path, headers, raw body); serve it with ``serve_http``."""

    def __init__(self, **knobs) -> None:
        from runestone.providers.fake_server import FakeKnobs, make_fake_handler

        self.fake = make_fake_handler(FakeKnobs(**knobs))
        self.requests: list[tuple[str, dict, bytes]] = []

    async def __call__(self, request):
        if not request.path.startswith("/_fake"):
            self.requests.append((request.path, {k.decode(): v.decode() for k, v in request.headers},
                                  await request.body()))
        return await self.fake(request)

    def last_body(self) -> dict:
        import orjson

        return orjson.loads(self.requests[-1][2])


def fail_next_ledger_write(ledger) -> list:
    """Make ``ledger``'s next write fail as a broken disk would; the returned list gets an item when it did."""
    write = ledger._write_sync
    failed: list = []

    def failing_once(*args):
        if not failed:
            failed.append(True)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return write(*args)

    ledger._write_sync = failing_once
    return failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway_process(config: str, port: int, log_path) -> subprocess.Popen:
    """``runestone serve`` with ``config`` on ``port``, its output appended to ``log_path``, in an environment
    without RUNESTONE_/OPENAI_/ANTHROPIC_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", config, "--port", str(port)],
                            stdout=log, stderr=log, env=env)


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    """Until ``url``/health answers 200 (at most ~10 s); an early exit of ``proc`` fails at once."""
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited early with {proc.returncode}")
            try:
                if (await http.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)
    raise AssertionError("gateway did not become ready")
