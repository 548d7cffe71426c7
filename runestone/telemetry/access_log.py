"""The access log: one JSON line per client request, written off the event loop.

A line is built from the request's :class:`~runestone.telemetry.events.RequestFinished` (or, for an answer
from the response cache, from what the front door's response says) on the request's task: the fields are
picked one by one, so nothing but the listed fields can reach the file, never a key, a prompt or a
completion. The key appears only as its key id (a digest prefix). Encoding is one ``orjson.dumps``; the
line then waits in memory for a writer thread that writes what waits a few times a second, so a slow disk or
a blocked pipe never holds up a request (at most ``max_pending`` lines wait; past that they are counted as
lost).

Fields: ``time`` (ISO 8601, UTC, milliseconds), ``request_id``, ``key_id``, ``team`` (None until keys have
teams), ``route`` (the HTTP path; the WebSocket's for its requests), ``endpoint``, ``model_asked``,
``model_served`` (None when no answer came), ``provider`` (who answered, else the last one tried),
``attempts``, ``retries``, ``failovers``, ``status`` (the HTTP status), ``outcome`` ("ok" or "error"),
``error_type``, ``stream``, ``latency_ms``, ``ttft_ms``, ``tokens_in``, ``tokens_out``, ``cost_usd``,
``cache_hit``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from datetime import datetime, timezone

import orjson

from ._drain import DrainThread
from .events import RequestFinished

__all__ = ["AccessLog", "access_record", "iso_time"]

log = logging.getLogger(__name__)

_UTC = timezone.utc
#: Seconds a line waits at most before the writer thread writes it, and lines that make it write at once.
FLUSH_INTERVAL = 0.2
FLUSH_LINES = 1000


def iso_time(ts: float) -> str:
    """``ts`` (``time.time()``) as ISO 8601 in UTC with milliseconds: ``2026-12-01T23:40:00.123Z``."""
    return datetime.fromtimestamp(ts, _UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def access_record(ev: RequestFinished, route: str | None, provider: str | None) -> dict:
    """The line of one finished request (``provider``: who answered, else the last provider tried)."""
    ok = ev.status == "ok"
    return {
        "time": iso_time(ev.wall_time),
        "request_id": ev.request_id,
        "key_id": ev.key_id,
        "team": None,
        "route": route or ev.endpoint,
        "endpoint": ev.endpoint,
        "model_asked": ev.model_asked or ev.model,
        "model_served": ev.model if ok else None,
        "provider": ev.provider or provider or None,
        "attempts": ev.attempts,
        "retries": ev.retries,
        "failovers": ev.failovers,
        "status": ev.http_status,
        "outcome": ev.status,
        "error_type": ev.error_type,
        "stream": ev.stream,
        "latency_ms": _ms(ev.latency),
        "ttft_ms": _ms(ev.ttft),
        "tokens_in": ev.tokens_in,
        "tokens_out": ev.tokens_out,
        "cost_usd": ev.cost,
        "cache_hit": ev.provider == "cache",  # the response cache records its hits as provider "cache"
    }


class AccessLog:
    """Appends JSON lines to ``path`` (standard output when empty) from a writer thread.

    :meth:`write` is synchronous, O(1) and never raises: it appends the encoded line to a deque, and the
    writer thread takes what waits every ``FLUSH_INTERVAL`` (sooner when ``FLUSH_LINES`` wait), so a request
    never wakes a thread (waking one per request cost more than the line). :meth:`close` lets the thread write
    what waits and stop (it does not wait for it). ``lines`` counts lines taken, ``lost`` those dropped because
    ``max_pending`` were already waiting or the file could not be written.
    """

    def __init__(self, path: str = "", *, max_pending: int = 100_000) -> None:
        self.path = path
        self.max_pending = max_pending
        self.lines = 0
        self.lost = 0
        self._file = open(path, "ab") if path else None  # opened now: a bad path fails at start, not later
        self._writer = DrainThread("runestone-access-log", FLUSH_INTERVAL, self._write_lines, self._close_file)
        self._pending: deque[bytes] = self._writer.pending
        self._wake = self._writer.wake

    def write(self, record: dict) -> None:
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.lost += 1
            return
        try:
            pending.append(orjson.dumps(record, default=str))
        except Exception:
            self.lost += 1
            return
        self.lines += 1
        if len(pending) == FLUSH_LINES:
            self._wake.set()

    def close(self) -> None:
        self._writer.stop()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait (blocking) until every line written so far is in the file; False if ``timeout`` passed first."""
        return self._writer.sync(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait (blocking: from a thread, or in tests) until the writer thread has stopped."""
        self._writer.join(timeout)

    def _out(self):
        return self._file if self._file is not None else sys.stdout.buffer

    def _write_lines(self, lines: list[bytes]) -> None:
        try:
            out = self._out()
            out.write(b"\n".join(lines) + b"\n")
            out.flush()
        except Exception as exc:
            self.lost += len(lines)
            log.error("access log: %d lines not written: %s: %s", len(lines), type(exc).__name__, exc)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass

    def snapshot(self) -> dict:
        return {"path": self.path or "<stdout>", "lines": self.lines, "lost": self.lost,
                "pending": len(self._pending), "pid": os.getpid()}
