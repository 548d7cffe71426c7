"""The TelemetryHandler actor end to end: casts in; metrics, health, summaries, usage and feeds out."""

import json
import math
import sqlite3

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from gatewaytest import fail_next_ledger_write
from runestone.telemetry.messages import Flush, Health, Metrics, Subscribe, Summary, Unsubscribe, Usage
from runestone.runtime import Published, Registry
from runestone.telemetry import (
    AttemptFinished,
    BreakerTransition,
    ExtraGauges,
    FailoverEvent,
    HealthParams,
    HealthTable,
    ModelPrice,
    ProviderRegistered,
    ProviderUnregistered,
    RequestFinished,
    Telemetry,
    TelemetryHandler,
    UsageLedger,
)

DAY = 1_700_000_000.0  # 2023-11-14 UTC
FOREVER = math.inf  # calls that wait on the ledger's thread must not race the mock clock


def request(provider="a", model="m", *, key="k1", status="ok", latency=0.2, ttft=None, tin=100, tout=50,
            cost=0.0, ts=DAY):
    return RequestFinished(
        request_id="r", key_id=key, provider=provider, model=model, endpoint="chat", stream=ttft is not None,
        status=status, http_status=200 if status == "ok" else 502, error_type=None if status == "ok" else "timeout",
        latency=latency, ttft=ttft, tokens_in=tin, tokens_out=tout, cost=cost, retries=0, failovers=0,
        route_reason="default", wall_time=ts,
    )


def attempt(provider="a", ok=True, latency=0.2, ttft=None):
    return AttemptFinished(provider, "m", ok, None if ok else "timeout", latency, ttft)


def samples(body: bytes) -> dict:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def db_rows(path):
    with sqlite3.connect(path) as c:
        return c.execute("SELECT key_id, cost FROM usage ORDER BY id").fetchall()


async def start(nursery, **kwargs):
    kwargs.setdefault("registry", Registry())
    handler = TelemetryHandler(**kwargs)
    ref = await nursery.start(handler.run)
    return handler, ref


async def test_events_become_metrics_health_and_summary(autojump_clock):
    cell = Published()
    pricing = {"m": ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)}
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, pricing=pricing, health_cell=cell)
        assert isinstance(cell.value, HealthTable) and len(cell.value) == 0
        for ev in (
            ProviderRegistered("a"),
            ProviderRegistered("b"),
            attempt("a", ok=False, latency=5.0),
            attempt("a", latency=0.3),
            attempt("a", latency=0.5, ttft=0.1),
            request("a", latency=0.5, ttft=0.1),
            request("a", status="error", latency=2.0, tin=10, tout=0),
            request("b", cost=0.25, tin=1, tout=1),
            BreakerTransition("b", "closed", "open", "consecutive_failures"),
            FailoverEvent("failover", "main", "b", "a", 1),
        ):
            ref.cast(ev)
        got = samples(await ref.call(Metrics(ExtraGauges(in_flight={"a": 2}, dropped=4))))

        def value(name, **labels):
            return got[(name, frozenset(labels.items()))]

        assert value("runestone_requests_total", provider="a", model="m", endpoint="chat", status="ok") == 1
        assert value("runestone_requests_total", provider="a", model="m", endpoint="chat", status="error") == 1
        assert value("runestone_errors_total", provider="a", model="m", type="timeout") == 1
        assert value("runestone_tokens_total", provider="a", model="m", direction="in") == 110
        # Priced by the handler: (110 * 2 + 50 * 10) / 1e6; the event's own cost wins when given.
        assert value("runestone_cost_usd_total", provider="a", model="m") == pytest.approx(720e-6)
        assert value("runestone_cost_usd_total", provider="b", model="m") == pytest.approx(0.25)
        assert value("runestone_request_duration_seconds_count", provider="a", model="m") == 2
        assert value("runestone_time_to_first_token_seconds_count", provider="a", model="m") == 1
        assert value("runestone_upstream_attempts_total", provider="a", model="m", outcome="error") == 1
        assert value("runestone_circuit_breaker_state", provider="b") == 2
        assert value("runestone_failovers_total", group="main") == 1
        assert value("runestone_requests_in_flight", provider="a") == 2
        assert value("runestone_telemetry_events_dropped_total") == 4

        health = await ref.call(Health())
        assert health["a"].requests == 3 and health["a"].errors == 1
        assert health["a"].success_rate == pytest.approx(2 / 3)
        assert health["a"].score == pytest.approx((2 + 2) / (3 + 2))  # p50 0.3 s: no latency penalty
        assert (health["a"].p50, health["a"].p99) == (0.1, 0.3)  # ttft for the streamed attempt
        assert (health["b"].score, health["b"].status, health["b"].breaker) == (0.0, "unhealthy", "open")
        # The breaker opening changed a status, so the table was republished at once.
        assert cell.value.scores == {"a": pytest.approx(0.8), "b": 0.0}

        summary = await ref.call(Summary())
        assert (summary.requests, summary.errors, summary.tokens_in, summary.tokens_out) == (3, 1, 111, 51)
        assert summary.success_rate == pytest.approx(2 / 3)
        assert summary.cost == pytest.approx(0.25 + 720e-6)
        assert (summary.p50, summary.p99) == (0.5, 2.0)
        ref.request_stop()


async def test_health_publishes_at_once_on_status_change_else_on_the_tick(autojump_clock):
    cell = Published()
    params = HealthParams(window=10, prior=0.0)
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, health_cell=cell, health_params=params, flush_interval=0.5)
        ref.cast(attempt("a", ok=True))
        await ref.call(Summary())  # a round trip: every cast before it was handled
        published, version = cell.value, cell.version
        assert "a" not in published  # no status change: waits for the tick
        await trio.sleep(0.6)
        assert cell.value["a"].requests == 1
        assert cell.version > version, "the health table changed without a publish"
        version = cell.version
        ref.cast(attempt("a", ok=False))  # 1/2 -> degraded: a change, published now
        await ref.call(Summary())
        assert cell.value["a"].status == "degraded"
        assert cell.version == version + 1
        ref.request_stop()


async def test_subscribers_get_every_event_and_one_alert_per_transition(autojump_clock):
    send, receive = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, health_params=HealthParams(window=10, prior=0.0))
        assert await ref.call(Subscribe(send)) is True
        for _ in range(4):
            ref.cast(attempt("a", ok=False))
        ref.cast(BreakerTransition("a", "closed", "open", "consecutive_failures"))
        ref.cast(BreakerTransition("a", "open", "half_open", "recovery_timeout"))
        ref.cast(BreakerTransition("a", "half_open", "closed", "probes_succeeded"))
        await ref.call(Summary())
        feed = []
        while True:
            try:
                feed.append(receive.receive_nowait())
            except trio.WouldBlock:
                break
        kinds = [e["kind"] for e in feed]
        assert kinds == [
            "attempt_finished", "provider_unhealthy",  # the first failure: 0/1
            "attempt_finished", "attempt_finished", "attempt_finished",
            "breaker_transition", "provider_failed",
            "breaker_transition",
            "breaker_transition", "provider_recovered",
        ]
        assert feed[1] == {"kind": "provider_unhealthy", "provider": "a", "score": 0.0}
        assert feed[0]["ok"] is False and feed[0]["provider"] == "a"
        assert await ref.call(Unsubscribe(send)) is True
        assert await ref.call(Unsubscribe(send)) is False
        ref.cast(attempt("a"))
        await ref.call(Summary())
        with pytest.raises(trio.WouldBlock):
            receive.receive_nowait()
        ref.request_stop()


async def test_slow_or_gone_subscribers_never_block_the_handler(autojump_clock):
    slow_send, slow_receive = trio.open_memory_channel(1)
    gone_send, gone_receive = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery)
        await ref.call(Subscribe(slow_send))
        await ref.call(Subscribe(gone_send))
        gone_receive.close()
        for _ in range(5):
            ref.cast(attempt())
        await ref.call(Summary())
        stats = handler.snapshot()
        assert (stats.events, stats.subscriber_drops, stats.subscribers) == (5, 4, 1)
        assert slow_receive.receive_nowait()["kind"] == "attempt_finished"
        ref.request_stop()


async def test_ledger_flushes_on_the_interval(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, ledger_path=path, flush_interval=0.5, batch=1000)
        ref.cast(request(key="k1"))
        ref.cast(request(key="k2"))
        await ref.call(Summary())
        assert db_rows(path) == []
        await trio.sleep(0.6)
        # Waits for a flush still on its thread; 0 means the tick already wrote everything.
        assert await ref.call(Flush(), timeout=FOREVER) == 0
        assert [r[0] for r in db_rows(path)] == ["k1", "k2"]
        ref.request_stop()


async def test_ledger_flushes_when_a_batch_is_full(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, ledger_path=path, flush_interval=100.0, batch=3)
        for key in ("k1", "k2", "k3"):
            ref.cast(request(key=key))
        await ref.call(Summary())
        await trio.testing.wait_all_tasks_blocked()  # the flusher woke and is on its thread
        assert await ref.call(Flush(), timeout=FOREVER) == 0  # the batch was already written
        assert trio.current_time() < 100.0  # ...long before the interval
        assert len(db_rows(path)) == 3
        ref.request_stop()


async def test_graceful_stop_loses_nothing_and_a_restart_keeps_rows(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    pricing = {"m": {"input_per_mtok": 1.0, "output_per_mtok": 0.0}}
    registry = Registry()
    handler = TelemetryHandler(registry=registry, ledger_path=path, flush_interval=100.0, pricing=pricing)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(handler.run)
        ref.cast(request(key="k1", tin=1_000_000, tout=0))
        ref.request_stop()
    assert db_rows(path) == [("k1", 1.0)]

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(handler.run)  # the same object, run again: a restart
        ref.cast(request(key="k2", ts=DAY + 86_400))
        ref.cast(request(key="k1", model="other", cost=0.5))
        usage = await ref.call(Usage("k1"), timeout=FOREVER)
        assert usage["ledger"] is True
        assert [(r["model"], r["day"], r["requests"], r["cost"]) for r in usage["rows"]] == [
            ("m", "2023-11-14", 1, 1.0), ("other", "2023-11-14", 1, 0.5)]
        everyone = await ref.call(Usage(None, ("day",)), timeout=FOREVER)
        assert [(r["day"], r["requests"]) for r in everyone["rows"]] == [("2023-11-14", 2), ("2023-11-15", 1)]
        assert everyone["totals"]["requests"] == 3
        assert (await ref.call(Summary())).requests == 2  # in-memory metrics start over per incarnation
        ref.request_stop()


async def test_no_ledger(autojump_clock):
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery)
        ref.cast(request())
        assert await ref.call(Usage(None)) == {"ledger": False, "key_id": None, "team": None, "rows": [], "totals": None}
        assert await ref.call(Flush()) == 0
        ref.request_stop()


async def test_bad_input_is_counted_not_fatal(autojump_clock):
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery)
        ref.cast("not an event")
        ref.cast(request(latency=None))  # malformed: a histogram cannot place None
        ref.cast(attempt("a", latency=0.1))
        assert (await ref.call("no such call")).code == "invalid"  # the runtime's policy: Rejected, no crash
        assert (await ref.call(("subscribe",))).code == "invalid"
        stats = handler.snapshot()
        assert (stats.unknown_events, stats.bad_events, stats.events) == (3, 1, 2)
        assert (await ref.call(Health()))["a"].requests == 1
        assert ref.alive
        ref.request_stop()


async def test_unregistered_provider_leaves_health_and_breaker_gauge(autojump_clock):
    cell = Published()
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, health_cell=cell)
        ref.cast(ProviderRegistered("a"))
        ref.cast(BreakerTransition("a", "closed", "open", "consecutive_failures"))
        await ref.call(Summary())
        assert "a" in cell.value
        ref.cast(ProviderUnregistered("a"))
        assert "a" not in await ref.call(Health())
        assert "a" not in cell.value
        assert b'runestone_circuit_breaker_state{provider="a"}' not in await ref.call(Metrics())
        ref.request_stop()


async def test_hot_path_sender_to_metrics(autojump_clock):
    registry = Registry()
    telemetry = Telemetry(registry, in_flight={"a": 1})
    async with trio.open_nursery() as nursery:
        await start(nursery, registry=registry)
        telemetry.cache_result(hit=True)
        telemetry.emit(request("a"))
        got = samples(await telemetry.metrics_text())
        assert got[("runestone_requests_total", frozenset(
            {"provider": "a", "model": "m", "endpoint": "chat", "status": "ok"}.items()))] == 1
        assert got[("runestone_requests_in_flight", frozenset({("provider", "a")}))] == 1
        assert got[("runestone_cache_total", frozenset({("result", "hit")}))] == 1
        registry.whereis("telemetry_handler").request_stop()


class Crashing(TelemetryHandler):
    async def handle_cast(self, msg):
        if msg == "poison":
            raise RuntimeError("poison")
        await super().handle_cast(msg)


async def test_a_crash_keeps_ledger_rows_and_loses_only_memory(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    handler = Crashing(registry=Registry(), ledger_path=path, flush_interval=100.0)
    crashes = []

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await handler.run(task_status=task_status)
        except RuntimeError as exc:
            crashes.append(exc)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run)
        ref.cast(request(key="k1"))
        ref.cast("poison")
    assert [str(e) for e in crashes] == ["poison"]
    assert db_rows(path) == [("k1", 0.0)]  # terminate ran on the way out of the crash

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run)
        assert (await ref.call(Summary())).requests == 0
        assert (await ref.call(Usage("k1"), timeout=FOREVER))["totals"]["requests"] == 1
        ref.request_stop()


async def test_state_dump_is_plain_data(autojump_clock):
    import orjson

    from runestone.runtime import dump_state

    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery)
        ref.cast(attempt("a"))
        ref.cast(request("a"))
        await ref.call(Summary())
        dumped = dump_state(ref)
        snap = dumped["snapshot"]
        assert snap["events"] == 2 and snap["overall"]["requests"] == 1
        assert snap["health"]["a"]["requests"] == 1
        orjson.dumps(dumped)
        ref.request_stop()


async def test_rows_the_ledger_cannot_store_never_crash_the_handler(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    async with trio.open_nursery() as nursery:
        handler, ref = await start(nursery, ledger_path=path, flush_interval=100.0)
        ref.cast(request(key="k1"))
        ref.cast(request(key="huge", tin=2**64))
        ref.cast(request(key="nan", cost=float("nan")))
        ref.cast(request(key="k2"))
        assert await ref.call(Flush(), timeout=FOREVER) == 2
        got = samples(await ref.call(Metrics()))
        assert got[("runestone_ledger_quarantined_total", frozenset())] == 2
        stats = handler.snapshot()
        assert (stats.ledger_quarantined, stats.ledger_errors, stats.ledger_pending) == (2, 0, 0)
        ref.cast(request(key="k3"))
        assert (await ref.call(Usage(None), timeout=FOREVER))["totals"]["requests"] == 3
        ref.request_stop()
    assert [k for k, _ in db_rows(path)] == ["k1", "k2", "k3"]
    assert [json.loads(line)["row"]["key_id"] for line in open(path + ".quarantine.jsonl")] == ["huge", "nan"]


async def test_a_crash_whose_exit_flush_fails_leaves_every_row_to_the_next_incarnation(tmp_path, autojump_clock):
    path = str(tmp_path / "usage.db")
    ledger = UsageLedger(path)
    registry = Registry()
    telemetry = Telemetry(registry, ledger=ledger)  # the request path's sender: rows go to the ledger directly
    crashes = []

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await Crashing(registry=registry, ledger=ledger, flush_interval=100.0).run(task_status=task_status)
        except RuntimeError as exc:
            crashes.append(exc)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run)
        telemetry.emit(request(key="k1"))
        telemetry.emit(request(key="k2"))
        failures = fail_next_ledger_write(ledger)
        ref.cast("poison")
    assert [str(e) for e in crashes] == ["poison"] and failures == [True]
    assert db_rows(path) == [] and ledger.pending == 2  # the exit flush failed; the rows wait in the ledger
    telemetry.emit(request(key="k3"))  # while no handler runs: the event is dropped, its row is not
    assert telemetry.dropped == 1

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(run)
        assert (await ref.call(Usage(None), timeout=FOREVER))["totals"]["requests"] == 3
        telemetry.emit(request(key="k4"))
        ref.request_stop()
    assert [k for k, _ in db_rows(path)] == ["k1", "k2", "k3", "k4"]  # each once: the handler adds none itself
