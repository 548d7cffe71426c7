"""A trio-native Redis client: hiredis's C reply parser over ``trio.SocketStream``, as http/ uses httptools.

Why this and not a client from PyPI: measured with ``scripts/bench_redis.py`` on this machine (loopback Redis
7.0, 64 concurrent tasks sharing one client, each call one pipelined round trip of INCR, EXPIRE and GET, the
shape of a shared limit check; CPU of the client process)::

    runestone.cluster.redis (trio, hiredis)       37,500 calls/s    17 us CPU per call
    coredis 6.9 (trio, through anyio)              3,500 calls/s   239 us CPU per call
    redis-py 8.1 asyncio (on asyncio: not trio)    3,900 calls/s   111 us CPU per call
    redis-py 8.1 sync through trio.to_thread       4,000 calls/s   231 us CPU per call

redis-py's asyncio client cannot run on trio at all (it needs an asyncio loop; bridging would be a thread hop
per call on the hot path); its sync client blocks its thread, so on trio it goes through ``to_thread``.
coredis runs on trio through anyio but costs ~14 times our CPU per call. This client writes every command
that the request path queues during one scheduling round with one ``send_all`` (automatic pipelining across
tasks) and parses replies in C, so a request that needs Redis pays one round trip, shared with its neighbours.

Shape:

- :class:`RedisClient` is one multiplexed connection owned by its :meth:`RedisClient.run` task, which
  connects (``AUTH``/``SELECT`` from the URL, ``redis://[[user]:password@]host:port/db``, ``rediss://`` for
  TLS), reconnects with capped exponential backoff (at most ``backoff_max`` seconds between attempts, so
  shared operation resumes within about a second of Redis coming back) and pings when idle. Callers never do
  socket I/O themselves: a call queues its packed commands and waits for its replies, so a caller cancelled
  or timed out mid-call leaves the connection intact (its replies are read and dropped).
- Every call has a deadline (``timeout``, default 0.25 s): a slow Redis never holds a request longer. While
  the oldest unanswered call is older than that, the client is *stalled* and new calls fail at once with
  :class:`RedisUnavailable` instead of queueing behind it; a connection stalled for ``stall_reconnect``
  seconds is dropped and made anew. While disconnected, calls fail at once too. Callers catch
  :class:`RedisUnavailable` and fall back to local state.
- :meth:`RedisClient.pipeline` sends a list of commands in one round trip; :class:`Script` runs a Lua script
  by ``EVALSHA`` and falls back to ``EVAL`` on ``NOSCRIPT`` (after a Redis restart), in pipelines too.
- :meth:`RedisClient.listen` subscribes on its own connection and re-subscribes after every reconnect,
  calling ``on_connect`` each time so its owner can read back what it missed; :meth:`RedisClient.connection`
  lends a dedicated connection for blocking commands (``XREAD BLOCK``).
- :attr:`RedisClient.state` (``connecting``, ``up``, ``stalled``, ``down``) and
  :meth:`RedisClient.statistics` feed /health/detailed and /metrics.

Error tree::

    RedisError
    ├── RedisUnavailable        not connected, stalled, or connection lost mid-call: fall back to local
    │   └── RedisTimeout        no reply within the call's deadline
    └── RedisReplyError         the server answered with an error (WRONGTYPE, NOSCRIPT, a script's error)
"""

from __future__ import annotations

import collections
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import hiredis
import trio

__all__ = [
    "RedisAddress",
    "RedisClient",
    "RedisConnection",
    "RedisError",
    "RedisReplyError",
    "RedisStatistics",
    "RedisTimeout",
    "RedisUnavailable",
    "Script",
    "ScriptCall",
    "open_redis",
    "parse_redis_url",
]

log = logging.getLogger("runestone.cluster.redis")


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisUnavailable(RedisError):
    """Redis could not answer: not connected, stalled, or the connection was lost during the call."""


class RedisTimeout(RedisUnavailable):
    """No reply within the call's deadline."""


class RedisReplyError(RedisError):
    """The server answered with an error reply (its text is the message)."""

    @property
    def code(self) -> str:
        """The error's first word: ``NOSCRIPT``, ``WRONGTYPE``, ``ERR``..."""
        return str(self).split(" ", 1)[0]


class _ProtocolError(RedisError):
    pass


_INCOMPLETE = object()


def _new_reader() -> hiredis.Reader:
    return hiredis.Reader(protocolError=_ProtocolError, replyError=RedisReplyError, notEnoughData=_INCOMPLETE)


def _redacted(password: str | None) -> str:
    return "None" if password is None else "'***'"


@attrs.frozen
class RedisAddress:
    """Where one Redis server is and how to log in (from ``redis_url``)."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_redacted)
    tls: bool = False


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS). Raises ValueError, without the
    password in the message."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("a Redis URL starts with redis:// or rediss://")
    host = parts.hostname
    if not host:
        raise ValueError("a Redis URL needs a host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the Redis database number must be an integer (got {path!r})")
    return RedisAddress(
        host=host,
        port=parts.port or 6379,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


class _Wire:
    """One connected, logged-in socket and its reply parser."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = _new_reader()

    @classmethod
    async def open(cls, address: RedisAddress) -> _Wire:
        stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
        try:
            if address.tls:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=address.host)
                await stream.do_handshake()
            wire = cls(stream)
            hello: list[tuple] = []
            if address.password is not None:
                auth = ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
                hello.append(auth)
            if address.db:
                hello.append(("SELECT", address.db))
            hello.append(("PING",))  # also proves a server that accepted the TCP connection is answering
            await stream.send_all(b"".join(hiredis.pack_command(c) for c in hello))
            for command in hello:
                reply = await wire.read()
                if isinstance(reply, RedisReplyError):
                    raise RedisReplyError(f"{command[0]} failed: {reply}")
            return wire
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def read(self) -> Any:
        """The next reply (an error reply is returned, not raised). Cancelling this loses nothing."""
        while True:
            reply = self.reader.gets()
            if reply is not _INCOMPLETE:
                return reply
            data = await self.stream.receive_some(65536)
            if not data:
                raise RedisUnavailable("Redis closed the connection")
            self.reader.feed(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


#: What losing a connection can raise; each ends the connection, never the caller's task.
_LOST = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, RedisError, trio.TooSlowError)


@attrs.frozen
class ScriptCall:
    """One invocation of a :class:`Script`, to put in :meth:`RedisClient.pipeline`."""

    script: Script
    keys: tuple
    args: tuple

    def evalsha(self) -> tuple:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def eval(self) -> tuple:
        return ("EVAL", self.script.source, len(self.keys), *self.keys, *self.args)


class Script:
    """A Lua script run by its SHA1, sent whole only when the server does not know it (``NOSCRIPT``)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.sha[:12]})"

    def call(self, keys: Iterable = (), args: Iterable = ()) -> ScriptCall:
        return ScriptCall(self, tuple(keys), tuple(args))

    async def __call__(self, client: RedisClient, keys: Iterable = (), args: Iterable = (), *,
                       timeout: float | None = None) -> Any:
        (reply,) = await client.pipeline([self.call(keys, args)], timeout=timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply


Command = tuple | list | ScriptCall


class _Call:
    """A caller waiting for ``count`` replies."""

    __slots__ = ("count", "replies", "done", "error", "sent_at")

    def __init__(self, count: int, sent_at: float) -> None:
        self.count = count
        self.replies: list = []
        self.done = trio.Event()
        self.error: RedisError | None = None
        self.sent_at = sent_at


@attrs.frozen
class RedisStatistics:
    """What :meth:`RedisClient.statistics` reports."""

    #: ``connecting`` (no attempt finished yet), ``up``, ``stalled`` (connected, replies late), ``down``.
    state: str
    #: Connections made (the first one and every reconnect).
    connects: int
    #: Connections lost or dropped.
    disconnects: int
    #: Calls that got no reply within their deadline.
    timeouts: int
    #: Calls refused at once because Redis was down or stalled.
    refused: int
    #: Calls waiting for replies now.
    pending: int
    #: Why the last connection attempt or connection failed ("" when none has).
    last_error: str


class RedisClient:
    """One multiplexed connection to Redis, kept up by :meth:`run` (start it in a nursery: ``await
    nursery.start(client.run)``; it is ready at once, connected or not)."""

    def __init__(
        self,
        address: RedisAddress | str,
        *,
        timeout: float = 0.25,
        connect_timeout: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        ping_interval: float = 1.0,
        stall_reconnect: float = 2.0,
    ) -> None:
        self.address = parse_redis_url(address) if isinstance(address, str) else address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.ping_interval = ping_interval
        self.stall_reconnect = stall_reconnect
        self._wire: _Wire | None = None
        self._out = bytearray()
        self._wake = trio.Event()
        self._pending: collections.deque[_Call] = collections.deque()
        self._state = "connecting"
        self._connected = trio.Event()
        self._connects = 0
        self._disconnects = 0
        self._timeouts = 0
        self._refused = 0
        self._last_error = ""
        self._state_listeners: list[Callable[[str], None]] = []
        #: SHAs of the scripts loaded on the current connection (a new connection may be a new server).
        self._scripts: set[str] = set()

    def __repr__(self) -> str:
        return f"RedisClient({self.address.host}:{self.address.port}/{self.address.db}, {self.state})"

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self._state == "up" and self._stalled(trio.current_time()):
            return "stalled"
        return self._state

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def statistics(self) -> RedisStatistics:
        return RedisStatistics(self.state, self._connects, self._disconnects, self._timeouts, self._refused,
                               len(self._pending), self._last_error)

    def on_state(self, listener: Callable[[str], None]) -> None:
        """Call ``listener("up")`` after each connect and ``listener("down")`` after each loss (it must not
        block): owners of shared state resynchronise on ``up``."""
        self._state_listeners.append(listener)

    async def wait_up(self) -> None:
        """Return once connected (at once if connected now)."""
        while self._state != "up":
            await self._connected.wait()

    def _stalled(self, now: float) -> bool:
        return bool(self._pending) and now - self._pending[0].sent_at >= self.timeout

    def _set_state(self, state: str) -> None:
        self._state = state
        if state == "up":
            self._connected.set()
        elif self._connected.is_set():
            self._connected = trio.Event()
        for listener in self._state_listeners:
            try:
                listener(state)
            except Exception:
                log.exception("redis state listener failed")

    # -- calls ---------------------------------------------------------------------------------------------

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """One command; raises :class:`RedisReplyError` for an error reply."""
        (reply,) = await self._send((args,), timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command], *, timeout: float | None = None) -> list:
        """Replies to ``commands`` (tuples, or :class:`ScriptCall`), sent in one round trip. Error replies come
        back as :class:`RedisReplyError` values in their place.

        A script not yet loaded on this connection goes with a ``SCRIPT LOAD`` in the same round trip, so the
        commands run in order; one the server forgot since (``SCRIPT FLUSH``: ``NOSCRIPT``) is sent whole in
        a second round trip, after the commands that followed it in the pipeline."""
        if not commands:
            return []
        loaded = self._scripts
        wire: list = []
        loads: dict[int, str] = {}  # index in wire -> sha of the script loaded there
        for c in commands:
            if isinstance(c, ScriptCall):
                if c.script.sha not in loaded:
                    loaded.add(c.script.sha)  # assumed from now on; a failed load is forgotten below
                    loads[len(wire)] = c.script.sha
                    wire.append(("SCRIPT", "LOAD", c.script.source))
                c = c.evalsha()
            wire.append(c)
        replies = await self._send(wire, timeout)
        if loads:
            for i, sha in loads.items():
                if isinstance(replies[i], RedisReplyError):
                    loaded.discard(sha)
            replies = [r for i, r in enumerate(replies) if i not in loads]
        missing = [i for i, (c, r) in enumerate(zip(commands, replies))
                   if isinstance(c, ScriptCall) and isinstance(r, RedisReplyError) and r.code == "NOSCRIPT"]
        if missing:
            for i in missing:
                loaded.discard(commands[i].script.sha)
            again = await self._send([commands[i].eval() for i in missing], timeout)
            for i, reply in zip(missing, again):
                replies[i] = reply
        return replies

    async def _send(self, commands: Sequence[tuple | list], timeout: float | None) -> list:
        now = trio.current_time()
        if self._wire is None or self._stalled(now):
            self._refused += 1
            raise RedisUnavailable(f"Redis is {self.state}" + (f": {self._last_error}" if self._last_error else ""))
        try:
            packed = b"".join([hiredis.pack_command(tuple(c)) for c in commands])
        except (TypeError, hiredis.HiredisError) as exc:
            raise ValueError(f"cannot send {commands!r} to Redis: {exc}") from None
        call = _Call(len(commands), now)
        self._pending.append(call)
        self._out += packed
        self._wake.set()
        with trio.move_on_after(self.timeout if timeout is None else timeout):
            await call.done.wait()
        if not call.done.is_set():
            self._timeouts += 1
            raise RedisTimeout(f"Redis did not answer within {self.timeout if timeout is None else timeout} s")
        if call.error is not None:
            raise call.error
        return call.replies

    # -- the connection's tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled. Ready at once: a gateway starts whether Redis is up or not."""
        task_status.started(self)
        delay = self.backoff_min
        while True:
            try:
                with trio.fail_after(self.connect_timeout):
                    wire = await _Wire.open(self.address)
            except _LOST as exc:
                self._lost(f"cannot connect to {self.address.host}:{self.address.port}: {_describe(exc)}")
                await trio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_min
            self._connects += 1
            self._wire = wire
            self._scripts = set()
            self._last_error = ""
            if self._connects > 1:
                log.warning("redis: connected again to %s:%d", self.address.host, self.address.port)
            self._set_state("up")
            why = "the connection ended"
            try:
                async with trio.open_nursery() as nursery:
                    failure: list[str] = []
                    for task in (self._reader, self._writer, self._watchdog):
                        nursery.start_soon(self._guard, task, wire, nursery.cancel_scope, failure)
                why = failure[0] if failure else why
            finally:
                self._wire = None
                with trio.CancelScope(shield=True):
                    await wire.aclose()
            self._disconnects += 1
            self._lost(why)

    async def _guard(self, task, wire: _Wire, scope: trio.CancelScope, failure: list[str]) -> None:
        try:
            await task(wire)
        except _LOST as exc:
            failure.append(_describe(exc))
            scope.cancel()

    def _lost(self, why: str) -> None:
        if self._state != "down" or why != self._last_error:
            log.warning("redis: %s (shared state falls back to local until it is back)", why)
        self._last_error = why
        error = RedisUnavailable(f"connection to Redis lost: {why}")
        while self._pending:
            call = self._pending.popleft()
            call.error = error
            call.done.set()
        self._out.clear()
        if self._state != "down":
            self._set_state("down")

    async def _reader(self, wire: _Wire) -> None:
        reader = wire.reader
        pending = self._pending
        while True:
            data = await wire.stream.receive_some(65536)
            if not data:
                raise RedisUnavailable("Redis closed the connection")
            reader.feed(data)
            while (reply := reader.gets()) is not _INCOMPLETE:
                if not pending:
                    raise _ProtocolError("a reply that no call asked for")
                call = pending[0]
                call.replies.append(reply)
                if len(call.replies) == call.count:
                    pending.popleft()
                    call.done.set()

    async def _writer(self, wire: _Wire) -> None:
        while True:
            while not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
            data = bytes(self._out)
            self._out.clear()
            await wire.stream.send_all(data)

    async def _watchdog(self, wire: _Wire) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            now = trio.current_time()
            if self._pending and now - self._pending[0].sent_at > self.stall_reconnect:
                raise RedisTimeout(f"no reply from Redis for {self.stall_reconnect} s")
            if not self._pending:
                # unanswered, this PING is what the stall check above sees on an idle connection
                self._pending.append(_Call(1, now))
                self._out += b"*1\r\n$4\r\nPING\r\n"
                self._wake.set()

    # -- dedicated connections -----------------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[RedisConnection]:
        """A connection of its own for blocking commands (``XREAD BLOCK``, ``BLPOP``); closed on exit. Raises
        :class:`RedisUnavailable` when Redis cannot be reached within ``connect_timeout``."""
        try:
            with trio.fail_after(self.connect_timeout):
                wire = await _Wire.open(self.address)
        except _LOST as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {_describe(exc)}") from None
        try:
            yield RedisConnection(wire)
        finally:
            with trio.CancelScope(shield=True):
                await wire.aclose()

    async def listen(
        self,
        channels: Sequence[str],
        on_message: Callable[[bytes, bytes], None],
        *,
        on_connect: Callable[[], None] | None = None,
        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe to ``channels`` on a connection of its own and call ``on_message(channel, data)`` for
        each message, until cancelled; re-subscribes after every reconnect and then calls ``on_connect()``
        (messages published meanwhile are lost: read back state there). Neither callback may block. Ready at
        once, connected or not."""
        task_status.started()
        delay = self.backoff_min
        while True:
            try:
                async with self.connection() as conn:
                    await conn.send("SUBSCRIBE", *channels)
                    for _ in channels:
                        await conn.read(timeout=self.connect_timeout)
                    delay = self.backoff_min
                    if on_connect is not None:
                        on_connect()
                    await self._relay(conn, on_message)
            except _LOST as exc:
                log.warning("redis: subscription to %s lost (%s); subscribing again", ",".join(channels),
                            _describe(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _relay(self, conn: RedisConnection, on_message: Callable[[bytes, bytes], None]) -> None:
        pinged_at: float | None = None
        while True:
            with trio.move_on_after(self.ping_interval):
                reply = await conn.wire.read()
                if isinstance(reply, list) and reply and reply[0] == b"message":
                    try:
                        on_message(reply[1], reply[2])
                    except Exception:
                        log.exception("redis: message handler failed")
                pinged_at = None  # anything from the server proves it alive
                continue
            now = trio.current_time()
            if pinged_at is None:
                pinged_at = now
                await conn.send("PING")
            elif now - pinged_at > self.stall_reconnect:
                raise RedisTimeout(f"no reply from Redis for {self.stall_reconnect} s")


class RedisConnection:
    """A connection lent by :meth:`RedisClient.connection`: one caller, one command at a time. A call that
    times out leaves it unusable (its reply would answer the next call): the owner opens another."""

    def __init__(self, wire: _Wire) -> None:
        self.wire = wire
        self._broken = False

    async def send(self, *args: Any) -> None:
        if self._broken:
            raise RedisUnavailable("this connection was abandoned mid-call")
        self._broken = True  # until the write completes: a cancelled write leaves a partial command
        await self.wire.stream.send_all(hiredis.pack_command(args))
        self._broken = False

    async def read(self, *, timeout: float | None = None) -> Any:
        if timeout is None:
            return await self.wire.read()
        with trio.move_on_after(timeout):
            return await self.wire.read()
        raise RedisTimeout(f"Redis did not answer within {timeout} s")

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """One command and its reply; an error reply raises :class:`RedisReplyError`."""
        await self.send(*args)
        self._broken = True
        reply = await self.read(timeout=timeout)
        self._broken = False
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def open_redis(url: str | RedisAddress, **settings: Any) -> AsyncIterator[RedisClient]:
    """A :class:`RedisClient` running for one ``async with`` block (scripts, tests)."""
    client = RedisClient(url, **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
