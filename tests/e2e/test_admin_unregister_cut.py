"""Unregistering a provider waits a bounded grace for its requests; a stream still running after it is cut
with an honest SSE error event (its upstream connection is closed), never left running on a stopped provider."""

import httpx
import orjson
import trio

from gatewaytest import provider_toml


async def test_stream_outliving_the_grace_is_cut_with_an_error_event(gateway_factory, gated_factory):
    upstream, gate, _ = await gated_factory(chunks=40)  # the stream waits at the gate, which never opens
    gw = await gateway_factory('[auth]\napi_keys = ["k"]\nadmin_key = "root"\n'
                               + provider_toml("slow", "openai", base_url=f"http://127.0.0.1:{upstream.port}/v1",
                                               api_key="sk", models=["fake-model"]))
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "long"}]}
    got = b""
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        async with trio.open_nursery() as nursery:
            async with http.stream("POST", "/v1/chat/completions", json=body,
                                   headers={"authorization": "Bearer k"}) as r:
                assert r.status_code == 200

                async def unregister():
                    reply = await http.delete("/admin/providers/slow?grace_ms=300",
                                              headers={"authorization": "Bearer root"})
                    assert reply.status_code == 200, reply.text

                nursery.start_soon(unregister)
                async for chunk in r.aiter_bytes():
                    got += chunk
    # The gate never opened: only the cut after the grace could end this stream.
    events = [e for e in got.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] != b"data: [DONE]"
    last = orjson.loads(events[-1][6:])
    assert "error" in last and last["error"]["message"]
    assert "slow" not in gw.app.providers.value
