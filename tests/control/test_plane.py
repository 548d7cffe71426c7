"""The control plane called directly (no HTTP): changes as typed values through apply(), the applied hook,
drains woken by the in-flight table, persistence failures that change nothing, 409 on concurrent changes."""

import sys

import pytest
import trio
import trio.testing

from runestone.config import provider_spec_from_dict
from runestone.control import (
    ControlPlane,
    ControlStoreError,
    CreateGroup,
    DeleteGroup,
    RegisterProvider,
    UnregisterProvider,
)
from runestone.providers.supervisor import ProviderTable
from runestone.resilience.failover import GroupSpec
from runestone.routing.executor import GatewayError

TOML = """
[[providers]]
name = "fake"
type = "fake"
[providers.config]
models = ["fake-model"]
"""


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _plane(gateway_factory) -> tuple[ControlPlane, object]:
    gw = await gateway_factory(TOML)
    return gw.app.control, gw.app


def _spec(name: str = "extra"):
    return provider_spec_from_dict({"name": name, "type": "fake", "config": {"models": ["m-" + name]}})


async def test_a_registration_is_one_change_through_apply_and_the_hook_hears_it(gateway_factory):
    plane, app = await _plane(gateway_factory)
    heard = []
    unsubscribe = plane.subscribe(lambda change, origin: heard.append((change, origin)))
    change = RegisterProvider(_spec())
    described = await plane.apply(change)
    assert described["name"] == "extra" and described["status"] == "running"
    assert app.catalog["extra"] == change.spec and "extra" in app.providers.value
    assert "extra" in plane.state.providers  # persisted
    assert heard == [(change, "local")]
    # The HTTP-shaped entry point goes through the same path, with the caller's origin kept.
    await plane.apply(UnregisterProvider("extra", 0.0), origin="peer-1")
    assert heard[-1] == (UnregisterProvider("extra", 0.0), "peer-1")
    unsubscribe()
    await plane.register_provider({"name": "again", "type": "fake", "config": {"models": ["m"]}})
    assert len(heard) == 2 and "again" in app.catalog


class _CountingInFlight:
    """The in-flight table, counting the waits asked of it."""

    def __init__(self, table) -> None:
        self.table = table
        self.waits = 0
        self.deadline = self.returned = None

    async def wait_idle(self, provider, deadline):
        self.waits += 1
        self.deadline = deadline
        try:
            return await self.table.wait_idle(provider, deadline)
        finally:
            self.returned = trio.current_time()

    def __getattr__(self, name):
        return getattr(self.table, name)


async def test_unregister_drains_in_one_wait_woken_by_the_last_request_end(clock, gateway_factory, nursery):
    plane, app = await _plane(gateway_factory)
    await plane.apply(RegisterProvider(_spec()))
    app.inflight = counting = _CountingInFlight(app.inflight)
    app.inflight.attempt_started("extra")

    ended = []

    async def finish_at_five_seconds():
        await trio.sleep(5.0)
        app.inflight.attempt_ended("extra")  # what Gateway.report does; at 0 it wakes the drain
        ended.append(trio.current_time())

    nursery.start_soon(finish_at_five_seconds)
    result = await plane.apply(UnregisterProvider("extra", 60.0))
    # Woken by the request's end itself, in one wait (the drain used to wake every 20 ms to look again).
    assert counting.waits == 1 and counting.returned == ended[0]
    assert (result["drained"], result["in_flight_left"]) == (True, 0)
    assert "extra" not in app.catalog and "extra" not in app.providers.value


async def test_a_drain_gives_up_at_its_grace(clock, gateway_factory):
    plane, app = await _plane(gateway_factory)
    await plane.apply(RegisterProvider(_spec()))
    app.inflight.attempt_started("extra")
    app.inflight = counting = _CountingInFlight(app.inflight)
    result = await plane.apply(UnregisterProvider("extra", 2.0))
    assert counting.returned == counting.deadline  # gave up at the grace, not before or a tick later
    assert (result["drained"], result["in_flight_left"]) == (False, 1)


async def test_a_change_that_cannot_be_persisted_is_undone_and_no_hook_hears_it(gateway_factory):
    plane, app = await _plane(gateway_factory)
    heard = []
    plane.subscribe(lambda change, origin: heard.append(change))

    async def broken_save(state):
        raise ControlStoreError("disk full")

    plane.store.save = broken_save
    with pytest.raises(GatewayError) as err:
        await plane.apply(RegisterProvider(_spec()))
    assert err.value.status == 500 and err.value.code == "persistence_failed"
    assert "extra" not in app.catalog and "extra" not in app.providers.value
    assert "extra" not in plane.state.providers and heard == []
    with pytest.raises(GatewayError):
        await plane.apply(UnregisterProvider("fake", 0.0))
    assert "fake" in app.catalog and not app.providers.value["fake"].draining


async def test_a_second_change_to_a_name_being_changed_is_409(clock, gateway_factory, nursery):
    plane, app = await _plane(gateway_factory)
    await plane.apply(RegisterProvider(_spec()))
    app.inflight.attempt_started("extra")  # keeps the first change draining
    nursery.start_soon(plane.apply, UnregisterProvider("extra", 30.0))
    await trio.sleep(1.0)
    with pytest.raises(GatewayError) as err:
        await plane.apply(UnregisterProvider("extra", 0.0))
    assert err.value.status == 409 and err.value.code == "change_in_progress"
    app.inflight.attempt_ended("extra")


async def test_groups_are_created_and_deleted_through_apply(gateway_factory):
    plane, app = await _plane(gateway_factory)
    await plane.apply(RegisterProvider(_spec()))
    group = GroupSpec(name="g", providers=("fake", "extra"), strategy="priority", max_attempts=2,
                      health_threshold=0.5)
    assert (await plane.apply(CreateGroup(group)))["providers"] == ["fake", "extra"]
    assert app.selector.groups.value["g"] == group and "g" in plane.state.groups
    with pytest.raises(GatewayError) as err:
        await plane.apply(CreateGroup(group))
    assert err.value.status == 409
    assert (await plane.apply(DeleteGroup("g"))) == {"name": "g", "deleted": True}
    assert "g" not in app.selector.groups.value


async def test_apply_refuses_what_is_not_a_change(gateway_factory):
    plane, _ = await _plane(gateway_factory)
    with pytest.raises(TypeError, match="not a control change"):
        await plane.apply(("register", "x"))


def _record_table_writers(monkeypatch) -> list[str]:
    """The module of each caller of a ProviderTable write, from now to the end of the test."""
    writers: list[str] = []
    for method in ("put", "remove", "mark_draining"):
        original = getattr(ProviderTable, method)

        def recording(self, *args, _original=original, **kwargs):
            writers.append(sys._getframe(1).f_globals["__name__"])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ProviderTable, method, recording)
    return writers


def _record_supervisor_calls(sup, monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    for method in ("drain", "undrain", "unregister"):
        original = getattr(sup, method)
        if method == "unregister":
            async def recording(name, _original=original, _method=method):
                calls.append((_method, name))
                return await _original(name)
        else:
            def recording(name, _original=original, _method=method):
                calls.append((_method, name))
                return _original(name)
        monkeypatch.setattr(sup, method, recording)
    return calls


async def test_the_plane_drains_and_withdraws_through_the_supervisor_which_alone_writes_the_table(
        gateway_factory, monkeypatch):
    plane, app = await _plane(gateway_factory)
    await plane.apply(RegisterProvider(_spec()))
    writers = _record_table_writers(monkeypatch)
    calls = _record_supervisor_calls(app.provider_supervisor, monkeypatch)

    # A drain whose change cannot be persisted is undone, by the owner too.
    saved = plane.store.save

    async def broken_save(state):
        raise ControlStoreError("disk full")

    plane.store.save = broken_save
    with pytest.raises(GatewayError):
        await plane.apply(UnregisterProvider("extra", 0.0))
    assert calls == [("drain", "extra"), ("undrain", "extra")]
    assert not app.providers.value["extra"].draining

    plane.store.save = saved
    await plane.apply(UnregisterProvider("extra", 0.0))
    assert calls[2:] == [("drain", "extra"), ("unregister", "extra")]
    assert "extra" not in app.providers.value
    # Every write to the table was made in the providers' own module (actors and their supervisor).
    assert writers and set(writers) == {"runestone.providers.supervisor"}
