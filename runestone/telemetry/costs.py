"""Prices and costs: what a request cost, and what it would cost where.

A price is USD per million tokens, input and output apart. Pricing tables are
mappings from a key to a price; a price may be a :class:`ModelPrice`, any
object with ``input_per_mtok``/``output_per_mtok`` attributes (the config's own
class), or a dict with those keys. A provider's model is looked up first as
``"provider/model"`` (a provider-specific price), then as ``"model"``, then,
for a dated id (``gpt-4o-2024-08-06``, ``claude-sonnet-4-5-20250929``), as
its undated name.
``estimate_costs`` is the ``cost`` routing policy's view before a request runs:
input tokens guessed as characters / 4, output tokens from ``max_tokens``
(or ``max_completion_tokens``) or a default of 256.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "ModelPrice",
    "Pricer",
    "cost_of",
    "estimate_costs",
    "estimate_input_tokens",
    "price_for",
]

DEFAULT_OUTPUT_TOKENS = 256
_PER_MTOK = 1e-6


@attrs.frozen
class ModelPrice:
    """USD per million input and output tokens."""

    input_per_mtok: float
    output_per_mtok: float


def _parts(price: Any) -> tuple[float, float]:
    if isinstance(price, Mapping):
        return float(price["input_per_mtok"]), float(price["output_per_mtok"])
    return float(price.input_per_mtok), float(price.output_per_mtok)


def cost_of(usage_in: int, usage_out: int, price: Any) -> float:
    """USD for ``usage_in`` input and ``usage_out`` output tokens at ``price``.

    ``price`` None costs 0.0: an unpriced model is free rather than an error,
    because a request must never fail on accounting.
    """
    if price is None:
        return 0.0
    pin, pout = _parts(price)
    return (usage_in * pin + usage_out * pout) * _PER_MTOK


def price_for(pricing: Mapping[str, Any] | None, provider: str, model: str) -> Any:
    """The price of ``model`` at ``provider``; None if unknown (lookup order in the module docstring)."""
    if not pricing:
        return None
    price = pricing.get(f"{provider}/{model}")
    if price is None:
        price = pricing.get(model)
        if price is None:
            base = _undated(model)
            if base is not None:
                price = pricing.get(base)
    return price


_NO_PRICE = object()


class Pricer:
    """A finished request's cost: the one it carries, or, when that is 0 and it used tokens, its price from
    ``pricing`` (looked up by :func:`price_for`, cached per provider and model). Used by one task (or one
    thread) at a time."""

    __slots__ = ("pricing", "_prices")

    def __init__(self, pricing: Mapping[str, Any] | None) -> None:
        self.pricing = pricing
        self._prices: dict[tuple[str, str], Any] = {}

    def __call__(self, cost: float, provider: str, model: str, tokens_in: int, tokens_out: int) -> float:
        if cost or not (tokens_in or tokens_out) or not self.pricing:
            return cost
        key = (provider, model)
        price = self._prices.get(key, _NO_PRICE)
        if price is _NO_PRICE:
            if len(self._prices) >= 10_000:  # bounded, whatever names come by
                self._prices.clear()
            price = self._prices[key] = price_for(self.pricing, provider, model)
        return cost if price is None else cost_of(tokens_in, tokens_out, price)


def _undated(model: str) -> str | None:
    """``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``claude-x-20250929`` -> ``claude-x``; else None."""
    head, _, tail = model.rpartition("-")
    if head and len(tail) == 8 and tail.isdigit():
        return head
    parts = model.rsplit("-", 3)
    if len(parts) == 4 and len(parts[1]) == 4 and all(p.isdigit() for p in parts[1:]):
        return parts[0]
    return None


def _text_chars(content: Any) -> int:
    """Characters of text in an OpenAI/Anthropic content value (str or parts)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, str):
                n += len(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    n += len(text)
        return n
    return 0


def estimate_input_tokens(request_body: Mapping[str, Any]) -> int:
    """Guess input tokens as text characters / 4 (at least 1).

    Counts chat ``messages`` (string or text parts), Anthropic's ``system``,
    completions' ``prompt`` and embeddings' ``input`` (strings or lists).
    """
    chars = 0
    messages = request_body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                chars += _text_chars(message.get("content"))
    for field in ("system", "prompt", "input"):
        value = request_body.get(field)
        if value is not None:
            chars += _text_chars(value)
    return max(1, chars // 4)


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
