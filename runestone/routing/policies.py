"""Router policies: which providers may serve one request, and in what order to try them.

``route`` is a pure function of the candidates and of what the request path read
from the published snapshots (``RouteState``): it runs in the request's own task
and never waits on an actor. It first filters -- the model, the client's
``exclude`` and required capabilities, open breakers, full providers, the cost
and latency ceilings -- then orders what is left by the policy, then moves the
client's ``prefer`` list to the front. Providers below the health threshold are
set aside as ``alternatives`` and used only when nothing healthy is left, except
for passive probes: one of them whose probe is due (at most one per provider
every 5 s, claimed in ``state.probes``; see ``runestone.resilience.failover``)
is tried first for this request, so that its health score can recover.
A client states its wishes in the request body's ``runestone`` object, read by
``parse_requirements``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from runestone.config.orderings import ROUTER_POLICY_REGISTRY
from runestone.resilience.breaker import refuses
from runestone.resilience.failover import ProviderInfo, RouteState
from runestone.resilience.ordering import Ordering, Orderings, enhanced_score

__all__ = [
    "POLICIES",
    "CAPABILITIES",
    "Requirements",
    "RouteDecision",
    "NO_REQUIREMENTS",
    "parse_requirements",
    "route",
    "enhanced_score",
]

#: Router policies: name -> the ordering it stands for, a view of the one registry
#: (``runestone.config.orderings.ROUTER_POLICY_REGISTRY``, what each does).
POLICIES: Mapping[str, Ordering] = Orderings(ROUTER_POLICY_REGISTRY)
CAPABILITIES = frozenset({"streaming", "tools", "vision", "embeddings"})

_NO_SKIPS: Mapping[str, str] = MappingProxyType({})


@attrs.frozen
class Requirements:
    """A client's routing wishes for one request (the body's ``runestone`` object).

    ``max_latency_ms`` bounds the provider's average time to first token;
    ``max_cost`` bounds the request's estimated cost. Unmeasured or unpriced
    providers pass those bounds: nothing is known against them.
    """

    policy: str | None = None
    max_cost: float | None = None
    max_latency_ms: float | None = None
    require: frozenset[str] = frozenset()
    prefer: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    #: For an A/B split: the arm to use instead of a drawn one.
    variant: str | None = None


NO_REQUIREMENTS = Requirements()


@attrs.frozen
class RouteDecision:
    """The outcome of routing one request.

    ``providers``: the ones to try, first to try first. ``alternatives``: providers
    set aside as unhealthy, to try only after ``providers`` failed. ``probe``: the
    provider set aside as unhealthy that this request probes (then first of
    ``providers``), if any. ``skipped``:
    providers serving the model that were ruled out, with the reason (``excluded``,
    ``circuit_open``, ``at_capacity``, ``missing_capability:<name>``,
    ``over_max_cost``, ``over_max_latency``).
    """

    providers: tuple[str, ...]
    reason: str
    alternatives: tuple[str, ...] = ()
    skipped: Mapping[str, str] = _NO_SKIPS
    probe: str | None = None


_FIELDS = ("policy", "max_cost", "max_latency_ms", "require", "prefer", "exclude", "variant")


def _number(obj: Mapping, name: str, *, positive: bool) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"runestone.{name} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"runestone.{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _names(obj: Mapping, name: str) -> tuple[str, ...]:
    value = obj.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"runestone.{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def parse_requirements(obj: Any) -> Requirements:
    """Read the body's ``runestone`` object; ``None`` means no wishes.

    Raises ``ValueError`` whose message names the offending field
    (``runestone.<field>``), ready to become a 400 for the client.
    """
    if obj is None:
        return NO_REQUIREMENTS
    if not isinstance(obj, Mapping):
        raise ValueError(f"runestone must be an object, got {type(obj).__name__}")
    if not obj:
        return NO_REQUIREMENTS
    for key in obj:
        if key not in _FIELDS:
            raise ValueError(f"runestone.{key} is not a known field; expected one of {', '.join(_FIELDS)}")
    policy = obj.get("policy")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"runestone.policy must be one of {', '.join(sorted(POLICIES))}, got {policy!r}")
    require = _names(obj, "require")
    for capability in require:
        if capability not in CAPABILITIES:
            raise ValueError(
                f"runestone.require: unknown capability {capability!r}; expected some of "
                f"{', '.join(sorted(CAPABILITIES))}"
            )
    variant = obj.get("variant")
    if variant is not None and not (isinstance(variant, str) and variant):
        raise ValueError(f"runestone.variant must be a non-empty string naming a split's arm, got {variant!r}")
    return Requirements(
        variant=variant,
        policy=policy,
        max_cost=_number(obj, "max_cost", positive=False),
        max_latency_ms=_number(obj, "max_latency_ms", positive=True),
        require=frozenset(require),
        prefer=_names(obj, "prefer"),
        exclude=frozenset(_names(obj, "exclude")),
    )


def route(
    model: str,
    candidates: Sequence[ProviderInfo],
    state: RouteState,
    *,
    policy: str = "default",
    requirements: Requirements = NO_REQUIREMENTS,
    health_threshold: float = 0.0,
    now: float,
) -> RouteDecision:
    """Pick and order the providers for one request for ``model``.

    The client's ``requirements.policy``, when given, overrides ``policy``; what each
    policy does is said in its registry entry (``runestone/config/orderings.py``). Ties
    fall back to priority, then name, so a decision is deterministic. A provider whose breaker is open but due for a probe is kept:
    the request path asks the breaker manager for the probe slot. A provider set
    aside below ``health_threshold`` whose passive probe is due goes first, unless
    the client prefers others; claiming it is the one write ``route`` makes (into
    ``state.probes``, when given).
    """
    chosen_policy = requirements.policy or policy
    if chosen_policy not in POLICIES:
        raise ValueError(f"unknown routing policy {chosen_policy!r}; expected one of {sorted(POLICIES)}")
    exclude = requirements.exclude
    require = requirements.require
    max_cost = requirements.max_cost
    max_latency = requirements.max_latency_ms
    in_flight = state.in_flight
    breakers = state.breakers
    health = state.health
    skipped: dict[str, str] | None = None
    chosen: list[ProviderInfo] = []
    unhealthy: list[ProviderInfo] = []
    for p in candidates:
        if not p.serves(model):
            continue
        name = p.name
        why = None
        if name in exclude:
            why = "excluded"
        elif breakers and refuses(breakers, name, now):
            why = "circuit_open"
        elif require and not require <= p.capabilities:
            why = "missing_capability:" + ",".join(sorted(require - p.capabilities))
        elif p.max_concurrency and in_flight.get(name, 0) >= p.max_concurrency:
            why = "at_capacity"
        elif max_cost is not None and state.cost.get(name, 0.0) > max_cost:
            why = "over_max_cost"
        elif max_latency is not None and state.ttft_ewma.get(name, 0.0) > max_latency:
            why = "over_max_latency"
        if why is not None:
            if skipped is None:
                skipped = {}
            skipped[name] = why
        elif health_threshold > 0.0 and health.get(name, 1.0) < health_threshold:
            unhealthy.append(p)
        else:
            chosen.append(p)

    reason = "policy=" + chosen_policy
    if not chosen:
        if unhealthy:
            chosen, unhealthy = unhealthy, []
            reason += "; only providers below the health threshold are left"
        elif skipped:
            reason = f"every provider of model {model!r} was ruled out"
        else:
            reason = f"no provider serves model {model!r}"
    ordering = POLICIES[chosen_policy]
    ordered = ordering(chosen, state)
    aside = ordering(unhealthy, state) if unhealthy else unhealthy
    probe = None
    probes = state.probes
    if aside and probes is not None:
        for p in aside:
            if probes.claim(p.name, now):
                probe = p.name
                aside.remove(p)
                ordered.insert(0, p)
                reason += f"; passive probe of {probe} (below the health threshold)"
                break
    if requirements.prefer and len(ordered) > 1:
        rank = {name: i for i, name in enumerate(requirements.prefer)}
        last = len(rank)
        ordered.sort(key=lambda p: rank.get(p.name, last))  # stable: the rest keep the policy's order
    return RouteDecision(
        providers=tuple(p.name for p in ordered),
        reason=reason,
        alternatives=tuple(p.name for p in aside),
        skipped=MappingProxyType(skipped) if skipped else _NO_SKIPS,
        probe=probe,
    )
