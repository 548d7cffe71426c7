"""The ``gemini`` and ``azure`` provider types end to end: the official ``openai`` and ``anthropic`` SDKs against the
gateway, the gateway against ``runestone fake-provider`` speaking each vendor's own format, over real sockets.

Each test also reads what the fake received (``GET /_fake/stats`` keeps the last requests), so the request the
gateway sends upstream is checked field by field: URL scheme, credentials in the vendor's header and nowhere else.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from gatewaytest import provider_toml

GEMINI_KEY = "AIzaSyFAKE-gemini-key-0123456789abcdef"
AZURE_KEY = "azure-fake-key-0123456789abcdef"
USER = [{"role": "user", "content": "hello there"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
          "required": ["city", "celsius"], "additionalProperties": False}

# (provider name, model asked for, what the upstream is told)
VENDORS = ("gemini", "azure", "azure-v1")


async def _setup(gateway_factory, fake_factory, vendor: str, **knobs):
    models = ("gemini-2.5-flash", "text-embedding-004", "prod-4o", "prod-embed", "gpt-4o")
    upstream, k = await fake_factory(models=models, **knobs)
    base = f"http://127.0.0.1:{upstream.port}"
    if vendor == "gemini":
        toml = provider_toml("gem", "gemini", base_url=base + "/v1beta", api_key=GEMINI_KEY,
                             models=["gemini-2.5-flash", "text-embedding-004"])
        chat, embed = "gemini-2.5-flash", "text-embedding-004"
    else:
        url = base + ("/openai/v1" if vendor == "azure-v1" else "")
        toml = (provider_toml("az", "azure", base_url=url, api_key=AZURE_KEY)
                + '[providers.config.deployments]\n"gpt-4o" = "prod-4o"\n"text-embedding-3-small" = "prod-embed"\n')
        chat, embed = "gpt-4o", "text-embedding-3-small"
    gw = await gateway_factory(toml)
    return gw, base, chat, embed


async def _sent(base: str) -> list[dict]:
    async with httpx.AsyncClient() as http:
        return (await http.get(base + "/_fake/stats")).json()["recent"]


def _check_credentials(vendor: str, request: dict) -> None:
    headers = request["headers"]
    assert GEMINI_KEY not in request["target"] and AZURE_KEY not in request["target"]
    assert "key=" not in request["target"]
    if vendor == "gemini":
        assert headers["x-goog-api-key"] == GEMINI_KEY
        assert "authorization" not in headers and "api-key" not in headers
    else:
        assert headers["api-key"] == AZURE_KEY
        assert "authorization" not in headers


def _check_target(vendor: str, request: dict, operation: str, stream: bool = False) -> None:
    target = request["target"]
    if vendor == "gemini":
        verb = {"chat": "streamGenerateContent?alt=sse" if stream else "generateContent",
                "embed": "batchEmbedContents"}[operation]
        model = "text-embedding-004" if operation == "embed" else "gemini-2.5-flash"
        assert target == f"/v1beta/models/{model}:{verb}"
    elif vendor == "azure":
        dep = "prod-embed" if operation == "embed" else "prod-4o"
        path = "embeddings" if operation == "embed" else "chat/completions"
        assert target == f"/openai/deployments/{dep}/{path}?api-version=2024-10-21"
        assert "model" not in request["body"]
    else:
        assert target == "/openai/v1/" + ("embeddings" if operation == "embed" else "chat/completions")
        assert request["body"]["model"] == ("prod-embed" if operation == "embed" else "prod-4o")


@pytest.mark.parametrize("vendor", VENDORS)
async def test_chat_streamed_and_not(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "Be brief."}, *USER], temperature=0.3, max_tokens=50)
    completion = raw.parse()
    assert raw.headers["x-runestone-provider"] == ("gem" if vendor == "gemini" else "az")
    assert completion.choices[0].message.content.startswith("Echo: hello there")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    [sent] = (await _sent(base))[-1:]
    _check_target(vendor, sent, "chat")
    _check_credentials(vendor, sent)
    if vendor == "gemini":
        assert sent["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert sent["body"]["contents"] == [{"role": "user", "parts": [{"text": "hello there"}]}]
        assert sent["body"]["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 50}
    else:
        assert sent["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
        assert sent["body"]["temperature"] == 0.3 and sent["body"]["max_tokens"] == 50
        # Azure's content-filter annotations reach the client unchanged
        extra = completion.model_extra
        assert extra["prompt_filter_results"][0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
        assert completion.choices[0].model_extra["content_filter_results"]["violence"]["filtered"] is False

    stream = await client.chat.completions.create(model=model, messages=USER, stream=True,
                                                  stream_options={"include_usage": True})
    text, finish, usage = "", [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish += [choice.finish_reason] if choice.finish_reason else []
    assert text == completion.choices[0].message.content
    assert finish == ["stop"]
    assert usage.completion_tokens == completion.usage.completion_tokens
    [sent] = (await _sent(base))[-1:]
    _check_target(vendor, sent, "chat", stream=True)
    _check_credentials(vendor, sent)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_tools_and_the_tool_result_turn(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    completion = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice="required")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and list(json.loads(call.function.arguments)) == ["city"]
    [sent] = (await _sent(base))[-1:]
    if vendor == "gemini":
        assert sent["body"]["tools"] == [{"functionDeclarations": [{
            "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}]
        assert sent["body"]["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    else:
        assert sent["body"]["tools"] == [WEATHER] and sent["body"]["tool_choice"] == "required"

    stream = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], stream=True,
                                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    names, args, finish = "", "", []
    async for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                names += (tc.function.name or "") if tc.function else ""
                args += (tc.function.arguments or "") if tc.function else ""
            finish += [c.finish_reason] if c.finish_reason else []
    assert names == "get_weather" and list(json.loads(args)) == ["city"] and finish == ["tool_calls"]

    followup = [*ask, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    answer = await client.chat.completions.create(model=model, messages=followup, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content.startswith("Echo: 18 degrees")
    [sent] = (await _sent(base))[-1:]
    if vendor == "gemini":
        model_turn, result_turn = sent["body"]["contents"][1:]
        assert model_turn["role"] == "model" and model_turn["parts"][-1]["functionCall"]["name"] == "get_weather"
        assert result_turn == {"role": "user", "parts": [{"functionResponse": {
            "name": "get_weather", "response": {"output": "18 degrees"}}}]}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_json_output_with_a_schema(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    completion = await client.chat.completions.create(
        model=model, messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
    data = json.loads(completion.choices[0].message.content)
    assert set(data) == {"city", "celsius"} and isinstance(data["celsius"], int)
    [sent] = (await _sent(base))[-1:]
    if vendor == "gemini":
        assert sent["body"]["generationConfig"] == {"responseMimeType": "application/json", "responseSchema": {
            "type": "OBJECT", "properties": {"city": {"type": "STRING"}, "celsius": {"type": "INTEGER"}},
            "required": ["city", "celsius"]}}
    else:
        assert sent["body"]["response_format"]["json_schema"]["schema"] == SCHEMA


@pytest.mark.parametrize("vendor", VENDORS)
async def test_embeddings(gateway_factory, fake_factory, vendor):
    gw, base, _, model = await _setup(gateway_factory, fake_factory, vendor)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    result = await client.embeddings.create(model=model, input=["first text", "second text"], dimensions=16)
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    [sent] = (await _sent(base))[-1:]
    _check_target(vendor, sent, "embed")
    _check_credentials(vendor, sent)
    # base64, as the openai SDK asks by default when no format is given
    b64 = await client.embeddings.create(model=model, input="first text", dimensions=16)
    assert b64.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-6)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_anthropic_sdk_messages_in_front(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
    message = await client.messages.create(model=model, max_tokens=100, system="Be brief.",
                                           messages=[{"role": "user", "content": "hello there"}])
    assert message.content[0].text.startswith("Echo: hello there")
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    async with client.messages.stream(model=model, max_tokens=100,
                                      messages=[{"role": "user", "content": "hello there"}]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == message.content[0].text
    tool = {"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER["function"]["parameters"]}
    called = await client.messages.create(model=model, max_tokens=100, tools=[tool], tool_choice={"type": "any"},
                                          messages=[{"role": "user", "content": "weather in Paris?"}])
    assert called.stop_reason == "tool_use"
    [use] = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and list(use.input) == ["city"]
    [sent] = (await _sent(base))[-1:]
    _check_credentials(vendor, sent)


async def test_azure_content_filter_refusing_the_prompt_is_its_400(gateway_factory, fake_factory):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, "azure", content_filter="prompt")
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=USER)
    err = info.value.body
    assert info.value.status_code == 400
    assert err["code"] == "content_filter" and err["param"] == "prompt"
    assert "content management policy" in err["message"]
    assert "ResponsibleAIPolicyViolation: self_harm (medium) filtered" in err["message"]
    assert AZURE_KEY not in err["message"]
    # the same refusal for a stream, before any byte
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=USER, stream=True)
    assert info.value.body["code"] == "content_filter"


async def test_azure_content_filter_stopping_the_completion(gateway_factory, fake_factory):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, "azure", content_filter="completion")
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    completion = await client.chat.completions.create(model=model, messages=USER)
    choice = completion.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.model_extra["content_filter_results"]["violence"] == {"filtered": True, "severity": "high"}
    stream = await client.chat.completions.create(model=model, messages=USER, stream=True)
    finish, results = [], []
    async for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finish.append(c.finish_reason)
                results.append(c.model_extra.get("content_filter_results"))
    assert finish == ["content_filter"]
    assert results[0]["violence"]["filtered"] is True


async def test_azure_bearer_token(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(models=("prod-4o",))
    gw = await gateway_factory(provider_toml("az", "azure", base_url=f"http://127.0.0.1:{upstream.port}",
                                             api_key="entra-token-0123456789", azure_auth="bearer",
                                             models=["prod-4o"], api_version="2025-04-01-preview"))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    await client.chat.completions.create(model="prod-4o", messages=USER)
    [sent] = (await _sent(f"http://127.0.0.1:{upstream.port}"))[-1:]
    assert sent["headers"]["authorization"] == "Bearer entra-token-0123456789" and "api-key" not in sent["headers"]
    assert sent["target"] == "/openai/deployments/prod-4o/chat/completions?api-version=2025-04-01-preview"


@pytest.mark.parametrize("vendor", ("gemini", "azure"))
async def test_upstream_refusals_pass_through_and_never_carry_the_key(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        # a model the vendor does not serve, pinned to the provider: the vendor's own 404
        name = "gem" if vendor == "gemini" else "az"
        r = await http.post("/v1/chat/completions", json={"model": f"{name}:no-such-model", "messages": USER})
        assert r.status_code == 404, r.text
        assert GEMINI_KEY not in r.text and AZURE_KEY not in r.text
        await http.post(base + "/_fake/knobs", json={"fault_status": 401})
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": USER})
        assert r.status_code == 502 and r.json()["error"]["code"] == "provider_auth_failed"
        assert GEMINI_KEY not in r.text and AZURE_KEY not in r.text


async def test_gemini_invalid_key_400_is_the_gateways_own_credential(gateway_factory):
    """Gemini answers a bad key with a 400 INVALID_ARGUMENT: the client must not be told its request was bad."""
    from runestone.http.server import Response, serve_http

    body = (__import__("pathlib").Path(__file__).parent.parent / "wire/fixtures/gemini_error_api_key_invalid.json").read_bytes()

    async def handler(request):
        return Response(400, [(b"content-type", b"application/json")], body)

    import trio
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_http, handler, "127.0.0.1", 0)
        gw = await gateway_factory(provider_toml("gem", "gemini", base_url=f"http://127.0.0.1:{server.port}/v1beta",
                                                 api_key=GEMINI_KEY, models=["gemini-2.5-flash"]))
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post("/v1/chat/completions", json={"model": "gemini-2.5-flash", "messages": USER})
        assert r.status_code == 502 and r.json()["error"]["code"] == "provider_auth_failed", r.text
        assert "API key not valid" in r.json()["error"]["message"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("vendor", VENDORS)
async def test_logprobs_streamed_and_not(gateway_factory, fake_factory, vendor):
    gw, base, model, _ = await _setup(gateway_factory, fake_factory, vendor)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    whole = await client.chat.completions.create(model=model, messages=USER, logprobs=True, top_logprobs=2)
    entries = whole.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries)
    if vendor == "gemini":
        [sent] = (await _sent(base))[-1:]
        assert sent["body"]["generationConfig"] == {"responseLogprobs": True, "logprobs": 2}
    stream = await client.chat.completions.create(model=model, messages=USER, logprobs=True, top_logprobs=2,
                                                  stream=True)
    streamed = [e async for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]
