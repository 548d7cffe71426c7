"""Both transports tell the gateway's own exhaustion apart from an unreachable upstream.

A trio socket factory (``trio.socket.set_custom_socket_factory``, the run's own seam) makes every new socket
fail with the errno under test, as the kernel does at the descriptor or memory limit; a refused connect
(nothing listens) stays a ``ConnectError``. The classification then holds all the way to ``UpstreamError``:
kind "local", not a provider failure, not retried, the gateway's own 503 shape.
"""

from __future__ import annotations

import errno
import socket

import pytest

from runestone.routing.executor import client_error
import trio

from runestone.http.client import FastTransport, PoolLimits, Timeouts
from runestone.http.errors import (
    ConnectError,
    LocalResourceError,
    PoolTimeout,
    TransportTimeout,
    local_resource_errors,
)
from runestone.http.httpx_transport import HttpxTransport
from runestone.providers.base import transport_error
from runestone.resilience.errors import counts_as_failure, is_retryable


class _Exhausted:
    """A socket factory failing every new socket with ``code`` (EMFILE: the process's descriptor limit)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def socket(self, family=None, type=None, proto=None):
        raise OSError(self.code, "simulated: " + errno.errorcode[self.code])

    def is_trio_socket(self, obj) -> bool:
        return False


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code, kind", [(errno.EMFILE, "emfile"), (errno.ENFILE, "enfile"),
                                        (errno.ENOMEM, "enomem"), (errno.ENOBUFS, "enobufs")])
@pytest.mark.parametrize("which", ["fast", "httpx"])
async def test_a_socket_the_kernel_refuses_us_is_a_local_resource_error(code: int, kind: str, which: str) -> None:
    transport = FastTransport() if which == "fast" else HttpxTransport()
    before = local_resource_errors["connect", kind]
    trio.socket.set_custom_socket_factory(_Exhausted(code))
    try:
        with pytest.raises(LocalResourceError) as info:
            async with transport.stream("GET", f"http://127.0.0.1:{_closed_port()}/v1/models", []):
                pass
    finally:
        trio.socket.set_custom_socket_factory(None)
        await transport.aclose()
    assert info.value.kind == kind
    assert not isinstance(info.value, ConnectError)
    assert local_resource_errors["connect", kind] == before + 1
    error = transport_error("up", info.value)
    assert error.kind == "local"
    assert not counts_as_failure(error) and not is_retryable(error)
    refusal = client_error(error)
    assert refusal.status == 503 and refusal.type == "server_error" and refusal.code == "gateway_overloaded"
    assert "ran out of local resources" in refusal.message and "'up'" in refusal.message


@pytest.mark.parametrize("which", ["fast", "httpx"])
async def test_a_refused_connect_is_still_the_upstreams_failure(which: str) -> None:
    transport = FastTransport() if which == "fast" else HttpxTransport()
    try:
        with pytest.raises(ConnectError) as info:
            async with transport.stream("GET", f"http://127.0.0.1:{_closed_port()}/", []):
                pass
    finally:
        await transport.aclose()
    assert not isinstance(info.value, LocalResourceError)
    error = transport_error("up", info.value)
    assert error.kind == "connect" and counts_as_failure(error)


async def test_a_full_pool_is_local_too(autojump_clock: trio.testing.MockClock) -> None:
    """The pool's slots are the gateway's own limit: waiting for one in vain is not the provider's failure."""
    async def head_then_wait(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        await trio.sleep_forever()

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/"
    transport = FastTransport(limits=PoolLimits(max_connections=1), timeouts=Timeouts(pool=1.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, head_then_wait, [listener])
        async with transport.stream("GET", url, []):  # holds the only slot: its body never ends
            with pytest.raises(PoolTimeout) as info:
                async with transport.stream("GET", url, []):
                    pass
        assert isinstance(info.value, TransportTimeout) and isinstance(info.value, LocalResourceError)
        assert info.value.kind == "pool_full"
        error = transport_error("up", info.value)
        assert error.kind == "local" and not counts_as_failure(error)
        nursery.cancel_scope.cancel()
    await transport.aclose()
