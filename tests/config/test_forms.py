"""The dict forms are the runtime's plain data: what a state dump or control.json holds is strict JSON."""

import json

from runestone.config import config_to_dict, load_config


def test_config_dump_is_strict_json_as_every_state_dump(tmp_path):
    path = tmp_path / "runestone.toml"
    path.write_text('[retry]\nbackoff_factor = inf\n[[providers]]\nname = "f"\ntype = "fake"\n'
                    '[providers.config]\nmodels = ["a", "b"]\n')
    dumped = config_to_dict(load_config(path, env={}))
    text = json.dumps(dumped, allow_nan=False)  # an infinity reads "inf", as in GET /admin/state
    assert json.loads(text)["retry"]["backoff_factor"] == "inf"
    assert [p["name"] for p in dumped["providers"]] == ["f"]
    assert dumped["providers"][0]["config"]["models"] == ["a", "b"]
