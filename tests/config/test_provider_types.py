"""The registry of provider types is the one place a type is described, and the settings it documents are
the settings that are read."""

import pytest

from runestone.config import (
    DEFAULT_BASE_URLS,
    PROVIDER_TYPE_REGISTRY,
    PROVIDER_TYPES,
    ConfigError,
    ProviderType,
    load_config,
    provider_spec_from_dict,
)
from runestone.control.store import ControlState
from runestone.providers import supervisor


def test_every_enumeration_of_types_is_read_from_the_registry():
    assert PROVIDER_TYPES == tuple(PROVIDER_TYPE_REGISTRY)
    assert DEFAULT_BASE_URLS == {n: t.default_base_url for n, t in PROVIDER_TYPE_REGISTRY.items() if t.default_base_url}
    for name, kind in PROVIDER_TYPE_REGISTRY.items():
        assert isinstance(kind, ProviderType) and kind.name == name
        assert supervisor.ADAPTERS[name] is kind.adapter_class()


def test_capabilities_and_the_transport_come_from_the_type():
    fake = provider_spec_from_dict({"name": "f", "type": "fake"})
    info = supervisor.provider_info(fake, ["m"])
    assert info.capabilities == PROVIDER_TYPE_REGISTRY["fake"].capabilities
    adapter = supervisor.build_adapter(fake)
    assert isinstance(adapter, PROVIDER_TYPE_REGISTRY["fake"].adapter_class())


def test_a_preset_is_refused_on_a_type_without_that_knob():
    with pytest.raises(ConfigError, match='preset = "groq": must be unset: presets apply to type "openai" providers'):
        provider_spec_from_dict({"name": "a", "type": "anthropic", "config": {"preset": "groq"}})


def test_http2_reaches_the_httpx_transport():
    spec = provider_spec_from_dict({"name": "o", "type": "openai", "config": {
        "base_url": "http://127.0.0.1:1/v1", "transport": "httpx", "http2": True}})
    try:
        import h2  # noqa: F401
    except ImportError:
        # Before http2 was wired the provider silently spoke HTTP/1.1; now it says what it needs.
        with pytest.raises(ImportError, match="h2"):
            supervisor.build_adapter(spec)
    else:  # pragma: no cover - h2 is not installed here
        supervisor.build_adapter(spec)


@pytest.mark.parametrize("setting", ['cost_tier = "low"', "retry_attempts = 2"])
def test_retired_settings_are_unknown_keys_in_a_file(tmp_path, setting):
    path = tmp_path / "r.toml"
    path.write_text(f'[[providers]]\nname = "p"\ntype = "fake"\n[providers.config]\n{setting}\n')
    with pytest.raises(ConfigError, match="unknown key providers"):
        load_config(path, env={})


def test_a_registration_persisted_with_retired_settings_still_loads():
    old = {"name": "p", "type": "fake", "config": {"cost_tier": "medium", "retry_attempts": 3, "chunks": 2}}
    specs = ControlState(providers={"p": old}).provider_specs()
    assert specs["p"].config.chunks == 2
