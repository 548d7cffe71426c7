"""The router and the health tracker together, on plain clock values: set aside, probed, healed, back."""

from runestone.resilience.failover import ProbeSchedule, ProviderInfo, RouteState
from runestone.routing.policies import route
from runestone.telemetry.health import HealthTracker

M = "gpt-4o"
PRIMARY = ProviderInfo("primary", priority=1, models={M})
BACKUP = ProviderInfo("backup", priority=2, models={M})


def test_a_provider_set_aside_for_health_gets_its_normal_share_back_within_35s_of_healing():
    health = HealthTracker()
    probes = ProbeSchedule()
    broken = {"primary": True}

    def request(now: float) -> str:
        """One request at ``now``: route it, try its providers in order, record each attempt."""
        state = RouteState(health=health.table().scores, probes=probes)
        decision = route(M, [PRIMARY, BACKUP], state, health_threshold=0.5, now=now)
        for name in decision.providers + decision.alternatives:
            ok = not broken.get(name, False)
            health.record_attempt(name, ok, 0.05, now=now)
            if ok:
                return name
        raise AssertionError("nobody answered")

    # A request every 0.25 s. Broken for a minute: set aside after three failures, then probed every 5 s.
    now = 0.0
    tried_primary = []
    while now < 60.0:
        before = health.view("primary").requests if health.view("primary") else 0
        assert request(now) == "backup"
        if health.view("primary").requests > before:
            tried_primary.append(now)
        now += 0.25
    assert tried_primary[:3] == [0.0, 0.25, 0.5]  # the burst that set it aside
    probes_seen = tried_primary[3:]
    assert probes_seen[0] == 0.75  # the first probe as soon as it is set aside
    assert all(b - a == 5.0 for a, b in zip(probes_seen, probes_seen[1:])), probes_seen
    assert len(probes_seen) == 12  # 240 requests in those 60 s, 12 of them (5 %) tried it first

    # Healed: within 35 s every request goes to it again.
    broken["primary"] = False
    healed = now
    served = []
    while now < healed + 60.0:
        served.append((now - healed, request(now)))
        now += 0.25
    back = next(t for t, p in served if p == "primary")
    assert back <= 5.0
    last_backup = max(t for t, p in served if p == "backup")
    assert last_backup < 35.0, served
    assert health.view("primary").status == "healthy"
