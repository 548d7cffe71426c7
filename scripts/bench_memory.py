"""Memory bench (not a test): the gateway's RSS while clients keep leaving in the middle of a stream.

The fake upstream and the gateway run as real processes on 127.0.0.1; this process plays the clients: each
opens a connection, asks for a long stream (200 chunks, 50 ms apart), reads the first chunk and closes. Every
``--every`` clients the bench waits until nothing is in flight (the gateway's ``/health/metrics`` and the
upstream's ``/_fake/stats``), then prints the gateway's RSS (``VmRSS``), its change since the end of the
warm-up, and that change per client. A gateway that keeps something per request shows a steady climb; a
bounded one climbs during the warm-up (allocator arenas, caches filling to their bounds) and then stays flat.
Every load is bounded in count, and each client in time. Nothing is asserted: the figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, rss_kib, wait_port  # noqa: E402  (scripts/bench.py: the CPU bench's helpers)

MODEL = "gpt-4o-mini"
BODY = json.dumps({"model": MODEL, "stream": True,
                   "messages": [{"role": "user", "content": "a long answer, please"}]}).encode()


async def get_json(port: int, path: str) -> dict:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if not n:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return json.loads(body)


async def leave_mid_stream(port: int) -> bool:
    """One client: ask for a stream, read up to its first chunk, close. True when a chunk came."""
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))
    with trio.move_on_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            seen = b""
            while b"data: " not in seen:
                data = await stream.receive_some(65536)
                if not data:
                    return False
                seen += data
            return seen.startswith(b"HTTP/1.1 200")
    return False


async def run_clients(port: int, n: int, concurrency: int) -> int:
    failed = 0
    limit = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        nonlocal failed
        async with limit:
            if not await leave_mid_stream(port):
                failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            async with limit:  # start no more tasks than may run
                pass
            nursery.start_soon(one)
    return failed


async def settle(gw_port: int, up_port: int | None) -> None:
    """Until no request is in flight in the gateway and (if any) every upstream stream has ended."""
    with trio.fail_after(60):
        while True:
            busy = any((await get_json(gw_port, "/health/metrics"))["requests_in_flight"].values())
            if not busy and up_port is not None:
                s = (await get_json(up_port, "/_fake/stats"))["streams"]
                busy = s["started"] != s["finished"] + s["cancelled"]
            if not busy:
                break
            await trio.sleep(0.1)
    await trio.sleep(0.5)  # the handler's ledger flush and the connection tasks' last steps


async def bench(args, gw: subprocess.Popen, gw_port: int, up_port: int | None) -> None:
    print(f"{'clients':>8} {'RSS KiB':>9} {'since warm-up':>14} {'B/client':>9} {'failed':>7}", flush=True)
    done = 0
    base = None
    base_at = 0
    failed = 0
    checkpoints = [args.warmup] + list(range(args.warmup + args.every, args.clients + 1, args.every))
    if checkpoints[-1] != args.clients:
        checkpoints.append(args.clients)
    for target in checkpoints:
        failed += await run_clients(gw_port, target - done, args.concurrency)
        done = target
        await settle(gw_port, up_port)
        rss = rss_kib(gw.pid)
        if base is None:
            base, base_at = rss, done
            print(f"{done:>8} {rss:>9} {'(warm-up)':>14} {'':>9} {failed:>7}", flush=True)
            continue
        grown = rss - base
        per = grown * 1024 / (done - base_at)
        print(f"{done:>8} {rss:>9} {grown:>+13}K {per:>9.1f} {failed:>7}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20_000, help="clients in all, warm-up included (20000)")
    p.add_argument("--warmup", type=int, default=4_000, help="clients before the baseline is taken (4000)")
    p.add_argument("--every", type=int, default=2_000, help="clients between RSS checkpoints (2000)")
    p.add_argument("--concurrency", type=int, default=50, help="clients at once (50)")
    p.add_argument("--provider", choices=("openai", "anthropic", "fake"), default="openai",
                   help="openai/anthropic: through a fake upstream process; fake: the in-process fake (openai)")
    p.add_argument("--no-ledger", action="store_true", help="turn the usage ledger off")
    args = p.parse_args()
    if min(args.clients, args.warmup, args.every, args.concurrency) < 1 or args.warmup >= args.clients:
        p.error("--clients, --warmup, --every and --concurrency must be >= 1, and --warmup < --clients")

    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-memory-"))
    exe = [sys.executable, "-m", "runestone.cli", "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    procs: list[subprocess.Popen] = []

    def spawn(argv: list[str], log: str) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=open(workdir / log, "wb"), stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc

    try:
        up_port = None
        if args.provider == "fake":
            provider = f"""
                [[providers]]
                name = "up"
                type = "fake"
                [providers.config]
                models = ["{MODEL}"]
                chunks = 200
                chunk_delay_ms = 50
                """
        else:
            up_port = free_port()
            up = spawn([*exe, "fake-provider", "--port", str(up_port), "--chunks", "200", "--chunk-delay-ms", "50"],
                       "upstream.log")
            wait_port(up_port, up)
            base = f"http://127.0.0.1:{up_port}" + ("/v1" if args.provider == "openai" else "")
            provider = f"""
                [[providers]]
                name = "up"
                type = "{args.provider}"
                [providers.config]
                base_url = "{base}"
                api_key = "bench"
                models = ["{MODEL}"]
                """
        gw_port = free_port()
        config = workdir / "runestone.toml"
        config.write_text(textwrap.dedent(f"""
            [server]
            host = "127.0.0.1"
            port = {gw_port}
            [data]
            dir = "{workdir / 'data'}"
            [telemetry]
            usage_ledger = {"false" if args.no_ledger else "true"}
            """) + textwrap.dedent(provider))
        gw = spawn([*exe, "serve", "--config", str(config)], "gateway.log")
        wait_port(gw_port, gw)
        print(f"gateway pid {gw.pid} (provider {args.provider}, ledger {'off' if args.no_ledger else 'on'}, "
              f"python {sys.version.split()[0]}, {os.cpu_count()} cpus); logs in {workdir}", flush=True)
        trio.run(bench, args, gw, gw_port, up_port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
