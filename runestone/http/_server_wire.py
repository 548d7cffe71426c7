"""Bytes the HTTP/1.1 server writes: status lines, the response head, chunk frames, error bodies.

Everything here is on the per-request hot path, so it works on bytes only, builds a
response head with a single ``join`` and caches what does not change between requests:
status lines are precomputed and the ``Date``/``Server`` lines are rebuilt at most once
per wall-clock second (RFC 9110 asks for one-second resolution, nothing finer).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

import orjson

_STATUS_LINES: dict[int, bytes] = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in HTTPStatus
}

# Framing and connection management belong to the server: a handler that sets them would
# desynchronise the client's parser, so they are dropped from handler headers.
_SERVER_OWNED = frozenset((b"content-length", b"transfer-encoding", b"connection"))

KEEP_ALIVE = b"connection: keep-alive\r\n\r\n"
CLOSE = b"connection: close\r\n\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_date_second = -1
_date_lines = b""


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def date_server_lines() -> bytes:
    """``date: ...`` and ``server: runestone`` lines, rebuilt once per second."""
    global _date_second, _date_lines
    now = int(time.time())
    if now != _date_second:
        _date_lines = b"date: %s\r\nserver: runestone\r\n" % formatdate(now, usegmt=True).encode("ascii")
        _date_second = now
    return _date_lines


#: Header names seen before: True to write, False for a server-owned name (dropped). Names repeat from one
#: response to the next, so each is checked once; bounded so that names a client made up cannot grow it.
_NAMES: dict[bytes, bool] = {}
_NAMES_MAX = 512


#: A header "name" whose value is whole header lines (``name: value\r\n`` each), made and checked by the
#: caller once and reused as they are (runestone.front.limits's x-ratelimit blocks): a pair ``(HEAD_LINES,
#: block)`` among the handler headers. Not a valid header name (a colon), so no client-given name is it.
HEAD_LINES = b":lines"


def header_block(headers) -> tuple[bytes, bytes]:
    """``headers`` (bytes pairs) as one ``(HEAD_LINES, lines)`` pair, checked once here: for header lines
    that do not change between responses, written with one append instead of a step per header."""
    lines = []
    for name, value in headers:
        if not _check_name(name) or name.lower() in _SERVER_OWNED or b"\n" in value or b"\r" in value:
            raise ValueError(f"invalid header for a block {name!r}: {value!r}")
        lines.append(b"%s: %s\r\n" % (name, value))
    return HEAD_LINES, b"".join(lines)


def _check_name(name: bytes) -> bool:
    if not name or b"\n" in name or b"\r" in name or b":" in name:
        return False
    return True


def build_head(status: int, headers, framing: bytes, connection: bytes) -> bytes:
    """The whole response head as one bytes object.

    ``framing`` is the server's own ``content-length``/``transfer-encoding`` line (or
    empty), ``connection`` one of ``KEEP_ALIVE``/``CLOSE`` (it ends the head). Handler
    headers may be ``str`` (encoded latin-1) or ``bytes``; a CR or LF in them, or a
    colon in a name, raises ``ValueError`` rather than letting a handler split the
    response. Handler headers of the framing names the server owns are dropped; a
    ``(HEAD_LINES, block)`` pair writes ``block``, whole header lines, as it is.
    """
    parts = [status_line(status)]
    names = _NAMES
    blocks = 0  # lines written by (HEAD_LINES, block) pairs, and their count
    nblocks = 0
    for name, value in headers:
        if names.get(name):  # a name seen before, to write (the usual case: one lookup)
            if value.__class__ is not bytes:
                value = value.encode("latin-1")
            parts += (name, b": ", value, b"\r\n")
            continue
        if name is HEAD_LINES:  # lines made whole (the final count below still checks their CR and LF)
            parts.append(value)
            blocks += value.count(b"\n")
            nblocks += 1
            continue
        if name.__class__ is not bytes:
            name = name.encode("latin-1")
        keep = names.get(name)
        if keep is None:
            if not _check_name(name):
                raise ValueError(f"invalid response header {name!r}: {value!r}")
            keep = name.lower() not in _SERVER_OWNED
            if len(names) >= _NAMES_MAX:
                names.clear()
            names[name] = keep
        if keep:
            if value.__class__ is not bytes:
                value = value.encode("latin-1")
            parts += (name, b": ", value, b"\r\n")
    # Four parts per header line written, one per block, and the status line.
    lines = (len(parts) - 1 - nblocks) // 4 + blocks
    parts += (date_server_lines(), framing, connection)
    head = b"".join(parts)
    # Values are checked all at once: a CR or LF in one shows up as more of them than the lines written here
    # (the status line, the header lines, date and server, the framing line if any, connection and the end).
    expected = lines + 3 + framing.count(b"\n") + connection.count(b"\n")
    if head.count(b"\n") != expected or head.count(b"\r") != expected:
        for name, value in headers:
            text = value.encode("latin-1") if value.__class__ is not bytes else value
            if (b"\n" in text or b"\r" in text) and name is not HEAD_LINES:
                raise ValueError(f"invalid response header {name!r}: {value!r}")
        raise ValueError("invalid response head: a CR or LF outside the header lines")
    return head


def content_length_line(length: int) -> bytes:
    return b"content-length: %d\r\n" % length


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; ``data`` must not be empty (that would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_body(message: str, error_type: str = "invalid_request_error") -> bytes:
    """A JSON body in OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}})
