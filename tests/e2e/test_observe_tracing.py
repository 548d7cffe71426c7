"""OpenTelemetry traces over OTLP/HTTP, received by an OTLP receiver the test runs on loopback.

A request that fails over once (the first provider of a failover group answers 500) gives one request span
(the child of the client's ``traceparent``) and two attempt spans under it, named and attributed with the
GenAI semantic conventions; each upstream got the ``traceparent`` of its own attempt span. No prompt or
completion text is in any span. Without an endpoint, nothing is traced and no header is sent upstream.
"""

from __future__ import annotations

import functools

import httpx
import orjson
import pytest
import trio

from gatewaytest import provider_toml, start_otlp_receiver
from runestone.http.server import serve_http
from runestone.providers.fake_server import FakeKnobs, make_fake_handler

MODEL = "gpt-4o-mini"
PROMPT = "PRIVATE-PROMPT-TEXT-4242"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # SpanKind in OTLP
ERROR = 2  # Status code


async def _fake(nursery, **knobs):
    """A fake upstream recording the traceparent of each chat request it gets."""
    fake = make_fake_handler(FakeKnobs(**knobs))
    seen: list[str | None] = []

    async def handler(request):
        if request.path == "/v1/chat/completions":
            tp = request.header(b"traceparent")
            seen.append(tp.decode() if tp else None)
        return await fake(request)

    server = await nursery.start(functools.partial(serve_http, handler, "127.0.0.1", 0))
    return server, seen


def _answer_text(text: str, stream: bool) -> str:
    if not stream:
        return orjson.loads(text)["choices"][0]["message"]["content"]
    parts = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def _config(primary: int, secondary: int, endpoint: str | None) -> str:
    text = "[telemetry]\nusage_ledger = false\n"
    if endpoint:
        text += f'[otel]\nendpoint = "{endpoint}"\n'
    text += ('[[failover.groups]]\nname = "chat"\nproviders = ["primary", "secondary"]\nstrategy = "priority"\n'
             "max_attempts = 2\n")
    for name, port in (("primary", primary), ("secondary", secondary)):
        text += provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-upstream-key",
                              models=[MODEL])
    return text


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_that_failed_over_once_is_one_span_with_two_attempt_children(
        gateway_factory, nursery, stream):
    receiver = await start_otlp_receiver(nursery)
    primary, primary_seen = await _fake(nursery, fault_status=500)
    secondary, secondary_seen = await _fake(nursery)
    gw = await gateway_factory(_config(primary.port, secondary.port, receiver.url))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                            json={"model": "chat", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-runestone-provider"] == "secondary"
        request_id = r.headers["x-request-id"]
    tracing = gw.app.observer.tracing
    assert await trio.to_thread.run_sync(tracing.force_flush)
    spans = receiver.spans
    assert len(spans) == 3, [s["name"] for s in spans]
    (request,) = [s for s in spans if s["kind"] == SERVER]
    attempts = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["attributes"]["runestone.attempt"])
    assert len(attempts) == 2

    # The client's trace is honoured: the request span is the child of its span.
    assert request["trace_id"] == TRACE_ID and request["parent_span_id"] == PARENT_ID
    a = request["attributes"]
    assert request["name"] == "chat chat"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "chat"  # the group the client named
    assert a["gen_ai.response.model"] == MODEL
    assert a["gen_ai.system"] == "openai" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["runestone.provider"] == "secondary"
    assert a["runestone.attempts"] == 2 and a["runestone.failovers"] == 1 and a["runestone.retries"] == 0
    assert a["runestone.request_id"] == request_id
    assert a["runestone.stream"] is stream
    assert a["http.response.status_code"] == 200
    assert ("gen_ai.server.time_to_first_token" in a) is stream
    assert request["status"] != ERROR
    (failover,) = [e for e in request["events"] if e["name"] == "failover"]
    assert failover["attributes"]["runestone.failover.from"] == "primary"
    assert failover["attributes"]["runestone.failover.to"] == "secondary"
    assert failover["attributes"]["runestone.failover.group"] == "chat"
    assert request["resource"]["service.name"] == "runestone"

    first, second = attempts
    for span in attempts:
        assert span["trace_id"] == TRACE_ID
        assert span["parent_span_id"] == request["span_id"]
        assert span["name"] == f"chat {MODEL}"
        assert span["attributes"]["gen_ai.operation.name"] == "chat"
        assert span["attributes"]["gen_ai.request.model"] == MODEL
        assert span["attributes"]["gen_ai.system"] == "openai"
        assert request["start"] <= span["start"] <= span["end"] <= request["end"]
    assert first["attributes"]["runestone.provider"] == "primary"
    assert first["attributes"]["error.type"] == "http_500" and first["status"] == ERROR
    assert second["attributes"]["runestone.provider"] == "secondary"
    assert second["attributes"]["gen_ai.response.model"] == MODEL and second["status"] != ERROR
    assert first["end"] <= second["start"]

    # Each upstream got its own attempt's traceparent.
    assert primary_seen == [f"00-{TRACE_ID}-{first['span_id']}-01"]
    assert secondary_seen == [f"00-{TRACE_ID}-{second['span_id']}-01"]

    # No prompt or completion text (the fake echoes the prompt) anywhere in the spans.
    assert PROMPT in _answer_text(r.text, stream)
    assert PROMPT not in orjson.dumps(spans).decode()


async def test_a_request_without_traceparent_starts_a_trace_of_its_own(gateway_factory, nursery):
    receiver = await start_otlp_receiver(nursery)
    primary, _ = await _fake(nursery)
    secondary, _ = await _fake(nursery)
    gw = await gateway_factory(_config(primary.port, secondary.port, receiver.url))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        for header in ({}, {"traceparent": "not a traceparent"}):
            r = await http.post("/chat/completions", headers=header,
                                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    assert await trio.to_thread.run_sync(gw.app.observer.tracing.force_flush)
    requests = [s for s in receiver.spans if s["kind"] == SERVER]
    assert len(requests) == 2
    assert all(s["parent_span_id"] == "" for s in requests)
    assert len({s["trace_id"] for s in requests}) == 2
    attempts = [s for s in receiver.spans if s["kind"] == CLIENT]
    assert sorted(s["parent_span_id"] for s in attempts) == sorted(s["span_id"] for s in requests)
    assert all(s["attributes"]["gen_ai.request.model"] == MODEL for s in requests)


async def test_without_an_endpoint_nothing_is_traced(gateway_factory, nursery):
    primary, primary_seen = await _fake(nursery)
    secondary, _ = await _fake(nursery)
    gw = await gateway_factory(_config(primary.port, secondary.port, None))
    assert gw.app.observer is None and gw.app.telemetry.tap is None
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    assert primary_seen == [None]


async def test_the_environment_variable_turns_tracing_on(gateway_factory, nursery):
    receiver = await start_otlp_receiver(nursery)
    primary, primary_seen = await _fake(nursery)
    secondary, _ = await _fake(nursery)
    gw = await gateway_factory(_config(primary.port, secondary.port, None),
                               env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
    assert await trio.to_thread.run_sync(gw.app.observer.tracing.force_flush)
    assert {s["kind"] for s in receiver.spans} == {SERVER, CLIENT}
    assert primary_seen[0] is not None and primary_seen[0].startswith("00-")


# -- finish reasons on every path ----------------------------------------------------------------------------

BEDROCK_MODEL = "anthropic.claude-haiku-4-5-20251001-v1:0"
#: provider type -> (the model it serves here, the TOML of its provider given the fake upstream's base URL)
UPSTREAMS = {
    "openai": ("gpt-4o-mini", lambda base: provider_toml("p-openai", "openai", base_url=base + "/v1", api_key="sk-up",
                                                         models=["gpt-4o-mini"])),
    "anthropic": ("claude-haiku-4-5", lambda base: provider_toml("p-anthropic", "anthropic", base_url=base,
                                                                 api_key="sk-ant-up", models=["claude-haiku-4-5"])),
    "gemini": ("gemini-2.5-flash", lambda base: provider_toml("p-gemini", "gemini", base_url=base + "/v1beta",
                                                              api_key="AIzaSyFAKE-gemini-key-0123456789abcdef",
                                                              models=["gemini-2.5-flash"])),
    "bedrock": (BEDROCK_MODEL, lambda base: provider_toml(
        "p-bedrock", "bedrock", base_url=base, region="us-east-1", models=[BEDROCK_MODEL],
        aws_access_key_id=FakeKnobs().aws_access_key_id, aws_secret_access_key=FakeKnobs().aws_secret_access_key)),
    "azure": ("azure-4o", lambda base: provider_toml("p-azure", "azure", base_url=base, api_key="azure-key-0123",
                                                     models=["azure-4o"])),
    "fake": ("fake-model", lambda base: provider_toml("p-fake", "fake", models=["fake-model"])),
}


@pytest.fixture
async def every_upstream(gateway_factory, nursery):
    receiver = await start_otlp_receiver(nursery)
    models = tuple(m for m, _ in UPSTREAMS.values())
    fake = make_fake_handler(FakeKnobs(models=models, azure_deployments={"azure-4o": "gpt-4o-mini"}))
    server = await nursery.start(functools.partial(serve_http, fake, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{server.port}"
    text = f'[telemetry]\nusage_ledger = false\n[otel]\nendpoint = "{receiver.url}"\n'
    gw = await gateway_factory(text + "".join(toml(base) for _, toml in UPSTREAMS.values()))
    return gw, receiver


async def _request_span(gw, receiver, request_id: str) -> dict:
    assert await trio.to_thread.run_sync(gw.app.observer.tracing.force_flush)
    [span] = [s for s in receiver.spans if s["kind"] == SERVER and s["attributes"]["runestone.request_id"] == request_id]
    return span


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("upstream", list(UPSTREAMS))
async def test_finish_reasons_are_on_the_span_for_every_upstream(every_upstream, upstream, stream):
    gw, receiver = every_upstream
    model = UPSTREAMS[upstream][0]
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post("/chat/completions", json={"model": model, "stream": stream, "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "tell me a story"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-runestone-provider"] == f"p-{upstream}"
    span = await _request_span(gw, receiver, r.headers["x-request-id"])
    assert span["attributes"]["gen_ai.response.finish_reasons"] == ["length"]


FRONT_DOORS = {
    "chat": ("/chat/completions", lambda model, stream: {"model": model, "stream": stream, "max_tokens": 3,
                                                         "messages": [{"role": "user", "content": "tell me a story"}]}),
    "messages": ("/messages", lambda model, stream: {"model": model, "stream": stream, "max_tokens": 3,
                                                     "messages": [{"role": "user", "content": "tell me a story"}]}),
    "responses": ("/responses", lambda model, stream: {"model": model, "stream": stream, "max_output_tokens": 3,
                                                       "input": "tell me a story"}),
    "completions": ("/completions", lambda model, stream: {"model": model, "stream": stream, "max_tokens": 3,
                                                           "prompt": "tell me a story"}),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("door", list(FRONT_DOORS))
@pytest.mark.parametrize("upstream", ["anthropic", "gemini"])
async def test_finish_reasons_are_on_the_span_for_every_front_door(every_upstream, door, upstream, stream):
    gw, receiver = every_upstream
    path, body = FRONT_DOORS[door]
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        r = await http.post(path, json=body(UPSTREAMS[upstream][0], stream))
        assert r.status_code == 200, r.text
    span = await _request_span(gw, receiver, r.headers["x-request-id"])
    assert span["attributes"]["gen_ai.response.finish_reasons"] == ["length"]


async def test_a_cached_answer_has_the_finish_reasons_it_was_stored_with(gateway_factory, nursery):
    receiver = await start_otlp_receiver(nursery)
    fake = make_fake_handler(FakeKnobs())
    server = await nursery.start(functools.partial(serve_http, fake, "127.0.0.1", 0))
    gw = await gateway_factory(f'[telemetry]\nusage_ledger = false\n[cache]\nenabled = true\n'
                               f'[otel]\nendpoint = "{receiver.url}"\n'
                               + provider_toml("p", "openai", base_url=f"http://127.0.0.1:{server.port}/v1",
                                               api_key="sk-up", models=[MODEL]))
    ask = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "tell me a story"}]}
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        first = await http.post("/chat/completions", json=ask)
        second = await http.post("/chat/completions", json=ask)
    assert (first.headers["x-runestone-cache"], second.headers["x-runestone-cache"]) == ("miss", "hit")
    for r in (first, second):
        span = await _request_span(gw, receiver, r.headers["x-request-id"])
        assert span["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
