"""A daemon thread that drains a deque: what the access log's writer and the trace exporter share.

Producers (request tasks) append to :attr:`DrainThread.pending` without a lock (deque ``append`` and
``popleft`` are atomic) and never wake the thread, except to hand over a full batch (``wake.set()``): it
wakes on its own every ``interval`` seconds and passes what waits to ``drain`` (in lists of at most
``batch`` items). :meth:`sync` blocks until everything appended before it is drained; :meth:`stop` lets the
thread drain what is left, call ``finish`` and end.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

__all__ = ["DrainThread"]


class DrainThread:
    __slots__ = ("pending", "wake", "_markers", "_stopping", "_thread", "_interval", "_drain", "_finish", "_batch")

    def __init__(self, name: str, interval: float, drain: Callable[[list], None],
                 finish: Callable[[], None] | None = None, batch: int | None = None) -> None:
        self.pending: deque = deque()
        self.wake = threading.Event()
        self._markers: deque[threading.Event] = deque()
        self._stopping = False
        self._interval = interval
        self._drain = drain
        self._finish = finish
        self._batch = batch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait (blocking) until every item appended so far is drained; False if ``timeout`` passed first."""
        done = threading.Event()
        self._markers.append(done)
        self.wake.set()
        return done.wait(timeout)

    def stop(self) -> None:
        """Drain what is left and end the thread (does not wait for it)."""
        self._stopping = True
        self.wake.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait (blocking) until the thread has ended."""
        self._thread.join(timeout)

    def _run(self) -> None:
        pending, markers, wake, batch = self.pending, self._markers, self.wake, self._batch
        while True:
            wake.wait(self._interval)
            wake.clear()
            stopping = self._stopping
            done = [markers.popleft() for _ in range(len(markers))]
            while pending:
                n = len(pending) if batch is None else min(len(pending), batch)
                self._drain([pending.popleft() for _ in range(n)])
            for marker in done:
                marker.set()
            if stopping:
                break
        if self._finish is not None:
            self._finish()
