"""``POST /v1/embeddings`` through the gateway with the openai SDK: floats, base64, dimensions, arrays."""

import base64
import struct

import openai
import pytest

from gatewaytest import provider_toml
from runestone.providers.fake_content import fake_embedding


async def _gateway(gateway_factory, fake_factory):
    upstream, _ = await fake_factory(models=("text-embedding-3-small",))
    return await gateway_factory(
        provider_toml("fake", "fake", models=["fake-embedding"])
        + provider_toml("up-openai", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="sk-up",
                        models=["text-embedding-3-small"]))


@pytest.mark.parametrize(("model", "provider"), [("fake-embedding", "fake"),
                                                 ("text-embedding-3-small", "up-openai")])
async def test_floats_and_base64_agree_and_are_the_deterministic_vectors(gateway_factory, fake_factory, model,
                                                                         provider):
    gw = await _gateway(gateway_factory, fake_factory)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    raw = await client.embeddings.with_raw_response.create(model=model, input="the quick fox",
                                                           encoding_format="float")
    assert raw.headers["x-runestone-provider"] == provider
    floats = raw.parse()
    assert floats.object == "list" and len(floats.data) == 1
    vec = floats.data[0].embedding
    assert len(vec) == 256
    assert vec == pytest.approx(fake_embedding("the quick fox", 256), rel=1e-6)
    assert floats.usage.prompt_tokens > 0
    # The SDK's default asks for base64 and decodes it; the numbers must be the same vector.
    decoded = await client.embeddings.create(model=model, input="the quick fox")
    assert decoded.data[0].embedding == pytest.approx(vec, rel=1e-6)
    # And on the wire it really is little-endian float32 in base64.
    wire = await client.embeddings.create(model=model, input="the quick fox", encoding_format="base64")
    b64 = wire.data[0].embedding
    assert isinstance(b64, str)
    assert list(struct.unpack(f"<{len(vec)}f", base64.b64decode(b64))) == pytest.approx(vec, rel=1e-6)


async def test_dimensions_and_array_input(gateway_factory, fake_factory):
    gw = await _gateway(gateway_factory, fake_factory)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    for model in ("fake-embedding", "text-embedding-3-small"):
        short = await client.embeddings.create(model=model, input="hello", dimensions=32, encoding_format="float")
        assert len(short.data[0].embedding) == 32
        batch = await client.embeddings.create(model=model, input=["alpha", "beta", "alpha"], encoding_format="float")
        assert [d.index for d in batch.data] == [0, 1, 2]
        a, b, a2 = (d.embedding for d in batch.data)
        assert a == a2 and a != b
        assert a == pytest.approx(fake_embedding("alpha", 256), rel=1e-6)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "fake-embedding"}, "input"),
    ({"model": "fake-embedding", "input": ""}, "input"),
    ({"model": "fake-embedding", "input": []}, "input"),
    ({"model": "fake-embedding", "input": ["ok", {"x": 1}]}, "input[1]"),
    ({"model": "fake-embedding", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "fake-embedding", "input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x"}, "model"),
])
async def test_bad_input_is_a_400_naming_the_field(gateway_factory, fake_factory, body, param):
    gw = await _gateway(gateway_factory, fake_factory)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/embeddings", body=body, cast_to=dict)
    assert caught.value.body["param"] == param
    assert param.split("[")[0] in caught.value.body["message"]
