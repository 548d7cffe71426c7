"""The ``openai`` provider type: the OpenAI API and any OpenAI-compatible server (vLLM, Ollama, Groq, ...).

The body already is the upstream's format, so the hot path does the least a gateway may: it parses each
upstream event once (to validate it and to read ``usage``) and relays the upstream's own bytes. It always
asks the upstream for ``stream_options.include_usage`` so that the usage ledger learns the token counts,
and drops the usage-only chunk again when the client did not ask for it.
"""

from __future__ import annotations


import orjson

from ..http import prepared_headers
from ..http.errors import TransportError
from ..resilience.errors import UpstreamError
from .presets import preset_base_url, preset_of, rename_reasoning
from ..wire.reasoning import for_openai_upstream
from ..telemetry.observe import note_finish_reasons, outgoing_traceparent
from .base import (
    MAX_NAME_CHARS,
    ChatResult,
    UpstreamStream,
    Usage,
    check_name,
    loads_object,
    model_ids,
    open_exchange,
    secrets_of,
    transport_error,
    upstream_http_error,
    upstream_stream_error,
    usage_from,
)

__all__ = ["OpenAIAdapter", "OpenAIStream", "ResponsesStream"]

_JSON = (b"content-type", b"application/json")
#: The Responses stream's last events: the response as it ended.
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: What ``/responses/input_tokens`` accepts of a Responses request.
_COUNTED = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                      "reasoning", "truncation", "previous_response_id", "conversation"})


def _response_usage(provider: str, obj: dict, usage: Usage) -> None:
    """A Response object's ``usage`` (input_tokens/output_tokens) into ``usage``."""
    u = obj.get("usage")
    if isinstance(u, dict):
        usage.prompt_tokens = int(u.get("input_tokens") or 0)
        usage.completion_tokens = int(u.get("output_tokens") or 0)


class OpenAIStream(UpstreamStream):
    """An OpenAI SSE stream relayed event by event, validated, with usage captured."""

    __slots__ = ("_include_usage", "_reasoning_field")

    def __init__(self, provider: str, cm, response, include_usage: bool, secrets=(),
                 reasoning_field: str | None = None) -> None:
        super().__init__(provider, cm, response, secrets)
        self._include_usage = include_usage
        #: A host's own name for reasoning deltas (a preset's), renamed to ``reasoning_content`` on the way.
        self._reasoning_field = reasoning_field

    _END = "its [DONE] marker"

    async def __anext__(self) -> list[bytes]:
        """The chunk payloads the next upstream read(s) give to relay (see ``UpstreamStream.__anext__``): one
        loop over the read's events, which are split without event objects in the usual case."""
        if self.finished or self._closed:
            raise StopAsyncIteration
        parser = self._parser
        while True:
            raw = await self._read()
            if raw is None:
                raise UpstreamError(self._provider, "stream_cut", f"upstream stream ended before {self._END}")
            payloads = parser.data_only(raw)
            if payloads is None:
                payloads = [ev.data for ev in self._feed(raw)]
            out: list[bytes] = []
            if self._relay(payloads, out):
                self.finished = True
                return out
            if out:
                return out

    def _relay(self, payloads: list, out: list[bytes]) -> bool:
        """Append to ``out`` what each event's data relays, each validated; True at the ``[DONE]`` marker."""
        provider = self._provider
        loads = orjson.loads
        for data in payloads:
            if data == b"[DONE]":
                return True
            try:
                obj = loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if obj.__class__ is not dict:
                loads_object(provider, data, "a stream chunk")  # raises the malformed error that says why
            err = obj.get("error")
            if err is not None:
                raise upstream_stream_error(provider, err, self._secrets)
            choices = obj.get("choices")
            if choices.__class__ is not list:
                raise UpstreamError(provider, "malformed", "upstream stream chunk has no 'choices' list")
            if len(data) > MAX_NAME_CHARS:  # a shorter chunk cannot hold an over-long id or model
                check_name(provider, obj, "id")
                check_name(provider, obj, "model")
            if choices and choices[0].__class__ is dict and choices[0].get("finish_reason"):
                note_finish_reasons(choices)
            u = obj.get("usage")
            if u:
                usage_from(provider, u, self.usage)
                if not choices and not self._include_usage:
                    continue
            if self._reasoning_field is not None:
                data = rename_reasoning(obj, data, self._reasoning_field)
            out.append(data)
        return False


class ResponsesStream(UpstreamStream):
    """A Responses API event stream relayed event by event (native pass-through), its usage captured."""

    __slots__ = ()

    _END = "response.completed"

    def _event(self, ev, out: list[bytes]) -> bool:
        data = ev.data
        if data == b"[DONE]":
            return True
        provider = self._provider
        obj = loads_object(provider, data, "a stream event")
        kind = obj.get("type")
        if kind == "error":
            raise upstream_stream_error(provider, obj.get("error") or obj, self._secrets)
        out.append(data)
        if kind in _RESPONSE_ENDS:
            response = obj.get("response")
            if isinstance(response, dict):
                _response_usage(provider, response, self.usage)
            return True
        return False


class OpenAIAdapter:
    """Talks to ``{base_url}/chat/completions``, ``/embeddings`` and ``/models``; with ``responses_api`` also
    to ``/responses``, which gets the client's Responses body unchanged (``speaks_responses``)."""

    def __init__(self, name: str, config, transport, timeouts=None) -> None:
        self.name = name
        base = (getattr(config, "base_url", None) or preset_base_url(config) or "https://api.openai.com/v1").rstrip("/")
        self._chat_url = base + "/chat/completions"
        self._embed_url = base + "/embeddings"
        self._models_url = base + "/models"
        self._responses_url = base + "/responses"
        self._count_url = base + "/responses/input_tokens"
        #: The upstream speaks OpenAI's Responses API: /v1/responses requests pass through unchanged.
        self.speaks_responses = bool(getattr(config, "responses_api", False))
        headers = [_JSON, (b"accept", b"application/json")]
        key = getattr(config, "api_key", None)
        if key:
            headers.append((b"authorization", b"Bearer " + key.encode()))
        self._headers = prepared_headers(headers)
        self._secrets = secrets_of(config)
        self._transport = transport
        self._timeouts = timeouts
        #: The host's known quirks (``preset``): parameters it refuses, its reasoning field, stream usage.
        self._preset = preset_of(config)

    def _http_error(self, status: int, headers, raw: bytes) -> UpstreamError:
        return upstream_http_error(self.name, status, headers, raw, self._secrets)

    def _chat_target(self, body: dict) -> tuple[str, dict]:
        """Where a chat body goes and what is sent: the preset's refusals and drops applied."""
        preset = self._preset
        return self._chat_url, (preset.prepare(body) if preset is not None else body)

    def _embed_target(self, body: dict) -> tuple[str, dict]:
        return self._embed_url, body

    def _outgoing_headers(self):
        traceparent = outgoing_traceparent(self.name)
        return self._headers if traceparent is None else [*self._headers, (b"traceparent", traceparent)]

    async def _open(self, url: str, body: bytes, method: str = "POST", deadline: float | None = None):
        cm = self._transport.stream(method, url, self._outgoing_headers(), body, timeouts=self._timeouts,
                                    deadline=deadline)
        try:
            response = await cm.__aenter__()
        except TransportError as exc:
            raise transport_error(self.name, exc, self._secrets) from None
        return cm, response

    async def _open_events(self, url: str, body: bytes, deadline: float | None = None):
        """An event stream's response, its status 200 (anything else is the upstream's error, read and raised)."""
        return await open_exchange(self.name, self._transport, "POST", url, self._outgoing_headers(), body,
                                   timeouts=self._timeouts, deadline=deadline, secrets=self._secrets,
                                   http_error=lambda _provider, status, headers, raw, _secrets:
                                   self._http_error(status, headers, raw))

    async def _read_json(self, url: str, payload: bytes, method: str = "POST",
                         deadline: float | None = None) -> tuple[bytes, dict]:
        cm, response = await self._open(url, payload, method, deadline)
        try:
            try:
                raw = await response.read()
            except TransportError as exc:
                raise transport_error(self.name, exc, self._secrets) from None
        finally:
            await cm.__aexit__(None, None, None)
        if response.status != 200:
            raise self._http_error(response.status, response.headers, raw)
        return raw, loads_object(self.name, raw, "the response")

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        url, body = self._chat_target(for_openai_upstream(body))
        raw, obj = await self._read_json(url, orjson.dumps(body), deadline=deadline)
        if not isinstance(obj.get("choices"), list):
            raise UpstreamError(self.name, "malformed", "upstream response has no 'choices' list")
        check_name(self.name, obj, "id")
        check_name(self.name, obj, "model")
        note_finish_reasons(obj["choices"])
        usage = Usage()
        if obj.get("usage"):
            usage_from(self.name, obj["usage"], usage)
        if self._preset is not None and self._preset.reasoning_field is not None:
            raw = rename_reasoning(obj, raw, self._preset.reasoning_field, "message")
        return ChatResult(raw, usage)

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> OpenAIStream:
        url, body = self._chat_target(for_openai_upstream(body))
        upstream = dict(body)
        preset = self._preset
        if preset is None or preset.stream_usage == "stream_options":
            options = dict(upstream.get("stream_options") or {})
            options["include_usage"] = True
            upstream["stream_options"] = options
        else:  # the host sends usage on its last chunk unasked, and refuses stream_options
            upstream.pop("stream_options", None)
        upstream["stream"] = True
        cm, response = await self._open_events(url, orjson.dumps(upstream), deadline=deadline)
        return OpenAIStream(self.name, cm, response, include_usage, self._secrets,
                            preset.reasoning_field if preset is not None else None)

    async def responses(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        """The Responses body as the client sent it (``model`` set); the upstream's Response object back."""
        raw, obj = await self._read_json(self._responses_url, orjson.dumps(body), deadline=deadline)
        if not isinstance(obj.get("output"), list):
            raise UpstreamError(self.name, "malformed", "upstream response has no 'output' list")
        usage = Usage()
        _response_usage(self.name, obj, usage)
        return ChatResult(raw, usage)

    async def open_responses_stream(self, body: dict, *, request_id: str,
                                    deadline: float | None = None) -> ResponsesStream:
        cm, response = await self._open_events(self._responses_url, orjson.dumps({**body, "stream": True}),
                                               deadline=deadline)
        return ResponsesStream(self.name, cm, response, self._secrets)

    async def count_response_tokens(self, body: dict) -> int:
        """The upstream's own count of a Responses body's input (``/responses/input_tokens``)."""
        _, obj = await self._read_json(self._count_url, orjson.dumps({k: v for k, v in body.items() if k in _COUNTED}))
        count = obj.get("input_tokens")
        if not isinstance(count, int) or isinstance(count, bool):
            raise UpstreamError(self.name, "malformed", "upstream input_tokens answer has no 'input_tokens' integer")
        return count

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult:
        url, body = self._embed_target(body)
        raw, obj = await self._read_json(url, orjson.dumps(body), deadline=deadline)
        if not isinstance(obj.get("data"), list):
            raise UpstreamError(self.name, "malformed", "upstream embeddings response has no 'data' list")
        check_name(self.name, obj, "model")
        usage = Usage()
        u = obj.get("usage")
        if isinstance(u, dict):
            usage_from(self.name, u, usage)
        return ChatResult(raw, usage)

    async def list_models(self) -> list[str]:
        _, obj = await self._read_json(self._models_url, b"", method="GET")
        data = obj.get("data")
        if not isinstance(data, list):
            raise UpstreamError(self.name, "malformed", "upstream /models response has no 'data' list")
        return model_ids(self.name, data)

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        # The provider is stopping (unregistered after its grace, or the gateway is): by default requests
        # still using its connections end now, with an error their clients see.
        await self._transport.aclose(abort_in_use=abort_in_use)
