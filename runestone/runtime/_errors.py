"""Errors raised by the actor runtime.

Callers catch the base class when they only care that an actor could not serve
them; the leaves say why::

    ActorError
    ├── ActorDead              the actor is not running, or stopped/crashed while a call was pending
    ├── CallTimeout            call() got no reply in time; the actor keeps running
    ├── MailboxFull            cast() found the bounded mailbox full
    └── Shutdown               a child stopped on purpose (OTP's exit reason ``shutdown``)
        └── SupervisorEscalation   a supervisor exceeded its restart intensity and gave up
"""

from __future__ import annotations


class ActorError(Exception):
    """Base class of every error the runtime raises on its own behalf."""


class ActorDead(ActorError):
    """The addressed actor is not running, or it stopped or crashed before replying.

    ``reason`` is the exception that ended the actor (``None`` after a graceful
    stop or when no actor was there at all); it is also the ``__cause__`` when
    the actor crashed, so tracebacks show the handler's failure.
    """

    def __init__(self, name: str, reason: BaseException | None = None, message: str | None = None) -> None:
        self.name = name
        self.reason = reason
        if message is None:
            if reason is None:
                message = f"actor {name!r} is not running"
            else:
                message = f"actor {name!r} crashed: {type(reason).__name__}: {reason}"
        super().__init__(message)
        if reason is not None:
            self.__cause__ = reason


class CallTimeout(ActorError):
    """A call got no reply within its timeout. The request may still be served later;
    its reply is then discarded."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(f"call to actor {name!r} got no reply within {timeout:g} s")


class MailboxFull(ActorError):
    """A cast found the actor's bounded mailbox full; the message was not delivered."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        super().__init__(f"mailbox of actor {name!r} is full ({capacity} messages)")


class Shutdown(ActorError):
    """A child ends with this to say it stopped on purpose, not by a fault: OTP's exit
    reason ``shutdown`` (or ``{shutdown, Term}``; ``reason`` is the term).

    Its supervisor restarts it only if it is ``permanent``: a ``transient`` child
    that exits with ``Shutdown`` is not restarted, just as after a normal return,
    and it is not logged as a crash.
    """

    def __init__(self, message: str = "shutdown", reason: object = None) -> None:
        self.reason = reason
        super().__init__(message)


class SupervisorEscalation(Shutdown):
    """A supervisor saw more restarts than its intensity allows within its period.

    It has already stopped all its children (in reverse start order) when this is
    raised out of ``Supervisor.run``. As in OTP, where such a supervisor exits with
    reason ``shutdown``, it is a :class:`Shutdown`: a ``permanent`` parent restarts
    it (counting that against its own intensity), a ``transient`` one does not.
    ``last_error`` is the child failure that tipped it over (also the ``__cause__``).
    """

    def __init__(
        self,
        name: str,
        last_error: BaseException | None,
        *,
        child_id: str | None = None,
        intensity: int | None = None,
        period: float | None = None,
    ) -> None:
        self.name = name
        self.last_error = last_error
        self.child_id = child_id
        message = f"supervisor {name!r} gave up"
        if child_id is not None:
            message += f" restarting child {child_id!r}"
        if intensity is not None and period is not None:
            message += f": more than {intensity} restarts in {period:g} s"
        if last_error is not None:
            message += f"; last error: {type(last_error).__name__}: {last_error}"
        super().__init__(message, "reached_max_restart_intensity")
        self.__cause__ = last_error
