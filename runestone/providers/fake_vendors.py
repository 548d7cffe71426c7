"""The fake upstream's Gemini and Azure OpenAI faces: the same fake model (:mod:`.fake_content`) in their formats.

:class:`~.fake_server.FakeProvider` routes here by path (one server speaks every API):

- Gemini, under ``/v1beta``: ``POST models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``,
  ``:batchEmbedContents``, ``GET models`` (paged by ``pageSize``/``pageToken``). The key is taken from
  ``x-goog-api-key`` (or ``?key=``, as Google does); errors are Google's ``{"error": {"code", "message",
  "status", "details"}}``, a 429 with a ``google.rpc.RetryInfo`` when ``retry_after`` is set.
- Azure OpenAI, under ``/openai``: the deployment scheme (``deployments/{deployment}/chat/completions``,
  ``/embeddings`` with a required ``api-version``; ``GET deployments`` with api-version 2022-12-01, the one
  that publishes it, and ``GET models``) and the v1 scheme (``v1/chat/completions``, ``v1/embeddings``,
  ``GET v1/models``), the key in ``api-key`` or as a bearer token. Answers carry Azure's
  content-filter annotations; the ``content_filter`` knob makes the filter refuse the prompt (``"prompt"``: the
  400 with code ``content_filter`` and its ``innererror``) or stop the completion (``"completion"``:
  ``finish_reason: "content_filter"``).

A deployment is one of the knob ``models``, running the model of the same name unless ``azure_deployments``
(deployment -> model) says otherwise.
"""

from __future__ import annotations

import time

import orjson

from ..http.server import Response
from ..wire.gemini import TranslationError, gemini_request_to_openai, openai_answer_to_gemini
from ..wire.sse import encode_event
from .fake_content import (FakeRequestError, fake_answer, fake_embedding, openai_completion, openai_stream_frames,
                           thinking_signature)

__all__ = ["AZURE_FILTER_MESSAGE", "azure_error", "check_signatures", "gemini_error_response"]

_JSON = ((b"content-type", b"application/json"),)
_SSE = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))

_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def gemini_error_response(status: int, message: str, *, headers=(), retry_after: float | None = None) -> Response:
    err: dict = {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}
    if retry_after is not None:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}]
    return Response(status, [*_JSON, *headers], orjson.dumps({"error": err}))


def azure_error(status: int, code: str, message: str, **extra) -> Response:
    return Response(status, list(_JSON), orjson.dumps({"error": {"code": code, "message": message, **extra}}))


AZURE_FILTER_MESSAGE = ("The response was filtered due to the prompt triggering Azure OpenAI's content management "
                        "policy. Please modify your prompt and retry. To learn more about our content filtering "
                        "policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766")
_SAFE = {"filtered": False, "severity": "safe"}
_PROMPT_RESULTS = {"hate": _SAFE, "jailbreak": {"filtered": False, "detected": False}, "self_harm": _SAFE,
                   "sexual": _SAFE, "violence": _SAFE}
_CHOICE_RESULTS = {"hate": _SAFE, "protected_material_code": {"filtered": False, "detected": False},
                   "protected_material_text": {"filtered": False, "detected": False}, "self_harm": _SAFE,
                   "sexual": _SAFE, "violence": _SAFE}
_FILTERED_RESULTS = {**_CHOICE_RESULTS, "violence": {"filtered": True, "severity": "high"}}


def _signed(part: dict) -> str:
    """What the fake's thought signature of a part covers: its function call, or its text."""
    fc = part.get("functionCall")
    if isinstance(fc, dict):
        return "call\x00" + str(fc.get("name")) + "\x00" + orjson.dumps(fc.get("args") or {},
                                                                        option=orjson.OPT_SORT_KEYS).decode()
    return "text\x00" + str(part.get("text"))


def _answer_signature(choice, call) -> str | None:
    """The signature the fake gives an answer, as Gemini 3 does: always on a function call, on the last text
    part when the model thought first."""
    if call is not None:
        return thinking_signature(_signed({"functionCall": {"name": call[0], "args": orjson.loads(call[1])}}))
    if choice.reasoning:  # it covers the whole answer, which the gateway gives back as one text part
        return thinking_signature(_signed({"text": "".join(choice.pieces)}))
    return None


def _logprobs(choice, pieces) -> list | None:
    if choice.piece_logprobs is None or choice.tool_call:
        return None
    return [e for k in pieces for e in choice.piece_logprobs[k]]


def check_signatures(body: dict) -> str | None:
    """Why Gemini would refuse the thought signatures of a request's model turns (as Gemini 3 does), or None.

    Every signature must be the fake's own for that part, byte for byte; and in the current turn (the model
    turns after the last user text), the first function call of each model turn must carry its signature.
    """
    contents = body.get("contents")
    if not isinstance(contents, list):
        return None
    current = 0
    for i, content in enumerate(contents):
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(content, dict) and content.get("role", "user") == "user" and isinstance(parts, list) and any(
                isinstance(p, dict) and "functionResponse" not in p for p in parts):
            current = i
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or content.get("role") != "model" or not isinstance(content.get("parts"), list):
            continue
        first_call, text = True, ""
        for k, part in enumerate(content["parts"]):
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str) and not part.get("thought"):
                text += part["text"]
            covered = part if "functionCall" in part or part.get("thought") else {"text": text}
            sig = part.get("thoughtSignature")
            if sig is not None and (not isinstance(sig, str) or sig != thinking_signature(_signed(covered))):
                return f"Unable to submit request because Thought signature is not valid. (contents[{i}].parts[{k}])"
            if isinstance(part.get("functionCall"), dict):
                if first_call and sig is None and i > current:
                    name = part["functionCall"].get("name")
                    return (f"Function call is missing a thought_signature in functionCall parts. This is required for "
                            f"tools to work correctly, and missing thought_signature may lead to degraded model "
                            f"performance. Additional data, function call `default_api:{name}` , position {k + 1}. "
                            "Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
                first_call = False
    return None


class VendorRoutes:
    """The Gemini and Azure routes of one :class:`~.fake_server.FakeProvider` (``fake``), sharing its knobs."""

    def __init__(self, fake) -> None:
        self.fake = fake

    # -- Gemini ------------------------------------------------------------------------------------------

    async def gemini(self, request, method: str, path: str) -> Response:
        rest = path[len("/v1beta/"):]
        if rest == "models" and method == "GET":
            return self._gemini_models(request)
        name, sep, verb = rest.rpartition(":")
        if not sep or not name.startswith("models/") or method != "POST":
            return gemini_error_response(404, f"Method not found: {method} {path}")
        model = name[len("models/"):]
        return await self.fake._model_route(
            request, method, lambda req, body: self._gemini_call(req, body, model, verb),
            error=lambda status, message, headers=(): gemini_error_response(
                status, message, headers=headers, retry_after=self.fake.knobs.retry_after if status == 429 else None))

    @staticmethod
    def _gemini_key(request) -> bool:
        return bool(request.header(b"x-goog-api-key")) or "key=" in (request.query or "")

    def _gemini_models(self, request) -> Response:
        if not self._gemini_key(request):
            return gemini_error_response(403, "Method doesn't allow unregistered callers (callers without established "
                                              "identity). Please use API Key or other form of API consumer identity to call this API.")
        params = dict(p.partition("=")[::2] for p in (request.query or "").split("&") if p)
        size = int(params.get("pageSize") or 50) if (params.get("pageSize") or "50").isdigit() else 50
        start = int(params["pageToken"]) if params.get("pageToken", "").isdigit() else 0
        models = self.fake.knobs.models
        page = models[start:start + max(1, min(size, 1000))]
        doc: dict = {"models": [{"name": f"models/{m}", "version": "001", "displayName": m,
                                 "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                                 "supportedGenerationMethods": ["generateContent", "countTokens"]} for m in page]}
        if start + len(page) < len(models):
            doc["nextPageToken"] = str(start + len(page))
        return Response.json(doc)

    def _gemini_call(self, request, body: dict, model: str, verb: str) -> Response:
        if not self._gemini_key(request):
            return gemini_error_response(403, "Method doesn't allow unregistered callers (callers without established "
                                              "identity). Please use API Key or other form of API consumer identity to call this API.")
        if not self.fake.serves(model):
            return gemini_error_response(404, f"models/{model} is not found for API version v1beta, or is not "
                                              f"supported for {verb}. Call ListModels to see the list of available "
                                              "models and their supported methods.")
        if verb == "batchEmbedContents":
            return self._gemini_embed(body, model)
        if verb not in ("generateContent", "streamGenerateContent"):
            return gemini_error_response(404, f"Method not found: {verb}")
        refused = check_signatures(body)
        if refused is not None:
            self.fake._fault("signature")
            return gemini_error_response(400, refused)
        try:
            chat = gemini_request_to_openai(body, model)
            answer = fake_answer(chat, chunks=self.fake.knobs.chunks, text=self.fake.knobs.text)
        except (TranslationError, FakeRequestError) as exc:
            return gemini_error_response(400, f"* GenerateContentRequest.{exc.param}: {exc.message}"
                                         if exc.param else exc.message)
        response_id = self.fake._next_id("gemresp")
        thoughts = answer.reasoning_tokens
        usage = {"promptTokenCount": answer.prompt_tokens, "candidatesTokenCount": answer.completion_tokens - thoughts,
                 "totalTokenCount": answer.prompt_tokens + answer.completion_tokens,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}]}
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        tail = {"modelVersion": model, "responseId": response_id}
        if verb == "generateContent":
            candidates = []
            for c in answer.choices:
                call = (c.tool_call.name, c.tool_call.arguments) if c.tool_call else None
                candidates.append(openai_answer_to_gemini(
                    c.pieces, finish=c.finish_reason, index=c.index, tool_call=call, thought=c.reasoning,
                    signature=_answer_signature(c, call), logprobs=_logprobs(c, range(len(c.pieces)))))
            return Response.json({"candidates": candidates, "usageMetadata": usage, **tail})
        if "alt=sse" not in (request.query or ""):
            return gemini_error_response(400, "this fake serves streamGenerateContent with alt=sse only")
        frames = []
        prompt_only = {"promptTokenCount": answer.prompt_tokens, "totalTokenCount": answer.prompt_tokens}
        for c in answer.choices:
            for piece in c.reasoning_pieces if c.reasoning else ():
                frames.append([openai_answer_to_gemini((), finish="", index=c.index, thought=piece)])
            if c.tool_call:
                call = (c.tool_call.name, c.tool_call.arguments)
                cand = openai_answer_to_gemini((), finish=c.finish_reason, index=c.index, tool_call=call,
                                               signature=_answer_signature(c, call))
                frames.append([cand])
                continue
            pieces = c.pieces or ("",)
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                frames.append([openai_answer_to_gemini(
                    (piece,), finish=c.finish_reason if last else "", index=c.index,
                    signature=_answer_signature(c, None) if last else None, logprobs=_logprobs(c, (k,)))])
        events = []
        for k, cands in enumerate(frames):
            doc = {"candidates": cands, "usageMetadata": usage if k == len(frames) - 1 else prompt_only, **tail}
            events.append(b"data: " + orjson.dumps(doc) + b"\r\n\r\n")
        error = (b'data: {"error": {"code": 503, "message": "The model is overloaded. Please try again later.", '
                 b'"status": "UNAVAILABLE"}}\r\n\r\n')
        return Response(200, list(_SSE), stream=self.fake._stream(events, error))

    def _gemini_embed(self, body: dict, model: str) -> Response:
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return gemini_error_response(400, "* BatchEmbedContentsRequest.requests: requests must be a non-empty list")
        out = []
        for i, r in enumerate(requests):
            parts = ((r.get("content") or {}).get("parts") if isinstance(r, dict) else None) or []
            text = "".join(p.get("text") or "" for p in parts if isinstance(p, dict))
            if r.get("model") != f"models/{model}":
                return gemini_error_response(400, f"* BatchEmbedContentsRequest.requests[{i}].model: the model of each "
                                                  "request must be the batch's model")
            dims = r.get("outputDimensionality") or self.fake.knobs.embedding_dims
            out.append({"values": fake_embedding(text, dims)})
        return Response.json({"embeddings": out})

    # -- Azure OpenAI ------------------------------------------------------------------------------------

    async def azure(self, request, method: str, path: str) -> Response:
        rest = path[len("/openai/"):]
        if rest.startswith("v1/"):
            op = rest[3:]
            deployment = None
        elif rest in ("deployments", "models"):  # the data-plane listings (Deployments_List: 2022-12-01 only)
            op, deployment = rest, None
            query = request.query or ""
            if "api-version=" not in query or (rest == "deployments" and "api-version=2022-12-01" not in query):
                return azure_error(404, "404", "Resource not found")
        elif rest.startswith("deployments/"):
            deployment, _, op = rest[len("deployments/"):].partition("/")
            if "api-version=" not in (request.query or ""):
                return azure_error(404, "404", "Resource not found")
        else:
            return azure_error(404, "404", "Resource not found")
        if not (request.header(b"api-key") or request.header(b"authorization")):
            return azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                           "sure to provide a valid key for an active subscription and use a correct "
                                           "regional API endpoint for your resource.")
        if method == "GET" and op in ("deployments", "models"):
            return self._azure_listing(op, deployment is None and rest.startswith("v1/"))
        if method != "POST" or op not in ("chat/completions", "embeddings"):
            return azure_error(404, "404", "Resource not found")
        return await self.fake._model_route(
            request, method, lambda req, body: self._azure_call(body, deployment, op),
            error=lambda status, message, headers=(): Response(status, [*_JSON, *headers], orjson.dumps(
                {"error": {"code": str(status), "message": message}})))

    def _deployments(self) -> dict[str, str]:
        knobs = self.fake.knobs
        return {**{m: m for m in knobs.models}, **knobs.azure_deployments}

    def _azure_listing(self, op: str, v1: bool) -> Response:
        deployments = self._deployments()
        if op == "models" and v1:
            return Response.json({"object": "list", "data": [
                {"id": d, "object": "model", "created": 1700000000, "owned_by": "system"} for d in deployments]})
        if op == "models":  # Models_List of the authoring API: what the resource can run, not its deployments
            caps = {"fine_tune": False, "inference": True, "completion": False, "chat_completion": True,
                    "embeddings": False}
            return Response.json({"object": "list", "data": [
                {"id": m, "object": "model", "status": "succeeded", "created_at": 1700000000, "capabilities": caps,
                 "lifecycle_status": "generally-available", "deprecation": {"inference": 1900000000}}
                for m in dict.fromkeys(deployments.values())]})
        return Response.json({"object": "list", "data": [
            {"id": d, "model": m, "object": "deployment", "status": "succeeded", "owner": "organization-owner",
             "scale_settings": {"scale_type": "standard"}, "created_at": 1700000000, "updated_at": 1700000000}
            for d, m in deployments.items()]})

    def _azure_call(self, body: dict, deployment: str | None, op: str) -> Response:
        if deployment is None:
            deployment = body.get("model")
        deployments = self._deployments()
        if deployment not in deployments:
            return azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist. If you "
                               "created the deployment within the last 5 minutes, please wait a moment and try again.")
        model = deployments[deployment]
        knobs = self.fake.knobs
        if op == "embeddings":
            return self.fake._embeddings(None, {**body, "model": model})
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return azure_error(400, "BadRequest", "'messages' is a required property", param="messages")
        if knobs.content_filter == "prompt":
            self.fake._fault("content_filter")
            return Response(400, list(_JSON), orjson.dumps({"error": {
                "message": AZURE_FILTER_MESSAGE, "type": None, "param": "prompt", "code": "content_filter",
                "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    **_PROMPT_RESULTS, "self_harm": {"filtered": True, "severity": "medium"}}}}}))
        try:
            answer = fake_answer({**body, "model": model}, chunks=knobs.chunks, text=knobs.text)
        except FakeRequestError as exc:
            return azure_error(400, "BadRequest", exc.message, param=exc.param)
        filtered = knobs.content_filter == "completion"
        head = {"id": self.fake._next_id("chatcmpl-"), "created": int(time.time()), "model": model,
                "system_fingerprint": "fp_fake"}
        prompt_filter = [{"prompt_index": 0, "content_filter_results": _PROMPT_RESULTS}]
        if not body.get("stream"):
            doc = openai_completion(answer, head)
            doc["prompt_filter_results"] = prompt_filter
            for choice in doc["choices"]:
                choice["content_filter_results"] = _FILTERED_RESULTS if filtered else _CHOICE_RESULTS
                if filtered:
                    choice["finish_reason"] = "content_filter"
                    choice["message"]["content"] = None
            return Response.json(doc)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        opening, pieces, closing = openai_stream_frames(answer, head, include_usage=include_usage, framed=False)
        first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": prompt_filter}
        events = [encode_event(orjson.dumps(first))]
        if filtered:
            pieces = pieces[:1]
        for payload in [*opening, *pieces, *closing]:
            chunk = orjson.loads(payload)
            for choice in chunk.get("choices") or ():
                if choice.get("finish_reason") is not None or choice["delta"].get("content"):
                    choice["content_filter_results"] = _CHOICE_RESULTS
                if filtered and choice.get("finish_reason") is not None:
                    choice["finish_reason"] = "content_filter"
                    choice["content_filter_results"] = _FILTERED_RESULTS
            events.append(encode_event(orjson.dumps(chunk)))
        events.append(b"data: [DONE]\n\n")
        error = b'data: {"error":{"code":"500","message":"The server had an error while processing your request."}}\n\n'
        return Response(200, list(_SSE), stream=self.fake._stream(events, error))
