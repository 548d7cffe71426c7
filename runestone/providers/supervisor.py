"""EnhancedProviderSupervisor and its children: one actor per registered provider.

A :class:`ProviderActor` owns what a provider is made of: its config, its connection pool (the transport)
and its adapter. At ``init`` it builds them, learns its models (from config, or from the upstream's
``GET /models`` when an ``openai`` provider lists none) and publishes a :class:`ProviderEntry` into the
shared :class:`ProviderTable`; at ``terminate`` it withdraws the entry and closes its pool. The request
path reads the table, never the actor's mailbox. The supervisor is ``one_for_one`` with dynamic
children, so registering or unregistering a provider restarts nothing else.

The table has one owner, this module: each actor writes its own entry, and the supervisor, which owns the
actors, does the rest on the control plane's behalf (:meth:`EnhancedProviderSupervisor.drain` and
``undrain``, and on ``unregister`` withdrawing the entry a crashed, still restarting, incarnation left
behind). Nobody outside writes it.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from ..config import PROVIDER_TYPE_REGISTRY, ProviderSpec, provider_spec_to_dict
from ..http.client import PoolLimits, Timeouts, make_transport
from ..resilience.failover import ProviderInfo
from ..runtime import Actor, ChildSpec, Published, Supervisor

__all__ = [
    "ADAPTERS",
    "EnhancedProviderSupervisor",
    "ProviderActor",
    "ProviderEntry",
    "ProviderTable",
    "canonical_provider",
]

log = logging.getLogger("runestone.providers")

# Each type's adapter class, as the registry of provider types (runestone/config/provider_types.py) names it.
ADAPTERS = {name: kind.adapter_class() for name, kind in PROVIDER_TYPE_REGISTRY.items()}

# The original's provider names, still used by old clients and configs.
LEGACY_NAMES = {"openai": "openai-default", "anthropic": "anthropic-default"}


def canonical_provider(name: str, table: "ProviderTable | None" = None) -> str:
    """``openai``/``anthropic`` mean ``openai-default``/``anthropic-default`` unless registered as such."""
    if table is not None and name in (table.value or {}):
        return name
    return LEGACY_NAMES.get(name, name)




@attrs.frozen
class ProviderEntry:
    """A registered provider as the request path sees it (immutable; replaced on change)."""

    name: str
    type: str
    spec: ProviderSpec
    info: ProviderInfo
    adapter: Any
    #: The model sent upstream when a request names a failover group or the provider itself.
    default_model: str | None
    #: Set while unregistering: no new request is routed here.
    draining: bool = False
    #: The models learned from the upstream's listing (no list configured); the others were configured.
    discovered: frozenset = frozenset()


class ProviderTable(Published):
    """Published ``{name: ProviderEntry}`` (copy on write). Written only in this module: each provider actor
    writes its own entry, the :class:`EnhancedProviderSupervisor` the drain flags and a down actor's leftover."""

    def __init__(self) -> None:
        super().__init__(value={})

    def put(self, entry: ProviderEntry) -> None:
        new = dict(self.value)
        new[entry.name] = entry
        self.publish(new)

    def remove(self, name: str, entry: ProviderEntry | None = None) -> None:
        current = self.value.get(name)
        if current is not None and (entry is None or current.adapter is entry.adapter):
            new = dict(self.value)
            del new[name]
            self.publish(new)

    def mark_draining(self, name: str) -> bool:
        current = self.value.get(name)
        if current is None:
            return False
        self.put(attrs.evolve(current, draining=True))
        return True

    def routable(self) -> dict[str, ProviderInfo]:
        return {n: e.info for n, e in self.value.items() if not e.draining}


def build_adapter(spec: ProviderSpec):
    cfg = spec.config
    if not PROVIDER_TYPE_REGISTRY[spec.type].transport:
        return ADAPTERS[spec.type](spec.name, cfg)
    timeouts = Timeouts(connect=cfg.connect_timeout_ms / 1000, read=cfg.timeout_ms / 1000,
                        write=cfg.timeout_ms / 1000, pool=cfg.timeout_ms / 1000)
    kind = cfg.transport
    if kind == "httpx" or cfg.proxy:
        transport = make_transport("httpx", proxy=cfg.proxy, http2=cfg.http2, timeouts=timeouts,
                                   limits=PoolLimits(max_connections=cfg.pool_size))
    else:
        transport = make_transport("fast", timeouts=timeouts, limits=PoolLimits(max_connections=cfg.pool_size))
    return ADAPTERS[spec.type](spec.name, cfg, transport, timeouts)


def configured_models(spec: ProviderSpec) -> list[str]:
    """The models a provider's config names: ``models``, and for azure the keys of ``deployments``."""
    models = list(spec.config.models)
    if spec.type == "azure":
        models += [m for m in spec.config.deployments if m not in models]
    return models


def provider_info(spec: ProviderSpec, models) -> ProviderInfo:
    cfg = spec.config
    return ProviderInfo(
        name=spec.name,
        priority=cfg.priority,
        weight=cfg.weight,
        max_concurrency=cfg.max_concurrency,
        models=frozenset(models),
        capabilities=PROVIDER_TYPE_REGISTRY[spec.type].capabilities
        | (frozenset({"responses"}) if spec.type == "openai" and cfg.responses_api else frozenset()),
    )


@attrs.frozen
class ProviderSnapshot:
    """What a state dump shows of one provider actor (secrets redacted)."""

    name: str
    type: str
    config: dict
    models: list[str]
    draining: bool
    discovery_error: str | None
    #: The last active health check (ok, error, latency_s), when checks are on.
    last_health_check: dict | None = None


class ProviderActor(Actor):
    """One registered provider. It takes no messages (its state is published in the table; dumps read
    :meth:`snapshot`), so any message gets the runtime's unknown-message policy."""

    mailbox_size = 64

    def __init__(self, spec: ProviderSpec, table: ProviderTable, *, registry=None, health_check_interval: float = 0.0,
                 emit=None) -> None:
        super().__init__(f"provider:{spec.name}", registry=registry)
        self.spec = spec
        self.table = table
        self.entry: ProviderEntry | None = None
        self.discovery_error: str | None = None
        self.health_check_interval = health_check_interval
        self.emit = emit
        self.last_check: dict | None = None

    async def init(self) -> None:
        spec = self.spec
        adapter = build_adapter(spec)
        models = configured_models(spec)
        discover = not models and spec.type != "fake"
        if discover:
            models = await self._discover(adapter)
        default = next((m for m in models if not m.endswith("*")), None)
        previous = self.table.value.get(spec.name)
        self.entry = ProviderEntry(spec.name, spec.type, spec, provider_info(spec, models), adapter, default,
                                   discovered=frozenset(models) if discover else frozenset())
        self.table.put(self.entry)
        if self.health_check_interval > 0 and self.emit is not None:
            self.nursery.start_soon(self._health_checks)
        if discover and spec.config.models_refresh_ms > 0:
            self.nursery.start_soon(self._refresh_models)
        if previous is not None and previous.adapter is not adapter:
            # Left behind by an incarnation that crashed: requests it was serving may still use its pool.
            # They are bounded by the attempt timeout; close the old pool once that has passed.
            self.nursery.start_soon(_close_later, previous.adapter, max(spec.config.timeout_ms / 1000, 1.0))

    async def _discover(self, adapter) -> list[str]:
        """The upstream's model listing; [] (and ``discovery_error`` set) when it cannot be had."""
        try:
            with trio.fail_after(10):
                models = await adapter.list_models()
        except Exception as exc:  # a provider that cannot list its models still starts; it serves none
            self.discovery_error = f"{type(exc).__name__}: {exc}"
            log.warning("provider %s: model discovery failed (%s); it serves no model until the next listing",
                        self.spec.name, self.discovery_error)
            return []
        self.discovery_error = None
        return models

    async def _refresh_models(self) -> None:
        """Re-list the models every ``models_refresh_ms``, so ids the vendor adds later are served (and a
        provider whose first listing failed recovers). A failed listing keeps what was known."""
        interval = self.spec.config.models_refresh_ms / 1000
        while True:
            await trio.sleep(interval)
            entry = self.entry
            models = await self._discover(entry.adapter)
            if not models or frozenset(models) == entry.discovered:
                continue
            current = self.table.value.get(entry.name)
            if current is not None and current.adapter is entry.adapter:
                entry = current  # keep what others set on it (draining)
            default = entry.default_model if entry.default_model in models else next(
                (m for m in models if not m.endswith("*")), None)
            self.entry = attrs.evolve(entry, info=provider_info(self.spec, models), default_model=default,
                                      discovered=frozenset(models))
            self.table.put(self.entry)
            log.info("provider %s: models re-listed, %d served", entry.name, len(models))

    async def _health_checks(self) -> None:
        """Active health checks: a cheap request (list the models) every interval, fed to health scores.

        Each check is reported as an attempt on the model ``(health check)``, so a provider that nobody
        is sending traffic to still gets a measured score; a failure counts like a failed request.
        """
        from ..telemetry.events import AttemptFinished

        interval = self.health_check_interval
        timeout = min(interval, self.spec.config.timeout_ms / 1000, 10.0)
        while True:
            await trio.sleep(interval)
            entry = self.entry
            started = trio.current_time()
            error = None
            with trio.move_on_after(timeout) as scope:
                try:
                    await entry.adapter.list_models()
                except Exception as exc:  # any failure of the check is the provider failing it
                    error = type(exc).__name__ if not hasattr(exc, "kind") else f"{exc.kind}"
            if scope.cancelled_caught:
                error = "timeout"
            latency = trio.current_time() - started
            self.last_check = {"ok": error is None, "error": error, "latency_s": round(latency, 4)}
            self.emit(AttemptFinished(self.spec.name, "(health check)", error is None, error, latency, None))

    async def terminate(self, reason) -> None:
        entry = self.entry
        if entry is None:
            return
        if reason is not None and not isinstance(reason, trio.Cancelled):
            # A crash: the supervisor is about to start a new incarnation. Leave the entry (and its pool)
            # published so that requests keep routing here meanwhile; the next incarnation replaces it.
            return
        self.table.remove(entry.name, entry)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await entry.adapter.aclose()

    def snapshot(self) -> ProviderSnapshot:
        entry = self.table.value.get(self.spec.name)
        return ProviderSnapshot(
            name=self.spec.name,
            type=self.spec.type,
            config=provider_spec_to_dict(self.spec, redact=True)["config"],
            models=sorted(entry.info.models) if entry else [],
            draining=bool(entry and entry.draining),
            discovery_error=self.discovery_error,
            last_health_check=self.last_check,
        )


async def _close_later(adapter, delay: float) -> None:
    try:
        await trio.sleep(delay)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            # Requests the crashed incarnation started have had their attempt timeout; a stream may
            # still be running on a connection of this pool, and is left to end by itself.
            await adapter.aclose(abort_in_use=False)


class EnhancedProviderSupervisor(Supervisor):
    """``one_for_one`` supervisor of provider actors, with dynamic children named after the providers."""

    def __init__(self, specs, table: ProviderTable, *, registry=None, intensity: int = 10, period: float = 10.0,
                 on_restart=None, health_check_interval: float = 0.0, emit=None):
        self.table = table
        self._registry = registry
        self._health_check_interval = health_check_interval
        self._emit = emit
        super().__init__(
            "enhanced_provider_supervisor",
            [self.child_for(s) for s in specs],
            strategy="one_for_one",
            intensity=intensity,
            period=period,
            registry=registry,
            on_restart=on_restart,
        )

    def child_for(self, spec: ProviderSpec) -> ChildSpec:
        table, registry = self.table, self._registry
        interval, emit = self._health_check_interval, self._emit

        async def start(*, task_status=trio.TASK_STATUS_IGNORED):
            actor = ProviderActor(spec, table, registry=registry, health_check_interval=interval, emit=emit)
            await actor.run(task_status=task_status)

        return ChildSpec(id=spec.name, start=start, restart="permanent", shutdown=5.0)

    async def register(self, spec: ProviderSpec):
        """Start a provider actor; ValueError if the name is taken. Nothing else restarts."""
        return await self.start_child(self.child_for(spec))

    async def unregister(self, name: str) -> None:
        """Stop the provider's actor and forget its spec (OTP's terminate_child, then delete_child), then
        withdraw its entry. KeyError if there is no such provider, RuntimeError if the supervisor is not
        running; the entry is withdrawn either way."""
        try:
            await self.terminate_child(name)
            await self.delete_child(name)
        finally:
            # The actor withdraws its entry when it stops; one that was down (crashed, restarting) left it.
            self.table.remove(name)

    def drain(self, name: str) -> bool:
        """Mark ``name`` draining: no new request is routed to it. False if it has no entry."""
        return self.table.mark_draining(name)

    def undrain(self, name: str) -> None:
        """Route to ``name`` again (a drain whose change was undone)."""
        entry = self.table.value.get(name)
        if entry is not None and entry.draining:
            self.table.put(attrs.evolve(entry, draining=False))
