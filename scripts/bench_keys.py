"""Benchmark (not a test): the gateway's CPU per request with a managed key (a team, budgets on both, limits on
both) against a static key from the configuration, on the same gateway process, in alternating rounds.

Uses scripts/bench.py's process runner and wrk driver (gateway pinned to core 0, fake upstream and wrk on
core 1). Each round is bounded in time; all traffic is on 127.0.0.1. Run: ``.venv/bin/python
scripts/bench_keys.py [--seconds 5] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

ADMIN = "bench-admin"


def admin(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--variants", action="store_true", help="also a managed key with budgets only (no limits)")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-keys-"))
    runner = bench.Runner(workdir)
    fake_port, gw_port = bench.free_port(), bench.free_port()
    config = workdir / "gateway.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = {gw_port}
        [auth]
        api_keys = ["{bench.KEY}"]
        admin_key = "{ADMIN}"
        [data]
        dir = "{workdir / 'data'}"
        [pricing."fake-model"]
        input_per_mtok = 0.15
        output_per_mtok = 0.60
        [[providers]]
        name = "upstream"
        type = "openai"
        [providers.config]
        base_url = "http://127.0.0.1:{fake_port}/v1"
        api_key = "sk-bench"
        models = ["fake-model"]
    """))
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    static_key = bench.KEY
    try:
        fake = runner.spawn([*exe, "fake-provider", "--port", str(fake_port), "--coalesce"], 1, "fake.log")
        bench.wait_port(fake_port, fake)
        gw = runner.spawn([*exe, "serve", "--config", str(config)], 0, "gateway.log")
        bench.wait_port(gw_port, gw)
        big = 10**9  # limits and budgets that are checked and charged on every request but never refuse
        admin(gw_port, "/admin/teams", {"name": "bench-team", "budget": {"usd": 1e6, "period": "month"},
                                        "limits": {"rpm": big, "rph": big, "tpm": big, "max_concurrent": 10_000}})
        managed = admin(gw_port, "/admin/keys", {
            "name": "bench", "team": "bench-team", "models": ["fake-model"], "budget": {"usd": 1e6, "period": "day"},
            "limits": {"rpm": big, "rph": big, "tpm": big, "max_concurrent": 10_000}})["secret"]
        budgets_only = admin(gw_port, "/admin/keys", {"name": "budgets only", "team": "bench-budget",
                                                      "budget": {"usd": 1e6, "period": "day"}})["secret"] \
            if admin(gw_port, "/admin/teams", {"name": "bench-budget", "budget": {"usd": 1e6, "period": "month"}}) \
            else None
        body = {**bench.CHAT, "max_tokens": 64}
        cases = [("static", static_key), ("managed", managed)]
        if args.variants:
            cases.append(("budgets", budgets_only))
        results: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _, key in cases:  # warm both paths up
            bench.KEY = key
            runner.wrk_run(gw_port, body, connections=8, seconds=1)
        for r in range(args.rounds):
            # Every other round in reverse order, so that a drift within a round favours no case.
            for name, key in (cases if r % 2 == 0 else cases[::-1]):
                bench.KEY = key
                cpu0 = bench.cpu_seconds(gw.pid)
                run = runner.wrk_run(gw_port, body, connections=args.connections, seconds=args.seconds)
                cpu = bench.cpu_seconds(gw.pid) - cpu0
                per = cpu * 1000 / max(run.get("requests", 0), 1)
                results[name].append(per)
                print(f"  {name:<8} {run['rps']:>8.0f} req/s  cpu {per:.4f} ms/req  errors {run['non_2xx']}",
                      flush=True)
        s = sorted(results["static"])[len(results["static"]) // 2]
        for name, values in results.items():
            m = sorted(values)[len(values) // 2]
            print(f"median CPU per request, {name}: {m:.4f} ms ({(m / s - 1) * 100:+.1f}% vs the static key)")
    finally:
        runner.stop_all()


if __name__ == "__main__":
    main()
