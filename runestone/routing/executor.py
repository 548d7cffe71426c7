"""The one request pipeline: every front door hands the gateway a typed request and gets an answer back.

A front door (chat, completions, messages, embeddings, the WebSocket API) decodes its wire format into a
:class:`ModelRequest` (caller, endpoint, the canonical OpenAI-shaped body, requirements) and calls
:meth:`Gateway.serve`, which owns everything after, once:

1. resolution and plan: the model name (an alias, a split, a pool, a failover group, ``provider:model``,
   or a model some providers serve) becomes an ordered list of ``(provider, upstream model)`` targets;
2. admission: the caller's per-key limits (``admission``), before anything is recorded;
3. attempts, each an :class:`Attempt`, under ONE deadline for the whole request: a provider whose breaker
   is open is skipped, a half-open one is tried only with a probe slot; a retryable failure moves on to
   the next provider at once; coming back to one that failed waits the retry policy's backoff. A
   client-caused 4xx ends the request at once, with the upstream's own error passed through;
4. the answer: a :class:`Completed` body, or a :class:`Streaming` committed once its first upstream read
   is in hand (so a provider failing before the first byte is failed over invisibly), which yields
   :class:`Chunks` per upstream read and then exactly one :class:`Done` or :class:`Failed`;
5. accounting: each attempt reports its one outcome (breaker, ``AttemptFinished``); the request is
   recorded once (``RequestFinished``: metrics, the usage ledger, split metrics, the key's tokens).

Errors are :class:`~runestone.routing.errors.GatewayError`, in no wire format: the front door encodes
them, and the events, in its API's shape.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import attrs
import trio

from ..providers.base import Usage
from ..providers.supervisor import ProviderTable, canonical_provider
from ..resilience.breaker import ALLOW, CLOSED, DENY, check
from ..resilience.breaker_manager import Acquire, CircuitBreakerManager, Release, SuccessTally, outcome
from ..runtime import Coalescer, Published
from ..resilience.errors import CREDENTIAL_REFUSED, UpstreamError, counts_as_failure
from ..resilience.failover import GroupSelector, RouteState
from ..resilience.failover_manager import GroupOutcome
from ..resilience.retry import RetryPolicy
from ..telemetry.costs import Pricer, estimate_costs
from ..telemetry.events import AttemptFinished, FailoverEvent, RequestFinished, RetryScheduled
from ..wire.errors import InvalidRequest
from ..wire.token_estimate import estimate_input_tokens, estimate_output_tokens
from .errors import GatewayError
from .policies import NO_REQUIREMENTS, Requirements, route
from .pool import InFlightRequest, InFlightTable
from .splits import NamedRoutes, UnknownVariant

__all__ = ["Attempt", "Chunks", "Completed", "Done", "Failed", "Gateway", "GatewayError", "ModelRequest",
           "RequestContext", "Streaming", "Target", "client_error"]

log = logging.getLogger("runestone.routing")

_EMPTY: dict = {}


@attrs.define(slots=True)  # not frozen: one per request (see Chunks)
class ModelRequest:
    """One client request as every front door hands it to :meth:`Gateway.serve`."""

    request_id: str
    key_id: str | None
    #: The front door, as telemetry and the ledger name it: "chat", "completions", "messages", "embeddings".
    endpoint: str
    model: str
    #: The canonical body: OpenAI's chat (or embeddings) request, validated, without the ``runestone`` field.
    body: dict
    #: "chat" or "embed".
    operation: str = "chat"
    stream: bool = False
    #: The client asked for the usage chunk (OpenAI's ``stream_options.include_usage``).
    include_usage: bool = False
    requirements: Requirements = NO_REQUIREMENTS
    #: What the body needs of a provider beyond chat: "tools", "vision".
    capabilities: frozenset = frozenset()
    #: The client's own request, for a provider that speaks its API natively (an adapter with
    #: ``speaks_responses``: the Responses API): such an attempt sends this instead of ``body`` and its
    #: answer is in that API's format (``Completed.native``, ``Streaming.native``). None: chat everywhere.
    native: dict | None = None


class Lease(Protocol):
    """An admitted request's claim on its caller's allowances; the pipeline settles it once and releases it."""

    #: Response headers the client gets with the answer (``x-ratelimit-*``).
    headers: list

    def settle(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        """What the request really used (0s for a request that got no answer)."""

    def release(self) -> None:
        """The request is over (idempotent)."""


class Admission(Protocol):
    """Decides, before any upstream call, whether the caller may make ``request`` as ``plan`` would serve it."""

    async def admit_request(self, request: "ModelRequest", plan: "Plan") -> Lease:
        """A lease, or raise GatewayError (429 and its headers, 403 for a model not allowed, ...)."""


@attrs.define(slots=True)  # not frozen: one per request (see Chunks)
class Completed:
    """A finished non-streaming answer: the upstream's JSON (OpenAI-shaped) and who gave it."""

    provider: str
    model: str
    body: bytes
    usage: Usage
    #: x-runestone-provider, -variant, -route, and the caller's x-ratelimit-* headers.
    headers: list
    #: ``body`` is the native API's answer (``ModelRequest.native`` was sent), not a chat.completion.
    native: bool = False


@attrs.define(slots=True)  # not frozen: one per upstream read, and a frozen class's __init__ costs 2-6x as much
class Chunks:
    """One upstream read's ``chat.completion.chunk`` payloads; ``last`` when the upstream's end came with it."""

    payloads: list
    last: bool


@attrs.frozen
class Done:
    """The stream ended as the upstream ended it."""

    usage: Usage


@attrs.frozen
class Failed:
    """The stream ended early: ``error`` says why (an upstream failure, the deadline, the gateway stopping)."""

    error: GatewayError


@attrs.define(slots=True)
class Attempt:
    """One try of one provider: reported exactly once (:meth:`Gateway.report`)."""

    provider: str
    model: str
    started: float  # trio clock
    #: Holds the breaker's half-open probe slot: the outcome closes or reopens it, or it is given back.
    probe: bool = False
    ttft: float | None = None
    reported: bool = False
    #: The request's native body was sent (the adapter speaks the client's API).
    native: bool = False


@attrs.define(slots=True)
class RequestContext:
    """One client request as the request path tracks it."""

    request_id: str
    key_id: str | None
    endpoint: str
    started: float  # trio clock
    deadline: float  # trio clock
    retries: int = 0
    failovers: int = 0
    route_reason: str = ""
    provider: str | None = None
    model: str = ""
    #: The split arm (runestone.routing.splits.Arm) the request was assigned, whose metrics it feeds.
    variant: Any = None
    #: The admission lease (per-key limits), released when the request ends.
    lease: Any = None
    #: The model the client asked for (``model`` becomes the served one for groups and splits).
    asked: str = ""
    #: Upstream attempts made so far.
    attempts: int = 0


@attrs.frozen
class Target:
    provider: str
    model: str


@attrs.define
class Plan:
    targets: list[Target]
    reason: str
    group: str | None
    max_attempts: int
    skipped: dict
    #: Set when the request named a split: the arm it was assigned.
    variant: Any = None
    #: (reason, the route as ``run`` records it): a reused plan's route is joined once, not per request.
    route: tuple | None = None


class Gateway:
    """The request path's view of the tree. Built once by the app; survives actor restarts."""

    def __init__(self, config, *, providers: ProviderTable, breakers: Published, breaker_ref, groups: GroupSelector,
                 health: Published, telemetry, inflight: InFlightTable, failover_ref=None,
                 pricing: dict | None = None, aliases: Published | None = None) -> None:
        self.config = config
        self.providers = providers
        self.breakers = breakers
        self.breaker_ref = breaker_ref
        #: Attempt outcomes and probe releases, batched while the last batch waits in the breaker manager's
        #: mailbox (runestone.runtime.Coalescer): one mailbox trip for many requests' outcomes, in order.
        self._outcomes = Coalescer(lambda: breaker_ref, max_pending=CircuitBreakerManager.mailbox_size)
        #: Successes of attempts that were not probes, counted here and sent through ``_outcomes`` in one cast
        #: per provider (the breaker manager's tick flushes it; see SuccessTally).
        self.successes = SuccessTally(self._outcomes.try_cast)
        self.groups = groups
        self.failover_ref = failover_ref
        self._view_cache: tuple | None = None
        #: (breaker views, health table, the scores routing uses): rebuilt when either is republished.
        self._scores_cache: tuple | None = None
        self.health = health
        self.telemetry = telemetry
        self.inflight = inflight
        self.pricing = pricing or {}
        self.aliases = aliases or Published({})
        #: Pools and splits (runestone.routing.splits); ``named`` maps every name they answer to.
        self.splits = NamedRoutes()
        self.named: dict = self.splits.by_name
        self.retry = RetryPolicy.from_config(config.retry)
        self.policy = config.router.policy
        self.health_threshold = config.failover.health_threshold
        self.request_timeout = config.server.request_timeout_ms / 1000
        #: Who may spend what (:class:`Admission`): per-key limits today, budgets next. None admits all.
        self.admission: Admission | None = None
        #: When the gateway stops: streams still reading then end with a "stopping" error.
        self.stop_deadline = float("inf")
        #: The streams reading now: their read deadlines are moved to ``stop_deadline`` when it is set.
        self._streams: set = set()
        #: A finished request's cost from the static pricing table (the handler and the ledger price with the
        #: same class; bounded: models come from upstream answers).
        self._pricer = Pricer(self.pricing, limit=4096)
        #: Providers seen answering without usage (warned once each; bounded: providers are configured).
        self._no_usage: set[str] = set()
        #: model -> (snapshots it was decided on, Plan): the default policy's decisions while they hold.
        self._plans: dict = {}

    # -- planning -------------------------------------------------------------------------------------

    def _state(self, body: dict, infos, requirements: Requirements, policy: str,
               models: dict[str, str] | None = None) -> RouteState:
        """What routing reads for one decision; ``models`` maps providers to the model each would be sent."""
        health = self.health.value
        breakers = self.breakers.value or _EMPTY
        cost = _EMPTY
        if policy == "cost" or requirements.max_cost is not None:
            if models is None:
                models = {n: body.get("model", "") for n in infos}
            cost = estimate_costs(body, models, self.pricing)
        cached = self._scores_cache
        if cached is not None and cached[0] is breakers and cached[1] is health:
            scores = cached[2]
        else:
            scores = getattr(health, "scores", None) or _EMPTY
            if scores and breakers:
                # A provider whose breaker is not closed is judged by its breaker alone: its health score is 0
                # while open and still holds the failures that opened it while half open, so demoting it
                # for health would keep the probes from ever reaching it and the breaker from ever closing.
                recovering = [n for n, v in breakers.items() if v.state != CLOSED and n in scores]
                if recovering:
                    scores = {n: s for n, s in scores.items() if n not in recovering}
            self._scores_cache = (breakers, health, scores)
        return RouteState(
            in_flight=self.inflight.counts,
            breakers=breakers,
            health=scores,
            ttft_ewma=getattr(health, "ttft_ewma_ms", None) or _EMPTY,
            cost=cost,
            probes=self.groups.probes,
        )

    def use_named(self, routes: NamedRoutes) -> None:
        """Serve ``routes``' pools and splits under their names; a name of theirs shadows any other."""
        self.splits = routes
        self.named = routes.by_name

    def resolve_alias(self, model: str) -> str:
        aliases = self.aliases.value
        if not aliases:
            return model
        target = aliases.get(model)
        if target is None:
            return model
        # A failover group configured under the same name is the operator's explicit choice and wins: the
        # embedded aliases take common names ("fast", "cheap") a group may well be called.
        groups = self.groups.groups.value
        return model if groups and model in groups else target

    def _view(self) -> tuple:
        """(version, table, routable infos, their list, exact model names) for the current provider table.

        Rebuilt only when the table is republished, not per request.
        """
        cached = self._view_cache
        version = self.providers.version
        if cached is not None and cached[0] == version:
            return cached
        table = self.providers.value
        infos = {n: e.info for n, e in table.items() if not e.draining}
        exact = frozenset(m for e in table.values() for m in e.info.models if not m.endswith("*"))
        cached = self._view_cache = (version, table, infos, list(infos.values()), exact)
        return cached

    def known_model(self, model: str) -> bool:
        asked = model
        model = self.resolve_alias(model)
        _, table, _, _, exact = self._view()
        if model in exact:
            return True
        groups = self.groups.groups.value or _EMPTY
        if model in groups or model == "default":
            return True
        if asked in self.named:
            return True
        provider, sep, rest = model.partition(":")
        if sep and canonical_provider(provider, self.providers) in table:
            return True
        return any(e.info.serves(model) for e in table.values())

    def plan(self, model: str, body: dict, requirements: Requirements = NO_REQUIREMENTS,
             capability: str | None = None, *, check_known: bool = False) -> Plan:
        """The ordered targets for ``model``. With ``check_known`` a model nobody serves is a 404 (GatewayError),
        decided only where it is not decided already: a pool, split, group, pinned provider or reused plan
        is known by construction."""
        asked = model
        model = self.resolve_alias(model)
        _, table, infos, info_list, _ = self._view()
        now = trio.current_time()
        groups = self.groups.groups.value or _EMPTY
        policy = requirements.policy or self.policy
        if capability and capability not in requirements.require:
            requirements = attrs.evolve(requirements, require=requirements.require | {capability})
        if requirements.prefer or requirements.exclude:
            # A client may name providers by their legacy names, as in "openai:gpt-4o".
            providers = self.providers
            requirements = attrs.evolve(
                requirements,
                prefer=tuple(canonical_provider(n, providers) for n in requirements.prefer),
                exclude=frozenset(canonical_provider(n, providers) for n in requirements.exclude))
        named = self.named
        if named:
            hit = named.get(asked)
            if hit is not None:
                return self._plan_named(hit, body, requirements, table, infos, now)
        # An explicit "provider:model" pins the provider.
        provider, sep, upstream_model = model.partition(":")
        if sep and upstream_model:
            name = canonical_provider(provider, self.providers)
            if name in table:
                if name not in infos:
                    raise GatewayError(503, f"provider {name!r} is being unregistered and takes no new requests",
                                       "server_error", code="provider_unavailable")
                return Plan([Target(name, upstream_model)], f"pinned to provider {name}", None,
                            self.retry.max_attempts, {})
        if model in groups or model == "default":
            spec = self.groups.group(model)
            by_cost = spec.strategy == "cost"
            models = None
            if by_cost or requirements.max_cost is not None:
                # A group's members are sent their own default model, so that is what a cost estimate prices.
                models = {n: table[n].default_model or "" for n in infos}
            state = self._state(body, infos, requirements, "cost" if by_cost else policy, models)
            names = self.groups.select(model, infos, state, now=now)
            names = [canonical_provider(n, self.providers) for n in names
                     if n not in requirements.exclude]
            if requirements.prefer:
                rank = {n: i for i, n in enumerate(requirements.prefer)}
                names.sort(key=lambda n: rank.get(n, len(rank)))
            targets = []
            for n in names:
                entry = table.get(n)
                if entry is None or entry.draining:
                    continue
                if requirements.require and not requirements.require <= entry.info.capabilities:
                    continue
                m = entry.default_model
                if m:
                    targets.append(Target(n, m))
            return Plan(targets, f"group={model} strategy={spec.strategy}", model, spec.max_attempts, {})
        cacheable = policy == "default" and requirements is NO_REQUIREMENTS
        if cacheable:
            # The default policy's decision depends only on the published snapshots when no candidate is
            # at a breaker's, the health threshold's or a concurrency limit's edge: reuse it until one of
            # them is republished (see _cacheable).
            snapshots = (self.providers.version, self.breakers.value, self.health.value)
            hit = self._plans.get(model)
            if hit is not None and hit[0][0] == snapshots[0] and hit[0][1] is snapshots[1] \
                    and hit[0][2] is snapshots[2]:
                return hit[1]
        if check_known and not self.known_model(asked):
            raise unknown_model(asked)
        state = self._state(body, infos, requirements, policy)
        try:
            decision = route(model, info_list, state, policy=policy, requirements=requirements,
                             health_threshold=self.health_threshold, now=now)
        except ValueError as exc:
            raise GatewayError(400, str(exc), param="runestone.policy") from None
        names = decision.providers + decision.alternatives
        targets = [Target(n, model) for n in names]
        attempts = max(self.retry.max_attempts, min(len(targets), 8))
        plan = Plan(targets, decision.reason, None, attempts, dict(decision.skipped))
        if cacheable and _cacheable(decision, table, state.breakers):
            if len(self._plans) >= 1024:  # bounded: model names come from clients
                self._plans.clear()
            self._plans[model] = (snapshots, plan)
        return plan

    def _plan_named(self, hit, body: dict, requirements: Requirements, table, infos, now: float) -> Plan:
        """A split assigns a variant and plans its model; a pool orders its members by weight."""
        if hit.kind == "split":
            try:
                arm = hit.choose(body.get("user"), requirements.variant)
            except UnknownVariant as exc:
                raise GatewayError(400, str(exc), param="runestone.variant", code="variant_not_found") from None
            # A variant's model is never a split (checked when built), so this recursion is one level deep.
            plan = self.plan(arm.model, body, requirements)
            plan.variant = arm
            plan.reason = f"split={arm.label} {plan.reason}"
            return plan
        names = hit.order(infos, self.breakers.value or _EMPTY, now)
        exclude = requirements.exclude
        require = requirements.require
        if requirements.prefer:
            rank = {n: i for i, n in enumerate(requirements.prefer)}
            names.sort(key=lambda n: rank.get(n, len(rank)))
        targets = []
        for n in names:
            entry = table[n]
            if n in exclude or (require and not require <= entry.info.capabilities):
                continue
            if entry.default_model:
                targets.append(Target(n, entry.default_model))
        return Plan(targets, f"pool={hit.name}", None, hit.max_attempts, {})

    # -- the one entry --------------------------------------------------------------------------------

    async def serve(self, request: ModelRequest) -> Completed | Streaming:
        """Serve one client request, whatever its front door: the whole pipeline, once.

        Model resolution and the plan first (a 404/400 changes nothing), then admission (the caller's
        per-key limits: a 429 before anything is recorded), then the attempts under one deadline. Returns
        a :class:`Completed` answer or a committed :class:`Streaming` (its first upstream read in hand);
        raises :class:`GatewayError` when the request is refused or every attempt failed. Every request
        that got past admission is recorded exactly once (``RequestFinished``), however it ends.
        """
        model = request.model
        capability = "embeddings" if request.operation == "embed" else None
        requirements = request.requirements
        needs = request.capabilities
        if needs and not needs <= requirements.require:
            requirements = attrs.evolve(requirements, require=requirements.require | needs)
        plan = self.plan(model, request.body, requirements, capability, check_known=True)
        lease = None
        if self.admission is not None:
            lease = await self.admission.admit_request(request, plan)
        ctx = self.begin(request.request_id, request.key_id, request.endpoint, model, request.stream)
        ctx.lease = lease
        stream = request.stream and request.operation == "chat"
        try:
            if stream:
                return await self._open_stream(ctx, request, plan)
            return await self._complete(ctx, request, plan)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    async def _complete(self, ctx: RequestContext, request: ModelRequest, plan: Plan) -> Completed:
        request_id = ctx.request_id
        if request.operation == "embed":
            async def call(adapter, upstream, attempt, deadline):
                return await adapter.embed(upstream, deadline=deadline)
        else:
            native = request.native

            async def call(adapter, upstream, attempt, deadline):
                if native is not None and getattr(adapter, "speaks_responses", False):
                    attempt.native = True
                    return await adapter.responses({**native, "model": upstream["model"]}, request_id=request_id,
                                                   deadline=deadline)
                return await adapter.complete(upstream, request_id=request_id, deadline=deadline)
        try:
            attempt, result = await self.run(ctx, request.body, plan, call)
        except GatewayError as exc:
            self._refused(ctx, exc, stream=False)
            raise
        except BaseException:
            self.finish(ctx, status="error", http_status=499, error_type="cancelled")
            raise
        usage = result.usage
        tokens_in, tokens_out = self.charged(ctx, request.body, usage, lambda: estimate_output_tokens(result.body))
        self.finish(ctx, status="ok", http_status=200, error_type=None, tokens_in=tokens_in, tokens_out=tokens_out,
                    model=attempt.model)
        if ctx.lease is not None:
            ctx.lease.release()
        return Completed(attempt.provider, attempt.model, result.body, usage, _answer_headers(ctx), attempt.native)

    async def _open_stream(self, ctx: RequestContext, request: ModelRequest, plan: Plan) -> Streaming:
        request_id = ctx.request_id
        include_usage = request.include_usage
        native = request.native

        async def call(adapter, upstream, attempt, deadline):
            if native is not None and getattr(adapter, "speaks_responses", False):
                attempt.native = True
                stream = await adapter.open_responses_stream({**native, "model": upstream["model"]},
                                                             request_id=request_id, deadline=deadline)
            else:
                stream = await adapter.open_stream(upstream, request_id=request_id, include_usage=include_usage,
                                                   deadline=deadline)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                await stream.aclose()
                raise UpstreamError(attempt.provider, "stream_cut",
                                    "upstream stream ended before any event") from None
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
            attempt.ttft = trio.current_time() - attempt.started
            return stream, first

        try:
            attempt, (stream, first) = await self.run(ctx, request.body, plan, call, keep_open=True)
        except GatewayError as exc:
            self._refused(ctx, exc, stream=True)
            raise
        except BaseException:
            self.finish(ctx, status="error", http_status=499, error_type="cancelled", stream=True)
            raise
        return Streaming(self, ctx, attempt, stream, first, request.body)

    def _refused(self, ctx: RequestContext, exc: GatewayError, *, stream: bool) -> None:
        if ctx.variant is not None:
            exc.headers.append((b"x-runestone-variant", ctx.variant.header))
        self.finish(ctx, status="error", http_status=exc.status, error_type=exc.type, stream=stream)

    # -- attempts -------------------------------------------------------------------------------------

    async def _admit(self, provider: str, verdict: str) -> tuple[bool, bool]:
        """May an attempt go to ``provider``, whose breaker's published view said ``verdict`` (not ALLOW: the
        run loop takes that one without a call)? Returns (allowed, holds a half-open probe slot).

        Fails open: when the breaker manager cannot answer (it is restarting), the attempt goes ahead;
        a gateway that refuses traffic because its own bookkeeping restarts would turn a hiccup into an
        outage, and the attempt's outcome is still reported.
        """
        if verdict == DENY:
            return False, False
        try:
            granted = await self.breaker_ref.call(Acquire(provider), timeout=1.0)
        except Exception:
            return True, False
        return bool(granted), bool(granted)

    def _tell(self, provider: str, message) -> None:
        """Cast ``provider``'s outcome ``message`` (an Outcome or a Release) behind the successes of it counted
        before: the breaker sees a provider's outcomes in the order they happened."""
        self.successes.send(provider)
        self._outcomes.try_cast(message)

    def report(self, attempt: Attempt, error: BaseException | None, *, cancelled: bool = False) -> None:
        """The attempt's one outcome: in-flight count, breaker (success, failure, or the probe slot given
        back) and ``AttemptFinished``. Later calls do nothing, so every exit path may call it."""
        if attempt.reported:
            return
        attempt.reported = True
        provider = attempt.provider
        telemetry = self.telemetry
        self.inflight.attempt_ended(provider)
        latency = trio.current_time() - attempt.started
        if cancelled:
            # The client left or the gateway is stopping: nothing was learned about the provider.
            if attempt.probe:
                self._tell(provider, Release(provider))
            return
        if error is None:
            if attempt.probe:
                self._tell(provider, outcome(provider, True))
            else:
                self.successes.add(provider)
            telemetry.emit(AttemptFinished(provider, attempt.model, True, None, latency, attempt.ttft))
            return
        if not counts_as_failure(error):
            # The upstream refused a request it judged wrong: that is the provider working, and as evidence
            # against its health it would let one client's bad requests demote it for everyone.
            if attempt.probe:
                self._tell(provider, Release(provider))
            return
        self._tell(provider, outcome(provider, False))
        telemetry.emit(AttemptFinished(provider, attempt.model, False, _error_kind(error), latency, None))

    async def run(self, ctx: RequestContext, body: dict, plan: Plan, call, *, keep_open: bool = False):
        """Try ``plan``'s targets with ``call(adapter, upstream_body, attempt)`` until one succeeds.

        Returns the :class:`Attempt` that answered and what ``call`` returned; with ``keep_open`` (a
        stream) the attempt stays open and its owner reports it when the stream ends. Raises GatewayError
        when every attempt failed, a client fault ended the request, or the deadline passed.

        The targets are tried in the plan's order; one whose breaker refuses it is dropped and the next is
        tried (never skipped over); after the last, the loop comes back round to those that failed, each
        after the retry policy's backoff, until ``plan.max_attempts`` or the deadline.
        """
        targets = list(plan.targets)
        ctx.variant = plan.variant
        if not targets:
            skipped = ", ".join(f"{n} ({why})" for n, why in plan.skipped.items())
            if skipped:
                raise GatewayError(503, f"no provider can take model {ctx.model!r} now: {skipped}", "server_error",
                                   code="no_provider_available")
            raise GatewayError(503, f"no provider is available for {ctx.model!r} ({plan.reason})", "server_error",
                               code="no_provider_available")
        # The decision as the client's x-runestone-route header and telemetry show it: why, and in what
        # order the providers would be tried.
        route = plan.route
        if route is None or route[0] is not plan.reason:
            route = plan.route = (plan.reason, plan.reason + "; candidates=" + ",".join([t.provider for t in targets]))
        ctx.route_reason = route[1]
        table = self.providers.value
        telemetry = self.telemetry
        failed: dict[str, int] = {}
        failed_order: list[str] = []
        last_error: BaseException | None = None
        last_target: Target | None = None
        attempts = 0
        denied: list[str] = []
        entry_row = self.inflight.requests.get(ctx.request_id)
        # One deadline for the whole request: each attempt's scope ends at the sooner of its own timeout
        # and the request's deadline (one cancel scope per attempt, none around the loop).
        deadline_hit = False
        i = 0
        while attempts < plan.max_attempts and targets:
            if i >= len(targets):
                i = 0
            target = targets[i]
            provider = target.provider
            entry = table.get(provider)
            if entry is None or entry.draining:
                del targets[i]
                continue
            now = trio.current_time()
            verdict = check(self.breakers.value, provider, now)
            if verdict == ALLOW:  # the usual case, decided here: no coroutine, no wait, `now` still holds
                allowed, probe, waited = True, False, False
            else:
                allowed, probe = await self._admit(provider, verdict)
                waited = True
            if not allowed:
                denied.append(provider)
                del targets[i]
                continue
            i += 1
            if attempts:
                if failed.get(provider):
                    retry_after = getattr(last_error, "retry_after", None) if last_target == target else None
                    delay = self.retry.delay(failed[provider], retry_after)
                    if now + delay >= ctx.deadline:
                        if probe:
                            self._tell(provider, Release(provider))
                        break
                    ctx.retries += 1
                    telemetry.emit(RetryScheduled(provider, attempts + 1, delay, _error_kind(last_error)))
                    await trio.sleep(delay)
                    waited = True
                else:
                    ctx.failovers += 1
                    telemetry.emit(FailoverEvent("failover", plan.group or "", last_target and
                                                 last_target.provider, provider, attempts))
            attempts += 1
            ctx.attempts = attempts
            if entry_row is not None:
                entry_row.provider = provider
                entry_row.attempts = attempts
            upstream = body if body.get("model") == target.model else {**body, "model": target.model}
            attempt = Attempt(provider, target.model, trio.current_time() if waited else now, probe)
            self.inflight.attempt_started(provider)
            timeout = entry.spec.config.timeout_ms / 1000
            attempt_deadline = min(ctx.deadline, attempt.started + timeout)
            adapter = entry.adapter
            try:
                # The adapter bounds every wait of the attempt by its deadline: no cancel scope on the hot path.
                result = await call(adapter, upstream, attempt, attempt_deadline)
            except InvalidRequest as exc:
                # The body cannot be said in this provider's wire format: the client's to fix.
                self.report(attempt, None, cancelled=True)
                raise GatewayError(exc.status, exc.message, param=exc.param, code=exc.code) from None
            except UpstreamError as exc:
                if exc.kind == "timeout" and trio.current_time() >= ctx.deadline:
                    deadline_hit = True
                self.report(attempt, exc)
                last_error, last_target = exc, target
                failed[provider] = failed.get(provider, 0) + 1
                failed_order.append(provider)
                if deadline_hit or not exc.retryable:
                    break
                continue
            except Exception as exc:
                # Anything else escaping an adapter is still this provider failing this attempt: classify it
                # (so the breaker counts it) instead of letting it become a 500 with no failover.
                log.warning("provider %s raised %s on request %s", provider, type(exc).__name__, ctx.request_id)
                err = UpstreamError(provider, "protocol", f"the provider adapter failed: {type(exc).__name__}")
                self.report(attempt, err)
                last_error, last_target = err, target
                failed[provider] = failed.get(provider, 0) + 1
                failed_order.append(provider)
                continue
            except BaseException:
                self.report(attempt, None, cancelled=True)
                raise
            if not keep_open:
                self.report(attempt, None)
            if plan.group:
                self.groups_outcome(plan.group, (*failed_order, provider), True)
            ctx.provider = provider
            ctx.model = target.model if plan.group or plan.variant else ctx.model
            return attempt, result
        if plan.group and last_target is not None:
            self.groups_outcome(plan.group, tuple(failed_order), False)
        if deadline_hit:
            raise GatewayError(504, f"the request deadline of {self.request_timeout:g}s passed after {attempts} "
                               f"attempt(s)" + (f"; last error: {last_error}" if last_error else ""),
                               "timeout_error", code="request_timeout",
                               provider=last_target.provider if last_target else None)
        if last_error is None:
            raise GatewayError(503, f"no provider can take model {ctx.model!r} now: circuit open for "
                               f"{', '.join(denied) or 'all candidates'}", "server_error", code="no_provider_available")
        raise client_error(last_error, attempts)

    def groups_outcome(self, group: str, tried: tuple[str, ...], ok: bool) -> None:
        """Group stats and the fallback_success / fallback_exhausted events are the FailoverManager's."""
        self.failover_ref.try_cast(GroupOutcome(group, tried, ok))

    # -- accounting -----------------------------------------------------------------------------------

    def begin(self, request_id: str, key_id: str | None, endpoint: str, model: str, stream: bool) -> RequestContext:
        now = trio.current_time()
        ctx = RequestContext(request_id, key_id, endpoint, now, now + self.request_timeout, model=model, asked=model)
        self.inflight.add(InFlightRequest(request_id, model, key_id, endpoint, stream, now))
        return ctx

    def charged(self, ctx: RequestContext, body: dict, usage: Usage, output) -> tuple[int, int]:
        """The (input, output) tokens a finished answer is charged by: the upstream's usage, or, when it
        reported none (an OpenAI-compatible server that ignores ``stream_options.include_usage`` or sends
        no ``usage``), the one estimate (wire.token_estimate: the request's input, ``output()`` for the
        answer), so that budgets, TPM limits and the ledger never settle an answer at nothing."""
        if usage.prompt_tokens or usage.completion_tokens:
            return usage.prompt_tokens, usage.completion_tokens
        provider = ctx.provider or ""
        if provider not in self._no_usage:
            self._no_usage.add(provider)
            log.warning("provider %s answered without token usage; charging the gateway's estimate for its "
                        "answers", provider)
        return estimate_input_tokens(body), output()

    def finish(self, ctx: RequestContext, *, status: str, http_status: int, error_type: str | None,
               tokens_in: int = 0, tokens_out: int = 0, ttft: float | None = None, stream: bool = False,
               model: str | None = None) -> None:
        """Record the request once: in-flight table, the admission lease settled, split metrics, the ledger."""
        self.inflight.remove(ctx.request_id)
        model = model or ctx.model
        provider = ctx.provider or ""
        cost = self._pricer(0.0, provider, model, tokens_in, tokens_out)
        if ctx.lease is not None:
            ctx.lease.settle(tokens_in, tokens_out, cost)
        latency = trio.current_time() - ctx.started
        if ctx.variant is not None:
            ctx.variant.metrics.record(status, http_status, latency, ttft, tokens_in, tokens_out, cost)
        self.telemetry.emit(RequestFinished(
            ctx.request_id, ctx.key_id, provider, model, ctx.endpoint, stream, status, http_status,
            error_type, latency, ttft, tokens_in, tokens_out, cost, ctx.retries,
            ctx.failovers, ctx.route_reason, time.time(), ctx.asked, ctx.attempts,
        ))

    # -- graceful stop --------------------------------------------------------------------------------

    def stop_streams_at(self, deadline: float) -> None:
        """The gateway is stopping: streams still running at ``deadline`` end then with an error event
        saying so (recorded as ``shutdown``), before the server's drain cuts their connections."""
        self.stop_deadline = deadline
        for streaming in list(self._streams):
            streaming._stream.set_deadline(min(streaming._ctx.deadline, deadline))


class Streaming:
    """A committed stream: iterate for :class:`Chunks`, then exactly one :class:`Done` or :class:`Failed`.

    The relay contract: each ``__anext__`` reads the upstream once (one upstream read's chunk payloads per
    item, so a front door writes once per read), bounded by the request's deadline through the upstream
    stream's own ``set_deadline`` (every adapter's streams bound their reads); no scope is open between
    items, so whatever the consumer does between reads (a slow client
    blocking its write, a WebSocket queue) is never cancelled by this request's deadline. A deadline passed
    while the consumer was away is noticed at the next read. The first item is the read that committed
    the stream. ``aclose()`` (idempotent; front doors call it in a ``finally``) closes the upstream and,
    if no end was produced, records the request as the client's disconnect. The attempt's outcome and the
    request's record are made exactly once, when the end is produced or at ``aclose()``.
    """

    __slots__ = ("_gw", "_ctx", "attempt", "_stream", "_first", "_ended", "_closed", "provider", "model", "headers",
                 "native", "_final", "_body", "_pieces")

    def __init__(self, gw: Gateway, ctx: RequestContext, attempt: Attempt, stream, first: list[bytes],
                 body: dict) -> None:
        self._gw = gw
        #: The request's canonical body and the chunk payloads relayed so far: what the answer is charged
        #: by if the upstream reports no usage (a chunk is about a token).
        self._body = body
        self._pieces = 0
        self._ctx = ctx
        self.attempt = attempt
        self._stream = stream
        self._first: list[bytes] | None = first
        self._ended = False
        #: The end event produced with the last Chunks (the upstream's end came with its body's), not yet
        #: returned.
        self._final: Done | None = None
        self._closed = False
        self.provider = attempt.provider
        self.model = attempt.model
        self.headers = _answer_headers(ctx)
        # The upstream stream bounds its own reads: no cancel scope per read.
        stream.set_deadline(min(ctx.deadline, gw.stop_deadline))
        gw._streams.add(self)
        #: The payloads are the native API's events (``ModelRequest.native`` was sent), not chat chunks.
        self.native = attempt.native

    @property
    def usage(self) -> Usage:
        return self._stream.usage

    @property
    def request_id(self) -> str:
        return self._ctx.request_id

    def __aiter__(self):
        return self

    @property
    def ended(self) -> bool:
        """The stream's end is produced and the request recorded: after the Chunks just returned (``last``)
        come only the end event and StopAsyncIteration, with no upstream read."""
        return self._ended

    async def __anext__(self):
        if self._ended:
            final = self._final
            if final is not None:
                self._final = None
                return final
            raise StopAsyncIteration
        stream = self._stream
        first = self._first
        if first is not None:
            self._first = None
            return self._chunks(first)
        if stream.finished:
            # The client has the whole answer; let the upstream connection be reused.
            await stream.drain()
            return self._end(None)
        gw = self._gw
        try:
            # A read that would not wait (the bytes are buffered) is still past a deadline that passed.
            if trio.current_time() >= min(self._ctx.deadline, gw.stop_deadline):
                return self._end(self._expired())
            items = await stream.__anext__()
        except StopAsyncIteration:
            return self._end(UpstreamError(self.provider, "stream_cut", "upstream stream ended early"))
        except UpstreamError as exc:
            if exc.kind == "timeout":
                exc = self._expired() or exc
            return self._end(exc)
        except Exception as exc:  # anything else from the upstream's side still ends the stream honestly
            return self._end(UpstreamError(self.provider, "protocol",
                                           f"the upstream stream failed: {type(exc).__name__}"))
        return self._chunks(items)

    def _chunks(self, items: list) -> Chunks:
        stream = self._stream
        self._pieces += len(items)
        if not stream.finished:
            return Chunks(items, False)
        if stream.at_end:
            # The upstream's end came with the rest of its body: nothing is left to read, so the request is
            # recorded now, before the client has the last bytes, and the front door may write them with
            # the end of its response (``ended``).
            self._final = self._end(None)
        return Chunks(items, True)

    def _expired(self):
        """Why a read timed out, if a deadline of ours passed: the gateway stopping, or the request's."""
        now = trio.current_time()
        gw = self._gw
        if now >= gw.stop_deadline:
            return _STOPPING
        if now >= self._ctx.deadline:
            return UpstreamError(self.provider, "timeout",
                                 f"the request deadline of {gw.request_timeout:g}s passed mid-stream")
        return None

    def _end(self, error: BaseException | None):
        """Produce the stream's one end event; the upstream is closed by ``aclose()``."""
        self._ended = True
        gw, ctx, attempt = self._gw, self._ctx, self.attempt
        gw._streams.discard(self)
        usage = self._stream.usage
        if error is None:
            tokens_in, tokens_out = gw.charged(ctx, self._body, usage, lambda: self._pieces)
        else:
            tokens_in, tokens_out = usage.prompt_tokens, usage.completion_tokens
        common = dict(tokens_in=tokens_in, tokens_out=tokens_out, ttft=attempt.ttft, stream=True, model=attempt.model)
        if error is _STOPPING:
            gw.report(attempt, None, cancelled=True)
            gw.finish(ctx, status="error", http_status=503, error_type="shutdown", **common)
            event = Failed(GatewayError(503, "the gateway is stopping and ended this stream before it finished; "
                                        "retry the request", "server_error", code="gateway_stopping",
                                        provider=self.provider))
        else:
            gw.report(attempt, error)
            if error is None:
                gw.finish(ctx, status="ok", http_status=200, error_type=None, **common)
                event = Done(usage)
            else:
                gw.finish(ctx, status="error", http_status=502, error_type=_error_kind(error), **common)
                event = Failed(stream_error(error))
        if ctx.lease is not None:
            ctx.lease.release()
        return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        if stream.at_end:
            await stream.aclose()  # the connection goes back to its pool; nothing here waits
        else:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        if not self._ended:
            # The consumer stopped reading before the end: the client went away.
            self._ended = True
            gw, ctx, attempt = self._gw, self._ctx, self.attempt
            gw._streams.discard(self)
            usage = self._stream.usage
            gw.report(attempt, None, cancelled=True)
            gw.finish(ctx, status="error", http_status=499, error_type="client_disconnected",
                      tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens, ttft=attempt.ttft,
                      stream=True, model=attempt.model)
            if ctx.lease is not None:
                ctx.lease.release()


_STOPPING = trio.Cancelled  # a sentinel: the stream was ended by the gateway's graceful stop


def _answer_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Who served the request, the A/B arm if any, and why it was routed so."""
    headers = [(b"x-runestone-provider", (ctx.provider or "").encode())]
    if ctx.lease is not None:
        headers += ctx.lease.headers
    if ctx.variant is not None:
        headers.append((b"x-runestone-variant", ctx.variant.header))
    reason = ctx.route_reason
    if reason:
        value = _ROUTE_HEADERS.get(reason)
        if value is None:
            # Header values must be visible ASCII; route reasons are ours, but model names come from clients.
            value = reason.encode("ascii", "replace")[:200].replace(b"\r", b" ").replace(b"\n", b" ")
            if len(_ROUTE_HEADERS) < 1024:  # bounded: a reason names a client-given model
                _ROUTE_HEADERS[reason] = value
        headers.append((b"x-runestone-route", value))
    return headers


_ROUTE_HEADERS: dict[str, bytes] = {}


def _cacheable(decision, table, breakers) -> bool:
    """A decision made on snapshots alone: no provider ruled out, set aside, probed, limited in concurrency
    (its load changes per request) or with a breaker that is not closed (its admission changes with time)."""
    if decision.skipped or decision.alternatives or decision.probe is not None:
        return False
    for name in decision.providers:
        entry = table.get(name)
        if entry is None or entry.info.max_concurrency:
            return False
        view = breakers.get(name) if breakers else None
        if view is not None and view.state != CLOSED:
            return False
    return True


def unknown_model(model: str) -> GatewayError:
    return GatewayError(404, f"the model {model!r} does not exist or no registered provider serves it; "
                        "list the available models and failover groups with GET /v1/models",
                        "not_found_error", param="model", code="model_not_found")


def _error_kind(error: BaseException | None) -> str:
    if isinstance(error, UpstreamError):
        if error.kind == "http":
            return f"http_{error.status}"
        return error.kind
    return type(error).__name__ if error is not None else "unknown"


_DEFAULT_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                  422: "invalid_request_error", 429: "rate_limit_error"}


def client_error(error: BaseException, attempts: int = 1) -> GatewayError:
    """What the client hears when the attempts ended in ``error``.

    An upstream's refusal of the request (a 4xx) and its rate limit (429) reach the client as the
    upstream said them: status, type, code, param and message unchanged. The upstream refusing the
    gateway's own credential (401/403) is the gateway's misconfiguration, a 502 that says so, never the
    client's 401. Upstream failures are 502 (503 for 503/529 overload, 504 for a timeout) naming the
    provider, with the upstream's own words kept.
    """
    if not isinstance(error, UpstreamError):
        return GatewayError(502, f"upstream failed: {type(error).__name__}", "api_error", code="upstream_error")
    provider = error.provider
    detail = error.detail
    tried = f" (after {attempts} attempts)" if attempts > 1 else ""
    if error.kind == "http":
        status = error.status or 502
        said = detail.message if detail is not None else error.message
        if status in CREDENTIAL_REFUSED:
            return GatewayError(502, f"provider {provider!r} refused the gateway's own credential for it (HTTP "
                                f"{status}: {said}); this is the gateway's configuration, not your API key"
                                + tried, "api_error", code="provider_auth_failed", provider=provider)
        if status == 429 or error.client_fault:
            headers = []
            if status == 429 and error.retry_after is not None:
                headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
            if detail is not None:
                return GatewayError(status, detail.message, detail.type or _DEFAULT_TYPES.get(status, "invalid_request_error"),
                                    param=detail.param, code=detail.code, headers=headers, provider=provider)
            return GatewayError(status, error.message, _DEFAULT_TYPES.get(status, "invalid_request_error"),
                                headers=headers, provider=provider)
        out = 503 if status in (503, 529) else 502
        code = (detail.code if detail is not None and detail.code else None) or f"upstream_{status}"
        return GatewayError(out, f"provider {provider!r}: upstream returned {status}: {said}{tried}",
                            "server_error" if out == 503 else "api_error", code=code, provider=provider)
    if error.kind == "local":
        return GatewayError(503, f"the gateway ran out of local resources and did not send the request to provider "
                            f"{provider!r} ({error.message}); this is the gateway's overload, not the provider's: "
                            "retry shortly", "server_error", code="gateway_overloaded", provider=provider)
    if error.kind == "timeout":
        return GatewayError(504, f"provider {provider!r}: {error.message}{tried}", "timeout_error",
                            code="upstream_timeout", provider=provider)
    return GatewayError(502, f"provider {provider!r}: {error.message}{tried}", "api_error",
                        code=f"upstream_{error.kind}", provider=provider)


def stream_error(error: BaseException) -> GatewayError:
    """The error a stream ends with after its first byte: the upstream's words where it gave them."""
    if isinstance(error, UpstreamError) and error.detail is not None and error.kind != "http":
        detail = error.detail
        return GatewayError(502, f"provider {error.provider!r}: {detail.message}", detail.type or "api_error",
                            param=detail.param, code=detail.code or "upstream_stream_error", provider=error.provider)
    return client_error(error)
