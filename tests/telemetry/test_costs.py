"""Prices, costs of usage, and the cost policy's estimates before a request runs."""

import math

import pytest

from runestone.telemetry.costs import (
    DEFAULT_OUTPUT_TOKENS,
    ModelPrice,
    cost_of,
    estimate_costs,
    price_for,
)


class ConfigPrice:
    """Stands for the config's own price class: only the attributes matter."""

    def __init__(self, i, o):
        self.input_per_mtok = i
        self.output_per_mtok = o


@pytest.mark.parametrize(
    "price", [ModelPrice(3.0, 15.0), ConfigPrice(3.0, 15.0), {"input_per_mtok": 3, "output_per_mtok": 15}]
)
def test_cost_of_accepts_any_price_shape(price):
    assert cost_of(1_000_000, 0, price) == pytest.approx(3.0)
    assert cost_of(2000, 1000, price) == pytest.approx((2000 * 3 + 1000 * 15) / 1e6)


def test_cost_of_unpriced_is_zero():
    assert cost_of(100, 100, None) == 0.0


def test_price_for_prefers_provider_specific():
    pricing = {"gpt-4o": ModelPrice(5, 15), "groq/gpt-4o": ModelPrice(1, 2)}
    assert price_for(pricing, "groq", "gpt-4o") == ModelPrice(1, 2)
    assert price_for(pricing, "openai", "gpt-4o") == ModelPrice(5, 15)
    assert price_for(pricing, "openai", "unknown") is None
    assert price_for(None, "openai", "gpt-4o") is None


def test_price_for_dated_model_ids():
    pricing = {"gpt-4o": ModelPrice(5, 15), "claude-sonnet-4-5": ModelPrice(3, 15)}
    assert price_for(pricing, "openai", "gpt-4o-2024-08-06") == ModelPrice(5, 15)
    assert price_for(pricing, "anthropic", "claude-sonnet-4-5-20250929") == ModelPrice(3, 15)
    assert price_for(pricing, "openai", "gpt-4o-latest") is None
    assert price_for(pricing, "openai", "20250929") is None


def test_estimate_costs_per_candidate():
    pricing = {"cheap-model": ModelPrice(1, 2), "pricey": ModelPrice(10, 30)}
    body = {"messages": [{"role": "user", "content": "q" * 4000}], "max_tokens": 100}
    got = estimate_costs(body, {"a": "cheap-model", "b": "pricey", "c": "nobody-knows"}, pricing)
    tokens_in = 3 + 4 + 1000  # the reply priming, the message's framing, 4000 characters / 4
    assert got["a"] == pytest.approx((tokens_in * 1 + 100 * 2) / 1e6)
    assert got["b"] == pytest.approx((tokens_in * 10 + 100 * 30) / 1e6)
    assert got["c"] == math.inf
    assert sorted(got, key=got.get) == ["a", "b", "c"]


def test_estimate_costs_default_output_tokens():
    pricing = {"m": ModelPrice(0, 1_000_000)}  # $1 per output token: the cost is the token count
    assert estimate_costs({"prompt": ""}, {"p": "m"}, pricing)["p"] == pytest.approx(DEFAULT_OUTPUT_TOKENS)
    assert estimate_costs({"max_completion_tokens": 7}, {"p": "m"}, pricing)["p"] == pytest.approx(7)
