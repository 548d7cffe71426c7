"""Model aliases: the file format, the watcher actor under a MockClock, and a reload while the gateway serves."""

import logging

import httpx
import pytest
import trio

from gatewaytest import provider_toml
from runestone.routing.aliases import Reload
from runestone.runtime import Published
from runestone.routing.aliases import (
    DEFAULT_ALIASES_PATH,
    AliasError,
    AliasWatcher,
    load_aliases,
    parse_aliases,
)
from runestone.runtime import Registry

USER = [{"role": "user", "content": "hello there"}]


def test_targets_chains_and_the_embedded_default():
    text = '[aliases]\nfast = "gpt-4o-mini"\nsmart = "anthropic-default:claude-sonnet-4-5"\nquick = "fast"\n' \
           'cheap = "default"\n"my.model-v2" = "quick"\n'
    assert parse_aliases(text) == {"fast": "gpt-4o-mini", "smart": "anthropic-default:claude-sonnet-4-5",
                                   "quick": "gpt-4o-mini", "cheap": "default", "my.model-v2": "gpt-4o-mini"}
    assert parse_aliases("") == {}
    default = load_aliases(DEFAULT_ALIASES_PATH)
    assert {"fast", "smart", "cheap"} <= set(default)
    assert all(t.rpartition(":")[2].startswith("fake-") for t in default.values())


@pytest.mark.parametrize(("text", "says"), [
    ("[aliases\nfast = 1", "not valid TOML"),
    ('fast = "x"', "unknown top-level key(s) fast"),
    ("aliases = 3", "must be a table"),
    ("[aliases]\nfast = 3", "aliases.fast: the target must be a non-empty string"),
    ('[aliases]\nfast = ""', "aliases.fast: the target must be a non-empty string"),
    ('[aliases]\n"a b" = "x"', "the alias name must be a non-empty string without spaces"),
    ('[aliases]\n"openai:fast" = "x"', "may not contain ':'"),
    ('[aliases]\na = "b"\nb = "c"\nc = "a"', "cycle: a -> b -> c -> a"),
])
def test_a_bad_file_is_refused_with_one_line_naming_the_problem(text, says):
    with pytest.raises(AliasError) as caught:
        parse_aliases(text, "aliases.toml")
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_watcher_reloads_on_change_keeps_old_aliases_on_a_bad_file(autojump_clock, nursery, tmp_path, caplog):
    path = tmp_path / "aliases.toml"
    path.write_text('[aliases]\nfast = "m1"\n')
    cell = Published({})
    watcher = AliasWatcher(cell, path, interval=2.0, registry=Registry())
    ref = await nursery.start(watcher.run)
    assert cell.value == {"fast": "m1"}
    version = cell.version

    path.write_text('[aliases]\nfast = "m2"\nsmart = "p:m3"\n')
    await trio.sleep(1.0)
    assert cell.value == {"fast": "m1"}  # not before the next check
    await trio.sleep(1.5)
    assert cell.value == {"fast": "m2", "smart": "p:m3"}
    assert cell.version == version + 1

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runestone.routing.aliases"):
        path.write_text('[aliases]\nfast = "m2"\nsmart = ')
        await trio.sleep(2.5)
        await trio.sleep(6.0)  # three more checks of the same bad file: still one line
    assert cell.value == {"fast": "m2", "smart": "p:m3"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "keeping the 2 alias(es) in use" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    snap = watcher.snapshot()
    assert (snap.loads, snap.rejected) == (2, 1) and "not valid TOML" in snap.error

    path.write_text('[aliases]\nfast = "m4"\n')
    assert await ref.call(Reload()) == {"fast": "m4"}  # an operator need not wait for the next check
    assert watcher.snapshot().error is None

    path.unlink()
    await trio.sleep(2.5)
    assert cell.value == {}
    ref.request_stop()


async def test_a_restarted_watcher_keeps_the_cell_its_readers_hold(autojump_clock, nursery, tmp_path):
    path = tmp_path / "aliases.toml"
    path.write_text('[aliases]\nfast = "m1"\n')
    cell = Published({})
    registry = Registry()
    first = AliasWatcher(cell, path, registry=registry)
    ref = await nursery.start(first.run)
    ref.request_stop()
    await trio.sleep(0.1)
    path.write_text("not toml at all [")
    # A new incarnation starting on a bad file keeps what the old one published.
    await nursery.start(AliasWatcher(cell, path, registry=registry).run)
    assert cell.value == {"fast": "m1"}


async def _provider(http: httpx.AsyncClient, model: str) -> str:
    r = await http.post("/v1/chat/completions", json={"model": model, "messages": USER})
    assert r.status_code == 200, r.text
    return r.headers["x-runestone-provider"]


async def test_alias_reload_while_serving(mock_clock, gateway_factory, fake_factory, tmp_path, monkeypatch):
    path = tmp_path / "aliases.toml"
    path.write_text('[aliases]\nquick = "fake-model"\n')
    monkeypatch.setenv("RUNESTONE_ALIASES", str(path))
    upstream, _ = await fake_factory()
    gw = await gateway_factory(
        provider_toml("fake", "fake", models=["fake-model"])
        + provider_toml("up-openai", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk",
                        models=["gpt-4o-mini"]))
    aliases = gw.app.gateway.aliases
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert await _provider(http, "quick") == "fake"
        listed = {m["id"]: m["owned_by"] for m in (await http.get("/v1/models")).json()["data"]}
        assert listed["quick"] == "runestone:alias" and "smart" not in listed

        path.write_text('[aliases]\nquick = "up-openai:gpt-4o-mini"\nsmart = "gpt-4o-mini"\n')
        version = aliases.version
        mock_clock.jump(2.5)
        for _ in range(100):
            if aliases.version != version:
                break
            await trio.sleep(0)
        assert aliases.version == version + 1, "the watcher did not reload the changed file"
        assert await _provider(http, "quick") == "up-openai"
        assert await _provider(http, "smart") == "up-openai"
        listed = {m["id"]: m["owned_by"] for m in (await http.get("/v1/models")).json()["data"]}
        assert listed["smart"] == "runestone:alias"

        # A removed alias is an unknown model again, with the usual 404.
        path.write_text('[aliases]\nsmart = "gpt-4o-mini"\n')
        version = aliases.version
        mock_clock.jump(2.5)
        for _ in range(100):
            if aliases.version != version:
                break
            await trio.sleep(0)
        r = await http.post("/v1/chat/completions", json={"model": "quick", "messages": USER})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_embedded_default_aliases_route_to_the_fake_provider(gateway_factory, fake_only_toml, monkeypatch):
    monkeypatch.delenv("RUNESTONE_ALIASES", raising=False)
    gw = await gateway_factory(fake_only_toml)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for alias in ("fast", "smart", "cheap"):
            assert await _provider(http, alias) == "fake"
        r = await http.post("/v1/embeddings", json={"model": "embed", "input": "hi"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 256
        r = await http.post("/v1/completions", json={"model": "fast", "prompt": "hi"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Echo: hi")
