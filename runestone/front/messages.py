"""Inbound Anthropic ``POST /v1/messages``: clients of the Anthropic SDK served by any provider.

The Messages body is translated to the gateway's OpenAI chat body
(:func:`~runestone.providers.messages_inbound.anthropic_request_to_openai`) and served by the same
Gateway as chat — router, breakers, failover, every provider type — and the answer is translated back:
a ``chat.completion`` becomes a ``message``; a stream of chunks becomes Anthropic's events in the real
API's order, framed ``event: <name>\\ndata: <json>\\n\\n``. Every refusal on this route, authentication
included, is in Anthropic's error shape (``{"type": "error", "error": {"type", "message"}}``), which is
why the route is registered ``public`` and authenticates itself: the front's own refusal would be in
OpenAI's shape, which the Anthropic SDK cannot read. A failure after the first byte ends the stream
with an ``error`` event and no ``message_stop``, as the real API does.
"""

from __future__ import annotations

import os

import attrs
import orjson

from ..http.server import BodyTooLarge, HttpError, Request, Response
from ..providers.messages_inbound import (
    InboundError,
    OpenAIToAnthropicStream,
    anthropic_request_to_openai,
    openai_error_to_anthropic,
    openai_response_to_anthropic,
)
from ..routing.executor import GatewayError
from .api import transformed
from .validate import parse_json_object, validate_chat

__all__ = ["MessagesRoute", "anthropic_error_response", "install"]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_ALWAYS = frozenset({"streaming"})
_DATA = b"data: "
_DONE = b"[DONE]"

# An error event mid-stream carries OpenAI's error type; Anthropic names the same kinds its own way.
_STREAM_ERROR_TYPES = {
    "rate_limit_error": "rate_limit_error",
    "timeout_error": "timeout_error",
    "invalid_request_error": "invalid_request_error",
    "overloaded_error": "overloaded_error",
}


def anthropic_error_response(status: int, error_type: str, message: str, headers=()) -> Response:
    body = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return Response(status, [_JSON, *headers], body)


def _from_gateway_error(exc: GatewayError) -> Response:
    body = openai_error_to_anthropic(exc.status, exc.body())
    headers = list(exc.headers)
    if exc.provider:
        headers.append((b"x-runestone-provider", exc.provider.encode()))
    return Response(exc.status, [_JSON, *headers], orjson.dumps(body))


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _error_event(payload: dict) -> bytes:
    err = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    kind = _STREAM_ERROR_TYPES.get(err.get("type"), "api_error")
    return _event("error", {"type": "error", "error": {"type": kind, "message": err.get("message") or "stream failed"}})


class AnthropicEventStream:
    """Rewrites the relayed chat SSE bytes as Anthropic stream events; one per response.

    The translator is made from the first chunk (its id names the message). ``[DONE]`` closes the
    message (``message_delta``, ``message_stop``) if the chunks did not; an error event ends the stream
    with Anthropic's ``error`` event and nothing after it.
    """

    __slots__ = ("model", "_translator", "_ended")

    def __init__(self, model: str) -> None:
        self.model = model
        self._translator: OpenAIToAnthropicStream | None = None
        self._ended = False

    def _tr(self, chat_id) -> OpenAIToAnthropicStream:
        tr = self._translator
        if tr is None:
            if isinstance(chat_id, str) and chat_id:
                message_id = chat_id if chat_id.startswith("msg_") else "msg_" + chat_id.removeprefix("chatcmpl-")
            else:
                message_id = "msg_" + os.urandom(12).hex()
            tr = self._translator = OpenAIToAnthropicStream(model=self.model, message_id=message_id)
        return tr

    def feed(self, item: bytes) -> bytes:
        if self._ended:
            return b""
        out: list[bytes] = []
        for event in item.split(b"\n\n"):
            if not event.startswith(_DATA):
                continue
            data = event[6:]
            if data == _DONE:
                out.extend(_event(n, d) for n, d in self._tr(None).finish())
                self._ended = True
                break
            obj = orjson.loads(data)
            if "error" in obj:
                out.append(_error_event(obj))
                self._ended = True
                break
            out.extend(_event(n, d) for n, d in self._tr(obj.get("id")).feed(obj))
        return b"".join(out)


class MessagesRoute:
    """``POST /v1/messages`` on the front's Gateway; answers and refusals in Anthropic's shapes."""

    def __init__(self, front) -> None:
        self.front = front

    async def __call__(self, request: Request, caller) -> Response:
        try:
            return await self._serve(request, caller.request_id)
        except GatewayError as exc:
            return _from_gateway_error(exc)
        except InboundError as exc:
            return Response(400, [_JSON], orjson.dumps(exc.to_anthropic()))
        except BodyTooLarge:
            return anthropic_error_response(
                413, "request_too_large", f"the request body exceeds the limit of {self.front.max_body_bytes} bytes")
        except HttpError as exc:  # the body was refused while reading it (too slow, malformed)
            return anthropic_error_response(exc.status, "invalid_request_error", exc.message)

    async def _serve(self, request: Request, request_id: str) -> Response:
        caller = self.front.authenticate(request, "client", request_id)
        return await self.front.run_limited(self._answer, request, caller)

    async def _answer(self, request: Request, caller) -> Response:
        front = self.front
        body = parse_json_object(await request.body())
        routing = body.get("runestone")
        chat = anthropic_request_to_openai(body)
        if routing is not None:
            chat["runestone"] = routing
        shape = validate_chat(chat)
        gw = front.gateway
        model = shape.model
        front.require_model(model)
        requirements = shape.requirements
        needs = shape.capability - _ALWAYS
        if needs and not needs <= requirements.require:
            requirements = attrs.evolve(requirements, require=requirements.require | needs)
        plan = gw.plan(model, chat, requirements)
        ctx = gw.begin(caller.request_id, caller.key_id, "messages", model, shape.stream)
        if not shape.stream:
            target, result = await gw.complete(ctx, chat, plan)
            message = openai_response_to_anthropic(orjson.loads(result.body), model=model)
            return Response(200, [_JSON, *ctx.answer_headers(target.provider)], orjson.dumps(message))
        answer = await gw.open_stream(ctx, chat, plan, True)
        headers = [*_SSE_HEADERS, *ctx.answer_headers(answer.provider)]
        return Response(200, headers, stream=transformed(gw.relay(ctx, answer), AnthropicEventStream(model).feed))


def install(front, app) -> None:
    # "public": the route authenticates itself so that a refusal is in Anthropic's shape.
    front.routes.add("POST", "/v1/messages", MessagesRoute(front), "public")
