"""The data plane through the official SDKs: the gateway's ``openai`` and ``anthropic`` provider types in front
of real upstream servers on loopback, with the sync and async ``openai`` clients, streamed and not, tools,
content parts, every chat parameter passed through, and the model listing.
"""

from __future__ import annotations

import json

import httpx
import openai
import orjson
import pytest
import trio

from gatewaytest import provider_toml
from runestone.http.server import Response, serve_http

USER = [{"role": "user", "content": "hello there"}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "in parts"}]}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MODELS = (("gpt-4o-mini", "up-openai"), ("claude-haiku-4-5", "up-anthropic"))


async def _gateway(gateway_factory, fake_factory, extra: str = ""):
    upstream, knobs = await fake_factory()
    base = f"http://127.0.0.1:{upstream.port}"
    gw = await gateway_factory(
        provider_toml("up-openai", "openai", base_url=base + "/v1", api_key="sk-test", models=["gpt-4o-mini"])
        + provider_toml("up-anthropic", "anthropic", base_url=base, api_key="ak-test", models=["claude-haiku-4-5"])
        + extra
    )
    return gw, knobs


def _collect(chunks) -> dict:
    """Fold a list of chat.completion.chunk objects into text, tool calls, finish reasons and ids."""
    text, finish, ids, calls, usage = "", [], set(), {}, None
    for chunk in chunks:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
    return {"text": text, "finish": finish, "ids": ids, "calls": calls, "usage": usage}


async def test_async_sdk_streamed_and_not_through_both_provider_types(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    for model, provider in MODELS:
        for messages, expected in ((USER, "Echo: hello there"), (PARTS, "Echo: hello in parts")):
            raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages)
            assert raw.headers["x-runestone-provider"] == provider
            assert raw.headers["x-request-id"]
            completion = raw.parse()
            assert completion.object == "chat.completion"
            assert completion.choices[0].message.role == "assistant"
            assert completion.choices[0].message.content.startswith(expected)
            assert completion.choices[0].finish_reason == "stop"

            raw_stream = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True})
            assert raw_stream.headers["x-runestone-provider"] == provider
            assert raw_stream.headers["content-type"].startswith("text/event-stream")
            got = _collect([c async for c in raw_stream.parse()])
            assert got["text"] == completion.choices[0].message.content
            assert got["finish"] == ["stop"]
            assert len(got["ids"]) == 1
            assert got["usage"].completion_tokens == completion.usage.completion_tokens
            assert got["usage"].prompt_tokens == completion.usage.prompt_tokens


async def test_sync_sdk_in_a_thread_streamed_and_not(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)

    def use_sync_client() -> list[tuple[str, str, str]]:
        out = []
        with openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=10) as client:
            for model, _ in MODELS:
                raw = client.chat.completions.with_raw_response.create(model=model, messages=USER)
                text = raw.parse().choices[0].message.content
                with client.chat.completions.create(model=model, messages=USER, stream=True) as stream:
                    streamed = _collect(list(stream))
                out.append((raw.headers["x-runestone-provider"], text, streamed["text"]))
        return out

    results = await trio.to_thread.run_sync(use_sync_client)
    assert [r[0] for r in results] == [p for _, p in MODELS]
    for _, text, streamed in results:
        assert text.startswith("Echo: hello there")
        assert streamed == text


async def test_tool_calls_streamed_and_not_and_the_tool_result_turn(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    for model, provider in MODELS:
        completion = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER],
                                                          tool_choice="auto")
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.type == "function"
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert list(args) == ["city"] and isinstance(args["city"], str)
        assert call.id

        stream = await client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], stream=True,
                                                      tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})
        got = _collect([c async for c in stream])
        assert got["finish"] == ["tool_calls"]
        assert got["text"] == ""
        assert list(got["calls"]) == [0]
        assert got["calls"][0]["name"] == "get_weather"
        assert json.loads(got["calls"][0]["arguments"]) == args
        assert got["calls"][0]["id"] == call.id, provider

        # The second turn carries the call and its result; each provider type must express it upstream.
        follow = ask + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
            {"role": "user", "content": "thanks, and tomorrow?"},
        ]
        answer = await client.chat.completions.create(model=model, messages=follow, tools=[WEATHER],
                                                      tool_choice="none")
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.content.startswith("Echo: thanks, and tomorrow?")


class Recorder:
    """A tiny upstream that records what it receives and answers in the OpenAI or Anthropic wire format."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict, dict]] = []

    async def __call__(self, request) -> Response:
        body = orjson.loads(await request.body())
        headers = {k.decode(): v.decode() for k, v in request.headers}
        self.seen.append((request.path, headers, body))
        if request.path == "/v1/messages":
            msg = {"id": "msg_rec", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "recorded"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}
            return Response.json(msg)
        head = {"id": "chatcmpl-rec", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return Response.json({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "recorded"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
        chunk = {**head, "object": "chat.completion.chunk"}

        async def events():
            yield b"data: " + orjson.dumps({**chunk, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": "recorded"}, "finish_reason": None}]}) + b"\n\n"
            yield b"data: " + orjson.dumps({**chunk, "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\n"
            yield b"data: " + orjson.dumps({**chunk, "choices": [], "usage": {
                "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return Response(200, [(b"content-type", b"text/event-stream")], stream=events())


# Every request parameter of OpenAI's chat completions API, with a valid value.
ALL_PARAMS = dict(
    messages=[{"role": "developer", "content": "be brief"},
              {"role": "user", "content": [{"type": "text", "text": "hi"},
                                           {"type": "image_url", "image_url": {"url": "https://x.test/a.png",
                                                                               "detail": "low"}}]},
              {"role": "assistant", "content": "yes?", "name": "bot"},
              {"role": "user", "content": "go on", "name": "ann"}],
    audio={"voice": "alloy", "format": "wav"},
    frequency_penalty=0.5,
    logit_bias={"50256": -100},
    logprobs=True,
    top_logprobs=2,
    max_completion_tokens=50,
    max_tokens=40,
    metadata={"team": "qa"},
    modalities=["text"],
    n=2,
    parallel_tool_calls=False,
    prediction={"type": "content", "content": "maybe"},
    presence_penalty=-0.5,
    prompt_cache_key="k-1",
    reasoning_effort="low",
    response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    safety_identifier="user-hash",
    seed=7,
    service_tier="auto",
    stop=["END", "STOP"],
    store=False,
    temperature=0.3,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    tools=[WEATHER],
    top_p=0.9,
    user="ann",
    verbosity="low",
    web_search_options={"search_context_size": "low"},
)


async def test_every_chat_parameter_reaches_an_openai_upstream_unchanged(gateway_factory, nursery):
    recorder = Recorder()
    upstream = await nursery.start(serve_http, recorder, "127.0.0.1", 0)
    gw = await gateway_factory(provider_toml("rec", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                             api_key="sk-upstream", models=["gpt-4o"]))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="client-key", max_retries=0)
    extra = {"custom_vendor_flag": {"nested": [1, 2]}}
    completion = await client.chat.completions.create(model="gpt-4o", extra_body=extra, **ALL_PARAMS)
    assert completion.choices[0].message.content == "recorded"
    path, headers, body = recorder.seen[-1]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-upstream"  # the upstream's key, never the client's
    assert body == {"model": "gpt-4o", **ALL_PARAMS, **extra}

    stream = await client.chat.completions.create(model="gpt-4o", stream=True, **ALL_PARAMS)
    chunks = [c async for c in stream]
    _, _, body = recorder.seen[-1]
    # The only change: usage is always asked for upstream (the ledger needs it) ...
    assert body == {"model": "gpt-4o", **ALL_PARAMS, "stream": True, "stream_options": {"include_usage": True}}
    # ... and the usage-only chunk the client did not ask for is not relayed.
    assert [c.usage for c in chunks] == [None, None]
    assert _collect(chunks)["text"] == "recorded"


async def test_parameters_reach_an_anthropic_upstream_translated(gateway_factory, nursery):
    recorder = Recorder()
    upstream = await nursery.start(serve_http, recorder, "127.0.0.1", 0)
    gw = await gateway_factory(provider_toml("rec", "anthropic", base_url=f"http://127.0.0.1:{upstream.port}",
                                             api_key="ak-upstream", models=["claude-x"]))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="client-key", max_retries=0)
    completion = await client.chat.completions.create(
        model="claude-x",
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        max_tokens=33, temperature=1.5, top_p=0.5, stop="END", user="ann", tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, seed=3, frequency_penalty=1.0)
    assert completion.choices[0].message.content == "recorded"
    assert completion.usage.prompt_tokens == 3
    path, headers, body = recorder.seen[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == "ak-upstream" and headers["anthropic-version"]
    assert body == {
        "model": "claude-x",
        "max_tokens": 33,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        "tools": [{"name": "get_weather", "description": "Weather of a city",
                   "input_schema": WEATHER["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 1.0,  # Anthropic's range is 0..1
        "top_p": 0.5,
        "metadata": {"user_id": "ann"},
    }


async def test_models_list_and_retrieve(gateway_factory, fake_factory):
    gw, _ = await _gateway(gateway_factory, fake_factory, extra=(
        '[[failover.groups]]\nname = "chat"\nproviders = ["up-openai", "up-anthropic"]\n'))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    listed = {m.id: m.owned_by async for m in client.models.list()}
    assert listed["gpt-4o-mini"] == "up-openai"
    assert listed["claude-haiku-4-5"] == "up-anthropic"
    assert listed["chat"] == "runestone:group"
    model = await client.models.retrieve("claude-haiku-4-5")
    assert (model.id, model.object, model.owned_by) == ("claude-haiku-4-5", "model", "up-anthropic")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"
    assert "GET /v1/models" in caught.value.body["message"]
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/v1/models/gpt-4o-mini")
        assert r.status_code == 200 and r.json()["id"] == "gpt-4o-mini"
        assert r.headers["x-request-id"]
        # The group is a model name a client may use; under "priority" equal priorities keep the listed order.
        chat = await http.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        assert chat.status_code == 200 and chat.headers["x-runestone-provider"] == "up-openai"
        assert chat.json()["choices"][0]["message"]["content"].startswith("Echo: hello there")
