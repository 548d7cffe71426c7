"""``runestone serve --workers N``: a parent process that runs N gateway processes on one port and supervises
them as the tree supervises its actors.

Each worker is the normal single-process gateway (``runestone serve`` with three hidden options naming its
index, the worker count and its control socket). The parent builds nothing of the gateway: it holds the
port, starts the workers, and restarts one that exits by the tree's own rules, because each worker process
is a child of a :class:`runestone.runtime.Supervisor` (``one_for_one``, ``permanent``): an intensity of at
most ``intensity`` restarts within ``period`` seconds, checked before each restart (``supervisor.erl``'s
``add_restart``); past it the supervisor stops the other workers and the parent exits 1. A worker that
fails its *initial* start makes the parent exit at once (1, or 2 when the worker said the configuration
is wrong), as a supervisor whose child fails ``init`` does.

One port, two ways to share it; this uses ``SO_REUSEPORT``:

- ``SO_REUSEPORT`` (chosen): every worker binds and listens on the port itself, with its own accept queue,
  and Linux hashes each new connection to one of the listening sockets. The spread is by connection, not
  by load, but even (checked by tests/e2e/test_workers.py over many connections, and in the report of
  ``scripts/bench --workers``), and no process wakes for a connection another one takes. A worker is then
  exactly the single-process gateway plus one socket option (``serve_http(reuse_port=True)``), with no file
  descriptor to hand over. The parent binds the port first (with ``SO_REUSEPORT``, never listening, so the
  kernel sends it nothing): that resolves port 0 to a real port, keeps the port for restarted workers, and
  makes a single-process gateway started on the same port fail to bind as it should.
- A socket bound by the parent and inherited by every worker (not chosen): one shared accept queue, so a
  killed worker strands nothing in its own queue; but every worker's event loop waits on the same socket,
  and epoll (trio's, without ``EPOLLEXCLUSIVE``) wakes all of them for each connection, only one of which
  gets it; and the worker that is awake already tends to win them all, so the spread under load is uneven.

What ``SO_REUSEPORT`` costs: connections the kernel had queued for a worker that dies before accepting them
are reset, like the connections it was serving (both are that worker's; the others' are untouched), and any
process of the same user may join the port (as with every ``SO_REUSEPORT`` server).

Signals to the parent: SIGTERM or SIGINT stops gracefully: every worker gets SIGTERM at once (each drains
as a single gateway does, see ``app._GracefulFront``) and the parent exits 0 once all stopped cleanly; a
second one sends each worker its second SIGTERM (a worker then stops at once) and SIGKILLs what is left
``KILL_AFTER`` seconds later. SIGUSR1 asks every worker for its state dump over its control socket and
writes one document to the log, each worker's section labelled with its index and pid. The workers run in
their own process group, so a terminal's Ctrl-C reaches the parent alone (not the parent and then the
parent's forwarded signal: two signals, which would be "stop at once"); a worker whose control socket
closes (the parent died, even by SIGKILL) stops gracefully by itself.

State that is per process (limits, budgets, breakers, registrations) is shared between the workers only
through ``[cluster] redis_url``, which is why more than one worker requires it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import orjson
import trio

from ..runtime import ChildSpec, Supervisor, SupervisorEscalation, plain

__all__ = [
    "WorkerCluster",
    "WorkerExited",
    "WorkerIdentity",
    "WorkerProcess",
    "answer_parent",
    "handle_signals",
    "parse_workers",
    "reserve_port",
    "run_workers",
]

log = logging.getLogger("runestone.cluster")

#: From spawn to "ready": past this a worker's start has failed (the tree waits on a child's start forever,
#: but a process can hang before its event loop runs, and a restart holds the supervisor while it waits).
START_TIMEOUT = 120.0
#: After a second stop signal: how long the workers get to stop at once before they are SIGKILLed.
KILL_AFTER = 5.0
#: How long the parent waits for each worker's state dump.
DUMP_TIMEOUT = 10.0
#: Default restart intensity for workers: a worker takes about a second to start, so a crash loop is
#: caught within a few tries, and an occasional crash (an OOM kill) is ridden out.
INTENSITY = 5
PERIOD = 30.0


def cpu_count() -> int:
    """The cores this process may run on (``os.process_cpu_count()`` where Python has it)."""
    counted = getattr(os, "process_cpu_count", None)
    if counted is not None:
        return counted() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_workers(text: str) -> int:
    """``--workers``: a count of at least 1, or ``auto`` (one per core)."""
    if text == "auto":
        return cpu_count()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--workers must be a whole number of at least 1 or 'auto', got {text!r}")
    return count


@attrs.frozen
class WorkerIdentity:
    """Where a worker process stands among its siblings (in ``/health/detailed`` and its state dump)."""

    index: int
    """0 to ``count - 1``; a restarted worker keeps its index."""
    count: int
    """How many workers the parent runs."""
    parent_pid: int
    """The pid of the ``serve --workers`` parent."""


class WorkerExited(Exception):
    """A worker process ended without being asked to (or before it said it was ready)."""

    def __init__(self, index: int, pid: int, returncode: int | None, *, ready: bool) -> None:
        self.index = index
        self.pid = pid
        self.returncode = returncode
        self.ready = ready
        if returncode is None:
            how = f"did not say it was ready within {START_TIMEOUT:g} s"
        elif returncode < 0:
            how = f"was killed by {signal.Signals(-returncode).name}"
        else:
            how = f"exited with status {returncode}"
        super().__init__(f"worker {index} (pid {pid}) {how}{'' if ready else ' before it was ready'}")


def _line(message: dict) -> bytes:
    return orjson.dumps(message, default=str) + b"\n"


async def _messages(stream: trio.SocketStream):
    """The JSON lines ``stream`` carries, until it closes (or breaks, or carries something that is not one)."""
    buffer = bytearray()
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            raw = bytes(buffer[:end])
            del buffer[:end + 1]
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log.warning("control socket: not a JSON line: %r", raw[:200])
                return
            if isinstance(message, dict):
                yield message


class WorkerProcess:
    """One incarnation of one worker, as its supervisor holds it (the child's started value).

    The parent and the worker talk over a Unix socket pair, in JSON lines: the worker says
    ``{"ready": {"pid", "port"}}`` once it serves, and answers ``{"dump": id}`` with
    ``{"reply": id, "state": ...}``.
    """

    def __init__(self, index: int, process: trio.Process, control: trio.SocketStream, cluster: WorkerCluster):
        self.index = index
        self.process = process
        self.pid = process.pid
        self.control = control
        self.ready = trio.Event()
        #: SIGTERM was sent to it (once: a second one would mean "stop at once").
        self.stop_sent = False
        self._cluster = cluster
        self._next_id = 0
        self._replies: dict[int, list] = {}

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.index} pid {self.pid}>"

    def request_stop(self) -> None:
        """What the supervisor calls to stop this child: every worker is asked at once, so that they drain
        together instead of one after the other (a ``one_for_one`` supervisor stops a child only when it is
        stopping them all)."""
        self._cluster.stop_workers()

    def send_stop(self, again: bool = False) -> None:
        """SIGTERM, once (``again``: the second one, which makes a worker stop at once)."""
        if self.process.returncode is None and (again or not self.stop_sent):
            self.stop_sent = True
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def read_control(self) -> None:
        async for message in _messages(self.control):
            if "ready" in message:
                self.ready.set()
            elif "reply" in message:
                slot = self._replies.get(message["reply"])
                if slot is not None:
                    slot[1] = message.get("state")
                    slot[0].set()

    async def dump(self) -> Any:
        """This worker's state dump; raises ``trio.TooSlowError`` if it does not answer in time."""
        self._next_id += 1
        ident = self._next_id
        slot = self._replies[ident] = [trio.Event(), None]
        try:
            with trio.fail_after(DUMP_TIMEOUT):
                await self.control.send_all(_line({"dump": ident}))
                await slot[0].wait()
        finally:
            del self._replies[ident]
        return slot[1]


class WorkerCluster:
    """N worker processes under one supervisor. ``command(index, control_fd)`` is a worker's argv."""

    def __init__(self, count: int, command: Callable[[int, int], Sequence[str]], *, intensity: int = INTENSITY,
                 period: float = PERIOD, stop_grace: float = 30.0) -> None:
        self.count = count
        self._command = command
        self.stopping = False
        #: index -> the worker process running now under that index.
        self.workers: dict[int, WorkerProcess] = {}
        #: Workers that did not stop cleanly when asked (their index, pid and how they ended).
        self.unclean: list[str] = []
        self._stop_grace = stop_grace
        self.root = Supervisor("workers", [self._child(i) for i in range(count)], strategy="one_for_one",
                               intensity=intensity, period=period, on_restart=self._on_restart)

    def _child(self, index: int) -> ChildSpec:
        async def start(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            await self._run_worker(index, task_status=task_status)

        return ChildSpec(id=f"worker-{index}", start=start, restart="permanent", shutdown=self._stop_grace)

    def _on_restart(self, supervisor: str, child: str, restarts: int, error) -> None:
        log.warning("restarting %s (restart %d): %s", child, restarts, error)

    def request_stop(self) -> None:
        """Stop gracefully: SIGTERM to every worker now, and no more restarts."""
        self.stopping = True
        self.root.request_stop()
        self.stop_workers()

    def stop_workers(self) -> None:
        for worker in list(self.workers.values()):
            worker.send_stop()

    def stop_workers_at_once(self) -> None:
        self.stopping = True
        self.root.request_stop()
        for worker in list(self.workers.values()):
            worker.send_stop(again=True)

    async def _run_worker(self, index: int, *, task_status) -> None:
        if self.stopping:  # a restart that raced the stop: nothing to start
            task_status.started(None)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await trio.lowlevel.open_process(
                list(self._command(index, theirs.fileno())), pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, process_group=0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = WorkerProcess(index, process, trio.SocketStream(trio.socket.from_stdlib_socket(ours)), self)
        self.workers[index] = worker
        if self.stopping:
            worker.send_stop()
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.read_control)
                with trio.move_on_after(START_TIMEOUT):
                    async with trio.open_nursery() as race:
                        for wait in (worker.ready.wait, process.wait):
                            race.start_soon(_then_cancel, wait, race.cancel_scope)
                if worker.ready.is_set() and process.returncode is None:
                    started = True
                    task_status.started(worker)
                    await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            await trio.aclose_forcefully(worker.control)
            if self.workers.get(index) is worker:
                del self.workers[index]
        code = process.returncode
        if worker.stop_sent:
            if code not in (0, -signal.SIGTERM):
                self.unclean.append(str(WorkerExited(index, worker.pid, code, ready=True)))
            if not started:
                task_status.started(None)
            return
        raise WorkerExited(index, worker.pid, code, ready=started)

    async def dump(self) -> dict[str, Any]:
        """One document: the parent's supervisor and each worker's own dump, labelled by index and pid."""
        sections: dict[int, dict] = {}

        async def one(index: int, worker: WorkerProcess) -> None:
            section = sections[index] = {"index": index, "pid": worker.pid}
            try:
                section["state"] = await worker.dump()
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                section["error"] = f"no dump from worker {index} (pid {worker.pid}): {type(exc).__name__}"

        async with trio.open_nursery() as nursery:
            for index, worker in sorted(self.workers.items()):
                nursery.start_soon(one, index, worker)
        for index in range(self.count):
            sections.setdefault(index, {"index": index, "pid": None, "error": "not running (restarting)"})
        return {
            "pid": os.getpid(),
            "workers": [sections[i] for i in range(self.count)],
            "supervisor": plain(self.root.snapshot()),
            "children": [{"id": c.id, "status": c.status, "restarts": c.restarts} for c in self.root.which_children()],
        }


async def _then_cancel(wait, scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def answer_parent(app, fd: int) -> None:
    """A worker's end of its control socket: say ready, answer dump requests; when the parent is gone
    (the socket closed), stop gracefully."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
    try:
        await stream.send_all(_line({"ready": {"pid": os.getpid(), "port": app.port}}))
        async for message in _messages(stream):
            if "dump" in message:
                try:
                    state = app.dump_state()
                except Exception as exc:
                    log.exception("state dump failed")
                    state = {"error": f"state dump failed: {type(exc).__name__}: {exc}"}
                await stream.send_all(_line({"reply": message["dump"], "state": state}))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    log.warning("the parent process is gone: stopping gracefully")
    app.request_stop()


async def handle_signals(*, stop: Callable[[], None], stop_at_once: Callable[[], None],
                         dump: Callable[[], None]) -> None:
    """Answer the process's signals as ``runestone serve`` does, alone or as the ``--workers`` parent: the
    first SIGTERM or SIGINT calls ``stop()``, the second ``stop_at_once()``, each SIGUSR1 ``dump()``."""
    say = logging.getLogger("runestone")
    stops = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as batches:
        async for signum in batches:
            if signum == signal.SIGUSR1:
                dump()
                continue
            stops += 1
            if stops == 1:
                say.info("received %s: stopping gracefully (send it again to stop at once)",
                         signal.Signals(signum).name)
                stop()
            elif stops == 2:
                say.warning("second stop signal: stopping at once")
                stop_at_once()


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with ``SO_REUSEPORT`` without listening: the workers listen beside it, and the
    kernel gives connections only to listening sockets. ``getsockname()`` has the real port for port 0."""
    family, type_, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(cluster: WorkerCluster, ready_line: str) -> int:
    status = 0
    async with trio.open_nursery() as nursery:

        async def write_dump() -> None:
            try:
                log.info("state dump: %s", orjson.dumps(await cluster.dump(), default=str).decode())
            except Exception:
                log.exception("state dump failed")

        async def kill_later() -> None:
            await trio.sleep(KILL_AFTER)
            log.warning("workers still running %g s after the second stop signal: killing them", KILL_AFTER)
            supervise.cancel()

        def stop_at_once() -> None:
            cluster.stop_workers_at_once()
            nursery.start_soon(kill_later)

        nursery.start_soon(partial(handle_signals, stop=cluster.request_stop, stop_at_once=stop_at_once,
                                   dump=partial(nursery.start_soon, write_dump)))

        class _Ready:
            def started(self, value=None) -> None:
                log.info("%s", ready_line)

        with trio.CancelScope() as supervise:
            try:
                await cluster.root.run(task_status=_Ready())
            except SupervisorEscalation as exc:
                log.error("runestone: more than %d worker restarts in %g s: stopped them all (last: %s)",
                          cluster.root.intensity, cluster.root.period, exc.last_error)
                status = 1
            except WorkerExited as exc:
                log.error("runestone: %s; stopped the others", exc)
                status = 2 if exc.returncode == 2 else 1
        nursery.cancel_scope.cancel()
    for problem in cluster.unclean:
        log.warning("%s while stopping", problem)
    return status or (1 if cluster.unclean else 0)


def run_workers(count: int, command: Callable[[int, int], Sequence[str]], *, ready_line: str,
                intensity: int = INTENSITY, period: float = PERIOD, stop_grace: float = 30.0) -> int:
    """Run ``count`` workers until stopped; the exit status (0 clean, 1 given up or failed)."""
    cluster = WorkerCluster(count, command, intensity=intensity, period=period, stop_grace=stop_grace)
    return trio.run(_serve, cluster, ready_line)

