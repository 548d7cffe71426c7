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

The rules of OTP's ``supervisor.erl`` that hold here, each with its test in
``tests/runtime/test_supervisor.py`` (and the property test's model):

- Defaults: ``one_for_one``, ``intensity`` 1 within a ``period`` of 5 s.
- Intensity (``add_restart``): each restart is timestamped; stamps older than
  ``now - period`` are dropped (one exactly ``period`` old still counts), and
  when more than ``intensity`` remain the supervisor gives up *instead of*
  restarting.
- A restart whose start fails is retried (``try_again_restart``), each try
  counting as a restart; the retry is queued behind the events already waiting
  (OTP casts it to itself), so a ``request_stop``, another child's exit or a
  ``terminate_child``/``start_child`` waiting for the lock goes first. A child
  no longer ``restarting`` by then (terminated meanwhile, or restarted with its
  group) is not retried. In a group restart, the children after the one that
  failed to start are left ``stopped`` until the retry starts them.
- ``one_for_all``/``rest_for_one`` stop the rest of the group in reverse start
  order and start it in start order; ``temporary`` siblings are stopped and
  forgotten, never restarted, and stopped ``transient`` ones are started again.
- ``terminate_child`` stops a child and keeps its spec (``temporary`` children
  excepted: their spec goes), so ``restart_child`` can start it again and a
  group restart starts it too; ``delete_child`` forgets the spec of a stopped
  child only.
- Exit reasons: returning is ``normal``; raising :class:`Shutdown` is
  ``shutdown``/``{shutdown, Term}``; any other exception is abnormal. A
  ``transient`` child is restarted only after an abnormal exit.
- Giving up: the supervisor stops every child, then exits with reason
  ``shutdown`` (OTP's documented behaviour): here it raises
  :class:`SupervisorEscalation`, a :class:`Shutdown`, so a ``permanent``
  parent restarts it and a ``transient`` parent does not.
- Shutdown: children stop in reverse start order, each asked first
  (``request_stop()``, the ``exit(Child, shutdown)``) and cancelled (the
  ``kill``) when its ``shutdown`` grace runs out; ``0`` cancels at once
  (``brutal_kill``), ``math.inf`` waits (``infinity``).

Differences, and why:

- Exceptions instead of ``{error, Reason}`` replies: ``start_child`` raises
  ``ValueError`` for an id in use (``already_present``/``already_started``);
  ``terminate_child``/``delete_child``/``restart_child`` raise ``KeyError``
  for ``not_found`` and ``RuntimeError`` for ``running``/``restarting`` (or a
  supervisor not running); a failed start raises the child's own exception.
  Python callers handle failures with ``except``, not by matching replies.
- The supervisor's API is async methods on the object, serialised by its
  lock, not messages to a process: a stop request (:meth:`request_stop`) is
  the one "message" queued with the exits and retries, and it returns at once.
- A failed *initial* start makes ``run()`` raise the child's exception (with a
  note naming it), after stopping the children already started; OTP returns
  ``{error, {shutdown, Reason}}``. The caller of ``run()`` is the code that
  can report it, and a supervisor parent treats it as its own start failure,
  as OTP does.
- ``period`` may be any positive number of seconds (OTP: a positive integer).
- Not implemented, as nothing here needs them: ``simple_one_for_one``,
  ``auto_shutdown``/``significant`` children, a start returning ``ignore``,
  ``count_children``, ``get_childspec`` and code change. A child's
  ``which_children()`` row says ``stopped`` where OTP says ``undefined``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs
import trio

from ._errors import Shutdown, SupervisorEscalation
from ._registry import Registry, default_registry
from ._spec import ChildInfo, ChildSpec

log = logging.getLogger("runestone.runtime")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")

_STOP = object()
"""The stop request's event: queued with the exits and retries, handled in order."""


@attrs.frozen(eq=False)
class _Exited:
    """Event: one incarnation of a child ended by itself (not stopped by the supervisor)."""

    child: _Child
    incarnation: int
    error: Exception | None


@attrs.frozen(eq=False)
class _TryAgain:
    """Event: retry the restart of a child whose restart failed to start it (OTP's ``try_again_restart``)."""

    child: _Child
    incarnation: int
    """The incarnation that failed to start: a child started again since is not retried."""


def _abnormal(error: BaseException | None) -> bool:
    """An exit OTP would call abnormal: not a return (``normal``) and not a :class:`Shutdown`."""
    return error is not None and not isinstance(error, Shutdown)


def _will_restart(restart: str, error: BaseException | None) -> bool:
    return restart == "permanent" or (restart == "transient" and _abnormal(error))


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

    ``intensity`` and ``period`` default to OTP's 1 restart in 5 s: a tree that
    should ride out more passes its own values.

    Calling ``start_child``/``terminate_child`` (or the other child calls) from
    inside one of this supervisor's own children while it is being started or
    stopped deadlocks, as it does in Erlang.
    """

    def __init__(
        self,
        name: str,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: str = "one_for_one",
        intensity: int = 1,
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
        stopped in reverse start order. Raises :class:`SupervisorEscalation`, a
        :class:`Shutdown` (after stopping every child), when the intensity is exceeded, and the
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
                child = event.child
                if child.removed or child.stopping or child.incarnation != event.incarnation:
                    continue  # an exit or a failed start already dealt with by stopping or restarting it
                if type(event) is _TryAgain:
                    if child.status != "restarting":
                        continue
                    escalation = await self._restart(child)
                else:
                    escalation = await self._on_exit(child, event.error)
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
        self._events_send.send_nowait(_Exited(child, incarnation, error))

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
        if _abnormal(error) or (error is not None and restart == "permanent"):
            log.warning("supervisor %r: child %r crashed", self.name, child.spec.id, exc_info=error)
        elif error is not None:
            log.info("supervisor %r: child %r shut down: %s", self.name, child.spec.id, error)
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
        """Restart ``child`` (and its group, by strategy) once, if the intensity allows.

        If a member fails to start, it stays ``restarting``, the members after it
        stay ``stopped``, and a retry of its restart is queued behind the events
        already waiting (Erlang's ``try_again_restart``); that retry counts as
        another restart.
        """
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
        group = [member for member in group if not member.removed]
        for i, member in enumerate(group):
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
                for later in group[i + 1:]:
                    later.status = "stopped"
                assert self._events_send is not None
                self._events_send.send_nowait(_TryAgain(member, member.incarnation))
                return None
        return None

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
        """Stop child ``id`` gracefully (request_stop, its grace, then cancel); keep its spec.

        As OTP's ``terminate_child``: the child stays in the list as ``stopped``,
        so :meth:`restart_child` can start it again (and a ``one_for_all`` or
        ``rest_for_one`` restart starts it with its group); :meth:`delete_child`
        forgets it. A ``temporary`` child's spec is forgotten at once. A pending
        retry of its restart is dropped. Terminating a stopped child does
        nothing. Raises ``KeyError`` if there is no such child.
        """
        async with self._child_lock(id) as child:
            await self._stop(child)
            if child.spec.restart == "temporary":
                self._remove(child)

    async def delete_child(self, id: str) -> None:
        """Forget the spec of child ``id``, which must be stopped (OTP's ``delete_child``).

        Raises ``KeyError`` if there is no such child, ``RuntimeError`` if it is
        running or restarting (:meth:`terminate_child` it first).
        """
        async with self._child_lock(id) as child:
            if child.status != "stopped":
                raise RuntimeError(f"child {id!r} of supervisor {self.name!r} is {child.status}; terminate it first")
            self._remove(child)

    async def restart_child(self, id: str) -> Any:
        """Start stopped child ``id`` again from its kept spec (OTP's ``restart_child``); returns its started value.

        Not counted against the intensity: it is a start on request, not a
        restart after an exit. Raises ``KeyError`` if there is no such child,
        ``RuntimeError`` if it is running or restarting or the supervisor is not
        running, and the child's own exception if the start fails (it then
        stays stopped, its spec kept).
        """
        if not self._accepting:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        async with self._child_lock(id) as child:
            if not self._accepting:
                raise RuntimeError(f"supervisor {self.name!r} is not running")
            if child.status != "stopped":
                raise RuntimeError(f"child {id!r} of supervisor {self.name!r} is {child.status}")
            try:
                return await self._start(child)
            except Exception as exc:
                child.last_error = exc
                raise

    @contextlib.asynccontextmanager
    async def _child_lock(self, id: str) -> AsyncIterator[_Child]:
        """Hold the lock and yield child ``id``; ``KeyError`` if there is none."""
        if id not in self._by_id or self._lock is None:
            raise KeyError(id)
        async with self._lock:
            child = self._by_id.get(id)
            if child is None:
                raise KeyError(id)
            yield child

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
