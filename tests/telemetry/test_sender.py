"""The hot path's sender: never blocks, never raises, counts what it could not deliver."""

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from runestone.telemetry.messages import Summary, Usage
from runestone.runtime import Coalescer, Registry
from runestone.telemetry import RetryScheduled, Telemetry, TelemetryHandler


#: Events per mailbox message (the sender's batches).
BATCH = Coalescer(None).limit


def retry(i=1):
    return RetryScheduled("openai", i, 0.5, "timeout")


def scalar(body: bytes, family: str, name: str, **labels) -> float:
    for f in text_string_to_metric_families(body.decode()):
        if f.name == family:
            for s in f.samples:
                if s.name == name and s.labels == labels:
                    return s.value
    raise KeyError((family, name, labels))


async def test_full_mailbox_counts_drops_without_blocking(autojump_clock):
    registry = Registry()
    telemetry = Telemetry(registry)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(TelemetryHandler(registry=registry, mailbox_size=3).run)
        # No checkpoint between emits: the handler cannot drain, so the mailbox fills: one batch goes
        # straight to the waiting handler, three queue, each of BATCH events; the rest are dropped.
        for i in range(4 * BATCH + 6):
            telemetry.emit(retry(i))
        assert telemetry.dropped == 6
        body = await telemetry.metrics_text()
        assert scalar(body, "runestone_retries", "runestone_retries_total", provider="openai") == 4 * BATCH
        assert scalar(body, "runestone_telemetry_events_dropped", "runestone_telemetry_events_dropped_total") == 6
        # Taken in hand, the batches are closed: the next events go in a new one, and arrive.
        telemetry.emit(retry())
        body = await telemetry.metrics_text()
        assert scalar(body, "runestone_retries", "runestone_retries_total", provider="openai") == 4 * BATCH + 1
        ref.request_stop()


async def test_handler_down_or_missing_counts_drops(autojump_clock):
    registry = Registry()
    telemetry = Telemetry(registry)
    telemetry.emit(retry())  # nobody registered yet
    assert telemetry.dropped == 1
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(TelemetryHandler(registry=registry).run)
        telemetry.emit(retry())
        assert telemetry.dropped == 1
        ref.request_stop()
    telemetry.emit(retry())  # stopped: unbound again
    assert telemetry.dropped == 2


async def test_follows_the_restarted_incarnation(autojump_clock):
    registry = Registry()
    telemetry = Telemetry(registry)
    handler = TelemetryHandler(registry=registry)
    async with trio.open_nursery() as nursery:
        first = await nursery.start(handler.run)
        first.request_stop()
        await trio.testing.wait_all_tasks_blocked()
        second = await nursery.start(handler.run)
        assert second is not first
        telemetry.emit(retry())
        assert telemetry.dropped == 0
        assert (await second.call(Summary())).requests == 0
        assert second.actor.snapshot().events == 1
        second.request_stop()


def test_other_targets_and_failures_never_raise():
    class Ref:
        def __init__(self, ok):
            self.ok = ok
            self.got = []

        def try_cast(self, msg):
            self.got.append(msg)
            return self.ok

    good = Ref(True)
    t = Telemetry(good)
    t.emit("x")
    assert good.got == [["x"]] and t.dropped == 0
    t = Telemetry(Ref(False))
    t.emit("x")
    assert t.dropped == 1
    t = Telemetry(lambda: None)
    t.emit("x")
    assert t.dropped == 1

    def broken():
        raise RuntimeError("registry gone")

    t = Telemetry(broken)
    t.emit("x")
    t.emit("y")
    assert t.dropped == 2


def test_in_flight_and_cache_gauges():
    counts = {"a": 1, "b": 0}  # the in-flight owner's live counts: the sender only reads them
    t = Telemetry(lambda: None, in_flight=counts)
    assert t.in_flight is counts
    t.cache_result(True)
    t.cache_result(False)
    t.cache_result(False)
    g = t.gauges({"a": "open"})
    assert (g.in_flight, g.cache_hits, g.cache_misses, g.breaker_states) == ({"a": 1, "b": 0}, 1, 2, {"a": "open"})
    counts["a"] += 1
    assert g.in_flight == {"a": 1, "b": 0}  # a copy: later changes do not leak into a render in progress


async def test_a_full_mailbox_drops_the_event_not_its_ledger_row(tmp_path, autojump_clock):
    from runestone.telemetry import RequestFinished, UsageLedger

    registry = Registry()
    ledger = UsageLedger(str(tmp_path / "usage.db"))
    telemetry = Telemetry(registry, ledger=ledger)
    finished = [RequestFinished(f"r{i}", "k", "p", "m", "chat", False, "ok", 200, None, 0.1, None, 1, 2, 0.0, 0, 0,
                                "default", 1_700_000_000.0) for i in range(10)]
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(TelemetryHandler(registry=registry, mailbox_size=3, ledger=ledger).run)
        for _ in range(4 * BATCH):  # no checkpoint: the mailbox and its batches fill up
            telemetry.emit(retry())
        for ev in finished:
            telemetry.emit(ev)
        assert telemetry.dropped == 10 and ledger.pending == 10
        assert (await ref.call(Usage(None), timeout=float("inf")))["totals"]["requests"] == 10
        ref.request_stop()
