"""The control store on its own: how run-time changes overlay the configuration, and atomic replacement."""

import os

import pytest

from runestone.config import provider_spec_from_dict
from runestone.control.store import ControlState, ControlStore, ControlStoreError
from runestone.resilience.failover import GroupSpec


def spec(name: str, **config):
    return provider_spec_from_dict({"name": name, "type": "fake", "config": config})


def test_overlay_on_the_configuration():
    configured = [spec("a", priority=1), spec("b"), spec("c")]
    state = (ControlState()
             .with_provider(spec("a", priority=9))
             .without_provider("b")
             .with_provider(spec("d"))
             .without_provider("d", configured=False))
    catalog = state.catalog(configured)
    assert list(catalog) == ["a", "c"] and catalog["a"].config.priority == 9
    assert state.removed_providers == {"b"}  # "d" was never configured: no tombstone for it
    # Registering a removed name again brings it back.
    assert "b" in state.with_provider(spec("b")).catalog(configured)

    groups = [GroupSpec("g1", ("a",)), GroupSpec("default")]
    state = state.with_group(GroupSpec("g2", ("a", "c"), "round_robin")).without_group("g1")
    assert [g.name for g in state.groups_over(groups)] == ["default", "g2"]
    assert state.groups_over(groups)[1] == GroupSpec("g2", ("a", "c"), "round_robin")


def test_reverted_restores_one_name_only():
    earlier = ControlState().with_provider(spec("x", priority=1)).without_provider("y")
    later = earlier.with_provider(spec("x", priority=2)).with_provider(spec("y")).with_provider(spec("z"))
    back = later.reverted("provider", "x", earlier).reverted("provider", "y", earlier)
    assert back.providers["x"]["config"]["priority"] == 1
    assert "y" not in back.providers and "y" in back.removed_providers
    assert "z" in back.providers


async def test_round_trip_and_atomic_replacement(tmp_path, monkeypatch):
    store = ControlStore(tmp_path / "data")
    assert store.load() == ControlState()
    first = ControlState().with_provider(spec("x", api_key="sk-1")).with_group(GroupSpec("g", ("x",)))
    await store.save(first)
    assert store.load() == first
    assert store.load().provider_specs()["x"].config.api_key == "sk-1"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ControlStoreError, match="No space left on device"):
        await store.save(first.without_provider("x"))
    monkeypatch.undo()
    assert store.load() == first  # the old document, whole
    assert sorted(os.listdir(tmp_path / "data")) == ["control.json"]  # and no temporary file left behind


@pytest.mark.parametrize("text, problem", [
    ("[]", "not a version 1"),
    ('{"version": 2}', "not a version 1"),
    ('{"version": 1, "providers": []}', "shape"),
    ('{"version": 1, "groups": {"g": {"name": "g"}}}', "failover group 'g'"),
    ('{"version": 1, "providers": {"p": {"name": "q", "type": "fake"}}}', "carries the name 'q'"),
])
def test_damaged_documents_are_named(tmp_path, text, problem):
    (tmp_path / "control.json").write_text(text)
    with pytest.raises(ControlStoreError, match=problem):
        ControlStore(tmp_path).load()
