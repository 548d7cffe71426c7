"""Live state dumps: the runtime's ``sys:get_state`` for a whole supervision tree.

:func:`dump_state` walks a tree from any node (a supervisor, an actor or its
ref, or any object offering ``dump()`` or ``snapshot()``) and returns plain
JSON-ready data. It runs synchronously, so the picture is consistent: no actor
or supervisor moves while it is taken. Snapshots come from the actors
themselves (secrets already redacted there); attrs instances, enums, sets and
the like are turned into plain JSON types here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import attrs

from ._actor import Actor, ActorRef, NamedRef
from ._spec import ChildInfo
from ._supervisor import Supervisor

_SCALARS = (str, int, bool, type(None))


def dump_state(root: Any) -> dict[str, Any]:
    """The state of ``root`` and everything under it, as plain data (``orjson.dumps`` works).

    Each node has ``name``, ``kind`` (``"supervisor"``, ``"actor"`` or
    ``"task"``), ``status``, ``restarts``, ``last_error`` (``{"type",
    "message"}`` or ``None``) and ``snapshot``; supervisors add ``strategy`` and
    ``children``, actors add ``mailbox`` (``{"depth", "capacity"}``). A child
    node also has ``id``, and its ``status``, ``restarts`` and ``last_error``
    are its supervisor's view of it. A failing ``snapshot()`` or ``dump()``
    shows up as an error in that node rather than failing the dump.
    """
    return _node(root, None)


def _node(obj: Any, info: ChildInfo | None) -> dict[str, Any]:
    if isinstance(obj, NamedRef):
        named, obj = obj, obj.registry.whereis(obj.name)
        if obj is None:
            return _unbound(named)
    if isinstance(obj, ActorRef):
        obj = obj.actor
    if isinstance(obj, Supervisor):
        node = _supervisor_node(obj)
    elif isinstance(obj, Actor):
        node = _actor_node(obj)
    else:
        node = _other_node(obj, info)
    if info is not None:
        node["id"] = info.id
        node["status"] = info.status
        node["restarts"] = info.restarts
        node["last_error"] = _error(info.last_error)
    return node


def _unbound(named: NamedRef) -> dict[str, Any]:
    return {"name": named.name, "kind": "actor", "status": "stopped", "restarts": 0, "last_error": None, "snapshot": None}


def _supervisor_node(supervisor: Supervisor) -> dict[str, Any]:
    return {
        "name": supervisor.name,
        "kind": "supervisor",
        "strategy": supervisor.strategy,
        "status": supervisor.status,
        "restarts": supervisor.restarts,
        "last_error": _error(supervisor.last_error),
        "snapshot": _snapshot(supervisor.snapshot),
        "children": [_node(info.value, info) for info in supervisor.which_children()],
    }


def _actor_node(actor: Actor) -> dict[str, Any]:
    lifecycle = actor.lifecycle
    ref = actor.ref
    return {
        "name": actor.name,
        "kind": "actor",
        "status": lifecycle.status,
        "restarts": lifecycle.restarts,
        "last_error": _error(lifecycle.last_error),
        "mailbox": {
            "depth": ref.mailbox_depth if ref is not None else 0,
            "capacity": actor.mailbox_size,
        },
        "snapshot": _snapshot(actor.snapshot),
    }


def _other_node(obj: Any, info: ChildInfo | None) -> dict[str, Any]:
    name = getattr(obj, "name", None)
    if not isinstance(name, str):
        name = info.id if info is not None else type(obj).__name__
    kind = "supervisor" if info is not None and info.kind == "supervisor" else "task"
    node: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "status": "running" if obj is not None else "stopped",
        "restarts": 0,
        "last_error": None,
        "snapshot": None,
    }
    dump = getattr(obj, "dump", None)
    if callable(dump):
        try:
            extra = dump()
        except Exception as exc:
            node["snapshot"] = {"error": _error(exc)}
        else:
            if isinstance(extra, dict):
                node.update({_key(key): _plain(value) for key, value in extra.items()})
            else:
                node["snapshot"] = _plain(extra)
        return node
    snapshot = getattr(obj, "snapshot", None)
    if callable(snapshot):
        node["snapshot"] = _snapshot(snapshot)
    return node


def _snapshot(snapshot: Any) -> Any:
    try:
        return _plain(snapshot())
    except Exception as exc:
        return {"error": _error(exc)}


def _error(exc: BaseException | None) -> dict[str, str] | None:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "message": str(exc)}


def _plain(value: Any) -> Any:
    """``value`` as JSON types: dicts with str keys, lists, str, int, float, bool, None."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if attrs.has(type(value)):
        return {field.name: _plain(getattr(value, field.name)) for field in attrs.fields(type(value))}
    if isinstance(value, Mapping):  # dicts, and read-only views such as MappingProxyType
        return {_key(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, BaseException):
        return _error(value)
    return repr(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    if isinstance(key, enum.Enum):
        return str(key.value)
    return str(key)
