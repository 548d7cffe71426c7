"""Structuring a document strictly (cattrs) and reporting every problem as one line naming the key, the
value given (a secret as ``***``), where it came from and what is allowed."""

import difflib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import mapping_structure_factory

from ._checks import _NAME_CHARS, _redact_url

class ConfigError(Exception):
    """A configuration that cannot be used.

    ``str(error)`` is one line, ``"config error: <problem>"``, naming the first
    problem found; ``problems`` holds every problem found (without the
    prefix), in file order. Secrets never appear in either.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message.removeprefix("config error: "),)


# Strict structuring. cattrs' defaults call int()/bool()/str() on whatever
# they get, so "false" would become True; these hooks accept only the
# matching TOML/JSON type.


class _WrongType(TypeError):
    pass


def _strict_int(value: Any, _: type) -> int:
    if type(value) is not int:
        raise _WrongType
    return value


def _strict_float(value: Any, _: type) -> float:
    if type(value) is not float and type(value) is not int:
        raise _WrongType
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if type(value) is not bool:
        raise _WrongType
    return value


def _strict_str(value: Any, _: type) -> str:
    if type(value) is not str:
        raise _WrongType
    return value


def _is_homogeneous_tuple(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _strict_tuple_factory(t: Any, converter: cattrs.Converter) -> Callable[[Any, Any], tuple]:
    inner = homogenous_tuple_structure_factory(t, converter)

    def structure(value: Any, cl: Any) -> tuple:
        # A string is iterable; it must not become a tuple of characters.
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        return inner(value, cl)

    return structure


def _strict_dict_factory(t: Any, converter: cattrs.Converter) -> Callable[[Any, Any], dict]:
    inner = mapping_structure_factory(t, converter)

    def structure(value: Any, cl: Any) -> dict:
        if not isinstance(value, Mapping):
            raise _WrongType
        return inner(value, cl)

    return structure


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(float, _strict_float)
_converter.register_structure_hook(bool, _strict_bool)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook_factory(_is_homogeneous_tuple, _strict_tuple_factory)
_converter.register_structure_hook_factory(
    lambda t: typing.get_origin(t) is dict, _strict_dict_factory
)


# Problem reporting.

_Path = tuple[str | int, ...]
_SECRET_NAMES = frozenset(("api_key", "api_keys", "admin_key", "aws_secret_access_key", "aws_session_token"))
_URL_NAMES = frozenset(("base_url", "proxy"))
_BARE_KEY_CHARS = _NAME_CHARS - {"."}
_MISSING = object()


def _dotted(path: _Path) -> str:
    out: list[str] = []
    for seg in path:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
            continue
        key = seg if seg and _BARE_KEY_CHARS.issuperset(seg) else _quote(seg)
        out.append("." + key if out else key)
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    # Control characters escaped as TOML writes them: a problem line stays one line, and shows a CR.
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    if any(c < " " or c == "\x7f" for c in s):
        s = "".join(c if " " <= c != "\x7f" else _ESCAPES.get(c, f"\\u{ord(c):04x}") for c in s)
    return '"' + s + '"'


def _show(value: Any) -> str:
    """A value as it would be written in TOML, cut short to keep one line."""
    if value is True:
        text = "true"
    elif value is False:
        text = "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = _quote(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{_quote(str(k))} = {_show(v)}" for k, v in value.items()) + "}"
    else:
        text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _is_secret_path(path: _Path) -> bool:
    return any(isinstance(seg, str) and seg in _SECRET_NAMES for seg in path)


def _unwrap_optional(t: Any) -> Any:
    if typing.get_origin(t) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _resolve(root: type, path: _Path) -> tuple[attrs.Attribute | None, Any]:
    """The attrs field a path falls under (None at the root) and the type at the path."""
    field: attrs.Attribute | None = None
    cur: Any = root
    for seg in path:
        cur = _unwrap_optional(cur)
        origin = typing.get_origin(cur)
        if isinstance(seg, str) and attrs.has(cur):
            f = attrs.fields_dict(cur).get(seg)
            if f is None:
                return field, None
            field, cur = f, f.type
        elif origin is tuple:
            cur = typing.get_args(cur)[0]
        elif origin is dict:
            cur = typing.get_args(cur)[1]
        else:
            return field, None
    return field, cur


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _allowed_for(root: type, path: _Path) -> str:
    field, t = _resolve(root, path)
    if field is not None and (check := field.metadata.get("check")) is not None:
        if field.type is t or _unwrap_optional(field.type) is t:
            return check.allowed
    t = _unwrap_optional(t)
    if t in _TYPE_WORDS:
        return _TYPE_WORDS[t]
    if attrs.has(t) or typing.get_origin(t) is dict:
        return "a table"
    if _is_homogeneous_tuple(t):
        inner = typing.get_args(t)[0]
        if attrs.has(inner):
            return "an array of tables"
        return "an array of " + {int: "integers", float: "numbers", str: "strings"}.get(inner, "values")
    return "a valid value"


def _lookup(raw: Any, path: _Path) -> Any:
    for seg in path:
        try:
            raw = raw[seg]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


@attrs.define
class _Report:
    """Problems found while reading one document, in the order found."""

    root: type
    raw: Any
    #: Where a value came from when not from the document itself.
    sources: dict[_Path, str] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)

    def bad(self, path: _Path, value: Any, allowed: str) -> None:
        if path and path[-1] in _URL_NAMES and isinstance(value, str):
            value = _redact_url(value)  # a refused URL may still carry a password
        shown = "***" if _is_secret_path(path) and value not in (None, "", ()) else _show(value)
        source = self.sources.get(path)
        origin = f" (from {source})" if source else ""
        self.problems.append(f"{_dotted(path)} = {shown}{origin}: must be {allowed}")

    def missing(self, path: _Path) -> None:
        self.problems.append(
            f"{_dotted(path)} is required: must be {_allowed_for(self.root, path)}"
        )

    def unknown(self, path: _Path, known: Collection[str]) -> None:
        hint = difflib.get_close_matches(str(path[-1]), list(known), n=1)
        suffix = f" (did you mean {hint[0]}?)" if hint else ""
        self.problems.append(f"unknown key {_dotted(path)}{suffix}")

    def from_structuring(self, exc: BaseException, path: _Path = ()) -> None:
        for note in getattr(exc, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                path = path + (note.name,)
            elif isinstance(note, IterableValidationNote):
                path = path + (note.index,)
        if isinstance(exc, ForbiddenExtraKeysError):
            known = [a.name for a in attrs.fields(exc.cl)]
            for key in sorted(exc.extra_fields):
                self.unknown(path + (key,), known)
        elif isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                self.from_structuring(sub, path)
        else:
            value = _lookup(self.raw, path)
            if value is _MISSING:
                self.missing(path)
            else:
                self.bad(path, value, _allowed_for(self.root, path))

    def check_values(self, cls: type, raw: Any, path: _Path = ()) -> None:
        """Run the check of every setting given in ``raw``, depth first in
        declaration order. Works on the raw data so that a document with a
        type error elsewhere still gets all its values checked; a value that
        does not structure is skipped here (structuring reports it)."""
        if not isinstance(raw, Mapping):
            return
        for field in attrs.fields(cls):
            if field.name not in raw:
                continue
            value = raw[field.name]
            here = path + (field.name,)
            t = _unwrap_optional(field.type)
            args = typing.get_args(t)
            # tuple[X, ...] holds X first; dict[str, X] holds X last.
            inner = (args[0] if typing.get_origin(t) is tuple else args[-1]) if args else None
            if attrs.has(t):
                self.check_values(t, value, here)
            elif _is_homogeneous_tuple(t) and attrs.has(inner) and isinstance(value, list):
                for i, item in enumerate(value):
                    self.check_values(inner, item, here + (i,))
            elif typing.get_origin(t) is dict and attrs.has(inner) and isinstance(value, Mapping):
                for key, item in value.items():
                    self.check_values(inner, item, here + (key,))
            check = field.metadata.get("check")
            if check is None:
                continue
            try:
                typed = _converter.structure(value, field.type)
            except Exception:
                continue
            if not check(typed):
                self.bad(here, typed, check.allowed)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError("config error: " + self.problems[0], tuple(self.problems))


def _structure(report: _Report, data: Any, cls: type) -> Any:
    """Structure and check ``data`` as ``cls``, or raise ConfigError with every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config error: expected a table, got {_show(data)}")
    try:
        obj = _converter.structure(data, cls)
    except Exception as exc:  # cattrs reports any failure as an exception tree
        report.from_structuring(exc)
        report.check_values(cls, data)
        report.raise_if_any()
        raise
    report.check_values(cls, data)
    return obj
