"""Benchmark (not a test): the gateway's CPU per request with a managed key (a team, budgets on both, limits on
both; ``--team-without-limits``: on the key only) against a static key from the configuration.

Two ways, both interleaved on the same machine:

- default: one gateway process, the two keys in alternating rounds (each round reversed from the last);
- ``--paired``: two identical gateway processes on the same core, loaded *at the same time*, one with each
  key, the roles swapped every round. Both see the same contention from whatever else the machine runs,
  so their ratio holds on a busy machine where the alternating rounds' CPU per request drifts by more than
  the difference measured;
- ``--baseline DIR``: this checkout's gateway and one from another checkout, loaded at the same time, both
  with the managed key (``--static``: both with the static key): what a change does to the managed path,
  more finely than the managed/static ratio shows it.

Uses scripts/bench.py's process runner and wrk driver (gateways pinned to core 0, fake upstream and wrk on
core 1). Each round is bounded in time; all traffic is on 127.0.0.1. Run: ``.venv/bin/python
scripts/bench_keys.py [--seconds 5] [--rounds 3] [--paired | --baseline DIR] [--redis]``; ``--redis`` starts
a redis-server and shares the limits and budgets through it ([cluster] redis_url: the managed key's admission
is one script call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def start_redis(runner: bench.Runner, workdir: Path) -> str:
    """A redis-server of the benchmark's own (core 1, nothing saved): its URL."""
    import shutil

    port = bench.free_port()
    binary = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    proc = runner.spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                         "--dir", str(workdir)], 1, "redis.log")
    bench.wait_port(port, proc)
    return f"redis://127.0.0.1:{port}/0"


def start_gateway(runner: bench.Runner, workdir: Path, fake_port: int, name: str, redis_url: str = "",
                  static_limits: bool = False, team_limits: bool = True, checkout: Path | None = None) -> tuple:
    """A gateway with the static key and a managed key (team, budgets, limits): (process, port, managed secret,
    budgets-only secret). With ``redis_url``, its limits and budgets are shared through that Redis; with
    ``static_limits``, the static key has scripts/bench's per-key limits (without, it has none); without
    ``team_limits``, the managed key's team has its budget only (the key keeps its own limits); with
    ``checkout``, the gateway runs that checkout's code (its own first on the path, as scripts/bench's
    ``--baseline``)."""
    port = bench.free_port()
    config = workdir / f"{name}.toml"
    cluster = f'[cluster]\nredis_url = "{redis_url}"\n' if redis_url else ""
    cluster += bench.LIMITS + "\n" if static_limits else ""
    config.write_text(cluster + bench.PRICING + textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = {port}
        [auth]
        api_keys = ["{bench.KEY}"]
        admin_key = "{bench.ADMIN}"
        [data]
        dir = "{workdir / (name + '-data')}"
        [[providers]]
        name = "upstream"
        type = "openai"
        [providers.config]
        base_url = "http://127.0.0.1:{fake_port}/v1"
        api_key = "sk-bench"
        models = ["fake-model"]
    """))
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    where = bench.from_checkout(checkout) if checkout is not None else {}
    gw = runner.spawn([*exe, "serve", "--config", str(config)], 0, f"{name}.log", **where)
    bench.wait_port(port, gw)
    managed = bench.managed_key(port, team_limits)
    bench.admin(port, "/admin/teams", {"name": "bench-budget", "budget": {"usd": 1e6, "period": "month"}})
    budgets_only = bench.admin(port, "/admin/keys", {"name": "budgets only", "team": "bench-budget",
                                                     "budget": {"usd": 1e6, "period": "day"}})["secret"]
    return gw, port, managed, budgets_only


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def alternating(args, runner: bench.Runner, gw, port: int, cases: list, body: dict) -> None:
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _, key in cases:  # warm both paths up
        runner.wrk_run(port, body, connections=8, seconds=1, key=key)
    for r in range(args.rounds):
        # Every other round in reverse order, so that a drift within a round favours no case.
        for name, key in (cases if r % 2 == 0 else cases[::-1]):
            cpu0 = bench.cpu_seconds(gw.pid)
            run = runner.wrk_run(port, body, connections=args.connections, seconds=args.seconds, key=key)
            per = (bench.cpu_seconds(gw.pid) - cpu0) * 1000 / max(run.get("requests", 0), 1)
            results[name].append(per)
            print(f"  {name:<8} {run['rps']:>8.0f} req/s  cpu {per:.4f} ms/req  errors {run['non_2xx']}", flush=True)
    s = median(results["static"])
    for name, values in results.items():
        m = median(values)
        print(f"median CPU per request, {name}: {m:.4f} ms ({(m / s - 1) * 100:+.1f}% vs the static key)")


def paired(args, runner: bench.Runner, gateways: list, body: dict) -> None:
    """Both gateways loaded at once, one per key; roles swapped each round; the ratio per round."""
    ratios: list[float] = []
    figures: dict[str, list[float]] = {"static": [], "managed": []}

    for gw, port, managed, _ in gateways:  # warm both paths of both up
        for key in (bench.KEY, managed):
            runner.wrk_run(port, body, connections=8, seconds=1, key=key)
    for r in range(args.rounds):
        (a, b) = gateways if r % 2 == 0 else gateways[::-1]
        outs = bench.measured_together(runner, {"static": (a[0].pid, a[1]), "managed": (b[0].pid, b[1])}, body,
                                       args.connections, args.seconds, keys={"static": bench.KEY, "managed": b[2]})
        line = []
        for name in ("static", "managed"):
            out = outs[name]
            figures[name].append(out["cpu_ms_per_request"])
            line.append(f"{name} {out['rps']:>6.0f} req/s cpu {out['cpu_ms_per_request']:.4f} ms/req "
                        f"errors {out['non_2xx']}")
        ratios.append(outs["managed"]["cpu_ms_per_request"] / outs["static"]["cpu_ms_per_request"])
        print(f"  round {r + 1}: " + "  |  ".join(line) + f"  managed/static {ratios[-1]:.3f}", flush=True)
    print(f"median CPU per request, static: {median(figures['static']):.4f} ms; managed: "
          f"{median(figures['managed']):.4f} ms; median of the rounds' ratios: {(median(ratios) - 1) * 100:+.1f}% "
          f"(lowest {(min(ratios) - 1) * 100:+.1f}%, highest {(max(ratios) - 1) * 100:+.1f}%)")


def against_baseline(args, runner: bench.Runner, gateways: list, body: dict) -> None:
    """This checkout's gateway and the baseline's loaded at once, both with their managed key (or both
    with the static key: ``--static``): the ratio of their CPU per request, per round."""
    ratios: list[float] = []
    which = "static" if args.static else "managed"
    keys = {name: bench.KEY if args.static else gw[2] for name, gw in zip(("gateway", "baseline"), gateways)}
    servers = {name: (gw[0].pid, gw[1]) for name, gw in zip(("gateway", "baseline"), gateways)}
    for name, (_pid, port) in servers.items():  # warm up
        runner.wrk_run(port, body, connections=8, seconds=1, key=keys[name])
    for r in range(args.rounds):
        outs = bench.measured_together(runner, servers, body, args.connections, args.seconds, keys=keys)
        g, b = outs["gateway"]["cpu_ms_per_request"], outs["baseline"]["cpu_ms_per_request"]
        ratios.append(g / b)
        print(f"  round {r + 1}: gateway {g:.4f} ms/req (errors {outs['gateway']['non_2xx']})  |  baseline "
              f"{b:.4f} ms/req (errors {outs['baseline']['non_2xx']})  gateway/baseline {ratios[-1]:.3f}", flush=True)
    print(f"{which} key, CPU per request, this checkout / the baseline: median of the rounds' ratios "
          f"{median(ratios):.3f}x (lowest {min(ratios):.3f}x, highest {max(ratios):.3f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="streamed answers (scripts/bench's stream case) instead")
    p.add_argument("--variants", action="store_true", help="also a managed key with budgets only (no limits)")
    p.add_argument("--paired", action="store_true", help="two gateways loaded at once, one per key (see above)")
    p.add_argument("--static-limits", action="store_true",
                   help="give the static key scripts/bench's per-key limits ([limits] far above the load, as "
                        "scripts/bench runs it); without, the static key has no limits at all")
    p.add_argument("--team-without-limits", action="store_true",
                   help="the managed key's team has a budget and no limits (the key has a team, a budget and "
                        "limits); without, the team has limits too")
    p.add_argument("--redis", action="store_true",
                   help="limits and budgets shared through a redis-server the benchmark starts ([cluster] redis_url)")
    p.add_argument("--baseline", metavar="DIR",
                   help="load this checkout's gateway and one from DIR (another checkout: git worktree add DIR "
                        "<rev>) at the same time, both with the managed key: how a change moves the managed "
                        "path itself, which the managed/static ratio shows only within its wider noise")
    p.add_argument("--static", action="store_true", help="with --baseline: both with the static key instead")
    args = p.parse_args()
    if args.baseline is not None:
        args.baseline = bench.checkout(p, args.baseline)
    elif args.static:
        p.error("--static goes with --baseline DIR")
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-keys-"))
    runner = bench.Runner(workdir)
    fake_port = bench.free_port()
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    body = {**bench.CHAT, "max_tokens": 64, **({"stream": True} if args.stream else {})}
    try:
        fake = runner.spawn([*exe, "fake-provider", "--port", str(fake_port), "--coalesce"], 1, "fake.log")
        bench.wait_port(fake_port, fake)
        redis_url = start_redis(runner, workdir) if args.redis else ""
        if args.baseline is not None:
            against_baseline(args, runner, [start_gateway(runner, workdir, fake_port, name, redis_url,
                                                          args.static_limits, not args.team_without_limits, where)
                                            for name, where in (("gateway", None), ("baseline", args.baseline))],
                             body)
            return
        if args.paired:
            paired(args, runner, [start_gateway(runner, workdir, fake_port, n, redis_url, args.static_limits,
                                                not args.team_without_limits)
                                  for n in ("gw-a", "gw-b")], body)
            return
        gw, port, managed, budgets_only = start_gateway(runner, workdir, fake_port, "gateway", redis_url,
                                                        args.static_limits, not args.team_without_limits)
        cases = [("static", bench.KEY), ("managed", managed)]
        if args.variants:
            cases.append(("budgets", budgets_only))
        alternating(args, runner, gw, port, cases, body)
    finally:
        runner.stop_all()


if __name__ == "__main__":
    main()
