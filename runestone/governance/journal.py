"""The budget journal: reservations and settlements on disk the instant they happen, so a SIGKILL loses none.

Spend reaches the key store in batches (every ``[budgets] flush_ms``); between two batches, what changed
lives in this journal, segments ``budget-journal.<n>`` in the data directory, one line per event:

- ``R<seq> <nano> <wall> <key id> <team or ->``: a reservation, written before the request is dispatched;
- ``S<seq> <nano>``: its settlement to the real cost (a request with no answer, or 0 cost, writes none);
- ``C...``: a reservation carried over into a new segment, still open (its request is counted already);
- ``Q<wall> <key id> <team or ->``: a cached answer (it reserves nothing but counts as a request).

Each line is one ``os.write`` to a file opened with ``O_APPEND``, straight from the request's task. That is
a copy into the kernel's page cache (about 1 µs here, measured), never a wait on the disk, and once it
returns the line survives the death of the process: a SIGKILL cannot tear or lose it (a power cut can
lose what the kernel had not written back, as for the ledger's SQLite WAL at ``synchronous=NORMAL``).
A batch on a worker thread would cost a thread hand-off and a wake-up per request, more CPU than the
write itself, and the request would have to wait for it anyway.

Checkpoints: each flush starts a new segment (carrying the open reservations over), writes the spend
with "the journal from segment n on" in one store transaction, then deletes the older segments. A crash
anywhere in between replays exactly the segments the stored spend does not include. At start,
:meth:`SpendJournal.replay` reads them: a settled reservation is charged, one without a settlement was in
flight when the process died and is *released* (its client got no complete answer, and the ledger has
no row for it), and the caller checkpoints the result before serving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs

__all__ = ["Replayed", "SpendJournal"]

log = logging.getLogger("runestone.governance")

PREFIX = "budget-journal."


@attrs.define
class Replayed:
    """What the segments after the last checkpoint held."""

    #: (scope, name) -> [(wall of its reservation, nano spent)], for the settled reservations.
    spent: dict = attrs.Factory(dict)
    #: (scope, name) -> [wall], one per request newly counted (reservations and cached answers).
    requests: dict = attrs.Factory(dict)
    settled: int = 0
    settled_nano: int = 0
    #: Reservations with no settlement: in flight at the stop, given back.
    released: int = 0
    released_nano: int = 0
    #: Lines that could not be read (a torn last line after a power cut).
    malformed: int = 0
    #: The highest sequence number seen (a new process numbers on from it).
    last_seq: int = 0
    segments: int = 0


def _holders(key_id: bytes, team: bytes) -> list[tuple[str, str]]:
    out = [("key", key_id.decode())]
    if team != b"-":
        out.append(("team", team.decode()))
    return out


class SpendJournal:
    """Appends a budget's events to the current segment; checkpoints and replays (see the module)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        #: The current segment's number.
        self.gen = 0
        self._fd = -1
        #: Lines written to the current segment since it was started.
        self.pending = 0
        self.writes = 0
        self.failures = 0
        self._seq = 0

    # -- the hot path ---------------------------------------------------------------------------------

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def write(self, line: bytes) -> None:
        """Append one line (one ``os.write``). A failure (disk full) is counted and logged, never raised:
        the request goes on, its reservation held in memory only."""
        try:
            if self._fd < 0:
                self._open_segment()
            n = os.write(self._fd, line)
            while n < len(line):  # a regular file writes short only when it is out of space
                line = line[n:]
                n = os.write(self._fd, line)
        except OSError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.error("budget journal write failed (%d so far; spend since the last flush may be lost "
                          "if the process dies now): %s", self.failures, exc)
            return
        self.writes += 1
        self.pending += 1

    # -- segments -------------------------------------------------------------------------------------

    def _path(self, gen: int) -> Path:
        return self.dir / f"{PREFIX}{gen}"

    def _segments(self) -> list[int]:
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                out.append(int(name[len(PREFIX):]))
        return sorted(out)

    def _open_segment(self) -> None:
        # Opened at its first line: a gateway whose managed keys make no requests writes no file.
        os.makedirs(self.dir, exist_ok=True)
        self._fd = os.open(self._path(self.gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def start(self, gen: int) -> None:
        """Write to segment ``gen`` from now on."""
        self.close()
        self.gen, self.pending = gen, 0

    def rotate(self, carried: list[bytes]) -> int:
        """Start the next segment with the open reservations (``R`` lines, rewritten as ``C``); its number.

        The stored spend checkpointed with this number covers every event of the segments before it."""
        self.start(self.gen + 1)
        for line in carried:
            self.write(b"C" + line[1:])
        self.pending = 0
        return self.gen

    def drop_before(self, gen: int) -> None:
        """Delete the segments the stored spend now covers (blocking: on a worker thread)."""
        for g in self._segments():
            if g < gen:
                try:
                    os.unlink(self._path(g))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- recovery -------------------------------------------------------------------------------------

    def replay(self, floor: int) -> Replayed:
        """Read segments ``floor`` and up (blocking: once, at start, before anything is written)."""
        out = Replayed()
        open_: dict[int, tuple[int, float, list]] = {}
        done: set[int] = set()
        gens = [g for g in self._segments() if g >= floor]
        out.segments = len(gens)
        for g in gens:
            try:
                data = self._path(g).read_bytes()
            except FileNotFoundError:
                continue
            for line in data.split(b"\n"):
                if not line:
                    continue
                try:
                    kind, rest = line[:1], line[1:].split(b" ")
                    if kind in (b"R", b"C"):
                        seq, nano, wall = int(rest[0]), int(rest[1]), float(rest[2])
                        holders = _holders(rest[3], rest[4])
                        if seq > out.last_seq:
                            out.last_seq = seq
                        if seq in open_ or seq in done:
                            continue  # carried over: seen already
                        open_[seq] = (nano, wall, holders)
                        if kind == b"R":
                            for h in holders:
                                out.requests.setdefault(h, []).append(wall)
                    elif kind == b"S":
                        seq, nano = int(rest[0]), int(rest[1])
                        item = open_.pop(seq, None)
                        if item is None:
                            continue
                        done.add(seq)
                        out.settled += 1
                        out.settled_nano += nano
                        for h in item[2]:
                            out.spent.setdefault(h, []).append((item[1], nano))
                    elif kind == b"Q":
                        wall = float(rest[0])
                        for h in _holders(rest[1], rest[2]):
                            out.requests.setdefault(h, []).append(wall)
                    else:
                        raise ValueError(kind)
                except (ValueError, IndexError, UnicodeDecodeError):
                    out.malformed += 1
        out.released = len(open_)
        out.released_nano = sum(item[0] for item in open_.values())
        self._seq = out.last_seq
        self.gen = max(gens[-1] if gens else 0, floor)
        return out
