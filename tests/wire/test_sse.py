"""The event-stream parser against the WHATWG rules, whatever the split of the bytes on the wire."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone.wire.sse import SSEError, SSEEvent, SSEParser, encode_event

ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_1","content":[]}}\n\n'
    b": keep-alive comment\n\n"
    b"event: ping\r\n"
    b'data: {"type": "ping"}\r\n\r\n'
    b"event: content_block_delta\r"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\r\r'
    b"id: 7\nretry: 100\ndata:no-space\ndata:  two-spaces\ndata\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent("message_start", b'{"type":"message_start","message":{"id":"msg_1","content":[]}}'),
    SSEEvent("ping", b'{"type": "ping"}'),
    SSEEvent("content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}'),
    SSEEvent(None, b"no-space\n two-spaces\n"),
    SSEEvent(None, b"[DONE]"),
]


def parse_in_pieces(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    last = 0
    for cut in sorted(cuts) + [len(stream)]:
        events.extend(parser.feed(stream[last:cut]))
        last = cut
    parser.close()
    return events


def test_whole_stream_at_once():
    assert parse_in_pieces(ANTHROPIC_STREAM, []) == EXPECTED


def test_every_single_split_point():
    for cut in range(len(ANTHROPIC_STREAM) + 1):
        assert parse_in_pieces(ANTHROPIC_STREAM, [cut]) == EXPECTED, cut


def test_one_byte_at_a_time():
    assert parse_in_pieces(ANTHROPIC_STREAM, list(range(len(ANTHROPIC_STREAM)))) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=12))
def test_any_split(cuts):
    assert parse_in_pieces(ANTHROPIC_STREAM, cuts) == EXPECTED


line_end = st.sampled_from([b"\n", b"\r\n", b"\r"])
payload = st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.none() | st.sampled_from(["a", "message_delta"]), st.lists(payload, min_size=1, max_size=3)), max_size=5),
    line_end,
    st.data(),
)
def test_generated_streams_round_trip(events, eol, data):
    wire = b""
    for name, lines in events:
        if name is not None:
            wire += b"event: " + name.encode() + eol
        for line in lines:
            wire += b"data: " + line + eol
        wire += eol
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert parse_in_pieces(wire, cuts) == [SSEEvent(n, b"\n".join(ls)) for n, ls in events]


def test_leading_bom_is_stripped_even_when_split():
    stream = b"\xef\xbb\xbfdata: x\n\n"
    for cut in range(len(stream) + 1):
        assert parse_in_pieces(stream, [cut, 1]) == [SSEEvent(None, b"x")]


def test_fields_without_data_dispatch_nothing_and_reset_event_name():
    parser = SSEParser()
    assert parser.feed(b"event: lonely\n\ndata: x\n\n") == [SSEEvent(None, b"x")]


def test_close_rejects_a_truncated_event():
    parser = SSEParser()
    assert parser.feed(b"data: complete\n\nevent: message_delta\ndata: {\"partial") == [SSEEvent(None, b"complete")]
    with pytest.raises(SSEError):
        parser.close()


def test_close_rejects_fields_without_the_blank_line():
    parser = SSEParser()
    parser.feed(b"data: x\n")
    with pytest.raises(SSEError):
        parser.close()


def test_close_accepts_clean_end_and_trailing_comment():
    parser = SSEParser()
    parser.feed(b"data: x\n\n: bye")
    parser.close()


def test_oversized_event_is_refused():
    parser = SSEParser(max_event_size=64)
    parser.feed(b"data: " + b"a" * 40 + b"\n")
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"b" * 40 + b"\n")
    with pytest.raises(SSEError):
        SSEParser(max_event_size=64).feed(b"data: " + b"c" * 100)


def test_encode_event_round_trips():
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event(b"{}", "ping") == b"event: ping\ndata: {}\n\n"
    wire = encode_event(b"line1\nline2\r\nline3", "x") + encode_event(b"")
    assert parse_in_pieces(wire, []) == [SSEEvent("x", b"line1\nline2\nline3"), SSEEvent(None, b"")]


# A read as an upstream sends it: whole events, each "data: ..." (the fast path), or anything else.
wire_piece = st.sampled_from([b"data: ", b"data:", b"data", b"event: x", b": c", b"id: 1", b"\n", b"\n\n", b"\r",
                              b"{}", b"[DONE]", b"a\nb", b"\xef\xbb\xbf"])


@settings(max_examples=400, deadline=None)
@given(st.lists(wire_piece, max_size=12), st.lists(wire_piece, max_size=6))
def test_data_only_is_feed_without_event_objects_or_declines_and_changes_nothing(before, read):
    """``data_only`` gives exactly the data ``feed`` would for a read of whole "data: ..." events, after any
    earlier read; for anything else it gives None and leaves the parser as it was."""
    first, chunk = b"".join(before), b"".join(read)
    fast, slow = SSEParser(), SSEParser()
    fast.feed(first)
    slow.feed(first)
    got = fast.data_only(chunk)
    expected = [ev.data for ev in slow.feed(chunk)]
    if got is None:
        assert [ev.data for ev in fast.feed(chunk)] == expected
    else:
        assert got == expected and all(ev.event is None for ev in SSEParser().feed(chunk))
    tail = b"data: after\n\n"
    assert fast.feed(tail) == slow.feed(tail)


def test_data_only_takes_an_openai_read_and_declines_the_rest():
    parser = SSEParser()
    assert parser.data_only(b'data: {"a":1}\n\ndata: \n\ndata: [DONE]\n\n') == [b'{"a":1}', b"", b"[DONE]"]
    for other in (b"data: x\n\n: keep-alive\n\n", b"event: e\ndata: x\n\n", b"data: x\ndata: y\n\n",
                  b"data: x\r\n\r\n", b"data: x\n\n\n\ndata: y\n\n", b"data:x\n\n", b"data: x\n", b""):
        assert parser.data_only(other) is None, other
    parser.feed(b"data: partial")  # an event is pending: the next read is not whole events
    assert parser.data_only(b"\n\ndata: y\n\n") is None
