"""OpenAI -> Anthropic requests and Anthropic -> OpenAI answers, on payload shapes recorded from the documented APIs.

Streams are checked twice: chunk by chunk, and by feeding our chunks to the official ``openai`` SDK's own stream
accumulator, which proves a client library rebuilds the intended completion from them.
"""

import json
import pathlib

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from runestone.wire.anthropic_upstream import (
    AnthropicToOpenAIStream,
    TranslationError,
    UpstreamStreamError,
    anthropic_error_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def test_full_request_translation():
    body = fixture("openai_request_full.json")
    req = openai_to_anthropic_request(body, model="claude-sonnet-4-5-20250929", stream=True)
    assert req["model"] == "claude-sonnet-4-5-20250929"
    assert req["system"] == "You are a weather assistant.\n\nAnswer in metric units."
    assert req["max_tokens"] == 512
    assert req["stop_sequences"] == ["\n\nHuman:"]
    assert req["temperature"] == 1.0  # clamped into Anthropic's range
    assert req["top_p"] == 0.9
    assert req["metadata"] == {"user_id": "user-1234"}
    assert req["stream"] is True
    for dropped in ("n", "seed", "presence_penalty", "logprobs", "stream_options", "parallel_tool_calls", "user", "stop"):
        assert dropped not in req
    assert req["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": body["tools"][0]["function"]["parameters"],
        }
    ]
    assert req["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    user, assistant, results = req["messages"]
    assert user["role"] == "user"
    assert user["content"][0] == {"type": "text", "text": "What's the weather in Paris and in Berlin? Here is a map."}
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": body["messages"][2]["content"][1]["image_url"]["url"].split(",", 1)[1]},
    }
    assert user["content"][2]["source"] == {"type": "url", "url": body["messages"][2]["content"][2]["image_url"]["url"]}
    assert assistant == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check both cities."},
            {"type": "tool_use", "id": "call_abc123", "name": "get_weather", "input": {"location": "Paris, France"}},
            {"type": "tool_use", "id": "call_def456", "name": "get_weather", "input": {"location": "Berlin, Germany"}},
        ],
    }
    # Both tool results and the follow-up question share one user turn, results first.
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_abc123", "content": "18 degrees, sunny"},
            {"type": "tool_result", "tool_use_id": "call_def456", "content": "12 degrees, rain"},
            {"type": "text", "text": "Which one is warmer?"},
        ],
    }


def test_minimal_request_defaults():
    req = openai_to_anthropic_request({"model": "x", "messages": [{"role": "user", "content": "hi"}]}, model="claude-haiku-4-5", stream=False)
    assert req == {"model": "claude-haiku-4-5", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]}
    req = openai_to_anthropic_request(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stop": ["a", "b"]}, model="m", default_max_tokens=99, stream=False
    )
    assert req["max_tokens"] == 7 and req["stop_sequences"] == ["a", "b"]


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
        (None, None),
    ],
)
def test_tool_choice(choice, expected):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    req = openai_to_anthropic_request(body, model="m", stream=False)
    assert req.get("tool_choice") == expected
    assert req["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_choice_none_omits_tools_unless_history_uses_them():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "none"}
    req = openai_to_anthropic_request(body, model="m", stream=False)
    assert "tools" not in req and "tool_choice" not in req
    body["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    req = openai_to_anthropic_request(body, model="m", stream=False)
    assert req["tool_choice"] == {"type": "none"} and req["tools"][0]["name"] == "f"
    assert req["messages"][1]["content"] == [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]


def test_response_format_becomes_a_system_instruction():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    }
    system = openai_to_anthropic_request(body, model="m", stream=False)["system"]
    assert system.startswith("Be terse.\n\n") and orjson.dumps(schema).decode() in system
    body["response_format"] = {"type": "json_object"}
    assert "JSON object" in openai_to_anthropic_request(body, model="m", stream=False)["system"]


def test_cache_control_on_system_parts_keeps_blocks():
    body = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "long context", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "hi"},
        ]
    }
    req = openai_to_anthropic_request(body, model="m", stream=False)
    assert req["system"] == [{"type": "text", "text": "long context", "cache_control": {"type": "ephemeral"}}]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}], "messages[0].content[0].image_url"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ],
)
def test_untranslatable_requests_name_the_field(messages, param):
    with pytest.raises(TranslationError) as info:
        openai_to_anthropic_request({"messages": messages}, model="m", stream=False)
    assert info.value.param == param
    assert info.value.status == 400 and info.value.message


@pytest.mark.parametrize("signature", ["gemini:c2lnLWE", "gemini-text:c2lnLWI"])
def test_a_thinking_block_gemini_signed_is_a_400_naming_it_not_a_relayed_refusal(signature):
    turn = {"role": "assistant", "content": "ok",
            "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "Anthropic-sig"},
                                {"type": "thinking", "thinking": "", "signature": signature}]}
    with pytest.raises(TranslationError) as info:
        openai_to_anthropic_request({"messages": [{"role": "user", "content": "hi"}, turn]}, model="m", stream=False)
    assert info.value.param == "messages[1].thinking_blocks[1].signature"
    assert info.value.status == 400 and "signed by gemini" in info.value.message
    # Anthropic's own signed block alone goes through unchanged
    turn["thinking_blocks"].pop()
    body = openai_to_anthropic_request({"messages": [{"role": "user", "content": "hi"}, turn]}, model="m", stream=False)
    assert body["messages"][1]["content"][0] == {"type": "thinking", "thinking": "t", "signature": "Anthropic-sig"}


def test_a_file_part_must_be_a_base64_data_url():
    def turn(data):
        return {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": data}}]}]}

    body = openai_to_anthropic_request(turn("data:application/pdf;base64,JVBERi0="), model="m", stream=False)
    assert body["messages"][0]["content"][0] == {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    with pytest.raises(TranslationError) as info:  # was sent upstream as if it were base64
        openai_to_anthropic_request(turn("data:application/pdf,%25PDF-1.4"), model="m", stream=False)
    assert info.value.param == "messages[0].content[0].file.file_data" and info.value.status == 400


def test_text_response():
    resp = anthropic_to_openai_response(fixture("anthropic_message_text.json"), model="claude-sonnet-4-5", request_id="chatcmpl-1", created=1700000000)
    ChatCompletion.model_validate(resp)
    assert resp["id"] == "chatcmpl-1" and resp["object"] == "chat.completion" and resp["created"] == 1700000000
    choice = resp["choices"][0]
    assert choice["message"]["content"] == "Hi! My name is Claude. How can I help?"
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    # cache writes and reads are part of OpenAI's prompt_tokens
    assert resp["usage"] == {
        "prompt_tokens": 3195,
        "completion_tokens": 503,
        "total_tokens": 3698,
        "prompt_tokens_details": {"cached_tokens": 1000},
    }


def test_tool_use_response():
    resp = anthropic_to_openai_response(fixture("anthropic_message_tool_use.json"), model="m", request_id="r", created=1)
    ChatCompletion.model_validate(resp)
    message = resp["choices"][0]["message"]
    assert message["content"] == "I'll check the current weather in San Francisco for you."
    assert message["tool_calls"] == [
        {
            "id": "toolu_01A09q90qw90lq917835lq9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'},
        }
    ]
    assert resp["choices"][0]["finish_reason"] == "tool_calls"
    assert resp["usage"]["total_tokens"] == 561


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls"), ("pause_turn", "stop"), ("refusal", "content_filter")],
)
def test_stop_reason_mapping(stop_reason, finish):
    msg = {"content": [], "stop_reason": stop_reason, "usage": {"input_tokens": 1, "output_tokens": 0}}
    resp = anthropic_to_openai_response(msg, model="m", request_id="r", created=1)
    assert resp["choices"][0]["finish_reason"] == finish
    assert resp["choices"][0]["message"]["content"] == ""


def run_stream(events, include_usage):
    translator = AnthropicToOpenAIStream(model="claude-x", request_id="chatcmpl-9", created=123, include_usage=include_usage)
    chunks = []
    for event, data in events:
        chunks.extend(translator.feed(event, data))
    return translator, chunks


def sdk_final(chunks):
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def test_text_stream_with_usage():
    translator, chunks = run_stream(fixture("anthropic_stream_text.json"), include_usage=True)
    assert translator.done and translator.finish_reason == "stop"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hello", "!"]
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 15,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert len(chunks) == 5
    assert all(c["id"] == "chatcmpl-9" and c["object"] == "chat.completion.chunk" and c["model"] == "claude-x" for c in chunks)
    final = sdk_final(chunks)
    assert final.choices[0].message.content == "Hello!"
    assert final.usage.total_tokens == 45


def test_text_stream_without_usage_chunk():
    translator, chunks = run_stream(fixture("anthropic_stream_text.json"), include_usage=False)
    assert len(chunks) == 4 and all("usage" not in c for c in chunks)
    assert translator.usage["completion_tokens"] == 15  # still known to the caller for accounting


def test_tool_use_stream():
    translator, chunks = run_stream(fixture("anthropic_stream_tool_use.json"), include_usage=True)
    assert translator.finish_reason == "tool_calls"
    starts = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and "id" in c["choices"][0]["delta"].get("tool_calls", [{}])[0]]
    assert starts == [
        {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "toolu_01Qv8NF3Kc5bP7ydTKaHyByv", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]
    final = sdk_final(chunks)
    message = final.choices[0].message
    assert message.content == "Okay, let's check the weather for San Francisco, CA:"  # thinking is left out
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"}),
        ("toolu_01Qv8NF3Kc5bP7ydTKaHyByv", "get_time", {"tz": "America/Los_Angeles"}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage.prompt_tokens == 472 and final.usage.completion_tokens == 89


def test_stream_cut_before_message_stop_is_not_done():
    translator, _ = run_stream(fixture("anthropic_stream_text.json")[:-2], include_usage=True)
    assert not translator.done and translator.finish_reason is None


def test_error_event_raises():
    translator = AnthropicToOpenAIStream(model="m", request_id="r", created=1, include_usage=False)
    translator.feed("message_start", fixture("anthropic_stream_text.json")[0][1])
    with pytest.raises(UpstreamStreamError) as info:
        translator.feed("error", fixture("anthropic_error_overloaded.json"))
    err = info.value
    assert (err.status, err.type, err.message) == (529, "overloaded_error", "Overloaded")
    assert err.to_openai() == (503, {"message": "Overloaded", "type": "server_error", "param": None, "code": "upstream_overloaded"})


def test_unknown_events_are_ignored():
    translator = AnthropicToOpenAIStream(model="m", request_id="r", created=1, include_usage=False)
    assert translator.feed("future_event", {"type": "future_event"}) == []


@pytest.mark.parametrize(
    ("status", "type_", "expected_status", "expected_type"),
    [
        (400, "invalid_request_error", 400, "invalid_request_error"),
        (401, "authentication_error", 401, "authentication_error"),
        (403, "permission_error", 403, "permission_error"),
        (404, "not_found_error", 404, "invalid_request_error"),
        (413, "request_too_large", 413, "invalid_request_error"),
        (429, "rate_limit_error", 429, "rate_limit_error"),
        (500, "api_error", 502, "server_error"),
        (529, "overloaded_error", 503, "server_error"),
    ],
)
def test_error_mapping(status, type_, expected_status, expected_type):
    body = orjson.dumps({"type": "error", "error": {"type": type_, "message": f"msg for {type_}"}, "request_id": "req_1"})
    out_status, err = anthropic_error_to_openai(status, body)
    assert out_status == expected_status
    assert err["type"] == expected_type and err["message"] == f"msg for {type_}" and err["param"] is None and "code" in err


def test_error_mapping_of_a_non_json_body():
    status, err = anthropic_error_to_openai(502, b"<html>Bad Gateway</html>")
    assert status == 502 and err["type"] == "server_error"
    assert "Bad Gateway" in err["message"] and "502" in err["message"]
    status, err = anthropic_error_to_openai(418, b"")
    assert status == 418 and err["type"] == "invalid_request_error" and err["message"] == "upstream answered HTTP 418"
