"""Runs every trio test of the runtime under a deadlock watchdog (see ``run_with_watchdog``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime_world import run_with_watchdog

_HERE = Path(__file__).parent


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # trylast: pytest-trio's trio_mode has marked the async tests by now; a
    # marker prepended here is the one it uses.
    for item in items:
        if item.get_closest_marker("trio") is not None and _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.trio(run=run_with_watchdog), append=False)
