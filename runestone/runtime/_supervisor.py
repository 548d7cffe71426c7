"""Supervisors: Erlang's ``supervisor`` on a trio nursery.

A :class:`Supervisor` starts its children in order (each must report ready
through ``task_status.started`` before the next starts), then restarts them by
OTP's rules when they exit: strategies ``one_for_one``, ``one_for_all``,
``rest_for_one``; restart types ``permanent``, ``transient``, ``temporary``;
an intensity of at most ``intensity`` restarts per ``period`` seconds, checked
before each restart, past which it stops every child (reverse start order,
each with its grace) and raises :class:`SupervisorEscalation` to its parent.
All changes to the child list (exits, restarts, dynamic starts and stops,
shutdown) are serialised through one lock, so they never interleave.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ._errors import SupervisorEscalation
from ._registry import Registry, default_registry
from ._spec import ChildInfo, ChildSpec

log = logging.getLogger("runestone.runtime")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")

_STOP = object()


def _will_restart(restart: str, error: BaseException | None) -> bool:
    return restart == "permanent" or (restart == "transient" and error is not None)


class _StartHook:
    """Passes ``started()`` through and remembers that it happened: an exception
    before it is a failed start, after it a crash."""

    __slots__ = ("_status", "called")

    def __init__(self, status: trio.TaskStatus[Any]) -> None:
        self._status = status
        self.called = False

    def started(self, value: Any = None) -> None:
        self.called = True
        self._status.started(value)


@attrs.define(eq=False)
class _Child:
    """A supervisor's mutable record of one child, owned by the supervisor."""

    spec: ChildSpec
    status: str = "stopped"
    value: Any = None
    restarts: int = 0
    last_error: BaseException | None = None
    incarnation: int = 0
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None
    stopping: bool = False
    removed: bool = False

    def info(self) -> ChildInfo:
        spec = self.spec
        return ChildInfo(
            id=spec.id,
            kind=spec.kind,
            restart=spec.restart,
            status=self.status,
            value=self.value,
            restarts=self.restarts,
            last_error=self.last_error,
        )


@attrs.frozen
class SupervisorSnapshot:
    """A supervisor's own state for dumps."""

    strategy: str
    intensity: int
    """At most this many restarts ..."""
    period: float
    """... within this many seconds, else it escalates."""
    restarts: int
    """Restarts performed by this run of the supervisor (each counted against the intensity)."""
    recent_restarts: int
    """Restarts within the current period: escalation comes when this would exceed ``intensity``."""
    children: int
    """Children in the list, running or not."""


class Supervisor:
    """Starts, watches and restarts children by OTP's rules (see the module docstring).

    ``run()`` is the supervisor's task; a parent supervisor starts it like any
    child (``Supervisor.child_spec``). The supervisor is registered under its
    name in ``registry`` while it runs, so ``registry.whereis(name)`` finds it
    (e.g. to ``start_child`` on it). Each ``run()`` starts from the children
    given to the constructor; dynamic children do not survive a restart of the
    supervisor itself, as in Erlang.

    Calling ``start_child``/``terminate_child`` from inside one of this
    supervisor's own children while it is being started or stopped deadlocks,
    as it does in Erlang.
    """

    def __init__(
        self,
        name: str,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: str = "one_for_one",
        intensity: int = 3,
        period: float = 5.0,
        registry: Registry | None = None,
        on_restart: Callable[[str, str, int, BaseException | None], None] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if intensity < 0:
            raise ValueError(f"intensity must be >= 0, got {intensity!r}")
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period!r}")
        specs = tuple(children)
        ids = [spec.id for spec in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"child ids must be unique within supervisor {name!r}: {ids}")
        self.name = name
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.registry = default_registry if registry is None else registry
        self.restarts = 0
        """Restarts performed by the current (or last) run."""
        self.on_restart = on_restart
        """Called synchronously as each child is restarted: ``(supervisor, child id, its restarts, last error)``.
        For telemetry; it must not block, and an exception from it is logged and ignored."""
        self.status = "stopped"
        """``"starting"``, ``"running"``, ``"stopping"`` or ``"stopped"``."""
        self.last_error: BaseException | None = None
        """Why the last run failed (a failed start or a :class:`SupervisorEscalation`)."""
        self._specs = specs
        self._children: list[_Child] = []
        self._by_id: dict[str, _Child] = {}
        self._history: collections.deque[float] = collections.deque()
        self._nursery: trio.Nursery | None = None
        self._events_send: trio.MemorySendChannel[Any] | None = None
        self._events_recv: trio.MemoryReceiveChannel[Any] | None = None
        self._lock: trio.Lock | None = None
        self._running = False
        self._accepting = False
        self._stop_requested = False

    @property
    def alive(self) -> bool:
        return self._running

    def child_spec(self, id: str | None = None, restart: str = "permanent", shutdown: float = math.inf) -> ChildSpec:
        """A spec running this supervisor as a child; the default grace waits for
        its own children's graces (Erlang's ``infinity`` for supervisors)."""
        return ChildSpec(
            id=self.name if id is None else id, start=self.run, restart=restart, shutdown=shutdown, kind="supervisor"
        )

    # -- the task ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report ``started(self)``, supervise.

        Returns normally after :meth:`request_stop` once every child has been
        stopped in reverse start order. Raises :class:`SupervisorEscalation`
        (after stopping every child) when the intensity is exceeded, and the
        child's own exception (with a note naming it) when a child fails during
        the initial start, after stopping those already started. When cancelled,
        the children are cancelled with it, without grace.
        """
        if self._running:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        self.registry.register(self.name, self)
        self._running = True
        self._children = [_Child(spec) for spec in self._specs]
        self._by_id = {child.spec.id: child for child in self._children}
        self._history = collections.deque()
        self._events_send, self._events_recv = trio.open_memory_channel[Any](math.inf)
        self._lock = trio.Lock()
        self._stop_requested = False
        self.restarts = 0
        self.last_error = None
        self.status = "starting"
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                failure = await self._start_all()
                if failure is None:
                    self._accepting = not self._stop_requested
                    self.status = "running"
                    task_status.started(self)
                    failure = await self._supervise()
                # Every child has been stopped by now; this only guards against leaks.
                nursery.cancel_scope.cancel()
        finally:
            self._accepting = False
            self._running = False
            self._nursery = None
            for child in self._children:
                child.status = "stopped"
                child.value = None
            self.status = "stopped"
            self.registry.unregister(self.name, self)
        if failure is not None:
            self.last_error = failure
            raise failure

    def request_stop(self) -> None:
        """Stop gracefully: stop the children in reverse start order, each with its
        grace, then ``run()`` returns normally. Returns at once; idempotent."""
        if self._running and not self._stop_requested:
            self._stop_requested = True
            self._accepting = False
            assert self._events_send is not None
            self._events_send.send_nowait(_STOP)

    async def _start_all(self) -> BaseException | None:
        assert self._lock is not None
        async with self._lock:
            for child in list(self._children):
                try:
                    await self._start(child)
                except Exception as exc:
                    child.last_error = exc
                    exc.add_note(f"while supervisor {self.name!r} was starting child {child.spec.id!r}")
                    await self._stop_all()
                    return exc
        return None

    async def _supervise(self) -> SupervisorEscalation | None:
        assert self._events_recv is not None and self._lock is not None
        receive = self._events_recv.receive
        lock = self._lock
        while True:
            event = await receive()
            async with lock:
                if event is _STOP:
                    self._accepting = False
                    self.status = "stopping"
                    await self._stop_all()
                    return None
                child, incarnation, error = event
                if child.removed or child.stopping or child.incarnation != incarnation:
                    continue  # an exit we already dealt with by stopping or restarting it
                escalation = await self._on_exit(child, error)
                if escalation is not None:
                    self._accepting = False
                    self.status = "stopping"
                    await self._stop_all()
                    return escalation

    # -- one child -----------------------------------------------------------

    async def _child_main(self, child: _Child, incarnation: int, *, task_status: trio.TaskStatus[Any]) -> None:
        """Run one incarnation of a child and report how it ended.

        Runs in the supervisor's nursery. An exception before ``started`` goes to
        whoever is awaiting the start; after it, it is reported as a crash.
        Nothing is reported when the supervisor itself stopped the child.
        """
        hook = _StartHook(task_status)
        done = child.done
        assert done is not None
        error: Exception | None = None
        try:
            with trio.CancelScope() as scope:
                child.scope = scope
                try:
                    await child.spec.start(task_status=hook)
                except Exception as exc:
                    if not hook.called:
                        raise
                    error = exc
        finally:
            done.set()
        if child.stopping or child.incarnation != incarnation:
            if error is not None:
                log.warning("supervisor %r: child %r failed while stopping", self.name, child.spec.id, exc_info=error)
                child.last_error = error
            return
        # Say at once that it is gone, so which_children() never reports a dead child as running.
        child.value = None
        child.status = "restarting" if _will_restart(child.spec.restart, error) else "stopped"
        if error is not None:
            child.last_error = error
        assert self._events_send is not None
        self._events_send.send_nowait((child, incarnation, error))

    async def _start(self, child: _Child) -> Any:
        """Start one incarnation; returns its started value, raises its start failure."""
        assert self._nursery is not None
        child.incarnation += 1
        child.stopping = False
        child.done = trio.Event()
        value = await self._nursery.start(self._child_main, child, child.incarnation, name=f"{self.name}/{child.spec.id}")
        if child.done.is_set():
            # It already exited; its exit report is queued and sets the status.
            return value
        child.value = value
        child.status = "running"
        return value

    async def _stop(self, child: _Child) -> None:
        """Stop a child by the graceful protocol: ``request_stop()``, wait its grace, cancel.

        Returns once the child's task has finished. No exit is reported for it.
        """
        child.stopping = True
        done = child.done
        if done is not None and not done.is_set():
            grace = child.spec.shutdown
            request_stop = getattr(child.value, "request_stop", None) if grace > 0 else None
            if request_stop is not None:
                try:
                    request_stop()
                except Exception:
                    log.warning("supervisor %r: request_stop() of child %r failed", self.name, child.spec.id, exc_info=True)
                else:
                    with trio.move_on_after(grace):
                        await done.wait()
            if not done.is_set():
                assert child.scope is not None
                child.scope.cancel()
                await done.wait()
        child.status = "stopped"
        child.value = None

    async def _stop_all(self) -> None:
        for child in reversed(list(self._children)):
            await self._stop(child)

    def _remove(self, child: _Child) -> None:
        child.removed = True
        self._children.remove(child)
        del self._by_id[child.spec.id]

    # -- restarts --------------------------------------------------------------

    async def _on_exit(self, child: _Child, error: Exception | None) -> SupervisorEscalation | None:
        restart = child.spec.restart
        if error is not None:
            log.warning("supervisor %r: child %r crashed", self.name, child.spec.id, exc_info=error)
        if not _will_restart(restart, error):
            child.status = "stopped"
            if restart == "temporary":
                self._remove(child)
            return None
        return await self._restart(child)

    def _note_restart(self) -> bool:
        """Record a restart now; ``False`` if that makes more than ``intensity`` within ``period``."""
        now = trio.current_time()
        history = self._history
        history.append(now)
        threshold = now - self.period
        while history[0] < threshold:
            history.popleft()
        return len(history) <= self.intensity

    async def _restart(self, child: _Child) -> SupervisorEscalation | None:
        """Restart ``child`` (and its group, by strategy) until it works or the intensity runs out.

        A restart whose start fails counts as another restart, of the child that
        failed to start (Erlang's ``try_again_restart``).
        """
        while True:
            if not self._note_restart():
                log.error(
                    "supervisor %r: more than %d restarts in %g s, giving up (child %r)",
                    self.name, self.intensity, self.period, child.spec.id,
                )
                return SupervisorEscalation(
                    self.name, child.last_error, child_id=child.spec.id, intensity=self.intensity, period=self.period
                )
            self.restarts += 1
            child.status = "restarting"
            if self.strategy == "one_for_one":
                group = [child]
            elif self.strategy == "one_for_all":
                group = list(self._children)
            else:
                group = self._children[self._children.index(child):]
            for other in reversed(group):
                if other is child:
                    continue
                await self._stop(other)
                if other.spec.restart == "temporary":
                    self._remove(other)  # temporary children are never restarted, not even with their siblings
                else:
                    other.status = "restarting"
            failed: _Child | None = None
            for member in group:
                if member.removed:
                    continue
                member.restarts += 1
                if self.on_restart is not None:
                    try:
                        self.on_restart(self.name, member.spec.id, member.restarts, member.last_error)
                    except Exception:
                        log.exception("supervisor %r: on_restart hook failed", self.name)
                try:
                    await self._start(member)
                except Exception as exc:
                    log.warning("supervisor %r: restarting child %r failed", self.name, member.spec.id, exc_info=exc)
                    member.last_error = exc
                    member.status = "restarting"
                    failed = member
                    break
            if failed is None:
                return None
            child = failed

    # -- dynamic children and queries -------------------------------------------

    async def start_child(self, spec: ChildSpec) -> Any:
        """Add ``spec`` after the existing children and start it; returns its started value.

        Raises ``ValueError`` if a child with this id exists, ``RuntimeError``
        if the supervisor is not running or is stopping, and the child's own
        exception if its start fails (the spec is then not kept).
        """
        if not self._accepting:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        assert self._lock is not None
        async with self._lock:
            if not self._accepting:
                raise RuntimeError(f"supervisor {self.name!r} is not running")
            if spec.id in self._by_id:
                raise ValueError(f"supervisor {self.name!r} already has a child {spec.id!r}")
            child = _Child(spec)
            self._children.append(child)
            self._by_id[spec.id] = child
            try:
                return await self._start(child)
            except BaseException:
                self._remove(child)
                raise

    async def terminate_child(self, id: str) -> None:
        """Stop child ``id`` gracefully (request_stop, its grace, then cancel) and forget its spec.

        Raises ``KeyError`` if there is no such child.
        """
        child = self._by_id.get(id)
        if child is None or self._lock is None:
            raise KeyError(id)
        async with self._lock:
            child = self._by_id.get(id)
            if child is None:
                raise KeyError(id)
            await self._stop(child)
            self._remove(child)

    def which_children(self) -> list[ChildInfo]:
        """The children in start order, as the supervisor sees them right now."""
        return [child.info() for child in self._children]

    def snapshot(self) -> SupervisorSnapshot:
        threshold = trio.current_time() - self.period if self._running else math.inf
        return SupervisorSnapshot(
            strategy=self.strategy,
            intensity=self.intensity,
            period=self.period,
            restarts=self.restarts,
            recent_restarts=sum(1 for t in self._history if t >= threshold),
            children=len(self._children),
        )

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r} {self.strategy} {self.status}>"
