"""The Responses API's wire format: requests validated and translated to chat, answers and events back.

Event streams are checked with the official ``openai`` SDK's own stream accumulator
(``ResponseStreamState``), which rebuilds the response from our events as ``client.responses.stream``
does and refuses events out of order.
"""

import json
import pathlib

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from runestone.wire.errors import InvalidRequest
from runestone.wire.responses import (
    ResponsesEventStream,
    chat_to_response,
    responses_to_chat,
    validate_responses,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
_EVENT = TypeAdapter(ResponseStreamEvent)


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def chat_of(body: dict, history=()) -> dict:
    return responses_to_chat(validate_responses(body), list(history))


def refused(body: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_responses(body)
    return info.value


# -- requests -------------------------------------------------------------------------------------------

def test_string_input_and_instructions_become_system_and_user_messages():
    req = validate_responses({"model": "m", "input": "hi there", "instructions": "Be terse."})
    assert [(i["type"], i["role"], i["id"][:4]) for i in req.items] == [("message", "user", "msg_")]
    assert req.store is True and req.stream is False
    chat = responses_to_chat(req)
    assert chat == {"model": "m", "messages": [{"role": "system", "content": "Be terse."},
                                               {"role": "user", "content": "hi there"}]}


def test_every_translated_setting_reaches_the_chat_body():
    chat = chat_of({
        "model": "m", "input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False, "max_output_tokens": 50.0, "temperature": 0.5, "top_p": 0.9,
        "user": "u-1", "reasoning": {"effort": "low"}, "stream": True, "metadata": {"k": "v"},
        "text": {"format": {"type": "json_schema", "name": "City", "strict": True,
                            "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}},
    })
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (chat["parallel_tool_calls"], chat["max_completion_tokens"], chat["temperature"], chat["top_p"]) == \
        (False, 50, 0.5, 0.9)
    assert chat["user"] == "u-1" and chat["reasoning_effort"] == "low"
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "City", "strict": True, "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}
    assert "metadata" not in chat  # kept by the gateway (echoed in the response), not sent
    assert chat_of({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == \
        {"type": "json_object"}


def test_items_make_chat_turns_tool_calls_joined_and_reasoning_left_out():
    chat = chat_of({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "look "},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
        {"role": "developer", "content": "answer briefly"},
    ]})
    assert chat["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "look "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "developer", "content": "answer briefly"},
    ]


def test_history_goes_before_the_new_input():
    history = validate_responses({"model": "m", "input": "first"}).items + [
        {"id": "msg_a", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "one", "annotations": []}]}]
    chat = chat_of({"model": "m", "input": "second", "instructions": "sys"}, history)
    assert chat["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
                                {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"}]


@pytest.mark.parametrize("body, param", [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
     "input[0].content[0].type"),
    ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0].file_id"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "x", "tools": [{"type": "teleport"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "input": "x", "store": "yes"}, "store"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"model": "m", "input": "x", "n": 2}, "n"),
])
def test_refusals_name_the_field(body, param):
    assert refused(body).param == param


def test_built_in_tools_are_marked_for_a_native_provider_not_dropped():
    req = validate_responses({"model": "m", "input": "x", "tools": [WEATHER, {"type": "web_search"}],
                              "tool_choice": {"type": "web_search_preview"}, "truncation": "auto"})
    assert req.native_only == ["tools[1].type", "tool_choice.type", "truncation"]
    # The chat body carries only what chat can say; the front refuses the request unless a native provider takes it.
    assert [t["function"]["name"] for t in responses_to_chat(req)["tools"]] == ["get_weather"]


# -- answers --------------------------------------------------------------------------------------------

def test_a_tool_call_completion_becomes_a_response_the_sdk_reads():
    req = validate_responses({"model": "gpt-4o-mini", "input": "weather?", "tools": [WEATHER]})
    completion = fixture("openai_chat_completion_tool_calls.json")
    out = chat_to_response(req, completion, "resp_1", 1700000000)
    parsed = Response.model_validate(out)
    assert parsed.id == "resp_1" and parsed.status == "completed" and parsed.model == completion["model"]
    calls = [o for o in parsed.output if o.type == "function_call"]
    message = completion["choices"][0]["message"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        (t["id"], t["function"]["name"], t["function"]["arguments"]) for t in message["tool_calls"]]
    u = completion["usage"]
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == \
        (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
    assert parsed.tools[0].name == "get_weather"


def test_length_finish_is_incomplete_with_the_reason_and_usage_details_are_kept():
    req = validate_responses({"model": "m", "input": "x", "max_output_tokens": 3})
    completion = {"model": "m", "choices": [{"index": 0, "finish_reason": "length",
                                             "message": {"role": "assistant", "content": "a b c",
                                                         "reasoning_content": "thinking"}}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                            "prompt_tokens_details": {"cached_tokens": 4},
                            "completion_tokens_details": {"reasoning_tokens": 2}}}
    parsed = Response.model_validate(chat_to_response(req, completion, "resp_2", 1))
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in parsed.output] == ["reasoning", "message"]
    assert parsed.output[0].content[0].text == "thinking" and parsed.output_text == "a b c"
    assert parsed.usage.input_tokens_details.cached_tokens == 4
    assert parsed.usage.output_tokens_details.reasoning_tokens == 2
    completion["choices"][0]["finish_reason"] = "content_filter"
    assert chat_to_response(req, completion, "resp_3", 1)["incomplete_details"] == {"reason": "content_filter"}


def _events(data: bytes) -> list[dict]:
    out = []
    for block in data.split(b"\n\n"):
        if block.strip():
            kind, payload = block.split(b"\n", 1)
            event = orjson.loads(payload.removeprefix(b"data: "))
            assert kind == b"event: " + event["type"].encode()
            out.append(event)
    return out


def _run(chunks: list[dict], body: dict, *, per_read: int = 1) -> tuple[list[dict], ResponsesEventStream]:
    req = validate_responses(body)
    stream = ResponsesEventStream(req, "resp_s", 1700000000)
    payloads = [orjson.dumps(c) for c in chunks]
    data = b""
    for i in range(0, len(payloads), per_read):
        data += stream.feed(payloads[i:i + per_read], i + per_read >= len(payloads))
    return _events(data), stream


def _accumulate(events: list[dict], body: dict):
    state = ResponseStreamState(input_tools=body.get("tools") or [], text_format=omit)
    for e in events:
        state.handle_event(_EVENT.validate_python(e))
    return state._completed_response


@pytest.mark.parametrize("per_read", [1, 3])
def test_text_stream_events_in_order_rebuild_the_response(per_read):
    chunks = fixture("openai_stream_text.json")
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    events, stream = _run(chunks, body, per_read=per_read)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    final = _accumulate(events, body)
    assert final.output_text == text and final.status == "completed"
    assert stream.response["output"][0]["content"][0]["text"] == text
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert final.usage.input_tokens == usage["prompt_tokens"]


def test_tool_call_stream_has_message_then_function_call_items():
    chunks = fixture("openai_stream_tool_calls.json")
    body = {"model": "gpt-4o-mini", "input": "weather?", "tools": [WEATHER], "stream": True}
    events, _ = _run(chunks, body)
    final = _accumulate(events, body)
    kinds = [e["type"] for e in events]
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.completed")
    calls = {}
    for c in chunks:
        for ch in c.get("choices") or ():
            for tc in ch["delta"].get("tool_calls") or ():
                entry = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": "", "args": ""})
                entry["name"] += (tc.get("function") or {}).get("name") or ""
                entry["args"] += (tc.get("function") or {}).get("arguments") or ""
    got = [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert got == [(c["id"], c["name"], c["args"]) for _, c in sorted(calls.items())]
    assert final.output[0].type == "message"


def test_a_cut_stream_ends_with_response_failed_carrying_what_was_produced():
    chunks = fixture("openai_stream_text.json")[:3]
    req = validate_responses({"model": "gpt-4o-mini", "input": "hi", "stream": True})
    stream = ResponsesEventStream(req, "resp_f", 1)
    data = stream.feed([orjson.dumps(c) for c in chunks], False)
    data += stream.failure("provider 'p': upstream stream ended early", "upstream_stream_cut")
    events = _events(data)
    assert events[-1]["type"] == "response.failed"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert "ended early" in failed.error.message
    assert failed.output[0].status == "incomplete"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
