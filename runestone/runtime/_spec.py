"""Child specifications and the supervisor's report on each child.

A :class:`ChildSpec` tells a supervisor how to start a child and what to do
when it exits (Erlang's child_spec map: id, start, restart, shutdown, type);
:class:`ChildInfo` is one row of ``Supervisor.which_children()``. Both are
frozen values, safe to hand to any task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

RESTART_TYPES = ("permanent", "transient", "temporary")
CHILD_KINDS = ("worker", "supervisor")


def _check_shutdown(_instance: Any, _attribute: Any, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"shutdown must be >= 0 seconds (0 = cancel at once, math.inf = wait forever), got {value!r}")


@attrs.frozen
class ChildSpec:
    """How a supervisor starts and restarts one child.

    ``start`` is an async callable ``start(*, task_status)``: it calls
    ``task_status.started(value)`` once the child is ready, returns on a normal
    exit and raises on a crash. It is called anew on every restart, so it must
    build fresh state each time. ``value`` is what ``Supervisor.start_child``
    returns and what ``which_children()`` reports.

    Stopping: if ``value`` has a ``request_stop()`` method and ``shutdown > 0``,
    the supervisor calls it and waits up to ``shutdown`` seconds for the child
    to return, then cancels it; otherwise it cancels the child at once.
    ``math.inf`` waits forever (Erlang's ``infinity``, the usual choice for
    supervisors).

    Restart types (Erlang's): ``permanent`` is always restarted, ``transient``
    only after a crash (an exception other than ``Shutdown``), ``temporary``
    never (and is forgotten once it exits).
    """

    id: str
    start: Callable[..., Awaitable[Any]]
    restart: str = attrs.field(default="permanent", validator=attrs.validators.in_(RESTART_TYPES))
    shutdown: float = attrs.field(default=5.0, validator=_check_shutdown)
    kind: str = attrs.field(default="worker", validator=attrs.validators.in_(CHILD_KINDS))


@attrs.frozen
class ChildInfo:
    """One child as its supervisor sees it at the moment of the query."""

    id: str
    """The child's id, unique within its supervisor."""
    kind: str
    """``"worker"`` or ``"supervisor"``."""
    restart: str
    """The restart type: ``"permanent"``, ``"transient"`` or ``"temporary"``."""
    status: str
    """``"running"``; ``"restarting"`` between an exit and a successful restart
    (also while a failed restart waits for another attempt); ``"stopped"`` when
    not running and not due to be restarted (a transient child that exited
    normally or with ``Shutdown``, one stopped by ``terminate_child``, one not
    started yet, or the rest of a group whose restart failed to start a member
    before it: the retry starts them)."""
    value: Any
    """What the current incarnation passed to ``task_status.started()``; ``None`` unless running."""
    restarts: int
    """How many times this supervisor restarted (or tried to restart) this child."""
    last_error: BaseException | None = None
    """The exception of the child's last crash or failed start, if any."""

