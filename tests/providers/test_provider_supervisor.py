"""The provider supervisor owns the provider table: unregistering a provider that is down (its actor
crashed and its restart keeps failing) withdraws the entry the crashed incarnation left behind."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runestone.config import provider_spec_from_dict
from runestone.providers import supervisor as provider_supervisor
from runestone.providers.supervisor import EnhancedProviderSupervisor, ProviderTable
from runestone.runtime import Registry


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


class _Boom(Exception):
    pass


class _Unbuildable:
    def __init__(self, *args, **kwargs) -> None:
        raise _Boom("the adapter cannot be built")


async def test_unregister_withdraws_the_entry_a_down_provider_left_behind(clock, monkeypatch):
    table = ProviderTable()
    spec = provider_spec_from_dict({"name": "p", "type": "fake", "config": {"models": ["m"]}})
    restarting = trio.Event()

    def crash(_event):  # the health check's report raises: the actor crashes
        raise _Boom("crashed")

    sup = EnhancedProviderSupervisor([spec], table, registry=Registry(), intensity=100, period=60.0,
                                     health_check_interval=1.0, emit=crash,
                                     on_restart=lambda *_: restarting.set())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = table.value["p"]
        # From now on the provider cannot start again: it stays down, restarting.
        monkeypatch.setitem(provider_supervisor.ADAPTERS, "fake", _Unbuildable)
        await restarting.wait()
        assert table.value["p"] is first  # left behind by the crashed incarnation
        await sup.unregister("p")
        assert "p" not in table.value
        assert sup.which_children() == []
        sup.request_stop()
