"""Every way a client request can go wrong, end to end: the status, OpenAI's error shape naming the field,
a message a person can act on, the request id and provider headers, and never a traceback.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from gatewaytest import provider_toml

KEY = {"authorization": "Bearer k1"}
OK_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw(gateway_factory, fake_factory):
    good, _ = await fake_factory()
    broken, _ = await fake_factory(fault_status=500)
    busy, _ = await fake_factory(fault_status=503)
    limited, _ = await fake_factory(fault_status=429, retry_after=7)
    refusing, _ = await fake_factory(fault_status=422)
    # A port nobody listens on: bind, read the port, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()

    def up(name, port, model):
        return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk", models=[model])

    return await gateway_factory(
        '[server]\nhost = "127.0.0.1"\nport = 0\nmax_body_bytes = 4096\n'
        '[auth]\napi_keys = ["k1"]\n'
        '[retry]\nmax_attempts = 1\n'
        + up("good", good.port, "gpt-4o-mini")
        + up("broken", broken.port, "broken-model")
        + up("busy", busy.port, "busy-model")
        + up("limited", limited.port, "limited-model")
        + up("refusing", refusing.port, "refusing-model")
        + up("dead", dead_port, "dead-model")
        + provider_toml("fake", "fake", models=["fake-embedding"])
    )


def assert_error(r: httpx.Response, status: int, *, param=None, code=None, says: str | None = None,
                 request_id: bool = True) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    if request_id:
        assert r.headers["x-request-id"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if says is not None:
        assert says in err["message"], err
    return err


async def test_missing_or_wrong_key_is_401(gw):
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/chat/completions", json=OK_BODY)
        err = assert_error(r, 401, code="missing_api_key", says="Authorization: Bearer")
        assert err["type"] == "authentication_error"
        r = await http.post("/v1/chat/completions", json=OK_BODY, headers={"authorization": "Bearer nope"})
        assert_error(r, 401, code="invalid_api_key")
        r = await http.get("/v1/models", headers={"authorization": "Basic azE6"})
        assert_error(r, 401)
        # Anthropic-style clients send the key as x-api-key.
        r = await http.post("/v1/chat/completions", json=OK_BODY, headers={"x-api-key": "k1"})
        assert r.status_code == 200 and r.headers["x-runestone-provider"] == "good"
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(**OK_BODY)


@pytest.mark.parametrize("raw, says", [
    (b'{"model": "gpt-4o-mini", "messages": [', "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "not a JSON array"),
    (b'"text"', "not a JSON string"),
    (b"\xff\xfe{}", "not valid JSON"),
])
async def test_malformed_json_is_400(gw, raw, says):
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_error(r, 400, code="invalid_json", says=says)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("patch, param", [
    ({"model": None}, "model"),
    ({"model": 5}, "model"),
    ({"model": "  "}, "model"),
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"runestone": {"policy": "fastest-ever"}}, "runestone"),
])
async def test_missing_or_invalid_field_is_400_naming_it(gw, patch, param):
    body = {**OK_BODY, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.post("/v1/chat/completions", json=body)
    err = assert_error(r, 400, param=param)
    assert err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"]


async def test_invalid_fields_through_the_sdk_and_on_embeddings(gw):
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="k1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                             temperature=9)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="fake-embedding", input=[])
    assert caught.value.body["param"] == "input"
    embedded = await client.embeddings.create(model="fake-embedding", input=["a", "b"])
    assert len(embedded.data) == 2


async def test_unknown_model_is_404_saying_how_to_list_models(gw):
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.post("/v1/chat/completions", json={**OK_BODY, "model": "gpt-17"})
        err = assert_error(r, 404, param="model", code="model_not_found", says="GET /v1/models")
        assert "gpt-17" in err["message"]
        r = await http.post("/v1/chat/completions", json={**OK_BODY, "model": "nosuch:gpt-4o-mini"})
        assert_error(r, 404, code="model_not_found")
        r = await http.post("/v1/embeddings", json={"model": "gpt-17", "input": "x"})
        assert_error(r, 404, code="model_not_found")


async def test_body_over_the_limit_is_413(gw):
    big = {**OK_BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        # A declared length over the limit is refused by the HTTP server from the head alone, before any
        # route (so before a request id is given); the body is never read.
        r = await http.post("/v1/chat/completions", json=big)
        assert_error(r, 413, says="4096", request_id=False)

        async def chunked():
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        r = await http.post("/v1/chat/completions", content=chunked())
        assert_error(r, 413, says="4096")
        # The connection pool is still usable afterwards.
        r = await http.post("/v1/chat/completions", json=OK_BODY)
        assert r.status_code == 200


async def test_wrong_method_is_405_and_unknown_path_404(gw):
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.get("/v1/chat/completions")
        assert_error(r, 405, code="method_not_allowed", says="POST")
        assert r.headers["allow"] == "POST"
        r = await http.delete("/v1/models")
        assert_error(r, 405)
        r = await http.post("/v2/chat/completions", json=OK_BODY)
        assert_error(r, 404, code="not_found", says="openapi")
        r = await http.get("/v1/nothing-here", headers={"x-request-id": "mine-123"})
        assert_error(r, 404)
        assert r.headers["x-request-id"] == "mine-123"


@pytest.mark.parametrize("model, provider, status, says", [
    ("broken-model", "broken", 502, "injected fault: HTTP 500"),
    ("busy-model", "busy", 503, "injected fault: HTTP 503"),
    ("limited-model", "limited", 429, "injected fault: HTTP 429"),
    ("dead-model", "dead", 502, "could not connect"),
    ("refusing-model", "refusing", 422, "injected fault: HTTP 422"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failure_carries_the_upstreams_reason(gw, model, provider, status, says, stream):
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.post("/v1/chat/completions", json={**OK_BODY, "model": model, "stream": stream},
                            headers={"x-request-id": "req-up-1"})
    err = assert_error(r, status, says=says)
    assert r.headers["x-runestone-provider"] == provider
    assert r.headers["x-request-id"] == "req-up-1"
    if status == 429:
        # The upstream's own error, unchanged: status, message, type and code.
        assert r.headers["retry-after"] == "7"
        assert err == {"message": says, "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    elif status == 422:
        # The upstream judged the request itself wrong: the client can fix it, and hears it in its words.
        assert err == {"message": says, "type": "invalid_request_error", "param": None, "code": None}
    else:
        assert f"provider '{provider}'" in err["message"]
        assert err["type"] in ("api_error", "server_error")


async def test_success_headers(gw):
    async with httpx.AsyncClient(base_url=gw.url, headers=KEY) as http:
        r = await http.post("/v1/chat/completions", json=OK_BODY, headers={"x-request-id": "abc-1"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "abc-1"
        assert r.headers["x-runestone-provider"] == "good"
        r = await http.post("/v1/chat/completions", json={**OK_BODY, "stream": True},
                            headers={"x-request-id": "bad id with spaces"})
        assert r.status_code == 200
        assert r.headers["x-request-id"].startswith("req_")  # an unusable id is replaced, not echoed
        assert r.headers["x-runestone-provider"] == "good"
        assert r.text.endswith("data: [DONE]\n\n")
