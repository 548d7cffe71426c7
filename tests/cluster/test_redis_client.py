"""The Redis client against a real redis-server on loopback: commands, pipelines, scripts and their NOSCRIPT
fallback, AUTH/SELECT from the URL, pub/sub, blocking reads, and what happens when the server is killed,
restarted or stopped (SIGSTOP).

Timing: no test waits for time to pass on a healthy server (calls there have a deadline of many seconds, so
a busy machine never trips one); the short deadlines are only ever reached against a stopped server, which
never answers, so the outcome does not depend on the machine's speed. States are awaited (``wait_up``) or
polled under a generous bound, never timed.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from runestone.cluster.redis import (
    RedisClient,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    Script,
    open_redis,
    parse_redis_url,
)

SLOW_OK = 10.0  # a call's deadline where the server is healthy


async def _until_answers(client: RedisClient) -> None:
    """Poll until a call succeeds (bounded)."""
    with trio.fail_after(30):
        while True:
            await client.wait_up()
            try:
                await client.execute("PING", timeout=SLOW_OK)
                return
            except RedisUnavailable:
                await trio.sleep(0.05)


async def test_commands_and_error_replies(redis_server):
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        assert client.healthy and client.state == "up"
        assert await client.execute("SET", "t:cmd", b"\x00\xffbytes") == b"OK"
        assert await client.execute("GET", "t:cmd") == b"\x00\xffbytes"
        assert await client.execute("INCRBY", "t:n", 5) == 5
        assert await client.execute("GET", "t:missing") is None
        with pytest.raises(RedisReplyError) as err:
            await client.execute("INCR", "t:cmd")
        assert err.value.code == "ERR"
        await client.execute("LPUSH", "t:list", "a")
        with pytest.raises(RedisReplyError) as err:
            await client.execute("GET", "t:list")
        assert err.value.code == "WRONGTYPE"
        with pytest.raises(ValueError):
            await client.execute("SET", "t:bad", object())  # refused before anything is sent
        assert await client.execute("GET", "t:cmd") == b"\x00\xffbytes"  # the connection is still in step
        assert client.statistics().pending == 0
        await client.execute("DEL", "t:cmd", "t:n", "t:list")


async def test_pipeline_one_call_many_replies_in_order(redis_server):
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        commands = [("SET", f"t:p{i}", i) for i in range(100)] + [("GET", f"t:p{i}") for i in range(100)]
        commands.insert(150, ("HGET", "t:p1", "x"))  # an error reply in the middle keeps its place
        replies = await client.pipeline(commands)
        assert replies[:100] == [b"OK"] * 100
        assert isinstance(replies[150], RedisReplyError) and replies[150].code == "WRONGTYPE"
        assert replies[100:150] + replies[151:] == [str(i).encode() for i in range(100)]
        await client.execute("DEL", *[f"t:p{i}" for i in range(100)])


async def test_concurrent_callers_share_the_connection(redis_server):
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        await client.execute("DEL", "t:shared")
        results = []

        async def one(i):
            results.append((i, await client.pipeline([("INCR", "t:shared"), ("ECHO", str(i))])))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
        assert sorted(r[0] for _, r in results) == list(range(1, 301))
        assert [(i, r[1]) for i, r in results] == [(i, str(i).encode()) for i, _ in results]  # its own replies
        assert await client.execute("GET", "t:shared") == b"300"
        assert client.statistics().connects == 1
        await client.execute("DEL", "t:shared")


async def test_script_loaded_in_the_same_round_trip_and_noscript_falls_back_to_eval(redis_server):
    add = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    redis_server.command("SCRIPT", "FLUSH")
    redis_server.command("DEL", "t:script")
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        assert await client.execute("SCRIPT", "EXISTS", add.sha) == [0]
        # unknown to this connection: SCRIPT LOAD goes first in the same pipeline, so the order holds
        replies = await client.pipeline([add.call(["t:script"], [2]), ("GET", "t:script"), add.call(["t:script"], [3])])
        assert replies == [2, b"2", 5]
        assert await client.execute("SCRIPT", "EXISTS", add.sha) == [1]
        assert await add(client, ["t:script"], [1]) == 6  # EVALSHA alone
        await client.execute("SCRIPT", "FLUSH")  # forgotten behind the client's back: NOSCRIPT, then EVAL
        assert await add(client, ["t:script"], [1]) == 7
        assert await client.execute("SCRIPT", "EXISTS", add.sha) == [1]
        failing = Script("return redis.call('HGET', KEYS[1], 'x')")
        with pytest.raises(RedisReplyError) as err:
            await failing(client, ["t:script"])
        assert "WRONGTYPE" in str(err.value)
        broken = Script("this is not lua")
        (reply,) = await client.pipeline([broken.call()])
        assert isinstance(reply, RedisReplyError)
        assert broken.sha not in client._scripts  # a failed load is not assumed loaded
        await client.execute("DEL", "t:script")


async def test_auth_and_select_from_the_url(redis_factory):
    server = redis_factory(password="s3cr et")
    url = f"redis://:s3cr%20et@127.0.0.1:{server.port}/3"
    async with open_redis(url, timeout=SLOW_OK) as client:
        await client.wait_up()
        await client.execute("SET", "t:db", "three")
    assert server.command("SELECT", "3") == b"OK"
    assert server.command("GET", "t:db") is None  # a fresh connection is on db 0: the value is in db 3 only
    async with open_redis(url, timeout=SLOW_OK) as client:
        await client.wait_up()
        assert await client.execute("GET", "t:db") == b"three"
    async with open_redis(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout=SLOW_OK) as client:
        with trio.fail_after(30):
            while client.statistics().last_error == "":
                await trio.sleep(0.02)
        stats = client.statistics()
        assert stats.state == "down" and "AUTH failed" in stats.last_error
        assert "wrong" not in stats.last_error and "s3cr" not in repr(client.address)
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")


def test_parse_redis_url():
    a = parse_redis_url("rediss://user:p%40ss@example.test:6380/2")
    assert (a.host, a.port, a.db, a.username, a.password, a.tls) == ("example.test", 6380, 2, "user", "p@ss", True)
    assert "p@ss" not in repr(a)
    assert parse_redis_url("redis://localhost").port == 6379
    for bad in ("http://h:1", "redis://:pw@/0", "redis://h/x"):
        with pytest.raises(ValueError) as err:
            parse_redis_url(bad)
        assert "pw" not in str(err.value)


async def test_pubsub_and_resubscribe_after_restart(redis_server):
    got = []
    connected = [trio.Event()]

    def on_connect():
        connected[-1].set()

    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        async with trio.open_nursery() as nursery:
            listen = partial(client.listen, ["t:chan"], lambda c, m: got.append((c, m)), on_connect=on_connect)
            await nursery.start(listen)
            with trio.fail_after(30):
                await connected[-1].wait()
                await client.wait_up()
                assert await client.execute("PUBLISH", "t:chan", "one") == 1
                while len(got) < 1:
                    await trio.sleep(0.01)
            connected.append(trio.Event())
            redis_server.restart()
            with trio.fail_after(30):
                await connected[-1].wait()  # subscribed again by itself
            await _until_answers(client)
            assert await client.execute("PUBLISH", "t:chan", "two") == 1
            with trio.fail_after(30):
                while len(got) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert got == [(b"t:chan", b"one"), (b"t:chan", b"two")]


async def test_dedicated_connection_blocks_without_holding_the_shared_one(redis_server):
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        await client.execute("DEL", "t:stream")
        result = []

        async def reader():
            async with client.connection() as conn:
                result.append(await conn.execute("XREAD", "BLOCK", 0, "STREAMS", "t:stream", "$", timeout=30))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with trio.fail_after(30):
                while (await client.execute("CLIENT", "LIST", "TYPE", "normal")).count(b"cmd=xread") < 1:
                    await trio.sleep(0.01)
            await client.execute("XADD", "t:stream", "*", "k", "v")  # the shared connection is not blocked
        [[name, [[_id, fields]]]] = result[0]
        assert name == b"t:stream" and fields == [b"k", b"v"]
        await client.execute("DEL", "t:stream")


async def test_killed_server_fails_calls_fast_and_reconnects(redis_server):
    async with open_redis(redis_server.url, timeout=SLOW_OK) as client:
        await client.wait_up()
        await client.execute("SET", "t:k", "1")
        redis_server.kill()
        with pytest.raises(RedisUnavailable):  # the lost connection, or refused because down: never a hang
            with trio.fail_after(30):
                await client.execute("GET", "t:k")
        with trio.fail_after(30):
            while client.state != "down":
                await trio.sleep(0.01)
        assert not client.healthy
        with pytest.raises(RedisUnavailable):
            await client.execute("GET", "t:k")
        assert client.statistics().refused >= 1
        redis_server.start()
        await _until_answers(client)
        assert client.healthy
        assert await client.execute("GET", "t:k") is None  # a new server (nothing was saved)
        stats = client.statistics()
        assert stats.connects >= 2 and stats.disconnects >= 1 and stats.last_error == ""


async def test_down_at_start_then_up(redis_factory, tmp_path):
    from redistest import RedisServer

    later = RedisServer(tmp_path)  # a free port nobody listens on yet
    async with open_redis(later.url, timeout=SLOW_OK) as client:
        with trio.fail_after(30):
            while client.state != "down":
                await trio.sleep(0.01)
        with pytest.raises(RedisUnavailable):
            await client.execute("PING")
        later.start()
        try:
            await _until_answers(client)
        finally:
            later.stop()


async def test_stopped_server_times_out_then_refuses_then_recovers(redis_server):
    async with open_redis(redis_server.url, timeout=0.2, stall_reconnect=2.0) as client:
        await client.wait_up()
        await client.execute("SET", "t:stop", "x", timeout=SLOW_OK)
        redis_server.pause()
        try:
            with trio.fail_after(30):  # bounded by the call's own deadline: fail_after only catches a hang
                with pytest.raises(RedisTimeout):
                    await client.execute("GET", "t:stop")
            assert client.state == "stalled" and not client.healthy
            with pytest.raises(RedisUnavailable) as err:  # refused at once: no caller queues behind a stall
                await client.execute("GET", "t:stop")
            assert not isinstance(err.value, RedisTimeout)
            assert client.statistics().timeouts == 1
            with trio.fail_after(30):  # the stalled connection is given up and reconnecting fails meanwhile
                while client.state != "down":
                    await trio.sleep(0.05)
        finally:
            redis_server.resume()
        await _until_answers(client)
        assert await client.execute("GET", "t:stop", timeout=SLOW_OK) == b"x"
        await client.execute("DEL", "t:stop", timeout=SLOW_OK)
