"""Chat <-> Converse translation, checked field by field against shapes from the Converse API reference
(botocore's bedrock-runtime service model); fixtures in ``fixtures/bedrock_*.json``."""

import json
import pathlib

import orjson
import pytest

from runestone.wire.bedrock import (
    ConverseToOpenAIStream,
    bedrock_error_info,
    converse_request_to_openai,
    converse_to_openai_response,
    openai_to_converse_request,
)
from runestone.wire.errors import InvalidRequest
from runestone.wire.reasoning import ThinkingBlocks

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def test_request_field_by_field():
    body = {
        "model": "m", "max_completion_tokens": 3000, "temperature": 1.5, "top_p": 0.9, "stop": "END",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
            {"role": "assistant", "content": "Looking.", "reasoning_content": "Use the tool.",
             "thinking_blocks": [{"type": "thinking", "thinking": "Use the tool.", "signature": "sig=="},
                                 {"type": "redacted_thinking", "data": "EmwKAhgB"}],
             "tool_calls": [{"id": "tooluse_1", "type": "function", "function": {"name": "look", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "a cat"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
        "tool_choice": "required", "reasoning_effort": "low", "n": 1, "seed": 3,
    }
    sent = openai_to_converse_request(body)
    assert sent == {
        "messages": [
            {"role": "user", "content": [{"text": "What is this?"},
                                         {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}]},
            {"role": "assistant", "content": [
                {"reasoningContent": {"reasoningText": {"text": "Use the tool.", "signature": "sig=="}}},
                {"reasoningContent": {"redactedContent": "EmwKAhgB"}},
                {"text": "Looking."},
                {"toolUse": {"toolUseId": "tooluse_1", "name": "look", "input": {"x": 1}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "a cat"}]}},
                                         {"text": "thanks"}]},
        ],
        "system": [{"text": "Be brief."}, {"cachePoint": {"type": "default"}}],
        "inferenceConfig": {"maxTokens": 3000, "temperature": 1.0, "topP": 0.9, "stopSequences": ["END"]},
        "toolConfig": {"tools": [{"toolSpec": {"name": "look", "inputSchema": {"json": {"type": "object"}}}}],
                       "toolChoice": {"any": {}}},
        "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    }
    assert "n" not in sent and "seed" not in sent and "modelId" not in sent


def test_reasoning_effort_needs_room_for_a_budget():
    body = {"model": "m", "max_tokens": 300, "reasoning_effort": "high", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(InvalidRequest) as e:
        openai_to_converse_request(body)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "messages[0].content[0].image_url"),
    ({"type": "input_audio", "input_audio": {}}, "messages[0].content[0].type"),
])
def test_what_converse_cannot_carry_is_a_400_naming_the_field(part, param):
    with pytest.raises(InvalidRequest) as e:
        openai_to_converse_request({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    assert e.value.param == param


def test_tool_choice_none_keeps_tools_only_for_a_history_with_tool_blocks():
    tools = [{"type": "function", "function": {"name": "f"}}]
    plain = {"model": "m", "tools": tools, "tool_choice": "none", "messages": [{"role": "user", "content": "x"}]}
    assert "toolConfig" not in openai_to_converse_request(plain)
    history = dict(plain, messages=[{"role": "user", "content": "x"},
                                    {"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{}"}}]},
                                    {"role": "tool", "tool_call_id": "t", "content": "r"}])
    assert openai_to_converse_request(history)["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object", "properties": {}}}}}]}


def test_response_with_reasoning_text_and_tool_use():
    resp = converse_to_openai_response(fixture("bedrock_converse_tool_use.json"), model="m", request_id="chatcmpl-1",
                                       created=7)
    [choice] = resp["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check."
    assert message["reasoning_content"] == "The user wants the weather; call the tool."
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": "The user wants the weather; call the tool.",
                                           "signature": "ErUBCkYIBRgCIkD5signature"}]
    assert message["tool_calls"] == [{"id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "type": "function",
                                      "function": {"name": "top_song", "arguments": '{"sign":"WZPZ"}'}}]
    # inputTokens leaves out the cache reads; OpenAI's prompt_tokens counts the whole prompt.
    assert resp["usage"] == {"prompt_tokens": 1417, "completion_tokens": 92, "total_tokens": 1509,
                             "prompt_tokens_details": {"cached_tokens": 1000}}


def test_stream_events_become_chunks():
    tr = ConverseToOpenAIStream(model="m", request_id="chatcmpl-1", created=7, include_usage=True)
    chunks = [c for name, data in fixture("bedrock_stream_reasoning_tool.json") for c in tr.feed(name, data)]
    assert tr.done and tr.stopped
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The user wants a song."
    blocks = ThinkingBlocks()
    for d in deltas:
        blocks.feed(d.get("thinking_blocks"))
    assert blocks.blocks() == [{"type": "thinking", "thinking": "The user wants a song.", "signature": "EqQBCkYIBRgCsig"}]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert calls[0] == {"index": 0, "id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "type": "function",
                        "function": {"name": "top_song", "arguments": ""}}
    assert orjson.loads("".join(c["function"]["arguments"] for c in calls)) == {"sign": "WZPZ"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 92


@pytest.mark.parametrize("status, name, expected", [
    (429, "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/", (429, "rate_limit_error")),
    (400, "ValidationException", (400, "invalid_request_error")),
    (403, "AccessDeniedException", (403, "permission_error")),
    (0, "modelStreamErrorException", (424, "api_error")),
    (0, "throttlingException", (429, "rate_limit_error")),
    (503, None, (503, "api_error")),
])
def test_errors(status, name, expected):
    info = bedrock_error_info(status, name, b'{"message": "Too many requests, please wait before trying again."}')
    assert (info.status, info.type) == expected
    assert info.message == "Too many requests, please wait before trying again."


def test_the_fakes_reading_of_a_converse_body_inverts_the_gateways():
    body = {"model": "m", "max_tokens": 50, "temperature": 0.2, "stop": ["X"],
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None, "thinking_blocks": [
                             {"type": "thinking", "thinking": "t", "signature": "s"}],
                          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "r"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    back = converse_request_to_openai(openai_to_converse_request(body), "m")
    assert back["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": body["messages"][2]["tool_calls"],
         "thinking_blocks": body["messages"][2]["thinking_blocks"]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}]
    assert (back["max_tokens"], back["temperature"], back["stop"]) == (50, 0.2, ["X"])
