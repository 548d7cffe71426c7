"""The circuit breaker observed through the gateway: what the upstreams receive and who answers.

Two ``openai`` providers serve one model, ``primary`` preferred; the fake upstream behind ``primary``
answers 500. Consecutive failures open its breaker, requests then skip it, after ``recovery_timeout``
one half-open probe goes through (``half_open_limit`` of them at once), and ``success_threshold``
successful probes close it again. Time is a MockClock: recovery is a clock jump, not a wait.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from gatewaytest import fake_requests, provider_toml

MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
RECOVERY = 5.0


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


def _config(primary_port: int, backup_port: int) -> str:
    return (
        # The default health threshold stays on: a provider whose breaker is recovering must still get
        # its probes although its health score is low.
        "[telemetry]\nusage_ledger = false\n"
        f"[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout_ms = {int(RECOVERY * 1000)}\n"
        "half_open_limit = 1\nsuccess_threshold = 2\n"
        + provider_toml("primary", "openai", base_url=f"http://127.0.0.1:{primary_port}/v1", api_key="k",
                        models=[MODEL], priority=1)
        + provider_toml("backup", "openai", base_url=f"http://127.0.0.1:{backup_port}/v1", api_key="k",
                        models=[MODEL], priority=2)
    )


async def _state(app, provider: str, want: str) -> None:
    """Wait (bounded, without moving the clock) for the breaker manager to publish ``want``."""
    for _ in range(100):
        view = (app.breaker_views.value or {}).get(provider)
        if view is not None and view.state == want:
            return
        await trio.testing.wait_all_tasks_blocked(0.001)
    raise AssertionError(f"breaker of {provider} is {view and view.state}, expected {want}")


async def test_breaker_opens_skips_probes_and_closes(clock, gateway_factory, fake_factory):
    primary, knobs = await fake_factory(fault_status=500)
    backup, _ = await fake_factory()
    gw = await gateway_factory(_config(primary.port, backup.port))
    app = gw.app
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        async def ask(stream: bool = False) -> str:
            r = await http.post("/chat/completions", json={**BODY, "stream": stream})
            assert r.status_code == 200, r.text
            return r.headers["x-runestone-provider"]

        # Closed: every request tries primary first, fails over to backup.
        for n in (1, 2, 3):
            assert await ask() == "backup"
            assert await fake_requests(primary.port) == n
            if n < 3:
                await _state(app, "primary", "closed")
        await _state(app, "primary", "open")

        # Open: primary is skipped, streamed or not, and pinning it is refused at once.
        assert await ask() == "backup"
        assert await ask(stream=True) == "backup"
        assert await fake_requests(primary.port) == 3
        r = await http.post("/chat/completions", json={**BODY, "model": f"primary:{MODEL}"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_provider_available"
        assert "circuit open" in r.json()["error"]["message"]
        assert await fake_requests(primary.port) == 3

        # Still open just before the recovery timeout ...
        clock.jump(RECOVERY - 1.5)
        assert await ask() == "backup"
        assert await fake_requests(primary.port) == 3
        # ... then one probe; it fails and the breaker opens again for another period.
        clock.jump(2.0)
        assert await ask() == "backup"
        assert await fake_requests(primary.port) == 4
        await _state(app, "primary", "open")
        assert await ask() == "backup"
        assert await fake_requests(primary.port) == 4

        # The upstream recovers: the next probe succeeds, but one success is not enough to close.
        knobs.fault_status = 0
        clock.jump(RECOVERY + 0.5)
        assert await ask() == "primary"
        assert await fake_requests(primary.port) == 5
        await _state(app, "primary", "half_open")

        # Half-open lets one probe through at a time: a slow probe in flight sends the next request on.
        knobs.ttfb_ms = 2000
        providers = []
        async with trio.open_nursery() as nursery:
            async def probe():
                providers.append(await ask())
            nursery.start_soon(probe)
            for _ in range(100):
                if await fake_requests(primary.port) == 6:
                    break
                await trio.testing.wait_all_tasks_blocked(0.001)
            providers.append(await ask())
        assert providers == ["backup", "primary"]
        assert await fake_requests(primary.port) == 6

        # Two successful probes: closed, primary is first again without any wait.
        await _state(app, "primary", "closed")
        knobs.ttfb_ms = 0
        assert await ask() == "primary"
        assert await ask(stream=True) == "primary"


async def test_breaker_counts_faults_of_every_kind_and_not_client_errors(clock, gateway_factory, fake_factory):
    primary, knobs = await fake_factory()
    backup, _ = await fake_factory()
    gw = await gateway_factory(_config(primary.port, backup.port))
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        # A model the upstream does not know is the client's fault: not counted, not failed over.
        for _ in range(4):
            r = await http.post("/chat/completions", json={**BODY, "model": "primary:unknown-x"})
            assert r.status_code == 404
            assert r.headers["x-runestone-provider"] == "primary"
        await _state(gw.app, "primary", "closed")
        # A dropped connection, a 503 and a malformed stream all count: three in a row open it.
        knobs.drop_before_response = True
        assert (await http.post("/chat/completions", json=BODY)).headers["x-runestone-provider"] == "backup"
        knobs.drop_before_response = False
        knobs.fault_status = 503
        assert (await http.post("/chat/completions", json=BODY)).headers["x-runestone-provider"] == "backup"
        await _state(gw.app, "primary", "closed")
        knobs.fault_status = 0
        knobs.malformed_sse = True
        knobs.chunk_delay_ms = 10  # so that the broken event comes after the stream was committed
        r = await http.post("/chat/completions", json={**BODY, "model": f"primary:{MODEL}", "stream": True})
        assert r.status_code == 200 and '"error"' in r.text and "[DONE]" not in r.text
        await _state(gw.app, "primary", "open")
        knobs.malformed_sse = False
        seen = await fake_requests(primary.port)
        assert (await http.post("/chat/completions", json=BODY)).headers["x-runestone-provider"] == "backup"
        assert await fake_requests(primary.port) == seen
