"""The ``bedrock`` provider end to end: openai and anthropic SDKs in, Converse/ConverseStream out to the fake
Bedrock (which recomputes every SigV4 signature with botocore), and back, over real sockets."""

import anthropic
import httpx
import jsonschema
import openai
import orjson
import pytest
import trio

from gatewaytest import RecordingUpstream, provider_toml
from runestone.http.server import serve_http
from runestone.providers.fake_content import fake_reply_chunks
from runestone.providers.fake_server import FakeKnobs

MODEL = "anthropic.claude-haiku-4-5-20251001-v1:0"
KEY = "sk-client-1"
KNOBS = FakeKnobs()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def bedrock_toml(name: str, port: int, **config) -> str:
    settings = {"base_url": f"http://127.0.0.1:{port}", "region": "us-east-1",
                "aws_access_key_id": KNOBS.aws_access_key_id, "aws_secret_access_key": KNOBS.aws_secret_access_key,
                "models": [MODEL]}
    settings.update(config)
    return provider_toml(name, "bedrock", **settings)


async def _gateway(gateway_factory, nursery, extra: str = "", **config):
    upstream = RecordingUpstream()
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    gw = await gateway_factory(bedrock_toml("bed", server.port, **config) + extra, env={"RUNESTONE_API_KEYS": KEY})
    return gw, upstream


def _openai(gw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)


ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello bedrock"}]


async def test_chat_goes_out_as_a_signed_converse_request(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    raw = await _openai(gw).chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=200, temperature=0.5, top_p=0.9, stop=["END"])
    assert raw.headers["x-runestone-provider"] == "bed"
    done = raw.parse()
    assert done.choices[0].message.content == "".join(fake_reply_chunks([{"role": "user", "content": "hello bedrock"}]))
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
    path, headers, body = upstream.requests[-1]
    # The model id is one escaped path segment; the fake verified the signature over exactly this path.
    assert path == "/model/anthropic.claude-haiku-4-5-20251001-v1%3A0/converse"
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KNOBS.aws_access_key_id}/")
    assert "/us-east-1/bedrock/aws4_request" in headers["authorization"]
    assert KNOBS.aws_secret_access_key not in str(headers) and KNOBS.aws_secret_access_key.encode() not in body
    # Golden fields, from the Converse API reference (botocore's bedrock-runtime service model).
    assert orjson.loads(body) == {
        "messages": [{"role": "user", "content": [{"text": "hello bedrock"}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 200, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]},
    }


async def test_stream_relays_the_event_stream_as_chunks(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = _openai(gw)
    whole = await client.chat.completions.create(model=MODEL, messages=ASK)
    stream = await client.chat.completions.create(model=MODEL, messages=ASK, stream=True,
                                                  stream_options={"include_usage": True})
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert upstream.requests[-1][0].endswith("/converse-stream")
    assert "".join(text) == whole.choices[0].message.content and len([t for t in text if t]) > 1
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


async def test_tools_streamed_and_not_and_the_tool_result_turn(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = _openai(gw)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    done = await client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert done.choices[0].finish_reason == "tool_calls"
    [call] = done.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in orjson.loads(call.function.arguments)
    sent = upstream.last_body()
    assert sent["toolConfig"] == {"tools": [{"toolSpec": {
        "name": "get_weather", "description": "Weather in a city",
        "inputSchema": {"json": WEATHER["function"]["parameters"]}}}], "toolChoice": {"tool": {"name": "get_weather"}}}

    stream = await client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], stream=True)
    ids, names, args, finish = set(), set(), [], None
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            ids.add(tc.id) if tc.id else None
            names.add(tc.function.name) if tc.function and tc.function.name else None
            args.append(tc.function.arguments or "" if tc.function else "")
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and names == {"get_weather"} and len(ids) == 1
    assert orjson.loads("".join(args)) == orjson.loads(call.function.arguments)

    follow = ask + [done.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = await client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content.startswith("Echo: sunny")
    sent = upstream.last_body()
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [{"toolUse": {"toolUseId": call.id, "name": "get_weather",
                                                           "input": orjson.loads(call.function.arguments)}}]
    assert sent["messages"][2]["content"] == [{"toolResult": {"toolUseId": call.id,
                                                              "content": [{"text": "sunny, 21 C"}]}}]


async def test_json_output_schema_and_object(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = _openai(gw)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "integer"}},
              "required": ["city", "temp"], "additionalProperties": False}
    done = await client.chat.completions.create(model=MODEL, messages=ASK, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}})
    jsonschema.validate(orjson.loads(done.choices[0].message.content), schema)
    fmt = upstream.last_body()["outputConfig"]["textFormat"]
    assert fmt["type"] == "json_schema" and fmt["structure"]["jsonSchema"]["name"] == "weather"
    assert orjson.loads(fmt["structure"]["jsonSchema"]["schema"]) == schema  # a JSON string, as the API wants
    done = await client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"})
    assert isinstance(orjson.loads(done.choices[0].message.content), dict)
    assert upstream.last_body()["system"][-1] == {"text": "Respond with a single valid JSON object and nothing else."}


async def test_anthropic_sdk_in_front_of_bedrock(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY, max_retries=0)
    message = await client.messages.create(model=MODEL, max_tokens=300, system="You are terse.",
                                           messages=[{"role": "user", "content": "hi from claude sdk"}])
    assert message.stop_reason == "end_turn" and message.content[0].text.startswith("Echo: hi from claude sdk")
    assert upstream.last_body()["system"] == [{"text": "You are terse."}]
    async with client.messages.stream(model=MODEL, max_tokens=300,
                                      messages=[{"role": "user", "content": "hi from claude sdk"}]) as s:
        final = await s.get_final_message()
    assert final.content[0].text == message.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens
    tool = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}
    async with client.messages.stream(model=MODEL, max_tokens=300, tools=[tool],
                                      messages=[{"role": "user", "content": "weather in Oslo?"}]) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use"
    [use] = final.content
    assert use.type == "tool_use" and use.name == "get_weather" and "city" in use.input


async def test_a_wrong_secret_is_refused_by_the_signature_check_and_never_shown(gateway_factory, nursery):
    wrong = "wrongSecretKeyThatMustNeverLeak000000000"
    gw, upstream = await _gateway(gateway_factory, nursery, aws_secret_access_key=wrong)
    async with httpx.AsyncClient(base_url=gw.v1, headers={"authorization": f"Bearer {KEY}"}) as http:
        for stream in (False, True):
            r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK, "stream": stream})
            assert r.status_code >= 400
            assert "signature we calculated does not match" in r.text
            assert wrong not in r.text
        dump = await http.get(gw.url + "/admin/providers", headers={"authorization": f"Bearer {KEY}"})
        assert wrong not in dump.text
    assert all(wrong not in h.get("authorization", "") for _, h, _ in upstream.requests)


async def test_throttling_is_a_retryable_429(clock, gateway_factory, nursery):
    upstream = RecordingUpstream(fault_status=429, retry_after=1)
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    gw = await gateway_factory("[telemetry]\nusage_ledger = false\n" + bedrock_toml("bed", server.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=60) as http:
        r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK})
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and "injected fault: HTTP 429" in err["message"]
    assert len(upstream.requests) == 3  # retried, after the pause the upstream asked for


async def test_a_mid_stream_exception_ends_the_stream_with_an_error(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    upstream.fake.knobs.stream_error = True
    async with httpx.AsyncClient(base_url=gw.v1, headers={"authorization": f"Bearer {KEY}"}) as http:
        r = await http.post("/chat/completions", json={"model": MODEL, "messages": ASK, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0].startswith("data: {") and "[DONE]" not in r.text
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert "injected mid-stream fault" in last["error"]["message"]


async def test_aws_environment_variables_fill_in_the_credentials(tmp_path):
    from runestone.config import load_config, provider_spec_to_dict

    path = tmp_path / "c.toml"
    path.write_text(provider_toml("bed", "bedrock", models=[MODEL]) + provider_toml("own", "bedrock", region="eu-west-1"))
    env = {"AWS_ACCESS_KEY_ID": "AKIAENVENVENV", "AWS_SECRET_ACCESS_KEY": "envSecret000000",
           "AWS_SESSION_TOKEN": "envToken000000", "AWS_DEFAULT_REGION": "us-west-2"}
    config = load_config(str(path), env=env)
    bed, own = config.providers
    assert (bed.config.aws_access_key_id, bed.config.aws_secret_access_key, bed.config.aws_session_token,
            bed.config.region) == ("AKIAENVENVENV", "envSecret000000", "envToken000000", "us-west-2")
    assert own.config.region == "eu-west-1"  # the file's setting wins
    shown = str(provider_spec_to_dict(bed)) + repr(bed)
    assert "envSecret000000" not in shown and "envToken000000" not in shown


async def test_models_are_discovered_from_foundation_models_with_a_signed_get(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery, models=[])
    async with httpx.AsyncClient(base_url=gw.v1, headers={"authorization": f"Bearer {KEY}"}) as http:
        ids = {m["id"] for m in (await http.get("/models")).json()["data"]}
    assert MODEL in ids and "fake-embedding" not in ids
    path, headers, _ = upstream.requests[0]
    assert path == "/foundation-models" and headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
