"""``/dashboard``: the running gateway seen live in a browser, served by the gateway itself.

``GET /dashboard`` is a page (HTML, JavaScript and CSS files of this package, under ``dashboard/``; no build
step, nothing fetched from elsewhere) that draws what ``GET /dashboard/feed`` sends: a server-sent event
stream of one ``tick`` message a second. A tick carries the supervision tree (each node's status, restarts,
mailbox depth and last error, from the runtime's state dump without the actors' snapshots), every provider's
breaker state, health and requests in flight, what each provider did since the last tick (attempts, errors,
latency and time-to-first-token percentiles), the failover groups and their counts, the splits with their
variants' metrics, the oldest requests in flight, the busiest keys by spend since the feed opened, the
busiest managed keys and teams by spend in their budget period (``spend``, from the governance's running
accounts, once managed keys exist), and the
telemetry events of the interval (breaker transitions, failovers, restarts, health alerts, failed requests),
taken from the telemetry handler's live feed (the one ``subscribe`` on ``/v1/control`` gives). The page keeps
bounded buffers only (a few minutes of each chart, the last few hundred events).

Nothing runs while nobody watches: a feed subscribes to the telemetry handler when it opens and leaves when
its client goes away; the handler forwards events only while it has subscribers. At most ``MAX_FEEDS``
feeds run at once. ``GET /dashboard/state`` answers one tick as JSON.

Access is the admin API's: the admin key, as ``Authorization: Bearer <key>`` or as the password of HTTP
Basic authentication (so that a browser asks for it and sends it with the feed's requests too); with no
admin key in open loopback mode, open.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import orjson
import trio

from ..http.server import Request, Response
from ..routing.errors import GatewayError
from ..runtime import ActorError, dump_state
from ..telemetry.health import LatencyWindow
from ..telemetry.messages import Subscribe, Unsubscribe
from .deps import FrontDeps

__all__ = ["DashboardRoutes", "FeedWindow", "install"]

log = logging.getLogger("runestone.dashboard")

#: Seconds between two ticks of a feed.
TICK = 1.0
#: Feeds (open pages) served at once; more are refused with a 503.
MAX_FEEDS = 16
#: Events buffered between the telemetry handler and a feed; a feed slower than that misses events.
EVENT_BUFFER = 4096
#: Latency samples kept per provider and tick for its percentiles.
SAMPLES = 2048
#: Events a tick forwards at most (the rest are counted in ``events_skipped``).
EVENTS_PER_TICK = 100
#: Failed requests a tick lists at most.
FAILURES_PER_TICK = 20
#: Requests in flight a tick lists (the oldest).
IN_FLIGHT_SHOWN = 20
#: Keys a tick lists (the busiest by spend).
KEYS_SHOWN = 10
#: How often a feed subscribes again, so that a restarted telemetry handler resumes it.
RESUBSCRIBE = 5.0
#: Request outcomes aggregated into the tick rather than forwarded one by one.
_AGGREGATED = frozenset({"attempt_finished", "request_finished"})

_ASSETS = {
    "/dashboard": ("index.html", b"text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}
_PAGE_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                  b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]
_JSON = (b"content-type", b"application/json")


def _load(name: str) -> bytes:
    return resources.files(__package__).joinpath("dashboard", name).read_bytes()


def _percentiles(samples: list[float]) -> tuple[float | None, float | None, float | None]:
    if not samples:
        return None, None, None
    window = LatencyWindow(len(samples))
    for s in samples:
        window.add(s)
    return window.percentile(50), window.percentile(95), window.percentile(99)


class _ProviderWindow:
    __slots__ = ("attempts", "errors", "latencies", "ttfts")

    def __init__(self) -> None:
        self.attempts = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []


class FeedWindow:
    """What one feed saw of the telemetry events since its last tick (and the keys' spend since it opened)."""

    def __init__(self) -> None:
        self.providers: dict[str, _ProviderWindow] = {}
        self.requests = 0
        self.request_errors = 0
        self.events: list[dict] = []
        self.failures: list[dict] = []
        self.skipped = 0
        #: key id -> [requests, spend]: since the feed opened, bounded by the gateway's keys.
        self.keys: dict[str, list] = {}

    def add(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "attempt_finished":
            window = self.providers.get(event["provider"])
            if window is None:
                window = self.providers[event["provider"]] = _ProviderWindow()
            window.attempts += 1
            if not event["ok"]:
                window.errors += 1
            elif len(window.latencies) < SAMPLES:
                window.latencies.append(event["latency"])
                if event.get("ttft") is not None:
                    window.ttfts.append(event["ttft"])
        elif kind == "request_finished":
            self.requests += 1
            key = event.get("key_id") or "(no key)"
            spent = self.keys.get(key)
            if spent is None:
                spent = self.keys[key] = [0, 0.0]
            spent[0] += 1
            spent[1] += event.get("cost") or 0.0
            if event["status"] != "ok":
                self.request_errors += 1
                if len(self.failures) < FAILURES_PER_TICK:
                    self.failures.append({
                        "kind": "request_failed", "request_id": event["request_id"],
                        "provider": event["provider"], "model": event.get("model_asked") or event["model"],
                        "http_status": event["http_status"], "error_type": event["error_type"]})
                else:
                    self.skipped += 1
        elif len(self.events) < EVENTS_PER_TICK:
            self.events.append(event)
        else:
            self.skipped += 1

    def take(self) -> dict:
        """The interval's part of a tick; starts the next interval."""
        providers = {}
        for name, w in self.providers.items():
            p50, p95, p99 = _percentiles(w.latencies)
            t50, t95, _ = _percentiles(w.ttfts)
            providers[name] = {"attempts": w.attempts, "errors": w.errors, "p50": p50, "p95": p95, "p99": p99,
                               "ttft_p50": t50, "ttft_p95": t95}
        busiest = sorted(self.keys.items(), key=lambda kv: (-kv[1][1], -kv[1][0]))[:KEYS_SHOWN]
        out = {
            "window": providers,
            "requests": {"finished": self.requests, "errors": self.request_errors},
            "events": self.events + self.failures,
            "events_skipped": self.skipped,
            "keys": [{"key_id": k, "team": None, "requests": v[0], "spend": v[1]} for k, v in busiest],
        }
        self.providers = {}
        self.requests = self.request_errors = self.skipped = 0
        self.events = []
        self.failures = []
        return out


def _compact_tree(node: dict | None) -> dict | None:
    """A state-dump node without the actors' snapshots: what the tree view draws."""
    if node is None:
        return None
    error = node.get("last_error")
    out = {
        "name": node.get("name"),
        "id": node.get("id") or node.get("name"),
        "kind": node.get("kind"),
        "status": node.get("status"),
        "restarts": node.get("restarts", 0),
        "last_error": f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else None,
    }
    if "strategy" in node:
        out["strategy"] = node["strategy"]
    mailbox = node.get("mailbox")
    if isinstance(mailbox, dict):
        out["mailbox"] = [mailbox.get("depth", 0), mailbox.get("capacity")]
    children = node.get("children")
    if children is not None:
        out["children"] = [_compact_tree(c) for c in children]
    return out


def _find(node: dict | None, child_id: str) -> dict | None:
    if node is None:
        return None
    if node.get("id") == child_id:
        return node
    for child in node.get("children") or ():
        hit = _find(child, child_id)
        if hit is not None:
            return hit
    return None


class DashboardRoutes:
    """The page, its feed and its one-shot state, for one running gateway (as its
    :class:`~runestone.front.deps.FrontDeps` shows it)."""

    def __init__(self, front, deps: FrontDeps) -> None:
        self.front = front
        self.deps = deps
        self.assets = {path: (_load(name), ctype) for path, (name, ctype) in _ASSETS.items()}
        #: Feeds open now.
        self.feeds = 0
        #: Feeds opened since start.
        self.feeds_opened = 0

    # -- access ---------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """The admin API's rule, with the admin key also accepted as a Basic password (browsers send it)."""
        keys = self.front.keys
        header = request.header(b"authorization") or b""
        token = keys.bearer(header)
        if token is None:
            scheme, _, value = header.strip().partition(b" ")
            if scheme.lower() == b"basic":
                try:
                    token = base64.b64decode(value.strip(), validate=True).partition(b":")[2] or None
                except ValueError:
                    token = None
        if keys.is_admin(token):
            return
        if not keys.has_admin:
            if keys.open_mode:
                return
            raise GatewayError(403, "the dashboard is part of the admin API, which is closed: set RUNESTONE_ADMIN_KEY "
                               "to open it", "permission_error", code="admin_disabled")
        raise GatewayError(401, "the dashboard needs the admin key: give it as the password when the browser asks, "
                           "or as 'Authorization: Bearer <admin key>'", "authentication_error", code="invalid_api_key",
                           headers=[(b"www-authenticate", b'Basic realm="runestone dashboard", charset="UTF-8"')])

    # -- routes ---------------------------------------------------------------------------------------

    async def page(self, request: Request, caller) -> Response:
        self.check(request)
        body, ctype = self.assets[request.path]
        return Response(200, [(b"content-type", ctype), *_PAGE_HEADERS], body)

    async def state(self, request: Request, caller) -> Response:
        self.check(request)
        return Response(200, [_JSON, (b"cache-control", b"no-store")],
                        orjson.dumps(self.tick(FeedWindow()), default=str))

    async def feed(self, request: Request, caller) -> Response:
        self.check(request)
        if self.feeds >= MAX_FEEDS:
            raise GatewayError(503, f"{MAX_FEEDS} dashboards are open already; close one and retry", "server_error",
                               code="too_many_dashboards")
        return Response(200, list(_SSE_HEADERS), stream=self._feed())

    # -- the feed -------------------------------------------------------------------------------------

    def tick(self, window: FeedWindow) -> dict:
        """One tick: the state now, and what ``window`` saw since the last one."""
        deps = self.deps
        root = deps.root()
        tree = dump_state(root) if root is not None else None
        table = deps.providers.value
        breakers = deps.breaker_views.value or {}
        health = deps.health.value or {}
        in_flight = deps.telemetry.in_flight
        providers = []
        for name in sorted(set(deps.catalog) | set(table)):
            entry = table.get(name)
            spec = entry.spec if entry is not None else deps.catalog.get(name)
            view = breakers.get(name)
            h = health.get(name)
            providers.append({
                "name": name,
                "type": spec.type if spec is not None else None,
                "status": "starting" if entry is None else "draining" if entry.draining else "running",
                "breaker": view.state if view is not None else "closed",
                "consecutive_failures": view.consecutive_failures if view is not None else 0,
                "in_flight": in_flight.get(name, 0),
                "health": h.score if h is not None else None,
                "health_status": h.status if h is not None else None,
                "success_rate": h.success_rate if h is not None else None,
                "p50": h.p50 if h is not None else None,
                "p95": h.p95 if h is not None else None,
                "ttft_ewma": h.ttft_ewma if h is not None else None,
                "requests": h.requests if h is not None else 0,
                "errors": h.errors if h is not None else 0,
            })
        failover = _find(tree, "failover_manager")
        snap = failover.get("snapshot") if failover is not None else None
        groups = []
        if isinstance(snap, dict):
            stats = snap.get("stats") or {}
            for name, spec in sorted((snap.get("groups") or {}).items()):
                group_stats = (stats.get(name) or {}).get("group") if isinstance(stats.get(name), dict) else None
                groups.append({"name": name, "strategy": spec.get("strategy"), "providers": spec.get("providers"),
                               "max_attempts": spec.get("max_attempts"), "stats": group_stats})
        now = trio.current_time()
        requests = sorted(deps.inflight.requests.values(), key=lambda r: r.started)
        gov = deps.governance
        return {
            "type": "tick",
            "time": time.time(),
            "tick": TICK,
            "tree": _compact_tree(tree),
            "providers": providers,
            "groups": groups,
            "splits": [s.describe() for s in deps.splits.splits.values()],
            "in_flight": {
                "count": len(requests),
                "oldest": [{"request_id": r.request_id, "model": r.model, "provider": r.provider,
                            "attempts": r.attempts, "endpoint": r.endpoint, "stream": r.stream, "key_id": r.key_id,
                            "age": now - r.started} for r in requests[:IN_FLIGHT_SHOWN]],
            },
            "telemetry": {"dropped": deps.telemetry.dropped},
            **window.take(),
            # Managed keys and teams by spend in their budget period (the governance's running accounts).
            "spend": ({"keys": gov.busiest("key", KEYS_SHOWN), "teams": gov.busiest("team", KEYS_SHOWN)}
                      if gov is not None and gov.has_keys else {"keys": [], "teams": []}),
        }

    async def _subscribe(self, send) -> Any:
        ref = self.deps.registry.whereis("telemetry_handler")
        if ref is None:
            return None
        try:
            await ref.call(Subscribe(send), timeout=2.0)
        except ActorError:
            return None
        return ref

    async def _feed(self) -> AsyncIterator[bytes]:
        """Ticks until the client goes away (the server then closes this generator) or the gateway stops."""
        self.feeds += 1
        self.feeds_opened += 1
        send, recv = trio.open_memory_channel[dict](EVENT_BUFFER)
        window = FeedWindow()
        try:
            ref = await self._subscribe(send)
            subscribed_at = trio.current_time()
            yield b"retry: 2000\n\n" + self._frame(window)
            next_tick = trio.current_time() + TICK
            while True:
                # No scope is open across the yield below: events are gathered, then the tick is written.
                with trio.move_on_at(next_tick):
                    while True:
                        window.add(await recv.receive())
                now = trio.current_time()
                next_tick = max(next_tick + TICK, now)
                current = self.deps.registry.whereis("telemetry_handler")
                if current is not ref or now - subscribed_at >= RESUBSCRIBE:
                    # A restarted handler has forgotten us; a live one ignores the repeat.
                    ref = await self._subscribe(send)
                    subscribed_at = now
                yield self._frame(window)
        finally:
            self.feeds -= 1
            send.close()
            ref = self.deps.registry.whereis("telemetry_handler")
            if ref is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(ActorError):
                    await ref.call(Unsubscribe(send), timeout=2.0)

    def _frame(self, window: FeedWindow) -> bytes:
        return b"data: " + orjson.dumps(self.tick(window), default=str) + b"\n\n"

    def snapshot(self) -> dict:
        return {"feeds": self.feeds, "feeds_opened": self.feeds_opened}


def install(front, deps: FrontDeps) -> DashboardRoutes:
    routes = DashboardRoutes(front, deps)
    add = front.routes.add
    # "public" for the router: the routes check the admin key themselves, Basic authentication included.
    for path in _ASSETS:
        add("GET", path, routes.page, "public")
    add("GET", "/dashboard/feed", routes.feed, "public")
    add("GET", "/dashboard/state", routes.state, "public")
    return routes
