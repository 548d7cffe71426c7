"""The http package's public names, client and server side: every one re-exported is the real object, nothing
public is missed, and the package's modules import each other in one direction only."""

import ast
import pathlib
import subprocess
import sys

import runestone.http
from runestone.http import _messages, client, errors, httpx_transport, server, transport, websocket

#: What the package exported before it was split into modules; callers outside http/ import these.
FACE_BEFORE_THE_SPLIT = {
    "FastTransport", "OriginStatistics", "PoolLimits", "Timeouts", "Transport", "TransportStatistics",
    "UpstreamResponse", "make_transport", "ConnectError", "ConnectTimeout", "LOCAL_RESOURCE_ERRNOS",
    "LocalProtocolError", "LocalResourceError", "PoolTimeout", "ReadTimeout", "RemoteProtocolError",
    "TransportError", "TransportTimeout", "WriteTimeout", "local_resource_errors", "local_resource_kind",
    "HttpxTransport", "BadRequest", "BodyTooLarge", "ClientDisconnected", "Handler", "HttpError", "HttpServer",
    "Limits", "Request", "RequestTimeout", "Response", "ServerStatistics", "WebSocketAccept", "serve_http",
}


def test_client_side_public_names_are_all_re_exported_from_the_package() -> None:
    for module in (client, errors, httpx_transport, transport):
        for name in module.__all__:
            assert getattr(runestone.http, name) is getattr(module, name), f"{module.__name__}.{name}"


def test_server_side_public_names_are_all_re_exported_from_the_package() -> None:
    for module in (server, _messages):
        for name in module.__all__:
            assert getattr(runestone.http, name) is getattr(module, name), f"{module.__name__}.{name}"
    assert runestone.http.WebSocketAccept is websocket.WebSocketAccept


def test_the_server_module_still_offers_what_handlers_import_from_it() -> None:
    # front/ and the tests import these from runestone.http.server; the split kept that path.
    for name in ("serve_http", "Request", "Response", "Limits", "WebSocketAccept", "HttpServer", "HttpError",
                 "BadRequest", "BodyTooLarge", "ClientDisconnected", "RequestTimeout"):
        assert getattr(server, name) is getattr(runestone.http, name)


def test_no_public_name_of_the_package_went_away() -> None:
    missing = sorted(name for name in FACE_BEFORE_THE_SPLIT if not hasattr(runestone.http, name))
    assert missing == []


def test_the_package_imports_nothing_else_of_ours() -> None:
    probe = (
        "import sys, runestone.http; "
        "print(sorted(m for m in sys.modules if m.startswith('runestone.') and not m.startswith('runestone.http')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _imports_of(path: pathlib.Path) -> set[str]:
    """The package's modules ``path`` imports anywhere (function bodies too), except under ``if TYPE_CHECKING``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    found.add(child.module)
                else:
                    found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module == "runestone.http":
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("runestone.http."):
                found.add(child.module.removeprefix("runestone.http."))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_package_has_no_import_cycle() -> None:
    folder = pathlib.Path(runestone.http.__file__).parent
    graph = {path.stem: _imports_of(path) for path in folder.glob("*.py") if path.stem != "__init__"}
    assert "httpx_transport" not in graph["transport"] and "client" not in graph["transport"]

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for target in sorted(graph.get(path[-1], ())):
            if target == start:
                return path + [target]
            if target not in path and target in graph:
                found = cycle_from(start, path + [target])
                if found:
                    return found
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module, [module]))]
    assert cycles == []
