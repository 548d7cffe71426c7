"""The sender's tap, W3C traceparent parsing, and the access log's writer thread, without a gateway."""

from __future__ import annotations

import orjson
import pytest

from runestone.telemetry.access_log import AccessLog
from runestone.telemetry.events import BreakerTransition
from runestone.telemetry.otel import format_traceparent, parse_traceparent, traces_url
from runestone.telemetry.sender import Telemetry


class _Ref:
    def __init__(self) -> None:
        self.casts = []

    def try_cast(self, msg) -> bool:
        self.casts.append(msg)
        return True


def test_the_tap_sees_every_event_first_and_cannot_break_emit():
    ref = _Ref()
    sender = Telemetry(ref)
    seen = []
    sender.tap = seen.append
    ev = BreakerTransition("p", "closed", "open", "x")
    sender.emit(ev)
    # The events reach the handler in batches (runestone.runtime.Coalescer): this ref never takes them in
    # hand, so they gather in the first.
    assert seen == [ev] and ref.casts == [[ev]] and sender.dropped == 0

    def broken(event):
        raise RuntimeError("a bug in the tap")

    sender.tap = broken
    sender.emit(ev)
    assert ref.casts == [[ev, ev]] and sender.dropped == 0


@pytest.mark.parametrize("header,expected", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)),
    (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
     (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 0)),
    # A later version may add fields after the flags.
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
     (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
    (b"\xff\xfe", None), ("", None), (None, None), ("garbage", None),
])
def test_traceparent_parsing(header, expected):
    assert parse_traceparent(header) == expected


def test_traceparent_round_trip_and_urls():
    tp = format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0xb7, 1)
    assert tp == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000b7-01"
    assert parse_traceparent(tp) == (0x4bf92f3577b34da6a3ce929d0e0e4736, 0xb7, 1)
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://collector/otlp/") == "http://collector/otlp/v1/traces"
    assert traces_url("http://collector/v1/traces") == "http://collector/v1/traces"


def test_the_access_log_writes_every_line_in_order_and_bounds_what_waits(tmp_path):
    path = tmp_path / "a.log"
    log = AccessLog(str(path))
    for i in range(2000):
        log.write({"n": i, "text": "é"})
    assert log.sync(10)
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["n"] for line in lines] == list(range(2000)) and lines[0]["text"] == "é"
    log.close()
    log.join(10)
    assert log.lines == 2000 and log.lost == 0

    bounded = AccessLog(str(tmp_path / "b.log"), max_pending=0)
    bounded.write({"n": 1})
    assert bounded.lost == 1 and bounded.lines == 0
    bounded.close()
    bounded.join(10)


def test_the_otlp_encoding_is_what_opentelemetry_proto_decodes():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from runestone.telemetry.otel import encode_spans

    attributes = {"s": "héllo", "empty": "", "t": True, "f": False, "zero": 0, "small": 7, "big": 2**40 + 3,
                  "negative": -5, "pi": 3.25, "list": ["stop", "length"], "long": "x" * 300}
    spans = [
        (2**127 + 9, 2**63 + 1, 0, "chat model", 2, 1_700_000_000_000_000_000, 1_700_000_000_500_000_000,
         attributes, [(1_700_000_000_100_000_000, "failover", {"runestone.failover.to": "b", "n": 2})], 2),
        (2**127 + 9, 42, 2**63 + 1, "chat m2", 3, 5, 6, {"s": "héllo"}, (), 0),
    ]
    for _ in range(2):  # the second time from the encoder's cache of repeated attributes
        raw = encode_spans(spans, {"service.name": "svc"})
        message = ExportTraceServiceRequest()
        message.ParseFromString(raw)
        # byte for byte what the official classes write for the same message: no unknown or misplaced field
        assert message.SerializeToString() == raw
        (rs,) = message.resource_spans
        assert {a.key: a.value.string_value for a in rs.resource.attributes} == {"service.name": "svc"}
        (ss,) = rs.scope_spans
        assert ss.scope.name == "runestone"
        first, second = ss.spans
        assert first.trace_id == (2**127 + 9).to_bytes(16, "big") and first.span_id == (2**63 + 1).to_bytes(8, "big")
        assert first.parent_span_id == b"" and second.parent_span_id == first.span_id
        assert first.name == "chat model" and first.kind == 2 and second.kind == 3
        assert first.start_time_unix_nano == 1_700_000_000_000_000_000
        assert first.end_time_unix_nano == 1_700_000_000_500_000_000
        assert first.status.code == 2 and second.status.code == 0
        values = {}
        for a in first.attributes:
            kind = a.value.WhichOneof("value")
            values[a.key] = ([v.string_value for v in a.value.array_value.values] if kind == "array_value"
                             else getattr(a.value, kind))
        assert values == attributes
        (event,) = first.events
        assert event.name == "failover" and event.time_unix_nano == 1_700_000_000_100_000_000
        assert {a.key: a.value.WhichOneof("value") for a in event.attributes} == {
            "runestone.failover.to": "string_value", "n": "int_value"}
