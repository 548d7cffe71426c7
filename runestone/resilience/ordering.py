"""Orderings: the one way a request's candidate providers are put in the order to try them.

An *ordering* is a small callable policy object with a readable ``repr``, made by a lowercase factory::

    ordering(providers, state, *, rotation=0, rng=random) -> list[ProviderInfo]

It reads only its arguments (the request path's ``RouteState`` snapshot, a round-robin position, a random
source), runs in the caller's task and never awaits. Router policies (``routing.policies.POLICIES``),
failover strategies (``failover.STRATEGIES``) and named pools (``routing.splits.Pool``) are each a table of
these objects, and the sort keys they share are written once here as :class:`Key` values:

========================  ======================================================================
``sorted_by(*keys)``       a stable sort by the keys in turn (``sorted_by(COST, PRIORITY, NAME)``)
``rotated(*then)``         the given order rotated left by ``rotation``, then stably sorted by ``then``
``weighted_shuffle()``     a random order, each provider ahead of the others in proportion to its weight
``weighted_first()``       one provider drawn by weight first, then the others heaviest first
========================  ======================================================================

Each ordering's ``repr`` is also its notation: :func:`ordering_of` builds one from that text, which is how
the registries of router policies and failover strategies in ``runestone/config/orderings.py`` name theirs
(config stands below this package), and :class:`Orderings` is the name -> ordering view of such a registry.

Whatever the ordering, a provider whose breaker refuses it right now goes after the others
(:func:`breakers_last`, on the one breaker predicate ``breaker.refuses``): by the time the others have
failed it may be due for a probe.
"""

from __future__ import annotations

import math
import random as _random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs

from runestone.resilience.breaker import refuses

__all__ = [
    "COST",
    "HEALTH",
    "IN_FLIGHT",
    "KEYS",
    "Key",
    "NAME",
    "Ordering",
    "Orderings",
    "PRIORITY",
    "SCORE",
    "TTFT",
    "WEIGHT",
    "breakers_last",
    "split_refused",
    "enhanced_score",
    "ordering_of",
    "rotated",
    "sorted_by",
    "weighted_first",
    "weighted_shuffle",
]


class Ordering(Protocol):
    def __call__(self, providers: Sequence[Any], state: Any, *, rotation: int = 0,
                 rng: Any = _random) -> list[Any]: ...


@attrs.frozen(repr=False)
class Key:
    """One sort key: ``make(state, providers)`` returns the per-provider key function (lower goes first)."""

    name: str
    make: Callable[[Any, Sequence[Any]], Callable[[Any], Any]] = attrs.field(eq=False)

    def __repr__(self) -> str:
        return self.name


def _priority(p: Any) -> int:
    return p.priority


def _name(p: Any) -> str:
    return p.name


def _heaviest(p: Any) -> float:
    return -p.weight


def _lookup(field: str, default: float, sign: float = 1.0) -> Callable[[Any, Sequence[Any]], Callable[[Any], Any]]:
    def make(state: Any, _providers: Sequence[Any]) -> Callable[[Any], Any]:
        values = getattr(state, field)
        if sign > 0:
            return lambda p: values.get(p.name, default)
        return lambda p: -values.get(p.name, default)

    return make


def _score(state: Any, providers: Sequence[Any]) -> Callable[[Any], float]:
    best = min(p.priority for p in providers)
    return lambda p: -enhanced_score(p, state, best)


#: Lower ``priority`` first.
PRIORITY = Key("priority", lambda _s, _p: _priority)
#: By name: the last tie-break, so a decision is deterministic.
NAME = Key("name", lambda _s, _p: _name)
#: Higher ``weight`` first.
WEIGHT = Key("weight", lambda _s, _p: _heaviest)
#: Higher health score first (unknown: 1.0, nothing known against it).
HEALTH = Key("health", _lookup("health", 1.0, -1.0))
#: Lower time-to-first-token average first (unmeasured last).
TTFT = Key("ttft", _lookup("ttft_ewma", math.inf))
#: Cheaper estimate first (unpriced last).
COST = Key("cost", _lookup("cost", math.inf))
#: Fewer requests in flight first.
IN_FLIGHT = Key("in_flight", _lookup("in_flight", 0))
#: Higher :func:`enhanced_score` first.
SCORE = Key("score", _score)


def _key_function(keys: tuple[Key, ...], state: Any, providers: Sequence[Any]) -> Callable[[Any], Any]:
    fns = [k.make(state, providers) for k in keys]
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        a, b = fns
        return lambda p: (a(p), b(p))
    if len(fns) == 3:
        a, b, c = fns
        return lambda p: (a(p), b(p), c(p))
    return lambda p: tuple(f(p) for f in fns)


@attrs.frozen(repr=False)
class SortedBy:
    """A stable sort by ``keys`` in turn (equal providers keep the given order)."""

    keys: tuple[Key, ...]

    def __call__(self, providers: Sequence[Any], state: Any, *, rotation: int = 0, rng: Any = _random) -> list[Any]:
        if len(providers) < 2:
            return list(providers)
        return sorted(providers, key=_key_function(self.keys, state, providers))

    def __repr__(self) -> str:
        return f"sorted_by({', '.join(map(repr, self.keys))})"


@attrs.frozen(repr=False)
class Rotated:
    """The given order rotated left by ``rotation``; then a stable sort by ``then``, if any, so that ties
    keep the rotation (idle providers share the load)."""

    then: tuple[Key, ...] = ()

    def __call__(self, providers: Sequence[Any], state: Any, *, rotation: int = 0, rng: Any = _random) -> list[Any]:
        n = len(providers)
        if n == 0:
            return []
        shift = rotation % n
        ordered = list(providers[shift:]) + list(providers[:shift]) if shift else list(providers)
        if self.then:
            ordered.sort(key=_key_function(self.then, state, providers))
        return ordered

    def __repr__(self) -> str:
        return f"rotated({', '.join(map(repr, self.then))})"


@attrs.frozen(repr=False)
class WeightedShuffle:
    """A random order in which each provider's chance of coming before the others is proportional to its
    ``weight`` (weighted sampling without replacement, Efraimidis-Spirakis); weight 0 goes last."""

    def __call__(self, providers: Sequence[Any], state: Any, *, rotation: int = 0, rng: Any = _random) -> list[Any]:
        random = rng.random

        def key(p: Any) -> float:
            # u ** (1/w) for u uniform in (0, 1]: the largest key goes first.
            if p.weight <= 0:
                return -1.0
            return (1.0 - random()) ** (1.0 / p.weight)

        return sorted(providers, key=key, reverse=True)

    def __repr__(self) -> str:
        return "weighted_shuffle()"


@attrs.frozen(repr=False)
class WeightedFirst:
    """One provider drawn by ``weight`` goes first, the others follow heaviest first (ties keep the given
    order). A provider of weight 0 is never drawn while another can be."""

    def __call__(self, providers: Sequence[Any], state: Any, *, rotation: int = 0, rng: Any = _random) -> list[Any]:
        ordered = sorted(providers, key=_heaviest)
        if len(ordered) < 2:
            return ordered
        total = 0.0
        for p in ordered:
            total += p.weight
        if total > 0:
            x = rng.random() * total
            pick = 0
            for i, p in enumerate(ordered):
                if p.weight > 0:
                    pick = i  # rounding may leave x >= 0 after the last step: keep a weighted one
                    x -= p.weight
                    if x < 0:
                        break
            if pick:
                ordered.insert(0, ordered.pop(pick))
        return ordered

    def __repr__(self) -> str:
        return "weighted_first()"


def sorted_by(*keys: Key) -> SortedBy:
    return SortedBy(tuple(keys))


def rotated(*then: Key) -> Rotated:
    return Rotated(tuple(then))


def weighted_shuffle() -> WeightedShuffle:
    return WeightedShuffle()


def weighted_first() -> WeightedFirst:
    return WeightedFirst()


KEYS: Mapping[str, Key] = {k.name: k for k in (PRIORITY, NAME, WEIGHT, HEALTH, TTFT, COST, IN_FLIGHT, SCORE)}
_SHAPES: Mapping[str, Callable[..., Ordering]] = {
    "sorted_by": sorted_by, "rotated": rotated, "weighted_shuffle": weighted_shuffle, "weighted_first": weighted_first}
_KEYED = frozenset({"sorted_by", "rotated"})
_NOTATION = re.compile(r"\s*(\w+)\(\s*((?:\w+\s*(?:,\s*\w+\s*)*)?)\)\s*")
_BUILT: dict[str, Ordering] = {}


def ordering_of(text: str) -> Ordering:
    """The ordering ``text`` writes, in the notation of the orderings' ``repr`` (``sorted_by(cost, priority,
    name)``, ``rotated()``, ``weighted_shuffle()``); built once per text. ValueError naming what is wrong."""
    built = _BUILT.get(text)
    if built is not None:
        return built
    match = _NOTATION.fullmatch(text)
    shape = match and _SHAPES.get(match.group(1))
    if shape is None:
        raise ValueError(f"not an ordering: {text!r}; expected one of {', '.join(f'{s}(...)' for s in _SHAPES)}")
    names = [n.strip() for n in match.group(2).split(",")] if match.group(2) else []
    unknown = [n for n in names if n not in KEYS]
    if unknown:
        raise ValueError(f"unknown sort key(s) {', '.join(unknown)} in {text!r}; expected some of {', '.join(KEYS)}")
    if names and match.group(1) not in _KEYED:
        raise ValueError(f"{match.group(1)}() takes no sort key: {text!r}")
    built = _BUILT[text] = shape(*(KEYS[n] for n in names))
    return built


class Orderings(Mapping[str, Ordering]):
    """The live ``name -> ordering`` view of a registry of named orderings (``runestone.config.orderings``):
    what the registry holds now, each entry's ``ordering`` text built by :func:`ordering_of`."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Mapping[str, Any]) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Ordering:
        return ordering_of(self._registry[name].ordering)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return "Orderings({" + ", ".join(f"{n!r}: {self[n]!r}" for n in self) + "})"


def split_refused(providers: Sequence[Any], breakers: Mapping[str, Any],
                  now: float | None) -> tuple[list[Any], list[Any]]:
    """(those whose breaker lets them be tried at ``now``, those it refuses), each in the given order.

    Without ``now`` every open breaker counts as refusing.
    """
    if not breakers:
        return list(providers), []
    at = -math.inf if now is None else now
    kept = []
    refused = []
    for p in providers:
        (refused if refuses(breakers, p.name, at) else kept).append(p)
    return kept, refused


def breakers_last(ordered: Sequence[Any], breakers: Mapping[str, Any], now: float | None) -> list[Any]:
    """``ordered`` with the providers whose breaker refuses them at ``now`` moved last, keeping their order."""
    kept, refused = split_refused(ordered, breakers, now)
    if refused:
        kept.extend(refused)
    return kept


# Weights of the ``enhanced`` blend; they sum to 1, so the score stays in [0, 1].
_W_HEALTH = 0.4
_W_LATENCY = 0.3
_W_LOAD = 0.2
_W_PRIORITY = 0.1
# The time to first token that scores 0.5 on latency.
_LATENCY_REF_MS = 500.0


def enhanced_score(p: Any, state: Any, best_priority: int) -> float:
    """The ``enhanced`` policy's blend, in [0, 1], higher is better::

        0.4 * health                                    (score, 1.0 when unknown)
      + 0.3 * 500 / (500 + ttft_ms)                     (0.5 when unmeasured)
      + 0.2 * (1 - in_flight / max_concurrency)         (1 / (1 + in_flight) if unlimited)
      + 0.1 * 1 / (1 + priority - best_priority)
    """
    name = p.name
    health = state.health.get(name, 1.0)
    ttft = state.ttft_ewma.get(name)
    latency = 0.5 if ttft is None else _LATENCY_REF_MS / (_LATENCY_REF_MS + max(ttft, 0.0))
    in_flight = state.in_flight.get(name, 0)
    if p.max_concurrency > 0:
        load = 1.0 - min(in_flight / p.max_concurrency, 1.0)
    else:
        load = 1.0 / (1.0 + in_flight)
    rank = 1.0 / (1.0 + max(p.priority - best_priority, 0))
    return _W_HEALTH * health + _W_LATENCY * latency + _W_LOAD * load + _W_PRIORITY * rank
