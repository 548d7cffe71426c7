"""Deterministic instances of JSON Schemas, for the fake models' structured output and tool arguments.

:func:`schema_instance` builds a value that validates against a schema from the subset that structured
output and tool definitions use: ``type`` (one or a list), ``properties``/``required``/
``additionalProperties``, ``items``/``prefixItems``/``minItems``/``maxItems``/``uniqueItems``, ``enum``,
``const``, ``anyOf``/``oneOf``/``allOf``, ``$ref`` into ``$defs``/``definitions`` (recursion is cut off by
depth), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``/``multipleOf``,
``minLength``/``maxLength`` and the common string ``format`` values. ``pattern``, ``not``,
``if``/``then`` and ``dependentSchemas`` are not honoured. The same schema and seed give the same value;
another seed gives another value where the schema leaves room.

:func:`conforms` checks a value against that same subset; the generator uses it to pick a ``oneOf``
branch that no other branch also matches.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

__all__ = ["conforms", "schema_instance"]

_WORDS = (
    "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper",
    "kestrel", "lumen", "meadow", "nimbus", "opal", "pebble", "quartz", "raven", "sable", "tundra",
)
_FORMATS = {
    "date-time": "2024-01-{d:02d}T12:00:00Z",
    "date": "2024-01-{d:02d}",
    "time": "12:{d:02d}:00Z",
    "email": "{w}@example.com",
    "idn-email": "{w}@example.com",
    "uri": "https://example.com/{w}",
    "iri": "https://example.com/{w}",
    "uri-reference": "/{w}",
    "url": "https://example.com/{w}",
    "hostname": "{w}.example.com",
    "idn-hostname": "{w}.example.com",
    "ipv4": "192.0.2.{d}",
    "ipv6": "2001:db8::{d:x}",
    "uuid": "00000000-0000-4000-8000-{d:012d}",
    "duration": "P{d}D",
}
_MAX_DEPTH = 12
_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")


def _mix(seed: int, key: Any) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


def _resolve(ref: str, root: dict) -> dict | None:
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].lstrip("/").split("/") if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, (dict, bool)) else None


def _merge_all_of(schema: dict, root: dict) -> dict:
    """``allOf`` folded into one schema: properties and required united, other keywords of the last wins."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema["allOf"]:
        if isinstance(sub, dict) and "$ref" in sub:
            sub = _resolve(sub["$ref"], root) or {}
        if not isinstance(sub, dict):
            continue
        if "allOf" in sub:
            sub = _merge_all_of(sub, root)
        for key, value in sub.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**(merged.get("properties") or {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = list(dict.fromkeys([*(merged.get("required") or []), *value]))
            else:
                merged.setdefault(key, value)
    return merged


def _kind(schema: dict) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in _TYPE_ORDER if k in kind]
        non_null = [k for k in kinds if k != "null"]
        return (non_null or kinds or [None])[0]
    if kind is None:
        if "properties" in schema or "required" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
            return "string"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
            return "number"
    return kind


def schema_instance(schema: Any, seed: int = 0) -> Any:
    """A value valid against ``schema`` (see the module docstring for the keywords honoured)."""
    root = schema if isinstance(schema, dict) else {}
    return _instance(schema, root, seed, 0)


def _instance(schema: Any, root: dict, seed: int, depth: int) -> Any:
    if schema is True or schema is None:
        return _WORDS[seed % len(_WORDS)]
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target = _resolve(schema["$ref"], root)
        if target is None or depth > _MAX_DEPTH:
            return None
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        if isinstance(target, dict) and rest:
            target = _merge_all_of({"allOf": [target, rest]}, root)
        return _instance(target, root, seed, depth + 1)
    if "allOf" in schema and isinstance(schema["allOf"], list):
        return _instance(_merge_all_of(schema, root), root, seed, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        enum = schema["enum"]
        return enum[seed % len(enum)]
    for key in ("oneOf", "anyOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return _pick_branch(schema, key, branches, root, seed, depth)
    kind = _kind(schema)
    if kind == "object":
        return _object(schema, root, seed, depth)
    if kind == "array":
        return _array(schema, root, seed, depth)
    if kind == "string":
        return _string(schema, seed)
    if kind == "integer":
        return _integer(schema, seed)
    if kind == "number":
        return _number(schema, seed)
    if kind == "boolean":
        return seed % 2 == 0
    if kind == "null":
        return None
    return _WORDS[seed % len(_WORDS)]


def _pick_branch(schema: dict, key: str, branches: list, root: dict, seed: int, depth: int) -> Any:
    """A value of one branch (the first, rotated by the seed, that works), merged with the sibling keywords."""
    siblings = {k: v for k, v in schema.items() if k not in ("oneOf", "anyOf")}
    # A null branch (an optional field) is the last resort, so values carry content where they can.
    null = [b for b in branches if isinstance(b, dict) and b.get("type") == "null"]
    real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
    order = [real[(seed + k) % len(real)] for k in range(len(real))] + null
    first = None
    for k, branch in enumerate(order):
        if siblings and isinstance(branch, dict):
            branch = _merge_all_of({"allOf": [siblings, branch]}, root)
        value = _instance(branch, root, _mix(seed, k), depth + 1)
        if first is None:
            first = value
        if not conforms(branch, value, root):
            continue
        if key == "oneOf" and sum(conforms(b, value, root) for b in branches) != 1:
            continue
        return value
    return first


def _object(schema: dict, root: dict, seed: int, depth: int) -> dict:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [r for r in schema.get("required") or () if isinstance(r, str)]
    # Deep in a recursive schema only the required properties are filled, so the value stays finite.
    names = list(props) if depth < _MAX_DEPTH // 2 else [n for n in props if n in required]
    names += [r for r in required if r not in props]
    max_props = schema.get("maxProperties")
    if isinstance(max_props, int) and len(names) > max_props:
        names = [n for n in names if n in required] + [n for n in names if n not in required]
        names = names[:max(max_props, len(required))]
    out = {}
    for name in names:
        sub = props.get(name)
        if sub is None:
            extra = schema.get("additionalProperties")
            sub = extra if isinstance(extra, dict) else True
        out[name] = _instance(sub, root, _mix(seed, name), depth + 1)
    return out


def _array(schema: dict, root: dict, seed: int, depth: int) -> list:
    lo = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
    hi = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
    prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
    items = schema.get("items")
    if isinstance(items, list):  # draft 4's tuple form
        prefix, items = items, schema.get("additionalItems", True)
    shallow = depth < _MAX_DEPTH // 2
    want = max(lo, 1 if shallow else 0, len(prefix) if shallow else 0)
    if items is False:
        want = min(want, len(prefix))
    if hi is not None:
        want = min(want, hi)
    out: list = []
    for i in range(want):
        sub = prefix[i] if i < len(prefix) else items if isinstance(items, (dict, bool)) else True
        value = _instance(sub, root, _mix(seed, i), depth + 1)
        if schema.get("uniqueItems"):
            for retry in range(1, 8):
                if value not in out:
                    break
                value = _instance(sub, root, _mix(seed, f"{i}.{retry}"), depth + 1)
        out.append(value)
    return out


def _string(schema: dict, seed: int) -> str:
    word = _WORDS[seed % len(_WORDS)]
    fmt = _FORMATS.get(schema.get("format"))
    text = fmt.format(w=word, d=seed % 28 + 1) if fmt else word
    lo = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
    hi = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
    while len(text) < lo:
        text += " " + _WORDS[(seed + len(text)) % len(_WORDS)] if fmt is None else "x"
    if hi is not None and len(text) > hi:
        text = text[:hi]
    if len(text) < lo:
        text += "x" * (lo - len(text))
    return text


def _bounds(schema: dict) -> tuple[float | None, bool, float | None, bool]:
    """(low, low is exclusive, high, high is exclusive), with draft-4 boolean exclusives read too."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_x = hi_x = False
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_lo, bool):
        lo_x = ex_lo
    elif isinstance(ex_lo, (int, float)) and (lo is None or ex_lo >= lo):
        lo, lo_x = ex_lo, True
    if isinstance(ex_hi, bool):
        hi_x = ex_hi
    elif isinstance(ex_hi, (int, float)) and (hi is None or ex_hi <= hi):
        hi, hi_x = ex_hi, True
    num = (int, float)
    return (lo if isinstance(lo, num) and not isinstance(lo, bool) else None, lo_x,
            hi if isinstance(hi, num) and not isinstance(hi, bool) else None, hi_x)


def _integer(schema: dict, seed: int) -> int:
    lo, lo_x, hi, hi_x = _bounds(schema)
    low = None if lo is None else (math.floor(lo) + 1 if lo_x or lo != math.floor(lo) else int(lo))
    high = None if hi is None else (math.ceil(hi) - 1 if hi_x or hi != math.ceil(hi) else int(hi))
    step = schema.get("multipleOf")
    step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and step >= 1 and step == int(step) else 1
    if low is None and high is None:
        low, high = 0, 99
    elif low is None:
        low = high - 99
    elif high is None:
        high = low + 99
    first = -(-low // step) * step  # the smallest multiple of step >= low
    if first > high:
        return low  # no multiple fits: the bounds win
    count = (high - first) // step + 1
    return first + (seed % count) * step


def _number(schema: dict, seed: int) -> float | int:
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0 and step != int(step):
        lo, lo_x, hi, hi_x = _bounds(schema)
        k_lo = math.ceil(lo / step) if lo is not None else 0
        if lo is not None and lo_x and k_lo * step <= lo:
            k_lo += 1
        k_hi = math.floor(hi / step) if hi is not None else k_lo + 99
        if hi is not None and hi_x and k_hi * step >= hi:
            k_hi -= 1
        if k_hi < k_lo:
            return k_lo * step
        k = k_lo + seed % (k_hi - k_lo + 1)
        return round(k * step, 12)
    if isinstance(step, (int, float)) and not isinstance(step, bool) and step >= 1:
        return _integer(schema, seed)
    lo, lo_x, hi, hi_x = _bounds(schema)
    frac = (seed % 1000) / 1000  # in [0, 1)
    if lo is None and hi is None:
        return round(frac * 100, 1) + 0.25  # never an integer: see below
    if lo is None:
        lo, lo_x = hi - 100, False
    if hi is None:
        hi, hi_x = lo + 100, False
    if hi <= lo:
        return lo
    value = lo + (hi - lo) * frac
    if float(value).is_integer() and value + 0.25 < hi:
        value += 0.25  # a number that is not also an integer, so oneOf [integer, number] has its answer
    if (lo_x and value <= lo) or (hi_x and value >= hi):
        value = (lo + hi) / 2
    return value


# -- conformance ---------------------------------------------------------------------------------------------

_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def conforms(schema: Any, value: Any, root: dict | None = None, depth: int = 0) -> bool:
    """Whether ``value`` satisfies ``schema`` as far as the keywords :func:`schema_instance` honours go."""
    if schema is True or schema is None:
        return True
    if schema is False:
        return False
    if not isinstance(schema, dict) or depth > 2 * _MAX_DEPTH:
        return True
    root = schema if root is None else root
    if "$ref" in schema:
        target = _resolve(schema["$ref"], root)
        if target is not None and not conforms(target, value, root, depth + 1):
            return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_CHECKS.get(k, lambda v: True)(value) for k in kinds):
            return False
    for sub in schema.get("allOf") or ():
        if not conforms(sub, value, root, depth + 1):
            return False
    if isinstance(schema.get("anyOf"), list) and not any(conforms(s, value, root, depth + 1) for s in schema["anyOf"]):
        return False
    if isinstance(schema.get("oneOf"), list) and sum(conforms(s, value, root, depth + 1) for s in schema["oneOf"]) != 1:
        return False
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        if any(r not in value for r in schema.get("required") or ()):
            return False
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                if not conforms(props[name], item, root, depth + 1):
                    return False
            elif extra is False or (isinstance(extra, dict) and not conforms(extra, item, root, depth + 1)):
                return False
    if isinstance(value, list):
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            return False
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            return False
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        items = schema.get("items")
        if isinstance(items, list):
            prefix, items = items, schema.get("additionalItems")
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else items
            if sub is not None and not conforms(sub, item, root, depth + 1):
                return False
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            return False
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, lo_x, hi, hi_x = _bounds(schema)
        if lo is not None and (value < lo or (lo_x and value == lo)):
            return False
        if hi is not None and (value > hi or (hi_x and value == hi)):
            return False
    return True
