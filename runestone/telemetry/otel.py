"""OpenTelemetry traces: a span per client request and a child span per upstream attempt, over OTLP/HTTP.

On only when ``[otel] endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) is set. The spans are built from the
request's own telemetry events, on the request's task (:mod:`.observe` hands them over): the request span's
ids are drawn when its first attempt starts (it starts at the request's arrival), each attempt's when its
provider adapter sends the upstream request, which carries the attempt's ``traceparent``; ``AttemptFinished``
ends an attempt span, ``RetryScheduled`` and ``FailoverEvent`` become events of the request span,
``RequestFinished`` ends it and hands the request's spans to the exporter thread. An attempt that sent
nothing over HTTP (the in-process fake) gets its span from its event's latency. An incoming ``traceparent``
makes the request span its child; its sampled flag is honoured (a request the caller does not sample is not
recorded, and its upstream requests say so).

The ``runestone[otel]`` extra is empty by decision: no OpenTelemetry package is needed at run time, neither the
SDK nor ``opentelemetry-proto`` (whose message classes were the alternative: they would cost the protobuf
runtime as a dependency and more per batch than this encoder, for bytes proven the same). The tests install
``opentelemetry-proto`` and check the encoding against it byte for byte (``SerializeToString`` of the decoded
message gives back exactly what was sent), and the OTLP receiver the end-to-end tests run decodes with it.

Why not the OpenTelemetry SDK: measured on this machine, an SDK span with the attributes below costs ~34 µs
to build on the event loop and the OTLP exporter's encoder ~80 µs to encode, about 230 µs per request of one
attempt, as much as the whole request costs the gateway without tracing. Here a span is a tuple built on the
request's task (a few µs), and the exporter thread (``runestone-otel``) batches them (every
``EXPORT_INTERVAL`` or ``BATCH`` spans), writes the OTLP protobuf itself (``ExportTraceServiceRequest``,
checked in the tests by decoding it with the official ``opentelemetry-proto``) and posts it to
``{endpoint}/v1/traces``. A batch the collector refuses or cannot take is counted and logged, never retried
forever; at most ``MAX_PENDING`` requests' spans wait, more are counted as dropped.

Attributes follow the GenAI semantic conventions (``gen_ai.operation.name``, ``gen_ai.system`` and
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``
and ``output_tokens``, ``gen_ai.response.finish_reasons`` (noted by every provider adapter where it reads
the answer's or the stream's finishing choices, :func:`.observe.note_finish_reasons`: openai and azure,
anthropic, gemini, bedrock and the in-process fake, streamed or not; whatever the front door; a cached answer
has none, no upstream having been asked),
``gen_ai.server.time_to_first_token``), with ``runestone.*`` for the gateway's own (provider, attempt
number, retries, failovers, route, cache hit). No prompt or completion text is ever put in a span: the
attributes are chosen one by one from fields that hold none.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._drain import DrainThread
from .events import AttemptFinished, FailoverEvent, RequestFinished, RetryScheduled

__all__ = ["Tracing", "encode_spans", "format_traceparent", "parse_traceparent", "traces_url"]

log = logging.getLogger(__name__)

#: The front door's name -> ``gen_ai.operation.name``.
OPERATIONS = {"chat": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings"}
#: Seconds between exports (at most), and spans per export (at most).
EXPORT_INTERVAL = 1.0
BATCH = 512
#: Requests whose spans may wait for the exporter; more are dropped (and counted).
MAX_PENDING = 4096
EXPORT_TIMEOUT = 10.0

SERVER, CLIENT = 2, 3  # OTLP SpanKind
UNSET, OK, ERROR = 0, 1, 2  # OTLP Status code

_HEX = frozenset("0123456789abcdef")
_rand = random.Random()  # seeded from os.urandom: ids are unique, not secret


def parse_traceparent(value: bytes | str | None) -> tuple[int, int, int] | None:
    """``(trace id, parent span id, flags)`` of a W3C ``traceparent`` header, or None when it is not one."""
    if not value:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    # A later version may append fields; version 00 has exactly four, and ff is invalid.
    if not _HEX.issuperset("".join(parts[:4])) or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(parts[3], 16)


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags & 0xFF)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base ``endpoint`` (as ``OTEL_EXPORTER_OTLP_ENDPOINT`` means it)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


# -- the OTLP protobuf, written by hand (field numbers of opentelemetry/proto/trace/v1/trace.proto) ------------


_BYTE = [bytes((i,)) for i in range(256)]
_LD_TAG = [bytes((tag << 3 | 2,)) for tag in range(16)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag < 16)."""
    n = len(payload)
    return _LD_TAG[tag] + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


_KEYS: dict[str, bytes] = {}
_DOUBLE = struct.Struct("<d")


def _any(value: Any) -> bytes:
    if value.__class__ is str:
        return _ld(1, value.encode())
    if value.__class__ is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if value.__class__ is int:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if value.__class__ is float:
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, (list, tuple)):
        return _ld(5, b"".join([_ld(1, _any(v)) for v in value]))
    return _ld(1, str(value).encode())


#: (tag, key, type, value) -> the encoded attribute, for the values that repeat (names of models, providers,
#: operations; flags); cleared when full, so it stays bounded whatever the values.
_PAIRS: dict[tuple, bytes] = {}
_UNIQUE = frozenset({"runestone.request_id"})


def _attributes(tag: int, attributes: dict) -> bytes:
    keys = _KEYS
    pairs = _PAIRS
    out = []
    for key, value in attributes.items():
        cls = value.__class__
        cached = (cls is str or cls is bool or (cls is int and -1 < value < 1024)) and key not in _UNIQUE
        if cached:
            encoded = pairs.get((tag, key, cls, value))
            if encoded is not None:
                out.append(encoded)
                continue
        k = keys.get(key)
        if k is None:
            k = _ld(1, key.encode())
            if len(keys) < 1000:  # attribute names are a fixed few; the bound is only a guard
                keys[key] = k
        encoded = _ld(tag, k + _ld(2, _any(value)))
        if cached:
            if len(pairs) >= 4096:
                pairs.clear()
            pairs[(tag, key, cls, value)] = encoded
        out.append(encoded)
    return b"".join(out)


def _span(span: tuple) -> bytes:
    trace_id, span_id, parent_id, name, kind, start, end, attributes, events, status = span
    parts = [b"\x0a\x10" + trace_id.to_bytes(16, "big"), b"\x12\x08" + span_id.to_bytes(8, "big")]
    if parent_id:
        parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
    parts.append(_ld(5, name.encode()))
    parts.append(b"\x30" + _varint(kind))
    parts.append(b"\x39" + start.to_bytes(8, "little"))
    parts.append(b"\x41" + end.to_bytes(8, "little"))
    parts.append(_attributes(9, attributes))
    for when, event_name, event_attributes in events:
        parts.append(_ld(11, b"\x09" + when.to_bytes(8, "little") + _ld(2, event_name.encode())
                         + _attributes(3, event_attributes)))
    if status:
        parts.append(b"\x7a\x02\x18" + bytes((status,)))  # field 15, Status{code = 3}
    return b"".join(parts)


def encode_spans(spans: list[tuple], resource: dict, scope: str = "runestone") -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans`` (tuples as :class:`Tracing` makes them)."""
    scope_spans = _ld(1, _ld(1, scope.encode())) + b"".join([_ld(2, _span(s)) for s in spans])
    resource_spans = _ld(1, _attributes(1, resource)) + _ld(2, scope_spans)
    return _ld(1, resource_spans)


class Tracing:
    """The tracer of one gateway and its exporter thread; the span bookkeeping of each request lives in its
    :class:`~.observe.RequestScope`. ``system_of(provider)`` names a provider's ``gen_ai.system`` (its type).
    ``post(url, body)`` replaces the HTTP post of a batch (tests)."""

    def __init__(self, endpoint: str, service_name: str = "runestone", *,
                 system_of: Callable[[str], str | None] | None = None, post: Callable | None = None) -> None:
        from .. import __version__

        self.endpoint = endpoint
        self.url = traces_url(endpoint)
        self.resource = {"service.name": service_name, "telemetry.sdk.name": "runestone",
                         "telemetry.sdk.language": "python", "telemetry.sdk.version": __version__}
        self.system_of = system_of or (lambda provider: None)
        self._post = post or self._http_post
        self._client = None
        #: Spans handed to the exporter, exported, dropped (queue full, or the collector refused them).
        self.spans = 0
        self.exported = 0
        self.dropped = 0
        self.export_errors = 0
        #: Ended spans waiting for the exporter (deque append and popleft are atomic: no lock).
        self._exporter = DrainThread("runestone-otel", EXPORT_INTERVAL, self._export, self._close_client, BATCH)
        self._pending: deque[tuple] = self._exporter.pending
        self._wake = self._exporter.wake

    # -- spans of one request (on its task) -------------------------------------------------------------

    def _request_ids(self, scope) -> None:
        if scope.span is None:
            parent = scope.parent
            if parent is None:
                scope.trace_id, scope.flags, scope.parent_span_id = _rand.getrandbits(128) or 1, 1, 0
            else:
                scope.trace_id, scope.parent_span_id, scope.flags = parent
            scope.span = _rand.getrandbits(64) or 1
            scope.events = []
            scope.spans = []

    def attempt_started(self, scope, provider: str) -> bytes:
        """Open the span of the attempt an adapter is about to send; its ``traceparent`` header value."""
        self._request_ids(scope)
        self._close_attempt(scope, None)
        span_id = _rand.getrandbits(64) or 1
        scope.attempt = (span_id, time.time_ns())
        scope.attempt_provider = provider
        return format_traceparent(scope.trace_id, span_id, scope.flags)

    def _close_attempt(self, scope, error_type: str | None) -> None:
        """End an attempt span no AttemptFinished ended (the attempt was cancelled, or refused the client)."""
        attempt = scope.attempt
        if attempt is None:
            return
        scope.attempt = None
        scope.attempts += 1
        attributes = {"runestone.attempt": scope.attempts, "runestone.provider": scope.attempt_provider or "",
                      "runestone.attempt.reported": False}
        if error_type:
            attributes["error.type"] = error_type
        scope.spans.append((scope.trace_id, attempt[0], scope.span, f"{scope.operation} {scope.attempt_provider}",
                            CLIENT, attempt[1], time.time_ns(), attributes, (), ERROR if error_type else UNSET))

    def attempt_finished(self, scope, ev: AttemptFinished) -> None:
        self._request_ids(scope)
        now = time.time_ns()
        attempt = scope.attempt if scope.attempt_provider == ev.provider else None
        if attempt is None:
            # Nothing went over HTTP (the in-process fake): the span is drawn from the event's latency.
            self._close_attempt(scope, None)
            attempt = (_rand.getrandbits(64) or 1, now - int(ev.latency * 1e9))
        scope.attempt = None
        scope.attempts += 1
        scope.last_provider = ev.provider
        operation = scope.operation
        system = self.system_of(ev.provider) or "_OTHER"
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": system,
            "gen_ai.provider.name": system,
            "gen_ai.request.model": ev.model,
            "runestone.provider": ev.provider,
            "runestone.attempt": scope.attempts,
        }
        if ev.ok:
            attributes["gen_ai.response.model"] = ev.model
            if ev.ttft is not None:
                attributes["gen_ai.server.time_to_first_token"] = ev.ttft
        else:
            attributes["error.type"] = ev.error_type or "error"
        scope.spans.append((scope.trace_id, attempt[0], scope.span, f"{operation} {ev.model}", CLIENT, attempt[1],
                            now, attributes, (), UNSET if ev.ok else ERROR))

    def note(self, scope, ev: RetryScheduled | FailoverEvent) -> None:
        """A retry or a failover: an event on the request span."""
        self._request_ids(scope)
        if type(ev) is RetryScheduled:
            scope.events.append((time.time_ns(), "retry", {
                "runestone.provider": ev.provider, "runestone.retry.attempt": ev.attempt,
                "runestone.retry.delay": float(ev.delay), "runestone.retry.reason": ev.reason}))
        else:
            attributes = {"runestone.failover.kind": ev.kind, "runestone.failover.group": ev.group,
                          "runestone.failover.attempts": ev.attempts}
            if ev.from_provider:
                attributes["runestone.failover.from"] = ev.from_provider
            if ev.to_provider:
                attributes["runestone.failover.to"] = ev.to_provider
            scope.events.append((time.time_ns(), "failover", attributes))

    def request_finished(self, scope, ev: RequestFinished) -> None:
        self._request_ids(scope)
        ok = ev.status == "ok"
        self._close_attempt(scope, None if ok else ev.error_type)
        operation = OPERATIONS.get(ev.endpoint, "chat")
        asked = ev.model_asked or ev.model
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": asked,
            "gen_ai.usage.input_tokens": ev.tokens_in,
            "gen_ai.usage.output_tokens": ev.tokens_out,
            "http.response.status_code": ev.http_status,
            "runestone.request_id": ev.request_id,
            "runestone.endpoint": ev.endpoint,
            "runestone.stream": ev.stream,
            "runestone.attempts": ev.attempts,
            "runestone.retries": ev.retries,
            "runestone.failovers": ev.failovers,
            "runestone.route": ev.route_reason,
            "runestone.cost_usd": float(ev.cost),
            "runestone.cache_hit": False,
        }
        if ev.key_id:
            attributes["runestone.key_id"] = ev.key_id
        provider = ev.provider or scope.last_provider
        if provider:
            system = self.system_of(provider) or "_OTHER"
            attributes["runestone.provider"] = provider
            attributes["gen_ai.system"] = system
            attributes["gen_ai.provider.name"] = system
        if ok:
            attributes["gen_ai.response.model"] = ev.model
        else:
            attributes["error.type"] = ev.error_type or "error"
        if ev.ttft is not None:
            attributes["gen_ai.server.time_to_first_token"] = ev.ttft
        if scope.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(scope.finish_reasons)
        if scope.path:
            attributes["url.path"] = scope.path
        self._end(scope, f"{operation} {asked}", attributes, UNSET if ok else ERROR)

    def cache_hit(self, scope, record: dict) -> None:
        """A request answered from the response cache (``record``: its access-log line)."""
        self._request_ids(scope)
        model = record.get("model_asked") or ""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": record.get("tokens_in") or 0,
            "gen_ai.usage.output_tokens": record.get("tokens_out") or 0,
            "http.response.status_code": record.get("status") or 200,
            "runestone.request_id": record.get("request_id") or "",
            "runestone.cache_hit": True,
        }
        if record.get("model_served"):
            attributes["gen_ai.response.model"] = record["model_served"]
        if record.get("provider"):
            attributes["runestone.provider"] = record["provider"]
        self._end(scope, f"chat {model}", attributes, UNSET)

    def _end(self, scope, name: str, attributes: dict, status: int) -> None:
        spans = scope.spans
        spans.append((scope.trace_id, scope.span, scope.parent_span_id, name, SERVER, scope.arrival_ns,
                      time.time_ns(), attributes, scope.events, status))
        sampled = scope.flags & 1
        scope.reset()
        if not sampled:
            return
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self.dropped += len(spans)
            return
        self.spans += len(spans)
        pending.extend(spans)
        # The thread wakes on its own every EXPORT_INTERVAL; a request never wakes it, except to export a
        # full batch.
        if len(pending) >= BATCH and not self._wake.is_set():
            self._wake.set()

    # -- the exporter thread ----------------------------------------------------------------------------

    def _http_post(self, url: str, body: bytes) -> int:
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=EXPORT_TIMEOUT)
        return self._client.post(url, content=body, headers={"content-type": "application/x-protobuf"}).status_code

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()

    def _export(self, batch: list[tuple]) -> None:
        try:
            status = self._post(self.url, encode_spans(batch, self.resource))
        except Exception as exc:
            status = f"{type(exc).__name__}: {exc}"
        if status == 200:
            self.exported += len(batch)
            return
        self.dropped += len(batch)
        self.export_errors += 1
        if self.export_errors == 1 or self.export_errors % 100 == 0:
            log.warning("traces: %d spans not exported to %s (%s; %d batches so far)", len(batch), self.url,
                        status, self.export_errors)

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Export every span handed over so far (blocking: call it from a thread)."""
        return self._exporter.sync(timeout)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter thread (does not wait for it)."""
        self._exporter.stop()

    def snapshot(self) -> dict:
        return {"endpoint": self.endpoint, "spans": self.spans, "exported": self.exported, "dropped": self.dropped,
                "export_errors": self.export_errors}

