"""The ``FailoverManager`` actor: owns the failover groups and their statistics.

Groups change by call (operators, the control plane) and are published as an
immutable ``Mapping[str, GroupSpec]`` into the ``GroupSelector``'s cell, which
the request path reads through ``select`` without touching this mailbox. Each
finished request reports once, by cast::

    ("outcome", group, provider, ok, attempts[, failed])

``provider`` served the request (``ok``) or was the last one tried; ``failed``
lists the provider of each failed attempt before that last one, in the order
tried (on an exhausted request a list that also names the last attempt, one
entry per attempt, is accepted). From these the
manager keeps per-group and per-provider counts and emits the telemetry
``FailoverEvent``\\ s ``fallback_success`` (served, but not by the first
provider tried) and ``fallback_exhausted`` (every attempt failed).

Calls (a refused call replies ``Rejected``)::

    ("create_group", GroupSpec)      -> GroupSpec      (conflict if it exists)
    ("update_group", GroupSpec)      -> GroupSpec      (not_found if it does not)
    ("delete_group", name)           -> GroupSpec      (the removed one)
    ("get_group", name)              -> GroupSpec      (``default`` always exists)
    ("list_groups",)                 -> Mapping[str, GroupSpec]
    ("get_stats", group | None)      -> FailoverStats | Mapping[str, FailoverStats]
    ("reset_stats", group | None)    -> None
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from runestone.resilience.failover import DEFAULT_GROUP, GroupSelector, GroupSpec, ProviderInfo, RouteState
from runestone.runtime import Actor, Rejected
from runestone.telemetry.events import FailoverEvent

__all__ = ["FailoverManager", "NAME", "GroupStats", "ProviderStats", "FailoverStats"]

NAME = "failover_manager"

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

    def select(
        self,
        group_name: str,
        providers_info: Sequence[ProviderInfo] | Mapping[str, ProviderInfo],
        state: RouteState,
        *,
        now: float | None = None,
    ) -> list[str]:
        """``GroupSelector.select``: runs in the caller's task, synchronously and
        atomically, on the published groups; never touches the mailbox."""
        return self.selector.select(group_name, providers_info, state, now=now)

    # -- messages ----------------------------------------------------------

    async def handle_cast(self, message: Any) -> None:
        if not (isinstance(message, tuple) and message and message[0] == "outcome" and len(message) in (5, 6)):
            log.warning("failover manager: ignoring unknown cast %r", message)
            return
        group, provider, ok, attempts = message[1:5]
        failed: tuple[str, ...] = tuple(message[5]) if len(message) == 6 else ()
        if not isinstance(attempts, int) or attempts < 1:
            log.warning("failover manager: ignoring outcome with attempts=%r", attempts)
            return
        if not ok and len(failed) >= attempts and provider in failed:
            # The final failed attempt was listed too; it is counted once, as the last.
            rest = list(failed)
            rest.remove(provider)
            failed = tuple(rest)
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
        last = counts.provider(provider)
        last.attempts += 1
        if ok:
            g.successes += 1
            g.failures += attempts - 1
            last.successes += 1
            first_other = next((name for name in failed if name != provider), None)
            if first_other is not None or (not failed and attempts > 1):
                g.fallbacks += 1
                last.fallbacks += 1
                self.emit(FailoverEvent("fallback_success", group, first_other, provider, attempts))
        else:
            g.failures += attempts
            g.exhausted += 1
            last.failures += 1
            last.exhausted += 1
            self.emit(FailoverEvent("fallback_exhausted", group, provider, None, attempts))

    async def handle_call(self, message: Any) -> Any:
        verb = message[0] if isinstance(message, tuple) and message else None
        arg = message[1] if verb is not None and len(message) == 2 else None
        if verb in ("create_group", "update_group"):
            if not isinstance(arg, GroupSpec):
                return Rejected("invalid", f"{verb} needs a GroupSpec, got {type(arg).__name__}")
            exists = arg.name in self.groups
            if verb == "create_group" and exists:
                return Rejected("conflict", f"failover group {arg.name!r} already exists")
            if verb == "update_group" and not exists and arg.name != DEFAULT_GROUP:
                return Rejected("not_found", f"no failover group named {arg.name!r}")
            self.groups[arg.name] = arg
            self._publish()
            return arg
        if verb == "delete_group":
            spec = self.groups.pop(arg, None)
            if spec is None:
                return Rejected("not_found", f"no failover group named {arg!r}")
            self.stats.pop(arg, None)
            self._publish()
            return spec
        if verb == "get_group":
            spec = self.groups.get(arg)
            if spec is None:
                if arg == DEFAULT_GROUP:
                    return self.selector.default
                return Rejected("not_found", f"no failover group named {arg!r}")
            return spec
        if verb == "list_groups" and len(message) == 1:
            return MappingProxyType(dict(self.groups))
        if verb == "get_stats" and len(message) == 2:
            if arg is None:
                return MappingProxyType({name: c.freeze() for name, c in self.stats.items()})
            counts = self.stats.get(arg)
            if counts is None:
                if arg in self.groups or arg == DEFAULT_GROUP:
                    return _GroupCounts().freeze()
                return Rejected("not_found", f"no failover group named {arg!r}")
            return counts.freeze()
        if verb == "reset_stats" and len(message) == 2:
            if arg is None:
                self.stats.clear()
            else:
                self.stats.pop(arg, None)
            return None
        return Rejected("invalid", f"failover manager does not understand {message!r}")

    def snapshot(self) -> Any:
        return {
            "groups": dict(self.groups),
            "rotations": dict(self.selector.rotations),
            "stats": {name: c.freeze() for name, c in self.stats.items()},
        }

    def _publish(self) -> None:
        self.selector.groups.publish(MappingProxyType(dict(self.groups)))
