"""Helpers for tests that run the whole gateway: a started gateway's URLs, provider blocks of config, the
gateway as a real process (``runestone serve``), and a gate that holds a fake upstream's streams until the test
lets them go on.

A plain module (not a conftest) so that test files can import it by name whatever other conftest files
pytest has loaded: ``from gatewaytest import provider_toml``.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator

import httpx
import trio

from runestone.http.server import Response
from runestone.providers.fake_server import FakeProvider


class Started:
    """A running gateway: the app, its base URL and ``v1`` URL."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.port = app.port
        self.url = f"http://127.0.0.1:{app.port}"
        self.v1 = self.url + "/v1"


def provider_toml(name: str, type: str, **config) -> str:
    """A ``[[providers]]`` block; config values are written as TOML literals."""
    lines = [f'[[providers]]\nname = "{name}"\ntype = "{type}"\n[providers.config]']
    for key, value in config.items():
        if isinstance(value, bool):
            lit = "true" if value else "false"
        elif isinstance(value, str):
            lit = f'"{value}"'
        elif isinstance(value, (list, tuple)):
            lit = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        else:
            lit = repr(value)
        lines.append(f"{key} = {lit}")
    return "\n".join(lines) + "\n"


class RecordingUpstream:
    """The fake upstream (``runestone fake-provider``'s handler), recording each model request as
    (path, headers, raw body); serve it with ``serve_http``."""

    def __init__(self, **knobs) -> None:
        from runestone.providers.fake_server import FakeKnobs, make_fake_handler

        self.fake = make_fake_handler(FakeKnobs(**knobs))
        self.requests: list[tuple[str, dict, bytes]] = []

    async def __call__(self, request):
        if not request.path.startswith("/_fake"):
            self.requests.append((request.path, {k.decode(): v.decode() for k, v in request.headers},
                                  await request.body()))
        return await self.fake(request)

    def last_body(self) -> dict:
        import orjson

        return orjson.loads(self.requests[-1][2])


async def fake_requests(port: int, route: str = "POST /v1/chat/completions",
                        http: httpx.AsyncClient | None = None) -> int:
    """How many ``route`` requests the fake provider on ``port`` has served (its ``/_fake/stats``)."""
    url = f"http://127.0.0.1:{port}/_fake/stats"
    if http is None:
        async with httpx.AsyncClient() as own:
            stats = (await own.get(url)).json()
    else:
        stats = (await http.get(url)).json()
    return stats["requests"].get(route, 0)


def fail_next_ledger_write(ledger) -> list:
    """Make ``ledger``'s next write fail as a broken disk would; the returned list gets an item when it did."""
    write = ledger._write_sync
    failed: list = []

    def failing_once(*args):
        if not failed:
            failed.append(True)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return write(*args)

    ledger._write_sync = failing_once
    return failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway_process(config: str, port: int, log_path) -> subprocess.Popen:
    """``runestone serve`` with ``config`` on ``port``, its output appended to ``log_path``, in an environment
    without RUNESTONE_/OPENAI_/ANTHROPIC_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("PORT", None)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "runestone.cli", "serve", "--config", config, "--port", str(port)],
                            stdout=log, stderr=log, env=env)


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    """Wait until the ``runestone serve`` process ``proc`` answers ``GET url/health`` with 200."""
    with trio.fail_after(120):  # only a hang trips this
        async with httpx.AsyncClient() as http:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"gateway exited early with {proc.returncode}")
                try:
                    if (await http.get(url + "/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


class Gate:
    """Holds a fake upstream's streams after their first ``after`` frames until :meth:`open` is called.

    A stream that must still be running when a test acts (registers a provider, sends a signal, cancels)
    waits on this event, not on a timer, so "still in flight" does not depend on the machine's speed.
    ``held`` counts the streams waiting now; :meth:`wait_held` waits for a count. Made inside a trio run;
    :meth:`open_from_thread` opens it from another thread (a CLI run with its own trio loop).
    """

    def __init__(self, after: int = 1) -> None:
        self.after = after
        self.opened = trio.Event()
        self.held = 0
        self._changed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def open(self) -> None:
        self.opened.set()

    def open_from_thread(self) -> None:
        """Open it soon, from any thread (also one running its own trio loop); does not wait."""
        self._token.run_sync_soon(self.open)

    async def wait_held(self, count: int) -> None:
        while self.held < count:
            await self._changed.wait()

    def _count(self, delta: int) -> None:
        self.held += delta
        self._changed.set()
        self._changed = trio.Event()

    async def hold(self, frames: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        iterator = frames.__aiter__()
        sent = 0
        try:
            while True:
                if sent == self.after and not self.opened.is_set():
                    self._count(1)
                    try:
                        await self.opened.wait()
                    finally:
                        self._count(-1)
                try:
                    frame = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                yield frame
                sent += 1
        finally:
            await iterator.aclose()


def gated_handler(fake: FakeProvider, gate: Gate):
    """``fake``'s request handler with each of its streamed answers held by ``gate``."""

    async def handler(request) -> Response:
        response = await fake(request)
        if response.stream is not None:
            response.stream = gate.hold(response.stream)
        return response

    return handler


class OtlpReceiver:
    """An OTLP/HTTP traces receiver on loopback (the project's HTTP server), decoding what it gets with
    opentelemetry-proto: ``spans`` holds every span received, as plain dicts (ids in hex)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.posts = 0
        self.url = ""

    async def handle(self, request):
        import gzip

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        from runestone.http.server import Response

        if request.method != "POST" or request.path != "/v1/traces":
            return Response(404, [], b"")
        body = await request.body()
        if request.header(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.posts += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "kind": span.kind,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "status": span.status.code,
                        "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                        "events": [{"name": e.name, "attributes": {a.key: _any_value(a.value) for a in e.attributes}}
                                   for e in span.events],
                        "resource": resource,
                    })
        return Response(200, [(b"content-type", b"application/x-protobuf")],
                        ExportTraceServiceResponse().SerializeToString())


def _any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


async def start_otlp_receiver(nursery) -> OtlpReceiver:
    import functools

    from runestone.http.server import serve_http

    receiver = OtlpReceiver()
    server = await nursery.start(functools.partial(serve_http, receiver.handle, "127.0.0.1", 0))
    receiver.url = f"http://127.0.0.1:{server.port}"
    return receiver
