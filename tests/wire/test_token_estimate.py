"""The gateway's one token estimate, on fixed inputs: texts (ASCII and not), chat messages and their framing,
multi-part content with images and files, tool definitions, tool calls, prompts, embeddings inputs; and the
fake's tokens, which concatenate back to the text and are as many as the estimate says."""

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone.wire.anthropic import anthropic_request_to_openai
from runestone.wire.token_estimate import (
    IMAGE_TOKENS,
    MESSAGE_TOKENS,
    REPLY_TOKENS,
    estimate_input_tokens,
    estimate_text_tokens,
    split_tokens,
)


def test_a_text_is_about_four_bytes_of_utf8_a_token():
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("a") == 1
    assert estimate_text_tokens("abcd") == 1
    assert estimate_text_tokens("abcde") == 2
    assert estimate_text_tokens("the quick brown fox") == 5  # 19 characters
    assert estimate_text_tokens("x" * 4000) == 1000
    # Not by characters: a CJK character is 3 bytes, so 4 of them are 3 tokens (o200k_base says 3 too)
    assert estimate_text_tokens("今日は晴") == 3
    assert estimate_text_tokens("é") == 1 and estimate_text_tokens("éé") == 1 and estimate_text_tokens("ééé") == 2
    assert estimate_text_tokens("\U0001f680") == 1


def test_the_fake_tokens_split_the_text_by_the_same_rule():
    assert split_tokens("") == []
    assert split_tokens("Hello, world!") == ["Hell", "o, w", "orld", "!"]
    assert split_tokens("今日は晴") == ["今", "日", "は晴"]  # bytes 1-3 | 4-6 | 7-12: a character is never cut


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_tokens_concatenate_to_the_text_and_are_as_many_as_the_estimate(text):
    tokens = split_tokens(text)
    assert "".join(tokens) == text
    assert all(tokens) and len(tokens) == estimate_text_tokens(text)


def test_each_message_adds_its_framing_and_each_request_the_reply_priming():
    one = {"messages": [{"role": "user", "content": "x" * 40}]}
    assert estimate_input_tokens(one) == REPLY_TOKENS + MESSAGE_TOKENS + 10 == 17
    # OpenAI's cookbook: "Hello!" after a system prompt is 3 + (4 + 6) + (4 + 2) = 19 on o200k_base
    chat = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Hello!"}]}
    assert estimate_input_tokens(chat) == 3 + (4 + 7) + (4 + 2) == 20
    named = {"messages": [{"role": "user", "content": "x" * 40, "name": "alice"}]}
    assert estimate_input_tokens(named) == 17 + 1 + 2
    assert estimate_input_tokens({"messages": []}) == REPLY_TOKENS


def test_multi_part_content_counts_text_parts_and_a_flat_cost_per_image_or_file():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "y" * 40},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 40_000}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "B" * 40_000}},
        {"type": "input_audio", "input_audio": {"data": "C" * 400, "format": "wav"}},
    ]}]}
    assert estimate_input_tokens(body) == 3 + 4 + 10 + 3 * IMAGE_TOKENS
    refusal = {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no" * 10}]}]}
    assert estimate_input_tokens(refusal) == 3 + 4 + 5


def test_tool_definitions_count_their_json_text():
    fn = {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    base = {"messages": [{"role": "user", "content": "x" * 40}]}
    with_tool = {**base, "tools": [{"type": "function", "function": fn}]}
    assert estimate_input_tokens(with_tool) == 17 + (len(orjson.dumps(fn)) + 3) // 4 == 17 + 37


def test_tool_calls_count_their_name_and_arguments():
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}
    assert estimate_input_tokens(body) == 3 + (4 + 3 + 4) + (4 + 2)


def test_a_json_schema_response_format_counts_its_schema():
    schema = {"name": "s", "schema": {"type": "object"}}
    body = {"messages": [], "response_format": {"type": "json_schema", "json_schema": schema}}
    assert estimate_input_tokens(body) == 3 + (len(orjson.dumps(schema)) + 3) // 4
    assert estimate_input_tokens({"messages": [], "response_format": {"type": "json_object"}}) == 3


def test_prompts_and_embedding_inputs():
    assert estimate_input_tokens({"prompt": "z" * 400}) == 100
    assert estimate_input_tokens({"prompt": ["aaaa", "bbbbbbbb"]}) == 3
    assert estimate_input_tokens({"input": "aaaa"}) == 1
    assert estimate_input_tokens({"input": ["aaaa", "bbbbbbbb"]}) == 3
    assert estimate_input_tokens({"input": [1, 2, 3]}) == 3  # a token array is its length
    assert estimate_input_tokens({"input": [[1, 2], [3, 4, 5]]}) == 5
    assert estimate_input_tokens({}) == 0


def test_malformed_shapes_count_zero_and_never_raise():
    for body in ({"messages": "hi"}, {"messages": [1, None, {"content": {"x": 1}}]}, {"tools": "t"},
                 {"messages": [{"role": "assistant", "tool_calls": "x"}]}, {"input": {"a": 1}},
                 {"messages": [{"role": "user", "content": [1, None, {"type": "text", "text": 5}]}]}):
        assert estimate_input_tokens(body) >= 0


def test_an_anthropic_request_counts_as_its_translation():
    body = {"model": "m", "max_tokens": 5, "system": "be brief", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello there"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "AAAA"}}]}]}
    chat = anthropic_request_to_openai(body)
    assert estimate_input_tokens(chat) == 3 + (4 + 2) + (4 + 3 + IMAGE_TOKENS)


def test_output_estimate_counts_the_texts_an_answer_carries():
    from runestone.wire.token_estimate import estimate_output_tokens

    chat = {"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "a" * 40, "reasoning_content": "b" * 8,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"q":"cc"}'}}]},
        "finish_reason": "stop"}]}
    assert estimate_output_tokens(chat) == 10 + 2 + 3  # content, reasoning, arguments; ids and names not
    assert estimate_output_tokens(orjson.dumps(chat)) == 15
    messages = {"type": "message", "content": [{"type": "text", "text": "d" * 12}, {"type": "thinking", "thinking": "e" * 4}]}
    assert estimate_output_tokens(messages) == 3 + 1
    responses = {"output": [{"type": "message", "content": [{"type": "output_text", "text": "f" * 16}]}]}
    assert estimate_output_tokens(responses) == 4
    assert estimate_output_tokens({"choices": []}) == 1  # never nothing
    assert estimate_output_tokens(b"not json at all") == 4
    nested: dict = {"content": "g" * 4}
    for _ in range(100):
        nested = {"x": [nested]}
    assert estimate_output_tokens(nested) == 1  # nesting past the bound counts nothing (and never recurses away)
