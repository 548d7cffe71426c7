"""One request, one token estimate: the budget reservation on ``/v1/messages`` and ``/v1/chat/completions``,
the ``/v1/messages/count_tokens`` answer (no upstream can count: the gateway's estimate) and the fake
upstream's ``usage`` are the same number, the one :func:`estimate_input_tokens` gives. Over real sockets
with the official SDKs."""

from __future__ import annotations

import re

import anthropic
import httpx
import openai

from gatewaytest import provider_toml
from runestone.wire.anthropic import anthropic_request_to_openai
from runestone.wire.token_estimate import estimate_input_tokens

ADMIN_KEY = "ak-estimate-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
#: An input token costs $0.001 and output is free: a reservation in dollars is the input estimate / 1000.
PRICING = '[pricing."fake-model"]\ninput_per_mtok = 1000.0\noutput_per_mtok = 0.0\n'

TOOLS = [{"name": "get_weather", "description": "The weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
BODY = {"model": "fake-model", "system": "You are brief.", "tools": TOOLS, "messages": [
    {"role": "user", "content": [
        {"type": "text", "text": "What is the weather where this photo was taken? 今日は"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo" * 50}}]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"},
                                 {"type": "text", "text": "and tomorrow?"}]}]}


def _reserved(message: str) -> float:
    found = re.search(r"may cost up to \$([0-9.]+)", message)
    assert found, message
    return float(found.group(1))


async def test_the_reservation_the_count_and_the_usage_are_one_number(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    gw = await gateway_factory(f'[auth]\nadmin_key = "{ADMIN_KEY}"\n' + PRICING + provider_toml(
        "up", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up", models=["fake-model"]))
    chat = anthropic_request_to_openai({**BODY, "max_tokens": 16})
    expected = estimate_input_tokens(chat)
    assert expected > 85  # the image's flat cost and the text around it

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        poor = (await http.post("/admin/keys", headers=ADMIN, json={
            "name": "poor", "budget": {"usd": 0.000001, "period": "day"}})).json()["secret"]
        rich = (await http.post("/admin/keys", headers=ADMIN, json={"name": "rich"})).json()["secret"]

    poor_anthropic = anthropic.AsyncAnthropic(base_url=gw.url, api_key=poor, max_retries=0)
    rich_anthropic = anthropic.AsyncAnthropic(base_url=gw.url, api_key=rich, max_retries=0)
    # The count (the provider is OpenAI-compatible: no upstream count, so the gateway's estimate).
    raw = await poor_anthropic.messages.with_raw_response.count_tokens(**BODY)
    assert raw.headers["x-runestone-token-count"] == "estimate"
    assert (await raw.parse()).input_tokens == expected

    # The reservation, on the Anthropic route and on the chat route with the same request in OpenAI's shape.
    try:
        await poor_anthropic.messages.create(max_tokens=16, **BODY)
        raise AssertionError("the budget should have refused the request")
    except anthropic.RateLimitError as exc:
        assert round(_reserved(exc.body["error"]["message"]) * 1000, 3) == expected
    poor_openai = openai.AsyncOpenAI(base_url=gw.v1, api_key=poor, max_retries=0)
    try:
        await poor_openai.chat.completions.create(**chat)
        raise AssertionError("the budget should have refused the request")
    except openai.RateLimitError as exc:
        assert round(_reserved(exc.body["message"]) * 1000, 3) == expected

    # The fake upstream's usage, counted by the same estimator on what the gateway sent it.
    msg = await rich_anthropic.messages.create(max_tokens=16, **BODY)
    assert msg.usage.input_tokens == expected
