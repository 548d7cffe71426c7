"""The ``FailoverManager`` actor: owns the failover groups and their statistics.

Groups change by call (operators, the control plane) and are published as an
immutable ``Mapping[str, GroupSpec]`` into the ``GroupSelector``'s cell, which
the request path reads through ``select`` without touching this mailbox. Each
finished request through a group reports once, by casting a :class:`GroupOutcome`:
the provider of each attempt in the order tried, and whether the last one served
it. From these the manager keeps per-group and per-provider counts and emits the
telemetry ``FailoverEvent``\\ s ``fallback_success`` (served, after another
provider had failed the request) and ``fallback_exhausted`` (every attempt failed).

Messages (``@attrs.frozen``; anything else gets the runtime's unknown-message policy)::

    cast   GroupOutcome(group, tried, ok)
    calls  CreateGroup(spec)        -> GroupSpec      (Rejected conflict if it exists)
           UpdateGroup(spec)        -> GroupSpec      (Rejected not_found if it does not)
           DeleteGroup(name)        -> GroupSpec      (the removed one)
           GetGroup(name)           -> GroupSpec      (``default`` always exists)
           ListGroups()             -> Mapping[str, GroupSpec]
           GetStats(group | None)   -> FailoverStats | Mapping[str, FailoverStats]
           ResetStats(group | None) -> None
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from runestone.resilience.failover import DEFAULT_GROUP, GroupSelector, GroupSpec
from runestone.runtime import Actor, Rejected
from runestone.telemetry.events import FailoverEvent

__all__ = ["CreateGroup", "DeleteGroup", "FailoverManager", "FailoverStats", "GetGroup", "GetStats", "GroupOutcome",
           "GroupStats", "ListGroups", "NAME", "ProviderStats", "ResetStats", "UpdateGroup"]

NAME = "failover_manager"

_spec = attrs.validators.instance_of(GroupSpec)


def _tried(_inst: object, _attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("a group outcome needs at least one attempt")


@attrs.frozen
class GroupOutcome:
    """Cast: one finished request through ``group``.

    ``tried`` names the provider of every attempt in the order made (a provider tried twice appears
    twice); ``ok`` says whether the last one served the request (if not, every attempt failed).
    """

    group: str
    tried: tuple[str, ...] = attrs.field(converter=tuple, validator=_tried)
    ok: bool


@attrs.frozen
class CreateGroup:
    """Call: add a group; ``Rejected("conflict")`` if one has its name."""

    spec: GroupSpec = attrs.field(validator=_spec)


@attrs.frozen
class UpdateGroup:
    """Call: replace a group (``default`` may be set without existing); ``Rejected("not_found")`` otherwise."""

    spec: GroupSpec = attrs.field(validator=_spec)


@attrs.frozen
class DeleteGroup:
    """Call: remove the group called ``name`` and its statistics; replies the removed spec."""

    name: str


@attrs.frozen
class GetGroup:
    """Call: the group called ``name``."""

    name: str


@attrs.frozen
class ListGroups:
    """Call: every group published."""


@attrs.frozen
class GetStats:
    """Call: the statistics of ``group``, or of every group that has some when None."""

    group: str | None = None


@attrs.frozen
class ResetStats:
    """Call: forget the statistics of ``group``, or of every group when None."""

    group: str | None = None


log = logging.getLogger("runestone.resilience")


def _drop(_event: object) -> None:
    pass


@attrs.frozen
class GroupStats:
    """Counts for one failover group since start or the last reset."""

    #: Requests that finished through this group.
    requests: int = 0
    #: Attempts made for them, first ones included.
    attempts: int = 0
    #: Requests that were served.
    successes: int = 0
    #: Attempts that failed.
    failures: int = 0
    #: Requests served by a provider other than the first one tried.
    fallbacks: int = 0
    #: Requests on which every attempt failed.
    exhausted: int = 0


@attrs.frozen
class ProviderStats:
    """Counts for one provider within one group."""

    attempts: int = 0
    successes: int = 0
    failures: int = 0
    #: Requests it served after another provider had failed them.
    fallbacks: int = 0
    #: Requests that ran out of providers with it as the last one tried.
    exhausted: int = 0


@attrs.frozen
class FailoverStats:
    group: GroupStats
    providers: Mapping[str, ProviderStats]


@attrs.define
class _Counts:
    requests: int = 0
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    fallbacks: int = 0
    exhausted: int = 0


@attrs.define
class _GroupCounts:
    group: _Counts = attrs.field(factory=_Counts)
    providers: dict[str, _Counts] = attrs.field(factory=dict)

    def provider(self, name: str) -> _Counts:
        counts = self.providers.get(name)
        if counts is None:
            counts = self.providers[name] = _Counts()
        return counts

    def freeze(self) -> FailoverStats:
        g = self.group
        return FailoverStats(
            group=GroupStats(g.requests, g.attempts, g.successes, g.failures, g.fallbacks, g.exhausted),
            providers=MappingProxyType(
                {
                    name: ProviderStats(c.attempts, c.successes, c.failures, c.fallbacks, c.exhausted)
                    for name, c in self.providers.items()
                }
            ),
        )


class FailoverManager(Actor):
    """Owns failover groups (published through ``selector.groups``) and their stats.

    ``groups`` seeds the table on the first start only: a restarted manager keeps
    what it finds published, so groups changed at run time survive a crash
    (their statistics do not).
    """

    mailbox_size = 4096

    def __init__(
        self,
        selector: GroupSelector,
        *,
        emit: Callable[[object], None] = _drop,
        groups: Iterable[GroupSpec] = (),
        registry: Any = None,
        mailbox_size: int | None = None,
    ) -> None:
        super().__init__(NAME, registry=registry, mailbox_size=mailbox_size)
        self.selector = selector
        self.emit = emit
        self.initial_groups = tuple(groups)
        self.groups: dict[str, GroupSpec] = {}
        self.stats: dict[str, _GroupCounts] = {}

    async def init(self) -> None:
        published = self.selector.groups.value
        if published is None:
            self.groups = {}
            for spec in self.initial_groups:
                if spec.name in self.groups:
                    raise ValueError(f"failover group {spec.name!r} is configured twice")
                self.groups[spec.name] = spec
        else:
            self.groups = dict(published)
        self.stats = {}
        self._publish()

    # -- messages ----------------------------------------------------------

    async def handle_cast(self, message: Any) -> None:
        match message:
            case GroupOutcome(group=group, tried=tried, ok=ok):
                self._record(group, tried, ok)
            case _:
                self.unknown_cast(message)

    def _record(self, group: str, tried: tuple[str, ...], ok: bool) -> None:
        last = tried[-1]
        failed = tried[:-1]
        attempts = len(tried)
        counts = self.stats.get(group)
        if counts is None:
            counts = self.stats[group] = _GroupCounts()
        g = counts.group
        g.requests += 1
        g.attempts += attempts
        for name in failed:
            p = counts.provider(name)
            p.attempts += 1
            p.failures += 1
        served = counts.provider(last)
        served.attempts += 1
        if ok:
            g.successes += 1
            g.failures += attempts - 1
            served.successes += 1
            first_other = next((name for name in failed if name != last), None)
            if first_other is not None:
                g.fallbacks += 1
                served.fallbacks += 1
                self.emit(FailoverEvent("fallback_success", group, first_other, last, attempts))
        else:
            g.failures += attempts
            g.exhausted += 1
            served.failures += 1
            served.exhausted += 1
            self.emit(FailoverEvent("fallback_exhausted", group, last, None, attempts))

    async def handle_call(self, message: Any) -> Any:
        match message:
            case CreateGroup(spec=spec):
                if spec.name in self.groups:
                    return Rejected("conflict", f"failover group {spec.name!r} already exists")
                return self._put(spec)
            case UpdateGroup(spec=spec):
                if spec.name not in self.groups and spec.name != DEFAULT_GROUP:
                    return Rejected("not_found", f"no failover group named {spec.name!r}")
                return self._put(spec)
            case DeleteGroup(name=name):
                spec = self.groups.pop(name, None)
                if spec is None:
                    return Rejected("not_found", f"no failover group named {name!r}")
                self.stats.pop(name, None)
                self._publish()
                return spec
            case GetGroup(name=name):
                spec = self.groups.get(name)
                if spec is None:
                    if name == DEFAULT_GROUP:
                        return self.selector.default
                    return Rejected("not_found", f"no failover group named {name!r}")
                return spec
            case ListGroups():
                return MappingProxyType(dict(self.groups))
            case GetStats(group=None):
                return MappingProxyType({name: c.freeze() for name, c in self.stats.items()})
            case GetStats(group=group):
                counts = self.stats.get(group)
                if counts is None:
                    if group in self.groups or group == DEFAULT_GROUP:
                        return _GroupCounts().freeze()
                    return Rejected("not_found", f"no failover group named {group!r}")
                return counts.freeze()
            case ResetStats(group=None):
                self.stats.clear()
                return None
            case ResetStats(group=group):
                self.stats.pop(group, None)
                return None
            case _:
                return self.unknown_call(message)

    def _put(self, spec: GroupSpec) -> GroupSpec:
        self.groups[spec.name] = spec
        self._publish()
        return spec

    def snapshot(self) -> Any:
        return {
            "groups": dict(self.groups),
            "rotations": dict(self.selector.rotations),
            "stats": {name: c.freeze() for name, c in self.stats.items()},
        }

    def _publish(self) -> None:
        self.selector.groups.publish(MappingProxyType(dict(self.groups)))
