"""OpenTelemetry traces: a span per client request and a child span per upstream attempt, over OTLP/HTTP.

Needs the ``runestone[otel]`` extra (opentelemetry-sdk and the OTLP/HTTP exporter); on only when ``[otel]
endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) is set. The spans are built from the request's own telemetry
events, on the request's task (:mod:`.observe` hands them over): the request span is opened when the first
attempt starts (with the request's arrival as its start), each attempt span when its provider adapter sends
the upstream request, which carries the attempt's ``traceparent``; ``AttemptFinished`` ends an attempt span,
``RetryScheduled`` and ``FailoverEvent`` become events of the request span, ``RequestFinished`` ends it. An
attempt that sent nothing over HTTP (the in-process fake) gets its span from its event's latency. An
incoming ``traceparent`` makes the request span its child (and its sampled flag is honoured). The finished
spans go to the SDK's ``BatchSpanProcessor``, whose own thread encodes and exports them: the event loop only
builds spans.

Attributes follow the GenAI semantic conventions (``gen_ai.operation.name``, ``gen_ai.system`` and
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``
and ``output_tokens``, ``gen_ai.response.finish_reasons`` when known,
``gen_ai.server.time_to_first_token``), with ``runestone.*`` for the gateway's own (provider, attempt
number, retries, failovers, route, cache hit). No prompt or completion text is ever put in a span: the
attributes are chosen one by one from fields that hold none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .events import AttemptFinished, FailoverEvent, RequestFinished, RetryScheduled

__all__ = ["Tracing", "format_traceparent", "parse_traceparent", "traces_url"]

#: The front door's name -> ``gen_ai.operation.name``.
OPERATIONS = {"chat": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings"}

_HEX = frozenset("0123456789abcdef")


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


class Tracing:
    """The tracer of one gateway, and the span bookkeeping of its requests (a :class:`~.observe.RequestScope`
    each). ``system_of(provider)`` names a provider's ``gen_ai.system`` (its type). ``exporter`` replaces the
    OTLP exporter (tests)."""

    def __init__(self, endpoint: str, service_name: str = "runestone", *,
                 system_of: Callable[[str], str | None] | None = None, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
        self.endpoint = endpoint
        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)
        # Not the global provider: each gateway in a process (tests run many) has its own.
        # shutdown_on_exit=False: the app shuts it down when it stops; an atexit export could hold up the exit.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False)
        self.processor = BatchSpanProcessor(exporter)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("runestone")
        self.system_of = system_of or (lambda provider: None)
        #: Spans started (requests and attempts), for state dumps.
        self.spans = 0

    # -- spans of one request ---------------------------------------------------------------------------

    def _parent_context(self, scope):
        parent = scope.parent
        if parent is None:
            return None
        trace = self._trace
        trace_id, span_id, flags = parent
        remote = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 1))
        return trace.set_span_in_context(trace.NonRecordingSpan(remote))

    def _request_span(self, scope):
        span = scope.span
        if span is None:
            span = scope.span = self.tracer.start_span("gateway request", context=self._parent_context(scope),
                                                       kind=self._server, start_time=scope.arrival_ns)
            self.spans += 1
        return span

    def attempt_started(self, scope, provider: str) -> bytes:
        """Open the span of the attempt an adapter is about to send; its ``traceparent`` header value."""
        self._close_attempt(scope, None)
        parent = self._trace.set_span_in_context(self._request_span(scope))
        span = self.tracer.start_span("gateway attempt", context=parent, kind=self._client)
        self.spans += 1
        scope.attempt = span
        scope.attempt_provider = provider
        ctx = span.get_span_context()
        return format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))

    def _close_attempt(self, scope, error_type: str | None) -> None:
        """End an attempt span no AttemptFinished ended (the attempt was cancelled, or refused the client)."""
        span = scope.attempt
        if span is None:
            return
        scope.attempt = None
        scope.attempts += 1
        span.set_attribute("runestone.attempt", scope.attempts)
        span.set_attribute("runestone.provider", scope.attempt_provider or "")
        span.set_attribute("runestone.attempt.reported", False)
        if error_type:
            span.set_attribute("error.type", error_type)
            span.set_status(self._error)
        span.end()

    def attempt_finished(self, scope, ev: AttemptFinished) -> None:
        span = scope.attempt if scope.attempt_provider == ev.provider else None
        if span is None:
            # Nothing went over HTTP (the in-process fake): the span is drawn from the event's latency.
            self._close_attempt(scope, None)
            parent = self._trace.set_span_in_context(self._request_span(scope))
            span = self.tracer.start_span("gateway attempt", context=parent, kind=self._client,
                                          start_time=time.time_ns() - int(ev.latency * 1e9))
            self.spans += 1
        else:
            scope.attempt = None
        scope.attempts += 1
        number = scope.attempts
        scope.last_provider = ev.provider
        operation = scope.operation
        system = self.system_of(ev.provider) or "_OTHER"
        span.update_name(f"{operation} {ev.model}")
        span.set_attributes({
            "gen_ai.operation.name": operation,
            "gen_ai.system": system,
            "gen_ai.provider.name": system,
            "gen_ai.request.model": ev.model,
            "runestone.provider": ev.provider,
            "runestone.attempt": number,
        })
        if ev.ok:
            span.set_attribute("gen_ai.response.model", ev.model)
            if ev.ttft is not None:
                span.set_attribute("gen_ai.server.time_to_first_token", ev.ttft)
        else:
            span.set_attribute("error.type", ev.error_type or "error")
            span.set_status(self._error)
        span.end()

    def note(self, scope, ev: RetryScheduled | FailoverEvent) -> None:
        """A retry or a failover: an event on the request span."""
        span = self._request_span(scope)
        if type(ev) is RetryScheduled:
            span.add_event("retry", {"runestone.provider": ev.provider, "runestone.retry.attempt": ev.attempt,
                                     "runestone.retry.delay": ev.delay, "runestone.retry.reason": ev.reason})
        else:
            attrs = {"runestone.failover.kind": ev.kind, "runestone.failover.group": ev.group,
                     "runestone.failover.attempts": ev.attempts}
            if ev.from_provider:
                attrs["runestone.failover.from"] = ev.from_provider
            if ev.to_provider:
                attrs["runestone.failover.to"] = ev.to_provider
            span.add_event("failover", attrs)

    def request_finished(self, scope, ev: RequestFinished) -> None:
        ok = ev.status == "ok"
        self._close_attempt(scope, None if ok else ev.error_type)
        span = self._request_span(scope)
        operation = OPERATIONS.get(ev.endpoint, "chat")
        asked = ev.model_asked or ev.model
        span.update_name(f"{operation} {asked}")
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
            "runestone.cost_usd": ev.cost,
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
        if ev.ttft is not None:
            attributes["gen_ai.server.time_to_first_token"] = ev.ttft
        reasons = scope.finish_reasons
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = list(reasons)
        if scope.path:
            attributes["url.path"] = scope.path
        span.set_attributes(attributes)
        if not ok:
            span.set_attribute("error.type", ev.error_type or "error")
            span.set_status(self._error)
        span.end()
        scope.reset()

    def cache_hit(self, scope, record: dict) -> None:
        """A request answered from the response cache (``record``: its access-log line)."""
        span = self._request_span(scope)
        model = record.get("model_asked") or ""
        span.update_name(f"chat {model}")
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
        span.set_attributes(attributes)
        span.end()
        scope.reset()

    # -- the exporter's thread --------------------------------------------------------------------------

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        """Export every ended span now (blocking: call it from a thread)."""
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread (blocking: call it from a thread)."""
        self.provider.shutdown()

    def snapshot(self) -> dict:
        return {"endpoint": self.endpoint, "spans": self.spans}
