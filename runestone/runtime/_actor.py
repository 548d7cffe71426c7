"""Actors: a trio task that owns its state and serves a mailbox one message at a time.

This is ``gen_server`` on trio. :class:`Actor` is subclassed for behaviour
(``init``, ``handle_call``, ``handle_cast``, ``terminate``, ``snapshot``);
:meth:`Actor.run` is the task. Others reach one incarnation through its
:class:`ActorRef` (``call`` = request/reply with a timeout, ``cast`` =
fire-and-forget, never blocking), or reach whichever incarnation currently holds
a name through a :class:`NamedRef`, which survives restarts. The mailbox is a
bounded trio memory channel; a call parks the caller on a one-shot slot instead
of opening a reply channel, because calls sit on warm paths.

Messages are values of ``@attrs.frozen`` classes, one class per kind of
message, defined beside the actor that handles them and dispatched with
``match`` (never strings or tuples parsed by position). The one policy for a
message an actor does not understand, the same for every actor: a **call** is
answered with ``Rejected("invalid", ...)`` (:meth:`Actor.unknown_call`), a
**cast** is dropped (:meth:`Actor.unknown_cast`); both are counted in
``lifecycle.unknown_messages`` (shown in state dumps) and logged, the first
and then every 1000th, by type name only (a message may carry a secret).
Neither crashes the actor: a bad message from one sender must not take the
state that every other sender relies on down with it. A handler's ``case _:``
hands the message to those two methods, as the default callbacks do.

A hot path that casts to one actor on every request (telemetry events, breaker
outcomes) sends through a :class:`Coalescer`: casts made while its last
:class:`Batch` still waits in the mailbox join it, and the actor handles the
batch's casts in order, one ``handle_cast`` each, in one mailbox trip.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any

import attrs
import outcome
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

from ._errors import ActorDead, CallTimeout, MailboxFull
from ._registry import Registry, default_registry
from ._replies import Rejected
from ._spec import ChildSpec

log = logging.getLogger("runestone.runtime")

_CLOSED = (trio.ClosedResourceError, trio.BrokenResourceError)


# Queued messages an actor takes in a row before it lets the scheduler run others.
_BURST = 64


class Batch(list):
    """Casts gathered into one mailbox message by a :class:`Coalescer`: the actor handles each item with
    ``handle_cast``, in order, as if each had been cast alone. ``open`` while its sender may still add to it:
    the actor closes it when it takes it in hand (or drops it, closed, when it exits)."""

    __slots__ = ("open",)


class Coalescer:
    """Casts from one hot path to one actor, gathered while the last batch still waits in the mailbox: a
    cast is a ``list.append`` then, and the actor takes all of them in one mailbox trip (a trip each cost
    more than most handlers). ``resolve()`` gives the actor's ref (an ActorRef or NamedRef) or None.

    The order of this coalescer's casts is kept (a batch is closed before anything after it is sent). A
    batch holds at most ``limit`` casts, and at most ``max_pending`` casts wait in batches the actor has not
    taken yet (None: as many as ``limit`` times its mailbox's capacity), so memory stays bounded by casts,
    as a mailbox of single casts bounds it. ``try_cast`` is False when the cast finds no room (it is
    dropped, as a full mailbox drops one) or no actor. Casts sent to the actor some other way may overtake
    those in an open batch; only use it for messages whose order relative to other senders' does not matter.
    """

    __slots__ = ("_resolve", "_batch", "limit", "max_pending", "_queued", "_pending")

    def __init__(self, resolve, limit: int = 64, max_pending: int | None = None) -> None:
        self._resolve = resolve
        self._batch: Batch | None = None
        self.limit = limit
        self.max_pending = math.inf if max_pending is None else max_pending
        #: Batches sent and not yet taken (oldest first; taken ones are dropped when counting).
        self._queued: collections.deque[Batch] = collections.deque()
        #: Casts in them.
        self._pending = 0

    def _prune(self) -> int:
        """Forget the batches the actor took (in mailbox order, so from the oldest); the casts still waiting."""
        queued = self._queued
        while queued and not queued[0].open:
            self._pending -= len(queued.popleft())
        return self._pending

    def try_cast(self, message: Any) -> bool:
        batch = self._batch
        if batch is not None and batch.open and len(batch) < self.limit:
            if self._pending >= self.max_pending and self._prune() >= self.max_pending:
                return False
            batch.append(message)
            self._pending += 1
            return True
        if self._prune() >= self.max_pending:
            return False
        batch = Batch((message,))
        batch.open = True
        try:
            ref = self._resolve()
            sent = ref is not None and ref.try_cast(batch)
        except Exception:
            sent = False
        if sent:
            self._batch = batch
            self._queued.append(batch)
            self._pending += 1
        else:
            self._batch = None
        return sent


class _Call:
    """One pending request: the message and the parked caller, answered at most once.

    ``task`` is cleared by whichever comes first, the answer, the timeout or the
    caller being cancelled, so a late answer is dropped, never delivered twice.
    A caller that had to wait for room in the mailbox is ``_UNPARKED`` until it
    parks: an answer arriving before that is kept in ``early``. ``pending`` is
    the timer queue holding the call's deadline, if any.
    """

    __slots__ = ("message", "task", "pending", "early")

    def __init__(self, message: Any, task: Any) -> None:
        self.message = message
        self.task = task
        self.pending: collections.OrderedDict[_Call, float] | None = None
        self.early: outcome.Outcome[Any] | None = None

    def abort(self, _raise_cancel: Any) -> Abort:
        self.task = None
        if self.pending is not None:
            self.pending.pop(self, None)
        return Abort.SUCCEEDED

    def resolve(self, value: Any) -> None:
        if self.task is not None:
            self._finish(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        if self.task is not None:
            self._finish(outcome.Error(error))

    def _finish(self, result: outcome.Outcome[Any]) -> None:
        task = self.task
        self.task = None
        if self.pending is not None:
            self.pending.pop(self, None)
        if task is _UNPARKED:
            self.early = result
        else:
            reschedule(task, result)


_UNPARKED = object()


class _CallTimer:
    """The deadlines of one incarnation's pending calls, enforced by one task.

    A cancel scope per call costs about a third of a call; instead each call
    records its deadline here and one task per actor fails the overdue ones with
    :class:`CallTimeout`. Calls with the same timeout expire in the order they
    were made, so each timeout value keeps an insertion-ordered queue and only
    its head matters; answered calls leave their queue at once, so the task
    wakes about once per timeout period, not once per call. Queues left empty
    by one-off timeout values are swept when they pile up.
    """

    __slots__ = ("name", "queues", "wake_at", "scope", "sweep_at")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[float, collections.OrderedDict[_Call, float]] = {}
        self.wake_at = math.inf
        self.scope: trio.CancelScope | None = None
        self.sweep_at = 8

    def add(self, call: _Call, timeout: float) -> None:
        queues = self.queues
        queue = queues.get(timeout)
        if queue is None:
            if len(queues) >= self.sweep_at:
                self._sweep()
            queue = queues[timeout] = collections.OrderedDict()
        deadline = trio.current_time() + timeout
        queue[call] = deadline
        call.pending = queue
        if deadline < self.wake_at:
            self.wake_at = deadline
            if self.scope is not None:
                self.scope.deadline = deadline

    def _sweep(self) -> None:
        queues = self.queues
        for timeout in [timeout for timeout, queue in queues.items() if not queue]:
            del queues[timeout]
        # Doubling keeps sweeps amortised O(1) even when many queues stay busy.
        self.sweep_at = 2 * len(queues) + 8

    async def run(self) -> None:
        """Fail overdue calls until cancelled (it lives in the actor's nursery)."""
        while True:
            now = trio.current_time()
            wake_at = math.inf
            for timeout, queue in self.queues.items():
                while queue:
                    call = next(iter(queue))
                    deadline = queue[call]
                    if deadline > now:
                        wake_at = min(wake_at, deadline)
                        break
                    del queue[call]
                    call.pending = None
                    call.fail(CallTimeout(self.name, timeout))
            self.wake_at = wake_at
            with trio.CancelScope(deadline=wake_at) as self.scope:
                await trio.sleep_forever()
            self.scope = None


def _dead(name: str, reason: BaseException | None) -> ActorDead:
    if isinstance(reason, Exception):
        return ActorDead(name, reason)
    # Cancellation or a graceful stop: the actor did not fail, it went away.
    return ActorDead(name, None, f"actor {name!r} stopped before replying")


class ActorRef:
    """The address of one incarnation of an actor.

    A new incarnation (after a restart) has a new ref; this one then stays dead
    for good. ``alive`` turns false as soon as the actor stops accepting
    messages (a stop was requested, or it is exiting). ``actor`` gives dumps and
    tests a way to the actor object; other code talks through messages only.
    """

    __slots__ = ("name", "actor", "alive", "mailbox_capacity", "reason", "_send", "_timer")

    def __init__(self, name: str, actor: Actor, send: trio.MemorySendChannel[Any], capacity: int) -> None:
        self.name = name
        self.actor = actor
        self.alive = True
        self.mailbox_capacity = capacity
        self.reason: BaseException | None = None
        """Why this incarnation ended, once it has (``None`` after a graceful stop)."""
        self._send = send
        self._timer = _CallTimer(name)

    @property
    def mailbox_depth(self) -> int:
        """Messages waiting in the mailbox (not counting the one being handled)."""
        return self._send.statistics().current_buffer_used

    async def call(self, message: Any, timeout: float = 5.0) -> Any:
        """Send ``message`` to ``handle_call`` and wait for its return value.

        The timeout covers both getting into a full mailbox and the reply. Raises
        :class:`CallTimeout` when it expires (the actor keeps running; a reply
        that comes later is dropped), :class:`ActorDead` when the actor is not
        running or ends before replying; if the handler raised, the actor has
        crashed and the ``ActorDead`` names (and chains) that error. Cancelling
        the caller abandons the request the same way a timeout does.
        """
        call = _Call(message, current_task())
        try:
            self._send.send_nowait(call)
        except trio.WouldBlock:
            return await self._call_when_room(call, timeout)
        except _CLOSED:
            raise self._not_running() from None
        # No checkpoint between queueing and parking: the actor cannot answer before we park.
        if timeout != math.inf:
            self._timer.add(call, timeout)
        return await wait_task_rescheduled(call.abort)

    async def _call_when_room(self, call: _Call, timeout: float) -> Any:
        # The rare full-mailbox case affords a cancel scope of its own: a call
        # queued late would break the deadline order of the timer's queues.
        call.task = _UNPARKED
        with trio.move_on_after(timeout):
            try:
                await self._send.send(call)
            except _CLOSED:
                raise _dead(self.name, self.reason) from None
            if call.early is not None:  # answered before we got to park
                return call.early.unwrap()
            call.task = current_task()
            return await wait_task_rescheduled(call.abort)
        raise CallTimeout(self.name, timeout)

    def cast(self, message: Any) -> None:
        """Queue ``message`` for ``handle_cast`` without blocking.

        Raises :class:`MailboxFull` if the mailbox is full and :class:`ActorDead`
        if the actor is not running; the message is then not delivered.
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(self.name, self.mailbox_capacity) from None
        except _CLOSED:
            raise self._not_running() from None

    def try_cast(self, message: Any) -> bool:
        """Like :meth:`cast`, but reports failure as ``False`` instead of raising."""
        try:
            self._send.send_nowait(message)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def request_stop(self) -> None:
        """Ask this incarnation to stop gracefully; returns at once.

        The actor finishes the message in hand, fails the calls still queued
        with :class:`ActorDead`, runs ``terminate(None)`` and ``run()`` returns
        normally. New messages are refused from now on. Idempotent; a no-op on
        a dead ref.
        """
        self.actor._request_stop(self)

    def _not_running(self) -> ActorDead:
        if isinstance(self.reason, Exception):
            return ActorDead(self.name, self.reason)
        return ActorDead(self.name)

    def __repr__(self) -> str:
        return f"<ActorRef {self.name!r} {'alive' if self.alive else 'dead'}>"


class NamedRef:
    """A stable address: resolves ``name`` through ``registry`` on every use.

    It reaches whichever incarnation holds the name at that moment, so callers
    keep working across restarts. While nobody holds the name (e.g. during a
    restart) ``call``/``cast`` raise :class:`ActorDead` and ``try_cast`` returns
    ``False``.
    """

    __slots__ = ("registry", "name")

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry = registry
        self.name = name

    def resolve(self) -> ActorRef:
        """The ref currently bound to the name; :class:`ActorDead` if none."""
        ref = self.registry.whereis(self.name)
        if ref is None:
            raise ActorDead(self.name, None, f"no actor is registered as {self.name!r}")
        return ref

    @property
    def alive(self) -> bool:
        ref = self.registry.whereis(self.name)
        return ref is not None and ref.alive

    async def call(self, message: Any, timeout: float = 5.0) -> Any:
        """:meth:`ActorRef.call` on the current incarnation."""
        return await self.resolve().call(message, timeout)

    def cast(self, message: Any) -> None:
        """:meth:`ActorRef.cast` on the current incarnation."""
        self.resolve().cast(message)

    def try_cast(self, message: Any) -> bool:
        """:meth:`ActorRef.try_cast` on the current incarnation; ``False`` when unbound."""
        ref = self.registry.whereis(self.name)
        return ref is not None and ref.try_cast(message)

    def request_stop(self) -> None:
        """:meth:`ActorRef.request_stop` on the current incarnation, if any."""
        ref = self.registry.whereis(self.name)
        if ref is not None:
            ref.request_stop()

    def __repr__(self) -> str:
        return f"<NamedRef {self.name!r}>"


@attrs.define
class ActorLifecycle:
    """Where an actor object is in its life, kept by the runtime for state dumps."""

    status: str = "stopped"
    """``"starting"`` (in ``init``), ``"running"``, ``"stopping"`` or ``"stopped"``."""
    runs: int = 0
    """How many times ``run()`` was entered."""
    restarts: int = 0
    """Runs after the first one: each is a restart of this actor object."""
    last_error: BaseException | None = None
    """The exception that ended the last run that crashed."""
    unknown_messages: int = 0
    """Messages this actor object did not understand, over all its runs: calls rejected, casts dropped."""


def _collapse(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one exception a group from the actor's own nursery stands for, else the group.

    A group of nothing but ``Cancelled`` (the body and the helper tasks all
    cancelled together) stands for one ``Cancelled``; a group of one stands for
    its member.
    """
    if group.split(trio.Cancelled)[1] is None:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        return exc
    exc = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Actor:
    """Base class of actors: subclass it and override the callbacks.

    Lifecycle of one ``run()`` (one incarnation): open a fresh mailbox and
    :class:`ActorRef`, bind the name in the registry, ``await init()``, report
    ``task_status.started(ref)``, then serve messages strictly one at a time in
    arrival order. ``run()`` returns normally after ``request_stop()``; it
    raises the handler's exception when a handler raises (a crash). On every
    way out (stop, crash, cancellation) it refuses new messages, fails the
    pending and queued calls with :class:`ActorDead`, unbinds the name, then
    awaits ``terminate(reason)``.

    A supervisor restarts an actor by calling ``run()`` again on the same
    object (see :meth:`child_spec`), so state that must be fresh for each
    incarnation belongs in ``init()``; ``__init__`` keeps the arguments.

    The runtime uses these attribute names: ``name``, ``registry``,
    ``mailbox_size``, ``ref``, ``nursery``, ``lifecycle``.
    """

    mailbox_size: int = 256

    def __init__(self, name: str, *, registry: Registry | None = None, mailbox_size: int | None = None) -> None:
        self.name = name
        self.registry = default_registry if registry is None else registry
        if mailbox_size is not None:
            self.mailbox_size = mailbox_size
        self.ref: ActorRef | None = None
        self.nursery: trio.Nursery | None = None
        """Open during ``run()``: background tasks of this actor, cancelled when it exits."""
        self.lifecycle = ActorLifecycle()
        self._running = False
        self._stopping = False
        self._in_hand: _Call | None = None

    # -- callbacks -------------------------------------------------------

    async def init(self) -> None:
        """Build the incarnation's state. Runs in the actor task before it is ready;
        messages sent meanwhile wait in the mailbox. Raising here fails the start."""

    async def handle_call(self, message: Any) -> Any:
        """Answer a request; the return value is the reply. Raising crashes the actor.

        The default understands no call: it answers :meth:`unknown_call`'s ``Rejected``.
        """
        return self.unknown_call(message)

    async def handle_cast(self, message: Any) -> None:
        """Handle a fire-and-forget message. Raising crashes the actor.

        The default understands no cast: it drops it through :meth:`unknown_cast`.
        """
        self.unknown_cast(message)

    def unknown_call(self, message: Any) -> Rejected:
        """The reply to a call this actor does not understand (the module docstring's policy)."""
        self._note_unknown("call", message)
        return Rejected("invalid", f"{self.name} does not understand {type(message).__name__} calls")

    def unknown_cast(self, message: Any) -> None:
        """Drop a cast this actor does not understand (the module docstring's policy)."""
        self._note_unknown("cast", message)

    def _note_unknown(self, kind: str, message: Any) -> None:
        lifecycle = self.lifecycle
        lifecycle.unknown_messages += 1
        n = lifecycle.unknown_messages
        if n == 1 or n % 1000 == 0:
            log.warning("actor %r: ignored a %s it does not understand: %s (%d so far)", self.name, kind,
                        type(message).__name__, n)

    async def terminate(self, reason: BaseException | None) -> None:
        """Best-effort cleanup on every exit once ``init()`` has begun (even a failed one).

        ``reason`` is ``None`` after a graceful stop, else the crash or the
        ``Cancelled``. When cancelled, any checkpoint in here raises
        ``Cancelled`` at once, so keep cleanup synchronous where it matters.
        Errors raised here are logged when the actor is already failing, and
        become the crash otherwise.
        """

    def snapshot(self) -> Any:
        """Plain data (or a frozen attrs instance) describing the state, secrets redacted.

        Called synchronously from another task (state dumps), so it reads a
        consistent state: nothing else runs while it does.
        """
        return None

    # -- running -----------------------------------------------------------

    def child_spec(self, id: str | None = None, restart: str = "permanent", shutdown: float = 5.0) -> ChildSpec:
        """A spec that runs this actor object; each restart calls ``run()`` on it again."""
        return ChildSpec(id=self.name if id is None else id, start=self.run, restart=restart, shutdown=shutdown)

    async def run(self, *, task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one incarnation (see the class docstring for the lifecycle).

        Raises ``RuntimeError`` if this object is already running, ``ValueError``
        if the name is held by another running actor. An exception from
        ``init()`` propagates before ``started`` (so ``nursery.start`` raises
        it). A crash of a background task in :attr:`nursery` crashes the actor.
        """
        if self._running:
            raise RuntimeError(f"actor {self.name!r} is already running")
        lifecycle = self.lifecycle
        send, recv = trio.open_memory_channel[Any](self.mailbox_size)
        ref = ActorRef(self.name, self, send, self.mailbox_size)
        try:
            self.registry.register(self.name, ref)
        except BaseException:
            send.close()
            recv.close()
            ref.alive = False
            raise
        self._running = True
        self._stopping = False
        self._in_hand = None
        self.ref = ref
        if lifecycle.runs:
            lifecycle.restarts += 1
        lifecycle.runs += 1
        lifecycle.status = "starting"
        reason: BaseException | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(ref._timer.run, name=f"{self.name}/call-timeouts")
                    await self.init()
                    if not self._stopping:
                        lifecycle.status = "running"
                    task_status.started(ref)
                    reason = await self._serve(recv)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                leaf = _collapse(group)
                if leaf is group:
                    raise
                # One failure inside the actor's nursery is the actor's failure:
                # report it bare, keeping the context it had.
                context = leaf.__context__
                try:
                    raise leaf
                finally:
                    leaf.__context__ = context
                    del leaf, context
        except BaseException as exc:
            reason = exc
            raise
        finally:
            await self._exit(ref, send, recv, reason)
        if reason is not None:
            raise reason

    async def _serve(self, recv: trio.MemoryReceiveChannel[Any]) -> Exception | None:
        """Serve messages until stopped; return the exception of a handler that raised."""
        receive = recv.receive
        receive_nowait = recv.receive_nowait
        burst = 0
        while not self._stopping:
            # Messages already queued are taken without a trip through the scheduler (a full pass costs more
            # than most handlers), up to a burst that bounds how long other tasks wait for this one.
            try:
                if burst >= _BURST:
                    raise trio.WouldBlock
                message = receive_nowait()
                burst += 1
            except trio.WouldBlock:
                burst = 0
                try:
                    message = await receive()
                except trio.EndOfChannel:
                    return None
            except trio.EndOfChannel:
                return None
            # Handlers are looked up per message (not cached) so that an instance may be given another one.
            if type(message) is _Call:
                try:
                    reply = await self.handle_call(message.message)
                except Exception as exc:
                    message.fail(ActorDead(self.name, exc))
                    return exc
                except BaseException:
                    self._in_hand = message
                    raise
                message.resolve(reply)
            else:
                if type(message) is Batch:
                    message.open = False  # what its sender casts from now on goes in a new one, after this
                    casts = message
                else:
                    casts = (message,)
                for cast in casts:
                    try:
                        await self.handle_cast(cast)
                    except Exception as exc:
                        return exc
        return None

    async def _exit(
        self,
        ref: ActorRef,
        send: trio.MemorySendChannel[Any],
        recv: trio.MemoryReceiveChannel[Any],
        reason: BaseException | None,
    ) -> None:
        lifecycle = self.lifecycle
        lifecycle.status = "stopping"
        ref.alive = False
        ref.reason = reason
        send.close()
        name = self.name
        in_hand, self._in_hand = self._in_hand, None
        if in_hand is not None:
            in_hand.fail(_dead(name, reason))
        while True:
            try:
                message = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if type(message) is _Call:
                message.fail(_dead(name, reason))
            elif type(message) is Batch:
                message.open = False  # dropped with the incarnation: its sender starts a new one
        recv.close()
        self.registry.unregister(name, ref)
        if isinstance(reason, Exception):
            lifecycle.last_error = reason
        try:
            await self.terminate(reason)
        except BaseException as exc:
            if reason is None:
                if isinstance(exc, Exception):
                    lifecycle.last_error = exc
                    ref.reason = exc
                raise
            if isinstance(exc, Exception):
                log.warning("actor %r: terminate() failed while exiting", name, exc_info=exc)
        finally:
            self.nursery = None
            self._running = False
            lifecycle.status = "stopped"

    def _request_stop(self, ref: ActorRef) -> None:
        if ref is not self.ref or not ref.alive:
            return
        self._stopping = True
        ref.alive = False
        self.lifecycle.status = "stopping"
        # Closing our only send side wakes an idle receive with EndOfChannel and
        # makes later sends fail, so the stop needs no room in the mailbox.
        ref._send.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.lifecycle.status}>"
