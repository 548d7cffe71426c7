"""The fake model behaves like a model, seen through the official SDKs, unchanged.

Every behaviour is checked twice: against the gateway on its embedded default config (whose only provider is
the in-process ``fake``) and against ``runestone fake-provider`` directly, in both the OpenAI and the
Anthropic API: ``n``, ``stop``/``stop_sequences``, ``max_tokens`` (finish ``length``/``max_tokens``),
``logprobs``, ``response_format`` (json_object, json_schema validated with ``jsonschema``, the SDK's
``parse`` with a pydantic model), ``tool_choice``, an agent loop that ends, one embedding per input item,
and streams that carry exactly what the non-streaming answer does.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import jsonschema
import openai
import pydantic
import pytest

from runestone.config import DEFAULT_CONFIG_PATH

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 2},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                        "required": ["zone"]}}}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "what is the weather in Paris today?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 2},
        "status": {"enum": ["draft", "published"]},
        "score": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}]},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["title", "rating", "tags", "status", "score", "when"],
    "additionalProperties": False,
    "$defs": {"Tag": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
                      "additionalProperties": False}},
}


class Target:
    """Where the SDKs point: the gateway (in-process fake) or the fake provider itself."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key="unused", max_retries=0)


@pytest.fixture(params=["gateway", "fake-provider"])
async def target(request, gateway_factory, fake_factory, tmp_path):
    if request.param == "gateway":
        text = Path(DEFAULT_CONFIG_PATH).read_text()
        text = text.replace("port = 4003", "port = 0", 1).replace("[data]\n", f'[data]\ndir = "{tmp_path / "data"}"\n', 1)
        assert "port = 0" in text and str(tmp_path) in text, "the default config changed shape"
        gw = await gateway_factory(text)
        return Target("gateway", gw.url)
    server, _ = await fake_factory()
    return Target("fake-provider", f"http://127.0.0.1:{server.port}")


def collect(chunks) -> dict:
    """What a stream of chat.completion.chunk carried, per choice index."""
    out: dict = {"content": {}, "finish": {}, "calls": {}, "logprobs": {}, "usage": None}
    for chunk in chunks:
        if chunk.usage is not None:
            out["usage"] = chunk.usage.model_dump()
        for c in chunk.choices:
            i = c.index
            if c.delta.content:
                out["content"][i] = out["content"].get(i, "") + c.delta.content
            for call in c.delta.tool_calls or ():
                slot = out["calls"].setdefault(i, {"id": None, "name": None, "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                slot["arguments"] += (call.function.arguments or "") if call.function else ""
            if c.logprobs is not None and c.logprobs.content:
                out["logprobs"].setdefault(i, []).extend(e.model_dump() for e in c.logprobs.content)
            if c.finish_reason:
                out["finish"][i] = c.finish_reason
    return out


def summary(completion) -> dict:
    """The same view of a non-streaming chat.completion."""
    out: dict = {"content": {}, "finish": {}, "calls": {}, "logprobs": {}, "usage": completion.usage.model_dump()}
    for c in completion.choices:
        if c.message.content:
            out["content"][c.index] = c.message.content
        for call in c.message.tool_calls or ():
            out["calls"][c.index] = {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
        if c.logprobs is not None and c.logprobs.content:
            out["logprobs"][c.index] = [e.model_dump() for e in c.logprobs.content]
        out["finish"][c.index] = c.finish_reason
    return out


async def both(client, **kw) -> tuple[dict, dict]:
    """The non-streaming and the streaming answer to the same request, in the same shape."""
    completion = await client.chat.completions.create(model="fake-model", **kw)
    stream = await client.chat.completions.create(model="fake-model", stream=True,
                                                  stream_options={"include_usage": True}, **kw)
    return summary(completion), collect([c async for c in stream])


# -- n, stop, max_tokens, logprobs --------------------------------------------------------------------------


async def test_n_choices(target):
    async with target.openai() as client:
        plain, streamed = await both(client, messages=ASK, n=3)
        single = (await both(client, messages=ASK))[0]
    assert sorted(plain["content"]) == [0, 1, 2] and len(set(plain["content"].values())) == 3
    assert all(t.startswith("Echo: what is the weather in Paris") for t in plain["content"].values())
    assert plain["finish"] == {0: "stop", 1: "stop", 2: "stop"}
    assert streamed == plain
    assert plain["usage"]["completion_tokens"] > single["usage"]["completion_tokens"], "every choice is counted"


async def test_stop_cuts_before_the_stop_string(target):
    async with target.openai() as client:
        full = (await client.chat.completions.create(model="fake-model", messages=ASK)).choices[0].message.content
        word = full.split()[-3]  # a word from the filler, near the end
        plain, streamed = await both(client, messages=ASK, stop=["zzz-never", word])
    assert plain["content"][0] == full[:full.index(word)]
    assert plain["finish"][0] == "stop" and streamed == plain


async def test_anthropic_stop_sequences(target):
    async with target.anthropic() as client:
        full = (await client.messages.create(model="fake-model", max_tokens=200, messages=ASK)).content[0].text
        word = full.split()[-3]
        msg = await client.messages.create(model="fake-model", max_tokens=200, messages=ASK, stop_sequences=[word])
        async with client.messages.stream(model="fake-model", max_tokens=200, messages=ASK, stop_sequences=[word]) as s:
            final = await s.get_final_message()
    assert msg.content[0].text == full[:full.index(word)] == final.content[0].text
    if target.name == "fake-provider":
        # Through the gateway the answer comes back from OpenAI's shape, which does not say which stop matched.
        assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", word)
        assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", word)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_finishes_with_length(target, param):
    async with target.openai() as client:
        full = (await both(client, messages=ASK))[0]
        plain, streamed = await both(client, messages=ASK, **{param: 4})
    assert plain["finish"][0] == "length" and plain["usage"]["completion_tokens"] == 4
    assert full["content"][0].startswith(plain["content"][0]) and len(plain["content"][0]) < len(full["content"][0])
    assert streamed == plain


async def test_anthropic_max_tokens(target):
    async with target.anthropic() as client:
        msg = await client.messages.create(model="fake-model", max_tokens=3, messages=ASK)
        async with client.messages.stream(model="fake-model", max_tokens=3, messages=ASK) as s:
            final = await s.get_final_message()
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    assert final.stop_reason == "max_tokens" and final.content[0].text == msg.content[0].text
    assert final.usage.output_tokens == 3


async def test_logprobs_per_token(target):
    async with target.openai() as client:
        plain, streamed = await both(client, messages=ASK, logprobs=True, top_logprobs=3)
        again = (await both(client, messages=ASK, logprobs=True, top_logprobs=3))[0]
        bare = await client.chat.completions.create(model="fake-model", messages=ASK)
    entries = plain["logprobs"][0]
    assert "".join(e["token"] for e in entries) == plain["content"][0]
    assert len(entries) == plain["usage"]["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        tops = e["top_logprobs"]
        assert len(tops) == 3 and tops[0]["token"] == e["token"] and tops[0]["logprob"] == e["logprob"]
        assert len({t["token"] for t in tops}) == 3 and all(t["logprob"] <= e["logprob"] for t in tops)
    assert streamed == plain and again == plain, "deterministic, and the stream carries the same entries"
    assert bare.choices[0].logprobs is None


# -- structured output ---------------------------------------------------------------------------------------


async def test_json_object(target):
    async with target.openai() as client:
        plain, streamed = await both(client, messages=ASK, response_format={"type": "json_object"})
    assert isinstance(json.loads(plain["content"][0]), dict) and streamed == plain


async def test_json_object_follows_a_schema_written_in_the_prompt(target):
    # What JSON-mode clients (instructor, langchain's json_mode) do: the schema travels in the system prompt.
    system = f"Answer with JSON matching this schema:\n{json.dumps(SCHEMA, indent=2)}\nReturn an instance, not the schema."
    async with target.openai() as client:
        completion = await client.chat.completions.create(model="fake-model", response_format={"type": "json_object"},
                                                          messages=[{"role": "system", "content": system}, *ASK])
    jsonschema.validate(json.loads(completion.choices[0].message.content), SCHEMA)


async def test_json_schema_instances_validate_and_are_deterministic(target):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    async with target.openai() as client:
        plain, streamed = await both(client, messages=ASK, response_format=fmt, n=2)
        again = (await both(client, messages=ASK, response_format=fmt, n=2))[0]
        other = (await both(client, messages=[{"role": "user", "content": "another question"}], response_format=fmt))[0]
    for text in plain["content"].values():
        jsonschema.validate(json.loads(text), SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert streamed == plain and again == plain
    assert other["content"][0] != plain["content"][0], "another request, another instance"


class Step(pydantic.BaseModel):
    explanation: str
    output: int


class Solution(pydantic.BaseModel):
    steps: list[Step]
    final_answer: str
    confidence: float | None = None


async def test_the_sdk_parse_helper_gets_a_pydantic_instance(target):
    async with target.openai() as client:
        completion = await client.chat.completions.parse(model="fake-model", messages=ASK, response_format=Solution)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Solution) and parsed.steps and isinstance(parsed.steps[0], Step)


# -- tools ---------------------------------------------------------------------------------------------------


def _validate_call(call_name: str, arguments) -> None:
    tool = {"get_weather": WEATHER, "get_time": TIME}[call_name]
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, tool["function"]["parameters"])


async def test_tool_choice_variants(target):
    tools = [WEATHER, TIME]
    after_result = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    async with target.openai() as client:
        async def ask(messages, tool_choice=None):
            kw = {} if tool_choice is None else {"tool_choice": tool_choice}
            plain, streamed = await both(client, messages=messages, tools=tools, **kw)
            assert streamed == plain
            return plain

        auto = await ask(ASK)
        assert auto["finish"][0] == "tool_calls" and auto["calls"][0]["name"] == "get_weather"  # the one the user named
        _validate_call("get_weather", auto["calls"][0]["arguments"])
        assert (await ask(ASK, "auto")) == auto
        none = await ask(ASK, "none")
        assert none["calls"] == {} and none["finish"][0] == "stop" and none["content"][0].startswith("Echo:")
        named = await ask(ASK, {"type": "function", "function": {"name": "get_time"}})
        assert named["calls"][0]["name"] == "get_time" and named["finish"][0] == "tool_calls"
        _validate_call("get_time", named["calls"][0]["arguments"])
        # After a tool result: auto answers in text, required still calls.
        answer = await ask(after_result)
        assert answer["calls"] == {} and answer["content"][0].startswith("Echo: sunny, 21 C")
        assert (await ask(after_result, "required"))["calls"][0]["name"] == "get_weather"

        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="fake-model", messages=ASK, tools=tools,
                                                 tool_choice={"type": "function", "function": {"name": "nope"}})


async def test_anthropic_tool_choice_variants(target):
    async with target.anthropic() as client:
        async def ask(**kw):
            msg = await client.messages.create(model="fake-model", max_tokens=300, messages=ASK, tools=ANTHROPIC_TOOLS, **kw)
            async with client.messages.stream(model="fake-model", max_tokens=300, messages=ASK, tools=ANTHROPIC_TOOLS, **kw) as s:
                final = await s.get_final_message()
            assert [b.model_dump() for b in final.content] == [b.model_dump() for b in msg.content]
            assert final.stop_reason == msg.stop_reason
            return msg

        for choice in (None, {"type": "auto"}, {"type": "any"}):
            msg = await ask(**({} if choice is None else {"tool_choice": choice}))
            [block] = msg.content
            assert msg.stop_reason == "tool_use" and block.type == "tool_use" and block.name == "get_weather"
            _validate_call("get_weather", block.input)
        msg = await ask(tool_choice={"type": "tool", "name": "get_time"})
        assert msg.content[0].name == "get_time"
        _validate_call("get_time", msg.content[0].input)
        msg = await ask(tool_choice={"type": "none"})
        assert msg.stop_reason == "end_turn" and msg.content[0].type == "text"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_loop_ends_with_a_text_answer(target, stream):
    messages = list(ASK)
    async with target.openai() as client:
        for turn in range(1, 6):  # bounded: a loop that never ends fails here
            if stream:
                async with client.chat.completions.stream(model="fake-model", messages=messages, tools=[WEATHER, TIME]) as s:
                    completion = await s.get_final_completion()
            else:
                completion = await client.chat.completions.create(model="fake-model", messages=messages, tools=[WEATHER, TIME])
            message = completion.choices[0].message
            if not message.tool_calls:
                break
            messages.append(message.model_dump(exclude_none=True, exclude={"parsed", "annotations"}))
            for call in message.tool_calls:
                _validate_call(call.function.name, call.function.arguments)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    assert turn == 2 and completion.choices[0].finish_reason == "stop"
    assert message.content.startswith("Echo: sunny, 21 C")


async def test_an_anthropic_agent_loop_ends(target):
    messages = list(ASK)
    async with target.anthropic() as client:
        for turn in range(1, 6):
            msg = await client.messages.create(model="fake-model", max_tokens=300, messages=messages, tools=ANTHROPIC_TOOLS)
            if msg.stop_reason != "tool_use":
                break
            messages.append({"role": "assistant", "content": [b.model_dump() for b in msg.content]})
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "sunny, 21 C"}
                                                         for b in msg.content if b.type == "tool_use"]})
    assert turn == 2 and msg.stop_reason == "end_turn" and msg.content[0].text.startswith("Echo: sunny, 21 C")


# -- embeddings, determinism, refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(("inputs", "count", "tokens"), [
    ("one text", 1, None),
    (["a", "b c"], 2, None),
    ([1, 2, 3], 1, 3),  # one pre-tokenised input
    ([[1, 2], [3]], 2, 3),
])
async def test_one_embedding_per_input_item(target, inputs, count, tokens):
    async with target.openai() as client:
        emb = await client.embeddings.create(model="fake-embedding", input=inputs, encoding_format="float")
    assert [d.index for d in emb.data] == list(range(count))
    assert all(len(d.embedding) == 256 for d in emb.data)
    if tokens is not None:
        assert emb.usage.prompt_tokens == tokens


async def test_the_same_request_gets_the_same_answer(target):
    kw = {"messages": ASK, "n": 2, "tools": [WEATHER], "tool_choice": "auto"}
    async with target.openai() as client:
        first = await client.chat.completions.create(model="fake-model", **kw)
        second = await client.chat.completions.create(model="fake-model", **kw)
        seeded = await client.chat.completions.create(model="fake-model", messages=ASK, seed=7)
        unseeded = await client.chat.completions.create(model="fake-model", messages=ASK)
    assert first.model_dump(exclude={"id", "created"}) == second.model_dump(exclude={"id", "created"})
    assert seeded.choices[0].message.content != unseeded.choices[0].message.content, "seed picks another answer"


async def test_requests_a_real_api_refuses_are_400s(target):
    async with target.openai() as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="fake-model", messages=ASK, top_logprobs=2)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="fake-model", messages=ASK, tool_choice="required")


async def test_fake_provider_counts_tokens_as_its_usage_does(fake_factory):
    server, _ = await fake_factory()
    body = {"model": "fake-model", "system": "be brief", "tools": ANTHROPIC_TOOLS, "messages": [
        *ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                 "input": {"city": "Paris", "unit": "celsius", "days": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                     {"type": "text", "text": "and tomorrow?"}]}]}
    async with Target("fake-provider", f"http://127.0.0.1:{server.port}").anthropic() as client:
        counted = await client.messages.count_tokens(**body)
        msg = await client.messages.create(max_tokens=100, **body)
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.count_tokens(**{**body, "model": "no-such-model"})
    assert counted.input_tokens == msg.usage.input_tokens > 0


async def test_responses_style_json_schema_format_is_understood(target):
    # The Responses API's text.format is flat ({"type", "name", "schema", "strict"}): the fake reads it too.
    async with target.openai() as client:
        completion = await client.chat.completions.create(
            model="fake-model", messages=ASK,
            response_format={"type": "json_schema", "name": "review", "schema": SCHEMA, "strict": True})
    jsonschema.validate(json.loads(completion.choices[0].message.content), SCHEMA)
