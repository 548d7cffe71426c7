"""The budget journal's crash windows, without HTTP: Governance over a real key store and journal in a temporary
data directory, "killed" (dropped without its final flush) at each point of a checkpoint, and started again.

Each start must charge exactly the settled reservations once, hold no reservation, and count each request
once, whether the process died before a flush, between a new segment and the stored spend's commit, or
between that commit and the deletion of the older segments.
"""

from __future__ import annotations

import logging

import attrs
import pytest

from runestone.config import LimitsConfig
from runestone.front.limits import KeyLimiter
from runestone.governance import Governance, KeyStore, KeyStoreError, SpendJournal
from runestone.routing.executor import ModelRequest

#: $0.001 per output token, input free: a reservation of 4 output tokens is $0.004.
PRICING = {"m": {"input_per_mtok": 0.0, "output_per_mtok": 1000.0}}


@attrs.frozen
class _Target:
    provider: str
    model: str


@attrs.frozen
class _Plan:
    targets: tuple


PLAN = _Plan((_Target("p", "m"),))


def _gov(data) -> Governance:
    gov = Governance(KeyStore(data), KeyLimiter(LimitsConfig()), pricing=PRICING, journal=SpendJournal(data))
    gov.load()
    return gov


def _kill(gov: Governance) -> None:
    """The process dies: nothing more is written (the journal's file is closed as the kernel would)."""
    gov.journal.close()


def _request(key_id: str) -> ModelRequest:
    return ModelRequest("r", key_id, "chat", "m", {"messages": [{"role": "user", "content": ""}], "max_tokens": 4})


async def _setup(data) -> tuple[Governance, str]:
    gov = _gov(data)
    await gov.create_team({"name": "t", "budget": {"usd": 10, "period": "total"}})
    key = await gov.create_key({"name": "k", "team": "t", "budget": {"usd": 1, "period": "total"}})
    return gov, key["id"]


def _spend(gov: Governance, key_id: str) -> tuple[float, float, int, float]:
    key = gov.describe_key(key_id)["spend"]
    team = gov.describe_team("t")["spend"]
    assert team["spent_usd"] == pytest.approx(key["spent_usd"]) and team["requests"] == key["requests"]
    return key["spent_usd"], key["reserved_usd"] + team["reserved_usd"], key["requests"], key["remaining_usd"]


async def test_a_kill_between_flushes_charges_the_settled_and_releases_the_rest(tmp_path, caplog):
    gov, kid = await _setup(tmp_path)
    a, b, c = [await gov.admit_request(_request(kid), PLAN) for _ in range(3)]
    a.settle(0, 4, 0.004)
    await gov.flush()  # checkpoint: a is stored; b and c are carried into the new segment
    b.settle(0, 3, 0.003)
    d = await gov.admit_request(_request(kid), PLAN)
    assert await gov.admit_cached(kid, "m")  # a cached answer: a request, no cost
    d.settle(0, 0, 0.0)  # no answer: gives its reservation back, writes nothing
    _kill(gov)  # c is in flight
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.007), 0, 5, pytest.approx(0.993))
    assert "1 settled reservation(s) charged ($0.003000); 2 reservation(s) in flight at the stop released" \
        in caplog.text
    # The replay was checkpointed: a second start finds nothing to do and the same spend.
    _kill(again)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        third = _gov(tmp_path)
    assert _spend(third, kid) == (pytest.approx(0.007), 0, 5, pytest.approx(0.993))
    assert "replayed" not in caplog.text


async def test_a_kill_between_a_new_segment_and_the_stored_spend_counts_nothing_twice(tmp_path, monkeypatch):
    gov, kid = await _setup(tmp_path)
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 4, 0.004)
    await gov.flush()
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 2, 0.002)
    open_one = await gov.admit_request(_request(kid), PLAN)

    async def fails(rows, floor=None):
        raise KeyStoreError("disk full")

    monkeypatch.setattr(gov.store, "put_spend", fails)
    await gov.flush()  # a new segment was started, but the spend with its number was never stored
    assert open_one.seq in gov._open
    _kill(gov)
    again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.006), 0, 3, pytest.approx(0.994))


async def test_a_kill_after_the_stored_spend_before_the_old_segments_go_counts_nothing_twice(tmp_path, monkeypatch):
    gov, kid = await _setup(tmp_path)
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 4, 0.004)
    held = await gov.admit_request(_request(kid), PLAN)
    monkeypatch.setattr(gov.journal, "drop_before", lambda gen: None)
    await gov.flush()  # stored with the new segment's number; the old segment is still on disk
    held.settle(0, 1, 0.001)  # settled in the new segment, reserved in the old one (carried over)
    _kill(gov)
    again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.005), 0, 2, pytest.approx(0.995))
    assert again.recovered["settled"] == 1 and again.recovered["released"] == 0


async def test_a_line_torn_by_the_kill_is_ignored_and_its_reservation_released(tmp_path, caplog):
    gov, kid = await _setup(tmp_path)
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 4, 0.004)
    torn = await gov.admit_request(_request(kid), PLAN)
    # The process dies while copying the settlement's line: its first bytes are there, not its newline.
    journal = gov.journal
    line = b"S%d %d\n" % (torn.seq, 3_000_000)
    journal._map[journal._off:journal._off + 5] = line[:5]
    _kill(gov)
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.004), 0, 2, pytest.approx(0.996))
    assert again.recovered["malformed_lines"] == 1 and again.recovered["released"] == 1
    assert "1 unreadable line(s)" in caplog.text
