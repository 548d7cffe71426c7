"""Names for running actors: the runtime's counterpart of Erlang's registered names.

A :class:`Registry` maps a name to the address of the incarnation currently
bound to it. An actor binds its name when it starts and unbinds it on the way
out, whatever the way out; a restarted actor binds the same name to its new
address, which is how :class:`~runestone.runtime.NamedRef` callers survive
restarts. One registry per application keeps applications in one process
apart; ``default_registry`` serves programs that only ever run one.
"""

from __future__ import annotations

from typing import Any


class Registry:
    """Name -> address of one running incarnation (an ``ActorRef``, or a ``Supervisor``).

    All operations are synchronous and therefore atomic with respect to other
    trio tasks.
    """

    __slots__ = ("_bound",)

    def __init__(self) -> None:
        self._bound: dict[str, Any] = {}

    def register(self, name: str, ref: Any) -> None:
        """Bind ``name`` to ``ref``.

        Raises ``ValueError`` if the name is bound to another address that is
        still alive; a binding left by a dead incarnation is replaced.
        """
        current = self._bound.get(name)
        if current is not None and current is not ref and getattr(current, "alive", True):
            raise ValueError(f"name {name!r} is already registered to a running actor")
        self._bound[name] = ref

    def unregister(self, name: str, ref: Any = None) -> None:
        """Remove the binding of ``name``; with ``ref``, only if it is still bound to that ref.

        The guard lets an exiting incarnation clean up after itself without
        removing a successor that already took the name.
        """
        if ref is None:
            self._bound.pop(name, None)
        elif self._bound.get(name) is ref:
            del self._bound[name]

    def whereis(self, name: str) -> Any | None:
        """The address bound to ``name``, or ``None``."""
        return self._bound.get(name)

    def names(self) -> list[str]:
        """Bound names, sorted."""
        return sorted(self._bound)

    def __repr__(self) -> str:
        return f"<Registry {len(self._bound)} names>"


default_registry = Registry()
"""The registry actors and supervisors use when none is given."""
