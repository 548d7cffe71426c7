"""A key or team change made on one Governance, told to its listeners and applied on another
(runestone.cluster.governance carries it between instances through Redis; here it is handed over directly).

The change carries digests, never a secret; applied, it is persisted in the other instance's own store (a
restart of it still has the key); a change that arrives after a revocation keeps the key revoked; a
malformed or unknown change is refused and changes nothing; a change applied from elsewhere is not told
to the listeners again.
"""

from __future__ import annotations

import hashlib

import orjson
import pytest

from runestone.config import LimitsConfig
from runestone.front.limits import KeyLimiter
from runestone.governance import Governance, KeyStore
from runestone.routing.errors import GatewayError


def _gov(data) -> tuple[Governance, list]:
    gov = Governance(KeyStore(data), KeyLimiter(LimitsConfig()))
    gov.load()
    told: list = []
    gov.subscribe(lambda change, origin: told.append((change, origin)))
    return gov, told


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def _hand_over(told: list, to: Governance) -> None:
    for change, origin in told:
        assert origin == "local"
        await to.apply_change(orjson.loads(orjson.dumps(change)))  # as JSON, as the stream carries it
    told.clear()


async def test_changes_applied_elsewhere_are_persisted_there_and_a_revocation_is_final(tmp_path):
    a, told_a = _gov(tmp_path / "a")
    b, told_b = _gov(tmp_path / "b")
    await a.create_team({"name": "eng", "budget": {"usd": 5, "period": "day"}})
    key = await a.create_key({"name": "k", "team": "eng"})
    secret = key["secret"]
    assert all(secret not in orjson.dumps(change).decode() for change, _ in told_a)
    assert b.key_id_for(_digest(secret)) is None
    await _hand_over(told_a, b)
    assert b.key_id_for(_digest(secret)) == key["id"]
    assert told_b == []  # applied from elsewhere: not told again

    rotated = await a.rotate_key(key["id"], 60_000)
    await a.update_team("eng", {"budget": {"usd": 1, "period": "day"}})
    await _hand_over(told_a, b)
    assert b.key_id_for(_digest(rotated["secret"])) == key["id"]
    assert b.key_id_for(_digest(secret)) == key["id"]  # within the rotation's grace
    assert b.describe_team("eng")["budget"] == {"usd": 1.0, "period": "day"}

    await a.update_key(key["id"], {"models": ["m"]})
    late_patch, = (c for c, _ in told_a)
    told_a.clear()
    await b.revoke_key(key["id"])
    await b.apply_change(late_patch)  # made on A before it heard of the revocation
    assert b.key_id_for(_digest(rotated["secret"])) is None
    assert b.describe_key(key["id"])["models"] == ["m"] and b.describe_key(key["id"])["status"] == "revoked"

    restarted, _ = _gov(tmp_path / "b")
    assert restarted.describe_key(key["id"])["status"] == "revoked"
    assert restarted.describe_team("eng")["budget"] == {"usd": 1.0, "period": "day"}


async def test_a_malformed_or_unknown_change_is_refused_and_changes_nothing(tmp_path):
    b, told = _gov(tmp_path)
    for change, error in (({"op": "drop_everything"}, ValueError), ({"op": "create_key", "key": {}}, KeyError),
                          ({"op": "revoke_key", "id": "key_000000000000", "revoked_at": 1.0}, GatewayError),
                          ({"op": "update_team", "name": "nope", "patch": {}}, GatewayError),
                          ({"op": "update_key", "id": "key_1", "patch": {"models": 3}}, GatewayError)):
        with pytest.raises(error):
            await b.apply_change(change)
    key = {"id": "key_0123456789ab", "name": "k", "digest": "00" * 32, "team": "ghost"}
    with pytest.raises(GatewayError, match="ghost"):
        await b.apply_change({"op": "create_key", "key": key})
    assert b.keys == {} and b.teams == {} and told == []
    assert _gov(tmp_path)[0].keys == {}
