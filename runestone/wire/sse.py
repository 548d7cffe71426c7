"""Server-sent events on the wire: an incremental parser for upstream streams and an encoder for ours.

Upstream providers (OpenAI, Anthropic, any OpenAI-compatible server) answer streaming requests with
``text/event-stream`` bodies that arrive in arbitrary pieces: an event, a line, even a ``\\r\\n`` pair can be
split across two socket reads. :class:`SSEParser` is fed those raw pieces and returns whole events as soon as
their terminating blank line is seen, following the WHATWG parsing rules (``\\n``, ``\\r\\n`` and ``\\r`` line
ends; ``:`` comments; one optional space after the colon; ``id``/``retry`` accepted but not used because we
never reconnect a model stream). Work per read is a few bytes operations; nothing is decoded but event names.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs

__all__ = ["SSEError", "SSEEvent", "SSEParser", "encode_event"]

_BOM = b"\xef\xbb\xbf"


class SSEError(ValueError):
    """The byte stream is not a well-formed event stream (truncated event, oversized event)."""


class SSEEvent(NamedTuple):
    """One dispatched event (a named tuple: one is made per upstream event, and a tuple is the cheapest).

    ``event`` is the ``event:`` field (``None`` when absent, which the spec calls a ``message`` event);
    ``data`` is the ``data:`` lines joined with ``b"\\n"``, without the trailing newline.
    """

    event: str | None
    data: bytes


@attrs.define
class SSEParser:
    """Incremental event-stream parser; one per upstream response, owned by the task reading it.

    ``feed`` may be called with any split of the stream, including empty chunks, and returns the events
    completed by that chunk in stream order. A block of fields with no ``data:`` line dispatches nothing,
    as the spec says. ``max_event_size`` bounds the bytes buffered for one event so that a misbehaving
    upstream cannot make us buffer without limit; exceeding it raises :class:`SSEError`.
    """

    max_event_size: int = 16 * 1024 * 1024
    _buf: bytes = b""
    _event: str | None = None
    _data: list[bytes] | None = None
    _pending: int = 0
    _skip_lf: bool = False
    _started: bool = False

    def data_only(self, chunk: bytes) -> list[bytes] | None:
        """The data of the events ``chunk`` completes when it is whole events each one ``data: ...`` line and
        nothing is pending (what OpenAI-compatible servers send), as ``feed`` would give them; else None and
        nothing changes (``feed`` it then). One split and one count, no event objects."""
        if chunk[:6] != b"data: " or chunk[-2:] != b"\n\n" or self._buf or self._data is not None \
                or self._event is not None or self._skip_lf or b"\r" in chunk or len(chunk) > self.max_event_size:
            return None
        payloads = chunk[6:-2].split(b"\n\ndata: ")
        if chunk.count(b"\n") != 2 * len(payloads):  # a line of another kind, or a blank line too many
            return None
        self._started = True  # (a chunk that starts with "data: " has no BOM to strip)
        return payloads

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if not self._started:
            # The spec strips one BOM at the very start; it may itself arrive split, so wait for 3 bytes.
            head = self._buf + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._buf = head
                return []
            self._started = True
            self._buf = b""
            chunk = head[3:] if head.startswith(_BOM) else head
        if self._skip_lf:
            # The previous read ended on a bare "\r" that we already took as a line end; its "\n" is not
            # a second (blank) line.
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._buf and self._data is None and self._event is None and chunk.endswith(b"\n\n") \
                and b"\r" not in chunk and len(chunk) <= self.max_event_size:
            # The common case, a read of whole events each one "data: ..." line (what OpenAI-compatible
            # servers send): split on the blank lines, no line-by-line pass.
            parts = chunk[:-2].split(b"\n\n")
            for part in parts:
                if not part.startswith(b"data: ") or b"\n" in part:
                    break
            else:
                return [SSEEvent(None, part[6:]) for part in parts]
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in chunk:
            if buf[-1] == 0x0D:
                self._skip_lf = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = rest = lines.pop()
        if len(rest) + self._pending > self.max_event_size:
            raise SSEError(f"event larger than {self.max_event_size} bytes")
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:
            if not line:
                if data is not None:
                    events.append(SSEEvent(self._event, b"\n".join(data)))
                data = None
                self._event = None
                self._pending = 0
                continue
            if line[0] == 0x3A:  # ":" comment, used by servers as keep-alive
                continue
            colon = line.find(b":")
            if colon < 0:
                field, value = line, b""
            else:
                field = line[:colon]
                value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
            if field == b"data":
                if data is None:
                    data = [value]
                else:
                    data.append(value)
                self._pending += len(value)
                if self._pending > self.max_event_size:
                    raise SSEError(f"event larger than {self.max_event_size} bytes")
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")
            # "id", "retry" and unknown fields are ignored, as the spec says for unknown ones.
        self._data = data
        return events

    def close(self) -> None:
        """Declare the end of the stream.

        Raises :class:`SSEError` if an event was started (a field line seen or partly received) but its
        terminating blank line never came: the upstream stream was cut mid-event. A trailing comment line
        without its newline is harmless and accepted.
        """
        rest = self._buf
        if self._data is not None or self._event is not None or (rest and rest[0] != 0x3A and rest != _BOM):
            raise SSEError("stream ended in the middle of an event")


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """Frame ``data`` as one event: ``b"event: x\\ndata: ...\\n\\n"``; multi-line data gets one ``data:`` per line."""
    if b"\n" in data or b"\r" in data:
        body = b"data: " + b"\ndata: ".join(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
    else:
        body = b"data: " + data
    if event is None:
        return body + b"\n\n"
    return b"event: " + event.encode() + b"\n" + body + b"\n\n"
