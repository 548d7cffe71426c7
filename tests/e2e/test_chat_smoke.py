"""The newcomer's path: the official openai SDK against the gateway, through each provider type."""

import openai

from gatewaytest import provider_toml


async def test_openai_sdk_through_each_provider_type(gateway_factory, fake_factory):
    upstream, _ = await fake_factory()
    base = f"http://127.0.0.1:{upstream.port}"
    gw = await gateway_factory(
        provider_toml("fake", "fake", models=["fake-model"])
        + provider_toml("up-openai", "openai", base_url=base + "/v1", api_key="sk-test", models=["gpt-4o-mini"])
        + provider_toml("up-anthropic", "anthropic", base_url=base, api_key="ak-test", models=["claude-haiku-4-5"])
    )
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    for model, provider in (("fake-model", "fake"), ("gpt-4o-mini", "up-openai"), ("claude-haiku-4-5", "up-anthropic")):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hello there"}])
        assert raw.headers["x-runestone-provider"] == provider
        completion = raw.parse()
        assert completion.choices[0].message.content.startswith("Echo: hello there")
        assert completion.usage.total_tokens > 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello there"}], stream=True,
            stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert text == completion.choices[0].message.content
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens
