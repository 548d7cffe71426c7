"""The ``openai`` adapter over ``MockTransport``: provider code tested without a socket.

The handler plays the upstream: it sees the request the adapter built (URL, credentials, the body with
``stream_options.include_usage`` forced on) and answers JSON or an SSE stream split across reads as a
network would split it. The adapter's checks and error classification run exactly as over a real transport.
"""

from __future__ import annotations

import types

import orjson
import pytest
import trio

from runestone.http import MockRequest, MockResponse, MockTransport, Timeouts
from runestone.providers.openai import OpenAIAdapter
from runestone.resilience.errors import UpstreamError

ASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CONFIG = types.SimpleNamespace(base_url="https://api.example.test/v1/", api_key="sk-test-secret")


def chunk(content: str | None = None, usage: dict | None = None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def test_complete_posts_the_body_with_the_key_and_reads_the_usage() -> None:
    def upstream(request: MockRequest) -> MockResponse:
        assert (request.method, request.url) == ("POST", "https://api.example.test/v1/chat/completions")
        assert request.header(b"authorization") == b"Bearer sk-test-secret"
        assert request.json() == ASK
        return MockResponse.json({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "yo"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        })

    transport = MockTransport(upstream)
    adapter = OpenAIAdapter("openai-mock", CONFIG, transport)
    result = await adapter.complete(dict(ASK), request_id="r1")
    assert orjson.loads(result.body)["choices"][0]["message"]["content"] == "yo"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 2)
    assert len(transport.requests) == 1


async def test_a_stream_split_across_reads_is_relayed_event_by_event_with_its_usage() -> None:
    sent = []

    async def events():
        whole = chunk("Hel") + chunk("lo") + chunk(usage={"prompt_tokens": 4, "completion_tokens": 2}) + \
            b"data: [DONE]\n\n"
        for start in range(0, len(whole), 37):  # reads that cut events anywhere
            yield whole[start:start + 37]

    def upstream(request: MockRequest) -> MockResponse:
        sent.append(request.json())
        return MockResponse(200, [(b"content-type", b"text/event-stream")], events())

    adapter = OpenAIAdapter("openai-mock", CONFIG, MockTransport(upstream))
    stream = await adapter.open_stream(dict(ASK), request_id="r1", include_usage=False)
    try:
        payloads = [payload async for batch in stream for payload in batch]
    finally:
        await stream.aclose()
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    contents = [orjson.loads(p)["choices"][0]["delta"]["content"] for p in payloads]
    assert contents == ["Hel", "lo"]  # the usage-only chunk the client did not ask for is dropped
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (4, 2)


async def test_an_error_status_is_an_http_upstream_error_without_the_key() -> None:
    def upstream(request: MockRequest) -> MockResponse:
        return MockResponse.json({"error": {"message": "slow down, sk-test-secret", "type": "rate_limit"}}, 429,
                                 [(b"retry-after", b"7")])

    adapter = OpenAIAdapter("openai-mock", CONFIG, MockTransport(upstream))
    with pytest.raises(UpstreamError) as info:
        await adapter.complete(dict(ASK), request_id="r1")
    assert (info.value.kind, info.value.status, info.value.retry_after) == ("http", 429, 7)
    assert "slow down" in info.value.message and "sk-test-secret" not in info.value.message


async def test_a_stream_that_stalls_past_the_read_timeout_is_a_timeout_error(autojump_clock) -> None:
    async def stalls():
        yield chunk("first")
        await trio.sleep(3600)
        yield chunk("never")

    adapter = OpenAIAdapter("openai-mock", CONFIG,
                            MockTransport(lambda request: MockResponse(200, [], stalls())), timeouts=Timeouts(read=30))
    stream = await adapter.open_stream(dict(ASK), request_id="r1", include_usage=True)
    try:
        assert len(await stream.__anext__()) == 1
        with pytest.raises(UpstreamError) as info:
            await stream.__anext__()
    finally:
        await stream.aclose()
    assert info.value.kind == "timeout"


async def _one_read_stream(read: bytes, include_usage: bool = False):
    """The adapter's stream over an upstream that sends ``read`` (whole events) in one read; its items or error."""
    async def events():
        yield read

    adapter = OpenAIAdapter("openai-mock", CONFIG, MockTransport(
        lambda request: MockResponse(200, [(b"content-type", b"text/event-stream")], events())))
    stream = await adapter.open_stream(dict(ASK), request_id="r1", include_usage=include_usage)
    try:
        return [batch async for batch in stream], stream
    finally:
        await stream.aclose()


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_in_one_read_is_one_item_ending_at_done(include_usage) -> None:
    usage = chunk(usage={"prompt_tokens": 4, "completion_tokens": 2})
    read = chunk("Hel") + chunk("lo") + usage + b"data: [DONE]\n\n" + chunk("after the end")
    items, stream = await _one_read_stream(read, include_usage)
    assert items == [[chunk("Hel")[6:-2], chunk("lo")[6:-2]] + ([usage[6:-2]] if include_usage else [])]
    assert stream.finished and (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (4, 2)


@pytest.mark.parametrize("bad, kind, said", [
    (b"data: {not json\n\n", "malformed", "upstream sent invalid JSON in a stream chunk"),
    (b"data: [1, 2]\n\n", "malformed", "upstream sent a list where a stream chunk should be an object"),
    (b'data: {"id": "x"}\n\n', "malformed", "upstream stream chunk has no 'choices' list"),
    (b'data: {"error": {"message": "overloaded"}}\n\n', "stream_cut", "overloaded"),
    (b'data: {"choices": [], "usage": {"prompt_tokens": -1}}\n\n', "protocol", "out-of-range usage.prompt_tokens"),
])
async def test_a_bad_chunk_among_whole_events_fails_the_read(bad, kind, said) -> None:
    """However the read is split (the usual one-split path, or line by line), a bad chunk fails the stream."""
    for read in (chunk("ok") + bad + b"data: [DONE]\n\n", b": ping\n\n" + chunk("ok") + bad + b"data: [DONE]\n\n"):
        with pytest.raises(UpstreamError) as info:
            await _one_read_stream(read)
        assert info.value.kind == kind and said in str(info.value), read
