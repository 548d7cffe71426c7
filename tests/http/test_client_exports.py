"""The http package's public names: every one re-exported is the real object, and nothing public is missed."""

import subprocess
import sys

import runestone.http
from runestone.http import client, errors, httpx_transport


def test_client_side_public_names_are_all_re_exported_from_the_package() -> None:
    for module in (client, errors, httpx_transport):
        for name in module.__all__:
            assert getattr(runestone.http, name) is getattr(module, name), f"{module.__name__}.{name}"


def test_server_names_are_re_exported() -> None:
    from runestone.http import server

    for name in ("serve_http", "Request", "Response", "Limits", "WebSocketAccept", "HttpServer"):
        assert getattr(runestone.http, name) is getattr(server, name)


def test_the_package_imports_nothing_else_of_ours() -> None:
    probe = (
        "import sys, runestone.http; "
        "print(sorted(m for m in sys.modules if m.startswith('runestone.') and not m.startswith('runestone.http')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
