"""OpenAI -> Gemini requests and Gemini -> OpenAI answers, on payloads written from the Gemini API reference
(``models.generateContent``, ``streamGenerateContent?alt=sse``, error bodies with google.rpc details).

Streams are parsed from their recorded framing (CRLF line ends, as the API sends them) and the chunks we make are
fed to the official ``openai`` SDK's own stream accumulator, which proves a client rebuilds the intended completion.
"""

import json
import pathlib

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from runestone.wire.gemini import (
    GeminiToOpenAIStream,
    PromptBlocked,
    TranslationError,
    gemini_error,
    gemini_request_to_openai,
    gemini_to_openai_response,
    json_schema_to_gemini,
    openai_to_gemini_embeddings,
    openai_to_gemini_request,
)
from runestone.wire.reasoning import ThinkingBlocks
from runestone.wire.sse import SSEParser

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def test_full_request_translation_field_by_field():
    req = openai_to_gemini_request(fixture("gemini_openai_request.json"))
    expected = fixture("gemini_request_expected.json")
    assert set(req) == set(expected)
    for key in expected:
        assert req[key] == expected[key], key
    for i, (got, want) in enumerate(zip(req["contents"], expected["contents"], strict=True)):
        assert got == want, f"contents[{i}]"
    config = req["generationConfig"]
    for field, value in expected["generationConfig"].items():
        assert config[field] == value, field
    # Nothing of OpenAI's that Gemini has no field for is sent.
    assert not {"model", "messages", "user", "stream", "stream_options", "parallel_tool_calls", "n"} & set(req)


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"})])
def test_tool_choice_modes(choice, config):
    body = {"messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    req = openai_to_gemini_request(body)
    assert req["toolConfig"] == {"functionCallingConfig": config}
    assert req["tools"] == [{"functionDeclarations": [{"name": "f"}]}]


def test_json_object_output_is_the_json_mime_type_alone():
    req = openai_to_gemini_request({"messages": [{"role": "user", "content": "hi"}],
                                    "response_format": {"type": "json_object"}})
    assert req["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_unknown", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "https://example.com/s.json"}}}},
     "response_format.json_schema.schema"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": ["string", "integer"]}}}]}, "tools[0].function.parameters"),
])
def test_what_gemini_cannot_take_is_a_400_naming_the_field(body, param):
    with pytest.raises(TranslationError) as info:
        openai_to_gemini_request(body)
    assert info.value.param == param and info.value.message


def test_a_schema_whose_refs_loop_is_refused_not_recursed_forever():
    schema = {"type": "object", "properties": {"next": {"$ref": "#"}}}
    with pytest.raises(TranslationError, match="deeper"):
        json_schema_to_gemini(schema, "p")


def test_response_with_two_candidates_thoughts_usage_and_finish_reasons():
    doc = fixture("gemini_response_text.json")
    resp = gemini_to_openai_response(doc, model="gemini-2.5-flash", request_id="req_1", created=1700000000)
    ChatCompletion.model_validate(resp)
    first, second = resp["choices"]
    assert first["message"]["content"] == "Paris is warmer: 18 degrees against 12."
    assert "reasoning_content" not in first["message"]
    assert first["finish_reason"] == "stop"
    assert second["index"] == 1
    assert second["message"]["content"] == "Paris, at 18 degrees."
    assert second["message"]["reasoning_content"] == "The user compares two readings."
    assert second["finish_reason"] == "length"
    # thoughts are output tokens (as OpenAI counts reasoning tokens), and reported as such
    assert resp["usage"] == {"prompt_tokens": 120, "completion_tokens": 25 + 52, "total_tokens": 197,
                             "prompt_tokens_details": {"cached_tokens": 64},
                             "completion_tokens_details": {"reasoning_tokens": 52}}


def test_function_calls_get_stable_ids_and_json_arguments():
    doc = fixture("gemini_response_function_call.json")
    a = gemini_to_openai_response(doc, model="m", request_id="r", created=1)
    b = gemini_to_openai_response(doc, model="m", request_id="r", created=1)
    ChatCompletion.model_validate(a)
    choice = a["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"location": "Paris, France"}, {"location": "Berlin, Germany", "unit": "celsius"}]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert [c["id"] for c in calls] == [c["id"] for c in b["choices"][0]["message"]["tool_calls"]]


@pytest.mark.parametrize(("reason", "finish"), [
    ("SAFETY", "content_filter"), ("RECITATION", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"),
    ("SPII", "content_filter"), ("BLOCKLIST", "content_filter"), ("MAX_TOKENS", "length"), ("STOP", "stop"),
    ("OTHER", "stop")])
def test_finish_and_safety_reasons(reason, finish):
    doc = {"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": reason}]}
    assert gemini_to_openai_response(doc, model="m", request_id="r", created=1)["choices"][0]["finish_reason"] == finish


def test_a_blocked_prompt_is_a_content_filter_400():
    with pytest.raises(PromptBlocked) as info:
        gemini_to_openai_response(fixture("gemini_response_prompt_blocked.json"), model="m", request_id="r", created=1)
    body = info.value.error_body()
    assert (body.code, body.type, body.param) == ("content_filter", "invalid_request_error", "messages")
    assert "SAFETY" in body.message


def _events(name):
    parser = SSEParser()
    raw = (FIXTURES / name).read_bytes()
    assert b"\r\n\r\n" in raw
    # arbitrary read boundaries, as a socket delivers them
    events = []
    for i in range(0, len(raw), 17):
        events.extend(parser.feed(raw[i:i + 17]))
    return [orjson.loads(e.data) for e in events]


def _accumulate(chunks):
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


def test_stream_text_with_thoughts_and_usage():
    t = GeminiToOpenAIStream(model="gemini-2.5-flash", request_id="req_s", created=1, include_usage=True)
    chunks = []
    for doc in _events("gemini_stream_text.sse"):
        chunks.extend(t.feed(doc))
    assert t.complete
    chunks.extend(t.end())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"reasoning_content": "Thinking about temperatures", "thinking_blocks": [
        {"index": 0, "type": "thinking", "thinking": "Thinking about temperatures"}]}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[2:4]] == ["Paris is", " warmer."]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 11
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 7}
    final = _accumulate(chunks)
    assert final.choices[0].message.content == "Paris is warmer."
    assert final.choices[0].finish_reason == "stop"


def test_stream_function_call():
    t = GeminiToOpenAIStream(model="m", request_id="req_t", created=1, include_usage=False)
    chunks = []
    for doc in _events("gemini_stream_function_call.sse"):
        chunks.extend(t.feed(doc))
    assert t.complete and t.end() == []
    assert all("usage" not in c for c in chunks)
    final = _accumulate(chunks)
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Paris, France"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_stream_that_stops_before_its_finish_reason_is_not_complete():
    t = GeminiToOpenAIStream(model="m", request_id="r", created=1, include_usage=False)
    for doc in _events("gemini_stream_text.sse")[:2]:
        t.feed(doc)
    assert not t.complete


def test_an_invalid_key_is_the_gateways_credential_refused_and_the_key_never_kept():
    raw = (FIXTURES / "gemini_error_api_key_invalid.json").read_bytes()
    raw = raw.replace(b"Please pass a valid API key.", b"Key AIzaSyD-leaked-0123456789abcdefghij is bad.", 1)
    err = gemini_error(400, raw, secrets=("AIzaSyD-leaked-0123456789abcdefghij",))
    assert err.status == 401
    assert err.detail.type == "invalid_request_error" and err.detail.code == "invalid_argument"
    assert "AIza" not in err.detail.message


def test_an_unconfigured_google_key_in_error_text_is_scrubbed_too():
    raw = orjson.dumps({"error": {"code": 403, "message": "key AIzaSyA0000000000000000000000000000000 denied",
                                  "status": "PERMISSION_DENIED"}})
    err = gemini_error(403, raw)
    assert "AIza" not in err.detail.message and err.detail.type == "permission_error"


def test_resource_exhausted_is_a_rate_limit_with_its_retry_delay():
    err = gemini_error(429, (FIXTURES / "gemini_error_resource_exhausted.json").read_bytes())
    assert (err.status, err.detail.type, err.detail.code, err.retry_after) == (
        429, "rate_limit_error", "resource_exhausted", 37.0)


def test_a_non_json_error_is_quoted_shortly():
    err = gemini_error(502, b"<html>bad gateway</html>")
    assert err.status == 502 and "bad gateway" in err.detail.message


def test_embeddings_request():
    assert openai_to_gemini_embeddings({"input": ["a", "b"], "dimensions": 8}, "text-embedding-004") == {"requests": [
        {"model": "models/text-embedding-004", "outputDimensionality": 8, "content": {"parts": [{"text": "a"}]}},
        {"model": "models/text-embedding-004", "outputDimensionality": 8, "content": {"parts": [{"text": "b"}]}}]}
    with pytest.raises(TranslationError):
        openai_to_gemini_embeddings({"input": [[1, 2, 3]]}, "m")


def test_the_fakes_reverse_translation_round_trips_the_conversation():
    body = fixture("gemini_openai_request.json")
    back = gemini_request_to_openai(openai_to_gemini_request(body), "gemini-2.5-flash")
    roles = [m["role"] for m in back["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user"]
    assistant = back["messages"][2]
    tool_ids = [m["tool_call_id"] for m in back["messages"][3:5]]
    assert tool_ids == [c["id"] for c in assistant["tool_calls"]]
    assert back["response_format"]["json_schema"]["schema"]["properties"]["celsius"] == {"type": "number"}
    assert back["n"] == 2 and back["max_tokens"] == 512 and back["stop"] == ["\n\nHuman:"]


# -- thought signatures and logprobs ---------------------------------------------------------------------

SIGNED_THOUGHT = "CtwFAVSoXO5wlFbaJNtHYbZXn2UTz2hOWD1Vwb+OqhsRgVBWzXVHHSYnuGs+b4RE7A=="
SIGNED_CALL = "EqYDCqMDAdHtim9/Ie3nPdS0yVl+7Fq2sc3gqGiHcJGsoPMrVvNDhBNuOfZ0s6hRUg=="


def test_thought_signatures_come_back_in_place_on_the_next_turn():
    resp = gemini_to_openai_response(fixture("gemini_response_signatures.json"), model="m", request_id="r", created=1)
    ChatCompletion.model_validate(resp)
    message = resp["choices"][0]["message"]
    assert message["reasoning_content"].startswith("**Checking the weather**")
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": message["reasoning_content"],
                                           "signature": "gemini:" + SIGNED_THOUGHT}]
    first, second = message["tool_calls"]
    assert "__thought__" in first["id"] and "__thought__" not in second["id"]
    # the id that carries the signature stays what Anthropic's tool_use ids allow
    assert all(ch.isalnum() or ch in "_-" for ch in first["id"])

    history = [{"role": "user", "content": "weather in Paris and Berlin?"}, message,
               {"role": "tool", "tool_call_id": first["id"], "content": "sunny"},
               {"role": "tool", "tool_call_id": second["id"], "content": "rain"}]
    sent = openai_to_gemini_request({"model": "m", "messages": history})
    assert sent["contents"][1] == {"role": "model", "parts": [
        {"text": message["reasoning_content"], "thought": True, "thoughtSignature": SIGNED_THOUGHT},
        {"text": "Let me look that up."},
        {"functionCall": {"name": "get_weather", "args": {"location": "Paris, France"}}, "thoughtSignature": SIGNED_CALL},
        {"functionCall": {"name": "get_weather", "args": {"location": "Berlin, Germany"}}}]}
    assert [p["functionResponse"]["name"] for p in sent["contents"][2]["parts"]] == ["get_weather", "get_weather"]


def test_a_signature_in_googles_extra_content_is_read_too():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": SIGNED_CALL}}}
    sent = openai_to_gemini_request({"model": "m", "messages": [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})
    assert sent["contents"][1]["parts"] == [{"functionCall": {"name": "f", "args": {}}, "thoughtSignature": SIGNED_CALL}]


def test_other_vendors_reasoning_goes_as_unsigned_thoughts_and_redacted_is_a_400():
    anthropic_signed = {"role": "assistant", "content": "hi", "reasoning_content": "hm",
                        "thinking_blocks": [{"type": "thinking", "thinking": "hm", "signature": "EqQBCkgIAR"}]}
    sent = openai_to_gemini_request({"model": "m", "messages": [{"role": "user", "content": "a"}, anthropic_signed,
                                                                 {"role": "user", "content": "b"}]})
    assert sent["contents"][1]["parts"] == [{"text": "hm", "thought": True}, {"text": "hi"}]
    plain = openai_to_gemini_request({"model": "m", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "hi", "reasoning_content": "hm"},
        {"role": "user", "content": "b"}]})
    assert plain["contents"][1]["parts"] == [{"text": "hm", "thought": True}, {"text": "hi"}]
    with pytest.raises(TranslationError) as e:
        openai_to_gemini_request({"model": "m", "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "hi", "thinking_blocks": [{"type": "redacted_thinking", "data": "x"}]},
            {"role": "user", "content": "b"}]})
    assert e.value.param == "messages[1].thinking_blocks[0]"


@pytest.mark.parametrize(("body", "config"), [
    ({"reasoning_effort": "low"}, {"includeThoughts": True, "thinkingBudget": 1024}),
    ({"reasoning_effort": "none"}, {"thinkingBudget": 0}),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, {"includeThoughts": True, "thinkingBudget": 2048}),
    ({"thinking": {"type": "adaptive"}}, {"includeThoughts": True, "thinkingBudget": -1}),
    ({"thinking": {"type": "disabled"}}, {"thinkingBudget": 0})])
def test_reasoning_requests_are_a_thinking_config(body, config):
    sent = openai_to_gemini_request({"model": "m", "messages": [{"role": "user", "content": "a"}], **body})
    assert sent["generationConfig"]["thinkingConfig"] == config


def test_logprobs_request_and_response():
    sent = openai_to_gemini_request({"model": "m", "messages": [{"role": "user", "content": "a"}],
                                     "logprobs": True, "top_logprobs": 2})
    assert sent["generationConfig"] == {"responseLogprobs": True, "logprobs": 2}
    resp = gemini_to_openai_response(fixture("gemini_response_signatures.json"), model="m", request_id="r", created=1)
    ChatCompletion.model_validate(resp)
    assert resp["choices"][0]["logprobs"] == {"refusal": None, "content": [
        {"token": "Let", "logprob": -0.0012, "bytes": list(b"Let"), "top_logprobs": [
            {"token": "Let", "logprob": -0.0012, "bytes": list(b"Let")}, {"token": "I", "logprob": -6.9, "bytes": [73]}]},
        {"token": " me", "logprob": -0.0001, "bytes": list(b" me"), "top_logprobs": [
            {"token": " me", "logprob": -0.0001, "bytes": list(b" me")},
            {"token": " us", "logprob": -9.4, "bytes": list(b" us")}]}]}
    plain = gemini_to_openai_response(fixture("gemini_response_text.json"), model="m", request_id="r", created=1)
    assert plain["choices"][0]["logprobs"] is None


def test_stream_signatures_and_logprobs():
    t = GeminiToOpenAIStream(model="m", request_id="r", created=1, include_usage=False)
    chunks = [c for doc in _events("gemini_stream_signatures_logprobs.sse") for c in t.feed(doc)]
    final = _accumulate(chunks)
    assert final.choices[0].message.content == "Yes."
    assert [e.token for e in final.choices[0].logprobs.content] == ["Yes", "."]
    assert [t.token for t in final.choices[0].logprobs.content[0].top_logprobs] == ["Yes", "No"]
    blocks = ThinkingBlocks()
    for c in chunks:
        blocks.feed(c["choices"][0]["delta"].get("thinking_blocks"))
    assert blocks.blocks() == [{"type": "thinking", "thinking": "Weighing the question", "signature": ""},
                               {"type": "thinking", "thinking": "", "signature": "gemini-text:Cq0CAdHtim8sig/text+part=="}]
    # The text signature goes back on the answer's text part.
    message = {"role": "assistant", "content": "Yes.", "thinking_blocks": blocks.blocks()}
    sent = openai_to_gemini_request({"model": "m", "messages": [{"role": "user", "content": "a"}, message,
                                                                 {"role": "user", "content": "b"}]})
    assert sent["contents"][1]["parts"] == [{"text": "Weighing the question", "thought": True},
                                            {"text": "Yes.", "thoughtSignature": "Cq0CAdHtim8sig/text+part=="}]
