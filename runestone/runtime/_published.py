"""Published cells: ETS-style shared snapshots with one writer.

An owner (one actor) computes an immutable snapshot and publishes it; any task
reads the latest one without a message round trip, as readers of an ETS table
with ``read_concurrency`` do while updates go through the owner.
"""

from __future__ import annotations

from typing import Any


class Published:
    """A cell holding the latest immutable snapshot its owner published.

    :meth:`publish` is the only way to change it: assigning ``value`` or
    ``version`` raises ``AttributeError``, so every write is a publish and
    ``version`` moves with every change. Readers load ``value`` once and use
    what they got; a single store is atomic under trio (one thread), so a
    reader never sees half an update. The cell is made by whoever builds the
    tree, so a restarted owner publishes into the same cell its readers
    already hold. ``owner`` names the one writer (for dumps and reprs); the
    runtime does not check who calls ``publish``.
    """

    __slots__ = ("value", "version", "owner")

    value: Any
    version: int
    """Bumped on every publish, so readers can tell cheaply whether anything changed."""
    owner: str | None

    def __init__(self, value: Any = None, *, owner: str | None = None) -> None:
        _set_value(self, value)
        _set_version(self, 0)
        _set_owner(self, owner)

    def publish(self, value: Any) -> None:
        """Replace the snapshot with ``value`` (an immutable object) and bump ``version``."""
        _set_value(self, value)
        _set_version(self, self.version + 1)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} cells change only through publish(); cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} cells change only through publish(); cannot delete {name!r}")

    def __repr__(self) -> str:
        owner = f" owned by {self.owner!r}" if self.owner is not None else ""
        return f"<{type(self).__name__}{owner} version {self.version}>"


# The slots' own setters: the one way past __setattr__, used by __init__ and publish only.
_set_value = Published.value.__set__  # type: ignore[attr-defined]
_set_version = Published.version.__set__  # type: ignore[attr-defined]
_set_owner = Published.owner.__set__  # type: ignore[attr-defined]
