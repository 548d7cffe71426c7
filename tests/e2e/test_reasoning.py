"""Reasoning across formats, three turns each, through the gateway to the fake upstream over real sockets.

The fake signs each thinking block with a MAC of its text and refuses (400) a block whose signature does not
verify, as Anthropic and Bedrock do: a turn that is answered proves the block came back unchanged."""

import anthropic
import httpx
import openai
import orjson
import pytest

from gatewaytest import RecordingUpstream, provider_toml
from runestone.http.server import serve_http
from runestone.providers.fake_content import REDACTED_TRIGGER, thinking_signature
from runestone.providers.fake_server import FakeKnobs
from runestone.wire.reasoning import ThinkingBlocks
from runestone.wire.responses import decode_thinking

KEY = "sk-client-1"
CLAUDE = "claude-haiku-4-5"
GPT = "gpt-4o-mini"
BEDROCK = "anthropic.claude-haiku-4-5-20251001-v1:0"
KNOBS = FakeKnobs()
TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_TOOL = {"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                              "parameters": TOOL["input_schema"]}}
THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.fixture
async def gw(gateway_factory, nursery):
    upstream = RecordingUpstream()
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    base = f"http://127.0.0.1:{server.port}"
    started = await gateway_factory(
        provider_toml("claude", "anthropic", base_url=base, api_key="sk-ant-up", models=[CLAUDE])
        + provider_toml("gpt", "openai", base_url=base + "/v1", api_key="sk-up", models=[GPT])
        + provider_toml("bed", "bedrock", base_url=base, region="us-east-1", models=[BEDROCK],
                        aws_access_key_id=KNOBS.aws_access_key_id, aws_secret_access_key=KNOBS.aws_secret_access_key),
        env={"RUNESTONE_API_KEYS": KEY})
    started.upstream = upstream
    return started


def _anthropic(gw):
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY, max_retries=0)


def _openai(gw):
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)


def _thinking_sent(gw) -> list[dict]:
    """The thinking blocks of every assistant turn of the last body sent to the Anthropic upstream."""
    body = gw.upstream.last_body()
    return [b for m in body["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
            for b in m["content"] if b["type"] in ("thinking", "redacted_thinking")]


async def test_anthropic_client_to_anthropic_upstream_signed_thinking_byte_for_byte(gw):
    client = _anthropic(gw)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL], messages=ask)
    assert gw.upstream.last_body()["thinking"] == THINKING
    thinking, use = first.content
    assert thinking.type == "thinking" and thinking.signature == thinking_signature(thinking.thinking)
    assert use.type == "tool_use"
    async with client.messages.stream(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                      messages=ask) as s:
        streamed = await s.get_final_message()
    assert streamed.content[0].to_dict() == thinking.to_dict()  # thinking_delta and signature_delta relayed

    turn1 = [b.to_dict() for b in first.content]
    second_ask = ask + [{"role": "assistant", "content": turn1},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                          messages=second_ask)
    assert _thinking_sent(gw) == [turn1[0]]
    raw = gw.upstream.requests[-1][2]
    assert orjson.dumps(turn1[0]["signature"]) in raw and orjson.dumps(turn1[0]["thinking"]) in raw
    assert second.stop_reason == "end_turn" and second.content[0].type == "thinking"

    third_ask = second_ask + [{"role": "assistant", "content": [b.to_dict() for b in second.content]},
                              {"role": "user", "content": "and tomorrow?"}]
    async with client.messages.stream(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                      messages=third_ask) as s:
        third = await s.get_final_message()
    assert _thinking_sent(gw) == [turn1[0], second.content[0].to_dict()]
    assert third.content[0].type == "thinking"


async def test_a_changed_thinking_block_is_refused_by_the_upstream(gw):
    client = _anthropic(gw)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL], messages=ask)
    turn1 = [b.to_dict() for b in first.content]
    turn1[0]["thinking"] += " "
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, tools=[TOOL], messages=ask + [
            {"role": "assistant", "content": turn1},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": turn1[1]["id"], "content": "x"}]}])
    assert "Invalid `signature`" in str(e.value)


async def test_redacted_thinking_goes_back_to_anthropic_and_is_a_400_for_an_openai_upstream(gw):
    client = _anthropic(gw)
    ask = [{"role": "user", "content": REDACTED_TRIGGER}]
    first = await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, messages=ask)
    redacted = first.content[0].to_dict()
    assert redacted["type"] == "redacted_thinking" and redacted["data"]
    history = ask + [{"role": "assistant", "content": [b.to_dict() for b in first.content]},
                     {"role": "user", "content": "go on"}]
    await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, messages=history)
    assert _thinking_sent(gw) == [redacted]
    sent_before = len(gw.upstream.requests)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=GPT, max_tokens=2000, messages=history)
    assert "messages[1].thinking_blocks[0]" in str(e.value) and "redacted_thinking" in str(e.value)
    assert len(gw.upstream.requests) == sent_before  # refused before anything went upstream


async def test_openai_reasoning_content_to_anthropic_three_turns(gw):
    client = _openai(gw)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.chat.completions.create(model=CLAUDE, max_tokens=2000, reasoning_effort="low",
                                                 tools=[CHAT_TOOL], messages=ask)
    assert gw.upstream.last_body()["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    message = first.choices[0].message.model_dump(exclude_none=True)
    [block] = message["thinking_blocks"]
    assert message["reasoning_content"] == block["thinking"] and block["signature"]
    stream = await client.chat.completions.create(model=CLAUDE, max_tokens=2000, reasoning_effort="low",
                                                  tools=[CHAT_TOOL], messages=ask, stream=True)
    text, blocks = [], ThinkingBlocks()
    async for chunk in stream:
        delta = chunk.choices[0].delta.model_dump() if chunk.choices else {}
        text.append(delta.get("reasoning_content") or "")
        blocks.feed(delta.get("thinking_blocks"))
    assert "".join(text) == message["reasoning_content"] and blocks.blocks() == [block]

    call = message["tool_calls"][0]
    second_ask = ask + [message, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    second = await client.chat.completions.create(model=CLAUDE, max_tokens=2000, reasoning_effort="low",
                                                  tools=[CHAT_TOOL], messages=second_ask)
    assert _thinking_sent(gw) == [block]
    second_message = second.choices[0].message.model_dump(exclude_none=True)
    third_ask = second_ask + [second_message, {"role": "user", "content": "and tomorrow?"}]
    await client.chat.completions.create(model=CLAUDE, max_tokens=2000, reasoning_effort="low", tools=[CHAT_TOOL],
                                         messages=third_ask)
    assert _thinking_sent(gw) == [block, second_message["thinking_blocks"][0]]

    # Reasoning text without its signed blocks cannot be said to Anthropic: a 400, not a silent drop.
    unsigned = {k: v for k, v in message.items() if k != "thinking_blocks"}
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=CLAUDE, max_tokens=2000, tools=[CHAT_TOOL], messages=ask + [
            unsigned, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}])
    assert e.value.body["param"] == "messages[1].reasoning_content"


async def test_openai_upstream_reasoning_reaches_anthropic_clients_and_goes_back_as_reasoning_content(gw):
    client = _anthropic(gw)
    ask = [{"role": "user", "content": "why is the sky blue?"}]
    first = await client.messages.create(model=GPT, max_tokens=2000, thinking=THINKING, messages=ask)
    assert gw.upstream.last_body()["reasoning_effort"] == "low" and "thinking" not in gw.upstream.last_body()
    thinking = first.content[0]
    assert thinking.type == "thinking" and thinking.thinking.startswith("Thinking:") and thinking.signature == ""
    history = ask + [{"role": "assistant", "content": [b.to_dict() for b in first.content]},
                     {"role": "user", "content": "and at sunset?"}]
    await client.messages.create(model=GPT, max_tokens=2000, thinking=THINKING, messages=history)
    sent = gw.upstream.last_body()["messages"][1]
    assert sent["reasoning_content"] == thinking.thinking and "thinking_blocks" not in sent
    # An unsigned block (from an OpenAI-compatible upstream) cannot go to Anthropic.
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model=CLAUDE, max_tokens=2000, thinking=THINKING, messages=history)
    assert "signature" in str(e.value)


async def test_responses_reasoning_items_to_chat_three_turns(gw):
    client = _openai(gw)
    tool = {"type": "function", "name": TOOL["name"], "parameters": TOOL["input_schema"]}
    first = await client.responses.create(model=CLAUDE, input="weather in Paris?", reasoning={"effort": "low"},
                                          max_output_tokens=2000, tools=[tool])
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    [block] = decode_thinking(reasoning.encrypted_content)
    assert reasoning.content[0].text == block["thinking"] and block["signature"]
    async with client.responses.stream(model=CLAUDE, input="weather in Paris?", reasoning={"effort": "low"},
                                       max_output_tokens=2000, tools=[tool]) as s:
        streamed = await s.get_final_response()
    assert decode_thinking(streamed.output[0].encrypted_content) == [block]

    items = [it.model_dump(exclude_none=True) for it in first.output]
    second = await client.responses.create(model=CLAUDE, reasoning={"effort": "low"}, max_output_tokens=2000,
                                           tools=[tool], input=[{"role": "user", "content": "weather in Paris?"}, *items,
                                           {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert _thinking_sent(gw) == [block]
    third = await client.responses.create(model=CLAUDE, reasoning={"effort": "low"}, max_output_tokens=2000,
                                          tools=[tool], previous_response_id=second.id, input="and tomorrow?")
    assert third.status == "completed"
    [second_block] = decode_thinking(second.output[0].encrypted_content)
    assert _thinking_sent(gw) == [block, second_block]

    # To an OpenAI-compatible upstream the reasoning text goes back as reasoning_content.
    first = await client.responses.create(model=GPT, input="hello", reasoning={"effort": "low"})
    assert first.output[0].type == "reasoning" and first.output[0].encrypted_content is None
    await client.responses.create(model=GPT, input=[{"role": "user", "content": "hello"},
                                                    *[it.model_dump(exclude_none=True) for it in first.output],
                                                    {"role": "user", "content": "more"}])
    sent = gw.upstream.last_body()["messages"][1]
    assert sent["role"] == "assistant" and sent["reasoning_content"] == first.output[0].content[0].text


async def test_bedrock_reasoning_round_trips_from_both_sdks(gw):
    client = _openai(gw)
    ask = [{"role": "user", "content": "weather in Oslo?"}]
    first = await client.chat.completions.create(model=BEDROCK, max_tokens=2000, reasoning_effort="low",
                                                 tools=[CHAT_TOOL], messages=ask)
    assert gw.upstream.last_body()["additionalModelRequestFields"] == {"thinking": {"type": "enabled",
                                                                                    "budget_tokens": 1024}}
    message = first.choices[0].message.model_dump(exclude_none=True)
    [block] = message["thinking_blocks"]
    call = message["tool_calls"][0]
    stream = await client.chat.completions.create(model=BEDROCK, max_tokens=2000, reasoning_effort="low",
                                                  tools=[CHAT_TOOL], messages=ask, stream=True)
    blocks = ThinkingBlocks()
    async for chunk in stream:
        blocks.feed(chunk.choices[0].delta.model_dump().get("thinking_blocks") if chunk.choices else None)
    assert blocks.blocks() == [block]
    await client.chat.completions.create(model=BEDROCK, max_tokens=2000, reasoning_effort="low", tools=[CHAT_TOOL],
                                         messages=ask + [message, {"role": "tool", "tool_call_id": call["id"],
                                                                   "content": "cold"}])
    assert gw.upstream.last_body()["messages"][1]["content"][0] == {
        "reasoningContent": {"reasoningText": {"text": block["thinking"], "signature": block["signature"]}}}

    claude = _anthropic(gw)
    answer = await claude.messages.create(model=BEDROCK, max_tokens=2000, thinking=THINKING,
                                          messages=[{"role": "user", "content": "hi"}])
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [b.to_dict() for b in answer.content]},
               {"role": "user", "content": "again"}]
    async with claude.messages.stream(model=BEDROCK, max_tokens=2000, thinking=THINKING, messages=history) as s:
        final = await s.get_final_message()
    assert final.content[0].type == "thinking"
    sent = gw.upstream.last_body()
    assert sent["additionalModelRequestFields"] == {"thinking": THINKING}
    assert sent["messages"][1]["content"][0]["reasoningContent"]["reasoningText"]["signature"] == answer.content[0].signature


async def test_reasoning_tokens_appear_in_usage(gw):
    client = _openai(gw)
    plain = await client.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "count me"}])
    reasoned = await client.chat.completions.create(model=GPT, reasoning_effort="medium",
                                                    messages=[{"role": "user", "content": "count me"}])
    details = reasoned.usage.completion_tokens_details
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0 and details.reasoning_tokens > 0
    # Reasoning tokens are output tokens: counted (and priced) in completion_tokens.
    assert reasoned.usage.completion_tokens == plain.usage.completion_tokens + details.reasoning_tokens
    response = await client.responses.create(model=GPT, input="count me", reasoning={"effort": "medium"})
    assert response.usage.output_tokens_details.reasoning_tokens == details.reasoning_tokens
    async with httpx.AsyncClient(base_url=gw.v1, headers={"authorization": f"Bearer {KEY}"}) as http:
        r = await http.post("/chat/completions", json={"model": GPT, "reasoning_effort": "medium", "stream": True,
                                                       "stream_options": {"include_usage": True},
                                                       "messages": [{"role": "user", "content": "count me"}]})
    usage = orjson.loads([e for e in r.text.split("\n\n") if e.startswith("data: {")][-1][6:])["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == details.reasoning_tokens


# -- Gemini: thought signatures (the fake refuses a signature that is not its own, and a current-turn function
# call without one, as Gemini 3 does) -------------------------------------------------------------------------

GEMINI = "gemini-2.5-flash"


@pytest.fixture
async def gem(gateway_factory, nursery):
    upstream = RecordingUpstream(models=(GEMINI,))
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    started = await gateway_factory(
        provider_toml("gem", "gemini", base_url=f"http://127.0.0.1:{server.port}/v1beta",
                      api_key="AIzaSyFAKE-gemini-key-0123456789abcdef", models=[GEMINI]),
        env={"RUNESTONE_API_KEYS": KEY})
    started.upstream = upstream
    return started


def _model_turns(gw) -> list[list[dict]]:
    """The parts of every model turn of the last body sent to the Gemini upstream."""
    return [c["parts"] for c in gw.upstream.last_body()["contents"] if c["role"] == "model"]


def _signatures(parts) -> list[str]:
    return [p["thoughtSignature"] for p in parts if "thoughtSignature" in p]


async def test_openai_client_to_gemini_thought_signatures_three_turns(gem):
    client = _openai(gem)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.chat.completions.create(model=GEMINI, reasoning_effort="low", tools=[CHAT_TOOL], messages=ask)
    assert gem.upstream.last_body()["generationConfig"]["thinkingConfig"] == {"includeThoughts": True,
                                                                             "thinkingBudget": 1024}
    message = first.choices[0].message.model_dump(exclude_none=True)
    assert message["reasoning_content"].startswith("Thinking:")
    call = message["tool_calls"][0]
    assert "__thought__" in call["id"]
    stream = await client.chat.completions.create(model=GEMINI, reasoning_effort="low", tools=[CHAT_TOOL],
                                                  messages=ask, stream=True)
    ids, text = [], []
    async for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        ids += [c.id for c in (delta.tool_calls or ())] if delta else []
        text.append((delta.model_dump().get("reasoning_content") or "") if delta else "")
    assert ids == [call["id"]] and "".join(text) == message["reasoning_content"]

    second_ask = ask + [message, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    second = await client.chat.completions.create(model=GEMINI, reasoning_effort="low", tools=[CHAT_TOOL],
                                                  messages=second_ask)
    [turn1] = _model_turns(gem)
    assert len(_signatures(turn1)) == 1 and "functionCall" in turn1[-1] and "thoughtSignature" in turn1[-1]
    second_message = second.choices[0].message.model_dump(exclude_none=True)
    assert second.choices[0].finish_reason == "stop" and second_message["content"]

    third_ask = second_ask + [second_message, {"role": "user", "content": "and tomorrow?"}]
    third = await client.chat.completions.create(model=GEMINI, reasoning_effort="low", tools=[CHAT_TOOL],
                                                 messages=third_ask)
    assert third.choices[0].finish_reason == "tool_calls"  # answered: both turns' signatures verified
    turn1_again, turn2 = _model_turns(gem)
    assert turn1_again == turn1
    assert turn2[-1]["text"] == second_message["content"] and "thoughtSignature" in turn2[-1]

    # A signature that was changed is refused by the upstream; one dropped in the current turn too.
    changed = {**call, "id": call["id"][:-2] + ("AA" if not call["id"].endswith("AA") else "BB")}
    for bad in (changed, {**call, "id": call["id"].partition("__thought__")[0]}):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model=GEMINI, tools=[CHAT_TOOL], messages=ask + [
                {**message, "tool_calls": [bad]}, {"role": "tool", "tool_call_id": bad["id"], "content": "sunny"}])
        assert "signature" in str(e.value)


async def test_anthropic_client_to_gemini_thought_signatures_three_turns(gem):
    client = _anthropic(gem)
    ask = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.messages.create(model=GEMINI, max_tokens=2000, thinking=THINKING, tools=[TOOL], messages=ask)
    assert gem.upstream.last_body()["generationConfig"]["thinkingConfig"] == {"includeThoughts": True,
                                                                             "thinkingBudget": 1024}
    thinking, use = first.content
    assert thinking.type == "thinking" and thinking.thinking.startswith("Thinking:") and use.type == "tool_use"
    async with client.messages.stream(model=GEMINI, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                      messages=ask) as s:
        streamed = await s.get_final_message()
    assert [b.to_dict() for b in streamed.content] == [b.to_dict() for b in first.content]

    second_ask = ask + [{"role": "assistant", "content": [b.to_dict() for b in first.content]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = await client.messages.create(model=GEMINI, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                          messages=second_ask)
    [turn1] = _model_turns(gem)
    assert turn1[0] == {"text": thinking.thinking, "thought": True} and len(_signatures(turn1)) == 1
    assert second.stop_reason == "end_turn"

    third_ask = second_ask + [{"role": "assistant", "content": [b.to_dict() for b in second.content]},
                              {"role": "user", "content": "and tomorrow?"}]
    async with client.messages.stream(model=GEMINI, max_tokens=2000, thinking=THINKING, tools=[TOOL],
                                      messages=third_ask) as s:
        third = await s.get_final_message()
    assert third.stop_reason == "tool_use"  # answered: both turns' signatures verified
    turn1_again, turn2 = _model_turns(gem)
    assert turn1_again == turn1 and "thoughtSignature" in turn2[-1]


async def test_responses_client_to_gemini_thought_signatures_three_turns(gem):
    client = _openai(gem)
    tool = {"type": "function", "name": TOOL["name"], "parameters": TOOL["input_schema"]}
    first = await client.responses.create(model=GEMINI, input="weather in Paris?", reasoning={"effort": "low"},
                                          tools=[tool])
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call" and "__thought__" in call.call_id
    async with client.responses.stream(model=GEMINI, input="weather in Paris?", reasoning={"effort": "low"},
                                       tools=[tool]) as s:
        streamed = await s.get_final_response()
    assert streamed.output[1].call_id == call.call_id

    items = [it.model_dump(exclude_none=True) for it in first.output]
    second = await client.responses.create(model=GEMINI, reasoning={"effort": "low"}, tools=[tool], input=[
        {"role": "user", "content": "weather in Paris?"}, *items,
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    [turn1] = _model_turns(gem)
    assert len(_signatures(turn1)) == 1 and "thoughtSignature" in turn1[-1]
    third = await client.responses.create(model=GEMINI, reasoning={"effort": "low"}, tools=[tool],
                                          previous_response_id=second.id, input="and tomorrow?")
    assert third.status == "completed"
    turn1_again, turn2 = _model_turns(gem)
    assert turn1_again == turn1 and "thoughtSignature" in turn2[-1]
