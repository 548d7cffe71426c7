"""Shared fixtures: a fake upstream and the whole gateway, both real servers on 127.0.0.1 ports chosen by the OS.

``gateway_factory(toml)`` starts an :class:`~runestone.app.Application` (the full supervision tree) in the
test's nursery from config text, with its data directory under ``tmp_path`` and an empty environment, so
nothing on the machine leaks into a test. ``fake_factory(**knobs)`` starts a fake OpenAI/Anthropic upstream.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import trio

from runestone.app import Application
from runestone.config import load_config
from runestone.providers.fake_server import FakeKnobs, serve_fake_provider


class Started:
    """A running gateway: the app, its base URL and ``v1`` URL."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.port = app.port
        self.url = f"http://127.0.0.1:{app.port}"
        self.v1 = self.url + "/v1"


def provider_toml(name: str, type: str, **config) -> str:
    """A ``[[providers]]`` block; config values are written as TOML literals."""
    lines = [f'[[providers]]\nname = "{name}"\ntype = "{type}"\n[providers.config]']
    for key, value in config.items():
        if isinstance(value, bool):
            lit = "true" if value else "false"
        elif isinstance(value, str):
            lit = f'"{value}"'
        elif isinstance(value, (list, tuple)):
            lit = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        else:
            lit = repr(value)
        lines.append(f"{key} = {lit}")
    return "\n".join(lines) + "\n"


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
def fake_only_toml() -> str:
    return provider_toml("fake", "fake", models=["fake-model", "fake-embedding"])
