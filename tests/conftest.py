"""Shared fixtures: a fake upstream and the whole gateway, both real servers on 127.0.0.1 ports chosen by the OS.

``gateway_factory(toml)`` starts an :class:`~runestone.app.Application` (the full supervision tree) in the
test's nursery from config text, with its data directory under ``tmp_path`` and an empty environment, so
nothing on the machine leaks into a test. ``fake_factory(**knobs)`` starts a fake OpenAI/Anthropic upstream;
``gated_factory(after, **knobs)`` one whose streams wait at a :class:`~gatewaytest.Gate` after ``after`` frames.
``redis_server`` is a real redis-server shared by the session (running, answering and empty when a test
starts; a test may kill, restart or pause it), ``redis_factory()`` starts one of the test's own.
"""

from __future__ import annotations

import textwrap
from functools import partial
from pathlib import Path

import pytest
import trio

from runestone.app import Application
from runestone.config import load_config
from runestone.http.server import serve_http
from runestone.providers.fake_server import FakeKnobs, make_fake_handler, serve_fake_provider

from gatewaytest import Gate, gated_handler
from redistest import RedisServer
from gatewaytest import Started, provider_toml  # noqa: F401  (re-exported for older imports)


@pytest.fixture
def gateway_factory(nursery, tmp_path: Path):
    counter = 0

    async def start(toml: str, env: dict | None = None) -> Started:
        nonlocal counter
        counter += 1
        data = tmp_path / f"data{counter}"
        text = textwrap.dedent(toml)
        if "[data]" not in text:
            text = f'[data]\ndir = "{data}"\n' + text
        if "[server]" not in text:
            text = '[server]\nhost = "127.0.0.1"\nport = 0\n' + text
        path = tmp_path / f"runestone{counter}.toml"
        path.write_text(text)
        config = load_config(str(path), env=env or {})
        app = Application(config)
        await nursery.start(app.run)
        return Started(app)

    return start


@pytest.fixture
def fake_factory(nursery):
    async def start(**knobs):
        k = FakeKnobs(**knobs)
        server = await nursery.start(lambda task_status: serve_fake_provider("127.0.0.1", 0, k, task_status=task_status))
        return server, k

    return start


@pytest.fixture
def gated_factory(nursery):
    async def start(after: int = 1, **knobs):
        gate = Gate(after)
        fake = make_fake_handler(FakeKnobs(**knobs))
        server = await nursery.start(partial(serve_http, gated_handler(fake, gate), "127.0.0.1", 0))
        return server, gate, fake

    return start


@pytest.fixture
def fake_only_toml() -> str:
    return provider_toml("fake", "fake", models=["fake-model", "fake-embedding"])


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(_redis_session) -> RedisServer:
    _redis_session.ensure_running()
    _redis_session.command("FLUSHALL")  # each test starts from an empty Redis
    yield _redis_session
    _redis_session.ensure_running()


@pytest.fixture
def redis_factory(tmp_path):
    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, password)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


# -- Postgres ([database] url): one real server for the session, a fresh database per test ------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A Postgres server on a free loopback port for the whole session (see ``pgserver``). Missing binaries fail
    the test that needs them: ``scripts/test`` installs them (``scripts/_venv.sh``)."""
    from pgserver import PostgresServer, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        pytest.fail("this test needs a Postgres server (initdb and postgres), and none was found: run it through "
                    "scripts/test, which installs Debian's postgresql, or set RUNESTONE_TEST_POSTGRES_BIN")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The url of a new, empty database on the session's server (the server is started again if a test
    stopped it)."""
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start()
    return postgres_server.create_database()
