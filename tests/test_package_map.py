"""Every package's face (its ``__all__``) and the one direction of imports between packages.

The floors are the package map at the top of ``runestone/__init__.py``, written here as data: a module
may import its own package and packages on lower floors, never one beside or above its own. Every
``import`` in the tree is read with ``ast`` (those inside functions too: a lazy import is still a
dependency).
"""

from __future__ import annotations

import __future__
import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import runestone

ROOT = Path(runestone.__file__).parent

#: Floor by floor, bottom first. A top-level module (``app.py``) is a unit of its own, like a package, and
#: so is each fleet module of ``cluster``: each shares one layer's state through Redis, so it stands just
#: above that layer.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset({"runtime", "http", "wire", "storage"}),  # import nothing of ours
    frozenset({"config", "cluster"}),  # cluster: the Redis client, serve --workers
    frozenset({"telemetry"}),
    frozenset({"resilience", "cluster.status"}),
    frozenset({"providers", "cluster.breakers"}),
    frozenset({"routing"}),
    frozenset({"control"}),
    frozenset({"front", "cluster.control"}),
    frozenset({"governance", "cluster.responses", "cluster.limits", "cluster.governance"}),
    frozenset({"app"}),
    frozenset({"cli"}),
)

#: Modules that belong to a unit other than their package's (the longest matching prefix wins): the
#: command-line client's (the control CLI client lives beside the control plane and the key and team commands
#: beside governance, but they are the CLI's: they import each other and anything below), and the fleet
#: modules of ``cluster``.
UNIT_OF = {"control.cli": "cli", "governance.cli": "cli", "cluster.status": "cluster.status",
           "cluster.breakers": "cluster.breakers", "cluster.control": "cluster.control",
           "cluster.responses": "cluster.responses", "cluster.limits": "cluster.limits",
           "cluster.governance": "cluster.governance"}

#: Known upward imports, (importing module, imported module) -> why it is tolerated for now. Each is debt:
#: the rule holds once it is gone.
EXCEPTIONS: dict[tuple[str, str], str] = {}

FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}

PACKAGES = sorted(m.name for m in pkgutil.iter_modules([str(ROOT)]) if m.ispkg)


def _unit(dotted: str) -> str | None:
    """The unit a ``runestone.x...`` module belongs to; None for ``runestone`` itself (``__version__``)."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[1] in ("__version__", "__init__"):
        return None
    for n in range(len(parts), 1, -1):
        unit = UNIT_OF.get(".".join(parts[1:n]))
        if unit is not None:
            return unit
    return parts[1]


def _rel(path: Path) -> tuple[str, ...]:
    return path.relative_to(ROOT).with_suffix("").parts


def _unit_of_file(rel: tuple[str, ...]) -> str | None:
    return _unit(".".join(("runestone",) + (rel[:-1] if rel[-1] == "__init__" else rel)))


def _imports(path: Path, rel: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of ours in ``path``, the module ``runestone/<rel>.py``."""
    package = ["runestone", *rel[:-1]]  # the package the module is in (for relative imports)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    found.append((node.lineno, ".".join(base + [node.module])))
                else:
                    found += [(node.lineno, ".".join(base + [a.name])) for a in node.names]
            elif node.module:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "runestone" or name.startswith("runestone.")]


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_floor():
    units = {_unit_of_file(_rel(p)) for p in _modules()}
    units.discard(None)
    assert units - set(FLOOR) == set(), "give each new package or top-level module a floor in FLOORS"


def _violations(files: list[tuple[Path, tuple[str, ...]]]) -> list[str]:
    wrong = []
    for path, rel in files:
        me = _unit_of_file(rel)
        if me is None:
            continue
        module = ".".join(("runestone",) + (rel[:-1] if rel[-1] == "__init__" else rel))
        for line, name in _imports(path, rel):
            other = _unit(name)
            if other is None or other == me or (module, name) in EXCEPTIONS:
                continue
            if FLOOR[other] >= FLOOR[me]:
                wrong.append(f"runestone/{'/'.join(rel)}.py:{line} imports {name} "
                             f"({other}, floor {FLOOR[other]}) from {me} (floor {FLOOR[me]})")
    return wrong


def test_imports_point_down_only():
    assert _violations([(p, _rel(p)) for p in _modules()]) == []


def test_every_exception_is_still_needed():
    """An exception whose import is gone is deleted, so the list only ever shrinks."""
    seen = {(".".join(("runestone",) + (r[:-1] if r[-1] == "__init__" else r)), name)
            for p in _modules() for r in [_rel(p)] for _, name in _imports(p, r)}
    assert set(EXCEPTIONS) <= seen, set(EXCEPTIONS) - seen


def test_the_rule_checker_sees_a_wrong_import(tmp_path):
    """The checker itself: an upward import, relative or absolute, in a function or not, is found."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from ..routing import executor\n\nimport runestone.front.api\nimport trio\n")
    rel = ("runtime", "probe")
    assert sorted(name for _, name in _imports(module, rel)) == ["runestone.front.api", "runestone.routing"]
    found = _violations([(module, rel)])
    assert len(found) == 2 and all("from runtime (floor 0)" in v for v in found)
    assert _violations([(module, ("cli",))]) == []  # the top floor may import anything


def _face(module: types.ModuleType) -> set[str]:
    """The names a package's ``__init__`` binds for others: neither modules nor ``__future__`` features."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, (types.ModuleType, __future__._Feature))
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_exports_exactly_its_all(package):
    module = importlib.import_module(f"runestone.{package}")
    assert module.__doc__, f"runestone.{package} says what it is in its docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"runestone.{package} lists its public names in __all__"
    assert len(exported) == len(set(exported)), "a name listed twice"
    private = [name for name in exported if name.startswith("_")]
    assert private == []
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == []
    assert _face(module) == set(exported), "every public name bound in __init__ is in __all__, and only those"


def test_the_package_map_names_every_package():
    doc = runestone.__doc__
    for package in PACKAGES:
        assert f"``{package}``" in doc, package
