"""Gateway benchmark (not a test): throughput, latency, CPU and memory, direct to the fake upstream and through
the gateway, with every feature on as a user would run it (auth, routing, breakers, telemetry, usage ledger).

Layout on a machine with two or more cores: the gateway pinned to core 0; the fake upstream and the load
generator (wrk) share core 1. The gateway's CPU time is read from /proc before and after each case; its peak
resident memory from VmHWM. wrk's own CPU is reported so it can be seen not to be the bottleneck.
Every load is bounded in time (and the soak in count); all traffic is on 127.0.0.1.
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
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
KEY = "bench-key"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello benchmark"}]}
STREAM_CHUNKS = 20

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{body}'
local limit = {limit}
local count = 0
function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("status " .. status .. "\\n")
  end
  count = count + 1
  if limit > 0 and count >= limit then
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


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


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


def ensure_wrk() -> str | None:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk from Debian's packages ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
    return shutil.which("wrk")


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]  # milliseconds


class Runner:
    def __init__(self, args, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
        self.wrk = ensure_wrk()
        if self.wrk is None:
            raise SystemExit("wrk is not installed and could not be installed (apt-get install wrk)")
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], core: int | None, log: str) -> subprocess.Popen:
        if self.pin and core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
        env.pop("PORT", None)
        out = open(self.workdir / log, "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
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

    def wrk_run(self, url: str, body: dict, *, connections: int, seconds: float, limit: int = 0) -> dict:
        script = self.workdir / f"post-{connections}-{limit}-{int(body.get('stream', False))}.lua"
        script.write_text(LUA.format(key=KEY, body=json.dumps(body, separators=(",", ":")), limit=limit))
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{math.ceil(seconds)}s", "--latency", "-s", str(script), url]
        if self.pin:
            argv = ["taskset", "-c", "1", *argv]
        before = os.times()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
        after = os.times()
        text = out.stdout
        result = {"wrk_cpu_s": round((after.children_user + after.children_system)
                                     - (before.children_user + before.children_system), 3)}
        m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
        if m:
            result["requests"] = int(m.group(1))
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


def ttfb_probe(port: int, body: dict, n: int) -> float:
    """Median milliseconds from sending a streaming request to reading its first body byte (one connection)."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as s:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each load case (default 5)")
    p.add_argument("--soak", type=int, default=200_000, help="requests in the soak (0 to skip; default 200000)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-"))
    runner = Runner(args, workdir)
    fake_port, gw_port = free_port(), free_port()
    config = workdir / "gateway.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = {gw_port}
        [auth]
        api_keys = ["{KEY}"]
        admin_key = "bench-admin"
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
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    print(f"bench: workdir {workdir}; gateway pinned to core 0: {runner.pin}; wrk {runner.wrk}", flush=True)
    results: dict = {"cases": [], "pinned": runner.pin, "cores": os.cpu_count()}
    try:
        # The fake upstream writes each stream at once (--coalesce): a fast upstream, so that what is measured
        # is the gateway, and the gateway still parses and validates every one of the 20 events it relays.
        fake = runner.spawn([*exe, "fake-provider", "--port", str(fake_port), "--chunks", str(STREAM_CHUNKS),
                             "--coalesce"], 1, "fake.log")
        wait_port(fake_port, fake)
        gw = runner.spawn([*exe, "serve", "--config", str(config)], 0, "gateway.log")
        wait_port(gw_port, gw)
        # Warm up both (connection pools, code paths) before measuring.
        runner.wrk_run(f"http://127.0.0.1:{gw_port}/v1/chat/completions", CHAT, connections=8, seconds=1)
        runner.wrk_run(f"http://127.0.0.1:{gw_port}/v1/chat/completions", {**CHAT, "stream": True}, connections=8,
                       seconds=1)
        for stream in (False, True):
            body = {**CHAT, "stream": True} if stream else CHAT
            for conns in (1, 32):
                row = {"stream": stream, "connections": conns}
                direct = runner.wrk_run(f"http://127.0.0.1:{fake_port}/v1/chat/completions", body,
                                        connections=conns, seconds=args.seconds)
                cpu0 = cpu_seconds(gw.pid)
                via = runner.wrk_run(f"http://127.0.0.1:{gw_port}/v1/chat/completions", body,
                                     connections=conns, seconds=args.seconds)
                cpu = cpu_seconds(gw.pid) - cpu0
                n = max(via.get("requests", 0), 1)
                row.update({
                    "direct": direct,
                    "gateway": via,
                    "gateway_cpu_ms_per_request": round(cpu * 1000 / n, 4),
                    "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 3),
                    "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 3),
                })
                if stream:
                    row["gateway_cpu_us_per_chunk"] = round(cpu * 1e6 / n / STREAM_CHUNKS, 2)
                results["cases"].append(row)
                print(f"  {'stream' if stream else 'plain '} c={conns:<2}  direct {direct['rps']:>8.0f} req/s  "
                      f"gateway {via['rps']:>8.0f} req/s  p50 {via['p50_ms']:.3f} ms (+{row['added_p50_ms']:.3f})  "
                      f"p99 {via['p99_ms']:.3f} ms (+{row['added_p99_ms']:.3f})  "
                      f"cpu {row['gateway_cpu_ms_per_request']:.3f} ms/req  wrk cpu {via['wrk_cpu_s']:.2f}s  "
                      f"errors {via['non_2xx']} {via['socket_errors']}", flush=True)
        stream_body = {**CHAT, "stream": True}
        results["ttfb_ms"] = {
            "direct": round(ttfb_probe(fake_port, stream_body, 300), 3),
            "gateway": round(ttfb_probe(gw_port, stream_body, 300), 3),
        }
        print(f"  time to first chunk (median of 300): direct {results['ttfb_ms']['direct']:.3f} ms, "
              f"gateway {results['ttfb_ms']['gateway']:.3f} ms", flush=True)
        results["peak_rss_mib"] = round(rss_kib(gw.pid, "VmHWM") / 1024, 1)
        print(f"  gateway peak RSS so far: {results['peak_rss_mib']} MiB", flush=True)
        if args.soak:
            rss0 = rss_kib(gw.pid)
            cpu0 = cpu_seconds(gw.pid)
            t0 = time.monotonic()
            # Rounds of at most 20 s until the count is reached (wrk stops by time, not by count); bounded
            # to 30 rounds in all.
            done = errors = 0
            rss_rounds = []
            for _ in range(30):
                if done >= args.soak:
                    break
                rate = max(results["cases"][1]["gateway"]["rps"], 100.0)
                seconds = min(20, max(1, math.ceil((args.soak - done) / rate + 0.5)))  # wrk takes whole seconds
                soak = runner.wrk_run(f"http://127.0.0.1:{gw_port}/v1/chat/completions", CHAT, connections=32,
                                      seconds=seconds)
                done += soak.get("requests", 0)
                errors += soak["non_2xx"]
                rss_rounds.append(round(rss_kib(gw.pid) / 1024, 1))
            elapsed = time.monotonic() - t0
            rss1 = rss_kib(gw.pid)
            results["soak"] = {
                "requests": done, "seconds": round(elapsed, 1), "rps": round(done / elapsed),
                "rss_start_mib": round(rss0 / 1024, 1), "rss_end_mib": round(rss1 / 1024, 1),
                "rss_by_round_mib": rss_rounds,
                "rss_growth_pct": round((rss1 - rss0) * 100 / rss0, 2) if rss0 else None,
                "cpu_ms_per_request": round((cpu_seconds(gw.pid) - cpu0) * 1000 / max(done, 1), 4),
                "non_2xx": errors,
            }
            results["peak_rss_mib"] = round(rss_kib(gw.pid, "VmHWM") / 1024, 1)
            s = results["soak"]
            print(f"  soak: {s['requests']} requests in {s['seconds']} s ({s['rps']:.0f} req/s), RSS "
                  f"{s['rss_start_mib']} -> {s['rss_end_mib']} MiB ({s['rss_growth_pct']}%), "
                  f"cpu {s['cpu_ms_per_request']} ms/req, errors {s['non_2xx']}", flush=True)
        print(f"  gateway peak RSS: {results['peak_rss_mib']} MiB", flush=True)
    finally:
        runner.stop_all()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
