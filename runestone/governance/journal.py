"""The budget journal: each request's spend on disk the instant it ends, so a SIGKILL loses none.

Spend reaches the key store in batches (every ``[budgets] flush_ms``); between two batches, what changed
lives in this journal, segments ``budget-journal.<n>`` in the data directory, one line per event:

- ``E<wall> <key id> <team or -> <nano>``: a request ended, and what it cost (0: no answer, or free),
  written before its answer goes out; the request counts from then on (as its row in the usage ledger
  does). ``<wall>`` need only say which period of each holder the line is in: it is a second of the key's
  and its team's periods when the request was admitted (the latest of their starts: runestone.governance);
- ``Q<wall> <key id> <team or ->``: a cached answer (it costs nothing, and counts as a request).

A reservation is not a line: it lives in memory only, between the admission and the end. If the process
dies meanwhile, its request never ended (no complete answer reached its client, the ledger has no row for
it), so there is nothing to charge and nothing to count: the reservation is simply gone with the process,
which is what giving it back means. (An earlier version wrote a line per reservation too, ``R<seq> <nano>
<wall> <key id> <team or ->``, its settlement ``S<seq> <nano>``, and carried open ones into each new
segment as ``C...``: a replay still reads segments written that way, so an upgrade after a SIGKILL loses
nothing; it charges their settled reservations and releases the others, as that version did.)

Segments are files with their blocks allocated up front (so a full disk is an error at a rotation,
never a SIGBUS), each of a size fixed when it is made: 256 KiB, or more (up to 4 MiB) when the last one
held more than half that; mapped into memory (``mmap``, shared): a line is a copy into the mapping,
straight from the request's task, with no system call. The mapping's pages are the kernel's page cache
of the file, so once the copy is done the line survives the death of the process; a SIGKILL during the
copy leaves a torn last line, which a replay recognises (no newline before the zeros that follow) and
ignores: the answer of the request it was for had not been sent. A power cut can lose what the kernel
had not written back, as for the ledger's SQLite WAL at ``synchronous=NORMAL``. Measured: a copy costs about 0.2 µs, an ``os.write`` about 1 µs on a quiet
core, and the first version, an ``os.write`` per line, cost a managed request about 9 points more CPU than
no journal at all (scripts/bench_keys.py --paired on a busy machine, where a system call costs far more);
a batch on a worker thread would cost a hand-off and a wake-up per request, and the request would have
to wait for it. One line per request instead of two (a reservation's and its settlement's), with no
table of open reservations to keep and the line's fixed part made once per account, brought a managed
key's premium over a static key from +9.8% to +7.2% CPU per request (scripts/bench_keys.py --paired
--static-limits, 2 vCPU Intel Xeon, 2026-12-07).

Checkpoints: each flush starts a new segment, writes the spend with "the journal from segment n on" in
one store transaction, then deletes the older segments. A crash anywhere in between replays exactly the
segments the stored spend does not include: the spend and the request counts a flush stores are those of
the requests ended before its new segment started (a request is charged and counted in the same step as
its line is written), and those of the cached answers. At start, :meth:`SpendJournal.replay` reads them,
and the caller checkpoints the result before serving.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import attrs

__all__ = ["Replayed", "SpendJournal"]

log = logging.getLogger("runestone.governance")

PREFIX = "budget-journal."
#: The largest segment: about 70,000 lines; a busier flush interval goes on in the next segment.
SEGMENT_BYTES = 4 << 20
#: The smallest (and the first) segment. Measured: mapping a fresh segment, touching its first page, and
#: deleting it cost about 2 ms at 4 MiB and 0.2 ms at 256 KiB, once per flush (every second under load).
FIRST_SEGMENT_BYTES = 256 << 10


@attrs.define
class Replayed:
    """What the segments after the last checkpoint held."""

    #: (scope, name) -> [(wall, nano spent)], for the requests that cost something.
    spent: dict = attrs.Factory(dict)
    #: (scope, name) -> [wall], one per request newly counted (ended requests and cached answers).
    requests: dict = attrs.Factory(dict)
    #: Requests ended (``E`` lines; an earlier version's settled reservations), and what they cost.
    ended: int = 0
    charged_nano: int = 0
    #: An earlier version's reservations with no settlement: in flight at the stop, given back.
    released: int = 0
    released_nano: int = 0
    #: Lines that could not be read (a torn last line after a power cut).
    malformed: int = 0
    segments: int = 0


def _holders(key_id: bytes, team: bytes) -> list[tuple[str, str]]:
    out = [("key", key_id.decode())]
    if team != b"-":
        out.append(("team", team.decode()))
    return out


class SpendJournal:
    """Appends a budget's events to the current segment; checkpoints and replays (see the module)."""

    def __init__(self, directory: str | Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        #: The current segment's size, and the next one's (see :meth:`_grow`).
        self._size = 0
        #: What the segment before the current one held when it was left (sizes the next, with ``_off``).
        self._last = 0
        #: The number of the segment made ahead (``prepare``) for the next rotation, -1 if none.
        self.ready = -1
        self.next_bytes = min(FIRST_SEGMENT_BYTES, segment_bytes)
        #: The current segment's number.
        self.gen = 0
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._off = 0
        #: No segment could be made: lines are not written until the next segment is started.
        self._broken = False
        #: Lines written to the current segment since it was started (carried-over ones apart).
        self.pending = 0
        self.writes = 0
        self.failures = 0

    # -- the hot path ---------------------------------------------------------------------------------

    def write(self, line: bytes) -> None:
        """Append one line: a copy into the mapped segment. A failure (no segment: disk full) is counted
        and logged, never raised: the request goes on, its reservation held in memory only."""
        m = self._map
        off = self._off
        end = off + len(line)
        if m is None or end > self._size:
            if not self._next_segment(m is not None):
                return
            m = self._map
            off = self._off
            end = off + len(line)
        m[off:end] = line
        self._off = end
        self.writes += 1
        self.pending += 1

    def _next_segment(self, full: bool) -> bool:
        if self._broken:
            self._failed(None)
            return False
        if full:  # this segment is full: go on in the next one (a replay reads them all, in order)
            self._grow()
            self.close()
            self.gen += 1
        try:
            self._map_segment(self.gen)
        except OSError as exc:
            self._broken = True
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError | None) -> None:
        self.failures += 1
        if exc is not None or self.failures % 1000 == 0:
            log.error("budget journal: no segment to write to (%d line(s) not written so far; spend since the "
                      "last flush is lost if the process dies now): %s", self.failures, exc or "see above")

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

    def _grow(self) -> None:
        """Size the next segment for what the current one holds now: twice that, from
        FIRST_SEGMENT_BYTES up to ``segment_bytes`` (a quiet journal keeps small segments)."""
        size, top, want = FIRST_SEGMENT_BYTES, self.segment_bytes, 2 * max(self._off, self._last)
        while size < want and size < top:
            size <<= 1
        self.next_bytes = min(size, top)

    def prepare(self, gen: int) -> None:
        """Make segment ``gen``'s file with its blocks allocated, sized for what the current segment holds
        (blocking: on a worker thread, ahead of the rotation that maps it). Idempotent; keeps what the
        file holds."""
        self._grow()
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self._path(gen), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._allocate(fd, self.next_bytes)
        finally:
            os.close(fd)
        self.ready = gen

    def _allocate(self, fd: int, size: int) -> int:
        """Blocks for ``size`` bytes at least; the file's size (a segment made before may be larger)."""
        # Blocks allocated up front: a store into a mapped hole on a full disk would be a SIGBUS.
        have = os.fstat(fd).st_size
        if have >= size:
            return have
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # A file system without fallocate: write the zeros.
            have = os.fstat(fd).st_size
            os.pwrite(fd, bytes(size - have), have)
        return size

    def _map_segment(self, gen: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self._path(gen), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = self._allocate(fd, self.next_bytes)
            m = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        end = m.find(b"\0")  # a segment reopened (this task restarted) goes on after its lines
        self._fd, self._map, self._size, self._off = fd, m, size, end if end >= 0 else size

    def start(self, gen: int) -> None:
        """Write to segment ``gen`` from now on (mapped at its first line)."""
        self.close()
        self.gen, self.pending, self._broken = gen, 0, False

    def rotate(self) -> int:
        """Start the next segment; its number. The stored spend checkpointed with this number covers every
        event of the segments before it."""
        self._last = self._off
        self.start(self.gen + 1)
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
        """Unmap the current segment (what it holds is in the kernel's page cache and reaches the file)."""
        m, self._map = self._map, None
        if m is not None:
            m.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- recovery -------------------------------------------------------------------------------------

    def replay(self, floor: int) -> Replayed:
        """Read segments ``floor`` and up (blocking: once, at start, before anything is written)."""
        out = Replayed()
        #: An earlier version's open reservations (see the module), and those settled.
        open_: dict[int, tuple[int, float, list]] = {}
        done: set[int] = set()
        gens = [g for g in self._segments() if g >= floor]
        out.segments = len(gens)
        for g in gens:
            try:
                data = self._path(g).read_bytes()
            except FileNotFoundError:
                continue
            end = data.find(b"\0")
            lines = (data if end < 0 else data[:end]).split(b"\n")
            if lines[-1]:
                out.malformed += 1  # torn: the process died while copying its last line
            for line in lines[:-1]:
                if not line:
                    continue
                try:
                    kind, rest = line[:1], line[1:].split(b" ")
                    if kind == b"E":
                        wall, nano = float(rest[0]), int(rest[3])
                        out.ended += 1
                        out.charged_nano += nano
                        for h in _holders(rest[1], rest[2]):
                            out.requests.setdefault(h, []).append(wall)
                            if nano:
                                out.spent.setdefault(h, []).append((wall, nano))
                    elif kind == b"Q":
                        wall = float(rest[0])
                        for h in _holders(rest[1], rest[2]):
                            out.requests.setdefault(h, []).append(wall)
                    elif kind in (b"R", b"C"):  # an earlier version's reservation (see the module)
                        seq, nano, wall = int(rest[0]), int(rest[1]), float(rest[2])
                        holders = _holders(rest[3], rest[4])
                        if seq in open_ or seq in done:
                            continue  # carried over: seen already
                        open_[seq] = (nano, wall, holders)
                        if kind == b"R":
                            for h in holders:
                                out.requests.setdefault(h, []).append(wall)
                    elif kind == b"S":  # and its settlement
                        seq, nano = int(rest[0]), int(rest[1])
                        item = open_.pop(seq, None)
                        if item is None:
                            continue
                        done.add(seq)
                        out.ended += 1
                        out.charged_nano += nano
                        for h in item[2]:
                            out.spent.setdefault(h, []).append((item[1], nano))
                    else:
                        raise ValueError(kind)
                except (ValueError, IndexError, UnicodeDecodeError):
                    out.malformed += 1
        out.released = len(open_)
        out.released_nano = sum(item[0] for item in open_.values())
        self.gen = max(gens[-1] if gens else 0, floor)
        return out
