"""Legacy ``POST /v1/completions`` through the gateway: the openai SDK in, an Anthropic-format upstream out."""

import httpx
import openai
import orjson
import pytest

from gatewaytest import provider_toml
from runestone.providers.fake_content import fake_reply_chunks
from runestone.providers.fake_server import make_fake_handler
from runestone.http.server import serve_http


class RecordingFake:
    """The fake upstream, recording the JSON bodies it is sent."""

    def __init__(self) -> None:
        self.fake = make_fake_handler()
        self.bodies: list[tuple[str, dict]] = []

    async def __call__(self, request):
        if request.method == "POST":
            self.bodies.append((request.path, orjson.loads(await request.body())))
        return await self.fake(request)


async def _gateway(gateway_factory, nursery):
    upstream = RecordingFake()
    server = await nursery.start(lambda task_status: serve_http(upstream, "127.0.0.1", 0, task_status=task_status))
    gw = await gateway_factory(provider_toml("up-anthropic", "anthropic", base_url=f"http://127.0.0.1:{server.port}",
                                             api_key="ak-test", models=["claude-haiku-4-5"]))
    return gw, upstream


def _expected(prompt: str) -> str:
    return "".join(fake_reply_chunks([{"role": "user", "content": prompt}]))


async def test_completion_through_an_anthropic_upstream_streamed_and_not(gateway_factory, nursery):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    raw = await client.completions.with_raw_response.create(
        model="claude-haiku-4-5", prompt="say hello", max_tokens=200, temperature=0.5, stop=["\n\n"])
    assert raw.headers["x-runestone-provider"] == "up-anthropic"
    done = raw.parse()
    assert done.object == "text_completion"
    assert done.id.startswith("cmpl-")
    assert done.model == "claude-haiku-4-5"
    assert len(done.choices) == 1
    choice = done.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "stop", None)
    assert choice.text == _expected("say hello") and choice.text.startswith("Echo: say hello")
    assert done.usage.completion_tokens > 0 and done.usage.total_tokens == (
        done.usage.prompt_tokens + done.usage.completion_tokens)
    # The prompt reached the upstream as one user turn, with the sampling fields translated.
    path, sent = upstream.bodies[-1]
    assert path == "/v1/messages"
    assert sent["messages"] == [{"role": "user", "content": "say hello"}]
    assert (sent["max_tokens"], sent["temperature"], sent["stop_sequences"]) == (200, 0.5, ["\n\n"])

    stream = await client.completions.create(model="claude-haiku-4-5", prompt="say hello", max_tokens=200,
                                             stream=True, stream_options={"include_usage": True})
    text, finish, usage, objects, ids = "", None, None, set(), set()
    async for chunk in stream:
        objects.add(chunk.object)
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    assert objects == {"text_completion"}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert text == choice.text
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens
    assert upstream.bodies[-1][1]["stream"] is True


async def test_prompt_as_a_one_item_array_and_echo(gateway_factory, nursery):
    gw, _ = await _gateway(gateway_factory, nursery)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    done = await client.completions.create(model="claude-haiku-4-5", prompt=["once upon"], echo=True)
    assert done.choices[0].text == "once upon" + _expected("once upon")
    stream = await client.completions.create(model="claude-haiku-4-5", prompt="once upon", echo=True, stream=True)
    pieces = [c.choices[0].text async for c in stream if c.choices]
    assert pieces[0] == "once upon"
    assert "".join(pieces) == done.choices[0].text


async def test_a_stream_without_include_usage_has_no_usage_chunk(gateway_factory, nursery):
    gw, _ = await _gateway(gateway_factory, nursery)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/completions", json={"model": "claude-haiku-4-5", "prompt": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)  # the role-only chunk of chat is not relayed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"model": "claude-haiku-4-5"}, "prompt", "'prompt' is required"),
    ({"model": "claude-haiku-4-5", "prompt": ["a", "b"]}, "prompt", "array of 2 items"),
    ({"model": "claude-haiku-4-5", "prompt": [1, 2, 3]}, "prompt", "token ids"),
    ({"model": "claude-haiku-4-5", "prompt": 7}, "prompt", "not a number"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "best_of": 3}, "best_of", "'best_of' must be 1"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "echo": "yes"}, "echo", "'echo' must be a boolean"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "temperature": "hot"}, "temperature", "'temperature' must be"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "max_tokens": 0}, "max_tokens", "'max_tokens' must be"),
    ({"model": "claude-haiku-4-5", "prompt": "x", "messages": []}, "messages", "/v1/chat/completions"),
    ({"prompt": "x"}, "model", "'model' is required"),
])
async def test_bad_input_is_a_400_naming_the_field(gateway_factory, nursery, body, param, says):
    gw, upstream = await _gateway(gateway_factory, nursery)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/completions", body=body, cast_to=dict)
    error = caught.value.body
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    assert upstream.bodies == []


async def test_unknown_model_is_a_404(gateway_factory, nursery):
    gw, _ = await _gateway(gateway_factory, nursery)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="no-such-model", prompt="x")
    assert caught.value.body["code"] == "model_not_found"
