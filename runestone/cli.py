"""The ``runestone`` command: serve the gateway, check a config, run the fake provider, and talk to a live one.

``runestone serve`` runs the application's root supervisor until SIGINT or SIGTERM: the first signal
stops gracefully (the front stops accepting, in-flight streams finish within the drain grace, the usage
ledger is flushed), a second one stops at once. SIGUSR1 writes the whole state dump to the log as one
JSON document. Exit status is 0 on a clean stop, 1 when the tree failed, 2 on a config error.
``runestone serve --workers N`` runs N such processes on one port under a parent that supervises them
(runestone.cluster.workers), with the same signals.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from functools import partial

import orjson
import trio

from . import __version__
from .config import ConfigError, load_config

log = logging.getLogger("runestone")


def _setup_logging(level: str = "INFO", worker: int | None = None) -> None:
    tag = "" if worker is None else f" [worker {worker}]"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


async def _serve(app, control_fd: int | None = None) -> int:
    from .cluster.workers import handle_signals

    async with trio.open_nursery() as nursery:

        def dump() -> None:
            try:
                log.info("state dump: %s", orjson.dumps(app.dump_state(), default=str).decode())
            except Exception:
                log.exception("state dump failed")

        nursery.start_soon(partial(handle_signals, stop=app.request_stop, stop_at_once=nursery.cancel_scope.cancel,
                                   dump=dump))

        async def run_app(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await app.run(task_status=task_status)
            finally:
                # The tree stopped (gracefully or not): nothing else here has work left.
                nursery.cancel_scope.cancel()

        await nursery.start(run_app)
        # Everything built at start lives as long as the process: keep it out of the collector's scans, so
        # that a full collection under load walks only what requests allocate (shorter pauses, lower p99).
        gc.freeze()
        worker = "" if app.worker is None else f", worker {app.worker.index} of {app.worker.count}"
        log.info("runestone %s ready on http://%s:%d (pid %d%s)", __version__, app.host, app.port, os.getpid(), worker)
        if control_fd is not None:
            from .cluster.workers import answer_parent

            nursery.start_soon(answer_parent, app, control_fd)
    return 0


def cmd_serve(args) -> int:
    from .app import Application, StartupError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    worker = None
    if args.worker_index is not None:
        from .cluster.workers import WorkerIdentity

        worker = WorkerIdentity(args.worker_index, args.worker_count, os.getppid())
    elif args.workers is not None:
        return _serve_workers(args, config)
    try:
        app = Application(config, host=args.host, port=args.port, worker=worker)
    except StartupError as exc:
        print(f"runestone: {exc}", file=sys.stderr)
        return 2
    # The usage ledger writes SQLite on a worker thread. With CPython's default 5 ms GIL switch interval the
    # event loop can wait that long for the GIL to come back from the writer, a visible stall on every request
    # in flight then; 0.5 ms bounds the stall while costing the writer almost nothing.
    sys.setswitchinterval(0.0005)
    try:
        return trio.run(_serve, app, args.worker_control_fd)
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("runestone stopped on an error")
        return 1


def _serve_workers(args, config) -> int:
    """``serve --workers N``: the parent that holds the port and supervises N ``serve`` processes on it."""
    from .cluster.workers import reserve_port, run_workers

    count = args.workers
    if args.restart_intensity < 0 or not args.restart_period > 0:
        print("runestone: --restart-intensity must be 0 or more and --restart-period more than 0", file=sys.stderr)
        return 2
    if count > 1 and not config.cluster.redis_url:
        print(f"runestone: --workers {count} needs [cluster] redis_url (or RUNESTONE_REDIS_URL), so that the "
              "workers share limits, budgets, breakers and providers; set it, or run --workers 1", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    try:
        reservation = reserve_port(host, config.server.port if args.port is None else args.port)
    except OSError as exc:
        print(f"runestone: cannot bind {host}:{args.port or config.server.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    port = reservation.getsockname()[1]

    def command(index: int, control_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "runestone.cli", "--log-level", args.log_level, "serve", "--host", host,
                "--port", str(port), "--worker-index", str(index), "--worker-count", str(count),
                "--worker-control-fd", str(control_fd)]
        return argv + (["--config", args.config] if args.config else [])

    ready = (f"runestone {__version__} ready on http://{host}:{port} with {count} worker(s) (parent pid "
             f"{os.getpid()})")
    try:
        return run_workers(count, command, ready_line=ready, intensity=args.restart_intensity,
                           period=args.restart_period, stop_grace=config.server.drain_timeout_ms / 1000 + 15.0)
    finally:
        reservation.close()


def cmd_check_config(args) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for line in (exc.problems or [str(exc)]):
            text = str(line)
            print(text if text.startswith("config error") else f"config error: {text}", file=sys.stderr)
        return 1
    names = ", ".join(p.name for p in config.providers) or "none"
    print(f"config ok: {len(config.providers)} provider(s) ({names}), port {config.server.port}")
    return 0


def cmd_fake_provider(args) -> int:
    from .providers.fake_server import FakeKnobs, serve_fake_provider

    knobs = FakeKnobs()
    if args.chunks is not None:
        knobs.chunks = args.chunks
    if args.ttfb_ms is not None:
        knobs.ttfb_ms = args.ttfb_ms
    if args.chunk_delay_ms is not None:
        knobs.chunk_delay_ms = args.chunk_delay_ms
    if args.coalesce:
        knobs.coalesce = True
    if args.fault_status:
        knobs.fault_status = args.fault_status
        knobs.fault_probability = args.fault_probability

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(lambda task_status: serve_fake_provider(
                args.host, args.port, knobs, task_status=task_status))
            log.info("fake provider ready on http://%s:%d", args.host, server.port)
            print(f"fake provider listening on http://{args.host}:{server.port}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def _workers(text: str) -> int:
    from .cluster.workers import parse_workers

    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from .cluster.workers import INTENSITY, PERIOD

    p = argparse.ArgumentParser(prog="runestone", description="An OpenAI-compatible LLM gateway.")
    p.add_argument("--version", action="version", version=f"runestone {__version__}")
    p.add_argument("--log-level", default=os.environ.get("RUNESTONE_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default: $RUNESTONE_LOG_LEVEL or INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="config file (default: $RUNESTONE_CONFIG or the embedded default)")
    s.add_argument("--host", help="address to bind (default from config)")
    s.add_argument("--port", type=int, help="port to bind (default: $PORT or config, 4003)")
    s.add_argument("--workers", type=_workers, metavar="N",
                   help="run N gateway processes on the port under one supervising parent ('auto': one per "
                        "core); more than one needs [cluster] redis_url (default: one process, no parent)")
    s.add_argument("--restart-intensity", type=int, default=INTENSITY, metavar="N",
                   help="with --workers: the most worker restarts allowed within --restart-period; one more and "
                        "the parent stops every worker and exits 1, as the tree's supervisors do (default: "
                        "%(default)s)")
    s.add_argument("--restart-period", type=float, default=PERIOD, metavar="SECONDS",
                   help="with --workers: the window of --restart-intensity (default: %(default)s)")
    # Set by the --workers parent on the processes it starts (runestone.cluster.workers).
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-control-fd", type=int, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file and the environment")
    c.add_argument("file", nargs="?", help="config file (default: $RUNESTONE_CONFIG or the embedded default)")
    c.set_defaults(func=cmd_check_config)

    f = sub.add_parser(
        "fake-provider", help="run a fake OpenAI/Anthropic/Gemini/Azure OpenAI/Bedrock upstream for demos and tests",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""A real HTTP server that answers like OpenAI, Anthropic, Gemini, Azure OpenAI and Amazon Bedrock, with the fake model
the README describes ("What the fake model does"), every API at once, routed by path:
  OpenAI     POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models
  Anthropic  POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models
  Gemini     POST /v1beta/models/MODEL:generateContent, :streamGenerateContent?alt=sse, :batchEmbedContents,
             GET /v1beta/models (key in x-goog-api-key)
  Azure      POST /openai/deployments/DEPLOYMENT/chat/completions?api-version=V (and /embeddings),
             GET /openai/deployments; the v1 API under /openai/v1 (key in api-key or a bearer token)
  Bedrock    POST /model/MODEL_ID/converse and /converse-stream (SigV4-verified against the aws_* knobs),
             GET /foundation-models
serving fake-model, gpt-4o-mini, claude-haiku-4-5, anthropic.claude-haiku-4-5-20251001-v1:0 and fake-embedding
(an Azure deployment is one of those names).
Listens on http://127.0.0.1:4010 by default; point a provider's base_url at "http://127.0.0.1:4010/v1" (openai),
"http://127.0.0.1:4010" (anthropic, azure), "http://127.0.0.1:4010/v1beta" (gemini) or
"http://127.0.0.1:4010/openai/v1" (azure, v1 API), "http://127.0.0.1:4010" (bedrock, with the aws_* knobs'
credentials).""",
        epilog="""knobs changed at run time (POST /_fake/knobs with a JSON object; GET it to read them):
  chunks, ttfb_ms, chunk_delay_ms, coalesce   as the options above
  fault_status, fault_probability, retry_after  error answers (retry-after header in seconds)
  hang                  never answer
  drop_before_response  close the connection without a response
  drop_mid_stream       cut a stream after half of its events
  stream_error          send the API's in-stream error event there instead
  malformed_sse         send a broken event there
  seed                  seeds the fault draws (reproducible runs)
  text                  fix the reply text (null: echo the last user message)
  report_usage          false: chat answers carry no usage (as a server that ignores include_usage)
  embedding_dims        default embedding size (256)
  models                the model ids served
  content_filter        Azure: "prompt" (the filter refuses the prompt: its 400) or "completion" (finish_reason
                        content_filter); null: off
  azure_deployments     Azure: {"deployment": "model it runs"} besides each model deployed under its own name
  aws_access_key_id, aws_secret_access_key
                        the credentials Bedrock requests must be SigV4-signed with
GET /_fake/stats says what it served (requests per route, streams finished or cancelled, faults);
POST /_fake/reset clears it.""")
    f.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    f.add_argument("--port", type=int, default=4010, help="port to bind; 0 picks a free one (default: %(default)s)")
    f.add_argument("--chunks", type=int, metavar="N",
                   help="content pieces per streamed answer, split at token boundaries (default: 8)")
    f.add_argument("--ttfb-ms", type=int, metavar="MS", help="wait before answering (default: 0)")
    f.add_argument("--chunk-delay-ms", type=int, metavar="MS", help="wait between stream events (default: 0)")
    f.add_argument("--coalesce", action="store_true",
                   help="write each unpaced stream in one write, as a fast upstream would (default: off)")
    f.add_argument("--fault-status", type=int, default=0, metavar="STATUS",
                   help="answer model requests with this HTTP status, in the API's error shape (default: 0, none)")
    f.add_argument("--fault-probability", type=float, default=1.0, metavar="P",
                   help="share of model requests that get --fault-status (default: %(default)s)")
    f.set_defaults(func=cmd_fake_provider)

    from .control.cli import add_control_commands

    add_control_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, getattr(args, "worker_index", None))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
