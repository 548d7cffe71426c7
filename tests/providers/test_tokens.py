"""The token estimator: tokens concatenate back to the text, counts are stable, and an Anthropic body counts
the same as the OpenAI body the gateway translates it into (so count_tokens and the fake's usage agree)."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone.wire.anthropic import anthropic_request_to_openai
from runestone.providers.tokens import (
    IMAGE_TOKENS,
    MESSAGE_TOKENS,
    REPLY_TOKENS,
    count_anthropic_messages,
    count_openai_chat,
    estimate_tokens,
    split_tokens,
)

FIXTURES = Path(__file__).parent.parent / "wire" / "fixtures"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_tokens_concatenate_to_the_text(text):
    tokens = split_tokens(text)
    assert "".join(tokens) == text
    assert all(tokens) and estimate_tokens(text) == len(tokens)


def test_estimates():
    assert estimate_tokens("") == 0
    assert split_tokens("Hello, world!") == ["Hello", ",", " world", "!"]
    assert split_tokens("a  b\n") == ["a", " ", " b", "\n"]
    assert split_tokens("extraordinary 12345") == ["extraord", "inary", " 123", "45"]
    assert estimate_tokens("the quick brown fox") == 4


def test_openai_chat_count():
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi there"},
                                                      {"type": "image_url", "image_url": {"url": "data:,"}}]},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "ok"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    expected = (REPLY_TOKENS + 4 * MESSAGE_TOKENS + 2 + (2 + IMAGE_TOKENS) + (1 + 1) + 1
                + (estimate_tokens("f") + estimate_tokens("{}")))
    assert count_openai_chat(body) == expected


ANTHROPIC_BODIES = [
    json.loads((FIXTURES / "anthropic_request_full.json").read_text()),
    {"model": "m", "max_tokens": 5, "system": "be brief", "messages": [{"role": "user", "content": "hello there"}]},
    {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
     "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b c"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "x "}, {"type": "text", "text": "y"}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]},
                  {"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}]}]},
]


@pytest.mark.parametrize("body", ANTHROPIC_BODIES)
def test_an_anthropic_body_counts_as_its_openai_translation(body):
    assert count_anthropic_messages(body) == count_openai_chat(anthropic_request_to_openai(body))
    # count_tokens bodies have no max_tokens: the count does not need it
    assert count_anthropic_messages({k: v for k, v in body.items() if k != "max_tokens"}) == count_anthropic_messages(body)
