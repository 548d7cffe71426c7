"""Router policies and failover strategies each have one registry (``runestone/config/orderings.py``):
adding an entry there is all it takes for the config, the request's ``runestone.policy``, the router and
the failover groups to take the new name, and an unknown name is refused with the list of valid ones."""

from pathlib import Path

import httpx
import pytest
import trio.testing

from runestone.config import (
    FAILOVER_STRATEGY_REGISTRY,
    ROUTER_POLICY_REGISTRY,
    ConfigError,
    NamedOrdering,
    load_config,
)
from runestone.resilience.failover import STRATEGIES, GroupSpec, ProviderInfo, RouteState, order_candidates
from runestone.resilience.ordering import ordering_of
from runestone.routing.policies import POLICIES, parse_requirements, route

from gatewaytest import provider_toml

ROOT = Path(__file__).resolve().parent.parent.parent

TWO = provider_toml("zeta", "fake", models=["m"], priority=1) + provider_toml("alpha", "fake", models=["m"], priority=2)


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
def by_name(monkeypatch):
    """A throwaway policy and strategy, registered for one test: one registry entry each."""
    entry = NamedOrdering("by_name", "sorted_by(name)", "by name")
    monkeypatch.setitem(ROUTER_POLICY_REGISTRY, "by_name", entry)
    monkeypatch.setitem(FAILOVER_STRATEGY_REGISTRY, "by_name", entry)
    return entry


def _load(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "r.toml"
    path.write_text(f'[data]\ndir = "{tmp_path}"\n' + text)
    return load_config(path, env=env or {})


def test_the_tables_the_code_uses_are_views_of_the_registries():
    assert list(POLICIES) == list(ROUTER_POLICY_REGISTRY)
    assert list(STRATEGIES) == list(FAILOVER_STRATEGY_REGISTRY)
    for registry, table in ((ROUTER_POLICY_REGISTRY, POLICIES), (FAILOVER_STRATEGY_REGISTRY, STRATEGIES)):
        for name, entry in registry.items():
            assert entry.name == name and entry.about
            assert repr(table[name]) == entry.ordering  # the notation is the ordering's repr


def test_the_ordering_notation_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown sort key.*speed"):
        ordering_of("sorted_by(speed)")
    with pytest.raises(ValueError, match="not an ordering"):
        ordering_of("shuffled(name)")
    with pytest.raises(ValueError, match="takes no sort key"):
        ordering_of("weighted_shuffle(name)")


def test_the_default_config_lists_the_registered_names():
    text = (ROOT / "config" / "runestone.toml").read_text()
    assert "# " + " | ".join(ROUTER_POLICY_REGISTRY) + " " in text
    assert ": " + " | ".join(FAILOVER_STRATEGY_REGISTRY) + "\n" in text


def test_an_unknown_name_is_refused_with_the_registered_ones(tmp_path, by_name):
    policies = ", ".join(ROUTER_POLICY_REGISTRY)
    strategies = ", ".join(FAILOVER_STRATEGY_REGISTRY)
    assert policies.endswith(", by_name") and strategies.endswith(", by_name")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, '[router]\npolicy = "fastest"\n')
    assert f"router.policy = \"fastest\"" in str(err.value) and f"must be one of {policies}" in str(err.value)
    with pytest.raises(ConfigError, match=f"failover.strategy = \"ring\".*must be one of {strategies}"):
        _load(tmp_path, '[failover]\nstrategy = "ring"\n')
    with pytest.raises(ConfigError, match=f"must be one of {policies}"):
        _load(tmp_path, "", env={"RUNESTONE_ROUTER_POLICY": "fastest"})
    group = '[[failover.groups]]\nname = "g"\nproviders = ["zeta"]\nstrategy = "ring"\n'
    with pytest.raises(ConfigError, match=f"must be one of {strategies}"):
        _load(tmp_path, TWO + group)
    with pytest.raises(ValueError, match="runestone.policy must be one of .*by_name"):
        parse_requirements({"policy": "fastest"})
    with pytest.raises(ValueError, match="unknown failover strategy 'ring'"):
        GroupSpec("g", ("zeta",), strategy="ring")


def test_one_registry_entry_is_all_a_new_policy_and_strategy_take(tmp_path, by_name):
    config = _load(tmp_path, TWO + '[router]\npolicy = "by_name"\n[failover]\nstrategy = "by_name"\n')
    assert config.router.policy == "by_name" and config.failover.strategy == "by_name"
    assert parse_requirements({"policy": "by_name"}).policy == "by_name"
    providers = [ProviderInfo("zeta", priority=1, models=frozenset({"m"})),
                 ProviderInfo("alpha", priority=2, models=frozenset({"m"}))]
    assert route("m", providers, RouteState(), now=0.0).providers == ("zeta", "alpha")
    assert route("m", providers, RouteState(), policy="by_name", now=0.0).providers == ("alpha", "zeta")
    assert order_candidates("by_name", providers, RouteState()) == ["alpha", "zeta"]
    assert GroupSpec("g", ("zeta", "alpha"), strategy="by_name").strategy == "by_name"


async def test_a_gateway_routes_by_a_newly_registered_policy_and_strategy(clock, gateway_factory, by_name):
    group = '[[failover.groups]]\nname = "chat"\nproviders = ["zeta", "alpha"]\nstrategy = "by_name"\n'
    gw = await gateway_factory("[telemetry]\nusage_ledger = false\n" + TWO + group)
    ask = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
        plain = await http.post("/chat/completions", json={"model": "m", "messages": ask})
        chosen = await http.post("/chat/completions", json={"model": "m", "messages": ask,
                                                            "runestone": {"policy": "by_name"}})
        grouped = await http.post("/chat/completions", json={"model": "chat", "messages": ask})
        unknown = await http.post("/chat/completions", json={"model": "m", "messages": ask,
                                                            "runestone": {"policy": "fastest"}})
    assert plain.status_code == chosen.status_code == grouped.status_code == 200, (plain.text, grouped.text)
    assert plain.headers["x-runestone-provider"] == "zeta"  # the default policy: lower priority first
    assert chosen.headers["x-runestone-provider"] == "alpha"
    assert grouped.headers["x-runestone-provider"] == "alpha"
    assert unknown.status_code == 400
    assert "by_name" in unknown.json()["error"]["message"]
