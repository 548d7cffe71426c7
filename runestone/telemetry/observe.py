"""Per-request observation: the access log and traces, fed from the request's own task.

When ``[log] access`` or tracing is on, the app wraps the front's handler with :meth:`RequestObserver.wrap`:
each HTTP request gets a :class:`RequestScope` (its route, arrival, incoming ``traceparent``) in a context
variable of the task serving it, and the telemetry sender hands every event to :meth:`RequestObserver.on_event`
(its ``tap``) synchronously, on the task that emits it. Request events are emitted on the request's own task
(a stream's end too: the server iterates the stream on the connection's task), so the scope found there is
that request's; a task spawned by a request (the WebSocket API runs each of its requests in one) gets a
scope of its own on first use. Provider adapters ask :func:`outgoing_traceparent` for the header of the
attempt they send. With both features off nothing here runs: no wrapper, no tap.

Besides ``RequestFinished``, the wrapper writes a line for two kinds of requests the pipeline never sees: an
answer from the response cache, and a refusal (status >= 400) before the pipeline (bad input, a bad key).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

import orjson
import trio

from .access_log import AccessLog, access_record, iso_time
from .events import AttemptFinished, FailoverEvent, RequestFinished, RetryScheduled

__all__ = ["RequestObserver", "RequestScope", "current_scope", "note_finish_reasons", "observing",
           "outgoing_traceparent"]

log = logging.getLogger(__name__)

_HIT = (b"x-runestone-cache", b"hit")
_OPERATION_BY_PATH = {"/v1/embeddings": "embeddings", "/v1/completions": "text_completion",
                      "/completions": "text_completion"}


class RequestScope:
    """What the observer knows of the request its task serves; spans are :mod:`.otel`'s."""

    __slots__ = ("task", "observer", "method", "path", "operation", "arrival_ns", "parent", "trace_id",
                 "parent_span_id", "flags", "span", "events", "spans", "attempt", "attempt_provider", "attempts",
                 "last_provider", "finish_reasons", "finished")

    def __init__(self, task, observer: "RequestObserver", method: str, path: str,
                 parent: tuple[int, int, int] | None) -> None:
        self.task = task
        self.observer = observer
        self.method = method
        self.path = path
        self.operation = _OPERATION_BY_PATH.get(path, "chat")
        self.arrival_ns = time.time_ns()
        #: The incoming traceparent: (trace id, span id, flags).
        self.parent = parent
        #: The request span's trace, its parent and flags, its id (None until its first span is made), its
        #: events, and the spans ended so far (:mod:`.otel` fills them).
        self.trace_id = 0
        self.parent_span_id = 0
        self.flags = 1
        self.span: int | None = None
        self.events: list = []
        self.spans: list = []
        self.attempt: Any = None
        self.attempt_provider: str | None = None
        self.attempts = 0
        self.last_provider: str | None = None
        self.finish_reasons: list[str] | None = None
        #: The pipeline recorded the request (RequestFinished): the wrapper writes no line of its own.
        self.finished = False

    def child(self, task) -> "RequestScope":
        return RequestScope(task, self.observer, self.method, self.path, self.parent)

    def reset(self) -> None:
        """The request is recorded; a next request on the same task starts afresh."""
        self.span = self.attempt = self.attempt_provider = self.last_provider = self.finish_reasons = None
        self.events = []
        self.spans = []
        self.attempts = 0
        self.arrival_ns = time.time_ns()


_SCOPE: ContextVar[RequestScope | None] = ContextVar("runestone_request_scope", default=None)


def current_scope() -> RequestScope | None:
    """The scope of the request served by the current task, or None (observation off, or no request)."""
    scope = _SCOPE.get()
    if scope is None:
        return None
    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:  # not in a trio task
        return None
    if scope.task is not task:
        scope = scope.child(task)
        _SCOPE.set(scope)
    return scope


def outgoing_traceparent(provider: str) -> bytes | None:
    """The ``traceparent`` header for the attempt a provider adapter is sending now, or None.

    Opens that attempt's span. Costs one context-variable read when tracing is off.
    """
    scope = _SCOPE.get()
    if scope is None or scope.observer.tracing is None:
        return None
    scope = current_scope()
    if scope is None:
        return None
    try:
        return scope.observer.tracing.attempt_started(scope, provider)
    except Exception:
        log.exception("tracing: the span of an attempt to %s could not be started", provider)
        return None


def observing() -> bool:
    """Is the request being handled now observed (access log or tracing on)? One context-variable read."""
    return _SCOPE.get() is not None


def note_finish_reasons(choices) -> None:
    """The finish reasons of an OpenAI-shaped answer's (or chunk's) ``choices``, for the request span.

    Provider adapters call it where they parse the answer; a context-variable read when observation is off.
    """
    if _SCOPE.get() is None:
        return
    scope = current_scope()
    if scope is None or not isinstance(choices, list):
        return
    reasons = [c["finish_reason"] for c in choices if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    if reasons:
        scope.finish_reasons = (scope.finish_reasons or []) + reasons


def _bearer_or_api_key(request) -> bytes | None:
    header = request.header(b"authorization")
    if header:
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    api_key = request.header(b"x-api-key")
    return api_key.strip() if api_key else None


def _header(headers, name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


class RequestObserver:
    """The access log and the tracer of one gateway, fed per request (see the module docstring).

    ``keys`` (the front's KeyRing) gives the key id of requests the pipeline did not record.
    """

    def __init__(self, *, access_log: AccessLog | None = None, tracing: Any = None, keys: Any = None) -> None:
        self.access_log = access_log
        self.tracing = tracing
        self.keys = keys
        #: Observation failures (a bug must cost a request nothing): counted and logged.
        self.errors = 0

    def wrap(self, handle):
        """The HTTP handler ``handle`` with a :class:`RequestScope` per request."""
        tracing = self.tracing
        current_task = trio.lowlevel.current_task

        async def observed(request):
            parent = None
            if tracing is not None:
                from .otel import parse_traceparent

                parent = parse_traceparent(request.header(b"traceparent"))
            scope = RequestScope(current_task(), self, request.method, request.path, parent)
            _SCOPE.set(scope)
            response = await handle(request)
            if not scope.finished:
                status = getattr(response, "status", None)
                if status is not None and getattr(response, "stream", None) is None:
                    if status >= 400 or _HIT in response.headers:
                        try:
                            await self._answered(scope, request, response)
                        except Exception:
                            self._failed("a request's line")
            return response

        return observed

    def _failed(self, what: str) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            log.exception("observation of %s failed (%d so far)", what, self.errors)

    async def _answered(self, scope: RequestScope, request, response) -> None:
        """A line (and a span) for a cache hit or a refusal the pipeline never saw."""
        hit = response.status < 400
        token = _bearer_or_api_key(request)
        key_id = self.keys.client(token) if self.keys is not None and token is not None else None
        asked = served = provider = error_type = None
        tokens_in = tokens_out = 0
        try:
            body = orjson.loads(await request.body()) if request.method == "POST" else None
        except Exception:
            body = None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            asked = body["model"]
        try:
            answer = orjson.loads(response.body) if response.body else None
        except orjson.JSONDecodeError:
            answer = None
        if hit and isinstance(answer, dict):
            served = answer.get("model") if isinstance(answer.get("model"), str) else None
            usage = answer.get("usage")
            if isinstance(usage, dict):
                tokens_in = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
                tokens_out = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
            provider = _header(response.headers, b"x-runestone-provider") or None
        elif isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            err = answer["error"]
            code = err.get("code") or err.get("type")
            error_type = code if isinstance(code, str) else None
        now = time.time_ns()
        record = {
            "time": iso_time(now / 1e9),
            "request_id": _header(response.headers, b"x-request-id"),
            "key_id": key_id,
            "team": None,
            "route": scope.path,
            "endpoint": None,
            "model_asked": asked,
            "model_served": served,
            "provider": provider,
            "attempts": 0,
            "retries": 0,
            "failovers": 0,
            "status": response.status,
            "outcome": "ok" if hit else "error",
            "error_type": error_type,
            "stream": False,
            "latency_ms": round((now - scope.arrival_ns) / 1e6, 3),
            "ttft_ms": None,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "cost_usd": 0.0,
            "cache_hit": hit,
        }
        scope.finished = True
        if self.access_log is not None:
            self.access_log.write(record)
        if hit and self.tracing is not None:
            self.tracing.cache_hit(scope, record)

    def on_event(self, event) -> None:
        """The sender's tap: called synchronously for every event emitted, on the emitting task."""
        kind = type(event)
        if kind is RequestFinished:
            scope = current_scope()
            try:
                if self.access_log is not None:
                    self.access_log.write(access_record(event, scope.path if scope else None,
                                                        scope.last_provider if scope else None))
                if scope is not None:
                    scope.finished = True
                    if self.tracing is not None:
                        self.tracing.request_finished(scope, event)
            except Exception:
                self._failed("a finished request")
        elif kind is AttemptFinished or kind is RetryScheduled or kind is FailoverEvent:
            scope = current_scope()
            if scope is None:
                return
            try:
                if kind is AttemptFinished:
                    scope.last_provider = event.provider
                    if self.tracing is not None:
                        self.tracing.attempt_finished(scope, event)
                elif self.tracing is not None and event.kind in ("failover", "retry_scheduled"):
                    self.tracing.note(scope, event)
            except Exception:
                self._failed("an attempt")

    def close(self) -> None:
        """Stop the writer and exporter threads once they wrote what they hold (does not wait)."""
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    def snapshot(self) -> dict:
        return {
            "access_log": self.access_log.snapshot() if self.access_log is not None else None,
            "tracing": self.tracing.snapshot() if self.tracing is not None else None,
            "errors": self.errors,
        }

