"""Real client libraries on ``/v1/responses``, unchanged: the ``openai-agents`` SDK (an Agent with a function tool,
``Runner.run`` and ``Runner.run_streamed`` with default model settings), langchain's ``ChatOpenAI`` with
``use_responses_api=True`` and ``with_structured_output``, and ``instructor`` in JSON mode.

Each runs against the built-in fake (the default config) and against a "well-mannered" chat upstream behind
an ``openai``-type provider: one that calls a tool only when the user spoke last, answers in text after a tool
result and answers JSON when asked, so the gateway's side of an agent loop and of structured output is proven
whatever the fake does. The agents SDK and langchain run on asyncio or threads, so each client runs in a
worker thread (its own event loop) against the gateway's real socket.
"""

import asyncio
import json

import orjson
import pytest
import trio
from pydantic import BaseModel

from gatewaytest import provider_toml
from runestone.http.server import Response, serve_http

KEY = "sk-client-1"


class City(BaseModel):
    name: str
    population: int


def _reply(body: dict) -> tuple[dict, str]:
    messages = body["messages"]
    last = messages[-1]
    tools = body.get("tools") or []
    fmt = (body.get("response_format") or {}).get("type")
    if tools and body.get("tool_choice", "auto") != "none" and last["role"] == "user":
        fn = tools[0]["function"]
        args = {name: "Oslo" for name in (fn.get("parameters") or {}).get("required", [])}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{len(messages)}", "type": "function",
             "function": {"name": fn["name"], "arguments": json.dumps(args)}}]}, "tool_calls"
    if fmt in ("json_object", "json_schema"):
        content = json.dumps({"name": "Oslo", "population": 700000})
    elif last["role"] == "tool":
        content = f"Final answer: {last['content']}"
    else:
        content = "Hello from a well-mannered model."
    return {"role": "assistant", "content": content}, "stop"


async def mannered(request):
    """A chat completions upstream that behaves like a model in an agent loop (stream and not)."""
    body = orjson.loads(await request.body())
    message, finish = _reply(body)
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    head = {"id": "chatcmpl-m", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        return Response.json({**head, "object": "chat.completion", "usage": usage,
                              "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
    deltas = [{"role": "assistant", "content": ""}]
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        deltas.append({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]})
    else:
        text = message["content"]
        deltas += [{"content": text[: len(text) // 2]}, {"content": text[len(text) // 2:]}]
    chunks = [{**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    data = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    async def stream():
        yield data

    return Response(200, [(b"content-type", b"text/event-stream")], stream=stream())


@pytest.fixture
async def gw(gateway_factory, nursery):
    server = await nursery.start(lambda task_status: serve_http(mannered, "127.0.0.1", 0, task_status=task_status))
    return await gateway_factory(
        provider_toml("fake", "fake", models=["fake-model"])
        + provider_toml("mannered", "openai", base_url=f"http://127.0.0.1:{server.port}", api_key="k",
                        models=["mannered-model"]),
        env={"RUNESTONE_API_KEYS": KEY})


async def in_thread(fn):
    """``fn()`` on a worker thread (a client with its own event loop or none), the gateway serving meanwhile."""
    return await trio.to_thread.run_sync(fn)


MODELS = ["fake-model", "mannered-model"]
JSON_MODELS = ["fake-model", "mannered-model"]


def _agent(gw, model: str, calls: list):
    from agents import Agent, function_tool, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0, timeout=30))

    @function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    return Agent(name="weather", instructions="Answer with the weather.", model=model, tools=[get_weather])


@pytest.mark.parametrize("model", MODELS)
async def test_agents_runner_run_calls_the_tool_and_finishes(gw, model):
    from agents import Runner

    calls: list = []

    def run():
        return asyncio.run(Runner.run(_agent(gw, model, calls), "What is the weather in Oslo?", max_turns=4))

    result = await in_thread(run)
    assert calls and "sunny in" in result.final_output


@pytest.mark.parametrize("model", MODELS)
async def test_agents_runner_run_streamed_calls_the_tool_and_finishes(gw, model):
    from agents import Runner

    calls: list = []

    async def run_streamed():
        result = Runner.run_streamed(_agent(gw, model, calls), "What is the weather in Oslo?", max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = await in_thread(lambda: asyncio.run(run_streamed()))
    assert calls and "sunny in" in result.final_output
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds


async def test_langchain_chat_openai_on_the_responses_api(gw):
    from langchain_openai import ChatOpenAI

    for model in ("fake-model", "mannered-model"):
        llm = ChatOpenAI(model=model, base_url=gw.v1, api_key=KEY, use_responses_api=True, max_retries=0)
        message = await in_thread(lambda: llm.invoke("hello there"))
        assert message.text.startswith("Echo: hello there" if model == "fake-model" else "Hello from")
        assert message.usage_metadata["input_tokens"] > 0
        assert message.response_metadata["id"].startswith("resp_")


@pytest.mark.parametrize("model", JSON_MODELS)
async def test_langchain_with_structured_output(gw, model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=gw.v1, api_key=KEY, use_responses_api=True, max_retries=0)
    city = await in_thread(lambda: llm.with_structured_output(City).invoke("the largest city of Norway"))
    assert isinstance(city, City)


@pytest.mark.parametrize("model", JSON_MODELS)
async def test_instructor_in_json_mode(gw, model):
    import instructor  # installed by scripts/_venv.sh (see pyproject.toml): never skipped
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=gw.v1, api_key=KEY, max_retries=0), mode=instructor.Mode.JSON)
    city = await in_thread(lambda: client.chat.completions.create(
        model=model, response_model=City, max_retries=0,
        messages=[{"role": "user", "content": "the largest city of Norway"}]))
    assert isinstance(city, City)
    if model == "mannered-model":  # the stub answers the real thing; the fake a valid instance of the schema
        assert city.model_dump() == {"name": "Oslo", "population": 700000}
