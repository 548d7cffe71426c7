"""A real Postgres server for the tests: ``initdb`` into a temporary directory, ``postgres`` on a free loopback
port, and ways to stop, kill and restart it (for the degradation tests).

Postgres refuses to run as root, so when the tests do, the server runs as the ``postgres`` user (Debian's
package makes it) or else ``nobody``, in a directory made for it. The binaries come from
``RUNESTONE_TEST_POSTGRES_BIN`` (a directory), ``PATH``, or ``/usr/lib/postgresql/<version>/bin``;
``scripts/_venv.sh`` installs them when missing. A test that needs the server fails without it, never skips.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def postgres_bin() -> str | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    candidates = []
    if os.environ.get("RUNESTONE_TEST_POSTGRES_BIN"):
        candidates.append(os.environ["RUNESTONE_TEST_POSTGRES_BIN"])
    found = shutil.which("postgres")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for d in candidates:
        if os.access(os.path.join(d, "postgres"), os.X_OK) and os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    return None


def _die_with_parent() -> None:
    """In the server's process before exec: an immediate shutdown (SIGQUIT) when the test process dies, killed
    or timed out, so no server outlives its tests. (After the change of user, which would clear it.)"""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server in a temporary directory; ``start``/``stop``/``kill``/``restart`` keep its data and port."""

    USER = "runestone"

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="runestone-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "postgres.log")
        self.proc: subprocess.Popen | None = None
        self._run_as: dict = {}
        self._databases = 0
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
                break
            else:
                raise RuntimeError("running as root, and neither a postgres nor a nobody user exists to run Postgres")
        self._env = {"PATH": "/usr/bin:/bin", "HOME": self.dir, "LC_ALL": "C"}
        result = subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", self.data, "-U", self.USER, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"], capture_output=True, text=True, env=self._env, **self._run_as)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it takes connections. Right after a ``kill`` the old backends may
        still hold the shared memory for a moment, and a new postmaster exits: it is tried again then."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._start_once(max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > deadline or "in use" not in self.log_tail():
                    raise
                time.sleep(0.1)

    def _start_once(self, timeout: float) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        # fsync off: a test needs no power-loss safety. synchronous_commit stays on: with it off, a killed server
        # forgets commits it acknowledged, which is not the server the degradation test is about.
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=log, env=self._env, preexec_fn=_die_with_parent, **self._run_as)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections in {timeout} s: {self.log_tail()}")
                time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends see it gone and exit); the data stays for ``start``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._wait_backends_gone()

    def stop(self) -> None:
        """An immediate shutdown (SIGQUIT): every connection is cut at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._wait_backends_gone()

    def _wait_backends_gone(self) -> None:
        # After a SIGKILL of the postmaster its backends linger a moment holding the shared memory, and a new
        # postmaster refuses to start until they are gone; postmaster.pid names the old one.
        deadline = time.monotonic() + 30
        pidfile = os.path.join(self.data, "postmaster.pid")
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    pid = int(f.readline())
                os.kill(pid, 0)
            except (OSError, ValueError):
                break
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> str:
        """A new empty database; its url."""
        import psycopg

        self._databases += 1
        name = f"t{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
