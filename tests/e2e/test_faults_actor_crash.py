"""A crash injected into each actor of the tree while traffic runs: its supervisor restarts it, requests keep
being served (none lost, none answered twice), and the state dump and /metrics show the restart."""

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gatewaytest import provider_toml

ACTORS = [
    # (registry name of the actor, child id its supervisor knows it by)
    ("telemetry_handler", "telemetry_handler"),
    ("circuit_breaker_manager", "circuit_breaker_manager"),
    ("failover_manager", "failover_manager"),
    ("provider_pool", "provider_pool"),
    ("provider:fake", "fake"),
]


def _inject_crash(app, name: str) -> None:
    """Make the running incarnation's next cast raise, then cast to it: the actor crashes in its handler."""
    ref = app.registry.whereis(name)
    assert ref is not None, name

    async def boom(message):
        raise RuntimeError(f"injected crash in {name}")

    ref.actor.handle_cast = boom  # this incarnation only: restarts build a fresh actor
    ref.cast(("injected",))


def _find(node: dict, child_id: str):
    if node.get("id") == child_id or node.get("name") == child_id:
        return node
    for c in node.get("children") or ():
        hit = _find(c, child_id)
        if hit is not None:
            return hit
    return None


@pytest.mark.parametrize("name,child_id", ACTORS)
async def test_crash_while_serving(gateway_factory, name, child_id):
    gw = await gateway_factory(provider_toml("fake", "fake", models=["fake-model"]))
    app = gw.app
    statuses: list[int] = []
    ids: list[str] = []
    crashed = trio.Event()

    async def client(http, worker: int):
        for i in range(60):
            body = {"model": "fake-model", "stream": i % 3 == 0,
                    "messages": [{"role": "user", "content": f"worker {worker} request {i}"}]}
            r = await http.post("/v1/chat/completions", json=body)
            statuses.append(r.status_code)
            ids.append(r.headers["x-request-id"])
            if r.status_code == 200 and body["stream"]:
                assert r.text.rstrip().endswith("data: [DONE]")
            if worker == 0 and i == 20:
                _inject_crash(app, name)
                crashed.set()

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        async with trio.open_nursery() as n:
            for w in range(4):
                n.start_soon(client, http, w)
        assert crashed.is_set()
        with trio.fail_after(60):  # the restart is quick; only a hang trips this
            while not app.restarts.get(child_id):
                await trio.sleep(0.01)
        assert app.restarts.get(child_id) == 1
        assert app.registry.whereis(name) is not None and app.registry.whereis(name).alive
        assert statuses == [200] * 240, [s for s in statuses if s != 200]
        assert len(set(ids)) == 240  # every request answered once
        dump = app.dump_state()
        node = _find(dump["tree"], child_id)
        assert node is not None and node["restarts"] == 1
        assert node["last_error"] is None or "injected crash" in node["last_error"]["message"]
        text = (await http.get("/metrics")).text
        restarts = {s.labels["actor"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "runestone_actor_restarts_total"}
        assert restarts.get(child_id) == 1
        # Still serving after the restart.
        r = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": [
            {"role": "user", "content": "after"}]})
        assert r.status_code == 200
