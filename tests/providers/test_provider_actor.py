"""The provider actor takes no messages: anything sent to it gets the runtime's unknown-message policy."""

from __future__ import annotations

import trio

from runestone.config import provider_spec_from_dict
from runestone.providers.supervisor import ProviderActor, ProviderTable
from runestone.runtime import Registry, Rejected


async def test_a_provider_actor_rejects_calls_and_drops_casts_without_crashing():
    table = ProviderTable()
    actor = ProviderActor(provider_spec_from_dict({"name": "f", "type": "fake"}), table, registry=Registry())
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(actor.run)
        assert "f" in table.value
        for message in ("snapshot", "models", ("models",)):  # the old string calls nobody sent
            reply = await ref.call(message)
            assert type(reply) is Rejected and reply.code == "invalid"
        ref.cast("anything")
        assert type(await ref.call(None)) is Rejected  # a round trip: the cast was handled
        assert ref.alive and actor.lifecycle.unknown_messages == 5 and "f" in table.value
        assert actor.snapshot().name == "f"  # dumps read the actor directly
        ref.request_stop()
    assert "f" not in table.value
