"""Active health checks (off by default): a cheap request per provider every interval feeds health scores,
so a provider nobody sends traffic to is still measured. Under MockClock the minutes pass at once."""

from gatewaytest import provider_toml

from runestone.telemetry.messages import Summary
import trio


async def test_active_checks_score_idle_providers(gateway_factory, autojump_clock):
    gw = await gateway_factory(
        "[telemetry]\nhealth_check_interval_ms = 5000\n"
        + provider_toml("good", "fake", models=["m1"])
        + provider_toml("bad", "fake", models=["m2"], fail_rate=1.0, fail_status=503)
    )
    await trio.sleep(60)  # twelve checks each
    await gw.app.registry.whereis("telemetry_handler").call(Summary())  # every report handled
    health = gw.app.health.value
    assert health["good"].requests >= 10 and health["good"].errors == 0
    assert health["good"].status == "healthy"
    assert health["bad"].requests >= 10 and health["bad"].errors == health["bad"].requests
    assert health["bad"].status == "unhealthy"
    snap = gw.app.registry.whereis("provider:bad").actor.snapshot()
    assert snap.last_health_check["ok"] is False


async def test_checks_are_off_by_default(gateway_factory, autojump_clock):
    gw = await gateway_factory(provider_toml("good", "fake", models=["m1"]))
    await trio.sleep(60)
    health = gw.app.health.value
    assert health is None or "good" not in health or health["good"].requests == 0
