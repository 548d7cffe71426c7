"""The ``anthropic`` provider type: OpenAI-shaped requests translated to the Messages API and back.

Translation lives in :mod:`runestone.wire.anthropic_upstream`; this module drives the wire: it posts to
``{base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``, parses the event stream,
and turns each Anthropic event into OpenAI chunks, written once per upstream read.
"""

from __future__ import annotations

import orjson

from ..http import prepared_headers
from ..resilience.errors import UpstreamError
from ..telemetry.observe import note_finish_reasons, outgoing_traceparent
from ..wire.errors import UpstreamErrorBody, scrub
from ..wire.anthropic_upstream import (
    AnthropicToOpenAIStream,
    UpstreamStreamError,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from .base import (
    ChatResult,
    UpstreamStream,
    append_chunks,
    Usage,
    check_name,
    check_usage,
    loads_object,
    model_ids,
    new_created,
    open_exchange,
    read_exchange,
    secrets_of,
    usage_from,
)

__all__ = ["AnthropicAdapter", "AnthropicStream"]

#: What Anthropic's count_tokens accepts of a Messages request.
_COUNTED = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"})


_USAGE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _check_usage(provider: str, u) -> None:
    """Anthropic's token counts, checked before the translator adds them up."""
    check_usage(provider, u, _USAGE_COUNTS)


def _check_event(provider: str, name: str, data: dict) -> None:
    """The values of one stream event the gateway keeps or relays: usage counts, tool call ids and names."""
    if name == "message_delta":
        _check_usage(provider, data.get("usage"))
    elif name == "message_start":
        message = data.get("message")
        if isinstance(message, dict):
            _check_usage(provider, message.get("usage"))
    elif name == "content_block_start":
        block = data.get("content_block")
        if isinstance(block, dict):
            check_name(provider, block, "id")
            check_name(provider, block, "name")


class AnthropicStream(UpstreamStream):
    """An Anthropic event stream translated into OpenAI chunks, written once per upstream read."""

    __slots__ = ("_translator",)

    def __init__(self, provider: str, cm, response, translator: AnthropicToOpenAIStream, secrets=()) -> None:
        super().__init__(provider, cm, response, secrets)
        self._translator = translator

    _END = "message_stop"

    def _event(self, ev, out: list[bytes]) -> bool:
        provider = self._provider
        translator = self._translator
        data = loads_object(provider, ev.data, "a stream event")
        name = ev.event or data.get("type") or ""
        if name != "content_block_delta":
            _check_event(provider, name, data)
        try:
            chunks = translator.feed(name, data)
        except UpstreamStreamError as exc:
            detail = UpstreamErrorBody(scrub(exc.message, self._secrets), exc.type, None, None, "anthropic")
            raise UpstreamError(provider, "http", f"upstream reported {exc.type} mid-stream: {detail.message}",
                                status=exc.status, detail=detail) from None
        append_chunks(out, chunks)
        if translator.done:
            if translator.usage:
                usage_from(provider, translator.usage, self.usage)
            return True
        return False

class AnthropicAdapter:
    def __init__(self, name: str, config, transport, timeouts=None) -> None:
        self.name = name
        base = (getattr(config, "base_url", None) or "https://api.anthropic.com").rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self._url = base + "/v1/messages"
        self._count_url = base + "/v1/messages/count_tokens"
        self._models_url = base + "/v1/models"
        version = getattr(config, "anthropic_version", None) or "2023-06-01"
        headers = [
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"anthropic-version", version.encode()),
        ]
        key = getattr(config, "api_key", None)
        if key:
            headers.append((b"x-api-key", key.encode()))
        self._headers = prepared_headers(headers)
        self._secrets = secrets_of(config)
        self._default_max_tokens = int(getattr(config, "default_max_tokens", None) or 4096)
        self._transport = transport
        self._timeouts = timeouts

    async def _open(self, payload: bytes, url: str | None = None, method: str = "POST",
                    deadline: float | None = None):
        headers = self._headers
        traceparent = outgoing_traceparent(self.name)
        if traceparent is not None:
            headers = [*headers, (b"traceparent", traceparent)]
        return await open_exchange(self.name, self._transport, method, url or self._url, headers, payload,
                                   timeouts=self._timeouts, deadline=deadline, secrets=self._secrets)

    async def _read(self, payload: bytes, url: str | None = None, method: str = "POST",
                    deadline: float | None = None) -> dict:
        cm, response = await self._open(payload, url, method, deadline)
        raw = await read_exchange(self.name, cm, response, self._secrets)
        return loads_object(self.name, raw, "the response")

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        model = body["model"]
        payload = openai_to_anthropic_request(
            body, model=model, default_max_tokens=self._default_max_tokens, stream=False
        )
        msg = await self._read(orjson.dumps(payload), deadline=deadline)
        if not isinstance(msg.get("content"), list):
            raise UpstreamError(self.name, "malformed", "upstream message has no 'content' list")
        _check_usage(self.name, msg.get("usage"))
        for block in msg["content"]:
            if isinstance(block, dict):
                check_name(self.name, block, "id")
                check_name(self.name, block, "name")
        resp = anthropic_to_openai_response(msg, model=model, request_id=request_id, created=new_created())
        note_finish_reasons(resp.get("choices"))
        usage = Usage()
        if resp.get("usage"):
            usage_from(self.name, resp["usage"], usage)
        return ChatResult(orjson.dumps(resp), usage)

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> AnthropicStream:
        model = body["model"]
        payload = openai_to_anthropic_request(
            body, model=model, default_max_tokens=self._default_max_tokens, stream=True
        )
        cm, response = await self._open(orjson.dumps(payload), deadline=deadline)
        translator = AnthropicToOpenAIStream(
            model=model, request_id=request_id, created=new_created(), include_usage=include_usage
        )
        return AnthropicStream(self.name, cm, response, translator, self._secrets)

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult:
        raise UpstreamError(self.name, "http", "the Anthropic API serves no embedding models", status=404)

    async def count_tokens(self, body: dict) -> int:
        """The upstream's own count of the OpenAI-shaped ``body``'s input (``/v1/messages/count_tokens``)."""
        payload = openai_to_anthropic_request(body, model=body["model"], default_max_tokens=1, stream=False)
        # The counting endpoint takes the request's input only: no sampling settings.
        payload = {k: v for k, v in payload.items() if k in _COUNTED}
        obj = await self._read(orjson.dumps(payload), self._count_url)
        count = obj.get("input_tokens")
        if not isinstance(count, int) or isinstance(count, bool):
            raise UpstreamError(self.name, "malformed", "upstream count_tokens answer has no 'input_tokens' integer")
        return count

    async def list_models(self) -> list[str]:
        obj = await self._read(b"", self._models_url, "GET")
        data = obj.get("data")
        if not isinstance(data, list):
            raise UpstreamError(self.name, "malformed", "upstream /v1/models response has no 'data' list")
        return model_ids(self.name, data)

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        # The provider is stopping (unregistered after its grace, or the gateway is): by default requests
        # still using its connections end now, with an error their clients see.
        await self._transport.aclose(abort_in_use=abort_in_use)
