"""Run-time registrations and groups outlive the process: stop the gateway, start another on the same data."""

import os
import stat
import textwrap

import httpx
import pytest
import trio

from runestone.app import Application, StartupError
from runestone.config import load_config

ADMIN = {"authorization": "Bearer admin-key"}
CLIENT = {"authorization": "Bearer client-key"}


def _config(tmp_path, data_dir, extra: str = ""):
    path = tmp_path / "runestone.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = 0
        [data]
        dir = "{data_dir}"
        [auth]
        api_keys = ["client-key"]
        admin_key = "admin-key"
        [[failover.groups]]
        name = "configured-group"
        providers = ["kept", "dropped"]
        [[providers]]
        name = "kept"
        type = "fake"
        [providers.config]
        models = ["kept-model"]
        [[providers]]
        name = "dropped"
        type = "fake"
        [providers.config]
        models = ["dropped-model"]
    """) + extra)
    return load_config(str(path), env={})


async def _run(config, work) -> None:
    """Start a whole gateway, run ``work(http, app)`` against it, then stop it gracefully."""
    app = Application(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", timeout=10) as http:
                await work(http, app)
        finally:
            app.request_stop()


def _chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "are you back?"}]}


async def test_registrations_and_groups_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    config = _config(tmp_path, data)

    async def change(http, app):
        r = await http.post("/admin/providers", headers=ADMIN, json={
            "name": "added", "type": "fake", "config": {"models": ["added-model"], "api_key": "sk-added",
                                                       "text": "added at run time"}})
        assert r.status_code == 201, r.text
        r = await http.patch("/admin/providers/kept", headers=ADMIN, json={"config": {"priority": 7}})
        assert r.status_code == 200, r.text
        assert (await http.delete("/admin/providers/dropped", headers=ADMIN)).status_code == 200
        r = await http.post("/admin/groups", headers=ADMIN, json={"name": "pair", "providers": ["added", "kept"],
                                                                  "strategy": "round_robin"})
        assert r.status_code == 201, r.text
        r = await http.patch("/admin/groups/configured-group", headers=ADMIN, json={"providers": ["kept"]})
        assert r.status_code == 200, r.text
        r = await http.post("/admin/groups", headers=ADMIN, json={"name": "temporary", "providers": ["kept"]})
        assert r.status_code == 201
        assert (await http.delete("/admin/groups/temporary", headers=ADMIN)).status_code == 200

    await _run(config, change)
    store = data / "control.json"
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600  # it holds provider keys
    assert sorted(p.name for p in data.iterdir() if "control" in p.name) == ["control.json"]  # no temporary left

    async def check(http, app):
        providers = {p["name"]: p for p in (await http.get("/admin/providers", headers=ADMIN)).json()["data"]}
        assert sorted(providers) == ["added", "kept"]
        assert providers["added"]["source"] == "control" and providers["added"]["config"]["api_key"] == "***"
        assert providers["kept"]["config"]["priority"] == 7
        assert app.catalog["added"].config.api_key == "sk-added"
        groups = {g["name"]: g for g in (await http.get("/admin/groups", headers=ADMIN)).json()["data"]}
        assert sorted(groups) == ["configured-group", "default", "pair"]
        assert groups["pair"]["providers"] == ["added", "kept"] and groups["pair"]["strategy"] == "round_robin"
        assert groups["configured-group"]["providers"] == ["kept"]
        r = await http.post("/v1/chat/completions", headers=CLIENT, json=_chat("added-model"))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("added at run time")
        served = set()
        for _ in range(4):
            r = await http.post("/v1/chat/completions", headers=CLIENT, json=_chat("pair"))
            assert r.status_code == 200
            served.add(r.headers["x-runestone-provider"])
        assert served == {"added", "kept"}
        assert (await http.post("/v1/chat/completions", headers=CLIENT, json=_chat("dropped-model"))).status_code == 404
        # Registering a removed configured provider again takes it back.
        r = await http.post("/admin/providers", headers=ADMIN, json={"name": "dropped", "type": "fake",
                                                                     "config": {"models": ["dropped-model"]}})
        assert r.status_code == 201

    await _run(config, check)

    async def third(http, app):
        names = [p["name"] for p in (await http.get("/admin/providers", headers=ADMIN)).json()["data"]]
        assert names == ["added", "dropped", "kept"]

    await _run(config, third)


async def test_a_damaged_store_stops_the_start_with_its_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "control.json").write_text("{\"version\": 1, \"providers\": {\"x\": {\"name\": \"x\", \"type\": \"?\"}}}")
    with pytest.raises(StartupError, match=r"persisted provider 'x' is not valid: type"):
        Application(_config(tmp_path, data))
    (data / "control.json").write_text("{\"version\": 1, ")
    with pytest.raises(StartupError, match=r"control.json is not valid JSON"):
        Application(_config(tmp_path, data))


async def test_a_change_that_cannot_be_persisted_is_undone(tmp_path):
    data = tmp_path / "data"
    config = _config(tmp_path, data, "[telemetry]\nusage_ledger = false\n")

    async def work(http, app):
        data.write_text("a file where the data directory should be")
        before = (await http.get("/admin/providers", headers=ADMIN)).json()
        r = await http.post("/admin/providers", headers=ADMIN, json={"name": "new", "type": "fake"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "persistence_failed"
        assert str(data) in r.json()["error"]["message"]
        r = await http.delete("/admin/providers/kept", headers=ADMIN)
        assert r.status_code == 500
        r = await http.post("/admin/groups", headers=ADMIN, json={"name": "g", "providers": ["kept"]})
        assert r.status_code == 500
        assert (await http.get("/admin/providers", headers=ADMIN)).json() == before
        assert [g["name"] for g in (await http.get("/admin/groups", headers=ADMIN)).json()["data"]] == [
            "configured-group", "default"]
        assert app.registry.whereis("provider:new") is None and "new" not in app.catalog
        r = await http.post("/v1/chat/completions", headers=CLIENT, json=_chat("kept-model"))
        assert r.status_code == 200 and r.headers["x-runestone-provider"] == "kept"

    await _run(config, work)
