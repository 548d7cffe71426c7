"""Rate limits, concurrency and budgets exact across the fleet ([cluster] redis_url).

:class:`FleetLimits` is the backend :class:`~runestone.governance.Governance` admits through when the
instance shares state through Redis. Every per-key and per-team limit (RPM, RPH, TPM, concurrency) and every
budget lives in Redis, and each admission is ONE server-side script, :data:`ADMIT`, that checks and takes
for the key and its team at once (Redis runs a script atomically, so 300 concurrent requests over three
instances are admitted exactly as far as the budget and the limits allow). Per subject (``key:<id>``,
``team:<name>``, ``static:<id>`` for the configuration's keys) under ``runestone:lim:<subject>``:

- ``:rpm``, ``:rph``, ``:tpm``: GCRA buckets, each one number, its theoretical arrival time in ms (the
  same bucket as front/limits.py's, judged by the wall-clock time the caller passes: instances agree);
- ``:holds``: a sorted set of the subject's admitted requests (lease id -> expiry, ms). Its size is the
  concurrency; a hold expires ``hold_ttl`` seconds (``[cluster] hold_ttl_ms``, default ``HOLD_TTL``) after
  admission or its last renewal (each instance renews its running requests' holds every third of it, one
  pipelined ``ZADD XX`` per holds key: :meth:`FleetLimits.renew_holds`), so a long stream keeps its place
  and a killed instance's holds go by themselves (expired holds are swept by the next script that touches
  the subject);
- ``:amounts``: lease id -> "<reserved nano-USD> <period key>", the reservation each hold carries;
- ``:p:<period start>``: a hash with ``spent``, ``reserved`` (nano-USD integers) and ``requests`` for one
  budget period (its start in the name: a new period is a new key, so rollover needs no reset). Budget
  remaining = limit - spent - reserved. The first script to touch a period seeds ``spent`` with what this
  instance's store knows (``HSETNX``), so spend recorded before Redis is not forgotten.

:data:`SETTLE` ends a lease: it drops the hold, gives the reservation back, charges the real cost to the
period the reservation was made in, and adds the tokens to the TPM buckets. Settlements are queued and
sent in batches by :meth:`FleetLimits.run` (off the response path; a batch is one pipelined round trip;
while Redis is away they wait and are retried, never dropped), so a request costs exactly one Redis round
trip, its admission. ADMIT's reply also says how far ahead the first rate-limited subject's buckets are,
from which the lease's ``x-ratelimit-*`` headers are made (the local limiter's builder): what an instance
sends counts the requests and tokens of the whole fleet. A response-cache hit is counted the same way
(:meth:`FleetLimits.admit_hit`: ADMIT at amount 0, its hold given back at once).

Degradation (Redis down, stalled, or too slow: the client refuses at once or within its deadline): the
admission falls back to *this instance's share of the fleet*: each limit divided by the number of live
instances (counted by the heartbeat each instance writes every second into the sorted set
``runestone:instances``, an instance being live while its beat is younger than ``INSTANCE_TTL``), and each
budget's remaining amount as last seen in Redis (or the whole budget, if never seen) divided the same way.
Never a 5xx. The spend of requests admitted meanwhile is queued and charged to Redis when it is back. Each
admission tries Redis first, so shared operation resumes with the first admission after the client is
connected again (it reconnects within about a second). ``/health/detailed`` (``cluster.limits``) and
``/metrics`` (``runestone_fleet_limits_shared``) say which mode is in force.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any, Callable

import trio

from ..front.limits import KeyLimiter, LimitValues, release_state
from ..routing.errors import GatewayError
from .breakers import instance_id
from .redis import RedisClient, RedisError, RedisReplyError, RedisTimeout, RedisUnavailable, Script

__all__ = ["ADMIT", "SETTLE", "BudgetShort", "Subject", "FleetLimits", "FleetLease", "HOLD_TTL", "INSTANCE_TTL",
           "period_key"]

log = logging.getLogger("runestone.cluster")

PREFIX = "runestone:lim:"
INSTANCES = "runestone:instances"
#: Seconds an admitted request holds its concurrency place and reservation unless settled first (a killed
#: instance's holds go after this long).
HOLD_TTL = 600.0
#: An instance counts as live while its last heartbeat is younger than this many seconds.
INSTANCE_TTL = 5.0
HEARTBEAT = 1.0
#: Settlements sent in one round trip at most.
BATCH = 512

#: KEYS per subject: period hash, holds, amounts, rpm, rph, tpm. ARGV: now_ms, lease, hold_until_ms, amount,
#: subjects, then per subject: budget (-1: none), period_end_ms (-1: never), spent_floor, rpm, rph, tpm,
#: max_concurrent. Reply: {1, remaining_1, remaining_2..., [h, requests_ahead, tokens_ahead]} (-1 for no
#: budget; then, when a subject has a rate limit, the first such one's index and how far ahead of now its
#: request bucket (RPM, else RPH) and its TPM bucket are, in ms, -1 for a bucket it lacks: the
#: ``x-ratelimit-*`` headers) or {0, subject index, which, number} (which: "concurrent" with the count,
#: "rpm"/"rph"/"tpm" with the wait in ms, "budget" with what remains).
ADMIT = Script("""
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local function sweep(holds, amounts)
  local gone = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  for _, id in ipairs(gone) do
    local v = redis.call('HGET', amounts, id)
    if v then
      local sp = string.find(v, ' ')
      redis.call('HINCRBY', string.sub(v, sp + 1), 'reserved', -tonumber(string.sub(v, 1, sp - 1)))
      redis.call('HDEL', amounts, id)
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', holds, '-inf', now) end
end
local function blocked(key, per, limit, need)
  if limit <= 0 then return nil end
  local tat = tonumber(redis.call('GET', key) or now)
  local slack = (limit - need) * per / limit
  if tat - now > slack then return tat - now - slack end
  return nil
end
local remaining = {}
for i = 1, n do
  local k = (i - 1) * 6
  local a = 5 + (i - 1) * 7
  local budget = tonumber(ARGV[a + 1])
  sweep(KEYS[k + 2], KEYS[k + 3])
  local maxc = tonumber(ARGV[a + 7])
  if maxc > 0 then
    local c = redis.call('ZCARD', KEYS[k + 2])
    if c >= maxc then return {0, i, 'concurrent', c} end
  end
  local w = blocked(KEYS[k + 4], 60000, tonumber(ARGV[a + 4]), 1)
  if w then return {0, i, 'rpm', math.ceil(w)} end
  w = blocked(KEYS[k + 5], 3600000, tonumber(ARGV[a + 5]), 1)
  if w then return {0, i, 'rph', math.ceil(w)} end
  w = blocked(KEYS[k + 6], 60000, tonumber(ARGV[a + 6]), 0)
  if w then return {0, i, 'tpm', math.ceil(w)} end
  if budget >= 0 then
    redis.call('HSETNX', KEYS[k + 1], 'spent', ARGV[a + 3])
    local spent = tonumber(redis.call('HGET', KEYS[k + 1], 'spent'))
    local reserved = tonumber(redis.call('HGET', KEYS[k + 1], 'reserved') or '0')
    local left = budget - spent - reserved
    if left < amount then return {0, i, 'budget', left} end
    remaining[i] = left - amount
  else
    remaining[i] = -1
  end
end
local lease = ARGV[2]
local hold_until = tonumber(ARGV[3])
for i = 1, n do
  local k = (i - 1) * 6
  local a = 5 + (i - 1) * 7
  for j, per in ipairs({60000, 3600000}) do
    local limit = tonumber(ARGV[a + 3 + j])
    if limit > 0 then
      local key = KEYS[k + 3 + j]
      local tat = tonumber(redis.call('GET', key) or now)
      if tat < now then tat = now end
      tat = tat + per / limit
      redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
    end
  end
  redis.call('ZADD', KEYS[k + 2], hold_until, lease)
  redis.call('PEXPIREAT', KEYS[k + 2], hold_until + 1000)
  local budget = tonumber(ARGV[a + 1])
  if budget >= 0 then
    redis.call('HINCRBY', KEYS[k + 1], 'reserved', amount)
    redis.call('HINCRBY', KEYS[k + 1], 'requests', 1)
    local ends = tonumber(ARGV[a + 2])
    if ends >= 0 then redis.call('PEXPIREAT', KEYS[k + 1], ends + 86400000) end
    redis.call('HSET', KEYS[k + 3], lease, amount .. ' ' .. KEYS[k + 1])
    redis.call('PEXPIREAT', KEYS[k + 3], hold_until + 1000)
  end
end
local out = {1}
for i = 1, n do out[i + 1] = remaining[i] end
for i = 1, n do
  local k = (i - 1) * 6
  local a = 5 + (i - 1) * 7
  local rpm, rph, tpm = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  if rpm > 0 or rph > 0 or tpm > 0 then
    local function ahead(key)
      local t = tonumber(redis.call('GET', key) or now)
      if t <= now then return 0 end
      return math.ceil(t - now)
    end
    out[n + 2] = i
    out[n + 3] = -1
    if rpm > 0 then out[n + 3] = ahead(KEYS[k + 4]) elseif rph > 0 then out[n + 3] = ahead(KEYS[k + 5]) end
    out[n + 4] = -1
    if tpm > 0 then out[n + 4] = ahead(KEYS[k + 6]) end
    break
  end
end
return out
""")

#: KEYS per subject: period hash (of the reservation), holds, amounts, tpm. ARGV: now_ms, lease, cost nano,
#: tokens, subjects, then per subject: tpm. Idempotent for a lease whose hold is gone (expired, or never made:
#: a charge for what was admitted while Redis was away): only the cost and the tokens are added then.
SETTLE = Script("""
local now = tonumber(ARGV[1])
local lease = ARGV[2]
local cost = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
for i = 1, n do
  local k = (i - 1) * 4
  redis.call('ZREM', KEYS[k + 2], lease)
  local v = redis.call('HGET', KEYS[k + 3], lease)
  if v then
    local sp = string.find(v, ' ')
    redis.call('HINCRBY', string.sub(v, sp + 1), 'reserved', -tonumber(string.sub(v, 1, sp - 1)))
    redis.call('HDEL', KEYS[k + 3], lease)
  end
  if cost > 0 and KEYS[k + 1] ~= '-' then redis.call('HINCRBY', KEYS[k + 1], 'spent', cost) end
  local tpm = tonumber(ARGV[5 + i])
  if tokens > 0 and tpm > 0 then
    local tat = tonumber(redis.call('GET', KEYS[k + 4]) or now)
    if tat < now then tat = now end
    tat = tat + tokens * 60000 / tpm
    redis.call('SET', KEYS[k + 4], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
end
return 1
""")


class BudgetShort(Exception):
    """A subject's budget (or its local share) cannot hold the reservation; its owner words the 429."""

    def __init__(self, subject: "Subject", remaining: int) -> None:
        super().__init__(subject.name)
        self.subject = subject
        self.remaining = remaining


_WHICH = {"rpm": "requests per minute", "rph": "requests per hour", "tpm": "tokens per minute"}


def period_key(name: str, period_start: float) -> str:
    """The hash of subject ``name``'s budget period that starts at ``period_start`` (wall seconds)."""
    return f"{PREFIX}{name}:p:{int(period_start)}"


class Subject:
    """One holder of limits and a budget as the scripts see it (a key, a team, a configuration key)."""

    __slots__ = ("name", "label", "limits", "budget", "holder", "period_start", "period_end", "base", "period",
                 "admit_keys", "admit_args", "settle_keys")

    def __init__(self, name: str, label: str, limits: LimitValues, budget: int, holder: Any,
                 period_start: float, period_end: float) -> None:
        self.name = name
        self.label = label
        self.limits = limits
        self.budget = budget  # nano-USD; -1: none
        self.holder = holder  # the Allowance this instance keeps (spend it stores and reports), or None
        self.period_start = period_start
        self.period_end = period_end
        base = self.base = PREFIX + name
        #: The budget period's hash ("-" without a budget); a subject is made anew for each period.
        self.period = period_key(name, period_start) if budget >= 0 else "-"
        self.admit_keys = (self.period, base + ":holds", base + ":amounts", base + ":rpm", base + ":rph",
                           base + ":tpm")
        self.settle_keys = (base + ":holds", base + ":amounts", base + ":tpm")
        #: ADMIT's arguments for this subject but the spend floor (between the first two and the rest).
        self.admit_args = ((budget, int(period_end * 1000) if math.isfinite(period_end) else -1),
                           (limits.rpm, limits.rph, limits.tpm, limits.max_concurrent))


class FleetLease:
    """An admitted request (shared or local share); settle/release queue its end for Redis."""

    __slots__ = ("_fleet", "_subjects", "_id", "_amount", "_periods", "_states", "_shares", "_team", "_done",
                 "headers")

    def __init__(self, fleet: "FleetLimits", subjects: tuple, lease_id: str, amount: int, periods: tuple,
                 states: tuple = (), shares: tuple = (), team: str | None = None) -> None:
        self._fleet = fleet
        self._subjects = subjects
        self._id = lease_id
        self._amount = amount
        self._periods = periods
        self._states = states  # local limiter states (the local share), when admitted without Redis
        self._shares = shares  # local budget shares, likewise
        self._team = team
        self._done = 0  # 0 admitted, 1 settled, 2 released
        self.headers: list = []

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        if self._done:
            return
        self._done = 1
        nano = round(cost * 1_000_000_000) if cost > 0 else 0
        self._end(nano, tokens_in + tokens_out)

    def release(self) -> None:
        if self._done == 2:
            return
        if self._done == 0:
            self._end(0, 0)
        self._done = 2
        for st in self._states:
            release_state(st)

    def _end(self, nano: int, tokens: int) -> None:
        fleet = self._fleet
        fleet._live.pop(self._id, None)
        for share in self._shares:
            share[0] += self._amount - nano
        gov = fleet.governance
        for s in self._subjects:
            h = s.holder
            if h is not None and nano:
                h.spent += nano
                gov._dirty.add(h)
        if nano:
            gov.add_team_spend(self._team or "", nano)
        if self._states and tokens:
            now = trio.current_time()
            for st in self._states:
                t = st.tokens
                if t is not None:
                    t.take(tokens, now)
        if nano or tokens or not (self._states or self._shares):  # a local share's lease has no hold there
            fleet.queue_settle(self._subjects, self._id, self._periods, nano, tokens)


class _Queue(collections.deque):
    """One subject's admissions waiting on this instance ([limits] queue), oldest first (the head tries the
    script), each a ``trio.Event`` set when its turn comes; ``refusal`` is the last 429 the head got."""

    __slots__ = ("refusal",)

    def __init__(self) -> None:
        super().__init__()
        self.refusal: GatewayError | None = None


def _again(refusal: GatewayError, suffix: str) -> GatewayError:
    """A copy of the queue head's last refusal, for a waiter that did not try itself (``suffix`` added)."""
    return GatewayError(refusal.status, refusal.message + suffix, refusal.type, param=refusal.param,
                        code=refusal.code, headers=list(refusal.headers))


class FleetLimits:
    """The shared admission backend (see the module docstring). ``governance`` is the Governance it serves
    (its limiter keeps the local share's buckets; its allowances the spend this instance stores)."""

    #: What its owner builds subjects with and catches (governance stands beside this module: no import).
    Subject = Subject
    BudgetShort = BudgetShort

    def __init__(self, redis: RedisClient, governance: Any, *, instance: str | None = None,
                 wall: Callable[[], float] | None = None, hold_ttl: float = HOLD_TTL) -> None:
        self.redis = redis
        #: Seconds a hold lives unless renewed ([cluster] hold_ttl_ms); renewed every third of it.
        self.hold_ttl = hold_ttl
        #: lease id -> its subjects, for each request admitted through Redis and not yet ended here.
        self._live: dict[str, tuple] = {}
        self.renewals = 0
        self.governance = governance
        self.instance = instance or instance_id()
        self.wall = wall or governance.wall
        self._seq = 0
        self._queue: collections.deque = collections.deque()
        self._wake = trio.Event()
        #: Set (and renewed) each time a batch of this instance's settlements has reached Redis: queued
        #: admissions try again then.
        self._released = trio.Event()
        #: subject name -> the admissions of it waiting here, in order ([limits] queue; see admit_queued).
        self._waiting: dict[str, _Queue] = {}
        #: "shared" while admissions go through Redis, "local" while this instance's share applies.
        self.mode = "shared"
        #: Live instances at the last heartbeat (1 until one was read).
        self.instances = 1
        #: subject name -> budget remaining as last seen in Redis (nano-USD).
        self._seen: dict[str, int] = {}
        #: subject name -> [local share left] while local (made at the first local admission of each).
        self._shares: dict[str, list] = {}
        self.shared_admissions = 0
        self.local_admissions = 0
        self.degradations = 0
        self.settled = 0

    # -- admission -------------------------------------------------------------------------------------

    async def admit(self, subjects: tuple, amount: int, team: str | None = None) -> FleetLease:
        """Admit one request on every subject at once, or raise its 429. One script call; the local share
        when Redis cannot answer."""
        self._seq += 1
        lease_id = f"{self.instance}:{self._seq}"
        wall_ms = self.wall() * 1000
        keys: list = []
        args: list = [int(wall_ms), lease_id, int(wall_ms + self.hold_ttl * 1000), amount, len(subjects)]
        for s in subjects:
            keys += s.admit_keys
            head, tail = s.admit_args
            args += head
            args.append(s.holder.spent if s.holder is not None and s.budget >= 0 else 0)
            args += tail
        try:
            reply = await ADMIT(self.redis, keys, args)
        except RedisUnavailable as exc:
            if isinstance(exc, RedisTimeout):
                # It may have run: give back whatever it took (sent after it on the same connection).
                self.queue_settle(subjects, lease_id, tuple(s.period for s in subjects), 0, 0)
            return self._admit_local(subjects, amount, team, lease_id, exc)
        except RedisReplyError as exc:
            log.error("fleet limits: the admission script failed (%s); this instance's share applies", exc)
            return self._admit_local(subjects, amount, team, lease_id, exc)
        if self.mode != "shared":
            log.warning("fleet limits: Redis answers again; limits and budgets are shared again")
            self.mode = "shared"
            self._shares.clear()
        if reply[0] == 1:
            self.shared_admissions += 1
            n = len(subjects)
            for s, left in zip(subjects, reply[1:n + 1]):
                if s.budget >= 0:
                    self._seen[s.name] = int(left)
            for s in subjects:
                if s.holder is not None:
                    s.holder.requests += 1
            lease = FleetLease(self, subjects, lease_id, amount, tuple(s.period for s in subjects), team=team)
            self._live[lease_id] = subjects
            if len(reply) > n + 3:
                lease.headers = self._headers(subjects[int(reply[n + 1]) - 1], int(reply[n + 2]), int(reply[n + 3]))
            return lease
        _, index, which, number = reply
        which = which.decode() if isinstance(which, bytes) else str(which)
        s = subjects[int(index) - 1]
        if which == "budget":
            if s.budget >= 0:
                self._seen[s.name] = int(number)
            raise BudgetShort(s, int(number))
        raise self._limit_refusal(s, which, int(number))

    async def admit_queued(self, subjects: tuple, amount: int, team: str | None = None) -> FleetLease:
        """``[limits] queue`` with the fleet: :meth:`admit`, and while a rate limit refuses, wait and try the
        script again, at most the limiter's ``queue_timeout`` (then its 429, saying it waited).

        This instance's waiters of one subject (``subjects[0]``: the key's, or its team's for a key with no
        limits or budget of its own) are a FIFO queue, as the local limiter's are: only its head tries the
        script again, and a request that finds others waiting joins the end without trying (no overtaking). A
        head that leaves (admitted, refused otherwise, timed out, cancelled) hands the turn to the next at once.
        The head tries again when this instance's own settlements reach Redis (a hold here was given back),
        after the refusal's own retry time (a bucket refilling) or after a backoff doubling from 50 ms to 1 s (a
        hold given back by another instance): one script call per wake-up, no busy loop. A waiter that never got
        to try is answered with the last refusal its queue's head got. At most the limiter's ``queue_size``
        requests of one subject wait here; more are refused at once. Across instances there is no order: each
        instance's head competes in the script."""
        limiter = self.governance.limiter
        name = subjects[0].name
        deadline = trio.current_time() + limiter.queue_timeout
        queue = self._waiting.get(name)
        me = None
        try:
            if queue is not None:  # others wait: to the end of the queue, or refused when it is full
                if len(queue) >= limiter.queue_size:
                    limiter.refused += 1
                    raise _again(queue.refusal, "")
                me = self._join(queue)
            backoff = 0.05
            while True:
                if me is not None and queue[0] is not me:  # others ahead: its turn, without trying
                    with trio.move_on_at(deadline):
                        await me.wait()
                    if queue[0] is not me:  # its time ran out before its turn came
                        limiter.refused += 1
                        raise _again(queue.refusal, f" (waited {limiter.queue_timeout:g}s in the queue)")
                released = self._released
                try:
                    return await self.admit(subjects, amount, team)
                except GatewayError as exc:
                    if exc.status != 429 or exc.code != "rate_limit_exceeded":
                        raise
                    now = trio.current_time()
                    if now >= deadline:
                        if me is not None:
                            exc.message += f" (waited {limiter.queue_timeout:g}s in the queue)"
                            exc.args = (exc.message,)
                        raise
                    if me is None:
                        queue = self._waiting.get(name)  # another may have made it while this one tried
                        if queue is None:
                            if limiter.queue_size < 1:
                                raise
                            queue = self._waiting[name] = _Queue()
                        elif len(queue) >= limiter.queue_size:
                            raise
                        me = self._join(queue)
                    queue.refusal = exc
                    limiter.refused -= 1  # not refused (yet): it waits
                    if queue[0] is not me:
                        continue
                    wait = backoff
                    for k, v in exc.headers:
                        if k == b"retry-after-ms":
                            wait = max(wait, int(v) / 1000)
                    backoff = min(backoff * 2, 1.0)
                    with trio.move_on_at(min(now + wait, deadline)):
                        await released.wait()
        finally:
            if me is not None:
                head = queue[0] is me
                queue.remove(me)
                if not queue:
                    del self._waiting[name]
                elif head:
                    queue[0].set()

    def _join(self, queue: "_Queue") -> trio.Event:
        """A place at the end of ``queue``: an event set when it is the head's turn."""
        me = trio.Event()
        queue.append(me)
        self.governance.limiter.queued += 1
        return me

    async def admit_hit(self, subjects: tuple, team: str | None) -> bool:
        """Count a response-cache hit on every subject (ADMIT at amount 0: the rate limits, a budget already
        overspent, the period's request count) and give its hold back at once; False when refused."""
        try:
            lease = await self.admit(subjects, 0, team)
        except GatewayError:
            self.governance.limiter.refused -= 1  # the pipeline serves it now, and counts its refusal
            return False
        except BudgetShort:
            return False
        lease.release()
        return True

    def _headers(self, s: Subject, requests_ahead: int, tokens_ahead: int) -> list:
        """The ``x-ratelimit-*`` headers of ``s``'s shared buckets as ADMIT left them (ms ahead of now),
        made by the local limiter's own builder on a view of them (a limiter state no request takes)."""
        view = self.governance.limiter.state("fleet:" + s.name, s.limits, s.label)
        now = trio.current_time()
        b = view.minute or view.hour
        if b is not None and requests_ahead >= 0:
            b.tat = now + requests_ahead / 1000
        if view.tokens is not None and tokens_ahead >= 0:
            view.tokens.tat = now + tokens_ahead / 1000
        return KeyLimiter._headers(view, now)

    def _admit_local(self, subjects: tuple, amount: int, team: str | None, lease_id: str,
                     why: Exception) -> FleetLease:
        if self.mode != "local":
            self.mode = "local"
            self.degradations += 1
            log.warning("fleet limits: Redis cannot answer (%s); this instance applies its share (1/%d) of "
                        "every limit and budget until it is back", why, self.instances)
        n = max(1, self.instances)
        shares = []
        for s in subjects:
            if s.budget < 0:
                continue
            share = self._shares.get(s.name)
            if share is None:
                seen = self._seen.get(s.name, s.budget)
                share = self._shares[s.name] = [seen // n]
            if share[0] < amount:
                raise BudgetShort(s, share[0])
            shares.append(share)
        limiter = self.governance.limiter
        states = tuple(limiter.state("share:" + s.name, _share(s.limits, n), s.label)
                       for s in subjects if s.limits)
        if states:
            limiter.take(states, trio.current_time())
        for share in shares:
            share[0] -= amount
        for s in subjects:
            if s.holder is not None:
                s.holder.requests += 1
        self.local_admissions += 1
        # No hold in Redis: settling charges the spend only (SETTLE with a lease id Redis never saw).
        lease = FleetLease(self, subjects, lease_id, amount, tuple(s.period for s in subjects), states,
                           tuple(shares), team)
        if states:
            lease.headers = KeyLimiter._headers(states[0])
        return lease

    def _limit_refusal(self, s: Subject, which: str, number: int) -> GatewayError:
        lim = s.limits
        if which == "concurrent":
            msg = (f"rate limit reached: {s.label} already has {number} requests in flight across the fleet "
                   f"(limit {lim.max_concurrent}); wait for one to finish")
            headers = [(b"retry-after", b"1")]
        else:
            wait = number / 1000
            limit = {"rpm": lim.rpm, "rph": lim.rph, "tpm": lim.tpm}[which]
            msg = f"rate limit reached: {limit} {_WHICH[which]} for {s.label}; retry after {max(wait, 0.001):.3g}s"
            headers = [(b"retry-after", str(max(1, math.ceil(wait))).encode()),
                       (b"retry-after-ms", str(max(1, number)).encode())]
        self.governance.limiter.refused += 1
        return GatewayError(429, msg, "rate_limit_error", code="rate_limit_exceeded", headers=headers)

    # -- settlements -----------------------------------------------------------------------------------

    def queue_settle(self, subjects: tuple, lease_id: str, periods: tuple, nano: int, tokens: int) -> None:
        keys: list = []
        tpms: list = []
        for s, period in zip(subjects, periods):
            keys.append(period)
            keys += s.settle_keys
            tpms.append(s.limits.tpm)
        args = [int(self.wall() * 1000), lease_id, nano, tokens, len(subjects), *tpms]
        self._queue.append(SETTLE.call(keys, args))
        self._wake.set()

    async def _sender(self) -> None:
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            if not await self.send_batch():
                await trio.sleep(0.2)  # kept, in order; retried until Redis takes them

    async def send_batch(self) -> bool:
        """Send up to ``BATCH`` queued settlements in one round trip; False (all kept) when Redis cannot."""
        queue = self._queue
        batch = [queue[i] for i in range(min(len(queue), BATCH))]
        try:
            replies = await self.redis.pipeline(batch, timeout=max(self.redis.timeout, 1.0))
        except RedisError:
            return False
        for _ in batch:
            queue.popleft()
        self.settled += len(batch)
        self._released.set()
        self._released = trio.Event()
        for reply in replies:
            if isinstance(reply, RedisReplyError):
                log.error("fleet limits: a settlement was refused by Redis: %s", reply)
        return True

    async def read_periods(self, periods: list) -> list | None:
        """The fleet's ``(spent, reserved, requests)`` (nano-USD, nano-USD, count) of each ``(subject name,
        period start)`` in ``periods``, None for a period Redis has no hash of (nothing admitted through it
        yet), in one pipelined round trip; None when Redis cannot answer. For the admin views, off the
        request path."""
        commands = [("HMGET", period_key(name, start), "spent", "reserved", "requests") for name, start in periods]
        try:
            replies = await self.redis.pipeline(commands, timeout=max(self.redis.timeout, 1.0))
        except RedisError:
            return None
        out = []
        for reply in replies:
            if isinstance(reply, Exception) or not isinstance(reply, list) or reply[0] is None:
                out.append(None)
            else:
                out.append(tuple(int(v) if v is not None else 0 for v in reply))
        return out

    async def renew_holds(self) -> int:
        """Move the expiry of every hold this instance's running requests have in Redis to a whole
        ``hold_ttl`` from now (a request longer than it keeps its place): per holds key one ``ZADD XX``
        (a hold already gone is not made again), the keys' own expiries after them, pipelined in batches
        of ``BATCH`` commands. Returns how many holds it renewed; raises RedisError when Redis cannot."""
        live = self._live
        if not live:
            return 0
        until = int(self.wall() * 1000 + self.hold_ttl * 1000)
        zadds: dict[str, list] = {}
        keys: set[str] = set()
        count = 0
        for lease_id, subjects in live.items():
            for s in subjects:
                holds = s.admit_keys[1]
                args = zadds.get(holds)
                if args is None:
                    args = zadds[holds] = ["ZADD", holds, "XX"]
                    keys.add(holds)
                    if s.budget >= 0:
                        keys.add(s.admit_keys[2])  # the reservations the holds carry
                args += (until, lease_id)
                count += 1
        commands = [tuple(args) for args in zadds.values()]
        commands += [("PEXPIREAT", key, until + 1000) for key in keys]
        timeout = max(self.redis.timeout, 1.0)
        for i in range(0, len(commands), BATCH):
            await self.redis.pipeline(commands[i:i + BATCH], timeout=timeout)
        self.renewals += count
        return count

    async def _renewer(self) -> None:
        while True:
            await trio.sleep(self.hold_ttl / 3)
            try:
                await self.renew_holds()
            except RedisError as exc:  # the holds stand until their expiry; the next round tries again
                log.warning("fleet limits: holds not renewed (%s)", exc)

    async def _heartbeat(self) -> None:
        while True:
            now_ms = int(time.time() * 1000)
            try:
                replies = await self.redis.pipeline([
                    ("ZADD", INSTANCES, now_ms, self.instance),
                    ("ZREMRANGEBYSCORE", INSTANCES, "-inf", now_ms - int(INSTANCE_TTL * 1000)),
                    ("ZCARD", INSTANCES),
                ])
                if isinstance(replies[2], int):
                    self.instances = max(1, replies[2])
            except RedisError:
                pass  # the last count stands while Redis is away
            await trio.sleep(HEARTBEAT)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._sender)
            nursery.start_soon(self._renewer)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(1.0) as scope:
                    scope.shield = True
                    while self._queue and await self.send_batch():
                        pass  # the settlements of requests that finished before the stop
                    try:
                        await self.redis.execute("ZREM", INSTANCES, self.instance)
                    except RedisError:
                        pass

    def snapshot(self) -> dict:
        return {"mode": self.mode, "instances": self.instances, "queued_settlements": len(self._queue),
                "shared_admissions": self.shared_admissions, "local_admissions": self.local_admissions,
                "degradations": self.degradations, "settled": self.settled,
                "queued_admissions": sum(map(len, self._waiting.values())), "live_holds": len(self._live),
                "renewed_holds": self.renewals}


def _share(limits: LimitValues, n: int) -> LimitValues:
    """This instance's share of ``limits`` among ``n`` live instances (at least 1 of a limit that is on)."""
    if n <= 1:
        return limits

    def part(v: int) -> int:
        return max(1, v // n) if v else 0

    return LimitValues(part(limits.rpm), part(limits.rph), part(limits.tpm), part(limits.max_concurrent))
