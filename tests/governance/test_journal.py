"""The budget journal's crash windows, without HTTP: Governance over a real key store and journal in a temporary
data directory, "killed" (dropped without its final flush) at each point of a checkpoint, and started again.

Each start must charge exactly what the ended requests cost, once, hold no reservation, and count each ended
request once, whether the process died before a flush, between a new segment and the stored spend's commit,
or between that commit and the deletion of the older segments. A request in flight at the kill never ended:
it is neither charged nor counted (as the usage ledger has no row for it).
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


def _gov(data, wall=None) -> Governance:
    extra = {"wall": wall} if wall is not None else {}
    gov = Governance(KeyStore(data), KeyLimiter(LimitsConfig()), pricing=PRICING, journal=SpendJournal(data), **extra)
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


async def test_a_kill_between_flushes_charges_and_counts_what_ended_and_holds_nothing(tmp_path, caplog):
    gov, kid = await _setup(tmp_path)
    a, b, c = [await gov.admit_request(_request(kid), PLAN) for _ in range(3)]
    a.settle(0, 4, 0.004)
    await gov.flush()  # checkpoint: a is stored; b and c are reservations in memory only
    assert _spend(gov, kid)[1:3] == (pytest.approx(0.008 * 2), 1)  # held on the key and on the team
    b.settle(0, 3, 0.003)
    d = await gov.admit_request(_request(kid), PLAN)
    assert await gov.admit_cached(kid, "m")  # a cached answer: a request, no cost
    d.settle(0, 0, 0.0)  # no answer: gives its reservation back, and counts
    _kill(gov)  # c is in flight
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.007), 0, 4, pytest.approx(0.993))
    assert "2 ended request(s) counted, $0.003000 charged; 0 unreadable line(s)" in caplog.text
    assert again.recovered == {"segments": 2, "ended": 2, "charged_usd": pytest.approx(0.003), "malformed_lines": 0}
    # The replay was checkpointed: a second start finds nothing to do and the same spend.
    _kill(again)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        third = _gov(tmp_path)
    assert _spend(third, kid) == (pytest.approx(0.007), 0, 4, pytest.approx(0.993))
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
    open_one.settle(0, 1, 0.001)  # ended in the new segment, reserved before it
    _kill(gov)
    again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.007), 0, 3, pytest.approx(0.993))


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
    assert again.recovered["ended"] == 1 and "released" not in again.recovered


async def test_a_line_torn_by_the_kill_is_ignored_and_its_request_neither_charged_nor_counted(tmp_path, caplog):
    gov, kid = await _setup(tmp_path)
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 4, 0.004)
    await gov.admit_request(_request(kid), PLAN)
    # The process dies while copying the request's end line: its first bytes are there, not its newline.
    journal = gov.journal
    line = gov._accounts[kid].ended + b"3000000\n"
    journal._map[journal._off:journal._off + len(line) - 3] = line[:-3]
    _kill(gov)
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.004), 0, 1, pytest.approx(0.996))
    assert again.recovered["malformed_lines"] == 1 and again.recovered["ended"] == 1
    assert "1 unreadable line(s)" in caplog.text


async def test_segments_are_sized_for_what_a_flush_interval_writes_and_a_kill_after_one_filled_counts_each_once(
        tmp_path):
    gov, kid = await _setup(tmp_path)
    journal = gov.journal

    def segments() -> list[int]:
        return [p.stat().st_size for p in sorted(tmp_path.glob("budget-journal.*"), key=lambda p: int(p.suffix[1:]))]

    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 1, 0.000001)
    await gov.flush()
    # A quiet interval: the smallest segments, the current one and the next, made by the checkpoint ahead
    # of the next rotation.
    assert segments() == [256 << 10, 256 << 10]
    first, n = journal.gen, 1
    for _ in range(20_000):  # until the segment is full (about 5,000 requests' lines)
        lease = await gov.admit_request(_request(kid), PLAN)
        lease.settle(0, 1, 0.000001)
        n += 1
        if journal.gen != first:
            break
    assert journal.gen == first + 1 and segments() == [256 << 10, 512 << 10]  # went on in a larger one
    await gov.admit_request(_request(kid), PLAN)  # in flight at the kill
    _kill(gov)
    again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(n * 0.000001), 0, n, pytest.approx(1 - n * 0.000001))
    assert again.recovered["ended"] == n - 1


async def test_a_line_counts_in_the_period_its_request_was_admitted_in(tmp_path):
    day = 86400.0
    now = [20_000 * day + 3600]  # 01:00 UTC of a day
    gov = _gov(tmp_path, wall=lambda: now[0])
    key = await gov.create_key({"name": "k", "budget": {"usd": 1, "period": "day"}})
    kid = key["id"]
    lease = await gov.admit_request(_request(kid), PLAN)
    lease.settle(0, 4, 0.004)
    _kill(gov)
    # Started again the same day: charged; a day later (no flush stored it): the new day's budget is whole.
    assert _gov(tmp_path, wall=lambda: now[0] + 60).describe_key(kid)["spend"]["spent_usd"] == pytest.approx(0.004)
    gov = _gov(tmp_path, wall=lambda: now[0] + day)
    spend = gov.describe_key(kid)["spend"]
    assert (spend["spent_usd"], spend["requests"], spend["remaining_usd"]) == (0, 0, 1)


async def test_an_earlier_versions_segments_are_replayed_as_that_version_did(tmp_path, caplog):
    """A journal left by a version that wrote a line per reservation (R), per settlement (S) and per carried
    reservation (C): its settled reservations are charged, the others released, each reservation counted."""
    gov, kid = await _setup(tmp_path)
    floor = gov._journal_floor
    _kill(gov)
    wall = int(gov.wall())
    (tmp_path / f"budget-journal.{floor}").write_bytes(
        b"R1 4000000 %d %s t\nR2 4000000 %d %s t\nS1 3000000\n" % (wall, kid.encode(), wall, kid.encode())
        + b"\0" * 64)
    (tmp_path / f"budget-journal.{floor + 1}").write_bytes(
        b"C2 4000000 %d %s t\nR3 4000000 %d %s t\nS2 1000000\n" % (wall, kid.encode(), wall, kid.encode()))
    with caplog.at_level(logging.WARNING, "runestone.governance"):
        again = _gov(tmp_path)
    assert _spend(again, kid) == (pytest.approx(0.004), 0, 3, pytest.approx(0.996))
    assert again.recovered["ended"] == 2 and again.recovered["released"] == 1
    assert "1 reservation(s) of an earlier version in flight at the stop released ($0.004000)" in caplog.text
