"""``runestone fake-provider``: a real HTTP server that answers like OpenAI, Anthropic, Gemini, Azure OpenAI and Bedrock.

It serves ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``
(Anthropic), ``POST /v1/embeddings`` and ``GET /v1/models``, Gemini's and Azure's routes (under ``/v1beta``
and ``/openai``: :mod:`.fake_vendors`), and Amazon Bedrock's ``POST /model/{modelId}/converse`` and
``/converse-stream`` and ``GET /foundation-models`` (SigV4-verified with the ``aws_access_key_id``/
``aws_secret_access_key`` knobs, see :mod:`.fake_bedrock`) on the project's own HTTP server, with the wire
formats of the real APIs (checked in the tests with the official SDKs) and the fake model of
:mod:`.fake_content`, whose token counts come from :mod:`.tokens`. It stands in for upstream
providers in end-to-end tests and benchmarks: its :class:`FakeKnobs` (slow first byte, slow chunks, error
statuses with ``retry-after``, hangs, connections dropped before or during a response, malformed or failing
streams) are set at start and changed at runtime with ``POST /_fake/knobs``; ``GET /_fake/stats`` reports what
it served, including streams whose client went away. All waiting is ``trio.sleep``, so a ``MockClock`` drives it.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote

import attrs
import orjson
import trio

from ..http import LastItem
from ..http.server import ClientDisconnected, Response, serve_http
from .fake_bedrock import EVENT_STREAM, bedrock_error, converse_answer, converse_stream_frames, exception_message, verify_sigv4
from .fake_content import (FakeRequestError, check_thinking, fake_answer, fake_embeddings, openai_completion,
                           openai_stream_frames)
from ..wire.anthropic import InboundError, anthropic_request_to_openai
from ..wire.bedrock import converse_request_to_openai
from ..wire.errors import InvalidRequest
from ..wire.sse import encode_event
from ..wire.token_estimate import estimate_input_tokens
from ..resilience.failover import undated
from .fake_vendors import VendorRoutes

__all__ = ["FakeKnobs", "FakeProvider", "FakeStats", "make_fake_handler", "serve_fake_provider"]


@attrs.define
class FakeKnobs:
    """How the fake behaves; owned by its :class:`FakeProvider`, changed through ``POST /_fake/knobs``.

    ``fault_status`` (0 for none) answers that status, in the API's error shape, to a ``fault_probability``
    share of model requests (drawn from a generator seeded with ``seed``, so a run is reproducible), with a
    ``retry-after`` header when ``retry_after`` is set. ``hang`` never answers; ``drop_before_response``
    closes the connection without a response; ``drop_mid_stream`` cuts a stream after half its chunks;
    ``stream_error`` sends the API's in-stream error event there instead; ``malformed_sse`` sends a broken
    event there. ``text`` fixes the reply text, otherwise it echoes the last user message.
    """

    chunks: int = 8
    ttfb_ms: float = 0
    chunk_delay_ms: float = 0
    fault_status: int = 0
    fault_probability: float = 1.0
    retry_after: float | None = None
    hang: bool = False
    drop_mid_stream: bool = False
    drop_before_response: bool = False
    malformed_sse: bool = False
    stream_error: bool = False
    seed: int = 0
    #: Write a whole stream at once when it has no pacing and no mid-stream fault (a fast upstream, for load tests).
    coalesce: bool = False
    text: str | None = None
    #: Chat answers carry ``usage`` (False: none, and no usage chunk whatever ``stream_options`` ask, as an
    #: OpenAI-compatible server that ignores ``include_usage`` does).
    report_usage: bool = True
    embedding_dims: int = 256
    models: tuple[str, ...] = ("fake-model", "gpt-4o-mini", "claude-haiku-4-5", "fake-embedding",
                               "anthropic.claude-haiku-4-5-20251001-v1:0")
    #: The AWS credentials Bedrock requests must be signed with (SigV4, service ``bedrock``).
    aws_access_key_id: str = "AKIAFAKEBEDROCK00000"
    aws_secret_access_key: str = "fakeBedrockSecretKey/0000000000000000000"
    #: Azure: the content filter refuses the prompt ("prompt") or stops the completion ("completion").
    content_filter: str | None = None
    #: Azure: deployment -> the model it runs (besides each of ``models`` deployed under its own name).
    azure_deployments: dict = attrs.Factory(dict)


# What POST /_fake/knobs accepts for each knob (bool is kept apart from int on purpose).
_KNOB_TYPES: dict[str, tuple[type, ...]] = {
    "chunks": (int,), "coalesce": (bool,), "ttfb_ms": (int, float), "chunk_delay_ms": (int, float), "fault_status": (int,),
    "fault_probability": (int, float), "retry_after": (int, float, type(None)), "hang": (bool,),
    "drop_mid_stream": (bool,), "drop_before_response": (bool,), "malformed_sse": (bool,), "stream_error": (bool,),
    "seed": (int,), "text": (str, type(None)), "report_usage": (bool,), "embedding_dims": (int,), "models": (list,),
    "content_filter": (str, type(None)), "azure_deployments": (dict,), "aws_access_key_id": (str,), "aws_secret_access_key": (str,),
}


@attrs.define
class FakeStats:
    """What the fake served since it started (or since ``POST /_fake/reset``).

    ``requests`` counts by ``"METHOD /path"``; streams are ``started`` when their first byte is produced and
    end ``finished`` (sent to the end, including deliberate mid-stream faults) or ``cancelled`` (the server
    stopped pulling because the client went away); ``cancelled_at`` holds the ``trio.current_time()`` at
    which each cancellation was noticed, in order; ``faults`` counts injected faults by kind.
    """

    requests: dict[str, int] = attrs.Factory(dict)
    streams_started: int = 0
    streams_finished: int = 0
    streams_cancelled: int = 0
    cancelled_at: list[float] = attrs.Factory(list)
    faults: dict[str, int] = attrs.Factory(dict)
    #: The last model requests as received (method, target, headers, JSON body), newest last, at most 32:
    #: what a gateway really sent, for tests that check it field by field.
    recent: list[dict] = attrs.Factory(list)

    def as_json(self) -> dict:
        return {
            "recent": list(self.recent),
            "requests": dict(self.requests),
            "streams": {"started": self.streams_started, "finished": self.streams_finished, "cancelled": self.streams_cancelled},
            "cancelled_at": list(self.cancelled_at),
            "faults": dict(self.faults),
        }


class DropConnection(Exception):
    """Raised inside a response stream to make the server cut the connection before the body's end."""


_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
_JSON_HEADERS = ((b"content-type", b"application/json"),)
_DONE = b"data: [DONE]\n\n"


def _openai_error(status: int, message: str, *, param: str | None = None, headers=()) -> Response:
    type_, code = _OPENAI_ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(status, [*_JSON_HEADERS, *headers], orjson.dumps(body))


def _anthropic_error(status: int, message: str, *, headers=()) -> Response:
    type_ = _ANTHROPIC_ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": f"req_fake{status}"}
    return Response(status, [*_JSON_HEADERS, *headers], orjson.dumps(body))


@attrs.define(eq=False)
class FakeProvider:
    """The request handler of the fake server; one per server, its state touched only by trio tasks.

    Handlers run concurrently but only switch at awaits, so the knob and counter updates here are atomic.
    """

    knobs: FakeKnobs = attrs.Factory(FakeKnobs)
    stats: FakeStats = attrs.Factory(FakeStats)
    _rng: random.Random = attrs.field(init=False)
    _counter: int = attrs.field(init=False, default=0)

    _vendors: VendorRoutes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.knobs.seed)
        self._vendors = VendorRoutes(self)

    def __repr__(self) -> str:
        return f"<FakeProvider {self.knobs!r}>"

    # -- dispatch ----------------------------------------------------------------------------------------

    async def __call__(self, request) -> Response:
        path = request.path
        if isinstance(path, bytes):
            path = path.decode("latin-1")
        path = path.split("?", 1)[0]
        method = request.method
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        route = f"{method} {path}"
        self.stats.requests[route] = self.stats.requests.get(route, 0) + 1
        if path == "/v1/chat/completions":
            return await self._model_route(request, method, self._chat) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/messages":
            return await self._model_route(request, method, self._messages) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/messages/count_tokens":
            return await self._model_route(request, method, self._count_tokens) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/embeddings":
            return await self._model_route(request, method, self._embeddings) if method == "POST" else self._not_allowed(method, path)
        if path == "/v1/models" and method == "GET":
            return self._models(request)
        if path.startswith("/v1beta/"):
            return await self._vendors.gemini(request, method, path)
        if path.startswith("/openai/"):
            return await self._vendors.azure(request, method, path)
        if path.startswith("/model/") and (path.endswith("/converse") or path.endswith("/converse-stream")):
            return await self._model_route(request, method, self._converse) if method == "POST" else self._not_allowed(method, path)
        if path == "/foundation-models" and method == "GET":
            return await self._foundation_models(request)
        if path == "/_fake/knobs":
            if method == "POST":
                return await self._set_knobs(request)
            return Response.json(attrs.asdict(self.knobs))
        if path == "/_fake/stats" and method == "GET":
            return Response.json(self.stats.as_json())
        if path == "/_fake/reset" and method == "POST":
            self.stats = FakeStats()
            self._rng = random.Random(self.knobs.seed)
            return Response.json({"ok": True})
        return _openai_error(404, f"Invalid URL ({method} {path})")

    @staticmethod
    def _not_allowed(method: str, path: str) -> Response:
        return _openai_error(405, f"Method {method} is not allowed for {path}")

    def _fault(self, kind: str) -> None:
        self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1

    async def _model_route(self, request, method: str, serve, error=None) -> Response:
        """Apply the knobs that act before any byte of the answer, then serve the route; ``error(status,
        message, headers=())`` answers in the route's API shape (OpenAI's or Anthropic's when not given)."""
        knobs = self.knobs
        anthropic = serve in (self._messages, self._count_tokens)
        bedrock = serve == self._converse
        raw = await request.body()
        self._record(request, raw)
        if knobs.hang:
            self._fault("hang")
            await trio.sleep_forever()
        if knobs.ttfb_ms:
            await trio.sleep(knobs.ttfb_ms / 1000)
        if knobs.drop_before_response:
            self._fault("drop_before_response")
            # The server closes the connection without answering when a handler reports the client gone.
            raise ClientDisconnected("drop_before_response knob")
        if knobs.fault_status and (knobs.fault_probability >= 1.0 or self._rng.random() < knobs.fault_probability):
            self._fault(str(knobs.fault_status))
            headers = ()
            if knobs.retry_after is not None:
                headers = ((b"retry-after", _format_seconds(knobs.retry_after)),)
            message = f"injected fault: HTTP {knobs.fault_status}"
            if error is not None:
                return error(knobs.fault_status, message, headers)
            if bedrock:
                return bedrock_error(knobs.fault_status, message, headers=headers)
            if anthropic:
                return _anthropic_error(knobs.fault_status, message, headers=headers)
            return _openai_error(knobs.fault_status, message, headers=headers)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            if error is not None:
                return error(400, message)
            if bedrock:
                return bedrock_error(400, "Malformed input request, please reformat your input and try again.")
            return _anthropic_error(400, message) if anthropic else _openai_error(400, message)
        if bedrock:
            return self._converse(request, body, raw)
        return serve(request, body)

    def _record(self, request, raw: bytes) -> None:
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        target = request.path + (f"?{request.query}" if request.query else "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        recent = self.stats.recent
        recent.append({"method": request.method if isinstance(request.method, str) else request.method.decode(),
                       "target": target, "headers": headers, "body": body})
        if len(recent) > 32:
            del recent[0]

    # -- OpenAI ------------------------------------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter:012d}fake"

    def _check_model(self, body: dict) -> str | None:
        model = body.get("model")
        return model if isinstance(model, str) and self.serves(model) else None

    def serves(self, model: str) -> bool:
        """A model of the knobs, or a dated version or alias of one, as the vendors accept both."""
        models = self.knobs.models
        return model in models or undated(model) in {undated(m) for m in models}

    def _chat(self, request, body: dict) -> Response:
        model = self._check_model(body)
        if model is None:
            return _openai_error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _openai_error(400, "'messages' must be a non-empty array.", param="messages")
        try:
            answer = fake_answer(body, chunks=self.knobs.chunks, text=self.knobs.text)
        except FakeRequestError as exc:
            return _openai_error(400, exc.message, param=exc.param)
        head = {"id": self._next_id("chatcmpl-"), "created": int(time.time()), "model": model,
                "service_tier": "default", "system_fingerprint": "fp_fake"}
        if not body.get("stream"):
            completion = openai_completion(answer, head)
            if not self.knobs.report_usage:
                del completion["usage"]
            return Response.json(completion)
        include_usage = self.knobs.report_usage and bool((body.get("stream_options") or {}).get("include_usage"))
        opening, pieces, closing = openai_stream_frames(answer, head, include_usage=include_usage)
        error = b'data: {"error":{"message":"injected mid-stream fault","type":"server_error","param":null,"code":null}}\n\n'
        return self._streamed(_SSE_HEADERS, [*opening, *pieces, *closing], error)

    # -- Anthropic ---------------------------------------------------------------------------------------

    def _anthropic_request(self, request, body: dict) -> dict | Response:
        """The body as OpenAI chat, or the error the real API answers (headers, validation, model)."""
        # The API takes the key as x-api-key, or as a bearer token (which recent SDKs send).
        if not request.header(b"x-api-key") and not request.header(b"authorization"):
            return _anthropic_error(401, "x-api-key header is required")
        if not request.header(b"anthropic-version"):
            return _anthropic_error(400, "anthropic-version: header is required")
        try:
            translated = anthropic_request_to_openai(body)
        except InboundError as exc:
            return _anthropic_error(400, f"{exc.param}: {exc.message}" if exc.param else exc.message)
        refused = check_thinking(translated["messages"])
        if refused is not None:
            return _anthropic_error(400, refused)
        if self._check_model(body) is None:
            return _anthropic_error(404, f"model: {body.get('model')}")
        return translated

    def _count_tokens(self, request, body: dict) -> Response:
        # count_tokens takes a Messages body without max_tokens.
        checked = self._anthropic_request(request, {**body, "max_tokens": 1, "stream": False})
        if isinstance(checked, Response):
            return checked
        return Response.json({"input_tokens": estimate_input_tokens(checked)})

    def _messages(self, request, body: dict) -> Response:
        translated = self._anthropic_request(request, body)
        if isinstance(translated, Response):
            return translated
        model = body["model"]
        try:
            answer = fake_answer(translated, chunks=self.knobs.chunks, text=self.knobs.text)
        except FakeRequestError as exc:
            return _anthropic_error(400, f"{exc.param}: {exc.message}" if exc.param else exc.message)
        choice = answer.choices[0]
        mid = self._next_id("msg_")
        call = choice.tool_call
        if call is not None:
            stop_reason = "tool_use"
            tool_id = "toolu_" + call.id.removeprefix("call_")
        elif choice.finish_reason == "length":
            stop_reason = "max_tokens"
        else:
            stop_reason = "stop_sequence" if choice.stop_sequence is not None else "end_turn"
        usage = {"input_tokens": answer.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "output_tokens": answer.completion_tokens}
        thinking = choice.thinking_block
        if not body.get("stream"):
            if call is not None:
                content = [{"type": "tool_use", "id": tool_id, "name": call.name, "input": orjson.loads(call.arguments)}]
            else:
                content = [{"type": "text", "text": choice.text}]
            if thinking is not None:
                content.insert(0, thinking)
            return Response.json(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop_reason,
                    "stop_sequence": choice.stop_sequence,
                    "usage": usage,
                }
            )

        def event(name: str, data: dict) -> bytes:
            return encode_event(orjson.dumps(data), name)

        start_usage = {**usage, "output_tokens": 1}
        frames = [
            event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None, "usage": start_usage,
                    },
                },
            )
        ]
        index = 0
        if thinking is not None:
            if thinking["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": p} for p in choice.reasoning_pieces]
                deltas.append({"type": "signature_delta", "signature": thinking["signature"]})
            else:
                start, deltas = thinking, []
            frames.append(event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}))
            frames.append(event("ping", {"type": "ping"}))
            frames.extend(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas)
            frames.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        if call is not None:
            block = {"type": "tool_use", "id": tool_id, "name": call.name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": a} for a in call.pieces]
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in choice.pieces]
        frames.append(event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        if index == 0:
            frames.append(event("ping", {"type": "ping"}))
        frames.extend(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas)
        frames.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        frames.append(
            event(
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": choice.stop_sequence},
                 "usage": {"output_tokens": answer.completion_tokens}},
            )
        )
        frames.append(event("message_stop", {"type": "message_stop"}))
        error = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        return self._streamed(_SSE_HEADERS, frames, error)

    # -- Bedrock -----------------------------------------------------------------------------------------

    def _credentials(self) -> dict[str, str]:
        return {self.knobs.aws_access_key_id: self.knobs.aws_secret_access_key}

    def _converse(self, request, body: dict, raw: bytes) -> Response:
        refused = verify_sigv4(request, raw, self._credentials())
        if refused is not None:
            return refused
        path = request.path
        stream = path.endswith("/converse-stream")
        model = unquote(path[len("/model/"):path.rindex("/")])
        if model not in self.knobs.models:
            return bedrock_error(404, "The provided model identifier is invalid.")
        try:
            translated = converse_request_to_openai(body, model)
            refused_thinking = check_thinking(translated["messages"])
            if refused_thinking is not None:
                return bedrock_error(400, refused_thinking)
            answer = fake_answer(translated, chunks=self.knobs.chunks, text=self.knobs.text)
        except InvalidRequest as exc:
            return bedrock_error(400, f"{exc.param}: {exc.message}" if exc.param else exc.message)
        except FakeRequestError as exc:
            return bedrock_error(400, exc.message)
        if not stream:
            return Response.json(converse_answer(answer))
        error = exception_message("ModelStreamErrorException", "injected mid-stream fault")
        return self._streamed(EVENT_STREAM, converse_stream_frames(answer), error)

    async def _foundation_models(self, request) -> Response:
        refused = verify_sigv4(request, await request.body(), self._credentials())
        if refused is not None:
            return refused
        return Response.json({"modelSummaries": [
            {"modelId": m, "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{m}", "modelName": m,
             "providerName": "Runestone", "inputModalities": ["TEXT"], "outputModalities": ["TEXT"],
             "responseStreamingSupported": True, "inferenceTypesSupported": ["ON_DEMAND"]}
            for m in self.knobs.models if m != "fake-embedding"]})

    # -- streaming and the mid-stream knobs --------------------------------------------------------------

    def _coalesced(self) -> bool:
        knobs = self.knobs
        return knobs.coalesce and not (knobs.chunk_delay_ms or knobs.drop_mid_stream or knobs.stream_error
                                       or knobs.malformed_sse)

    def _streamed(self, headers, frames: list[bytes], error_frame: bytes) -> Response:
        # Coalesced, the whole answer is one write: the head, every frame and the end of the body.
        return Response(200, headers, stream=self._stream(frames, error_frame), first_ready=self._coalesced())

    def _stream(self, frames: list[bytes], error_frame: bytes) -> AsyncIterator[bytes]:
        """The body of a streaming answer, one frame per write, paced by ``chunk_delay_ms``.

        The mid-stream knobs act after half of the frames. Bookkeeping relies on the server closing the
        iterator when it stops pulling (the client went away): the ``finally`` then counts a cancellation.
        """
        knobs = self.knobs
        stats = self.stats
        half = len(frames) // 2
        delay = knobs.chunk_delay_ms / 1000
        drop, stream_error, malformed = knobs.drop_mid_stream, knobs.stream_error, knobs.malformed_sse

        coalesced = self._coalesced()
        if coalesced:
            frames = [b"".join(frames)]
            half = -1

        async def body() -> AsyncIterator[bytes]:
            stats.streams_started += 1
            ended = False
            try:
                for i, frame in enumerate(frames):
                    if i and delay:
                        await trio.sleep(delay)
                    if i == half:
                        if drop:
                            self._fault("drop_mid_stream")
                            ended = True
                            raise DropConnection("drop_mid_stream knob")
                        if stream_error:
                            self._fault("stream_error")
                            ended = True
                            yield error_frame
                            return
                        if malformed:
                            self._fault("malformed_sse")
                            yield b'data: {"id": "broken", "choices": [{"delta": \n\n'
                    if coalesced:
                        ended = True
                        yield LastItem(frame)
                        return
                    yield frame
                ended = True
            finally:
                if ended:
                    stats.streams_finished += 1
                else:
                    stats.streams_cancelled += 1
                    stats.cancelled_at.append(trio.current_time())

        return body()

    # -- embeddings, models, knobs -----------------------------------------------------------------------

    def _embeddings(self, request, body: dict) -> Response:
        model = self._check_model(body)
        if model is None:
            return _openai_error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.", param="model")
        try:
            return Response.json(fake_embeddings(body, model, self.knobs.embedding_dims))
        except FakeRequestError as exc:
            return _openai_error(400, exc.message, param=exc.param)

    def _models(self, request) -> Response:
        if request.header(b"anthropic-version"):
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in self.knobs.models
            ]
            return Response.json(
                {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
            )
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "runestone-fake"} for m in self.knobs.models]
        return Response.json({"object": "list", "data": data})

    async def _set_knobs(self, request) -> Response:
        try:
            patch = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            patch = None
        if not isinstance(patch, dict):
            return _openai_error(400, "knobs must be a JSON object")
        changes = {}
        for name, value in patch.items():
            types = _KNOB_TYPES.get(name)
            if types is None:
                return _openai_error(400, f"unknown knob {name!r}; knobs are {sorted(_KNOB_TYPES)}", param=name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return _openai_error(400, f"knob {name!r} must be of type {'/'.join(t.__name__ for t in types)}", param=name)
            if name == "models":
                if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                    return _openai_error(400, "models must be an array of strings", param=name)
                value = tuple(value)
            changes[name] = value
        self.knobs = attrs.evolve(self.knobs, **changes)
        if "seed" in changes:
            self._rng = random.Random(self.knobs.seed)
        return Response.json(attrs.asdict(self.knobs))


def _format_seconds(seconds: float) -> bytes:
    return (str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))).encode()


def make_fake_handler(knobs: FakeKnobs | None = None) -> FakeProvider:
    """The fake server's request handler (a :class:`FakeProvider`); its ``knobs`` and ``stats`` stay reachable."""
    return FakeProvider(knobs if knobs is not None else FakeKnobs())


async def serve_fake_provider(host: str = "127.0.0.1", port: int = 0, knobs: FakeKnobs | None = None, *, limits=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the fake provider until cancelled; ``task_status.started(server)`` once it listens (``server.port``)."""
    if limits is None:
        await serve_http(make_fake_handler(knobs), host, port, task_status=task_status)
    else:
        await serve_http(make_fake_handler(knobs), host, port, limits=limits, task_status=task_status)
