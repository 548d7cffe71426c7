"""The stream's form of a control change: every kind survives the round trip, secrets included; what is
not a change is refused with an error, never applied."""

import pytest

from runestone.cluster.control import decode_change, encode_change
from runestone.config import ConfigError, provider_spec_from_dict
from runestone.control import (
    CreateGroup,
    DeleteGroup,
    RegisterProvider,
    UnregisterProvider,
    UpdateGroup,
    UpdateProvider,
)
from runestone.resilience.failover import GroupSpec


def test_every_change_round_trips():
    spec = provider_spec_from_dict({"name": "p", "type": "openai",
                                    "config": {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-secret",
                                               "models": ["m"], "priority": 3}})
    group = GroupSpec("g", ("p",), "round_robin", 2, 0.25)
    for change in (RegisterProvider(spec), UpdateProvider(spec, 2.5), UnregisterProvider("p", 0.0),
                   CreateGroup(group), UpdateGroup(group), DeleteGroup("g")):
        assert decode_change(encode_change(change)) == change
    assert b"sk-secret" in encode_change(RegisterProvider(spec))  # the other instances need it to serve


def test_what_is_not_a_change_is_refused():
    for data in (b"not json", b'{"op": "drop_tables"}', b'{"op": "delete_group"}',
                 b'{"op": "create_group", "group": {"name": "g", "strategy": "nonsense"}}'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            decode_change(data)
    with pytest.raises(ConfigError):  # validated again where it arrives: this instance's allowed hosts
        decode_change(encode_change(RegisterProvider(provider_spec_from_dict(
            {"name": "p", "type": "openai", "config": {"base_url": "http://10.1.2.3/v1", "models": ["m"]}}))),
            upstream_hosts=("127.0.0.1",))
