"""A fleet for the tests: N ``runestone serve`` processes sharing one real redis-server.

:class:`Fleet` starts the instances from one config text (each with its own data directory and port,
``[cluster] redis_url`` pointing at the test's Redis), waits until each answers and is connected to Redis,
restarts them, and stops them (SIGTERM, then SIGKILL after a bound) at the end of its ``async with``.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import httpx
import trio

from gatewaytest import free_port, provider_toml, start_gateway_process, wait_ready

ADMIN = {"authorization": "Bearer admin-key"}
#: 1 output token costs $0.001 (input is free): a request with max_tokens=4 reserves $0.004.
PRICING = '[pricing."fake-model"]\ninput_per_mtok = 0.0\noutput_per_mtok = 1000.0\n'
ASK = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def priced_config(upstream_port: int, api_keys: list[str], extra: str = "") -> str:
    """An instance's config: ``api_keys``, the admin key ``admin-key``, no ledger, ``fake-model`` priced at
    PRICING and served by one OpenAI-shaped upstream on ``upstream_port``; ``extra`` sections between."""
    keys = ", ".join(f'"{k}"' for k in api_keys)
    return (f'[auth]\napi_keys = [{keys}]\nadmin_key = "admin-key"\n'
            "[telemetry]\nusage_ledger = false\n" + PRICING + extra
            + provider_toml("up", "openai", base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-up",
                            models=["fake-model"]))


async def until(what: str, check, bound: float = 30.0) -> None:
    """Poll ``await check()`` until true; AssertionError naming ``what`` after ``bound`` s (only a hang)."""
    with trio.move_on_after(bound):
        while not await check():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"{what} not reached within {bound} s")


class Instance:
    def __init__(self, directory: Path, config_text: str, headers: dict | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        #: sent with the health reads (the admin key, when the config has keys)
        self.headers = headers or {}
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = directory / "runestone.toml"
        self.config.write_text(f'[data]\ndir = "{directory / "data"}"\n' + config_text)
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = start_gateway_process(str(self.config), self.port, self.directory / "gateway.log")
        await wait_ready(self.url, self.proc)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        path = self.directory / "gateway.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def detailed(self, http: httpx.AsyncClient) -> dict:
        r = await http.get(self.url + "/health/detailed", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()


class Fleet:
    def __init__(self, tmp_path: Path, redis_url: str, config_text: str, size: int = 3,
                 headers: dict | None = None) -> None:
        text = textwrap.dedent(config_text)
        self.text = f'[cluster]\nredis_url = "{redis_url}"\n' + text
        self.headers = headers
        self.tmp_path = tmp_path
        self.instances = [Instance(tmp_path / f"gw{i}", self.text, headers) for i in range(size)]

    def new_instance(self) -> Instance:
        """One more instance of the same config (not started), stopped with the others."""
        instance = Instance(self.tmp_path / f"gw{len(self.instances)}", self.text, self.headers)
        self.instances.append(instance)
        return instance

    async def __aenter__(self) -> Fleet:
        try:
            async with trio.open_nursery() as nursery:
                for instance in self.instances:
                    nursery.start_soon(instance.start)
            await self.wait_shared()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()

    async def restart(self) -> None:
        self.stop()
        async with trio.open_nursery() as nursery:
            for instance in self.instances:
                nursery.start_soon(instance.start)
        await self.wait_shared()

    async def wait_shared(self, timeout: float = 60) -> None:
        """Until every instance says its Redis connection is up (bounded; only a hang trips it)."""
        async with httpx.AsyncClient(timeout=10) as http:
            with trio.fail_after(timeout):
                for instance in self.instances:
                    while (await instance.detailed(http))["cluster"]["redis"]["state"] != "up":
                        await trio.sleep(0.05)

    def __getitem__(self, i: int) -> Instance:
        return self.instances[i]

    def logs(self) -> str:
        return "\n".join(f"--- gw{i}\n{inst.log()}" for i, inst in enumerate(self.instances))
