"""The operator's commands (``runestone providers|groups|state|chat|events``) against a live gateway.

Each command runs as ``runestone.cli.main([...])`` in a worker thread, with its own trio run, exactly as
from a terminal; stdout and stderr are recorded write by write.
"""

import io
import sys

import httpx
import orjson
import trio

from gatewaytest import provider_toml
from runestone.cli import main

KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'


class Recorder(io.StringIO):
    """A stdout that remembers each write, and calls ``on_write(text)`` (from the CLI's thread) before it."""

    def __init__(self, on_write=None) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.on_write = on_write

    def write(self, text: str) -> int:
        if self.on_write is not None:
            self.on_write(text)
        self.writes.append(text)
        return super().write(text)


async def run_cli(*argv: str, on_write=None) -> tuple[int, str, str, Recorder]:
    out, err = Recorder(on_write), Recorder()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = await trio.to_thread.run_sync(main, list(argv))
    finally:
        sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue(), out


async def test_providers_and_groups_commands(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    admin = ["--url", gw.url, "--admin-key", "admin-key"]
    status, out, err, _ = await run_cli("providers", "add", "extra", "--type", "fake",
                                        "--models", "extra-model,more-model", "--set", "priority=5",
                                        "--set", "text=from the cli", *admin)
    assert (status, err) == (0, "") and out == "registered provider extra (fake; models: extra-model, more-model)\n"
    assert gw.app.catalog["extra"].config.priority == 5
    status, out, err, _ = await run_cli("providers", "list", *admin)
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["NAME", "TYPE", "STATUS", "CIRCUIT", "IN-FLIGHT", "MODELS"]
    assert [line.split()[:3] for line in lines[1:]] == [["base", "fake", "running"], ["extra", "fake", "running"]]
    status, out, _, _ = await run_cli("providers", "list", "--json", *admin)
    assert [p["name"] for p in orjson.loads(out)] == ["base", "extra"]

    status, out, err, _ = await run_cli("groups", "add", "pair", "--providers", "extra,base",
                                        "--strategy", "round_robin", *admin)
    assert status == 0 and out == "created group pair (round_robin: extra, base)\n"
    status, out, _, _ = await run_cli("groups", "list", *admin)
    assert status == 0 and any(line.split()[:4] == ["pair", "round_robin", "3", "extra,base"]
                               for line in out.splitlines())
    status, out, _, _ = await run_cli("groups", "remove", "pair", *admin)
    assert status == 0 and out == "deleted group pair\n"

    status, out, err, _ = await run_cli("providers", "remove", "extra", "--grace-ms", "1000", *admin)
    assert status == 0 and out == "unregistered provider extra (drained)\n"
    assert sorted(gw.app.catalog) == ["base"]


async def test_refusals_are_one_line_with_an_exit_status(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    admin = ["--url", gw.url, "--admin-key", "admin-key"]
    cases = [
        (["providers", "add", "x", "--type", "fake", "--set", "chunks=-1", *admin], 1, "config.chunks"),
        (["providers", "add", "base", "--type", "fake", *admin], 1, "already registered"),
        (["providers", "add", "x", *admin], 2, "needs --type"),
        (["providers", "remove", "ghost", *admin], 1, "no provider named 'ghost'"),
        (["groups", "add", "g", "--providers", "ghost", *admin], 1, "ghost"),
        (["providers", "list", "--url", gw.url, "--admin-key", "wrong"], 1, "refused the connection (401)"),
        (["providers", "list", "--url", gw.url], 1, "needs a key"),
        (["state", "--url", "http://127.0.0.1:1", "--admin-key", "x"], 3, "cannot connect"),
        (["chat", "hi", "--model", "no-such-model", "--url", gw.url, "--api-key", "client-key"], 1, "no-such-model"),
    ]
    for argv, want, fragment in cases:
        status, out, err, _ = await run_cli(*argv)
        assert status == want, (argv, status, err)
        assert err.count("\n") == 1 and err.startswith("runestone: ") and fragment in err, (argv, err)
    assert sorted(gw.app.catalog) == ["base"]


async def test_state_and_watch(gateway_factory, monkeypatch):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    monkeypatch.setenv("RUNESTONE_URL", gw.url)
    monkeypatch.setenv("RUNESTONE_ADMIN_KEY", "admin-key")
    status, out, err, _ = await run_cli("state")
    dump = orjson.loads(out)
    assert status == 0 and dump["tree"]["name"] == "runestone" and "control" in dump
    status, out, err, _ = await run_cli("state", "--watch", "--count", "2", "--interval", "0.05")
    assert status == 0 and out.count("--- ") == 2
    assert sum(1 for line in out.splitlines() if line.split()[:3] == ["base", "running", "closed"]) == 2


async def test_chat_streams_tokens_as_they_come(gateway_factory, gated_factory, monkeypatch):
    # The upstream sends its first word, then waits at the gate until the CLI has printed something: a CLI
    # that printed only at the end would wait for ever (the watchdog below then opens it, and the test fails).
    upstream, gate, _ = await gated_factory(after=2, chunks=6)
    gw = await gateway_factory(KEYS + provider_toml("base", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                                    api_key="sk-base", models=["fake-model"]))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer client-key"},
                            json={"model": "fake-model", "messages": [{"role": "user", "content": "stream please"}]})
    expected = r.json()["choices"][0]["message"]["content"]
    monkeypatch.setenv("RUNESTONE_API_KEY", "client-key")
    printed_while_held = []

    def on_write(text: str) -> None:
        if text.strip() and not printed_while_held:
            printed_while_held.append(not gate.opened.is_set())
            gate.open_from_thread()

    async def watchdog():
        with trio.move_on_after(120):  # only a CLI that buffers the answer (or a hang) gets past this
            await gate.opened.wait()
        gate.open()

    async with trio.open_nursery() as n:
        n.start_soon(watchdog)
        status, out, err, recorder = await run_cli("chat", "stream please", "--model", "fake-model",
                                                   "--url", gw.url, on_write=on_write)
    assert printed_while_held == [True]
    assert status == 0 and out == expected + "\n"
    assert err.startswith("[base/fake-model: ") and "completion tokens" in err
    pieces = [text for text in recorder.writes if text.strip()]
    assert len(pieces) >= 4  # token by token, not one write at the end


async def test_events_tails_the_live_feed(gateway_factory):
    gw = await gateway_factory(KEYS + provider_toml("base", "fake", models=["fake-model"]))
    handler = gw.app.registry.whereis("telemetry_handler")
    result = {}

    async def tail():
        result["run"] = await run_cli("events", "--count", "2", "--url", gw.url,
                                      "--admin-key", "admin-key")

    async with trio.open_nursery() as n:
        n.start_soon(tail)
        with trio.fail_after(10):
            while not handler.actor.snapshot().subscribers:
                await trio.sleep(0.01)
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer client-key"},
                                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    status, out, err, _ = result["run"]
    events = [orjson.loads(line) for line in out.splitlines()]
    assert status == 0 and len(events) == 2
    assert {e["kind"] for e in events} <= {"attempt_finished", "request_finished"}
    assert all(e["provider"] == "base" for e in events)
