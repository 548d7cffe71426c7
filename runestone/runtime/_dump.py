"""Live state dumps: the runtime's ``sys:get_state`` for a whole supervision tree.

:func:`dump_state` walks a tree from any node (a supervisor, an actor or its
ref, or any object offering ``dump()`` or ``snapshot()``) and returns plain
JSON-ready data. It runs synchronously, so the picture is consistent: no actor
or supervisor moves while it is taken. Snapshots come from the actors
themselves (secrets already redacted there); :func:`~._plain.plain` turns
attrs instances, enums, sets and the like into plain JSON types (and masks any
attrs field marked secret that a snapshot let through).
"""

from __future__ import annotations

from typing import Any

from ._actor import Actor, ActorRef, NamedRef
from ._plain import _key, plain
from ._plain import error_dict as _error
from ._spec import ChildInfo
from ._supervisor import Supervisor


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
        "unknown_messages": lifecycle.unknown_messages,
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
                node.update({_key(key): plain(value) for key, value in extra.items()})
            else:
                node["snapshot"] = plain(extra)
        return node
    snapshot = getattr(obj, "snapshot", None)
    if callable(snapshot):
        node["snapshot"] = _snapshot(snapshot)
    return node


def _snapshot(snapshot: Any) -> Any:
    try:
        return plain(snapshot())
    except Exception as exc:
        return {"error": _error(exc)}
