"""The control plane: hot changes to a running gateway (providers, failover groups, circuits), persisted.

:class:`ControlPlane` holds the operations (register, update and unregister providers; create, update
and delete failover groups; reset a circuit; dump the state) and refuses a bad request with a
:class:`GatewayError` naming the problem *before* changing anything. Every change that passes is one typed
value (:data:`ControlChange`: :class:`RegisterProvider`, :class:`UpdateProvider`, :class:`UnregisterProvider`,
:class:`CreateGroup`, :class:`UpdateGroup`, :class:`DeleteGroup`) applied by :meth:`ControlPlane.apply`, the
one path by which the catalog and the persisted state change; hooks added with
:meth:`ControlPlane.subscribe` hear of each change once it is applied (so that another instance can be
told). A change goes through the actor that owns what it changes (the EnhancedProviderSupervisor starts,
drains or stops one provider actor and nothing else, and is the only writer of the provider table besides
the actors themselves; the FailoverManager owns the groups) and is persisted by
:class:`~runestone.control.store.ControlStore`, so that a restart brings it back; when persisting fails the
change is undone and reported. Unregistering marks the provider draining at once (no new request is routed
to it), waits within a bounded grace for its requests in flight (woken by the in-flight table when the last
one ends, never polling), then stops its actor; once accepted, it completes even if the caller goes away.
Updating is unregistering and registering again with the new settings. Two changes to the same name at
once are refused (409) rather than interleaved.

The ``/v1/control`` protocol that calls it is :mod:`runestone.control.socket`; the HTTP routes and the
WebSocket plumbing are in :mod:`runestone.front.admin`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from ..config import ConfigError, ProviderSpec, group_spec_from_dict, provider_spec_from_dict, provider_spec_to_dict
from ..resilience.breaker import BreakerSettings
from ..resilience.breaker_manager import Configure, Remove, Reset
from ..resilience import failover_manager as groups  # its calls share names with this module's changes
from ..resilience.failover import DEFAULT_GROUP, GroupSpec
from ..routing.executor import GatewayError
from ..runtime import ActorError, NamedRef, Rejected, plain
from ..telemetry.events import ProviderRegistered, ProviderUnregistered
from .store import ControlState, ControlStoreError, group_to_dict

__all__ = [
    "MAX_GRACE",
    "ControlChange",
    "ControlPlane",
    "CreateGroup",
    "DeleteGroup",
    "RegisterProvider",
    "UnregisterProvider",
    "UpdateGroup",
    "UpdateProvider",
]

log = logging.getLogger("runestone.control")

#: Longest drain an unregister may ask for.
MAX_GRACE = 600.0


@attrs.frozen
class RegisterProvider:
    """Start ``spec`` as a new provider (its name must be free)."""

    spec: ProviderSpec


@attrs.frozen
class UpdateProvider:
    """Replace the running provider ``spec.name`` with ``spec``, draining the old one for ``grace`` seconds."""

    spec: ProviderSpec
    grace: float


@attrs.frozen
class UnregisterProvider:
    """Drain provider ``name`` for at most ``grace`` seconds, then stop it."""

    name: str
    grace: float


@attrs.frozen
class CreateGroup:
    spec: GroupSpec


@attrs.frozen
class UpdateGroup:
    spec: GroupSpec


@attrs.frozen
class DeleteGroup:
    name: str


#: One validated change to the catalog or the groups; what :meth:`ControlPlane.apply` takes.
ControlChange = RegisterProvider | UpdateProvider | UnregisterProvider | CreateGroup | UpdateGroup | DeleteGroup

_PROVIDER_KEYS = frozenset({"name", "type", "config"})
_GROUP_KEYS = frozenset({"name", "providers", "strategy", "max_attempts", "health_threshold"})


def _bad(message: str, code: str = "invalid_value", param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def _not_found(what: str, name: str, hint: str) -> GatewayError:
    return GatewayError(404, f"no {what} named {name!r}; {hint}", param="name", code="not_found")


def _problems(exc: ConfigError) -> str:
    return "; ".join(str(p) for p in exc.problems) or str(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ControlPlane:
    """The operations of the control plane on one running :class:`~runestone.app.Application`.

    Methods return plain JSON-ready data or raise :class:`GatewayError`. Reads work on published
    snapshots; changes are serialised per name, and their persisted state is written under one lock so
    that concurrent changes to different names never lose each other.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.store = app.control_store
        self.state: ControlState = app.control_state
        self._save_lock = trio.Lock()
        self._busy: set[tuple[str, str]] = set()
        self.breaker = NamedRef(app.registry, "circuit_breaker_manager")
        self.failover = NamedRef(app.registry, "failover_manager")
        self.breaker_settings = BreakerSettings.from_config(app.config.circuit_breaker)
        self.default_grace = app.config.server.drain_timeout_ms / 1000
        #: Changes made since start, for the state dump.
        self.changes = 0
        #: Called with each change once it is applied (see :meth:`subscribe`).
        self._applied: list[Callable[[ControlChange, str], None]] = []

    # -- the one way in -----------------------------------------------------------------------------------

    def subscribe(self, hook: Callable[[ControlChange, str], None]) -> Callable[[], None]:
        """Call ``hook(change, origin)`` after each change is applied (in force and persisted); returns a
        function that removes the hook. ``origin`` is what :meth:`apply` was given (``"local"`` for this
        instance's admin API and control socket). A hook runs in the applying task and must not block; an
        exception it raises is logged and does not undo the change."""
        self._applied.append(hook)
        return lambda: self._applied.remove(hook) if hook in self._applied else None

    async def apply(self, change: ControlChange, *, origin: str = "local") -> dict:
        """Apply one validated change: the only path by which the catalog, the groups and the persisted
        state change. Returns the change's result as plain data, or raises GatewayError having changed
        nothing (409 while another change to the same name runs, 500 when it cannot be persisted, 503
        while the owning actor is unavailable)."""
        match change:
            case RegisterProvider(spec=spec):
                result = await self._register(spec)
            case UpdateProvider(spec=spec, grace=grace):
                result = await self._update(spec, grace)
            case UnregisterProvider(name=name, grace=grace):
                result = await self._unregister(name, grace)
            case CreateGroup(spec=group):
                result = await self._create_group(group)
            case UpdateGroup(spec=group):
                result = await self._update_group(group)
            case DeleteGroup(name=name):
                result = await self._delete_group(name)
            case _:
                raise TypeError(f"not a control change: {change!r}")
        for hook in list(self._applied):
            try:
                hook(change, origin)
            except Exception:
                log.exception("a control-change hook failed on %r", change)
        return result

    async def adopt(self, state: ControlState) -> int:
        """Make ``state`` (what the database holds once it took this instance's outbox, see
        :mod:`runestone.control.store`) the one in force here: the providers and groups it sets, changes or
        removes are applied as changes (origin ``"database"``); returns how many. A step refused is logged
        and skipped (the next change's save writes this instance's state)."""
        app = self.app
        desired = state.catalog(app.config.providers, app.config.admin.upstream_hosts)
        steps: list[ControlChange] = []
        for name, spec in desired.items():
            current = app.catalog.get(name)
            if current != spec:
                steps.append(RegisterProvider(spec) if current is None and name not in app.providers.value
                             else UpdateProvider(spec, self.default_grace))
        steps += [UnregisterProvider(name, self.default_grace) for name in list(app.catalog) if name not in desired]
        groups = {g.name: g for g in state.groups_over(app.configured_groups())}
        running = self._groups()
        for name, group in groups.items():
            if running.get(name) != group:
                steps.append(CreateGroup(group) if name not in running else UpdateGroup(group))
        steps += [DeleteGroup(name) for name in running if name not in groups]
        done = 0
        for step in steps:
            try:
                await self.apply(step, origin="database")
                done += 1
            except GatewayError as exc:
                log.warning("the database's control state: %s not applied here: %s", type(step).__name__, exc)
        if steps:
            log.warning("the database's control state is in force here (%d change(s) made by other instances)", done)
        return done

    # -- plumbing ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self, kind: str, name: str):
        key = (kind, name)
        if key in self._busy:
            raise GatewayError(409, f"{kind} {name!r} is being changed by another request; retry when it is done",
                               code="change_in_progress")
        self._busy.add(key)
        try:
            yield
        finally:
            self._busy.discard(key)

    async def _persist(self, change) -> None:
        """Apply ``change`` (state -> state) and write it; 500 and no change when the write fails."""
        async with self._save_lock:
            new = change(self.state)
            try:
                await self.store.save(new)
            except ControlStoreError as exc:
                log.error("control state not saved: %s", exc)
                raise GatewayError(500, f"the change was not made: it could not be persisted ({exc})",
                                   "server_error", code="persistence_failed") from None
            self.state = new
            self.app.control_state = new
            self.changes += 1

    async def _revert(self, kind: str, name: str, earlier: ControlState) -> None:
        try:
            await self._persist(lambda s: s.reverted(kind, name, earlier))
        except GatewayError:
            log.error("control state for %s %r could not be restored after a failed change", kind, name)

    def _supervisor(self):
        sup = self.app.provider_supervisor
        if sup is None or not sup.alive:
            raise GatewayError(503, "the provider supervisor is not running (starting, stopping or restarting); "
                               "retry shortly", "server_error", code="supervisor_unavailable")
        return sup

    async def _call(self, ref: NamedRef, message: Any, what: str) -> Any:
        try:
            reply = await ref.call(message, timeout=5.0)
        except ActorError as exc:
            raise GatewayError(503, f"the {what} is unavailable ({_reason(exc)}); retry shortly", "server_error",
                               code="actor_unavailable") from None
        if type(reply) is Rejected:
            status = {"not_found": 404, "conflict": 409}.get(reply.code, 400)
            raise GatewayError(status, reply.message, code=reply.code)
        return reply

    async def _configure_breaker(self, spec: ProviderSpec) -> None:
        settings = self.breaker_settings
        if not spec.config.circuit_breaker:
            settings = attrs.evolve(settings, enabled=False)
        try:
            await self.breaker.call(Configure(spec.name, settings), timeout=5.0)
        except ActorError as exc:
            log.warning("circuit breaker of provider %s not configured: %s", spec.name, _reason(exc))

    def _known_provider(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise _bad("'name' must name a provider (a non-empty string)", param="name")
        if name not in self.app.catalog and name not in self.app.providers.value:
            raise _not_found("provider", name, "list them with GET /admin/providers")
        return name

    # -- providers --------------------------------------------------------------------------------------

    def _parse_provider(self, data: Any) -> ProviderSpec:
        if not isinstance(data, dict):
            raise _bad("a provider must be an object {\"name\", \"type\", \"config\": {...}}", "invalid_provider",
                       "provider")
        unknown = sorted(set(data) - _PROVIDER_KEYS)
        if unknown:
            raise _bad(f"unknown provider field(s) {', '.join(unknown)}: a provider has name, type and config",
                       "invalid_provider", unknown[0])
        try:
            return provider_spec_from_dict(data, self.app.config.admin.upstream_hosts)
        except ConfigError as exc:
            raise _bad(f"invalid provider: {_problems(exc)}", "invalid_provider", "provider") from None

    def describe_provider(self, name: str) -> dict:
        app = self.app
        entry = app.providers.value.get(name)
        spec = app.catalog.get(name) or (entry.spec if entry is not None else None)
        if spec is None:
            raise _not_found("provider", name, "list them with GET /admin/providers")
        view = (app.breaker_views.value or {}).get(name)
        described = provider_spec_to_dict(spec, redact=True)
        described.update(
            models=sorted(entry.info.models) if entry is not None else [],
            status="starting" if entry is None else "draining" if entry.draining else "running",
            in_flight=app.telemetry.in_flight.get(name, 0),
            circuit_state=view.state if view is not None else "closed",
            source="control" if name in self.state.providers else "config",
        )
        return described

    def list_providers(self) -> list[dict]:
        names = set(self.app.catalog) | set(self.app.providers.value)
        return [self.describe_provider(n) for n in sorted(names)]

    async def register_provider(self, data: Any) -> dict:
        """Start a new provider actor (nothing else restarts), then persist it; 409 if the name is taken."""
        return await self.apply(RegisterProvider(self._parse_provider(data)))

    async def _register(self, spec: ProviderSpec) -> dict:
        name = spec.name
        app = self.app
        with self._changing("provider", name):
            if name in app.catalog or name in app.providers.value:
                raise GatewayError(409, f"provider {name!r} is already registered; change it with PATCH "
                                   f"/admin/providers/{name} (update_provider) or remove it first",
                                   param="name", code="conflict")
            sup = self._supervisor()
            with trio.CancelScope(shield=True):
                await self._start(sup, spec)
                try:
                    await self._persist(lambda s: s.with_provider(spec))
                except GatewayError:
                    await self._stop(name)  # noqa: ASYNC120
                    raise
                app.catalog[name] = spec
                if not spec.config.circuit_breaker:
                    await self._configure_breaker(spec)
            app.telemetry.emit(ProviderRegistered(name))
            log.info("provider %s registered (type %s)", name, spec.type)
        return self.describe_provider(name)

    async def _start(self, sup, spec: ProviderSpec) -> None:
        try:
            await sup.register(spec)
        except ValueError as exc:
            raise GatewayError(409, f"provider {spec.name!r} cannot be started: {exc}", code="conflict") from None
        except RuntimeError as exc:
            raise GatewayError(503, f"provider {spec.name!r} cannot be started now: {exc}", "server_error",
                               code="supervisor_unavailable") from None
        except Exception as exc:
            raise GatewayError(502, f"provider {spec.name!r} failed to start: {_reason(exc)}", "api_error",
                               code="provider_start_failed") from None

    async def _stop(self, name: str) -> None:
        """Stop ``name``'s actor and have its entry withdrawn, both by the supervisor (the table's owner)."""
        sup = self.app.provider_supervisor
        if sup is not None:
            try:
                await sup.unregister(name)
            except (KeyError, RuntimeError):
                pass

    def _mark_draining(self, name: str) -> None:
        sup = self.app.provider_supervisor
        if sup is not None:  # none yet: no actor has published an entry
            sup.drain(name)

    def _undrain(self, name: str) -> None:
        sup = self.app.provider_supervisor
        if sup is not None:
            sup.undrain(name)

    async def _drain(self, name: str, grace: float) -> tuple[bool, int]:
        """Wait until no request is in flight on ``name`` or ``grace`` seconds pass: (drained, left)."""
        # One wait on the owner of the in-flight table, woken when the provider's last request ends
        # (Gateway.report signals it), not a poll.
        inflight = self.app.inflight
        drained = await inflight.wait_idle(name, trio.current_time() + grace)
        return drained, inflight.count(name)

    def _grace(self, value: Any) -> float:
        if value is None:
            return self.default_grace
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_GRACE * 1000:
            raise _bad(f"'grace_ms' must be a number of milliseconds between 0 and {int(MAX_GRACE * 1000)}",
                       param="grace_ms")
        return value / 1000

    async def unregister_provider(self, name: Any, grace_ms: Any = None) -> dict:
        """Drain, then stop ``name``; returns whether it drained and how many requests were still in flight."""
        name = self._known_provider(name)
        return await self.apply(UnregisterProvider(name, self._grace(grace_ms)))

    async def _unregister(self, name: str, grace: float) -> dict:
        app = self.app
        with self._changing("provider", name):
            self._mark_draining(name)
            try:
                configured = any(s.name == name for s in app.config.providers)
                await self._persist(lambda s: s.without_provider(name, configured=configured))
            except GatewayError:
                self._undrain(name)
                raise
            old = app.catalog.pop(name, None)
            with trio.CancelScope(shield=True):
                drained, left = await self._drain(name, grace)
                await self._stop(name)
                try:
                    await self.breaker.call(Remove(name), timeout=5.0)
                except ActorError:
                    pass
            app.telemetry.emit(ProviderUnregistered(name))
            if left:
                log.warning("provider %s unregistered with %d request(s) still in flight after %.1fs",
                            name, left, grace)
            else:
                log.info("provider %s unregistered", name)
        return {"name": name, "type": old.type if old is not None else None, "unregistered": True,
                "drained": drained, "in_flight_left": left}

    async def update_provider(self, name: Any, patch: Any, grace_ms: Any = None) -> dict:
        """Re-register ``name`` with ``patch`` merged into its settings (a ``config`` value null unsets it).

        A secret given as ``"***"`` (as listings show it) keeps the current one. If the new settings do
        not start, the old ones are started again and the error is returned.
        """
        name = self._known_provider(name)
        app = self.app
        old = app.catalog.get(name)
        if old is None:
            raise GatewayError(409, f"provider {name!r} is being unregistered", code="change_in_progress")
        if not isinstance(patch, dict):
            raise _bad("the change must be an object such as {\"config\": {\"priority\": 10}}", "invalid_provider",
                       "provider")
        unknown = sorted(set(patch) - _PROVIDER_KEYS)
        if unknown:
            raise _bad(f"unknown provider field(s) {', '.join(unknown)}: a provider has name, type and config",
                       "invalid_provider", unknown[0])
        if "name" in patch and patch["name"] != name:
            raise _bad(f"a provider cannot be renamed ({name!r} to {patch['name']!r}): register the new name and "
                       "remove the old one", "invalid_provider", "name")
        merged = provider_spec_to_dict(old, redact=False)
        if "type" in patch:
            merged["type"] = patch["type"]
        config_patch = patch.get("config", {})
        if not isinstance(config_patch, dict):
            raise _bad("'config' must be an object of settings", "invalid_provider", "config")
        config = dict(merged["config"])
        for key, value in config_patch.items():
            if value is None:
                config.pop(key, None)
            elif value == "***" and key == "api_key":
                continue
            else:
                config[key] = value
        merged["config"] = config
        try:
            spec = provider_spec_from_dict(merged, self.app.config.admin.upstream_hosts)
        except ConfigError as exc:
            raise _bad(f"invalid provider: {_problems(exc)}", "invalid_provider", "provider") from None
        if spec == old:
            return self.describe_provider(name)
        return await self.apply(UpdateProvider(spec, self._grace(grace_ms)))

    async def _update(self, spec: ProviderSpec, grace: float) -> dict:
        name = spec.name
        app = self.app
        old = app.catalog.get(name)
        if old is None:
            raise GatewayError(409, f"provider {name!r} is being unregistered", code="change_in_progress")
        with self._changing("provider", name):
            sup = self._supervisor()
            earlier = self.state
            self._mark_draining(name)
            try:
                await self._persist(lambda s: s.with_provider(spec))
            except GatewayError:
                self._undrain(name)
                raise
            app.catalog[name] = spec
            with trio.CancelScope(shield=True):
                await self._drain(name, grace)
                await self._stop(name)
                try:
                    await self._start(sup, spec)
                except GatewayError as exc:
                    app.catalog[name] = old
                    try:
                        await sup.register(old)  # noqa: ASYNC120
                    except Exception as again:
                        log.error("provider %s could not be restarted with its previous settings: %s", name,
                                  _reason(again))
                    await self._revert("provider", name, earlier)  # noqa: ASYNC120
                    raise GatewayError(exc.status, exc.message + "; the previous settings were restored",
                                       exc.type, code=exc.code) from None
                if spec.config.circuit_breaker != old.config.circuit_breaker:
                    await self._configure_breaker(spec)
            app.telemetry.emit(ProviderRegistered(name))
            log.info("provider %s updated (type %s)", name, spec.type)
        return self.describe_provider(name)

    # -- groups -----------------------------------------------------------------------------------------

    def _groups(self) -> Mapping[str, GroupSpec]:
        return self.app.selector.groups.value or {}

    def _parse_group(self, data: dict) -> GroupSpec:
        unknown = sorted(set(data) - _GROUP_KEYS)
        if unknown:
            raise _bad(f"unknown group field(s) {', '.join(unknown)}: a group has "
                       f"{', '.join(sorted(_GROUP_KEYS))}", "invalid_group", unknown[0])
        if data.get("name") == DEFAULT_GROUP and data.get("providers") in ((), []):
            # The default group may list no provider (it then means every registered one); its other
            # settings are checked as any group's, so a stand-in member passes the members' check.
            try:
                parsed = group_spec_from_dict({**data, "providers": ["*"]}, self.app.config.failover)
            except ConfigError as exc:
                raise _bad(f"invalid group: {_problems(exc)}", "invalid_group", "group") from None
            return attrs.evolve(GroupSpec.from_config(parsed), providers=())
        try:
            parsed = group_spec_from_dict(data, self.app.config.failover,
                                          known_providers=sorted(set(self.app.catalog)))
        except ConfigError as exc:
            raise _bad(f"invalid group: {_problems(exc)}", "invalid_group", "group") from None
        return GroupSpec.from_config(parsed)

    async def list_groups(self) -> list[dict]:
        stats = await self._call(self.failover, groups.GetStats(None), "failover manager")
        out = []
        for name, group in sorted(self._groups().items()):
            row = group_to_dict(group)
            row["stats"] = plain(stats.get(name)) if name in stats else None
            row["source"] = "control" if name in self.state.groups else "config"
            out.append(row)
        return out

    def describe_group(self, name: str) -> dict:
        group = self._groups().get(name)
        if group is None:
            raise _not_found("failover group", name, "list them with GET /admin/groups")
        return group_to_dict(group)

    async def create_group(self, data: Any) -> dict:
        if not isinstance(data, dict):
            raise _bad("a group must be an object {\"name\", \"providers\": [...], \"strategy\", ...}",
                       "invalid_group", "group")
        return await self.apply(CreateGroup(self._parse_group(data)))

    async def _create_group(self, spec: GroupSpec) -> dict:
        with self._changing("group", spec.name):
            if spec.name in self._groups():
                raise GatewayError(409, f"failover group {spec.name!r} already exists; change it with PATCH "
                                   f"/admin/groups/{spec.name} (update_group)", param="name", code="conflict")
            with trio.CancelScope(shield=True):
                await self._call(self.failover, groups.CreateGroup(spec), "failover manager")
                try:
                    await self._persist(lambda s: s.with_group(spec))
                except GatewayError:
                    await self._call(self.failover, groups.DeleteGroup(spec.name), "failover manager")  # noqa: ASYNC120
                    raise
            log.info("failover group %s created", spec.name)
        return group_to_dict(spec)

    async def update_group(self, name: Any, patch: Any) -> dict:
        if not isinstance(name, str) or not name:
            raise _bad("'name' must name a failover group", param="name")
        current = self._groups().get(name)
        if current is None:
            raise _not_found("failover group", name, "create it with POST /admin/groups")
        if not isinstance(patch, dict):
            raise _bad("the change must be an object such as {\"strategy\": \"round_robin\"}", "invalid_group",
                       "group")
        if "name" in patch and patch["name"] != name:
            raise _bad(f"a group cannot be renamed ({name!r} to {patch['name']!r})", "invalid_group", "name")
        return await self.apply(UpdateGroup(self._parse_group({**group_to_dict(current), **patch})))

    async def _update_group(self, spec: GroupSpec) -> dict:
        name = spec.name
        current = self._groups().get(name)
        if current is None:
            raise _not_found("failover group", name, "create it with POST /admin/groups")
        with self._changing("group", name):
            with trio.CancelScope(shield=True):
                await self._call(self.failover, groups.UpdateGroup(spec), "failover manager")
                try:
                    await self._persist(lambda s: s.with_group(spec))
                except GatewayError:
                    await self._call(self.failover, groups.UpdateGroup(current), "failover manager")  # noqa: ASYNC120
                    raise
            log.info("failover group %s updated", name)
        return group_to_dict(spec)

    async def delete_group(self, name: Any) -> dict:
        if not isinstance(name, str) or not name:
            raise _bad("'name' must name a failover group", param="name")
        if name == DEFAULT_GROUP:
            raise _bad("the default group cannot be deleted; change it with update_group instead",
                       "invalid_group", "name")
        if self._groups().get(name) is None:
            raise _not_found("failover group", name, "list them with GET /admin/groups")
        return await self.apply(DeleteGroup(name))

    async def _delete_group(self, name: str) -> dict:
        current = self._groups().get(name)
        if current is None:
            raise _not_found("failover group", name, "list them with GET /admin/groups")
        with self._changing("group", name):
            with trio.CancelScope(shield=True):
                await self._call(self.failover, groups.DeleteGroup(name), "failover manager")
                try:
                    configured = any(g.name == name for g in self.app.config.failover.groups)
                    await self._persist(lambda s: s.without_group(name, configured=configured))
                except GatewayError:
                    await self._call(self.failover, groups.CreateGroup(current), "failover manager")  # noqa: ASYNC120
                    raise
            log.info("failover group %s deleted", name)
        return {"name": name, "deleted": True}

    # -- circuits and state -----------------------------------------------------------------------------

    async def reset_circuit(self, name: Any) -> dict:
        if not isinstance(name, str) or not name:
            raise _bad("'name' must name a provider", param="name")
        if name not in self.app.catalog and name not in (self.app.breaker_views.value or {}):
            raise _not_found("provider", name, "list them with GET /admin/providers")
        try:
            view = await self._call(self.breaker, Reset(name), "circuit breaker manager")
        except GatewayError as exc:
            if exc.status != 404:
                raise
            # No outcome was ever reported for it: its circuit is closed already.
            return {"provider": name, "state": "closed"}
        log.info("circuit of provider %s reset", name)
        return plain(view)

    def snapshot(self) -> dict:
        app = self.app
        ws_routes = getattr(app, "ws_routes", None)
        return {
            "store": self.store.where,
            "persisted_providers": sorted(self.state.providers),
            "removed_providers": sorted(self.state.removed_providers),
            "persisted_groups": sorted(self.state.groups),
            "removed_groups": sorted(self.state.removed_groups),
            "changes": self.changes,
            "changes_in_progress": sorted(f"{k} {n}" for k, n in self._busy),
            "websockets": plain(ws_routes.snapshot()) if ws_routes is not None else [],
        }

    def dump_state(self) -> dict:
        """The whole tree with live values (``Application.dump_state``) plus the control plane's own state."""
        dump = self.app.dump_state()
        dump["control"] = self.snapshot()
        return dump
