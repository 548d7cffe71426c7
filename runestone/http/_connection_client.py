"""One connection of the upstream client to an origin: plain TCP on the bare socket, or TLS; and their I/O deadlines.

A connection carries one request at a time for the pool it belongs to (``_pool``). On plain
TCP the socket is driven directly (non-blocking ``send``/``recv`` first, ``wait_readable`` or
``wait_writable`` only when the kernel cannot serve at once) rather than through trio's stream
layers, which cost about ten times more per read; TLS goes through ``trio.SSLStream``. Read and
write timeouts are kept by one task per trio run (:class:`_IODeadlines`) instead of a cancel scope
per operation. The plain and TLS ``send_all``/``receive`` look alike on purpose: sharing them
would put a call or a branch on every read of the hot path.
"""

from __future__ import annotations

import math
import select
import socket
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import checkpoint_if_cancelled, notify_closing, wait_readable, wait_writable

from .errors import ReadTimeout, RemoteProtocolError, WriteTimeout

if TYPE_CHECKING:
    from ._pool import _OriginPool

_RECV_SIZE = 65536


class _ConnectionLost(RemoteProtocolError):
    """The connection failed before a single response byte arrived; safe to retry if it was a reused one."""


# One module-level poller: registering an fd is a dict operation, only poll() is a syscall,
# and unlike select() it works for descriptors above FD_SETSIZE.
_poller = select.poll()
_POLL_ANY = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def _readable_now(fd: int) -> bool:
    _poller.register(fd, _POLL_ANY)
    try:
        return bool(_poller.poll(0))
    finally:
        _poller.unregister(fd)


class _IODeadlines:
    """Read and write timeouts for every connection of one trio run, kept by one system task.

    A cancel scope around each read costs about 9 µs of a 32 µs request
    (entering it registers a deadline with the run, leaving it unregisters
    it). Instead a reader or writer stamps its connection with a deadline and
    adds it to ``armed``, which costs a set insertion; this task sleeps until
    the earliest deadline it knows of, and closes every connection whose
    deadline has passed. Closing the socket wakes the waiting task with
    ``ClosedResourceError``, which it reports as ``ReadTimeout`` or
    ``WriteTimeout``: a timed-out connection is never reused anyway. Deadlines usually only move later (each read pushes
    its own forward), so arming rarely has to wake this task early.
    """

    __slots__ = ("_scope", "armed", "wake_at")

    def __init__(self) -> None:
        self.armed: set[_UpstreamConnection] = set()
        self.wake_at = math.inf
        self._scope = trio.CancelScope()

    def arm(self, conn: _UpstreamConnection, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        if conn.cap < deadline:
            deadline = conn.cap
        conn.deadline = deadline
        self.armed.add(conn)
        if deadline < self.wake_at:
            self.wake_at = self._scope.deadline = deadline

    def tighten(self, conn: _UpstreamConnection, deadline: float) -> None:
        """A wait in progress on ``conn`` ends by ``deadline`` too (its cap was lowered while it waited)."""
        if conn in self.armed and deadline < conn.deadline:
            conn.deadline = deadline
            if deadline < self.wake_at:
                self.wake_at = self._scope.deadline = deadline

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.wake_at) as self._scope:
                await trio.sleep_forever()
            now = trio.current_time()
            wake_at = math.inf
            for conn in list(self.armed):
                if conn.deadline <= now:
                    self.armed.discard(conn)
                    conn.timed_out = True
                    try:
                        conn.close()
                    except OSError:  # pragma: no cover - close() of a socket failing is not actionable here
                        pass
                elif conn.deadline < wake_at:
                    wake_at = conn.deadline
            self.wake_at = wake_at


_io_deadlines: trio.lowlevel.RunVar[_IODeadlines] = trio.lowlevel.RunVar("runestone.http.io_deadlines")


def _current_io_deadlines() -> _IODeadlines:
    try:
        return _io_deadlines.get()
    except LookupError:
        keeper = _IODeadlines()
        trio.lowlevel.spawn_system_task(keeper.run, name="runestone.http I/O deadlines")
        _io_deadlines.set(keeper)
        return keeper


class _UpstreamConnection:
    """One connection to an origin, carrying one request at a time. ``close()`` is synchronous and
    frees the pool slot, so it is safe in any ``except`` or ``finally``, cancelled or not.
    A connection belongs to the trio run that opened it (its I/O deadlines are kept there)."""

    __slots__ = ("cap", "closed", "deadline", "deadlines", "idle_since", "pool", "reused", "timed_out")

    def __init__(self, pool: _OriginPool) -> None:
        self.pool = pool
        self.reused = False
        self.closed = False
        self.timed_out = False
        self.idle_since = 0.0
        self.deadline = math.inf
        #: The exchange's own deadline (``stream(deadline=...)``): no wait of it lasts past this.
        self.cap = math.inf
        self.deadlines = _current_io_deadlines()

    def timeout_message(self, otherwise: str) -> str:
        """What a timed-out wait reports: the exchange's deadline if that is what passed, else ``otherwise``."""
        if self.cap <= trio.current_time():
            return f"the request's deadline passed while waiting for {self.pool.origin}"
        return otherwise

    async def send_all(self, data: bytes, timeout: float) -> None:
        raise NotImplementedError

    async def receive(self, timeout: float) -> bytes:
        raise NotImplementedError

    def dead_while_idle(self) -> bool:
        """Whether the idle socket became readable: the peer closed it, reset it, or sent stray bytes."""
        raise NotImplementedError

    def _close_socket(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_socket()
        pool = self.pool
        pool.busy.discard(self)
        pool.open -= 1
        if pool.waiters:
            pool.waiters.unpark()


class _PlainConnection(_UpstreamConnection):
    __slots__ = ("_sock",)

    def __init__(self, pool: _OriginPool, sock: socket.socket) -> None:
        super().__init__(pool)
        self._sock = sock

    async def send_all(self, data: bytes, timeout: float) -> None:
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {exc}") from exc
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            while view:
                await wait_writable(sock)
                try:
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {exc}") from exc
        except trio.ClosedResourceError:
            if self.timed_out:
                message = f"writing the request to {self.pool.origin} took longer than {timeout:g} s"
                raise WriteTimeout(self.timeout_message(message)) from None
            raise RemoteProtocolError(f"the connection to {self.pool.origin} was closed by its transport") from None
        finally:
            deadlines.armed.discard(self)

    async def receive(self, timeout: float) -> bytes:
        sock = self._sock
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc}") from exc
        else:
            # Data was already there, so nothing yielded: still honour a pending cancellation.
            await checkpoint_if_cancelled()
            return data
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            while True:
                await wait_readable(sock)
                try:
                    return sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc}") from exc
        except trio.ClosedResourceError:
            if self.timed_out:
                raise ReadTimeout(self.timeout_message(f"{self.pool.origin} sent nothing for {timeout:g} s")) from None
            # Closed under us by aclose(abort_in_use=True): the exchange failed, as a transport error.
            raise RemoteProtocolError(f"the connection to {self.pool.origin} was closed by its transport") from None
        finally:
            deadlines.armed.discard(self)

    def dead_while_idle(self) -> bool:
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def _close_socket(self) -> None:
        sock = self._sock
        if sock.fileno() != -1:
            notify_closing(sock)
            sock.close()


class _TLSConnection(_UpstreamConnection):
    __slots__ = ("_raw", "_stream")

    def __init__(self, pool: _OriginPool, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__(pool)
        self._stream = stream
        self._raw = stream.transport_stream.socket

    async def send_all(self, data: bytes, timeout: float) -> None:
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self.timed_out:
                message = f"writing the request to {self.pool.origin} took longer than {timeout:g} s"
                raise WriteTimeout(self.timeout_message(message)) from None
            cause = exc.__cause__ or exc
            raise _ConnectionLost(f"connection to {self.pool.origin} lost while sending: {cause}") from exc
        finally:
            deadlines.armed.discard(self)

    async def receive(self, timeout: float) -> bytes:
        deadlines = self.deadlines
        deadlines.arm(self, timeout)
        try:
            return await self._stream.receive_some(_RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self.timed_out:
                raise ReadTimeout(self.timeout_message(f"{self.pool.origin} sent nothing for {timeout:g} s")) from None
            raise _ConnectionLost(f"connection to {self.pool.origin} lost: {exc.__cause__ or exc}") from exc
        finally:
            deadlines.armed.discard(self)

    def dead_while_idle(self) -> bool:
        fd = self._raw.fileno()
        return fd == -1 or _readable_now(fd)

    def _close_socket(self) -> None:
        # No close_notify: the connection is either idle with nothing owed, or in an unknown
        # state; HTTP/1.1 framing, not TLS closure, says whether a response was complete.
        self._raw.close()

