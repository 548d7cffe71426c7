"""Admission bench (not a test): what admission, settlement and headers cost per request in-process, a static
key with scripts/bench's limits against a managed key (a team, budgets on both, limits on the key and, unless
``--team-without-limits``, on the team), with and without the caches cold.

No HTTP and no gateway: one Governance over a key store and a spend journal in a temporary directory, the
pipeline's calls on it in a loop (``admit_request``, ``headers``, ``settle``, ``release``), a flush after each
round. ``--cold`` runs a stretch of unrelated work (JSON parsing, a walk over a large list of dicts) before the
admission and again before the settlement, and times only the two calls: in a gateway, the rest of a request
runs between them and much of what they touch has left the CPU's caches by then. Warm, the figure is the code's
own cost; cold, it is closer to what a request pays for it. Rounds alternate the keys; the median is printed.
Run: ``.venv/bin/python scripts/bench_admission.py [--requests 20000] [--rounds 5] [--cold]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runestone.config import LimitsConfig  # noqa: E402
from runestone.front.limits import KeyLimiter  # noqa: E402
from runestone.governance import Governance, KeyStore, SpendJournal  # noqa: E402
from runestone.routing.executor import ModelRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIG, FAKE_PRICE, KEY_LIMITS as LIMITS  # noqa: E402 - the managed key's, as scripts/bench's

MODEL = "fake-model"
PRICING = {MODEL: FAKE_PRICE}
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello benchmark"}], "max_tokens": 64}
STATIC_KEY = "bench-key"


#: What admission reads of the pipeline's plan: its targets' providers and models.
PLAN = SimpleNamespace(targets=(SimpleNamespace(provider="upstream", model=MODEL),))


class Thrash:
    """Unrelated work that pushes what admission touched out of the caches (about what parsing and relaying
    a request touches): 400 small JSON documents parsed, 4,000 dicts of a 60,000-dict list read."""

    def __init__(self) -> None:
        self.docs = [orjson.dumps({"id": i, "choices": [{"delta": {"content": "x" * 20}}], "model": f"m{i}"})
                     for i in range(400)]
        self.objs = [{"a": i, "b": str(i), "c": [i]} for i in range(60_000)]
        self.rng = random.Random(1)

    def __call__(self) -> int:
        total = 0
        for doc in self.docs:
            total += len(orjson.loads(doc))
        start = self.rng.randrange(len(self.objs) - 4_000)
        for obj in self.objs[start:start + 4_000]:
            total += obj["a"]
        return total


async def run(args) -> None:
    data = tempfile.mkdtemp(prefix="runestone-bench-admission-")
    limits = LimitsConfig(max_concurrent_per_tenant=100_000, requests_per_minute=BIG, tokens_per_minute=BIG * 1000)
    gov = Governance(KeyStore(data), KeyLimiter(limits), pricing=PRICING, journal=SpendJournal(data))
    gov.load()
    team = {"name": "bench-team", "budget": {"usd": 1e6, "period": "month"}}
    await gov.create_team(team if args.team_without_limits else {**team, "limits": LIMITS})
    managed = (await gov.create_key({"name": "bench", "team": "bench-team", "models": [MODEL],
                                     "budget": {"usd": 1e6, "period": "day"}, "limits": LIMITS}))["id"]
    cases = {"static": STATIC_KEY, "managed": managed}
    thrash = Thrash() if args.cold else None
    n = args.requests if not args.cold else max(1, args.requests // 5)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, key_id in (cases.items() if r % 2 == 0 else reversed(cases.items())):
            request = ModelRequest("r", key_id, "chat", MODEL, BODY)
            spent = 0.0
            clock = time.perf_counter
            if thrash is None:
                t0 = clock()
                for _ in range(n):
                    lease = await gov.admit_request(request, PLAN)
                    lease.headers
                    lease.settle(9, 20, 0.0000135)
                    lease.release()
                spent = clock() - t0
            else:
                for _ in range(n):
                    thrash()
                    t0 = clock()
                    lease = await gov.admit_request(request, PLAN)
                    lease.headers
                    t1 = clock()
                    thrash()
                    t2 = clock()
                    lease.settle(9, 20, 0.0000135)
                    lease.release()
                    spent += (t1 - t0) + (clock() - t2)
            results[name].append(spent / n * 1e6)
            await gov.flush()
        print(f"  round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f} us" for k, v in results.items()), flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print(f"median per request ({'cold' if args.cold else 'warm'} caches, {n} requests a round): static key "
          f"{med['static']:.2f} us, managed key {med['managed']:.2f} us (+{med['managed'] - med['static']:.2f} us)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000, help="per round and key (a fifth of it with --cold)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="unrelated work between the calls (see above)")
    p.add_argument("--team-without-limits", action="store_true", help="the team has a budget and no limits")
    trio.run(run, p.parse_args())


if __name__ == "__main__":
    main()
