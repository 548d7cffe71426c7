"""Inbound Anthropic ``POST /v1/messages``: clients of the Anthropic SDK served by any provider.

The Messages body is validated by Anthropic's rules and translated to the canonical chat body
(:func:`~runestone.wire.anthropic.anthropic_request_to_openai`), served by the one pipeline like chat, and
the answer is translated back: a ``chat.completion`` becomes a ``message``; a stream becomes Anthropic's
events in the real API's order. Every refusal on this route, authentication and the body's size included,
is in Anthropic's error shape (``{"type": "error", "error": {"type", "message"}}``), which is why the route
is registered ``public`` and authenticates itself. A failure after the first byte ends the stream with an
``error`` event and no ``message_stop``, as the real API does.
"""

from __future__ import annotations

import orjson

from ..http.server import BodyTooLarge, HttpError, Request, Response
from ..routing.errors import GatewayError
from ..routing.executor import Completed, ModelRequest
from ..wire.anthropic import AnthropicEventStream, anthropic_request_to_openai, openai_response_to_anthropic
from ..wire.errors import InvalidRequest
from ..wire.openai import parse_json_object
from .api import requirements_of
from .errors import anthropic_response
from .streams import SSE_HEADERS, anthropic_failure, encoded
from .token_count import COUNT_HEADER, count_input_tokens
from .deps import FrontDeps

__all__ = ["MessagesRoute", "anthropic_error", "install"]

_JSON = (b"content-type", b"application/json")


def anthropic_error(status: int, error_type: str, message: str, headers=()) -> Response:
    return anthropic_response(GatewayError(status, message, error_type), headers)


class MessagesRoute:
    """``POST /v1/messages`` on the front's Gateway; answers and refusals in Anthropic's shapes."""

    def __init__(self, front, count: bool = False) -> None:
        self.front = front
        #: ``POST /v1/messages/count_tokens`` instead of ``/v1/messages``.
        self.count = count

    async def __call__(self, request: Request, caller) -> Response:
        try:
            caller = self.front.authenticate(request, "client", caller.request_id)
            return await (self._count if self.count else self._answer)(request, caller)
        except (GatewayError, InvalidRequest) as exc:
            return anthropic_response(exc)
        except BodyTooLarge:
            return anthropic_error(413, "request_too_large",
                                   f"the request body exceeds the limit of {self.front.max_body_bytes} bytes")
        except HttpError as exc:  # the body was refused while reading it (too slow, malformed)
            return anthropic_error(exc.status, "invalid_request_error", exc.message)

    async def _answer(self, request: Request, caller) -> Response:
        body = parse_json_object(await request.body())
        routing = body.get("runestone")
        chat = anthropic_request_to_openai(body)
        model = chat["model"]
        stream = bool(chat.get("stream"))
        caps = frozenset(["tools"] if chat.get("tools") else ()) | (
            frozenset(["vision"]) if _has_images(chat) else frozenset())
        result = await self.front.gateway.serve(ModelRequest(
            caller.request_id, caller.key_id, "messages", model, chat, "chat", stream, stream,
            requirements_of(routing), caps))
        if type(result) is Completed:
            message = openai_response_to_anthropic(orjson.loads(result.body), model=model)
            return Response(200, [_JSON, *result.headers], orjson.dumps(message))
        feed = AnthropicEventStream(model).feed
        return Response(200, [*SSE_HEADERS, *result.headers],
                        stream=encoded(result, feed, anthropic_failure), first_ready=True)


    async def _count(self, request: Request, caller) -> Response:
        """``{"input_tokens": N}``: the upstream's count (an anthropic provider) or the gateway's estimate."""
        body = parse_json_object(await request.body())
        body.pop("runestone", None)
        # A count has no max_tokens; the translation (validating the rest as /v1/messages does) wants one.
        chat = anthropic_request_to_openai({**body, "max_tokens": 1, "stream": False})
        count, source = await count_input_tokens(self.front.gateway, chat["model"], chat)
        return Response.json({"input_tokens": count}, headers=[(COUNT_HEADER, source)])


def _has_images(chat: dict) -> bool:
    for msg in chat["messages"]:
        content = msg.get("content")
        if isinstance(content, list) and any(p.get("type") == "image_url" for p in content):
            return True
    return False


def install(front, deps: FrontDeps) -> None:
    # "public": the route authenticates itself so that a refusal is in Anthropic's shape.
    front.routes.add("POST", "/v1/messages", MessagesRoute(front), "public")
    front.routes.add("POST", "/v1/messages/count_tokens", MessagesRoute(front, count=True), "public")
