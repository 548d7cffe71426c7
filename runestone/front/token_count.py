"""Counting a request's input tokens: ``POST /v1/messages/count_tokens`` and ``POST /v1/responses/input_tokens``.

The count is the upstream's own where the provider the request would go to has a counting endpoint (an
``anthropic`` provider: ``/v1/messages/count_tokens``; an ``openai`` provider with ``responses_api``:
``/responses/input_tokens``), else the gateway's estimate (:mod:`runestone.wire.token_estimate`). The
answer says which in its ``x-runestone-token-count`` header: ``upstream`` or ``estimate``. Counting is
not a model request: it is planned like one (so it asks the provider that would serve it) but is not
admitted, retried or recorded in the ledger; a provider whose breaker is open, that fails or that has no
such endpoint is answered by the estimate, while an upstream refusing the request itself (a 400) is
passed on as the client's error.
"""

from __future__ import annotations

import logging

import trio

from ..resilience.breaker import DENY, check
from ..resilience.errors import UpstreamError
from ..routing.executor import client_error
from ..wire.token_estimate import estimate_input_tokens

__all__ = ["COUNT_HEADER", "count_input_tokens"]

log = logging.getLogger("runestone.front")

COUNT_HEADER = b"x-runestone-token-count"

_COUNT_TIMEOUT = 10.0


async def count_input_tokens(gateway, model: str, chat: dict, responses_body: dict | None = None) -> tuple[int, bytes]:
    """(input tokens, ``b"upstream"`` or ``b"estimate"``) for the canonical chat body ``chat``.

    ``responses_body``, for a Responses request, is what a provider speaking Responses natively counts.
    """
    plan = gateway.plan(model, chat, check_known=True)
    table = gateway.providers.value
    for target in plan.targets[:1]:
        entry = table.get(target.provider)
        if entry is None or check(gateway.breakers.value, target.provider, trio.current_time()) == DENY:
            break
        adapter = entry.adapter
        if responses_body is not None and getattr(adapter, "speaks_responses", False):
            call = adapter.count_response_tokens({**responses_body, "model": target.model})
        elif hasattr(adapter, "count_tokens"):
            call = adapter.count_tokens({**chat, "model": target.model})
        else:
            break
        try:
            with trio.move_on_after(min(_COUNT_TIMEOUT, entry.spec.config.timeout_ms / 1000)):
                return await call, b"upstream"
        except UpstreamError as exc:
            if exc.client_fault and exc.status not in (404, 405):
                raise client_error(exc) from None
            log.info("provider %s could not count tokens (%s); answering the estimate", target.provider, exc)
        finally:
            call.close()
    return estimate_input_tokens(chat), b"estimate"
