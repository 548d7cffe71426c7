"""``/v1/responses`` through the official ``openai`` SDK, unchanged: the built-in fake (the default config),
an ``openai``-type and an ``anthropic``-type provider in front of the fake upstream, and a provider speaking
the Responses API natively; the store (retrieve, delete, input items, previous_response_id, other keys);
``/v1/responses/input_tokens`` and Anthropic's ``messages.count_tokens``."""

import inspect

import anthropic
import httpx
import openai
import orjson
import pytest
from pydantic import BaseModel

from gatewaytest import provider_toml
from runestone.http.server import Response, serve_http
from runestone.providers.fake_server import make_fake_handler

KEY_A, KEY_B = "sk-client-a", "sk-client-b"
#: model -> the provider that serves it
MODELS = {"fake-model": "fake", "gpt-4o-mini": "up-openai", "claude-haiku-4-5": "up-anthropic"}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class Upstream:
    """The fake upstream (OpenAI and Anthropic), recording bodies; it also serves Anthropic's count_tokens
    and a small native Responses API, which the fake server does not."""

    def __init__(self) -> None:
        self.fake = make_fake_handler()
        self.bodies: list[tuple[str, dict]] = []

    async def __call__(self, request):
        body = orjson.loads(await request.body()) if request.method == "POST" else None
        if body is not None:
            self.bodies.append((request.path, body))
        if request.path == "/v1/messages/count_tokens":
            return Response.json({"input_tokens": 4242})
        if request.path == "/v1/responses/input_tokens":
            return Response.json({"object": "response.input_tokens", "input_tokens": 777})
        if request.path == "/v1/responses":
            return native_answer(body)
        return await self.fake(request)

    def last(self, path: str) -> dict:
        return next(b for p, b in reversed(self.bodies) if p == path)


def native_answer(body: dict) -> Response:
    """What a Responses upstream answers: a fixed message, streamed as its events when asked."""
    response = {"id": "resp_upstream0001", "object": "response", "created_at": 1, "status": "completed",
                "model": body["model"], "output": [{"id": "msg_up1", "type": "message", "role": "assistant",
                                                    "status": "completed", "content": [
                                                        {"type": "output_text", "text": "native hello", "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": body.get("tools") or [],
                "usage": {"input_tokens": 12, "output_tokens": 2, "total_tokens": 14,
                          "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    if not body.get("stream"):
        return Response.json(response)
    item = response["output"][0]
    events = [
        {"type": "response.created", "response": {**response, "status": "in_progress", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": [], "status": "in_progress"}},
        {"type": "response.content_part.added", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": "", "annotations": []}},
        {"type": "response.output_text.delta", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
         "delta": "native hello", "logprobs": []},
        {"type": "response.output_text.done", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
         "text": "native hello", "logprobs": []},
        {"type": "response.content_part.done", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
         "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response},
    ]
    data = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps({**e, "sequence_number": i})
                    + b"\n\n" for i, e in enumerate(events))

    async def stream():
        yield data

    return Response(200, [(b"content-type", b"text/event-stream")], stream=stream())


@pytest.fixture
async def gw(gateway_factory, nursery):
    upstream = Upstream()
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    base = f"http://127.0.0.1:{server.port}"
    started = await gateway_factory(
        provider_toml("fake", "fake", models=["fake-model"])
        + provider_toml("up-openai", "openai", base_url=base + "/v1", api_key="sk-up", models=["gpt-4o-mini"])
        + provider_toml("up-anthropic", "anthropic", base_url=base, api_key="ak-up", models=["claude-haiku-4-5"])
        + provider_toml("native", "openai", base_url=base + "/v1", api_key="sk-up", models=["gpt-native"],
                        responses_api=True),
        env={"RUNESTONE_API_KEYS": f"{KEY_A},{KEY_B}"})
    started.upstream = upstream
    return started


async def parsed(raw):
    """A raw response's parsed body (``parse()`` is a coroutine in some SDK versions, not in others)."""
    out = raw.parse()
    return await out if inspect.isawaitable(out) else out


def client(gw, key: str = KEY_A) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)


@pytest.mark.parametrize("model", list(MODELS))
async def test_create_answers_a_response_object_from_every_provider_type(gw, model):
    raw = await client(gw).responses.with_raw_response.create(
        model=model, input="hello there", instructions="Be terse.", metadata={"k": "v"})
    assert raw.headers["x-runestone-provider"] == MODELS[model]
    r = await parsed(raw)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text.startswith("Echo: hello there")
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be terse." and r.metadata == {"k": "v"}
    if model != "fake-model":
        sent = gw.upstream.bodies[-1][1]
        system = sent.get("system") or sent["messages"][0]["content"]
        assert "Be terse." in str(system) and "hello there" in str(sent["messages"])


@pytest.mark.parametrize("model", list(MODELS))
async def test_stream_gives_the_documented_events_in_order(gw, model):
    c = client(gw)
    whole = await c.responses.create(model=model, input="stream please", store=False)
    kinds, deltas, numbers = [], [], []
    async with c.responses.stream(model=model, input="stream please") as stream:
        async for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    n = len(deltas)
    assert n >= 2
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert numbers == list(range(len(kinds)))
    assert final.output_text == "".join(deltas) == whole.output_text
    assert final.usage.input_tokens == whole.usage.input_tokens
    # Stored before its last event: retrievable as soon as the stream ended.
    assert (await c.responses.retrieve(final.id)).output_text == final.output_text


@pytest.mark.parametrize("model", list(MODELS))
async def test_function_tool_call_and_its_result_round_trip(gw, model):
    c = client(gw)
    r = await c.responses.create(model=model, input="weather in Oslo?", tools=[WEATHER])
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and orjson.loads(call.arguments).keys() == {"city"}
    async with c.responses.stream(model=model, input="weather in Oslo?", tools=[WEATHER]) as stream:
        streamed = await stream.get_final_response()
    assert [(o.type, o.name) for o in streamed.output if o.type == "function_call"] == [("function_call", "get_weather")]
    await c.responses.create(model=model, previous_response_id=r.id, tools=[WEATHER],
                             input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    if model != "fake-model":
        path, sent = gw.upstream.bodies[-1]
        text = orjson.dumps(sent).decode()
        assert call.call_id in text and "sunny" in text  # the call and its result went upstream, paired


@pytest.mark.parametrize("model", list(MODELS))
async def test_three_turn_conversation_with_previous_response_id(gw, model):
    c = client(gw)
    r1 = await c.responses.create(model=model, input="my name is Ada", instructions="Remember names.")
    r2 = await c.responses.create(model=model, input="what is my name", previous_response_id=r1.id)
    r3 = await c.responses.create(model=model, input="and again", previous_response_id=r2.id)
    assert r3.previous_response_id == r2.id
    items = await c.responses.input_items.list(r3.id, order="asc")
    texts = [(i.role, i.content[0].text) for i in items.data]
    assert texts == [("user", "my name is Ada"), ("assistant", r1.output_text), ("user", "what is my name"),
                     ("assistant", r2.output_text), ("user", "and again")]
    if model == "gpt-4o-mini":
        sent = gw.upstream.last("/v1/chat/completions")
        # Instructions are not carried over (as in OpenAI's API); the conversation is.
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user", "assistant", "user"]
        assert sent["messages"][1]["content"] == r1.output_text


async def test_retrieve_delete_and_input_items_pages(gw):
    c = client(gw)
    r = await c.responses.create(model="fake-model", input=[
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"}, {"role": "user", "content": "three"}])
    got = await c.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    first = await c.responses.input_items.list(r.id, limit=2)
    assert [i.content[0].text for i in first.data] == ["three", "two"] and first.has_more
    rest = await c.responses.input_items.list(r.id, limit=2, after=first.data[-1].id)
    assert [i.content[0].text for i in rest.data] == ["one"] and not rest.has_more
    await c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.delete(r.id)


async def test_store_false_is_not_kept(gw):
    c = client(gw)
    r = await c.responses.create(model="fake-model", input="forget me", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as info:
        await c.responses.create(model="fake-model", input="again", previous_response_id=r.id)
    assert info.value.body["param"] == "previous_response_id"


async def test_another_keys_response_is_not_found(gw):
    a, b = client(gw, KEY_A), client(gw, KEY_B)
    r = await a.responses.create(model="fake-model", input="mine")
    for call in (b.responses.retrieve(r.id), b.responses.delete(r.id), b.responses.input_items.list(r.id),
                 b.responses.create(model="fake-model", input="x", previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await a.responses.retrieve(r.id)).id == r.id


async def test_max_output_tokens_makes_an_incomplete_response(gw):
    r = await client(gw).responses.create(model="fake-model", input="a long answer please", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


async def test_refusals_are_400s_naming_the_field_and_change_nothing(gw):
    c = client(gw)
    for kwargs, param in (({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                          ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
                          ({"extra_body": {"frobnicate": 1}}, "frobnicate")):
        kwargs.setdefault("input", "x")
        with pytest.raises(openai.BadRequestError) as info:
            await c.responses.create(model="fake-model", **kwargs)
        assert info.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as info:
        await c.responses.create(model="no-such-model", input="x")
    assert info.value.body["code"] == "model_not_found"


class City(BaseModel):
    name: str
    population: int


@pytest.mark.parametrize("model", list(MODELS))
async def test_parse_with_a_pydantic_model_on_the_fake(gw, model):
    r = await client(gw).responses.parse(model=model, input="the largest city of Norway", text_format=City)
    assert isinstance(r.output_parsed, City)


async def test_parse_sends_the_schema_and_reads_the_json_back(gateway_factory, nursery):
    """json_schema through an upstream that honours it: the schema goes up as chat's response_format."""
    sent = []

    async def json_upstream(request):
        body = orjson.loads(await request.body())
        sent.append(body)
        content = orjson.dumps({"name": "Oslo", "population": 700000}).decode()
        return Response.json({"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    server = await nursery.start(lambda task_status: serve_http(json_upstream, "127.0.0.1", 0, task_status=task_status))
    gw = await gateway_factory(provider_toml("json-up", "openai", base_url=f"http://127.0.0.1:{server.port}",
                                             api_key="k", models=["json-model"]))
    c = openai.AsyncOpenAI(base_url=gw.v1, api_key="x", max_retries=0)
    r = await c.responses.parse(model="json-model", input="the largest city of Norway", text_format=City)
    assert r.output_parsed == City(name="Oslo", population=700000)
    fmt = sent[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "City"
    assert fmt["json_schema"]["strict"] is True
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"name", "population"}


# -- native pass-through ----------------------------------------------------------------------------------

async def test_a_native_provider_gets_the_body_unchanged_built_in_tools_included(gw):
    c = client(gw)
    tools = [{"type": "web_search"}, WEATHER]
    raw = await c.responses.with_raw_response.create(
        model="gpt-native", input="news today", tools=tools, include=["reasoning.encrypted_content"])
    assert raw.headers["x-runestone-provider"] == "native"
    r = await parsed(raw)
    assert r.id == "resp_upstream0001" and r.output_text == "native hello"
    sent = gw.upstream.last("/v1/responses")
    assert sent["tools"] == tools and sent["input"] == "news today"
    assert sent["include"] == ["reasoning.encrypted_content"] and sent["model"] == "gpt-native"
    assert (await c.responses.retrieve(r.id)).output_text == "native hello"
    # The stored conversation continues natively: its items go upstream as input.
    await c.responses.create(model="gpt-native", input="more", previous_response_id=r.id)
    sent = gw.upstream.last("/v1/responses")
    assert "previous_response_id" not in sent
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]


async def test_a_native_stream_is_relayed_event_by_event(gw):
    c = client(gw)
    async with c.responses.stream(model="gpt-native", input="hi", tools=[{"type": "web_search"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == "native hello"
    assert gw.upstream.last("/v1/responses")["stream"] is True


async def test_built_in_tools_on_a_model_no_native_provider_serves_are_a_400(gw):
    with pytest.raises(openai.BadRequestError) as info:
        await client(gw).responses.create(model="gpt-4o-mini", input="x", tools=[{"type": "web_search"}])
    assert info.value.body["param"] == "tools[0].type" and "natively" in info.value.body["message"]


# -- token counting -----------------------------------------------------------------------------------------

async def test_input_tokens_is_the_estimate_unless_the_provider_counts(gw):
    c = client(gw)
    raw = await c.responses.input_tokens.with_raw_response.count(model="fake-model", input="hello there friend")
    assert raw.headers["x-runestone-token-count"] == "estimate"
    counted = await parsed(raw)
    answered = await c.responses.create(model="fake-model", input="hello there friend", store=False)
    assert counted.object == "response.input_tokens" and counted.input_tokens > 0
    assert abs(counted.input_tokens - answered.usage.input_tokens) <= 3
    raw = await c.responses.input_tokens.with_raw_response.count(model="gpt-native", input="hello")
    assert raw.headers["x-runestone-token-count"] == "upstream" and (await parsed(raw)).input_tokens == 777
    raw = await c.responses.input_tokens.with_raw_response.count(model="claude-haiku-4-5", input="hello")
    assert raw.headers["x-runestone-token-count"] == "upstream" and (await parsed(raw)).input_tokens == 4242


async def test_anthropic_count_tokens_upstream_and_estimate(gw):
    ac = anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY_A, max_retries=0)
    raw = await ac.messages.with_raw_response.count_tokens(
        model="claude-haiku-4-5", system="Be terse.", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-runestone-token-count"] == "upstream"
    assert (await parsed(raw)).input_tokens == 4242
    sent = gw.upstream.last("/v1/messages/count_tokens")
    assert sent["model"] == "claude-haiku-4-5" and sent["messages"] == [{"role": "user", "content": "hello"}]
    assert "max_tokens" not in sent and "stream" not in sent
    raw = await ac.messages.with_raw_response.count_tokens(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-runestone-token-count"] == "estimate" and (await parsed(raw)).input_tokens > 0


async def test_count_tokens_refusals_are_in_anthropics_shape(gw):
    async with httpx.AsyncClient(base_url=gw.url) as http:
        bad = await http.post("/v1/messages/count_tokens", headers={"x-api-key": KEY_A},
                              json={"model": "claude-haiku-4-5"})
        nokey = await http.post("/v1/messages/count_tokens", json={"model": "claude-haiku-4-5", "messages": []})
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error" and "messages" in bad.json()["error"]["message"]
    assert nokey.status_code == 401 and nokey.json()["error"]["type"] == "authentication_error"


async def test_a_stream_cut_midway_ends_with_response_failed(gw):
    async with httpx.AsyncClient(base_url=gw.url) as http:
        set_knobs = await http.post(f"http://127.0.0.1:{_upstream_port(gw)}/_fake/knobs", json={"drop_mid_stream": True})
    assert set_knobs.status_code == 200
    events = []
    async for event in await client(gw).responses.create(model="gpt-4o-mini", input="cut me", stream=True):
        events.append(event)
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The failed response is what the store keeps: the client can see what was produced.
    stored = await client(gw).responses.retrieve(events[-1].response.id)
    assert stored.status == "failed"


def _upstream_port(gw) -> int:
    spec = gw.app.catalog["up-openai"]
    return int(spec.config.base_url.rsplit(":", 1)[1].split("/")[0])
