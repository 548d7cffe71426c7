"""A/B splits and weighted pools through the whole gateway, observed over HTTP.

The arms and members are built-in ``fake`` providers with different ``text``, so the answer itself says
which arm served it; ``x-runestone-variant`` and ``x-runestone-provider`` say what the gateway chose and
``/v1/splits/{name}`` must account for exactly the requests made.
"""

from __future__ import annotations

import collections
import random

import httpx
import orjson
import pytest

from gatewaytest import provider_toml

ASK = [{"role": "user", "content": "hello"}]

_SPLIT = """
[retry]
max_attempts = 1
[telemetry]
usage_ledger = false
[pricing."m-control"]
input_per_mtok = 1.0
output_per_mtok = 2.0
[pricing."m-candidate"]
input_per_mtok = 10.0
output_per_mtok = 30.0
[[splits]]
name = "exp-1"
variants = [{name = "control", model = "m-control", weight = 0.75}, {name = "candidate", model = "m-candidate", weight = 0.25}]
"""


def _arms(**candidate) -> str:
    return (_SPLIT + provider_toml("p-control", "fake", models=["m-control"], text="control says hi")
            + provider_toml("p-candidate", "fake", models=["m-candidate"], text="candidate says hi", **candidate))


def _seed(gw, seed: int = 7) -> None:
    # The arm drawn for each request is random; a seeded draw keeps the test's counts reproducible.
    rng = random.Random(seed)
    for named in (*gw.app.splits.splits.values(), *gw.app.splits.pools.values()):
        named.rng = rng


async def _ask(http: httpx.AsyncClient, model: str, **extra) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": model, "messages": ASK, **extra})


async def test_split_assigns_arms_by_ratio_and_its_metrics_match_the_requests(gateway_factory):
    gw = await gateway_factory(_arms())
    _seed(gw)
    seen = collections.Counter()
    tokens = collections.defaultdict(lambda: [0, 0])
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for i in range(200):
            r = await _ask(http, "exp-1")
            assert r.status_code == 200, r.text
            arm = r.headers["x-runestone-variant"].removeprefix("exp-1/")
            assert r.headers["x-runestone-provider"] == f"p-{arm}"
            body = r.json()
            assert body["choices"][0]["message"]["content"].startswith(f"{arm} says hi")
            seen[arm] += 1
            tokens[arm][0] += body["usage"]["prompt_tokens"]
            tokens[arm][1] += body["usage"]["completion_tokens"]
        # A stream is assigned, labelled and counted the same way, with its time to first byte.
        async with http.stream("POST", "/v1/chat/completions",
                               json={"model": "exp-1", "messages": ASK, "stream": True,
                                     "stream_options": {"include_usage": True}}) as r:
            arm = r.headers["x-runestone-variant"].removeprefix("exp-1/")
            usage = None
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = orjson.loads(line[6:]).get("usage") or usage
        seen[arm] += 1
        tokens[arm][0] += usage["prompt_tokens"]
        tokens[arm][1] += usage["completion_tokens"]
        assert 130 <= seen["control"] <= 170 and seen["control"] + seen["candidate"] == 201, seen

        r = await http.get("/v1/splits/exp-1")
        assert r.status_code == 200
        split = r.json()
        listed = (await http.get("/v1/splits")).json()
    assert listed["object"] == "list" and listed["data"] == [split]
    assert split["id"] == "exp-1" and split["requests"] == 201
    prices = {"control": (1.0, 2.0), "candidate": (10.0, 30.0)}
    for variant in split["variants"]:
        name, m = variant["name"], variant["metrics"]
        assert variant["model"] == f"m-{name}"
        assert variant["ratio"] == pytest.approx(0.75 if name == "control" else 0.25)
        assert variant["observed_share"] == pytest.approx(seen[name] / 201)
        assert (m["requests"], m["ok"], m["errors"], m["cancelled"], m["error_rate"]) == (seen[name], seen[name],
                                                                                           0, 0, 0.0)
        assert (m["tokens_in"], m["tokens_out"]) == tuple(tokens[name])
        per_in, per_out = prices[name]
        assert m["cost"] == pytest.approx((tokens[name][0] * per_in + tokens[name][1] * per_out) / 1e6)
        assert m["latency_samples"] == seen[name]
        assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"] and m["latency_mean_ms"] > 0
    streamed = next(v for v in split["variants"] if v["name"] == arm)
    assert streamed["metrics"]["ttft_mean_ms"] is not None


async def test_one_failing_arm_shows_its_errors_and_the_other_arm_none(gateway_factory):
    gw = await gateway_factory(_arms(fail_rate=1.0, fail_status=500)
                               + "[circuit_breaker]\nenabled = false\n")
    _seed(gw, 3)
    outcomes = collections.Counter()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for i in range(80):
            r = await _ask(http, "exp-1", stream=i % 5 == 0)
            # An error says which arm failed, too.
            outcomes[(r.status_code, r.headers["x-runestone-variant"])] += 1
            if r.status_code != 200:
                assert r.json()["error"]["message"]
        # Pinning the failing arm by name fails every time and is counted in that arm.
        for _ in range(5):
            r = await _ask(http, "exp-1/candidate")
            assert r.status_code == 502, r.text
        split = (await http.get("/v1/splits/exp-1")).json()
    ok = outcomes[(200, "exp-1/control")]
    failed = outcomes[(502, "exp-1/candidate")]
    assert ok + failed == 80 and set(outcomes) == {(200, "exp-1/control"), (502, "exp-1/candidate")}
    assert 8 <= failed <= 32, outcomes
    metrics = {v["name"]: v["metrics"] for v in split["variants"]}
    assert (metrics["control"]["requests"], metrics["control"]["errors"]) == (ok, 0)
    candidate = metrics["candidate"]
    assert (candidate["requests"], candidate["errors"], candidate["ok"]) == (failed + 5, failed + 5, 0)
    assert candidate["error_rate"] == 1.0 and candidate["latency_p50_ms"] is None


async def test_a_user_stays_in_one_arm(gateway_factory):
    gw = await gateway_factory(_arms())
    async with httpx.AsyncClient(base_url=gw.url) as http:
        arms = {}
        for user in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"):
            got = {(await _ask(http, "exp-1", user=user, stream=s)).headers["x-runestone-variant"]
                   for s in (False, True, False, False)}
            assert len(got) == 1, (user, got)
            arms[user] = got.pop()
        # The same users, the same arms, on a second gateway (another process would agree too: no salted hash).
        other = await gateway_factory(_arms())
        async with httpx.AsyncClient(base_url=other.url) as http2:
            for user, arm in arms.items():
                assert (await _ask(http2, "exp-1", user=user)).headers["x-runestone-variant"] == arm


async def test_pool_sends_three_quarters_to_the_heavier_member_and_fails_over(gateway_factory):
    pools = ('[[pools]]\nname = "pool-a"\nproviders = ["p1", "p2"]\nweights = [3, 1]\n'
             '[[pools]]\nname = "pool-b"\nproviders = ["p3", "p2"]\nweights = [3, 1]\n'
             '[[splits]]\nname = "exp-pool"\nvariants = [{name = "pooled", model = "pool-a"}]\n')
    gw = await gateway_factory(
        "[retry]\nmax_attempts = 1\n[telemetry]\nusage_ledger = false\n" + pools
        + provider_toml("p1", "fake", models=["m1"]) + provider_toml("p2", "fake", models=["m2"])
        + provider_toml("p3", "fake", models=["m3"], fail_rate=1.0, fail_status=503))
    _seed(gw, 11)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        who = collections.Counter()
        for i in range(200):
            r = await _ask(http, "pool-a", stream=i % 4 == 0)
            assert r.status_code == 200, r.text
            route = r.headers["x-runestone-route"]
            who[r.headers["x-runestone-provider"]] += 1
            # the decision: the pool, then its members in the order they would be tried, the chosen one first
            assert route.startswith("pool=pool-a; candidates=" + r.headers["x-runestone-provider"] + ","), route
        assert 135 <= who["p1"] <= 165 and who["p1"] + who["p2"] == 200, who
        # Each member is sent its own default model.
        assert (await _ask(http, "pool-a")).json()["model"] in ("m1", "m2")
        # The heavier member always fails: every request still gets an answer, from the other one.
        answered = {(await _ask(http, "pool-b")).headers["x-runestone-provider"] for _ in range(30)}
        assert answered == {"p2"}
        # A split's variant may be a pool.
        r = await _ask(http, "exp-pool")
        assert r.headers["x-runestone-variant"] == "exp-pool/pooled"
        assert r.headers["x-runestone-provider"] in ("p1", "p2")
        pools = (await http.get("/v1/pools")).json()["data"]
    assert pools[0] == {"id": "pool-a", "object": "pool", "max_attempts": 2,
                        "providers": [{"name": "p1", "weight": 3.0, "share": 0.75},
                                      {"name": "p2", "weight": 1.0, "share": 0.25}]}


async def test_models_listing_routes_and_access(gateway_factory):
    gw = await gateway_factory(
        '[auth]\napi_keys = ["sk-client"]\nadmin_key = "sk-admin"\n'
        + '[[pools]]\nname = "pool-a"\nproviders = ["p-control"]\n' + _arms())
    client = {"authorization": "Bearer sk-client"}
    admin = {"authorization": "Bearer sk-admin"}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        models = {m["id"]: m["owned_by"] for m in (await http.get("/v1/models", headers=client)).json()["data"]}
        assert models["exp-1"] == "runestone:split" and models["pool-a"] == "runestone:pool"
        assert (await http.get("/v1/models/exp-1", headers=client)).json()["owned_by"] == "runestone:split"
        assert (await http.get("/v1/splits")).status_code == 401
        r = await http.get("/v1/splits/nope", headers=client)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "split_not_found" and "exp-1" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", headers=client, json={"model": "exp-1/treatment", "messages": ASK})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        for _ in range(3):
            r = await http.post("/v1/chat/completions", headers=client, json={"model": "exp-1/control", "messages": ASK})
            assert r.headers["x-runestone-variant"] == "exp-1/control"
        split = (await http.get("/v1/splits/exp-1", headers=client)).json()
        assert [v["metrics"]["requests"] for v in split["variants"]] == [3, 0]
        # Zeroing the metrics to start a new measurement is the admin's.
        assert (await http.post("/v1/splits/exp-1/reset", headers=client)).status_code == 401
        assert (await http.post("/v1/splits/exp-1/oops", headers=admin)).status_code == 404
        r = await http.post("/v1/splits/exp-1/reset", headers=admin)
        assert r.status_code == 200 and r.json()["requests"] == 0
        assert (await http.get("/v1/splits/exp-1", headers=client)).json()["requests"] == 0


async def test_plan_honours_a_forced_variant_and_refuses_an_unknown_one(gateway_factory):
    import attrs

    from runestone.routing.executor import GatewayError
    from runestone.routing.policies import Requirements

    @attrs.frozen
    class Forcing(Requirements):
        # The shape of a routing object carrying runestone.variant.
        variant: str | None = None

    gw = await gateway_factory(_arms())
    gateway = gw.app.gateway
    for user in ("alice", "bob", "carol", None):
        plan = gateway.plan("exp-1", {"user": user}, Forcing(variant="candidate"))
        assert plan.variant.label == "exp-1/candidate" and [t.provider for t in plan.targets] == ["p-candidate"]
        assert plan.reason.startswith("split=exp-1/candidate ")
    with pytest.raises(GatewayError) as info:
        gateway.plan("exp-1", {}, Forcing(variant="treatment"))
    assert (info.value.status, info.value.param, info.value.code) == (400, "runestone.variant", "variant_not_found")
    assert "'control', 'candidate'" in info.value.message
    # Without a forced variant the ordinary requirements object works as before.
    assert gateway.plan("exp-1/control", {}).variant.name == "control"


async def test_a_client_forces_an_arm_with_runestone_variant(gateway_factory):
    gw = await gateway_factory(_arms())
    async with httpx.AsyncClient(base_url=gw.url) as http:
        for _ in range(5):
            r = await _ask(http, "exp-1", runestone={"variant": "candidate"})
            assert r.status_code == 200 and r.headers["x-runestone-variant"] == "exp-1/candidate"
            assert r.json()["choices"][0]["message"]["content"] == "candidate says hi"
        bad = await _ask(http, "exp-1", runestone={"variant": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "runestone.variant"
        wrong_type = await _ask(http, "exp-1", runestone={"variant": 3})
        assert wrong_type.status_code == 400 and "runestone.variant" in wrong_type.json()["error"]["message"]
