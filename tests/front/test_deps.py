"""The route modules see the running gateway only through FrontDeps: none imports or is handed the
Application, and FrontDeps holds exactly what they read (a field nobody reads, or a read of something
FrontDeps does not hold, fails here)."""

import ast
from pathlib import Path

import attrs

import runestone.front as front
from runestone.front.deps import FrontDeps

FRONT = Path(front.__file__).parent
MODULES = sorted(p for p in FRONT.rglob("*.py") if p.name != "deps.py")


def _trees():
    for path in MODULES:
        yield path.relative_to(FRONT), ast.parse(path.read_text(), str(path))


def _is_deps(node: ast.AST) -> bool:
    """``deps`` or ``self.deps``."""
    if isinstance(node, ast.Name):
        return node.id == "deps"
    return isinstance(node, ast.Attribute) and node.attr == "deps" and isinstance(node.value, ast.Name)


def test_no_route_module_imports_or_is_given_the_application():
    for name, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 2 and node.module == "app") and node.module != "runestone.app", name
                assert "Application" not in {a.name for a in node.names}, name
            elif isinstance(node, ast.Import):
                assert "runestone.app" not in {a.name for a in node.names}, name
            elif isinstance(node, ast.Name):
                assert node.id not in ("app", "Application"), (name, node.lineno)
            elif isinstance(node, ast.arg):
                assert node.arg != "app", (name, node.lineno)
            elif isinstance(node, ast.Attribute):
                assert node.attr != "app", (name, node.lineno)


def test_front_deps_holds_exactly_what_the_route_modules_read():
    read: dict[str, set] = {}
    for name, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_deps(node.value):
                read.setdefault(node.attr, set()).add(str(name))
    fields = {f.name for f in attrs.fields(FrontDeps)}
    assert set(read) == fields, {"read but not held": set(read) - fields, "held but not read": fields - set(read)}


def test_every_install_takes_the_front_and_its_deps():
    installs = 0
    for name, tree in _trees():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "install":
                assert [a.arg for a in node.args.args] == ["front", "deps"], name
                installs += 1
    assert installs >= 10
