"""State dumps of a live two-level tree."""

from __future__ import annotations

import enum

import attrs
import orjson
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from runestone.runtime import Actor, ActorDead, ChildSpec, NamedRef, Registry, Supervisor, dump_state


class Mode(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"


@attrs.frozen
class Limits:
    rps: float
    burst: int


@attrs.frozen
class KeeperSnapshot:
    mode: Mode
    limits: Limits
    tags: frozenset[str]
    recent: tuple[int, ...]
    api_key: str


class Keeper(Actor):
    async def init(self) -> None:
        self.recent: list[int] = []

    async def handle_call(self, message):
        if message == "boom":
            raise ZeroDivisionError("division by zero in keeper")
        self.recent.append(message)
        return len(self.recent)

    def snapshot(self) -> KeeperSnapshot:
        return KeeperSnapshot(Mode.OPEN, Limits(2.5, 10), frozenset({"x"}), tuple(self.recent), api_key="sk-***")


class Broken(Actor):
    def snapshot(self):
        raise RuntimeError("cannot snapshot")


class Ticker:
    """A plain task child offering snapshot(), without being an actor."""

    name = "ticker"

    def snapshot(self):
        return {"ticks": 3, b"raw": b"bytes", "ratio": float("inf")}


async def run_ticker(*, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started(Ticker())
    await trio.sleep_forever()


async def test_dump_of_a_two_level_tree_is_plain_json_with_every_field():
    registry = Registry()
    keeper = Keeper("keeper", registry=registry, mailbox_size=8)
    inner = Supervisor(
        "inner",
        [keeper.child_spec(), ChildSpec("ticker", run_ticker, restart="transient")],
        strategy="rest_for_one",
        registry=registry,
    )
    root = Supervisor("root", [Broken("broken", registry=registry).child_spec(), inner.child_spec()], registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        ref = registry.whereis("keeper")
        await ref.call(7)
        with pytest.raises(ActorDead):
            await ref.call("boom")
        await wait_all_tasks_blocked()
        await registry.whereis("keeper").call(8)

        state = dump_state(root)
        decoded = orjson.loads(orjson.dumps(state))
        assert decoded == state  # nothing lost or coerced on the way to JSON

        assert state["name"] == "root" and state["kind"] == "supervisor"
        assert state["strategy"] == "one_for_one" and state["status"] == "running"
        assert state["restarts"] == 0 and state["last_error"] is None
        assert state["snapshot"]["intensity"] == 1  # OTP's default

        broken, inner_node = state["children"]
        assert broken["kind"] == "actor" and broken["id"] == "broken"
        assert broken["snapshot"] == {"error": {"type": "RuntimeError", "message": "cannot snapshot"}}
        assert broken["mailbox"] == {"depth": 0, "capacity": 256}

        assert inner_node["kind"] == "supervisor" and inner_node["strategy"] == "rest_for_one"
        assert inner_node["status"] == "running" and inner_node["restarts"] == 0
        keeper_node, ticker_node = inner_node["children"]
        assert keeper_node["name"] == "keeper" and keeper_node["kind"] == "actor"
        assert keeper_node["status"] == "running" and keeper_node["restarts"] == 1
        assert keeper_node["last_error"] == {"type": "ZeroDivisionError", "message": "division by zero in keeper"}
        assert keeper_node["mailbox"] == {"depth": 0, "capacity": 8}
        assert keeper_node["snapshot"] == {
            "mode": "open",
            "limits": {"rps": 2.5, "burst": 10},
            "tags": ["x"],
            "recent": [8],
            "api_key": "sk-***",
        }
        assert ticker_node["kind"] == "task" and ticker_node["name"] == "ticker"
        # rest_for_one: the ticker, started after the keeper, was restarted with it.
        assert ticker_node["restarts"] == 1 and ticker_node["status"] == "running"
        assert ticker_node["snapshot"] == {"ticks": 3, "raw": "bytes", "ratio": "inf"}
        for node in (state, broken, inner_node, keeper_node, ticker_node):
            assert {"name", "kind", "status", "restarts", "last_error", "snapshot"} <= node.keys()

        # A single actor, by object, ref or name, dumps the same node.
        current = registry.whereis("keeper")
        assert dump_state(current.actor) == dump_state(current) == dump_state(NamedRef(registry, "keeper"))
        assert dump_state(NamedRef(registry, "nobody"))["status"] == "stopped"
        root.request_stop()

    after = dump_state(root)
    assert after["status"] == "stopped"
    assert all(child["status"] == "stopped" for child in after["children"])
    orjson.dumps(after)


async def test_dump_uses_a_childs_own_dump_when_it_offers_one():
    class Server:
        def dump(self):
            return {"name": "front", "snapshot": {"connections": 2}, "listening": ("127.0.0.1", 8080)}

    async def run_server(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started(Server())
        await trio.sleep_forever()

    sup = Supervisor("app", [ChildSpec("front", run_server)], registry=Registry())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        (front,) = dump_state(sup)["children"]
        assert front["name"] == "front" and front["kind"] == "task" and front["id"] == "front"
        assert front["snapshot"] == {"connections": 2}
        assert front["listening"] == ["127.0.0.1", 8080]
        orjson.dumps(front)
        sup.request_stop()
