"""The fleet's admission and settlement scripts (runestone.cluster.limits) against a real redis-server.

Every time the scripts judge by is passed to them explicitly (the wall clock of :class:`FleetLimits` is a
variable the test sets), so nothing here depends on how fast the machine is: the edges are exact.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio

from runestone.cluster.limits import HOLD_TTL, BudgetShort, FleetLimits, Subject
from runestone.cluster.redis import open_redis
from runestone.config.schema import LimitsConfig
from runestone.front.limits import KeyLimiter, LimitValues
from runestone.governance import Governance
from runestone.routing.errors import GatewayError

T0 = 1_800_000_000.0  # a wall-clock second (2027-01-15), the start of the tests' time


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _fleet(redis, clock: Clock, instance: str) -> FleetLimits:
    gov = Governance(None, KeyLimiter(LimitsConfig()), wall=clock)
    return FleetLimits(redis, gov, instance=instance, wall=clock)


def _subject(name="team:eng", limits=LimitValues(), budget=-1, start=0.0, end=float("inf")) -> Subject:
    return Subject(name, "team 'eng'", limits, budget, None, start, end)


@asynccontextmanager
async def _fleets(redis_server, *names: str, **settings):
    """A clock the test sets, a client, and one FleetLimits per instance name."""
    clock = Clock()
    async with open_redis(redis_server.url, timeout=10, **settings) as redis:
        await redis.wait_up()
        yield clock, redis, [_fleet(redis, clock, name) for name in names]


async def _drain(fleet: FleetLimits) -> None:
    """Send the queued settlements now (what run()'s sender does in the background)."""
    with trio.fail_after(30):
        while fleet._queue:
            assert await fleet.send_batch()


async def test_gcra_edge_exact_at_the_limit_and_one_interval_later(redis_server):
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        s = _subject(limits=LimitValues(rpm=6))
        for i in range(6):  # a burst of the whole limit, alternating between two instances
            await (a if i % 2 else b).admit((s,), 0)
        with pytest.raises(GatewayError) as refused:
            await a.admit((s,), 0)
        assert refused.value.status == 429 and "6 requests per minute" in str(refused.value)
        # one interval (60 s / 6) minus a millisecond later: still refused; at the interval: exactly one more
        clock.t = T0 + 9.999
        with pytest.raises(GatewayError):
            await b.admit((s,), 0)
        clock.t = T0 + 10.0
        await b.admit((s,), 0)
        with pytest.raises(GatewayError):
            await a.admit((s,), 0)


async def test_two_subjects_are_taken_together_or_not_at_all(redis_server):
    async with _fleets(redis_server, "a") as (clock, redis, [a]):
        key = _subject("key:k1", LimitValues(rpm=100))
        team = _subject("team:eng", LimitValues(rpm=2))
        await a.admit((key, team), 0)
        await a.admit((key, team), 0)
        with pytest.raises(GatewayError) as refused:
            await a.admit((key, team), 0)
        assert "team 'eng'" in str(refused.value)
        # the refused request took nothing from the key's bucket: its 100 are 98 away from empty
        tat = float(await redis.execute("GET", "runestone:lim:key:k1:rpm"))
        assert tat == pytest.approx(T0 * 1000 + 2 * 600, abs=0.01)


async def test_concurrency_holds_expire_when_their_instance_is_gone(redis_server):
    async with _fleets(redis_server, "dead", "alive") as (clock, redis, (dead, alive)):
        s = _subject(limits=LimitValues(max_concurrent=2))
        await dead.admit((s,), 0)
        await dead.admit((s,), 0)  # held by an instance that will never settle them
        with pytest.raises(GatewayError) as refused:
            await alive.admit((s,), 0)
        assert "2 requests in flight across the fleet" in str(refused.value)
        clock.t = T0 + HOLD_TTL - 0.001
        with pytest.raises(GatewayError):
            await alive.admit((s,), 0)
        clock.t = T0 + HOLD_TTL
        lease = await alive.admit((s,), 0)
        await alive.admit((s,), 0)
        with pytest.raises(GatewayError):
            await alive.admit((s,), 0)
        lease.release()  # a settled hold gives its place back at once
        await _drain(alive)
        await alive.admit((s,), 0)


async def test_budget_reserve_settle_and_expired_reservation(redis_server):
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        s = _subject(budget=1000, start=T0 - 100, end=T0 + 1000)
        first = await a.admit((s,), 400)
        await b.admit((s,), 400)  # b never settles: its reservation expires with its hold
        with pytest.raises(BudgetShort) as short:
            await a.admit((s,), 201)
        assert short.value.remaining == 200
        first.settle(0, 0, 150e-9)  # 150 nano-USD: 250 of the 400 come back
        await _drain(a)
        await a.admit((s,), 450)
        with pytest.raises(BudgetShort) as short:
            await a.admit((s,), 1)
        assert short.value.remaining == 0
        period = f"runestone:lim:team:eng:p:{int(T0 - 100)}"
        assert int(await redis.execute("HGET", period, "spent")) == 150
        clock.t = T0 + HOLD_TTL  # every hold expired (the period lasts longer): only the spend stays
        await a.admit((s,), 850)
        with pytest.raises(BudgetShort) as short:
            await a.admit((s,), 1)
        assert short.value.remaining == 0


async def test_budget_period_rollover_starts_afresh(redis_server):
    async with _fleets(redis_server, "a") as (clock, redis, [a]):
        day1 = _subject(budget=100, start=T0, end=T0 + 86400)
        lease = await a.admit((day1,), 100)
        with pytest.raises(BudgetShort):
            await a.admit((day1,), 1)
        clock.t = T0 + 86400  # the next period: a new period key, the whole budget again
        day2 = _subject(budget=100, start=T0 + 86400, end=T0 + 2 * 86400)
        await a.admit((day2,), 100)
        # the first day's reservation settles in its own period, never the new one's
        lease.settle(0, 0, 60e-9)
        await _drain(a)
        assert int(await redis.execute("HGET", f"runestone:lim:team:eng:p:{int(T0)}", "spent")) == 60
        assert int(await redis.execute("HGET", f"runestone:lim:team:eng:p:{int(T0)}", "reserved")) == 0
        assert int(await redis.execute("HGET", f"runestone:lim:team:eng:p:{int(T0 + 86400)}", "spent")) == 0


async def test_tokens_per_minute_charged_at_settlement(redis_server):
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        s = _subject(limits=LimitValues(tpm=600))
        lease = await a.admit((s,), 0)
        lease.settle(500, 200, 0.0)  # 700 tokens: 100 over the minute's 600
        await _drain(a)
        with pytest.raises(GatewayError) as refused:
            await b.admit((s,), 0)
        assert "600 tokens per minute" in str(refused.value)
        clock.t = T0 + 10.0  # 100 tokens paid back at 10 per second
        await b.admit((s,), 0)


async def test_redis_down_gives_this_instance_its_share(redis_server):
    async with _fleets(redis_server, "a", backoff_max=0.05) as (clock, redis, [a]):
        a.instances = 3
        rate = _subject("static:k", LimitValues(rpm=9))
        money = _subject("team:eng", budget=900, start=0.0)
        await a.admit((rate, money), 300)  # seen in Redis: 600 left
        redis_server.kill()
        with trio.fail_after(30):
            while redis.state == "up":
                await trio.sleep(0.01)
        # 600 left / 3 instances = 200 of budget; 9 rpm / 3 = 3 requests
        lease = await a.admit((rate, money), 100)
        assert a.mode == "local"
        with pytest.raises(BudgetShort) as short:
            await a.admit((rate, money), 101)
        assert short.value.remaining == 100
        await a.admit((rate, money), 50)
        await a.admit((rate, money), 0)
        with pytest.raises(GatewayError) as refused:
            await a.admit((rate, money), 0)
        assert "3 requests per minute" in str(refused.value)
        lease.settle(0, 0, 40e-9)  # spend while down: kept for Redis
        assert len(a._queue) == 1
        redis_server.start()
        with trio.fail_after(30):
            await redis.wait_up()
            while a._queue:  # the first calls after the restart may still find the connection down
                if not await a.send_batch():
                    await trio.sleep(0.05)
        await a.admit((rate, money), 0)
        assert a.mode == "shared"
        assert int(await redis.execute("HGET", "runestone:lim:team:eng:p:0", "spent")) == 40


async def test_a_running_requests_hold_is_renewed_and_an_ended_ones_is_not(redis_server):
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        s = _subject(limits=LimitValues(max_concurrent=1), budget=1000, start=T0 - 100, end=T0 + 10 * HOLD_TTL)
        long = await a.admit((s,), 400)  # a stream longer than HOLD_TTL
        clock.t = T0 + HOLD_TTL * 2 / 3
        assert await a.renew_holds() == 1
        clock.t = T0 + HOLD_TTL + 1  # past its first expiry: still held, its reservation still made
        with pytest.raises(GatewayError) as refused:
            await b.admit((s,), 0)
        assert "1 requests in flight across the fleet" in str(refused.value)
        short = _subject("team:ops", LimitValues(max_concurrent=1), budget=1000, start=T0 - 100,
                         end=T0 + 10 * HOLD_TTL)
        with pytest.raises(BudgetShort) as over:
            await b.admit((_subject(budget=1000, start=T0 - 100, end=T0 + 10 * HOLD_TTL),), 601)
        assert over.value.remaining == 600
        done = await b.admit((short,), 0)
        done.release()  # ended here: not renewed
        assert await b.renew_holds() == 0
        clock.t = T0 + HOLD_TTL * 2 / 3 + HOLD_TTL  # the renewed hold's expiry: it goes by itself
        await b.admit((s,), 0)
        long.release()
        assert await a.renew_holds() == 0
        await _drain(a)


async def test_a_queued_admission_waits_is_woken_by_a_settle_and_is_bounded(redis_server):
    # trio's own clock: a MockClock would jump past the Redis client's timers during a slow round trip
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        # a: a queue of one whose timeout only a hang reaches; b: a short one, to be reached
        a.governance.limiter = KeyLimiter(LimitsConfig(queue=True, queue_size=1, queue_timeout_ms=600_000))
        b.governance.limiter = KeyLimiter(LimitsConfig(queue=True, queue_timeout_ms=200))
        s = _subject(limits=LimitValues(max_concurrent=1))
        holder = await a.admit((s,), 0)
        got = []

        async def waiter(fleet: FleetLimits) -> None:
            got.append(await fleet.admit_queued((s,), 0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, a)
            with trio.fail_after(30):
                while a.snapshot()["queued_admissions"] != 1:
                    await trio.sleep(0.01)
            with pytest.raises(GatewayError) as full:  # a second waiter of the subject on a: the queue is full
                await a.admit_queued((s,), 0)
            assert full.value.status == 429
            holder.release()
            await _drain(a)  # the settlement reached Redis: the waiter tries again then
        assert len(got) == 1 and a.snapshot()["queued_admissions"] == 0
        # held by a now, and never given back: b's queued admission waits its whole timeout, then says so
        with pytest.raises(GatewayError) as waited:
            await b.admit_queued((s,), 0)
        assert waited.value.status == 429 and "waited 0.2s in the queue" in waited.value.message
        assert b.governance.limiter.queued == 1 and b.snapshot()["queued_admissions"] == 0


async def test_queued_admissions_of_one_subject_are_first_in_first_out(redis_server):
    # The place is held on another instance and given back there: only the queue's head on `a` polls the
    # script; the two behind it never try before their turn (a request that found others waiting used to try
    # at once, and every waiter polled on its own backoff: the newest, polling most often, overtook).
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        a.governance.limiter = KeyLimiter(LimitsConfig(queue=True, queue_size=3, queue_timeout_ms=600_000))
        s = _subject(limits=LimitValues(max_concurrent=1))
        holder = await b.admit((s,), 0)
        tries: list[str] = []
        admitted: list[str] = []
        admit = a.admit

        async def counted(*args):
            tries.append(trio.lowlevel.current_task().name)
            return await admit(*args)

        a.admit = counted

        async def waiter() -> None:
            lease = await a.admit_queued((s,), 0)
            admitted.append(trio.lowlevel.current_task().name)
            lease.release()  # its settlement reaching Redis (sent below) lets the next head in

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(waiter, name=f"w{i}")
                with trio.fail_after(30):
                    while a.snapshot()["queued_admissions"] != i + 1:
                        await trio.sleep(0.01)
            with pytest.raises(GatewayError) as full:  # a fourth: the queue is full, refused without trying
                await a.admit_queued((s,), 0)
            assert full.value.status == 429 and "1 requests in flight across the fleet" in full.value.message
            assert set(tries) == {"w0"}  # only the head tried, as often as its backoff said
            holder.release()
            await _drain(b)
            with trio.fail_after(30):
                while len(admitted) < 3:  # what run()'s sender does: a's settlements sent, one caller at a time
                    await _drain(a)
                    await trio.sleep(0.01)
        assert admitted == ["w0", "w1", "w2"] and a.snapshot()["queued_admissions"] == 0
        assert not a._waiting


async def test_a_waiter_whose_turn_never_comes_gets_the_heads_refusal_saying_it_waited(redis_server):
    async with _fleets(redis_server, "a", "b") as (clock, redis, (a, b)):
        a.governance.limiter = limiter = KeyLimiter(LimitsConfig(queue=True, queue_timeout_ms=300))
        s = _subject(limits=LimitValues(max_concurrent=1))
        await b.admit((s,), 0)  # held, never given back
        errors: list[GatewayError] = []

        async def waiter() -> None:
            with pytest.raises(GatewayError) as refused:
                await a.admit_queued((s,), 0)
            errors.append(refused.value)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                while a.snapshot()["queued_admissions"] != 1:
                    await trio.sleep(0.01)
                nursery.start_soon(waiter)  # behind the first: never its turn
        assert [(e.status, e.code) for e in errors] == [(429, "rate_limit_exceeded")] * 2
        assert all("waited 0.3s in the queue" in e.message and "in flight across the fleet" in e.message
                   for e in errors)
        assert limiter.queued == 2 and limiter.refused == 2 and not a._waiting
