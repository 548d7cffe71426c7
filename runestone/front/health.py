"""Health, metrics and usage routes: what operators and load balancers ask of a live gateway.

``/health`` is liveness (the process answers; no key needed). ``/health/ready`` is readiness: the tree
is up and at least one provider can take a request (registered, not draining, breaker not open), so a
load balancer stops sending traffic to a gateway that could only fail it. The detailed views combine the
published provider table, breaker views and health table (read without a mailbox) with the telemetry
handler's totals (one ``call``; these routes are not the hot path). ``/metrics`` is Prometheus text, open to
anyone unless ``[metrics] require_key`` asks for the admin key or the metrics key as a bearer token.
``/v1/usage`` summarises the usage ledger for the caller's own key; the admin key sees every key (or one
with ``?key_id=``, one team's with ``?team=``); ``?group_by=`` picks from key_id, team, model, provider,
endpoint, status, day (default model,day).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from urllib.parse import parse_qs

import attrs
import trio

from ..http.errors import local_resource_errors
from ..http.server import Response
from ..resilience.breaker import DENY, check
from ..routing.executor import GatewayError
from ..runtime import ActorError, plain
from ..telemetry.metrics import ledger_families, render_counter
from ..telemetry.ledger import SUMMARY_COLUMNS
from ..telemetry.messages import Summary, Usage
from .deps import FrontDeps

__all__ = ["install"]

_TEXT_METRICS = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


class HealthRoutes:
    def __init__(self, deps: FrontDeps) -> None:
        self.deps = deps
        self.started_wall = time.time()
        metrics = deps.config.metrics
        self.metrics_key_required = metrics.require_key
        self._metrics_key = hashlib.sha256(metrics.key.encode()).digest() if metrics.key else None

    # -- shared views ---------------------------------------------------------------------------------

    def providers_view(self) -> dict[str, dict]:
        deps = self.deps
        breakers = deps.breaker_views.value or {}
        health = deps.health.value
        in_flight = deps.telemetry.in_flight
        now = trio.current_time()
        out = {}
        for name, entry in sorted(deps.providers.value.items()):
            view = health.get(name) if health is not None else None
            bview = breakers.get(name)
            circuit = bview.state if bview is not None else "closed"
            score = view.score if view is not None else 1.0
            status = view.status if view is not None else "healthy"
            usable = not entry.draining and check(breakers, name, now) != DENY
            out[name] = {
                "type": entry.type,
                "healthy": usable and status != "unhealthy",
                "status": "draining" if entry.draining else status,
                "circuit_state": circuit,
                "health_score": round(score, 4),
                "success_rate": round(view.success_rate, 4) if view is not None else 1.0,
                "latency_p50_ms": _ms(view.p50) if view is not None else None,
                "latency_p95_ms": _ms(view.p95) if view is not None else None,
                "latency_p99_ms": _ms(view.p99) if view is not None else None,
                "requests": view.requests if view is not None else 0,
                "errors": view.errors if view is not None else 0,
                "in_flight": in_flight.get(name, 0),
                "models": sorted(entry.info.models),
            }
        return out

    def overall_status(self, providers: dict[str, dict]) -> str:
        if not providers or not any(p["healthy"] for p in providers.values()):
            return "unhealthy"
        if all(p["healthy"] and p["status"] == "healthy" for p in providers.values()):
            return "healthy"
        return "degraded"

    async def summary(self) -> dict | None:
        ref = self.deps.registry.whereis("telemetry_handler")
        if ref is None:
            return None
        try:
            return plain(await ref.call(Summary(), timeout=2.0))
        except ActorError:
            return None

    # -- routes ---------------------------------------------------------------------------------------

    async def live(self, request, caller) -> Response:
        return Response.json({"status": "ok", "uptime_s": round(time.time() - self.started_wall, 3)})

    async def ready(self, request, caller) -> Response:
        deps = self.deps
        root = deps.root()
        tree_up = root is not None and root.alive and deps.ready.is_set()
        usable = [n for n, p in self.providers_view().items() if p["healthy"]]
        ok = tree_up and bool(usable)
        body = {"ready": ok, "tree": "up" if tree_up else "down", "usable_providers": usable}
        if not ok:
            body["reason"] = "the supervision tree is not up" if not tree_up else "no provider can take requests"
        return Response.json(body, status=200 if ok else 503)

    async def detailed(self, request, caller) -> Response:
        providers = self.providers_view()
        deps = self.deps
        children = []
        root = deps.root()
        if root is not None:
            for info in root.which_children():
                children.append({"id": info.id, "status": info.status, "restarts": info.restarts})
        cluster = deps.cluster_status()
        status = self.overall_status(providers)
        if status == "healthy" and cluster is not None and cluster["status"] != "ok":
            status = "degraded"  # serving, on this instance's own state until Redis is back
        return Response.json({
            "status": status,
            "uptime_s": round(time.time() - self.started_wall, 3),
            # Which process answered: under `serve --workers N` each worker answers for itself alone.
            "worker": {"pid": os.getpid(), **(attrs.asdict(deps.worker) if deps.worker is not None else {})},
            "providers": providers,
            "totals": await self.summary(),
            "tree": children,
            "telemetry": deps.telemetry.snapshot(),
            "cluster": cluster,
            "ledger": attrs.asdict(deps.ledger.status()) if deps.ledger is not None else None,
            "database": deps.database_status() if deps.database_status is not None else None,
        })

    async def providers(self, request, caller) -> Response:
        providers = self.providers_view()
        return Response.json({"status": self.overall_status(providers), "providers": providers})

    async def metrics_json(self, request, caller) -> Response:
        summary = await self.summary() or {}
        return Response.json({
            "totals": summary,
            "success_rate": summary.get("success_rate"),
            "latency_ms": {q: _ms(summary.get(q)) for q in ("p50", "p95", "p99")},
            "requests_in_flight": dict(self.deps.telemetry.in_flight),
            "telemetry_events_dropped": self.deps.telemetry.dropped,
        })

    def _check_metrics_key(self, request) -> None:
        keys = self.deps.keys
        token = keys.bearer(request.header(b"authorization"))
        if keys.is_admin(token):
            return
        if token is not None and self._metrics_key is not None and hmac.compare_digest(
                self._metrics_key, hashlib.sha256(token).digest()):
            return
        which = "the admin key or the metrics key" if self._metrics_key is not None else "the admin key"
        raise GatewayError(401, f"/metrics needs {which} as 'Authorization: Bearer <key>' (metrics.require_key is "
                           "on)", "authentication_error", code="missing_api_key" if token is None else "invalid_api_key",
                           headers=[(b"www-authenticate", b"Bearer")])

    async def prometheus(self, request, caller) -> Response:
        if self.metrics_key_required:
            self._check_metrics_key(request)
        breakers = {n: v.state for n, v in (self.deps.breaker_views.value or {}).items()}
        try:
            text = await self.deps.telemetry.metrics_text(timeout=2.0, breaker_states=breakers,
                                                         actor_restarts=self.deps.restart_counts())
        except (ActorError, LookupError):
            raise GatewayError(503, "metrics are unavailable while the telemetry handler restarts; retry shortly",
                               "server_error", code="telemetry_unavailable") from None
        text += render_counter(
            "runestone_local_resource_errors_total",
            "Requests the gateway could not make, and connections it could not accept, for want of its own "
            "resources (op connect|accept; kind emfile, enfile, enomem, enobufs, pool_full).",
            ("op", "kind"), local_resource_errors)
        text += self.deps.governance.prometheus().encode()
        text += self.deps.cluster_metrics()
        if self.deps.ledger is not None:
            text += ledger_families(self.deps.ledger.status()).encode()
        return Response(200, [_TEXT_METRICS], text)

    async def usage(self, request, caller) -> Response:
        key_id = caller.key_id
        query = parse_qs(request.query)
        team = None
        if caller.admin:
            wanted = query.get("key_id")
            key_id = wanted[0] if wanted else None
            team = (query.get("team") or [None])[0]
        elif key_id is None:
            key_id = "open"  # open loopback mode: requests are recorded without a key id
        group_by = ("model", "day")
        if query.get("group_by"):
            group_by = tuple(g.strip() for g in query["group_by"][0].split(",") if g.strip())
            unknown = [g for g in group_by if g not in SUMMARY_COLUMNS]
            if unknown:
                raise GatewayError(400, f"cannot group usage by {unknown[0]!r}; choose from "
                                   f"{', '.join(sorted(SUMMARY_COLUMNS))}", param="group_by", code="invalid_value")
        ref = self.deps.registry.whereis("telemetry_handler")
        if ref is None:
            raise GatewayError(503, "usage is unavailable while the telemetry handler restarts; retry shortly",
                               "server_error", code="telemetry_unavailable")
        result = await ref.call(Usage(None if key_id == "open" and not caller.admin else key_id, group_by, team),
                                timeout=10.0)
        if result.get("unavailable"):
            raise GatewayError(503, "usage is unavailable while the ledger's database fails; retry shortly (rows "
                               "are buffered meanwhile, none is lost)", "server_error", code="ledger_unavailable")
        if key_id == "open" and not caller.admin:
            result = dict(result)
            result["key_id"] = None
        return Response.json(result)


def _ms(seconds):
    return round(seconds * 1000.0, 3) if isinstance(seconds, (int, float)) else None


def install(front, deps: FrontDeps) -> None:
    routes = HealthRoutes(deps)
    add = front.routes.add
    add("GET", "/health", routes.live, "public")
    add("GET", "/health/ready", routes.ready, "public")
    add("GET", "/health/detailed", routes.detailed)
    add("GET", "/health/providers", routes.providers)
    add("GET", "/health/metrics", routes.metrics_json)
    add("GET", "/metrics", routes.prometheus, "public")
    add("GET", "/v1/usage", routes.usage)
