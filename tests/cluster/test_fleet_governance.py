"""FleetGovernance in one process: two Governances, each with its own key store and its own FleetGovernance,
over one real redis-server. A change from the fleet that this instance's store cannot write at first is
tried again (not skipped), installed once it is persisted, and the changes after it follow in order.
"""

from __future__ import annotations

import hashlib
import sqlite3

import trio

from runestone.cluster.governance import FleetGovernance
from runestone.cluster.redis import RedisClient
from runestone.config import LimitsConfig
from runestone.front.limits import KeyLimiter
from runestone.governance import Governance, KeyStore


def _gov(data) -> Governance:
    gov = Governance(KeyStore(data), KeyLimiter(LimitsConfig()))
    gov.load()
    return gov


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def test_a_change_this_store_cannot_write_yet_is_tried_again_and_the_next_follow_in_order(tmp_path,
                                                                                               redis_server):
    a, b = _gov(tmp_path / "a"), _gov(tmp_path / "b")
    failures = []
    write = b.store.backend.write

    def failing_write(ops):
        if len(failures) < 2:
            failures.append(ops)
            raise sqlite3.OperationalError("disk I/O error")
        write(ops)

    b.store.backend.write = failing_write
    redis = RedisClient(redis_server.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(redis.run)
        fa = await nursery.start(FleetGovernance(redis, a, tmp_path / "a", instance="a").run)
        fb = await nursery.start(FleetGovernance(redis, b, tmp_path / "b", instance="b").run)
        key = await a.create_key({"name": "k"})
        await a.revoke_key(key["id"])
        with trio.fail_after(30):  # a hang guard only
            while fb.applied < 2:
                await trio.sleep(0.02)
        assert len(failures) == 2 and fb.refused == 0 and fa.published == 2
        assert b.describe_key(key["id"])["status"] == "revoked" and b.key_id_for(_digest(key["secret"])) is None
        nursery.cancel_scope.cancel()
    assert _gov(tmp_path / "b").describe_key(key["id"])["status"] == "revoked"  # in b's own store
