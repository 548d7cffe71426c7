"""OpenAI's Responses API: ``/v1/responses`` on the one pipeline, with the gateway's own store of responses.

- ``POST /v1/responses`` (stream or not): the body is validated and translated to the canonical chat body
  (:mod:`runestone.wire.responses`) and served by ``Gateway.serve`` like chat, so routing, breakers,
  failover, limits, telemetry and the ledger (endpoint ``responses``) all apply; the answer is encoded as
  the Response object or its stream of events. A provider marked ``responses_api`` (an ``openai``-type
  upstream speaking Responses itself) is sent the client's body unchanged instead (operation
  ``responses``), so built-in tools and encrypted reasoning survive; a request needing that (a built-in
  tool) is routed to such providers only, and is a 400 naming the field when none serves its model.
- State: with ``store`` (default true) the response and the input items the model saw are kept in the
  :class:`~runestone.front.response_store.ResponseStore`; ``previous_response_id`` continues one on any
  provider (its items go before the new input). ``GET``/``DELETE /v1/responses/{id}`` and
  ``GET /v1/responses/{id}/input_items`` read it; another key's response is a 404 for this key.
- ``POST /v1/responses/input_tokens``: the input's token count (:mod:`runestone.front.token_count`).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs, unquote

import orjson

from ..http.server import Request, Response
from ..routing.errors import GatewayError
from ..routing.executor import Chunks, Completed, Failed, ModelRequest, Streaming
from ..wire.responses import (
    ResponsesEventStream,
    chat_to_response,
    failed_response,
    gateway_reasoning,
    new_id,
    responses_to_chat,
    sse_event,
    validate_responses,
)
from .api import requirements_of
from .response_store import ResponseStore
from .streams import SSE_HEADERS, Relay
from .token_count import COUNT_HEADER, count_input_tokens
from .deps import FrontDeps

__all__ = ["ResponsesRoutes", "install"]

log = logging.getLogger("runestone.front")

_JSON = (b"content-type", b"application/json")
_PREFIX = "/v1/responses/"
#: The capability of a provider speaking the Responses API natively (``responses_api = true``).
NATIVE = "responses"
_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"no response with id {response_id!r} is stored for this API key (it may have been "
                        "created with store=false, deleted, expired, or belong to another key)",
                        "invalid_request_error", param="response_id", code="response_not_found")


class ResponsesRoutes:
    """The ``/v1/responses`` routes on the front's Gateway and the store."""

    def __init__(self, front, store: ResponseStore) -> None:
        self.front = front
        self.store = store

    # -- create -------------------------------------------------------------------------------------

    async def _prepare(self, request: Request, caller):
        """The validated request, the stored conversation it continues, and its chat body."""
        req = validate_responses(await self.front.read_json(request))
        history: list = []
        if req.previous_response_id is not None:
            stored = await self.store.get(caller.key_id, req.previous_response_id)
            if stored is None:
                raise GatewayError(404, f"previous_response_id {req.previous_response_id!r} is not a response "
                                   "stored for this API key (store=false, deleted, expired, or another key's)",
                                   "invalid_request_error", param="previous_response_id",
                                   code="previous_response_not_found")
            history = stored.conversation
        if req.native_only and not self._native_serves(req.model):
            param = req.native_only[0]
            raise GatewayError(400, f"{param}: this feature runs only on a provider that speaks the Responses API "
                               f"natively (an openai provider with responses_api = true), and none serves "
                               f"{req.model!r}", param=param, code="unsupported_on_provider")
        return req, history, responses_to_chat(req, history)

    def _native_serves(self, model: str) -> bool:
        gw = self.front.gateway
        model = gw.resolve_alias(model)
        provider, sep, _ = model.partition(":")
        for entry in gw.providers.value.values():
            if NATIVE in entry.info.capabilities and not entry.draining and (
                    entry.info.serves(model) or (sep and entry.name == provider)):
                return True
        return False

    @staticmethod
    def _native_body(req, history: list) -> dict:
        """The client's body for a native provider: a stored conversation the gateway holds becomes input."""
        body = dict(req.body)
        if req.previous_response_id is not None:
            del body["previous_response_id"]
            # Reasoning items are of use upstream only with their encrypted content (no upstream state).
            past = [it for it in history if it.get("type") != "reasoning" or it.get("encrypted_content")]
            body["input"] = [*past, *req.items]
        inp = body.get("input")
        if isinstance(inp, list) and any(isinstance(it, dict) and gateway_reasoning(it) for it in inp):
            # Another vendor's signed reasoning, in the gateway's own encrypted_content: OpenAI cannot read it.
            body["input"] = [it for it in inp if not (isinstance(it, dict) and gateway_reasoning(it))]
        return body

    async def create(self, request: Request, caller) -> Response:
        req, history, chat = await self._prepare(request, caller)
        gw = self.front.gateway
        caps = req.capability
        native = None
        if self._native_serves(req.model):
            native = self._native_body(req, history)
            if req.native_only:
                caps = caps | {NATIVE}
        result = await gw.serve(ModelRequest(
            caller.request_id, caller.key_id, "responses", req.model, chat, "chat", req.stream, True,
            requirements_of(req.routing), caps, native=native))
        response_id = new_id("resp_")
        created = int(time.time())
        inputs = [*history, *req.items]
        if type(result) is Completed:
            if result.native:
                response = orjson.loads(result.body)
            else:
                response = chat_to_response(req, orjson.loads(result.body), response_id, created)
            if req.store:
                await self._keep(caller.key_id, response, inputs)
            return Response(200, [_JSON, *result.headers], orjson.dumps(response))
        relay = self._relay_native if result.native else self._relay
        return Response(200, [*SSE_HEADERS, *result.headers],
                        stream=Relay(relay(result, req, response_id, created, caller.key_id, inputs), result))

    async def _keep(self, key_id, response: dict, inputs: list) -> None:
        try:
            await self.store.put(key_id, response, inputs)
        except Exception:  # the answer still goes out; the store's failure is the operator's to see
            log.exception("could not store response %s", response.get("id"))

    async def _relay(self, streaming: Streaming, req, response_id: str, created: int, key_id, inputs: list):
        """The chat chunk stream as Responses events; the final response is stored before its last event."""
        encoder = ResponsesEventStream(req, response_id, created)
        try:
            async for event in streaming:
                if type(event) is Chunks:
                    data = encoder.feed(event.payloads, event.last)
                elif type(event) is Failed:
                    data = encoder.failure(event.error.message, event.error.code)
                else:
                    continue
                if encoder.response is not None and req.store:
                    await self._keep(key_id, encoder.response, inputs)
                if data:
                    yield data
        finally:
            await streaming.aclose()

    async def _relay_native(self, streaming: Streaming, req, response_id: str, created: int, key_id, inputs: list):
        """A native upstream's own events, framed; its final response is stored before its last event."""
        final = None
        seq = 0
        try:
            async for event in streaming:
                if type(event) is Chunks:
                    out = []
                    for payload in event.payloads:
                        obj = orjson.loads(payload)
                        seq = obj.get("sequence_number", seq) if isinstance(obj.get("sequence_number"), int) else seq
                        kind = obj.get("type") or ""
                        if kind.encode() in _TERMINAL and isinstance(obj.get("response"), dict):
                            final = obj["response"]
                        out.append(b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n")
                    if final is not None and req.store:
                        await self._keep(key_id, final, inputs)
                        final = None
                    if out:
                        yield b"".join(out)
                elif type(event) is Failed:
                    error = event.error
                    response = failed_response({"id": response_id, "object": "response", "created_at": created,
                                                "model": req.model, "output": [], "status": "failed"},
                                               error.message, error.code)
                    yield sse_event({"type": "response.failed", "sequence_number": seq + 1, "response": response})
        finally:
            await streaming.aclose()

    # -- the store ----------------------------------------------------------------------------------

    def _target(self, request: Request) -> tuple[str, str]:
        rest = unquote(request.path[len(_PREFIX):])
        response_id, _, sub = rest.partition("/")
        if not response_id or sub not in ("", "input_items") or (sub and request.method != "GET"):
            raise GatewayError(404, f"no route for {request.method} {request.path}; see GET /openapi.json",
                               "not_found_error", code="not_found")
        return response_id, sub

    async def read(self, request: Request, caller) -> Response:
        response_id, sub = self._target(request)
        stored = await self.store.get(caller.key_id, response_id)
        if stored is None:
            raise _not_found(response_id)
        if not sub:
            return Response.json(stored.response)
        return Response.json(_page(stored.input_items, request.query))

    async def delete(self, request: Request, caller) -> Response:
        response_id, _ = self._target(request)
        if not await self.store.delete(caller.key_id, response_id):
            raise _not_found(response_id)
        return Response.json({"id": response_id, "object": "response", "deleted": True})

    # -- counting -----------------------------------------------------------------------------------

    async def input_tokens(self, request: Request, caller) -> Response:
        body = await self.front.read_json(request)
        body.pop("stream", None)
        req = validate_responses(body)
        history: list = []
        if req.previous_response_id is not None:
            stored = await self.store.get(caller.key_id, req.previous_response_id)
            if stored is None:
                raise _not_found(req.previous_response_id)
            history = stored.conversation
        chat = responses_to_chat(req, history)
        native = self._native_body(req, history) if self._native_serves(req.model) else None
        count, source = await count_input_tokens(self.front.gateway, req.model, chat, native)
        return Response.json({"object": "response.input_tokens", "input_tokens": count},
                             headers=[(COUNT_HEADER, source)])


def _page(items: list, query: str) -> dict:
    """A page of input items as OpenAI lists them: ``order`` (default desc), ``after``, ``limit`` (1-100)."""
    params = parse_qs(query)
    order = (params.get("order") or ["desc"])[0]
    if order not in ("asc", "desc"):
        raise GatewayError(400, "'order' must be \"asc\" or \"desc\"", param="order", code="invalid_value")
    try:
        limit = int((params.get("limit") or ["20"])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise GatewayError(400, "'limit' must be an integer between 1 and 100", param="limit", code="invalid_value")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = (params.get("after") or [None])[0]
    if after is not None:
        ids = [it.get("id") for it in ordered]
        if after not in ids:
            raise GatewayError(400, f"'after' {after!r} is not an item of this response", param="after",
                               code="invalid_value")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}


def install(front, deps: FrontDeps):
    """The Responses API's routes; returns the shared store with ``[cluster] redis_url``, else None."""
    cfg = deps.config.responses
    store = ResponseStore(str(deps.data_dir / "responses.sqlite3"), retention_days=cfg.retention_days,
                          max_stored=cfg.max_stored)
    shared = None
    if deps.share_responses is not None:  # [cluster] redis_url: any instance finds them
        store = shared = deps.share_responses(store, cfg.retention_days)
    routes = ResponsesRoutes(front, store)
    add = front.routes.add
    add("POST", "/v1/responses", routes.create)
    add("POST", "/v1/responses/input_tokens", routes.input_tokens)
    add("GET", _PREFIX + "*", routes.read)
    add("DELETE", _PREFIX + "*", routes.delete)
    return shared
