"""The package keeps flake8-async's ASYNC rules: no cancel scope or nursery held across a ``yield``, no blocking
call in an async function, no swallowed ``Cancelled``.

Runs flake8-async's own checker (the same visitors flake8 runs as a plugin, without flake8's other plugins,
which would double the time) over every module of ``runestone/``, in two processes, and fails listing each
violation as ``path:line:col: CODE message``. A line may opt out with ``# noqa: ASYNCnnn`` and a reason.

The rules chosen (``RULES``), and why the others are left out:

- in: ASYNC100 (a cancel scope with nothing to cancel), 101 (``yield`` inside a nursery or cancel scope: the
  scope then covers the consumer's code; a deadline fires in whoever iterates), 119 (``yield`` inside a
  context manager in an async generator: its cleanup may never run), 104 (``Cancelled`` not re-raised),
  105/106 (trio misuse), 110 (a poll loop where an event would do), 111/112/113/121/122/123/125 (nursery
  and ``ExceptionGroup`` misuse), 115/116 (odd sleeps), 120 (a checkpoint in ``except`` that would discard
  the exception if cancelled), the ASYNC2xx family (blocking calls, file and subprocess I/O in async
  functions) and 300 (asyncio tasks).
- out: 102 (an ``await`` in ``finally`` without a shielded scope: what it flags here closes connections and
  responses, which trio closes even when cancelled, or is the actor's and the ledger's exit path, which a
  hard stop is meant to cut), 103 (the actor runtime deliberately keeps a failure's first reason over the
  one ``terminate`` raises), 109 (``timeout=`` parameters are the HTTP client's API, as in httpx), 114/128
  (heuristics that do not follow a ``task_status`` handed on to another function), 124 (handlers are async
  by contract), 127 (advice to change HTTP libraries), and the opt-in ASYNC9xx checkpoint rules.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ("ASYNC100,ASYNC101,ASYNC104,ASYNC105,ASYNC106,ASYNC110,ASYNC111,ASYNC112,ASYNC113,ASYNC115,ASYNC116,"
         "ASYNC119,ASYNC120,ASYNC121,ASYNC122,ASYNC123,ASYNC125,ASYNC2,ASYNC300")
PROCESSES = 2
# Results per file content, so that a rerun checks only the files that changed (the checker parses with
# libcst: ~25 s of CPU for the whole package).
CACHE = Path(tempfile.gettempdir()) / "runestone-async-lint"


def _key(text: bytes) -> str:
    version = importlib.metadata.version("flake8-async")
    return hashlib.sha256(f"{version}\0{RULES}\0".encode() + text).hexdigest()


def _check(files: list[str]) -> dict[str, list[str]]:
    """``{file: ["line:col: CODE message", ...]}`` for each of ``files`` (paths relative to the root)."""
    command = [sys.executable, "-m", "flake8_async", f"--enable={RULES}", "--disable="]
    runs = [subprocess.Popen(command + files[i::PROCESSES], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(min(PROCESSES, len(files)))]
    found: dict[str, list[str]] = {f: [] for f in files}
    for run in runs:
        # Generous: this only trips on a hang.
        out, err = run.communicate(timeout=600)
        # 0: clean, 1: violations printed; anything else is the checker failing.
        assert run.returncode in (0, 1) and not err.strip(), (run.returncode, err)
        for line in out.splitlines():
            path, _, message = line.partition(":")
            found[path].append(message)
    return found


@cache
def violations() -> tuple[str, ...]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "runestone").rglob("*.py"))
    assert len(files) > 50, files  # the glob found the package
    keys = {f: _key((ROOT / f).read_bytes()) for f in files}
    known: dict[str, list[str]] = {}
    for f, key in keys.items():
        entry = CACHE / key
        if entry.exists():
            known[f] = entry.read_text().splitlines()
    checked = _check([f for f in files if f not in known])
    CACHE.mkdir(exist_ok=True)
    for f, messages in checked.items():
        part = CACHE / f"{keys[f]}.{os.getpid()}"
        part.write_text("".join(m + "\n" for m in messages))
        part.replace(CACHE / keys[f])
    known.update(checked)
    return tuple(sorted(f"{f}:{m}" for f, messages in known.items() for m in messages))


def test_async_rules_hold_across_the_package():
    found = violations()
    assert not found, "ASYNC rule violations:\n" + "\n".join(found)
