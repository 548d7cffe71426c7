"""Inbound Anthropic ``POST /v1/messages``: the anthropic SDK in, an OpenAI-format upstream out, and back."""

import anthropic
import httpx
import orjson
import pytest

from gatewaytest import Gate, gated_handler, provider_toml
from runestone.http.server import serve_http
from runestone.providers.fake_content import fake_reply_chunks
from runestone.providers.fake_server import make_fake_handler

KEY = "sk-client-1"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class RecordingFake:
    """The fake upstream, recording the JSON bodies it is sent."""

    def __init__(self) -> None:
        self.fake = make_fake_handler()
        self.bodies: list[tuple[str, dict]] = []

    async def __call__(self, request):
        if request.method == "POST" and not request.path.startswith("/_fake"):
            self.bodies.append((request.path, orjson.loads(await request.body())))
        return await self.fake(request)


async def _gateway(gateway_factory, nursery, extra: str = ""):
    upstream = RecordingFake()
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    gw = await gateway_factory(
        provider_toml("up-openai", "openai", base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-up",
                      models=["gpt-4o-mini"]) + extra,
        env={"RUNESTONE_API_KEYS": KEY})
    return gw, upstream


def _client(gw, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


async def test_message_with_system_prompt_through_an_openai_upstream(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    raw = await _client(gw).messages.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=300, system="You are terse.", extra_body={"temperature": 0.2}, stop_sequences=["END"],
        messages=[{"role": "user", "content": "hello there"}])
    assert raw.headers["x-runestone-provider"] == "up-openai"
    message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "gpt-4o-mini"
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert block.type == "text"
    assert block.text == "".join(fake_reply_chunks([{"role": "user", "content": "hello there"}]))
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    path, sent = upstream.bodies[-1]
    assert path == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "hello there"}]
    assert (sent["max_tokens"], sent["temperature"], sent["stop"]) == (300, 0.2, ["END"])


async def test_streamed_message_has_anthropic_event_order_and_usage(gateway_factory, nursery):
    gw, _ = await _gateway(gateway_factory, nursery)
    client = _client(gw)
    whole = await client.messages.create(model="gpt-4o-mini", max_tokens=300,
                                         messages=[{"role": "user", "content": "stream please"}])
    kinds = []
    async with client.messages.stream(model="gpt-4o-mini", max_tokens=300,
                                      messages=[{"role": "user", "content": "stream please"}]) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    raw_kinds = [k for k in kinds if k not in ("text",)]  # "text" is the SDK's own convenience event
    assert raw_kinds[0] == "message_start"
    assert raw_kinds[1:3] == ["content_block_start", "content_block_delta"]
    assert raw_kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    # The wire framing itself: "event: <name>" lines, the first block followed by a ping, as the real API does.
    async with httpx.AsyncClient(base_url=gw.url, headers={"x-api-key": KEY}) as http:
        r = await http.post("/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["content-type"].startswith("text/event-stream")
    names = [e.split("\n", 1)[0] for e in r.text.split("\n\n") if e]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-1] == "event: message_stop"
    assert "data: [DONE]" not in r.text


async def test_tools_streamed_and_not_and_the_tool_result_turn(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = _client(gw)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    message = await client.messages.create(model="gpt-4o-mini", max_tokens=300, tools=[WEATHER],
                                           tool_choice={"type": "tool", "name": "get_weather"}, messages=ask)
    assert message.stop_reason == "tool_use"
    [call] = message.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert isinstance(call.input, dict) and "city" in call.input
    sent = upstream.bodies[-1][1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

    async with client.messages.stream(model="gpt-4o-mini", max_tokens=300, tools=[WEATHER], messages=ask) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use"
    [streamed] = final.content
    assert (streamed.type, streamed.name, streamed.input) == ("tool_use", "get_weather", call.input)

    follow = ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                                     {"type": "text", "text": "and tomorrow?"}]},
    ]
    answer = await client.messages.create(model="gpt-4o-mini", max_tokens=300, tools=[WEATHER],
                                          tool_choice={"type": "none"}, messages=follow)
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].text.startswith("Echo: and tomorrow?")
    turns = upstream.bodies[-1][1]["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "user"]
    assert turns[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}


async def test_auth_by_x_api_key_or_bearer_and_refusals_in_anthropic_shape(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        ok = await http.post("/v1/messages", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["type"] == "message"
        ok = await http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
        assert ok.status_code == 200
        for headers in ({}, {"x-api-key": "sk-wrong"}):
            r = await http.post("/v1/messages", json=body, headers=headers)
            assert r.status_code == 401
            err = r.json()
            assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
            assert err["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        await _client(gw, "sk-wrong").messages.create(**body)
    assert len(upstream.bodies) == 2


@pytest.mark.parametrize(("patch", "says"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    ({"temperature": 3}, "temperature"),
    ({"tools": [{"name": "t"}]}, "tools[0].input_schema"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"model": None}, "model"),
])
async def test_bad_input_is_a_400_in_anthropic_shape_naming_the_field(gateway_factory, nursery, patch, says):
    gw, upstream = await _gateway(gateway_factory, nursery)
    body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    body.update(patch)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await _client(gw).post("/v1/messages", body=body, cast_to=dict)
    err = caught.value.body
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert says in err["error"]["message"]
    assert upstream.bodies == []


async def test_not_json_unknown_model_and_upstream_failure_in_anthropic_shape(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery, extra="[retry]\nmax_attempts = 1\n")
    async with httpx.AsyncClient(base_url=gw.url, headers={"x-api-key": KEY}) as http:
        r = await http.post("/v1/messages", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as caught:
        await _client(gw).messages.create(model="no-such-model", max_tokens=5,
                                          messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "GET /v1/models" in caught.value.body["error"]["message"]
    upstream.fake.knobs.fault_status = 503
    with pytest.raises(anthropic.APIStatusError) as caught:
        await _client(gw).messages.create(model="gpt-4o-mini", max_tokens=5,
                                          messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert "503" in caught.value.body["error"]["message"]


async def test_failure_mid_stream_is_an_error_event_the_sdk_raises(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    upstream.fake.knobs.stream_error = True
    # The upstream holds the rest of its stream (and the failure) at the gate until the client has text: sent
    # at once, the first events may share one read with the error, which then fails the request before its
    # first byte (an error status instead of a partial stream).
    gate = Gate(after=2)
    upstream.fake = gated_handler(upstream.fake, gate)
    text = ""
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with _client(gw).messages.stream(model="gpt-4o-mini", max_tokens=300,
                                               messages=[{"role": "user", "content": "a long answer"}]) as s:
            async for piece in s.text_stream:
                text += piece
                gate.open()
    assert text  # part of the answer came before the failure ...
    assert caught.value.body["type"] == "error"  # ... and the end is an honest error, not a clean stop
    assert caught.value.body["error"]["message"]
