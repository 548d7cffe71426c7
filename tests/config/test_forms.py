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


def test_config_dump_masks_credentials_in_every_url(tmp_path):
    path = tmp_path / "runestone.toml"
    path.write_text('[cluster]\nredis_url = "redis://:s3cret@127.0.0.1:6390/2"\n'
                    '[database]\nurl = "postgresql://rs:s3cret@127.0.0.1:5433/rs"\n'
                    '[[providers]]\nname = "up"\ntype = "openai"\n'
                    '[providers.config]\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\ntransport = "httpx"\n'
                    'proxy = "http://u:s3cret@127.0.0.1:3128"\n')
    config = load_config(path, env={})
    dumped = config_to_dict(config)
    assert "s3cret" not in repr(dumped)
    assert dumped["cluster"]["redis_url"] == "redis://***@127.0.0.1:6390/2"
    assert dumped["database"]["url"] == "postgresql://***@127.0.0.1:5433/rs"
    assert dumped["providers"][0]["config"]["proxy"] == "http://***@127.0.0.1:3128"
    assert config_to_dict(config, redact=False)["cluster"]["redis_url"] == config.cluster.redis_url
