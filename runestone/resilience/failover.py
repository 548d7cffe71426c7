"""Failover groups and the strategies that order a group's providers for one request.

A failover group names the providers a request may move between when one fails,
and how to order them (``STRATEGIES``). ``order_candidates`` is the pure
ordering; ``GroupSelector.select`` applies a group to the providers registered
now and advances the group's round-robin counter. Both run in the caller's task
and read only immutable inputs, so the request path never waits on the
``FailoverManager``'s mailbox: the manager owns the groups and publishes them,
the selector reads what was published.

Whatever the strategy, providers whose breaker refuses them right now go last
(they may be due for a probe by the time the earlier ones have failed), and in
``select`` providers below the group's health threshold go after the healthy ones.

Passive probes: a provider set aside for its health score would get no traffic
while healthy ones answer, so its score could never change (active health
checks are off by default). So it gets one request every ``PROBE_INTERVAL``
(5 s) as a probe: the first time a request is routed while the provider is set
aside and its last probe is at least 5 s old (or it never had one), it is put
first for that request; if it fails, the request fails over as usual. So a
provider set aside gets at most one probe per 5 s whatever the traffic, the
first as soon as it is set aside. ``ProbeSchedule`` keeps the time of each
provider's last probe; ``select`` and ``runestone.routing.policies.route``
claim a probe inside their synchronous call, so under trio two requests never
take the same one. How the probes' outcomes lift the score again is in
``runestone.telemetry.health``.
"""

from __future__ import annotations

import math
import random as _random
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from runestone.config.orderings import FAILOVER_STRATEGY_REGISTRY
from runestone.resilience.breaker import BreakerView, refuses
from runestone.resilience.ordering import Ordering, Orderings, breakers_last
from runestone.runtime import Published

__all__ = [
    "STRATEGIES",
    "DEFAULT_GROUP",
    "DEFAULT_CAPABILITIES",
    "GroupSpec",
    "PROBE_INTERVAL",
    "ProbeSchedule",
    "ProviderInfo",
    "RouteState",
    "GroupSelector",
    "order_candidates",
]

#: Failover strategies: name -> the ordering it stands for, a view of the one registry
#: (``runestone.config.orderings.FAILOVER_STRATEGY_REGISTRY``, what each does).
STRATEGIES: Mapping[str, Ordering] = Orderings(FAILOVER_STRATEGY_REGISTRY)
DEFAULT_GROUP = "default"
DEFAULT_CAPABILITIES = frozenset({"streaming", "tools", "vision"})

_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: Seconds between two passive probes of a provider set aside for its health score.
PROBE_INTERVAL = 5.0


def _strategy(_inst: object, _attribute: attrs.Attribute, value: str) -> None:
    if value not in STRATEGIES:
        raise ValueError(f"unknown failover strategy {value!r}; expected one of {sorted(STRATEGIES)}")


@attrs.frozen
class GroupSpec:
    """A failover group: which providers, in what order, and how many may be tried.

    An empty ``providers`` tuple is allowed only for the ``default`` group, where it
    means every registered provider. ``select`` returns at most ``max_attempts``
    candidates; providers whose health score is below ``health_threshold`` are
    tried only after the healthy ones.
    """

    name: str
    providers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    strategy: str = attrs.field(default="priority", validator=_strategy)
    max_attempts: int = 3
    health_threshold: float = 0.5

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> GroupSpec:
        """From a configured group (or, with ``name``, the ``[failover]`` defaults:
        ``GroupSpec.from_config(cfg.failover, "default")``)."""
        return cls(
            name=name if name is not None else cfg.name,
            providers=getattr(cfg, "providers", ()) if name is None else (),
            strategy=cfg.strategy,
            max_attempts=cfg.max_attempts,
            health_threshold=cfg.health_threshold,
        )

    def __attrs_post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a failover group needs a non-empty name")
        if not self.providers and self.name != DEFAULT_GROUP:
            raise ValueError(f"failover group {self.name!r} lists no providers")
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"failover group {self.name!r} lists a provider twice")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"failover group {self.name!r}: max_attempts must be >= 1")
        if not 0.0 <= self.health_threshold <= 1.0:
            raise ValueError(f"failover group {self.name!r}: health_threshold must be in [0, 1]")


# A version suffix vendors put on a model id: Anthropic's -20241022, OpenAI's -2024-08-06, Gemini's -001.
_DATED = re.compile(r"-(?:20\d{6}|20\d\d-\d\d-\d\d|\d{3}|latest)$")


def undated(model: str) -> str:
    """``model`` without its date or version suffix (or ``-latest``): the name of the model it is a version of."""
    return _DATED.sub("", model)


@attrs.frozen
class ProviderInfo:
    """What routing needs to know about one registered provider.

    ``models`` lists the model names it serves; an entry ``"*"`` serves any model
    and an entry ending in ``*`` serves every name with that prefix. Model ids as
    vendors date them are one model: a provider listing ``claude-3-5-haiku-latest``
    (or ``gpt-4o``) serves ``claude-3-5-haiku-20241022`` (``gpt-4o-2024-08-06``), and
    one listing a dated id serves its undated alias (see :func:`undated`).
    ``max_concurrency`` 0 means unlimited.
    """

    name: str
    priority: int = 0
    weight: float = 1.0
    max_concurrency: int = 0
    models: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    capabilities: frozenset[str] = attrs.field(default=DEFAULT_CAPABILITIES, converter=frozenset)
    _prefixes: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _undated: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"provider {self.name!r}: weight must be >= 0")
        if self.max_concurrency < 0:
            raise ValueError(f"provider {self.name!r}: max_concurrency must be >= 0")
        prefixes = tuple(m[:-1] for m in self.models if m.endswith("*"))
        object.__setattr__(self, "_prefixes", prefixes)
        object.__setattr__(self, "_undated", frozenset(undated(m) for m in self.models if not m.endswith("*")))

    def serves(self, model: str) -> bool:
        if model in self.models:
            return True
        for prefix in self._prefixes:
            if model.startswith(prefix):
                return True
        return undated(model) in self._undated if len(self._undated) else False


@attrs.define
class ProbeSchedule:
    """When each provider set aside for its health score last got a passive probe.

    Request-path state like ``GroupSelector.rotations``: written only by the
    routing calls in trio's single thread, never across an ``await``.
    """

    interval: float = PROBE_INTERVAL
    #: provider -> the clock time of its last probe.
    last: dict[str, float] = attrs.field(factory=dict)

    def claim(self, provider: str, now: float) -> bool:
        """Take ``provider``'s probe at ``now`` if one is due (none for ``interval`` seconds)."""
        last = self.last.get(provider)
        if last is not None and now < last + self.interval:
            return False
        self.last[provider] = now
        return True

    def first_due(self, names: Sequence[str], now: float) -> str | None:
        """Claim the probe of the first of ``names`` that is due; None when none is."""
        for name in names:
            if self.claim(name, now):
                return name
        return None


@attrs.frozen
class RouteState:
    """What the request path read from the published snapshots for one decision.

    ``health`` is a score in [0, 1] (missing: 1.0, nothing known against it);
    ``ttft_ewma`` the moving average of time to first token in milliseconds;
    ``cost`` this request's estimated cost per provider, in the pricing table's unit;
    ``probes`` where passive probes are claimed (None: no probes).
    """

    in_flight: Mapping[str, int] = _EMPTY
    breakers: Mapping[str, BreakerView] = _EMPTY
    health: Mapping[str, float] = _EMPTY
    ttft_ewma: Mapping[str, float] = _EMPTY
    cost: Mapping[str, float] = _EMPTY
    probes: ProbeSchedule | None = None


def order_candidates(
    strategy: str,
    providers: Sequence[ProviderInfo],
    state: RouteState,
    *,
    rotation: int = 0,
    rng: Any = _random,
    now: float | None = None,
) -> list[str]:
    """Order ``providers`` by ``strategy`` (a name in ``STRATEGIES``); the names, first to try first.

    What each strategy does is said in its registry entry (``runestone/config/orderings.py``).
    Then providers whose breaker refuses them at ``now`` are moved last, keeping
    their relative order (without ``now``, every open breaker refuses).
    """
    ordering = STRATEGIES.get(strategy)
    if ordering is None:
        raise ValueError(f"unknown failover strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    ordered = ordering(providers, state, rotation=rotation, rng=rng)
    return [p.name for p in breakers_last(ordered, state.breakers, now)]


@attrs.define
class GroupSelector:
    """Applies the published failover groups to one request, in the caller's task.

    Made once by whoever builds the tree and shared by the ``FailoverManager``
    (which publishes into ``groups``) and the request path (which calls
    ``select``); it outlives manager restarts, so round-robin counters do too.
    """

    #: Published ``Mapping[str, GroupSpec]``, owned by the ``FailoverManager``.
    groups: Published = attrs.field(factory=Published)
    rng: Any = _random
    #: What the ``default`` group is while none named so is published.
    default: GroupSpec = attrs.field(factory=lambda: _DEFAULT_SPEC)
    #: Per-group count of selections, the round-robin position.
    rotations: dict[str, int] = attrs.field(factory=dict)
    #: Passive probes of providers set aside for health, shared with the default router.
    probes: ProbeSchedule = attrs.field(factory=ProbeSchedule)

    def group(self, name: str) -> GroupSpec:
        """The group called ``name``; ``default`` exists even when not configured.

        Raises ``LookupError`` for an unknown group.
        """
        groups = self.groups.value
        spec = groups.get(name) if groups else None
        if spec is None:
            if name != DEFAULT_GROUP:
                raise LookupError(f"no failover group named {name!r}")
            spec = self.default
        return spec

    def select(
        self,
        group_name: str,
        providers_info: Sequence[ProviderInfo] | Mapping[str, ProviderInfo],
        state: RouteState,
        *,
        now: float | None = None,
    ) -> list[str]:
        """The providers to try for one request, first to try first.

        Synchronous and without any ``await``, so under trio it runs atomically:
        two concurrent requests never get the same round-robin position or the
        same passive probe. Only members of the group that are in
        ``providers_info`` (the registered providers) are considered, in the
        group's listed order (the ``default`` group, which lists none, takes
        them by name); at most the group's ``max_attempts`` are returned. A
        member below the group's health threshold goes first when its passive
        probe is due (``now`` given; see the module docstring). Raises
        ``LookupError`` for an unknown group.
        """
        spec = self.group(group_name)
        if isinstance(providers_info, Mapping):
            if spec.providers:
                members = [providers_info[n] for n in spec.providers if n in providers_info]
            else:
                members = list(providers_info.values())
        elif spec.providers:
            by_name = {p.name: p for p in providers_info}
            members = [by_name[n] for n in spec.providers if n in by_name]
        else:
            members = list(providers_info)
        if not spec.providers:
            members.sort(key=_by_name)
        rotations = self.rotations
        rotation = rotations.get(group_name, 0)
        rotations[group_name] = rotation + 1
        names = order_candidates(spec.strategy, members, state, rotation=rotation, rng=self.rng, now=now)
        threshold = spec.health_threshold
        health = state.health
        if threshold > 0.0 and health:
            healthy = []
            unhealthy = []
            breakers = state.breakers
            at = -math.inf if now is None else now
            for name in names:
                if health.get(name, 1.0) >= threshold or refuses(breakers, name, at):
                    # Blocked ones are already last; keep them there.
                    healthy.append(name)
                else:
                    unhealthy.append(name)
            if unhealthy:
                cut = len(healthy)
                while cut and refuses(breakers, healthy[cut - 1], at):
                    cut -= 1
                probe = self.probes.first_due(unhealthy, now) if cut and now is not None else None
                if probe is not None:
                    unhealthy.remove(probe)
                    names = [probe] + healthy[:cut] + unhealthy + healthy[cut:]
                else:
                    names = healthy[:cut] + unhealthy + healthy[cut:]
        return names[: spec.max_attempts]


def _by_name(p: ProviderInfo) -> str:
    return p.name


_DEFAULT_SPEC = GroupSpec(DEFAULT_GROUP)
