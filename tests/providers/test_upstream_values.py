"""Values from an upstream are checked where they enter: usage counts, ids and model names.

The adapters talk to real servers on loopback; each out-of-range value makes the attempt an upstream
``protocol`` error (so the pipeline fails over), logged once per provider, never a crash.
"""

from __future__ import annotations

import functools
import json
import logging
import types

import pytest

from runestone.http.client import make_transport
from runestone.http.server import Response, serve_http
from runestone.providers.anthropic import AnthropicAdapter
from runestone.providers.base import MAX_NAME_CHARS, MAX_TOKENS, Usage, usage_from
from runestone.providers.openai import OpenAIAdapter
from runestone.resilience.errors import UpstreamError

ASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("value,expected", [(None, 0), (0, 0), (7, 7), (7.0, 7), (MAX_TOKENS, MAX_TOKENS)])
def test_counts_in_range_are_taken(value, expected):
    usage = Usage()
    usage_from("edge-ok", {"prompt_tokens": value, "completion_tokens": 1}, usage)
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected, 1)


@pytest.mark.parametrize("value", [2**64, MAX_TOKENS + 1, 1e300, -1, 0.5, True, False, "12", [1], {}])
def test_counts_out_of_range_are_protocol_errors(value):
    usage = Usage(2, 3)
    with pytest.raises(UpstreamError) as info:
        usage_from("edge-bad", {"prompt_tokens": 1, "completion_tokens": value}, usage)
    assert info.value.kind == "protocol" and info.value.retryable
    assert "out-of-range usage.completion_tokens" in info.value.message
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 3)  # nothing of a refused usage is kept


def _upstream(answer: dict | list):
    """A loopback upstream answering every POST with ``answer`` (JSON), or with an SSE stream of a list."""

    async def handler(request) -> Response:
        await request.body()
        if isinstance(answer, list):
            async def events():
                for name, data in answer:
                    head = f"event: {name}\n".encode() if name else b""
                    yield head + b"data: " + json.dumps(data).encode() + b"\n\n"
            return Response(200, [(b"content-type", b"text/event-stream")], stream=events())
        return Response(200, [(b"content-type", b"application/json")], json.dumps(answer).encode())

    return handler


async def _adapter(nursery, cls, answer, name):
    server = await nursery.start(functools.partial(serve_http, _upstream(answer), "127.0.0.1", 0))
    config = types.SimpleNamespace(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k")
    return cls(name, config, make_transport("fast"))


async def _stream_failure(adapter) -> UpstreamError:
    """Read a stream of ``adapter`` to its failure, which must be an UpstreamError."""
    stream = await adapter.open_stream(dict(ASK), request_id="r1", include_usage=True)
    try:
        with pytest.raises(UpstreamError) as info:
            async for _ in stream:
                pass
    finally:
        await stream.aclose()
        await adapter.aclose()
    return info.value


def _chat(**poison) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}, **poison}


@pytest.mark.parametrize("poison", [
    {"usage": {"prompt_tokens": 2**64, "completion_tokens": 1}},
    {"id": "c" * (MAX_NAME_CHARS + 1)},
    {"model": "m" * 100_000},
    {"model": 5},
])
async def test_openai_answers_out_of_range_fail_the_attempt(nursery, poison):
    adapter = await _adapter(nursery, OpenAIAdapter, _chat(**poison), "openai-edge")
    with pytest.raises(UpstreamError) as info:
        await adapter.complete(dict(ASK), request_id="r1")
    assert info.value.kind == "protocol"
    await adapter.aclose()


async def test_openai_stream_chunk_out_of_range_fails_the_stream(nursery):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    adapter = await _adapter(nursery, OpenAIAdapter, [
        ("", chunk), ("", {**chunk, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": -2}})],
        "openai-edge-stream")
    err = await _stream_failure(adapter)
    assert err.kind == "protocol" and "completion_tokens" in err.message


async def test_openai_model_list_with_an_endless_id_is_refused(nursery):
    adapter = await _adapter(nursery, OpenAIAdapter, {"data": [{"id": "ok"}, {"id": "x" * 10_000}]}, "list-edge")
    with pytest.raises(UpstreamError) as info:
        await adapter.list_models()
    assert info.value.kind == "protocol"
    await adapter.aclose()


def _message(usage: dict) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "x"}], "usage": usage}


@pytest.mark.parametrize("usage", [
    {"input_tokens": 2**64, "output_tokens": 1},
    {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": "many"},
    {"input_tokens": 1, "output_tokens": -1},
    # Each in range, but their sum (OpenAI's prompt_tokens) is not.
    {"input_tokens": MAX_TOKENS, "output_tokens": 1, "cache_creation_input_tokens": MAX_TOKENS},
])
async def test_anthropic_usage_out_of_range_fails_the_attempt(nursery, usage):
    adapter = await _adapter(nursery, AnthropicAdapter, _message(usage), "anthropic-edge")
    with pytest.raises(UpstreamError) as info:
        await adapter.complete(dict(ASK), request_id="r1")
    assert info.value.kind == "protocol"
    await adapter.aclose()


async def test_anthropic_stream_usage_out_of_range_fails_the_stream(nursery):
    adapter = await _adapter(nursery, AnthropicAdapter, [
        ("message_start", {"type": "message_start", "message": {**_message({"input_tokens": 3}), "content": []}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "x"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 1e300}}),
        ("message_stop", {"type": "message_stop"}),
    ], "anthropic-edge-stream")
    err = await _stream_failure(adapter)
    assert err.kind == "protocol" and "output_tokens" in err.message


def test_out_of_range_values_are_logged_once_per_provider_not_per_answer(caplog):
    caplog.set_level(logging.WARNING, logger="runestone.providers")
    for _ in range(50):
        for provider in ("once-a", "once-b"):
            with pytest.raises(UpstreamError):
                usage_from(provider, {"prompt_tokens": -1}, Usage())
    assert sorted(r.getMessage().split("'")[1] for r in caplog.records) == ["once-a", "once-b"]
