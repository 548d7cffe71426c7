"""Poisoned upstream values never become outages, and the ledger loses no row.

An OpenAI-compatible upstream on loopback answers 200 with one out-of-range value per answer: token counts of
``2**64``, ``1e300``, negative, ``true`` or text, an id or a model name of 100,000 characters, a usage object with
a ``NaN`` cost. Each is an upstream protocol error for its attempt (failed over when the client asked for a model,
an error when the client pinned the provider), logged once, never a crash: no actor restarts, the gateway keeps
serving, and the usage ledger holds one row per client request.

A crash injected into the live telemetry handler, while its exit flush fails too, loses no row either: the ledger's
buffer outlives the handler, and rows reach it without the handler's mailbox.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import uuid

import httpx
import trio

from gatewaytest import fail_next_ledger_write, provider_toml
from runestone.http.server import Response, serve_http

MODEL = "gpt-4o-mini"
KEYS = '[auth]\napi_keys = ["client-key"]\nadmin_key = "admin-key"\n'
CLIENT = {"authorization": "Bearer client-key"}
ADMIN = {"authorization": "Bearer admin-key"}
BIG = "x" * 100_000

# What each poisoned answer changes in an otherwise well-formed chat completion.
POISONS = [
    {"usage": {"prompt_tokens": 2**64, "completion_tokens": 1}},
    {"usage": {"prompt_tokens": 1e300, "completion_tokens": 1}},
    {"usage": {"prompt_tokens": 5, "completion_tokens": -3}},
    {"usage": {"prompt_tokens": True, "completion_tokens": 1}},
    {"usage": {"prompt_tokens": "12", "completion_tokens": 1}},
    {"usage": {"prompt_tokens": 3, "completion_tokens": 2**63}},
    {"id": "chatcmpl-" + BIG},
    {"model": "m" + BIG},
    {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost": float("nan")}},
]


class PoisonedUpstream:
    """Answers every chat request with the next poison of :data:`POISONS`, streamed or not."""

    def __init__(self) -> None:
        self.served = 0

    async def __call__(self, request) -> Response:
        body = json.loads(await request.body())
        poison = POISONS[self.served % len(POISONS)]
        self.served += 1
        head = {"id": "chatcmpl-poison", "created": 1, "model": body["model"], **{k: v for k, v in poison.items()
                                                                               if k != "usage"}}
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, **poison.get("usage", {})}
        if not body.get("stream"):
            answer = {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "poison"}}]}
            return Response(200, [(b"content-type", b"application/json")], json.dumps(answer).encode())
        chunks = [
            {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": "poison"}, "finish_reason": None}]},
            {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage},
        ]

        async def events():
            for c in chunks:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return Response(200, [(b"content-type", b"text/event-stream")], stream=events())


def _openai(name: str, port: int, **config) -> str:
    return provider_toml(name, "openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", models=[MODEL],
                         **config)


def _ledger_ids(gw) -> list[str]:
    path = gw.app.data_dir / "usage.sqlite3"
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute("SELECT request_id FROM usage")]


async def test_twelve_poisoned_answers_take_nothing_down_and_lose_no_row(gateway_factory, fake_factory, nursery,
                                                                        caplog):
    poisoned = PoisonedUpstream()
    server = await nursery.start(functools.partial(serve_http, poisoned, "127.0.0.1", 0))
    good, _ = await fake_factory()
    gw = await gateway_factory(
        KEYS
        + "[retry]\nbase_delay_ms = 0\nmax_delay_ms = 0\n"
        + "[failover]\nhealth_threshold = 0.0\n"  # no health demotion: every plain request meets the poison first
        + f'[pricing."{MODEL}"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n'
        + _openai("poison", server.port, priority=1, circuit_breaker=False)
        + _openai("good", good.port, priority=2)
    )
    caplog.set_level(logging.WARNING, logger="runestone.providers")
    sent: list[str] = []
    answers: dict[str, tuple[int, str]] = {}

    async def one(http, model: str, stream: bool) -> None:
        rid = "poison-" + uuid.uuid4().hex
        sent.append(rid)
        r = await http.post("/v1/chat/completions", headers={**CLIENT, "x-request-id": rid},
                            json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        answers[rid] = (r.status_code, r.text)

    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        # Twelve at once pinned to the poisoned provider, twelve at once asking for the model.
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for i in range(12):
                    n.start_soon(one, http, f"poison:{MODEL}", i % 2 == 1)
            async with trio.open_nursery() as n:
                for i in range(12):
                    n.start_soon(one, http, MODEL, False)
        assert poisoned.served >= 24

        pinned = [answers[rid] for rid in sent[:12]]
        for status, text in pinned:
            if status == 200:  # a stream whose poison came after its first bytes: an honest error event
                assert '"error"' in text and "[DONE]" not in text, text[-300:]
            else:
                assert status == 502, text[:300]
                assert json.loads(text)["error"]["type"] == "api_error"
        plain = [answers[rid] for rid in sent[12:]]
        assert [s for s, _ in plain] == [200] * 12  # failed over to the healthy provider
        assert all(json.loads(t)["choices"][0]["message"]["content"].startswith("Echo: hi") for _, t in plain)

        # Nothing crashed, nothing restarted, and the gateway still serves.
        assert gw.app.restarts == {}
        r = await http.post("/v1/chat/completions", headers=CLIENT,
                            json={"model": f"good:{MODEL}", "messages": [{"role": "user", "content": "after"}]})
        assert r.status_code == 200
        usage = (await http.get("/v1/usage", headers=ADMIN)).json()

    # Every client request is one row; no poisoned value reached the ledger.
    assert sorted(i for i in _ledger_ids(gw) if i.startswith("poison-")) == sorted(sent)
    totals = usage["totals"]
    assert totals["requests"] == 25
    tokens_in = sum(json.loads(t)["usage"]["prompt_tokens"] for _, t in plain) + json.loads(r.text)["usage"][
        "prompt_tokens"]
    assert totals["tokens_in"] == tokens_in
    assert 0 < totals["cost"] < 1.0
    # Logged once for the provider, not once per poisoned answer.
    poison_logs = [rec for rec in caplog.records if "out-of-range" in rec.getMessage()]
    assert len(poison_logs) == 1, [rec.getMessage()[:200] for rec in poison_logs]


async def test_a_telemetry_crash_under_traffic_loses_no_row(gateway_factory):
    gw = await gateway_factory(
        KEYS + "[telemetry]\nledger_flush_ms = 60000\nledger_batch = 100000\n"
        + provider_toml("fake", "fake", models=["fake-model"]))
    app = gw.app
    ids: list[str] = []
    statuses: list[int] = []
    crashed = trio.Event()

    def inject_crash() -> None:
        """The live handler's next cast raises, and the flush it makes on its way out fails too."""
        ref = app.registry.whereis("telemetry_handler")
        fail_next_ledger_write(ref.actor.ledger)

        async def boom(message):
            raise RuntimeError("injected crash in telemetry_handler")

        ref.actor.handle_cast = boom  # this incarnation only: the restart builds a fresh actor
        ref.cast(("injected",))

    async def client(http, worker: int) -> None:
        for i in range(50):
            rid = f"w{worker}-{i}-{uuid.uuid4().hex[:8]}"
            r = await http.post("/v1/chat/completions", headers={**CLIENT, "x-request-id": rid},
                                json={"model": "fake-model", "stream": i % 3 == 0,
                                      "messages": [{"role": "user", "content": f"worker {worker} request {i}"}]})
            statuses.append(r.status_code)
            ids.append(rid)
            if worker == 0 and i == 20:
                inject_crash()
                crashed.set()

    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for w in range(4):
                    n.start_soon(client, http, w)
        assert crashed.is_set()
        for _ in range(500):  # bounded wait for the supervisor to restart the handler
            if app.restarts.get("telemetry_handler"):
                break
            await trio.sleep(0.01)
        assert app.restarts == {"telemetry_handler": 1}
        assert statuses == [200] * 200
        usage = (await http.get("/v1/usage", headers=ADMIN)).json()
    assert usage["totals"]["requests"] == 200
    assert sorted(_ledger_ids(gw)) == sorted(ids)
