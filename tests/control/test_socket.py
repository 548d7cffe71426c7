"""The /v1/control protocol without HTTP: ControlSocket.handle called with decoded messages, its answers
read from the session's send. Every operation, bad messages answered in the API's shape and changing
nothing, the per-connection limit, an operation that fails, the live feed."""

import trio
import trio.testing

from runestone.control.socket import MAX_OPS, OPERATIONS, ControlSession, ControlSocket

from gatewaytest import provider_toml

TOML = provider_toml("base", "fake", models=["fake-model"])


class Session(ControlSession):
    """A client whose messages are queued for the test to read."""

    def __init__(self) -> None:
        self.out, self.inbox = trio.open_memory_channel[dict](1000)
        super().__init__(self.out.send)

    async def next(self) -> dict:
        with trio.fail_after(10):  # only a hang trips this
            return await self.inbox.receive()

    async def reply(self, rid) -> dict:
        """The answer to ``rid``, skipping live events."""
        while True:
            msg = await self.next()
            if msg.get("id") == rid and msg["type"] in ("result", "error", "pong"):
                return msg
            assert msg["type"] == "event", msg


async def running(session) -> int:
    """The session's operations still running once every task has run as far as it can (a reply is sent
    just before its task ends)."""
    await trio.testing.wait_all_tasks_blocked()
    return session.ops


async def _socket(gateway_factory, extra=None):
    gw = await gateway_factory(TOML)
    return gw.app, ControlSocket(gw.app.control, gw.app.registry, extra)


async def call(socket, session, nursery, op, rid, **fields) -> dict:
    await socket.handle(session, {"type": op, "id": rid, **fields}, nursery)
    return await session.reply(rid)


async def test_every_operation(gateway_factory, nursery):
    app, socket = await _socket(gateway_factory)
    s = Session()

    async def ask(op, rid, **fields):
        return await call(socket, s, nursery, op, rid, **fields)

    r = await ask("register_provider", 1, provider={"name": "extra", "type": "fake",
                                                    "config": {"models": ["extra-model"]}})
    assert r["type"] == "result" and r["op"] == "register_provider" and r["result"]["status"] == "running"
    r = await ask("list_providers", 2)
    assert [p["name"] for p in r["result"]] == ["base", "extra"]
    r = await ask("update_provider", 3, name="extra", provider={"config": {"priority": 3}})
    assert r["result"]["config"]["priority"] == 3
    r = await ask("create_group", 4, group={"name": "both", "providers": ["extra", "base"]})
    assert r["result"]["providers"] == ["extra", "base"]
    r = await ask("update_group", "5", name="both", group={"strategy": "round_robin"})
    assert r["result"]["strategy"] == "round_robin"
    r = await ask("list_groups", 6)
    assert [g["name"] for g in r["result"]] == ["both", "default"]
    r = await ask("reset_circuit", 7, name="base")
    assert r["result"]["state"] == "closed"
    dump = (await ask("dump_state", 8))["result"]
    assert dump["tree"]["name"] == "runestone" and dump["control"]["persisted_groups"] == ["both"]
    supervisor = next(c for c in dump["tree"]["children"] if c["id"] == "enhanced_provider_supervisor")
    assert sorted(c["id"] for c in supervisor["children"]) == ["base", "extra"]
    r = await ask("delete_group", 9, name="both")
    assert r["result"] == {"name": "both", "deleted": True}
    r = await ask("unregister_provider", 10, name="extra", grace_ms=1000)
    assert r["result"]["drained"] is True
    assert await ask("ping", 11) == {"type": "pong", "id": 11}
    assert sorted(app.catalog) == ["base"] and await running(s) == 0


BAD = [
    ({"type": "launch_rockets"}, "unknown_type", "launch_rockets"),
    ({}, "unknown_type", "needs a \"type\""),
    ({"type": "register_provider"}, "invalid_provider", "must be an object"),
    ({"type": "register_provider", "provider": {"name": "x", "type": "fake", "config": {"chunks": -1}}},
     "invalid_provider", "config.chunks"),
    ({"type": "register_provider", "provider": {"name": "base", "type": "fake"}}, "conflict", "base"),
    ({"type": "update_provider", "provider": {"config": {"priority": 1}}}, "invalid_value", "'name'"),
    ({"type": "update_provider", "name": "ghost", "provider": {}}, "not_found", "ghost"),
    ({"type": "unregister_provider", "name": "base", "grace_ms": -5}, "invalid_value", "grace_ms"),
    ({"type": "unregister_provider", "name": 42}, "invalid_value", "'name'"),
    ({"type": "create_group", "group": {"name": "g", "providers": ["base"], "colour": 1}}, "invalid_group",
     "colour"),
    ({"type": "create_group", "group": "g"}, "invalid_group", "must be an object"),
    ({"type": "delete_group", "name": "ghost"}, "not_found", "ghost"),
    ({"type": "reset_circuit"}, "invalid_value", "'name'"),
]


async def test_bad_messages_name_the_problem_and_change_nothing(gateway_factory, nursery):
    app, socket = await _socket(gateway_factory)
    s = Session()
    before = (await call(socket, s, nursery, "list_providers", "before"))["result"]
    for i, (message, code, fragment) in enumerate(BAD):
        rid = f"case-{i}"
        await socket.handle(s, {**message, "id": rid}, nursery)
        got = await s.reply(rid)
        assert got["type"] == "error" and got["error"]["code"] == code, (message, got)
        assert fragment in got["error"]["message"], (message, got)
        assert got["op"] == message.get("type"), got
        if code != "unknown_type":  # the plane's refusals carry the HTTP status they stand for
            assert got["status"] in (400, 404, 409), got
    await socket.handle(s, {"type": "list_providers", "id": {"nested": 1}}, nursery)
    got = await s.next()
    assert got["error"]["code"] == "invalid_id" and got["id"] is None and got["error"]["param"] == "id"
    after = (await call(socket, s, nursery, "list_providers", "after"))["result"]
    assert after == before
    assert not app.control_store.path.exists() and await running(s) == 0


async def test_at_most_max_ops_at_once_and_added_operations(gateway_factory, nursery):
    release = trio.Event()
    started = []

    async def hold(msg):
        started.append(msg["id"])
        await release.wait()
        return {"held": msg["id"]}

    _, socket = await _socket(gateway_factory, {"hold": hold})
    s = Session()
    for i in range(MAX_OPS):
        await socket.handle(s, {"type": "hold", "id": i}, nursery)
    assert s.ops == MAX_OPS
    await socket.handle(s, {"type": "hold", "id": "one-too-many"}, nursery)
    refused = await s.next()
    assert refused["id"] == "one-too-many" and refused["error"]["code"] == "too_many_operations"
    assert refused["status"] == 429 and refused["error"]["type"] == "rate_limit_error"
    # The limit does not hold back what is answered at once.
    assert await call(socket, s, nursery, "ping", "p") == {"type": "pong", "id": "p"}
    await socket.handle(s, {"type": "warp", "id": "w"}, nursery)
    unknown = await s.reply("w")
    assert "hold" in unknown["error"]["message"] and all(op in unknown["error"]["message"] for op in OPERATIONS)
    release.set()
    results = sorted([(await s.next())["result"]["held"] for _ in range(MAX_OPS)])  # in any order
    assert results == list(range(MAX_OPS)) and "one-too-many" not in started
    assert await running(s) == 0


async def test_an_operation_that_fails_is_logged_and_answered_500(gateway_factory, nursery, caplog):
    async def broken(msg):
        raise RuntimeError("secret internals")

    _, socket = await _socket(gateway_factory, {"broken": broken})
    s = Session()
    got = await call(socket, s, nursery, "broken", "b")
    assert got["status"] == 500 and got["error"]["code"] == "internal_error" and got["op"] == "broken"
    assert "secret internals" not in str(got)
    assert any("control operation broken failed" in r.getMessage() for r in caplog.records)
    assert await call(socket, s, nursery, "ping", "after") == {"type": "pong", "id": "after"}
    assert await running(s) == 0


async def test_the_live_feed_until_unsubscribed(gateway_factory, nursery):
    app, socket = await _socket(gateway_factory)
    s = Session()
    assert (await call(socket, s, nursery, "subscribe", "s"))["result"] == {"subscribed": True}
    assert (await call(socket, s, nursery, "subscribe", "again"))["result"] == {"subscribed": True}
    await socket.handle(s, {"type": "register_provider", "id": "r",
                            "provider": {"name": "late", "type": "fake", "config": {"models": ["late-model"]}}},
                        nursery)
    kinds, got_reply = [], False
    while not (got_reply and "provider_registered" in kinds):
        msg = await s.next()
        if msg["type"] == "event":
            kinds.append(msg["event"]["kind"])
        else:
            assert msg["id"] == "r" and msg["type"] == "result", msg
            got_reply = True
    assert (await call(socket, s, nursery, "unsubscribe", "u"))["result"] == {"subscribed": False}
    assert s.subscription is None
    handler = app.registry.whereis("telemetry_handler")
    with trio.fail_after(60):  # only a hang trips this
        while handler.actor.snapshot().subscribers:
            await trio.sleep(0.01)
