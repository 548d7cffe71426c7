"""One price type and one lookup: the config loads its pricing table as the ModelPrice that telemetry,
routing and governance price with, and they all look prices up with the same price_for."""

import pytest

import runestone.config as config
import runestone.telemetry as telemetry
from runestone.config import load_config
from runestone.telemetry import costs


def test_one_model_price_class_and_one_lookup():
    assert costs.ModelPrice is config.ModelPrice is telemetry.ModelPrice
    assert costs.price_for is config.price_for is telemetry.price_for
    assert costs.cost_of is config.cost_of is telemetry.cost_of


def test_the_loaded_table_is_priced_by_telemetry(tmp_path):
    path = tmp_path / "runestone.toml"
    path.write_text('[pricing."up/m"]\ninput_per_mtok = 2.0\noutput_per_mtok = 10.0\n')
    pricing = load_config(path, env={}).pricing
    price = costs.price_for(pricing, "up", "m")
    assert isinstance(price, costs.ModelPrice)
    assert price.cost(1000, 100) == costs.cost_of(1000, 100, price) == pytest.approx(0.003)
    assert costs.Pricer(pricing)(0.0, "up", "m", 1000, 100) == pytest.approx(0.003)
