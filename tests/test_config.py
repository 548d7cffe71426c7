"""Configuration: the embedded default, environment overrides, one-line errors, dict forms."""

import textwrap

import attrs
import pytest

from runestone.telemetry.costs import price_for
from runestone.config import (
    PROVIDER_TYPES,
    ANTHROPIC_DEFAULT_MODELS,
    DEFAULT_CONFIG_PATH,
    OPENAI_DEFAULT_MODELS,
    Config,
    ConfigError,
    FailoverConfig,
    FailoverGroupSpec,
    ModelPrice,
    ProviderConfig,
    ProviderSpec,
    check_config,
    config_to_dict,
    group_spec_from_dict,
    group_spec_to_dict,
    load_config,
    load_pricing,
    provider_spec_from_dict,
    provider_spec_to_dict,
)

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "runestone.toml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def error_of(path=None, env=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    return message


# --------------------------------------------------------------------------
# The embedded default


def test_default_file_loads_with_the_fake_provider():
    config = load_config(env={})
    assert [(p.name, p.type) for p in config.providers] == [("fake", "fake")]
    assert config.providers[0].config.models == ("fake-model", "fake-embedding")
    assert config.server.port == 4003
    assert config.pricing["fake-model"] == ModelPrice(0.0, 0.0)
    assert config.pricing["gpt-4o"].output_per_mtok > config.pricing["gpt-4o"].input_per_mtok > 0


def test_default_file_agrees_with_the_class_defaults():
    config = load_config(env={})
    assert attrs.evolve(config, providers=(), pricing={}) == Config()
    assert config.providers[0].config == ProviderConfig(models=("fake-model", "fake-embedding"))


def test_empty_file_is_all_defaults_and_no_providers(write):
    config = load_config(write(""), env={})
    assert attrs.evolve(config, pricing={}) == Config()


def test_path_comes_from_runestone_config_then_os_environ(write, monkeypatch):
    path = write("[server]\nport = 9001\n")
    assert load_config(env={"RUNESTONE_CONFIG": path}).server.port == 9001
    monkeypatch.setenv("RUNESTONE_CONFIG", path)
    monkeypatch.setenv("PORT", "9002")
    assert load_config().server.port == 9002
    # An explicit path wins over $RUNESTONE_CONFIG.
    assert load_config(DEFAULT_CONFIG_PATH, env={"RUNESTONE_CONFIG": path}).server.port == 4003


def test_durations_are_exposed_in_seconds():
    config = load_config(env={})
    assert config.server.request_timeout_s == 120.0
    assert config.circuit_breaker.recovery_timeout_s == 30.0
    assert config.retry.base_delay_s == 0.1
    assert config.providers[0].config.timeout_s == 60.0
    assert config.limits.queue_timeout_s == 10.0


# --------------------------------------------------------------------------
# The environment


@pytest.mark.parametrize(
    ("var", "text", "get", "expected"),
    [
        ("PORT", "8080", lambda c: c.server.port, 8080),
        ("RUNESTONE_API_KEYS", " k1, k2,,", lambda c: c.auth.api_keys, ("k1", "k2")),
        ("RUNESTONE_ADMIN_KEY", "adm", lambda c: c.auth.admin_key, "adm"),
        ("RUNESTONE_DATA_DIR", "/var/lib/rs", lambda c: c.data.dir, "/var/lib/rs"),
        ("RUNESTONE_ROUTER_POLICY", "cost", lambda c: c.router.policy, "cost"),
        ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "9", lambda c: c.circuit_breaker.failure_threshold, 9),
        ("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", "1500", lambda c: c.circuit_breaker.recovery_timeout_ms, 1500),
        ("RETRY_MAX_ATTEMPTS", "7", lambda c: c.retry.max_attempts, 7),
        ("RETRY_BASE_DELAY_MS", "250", lambda c: c.retry.base_delay_ms, 250),
        ("RETRY_BACKOFF_FACTOR", "1.5", lambda c: c.retry.backoff_factor, 1.5),
        ("RETRY_JITTER", "false", lambda c: c.retry.jitter, False),
        ("RETRY_JITTER", "0", lambda c: c.retry.jitter, False),
        ("FAILOVER_STRATEGY", "round_robin", lambda c: c.failover.strategy, "round_robin"),
        ("FAILOVER_MAX_ATTEMPTS", "5", lambda c: c.failover.max_attempts, 5),
        ("FAILOVER_HEALTH_THRESHOLD", "0.25", lambda c: c.failover.health_threshold, 0.25),
        ("MAX_CONCURRENT_PER_TENANT", "4", lambda c: c.limits.max_concurrent_per_tenant, 4),
        ("RUNESTONE_METRICS_KEY", "scrape", lambda c: c.metrics.key, "scrape"),
    ],
)
def test_each_environment_variable_overrides_the_file(var, text, get, expected):
    assert get(load_config(env={})) != expected
    assert get(load_config(env={var: text})) == expected


def test_the_data_directory_is_one_documented_place_whatever_the_current_directory(write, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    home = {"HOME": "/home/ann", "XDG_DATA_HOME": ""}
    assert load_config(env=home).data.dir == "/home/ann/.local/share/runestone"
    assert load_config(env={**home, "XDG_DATA_HOME": "/xdg"}).data.dir == "/xdg/runestone"
    assert load_config(env={**home, "XDG_DATA_HOME": "relative"}).data.dir == "/home/ann/.local/share/runestone"
    # A relative path in a file is relative to the file; in $RUNESTONE_DATA_DIR, to the current directory.
    path = write('[data]\ndir = "state"\n')
    assert load_config(path, env=home).data.dir == str(tmp_path / "state")
    assert load_config(path, env={**home, "RUNESTONE_DATA_DIR": "mine"}).data.dir == str(elsewhere / "mine")
    assert load_config(write('[data]\ndir = "~/rs"\n', "home.toml"), env=home).data.dir.endswith("/rs")
    assert not load_config(write('[data]\ndir = "~/rs"\n', "home.toml"), env=home).data.dir.startswith("~")


def test_environment_overrides_a_value_set_in_the_file(write):
    path = write("[retry]\njitter = false\nmax_attempts = 2\n")
    config = load_config(path, env={"RETRY_JITTER": "1"})
    assert config.retry.jitter is True
    assert config.retry.max_attempts == 2


def test_empty_environment_variable_counts_as_unset():
    config = load_config(env={"PORT": "", "OPENAI_API_KEY": ""})
    assert config.server.port == 4003
    assert config.provider("openai-default") is None


def test_openai_api_key_registers_openai_default():
    config = load_config(env={"OPENAI_API_KEY": SECRET})
    spec = config.provider("openai-default")
    assert spec is not None and spec.type == "openai"
    assert spec.config.api_key == SECRET
    assert spec.config.models == OPENAI_DEFAULT_MODELS
    assert spec.base_url == "https://api.openai.com/v1"
    assert config.provider("fake") is not None


def test_anthropic_api_key_registers_anthropic_default_with_its_settings():
    env = {
        "ANTHROPIC_API_KEY": SECRET,
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9999",
        "ANTHROPIC_TIMEOUT": "2500",
        "ANTHROPIC_CIRCUIT_BREAKER": "false",
    }
    spec = load_config(env=env).provider("anthropic-default")
    assert spec.type == "anthropic"
    assert spec.config.models == ANTHROPIC_DEFAULT_MODELS
    assert spec.base_url == "http://127.0.0.1:9999"
    assert (spec.config.timeout_ms, spec.config.circuit_breaker) == (2500, False)


def test_openai_settings_apply_to_the_default_provider_only():
    env = {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_TIMEOUT": "5"}
    config = load_config(env=env)
    assert config.provider("openai-default").config.timeout_ms == 5
    assert config.provider("fake").config.timeout_ms == 60_000
    # Without a key nothing is registered, and the other variables have no target.
    config = load_config(env={"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"})
    assert [p.name for p in config.providers] == ["fake"]


def test_key_updates_an_openai_default_declared_in_the_file(write):
    path = write(
        """
        [[providers]]
        name = "openai-default"
        type = "openai"
        [providers.config]
        models = ["gpt-4o"]
        priority = 5
        """
    )
    config = load_config(path, env={"OPENAI_API_KEY": SECRET, "OPENAI_TIMEOUT": "4"})
    assert len(config.providers) == 1
    spec = config.providers[0]
    assert (spec.config.api_key, spec.config.models, spec.config.priority) == (SECRET, ("gpt-4o",), 5)
    assert spec.config.timeout_ms == 4


# --------------------------------------------------------------------------
# Bad values: one line naming key, value, source and what is allowed


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "-1"},
            "config error: circuit_breaker.failure_threshold = -1 "
            "(from CIRCUIT_BREAKER_FAILURE_THRESHOLD): must be an integer >= 1",
        ),
        (
            {"PORT": "70000"},
            "config error: server.port = 70000 (from PORT): must be an integer in 0..65535",
        ),
        (
            {"PORT": "http"},
            'config error: server.port = "http" (from PORT): must be an integer in 0..65535',
        ),
        (
            {"RETRY_JITTER": "maybe"},
            'config error: retry.jitter = "maybe" (from RETRY_JITTER): must be true or false',
        ),
        (
            {"FAILOVER_HEALTH_THRESHOLD": "1.5"},
            "config error: failover.health_threshold = 1.5 (from FAILOVER_HEALTH_THRESHOLD): "
            "must be a number in 0..1",
        ),
        (
            {"FAILOVER_STRATEGY": "random"},
            'config error: failover.strategy = "random" (from FAILOVER_STRATEGY): must be one of '
            "round_robin, priority, load_balanced, least_loaded, fastest_first, cost",
        ),
        (
            {"RUNESTONE_ROUTER_POLICY": "fastest"},
            'config error: router.policy = "fastest" (from RUNESTONE_ROUTER_POLICY): '
            "must be one of default, health, enhanced, cost",
        ),
        (
            {"RETRY_BACKOFF_FACTOR": "0.5"},
            "config error: retry.backoff_factor = 0.5 (from RETRY_BACKOFF_FACTOR): must be a number >= 1",
        ),
        (
            {"MAX_CONCURRENT_PER_TENANT": "-2"},
            "config error: limits.max_concurrent_per_tenant = -2 (from MAX_CONCURRENT_PER_TENANT): "
            "must be an integer >= 0",
        ),
        (
            {"OPENAI_API_KEY": SECRET, "OPENAI_TIMEOUT": "soon"},
            'config error: providers[1].config.timeout_ms = "soon" (from OPENAI_TIMEOUT): '
            "must be an integer in 1..3600000",
        ),
    ],
)
def test_bad_environment_value_is_one_line(env, line):
    assert error_of(env=env) == line


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("[server]\nport = -1\n", "server.port = -1: must be an integer in 0..65535"),
        ('[server]\nport = "80"\n', 'server.port = "80": must be an integer in 0..65535'),
        ("[server]\nport = 80.0\n", "server.port = 80.0: must be an integer in 0..65535"),
        ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes = 0: must be an integer >= 1"),
        ('[server]\nhost = ""\n', 'server.host = "": must be a non-empty string'),
        ('[cache]\nenabled = "yes"\n', 'cache.enabled = "yes": must be true or false'),
        ("[cache]\nenabled = 1\n", "cache.enabled = 1: must be true or false"),
        ("[circuit_breaker]\nfailure_rate_threshold = 0\n",
         "circuit_breaker.failure_rate_threshold = 0.0: must be a number > 0 and <= 1"),
        ("[circuit_breaker]\nminimum_requests = 30\n",
         "circuit_breaker.minimum_requests = 30: must be an integer <= circuit_breaker.window_size (20)"),
        ("[retry]\nbase_delay_ms = 900\nmax_delay_ms = 100\n",
         "retry.max_delay_ms = 100: must be an integer >= retry.base_delay_ms (900)"),
        ("[telemetry]\nmailbox_size = 0\n", "telemetry.mailbox_size = 0: must be an integer >= 1"),
        ('[data]\ndir = ["a"]\n', 'data.dir = ["a"]: must be a non-empty string'),
        ("server = 5\n", "server = 5: must be a table"),
        ('[router]\npolicy = "cheap"\n', 'router.policy = "cheap": must be one of default, health, enhanced, cost'),
        ('[pricing."gpt-4.1"]\ninput_per_mtok = -1.0\n',
         'pricing."gpt-4.1".input_per_mtok = -1.0: must be a number >= 0'),
        ('[pricing.x]\noutput_per_mtok = 1.0\n',
         "pricing.x.input_per_mtok is required: must be a number >= 0"),
        ("[metrics]\nrequire_key = true\n",
         "metrics.require_key = true: must be false unless metrics.key or auth.admin_key is set"),
    ],
)
def test_bad_file_value_is_one_line(write, toml, line):
    assert error_of(write(toml)) == "config error: " + line


PROVIDER = """
[[providers]]
name = "{name}"
type = "{type}"
[providers.config]
{config}
"""


def provider(name="p", type="fake", config=""):
    return PROVIDER.format(name=name, type=type, config=config)


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (provider(type="cohere"), 'providers[0].type = "cohere": must be one of ' + ", ".join(PROVIDER_TYPES)),
        (provider(name="a b"), "providers[0].name = \"a b\": must be a name of 1 to 64 letters, digits, '-', '_' or '.'"),
        (provider() + provider(), 'providers[1].name = "p": must be unique (already the name of providers[0])'),
        (provider(config="timeout_ms = 0"), "providers[0].config.timeout_ms = 0: must be an integer in 1..3600000"),
        (provider(config="weight = 0.0"), "providers[0].config.weight = 0.0: must be a number > 0 and <= 1000000"),
        (provider(config='base_url = "ftp://x"'), 'providers[0].config.base_url = "ftp://x": must be an http:// or https:// URL of printable '
                                                  'ASCII with a host, no user info, no query or fragment'),
        (provider(config='models = "gpt-4o"'), 'providers[0].config.models = "gpt-4o": must be an array of distinct non-empty strings'),
        (provider(config='models = ["a", "a"]'), 'providers[0].config.models = ["a", "a"]: must be an array of distinct non-empty strings'),
        (provider(config="models = [1]"), "providers[0].config.models[0] = 1: must be a string"),
        (provider(config='transport = "curl"'), 'providers[0].config.transport = "curl": must be one of fast, httpx'),
        (provider(config="http2 = true"), 'providers[0].config.transport = "fast": must be "httpx" when proxy or http2 is set'),
        (provider(config="retry_attempts = 2"), "unknown key providers[0].config.retry_attempts"),
        (provider(config='cost_tier = "low"'), "unknown key providers[0].config.cost_tier"),
        (provider(config="fail_rate = 2.0"), "providers[0].config.fail_rate = 2.0: must be a number in 0..1"),
        ('[[providers]]\ntype = "fake"\n', "providers[0].name is required: must be a name of 1 to 64 letters, digits, '-', '_' or '.'"),
        ("providers = 3\n", "providers = 3: must be an array of tables"),
    ],
)
def test_bad_provider_is_one_line(write, toml, line):
    assert error_of(write(toml)) == "config error: " + line


GROUPS = provider("a") + provider("b") + "\n[failover]\n"


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ('[[failover.groups]]\nname = "g"\nproviders = ["a", "zz"]\n',
         'failover.groups[0].providers[1] = "zz": must be the name of a configured provider (a, b)'),
        ('[[failover.groups]]\nname = "g"\nproviders = []\n',
         "failover.groups[0].providers = []: must be a non-empty array of distinct provider names"),
        ('[[failover.groups]]\nname = "g"\nproviders = ["a"]\n[[failover.groups]]\nname = "g"\nproviders = ["b"]\n',
         'failover.groups[1].name = "g": must be unique (already the name of failover.groups[0])'),
        ('[[failover.groups]]\nname = "g"\nproviders = ["a"]\nstrategy = "fast"\n',
         'failover.groups[0].strategy = "fast": must be one of round_robin, priority, '
         "load_balanced, least_loaded, fastest_first, cost"),
        ('[[failover.groups]]\nname = "g"\nproviders = ["a"]\nhealth_threshold = -0.1\n',
         "failover.groups[0].health_threshold = -0.1: must be a number in 0..1"),
    ],
)
def test_bad_failover_group_is_one_line(write, toml, line):
    assert error_of(write(GROUPS + toml)) == "config error: " + line


def test_groups_inherit_failover_settings_from_file_and_environment(write):
    path = write(
        GROUPS
        + 'max_attempts = 6\n[[failover.groups]]\nname = "g"\nproviders = ["b", "a"]\n'
        + '[[failover.groups]]\nname = "h"\nproviders = ["a"]\nstrategy = "cost"\nmax_attempts = 1\n'
    )
    g, h = load_config(path, env={"FAILOVER_STRATEGY": "least_loaded"}).failover.groups
    assert g == FailoverGroupSpec("g", ("b", "a"), "least_loaded", 6, 0.5)
    assert h == FailoverGroupSpec("h", ("a",), "cost", 1, 0.5)
    # An inherited bad value names where it came from.
    message = error_of(path, {"FAILOVER_MAX_ATTEMPTS": "0"})
    assert message == (
        "config error: failover.max_attempts = 0 (from FAILOVER_MAX_ATTEMPTS): must be an integer in 1..100"
    )


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("[server]\nprot = 1\n", "unknown key server.prot (did you mean port?)"),
        ("[sever]\nport = 1\n", "unknown key sever (did you mean server?)"),
        (provider(config='modles = ["m"]'), "unknown key providers[0].config.modles (did you mean models?)"),
        (provider() + 'colour = "red"\n', "unknown key providers[0].config.colour"),
        ('[[failover.groups]]\nname = "g"\nproviders = []\nweights = [1]\n',
         "unknown key failover.groups[0].weights"),
        ('[pricing.m]\ninput_per_mtok = 1.0\ncached_per_mtok = 0.5\n', "unknown key pricing.m.cached_per_mtok (did you mean input_per_mtok?)"),
    ],
)
def test_unknown_key_is_named(write, toml, line):
    assert error_of(write(toml)) == "config error: " + line


def test_check_config_lists_every_problem(write):
    path = write('[server]\nport = -1\nprot = 2\n[retry]\njitter = "no"\nmax_attempts = 0\n')
    problems = check_config(path, env={"RUNESTONE_ROUTER_POLICY": "x"})
    assert sorted(problems) == sorted(
        [
            "config error: server.port = -1: must be an integer in 0..65535",
            "config error: unknown key server.prot (did you mean port?)",
            'config error: retry.jitter = "no": must be true or false',
            "config error: retry.max_attempts = 0: must be an integer in 1..100",
            'config error: router.policy = "x" (from RUNESTONE_ROUTER_POLICY): must be one of '
            "default, health, enhanced, cost",
        ]
    )
    assert check_config(DEFAULT_CONFIG_PATH, env={}) == []


def test_unreadable_or_malformed_file_is_one_line(write, tmp_path):
    message = error_of(str(tmp_path / "nope.toml"))
    assert "nope.toml" in message and "No such file" in message
    message = error_of(write("[server\nport = 1\n"))
    assert "invalid TOML" in message and "line 1" in message


# --------------------------------------------------------------------------
# Secrets never show


@pytest.mark.parametrize(
    ("toml", "env", "line"),
    [
        (f'[auth]\nadmin_key = ["{SECRET}"]\n', {}, "auth.admin_key = ***: must be a string"),
        (f'[auth]\napi_keys = ["{SECRET}", ""]\n', {}, "auth.api_keys = ***: must be an array of non-empty strings"),
        (f'[auth]\napi_keys = "{SECRET}"\n', {}, "auth.api_keys = ***: must be an array of non-empty strings"),
        (provider(config=f"api_key = [\"{SECRET}\"]"), {}, "providers[0].config.api_key = ***: must be a string"),
        (provider(config=f'api_kye = "{SECRET}"'), {}, "unknown key providers[0].config.api_kye (did you mean api_key?)"),
        ("", {"OPENAI_API_KEY": SECRET, "OPENAI_CIRCUIT_BREAKER": "sometimes"},
         'providers[0].config.circuit_breaker = "sometimes" (from OPENAI_CIRCUIT_BREAKER): must be true or false'),
    ],
)
def test_errors_never_print_secrets(write, toml, env, line):
    message = error_of(write(toml), env)
    assert message == "config error: " + line
    assert SECRET not in message


def test_repr_hides_secrets():
    config = load_config(
        env={"OPENAI_API_KEY": SECRET, "RUNESTONE_API_KEYS": SECRET, "RUNESTONE_ADMIN_KEY": SECRET}
    )
    text = repr(config)
    assert SECRET not in text
    assert "api_key='***'" in text and "admin_key='***'" in text
    proxied = ProviderConfig(proxy=f"http://user:{SECRET}@127.0.0.1:3128", transport="httpx")
    assert SECRET not in repr(proxied) and "127.0.0.1:3128" in repr(proxied)


def test_config_to_dict_redacts_by_default():
    config = load_config(env={"ANTHROPIC_API_KEY": SECRET, "RUNESTONE_API_KEYS": "a,b"})
    dumped = config_to_dict(config)
    assert SECRET not in repr(dumped)
    assert dumped["auth"]["api_keys"] == ["***", "***"]
    assert dumped["providers"][1]["config"]["api_key"] == "***"
    assert dumped["pricing"]["fake-model"] == {"input_per_mtok": 0.0, "output_per_mtok": 0.0}
    assert config_to_dict(config, redact=False)["providers"][1]["config"]["api_key"] == SECRET


# --------------------------------------------------------------------------
# Dict forms for the control plane

FULL_PROVIDER = {
    "name": "vllm-1",
    "type": "openai",
    "config": {
        "base_url": "http://127.0.0.1:8000/v1",
        "api_key": SECRET,
        "models": ["llama-3-8b"],
        "timeout_ms": 5000,
        "max_concurrency": 16,
        "priority": 10,
        "weight": 2.5,
        "transport": "httpx",
        "proxy": "http://127.0.0.1:3128",
        "http2": True,
        "circuit_breaker": False,
        "pool_size": 8,
    },
}


def test_provider_dict_round_trip():
    spec = provider_spec_from_dict(FULL_PROVIDER)
    assert spec.config.models == ("llama-3-8b",)
    assert spec.config.weight == 2.5 and spec.config.http2 is True
    plain = provider_spec_to_dict(spec, redact=False)
    assert provider_spec_from_dict(plain) == spec
    assert {k: plain["config"][k] for k in FULL_PROVIDER["config"]} == FULL_PROVIDER["config"]
    minimal = provider_spec_from_dict({"name": "f", "type": "fake"})
    assert minimal == ProviderSpec("f", "fake", ProviderConfig())
    assert provider_spec_from_dict(provider_spec_to_dict(minimal)) == minimal


def test_provider_to_dict_redacts():
    spec = provider_spec_from_dict(
        {**FULL_PROVIDER, "config": {**FULL_PROVIDER["config"], "proxy": f"http://u:{SECRET}@px:1/"}}
    )
    redacted = provider_spec_to_dict(spec)
    assert redacted["config"]["api_key"] == "***"
    assert redacted["config"]["proxy"] == "http://***@px:1/"
    assert SECRET not in repr(redacted)
    assert "proxy" not in provider_spec_to_dict(provider_spec_from_dict({"name": "f", "type": "fake"}))["config"]


@pytest.mark.parametrize(
    ("d", "problem"),
    [
        ({"name": "x", "type": "fake", "config": {"chunks": -1}}, "config.chunks = -1: must be an integer in 0..1000000"),
        ({"name": "x", "type": "grok"}, 'type = "grok": must be one of ' + ", ".join(PROVIDER_TYPES)),
        ({"type": "fake"}, "name is required: must be a name of 1 to 64 letters, digits, '-', '_' or '.'"),
        ({"name": "x", "type": "fake", "extra": 1}, "unknown key extra"),
        ({"name": "x", "type": "openai", "config": {"api_key": 5}}, "config.api_key = ***: must be a string"),
        ({"name": "x", "type": "openai", "config": {"proxy": "http://p:1"}},
         'config.transport = "fast": must be "httpx" when proxy or http2 is set'),
        ({"name": "x", "type": "fake", "config": None}, "config = null: must be a table"),
    ],
)
def test_provider_from_dict_names_the_bad_field(d, problem):
    with pytest.raises(ConfigError) as info:
        provider_spec_from_dict(d)
    assert info.value.problems == (problem,)
    assert str(info.value) == "config error: " + problem


def test_provider_from_dict_rejects_a_non_object():
    with pytest.raises(ConfigError, match="expected a table"):
        provider_spec_from_dict(["name", "x"])


def test_group_dict_round_trip_and_defaults():
    group = group_spec_from_dict(
        {"name": "g", "providers": ["a", "b"], "strategy": "round_robin", "max_attempts": 2, "health_threshold": 0.9}
    )
    assert group == FailoverGroupSpec("g", ("a", "b"), "round_robin", 2, 0.9)
    assert group_spec_from_dict(group_spec_to_dict(group)) == group
    defaults = FailoverConfig(strategy="cost", max_attempts=4, health_threshold=0.2)
    inherited = group_spec_from_dict({"name": "h", "providers": ["a"]}, defaults)
    assert inherited == FailoverGroupSpec("h", ("a",), "cost", 4, 0.2)
    assert group_spec_from_dict({"name": "h", "providers": ["a"]}).strategy == "priority"


def test_group_from_dict_checks_members_and_values():
    with pytest.raises(ConfigError) as info:
        group_spec_from_dict({"name": "g", "providers": ["a", "x"]}, known_providers=["a", "b"])
    assert info.value.problems == ('providers[1] = "x": must be the name of a configured provider (a, b)',)
    with pytest.raises(ConfigError) as info:
        group_spec_from_dict({"name": "g", "providers": ["a"], "max_attempts": 0})
    assert info.value.problems == ("max_attempts = 0: must be an integer in 1..100",)


# --------------------------------------------------------------------------
# Pricing


def test_pricing_table_overrides_and_lookup(write):
    path = write('[pricing."gpt-4o"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n[pricing.local]\ninput_per_mtok = 0.5\n')
    pricing = load_config(path, env={}).pricing
    assert pricing["gpt-4o"] == ModelPrice(1.0, 2.0)
    assert pricing["local"] == ModelPrice(0.5, 0.0)
    assert pricing["gpt-4.1"] == load_pricing()["gpt-4.1"]
    assert price_for(pricing, "openai", "gpt-4o-2024-08-06") == ModelPrice(1.0, 2.0)
    assert price_for(pricing, "anthropic", "claude-sonnet-4-5-20250929") == pricing["claude-sonnet-4-5"]
    assert price_for(pricing, "openai", "no-such-model") is None
    assert ModelPrice(2.0, 8.0).cost(1_000, 500) == pytest.approx(0.006)


def test_default_pricing_covers_the_default_providers_models():
    pricing = load_pricing()
    for model in (*OPENAI_DEFAULT_MODELS, *ANTHROPIC_DEFAULT_MODELS, "fake-model", "fake-embedding"):
        assert price_for(pricing, "any", model) is not None, model


def test_bad_pricing_file_names_the_file(write):
    path = write('[pricing]\nm = { input_per_mtok = "free" }\n', "pricing.toml")
    with pytest.raises(ConfigError) as info:
        load_pricing(path)
    assert str(info.value) == f'config error: {path}: pricing.m.input_per_mtok = "free": must be a number >= 0'


def test_cluster_and_database_urls_are_checked_and_their_passwords_never_shown(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[cluster]\nredis_url = "redis://:s3cret@127.0.0.1:6390/2"\n'
                    '[database]\nurl = "postgresql://rs:s3cret@127.0.0.1:5433/rs"\n')
    cfg = load_config(good, env={})
    assert cfg.cluster.redis_url == "redis://:s3cret@127.0.0.1:6390/2"
    assert "s3cret" not in repr(cfg) and "s3cret" not in repr(cfg.database)
    env = load_config(None, env={"RUNESTONE_REDIS_URL": "redis://127.0.0.1:7000",
                                 "RUNESTONE_DATABASE_URL": "postgres://127.0.0.1/x"})
    assert (env.cluster.redis_url, env.database.url) == ("redis://127.0.0.1:7000", "postgres://127.0.0.1/x")
    for section, key, value in (("cluster", "redis_url", "http://127.0.0.1:6379"),
                                ("cluster", "redis_url", "redis://127.0.0.1:notaport"),
                                ("database", "url", "mysql://127.0.0.1/x"),
                                ("database", "url", "postgresql://127.0.0.1/x\\r\\n")):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[{section}]\n{key} = "{value}"\n')
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            load_config(bad, env={})
