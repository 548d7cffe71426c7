"""The server connection's phases (``_connection.Phase``): one value per phase, one recorded reason per way a
connection is cut.

Before the enum, ``_GONE = 4`` and ``_STOPPED = 4`` shared a value. That was not a live bug: the connection
only ever compares the reason it was cancelled with ``HEAD`` (answer 408) and ``WRITING`` (drop, no
linger), and ``GONE``/``STOPPED`` both mean "close, nothing to answer". But a stopped connection read as
gone, and any check of one would have taken the other; these tests pin each reason over real sockets.
"""

from __future__ import annotations

import h11
import pytest
import trio

from runestone.http._connection import Phase, _Connection
from runestone.http.server import Request, Response


@pytest.fixture
def cut_reasons(monkeypatch) -> list[Phase]:
    """The reason each connection that ended was cancelled for (``BUSY``: it was not)."""
    reasons: list[Phase] = []
    run = _Connection.run

    async def recording_run(self) -> None:
        try:
            await run(self)
        finally:
            reasons.append(self._expired_phase)

    monkeypatch.setattr(_Connection, "run", recording_run)
    return reasons


async def ended(reasons: list, count: int = 1) -> None:
    with trio.fail_after(5):
        while len(reasons) < count:
            await trio.sleep(0.001)


async def ok(request: Request) -> Response:
    return Response(200, body=b"ok")


def test_every_phase_has_its_own_value() -> None:
    assert len(Phase.__members__) == len(Phase) == len({int(phase) for phase in Phase}) == 6
    assert Phase.GONE != Phase.STOPPED


async def test_a_connection_closed_by_request_stop_while_idle_is_stopped_not_gone(start_server, connect,
                                                                                 cut_reasons) -> None:
    server = await start_server(ok)
    client = await connect(server)
    response, _ = await client.request("GET", "/")
    assert response.status_code == 200
    server.request_stop()
    assert await client.read_until_eof() == b""  # closed silently
    await client.aclose()  # (else the server lingers, reading until the client closes)
    await ended(cut_reasons)
    assert cut_reasons == [Phase.STOPPED]


async def test_a_client_leaving_a_running_handler_is_gone_not_stopped(start_server, connect, cut_reasons) -> None:
    started = trio.Event()
    outcome = []

    async def waits(request: Request) -> Response:
        started.set()
        try:
            await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(type(exc))
            raise

    server = await start_server(waits)
    client = await connect(server)
    await client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]), h11.EndOfMessage())
    await started.wait()
    await client.aclose()
    await ended(cut_reasons)
    assert cut_reasons == [Phase.GONE]
    assert outcome == [trio.Cancelled]


async def test_an_idle_keep_alive_connection_times_out_as_idle(start_server, connect, cut_reasons,
                                                               autojump_clock) -> None:
    server = await start_server(ok, keepalive_timeout=30)
    client = await connect(server)
    await client.request("GET", "/")
    assert await client.read_until_eof() == b""
    await client.aclose()
    await ended(cut_reasons)
    assert cut_reasons == [Phase.IDLE]


async def test_an_incomplete_head_times_out_as_head_with_a_408(start_server, connect, cut_reasons,
                                                                autojump_clock) -> None:
    client = await connect(await start_server(ok, header_timeout=10))
    await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
    assert (await client.read_until_eof()).startswith(b"HTTP/1.1 408 ")
    await client.aclose()
    await ended(cut_reasons)
    assert cut_reasons == [Phase.HEAD]
