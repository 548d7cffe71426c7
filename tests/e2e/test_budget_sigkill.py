"""Budget reservations and settled spend survive a SIGKILL (the budget journal, runestone.governance.journal).

A real gateway process with a managed key in a team (both with budgets) and ``[budgets] flush_ms = 200``
(spend is checkpointed to the key store several times during the run, so replay starts from a checkpoint
with journal segments after it). Four clients keep it busy with answers of known cost while three
streams are held open by the upstream (their reservations are in flight for sure); then SIGKILL, and a
restart on the same data directory. After it: the key's and the team's settled spend is what the clients
received, give or take the answers settled in the instant before the kill that were still on their way
(at most one per client: a whole number of answers, never less than received), no reservation is held,
the requests counted are those that ended (the held streams never did), and the log has the one recovery
line with its counts.
"""

from __future__ import annotations

import re

import pytest

from budgettest import ANSWER_USD, budget_config, spend_after_restart, spend_then_sigkill
from gatewaytest import start_gateway_process

ADMIN = {"authorization": "Bearer ak-budget-kill"}
WORKERS = 4
HELD = 3
ENOUGH = 200


async def test_a_sigkill_loses_no_settled_spend_and_leaves_no_reservation_held(tmp_path, gated_factory):
    upstream, gate, _ = await gated_factory(after=1, text="aaa bbb ccc ddd", chunks=1)
    config, url, port = budget_config(tmp_path, upstream, "ak-budget-kill", "[budgets]\nflush_ms = 200\n")
    proc = start_gateway_process(config, port, tmp_path / "log1")
    key_id, received = await spend_then_sigkill(url, proc, gate, admin=ADMIN, team="kill", workers=WORKERS, held=HELD,
                                                enough=ENOUGH)

    # The same data directory, after the kill.
    key, team = await spend_after_restart(config, url, port, tmp_path / "log2", admin=ADMIN, key_id=key_id, team="kill")

    got = sum(received)
    assert all(c == pytest.approx(ANSWER_USD) for c in received)
    # Settled spend: what the clients received, plus at most one answer per client settled just before the kill
    # and not delivered (the pipeline settles, then the answer is written).
    extra = round((key["spent_usd"] - got) / ANSWER_USD, 6)
    assert extra == int(extra) and 0 <= extra <= WORKERS, (key, got)
    assert team["spent_usd"] == pytest.approx(key["spent_usd"])
    # No reservation held: everything not spent remains.
    assert key["reserved_usd"] == 0 and team["reserved_usd"] == 0
    assert key["remaining_usd"] == pytest.approx(500 - key["spent_usd"])
    # Every request that ended was counted, each charged one answer: the answered ones and the workers' last
    # ones; the held streams had not ended.
    assert key["requests"] == len(received) + extra and team["requests"] == key["requests"]
    log = (tmp_path / "log2").read_text()
    m = re.search(r"budget journal replayed .*?: (\d+) ended request\(s\) counted, \$[0-9.]+ charged; 0 unreadable",
                  log)
    assert m, log
    settled = int(m.group(1))
    # How many settlements the replay charges depends on how many came after the last 200 ms checkpoint (none,
    # on a slow enough machine): that the replay charges them is tests/governance/test_journal.py's to show.
    print(f"received {len(received)} answers (${got:.3f}); settled ${key['spent_usd']:.3f} ({extra:.0f} in transit "
          f"at the kill); the replay charged {settled}")
