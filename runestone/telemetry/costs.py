"""Costs: what a request cost, and what it would cost where.

The price type, its lookup and the arithmetic are the config's
(:mod:`runestone.config.pricing`: :class:`ModelPrice`, :func:`price_for`,
:func:`cost_of`, re-exported here); this module adds the cached
:class:`Pricer` and the estimates before a request runs:
``estimate_costs`` is the ``cost`` routing policy's view before a request runs:
input tokens from the gateway's one estimate
(:func:`runestone.wire.token_estimate.estimate_input_tokens`), output tokens
from ``max_tokens`` (or ``max_completion_tokens``) or a default of 256.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..config.pricing import ModelPrice, cost_of, price_for
from ..wire.token_estimate import estimate_input_tokens

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "ModelPrice",
    "Pricer",
    "cost_of",
    "estimate_costs",
    "price_for",
]

DEFAULT_OUTPUT_TOKENS = 256
_NO_PRICE = object()


class Pricer:
    """A finished request's cost: the one it carries, or, when that is 0 and it used tokens, its price from
    ``pricing`` (looked up by :func:`price_for`, cached per provider and model as USD per input and per output
    token). Used by one task (or one thread) at a time. A model priced at nothing (the fake provider's) has
    its records' cost 0 and comes here every time: a cached pair of floats keeps that as cheap as the rest."""

    __slots__ = ("pricing", "_prices", "_limit")

    def __init__(self, pricing: Mapping[str, Any] | None, limit: int = 10_000) -> None:
        self.pricing = pricing
        #: Entries cached at most (bounded, whatever names come by): a full cache starts again.
        self._limit = limit
        #: (provider, model) -> (USD per input token, USD per output token), or None: no price.
        self._prices: dict[tuple[str, str], tuple[float, float] | None] = {}

    def __call__(self, cost: float, provider: str, model: str, tokens_in: int, tokens_out: int) -> float:
        if cost or not (tokens_in or tokens_out) or not self.pricing:
            return cost
        key = (provider, model)
        per_token = self._prices.get(key, _NO_PRICE)
        if per_token is _NO_PRICE:
            if len(self._prices) >= self._limit:
                self._prices.clear()
            price = price_for(self.pricing, provider, model)
            per_token = self._prices[key] = None if price is None else (cost_of(1, 0, price), cost_of(0, 1, price))
        if per_token is None:
            return cost
        return tokens_in * per_token[0] + tokens_out * per_token[1]


def estimate_costs(
    request_body: Mapping[str, Any],
    candidates: Mapping[str, str],
    pricing: Mapping[str, Any] | None,
) -> dict[str, float]:
    """Estimated USD of ``request_body`` at each candidate ``{provider: model}``.

    A candidate with no known price gets ``math.inf``, so a cheapest-first sort
    puts the unpriced last instead of treating them as free.
    """
    tokens_in = estimate_input_tokens(request_body)
    tokens_out = request_body.get("max_tokens") or request_body.get("max_completion_tokens")
    if not isinstance(tokens_out, int) or isinstance(tokens_out, bool) or tokens_out <= 0:
        tokens_out = DEFAULT_OUTPUT_TOKENS
    out: dict[str, float] = {}
    for provider, model in candidates.items():
        price = price_for(pricing, provider, model)
        out[provider] = math.inf if price is None else cost_of(tokens_in, tokens_out, price)
    return out
