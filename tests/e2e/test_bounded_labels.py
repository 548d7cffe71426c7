"""Model names a client makes up never become metric series: ``/metrics`` stays the same size.

A ``provider:model`` pin sends any model name to a registered provider, so a client can name 3,000 models
that exist nowhere. Every such name is counted under ``model="other"``: after a first batch has created the
``other`` series, 3,000 more names (answered, streamed and failed) add no series and barely a byte.
"""

from __future__ import annotations

from runestone.telemetry.messages import Summary
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from gatewaytest import provider_toml

NAMES = 3000
REGISTERED = {"fake-model", "bad-model"}


def _toml() -> str:
    return ("[retry]\nmax_attempts = 1\n"
            + provider_toml("fake", "fake", models=["fake-model"], chunks=2)
            + provider_toml("bad", "fake", models=["bad-model"], fail_rate=1.0, circuit_breaker=False))


async def _ask(http: httpx.AsyncClient, model: str, stream: bool) -> int:
    r = await http.post("/v1/chat/completions", json={"model": model, "stream": stream,
                                                      "messages": [{"role": "user", "content": "x"}]})
    return r.status_code


async def _run(http: httpx.AsyncClient, names: range) -> dict[int, int]:
    codes: dict[int, int] = {}

    async def worker(part: range) -> None:
        for i in part:
            code = await _ask(http, f"{'bad' if i % 3 == 2 else 'fake'}:m-{i}", stream=i % 3 == 1)
            codes[code] = codes.get(code, 0) + 1

    async with trio.open_nursery() as nursery:
        for w in range(4):
            nursery.start_soon(worker, names[w::4])
    return codes


async def _metrics(gw, http: httpx.AsyncClient) -> str:
    await gw.app.registry.whereis("telemetry_handler").call(Summary())  # after every cast so far
    r = await http.get("/metrics")
    assert r.status_code == 200
    return r.text


def _label_values(text: str, label: str) -> set[str]:
    return {s.labels[label] for f in text_string_to_metric_families(text) for s in f.samples if label in s.labels}


def _requests(text: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "runestone_requests_total" and labels.items() <= s.labels.items())


async def test_client_chosen_model_names_are_counted_under_other(gateway_factory):
    gw = await gateway_factory(_toml())
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        for model, stream in (("fake-model", False), ("fake-model", True), ("bad-model", False)):
            await _ask(http, model, stream)
        first = await _run(http, range(300))
        before = await _metrics(gw, http)
        codes = await _run(http, range(300, 300 + NAMES))
        after = await _metrics(gw, http)

    assert codes == {200: 2000, 502: 1000} and first == {200: 200, 502: 100}
    assert _label_values(after, "model") == REGISTERED | {"other"}
    assert _label_values(after, "provider") == {"fake", "bad", ""}
    # Every made-up name was counted, under "other": the answered ones with their provider, the failed ones
    # (no provider answered) with provider "".
    assert _requests(after, model="other") == 300 + NAMES
    assert _requests(after, provider="fake", model="other", status="ok") == 200 + 2000
    assert _requests(after, provider="", model="other", status="error") == 100 + 1000
    # Only counts changed: a few digits longer at most.
    assert len(after) - len(before) < 512, (len(before), len(after))
