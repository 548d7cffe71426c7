"""The access log ([log] access): one JSON line per request, with its fields for non-streamed, streamed,
failed, refused and cache-hit requests, and never a key, a prompt or a completion."""

from __future__ import annotations

import httpx
import orjson
import trio

from gatewaytest import provider_toml

MODEL = "gpt-4o-mini"
CLIENT_KEY = "ck-ACCESS-LOG-CLIENT-1111"
UPSTREAM_KEY = "sk-ACCESS-LOG-UPSTREAM-2222"
PROMPT = "PRIVATE-PROMPT-TEXT-3333"
FIELDS = {"time", "request_id", "key_id", "team", "route", "endpoint", "model_asked", "model_served", "provider",
          "attempts", "retries", "failovers", "status", "outcome", "error_type", "stream", "latency_ms", "ttft_ms",
          "tokens_in", "tokens_out", "cost_usd", "cache_hit"}


async def _lines(gw, path) -> list[dict]:
    assert await trio.to_thread.run_sync(gw.app.observer.access_log.sync, 10)
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _config(path, fake_port: int, *, cache: bool = False, fault: int | None = None) -> str:
    text = (f'[auth]\napi_keys = ["{CLIENT_KEY}"]\n[telemetry]\nusage_ledger = false\n'
            f'[log]\naccess = true\naccess_path = "{path}"\n')
    if cache:
        text += "[cache]\nenabled = true\n"
    text += provider_toml("up", "openai", base_url=f"http://127.0.0.1:{fake_port}/v1", api_key=UPSTREAM_KEY,
                          models=[MODEL])
    return text


def _chat(stream: bool = False, model: str = MODEL) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}


async def test_a_line_per_request_streamed_or_not(gateway_factory, fake_factory, tmp_path):
    fake, _ = await fake_factory()
    path = tmp_path / "access.log"
    gw = await gateway_factory(_config(path, fake.port))
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, headers=auth) as http:
        plain = await http.post("/v1/chat/completions", json=_chat())
        streamed = await http.post("/v1/chat/completions", json=_chat(stream=True))
        assert plain.status_code == streamed.status_code == 200
        assert PROMPT in plain.text
    first, second = await _lines(gw, path)
    for line, response, stream in ((first, plain, False), (second, streamed, True)):
        assert set(line) == FIELDS
        assert line["request_id"] == response.headers["x-request-id"]
        assert line["key_id"].startswith("key_") and line["team"] is None
        assert line["route"] == "/v1/chat/completions" and line["endpoint"] == "chat"
        assert line["model_asked"] == line["model_served"] == MODEL
        assert line["provider"] == "up"
        assert line["attempts"] == 1 and line["retries"] == 0 and line["failovers"] == 0
        assert line["status"] == 200 and line["outcome"] == "ok" and line["error_type"] is None
        assert line["stream"] is stream and line["cache_hit"] is False
        assert line["latency_ms"] > 0
        assert line["tokens_in"] > 0 and line["tokens_out"] > 0
        assert line["time"].endswith("Z") and "T" in line["time"]
    assert first["ttft_ms"] is None
    assert 0 < second["ttft_ms"] <= second["latency_ms"]
    text = path.read_text()
    assert CLIENT_KEY not in text and UPSTREAM_KEY not in text and PROMPT not in text


async def test_failed_and_refused_requests_have_their_lines(gateway_factory, fake_factory, tmp_path):
    fake, _ = await fake_factory(fault_status=500)
    path = tmp_path / "access.log"
    gw = await gateway_factory(_config(path, fake.port))
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        failed = await http.post("/v1/chat/completions", headers=auth, json=_chat())
        assert failed.status_code == 502
        bad_key = await http.post("/v1/chat/completions", headers={"authorization": "Bearer wrong"}, json=_chat())
        assert bad_key.status_code == 401
        unknown = await http.post("/v1/chat/completions", headers=auth, json=_chat(model="no-such-model"))
        assert unknown.status_code == 404
    lines = await _lines(gw, path)
    assert len(lines) == 3
    by_id = {line["request_id"]: line for line in lines}
    line = by_id[failed.headers["x-request-id"]]
    assert line["status"] == 502 and line["outcome"] == "error" and line["error_type"]
    assert line["provider"] == "up"  # the provider that was tried
    assert line["model_asked"] == MODEL and line["model_served"] is None
    assert line["attempts"] >= 1 and line["tokens_out"] == 0 and line["cache_hit"] is False
    line = by_id[bad_key.headers["x-request-id"]]
    assert line["status"] == 401 and line["outcome"] == "error" and line["error_type"] == "invalid_api_key"
    assert line["key_id"] is None and line["model_asked"] == MODEL and line["attempts"] == 0
    line = by_id[unknown.headers["x-request-id"]]
    assert line["status"] == 404 and line["error_type"] == "model_not_found"
    assert line["key_id"].startswith("key_") and line["model_asked"] == "no-such-model"
    text = path.read_text()
    assert CLIENT_KEY not in text and UPSTREAM_KEY not in text and PROMPT not in text and "wrong" not in text


async def test_a_cache_hit_has_its_line(gateway_factory, fake_factory, tmp_path):
    fake, _ = await fake_factory()
    path = tmp_path / "access.log"
    gw = await gateway_factory(_config(path, fake.port, cache=True))
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, headers=auth) as http:
        miss = await http.post("/v1/chat/completions", json=_chat())
        hit = await http.post("/v1/chat/completions", json=_chat())
        assert miss.headers["x-runestone-cache"] == "miss" and hit.headers["x-runestone-cache"] == "hit"
    first, second = await _lines(gw, path)
    assert first["cache_hit"] is False and first["request_id"] == miss.headers["x-request-id"]
    assert set(second) == FIELDS
    assert second["cache_hit"] is True and second["request_id"] == hit.headers["x-request-id"]
    assert second["status"] == 200 and second["outcome"] == "ok"
    assert second["model_asked"] == second["model_served"] == MODEL
    # A hit is recorded as served by the cache (as in the ledger): no upstream was asked.
    assert second["provider"] == "cache" and second["key_id"] == first["key_id"]
    assert second["attempts"] == 0 and second["cost_usd"] == 0.0
    assert second["tokens_in"] == second["tokens_out"] == 0  # no upstream tokens were used
    assert PROMPT not in path.read_text()


async def test_off_by_default(gateway_factory, fake_factory):
    fake, _ = await fake_factory()
    gw = await gateway_factory(provider_toml("up", "openai", base_url=f"http://127.0.0.1:{fake.port}/v1",
                                             models=[MODEL]))
    assert gw.app.observer is None and gw.app.telemetry.tap is None


async def test_an_unwritable_path_is_refused_at_start(tmp_path):
    import pytest

    from runestone.app import Application, StartupError
    from runestone.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndir = "{tmp_path}"\n[log]\naccess = true\naccess_path = "{tmp_path}/no/such/dir/x.log"\n')
    with pytest.raises(StartupError, match="access_path"):
        Application(load_config(str(cfg), env={}))
