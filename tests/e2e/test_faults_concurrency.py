"""200 simultaneous streams through a failover group whose primary fails half of its requests.

Every request must be answered exactly once: a complete stream of its own answer (its own prompt echoed,
one completion id, one finish, one ``[DONE]``), none lost, none duplicated or spliced — and upstream, the
streams served add up to exactly the requests made.
"""

from __future__ import annotations

import collections

import httpx
import openai
import trio

from gatewaytest import provider_toml

N = 200


async def test_200_simultaneous_streams_through_a_flaky_primary(gateway_factory, fake_factory):
    flaky, _ = await fake_factory(fault_status=500, fault_probability=0.5, seed=7)
    steady, _ = await fake_factory()

    def up(name, port, priority, **config):
        return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                             models=["gpt-4o-mini"], priority=priority, **config)

    # No breaker and no health demotion: every request meets the flaky primary first, so about half of
    # them fail over while the others are being served.
    gw = await gateway_factory(
        '[[failover.groups]]\nname = "chat"\nproviders = ["primary", "secondary"]\nstrategy = "priority"\n'
        "health_threshold = 0.0\n"
        + up("primary", flaky.port, 1, circuit_breaker=False) + up("secondary", steady.port, 2)
    )
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
    answers: dict[int, dict] = {}

    async def one(i: int) -> None:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"request {i} please"}])
        ids, text, finishes, usage = set(), "", [], None
        async for chunk in raw.parse():
            ids.add(chunk.id)
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        assert i not in answers
        answers[i] = {"provider": raw.headers["x-runestone-provider"], "ids": ids, "text": text,
                      "finishes": finishes, "usage": usage}

    with trio.fail_after(300):  # only a hang trips this (26 s on a busy 2-core machine)
        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(one, i)

    assert sorted(answers) == list(range(N))
    for i, a in answers.items():
        assert a["text"].startswith(f"Echo: request {i} please"), a
        assert a["finishes"] == ["stop"]
        assert len(a["ids"]) == 1
        assert a["usage"] is not None and a["usage"].completion_tokens > 0
    # Ids are unique per upstream; with the provider they name one answer each.
    served = [(a["provider"], next(iter(a["ids"]))) for a in answers.values()]
    assert len(set(served)) == N
    by_provider = collections.Counter(p for p, _ in served)
    assert 60 <= by_provider["primary"] <= 140, by_provider

    async with httpx.AsyncClient() as http:
        stats = {name: (await http.get(f"http://127.0.0.1:{port}/_fake/stats")).json()
                 for name, port in (("primary", flaky.port), ("secondary", steady.port))}
    for name, s in stats.items():
        assert s["streams"] == {"started": by_provider[name], "finished": by_provider[name], "cancelled": 0}
    primary_posts = stats["primary"]["requests"]["POST /v1/chat/completions"]
    assert primary_posts == by_provider["primary"] + stats["primary"]["faults"].get("500", 0)
    assert stats["primary"]["faults"]["500"] == by_provider["secondary"]
    # Each failed primary attempt moved its request to the secondary, once.
    assert stats["secondary"]["requests"]["POST /v1/chat/completions"] == by_provider["secondary"]
    assert gw.app.inflight.requests == {}
