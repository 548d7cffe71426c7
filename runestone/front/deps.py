"""What the route modules are given: :class:`FrontDeps`, built once by ``app.py``.

A route module's ``install(front, deps)`` receives the :class:`~runestone.front.api.Front` it adds routes
to and this object, holding exactly what the route modules read of the running gateway; none of them sees
the :class:`~runestone.app.Application`. Everything here is made before the routes are installed and lives
as long as the application; the root supervisor, made when the tree starts, is read through ``root()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import trio

    from ..config import Config, ProviderSpec
    from ..control.plane import ControlPlane
    from ..control.socket import ExtraOperation
    from ..providers.supervisor import ProviderTable
    from ..routing.executor import Gateway
    from ..routing.pool import InFlightTable
    from ..routing.splits import NamedRoutes
    from ..runtime import Published, Registry, Supervisor
    from ..telemetry.ledger import UsageLedger
    from ..telemetry.sender import Telemetry
    from .auth import KeyRing

__all__ = ["FrontDeps"]


@attrs.frozen(eq=False)
class FrontDeps:
    """The running gateway as the route modules see it (tests/front/test_deps.py checks that each field is
    read by some route module, and that they read nothing else)."""

    config: Config
    #: Where the responses store lives.
    data_dir: Path
    gateway: Gateway
    keys: KeyRing
    #: The keys, teams and budgets (a runestone.governance.Governance: governance sits above the front, which
    #: only calls it).
    governance: Any
    telemetry: Telemetry
    registry: Registry
    #: The published cells and tables the status routes read.
    providers: ProviderTable
    breaker_views: Published
    health: Published
    inflight: InFlightTable
    #: The provider specs as registered (read here; the control plane changes them).
    catalog: Mapping[str, ProviderSpec]
    splits: NamedRoutes
    ledger: UsageLedger | None
    #: This process's place among ``serve --workers N``, or None.
    worker: Any
    control: ControlPlane
    #: Control-socket operations a route module adds beside the control plane's own: op -> fn(msg).
    control_ops: dict[str, ExtraOperation]
    #: Set once every child of the tree is up.
    ready: trio.Event
    #: The root supervisor (None before the tree starts).
    root: Callable[[], Supervisor | None]
    #: Restarts per actor since start.
    restart_counts: Callable[[], dict[str, int]]
    #: With ``[cluster] redis_url``, the fleet's tiers (runestone.cluster.responses, wired by app.py): a cache
    #: tier shared by the fleet, and ``share_responses(local_store, retention_days)`` wrapping the Responses
    #: API's local store in the fleet's; both None without Redis.
    shared_cache: Any
    share_responses: Callable[[Any, int], Any] | None
    #: The ``cluster`` object of /health/detailed (None when nothing is shared), and its /metrics families.
    cluster_status: Callable[[], dict | None]
    cluster_metrics: Callable[[], str]
    #: With ``[database] url``, the ``database`` object of /health/detailed (None without a database).
    database_status: Callable[[], dict] | None = None
