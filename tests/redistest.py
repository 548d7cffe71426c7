"""A real ``redis-server`` for the tests: on a free loopback port, in a temporary directory, nothing saved.

``scripts/test`` installs redis-server when the machine has none (scripts/_venv.sh); a test that needs one
fails when it is missing, it never skips. :class:`RedisServer` can be killed, restarted on the same port,
paused (SIGSTOP: a Redis that accepts connections and answers nothing) and resumed, for degradation tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    if not os.access(found, os.X_OK):
        pytest.fail("redis-server is not installed: run the tests with scripts/test, which installs it "
                    "(scripts/_venv.sh), or install Debian's redis-server package", pytrace=False)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process (started by :meth:`start`); ``url`` stays the same across restarts."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.paused = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30  # only a server that never comes up trips this
        while not self._answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                     f"{(self.directory / 'redis.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not answer PING within 30 s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == b"PONG"
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: connections drop, every key is gone (nothing is saved)."""
        if self.proc is not None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server answers nothing until :meth:`resume`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def ensure_running(self) -> None:
        if self.paused:
            self.resume()
        if not self.running:
            self.start()

    def command(self, *args: str, timeout: float = 5) -> bytes:
        """One command over a plain socket (for checks from outside the client under test)."""
        from hiredis import Reader, pack_command

        reader = Reader()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            if self.password:
                s.sendall(pack_command(("AUTH", self.password)))
            s.sendall(pack_command(args))
            replies = []
            while len(replies) < (2 if self.password else 1):
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
            return replies[-1]

    def stop(self) -> None:
        self.kill()
