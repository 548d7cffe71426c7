"""Prices: the one :class:`ModelPrice` (the pricing table's value, checked as the rest of the config is),
the one lookup :func:`price_for` and the arithmetic :func:`cost_of`.

A price is USD per million tokens, input and output apart. A pricing table maps a key to a price; a price
may be a :class:`ModelPrice`, any object with ``input_per_mtok``/``output_per_mtok`` attributes, or a dict
with those keys. A provider's model is looked up first as ``"provider/model"`` (a provider-specific price),
then as ``"model"``, then, for a dated id (``gpt-4o-2024-08-06``, ``claude-sonnet-4-5-20250929``), as its
undated name. Telemetry (``telemetry/costs.py``), routing and governance price with these; the config
loads the table into ``Config.pricing``.
"""

from collections.abc import Mapping
from typing import Any

import attrs

from ._checks import _number_at_least, _setting

__all__ = ["ModelPrice", "cost_of", "price_for"]

_PER_MTOK = 1e-6


@attrs.frozen
class ModelPrice:
    """List price of a model in USD per million tokens."""

    input_per_mtok: float = _setting(check=_number_at_least(0.0))
    output_per_mtok: float = _setting(0.0, _number_at_least(0.0))

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one request's usage."""
        return cost_of(input_tokens, output_tokens, self)


def _parts(price: Any) -> tuple[float, float]:
    if price.__class__ is ModelPrice:  # the table's own (an isinstance against an ABC costs more than the rest)
        return float(price.input_per_mtok), float(price.output_per_mtok)
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


def _undated(model: str) -> str | None:
    """``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``claude-x-20250929`` -> ``claude-x``; else None."""
    head, _, tail = model.rpartition("-")
    if head and len(tail) == 8 and tail.isdigit():
        return head
    parts = model.rsplit("-", 3)
    if len(parts) == 4 and len(parts[1]) == 4 and all(p.isdigit() for p in parts[1:]):
        return parts[0]
    return None
