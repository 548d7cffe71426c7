"""A managed key's admission with the limiter's fair queue (``[limits] queue``), without HTTP, on MockClock: a
request that waited its turn is judged again when its turn comes (the budget as it is then), and what it
took from the limiter is given back when it is refused."""

from __future__ import annotations

import pytest
import trio

from runestone.config import LimitsConfig
from runestone.front.limits import KeyLimiter
from runestone.governance import Governance
from runestone.routing.errors import GatewayError
from runestone.routing.executor import ModelRequest

from test_journal import PLAN, PRICING


def _request(key_id: str) -> ModelRequest:
    return ModelRequest("r", key_id, "chat", "m", {"messages": [{"role": "user", "content": ""}], "max_tokens": 4})


async def test_a_queued_request_is_judged_again_when_its_turn_comes(autojump_clock):
    limiter = KeyLimiter(LimitsConfig(queue=True, queue_size=5, queue_timeout_ms=60_000))
    gov = Governance(None, limiter, pricing=PRICING)
    team = await gov.create_team({"name": "t", "limits": {"max_concurrent": 1}})
    key = await gov.create_key({"name": "k", "team": team["name"], "budget": {"usd": 0.01, "period": "total"}})
    first = await gov.admit_request(_request(key["id"]), PLAN)  # reserves $0.004 of $0.01
    outcome: list = []

    async def second() -> None:
        try:
            outcome.append(await gov.admit_request(_request(key["id"]), PLAN))
        except GatewayError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(second)
        await trio.sleep(1)
        assert outcome == []  # waiting: the team allows one request at a time
        first.settle(0, 7, 0.007)  # the first cost more than the second's reservation leaves room for
        first.release()
    refused = outcome[0]
    assert isinstance(refused, GatewayError) and refused.status == 429 and refused.code == "budget_exceeded"
    # The refused request gave back its place: the next one is admitted at once (and fits what is left).
    other = await gov.create_key({"name": "other", "team": "t"})
    spend = gov.describe_key(key["id"])["spend"]
    assert spend["spent_usd"] == pytest.approx(0.007) and spend["reserved_usd"] == 0
    with trio.fail_after(1):
        lease = await gov.admit_request(_request(other["id"]), PLAN)
    lease.release()
