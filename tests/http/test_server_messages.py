"""``Response``, what a handler answers: a slotted record whose ``headers`` is a fresh list unless given."""

from __future__ import annotations

import pytest

from runestone.http.server import Request, Response


def test_each_response_gets_its_own_header_list() -> None:
    first, second = Response(), Response(404)
    first.headers.append((b"x-one", b"1"))
    assert first.headers == [(b"x-one", b"1")] and second.headers == []
    assert Response(200, [(b"a", b"b")], b"x").headers == [(b"a", b"b")]


def test_a_response_is_slotted() -> None:
    response = Response(body=b"x")
    assert not hasattr(response, "__dict__")
    with pytest.raises(AttributeError):
        response.staus = 500  # a typo fails loudly instead of being ignored
    assert repr(response) == "<Response 200 1 bytes>"


async def test_a_header_appended_to_a_default_response_is_sent(start_server, connect) -> None:
    async def handler(request: Request) -> Response:
        response = Response(body=b"ok")
        response.headers.append((b"x-added", b"yes"))
        return response

    client = await connect(await start_server(handler))
    response, body = await client.request("GET", "/")
    assert (response.status_code, body) == (200, b"ok")
    assert (b"x-added", b"yes") in response.headers
