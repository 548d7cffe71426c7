"""Builds the supervision tree of DESIGN.md from a Config and runs it.

::

    runestone (root supervisor, one_for_one)
    ├── redis                        RedisClient.run ([cluster] redis_url only)
    ├── telemetry_handler            TelemetryHandler
    ├── circuit_breaker_manager      CircuitBreakerManager
    ├── fleet_breakers               FleetBreakers ([cluster] redis_url only)
    ├── fleet_limits                 FleetLimits ([cluster] redis_url only: limits and budgets shared)
    ├── enhanced_provider_supervisor EnhancedProviderSupervisor → provider:<name> × N
    ├── failover_manager             FailoverManager
    ├── provider_pool                ProviderPool
    ├── fleet_control                FleetControl ([cluster] redis_url only: control changes shared)
    ├── fleet_governance             FleetGovernance ([cluster] redis_url only: key and team changes shared)
    └── front                        the HTTP/SSE/WebSocket server (started last, stopped first)

The published cells (provider table, breaker views, groups, health) and the in-flight table are made
here, once, outside the actors: a restarted actor publishes into the cell its readers already hold, so
the request path never has to be re-wired. Each child is started by a factory that builds a fresh
actor, as a restart must.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import attrs
import trio

from .cluster.breakers import FleetBreakers
from .cluster.control import FleetControl
from .cluster.governance import FleetGovernance
from .cluster.limits import FleetLimits
from .cluster.redis import RedisClient
from .cluster.responses import SharedCacheTier, SharedResponseStore
from .cluster.status import cluster_prometheus, cluster_status
from .config import Config, ProviderSpec
from .control.plane import ControlPlane
from .control.store import ControlStore, ControlStoreError
from .front.api import Front
from .front.deps import FrontDeps
from .front.errors import http_error_body
from .front.auth import KeyRing, is_loopback
from .front.limits import KeyLimiter
from .governance import Governance, KeyStore, KeyStoreError, SpendJournal
from .http.server import Limits, serve_http
from .providers.supervisor import EnhancedProviderSupervisor, ProviderTable
from .resilience.breaker import BreakerSettings
from .resilience.breaker_manager import CircuitBreakerManager
from .resilience.failover import GroupSelector, GroupSpec
from .resilience.failover_manager import FailoverManager
from .routing.aliases import AliasWatcher, aliases_path
from .routing.executor import Gateway
from .routing.pool import InFlightTable, ProviderPool
from .routing.splits import NamedRoutes
from .runtime import ChildSpec, NamedRef, Published, Registry, Supervisor, dump_state
from .storage import DatabaseError
from .telemetry.events import ActorRestarted
from .telemetry.handler import TelemetryHandler
from .telemetry.health import HealthParams
from .telemetry.access_log import AccessLog
from .telemetry.ledger import PostgresLedgerBackend, UsageLedger
from .telemetry.metrics import MetricLabels
from .telemetry.observe import RequestObserver
from .telemetry.otel import Tracing
from .telemetry.sender import Telemetry

__all__ = ["Application", "StartupError"]

log = logging.getLogger("runestone")


class StartupError(Exception):
    """The configuration cannot be served as asked (e.g. open mode on a public address)."""


def _route_installers():
    """The route modules by name, each with ``install(front, deps)`` (deps a FrontDeps); their order is the
    order of route lookup. What an install returns is kept by that name."""
    from .front.cache import install as install_cache
    from .front.completions import install as install_completions
    from .front.dashboard import install as install_dashboard
    from .front.admin import install as install_admin
    from .front.health import install as install_health
    from .front.keys import install as install_keys
    from .front.messages import install as install_messages
    from .front.openapi import install as install_openapi
    from .front.responses import install as install_responses
    from .front.splits import install as install_splits
    from .front.ws import install as install_ws

    return {"health": install_health, "completions": install_completions, "messages": install_messages,
            "responses": install_responses, "cache": install_cache, "ws": install_ws, "admin": install_admin,
            "keys": install_keys, "openapi": install_openapi, "splits": install_splits,
            "dashboard": install_dashboard}


def _actor_child(id: str, make, *, shutdown: float = 5.0) -> ChildSpec:
    async def start(*, task_status=trio.TASK_STATUS_IGNORED):
        await make().run(task_status=task_status)

    return ChildSpec(id=id, start=start, restart="permanent", shutdown=shutdown)


class Application:
    """One gateway: config, the tree, and the handles the request path reads."""

    def __init__(self, config: Config, *, host: str | None = None, port: int | None = None,
                 worker: Any = None) -> None:
        self.config = config
        self.host = host or config.server.host
        self.port = config.server.port if port is None else port
        #: This process's place among ``serve --workers N`` (a runestone.cluster.workers.WorkerIdentity), or
        #: None when it serves alone. A worker shares its port with the others (SO_REUSEPORT).
        self.worker = worker
        keys = config.auth.api_keys
        self.data_dir = Path(config.data.dir)
        #: [database] url: keys, teams, spend and the ledger in Postgres (shared by every instance), else SQLite.
        database_url = config.database.url
        try:
            key_store = KeyStore(self.data_dir, database_url=database_url)
        except DatabaseError as exc:
            raise StartupError(str(exc)) from None
        #: Managed keys, teams and budgets (runestone.governance): the pipeline's admission. The budget journal
        #: is the data directory's; with a database, the workers of `serve --workers N` (which share one data
        #: directory, and whose spend is Redis's) keep none, as before.
        journal = None if database_url and worker is not None else SpendJournal(self.data_dir)
        self.governance = Governance(key_store, KeyLimiter(config.limits), pricing=config.pricing,
                                     default_output_tokens=config.budgets.default_output_tokens,
                                     flush_interval=config.budgets.flush_ms / 1000, journal=journal)
        try:
            self.governance.load()
        except KeyStoreError as exc:
            raise StartupError(str(exc)) from None
        if key_store.degraded is not None:
            log.warning("starting without the database (%s): keys and teams from %s; changes to them, spend and "
                        "usage rows wait for it in the data directory", key_store.degraded,
                        "its local copy in the data directory" if key_store.source == "local copy"
                        else "nowhere (no local copy yet: the configuration's keys only)")
        open_mode = not keys and not self.governance.has_keys
        if open_mode and not is_loopback(self.host):
            raise StartupError(
                f"refusing to serve on {self.host} with no client keys: set RUNESTONE_API_KEYS (or auth.api_keys), "
                "or bind to a loopback address such as 127.0.0.1")
        self.keys = KeyRing(keys, config.auth.admin_key or None, open_mode=open_mode)
        self.keys.managed = self.governance.key_id_for
        # The first managed key closes open mode: from then on a client needs a key.
        self.governance.on_first_key = lambda: setattr(self.keys, "open_mode", False)
        self.registry = Registry()
        # Published cells and tables: made once, outlive actor restarts.
        self.providers = ProviderTable()
        self.breaker_views = Published({}, owner="circuit_breaker_manager")
        #: [cluster] redis_url: the fleet's shared state (runestone/cluster/), else None (all local).
        self.redis = RedisClient(config.cluster.redis_url) if config.cluster.redis_url else None
        self.fleet_breakers = (FleetBreakers(self.redis, self.breaker_views,
                                             NamedRef(self.registry, "circuit_breaker_manager"))
                               if self.redis is not None else None)
        #: Limits and budgets shared by the fleet: the governance admits through it ([cluster] redis_url only).
        self.fleet_limits = (FleetLimits(self.redis, self.governance, hold_ttl=config.cluster.hold_ttl_ms / 1000)
                             if self.redis is not None else None)
        self.governance.fleet = self.fleet_limits
        self.health = Published(None, owner="telemetry_handler")
        self.selector = GroupSelector()
        self.inflight = InFlightTable()
        tel = config.telemetry
        #: The usage ledger: made once, so its buffer outlives telemetry handler restarts; the request path
        #: adds rows to it through the sender, the handler writes them.
        #: With a database url its rows go to Postgres; what it cannot store goes to the local quarantine file,
        #: and batches a failed flush leaves wait in the local spool (they outlive a SIGKILL).
        self.ledger = UsageLedger(
            str(self.data_dir / "usage.sqlite3"), pricing=config.pricing, batch=tel.ledger_batch,
            backend=PostgresLedgerBackend(database_url) if database_url else None,
            quarantine_path=str(self.data_dir / "usage.quarantine.jsonl") if database_url else None,
            spool_path=str(self.data_dir / "usage.spool.sqlite3") if database_url else None,
        ) if tel.usage_ledger else None
        self.telemetry = Telemetry(self.registry, ledger=self.ledger, in_flight=self.inflight.counts,
                                   max_pending=tel.mailbox_size)
        self.governance.telemetry = self.telemetry
        if self.ledger is not None:
            self.ledger.team_of = self.governance.team_of
        # Run-time registrations and groups, persisted in the data directory, win over the file.
        self.control_store = ControlStore(self.data_dir, database_url=database_url)
        try:
            self.control_state = self.control_store.load()
            #: The provider specs the provider supervisor (re)starts with; registrations change it.
            self.catalog: dict[str, ProviderSpec] = self.control_state.catalog(config.providers, config.admin.upstream_hosts)
        except ControlStoreError as exc:
            raise StartupError(str(exc)) from None
        if self.control_store.degraded is not None:
            log.warning("starting without the control state's database (%s): providers and groups from %s",
                        self.control_store.degraded, "its local copy in the data directory"
                        if self.control_store.source == "local copy" else "the configuration only (no local copy yet)")
        self.gateway = Gateway(
            config,
            providers=self.providers,
            breakers=self.breaker_views,
            breaker_ref=NamedRef(self.registry, "circuit_breaker_manager"),
            groups=self.selector,
            health=self.health,
            telemetry=self.telemetry,
            inflight=self.inflight,
            failover_ref=NamedRef(self.registry, "failover_manager"),
            pricing=config.pricing,
        )
        #: Pools and splits from the configuration; their metrics live as long as the application.
        self.splits = NamedRoutes.from_config(config)
        self.gateway.use_named(self.splits)
        self.front = Front(self.gateway, self.keys, max_body_bytes=config.server.max_body_bytes)
        self.gateway.admission = self.governance
        #: Control-socket operations route modules add beside the control plane's own: op -> fn(msg).
        self.control_ops: dict = {}
        self.root: Supervisor | None = None
        self.ready = trio.Event()
        #: child id -> restarts performed by its supervisor (actor names: provider children are provider names).
        self.restarts: dict[str, int] = {}
        self.control = ControlPlane(self)
        #: What the route modules read of this application, and all they see of it.
        self.front_deps = FrontDeps(
            config=config, data_dir=self.data_dir, gateway=self.gateway, keys=self.keys,
            governance=self.governance, telemetry=self.telemetry, registry=self.registry,
            providers=self.providers, breaker_views=self.breaker_views, health=self.health,
            inflight=self.inflight, catalog=self.catalog, splits=self.splits, ledger=self.ledger,
            worker=worker, control=self.control, control_ops=self.control_ops, ready=self.ready,
            root=lambda: self.root, restart_counts=self.restart_counts,
            shared_cache=SharedCacheTier(self.redis) if self.redis is not None and config.cache.enabled else None,
            share_responses=(None if self.redis is None else
                             lambda local, days: SharedResponseStore(self.redis, local, retention_days=days)),
            cluster_status=lambda: cluster_status(self), cluster_metrics=lambda: cluster_prometheus(self),
            database_status=self.database_status if database_url else None)
        # Route groups beyond the chat core register themselves on the front: install(front, deps).
        installed = {name: install(self.front, self.front_deps) for name, install in _route_installers().items()}
        #: The /v1/ws routes (their connections are in the control plane's state dump).
        self.ws_routes = installed["ws"]
        self.dashboard = installed["dashboard"]
        #: The shared tiers of the response cache and the Responses store ([cluster] redis_url), or None.
        self.fleet_cache = installed["cache"]
        self.fleet_responses = installed["responses"]
        #: Control changes shared with the fleet ([cluster] redis_url), through the one control plane.
        self.fleet_control = (FleetControl(self.redis, self.control, self.data_dir,
                                           upstream_hosts=config.admin.upstream_hosts)
                              if self.redis is not None else None)
        #: Key and team changes shared with the fleet ([cluster] redis_url).
        self.fleet_governance = (FleetGovernance(self.redis, self.governance, self.data_dir)
                                 if self.redis is not None else None)
        #: The access log and traces ([log] access, [otel] endpoint), or None when both are off.
        self.observer = self._observer()
        self.provider_supervisor: EnhancedProviderSupervisor | None = None
        self.server = None

    def configured_groups(self) -> list[GroupSpec]:
        """The failover groups of the configuration (``default`` made from ``[failover]`` when not listed)."""
        cfg = self.config
        groups = [GroupSpec.from_config(g) for g in cfg.failover.groups]
        if not any(g.name == "default" for g in groups):
            groups.append(GroupSpec.from_config(cfg.failover, "default"))
        return groups

    async def _recheck_control_store(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """With a database: while it has not taken everything (this instance started without it, or changes
        wait in the outbox), try it again every second; the state it then holds is made this instance's."""
        task_status.started()
        for _ in itertools.count():  # a retry of a remote server every second, not a wait for a local event
            if self.control_store.pending:
                try:
                    state = await self.control_store.recheck()
                except ControlStoreError as exc:
                    log.error("%s", exc)
                    state = None
                if state is not None:
                    await self.control.adopt(state)
            await trio.sleep(1.0)

    def database_status(self) -> dict:
        """The ``database`` object of /health/detailed ([database] url): degraded while this instance runs on
        a local copy (or on nothing) because its database could not be read, and since. ``refused``: outbox
        changes the database refused, set aside (they do not make it degraded: nothing would undo that)."""
        keys, control = self.governance.store, self.control_store
        ledger = self.ledger.status() if self.ledger is not None else None
        errors = [e for e in (keys.degraded, control.degraded) if e]
        if ledger is not None and ledger.state != "ok" and ledger.last_error:
            errors.append(ledger.last_error)
        outbox = {"keys": keys.outbox, "control": control.outbox}
        if any(outbox.values()) and not errors:
            errors.append("changes wait in the local outbox for the database")
        return {"state": "degraded" if errors else "ok", "keys": keys.source, "control": control.source,
                "outbox": outbox, "refused": {"keys": keys.refused}, "last_error": errors[0] if errors else None}

    def _observer(self) -> RequestObserver | None:
        cfg = self.config
        access = tracing = None
        if cfg.log.access:
            try:
                access = AccessLog(cfg.log.access_path)
            except OSError as exc:
                raise StartupError(f"[log] access_path {cfg.log.access_path!r} cannot be opened: {exc}") from None
        if cfg.otel.endpoint:
            tracing = Tracing(cfg.otel.endpoint, cfg.otel.service_name, system_of=self._provider_type)
        if access is None and tracing is None:
            return None
        observer = RequestObserver(access_log=access, tracing=tracing, keys=self.keys)
        self.telemetry.tap = observer.on_event
        return observer

    def _provider_type(self, name: str) -> str | None:
        entry = self.providers.value.get(name)
        return entry.spec.type if entry is not None else None

    # -- the tree -------------------------------------------------------------------------------------

    def _children(self) -> list[ChildSpec]:
        cfg = self.config
        reg = self.registry
        tel = cfg.telemetry
        emit = self.telemetry.emit
        breaker_settings = BreakerSettings.from_config(cfg.circuit_breaker)
        overrides = {
            s.name: attrs.evolve(breaker_settings, enabled=False)
            for s in self.catalog.values() if not s.config.circuit_breaker
        }
        groups = self.control_state.groups_over(self.configured_groups())

        def telemetry_handler():
            return TelemetryHandler(
                registry=reg, mailbox_size=tel.mailbox_size, ledger=self.ledger,
                flush_interval=tel.ledger_flush_ms / 1000, batch=tel.ledger_batch,
                health_params=HealthParams(latency_window=tel.latency_window),
                pricing=cfg.pricing, health_cell=self.health, latency_window=tel.latency_window,
                labels=MetricLabels(self.providers, self.is_route_name))

        fleet = self.fleet_breakers

        def breaker_manager():
            if fleet is None:
                return CircuitBreakerManager(self.breaker_views, emit=emit, settings=breaker_settings,
                                             overrides=overrides, providers=list(self.catalog), registry=reg,
                                             successes=self.gateway.successes)
            return CircuitBreakerManager(self.breaker_views, emit=fleet.observe(emit), settings=breaker_settings,
                                         overrides=overrides, providers=list(self.catalog), registry=reg,
                                         probe_gate=fleet.probe_gate, probe_done=fleet.probe_done,
                                         successes=self.gateway.successes)

        def provider_supervisor():
            sup = EnhancedProviderSupervisor(list(self.catalog.values()), self.providers, registry=reg,
                                             on_restart=self._on_restart, emit=emit,
                                             health_check_interval=tel.health_check_interval_ms / 1000)
            self.provider_supervisor = sup
            return sup

        async def start_provider_supervisor(*, task_status=trio.TASK_STATUS_IGNORED):
            await provider_supervisor().run(task_status=task_status)

        def failover_manager():
            return FailoverManager(self.selector, emit=emit, groups=groups, registry=reg)

        def provider_pool():
            return ProviderPool(self.inflight, registry=reg)

        # The Redis connection first (ready at once, up or not), its users after what they feed.
        cluster = [ChildSpec(id="redis", start=self.redis.run, shutdown=1.0)] if self.redis is not None else []
        fleet_children = [ChildSpec(id="fleet_breakers", start=fleet.run, shutdown=1.0)] if fleet is not None else []
        if self.fleet_limits is not None:
            fleet_children.append(ChildSpec(id="fleet_limits", start=self.fleet_limits.run, shutdown=2.0))
        if self.fleet_cache is not None:  # [cache] enabled
            fleet_children.append(ChildSpec(id="fleet_cache", start=self.fleet_cache.run, shutdown=1.0))
        return [
            *cluster,
            _actor_child("telemetry_handler", telemetry_handler, shutdown=10.0),
            _actor_child("circuit_breaker_manager", breaker_manager),
            *fleet_children,
            ChildSpec(id="enhanced_provider_supervisor", start=start_provider_supervisor, restart="permanent",
                      shutdown=15.0, kind="supervisor"),
            _actor_child("failover_manager", failover_manager),
            _actor_child("provider_pool", provider_pool),
            _actor_child("alias_watcher", lambda: AliasWatcher(self.gateway.aliases, aliases_path(), registry=reg)),
            ChildSpec(id="key_store", start=self.governance.run, restart="permanent", shutdown=5.0),
            *([ChildSpec(id="control_store", start=self._recheck_control_store, shutdown=1.0)]
              if self.config.database.url else []),
            # after the provider supervisor: it applies the fleet's changes through the control plane
            *([ChildSpec(id="fleet_control", start=self.fleet_control.run, shutdown=1.0)]
              if self.fleet_control is not None else []),
            *([ChildSpec(id="fleet_governance", start=self.fleet_governance.run, shutdown=1.0)]
              if self.fleet_governance is not None else []),
            ChildSpec(id="front", start=self._serve_front, restart="permanent",
                      shutdown=cfg.server.drain_timeout_ms / 1000 + 1.0),
        ]

    async def _serve_front(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config.server
        limits = Limits(
            max_body_bytes=cfg.max_body_bytes,
            max_header_bytes=cfg.max_header_bytes,
            header_timeout=cfg.header_timeout_ms / 1000,
            keepalive_timeout=cfg.keepalive_timeout_ms / 1000,
            drain_timeout=max(cfg.drain_timeout_ms / 1000, 0.001),
        )

        class _Started:
            def __init__(inner, status):
                inner.status = status

            def started(inner, server):
                self.server = server
                self.port = server.port
                inner.status.started(_GracefulFront(server, self.gateway))

        handler = self.front.handle if self.observer is None else self.observer.wrap(self.front.handle)
        await serve_http(handler, self.host, self.port, limits=limits, error_body=http_error_body,
                         reuse_port=self.worker is not None, task_status=_Started(task_status))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the tree until stopped; ``task_status.started(self)`` once every child is up."""
        if self.keys.open_mode:
            log.warning("no client keys configured: serving OPEN (no authentication) on loopback %s only; set "
                        "RUNESTONE_API_KEYS to require keys", self.host)
        self.root = Supervisor("runestone", self._children(), strategy="one_for_one", intensity=10, period=10.0,
                               registry=self.registry, on_restart=self._on_restart)

        class _Ready:
            def started(inner, value=None):
                self.ready.set()
                task_status.started(self)

        try:
            await self.root.run(task_status=_Ready())
        finally:
            if self.observer is not None:
                self.observer.close()
            if self.ledger is not None and self.ledger.pending:
                # The tree is down and its last flush failed: the rows go to the local quarantine file
                # rather than die with the process.
                with trio.CancelScope(shield=True):
                    await self.ledger.quarantine_pending("its database was failing when the gateway stopped")

    def _on_restart(self, supervisor: str, child: str, restarts: int, error) -> None:
        self.restarts[child] = self.restarts.get(child, 0) + 1
        self.telemetry.emit(ActorRestarted(child, self.restarts[child]))

    def is_route_name(self, name: str) -> bool:
        """Is ``name`` one the operator gave for routing: a failover group, an alias, a pool or a split?"""
        gw = self.gateway
        return (name == "default" or name in (self.selector.groups.value or ()) or name in (gw.aliases.value or ())
                or name in gw.named)

    def restart_counts(self) -> dict[str, int]:
        """Restarts per actor since start, counted here so a telemetry handler restart is counted too."""
        return dict(self.restarts)

    def request_stop(self) -> None:
        if self.root is not None:
            self.root.request_stop()

    def dump_state(self) -> dict[str, Any]:
        tree = dump_state(self.root) if self.root is not None else None
        return {
            "pid": os.getpid(),
            "worker": attrs.asdict(self.worker) if self.worker is not None else None,
            "tree": tree,
            "telemetry_sender": self.telemetry.snapshot(),
            "governance": self.governance.snapshot(),
            "server": attrs.asdict(self.server.statistics()) if self.server is not None else None,
            "observe": self.observer.snapshot() if self.observer is not None else None,
        }


class _GracefulFront:
    """The front child as its supervisor stops it: streams still running near the end of the drain end
    with an error event saying the gateway is stopping (recorded as ``shutdown``), before the server's
    drain deadline cuts whatever is left. Everything else is the server's."""

    def __init__(self, server, gateway) -> None:
        self._server = server
        self._gateway = gateway

    def request_stop(self) -> None:
        drain = self._server.limits.drain_timeout
        # Leave the streams a moment to write their error event before the connections are cut.
        self._gateway.stop_streams_at(trio.current_time() + max(drain - 0.5, drain * 0.5))
        self._server.request_stop()

    def __getattr__(self, name):
        return getattr(self._server, name)

