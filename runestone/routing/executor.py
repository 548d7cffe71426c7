"""The request path: route a request, try providers under one deadline, relay the answer.

``Gateway`` holds read-only handles on everything the tree publishes (provider table, breaker views,
failover groups, health) plus the non-blocking senders (telemetry, breaker outcomes). ``Gateway.chat``
runs one client request:

1. plan: the model name becomes an ordered list of ``(provider, upstream model)`` targets — an explicit
   ``provider:model``, a failover group (its strategy orders the members), a pool (by weight), or every
   provider serving the model, ordered by the router policy; a split's name is first replaced by the
   model of the variant the request is assigned (:mod:`.splits`);
2. attempts: each target is tried in turn under ONE deadline for the whole request (never N times the
   timeout). A provider whose breaker is open is skipped; a half-open one is tried only if the breaker
   manager grants a probe slot. A retryable failure moves on to the next provider at once (failover);
   coming back to a provider that already failed waits the retry policy's backoff, never less than the
   upstream's ``Retry-After``. A client-caused 4xx ends the request at once: another provider would
   refuse it too.
3. a stream is committed only once its first bytes are in hand, so a provider that fails before the first
   byte is failed over invisibly; after that a failure ends the stream with an SSE error event — never a
   silent truncation, never a clean end with a partial answer.

Every attempt reports to the breaker (cast), to telemetry (``AttemptFinished``) and the request as a
whole once (``RequestFinished``, which feeds metrics and the usage ledger).
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import attrs
import orjson
import trio

from ..providers.anthropic_translate import TranslationError
from ..providers.base import ChatResult
from ..providers.supervisor import ProviderTable, canonical_provider
from ..resilience.breaker import ALLOW, CLOSED, DENY, Published, check
from ..resilience.errors import UpstreamError, counts_as_failure
from ..resilience.failover import GroupSelector, RouteState
from ..resilience.retry import RetryPolicy
from ..config import lookup_price
from ..telemetry.costs import cost_of, estimate_costs
from ..telemetry.events import AttemptFinished, FailoverEvent, RequestFinished, RetryScheduled
from .policies import NO_REQUIREMENTS, Requirements, route
from .pool import InFlightRequest, InFlightTable
from .splits import NamedRoutes, UnknownVariant

__all__ = ["Gateway", "GatewayError", "RequestContext", "StreamAnswer", "Target"]

log = logging.getLogger("runestone.routing")

_EMPTY: dict = {}


class GatewayError(Exception):
    """A request the gateway answers with an error: OpenAI's error shape, a status, optional headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: list | None = None, provider: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []
        self.provider = provider

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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

    def answer_headers(self, provider: str) -> list[tuple[bytes, bytes]]:
        """The headers every answer from a provider carries: who served it, and the A/B arm if any."""
        headers = [(b"x-runestone-provider", provider.encode())]
        if self.variant is not None:
            headers.append((b"x-runestone-variant", self.variant.header))
        return headers


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


@attrs.define(slots=True)
class StreamAnswer:
    """A committed stream: the first bytes and the open upstream stream to relay after them."""

    provider: str
    model: str
    first: bytes
    stream: Any
    attempt_started: float
    ttft: float


class Gateway:
    """The request path's view of the tree. Built once by the app; survives actor restarts."""

    def __init__(self, config, *, providers: ProviderTable, breakers: Published, breaker_ref, groups: GroupSelector,
                 health: Published, telemetry, inflight: InFlightTable, failover_ref=None,
                 pricing: dict | None = None, aliases: Published | None = None) -> None:
        self.config = config
        self.providers = providers
        self.breakers = breakers
        self.breaker_ref = breaker_ref
        self.groups = groups
        self.failover_ref = failover_ref
        self._view_cache: tuple | None = None
        #: (breaker views, health table, the scores routing uses): rebuilt when either is republished.
        self._scores_cache: tuple | None = None
        #: Called with (key id, tokens) when a request finishes: the per-key tokens-per-minute limit.
        self.on_tokens = None
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
            in_flight=self.telemetry.in_flight,
            breakers=breakers,
            health=scores,
            ttft_ewma=getattr(health, "ttft_ewma_ms", None) or _EMPTY,
            cost=cost,
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
             capability: str | None = None) -> Plan:
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
        state = self._state(body, infos, requirements, policy)
        try:
            decision = route(model, info_list, state, policy=policy, requirements=requirements,
                             health_threshold=self.health_threshold, now=now)
        except ValueError as exc:
            raise GatewayError(400, str(exc), param="runestone.policy") from None
        names = decision.providers + decision.alternatives
        targets = [Target(n, model) for n in names]
        attempts = max(self.retry.max_attempts, min(len(targets), 8))
        return Plan(targets, decision.reason, None, attempts, dict(decision.skipped))

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

    # -- attempts -------------------------------------------------------------------------------------

    async def _admit(self, provider: str, now: float) -> tuple[bool, bool]:
        """May an attempt go to ``provider``? Returns (allowed, holds a half-open probe slot)."""
        verdict = check(self.breakers.value, provider, now)
        if verdict == ALLOW:
            return True, False
        if verdict == DENY:
            return False, False
        try:
            granted = await self.breaker_ref.call(("acquire", provider), timeout=1.0)
        except Exception:
            # The breaker manager is down (restarting): let the request through rather than fail it.
            return True, False
        return bool(granted), bool(granted)

    def _outcome(self, provider: str, model: str, error: BaseException | None, started: float,
                 ttft: float | None, probe: bool) -> None:
        latency = trio.current_time() - started
        if error is None:
            self.breaker_ref.try_cast(("success", provider))
            self.telemetry.emit(AttemptFinished(provider, model, True, None, latency, ttft))
            return
        counts = counts_as_failure(error)
        if counts:
            self.breaker_ref.try_cast(("failure", provider))
        else:
            if probe:
                self.breaker_ref.try_cast(("release", provider))
            # The upstream refused a request it judged wrong: that is the provider working, and as evidence
            # against its health it would let one client's bad requests demote it for everyone.
            return
        kind = _error_kind(error)
        self.telemetry.emit(AttemptFinished(provider, model, False, kind, latency, None))

    async def run(self, ctx: RequestContext, body: dict, plan: Plan, call) -> tuple[Target, Any]:
        """Try ``plan``'s targets with ``call(adapter, upstream_body, target)`` until one succeeds.

        Returns the target that answered and what ``call`` returned. Raises GatewayError when every
        attempt failed, a client fault ended the request, or the deadline passed.
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
        ctx.route_reason = plan.reason + "; candidates=" + ",".join([t.provider for t in targets])
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
            target = targets[i % len(targets)]
            i += 1
            provider = target.provider
            entry = table.get(provider)
            if entry is None or entry.draining:
                targets.remove(target)
                continue
            now = trio.current_time()
            allowed, probe = await self._admit(provider, now)
            if not allowed:
                denied.append(provider)
                targets.remove(target)
                continue
            if attempts:
                if failed.get(provider):
                    retry_after = getattr(last_error, "retry_after", None) if last_target == target else None
                    delay = self.retry.delay(failed[provider], retry_after)
                    if now + delay >= ctx.deadline:
                        if probe:
                            self.breaker_ref.try_cast(("release", provider))
                        break
                    ctx.retries += 1
                    telemetry.emit(RetryScheduled(provider, attempts + 1, delay, _error_kind(last_error)))
                    await trio.sleep(delay)
                else:
                    ctx.failovers += 1
                    telemetry.emit(FailoverEvent("failover", plan.group or "", last_target and
                                                 last_target.provider, provider, attempts))
            attempts += 1
            if entry_row is not None:
                entry_row.provider = provider
                entry_row.attempts = attempts
            upstream = body if body.get("model") == target.model else {**body, "model": target.model}
            started = trio.current_time()
            telemetry.request_started(provider)
            timeout = entry.spec.config.timeout_ms / 1000
            try:
                with trio.move_on_at(min(ctx.deadline, started + timeout)) as attempt_scope:
                    result = await call(entry.adapter, upstream, target)
                if attempt_scope.cancelled_caught:
                    if trio.current_time() >= ctx.deadline:
                        deadline_hit = True
                    raise UpstreamError(provider, "timeout", f"no answer within {timeout:g}s")
            except TranslationError as exc:
                self._ended(provider)
                if probe:
                    self.breaker_ref.try_cast(("release", provider))
                raise GatewayError(400, exc.message, param=exc.param) from None
            except UpstreamError as exc:
                self._ended(provider)
                self._outcome(provider, target.model, exc, started, None, probe)
                last_error, last_target = exc, target
                failed[provider] = failed.get(provider, 0) + 1
                failed_order.append(provider)
                if deadline_hit or not exc.retryable:
                    break
                continue
            except Exception as exc:
                # Anything else escaping an adapter is still this provider failing this attempt: classify it
                # (so the breaker counts it) instead of letting it become a 500 with no failover.
                self._ended(provider)
                log.warning("provider %s raised %s on request %s", provider, type(exc).__name__, ctx.request_id)
                err = UpstreamError(provider, "protocol", f"the provider adapter failed: {type(exc).__name__}")
                self._outcome(provider, target.model, err, started, None, probe)
                last_error, last_target = err, target
                failed[provider] = failed.get(provider, 0) + 1
                failed_order.append(provider)
                continue
            except BaseException:
                self._ended(provider)
                if probe:
                    self.breaker_ref.try_cast(("release", provider))
                raise
            if not isinstance(result, StreamAnswer):
                self._ended(provider)
                self._outcome(provider, target.model, None, started, None, probe)
            elif probe:
                # A probe is judged by the whole stream, reported when it ends.
                result.probe = True  # type: ignore[attr-defined]
            if plan.group:
                self.groups_outcome(plan.group, provider, True, attempts, failed_order)
            ctx.provider = provider
            return target, result
        if plan.group and last_target is not None:
            self.groups_outcome(plan.group, last_target.provider, False, attempts, failed_order)
        if deadline_hit:
            raise GatewayError(504, f"the request deadline of {self.request_timeout:g}s passed after {attempts} "
                               f"attempt(s)" + (f"; last error: {last_error}" if last_error else ""),
                               "timeout_error", code="request_timeout",
                               provider=last_target.provider if last_target else None)
        if last_error is None:
            raise GatewayError(503, f"no provider can take model {ctx.model!r} now: circuit open for "
                               f"{', '.join(denied) or 'all candidates'}", "server_error", code="no_provider_available")
        raise _client_error(last_error, attempts)

    def _ended(self, provider: str) -> None:
        """One request fewer in flight on ``provider``; wakes a drain waiting for it to reach zero."""
        telemetry = self.telemetry
        telemetry.request_ended(provider)
        if not telemetry.in_flight.get(provider):
            self.inflight.provider_done(provider)

    def groups_outcome(self, group: str, provider: str, ok: bool, attempts: int, failed: list[str]) -> None:
        """Group stats and the fallback_success / fallback_exhausted events are the FailoverManager's."""
        self.failover_ref.try_cast(("outcome", group, provider, ok, attempts, tuple(failed)))

    # -- chat -----------------------------------------------------------------------------------------

    def begin(self, request_id: str, key_id: str | None, endpoint: str, model: str, stream: bool) -> RequestContext:
        now = trio.current_time()
        ctx = RequestContext(request_id, key_id, endpoint, now, now + self.request_timeout, model=model)
        self.inflight.add(InFlightRequest(request_id, model, key_id, endpoint, stream, now))
        return ctx

    def finish(self, ctx: RequestContext, *, status: str, http_status: int, error_type: str | None,
               tokens_in: int = 0, tokens_out: int = 0, ttft: float | None = None, stream: bool = False,
               model: str | None = None) -> None:
        self.inflight.remove(ctx.request_id)
        model = model or ctx.model
        if self.on_tokens is not None and (tokens_in or tokens_out):
            self.on_tokens(ctx.key_id or "open", tokens_in + tokens_out)
        cost = cost_of(tokens_in, tokens_out, lookup_price(self.pricing, model)) if (tokens_in or tokens_out) else 0.0
        latency = trio.current_time() - ctx.started
        if ctx.variant is not None:
            ctx.variant.metrics.record(status, http_status, latency, ttft, tokens_in, tokens_out, cost)
        self.telemetry.emit(RequestFinished(
            ctx.request_id, ctx.key_id, ctx.provider or "", model, ctx.endpoint, stream, status, http_status,
            error_type, latency, ttft, tokens_in, tokens_out, cost, ctx.retries,
            ctx.failovers, ctx.route_reason, time.time(),
        ))

    async def complete(self, ctx: RequestContext, body: dict, plan: Plan, kind: str = "chat") -> tuple[Target, ChatResult]:
        """A non-streaming request; ``kind`` "chat" or "embed"."""
        request_id = ctx.request_id
        if kind == "embed":
            async def call(adapter, upstream, target):
                return await adapter.embed(upstream)
        else:
            async def call(adapter, upstream, target):
                return await adapter.complete(upstream, request_id=request_id)
        try:
            target, result = await self.run(ctx, body, plan, call)
        except GatewayError as exc:
            if ctx.variant is not None:
                exc.headers.append((b"x-runestone-variant", ctx.variant.header))
            self.finish(ctx, status="error", http_status=exc.status, error_type=exc.type)
            raise
        except BaseException:
            self.finish(ctx, status="error", http_status=499, error_type="cancelled")
            raise
        self.finish(ctx, status="ok", http_status=200, error_type=None, tokens_in=result.usage.prompt_tokens,
                    tokens_out=result.usage.completion_tokens, model=target.model)
        return target, result

    async def open_stream(self, ctx: RequestContext, body: dict, plan: Plan, include_usage: bool) -> StreamAnswer:
        """Open a stream on the first provider that yields its first bytes; the caller relays it."""
        request_id = ctx.request_id

        async def call(adapter, upstream, target):
            started = trio.current_time()
            stream = await adapter.open_stream(upstream, request_id=request_id, include_usage=include_usage)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                await stream.aclose()
                raise UpstreamError(target.provider, "stream_cut", "upstream stream ended before any event") from None
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
            return StreamAnswer(target.provider, target.model, first, stream, started,
                                trio.current_time() - started)

        try:
            _, answer = await self.run(ctx, body, plan, call)
        except GatewayError as exc:
            if ctx.variant is not None:
                exc.headers.append((b"x-runestone-variant", ctx.variant.header))
            self.finish(ctx, status="error", http_status=exc.status, error_type=exc.type, stream=True)
            raise
        except BaseException:
            self.finish(ctx, status="error", http_status=499, error_type="cancelled", stream=True)
            raise
        return answer

    async def relay(self, ctx: RequestContext, answer: StreamAnswer) -> AsyncIterator[bytes]:
        """The bytes of a committed stream, then its end; an error after the first byte becomes an SSE event.

        Runs in the server's connection task; closing it (the client left) closes the upstream at once.
        """
        stream = answer.stream
        provider = answer.provider
        probe = getattr(answer, "probe", False)
        error: BaseException | None = None
        http_status = 200
        try:
            yield answer.first
            if not stream.finished:
                with trio.move_on_at(ctx.deadline) as scope:
                    async for data in stream:
                        yield data
                if scope.cancelled_caught:
                    error = UpstreamError(provider, "timeout",
                                          f"the request deadline of {self.request_timeout:g}s passed mid-stream")
            if error is None and not stream.finished:
                error = UpstreamError(provider, "stream_cut", "upstream stream ended early")
        except UpstreamError as exc:
            error = exc
        except Exception as exc:  # anything else from the upstream's side still ends the stream honestly
            error = UpstreamError(provider, "protocol", f"the upstream stream failed: {type(exc).__name__}")
        except (GeneratorExit, trio.Cancelled) as exc:
            # The client went away: not the provider's fault, nothing more to write.
            error = exc
            http_status = 499
            raise
        finally:
            self._ended(provider)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            usage = stream.usage
            if http_status == 499:
                if probe:
                    self.breaker_ref.try_cast(("release", provider))
                self.finish(ctx, status="error", http_status=499, error_type="client_disconnected",
                            tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens,
                            ttft=answer.ttft, stream=True, model=answer.model)
            else:
                self._outcome(provider, answer.model, error, answer.attempt_started, answer.ttft, probe)
                self.finish(ctx, status="ok" if error is None else "error", http_status=200 if error is None else 502,
                            error_type=None if error is None else _error_kind(error), tokens_in=usage.prompt_tokens,
                            tokens_out=usage.completion_tokens, ttft=answer.ttft, stream=True, model=answer.model)
        if error is not None:
            # Honest end: an error event the SDKs raise on, and no [DONE] after a partial answer.
            payload = error.to_openai() if isinstance(error, UpstreamError) else {
                "error": {"message": "stream failed", "type": "api_error", "param": None, "code": None}}
            yield b"data: " + orjson.dumps(payload) + b"\n\n"


def _error_kind(error: BaseException | None) -> str:
    if isinstance(error, UpstreamError):
        if error.kind == "http":
            return f"http_{error.status}"
        return error.kind
    return type(error).__name__ if error is not None else "unknown"


def _client_error(error: BaseException, attempts: int) -> GatewayError:
    """What the client sees when every attempt failed: the last upstream's reason, in OpenAI's shape."""
    if not isinstance(error, UpstreamError):
        return GatewayError(502, f"upstream failed: {type(error).__name__}", "api_error", code="upstream_error")
    body = error.to_openai()["error"]
    tried = f" (after {attempts} attempt{'s' if attempts != 1 else ''})" if attempts > 1 else ""
    headers = []
    if error.kind == "http":
        status = error.status or 502
        if status == 429:
            out = 429
            if error.retry_after is not None:
                headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
        elif error.client_fault:
            out = status
        elif status in (503, 529):
            out = 503
        else:
            out = 502
    elif error.kind == "timeout":
        out = 504
    elif error.kind == "local":  # the gateway's own overload (resilience.errors): its 503, not a bad gateway
        out = 503
    else:
        out = 502
    return GatewayError(out, body["message"] + tried, body["type"], code=body["code"], headers=headers,
                        provider=error.provider)
