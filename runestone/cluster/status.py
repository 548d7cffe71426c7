"""What /health/detailed and /metrics say about the fleet's shared state (``[cluster] redis_url``).

``cluster_status(app)`` is the ``cluster`` object of /health/detailed (None when the instance shares
nothing); ``cluster_prometheus(app)`` the ``runestone_redis_*`` families of /metrics. While Redis is not
``up`` the cluster is ``degraded``: every shared feature runs on this instance's own state meanwhile.
"""

from __future__ import annotations

from typing import Any

from runestone.telemetry.metrics import Counter, Gauge, _family

__all__ = ["cluster_status", "cluster_prometheus"]

_STATES = ("connecting", "up", "stalled", "down")


def cluster_status(app: Any) -> dict | None:
    redis = getattr(app, "redis", None)
    if redis is None:
        return None
    stats = redis.statistics()
    out: dict[str, Any] = {
        "status": "ok" if stats.state == "up" else "degraded",
        "redis": {
            "state": stats.state,
            "address": f"{redis.address.host}:{redis.address.port}/{redis.address.db}",
            "connects": stats.connects,
            "disconnects": stats.disconnects,
            "timeouts": stats.timeouts,
            "refused": stats.refused,
            "pending": stats.pending,
            "last_error": stats.last_error,
        },
    }
    for name in ("fleet_breakers", "fleet_responses", "fleet_cache", "fleet_control", "fleet_governance",
                 "fleet_limits"):
        part = getattr(app, name, None)
        if part is not None:
            out[name.removeprefix("fleet_")] = part.snapshot()
    return out


def cluster_prometheus(app: Any) -> bytes:
    redis = getattr(app, "redis", None)
    if redis is None:
        return b""
    stats = redis.statistics()
    out: list[str] = []
    up = Gauge("runestone_redis_up", "1 while the connection to Redis ([cluster] redis_url) is up and answering, "
               "else 0: shared state is then this instance's own")
    up.set((), 1.0 if stats.state == "up" else 0.0)
    state = Gauge("runestone_redis_state", "The Redis connection's state (1 for the current one)", ("state",))
    for name in _STATES:
        state.set((name,), 1.0 if stats.state == name else 0.0)
    families = [up, state]
    limits = getattr(app, "fleet_limits", None)
    if limits is not None:
        shared = Gauge("runestone_fleet_limits_shared", "1 while rate limits and budgets are shared through Redis, "
                       "0 while this instance applies its share (limit / live instances)")
        shared.set((), 1.0 if limits.mode == "shared" else 0.0)
        live = Gauge("runestone_fleet_instances", "Live instances sharing limits (counted by their heartbeats)")
        live.set((), float(limits.instances))
        families += [shared, live]
    for family in families:
        _family(out, family.name, family.help, family.type, family.samples())
    for name, help, value in (
        ("runestone_redis_connects_total", "Connections made to Redis (the first and every reconnect)", stats.connects),
        ("runestone_redis_timeouts_total", "Redis calls that got no reply within their deadline", stats.timeouts),
        ("runestone_redis_refused_total", "Redis calls refused at once because Redis was down or stalled",
         stats.refused),
    ):
        counter = Counter(name, help)
        counter.values = {(): float(value)}
        _family(out, name, help, counter.type, counter.samples())
    governance = getattr(app, "fleet_governance", None)
    if governance is not None:
        changes = Counter("runestone_fleet_key_changes_total", "Key and team changes through the fleet's stream: "
                          "published from here, applied from others, refused here", ("outcome",))
        changes.values = {("published",): float(governance.published), ("applied",): float(governance.applied),
                          ("refused",): float(governance.refused)}
        waiting = Gauge("runestone_fleet_key_changes_waiting", "Key and team changes made here, in force here, "
                        "waiting for Redis to share them")
        waiting.set((), float(governance.snapshot()["waiting"]))
        for family in (changes, waiting):
            _family(out, family.name, family.help, family.type, family.samples())
    return "".join(out).encode()
