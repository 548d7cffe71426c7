"""The Responses store: kept per key, bounded by age and by count, and surviving a reopen."""

import pytest

from runestone.config import ConfigError, load_config
from runestone.front.response_store import ResponseStore


def _response(rid: str) -> dict:
    return {"id": rid, "object": "response", "output": [{"type": "message", "role": "assistant", "id": "m" + rid,
                                                          "content": [{"type": "output_text", "text": rid}]}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_response_is_its_keys_alone_and_continues_with_its_output(tmp_path):
    store = ResponseStore(str(tmp_path / "r.sqlite3"))
    await store.put("key-a", _response("resp_1"), [{"id": "msg_in", "type": "message", "role": "user"}])
    got = await store.get("key-a", "resp_1")
    assert got.response["id"] == "resp_1"
    assert [i["id"] for i in got.conversation] == ["msg_in", "mresp_1"]
    assert await store.get("key-b", "resp_1") is None
    assert await store.delete("key-b", "resp_1") is False
    assert await store.delete("key-a", "resp_1") is True
    assert await store.get("key-a", "resp_1") is None
    await store.close()


async def test_retention_days_expire_responses_at_once_and_prune_them_on_write(tmp_path):
    clock = Clock()
    store = ResponseStore(str(tmp_path / "r.sqlite3"), retention_days=1, clock=clock)
    await store.put(None, _response("resp_old"), [])
    clock.now += 86400 - 1
    assert await store.get(None, "resp_old") is not None
    clock.now += 2
    assert await store.get(None, "resp_old") is None  # expired the moment it passed the age
    assert await store.count() == 1
    await store.put(None, _response("resp_new"), [])
    assert await store.count() == 1  # and deleted at the next write
    await store.close()


async def test_max_stored_keeps_the_newest_and_the_store_survives_a_reopen(tmp_path):
    clock = Clock()
    path = str(tmp_path / "r.sqlite3")
    store = ResponseStore(path, max_stored=2, clock=clock)
    for i in range(4):
        clock.now += 1
        await store.put("k", _response(f"resp_{i}"), [])
    await store.close()
    reopened = ResponseStore(path, max_stored=2, clock=clock)
    assert [await reopened.get("k", f"resp_{i}") is not None for i in range(4)] == [False, False, True, True]
    await reopened.close()


def test_the_responses_section_is_configurable(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[responses]\nretention_days = 7\nmax_stored = 50\n")
    cfg = load_config(str(path), env={})
    assert (cfg.responses.retention_days, cfg.responses.max_stored) == (7, 50)
    path.write_text("[responses]\nmax_stored = 0\n")
    with pytest.raises(ConfigError, match="responses.max_stored"):
        load_config(str(path), env={})
