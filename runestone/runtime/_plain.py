"""One converter from live values to plain JSON data, for every state dump and snapshot view."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import attrs

_SCALARS = (str, int, bool, type(None))

MASK = "***"
"""What a secret reads as in plain data."""


def plain(value: Any, *, redact: bool = True) -> Any:
    """``value`` as JSON types: dicts with str keys, lists, str, int, float, bool, None.

    attrs instances become dicts of their fields, mappings (read-only views such
    as ``MappingProxyType`` too) dicts with str keys, lists/tuples/sets lists,
    enums their value, non-finite floats ``"inf"``/``"nan"``, bytes text, an
    exception ``{"type", "message"}``; anything else its ``repr``.

    With ``redact`` (the default) an attrs field marked secret
    (``metadata={"secret": True}``, as the config's secret settings are) reads
    ``"***"`` when set (each item does, for a sequence of secrets). Snapshots
    are expected to leave secrets out already; this is the net under them.
    """
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return plain(value.value, redact=redact)
    if attrs.has(type(value)):
        out = {}
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if redact and item and field.metadata.get("secret"):
                out[field.name] = [MASK for _ in item] if isinstance(item, (list, tuple)) else MASK
            else:
                out[field.name] = plain(item, redact=redact)
        return out
    if isinstance(value, Mapping):
        return {_key(key): plain(item, redact=redact) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(item, redact=redact) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, BaseException):
        return error_dict(value)
    return repr(value)


def error_dict(exc: BaseException | None) -> dict[str, str] | None:
    """An exception as plain data: ``{"type", "message"}``; ``None`` for ``None``."""
    if exc is None:
        return None
    return {"type": type(exc).__name__, "message": str(exc)}


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    if isinstance(key, enum.Enum):
        return str(key.value)
    return str(key)
