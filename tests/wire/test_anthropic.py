"""Anthropic Messages clients served through the gateway's OpenAI form: requests in, answers and events out.

Event streams are checked against the official ``anthropic`` SDK's own accumulator, which rebuilds the message
from our events exactly as a client does and fails on events out of order.
"""

import json
import pathlib

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message

from runestone.wire.anthropic_upstream import openai_to_anthropic_request
from runestone.wire.anthropic import (
    InboundError,
    OpenAIToAnthropicStream,
    anthropic_request_to_openai,
    openai_response_to_anthropic,
)

from runestone.wire.errors import ErrorInfo, anthropic_error_body

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def test_full_request():
    req = anthropic_request_to_openai(fixture("anthropic_request_full.json"))
    assert req["model"] == "claude-sonnet-4-5" and req["max_tokens"] == 1024
    assert req["messages"] == [
        {"role": "system", "content": "You are a weather assistant."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "reasoning_content": "Use the tool.",
            "thinking_blocks": [{"type": "thinking", "thinking": "Use the tool.", "signature": "sig"}],
            "tool_calls": [
                {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"San Francisco, CA"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
        {"role": "user", "content": "Thanks, and tomorrow?"},
        {"role": "assistant", "content": "Tomorrow"},
    ]
    assert req["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
            },
        }
    ]
    assert req["tool_choice"] == "required" and req["parallel_tool_calls"] is False
    assert req["stop"] == ["END"] and req["temperature"] == 0.3 and req["top_p"] == 0.8
    assert req["user"] == "13803d75-b4b5-4c3e-b2a2-6f21399b021b"
    assert req["stream"] is True and req["stream_options"] == {"include_usage": True}
    assert "top_k" not in req and "metadata" not in req
    assert req["thinking"] == {"type": "enabled", "budget_tokens": 2000}


def test_round_trip_back_to_anthropic_keeps_the_conversation():
    original = fixture("anthropic_request_full.json")
    back = openai_to_anthropic_request(anthropic_request_to_openai(original), model=original["model"], stream=True)
    assert back["max_tokens"] == 1024 and back["stop_sequences"] == ["END"] and back["metadata"] == original["metadata"]
    assert back["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert back["tools"] == original["tools"]
    roles = [m["role"] for m in back["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert back["messages"][1]["content"] == original["messages"][1]["content"]  # thinking, text, tool_use
    assert back["thinking"] == original["thinking"]
    assert back["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
        {"type": "text", "text": "Thanks, and tomorrow?"},
    ]


@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "none"}, {"type": "tool", "name": "f"}])
def test_tool_choice(choice):
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
    expected = {"auto": "auto", "none": "none", "tool": {"type": "function", "function": {"name": "f"}}}[choice["type"]]
    assert anthropic_request_to_openai(body)["tool_choice"] == expected


def test_tool_result_error_flag_and_documents():
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "boom", "is_error": True},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                ],
            }
        ],
    }
    messages = anthropic_request_to_openai(body)["messages"]
    assert messages == [
        {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"},
        {"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]},
    ]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0].tool_use_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, "messages[0].content[0].source.type"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
    ],
)
def test_validation_errors_name_the_field(patch, param):
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(InboundError) as info:
        anthropic_request_to_openai(body)
    assert info.value.param == param
    err = orjson.loads(anthropic_error_body(ErrorInfo(400, info.value.message, param=info.value.param)))
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error" and param in err["error"]["message"]


def test_tool_calls_response():
    msg = openai_response_to_anthropic(fixture("openai_chat_completion_tool_calls.json"), model="claude-x")
    Message.model_validate(msg)
    assert msg["id"] == "msg_9mBlKsOUyVELMWQe3qJKS5zoY5bTk"
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "claude-x"
    assert msg["content"] == [
        {"type": "tool_use", "id": "call_62136354", "name": "get_weather", "input": {"location": "Boston, MA"}},
        {"type": "tool_use", "id": "call_62136355", "name": "get_time", "input": {"tz": "America/New_York"}},
    ]
    assert msg["stop_reason"] == "tool_use" and msg["stop_sequence"] is None
    # cached prompt tokens are reported apart, as Anthropic does
    assert msg["usage"] == {"input_tokens": 18, "output_tokens": 17, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 64}


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal"), (None, "end_turn")])
def test_text_response_stop_reasons(finish, stop):
    resp = {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": finish}]}
    msg = openai_response_to_anthropic(resp, model="m")
    assert msg["content"] == [{"type": "text", "text": "Hi"}] and msg["stop_reason"] == stop
    assert msg["usage"]["input_tokens"] == 0 and msg["usage"]["output_tokens"] == 0


def run_stream(chunks, finish=True, input_tokens=0):
    translator = OpenAIToAnthropicStream(model="claude-x", message_id="msg_1", input_tokens=input_tokens)
    events = []
    for chunk in chunks:
        events.extend(translator.feed(chunk))
    if finish:
        events.extend(translator.finish())
    return events


def sdk_accumulate(events):
    snapshot = None
    bufs = {}
    for name, data in events:
        assert data["type"] == name
        if name in ("ping", "message_stop"):
            continue
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def test_text_stream_event_order():
    events = run_stream(fixture("openai_stream_text.json"), input_tokens=9)
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 9, "output_tokens": 0}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 3, "input_tokens": 9, "cache_read_input_tokens": 0},
    }
    message = sdk_accumulate(events)
    assert message.content[0].text == "Hello there!"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 3


def test_message_delta_waits_for_the_usage_chunk():
    chunks = fixture("openai_stream_text.json")
    translator = OpenAIToAnthropicStream(model="m", message_id="msg_1")
    names = [n for c in chunks[:-1] for n, _ in translator.feed(c)]
    assert "content_block_stop" in names and "message_delta" not in names
    names = [n for n, _ in translator.feed(chunks[-1])]
    assert names == ["message_delta", "message_stop"]
    assert translator.finish() == []


def test_stream_without_usage_is_closed_by_finish():
    events = run_stream(fixture("openai_stream_text.json")[:-1])
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"] == {"output_tokens": 0}


def test_tool_call_stream():
    events = run_stream(fixture("openai_stream_tool_calls.json"))
    names = [n for n, _ in events]
    assert names.count("content_block_start") == 3 and names.count("content_block_stop") == 3
    assert names.index("ping") == 2
    assert names[-2:] == ["message_delta", "message_stop"]
    message = sdk_accumulate(events)
    assert message.content[0].text == "Checking."
    assert [(b.type, b.id, b.name, b.input) for b in message.content[1:]] == [
        ("tool_use", "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", {"location": "Paris"}),
        ("tool_use", "call_2", "get_time", {}),
    ]
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 20 and message.usage.cache_read_input_tokens == 100 and message.usage.output_tokens == 40


def test_empty_stream_still_makes_a_valid_message():
    events = run_stream([])
    assert [n for n, _ in events] == ["message_start", "ping", "message_delta", "message_stop"]
    message = sdk_accumulate(events)
    assert message.content == [] and message.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"), (429, "rate_limit_error"),
     (500, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (422, "invalid_request_error"), (599, "api_error")],
)
def test_error_shape(status, type_):
    body = anthropic_error_body(ErrorInfo(status, "nope", "x"))
    assert orjson.loads(body) == {"type": "error", "error": {"type": type_, "message": "nope"}}


def test_anthropic_stream_through_openai_chunks_and_back():
    from runestone.wire.anthropic_upstream import AnthropicToOpenAIStream

    original = fixture("anthropic_stream_tool_use.json")
    to_openai = AnthropicToOpenAIStream(model="claude-x", request_id="chatcmpl-1", created=1, include_usage=True)
    back = OpenAIToAnthropicStream(model="claude-x", message_id="msg_1", input_tokens=0)
    events = []
    for name, data in original:
        for chunk in to_openai.feed(name, data):
            events.extend(back.feed(chunk))
    events.extend(back.finish())
    direct = sdk_accumulate(original)
    relayed = sdk_accumulate(events)
    # everything survives the two hops, the signed thinking block too (canonical reasoning fields)
    assert direct.content[0].type == "thinking" and direct.content[0].signature
    assert [b.to_dict() for b in relayed.content] == [b.to_dict() for b in direct.content]
    assert relayed.stop_reason == direct.stop_reason == "tool_use"
    assert (relayed.usage.input_tokens, relayed.usage.output_tokens) == (472, 89)
