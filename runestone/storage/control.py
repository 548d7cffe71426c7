"""The control plane's persisted state in Postgres: one document (the bytes the control store would write to
``control.json``) in the ``control_state`` table, replaced whole in one statement, so a reader sees the old
document or the new one, never a mix. Every instance on the same database reads it at start; a save is the
last writer's (the fleet keeps the instances' states equal through Redis, ``[cluster] redis_url``).
"""

from __future__ import annotations

from .postgres import Session, failure_types, redact

__all__ = ["ControlDocument"]


class ControlDocument:
    """Read and replace the document; blocking (``read`` at start, ``write`` on a worker thread)."""

    def __init__(self, url: str) -> None:
        self.where = redact(url) + " (table control_state)"
        #: What a read or write raises when the database fails.
        self.failures = failure_types()
        self._session = Session(url, "runestone-control")

    def read(self) -> bytes | None:
        """The document, or None when none was ever saved."""
        row = self._session.run(lambda conn: conn.execute("SELECT doc FROM control_state WHERE id = 1").fetchone())
        return None if row is None else bytes(row[0])

    def write(self, data: bytes) -> None:
        self._session.run(lambda conn: conn.execute(
            "INSERT INTO control_state (id, doc, saved_at) VALUES (1, %s, now())"
            " ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, saved_at = EXCLUDED.saved_at", (data,)))

    def close(self) -> None:
        self._session.close()
