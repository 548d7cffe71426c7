"""The ``bedrock`` provider type: Amazon Bedrock's Converse and ConverseStream APIs, SigV4-signed.

Translation lives in :mod:`runestone.wire.bedrock`; this module drives the wire. Each request is signed with
botocore's own SigV4 signer (``botocore.auth.SigV4Auth`` on an ``AWSRequest``, service ``bedrock``) and sent
over the gateway's transport like any other provider's; a stream's AWS event-stream framing (CRC-checked
prelude, headers, payload) is taken apart by botocore's ``EventStreamBuffer``, one upstream read at a time,
and each event is translated into chat chunks. botocore is the optional extra ``runestone[bedrock]``;
without it the provider starts but every request fails with a message saying so.

Credentials come from the provider's config (``aws_access_key_id``, ``aws_secret_access_key``,
``aws_session_token``, ``region``), which the standard ``AWS_*`` environment variables fill in (see
:mod:`runestone.config`); ``base_url`` replaces ``https://bedrock-runtime.{region}.amazonaws.com`` (a VPC
endpoint, or the fake). The secret key never leaves the signer: only the signature and the access key id
are sent, and both secrets are scrubbed from anything the upstream says back. Throttling
(``ThrottlingException``, HTTP 429) is a retryable 429 like any other upstream's.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import orjson

from ..resilience.errors import UpstreamError
from ..resilience.retry import parse_retry_after
from ..telemetry.observe import note_finish_reasons
from ..wire.bedrock import (
    ConverseToOpenAIStream,
    bedrock_error_info,
    converse_to_openai_response,
    openai_to_converse_request,
)
from ..wire.errors import UpstreamErrorBody, scrub
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
    usage_from,
)

__all__ = ["BedrockAdapter", "BedrockStream", "SIGNING_NAME"]

log = logging.getLogger(__name__)

#: The SigV4 service name of bedrock-runtime (botocore's service model: ``signingName``).
SIGNING_NAME = "bedrock"
_USAGE_COUNTS = ("inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens")


def _check_usage(provider: str, u) -> None:
    check_usage(provider, u, _USAGE_COUNTS)


def _http_error(provider: str, status: int, headers, body: bytes, secrets) -> UpstreamError:
    """An error answer: Bedrock names the exception in ``x-amzn-ErrorType``."""
    error_type = next((v.decode("latin-1") for k, v in headers if k == b"x-amzn-errortype"), None)
    return _error(provider, status, error_type, body, secrets, parse_retry_after(headers))


def _error(provider: str, status: int, error_type, body: bytes, secrets, retry_after=None, *,
           mid_stream: bool = False) -> UpstreamError:
    info = bedrock_error_info(status, error_type, body)
    detail = UpstreamErrorBody(scrub(info.message, secrets), info.type, info.code, None, None)
    said = f"upstream reported {error_type or 'an error'} mid-stream" if mid_stream else f"upstream returned {info.status}"
    return UpstreamError(provider, "http", f"{said}: {detail.message}", status=info.status,
                         retry_after=retry_after, detail=detail)


class BedrockStream(UpstreamStream):
    """A ConverseStream response: event-stream messages decoded by botocore, translated into chat chunks."""

    __slots__ = ("_translator", "_buffer")

    def __init__(self, provider: str, cm, response, translator: ConverseToOpenAIStream, secrets=()) -> None:
        from botocore.eventstream import EventStreamBuffer

        super().__init__(provider, cm, response, secrets)
        self._translator = translator
        self._buffer = EventStreamBuffer()

    async def __anext__(self) -> list[bytes]:
        if self.finished or self._closed:
            raise StopAsyncIteration
        from botocore.eventstream import ParserError

        provider = self._provider
        translator = self._translator
        buffer = self._buffer
        while True:
            raw = await self._read()
            if raw is None:
                if translator.stopped:  # messageStop seen, the metadata event missing: the answer is whole
                    self.finished = True
                    return []
                raise UpstreamError(provider, "stream_cut", "upstream stream ended before messageStop")
            buffer.add_data(raw)
            out: list[bytes] = []
            try:
                for message in buffer:
                    headers = message.headers
                    kind = headers.get(":message-type")
                    if kind == "exception":
                        raise _error(provider, 0, headers.get(":exception-type"), message.payload, self._secrets,
                                     mid_stream=True)
                    if kind == "error":
                        body = orjson.dumps({"message": headers.get(":error-message") or "upstream stream failed"})
                        raise _error(provider, 0, headers.get(":error-code"), body, self._secrets, mid_stream=True)
                    event = headers.get(":event-type")
                    data = loads_object(provider, message.payload or b"{}", "a stream event")
                    if event == "metadata":
                        _check_usage(provider, data.get("usage"))
                    elif event == "contentBlockStart":
                        use = (data.get("start") or {}).get("toolUse")
                        if isinstance(use, dict):
                            check_name(provider, use, "toolUseId")
                            check_name(provider, use, "name")
                    append_chunks(out, translator.feed(event or "", data))
                    if translator.done:
                        usage_from(provider, translator.usage, self.usage)
                        self.finished = True
                        return out
            except ParserError as exc:
                raise UpstreamError(provider, "malformed", f"upstream sent a malformed event stream: {exc}") from None
            if out:
                return out


class BedrockAdapter:
    """Talks to ``{base_url}/model/{modelId}/converse`` and ``/converse-stream``, signing every request."""

    def __init__(self, name: str, config, transport, timeouts=None) -> None:
        self.name = name
        self._region = getattr(config, "region", None)
        base = getattr(config, "base_url", None)
        self._base = (base or f"https://bedrock-runtime.{self._region or 'us-east-1'}.amazonaws.com").rstrip("/")
        # Model listing is the control-plane service (bedrock., not bedrock-runtime.), signed with the same name.
        self._models_url = (base.rstrip("/") if base else f"https://bedrock.{self._region or 'us-east-1'}.amazonaws.com") \
            + "/foundation-models?byOutputModality=TEXT"
        self._default_max_tokens = int(getattr(config, "default_max_tokens", None) or 4096)
        key_id = getattr(config, "aws_access_key_id", None)
        secret = getattr(config, "aws_secret_access_key", None)
        token = getattr(config, "aws_session_token", None)
        self._secrets = tuple(s for s in (secret, token) if s)
        self._transport = transport
        self._timeouts = timeouts
        self._signer = None
        self._unusable: str | None = None
        try:
            from botocore.auth import SigV4Auth
            from botocore.credentials import Credentials
        except ImportError:
            self._unusable = "the bedrock provider needs botocore: install runestone[bedrock]"
        else:
            if not key_id or not secret:
                self._unusable = ("the bedrock provider has no AWS credentials: set aws_access_key_id and "
                                  "aws_secret_access_key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
            elif not self._region:
                self._unusable = "the bedrock provider has no region: set region (or AWS_REGION)"
            else:
                self._signer = SigV4Auth(Credentials(key_id, secret, token), SIGNING_NAME, self._region)
        if self._unusable:
            log.warning("provider %s: %s", name, self._unusable)

    def _signed(self, method: str, url: str, body: bytes) -> list[tuple[bytes, bytes]]:
        """The request's headers, SigV4-signed by botocore (Authorization, X-Amz-Date, X-Amz-Security-Token)."""
        if self._signer is None:
            raise UpstreamError(self.name, "local", self._unusable or "the bedrock provider cannot sign requests")
        from botocore.awsrequest import AWSRequest

        headers = {"Content-Type": "application/json", "Accept": "application/json"} if method == "POST" \
            else {"Accept": "application/json"}
        request = AWSRequest(method=method, url=url, data=body, headers=headers)
        self._signer.add_auth(request)
        return [(k.encode("latin-1"), v.encode("latin-1") if isinstance(v, str) else v)
                for k, v in request.headers.items()]

    def _url(self, model: str, stream: bool) -> str:
        # A model id (anthropic.claude-...-v1:0) or an ARN is one path segment: ':' and '/' are escaped.
        return f"{self._base}/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"

    async def _open(self, method: str, url: str, payload: bytes, deadline: float | None):
        return await open_exchange(self.name, self._transport, method, url, self._signed(method, url, payload),
                                   payload, timeouts=self._timeouts, deadline=deadline, secrets=self._secrets,
                                   http_error=_http_error)

    async def _read(self, method: str, url: str, payload: bytes, deadline: float | None = None) -> dict:
        cm, response = await self._open(method, url, payload, deadline)
        return loads_object(self.name, await read_exchange(self.name, cm, response, self._secrets), "the response")

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult:
        model = body["model"]
        payload = orjson.dumps(openai_to_converse_request(body, default_max_tokens=self._default_max_tokens))
        obj = await self._read("POST", self._url(model, False), payload, deadline)
        message = (obj.get("output") or {}).get("message") if isinstance(obj.get("output"), dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise UpstreamError(self.name, "malformed", "upstream answer has no output.message.content list")
        _check_usage(self.name, obj.get("usage"))
        for block in message["content"]:
            if isinstance(block, dict) and isinstance(block.get("toolUse"), dict):
                check_name(self.name, block["toolUse"], "toolUseId")
                check_name(self.name, block["toolUse"], "name")
        resp = converse_to_openai_response(obj, model=model, request_id=request_id, created=new_created())
        note_finish_reasons(resp["choices"])
        usage = Usage()
        usage_from(self.name, resp["usage"], usage)
        return ChatResult(orjson.dumps(resp), usage)

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> BedrockStream:
        model = body["model"]
        payload = orjson.dumps(openai_to_converse_request(body, default_max_tokens=self._default_max_tokens))
        cm, response = await self._open("POST", self._url(model, True), payload, deadline)
        translator = ConverseToOpenAIStream(model=model, request_id=request_id, created=new_created(),
                                            include_usage=include_usage)
        return BedrockStream(self.name, cm, response, translator, self._secrets)

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult:
        raise UpstreamError(self.name, "http", "Bedrock's Converse API serves no embeddings", status=404)

    async def list_models(self) -> list[str]:
        """The text models Bedrock lists for the account (``GET /foundation-models``)."""
        obj = await self._read("GET", self._models_url, b"")
        summaries = obj.get("modelSummaries")
        if not isinstance(summaries, list):
            raise UpstreamError(self.name, "malformed", "upstream /foundation-models answer has no modelSummaries list")
        ids = []
        for m in summaries:
            if isinstance(m, dict) and isinstance(m.get("modelId"), str):
                check_name(self.name, m, "modelId")
                ids.append(m["modelId"])
        return ids

    async def aclose(self, *, abort_in_use: bool = True) -> None:
        await self._transport.aclose(abort_in_use=abort_in_use)
