"""Helpers for tests that run the whole gateway: a started gateway's URLs, and provider blocks of config.

A plain module (not a conftest) so that test files can import it by name whatever other conftest files
pytest has loaded: ``from gatewaytest import provider_toml``.
"""

from __future__ import annotations

import sqlite3


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


def fail_next_ledger_write(ledger) -> list:
    """Make ``ledger``'s next write fail as a broken disk would; the returned list gets an item when it did."""
    write = ledger._write_sync
    failed: list = []

    def failing_once(*args):
        if not failed:
            failed.append(True)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return write(*args)

    ledger._write_sync = failing_once
    return failed
