"""The legacy ``POST /v1/completions`` route: a one-message chat through the one pipeline.

Decoding and encoding are :mod:`runestone.wire.completions`; see there for what is served and refused.
"""

from __future__ import annotations

import orjson

from ..http.server import Request, Response
from ..routing.executor import Completed, ModelRequest
from ..wire.completions import TextCompletionStream, chat_body_from_completion, text_completion_from_chat
from ..wire.openai import parse_json_object, validate_chat
from .api import requirements_of
from .streams import SSE_HEADERS, encoded, openai_failure
from .deps import FrontDeps

__all__ = ["CompletionsRoute", "install"]

_JSON = (b"content-type", b"application/json")


class CompletionsRoute:
    """``POST /v1/completions`` on the front's Gateway."""

    def __init__(self, front) -> None:
        self.front = front

    async def __call__(self, request: Request, caller) -> Response:
        body = parse_json_object(await request.body())
        chat, prompt, echo = chat_body_from_completion(body)
        shape = validate_chat(chat)
        result = await self.front.gateway.serve(ModelRequest(
            caller.request_id, caller.key_id, "completions", shape.model, chat, "chat", shape.stream,
            shape.include_usage, requirements_of(shape.routing), shape.capability))
        echo_prompt = prompt if echo else None
        if type(result) is Completed:
            out = text_completion_from_chat(orjson.loads(result.body), echo_prompt=echo_prompt)
            return Response(200, [_JSON, *result.headers], orjson.dumps(out))
        feed = TextCompletionStream(echo_prompt, chat.get("n") or 1).feed
        return Response(200, [*SSE_HEADERS, *result.headers],
                        stream=encoded(result, feed, openai_failure), first_ready=True)


def install(front, deps: FrontDeps) -> None:
    route = CompletionsRoute(front)
    front.routes.add("POST", "/v1/completions", route)
    front.routes.add("POST", "/completions", route)
