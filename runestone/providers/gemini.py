"""The ``gemini`` provider type: OpenAI-shaped requests translated to Google's Gemini API and back.

Translation lives in :mod:`runestone.wire.gemini`; this module drives the wire: ``POST
{base_url}/models/{model}:generateContent`` (``:streamGenerateContent?alt=sse`` for a stream,
``:batchEmbedContents`` for embeddings) and ``GET {base_url}/models`` for discovery. The key travels in the
``x-goog-api-key`` header and never in a URL (Google also accepts ``?key=``, which would put it in every
proxy's and server's access log), and any upstream text the gateway keeps is scrubbed of it.
"""

from __future__ import annotations

from urllib.parse import quote

import orjson

from ..http import prepared_headers
from ..resilience.errors import UpstreamError
from ..resilience.retry import parse_retry_after
from ..telemetry.observe import note_finish_reasons
from ..wire.gemini import (
    USAGE_COUNTS,
    GeminiToOpenAIStream,
    PromptBlocked,
    gemini_error,
    gemini_model_ids,
    gemini_to_openai_embeddings,
    gemini_to_openai_response,
    openai_to_gemini_embeddings,
    openai_to_gemini_request,
)
from ..wire.token_estimate import estimate_input_tokens
from .base import (
    ChatResult,
    UpstreamStream,
    append_chunks,
    Usage,
    check_name,
    check_usage,
    loads_object,
    new_created,
    open_exchange,
    read_exchange,
    secrets_of,
    usage_from,
)

__all__ = ["DEFAULT_GEMINI_BASE_URL", "GeminiAdapter", "GeminiStream"]

DEFAULT_GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
#: Pages of ``models.list`` read at most (1000 models each) before discovery stops.
_MAX_MODEL_PAGES = 10


def _check_usage(provider: str, meta) -> None:
    check_usage(provider, meta, USAGE_COUNTS, "usageMetadata")


def _check_candidates(provider: str, doc: dict) -> None:
    """The values of a response the gateway keeps or relays: usage counts and function call names and ids."""
    _check_usage(provider, doc.get("usageMetadata"))
    candidates = doc.get("candidates")
    if candidates is None:
        return
    if not isinstance(candidates, list):
        raise UpstreamError(provider, "malformed", "upstream 'candidates' is not a list")
    for cand in candidates:
        if not isinstance(cand, dict):
            raise UpstreamError(provider, "malformed", "upstream candidate is not an object")
        content = cand.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if parts is not None and not isinstance(parts, list):
            raise UpstreamError(provider, "malformed", "upstream candidate parts is not a list")
        for part in parts or ():
            fc = part.get("functionCall") if isinstance(part, dict) else None
            if isinstance(fc, dict):
                check_name(provider, fc, "name")
                check_name(provider, fc, "id")


def _model_path(model: str) -> str:
    """``models/{model}`` for the URL; a tuned model may be named ``tunedModels/...`` as Gemini does."""
    if model.startswith(("models/", "tunedModels/")):
        head, _, rest = model.partition("/")
        return f"{head}/{quote(rest, safe='-._~')}"
    return "models/" + quote(model, safe="-._~")


class GeminiStream(UpstreamStream):
    """A Gemini SSE stream translated into OpenAI chunks, written once per upstream read.

    Gemini's stream has no end marker: it ends with the response body. It ended properly when every candidate
    gave its finish reason first; a body that ends earlier was cut, a ``stream_cut`` error like any other.
    """

    __slots__ = ("_translator",)

    def __init__(self, provider: str, cm, response, translator: GeminiToOpenAIStream, secrets=()) -> None:
        super().__init__(provider, cm, response, secrets)
        self._translator = translator

    async def __anext__(self) -> list[bytes]:
        if self.finished or self._closed:
            raise StopAsyncIteration
        provider = self._provider
        translator = self._translator
        while True:
            raw = await self._read()
            if raw is None:
                if not translator.complete:
                    raise UpstreamError(provider, "stream_cut",
                                        "upstream stream ended before every candidate's finishReason")
                if translator.usage:
                    usage_from(provider, translator.usage, self.usage)
                self.finished = True
                return [orjson.dumps(c) for c in translator.end()]
            out = []
            for ev in self._feed(raw):
                doc = loads_object(provider, ev.data, "a stream event")
                if isinstance(doc.get("error"), dict):
                    err = gemini_error(500, ev.data, self._secrets)
                    raise UpstreamError(provider, "stream_cut", f"upstream reported an error mid-stream: "
                                        f"{err.detail.message}", detail=err.detail)
                _check_candidates(provider, doc)
                try:
                    chunks = translator.feed(doc)
                except PromptBlocked as exc:
                    raise _blocked_error(provider, exc) from None
                append_chunks(out, chunks)
            if out:
                return out


def _blocked_error(provider: str, exc: PromptBlocked) -> UpstreamError:
    detail = exc.error_body()
    return UpstreamError(provider, "http", f"upstream returned 400: {detail.message}", status=400, detail=detail)


class GeminiAdapter:
    def __init__(self, name: str, config, transport, timeouts=None) -> None:
        self.name = name
        self._base = (getattr(config, "base_url", None) or DEFAULT_GEMINI_BASE_URL).rstrip("/")
        headers = [(b"content-type", b"application/json"), (b"accept", b"application/json")]
        key = getattr(config, "api_key", None)
        if key:
            headers.append((b"x-goog-api-key", key.encode()))
        self._headers = prepared_headers(headers)
        self._secrets = secrets_of(config)
        self._transport = transport
        self._timeouts = timeouts

    def _error(self, status: int, headers, raw: bytes) -> UpstreamError:
        err = gemini_error(status, raw, self._secrets)
        retry_after = parse_retry_after(headers)
        if retry_after is None:
            retry_after = err.retry_after
        return UpstreamError(self.name, "http", f"upstream returned {err.status}: {err.detail.message}",
                             status=err.status, retry_after=retry_after, detail=err.detail)

    async def _open(self, url: str, payload: bytes, method: str = "POST", deadline: float | None = None):
        return await open_exchange(self.name, self._transport, method, url, self._headers, payload,
                                   timeouts=self._timeouts, deadline=deadline, secrets=self._secrets,
                                   http_error=lambda _provider, status, headers, raw, _secrets:
                                   self._error(status, headers, raw))

    async def _read(self, url: str, payload: bytes, method: str = "POST", deadline: float | None = None) -> dict:
        cm, response = await self._open(url, payload, method, deadline)
        return loads_object(self.name, await read_exchange(self.name, cm, response, self._secrets), "the response")

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        model = body["model"]
        payload = openai_to_gemini_request(body)
        doc = await self._read(f"{self._base}/{_model_path(model)}:generateContent", orjson.dumps(payload),
                               deadline=deadline)
        _check_candidates(self.name, doc)
        try:
            resp = gemini_to_openai_response(doc, model=model, request_id=request_id, created=new_created())
        except PromptBlocked as exc:
            raise _blocked_error(self.name, exc) from None
        if not resp["choices"]:
            raise UpstreamError(self.name, "malformed", "upstream response has no candidates")
        note_finish_reasons(resp["choices"])
        usage = Usage()
        usage_from(self.name, resp["usage"], usage)
        return ChatResult(orjson.dumps(resp), usage)

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> GeminiStream:
        model = body["model"]
        payload = openai_to_gemini_request(body)
        url = f"{self._base}/{_model_path(model)}:streamGenerateContent?alt=sse"
        cm, response = await self._open(url, orjson.dumps(payload), deadline=deadline)
        translator = GeminiToOpenAIStream(model=model, request_id=request_id, created=new_created(),
                                          include_usage=include_usage)
        return GeminiStream(self.name, cm, response, translator, self._secrets)

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult:
        model = body["model"]
        payload = openai_to_gemini_embeddings(body, model)
        doc = await self._read(f"{self._base}/{_model_path(model)}:batchEmbedContents", orjson.dumps(payload),
                               deadline=deadline)
        if not isinstance(doc.get("embeddings"), list):
            raise UpstreamError(self.name, "malformed", "upstream embeddings response has no 'embeddings' list")
        # Gemini reports no usage for embeddings: the ledger gets the gateway's own estimate of the input.
        tokens = estimate_input_tokens({"input": body["input"]})
        resp = gemini_to_openai_embeddings(doc, model, body.get("encoding_format"), tokens)
        return ChatResult(orjson.dumps(resp), Usage(tokens, 0))

    async def list_models(self) -> list[str]:
        """Every model of ``models.list`` (all its pages, up to 10,000 models)."""
        ids: list[str] = []
        token = None
        for _ in range(_MAX_MODEL_PAGES):
            url = f"{self._base}/models?pageSize=1000" + (f"&pageToken={quote(token, safe='')}" if token else "")
            doc = await self._read(url, b"", "GET")
            if not isinstance(doc.get("models", []), list):
                raise UpstreamError(self.name, "malformed", "upstream models.list response has no 'models' list")
            for m in doc.get("models") or ():
                if isinstance(m, dict):
                    check_name(self.name, m, "name")
            ids.extend(gemini_model_ids(doc))
            token = doc.get("nextPageToken")
            if not isinstance(token, str) or not token:
                break
        return ids

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        await self._transport.aclose(abort_in_use=abort_in_use)
