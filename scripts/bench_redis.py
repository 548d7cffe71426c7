"""Redis clients side by side: CPU per call and calls per second, CONCURRENCY tasks sharing one client.

Usage: python scripts/bench_redis.py PORT [N]  (a redis-server on 127.0.0.1:PORT). The clients that are not
installed are skipped (the project's venv has only ours; ``pip install redis coredis`` elsewhere for the
others, with PYTHONPATH pointing at this checkout). Each case runs N calls of one pipelined round trip of
three commands (INCR, EXPIRE, GET: the shape of a shared rate-limit check), after a warm-up.

Results are what decided runestone/cluster/redis.py's design; see its docstring.
"""

from __future__ import annotations

import asyncio
import sys
import time

import trio

CONCURRENCY = 64


def _report(name: str, n: int, wall: float, cpu: float) -> None:
    print(f"{name:<44} {n / wall:>9.0f} calls/s  {cpu / n * 1e6:>7.1f} us CPU per call")


async def _trio_tasks(call, n: int) -> None:
    per = n // CONCURRENCY

    async def worker():
        for _ in range(per):
            await call()

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)


async def _asyncio_tasks(call, n: int) -> None:
    per = n // CONCURRENCY

    async def worker():
        for _ in range(per):
            await call()

    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])


def _timed(name: str, n: int, run) -> None:
    run(n // 10)  # warm-up
    wall0, cpu0 = time.perf_counter(), time.process_time()
    run(n)
    _report(name, n, time.perf_counter() - wall0, time.process_time() - cpu0)


def bench_runestone(port: int, n: int) -> None:
    from runestone.cluster.redis import open_redis

    def run(count):
        async def main():
            async with open_redis(f"redis://127.0.0.1:{port}/0", timeout=10) as client:
                await client.wait_up()

                async def call():
                    await client.pipeline([("INCR", "b:k"), ("EXPIRE", "b:k", 60), ("GET", "b:k")])

                await _trio_tasks(call, count)

        trio.run(main)

    _timed("runestone.cluster.redis (trio, hiredis)", n, run)


def bench_coredis(port: int, n: int) -> None:
    import coredis

    def run(count):
        async def main():
            client = coredis.Redis(host="127.0.0.1", port=port)
            async with client:
                async def call():
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.incr("b:k")
                        pipe.expire("b:k", 60)
                        pipe.get("b:k")

                await _trio_tasks(call, count)

        trio.run(main)

    _timed(f"coredis {coredis.__version__} (trio via anyio)", n, run)


def bench_redis_asyncio(port: int, n: int) -> None:
    import redis
    import redis.asyncio

    def run(count):
        async def main():
            client = redis.asyncio.Redis(host="127.0.0.1", port=port, max_connections=CONCURRENCY)

            async def call():
                async with client.pipeline(transaction=False) as pipe:
                    await pipe.incr("b:k").expire("b:k", 60).get("b:k").execute()

            await _asyncio_tasks(call, count)
            await client.aclose()

        asyncio.run(main())

    _timed(f"redis-py {redis.__version__} asyncio (asyncio only)", n, run)


def bench_redis_thread(port: int, n: int) -> None:
    import redis

    def run(count):
        client = redis.Redis(host="127.0.0.1", port=port, max_connections=CONCURRENCY)

        def sync_call():
            pipe = client.pipeline(transaction=False)
            pipe.incr("b:k").expire("b:k", 60).get("b:k").execute()

        async def main():
            limiter = trio.CapacityLimiter(CONCURRENCY)

            async def call():
                await trio.to_thread.run_sync(sync_call, limiter=limiter)

            await _trio_tasks(call, count)

        trio.run(main)
        client.close()

    _timed(f"redis-py {redis.__version__} sync via trio.to_thread", n, run)


def main() -> None:
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    for bench in (bench_runestone, bench_coredis, bench_redis_asyncio, bench_redis_thread):
        try:
            bench(port, n)
        except ImportError as exc:
            print(f"{bench.__name__}: skipped ({exc.name} is not installed)")


if __name__ == "__main__":
    main()
