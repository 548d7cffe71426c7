"""``preset`` on an ``openai`` provider: the host's base URL and quirks (README "OpenAI-compatible hosts"), seen from
outside: what the gateway refuses before sending, what it sends the host (read back from the fake upstream), and
reasoning text a host puts under ``reasoning`` reaching clients as ``reasoning_content`` too."""

from __future__ import annotations

import httpx
import orjson
import pytest
import trio

from gatewaytest import provider_toml
from runestone.config import ConfigError, load_config
from runestone.http.server import Response, serve_http
from runestone.providers.presets import PRESETS

USER = [{"role": "user", "content": "hello", "name": "alice"}]


async def _setup(gateway_factory, fake_factory, preset: str):
    upstream, _ = await fake_factory(models=("m-1",))
    base = f"http://127.0.0.1:{upstream.port}"
    gw = await gateway_factory(provider_toml("host", "openai", preset=preset, base_url=base + "/v1",
                                             api_key="sk-host-0123456789", models=["m-1", "deepseek-reasoner"]))
    return gw, base


async def _last_sent(base: str) -> dict:
    async with httpx.AsyncClient() as http:
        stats = (await http.get(base + "/_fake/stats")).json()
    return stats["recent"][-1] if stats["recent"] else {}


async def test_groq_refuses_what_groq_refuses_before_sending(gateway_factory, fake_factory):
    gw, base = await _setup(gateway_factory, fake_factory, "groq")
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for field, value in (("n", 2), ("logprobs", True), ("logit_bias", {"50256": -100})):
            r = await http.post("/v1/chat/completions", json={"model": "m-1", "messages": USER, field: value})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == field and err["code"] == "unsupported_parameter" and "groq" in err["message"]
        assert await _last_sent(base) == {}  # nothing reached the host
        r = await http.post("/v1/chat/completions", json={"model": "m-1", "messages": USER, "n": 1, "logprobs": False})
        assert r.status_code == 200
    sent = (await _last_sent(base))["body"]
    assert "n" not in sent and "logprobs" not in sent
    assert sent["messages"] == [{"role": "user", "content": "hello"}]  # groq refuses messages[].name


async def test_mistral_gets_its_own_names_and_no_stream_options(gateway_factory, fake_factory):
    gw, base = await _setup(gateway_factory, fake_factory, "mistral")
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={
            "model": "m-1", "messages": USER, "stream": True, "seed": 7, "max_completion_tokens": 40, "user": "u1",
            "stream_options": {"include_usage": True}})
        assert r.status_code == 200
    sent = (await _last_sent(base))["body"]
    assert sent["random_seed"] == 7 and sent["max_tokens"] == 40
    assert not {"seed", "max_completion_tokens", "user", "stream_options"} & set(sent)


async def test_deepseek_history_without_reasoning_content(gateway_factory, fake_factory):
    gw, base = await _setup(gateway_factory, fake_factory, "deepseek")
    history = [{"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
               {"role": "user", "content": "and 3+3?"}]
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json={"model": "m-1", "messages": history})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/chat/completions", json={"model": "deepseek-reasoner", "messages": history,
                                                           "logprobs": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    sent = (await _last_sent(base))["body"]
    assert sent["messages"][1] == {"role": "assistant", "content": "4"}


async def test_reasoning_under_reasoning_is_mirrored_into_reasoning_content(gateway_factory):
    """A host (OpenRouter, Ollama, Groq...) that streams ``delta.reasoning``: clients also get reasoning_content."""
    def chunk(delta, finish=None):
        return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m-1",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    async def handler(request):
        body = orjson.loads(await request.body())
        if not body.get("stream"):
            return Response.json({"id": "c1", "object": "chat.completion", "created": 1, "model": "m-1", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "4", "reasoning": "two and two"},
                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        frames = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning": "two and two"}), chunk({"content": "4"}),
                  chunk({}, "stop"), b"data: [DONE]\n\n"]
        return Response(200, [(b"content-type", b"text/event-stream")], b"".join(frames))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_http, handler, "127.0.0.1", 0)
        gw = await gateway_factory(provider_toml("or", "openai", preset="openrouter", api_key="sk-or-0123456789",
                                                 base_url=f"http://127.0.0.1:{server.port}/api/v1", models=["m-1"]))
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post("/v1/chat/completions", json={"model": "m-1", "messages": USER})
            message = r.json()["choices"][0]["message"]
            assert message["reasoning_content"] == "two and two" and message["reasoning"] == "two and two"
            r = await http.post("/v1/chat/completions", json={"model": "m-1", "messages": USER, "stream": True})
            deltas = [orjson.loads(line[6:])["choices"][0]["delta"] for line in r.text.split("\n\n")
                      if line.startswith("data: {")]
        assert {"reasoning": "two and two", "reasoning_content": "two and two"} in deltas
        nursery.cancel_scope.cancel()


def _config(tmp_path, block: str, upstream_hosts: str = ""):
    path = tmp_path / "r.toml"
    path.write_text(f'[data]\ndir = "{tmp_path}"\n{upstream_hosts}' + block)
    return load_config(str(path), env={})


def test_a_preset_sets_the_base_url(tmp_path):
    cfg = _config(tmp_path, provider_toml("g", "openai", preset="groq"))
    assert cfg.providers[0].base_url == "https://api.groq.com/openai/v1"
    cfg = _config(tmp_path, provider_toml("o", "openai", preset="ollama", base_url="http://127.0.0.1:9999/v1"))
    assert cfg.providers[0].base_url == "http://127.0.0.1:9999/v1"


@pytest.mark.parametrize(("block", "hosts", "problem"), [
    (provider_toml("g", "openai", preset="grok"), "", 'providers[0].config.preset = "grok": must be one of groq, '),
    (provider_toml("a", "anthropic", preset="groq"), "", "presets apply to type \"openai\""),
    (provider_toml("z", "azure"), "", "providers[0].config.base_url = null: must be the Azure OpenAI endpoint"),
    (provider_toml("g", "openai", preset="groq"), '[admin]\nupstream_hosts = ["127.0.0.1"]\n',
     "admin.upstream_hosts"),
])
def test_bad_preset_configs_are_one_line_errors(tmp_path, block, hosts, problem):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, block, hosts)
    assert problem in str(info.value)


def test_every_preset_has_a_readme_row():
    import pathlib
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    for name, preset in PRESETS.items():
        assert f"| `{name}` | `{preset.base_url}` |" in readme, name
