"""The control plane's persisted state in Postgres: one document (the bytes the control store would write to
``control.json``) in the ``control_state`` table, replaced whole in one statement, so a reader sees the old
document or the new one, never a mix. Every instance on the same database reads it at start; a save is the
last writer's (the fleet keeps the instances' states equal through Redis, ``[cluster] redis_url``). A merge
(:meth:`ControlDocument.merge`) reads, changes and replaces it in one transaction holding the row, for the
changes an instance made while the database could not answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        return None if row is None or not bytes(row[0]) else bytes(row[0])

    def write(self, data: bytes) -> None:
        self._session.run(lambda conn: conn.execute(
            "INSERT INTO control_state (id, doc, saved_at) VALUES (1, %s, now())"
            " ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, saved_at = EXCLUDED.saved_at", (data,)))

    def merge(self, origin: str, seqs: list[int], change: Callable[[bytes | None, list[int]], bytes]) -> bytes:
        """In one transaction holding the document's row: ``change(document, seqs not yet applied)`` replaces
        it, and those ``(origin, seq)`` are recorded in ``outbox_applied``; returns the document then held.
        Nothing is written when every seq was applied already (a merge whose commit answer was lost)."""

        def run(conn: Any) -> bytes:
            with conn.transaction():
                conn.execute("INSERT INTO control_state (id, doc) VALUES (1, %s) ON CONFLICT (id) DO NOTHING",
                             (b"",))  # a row to lock, when none was ever saved (b"" reads as none)
                (doc,) = conn.execute("SELECT doc FROM control_state WHERE id = 1 FOR UPDATE").fetchone()
                doc = bytes(doc) or None
                done = {s for (s,) in conn.execute("SELECT seq FROM outbox_applied WHERE origin = %s", (origin,))}
                todo = [s for s in seqs if s not in done]
                if not todo:
                    if doc is None:
                        conn.execute("DELETE FROM control_state WHERE id = 1 AND doc = ''::bytea")
                    return doc
                data = change(doc, todo)
                conn.execute("UPDATE control_state SET doc = %s, saved_at = now() WHERE id = 1", (data,))
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO outbox_applied (origin, seq) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                    [(origin, s) for s in todo])
                return data

        return self._session.run(run)

    def close(self) -> None:
        self._session.close()
