"""The pipeline's admission with keys, teams and budgets: reserve before dispatch, settle after, on every path.

:class:`Governance` implements :class:`~runestone.routing.executor.Admission`. For a managed key it checks,
in this order and before any upstream call: the key is active (revoked or expired: 401), the model is on
the key's and its team's allow-lists (403 ``model_not_allowed``), the request's worst-case cost fits the
key's and the team's remaining budgets (429 ``insufficient_quota``/``budget_exceeded``), then the key's and
the team's rate limits (the limiter's 429s, or its fair queue); then it *reserves* the worst-case cost on
both budgets. The worst case is the estimated input tokens at the input price plus the output cap
(``max_completion_tokens``/``max_tokens``/``max_output_tokens``, or ``default_output_tokens``; times ``n``)
at the output price, the dearest of the plan's targets. When the request is recorded the lease is settled
to the real cost (the pipeline's, from the upstream's usage and the one price table) and released; a
request that got no answer settles at 0, which gives the whole reservation back.

Atomicity: the fit check and the reservation are synchronous code with no checkpoint between them, and
trio switches tasks only at checkpoints, so 200 concurrent requests at a budget's edge are admitted
exactly as far as their reservations fit. When a limiter wait (queue mode) comes between, the fit is
checked again after it. Money is nano-USD integers, so sums are exact.

Nothing here waits on a mailbox or the disk: key lookup is a dict hit on the secret's digest, the
allowances are in memory, and spend reaches the store through a batch written by :meth:`Governance.run`
on a worker thread every ``flush_interval`` (and at stop). Between two batches the budget journal
(:mod:`.journal`) holds every request's end (its cost, written before the answer goes out), a copy into a
memory-mapped file, so a SIGKILL loses no spend: the next start replays it, charges and counts what
ended, and logs one line with the counts. A reservation is in memory only: one in flight at a SIGKILL
is gone with the process (its request never ended: no complete answer reached its client). A request
counts in a period when it ends, as its row in the usage ledger does. Keys from the configuration (and
``RUNESTONE_API_KEYS``) are not managed here: they get the configured limits and no budget, as before.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import secrets
import time
from typing import Any, Callable

import attrs
import trio

from ..front.limits import KeyLimiter, LimitValues
from ..routing.errors import GatewayError
from ..telemetry.costs import price_for
from ..telemetry.events import BudgetExceeded
from ..wire.token_estimate import estimate_input_tokens
from .periods import iso, period_bounds
from .records import (NANO, NO_LIMITS, Budget, KeyRecord, Team, allows, key_from_doc, parse_key, parse_key_patch,
                      parse_team, parse_team_patch, team_from_doc, usd)
from .journal import SpendJournal
from .store import KeyStore, KeyStoreError

__all__ = ["Allowance", "Governance", "GovernedLease"]

log = logging.getLogger("runestone.governance")

#: Key changes whose fleet entry carries the whole resulting record (``apply_change``).
_KEY_OPS = frozenset(("create_key", "update_key", "revoke_key", "rotate_key"))
#: Longest grace a rotation may give the previous secret.
MAX_GRACE_MS = 30 * 86400 * 1000

@attrs.define(slots=True, eq=False)
class Allowance:
    """One budget holder's running account (a managed key's, or a team's), in nano-USD."""

    scope: str  # "key" | "team"
    name: str
    budget: Budget | None
    period: str
    period_start: float
    resets_at: float
    spent: int = 0
    #: The outstanding reservations' sum (integers: exactly 0 once each is settled or released).
    reserved: int = 0
    #: Requests ended in the current period (answered, failed or cancelled; cached answers included). With
    #: the fleet's shared limits, runestone.cluster.limits counts them at admission instead, as Redis does.
    requests: int = 0
    #: ``budget.nano`` (None without a budget): what admission checks, kept with the budget.
    cap: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.cap = self.budget.nano if self.budget is not None else None

    def roll(self, wall: float) -> bool:
        """Start a new period if ``wall`` is past this one's end; True when it did."""
        if wall < self.resets_at:
            return False
        self.period_start, self.resets_at = period_bounds(self.period, wall)
        self.spent = 0
        self.requests = 0
        return True

    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget.nano - self.spent - self.reserved

    def view(self) -> dict:
        budget = self.budget
        remaining = self.remaining()
        return {"period": self.period, "period_start": iso(self.period_start) if self.period != "total" else None,
                "resets_at": iso(self.resets_at), "spent_usd": usd(self.spent), "reserved_usd": usd(self.reserved),
                "budget_usd": usd(budget.nano) if budget else None,
                "remaining_usd": usd(max(remaining, 0)) if remaining is not None else None,
                "requests": self.requests}


class _FreeLease:
    """The lease of a caller with nothing to account for (no limits, no budget)."""

    __slots__ = ()
    headers: list = []

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        pass

    def release(self) -> None:
        pass


FREE = _FreeLease()
_UNPRICED = object()


class GovernedLease:
    """A managed key's admitted request: its reservation on each budget (its account's holders) and its
    place in the limiter states it was taken on (the key's and its team's, each with a request taken).
    Its end is one line in the budget journal, when there is one."""

    __slots__ = ("_gov", "_acct", "_amount", "_state", "_headers")

    def __init__(self, gov: "Governance", acct: "_Account", amount: int) -> None:
        self._gov = gov
        self._acct = acct
        self._amount = amount
        self._state = 0  # 0 reserved, 2 ended (settled or released)
        self._headers = None

    @property
    def headers(self) -> tuple:
        """The ``x-ratelimit-*`` headers of the first limiter state (the key's when it has limits), as its
        buckets are when first read, or at the settlement if that comes first (in the same step as the
        answer's headers are made: one clock reading for both)."""
        headers = self._headers
        if headers is None:
            states = self._acct.states
            headers = self._headers = KeyLimiter._headers(states[0], None, True) if states else ()
        return headers

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        """Turn the reservation into the real cost (0 for a request that got no answer) and end the lease:
        the request is over (its recording is the last thing done with it), so it is counted, its end
        journaled, and its place in the limiter states given back in the same step as its tokens are added
        to them; ``release`` then does nothing. The holders stay in the flush's set while they have
        reservations (see :meth:`flush`): nothing to mark here."""
        if self._state:
            return
        self._state = 2
        acct = self._acct
        amount = self._amount
        nano = round(cost * NANO) if cost > 0 else 0
        journal = self._gov.journal
        if journal is not None:
            journal.write(b"%s%d\n" % (acct.ended, nano))
        for h in acct.holders:
            h.reserved -= amount
            h.spent += nano
            h.requests += 1
        if nano:
            acct.team_spend[0] += nano
        states = acct.states
        if states:
            now = trio.current_time()
            tokens = tokens_in + tokens_out
            for st in states:  # release_state and add_tokens, inline: a debt may build up, paid back at its rate
                st.active -= 1
                if st.waiters:
                    st.waiters[0].set()
                t = st.tokens
                if t is not None:
                    tat = t.tat
                    t.tat = (tat if tat > now else now) + tokens * t.interval
            if self._headers is None:
                self._headers = KeyLimiter._headers(states[0], now, True)

    def release(self) -> None:
        """End the lease without an answer (refused, failed, cancelled): its reservation given back. After
        :meth:`settle`, nothing."""
        if self._state:
            return
        self._state = 2
        acct = self._acct
        amount = self._amount
        journal = self._gov.journal
        if journal is not None:
            journal.write(acct.ended + b"0\n")
        for h in acct.holders:
            h.reserved -= amount
            h.requests += 1
        for st in acct.states:  # release_state, inline
            st.active -= 1
            if st.waiters:
                st.waiters[0].set()


@attrs.define(slots=True, eq=False)
class _Account:
    """A managed key as admission needs it, resolved once and kept until the key, a team or a budget
    changes (the cache is cleared) or ``until`` (a period's end, the key's expiry) passes."""

    key: KeyRecord
    team: Team | None
    #: The key's allowance, then its team's.
    holders: tuple
    #: The limiter states that bind it: the key's (when it has limits), then its team's (when it has some).
    states: tuple
    #: The journal's holder fields: b"<key id> <team or ->".
    fields: bytes
    until: float
    #: Its requests' end line in the budget journal, but for the cost: b"E<wall> <key id> <team or -> ", where
    #: <wall> is the latest start of its holders' periods: a line counts in the period of each holder
    #: that holds this wall, which is the period its account was made in (the account is made again at
    #: ``until``).
    ended: bytes
    #: Model names both allow-lists allow as they are (a bounded cache of the check).
    allowed: set = attrs.Factory(set)
    #: Its subjects in the fleet's shared limits (runestone.cluster.limits), made at its first admission there.
    subjects: tuple | None = None
    #: Its team's cell of spend (nano-USD, one element; "" for a key without a team): what
    #: ``spend_by_team`` shows (see Governance._team_cell).
    team_spend: list = attrs.field(kw_only=True)


def _checkpointed(journal: SpendJournal, floor: int, drop: bool) -> None:
    """After the spend was stored with ``floor`` (blocking: on a worker thread): the segments before it
    deleted (when ``drop``), and the one after it made for the next flush's rotation."""
    if drop:
        try:
            journal.drop_before(floor)
        except OSError as exc:
            log.error("budget journal: old segments not deleted (a replay skips them): %s", exc)
    try:
        journal.prepare(floor + 1)
    except OSError as exc:
        log.error("budget journal: the next segment could not be made: %s", exc)


def new_key_id() -> str:
    return "key_" + os.urandom(6).hex()


def new_secret() -> str:
    return "rsk-" + secrets.token_urlsafe(32)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Governance:
    """Managed keys and teams, their allowances, and the pipeline's admission.

    ``wall`` is the wall clock budget periods are judged by (``time.time``; tests pass one driven by
    trio's MockClock). ``limiter`` keeps every rate limit (configured defaults, keys' and teams' own).
    """

    def __init__(self, store: KeyStore | None, limiter: KeyLimiter, *, pricing: dict | None = None,
                 telemetry: Any = None, default_output_tokens: int = 4096, flush_interval: float = 1.0,
                 wall: Callable[[], float] = time.time, journal: SpendJournal | None = None) -> None:
        self.store = store
        #: Reservations and settlements on disk until the next flush (None: spend is in memory until then).
        self.journal = journal if store is not None and store.keeps_journal else None
        #: key id -> b"<key id> <team or ->" (the journal's holder fields).
        self._holder_fields: dict[str, bytes] = {}
        #: What the last start recovered from the journal (the state dump shows it).
        self.recovered: dict | None = None
        #: The journal segments below this one are deleted (the stored spend includes them).
        self._journal_floor = 0
        self.limiter = limiter
        self.pricing = pricing or {}
        self.telemetry = telemetry
        self.default_output_tokens = default_output_tokens
        self.flush_interval = flush_interval
        self.wall = wall
        self.keys: dict[str, KeyRecord] = {}
        self.teams: dict[str, Team] = {}
        #: secret digest -> key id (current secrets); previous secrets within their grace apart.
        self._by_digest: dict[bytes, str] = {}
        self._previous: dict[bytes, str] = {}
        self._allowances: dict[tuple[str, str], Allowance] = {}
        self._limits: dict[str, LimitValues] = {}
        #: key id -> its admission account (cleared by every change of a key, a team or a budget).
        self._accounts: dict[str, _Account] = {}
        self._prices: dict[tuple[str, str], tuple[float, float] | None] = {}
        #: The last plan worst_case priced, its one price (when it has one), and its targets' prices.
        self._plan_prices: tuple = (None, None, ())
        self._dirty: set[Allowance] = set()
        #: The accounts that reserved since the last flush (their holders are written by it).
        self._touched: set[_Account] = set()
        self._changes = trio.Lock()
        #: Called when the first managed key exists (the app closes open mode then).
        self.on_first_key: Callable[[], None] | None = None
        #: nano-USD spent per team ("" for keys without one): a one-element cell each, which the team's
        #: accounts share (a settlement adds to it at once); ``spend_by_team`` reads them.
        self._team_spend: dict[str, list] = {}
        #: Refusals per (team, which budget).
        self.refusals: dict[tuple[str, str], int] = {}
        self.spend_write_failures = 0
        #: Hooks told of each key or team change made here, once in force and persisted (see subscribe).
        self._listeners: list[Callable[[dict, str], None]] = []
        #: [cluster] redis_url: limits and budgets shared by the fleet (runestone.cluster.limits.FleetLimits);
        #: None: this instance's own (the limiter and the allowances here).
        self.fleet = None
        #: configuration key id -> its runestone.cluster.limits.Subject (with ``fleet``).
        self._static_subjects: dict = {}

    # -- loading and indexing -------------------------------------------------------------------------

    def load(self) -> None:
        """Read keys, teams and spend from the store (blocking; once, at start). Raises KeyStoreError."""
        if self.store is None:
            return
        loaded = self.store.load()
        wall = self.wall()
        for team in loaded.teams:
            self.teams[team.name] = team
        for key in loaded.keys:
            self._install_key(key)
        for (scope, name), (start, nano, requests) in loaded.spend.items():
            a = self._allowance(scope, name, wall)
            if a is not None and a.period_start == start:
                a.spent, a.requests = nano, requests
        if self.journal is not None:
            self._recover(loaded.journal_floor, wall)

    def _recover(self, floor: int, wall: float) -> None:
        """Replay the journal past the stored spend, checkpoint the result, and say what it found."""
        journal = self.journal
        try:
            found = journal.replay(floor)
        except OSError as exc:
            raise KeyStoreError(f"the budget journal in {journal.dir} cannot be read: {exc}") from None
        self._journal_floor = floor
        touched: set[Allowance] = set()
        for (scope, name), walls in found.requests.items():
            a = self._allowance(scope, name, wall)
            if a is not None:
                a.requests += sum(1 for w in walls if w >= a.period_start)
                touched.add(a)
        for (scope, name), items in found.spent.items():
            a = self._allowance(scope, name, wall)
            if a is not None:
                a.spent += sum(nano for w, nano in items if w >= a.period_start)
                touched.add(a)
        self.recovered = {"segments": found.segments, "ended": found.ended, "charged_usd": usd(found.charged_nano),
                          "malformed_lines": found.malformed}
        if found.released:  # an earlier version's segments (see .journal)
            self.recovered.update(released=found.released, released_usd=usd(found.released_nano))
        if not found.segments:
            return
        # Checkpoint before serving: the replayed spend is stored, the old segments go, a new one starts.
        new = journal.gen + 1
        rows = [(a.scope, a.name, a.period_start, a.spent, a.requests) for a in touched]
        if self.store.degraded is not None:
            # The database is away: the replayed segments stay until the first flush that succeeds stores
            # the spend (it is dirty) with a floor past them.
            journal.start(new)
            self._dirty |= touched
        else:
            self.store.put_spend_now(rows, new)
            journal.start(new)
            self._journal_floor = new
            try:
                journal.drop_before(new)
            except OSError as exc:
                raise KeyStoreError(f"the budget journal in {journal.dir} cannot be cleaned up: {exc}") from None
        if found.ended or found.released or found.malformed:
            log.warning("budget journal replayed (%d segment(s) since the last stored spend): %d ended "
                        "request(s) counted, $%.6f charged%s; %d unreadable line(s)", found.segments, found.ended,
                        usd(found.charged_nano), f"; {found.released} reservation(s) of an earlier version in flight "
                        f"at the stop released (${usd(found.released_nano):.6f})" if found.released else "",
                        found.malformed)
        else:
            log.info("budget journal: nothing to replay (%d empty segment(s))", found.segments)

    def _install_key(self, key: KeyRecord) -> None:
        old = self.keys.get(key.id)
        if old is not None:
            self._by_digest.pop(old.digest, None)
            if old.previous_digest:
                self._previous.pop(old.previous_digest, None)
        self.keys[key.id] = key
        self._by_digest[key.digest] = key.id
        if key.previous_digest:
            self._previous[key.previous_digest] = key.id
        self._limits.pop(key.id, None)
        self._accounts.clear()
        self._holder_fields[key.id] = f"{key.id} {key.team or '-'}".encode()
        a = self._allowances.get(("key", key.id))
        if a is not None:
            self._rebudget(a, key.budget)

    def _allowance(self, scope: str, name: str, wall: float) -> Allowance | None:
        a = self._allowances.get((scope, name))
        if a is None:
            holder = self.keys.get(name) if scope == "key" else self.teams.get(name)
            if holder is None:
                return None
            budget = holder.budget
            period = budget.period if budget else "total"
            start, reset = period_bounds(period, wall)
            a = self._allowances[(scope, name)] = Allowance(scope, name, budget, period, start, reset)
        else:
            a.roll(wall)
        return a

    def _rebudget(self, a: Allowance, budget: Budget | None) -> None:
        a.budget = budget
        a.cap = budget.nano if budget is not None else None
        period = budget.period if budget else "total"
        if period != a.period:
            # A new kind of period starts its spend afresh: a day's spend is not a month's.
            a.period = period
            a.period_start, a.resets_at = period_bounds(period, self.wall())
            a.spent = 0
            a.requests = 0
        self._dirty.add(a)

    # -- authentication -------------------------------------------------------------------------------

    def key_id_for(self, digest: bytes) -> str | None:
        """The id of the active managed key whose secret has ``digest`` (KeyRing's hook), else None."""
        kid = self._by_digest.get(digest)
        if kid is None:
            kid = self._previous.get(digest)
            if kid is None:
                return None
            key = self.keys[kid]
            if key.previous_until is None or self.wall() >= key.previous_until:
                return None
        else:
            key = self.keys[kid]
        if key.revoked_at is not None or (key.expires_at is not None and self.wall() >= key.expires_at):
            return None
        return kid

    @property
    def has_keys(self) -> bool:
        return bool(self.keys)

    # -- admission ------------------------------------------------------------------------------------

    def _account(self, key: KeyRecord, wall: float) -> _Account:
        """``key``'s account now (401 for a revoked or expired key); kept in ``_accounts``."""
        team = self._active(key, wall)
        holders = tuple(self._holders(key, team, wall))
        limiter = self.limiter
        states = []
        limits = self._key_limits(key)
        if limits:
            states.append(limiter.state(key.id, limits, "this key"))
        if team is not None and team.limits:
            states.append(limiter.state("team:" + team.name, team.limits, f"team {team.name!r}"))
        until = min(h.resets_at for h in holders)
        if key.expires_at is not None and key.expires_at < until:
            until = key.expires_at
        fields = self._holder_fields[key.id]
        ended = b"E%d %s " % (max(h.period_start for h in holders), fields)
        acct = self._accounts[key.id] = _Account(key, team, holders, tuple(states), fields, until, ended,
                                                 team_spend=self._team_cell(key.team or ""))
        return acct

    async def admit_request(self, request, plan):
        """The pipeline's admission (runestone.routing.executor.Admission).

        The hot path: the key's :class:`_Account` from a dict, one float comparison for its periods and
        expiry, the allow-list from a set, the worst case, the fit, the limits, the reservation, and one
        journal line; nothing between the fit and the reservation yields."""
        key_id = request.key_id
        acct = self._accounts.get(key_id)
        wall = self.wall()
        if acct is None or wall >= acct.until:
            key = self.keys.get(key_id) if key_id is not None else None
            if key is None:
                limiter = self.limiter
                if limiter.enabled:
                    if self.fleet is not None:
                        return await self._fleet_admission((self._static_subject(key_id or "open"),), 0)
                    return await limiter.admit(key_id or "open")
                return FREE
            acct = self._account(key, wall)
        model = request.model
        if model not in acct.allowed:
            key, team = acct.key, acct.team
            self._check_models(key, team, model, plan)
            if allows(key.models, model) and (team is None or allows(team.models, model)) and len(acct.allowed) < 64:
                acct.allowed.add(model)
        amount = self.worst_case(request, plan)
        if self.fleet is not None:
            return await self._admit_fleet(acct, amount, model)
        for h in acct.holders:
            cap = h.cap
            if cap is not None and cap - h.spent - h.reserved < amount:
                raise self._refusal(h, cap - h.spent - h.reserved, amount, acct.key, acct.team, model)
        states = acct.states
        if states:
            limiter = self.limiter
            if limiter.queue:
                return await self._admit_queued(request, acct, amount)
            limiter.take(states, trio.current_time())
        return self._reserve(acct, amount)

    async def _admit_fleet(self, acct: _Account, amount: int, model: str):
        """Admission through the fleet's shared limits and budgets (runestone.cluster.limits, wired by app)."""
        fleet = self.fleet
        try:
            return await self._fleet_admission(self._subjects_of(acct), amount, acct.key.team)
        except fleet.BudgetShort as short:
            s = short.subject
            raise self._refusal(s.holder, short.remaining, amount, acct.key, acct.team, model) from None

    def _fleet_admission(self, subjects: tuple, amount: int, team: str | None = None):
        """The fleet's admission of ``subjects`` (an awaitable): waiting in its queue when ``[limits] queue``
        is on, else at once."""
        if self.limiter.queue:
            return self.fleet.admit_queued(subjects, amount, team)
        return self.fleet.admit(subjects, amount, team)

    def _subjects_of(self, acct: _Account) -> tuple:
        """``acct``'s subjects in the fleet's shared limits, made at its first admission there."""
        subjects = acct.subjects
        if subjects is None:
            subjects = acct.subjects = self._fleet_subjects(acct)
        return subjects

    def _fleet_subjects(self, acct: _Account) -> tuple:
        Subject = self.fleet.Subject
        key, team = acct.key, acct.team
        out = []
        for h, limits, label in ((acct.holders[0], self._key_limits(key), "this key"),
                                 *(((acct.holders[1], team.limits, f"team {team.name!r}"),) if team else ())):
            budget = h.budget.nano if h.budget is not None else -1
            if not limits and budget < 0 and h.scope == "key" and team is not None:
                continue  # nothing to share for the key itself: its team's subject does it
            out.append(Subject(f"{h.scope}:{h.name}", label, limits or NO_LIMITS, budget, h,
                               h.period_start, h.resets_at))
        return tuple(out)

    def _static_subject(self, key_id: str):
        s = self._static_subjects.get(key_id)
        if s is None:
            if len(self._static_subjects) >= 10_000:
                self._static_subjects.clear()
            s = self._static_subjects[key_id] = self.fleet.Subject("static:" + key_id, "this key",
                                                                   self.limiter.defaults, -1, None, 0.0, math.inf)
        return s

    async def _admit_queued(self, request, acct: _Account, amount: int) -> GovernedLease:
        """Admission when the limiter queues: wait for the key's and the team's turn, then judge the key and
        the budgets again as they are then."""
        limiter = self.limiter
        key, team = acct.key, acct.team
        leases = []
        try:
            limits = self._key_limits(key)
            if limits:
                leases.append(await limiter.admit(key.id, limits))
            if team is not None and team.limits:
                leases.append(await limiter.admit("team:" + team.name, team.limits, f"team {team.name!r}"))
            wall = self.wall()
            key = self.keys[key.id]
            acct = self._account(key, wall)
            for h in acct.holders:
                budget = h.budget
                if budget is not None and budget.nano - h.spent - h.reserved < amount:
                    raise self._refusal(h, budget.nano - h.spent - h.reserved, amount, key, acct.team, request.model)
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        # The states the requests were taken on (the key's team may have changed during the wait).
        return self._reserve(attrs.evolve(acct, states=tuple(lease.state for lease in leases)), amount)

    def _reserve(self, acct: _Account, amount: int) -> GovernedLease:
        """Reserve ``amount`` on ``acct``'s holders (in memory only: see the module docstring); no
        checkpoint since the fit was judged. The request is counted, and journaled, when it ends."""
        for h in acct.holders:
            h.reserved += amount
        self._touched.add(acct)
        return GovernedLease(self, acct, amount)

    async def admit_cached(self, key_id: str | None, model: str) -> bool:
        """May ``key_id`` be answered from the cache now? Counts the request (rate limits and the key's and
        team's request counts; it costs nothing). False when anything would refuse or make it wait: the
        caller then serves the request through the pipeline, which refuses or queues it as it should.
        With the fleet's shared limits, the count is the fleet's (see :meth:`_cached_fleet`)."""
        key = self.keys.get(key_id) if key_id is not None else None
        limiter = self.limiter
        if key is None:
            if not limiter.enabled:
                return True
            if self.fleet is not None:
                return await self.fleet.admit_hit((self._static_subject(key_id or "open"),), None)
            lease = limiter.try_admit(key_id or "open")
            if lease is None:
                return False
            lease.release()
            return True
        wall = self.wall()
        try:
            team = self._active(key, wall)
            self._check_models(key, team, model, None)
        except GatewayError:
            return False
        if self.fleet is not None:
            return await self._cached_fleet(key, wall)
        holders = self._holders(key, team, wall)
        if any(h.budget is not None and h.remaining() < 0 for h in holders):
            return False
        leases = []
        limits = self._key_limits(key)
        if limits:
            lease = limiter.try_admit(key.id, limits)
            if lease is None:
                return False
            leases.append(lease)
        if team is not None and team.limits:
            lease = limiter.try_admit("team:" + team.name, team.limits, f"team {team.name!r}")
            if lease is None:
                for held in leases:
                    held.release()
                return False
            leases.append(lease)
        for lease in leases:
            lease.release()
        for h in holders:
            h.requests += 1
            self._dirty.add(h)
        if self.journal is not None:
            self.journal.write(b"Q%d %s\n" % (wall, self._holder_fields[key.id]))
        return True

    async def _cached_fleet(self, key: KeyRecord, wall: float) -> bool:
        """A cache hit counted on the fleet's shared limits: ADMIT at amount 0 (the rate limits and the
        period's request count; a budget already overspent refuses), its hold given back at once."""
        acct = self._accounts.get(key.id)
        if acct is None or wall >= acct.until:
            acct = self._account(key, wall)
        subjects = self._subjects_of(acct)
        if not await self.fleet.admit_hit(subjects, key.team):
            return False
        for h in acct.holders:  # the fleet counted the request on the holders it knows (their subjects)
            if all(s.holder is not h for s in subjects):
                h.requests += 1
            self._dirty.add(h)
        if self.journal is not None:
            self.journal.write(b"Q%d %s\n" % (wall, acct.fields))
        return True

    def _active(self, key: KeyRecord, wall: float) -> Team | None:
        if key.revoked_at is not None:
            raise GatewayError(401, f"the API key {key.id} was revoked; ask for a new key", "authentication_error",
                               code="invalid_api_key")
        if key.expires_at is not None and wall >= key.expires_at:
            raise GatewayError(401, f"the API key {key.id} expired at {iso(key.expires_at)}; ask for a new key",
                               "authentication_error", code="invalid_api_key")
        return self.teams.get(key.team) if key.team is not None else None

    @staticmethod
    def _check_models(key: KeyRecord, team: Team | None, model: str, plan) -> None:
        for models, whose in ((key.models, "this key"), (team.models if team else None, "this key's team")):
            if models is None or allows(models, model):
                continue
            # A name the allow-list does not hold (an alias, a group) may still plan only allowed models.
            if plan is not None and plan.targets and all(allows(models, t.model) for t in plan.targets):
                continue
            raise GatewayError(403, f"the model {model!r} is not allowed for {whose}; allowed: "
                               f"{', '.join(models) or 'none'}", "permission_error", param="model",
                               code="model_not_allowed")

    def _holders(self, key: KeyRecord, team: Team | None, wall: float) -> list[Allowance]:
        holders = [self._allowance("key", key.id, wall)]
        if team is not None:
            holders.append(self._allowance("team", team.name, wall))
        return holders

    def _key_limits(self, key: KeyRecord) -> LimitValues:
        limits = self._limits.get(key.id)
        if limits is None:
            own, d = key.limits, self.limiter.defaults
            limits = self._limits[key.id] = LimitValues(own.rpm or d.rpm, own.rph or d.rph, own.tpm or d.tpm,
                                                        own.max_concurrent or d.max_concurrent)
        return limits

    def _price(self, provider: str, model: str) -> tuple[float, float] | None:
        k = (provider, model)
        try:
            return self._prices[k]
        except KeyError:
            pass
        price = price_for(self.pricing, provider, model)
        parts = None
        if price is not None:
            if isinstance(price, dict):
                parts = (float(price["input_per_mtok"]), float(price["output_per_mtok"]))
            else:
                parts = (float(price.input_per_mtok), float(price.output_per_mtok))
        if len(self._prices) >= 10_000:
            self._prices.clear()
        self._prices[k] = parts
        return parts

    def _plan_prices_of(self, plan) -> tuple:
        """The (input, output) prices of ``plan``'s priced targets, kept for the next request with that plan
        (the router keeps a plan per model; the price table does not change while serving)."""
        prices = self._prices
        out = []
        for target in plan.targets:
            price = prices.get((target.provider, target.model), _UNPRICED)
            if price is _UNPRICED:
                price = self._price(target.provider, target.model)
            if price is not None:
                out.append(price)
        out = tuple(out)
        self._plan_prices = (plan, out[0] if len(out) == 1 else None, out)
        return out

    def worst_case(self, request, plan) -> int:
        """The most ``request`` may cost as ``plan`` would serve it, in nano-USD (see the module docstring)."""
        body = request.body
        tokens_in = estimate_input_tokens(body)
        if request.operation == "embed":
            tokens_out = 0
        else:
            cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
            if cap.__class__ is not int or cap <= 0:
                cap = self.default_output_tokens
            n = body.get("n")
            if n.__class__ is int and n > 1:
                cap *= n
            tokens_out = cap
        last = self._plan_prices
        if last[0] is plan:
            one = last[1]
            if one is not None:  # the common plan: one priced target
                dearest = tokens_in * one[0] + tokens_out * one[1]
                return math.ceil(dearest * 1000 - 1e-6) if dearest > 0 else 0
            prices = last[2]
        else:
            prices = self._plan_prices_of(plan)
        dearest = 0.0
        for price_in, price_out in prices:
            c = tokens_in * price_in + tokens_out * price_out
            if c > dearest:
                dearest = c
        # USD per million tokens -> nano-USD: x 1e-6 x 1e9; the tiny epsilon absorbs float noise.
        return math.ceil(dearest * 1000 - 1e-6) if dearest > 0 else 0

    def _check_fit(self, holders: list[Allowance], amount: int, key: KeyRecord, team: Team | None,
                   model: str) -> None:
        for h in holders:
            budget = h.budget
            if budget is None:
                continue
            remaining = budget.nano - h.spent - h.reserved
            if remaining >= amount:
                continue
            raise self._refusal(h, remaining, amount, key, team, model)

    def _refusal(self, h: Allowance, remaining: int, amount: int, key: KeyRecord, team: Team | None,
                 model: str) -> GatewayError:
        budget = h.budget
        whose = f"team {h.name!r}" if h.scope == "team" else f"this key ({key.name!r})"
        period = "total" if budget.period == "total" else f"{budget.period}ly"
        if budget.period == "day":
            period = "daily"
        if math.isfinite(h.resets_at):
            when = f"it resets at {iso(h.resets_at)}"
        else:
            when = "it is a total budget and does not reset: ask for a larger budget"
        msg = (f"budget exceeded: {whose} has ${usd(max(remaining, 0)):.6f} left of its ${usd(budget.nano):.6f} "
               f"{period} budget and this request may cost up to ${usd(amount):.6f} (its input and its output "
               f"cap at {model!r}'s prices); {when}. Lower max_tokens or wait for the reset")
        headers = []
        if math.isfinite(h.resets_at):
            headers.append((b"retry-after", str(max(1, math.ceil(h.resets_at - self.wall()))).encode()))
        team_name = team.name if team is not None else ""
        k = (team_name, h.scope)
        self.refusals[k] = self.refusals.get(k, 0) + 1
        if self.telemetry is not None:
            self.telemetry.emit(BudgetExceeded(key.id, team.name if team is not None else None, h.scope,
                                               budget.period, usd(budget.nano), usd(max(remaining, 0)), usd(amount),
                                               iso(h.resets_at), model, time.time()))
        return GatewayError(429, msg, "insufficient_quota", code="budget_exceeded", headers=headers)

    # -- reporting ------------------------------------------------------------------------------------

    def team_of(self, key_id: str | None) -> str | None:
        """The team of a managed key (the usage ledger records it with each row)."""
        key = self.keys.get(key_id) if key_id is not None else None
        return key.team if key is not None else None

    def _spend_view(self, scope: str, name: str) -> dict | None:
        a = self._allowance(scope, name, self.wall())
        return a.view() if a is not None else None

    def describe_key(self, key_id: str) -> dict:
        key = self.keys.get(key_id)
        if key is None:
            raise GatewayError(404, f"no key with id {key_id!r}; list them with GET /admin/keys", "not_found_error",
                               param="id", code="not_found")
        out = key.to_dict(self.wall())
        out["spend"] = self._spend_view("key", key.id)
        return out

    def describe_team(self, name: str) -> dict:
        team = self.teams.get(name)
        if team is None:
            raise GatewayError(404, f"no team named {name!r}; list them with GET /admin/teams", "not_found_error",
                               param="name", code="not_found")
        out = team.to_dict()
        out["spend"] = self._spend_view("team", name)
        out["keys"] = sorted(k.id for k in self.keys.values() if k.team == name)
        return out

    # With the fleet ([cluster] redis_url) the HTTP views show the fleet's spend: each budget's period hash
    # in Redis (one pipelined round trip for a whole listing), "spend_source": "fleet"; while Redis cannot
    # answer, this instance's own spend, "spend_source": "local". Without the fleet, as the sync views.

    async def key_view(self, key_id: str) -> dict:
        out = self.describe_key(key_id)
        await self._fleet_spend([(out, "spend", "key", key_id)])
        return out

    async def team_view(self, name: str) -> dict:
        out = self.describe_team(name)
        await self._fleet_spend([(out, "spend", "team", name)])
        return out

    async def keys_view(self) -> list[dict]:
        out = self.list_keys()
        await self._fleet_spend([(doc, "spend", "key", doc["id"]) for doc in out])
        return out

    async def teams_view(self) -> list[dict]:
        out = self.list_teams()
        await self._fleet_spend([(doc, "spend", "team", doc["name"]) for doc in out])
        return out

    async def own_view(self, key_id: str | None) -> dict:
        """``GET /v1/key`` (:meth:`caller_view`) with the fleet's spend."""
        out = self.caller_view(key_id)
        if out.get("source") == "managed":
            slots = [(out, "spend", "key", out["id"])]
            if out.get("team_spend") is not None:
                slots.append((out, "team_spend", "team", out["team"]))
            await self._fleet_spend(slots)
        return out

    async def _fleet_spend(self, slots: list) -> None:
        """Put the fleet's spend in each ``(doc, field, scope, name)``'s ``doc[field]`` (an allowance view)."""
        fleet = self.fleet
        if fleet is None or not slots:
            return
        wall = self.wall()
        wanted = []
        for doc, field, scope, name in slots:
            a = self._allowance(scope, name, wall)
            if a is not None and a.budget is not None:  # only budgets' spend is kept in Redis
                wanted.append((doc, field, a))
        rows = await fleet.read_periods([(f"{a.scope}:{a.name}", a.period_start) for _, _, a in wanted]) \
            if wanted else []
        source = "local" if rows is None else "fleet"
        for doc, *_ in slots:
            doc["spend_source"] = source
        for (doc, field, a), row in zip(wanted, rows or ()):
            if row is not None:  # else nothing was admitted through Redis this period: the local spend stands
                spent, reserved, requests = row
                doc[field] = attrs.evolve(a, spent=spent, reserved=reserved, requests=requests).view()

    def busiest(self, scope: str, n: int) -> list[dict]:
        """The ``n`` managed keys (``scope="key"``) or teams with the most spend in their current budget period,
        busiest first, for the dashboard: name, team (keys), spend and budget in USD, requests, period.

        Reads the running accounts only (those a request has touched): no store access, O(accounts)."""
        wall = self.wall()
        holders = self.keys if scope == "key" else self.teams
        accounts = []
        for a in self._allowances.values():
            if a.scope == scope and (a.spent or a.requests) and a.name in holders:
                accounts.append(a)
        for a in accounts:
            if wall >= a.resets_at:
                a.roll(wall)
        accounts = [a for a in accounts if a.spent or a.requests]
        out = []
        for a in heapq.nlargest(n, accounts, key=lambda a: (a.spent, a.requests)):
            row = {"name": a.name, "spent_usd": usd(a.spent), "requests": a.requests, "period": a.period,
                   "budget_usd": usd(a.budget.nano) if a.budget else None}
            if scope == "key":
                key = self.keys[a.name]
                row["key_name"], row["team"] = key.name, key.team
            out.append(row)
        return out

    def list_keys(self) -> list[dict]:
        return [self.describe_key(k) for k in sorted(self.keys)]

    def list_teams(self) -> list[dict]:
        return [self.describe_team(t) for t in sorted(self.teams)]

    def caller_view(self, key_id: str | None) -> dict:
        """``GET /v1/key``: what the caller's key may do and has spent (never its secret)."""
        key = self.keys.get(key_id) if key_id is not None else None
        if key is None:
            d = self.limiter.defaults
            return {"id": key_id, "object": "api_key", "source": "config" if key_id else "open", "name": None,
                    "team": None, "models": None, "budget": None, "spend": None,
                    "limits": {"rpm": d.rpm, "rph": d.rph, "tpm": d.tpm, "max_concurrent": d.max_concurrent}}
        out = self.describe_key(key.id)
        out.pop("metadata", None)
        out["source"] = "managed"
        limits = self._key_limits(key)
        out["limits"] = {"rpm": limits.rpm, "rph": limits.rph, "tpm": limits.tpm,
                         "max_concurrent": limits.max_concurrent}
        team = self.teams.get(key.team) if key.team else None
        if team is not None:
            out["team_budget"] = team.budget.to_dict() if team.budget else None
            out["team_spend"] = self._spend_view("team", team.name)
            out["team_limits"] = team.to_dict()["limits"]
            out["team_models"] = list(team.models) if team.models is not None else None
        return out

    def snapshot(self) -> dict:
        """For the state dump: counts and spend, never a secret or a digest."""
        journal = self.journal
        return {"keys": len(self.keys), "teams": len(self.teams), "allowances": len(self._allowances),
                "unwritten_spend": len(self._dirty) + len(self._touched),
                "spend_write_failures": self.spend_write_failures,
                "recovered": self.recovered,
                "journal": {"segment": journal.gen, "writes": journal.writes, "failures": journal.failures}
                if journal is not None else None,
                "refusals": {f"{t or '-'}/{s}": n for (t, s), n in sorted(self.refusals.items())}}

    def prometheus(self) -> str:
        """Spend and budget refusals per team (keys without a team under ``team=""``): bounded labels."""
        from ..telemetry.metrics import budget_families

        return budget_families({t: usd(n) for t, n in self.spend_by_team.items()}, self.refusals)

    @property
    def spend_by_team(self) -> dict[str, int]:
        """nano-USD spent per team since the start ("" for keys without a team)."""
        return {t: cell[0] for t, cell in self._team_spend.items() if cell[0]}

    def add_team_spend(self, team: str, nano: int) -> None:
        """``nano`` spent by ``team`` ("" for none): the fleet's settlements (runestone.cluster.limits)."""
        self._team_cell(team)[0] += nano

    def _team_cell(self, team: str) -> list:
        """``team``'s cell of spend ("" for keys without a team), made at its first use."""
        cell = self._team_spend.get(team)
        if cell is None:
            cell = self._team_spend[team] = [0]
        return cell

    # -- management (admin API, control socket, CLI) --------------------------------------------------

    async def _persist(self, write) -> None:
        if self.store is None:
            return
        try:
            await write
        except KeyStoreError as exc:
            log.error("key store write failed: %s", exc)
            raise GatewayError(500, f"the change was not made: it could not be persisted ({exc})", "server_error",
                               code="persistence_failed") from None

    def _known_team(self, name: str | None) -> None:
        if name is not None and name not in self.teams:
            raise GatewayError(400, f"no team named {name!r}: create it first (POST /admin/teams)", param="team",
                               code="team_not_found")

    async def create_key(self, data: Any) -> dict:
        """A new key; the answer carries its secret, this once."""
        fields = parse_key(data)
        async with self._changes:
            self._known_team(fields["team"])
            secret = new_secret()
            kid = new_key_id()
            while kid in self.keys:
                kid = new_key_id()
            key = KeyRecord(kid, fields["name"], digest_of(secret), fields["team"], fields["models"],
                            fields["budget"], fields["limits"], fields["expires_at"], fields["metadata"], self.wall())
            await self._put_key(key, {"op": "create_key", "key": key.to_doc()})
        log.info("key %s (%s) created%s", kid, key.name, f" in team {key.team}" if key.team else "")
        return {**self.describe_key(kid), "secret": secret}

    async def update_key(self, key_id: str, data: Any) -> dict:
        patch = parse_key_patch(data)
        async with self._changes:
            key = self._key(key_id)
            if "team" in patch:
                self._known_team(patch["team"])
            new = attrs.evolve(key, **patch)
            await self._put_key(new, {"op": "update_key", "id": key_id, "patch": data, "key": new.to_doc()})
        return self.describe_key(key_id)

    async def revoke_key(self, key_id: str) -> dict:
        """Revoke at once: the secret (and any previous one in its grace) stops working now."""
        async with self._changes:
            key = self._key(key_id)
            if key.revoked_at is None:
                new = attrs.evolve(key, revoked_at=self.wall(), previous_until=None)
                await self._put_key(new, {"op": "revoke_key", "id": key_id, "revoked_at": new.revoked_at,
                                          "key": new.to_doc()})
        log.info("key %s revoked", key_id)
        return self.describe_key(key_id)

    async def rotate_key(self, key_id: str, grace_ms: Any = None) -> dict:
        """A new secret for the key; the old one keeps working ``grace_ms`` more (0: stops now)."""
        if grace_ms is None:
            grace_ms = 0
        if isinstance(grace_ms, bool) or not isinstance(grace_ms, (int, float)) or not 0 <= grace_ms <= MAX_GRACE_MS:
            raise GatewayError(400, f"'grace_ms' must be a number of milliseconds between 0 and {MAX_GRACE_MS}",
                               param="grace_ms", code="invalid_value")
        async with self._changes:
            key = self._key(key_id)
            if key.revoked_at is not None:
                raise GatewayError(409, f"the key {key_id} is revoked; create a new key instead", param="id",
                                   code="key_revoked")
            secret = new_secret()
            now = self.wall()
            new = attrs.evolve(key, digest=digest_of(secret), previous_digest=key.digest if grace_ms else None,
                               previous_until=now + grace_ms / 1000 if grace_ms else None)
            await self._put_key(new, {"op": "rotate_key", "id": key_id, "digest": new.digest.hex(),
                                      "previous_digest": key.digest.hex() if grace_ms else None,
                                      "previous_until": new.previous_until, "key": new.to_doc()})
        log.info("key %s rotated (previous secret valid %gs more)", key_id, grace_ms / 1000)
        return {**self.describe_key(key_id), "secret": secret}

    def _key(self, key_id: Any) -> KeyRecord:
        key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise GatewayError(404, f"no key with id {key_id!r}; list them with GET /admin/keys", "not_found_error",
                               param="id", code="not_found")
        return key

    async def create_team(self, data: Any) -> dict:
        fields = parse_team(data)
        async with self._changes:
            if fields["name"] in self.teams:
                raise GatewayError(409, f"team {fields['name']!r} exists; change it with PATCH /admin/teams/"
                                   f"{fields['name']}", param="name", code="conflict")
            team = Team(fields["name"], fields["models"], fields["budget"], fields["limits"], self.wall())
            await self._put_team(team, {"op": "create_team", "team": team.to_doc()})
        return self.describe_team(team.name)

    async def update_team(self, name: Any, data: Any) -> dict:
        patch = parse_team_patch(data)
        async with self._changes:
            team = self._team(name)
            new = attrs.evolve(team, **patch)
            await self._put_team(new, {"op": "update_team", "name": name, "patch": data, "team": new.to_doc()})
        return self.describe_team(name)

    async def delete_team(self, name: Any) -> dict:
        async with self._changes:
            self._team(name)
            await self._drop_team(name, {"op": "delete_team", "name": name})
        return {"name": name, "deleted": True}

    async def _drop_team(self, name: str, change: dict | None) -> None:
        members = sorted(k.id for k in self.keys.values() if k.team == name and k.revoked_at is None)
        if members:
            raise GatewayError(409, f"team {name!r} still has {len(members)} active key(s) ({', '.join(members[:5])}"
                               f"{', ...' if len(members) > 5 else ''}); move or revoke them first", param="name",
                               code="team_not_empty")
        await self._persist(self.store.delete_team(name) if self.store else None)
        del self.teams[name]
        self._accounts.clear()
        self._allowances.pop(("team", name), None)
        self._changed(change)

    # -- changes: made here (told to the listeners), or made by another instance (apply_change) ---------

    def subscribe(self, listener: Callable[[dict, str], None]) -> None:
        """Call ``listener(change, "local")`` after each key or team change made here is in force and
        persisted, in the order they were made. ``change`` is plain JSON data carrying no secret (a key's
        digests only): what :meth:`apply_change` takes on another instance. It must not block."""
        self._listeners.append(listener)

    def _changed(self, change: dict | None) -> None:
        if change is None:
            return  # another instance's, applied here
        for listener in self._listeners:
            try:
                listener(change, "local")
            except Exception:
                log.exception("a key change listener failed (the change stands)")

    async def _put_key(self, key: KeyRecord, change: dict | None) -> None:
        """Persist and install ``key`` (the caller holds ``_changes``)."""
        await self._persist(self.store.put_key(key) if self.store else None)
        first = not self.keys
        self._install_key(key)
        if first and self.on_first_key is not None:
            self.on_first_key()
        self._changed(change)

    async def _put_team(self, team: Team, change: dict | None) -> None:
        await self._persist(self.store.put_team(team) if self.store else None)
        self.teams[team.name] = team
        self._accounts.clear()
        a = self._allowances.get(("team", team.name))
        if a is not None:
            self._rebudget(a, team.budget)
        self._changed(change)

    async def apply_change(self, change: dict) -> str | None:
        """Apply a change another instance made (what a listener was given there), validated again,
        persisted in this instance's store and installed, and not told to the listeners. Returns what it
        did; raises GatewayError (or KeyError/TypeError/ValueError for a malformed change) having changed
        nothing. A revocation is final: a change to a key revoked here keeps it revoked.

        A change carrying the whole resulting record (``key`` or ``team``, as every change made here does)
        makes this instance hold that record (nothing is written when it does already), so applying the
        fleet's changes in stream order ends every instance in the same state, and a replay is idempotent;
        a change from an older version (a patch, a digest) is applied to the record held here. Returns None
        when this instance held the record already."""
        op = change["op"]
        async with self._changes:
            if op in _KEY_OPS and isinstance(change.get("key"), dict):  # the whole record (a create's always)
                key = key_from_doc(change["key"])
                if key.team is not None and key.team not in self.teams:
                    raise GatewayError(400, f"no team named {key.team!r} here", code="team_not_found")
                old = self.keys.get(key.id) if op == "create_key" else self._key(key.id)
                if old is not None and old.revoked_at is not None and key.revoked_at is None:  # final
                    key = attrs.evolve(key, revoked_at=old.revoked_at, previous_until=None)
                if key == old:
                    return None
                await self._put_key(key, None)
            elif op in ("create_team", "update_team") and isinstance(change.get("team"), dict):
                team = team_from_doc(change["team"])
                held = self.teams.get(team.name) if op == "create_team" else self._team(team.name)
                if held == team:
                    return None
                await self._put_team(team, None)
            elif op == "update_key":
                key = self._key(change["id"])
                patch = parse_key_patch(change["patch"])
                if "team" in patch:
                    self._known_team(patch["team"])
                await self._put_key(attrs.evolve(key, **patch), None)
            elif op == "revoke_key":
                key = self._key(change["id"])
                if key.revoked_at is None:
                    await self._put_key(attrs.evolve(key, revoked_at=float(change["revoked_at"]), previous_until=None),
                                        None)
            elif op == "rotate_key":
                key = self._key(change["id"])
                if key.revoked_at is not None:
                    raise GatewayError(409, f"the key {key.id} is revoked here", code="key_revoked")
                prev, until = change["previous_digest"], change["previous_until"]
                await self._put_key(attrs.evolve(key, digest=bytes.fromhex(change["digest"]),
                                                 previous_digest=bytes.fromhex(prev) if prev else None,
                                                 previous_until=float(until) if until is not None else None), None)
            elif op == "update_team":
                team = self._team(change["name"])
                await self._put_team(attrs.evolve(team, **parse_team_patch(change["patch"])), None)
            elif op == "delete_team":
                if change["name"] not in self.teams:
                    return None
                await self._drop_team(change["name"], None)
            else:
                raise ValueError(f"unknown or malformed key or team change {op!r}")
        return op

    def _team(self, name: Any) -> Team:
        team = self.teams.get(name) if isinstance(name, str) else None
        if team is None:
            raise GatewayError(404, f"no team named {name!r}; list them with GET /admin/teams", "not_found_error",
                               param="name", code="not_found")
        return team

    # -- persistence of spend -------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write the spend changed since the last flush (on a worker thread); how many rows.

        With the journal: a new segment starts first, in the same step as the rows are taken, so the rows
        hold every event of the older segments and none of the new one; they are stored with that segment's number, and then the older segments are deleted."""
        if self.store is None:
            self._dirty.clear()
            self._touched.clear()
            return 0
        journal = self.journal
        touched = self._touched
        if touched:
            self._touched = set()
            dirty = self._dirty
            for acct in touched:
                dirty.update(acct.holders)
        if not self._dirty and (journal is None or not journal.pending):
            return 0
        floor = None
        if journal is not None:
            if journal.pending:
                if journal.ready != journal.gen + 1:  # not made by the last flush's checkpoint (below)
                    try:  # the next segment's blocks, off the event loop (the rotation then only maps them)
                        await trio.to_thread.run_sync(journal.prepare, journal.gen + 1)
                    except OSError as exc:
                        log.error("budget journal: the next segment could not be made: %s", exc)
                journal.rotate()
            # The rows hold every event before the current segment (which, unless it was just started,
            # has had nothing written to it yet).
            floor = journal.gen
        dirty, self._dirty = self._dirty, set()
        rows = [(a.scope, a.name, a.period_start, a.spent, a.requests) for a in dirty
                if self._allowances.get((a.scope, a.name)) is a]
        # A holder with a reservation out is written again at the next flush (its settlement marks nothing).
        self._dirty.update(a for a in dirty if a.reserved)
        try:
            await self.store.put_spend(rows, floor)
        except KeyStoreError as exc:
            self.spend_write_failures += 1
            self._dirty |= dirty
            log.error("spend not written (kept for the next try): %s", exc)
            return 0
        if floor is not None:
            drop = floor > self._journal_floor
            if drop:
                self._journal_floor = floor
            # One hand-off: the older segments deleted, and the next rotation's segment made ahead.
            await trio.to_thread.run_sync(_checkpointed, journal, floor, drop)
        return len(rows)

    async def _reload(self) -> None:
        """Started without its database (a local copy, or nothing): read the database again; once it
        answers, its keys and teams are installed (they win over the copy's) and this instance's spend is
        kept, dirty, for the flush that follows."""
        try:
            loaded = await trio.to_thread.run_sync(self.store.reload)
        except KeyStoreError as exc:
            log.debug("the key store's database is still unreachable: %s", exc)
            return
        async with self._changes:
            first = not self.keys
            for team in loaded.teams:
                self.teams[team.name] = team
            for key in loaded.keys:
                self._install_key(key)
            self._accounts.clear()
            wall = self.wall()
            for (scope, name), (start, nano, requests) in loaded.spend.items():
                a = self._allowance(scope, name, wall)
                if a is not None and a.period_start == start and nano > a.spent:
                    a.spent, a.requests = nano, max(a.requests, requests)
            self._dirty |= set(self._allowances.values())
            if first and self.keys and self.on_first_key is not None:
                self.on_first_key()
        log.warning("the key store's database %s is reachable again: %d key(s) and %d team(s) read from it",
                    self.store.path, len(loaded.keys), len(loaded.teams))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write spend every ``flush_interval`` until cancelled, then once more (shielded)."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_interval)
                if self.store is not None and self.store.degraded is not None:
                    await self._reload()
                elif self.store is not None and self.store.outbox:
                    await self.store.drain()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()
            if self.journal is not None:
                self.journal.close()  # reopened at its next line, should this task be restarted
