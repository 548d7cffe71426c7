"""The fake provider: deterministic content, and a real HTTP server the official SDKs talk to unchanged.

The ``openai`` and ``anthropic`` SDKs parse and accumulate what the fake sends, streaming and not, with tools;
that is the proof its wire formats are those of the real APIs. Fault knobs and pacing are tested over real
loopback sockets, pacing under ``MockClock`` so that seconds of delay take no time.
"""

import base64
import json
import math
import random
import struct
from functools import partial

import anthropic
import attrs
import httpx
import openai
import pytest
import trio
import trio.testing

from runestone.providers.fake_content import fake_answer, fake_embedding, fake_reply_chunks
from runestone.http.server import serve_http
from runestone.providers.fake_server import FakeKnobs, make_fake_handler, serve_fake_provider
from runestone.wire.sse import SSEParser
from runestone.wire.token_estimate import estimate_input_tokens, estimate_text_tokens

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 2}},
            "required": ["city", "unit", "days"],
        },
    },
}
ANTHROPIC_TOOL = {"name": WEATHER_TOOL["function"]["name"], "description": "Get the weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
HELLO = [{"role": "user", "content": "hello there fake model"}]


# -- fake_content -------------------------------------------------------------------------------------------


def test_reply_is_deterministic_echo_in_n_pieces():
    pieces = fake_reply_chunks(HELLO, 5)
    assert len(pieces) == 5 and all(pieces)
    text = "".join(pieces)
    assert text.startswith("Echo: hello there fake model ") and text.endswith(".")
    assert fake_reply_chunks(HELLO, 5) == pieces
    assert "".join(fake_reply_chunks(HELLO, 3)) == "".join(fake_reply_chunks(HELLO, 3))
    other = fake_reply_chunks([{"role": "user", "content": [{"type": "text", "text": "something else"}]}], 5)
    assert "".join(other).startswith("Echo: something else ")
    # only the last user message counts
    assert fake_reply_chunks([*HELLO, {"role": "assistant", "content": "x"}], 5) == pieces
    assert len(fake_reply_chunks(HELLO, 40)) == 40


def test_reply_with_fixed_text():
    assert "".join(fake_reply_chunks(HELLO, 4, text="one two three four five")) == "one two three four five"
    # 6 tokens of 4 characters in 4 runs
    assert fake_reply_chunks(HELLO, 4, text="one two three four five") == ["one ", "two thre", "e fo", "ur five"]
    assert fake_reply_chunks(HELLO, 4, text="ab") == ["ab"]  # one token: one piece
    spaced = fake_reply_chunks(HELLO, 3, text="  spaced  out ")
    assert "".join(spaced) == "  spaced  out " and len(spaced) == 3 and all(spaced)
    assert fake_reply_chunks([], 0, text="x") == ["x"]
    assert fake_reply_chunks([], 3, text="") == []


def _call(tools, tool_choice=None, messages=HELLO):
    body = {"model": "m", "messages": messages, "tools": tools}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    return fake_answer(body).choices[0].tool_call


def test_tool_call_from_either_tool_shape():
    call = _call([WEATHER_TOOL])
    assert call.name == "get_weather"
    args = json.loads(call.arguments)
    assert set(args) == {"city", "unit", "days"} and args["unit"] in ("celsius", "fahrenheit") and args["days"] >= 2
    assert call.id.startswith("call_") and call == _call([ANTHROPIC_TOOL])
    assert _call([WEATHER_TOOL], "none") is None
    assert _call([ANTHROPIC_TOOL], {"type": "none"}) is None
    assert _call([]) is None
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}
    assert _call([other, WEATHER_TOOL], {"type": "function", "function": {"name": "get_weather"}}).name == "get_weather"
    assert _call([other, ANTHROPIC_TOOL], {"type": "tool", "name": "get_weather"}).name == "get_weather"
    assert _call([other, WEATHER_TOOL]).arguments == "{}"


def test_embedding_is_a_deterministic_unit_vector():
    vec = fake_embedding("hello", 64)
    assert len(vec) == 64 and math.isclose(math.fsum(v * v for v in vec), 1.0)
    assert vec == fake_embedding("hello", 64) and vec != fake_embedding("hello!", 64)


# -- the server --------------------------------------------------------------------------------------------


@pytest.fixture
def clock():
    # Mock time that jumps only after 10 ms of real idleness: with a zero threshold it also jumps while a
    # loopback socket read is in flight, and the measured delays then depend on scheduling.
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
async def port(nursery):
    server = await nursery.start(serve_fake_provider)
    return server.port


def oai(port, **kw):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, **kw)


def anth(port, **kw):
    return anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0, **kw)


async def set_knobs(port, **knobs):
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/_fake/knobs", json=knobs)
        assert r.status_code == 200, r.text
        return r.json()


async def stats(port):
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/_fake/stats")).json()


async def test_openai_sdk_non_stream_and_stream_agree(port):
    async with oai(port) as client:
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        expected = "".join(fake_reply_chunks(HELLO, 8))
        assert resp.object == "chat.completion" and resp.model == "gpt-4o-mini"
        assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "stop"
        assert resp.usage.prompt_tokens == estimate_input_tokens({"messages": HELLO})
        assert resp.usage.completion_tokens == estimate_text_tokens(expected)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].delta.content for c in chunks[1:9]] == fake_reply_chunks(HELLO, 8)
        assert chunks[9].choices[0].finish_reason == "stop"
        assert chunks[10].choices == [] and chunks[10].usage.total_tokens == resp.usage.total_tokens
        assert len(chunks) == 11 and all(c.usage is None for c in chunks[:10])
        assert len({c.id for c in chunks}) == 1 and chunks[0].id != resp.id

        async with client.chat.completions.stream(model="gpt-4o-mini", messages=HELLO) as helper:
            final = await helper.get_final_completion()
        assert final.choices[0].message.content == expected


async def test_openai_sdk_tools(port):
    async with oai(port) as client:
        resp = await client.chat.completions.create(model="fake-model", messages=HELLO, tools=[WEATHER_TOOL])
        call = resp.choices[0].message.tool_calls[0]
        assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].message.content is None
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "unit", "days"}

        async with client.chat.completions.stream(model="fake-model", messages=HELLO, tools=[WEATHER_TOOL]) as helper:
            final = await helper.get_final_completion()
        streamed = final.choices[0].message.tool_calls[0]
        assert (streamed.id, streamed.function.name, streamed.function.arguments) == (call.id, "get_weather", call.function.arguments)
        assert final.choices[0].finish_reason == "tool_calls"

        resp = await client.chat.completions.create(model="fake-model", messages=HELLO, tools=[WEATHER_TOOL], tool_choice="none")
        assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content.startswith("Echo:")


async def test_openai_sdk_errors_embeddings_and_models(port):
    async with oai(port) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="no-such-model", messages=HELLO)
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"

        resp = await client.chat.completions.create(model="fake-model", messages=HELLO, max_tokens=3)
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens <= 3

        emb = await client.embeddings.create(model="fake-embedding", input=["a", "b"])  # the SDK asks for base64
        assert [len(d.embedding) for d in emb.data] == [256, 256]
        assert emb.data[1].embedding == pytest.approx(fake_embedding("b", 256), abs=1e-6)
        emb = await client.embeddings.create(model="fake-embedding", input="a", encoding_format="float", dimensions=16)
        assert emb.data[0].embedding == fake_embedding("a", 16) and emb.usage.prompt_tokens == 1

        models = await client.models.list()
        assert [m.id for m in models.data] == list(FakeKnobs().models)


async def test_anthropic_sdk_non_stream_and_stream(port):
    async with anth(port) as client:
        msg = await client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HELLO, system="be brief")
        expected = "".join(fake_reply_chunks(HELLO, 8))
        assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
        assert msg.content[0].type == "text" and msg.content[0].text == expected
        assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == estimate_text_tokens(expected)
        assert msg.usage.input_tokens == estimate_input_tokens({"messages": [{"role": "system", "content": "be brief"}, *HELLO]})

        async with client.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=HELLO) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert texts == fake_reply_chunks(HELLO, 8)
        assert final.content[0].text == expected and final.stop_reason == "end_turn"
        assert final.usage.output_tokens == msg.usage.output_tokens

        raw = await client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HELLO, stream=True)
        kinds = [e.type async for e in raw]
        assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 8, "content_block_stop", "message_delta", "message_stop"]

        msg = await client.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=HELLO)
        assert msg.stop_reason == "max_tokens"

        models = await client.models.list()
        assert [m.id async for m in models] == list(FakeKnobs().models)


async def test_anthropic_sdk_tools(port):
    async with anth(port) as client:
        msg = await client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=HELLO, tools=[ANTHROPIC_TOOL])
        block = msg.content[0]
        assert msg.stop_reason == "tool_use" and block.type == "tool_use" and block.id.startswith("toolu_")
        assert block.name == "get_weather" and block.input == json.loads(_call([WEATHER_TOOL]).arguments)
        async with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=100, messages=HELLO, tools=[ANTHROPIC_TOOL], tool_choice={"type": "tool", "name": "get_weather"}
        ) as stream:
            final = await stream.get_final_message()
        assert final.content[0].input == block.input and final.content[0].id == block.id and final.stop_reason == "tool_use"


async def test_anthropic_headers_and_validation_like_the_real_api(port):
    url = f"http://127.0.0.1:{port}/v1/messages"
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": HELLO}
    async with httpx.AsyncClient() as client:
        r = await client.post(url, json=body, headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"] == "error"
        r = await client.post(url, json=body, headers={"x-api-key": "k"})
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        r = await client.post(url, json={**body, "max_tokens": None}, headers=headers)
        assert r.status_code == 400 and r.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: max_tokens must be an integer >= 1"}
        r = await client.post(url, content=b"{not json", headers=headers)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post(url, json={**body, "model": "gpt-unknown"}, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = await client.get(f"http://127.0.0.1:{port}/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
        r = await client.get(url)
        assert r.status_code == 405


async def test_knobs_endpoint(port):
    assert (await set_knobs(port, chunks=3, models=["m1"]))["models"] == ["m1"]
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/_fake/knobs", json={"nope": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "nope"
        r = await client.post(f"http://127.0.0.1:{port}/_fake/knobs", json={"hang": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "hang"
        r = await client.get(f"http://127.0.0.1:{port}/_fake/knobs")
        assert r.json()["chunks"] == 3 and r.json()["hang"] is False
    async with oai(port) as client:
        stream = await client.chat.completions.create(model="m1", messages=HELLO, stream=True)
        assert len([c async for c in stream]) == 1 + 3 + 1


async def test_fault_statuses_in_each_api_shape(port):
    await set_knobs(port, fault_status=429, retry_after=2)
    async with oai(port) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="fake-model", messages=HELLO)
        assert info.value.response.headers["retry-after"] == "2"
        assert info.value.body["code"] == "rate_limit_exceeded"
    await set_knobs(port, fault_status=500, retry_after=None)
    async with oai(port) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
        assert "retry-after" not in info.value.response.headers
    await set_knobs(port, fault_status=529, retry_after=0.5)
    async with anth(port) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=HELLO)
        assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
        assert info.value.response.headers["retry-after"] == "0.5"
    s = await stats(port)
    assert s["faults"] == {"429": 1, "500": 1, "529": 1}
    assert s["requests"]["POST /v1/chat/completions"] == 2 and s["requests"]["POST /v1/messages"] == 1


async def test_fault_probability_is_reproducible_from_the_seed(port):
    await set_knobs(port, fault_status=503, fault_probability=0.5, seed=7)
    rng = random.Random(7)
    expected = [rng.random() < 0.5 for _ in range(12)]
    got = []
    async with httpx.AsyncClient() as client:
        for _ in range(12):
            r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "fake-model", "messages": HELLO})
            got.append(r.status_code == 503)
    assert got == expected and any(got) and not all(got)


async def test_drop_before_response(port):
    await set_knobs(port, drop_before_response=True)
    async with oai(port) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="fake-model", messages=HELLO)
    assert (await stats(port))["faults"] == {"drop_before_response": 1}


async def test_drop_mid_stream_truncates_the_body(port):
    await set_knobs(port, drop_mid_stream=True)
    received = []
    async with oai(port) as client:
        stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
        with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
            async for chunk in stream:
                received.append(chunk)
    assert 0 < len(received) < 10
    s = await stats(port)
    assert s["faults"] == {"drop_mid_stream": 1} and s["streams"]["finished"] == 1


async def test_in_stream_error_events(port):
    await set_knobs(port, stream_error=True)
    async with oai(port) as client:
        stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
        with pytest.raises(openai.APIError, match="injected mid-stream fault"):
            async for _ in stream:
                pass
    async with anth(port) as client:
        stream = await client.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=HELLO, stream=True)
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            async for _ in stream:
                pass


async def test_malformed_sse(port):
    await set_knobs(port, malformed_sse=True)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "fake-model", "messages": HELLO, "stream": True})
    parser = SSEParser()
    events = parser.feed(r.content)
    parser.close()
    assert events[-1].data == b"[DONE]"
    bad = [e for e in events if not e.data.startswith(b"[")]
    with pytest.raises(json.JSONDecodeError):
        for e in bad:
            json.loads(e.data)


async def test_pacing_under_mock_clock(nursery, clock):
    # Timed where the fake produces each frame, from the moment it has the whole request: a loopback packet
    # delayed on a busy machine idles the loop, and the clock may then jump to another timer (the server's
    # tick) before the fake arms its own, so times seen by the client would not be exact.
    fake = make_fake_handler(FakeKnobs(ttfb_ms=3000, chunk_delay_ms=500, chunks=4))
    produced = []

    async def timed(request):
        await request.body()
        t0 = trio.current_time()
        response = await fake(request)
        produced.append(trio.current_time() - t0)

        async def frames(stream):
            async for frame in stream:
                produced.append(trio.current_time() - t0)
                yield frame

        response.stream = frames(response.stream)
        return response

    server = await nursery.start(partial(serve_http, timed, "127.0.0.1", 0))
    async with oai(server.port) as client:
        stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    # the head after the 3 s ttfb, the role chunk at once, then 4 content chunks, the finish chunk and [DONE]
    # each 0.5 s apart
    assert produced == pytest.approx([3.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0])
    assert len(chunks) == 6


async def test_hang_until_the_client_gives_up(port, clock):
    await set_knobs(port, hang=True)
    async with oai(port, timeout=30) as client:
        t0 = trio.current_time()
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="fake-model", messages=HELLO)
    # The client's own timeout ends it (MockClock: a busy machine may let the clock jump a tick further).
    assert 29 <= trio.current_time() - t0 < 45


async def test_client_going_away_counts_a_cancelled_stream(port, clock):
    await set_knobs(port, chunk_delay_ms=1000, chunks=8)
    async with httpx.AsyncClient() as client:
        body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": HELLO, "stream": True}
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/messages", json=body, headers=headers) as r:
            seen = 0
            async for _ in r.aiter_raw():
                seen += 1
                if seen == 3:
                    break
            left_at = trio.current_time()
    for _ in range(100):
        s = await stats(port)
        if s["streams"]["cancelled"]:
            break
        await trio.sleep(0.01)
    assert s["streams"] == {"started": 1, "finished": 0, "cancelled": 1}
    # noticed before the next chunk was due, not at the end of the stream
    assert left_at <= s["cancelled_at"][0] < left_at + 1.0


async def test_embeddings_base64_and_validation(port):
    async with httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        r = await client.post(url, json={"model": "fake-embedding", "input": "hi", "encoding_format": "base64", "dimensions": 8})
        data = r.json()
        assert data["object"] == "list" and data["data"][0]["object"] == "embedding" and data["data"][0]["index"] == 0
        vec = struct.unpack("<8f", base64.b64decode(data["data"][0]["embedding"]))
        assert vec == pytest.approx(fake_embedding("hi", 8), abs=1e-6)
        r = await client.post(url, json={"model": "fake-embedding", "input": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_help_describes_every_knob_and_the_default_port(capsys):
    from runestone.cli import main

    with pytest.raises(SystemExit):
        main(["fake-provider", "--help"])
    text = capsys.readouterr().out
    assert "4010" in text and "127.0.0.1" in text
    missing = [f.name for f in attrs.fields(FakeKnobs) if f.name not in text]
    assert missing == []
    from runestone.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["fake-provider"]
    assert [a.option_strings for a in sub._actions if not a.help] == [], "every option says what it does"
