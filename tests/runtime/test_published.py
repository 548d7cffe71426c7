"""Published cells (one writer, ``publish`` the only write), Rejected replies and the plain converter."""

from __future__ import annotations

import enum
import math
from types import MappingProxyType

import attrs
import orjson
import pytest

from runestone.runtime import Published, Rejected, plain, unwrap


def test_publish_swaps_whole_values_and_bumps_the_version():
    cell = Published()
    assert (cell.value, cell.version) == (None, 0)
    cell.publish({"a": 1})
    cell.publish({"a": 2})
    assert (cell.value, cell.version) == ({"a": 2}, 2)


def test_publish_is_the_only_way_to_change_a_cell():
    cell = Published({"a": 1}, owner="keeper")
    for name in ("value", "version", "owner", "other"):
        with pytest.raises(AttributeError, match="publish"):
            setattr(cell, name, {})
    with pytest.raises(AttributeError, match="publish"):
        del cell.value
    assert (cell.value, cell.version, cell.owner) == ({"a": 1}, 0, "keeper")
    assert "keeper" in repr(cell) and "version 0" in repr(cell)


def test_a_subclass_writes_through_publish_too():
    class Table(Published):
        def put(self, key, value):
            self.publish({**self.value, key: value})

    table = Table({})
    table.put("x", 1)
    assert (table.value, table.version) == ({"x": 1}, 1)
    with pytest.raises(AttributeError):
        table.value = {}


def test_rejected_replies_unwrap_to_the_exception_they_stand_for():
    assert unwrap(42) == 42
    with pytest.raises(LookupError, match="no such"):
        unwrap(Rejected("not_found", "no such thing"))
    for code in ("conflict", "invalid"):
        with pytest.raises(ValueError, match="bad"):
            unwrap(Rejected(code, "bad"))


class Color(enum.Enum):
    RED = "red"


def _secret(default=None):
    return attrs.field(default=default, metadata={"secret": True})


@attrs.frozen
class Settings:
    name: str
    api_key: str | None = _secret()
    api_keys: tuple[str, ...] = _secret(())
    color: Color = Color.RED


def test_plain_turns_live_values_into_json_types():
    value = {
        "settings": Settings("p"),
        "view": MappingProxyType({1: 2.5, b"k": float("inf")}),
        "seq": (1, [None, True]),
        "set": frozenset({"x"}),
        "raw": b"\xffok",
        "error": ValueError("bad value"),
        "other": object,
        Color.RED: math.nan,
    }
    out = plain(value)
    assert out == {
        "settings": {"name": "p", "api_key": None, "api_keys": [], "color": "red"},
        "view": {"1": 2.5, "k": "inf"},
        "seq": [1, [None, True]],
        "set": ["x"],
        "raw": "\ufffdok",
        "error": {"type": "ValueError", "message": "bad value"},
        "other": repr(object),
        "red": "nan",
    }
    assert orjson.loads(orjson.dumps(out)) == out


def test_plain_masks_secret_fields_unless_told_not_to():
    settings = Settings("p", api_key="sk-live-123", api_keys=("k1", "k2"))
    masked = plain({"nested": [settings]})
    assert masked == {"nested": [{"name": "p", "api_key": "***", "api_keys": ["***", "***"], "color": "red"}]}
    assert "sk-live" not in orjson.dumps(masked).decode()
    assert plain(settings, redact=False)["api_key"] == "sk-live-123"
    assert plain(settings, redact=False)["api_keys"] == ["k1", "k2"]
