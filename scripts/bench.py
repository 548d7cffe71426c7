"""Gateway benchmark (not a test): Runestone's CPU per request and throughput as a multiple of a featureless
relay's on the same stack, beside the figures direct to the upstream.

Three servers run for the whole session: the fake upstream (``runestone fake-provider --coalesce``), the gateway
with every feature on as a user would run it (client keys, per-key limits far above the load, routing,
breakers, retries, telemetry, the SQLite usage ledger; the response cache stays off, as identical requests would
all be hits), and ``relay_floor.py`` (trio sockets, httptools, orjson: auth, one upstream, pooled connections,
nothing else; run with COALESCE=1 so that it writes once per upstream read, as the gateway does). The relay is
not ours: it lives in the shared folder beside the project (``--relay PATH`` to name another).

Layout on two or more cores: the gateway and the relay pinned to core 0 (only one of them is loaded at a time),
the fake upstream and the load generator (wrk, installed from Debian's packages when missing) on core 1.
``--workers N`` runs the gateway as ``serve --workers N`` on cores 0..N-1 (so on two cores its second worker
shares core 1 with the upstream and wrk), with a ``redis-server`` for ``[cluster] redis_url`` when N > 1, and
counts the CPU of the parent and every worker.

These machines are noisy (the same configuration's CPU per request has moved by 2x within half an hour), so
each case runs in rounds, and each round measures direct, relay and gateway back to back (in an order that
rotates from round to round); the ratio is taken within each round and the table shows the median over the
rounds with the lowest and highest. CPU is the server process's user + system time from /proc around each run,
divided by the requests wrk completed. Every run is bounded by time (wrk ``-d``, and a subprocess timeout), the
soak also by count; all traffic is on 127.0.0.1.

``--managed-key`` adds a fourth target in every round: the same gateway process, loaded with a managed key (in a
team with a monthly budget; a daily budget, its model listed and the static key's set of limits of its own: issue
15's "key that has a team, a budget and limits"), measured right after or right before its static key (in turns,
round by round); the table shows its CPU per request beside the static key's and the relay's, and the per-round ratio of
the two keys. The fake model is priced for both keys then (0.15 and 0.60 USD per million tokens), so that each
reservation and settlement is a real amount.

``--baseline DIR`` runs a second gateway from another checkout of the project (``git worktree add DIR main``)
on the same upstream and config, as a fourth target in every round: a before/after comparison measured
interleaved, each side's CPU ratio taken against the relay of the same round. With ``--paired`` the two
gateways are loaded *at the same time* in each round (a wrk each, both on core 0; direct and the relay still
run on their own): both then see the same contention from whatever else the machine runs, so their ratio holds
where back-to-back runs drift by more than a small difference (the two gateways' req/s and latency are then a
shared core's, and their ratios to the relay are taken against a relay that had the core to itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
KEY = "bench-key"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello benchmark"}]}
STREAM_CHUNKS = 20
RELAY_NAME = "../shared/bench/relay_floor.py"
#: (label, streaming, connections): what the table shows.
CASES = {
    "plain-1": ("non-stream, c=1", False, 1),
    "plain-32": ("non-stream, c=32", False, 32),
    "stream-32": (f"{STREAM_CHUNKS}-chunk stream, c=32", True, 32),
}
TARGETS = ("direct", "relay", "gateway")

# A response() callback would make wrk hand every response to Lua (and cost core 1 CPU the upstream needs);
# wrk counts non-2xx answers itself. The soak's script stops each thread after a count.
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{body}'
"""
LUA_LIMIT = """
local count = 0
function response(status, headers, body)
  count = count + 1
  if count >= {limit} then
    wrk.thread:stop()
  end
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the workers of ``serve --workers N``)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and its children: one gateway, or a ``--workers`` parent and its workers."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:  # it exited meanwhile
            pass
    return total


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def checkout(p: argparse.ArgumentParser, value: str | Path) -> Path:
    """``--baseline``'s directory, resolved, or the parser's error when it is not a checkout of the project."""
    path = Path(value).resolve()
    if not (path / "runestone" / "__init__.py").is_file():
        p.error(f"--baseline {value}: not a checkout of the project (no runestone/__init__.py)")
    return path


def from_checkout(path: Path) -> dict:
    """``Runner.spawn``'s arguments that run a gateway from the checkout at ``path`` (its own code first on
    the path)."""
    return {"env": {"PYTHONPATH": str(path)}, "cwd": path}


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.returncode}); see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def wait_workers(port: int, count: int, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    """Wait until ``count`` distinct worker pids answered ``/health/detailed`` (fresh connections each)."""
    pids: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(pids) < count:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited early ({proc.returncode}); see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET /health/detailed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                          "Connection: close\r\n\r\n".encode())
                raw = b""
                while data := s.recv(65536):
                    raw += data
            pids.add(json.loads(raw.split(b"\r\n\r\n", 1)[1])["worker"]["pid"])
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.05)
    if len(pids) < count:
        raise SystemExit(f"only {len(pids)} of {count} workers answered within {seconds:g} s")


def ensure_wrk() -> str | None:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk from Debian's packages ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], **quiet)
    return shutil.which("wrk")


def find_relay(given: str | None) -> Path:
    """``--relay``, else ``../shared/bench/relay_floor.py`` from the project root (from the main checkout's
    root when this is a git worktree, whose root is elsewhere)."""
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"--relay {given}: no such file")
        return path
    roots = [ROOT]
    try:
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if common:
            roots.append(Path(common).parent)
    except (OSError, subprocess.SubprocessError):
        pass
    for root in roots:
        path = (root / RELAY_NAME).resolve()
        if path.is_file():
            return path
    raise SystemExit(f"the relay floor is not at {ROOT / RELAY_NAME}; name it with --relay PATH")


def machine() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = m.group(1).strip() if m else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{os.cpu_count()} vCPU ({model or 'unknown CPU'}), Python {sys.version.split()[0]}"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]  # milliseconds


class Runner:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
        self.wrk = ensure_wrk()
        if self.wrk is None:
            raise SystemExit("wrk is not installed and could not be installed (apt-get install wrk)")
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], core: int | str | None, log: str, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        if self.pin and core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
        base.pop("PORT", None)
        base.pop("COALESCE", None)
        out = open(self.workdir / log, "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**base, **(env or {})}, cwd=cwd)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def wrk_run(self, port: int, body: dict, *, connections: int, seconds: float, limit: int = 0,
                key: str | None = None) -> dict:
        """One wrk run against ``port`` with ``key`` (default ``KEY``); two may run at once on different ports."""
        script = self.workdir / f"post-{int(body.get('stream', False))}-{limit}-{port}.lua"
        text = LUA.format(key=key or KEY, body=json.dumps(body, separators=(",", ":")))
        if limit:
            text += LUA_LIMIT.format(limit=limit)
        script.write_text(text)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{math.ceil(seconds)}s", "--latency", "-s", str(script), url]
        if self.pin:
            argv = ["taskset", "-c", "1", *argv]
        before = os.times()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        after = os.times()
        text = out.stdout
        result = {"wrk_cpu_s": round((after.children_user + after.children_system)
                                     - (before.children_user + before.children_system), 3)}
        m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
        result["requests"] = int(m.group(1)) if m else 0
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        result["rps"] = float(m.group(1)) if m else 0.0
        for q in ("50", "99"):
            m = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", text, re.M)
            result[f"p{q}_ms"] = parse_duration(m.group(1)) if m else float("nan")
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        result["non_2xx"] = int(errors.group(1)) if errors else 0
        sock_err = re.search(r"Socket errors: (.*)", text)
        result["socket_errors"] = sock_err.group(1) if sock_err else ""
        return result


def measured(runner: Runner, pid: int, port: int, body: dict, connections: int, seconds: float,
             key: str | None = None) -> dict:
    """One wrk run against ``port`` (with client key ``key``, default ``KEY``) with the CPU the process ``pid``
    (and its workers) spent on it, per request."""
    cpu0 = tree_cpu_seconds(pid)
    result = runner.wrk_run(port, body, connections=connections, seconds=seconds, key=key)
    cpu = tree_cpu_seconds(pid) - cpu0
    result["cpu_ms_per_request"] = cpu * 1000 / max(result["requests"], 1)
    return result


def measured_together(runner: Runner, servers: dict, body: dict, connections: int, seconds: float,
                      keys: dict | None = None) -> dict:
    """:func:`measured` for every ``servers`` entry (name -> (pid, port)) at the same time, a wrk each (with
    the client key ``keys[name]`` where given)."""
    out: dict = {}
    keys = keys or {}

    def one(name: str, pid: int, port: int) -> None:
        out[name] = measured(runner, pid, port, body, connections, seconds, keys.get(name))

    threads = [threading.Thread(target=one, args=(name, pid, port)) for name, (pid, port) in servers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 90)
    missing = set(servers) - set(out)
    if missing:
        raise SystemExit(f"bench: no result from the paired run of {', '.join(sorted(missing))}")
    return out


def ttfb_probe(port: int, body: dict, n: int) -> float:
    """Median milliseconds from sending a streaming request to reading its first event (one connection)."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(head + payload)
            buf = b""
            first = None
            while True:
                data = s.recv(65536)
                if not data:
                    raise SystemExit("connection closed during the TTFB probe")
                buf += data
                if first is None and b"\r\n\r\n" in buf and b"data:" in buf:
                    first = time.perf_counter()
                if buf.endswith(b"0\r\n\r\n"):
                    break
            samples.append((first - t0) * 1000)
    samples.sort()
    return samples[len(samples) // 2]


def ratio_of(rounds: list[dict], target: str, floor: str = "relay", digits: int = 2) -> dict | None:
    """The per-round CPU ratio ``target`` / ``floor``: median, lowest, highest."""
    ratios = [r[target]["cpu_ms_per_request"] / r[floor]["cpu_ms_per_request"]
              for r in rounds if r[floor]["cpu_ms_per_request"] > 0]
    return {"median": round(statistics.median(ratios), digits), "min": round(min(ratios), digits),
            "max": round(max(ratios), digits)} if ratios else None


def summarize(rounds: list[dict], targets: tuple = TARGETS) -> dict:
    """Medians over the rounds, and the per-round CPU ratio gateway / relay as median, lowest, highest."""
    out: dict = {}
    for target in targets:
        runs = [r[target] for r in rounds]
        out[target] = {key: round(statistics.median(run[key] for run in runs), 4)
                       for key in ("rps", "cpu_ms_per_request", "p50_ms", "p99_ms")}
        out[target]["errors"] = sum(run["non_2xx"] for run in runs)
        out[target]["socket_errors"] = sorted({run["socket_errors"] for run in runs if run["socket_errors"]})
    rps_ratios = [r["gateway"]["rps"] / r["relay"]["rps"] for r in rounds if r["relay"]["rps"] > 0]
    out["cpu_ratio"] = ratio_of(rounds, "gateway")
    if "baseline" in targets:
        out["baseline_cpu_ratio"] = ratio_of(rounds, "baseline")
        out["vs_baseline"] = ratio_of(rounds, "gateway", "baseline")
    if "managed" in targets:
        out["managed_cpu_ratio"] = ratio_of(rounds, "managed")
        out["managed_vs_static"] = ratio_of(rounds, "managed", "gateway", 3)
    out["rps_ratio"] = round(statistics.median(rps_ratios), 2) if rps_ratios else None
    return out


def _ratio_text(ratio: dict | None, paired: bool) -> str:
    if paired:  # the gateways shared core 0, the relay had it to itself: no ratio of the two
        return "(paired)"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a"


def _side_row(label: str, run: dict, ratio_text: str) -> None:
    """A row under a case's for another gateway target (the baseline, the managed key): its own columns only."""
    print(f"{'  ' + label:<24} | {'':>12} {'':>7} | {'':>11} {'':>8} | {run['rps']:>15.0f} "
          f"{run['cpu_ms_per_request']:>6.3f}ms {run['p50_ms']:>5.2f}ms {run['p99_ms']:>5.2f}ms | {ratio_text:>16}")


def print_table(cases: list[dict], rounds: int, seconds: float, paired: bool = False) -> None:
    print(f"\nmedians of {rounds} interleaved rounds of {math.ceil(seconds)} s per target; CPU = server process "
          "CPU per request; ratio = Runestone / relay, per round: median (lowest-highest)\n")
    if paired:
        print("--paired: Runestone and the baseline were loaded at the same time, sharing core 0 (their req/s, "
              "latency and CPU are a shared core's); their ratio to each other is the figure, not to the relay\n")
    header = (f"{'case':<24} | {'direct req/s':>12} {'p50':>7} | {'relay req/s':>11} {'CPU':>8} | "
              f"{'Runestone req/s':>15} {'CPU':>8} {'p50':>7} {'p99':>7} | {'CPU ratio':>16} {'req/s ratio':>11}")
    print(header)
    print("-" * len(header))
    for case in cases:
        d, r, g = case["direct"], case["relay"], case["gateway"]
        ratio_text = _ratio_text(case["cpu_ratio"], paired)
        print(f"{case['case']:<24} | {d['rps']:>12.0f} {d['p50_ms']:>5.2f}ms | {r['rps']:>11.0f} "
              f"{r['cpu_ms_per_request']:>6.3f}ms | {g['rps']:>15.0f} {g['cpu_ms_per_request']:>6.3f}ms "
              f"{g['p50_ms']:>5.2f}ms {g['p99_ms']:>5.2f}ms | {ratio_text:>16} {case['rps_ratio'] or 0:>10.2f}x")
        if "baseline" in case:
            _side_row("baseline", case["baseline"], _ratio_text(case["baseline_cpu_ratio"], paired))
            v = case["vs_baseline"]
            if v:
                how = " (the two loaded at the same time)" if paired else ""
                print(f"  Runestone CPU / baseline CPU, per round{how}: {v['median']:.2f}x "
                      f"({v['min']:.2f}-{v['max']:.2f})")
        if "managed" in case:
            _side_row("managed key", case["managed"], _ratio_text(case["managed_cpu_ratio"], False))
            v = case["managed_vs_static"]
            if v:
                print(f"  managed key CPU / static key CPU, per round: {(v['median'] - 1) * 100:+.1f}% "
                      f"({(v['min'] - 1) * 100:+.1f}% to {(v['max'] - 1) * 100:+.1f}%)")
        targets = [t for t in (*TARGETS, "baseline", "managed") if t in case]
        errors = {t: case[t]["errors"] for t in targets if case[t]["errors"] or case[t]["socket_errors"]}
        if errors:
            print(f"  errors in {case['case']}: " + ", ".join(
                f"{t}: {case[t]['errors']} non-2xx {' '.join(case[t]['socket_errors'])}" for t in errors))
    print("(direct: wrk straight to the fake upstream; its CPU per request: the upstream's "
          + ", ".join(f"{c['case']} {c['direct']['cpu_ms_per_request']:.3f} ms" for c in cases) + ")")


# --observe: an OTLP/HTTP sink that takes every export (the spans are encoded and sent as they would be).
SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


#: The gateway's per-key limits in the benchmark: far above the load, so every request goes through them and none
#: is refused (scripts/bench_keys.py --static-limits gives its static key the same).
LIMITS = "[limits]\nmax_concurrent_per_tenant = 100000\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000000"

ADMIN = "bench-admin"
BIG = 10**9  # limits and budgets that are checked and charged on every request but never refuse
#: A managed key's limits (and its team's, where it has some): the static key's set above (per minute, tokens per
#: minute, concurrency; none per hour), never refusing, so that what the two keys are compared on is the managed
#: key's team, budgets and bookkeeping, not a fourth limit (an hourly bucket, checked and charged, cost about half
#: a point on its own: 2026-12-07). scripts/bench_keys.py and scripts/bench_admission.py use the same.
KEY_LIMITS = {"rpm": BIG, "tpm": BIG, "max_concurrent": 100_000}
#: The fake model's price when a managed key is measured (a price of 0 would make every reservation 0), and as
#: the configuration's table; scripts/bench_admission.py prices its requests with the same.
FAKE_PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60}
PRICING = '[pricing."fake-model"]\n' + "".join(f"{k} = {v}\n" for k, v in FAKE_PRICE.items())


def admin(port: int, path: str, body: dict) -> dict:
    """POST ``body`` to the gateway's admin API (``path``) with the benchmark's admin key: the answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def managed_key(port: int, team_limits: bool = False) -> str:
    """Make a managed key on the gateway at ``port``, as issue 15 measures it: in a team with a monthly budget
    (and, with ``team_limits``, the key's limits too), with a daily budget of its own, its models listed and
    :data:`KEY_LIMITS`; its secret. Neither budget nor any limit ever refuses the benchmark's load."""
    team = {"name": "bench-team", "budget": {"usd": 1e6, "period": "month"}}
    admin(port, "/admin/teams", {**team, "limits": KEY_LIMITS} if team_limits else team)
    return admin(port, "/admin/keys", {"name": "bench", "team": "bench-team", "models": ["fake-model"],
                                       "budget": {"usd": 1e6, "period": "day"}, "limits": KEY_LIMITS})["secret"]


def write_config(path: Path, workdir: Path, gw_port: int, fake_port: int, sink_port: int | None = None,
                 redis_port: int | None = None, priced: bool = False) -> None:
    cluster = "" if redis_port is None else f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n'
    cluster += PRICING if priced else ""
    observe = "" if sink_port is None else textwrap.dedent(f"""
        [log]
        access = true
        access_path = "{workdir / 'access.log'}"
        [otel]
        endpoint = "http://127.0.0.1:{sink_port}"
    """)
    path.write_text(cluster + observe + LIMITS + "\n" + textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = {gw_port}
        [auth]
        api_keys = ["{KEY}"]
        admin_key = "{ADMIN}"
        [data]
        dir = "{workdir / 'data'}"
        [router]
        policy = "default"
        [[providers]]
        name = "upstream"
        type = "openai"
        [providers.config]
        base_url = "http://127.0.0.1:{fake_port}/v1"
        api_key = "sk-bench"
        models = ["fake-model"]
    """))


def soak(runner: Runner, pid: int, port: int, requests: int, rate: float) -> dict:
    """At least ``requests`` non-streaming requests at c=32 in rounds of at most 20 s (30 rounds at most)."""
    rss0, cpu0, t0 = rss_kib(pid), cpu_seconds(pid), time.monotonic()
    done = errors = 0
    rss_rounds = []
    for _ in range(30):
        if done >= requests:
            break
        seconds = min(20, max(1, math.ceil((requests - done) / max(rate, 100.0) + 0.5)))  # wrk takes whole seconds
        run = runner.wrk_run(port, CHAT, connections=32, seconds=seconds, limit=requests - done)
        done += run["requests"]
        errors += run["non_2xx"]
        rss_rounds.append(round(rss_kib(pid) / 1024, 1))
    elapsed = time.monotonic() - t0
    rss1 = rss_kib(pid)
    return {
        "requests": done, "seconds": round(elapsed, 1), "rps": round(done / elapsed),
        "rss_start_mib": round(rss0 / 1024, 1), "rss_end_mib": round(rss1 / 1024, 1),
        "rss_by_round_mib": rss_rounds,
        "rss_growth_pct": round((rss1 - rss0) * 100 / rss0, 2) if rss0 else None,
        "cpu_ms_per_request": round((cpu_seconds(pid) - cpu0) * 1000 / max(done, 1), 4),
        "non_2xx": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds of each run, whole (default 2)")
    p.add_argument("--relay", help=f"path of relay_floor.py (default {RELAY_NAME} from the project root)")
    p.add_argument("--soak", type=int, default=0, help="requests in a memory soak of the gateway (default 0: none)")
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="run only this case (repeatable; default all three)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run a gateway from the checkout in DIR (e.g. `git worktree add DIR main`), interleaved")
    p.add_argument("--paired", action="store_true",
                   help="with --baseline: load the two gateways at the same time in each round (see above)")
    p.add_argument("--observe", action="store_true",
                   help="run the gateway with the access log and OpenTelemetry tracing on (to an OTLP sink)")
    p.add_argument("--managed-key", action="store_true",
                   help="also measure the gateway with a managed key (a team with a budget, a budget and limits of "
                        "its own: issue 15's case) as a fourth target in every round, beside its static key; the "
                        "fake model is priced (both keys' requests are) so that every reservation is real")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run the gateway as `serve --workers N` (with a redis-server for [cluster] redis_url when "
                        "N > 1), pinned to cores 0..N-1; CPU is the parent's and its workers' (default: one "
                        "process, no parent)")
    args = p.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.workers < 0:
        p.error("--rounds and --seconds must be positive, --workers 0 or more")
    baseline = checkout(p, args.baseline) if args.baseline else None
    if args.paired and baseline is None:
        p.error("--paired compares the gateway with --baseline DIR: give both")
    if args.managed_key and (args.workers > 1 or args.paired):
        p.error("--managed-key measures one gateway process, its two keys back to back: not with --workers N > 1 "
                "or --paired")
    targets = TARGETS + ("baseline",) if baseline is not None else TARGETS
    if args.managed_key:
        targets += ("managed",)

    relay = find_relay(args.relay)
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-"))
    runner = Runner(workdir)
    fake_port, gw_port, relay_port, base_port = free_port(), free_port(), free_port(), free_port()
    sink_port = free_port() if args.observe else None
    redis_port = free_port() if args.workers > 1 else None
    config = workdir / "gateway.toml"
    write_config(config, workdir, gw_port, fake_port, sink_port, redis_port, args.managed_key)
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    print(f"bench: {machine()}; gateway and relay pinned to core 0, upstream and wrk to core 1: {runner.pin}",
          flush=True)
    print(f"bench: relay {relay}; wrk {runner.wrk}; workdir {workdir}", flush=True)
    results: dict = {"machine": machine(), "pinned": runner.pin, "rounds": args.rounds, "seconds": args.seconds,
                     "relay": str(relay), "observe": args.observe, "workers": args.workers,
                     "paired": args.paired, "managed_key": args.managed_key, "cases": []}
    try:
        # The fake upstream writes each stream at once (--coalesce): a fast upstream, so that what is measured
        # is the gateway, which still parses and validates every one of the 20 events it relays.
        fake = runner.spawn([*exe, "fake-provider", "--port", str(fake_port), "--chunks", str(STREAM_CHUNKS),
                             "--coalesce"], 1, "fake.log")
        wait_port(fake_port, fake)
        if sink_port is not None:
            print("bench: the gateway writes the access log and exports traces (--observe)", flush=True)
            wait_port(sink_port, runner.spawn([sys.executable, "-c", SINK, str(sink_port)], 1, "sink.log"))
        if redis_port is not None:
            redis = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
            wait_port(redis_port, runner.spawn([redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save",
                                                "", "--appendonly", "no"], 1, "redis.log"))
        if args.workers:
            cores = ",".join(str(i % (os.cpu_count() or 1)) for i in range(args.workers))
            print(f"bench: the gateway runs {args.workers} worker(s) on core(s) {cores}", flush=True)
            gw = runner.spawn([*exe, "serve", "--config", str(config), "--workers", str(args.workers)], cores,
                              "gateway.log")
            wait_workers(gw_port, args.workers, gw)
        else:
            gw = runner.spawn([*exe, "serve", "--config", str(config)], 0, "gateway.log")
        rl = runner.spawn([sys.executable, str(relay), "--port", str(relay_port), "--upstream",
                           f"http://127.0.0.1:{fake_port}", "--key", KEY], 0, "relay.log", env={"COALESCE": "1"})
        wait_port(gw_port, gw)
        wait_port(relay_port, rl)
        servers = {"direct": (fake.pid, fake_port), "relay": (rl.pid, relay_port), "gateway": (gw.pid, gw_port)}
        if baseline is not None:
            # The same config on its own port and data dir; the baseline's own code first on the path.
            base_dir = workdir / "baseline"
            base_dir.mkdir()
            base_config = workdir / "baseline.toml"
            write_config(base_config, base_dir, base_port, fake_port, sink_port, None, args.managed_key)
            bl = runner.spawn([*exe, "serve", "--config", str(base_config)], 0, "baseline.log",
                              **from_checkout(baseline))
            wait_port(base_port, bl)
            servers["baseline"] = (bl.pid, base_port)
            print(f"bench: baseline gateway from {baseline}", flush=True)
        keys = {}
        if args.managed_key:
            # The same gateway process, its requests made with the managed key: a target of its own.
            keys["managed"] = managed_key(gw_port)
            servers["managed"] = servers["gateway"]
            print("bench: a managed key (team with a budget; a budget and limits of its own) is the target "
                  "'managed' on the same gateway", flush=True)
        for name, (_pid, port) in servers.items():  # warm up: connection pools, code paths
            for body in (CHAT, {**CHAT, "stream": True}):
                runner.wrk_run(port, body, connections=8, seconds=1, key=keys.get(name))
        for label, stream, conns in (CASES[name] for name in (args.case or CASES)):
            body = {**CHAT, "stream": True} if stream else CHAT
            rounds = []
            for i in range(args.rounds):
                # With --paired, the two gateways are one step of the round, loaded together.
                steps: list = list(targets)
                if args.paired:
                    steps = [t for t in steps if t not in ("gateway", "baseline")] + [("gateway", "baseline")]
                if args.managed_key:
                    # The gateway's two keys back to back (a list: one after the other, in turns), so that
                    # their ratio is taken over the shortest stretch of the machine's drift.
                    steps = [t for t in steps if t not in ("gateway", "managed")] + [["gateway", "managed"]]
                k = i % len(steps)
                r = {}
                for step in steps[k:] + steps[:k]:
                    if isinstance(step, list):
                        for t in step if i % 2 == 0 else step[::-1]:
                            r[t] = measured(runner, *servers[t], body, conns, args.seconds, keys.get(t))
                    elif isinstance(step, tuple):
                        # Their wrk runs start in turn, one then the other first, round by round.
                        pair = step if i % 2 == 0 else step[::-1]
                        r.update(measured_together(runner, {t: servers[t] for t in pair}, body, conns, args.seconds))
                    else:
                        r[step] = measured(runner, *servers[step], body, conns, args.seconds, keys.get(step))
                rounds.append(r)
                print(f"  {label} round {i + 1}: " + "  ".join(
                    f"{t} {r[t]['rps']:.0f} req/s {r[t]['cpu_ms_per_request']:.3f} ms" for t in targets)
                    + "  ratio " + " ".join(
                        f"{r[t]['cpu_ms_per_request'] / max(r['relay']['cpu_ms_per_request'], 1e-9):.2f}"
                        for t in targets if t in ("gateway", "baseline", "managed")), flush=True)
            case = {"case": label, "stream": stream, "connections": conns, **summarize(rounds, targets),
                    "rounds": rounds}
            results["cases"].append(case)
        stream_body = {**CHAT, "stream": True}
        results["ttfb_ms"] = {t: round(ttfb_probe(port, stream_body, 300), 3) for t, (_, port) in servers.items()
                              if t != "managed"}
        # With --workers: the parent's and every worker's peaks, summed.
        gateway_peak = rss_kib(gw.pid, "VmHWM") + sum(rss_kib(c, "VmHWM") for c in children(gw.pid))
        results["peak_rss_mib"] = {"gateway": round(gateway_peak / 1024, 1),
                                   "relay": round(rss_kib(rl.pid, "VmHWM") / 1024, 1)}
        if args.soak:
            rate = max(case["gateway"]["rps"] for case in results["cases"])
            results["soak"] = soak(runner, gw.pid, gw_port, args.soak, rate)
            results["peak_rss_mib"]["gateway"] = round(rss_kib(gw.pid, "VmHWM") / 1024, 1)
    finally:
        runner.stop_all()
    print_table(results["cases"], args.rounds, args.seconds, args.paired)
    if args.workers:
        print(f"Runestone ran {args.workers} worker(s): req/s per worker "
              + ", ".join(f"{c['case']} {c['gateway']['rps'] / args.workers:.0f}" for c in results["cases"])
              + " (CPU per request is the parent's and every worker's)")
    t = results["ttfb_ms"]
    print(f"time to first event (median of 300 sequential streams): direct {t['direct']:.3f} ms, "
          f"relay {t['relay']:.3f} ms, Runestone {t['gateway']:.3f} ms")
    m = results["peak_rss_mib"]
    print(f"peak RSS: Runestone {m['gateway']} MiB, relay {m['relay']} MiB")
    if "soak" in results:
        s = results["soak"]
        print(f"soak: {s['requests']} requests in {s['seconds']} s ({s['rps']:.0f} req/s), RSS "
              f"{s['rss_start_mib']} -> {s['rss_end_mib']} MiB ({s['rss_growth_pct']}%), "
              f"CPU {s['cpu_ms_per_request']} ms/request, non-2xx {s['non_2xx']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
