"""The configuration's schema: frozen attrs classes rooted at :class:`Config`, each field with its default
and its check. Defaults here equal the embedded ``config/runestone.toml``."""

import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from ._checks import (
    _Check,
    _distinct_strings,
    _fraction,
    _http_url,
    _int_at_least,
    _int_between,
    _is_host_pattern,
    _mask_all,
    _name,
    _non_empty_str,
    _number_at_least,
    _number_in,
    _one_of,
    _optional_int_between,
    _proxy_url,
    _seconds,
    _server_url,
    _setting,
    _strings,
    _url_repr,
    _weights,
)
from .pricing import ModelPrice
from .orderings import FAILOVER_STRATEGY_REGISTRY, ROUTER_POLICY_REGISTRY
from .provider_types import PROVIDER_TYPE_REGISTRY

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "AZURE_AUTH",
    "BudgetsConfig",
    "CacheConfig",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "Config",
    "data_dir_default",
    "DatabaseConfig",
    "DataConfig",
    "DEFAULT_BASE_URLS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PRICING_PATH",
    "FailoverConfig",
    "FailoverGroupSpec",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "OPENAI_PRESETS",
    "OtelConfig",
    "PoolConfig",
    "PROVIDER_TYPES",
    "ProviderConfig",
    "ProviderSpec",
    "RETIRED_PROVIDER_SETTINGS",
    "ResponsesConfig",
    "RetryConfig",
    "RouterConfig",
    "ServerConfig",
    "SplitConfig",
    "SplitVariantConfig",
    "TelemetryConfig",
    "TRANSPORTS",
]

_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG_PATH = _ROOT / "config" / "runestone.toml"
DEFAULT_PRICING_PATH = _ROOT / "config" / "pricing.toml"

PROVIDER_TYPES = tuple(PROVIDER_TYPE_REGISTRY)
TRANSPORTS = ("fast", "httpx")

DEFAULT_BASE_URLS = {t.name: t.default_base_url for t in PROVIDER_TYPE_REGISTRY.values() if t.default_base_url}
# ``preset`` on an ``openai`` provider: the host's base URL (its quirks: runestone/providers/presets.py).
OPENAI_PRESETS = {
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "vllm": "http://127.0.0.1:8000/v1",
}
AZURE_AUTH = ("api-key", "bearer")


# The schema. Defaults here equal the embedded config/runestone.toml.


@attrs.frozen
class ServerConfig:
    """The front server: where it listens and how long it waits for whom."""

    host: str = _setting("127.0.0.1", _non_empty_str())
    #: 0 binds an ephemeral port (tests).
    port: int = _setting(4003, _int_between(0, 65535))
    max_body_bytes: int = _setting(4 * 1024 * 1024, _int_at_least(1))
    max_header_bytes: int = _setting(64 * 1024, _int_at_least(1024))
    #: One deadline for a whole request, across retries and failover.
    request_timeout_ms: int = _setting(120_000, _int_at_least(1))
    header_timeout_ms: int = _setting(10_000, _int_at_least(1))
    keepalive_timeout_ms: int = _setting(75_000, _int_at_least(1))
    #: Graceful stop: requests in flight may finish within this.
    drain_timeout_ms: int = _setting(10_000, _int_at_least(0))
    max_ws_message_bytes: int = _setting(1024 * 1024, _int_at_least(1))

    request_timeout_s = _seconds("request_timeout_ms")
    header_timeout_s = _seconds("header_timeout_ms")
    keepalive_timeout_s = _seconds("keepalive_timeout_ms")
    drain_timeout_s = _seconds("drain_timeout_ms")


@attrs.frozen
class AuthConfig:
    """Client keys (empty: no authentication) and the admin key (empty: admin API off)."""

    api_keys: tuple[str, ...] = _setting((), _strings(), secret=True, repr_=_mask_all)
    admin_key: str = _setting("", secret=True)


@attrs.frozen
class AdminConfig:
    """What the admin API (and the configuration) may register. ``upstream_hosts`` empty: any host;
    else a provider's base URL must name one of them (``*.example.com`` for names under a domain)."""

    upstream_hosts: tuple[str, ...] = _setting((), _Check(
        lambda v: all(_is_host_pattern(h) for h in v),
        "an array of host names or addresses, optionally starting with '*.'"))


@attrs.frozen
class DataConfig:
    """Where the usage ledger and persisted registrations live.

    ``dir`` is always absolute once loaded (:func:`data_dir_default` and ``load_config``): by default
    ``$XDG_DATA_HOME/runestone`` or ``~/.local/share/runestone``; ``$RUNESTONE_DATA_DIR`` relative to the
    current directory; a path in a config file relative to that file; ``~`` expanded.
    """

    dir: str = _setting(check=_non_empty_str(), factory=lambda: str(data_dir_default(os.environ)))

    @property
    def path(self) -> Path:
        return Path(self.dir)


@attrs.frozen
class RouterConfig:
    policy: str = _setting("default", _one_of(ROUTER_POLICY_REGISTRY))


@attrs.frozen
class CircuitBreakerConfig:
    """Per-provider breaker: opens on ``failure_threshold`` consecutive failures,
    or when the failure rate over the last ``window_size`` outcomes reaches
    ``failure_rate_threshold`` with at least ``minimum_requests`` outcomes."""

    enabled: bool = _setting(True)
    failure_threshold: int = _setting(5, _int_at_least(1))
    recovery_timeout_ms: int = _setting(30_000, _int_at_least(1))
    half_open_limit: int = _setting(1, _int_at_least(1))
    success_threshold: int = _setting(2, _int_at_least(1))
    window_size: int = _setting(20, _int_at_least(1))
    failure_rate_threshold: float = _setting(0.5, _fraction(zero_ok=False))
    minimum_requests: int = _setting(10, _int_at_least(1))

    recovery_timeout_s = _seconds("recovery_timeout_ms")


@attrs.frozen
class RetryConfig:
    """Attempts on one provider: ``max_attempts`` counts the first one; the
    delay before attempt n+1 is ``base_delay * backoff_factor**(n-1)``, capped
    at ``max_delay``, with full jitter when ``jitter``."""

    max_attempts: int = _setting(3, _int_between(1, 100))
    base_delay_ms: int = _setting(100, _int_at_least(0))
    max_delay_ms: int = _setting(5_000, _int_at_least(0))
    backoff_factor: float = _setting(2.0, _number_at_least(1.0))
    jitter: bool = _setting(True)

    base_delay_s = _seconds("base_delay_ms")
    max_delay_s = _seconds("max_delay_ms")


@attrs.frozen
class FailoverGroupSpec:
    """A named, ordered set of providers tried in turn by ``strategy``.

    Same shape as the control plane's group description. In a loaded
    :class:`Config` the fields a group leaves out are those of ``[failover]``.
    """

    name: str = _setting(check=_name())
    providers: tuple[str, ...] = _setting(
        check=_Check(
            lambda v: len(v) > 0 and all(v) and len(set(v)) == len(v),
            "a non-empty array of distinct provider names",
        )
    )
    strategy: str = _setting("priority", _one_of(FAILOVER_STRATEGY_REGISTRY))
    max_attempts: int = _setting(3, _int_between(1, 100))
    health_threshold: float = _setting(0.5, _fraction())


@attrs.frozen
class FailoverConfig:
    strategy: str = _setting("priority", _one_of(FAILOVER_STRATEGY_REGISTRY))
    max_attempts: int = _setting(3, _int_between(1, 100))
    health_threshold: float = _setting(0.5, _fraction())
    groups: tuple[FailoverGroupSpec, ...] = _setting(())



@attrs.frozen
class PoolConfig:
    """``[[pools]]``: a model name standing for providers chosen by weight.

    ``weights`` pairs with ``providers`` (all 1 when left out); ``max_attempts``
    left out means one attempt per member.
    """

    name: str = _setting(check=_name())
    providers: tuple[str, ...] = _setting(
        check=_Check(
            lambda v: len(v) > 0 and all(v) and len(set(v)) == len(v),
            "a non-empty array of distinct provider names",
        )
    )
    weights: tuple[float, ...] = _setting((), _weights())
    max_attempts: int | None = _setting(None, _optional_int_between(1, 100))


@attrs.frozen
class SplitVariantConfig:
    """One arm of a split: its ``model`` may be a model, ``provider:model``, an
    alias, a failover group or a pool; weight 0 takes only forced requests."""

    name: str = _setting(check=_name())
    model: str = _setting(check=_non_empty_str())
    weight: float = _setting(1.0, _number_in(0.0, 1_000_000.0))


@attrs.frozen
class SplitConfig:
    """``[[splits]]``: an A/B split of the requests for ``name`` between variants."""

    name: str = _setting(check=_name())
    variants: tuple[SplitVariantConfig, ...] = _setting(
        check=_Check(lambda v: len(v) > 0, "a non-empty array of variants")
    )


@attrs.frozen
class TelemetryConfig:
    mailbox_size: int = _setting(10_000, _int_at_least(1))
    #: 0 turns active health checks off.
    health_check_interval_ms: int = _setting(0, _int_at_least(0))
    #: Latency samples kept per provider for percentiles.
    latency_window: int = _setting(100, _int_at_least(1))
    usage_ledger: bool = _setting(True)
    ledger_flush_ms: int = _setting(200, _int_at_least(1))
    ledger_batch: int = _setting(500, _int_at_least(1))

    health_check_interval_s = _seconds("health_check_interval_ms")
    ledger_flush_s = _seconds("ledger_flush_ms")


@attrs.frozen
class LimitsConfig:
    """Per-tenant limits; 0 means unlimited. With ``queue`` a request over the
    concurrency limit waits (fairly, at most ``queue_timeout``) instead of
    failing at once."""

    max_concurrent_per_tenant: int = _setting(0, _int_at_least(0))
    requests_per_minute: int = _setting(0, _int_at_least(0))
    requests_per_hour: int = _setting(0, _int_at_least(0))
    tokens_per_minute: int = _setting(0, _int_at_least(0))
    queue: bool = _setting(False)
    queue_size: int = _setting(100, _int_at_least(1))
    queue_timeout_ms: int = _setting(10_000, _int_at_least(1))

    queue_timeout_s = _seconds("queue_timeout_ms")


@attrs.frozen
class BudgetsConfig:
    """Managed keys' budgets: the output cap reserved for a request that sets none, and how often spend
    is written to the key store (in between it is in the budget journal, which a SIGKILL does not lose)."""

    default_output_tokens: int = _setting(4096, _int_at_least(1))
    flush_ms: int = _setting(1000, _int_at_least(1))


@attrs.frozen
class CacheConfig:
    enabled: bool = _setting(False)
    ttl_ms: int = _setting(300_000, _int_at_least(1))
    max_entries: int = _setting(1000, _int_at_least(1))

    ttl_s = _seconds("ttl_ms")


@attrs.frozen
class ResponsesConfig:
    """The Responses API's store (``responses.sqlite3`` in the data directory): what ``store`` keeps.

    A stored response is kept ``retention_days`` (0: forever) and at most ``max_stored`` are kept, the
    oldest going first.
    """

    retention_days: int = _setting(30, _int_at_least(0))
    max_stored: int = _setting(10_000, _int_at_least(1))


@attrs.frozen
class MetricsConfig:
    """Who may read ``GET /metrics``: anyone (the default), or with ``require_key`` only a caller sending the
    admin key or ``key`` as ``Authorization: Bearer``."""

    require_key: bool = _setting(False)
    #: A key that opens ``/metrics`` and nothing else (for a Prometheus scraper); empty: the admin key only.
    key: str = _setting("", secret=True)



@attrs.frozen
class ClusterConfig:
    """Sharing state between instances (``runestone serve --workers N``, or several machines): on when
    ``redis_url`` is set (``RUNESTONE_REDIS_URL``). Without it, every instance keeps its own state."""

    redis_url: str | None = _setting(None, _server_url(("redis", "rediss")), repr_=_url_repr)
    #: How long an admitted request's concurrency hold (and reservation) lives in Redis unless renewed (every
    #: third of it, while the request runs) or settled: a killed instance's holds go after this long.
    hold_ttl_ms: int = _setting(600_000, _int_between(1_000, 86_400_000))


@attrs.frozen
class DatabaseConfig:
    """Where the ledger, keys, teams and the control store live: Postgres when ``url`` is set
    (``RUNESTONE_DATABASE_URL``), else SQLite files in the data directory."""

    url: str | None = _setting(None, _server_url(("postgresql", "postgres")), repr_=_url_repr)


@attrs.frozen
class ProviderConfig:
    """One provider's settings; knobs that do not apply to its type are ignored.

    A ``proxy`` or ``http2`` needs the httpx transport (``http2`` also the ``h2`` package: a provider
    asking for it without h2 fails to start, saying so).
    """

    base_url: str | None = _setting(None, _http_url(), repr_=_url_repr)
    api_key: str | None = _setting(None, secret=True)
    models: tuple[str, ...] = _setting((), _distinct_strings())
    #: Per attempt; the request as a whole is bounded by server.request_timeout_ms.
    timeout_ms: int = _setting(60_000, _int_between(1, 3_600_000))
    connect_timeout_ms: int = _setting(10_000, _int_between(1, 600_000))
    #: Requests in flight at once; 0 = unlimited.
    max_concurrency: int = _setting(0, _int_between(0, 1_000_000))
    #: Lower is preferred.
    priority: int = _setting(100, _int_between(-1_000_000, 1_000_000))
    weight: float = _setting(1.0, _number_in(0.0, 1_000_000.0, low_open=True))
    transport: str = _setting("fast", _one_of(TRANSPORTS))
    proxy: str | None = _setting(None, _proxy_url(), repr_=_url_repr)
    http2: bool = _setting(False)
    circuit_breaker: bool = _setting(True)
    pool_size: int = _setting(100, _int_between(1, 100_000))
    # fake provider
    chunks: int = _setting(8, _int_between(0, 1_000_000))
    ttfb_ms: int = _setting(0, _int_between(0, 3_600_000))
    chunk_delay_ms: int = _setting(0, _int_between(0, 3_600_000))
    text: str | None = _setting(None)
    #: Share of requests that fail with ``fail_status`` before any byte.
    fail_rate: float = _setting(0.0, _fraction())
    fail_status: int = _setting(500, _int_between(400, 599))
    # anthropic
    default_max_tokens: int = _setting(4096, _int_between(1, 100_000_000))
    anthropic_version: str = _setting("2023-06-01", _non_empty_str())
    # openai: the upstream speaks the Responses API; /v1/responses requests pass through unchanged
    responses_api: bool = _setting(False)
    # openai: a known OpenAI-compatible host (base URL and quirks; README "OpenAI-compatible hosts")
    preset: str | None = _setting(None, _Check(lambda v: v is None or v in OPENAI_PRESETS,
                                               "one of " + ", ".join(OPENAI_PRESETS)))
    # azure: api-version of the deployment scheme; model -> deployment; the key as api-key or bearer token
    api_version: str = _setting("2024-10-21", _non_empty_str())
    deployments: dict[str, str] = _setting(factory=dict, check=_Check(
        lambda v: all(k.strip() and d.strip() for k, d in v.items()), "a table of model = \"deployment\" strings"))
    azure_auth: str = _setting("api-key", _one_of(AZURE_AUTH))
    #: Re-list a provider's models this often when they were discovered (no models configured); 0: never.
    models_refresh_ms: int = _setting(3_600_000, _int_between(0, 604_800_000))
    # bedrock: SigV4 credentials and region (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    # AWS_REGION or AWS_DEFAULT_REGION fill in what a bedrock provider leaves out)
    region: str | None = _setting(None, _non_empty_str())
    aws_access_key_id: str | None = _setting(None, _non_empty_str())
    aws_secret_access_key: str | None = _setting(None, secret=True)
    aws_session_token: str | None = _setting(None, secret=True)

    timeout_s = _seconds("timeout_ms")
    connect_timeout_s = _seconds("connect_timeout_ms")
    ttfb_s = _seconds("ttfb_ms")
    chunk_delay_s = _seconds("chunk_delay_ms")


#: Provider settings that were accepted once and never read; a persisted registration that carries one is
#: read without it (runestone/control/store.py), a configuration file that sets one is told it is unknown.
RETIRED_PROVIDER_SETTINGS = frozenset({"cost_tier", "retry_attempts"})


@attrs.frozen
class ProviderSpec:
    """A provider to run: same shape as the control plane's ``{"name", "type", "config"}``."""

    name: str = _setting(check=_name())
    type: str = _setting(check=_one_of(PROVIDER_TYPES))
    config: ProviderConfig = _setting(factory=ProviderConfig)

    @property
    def base_url(self) -> str | None:
        """The configured base URL, else the preset's or the vendor's (None for the fake and azure)."""
        preset = OPENAI_PRESETS.get(self.config.preset or "") if self.type == "openai" else None
        return self.config.base_url or preset or DEFAULT_BASE_URLS.get(self.type)


@attrs.frozen
class LogConfig:
    """Logs beside the gateway's own: with ``access`` one JSON line per request (telemetry/access_log.py)
    is appended to ``access_path``, or written to standard output when it is empty."""

    access: bool = _setting(False)
    access_path: str = _setting("")


@attrs.frozen
class OtelConfig:
    """OpenTelemetry traces (telemetry/otel.py): on when ``endpoint`` is set.

    ``endpoint`` is the OTLP/HTTP base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` (which sets it): spans are
    posted to ``{endpoint}/v1/traces``.
    """

    endpoint: str | None = _setting(None, _http_url(), repr_=_url_repr)
    service_name: str = _setting("runestone", _non_empty_str())


@attrs.frozen
class Config:
    """The whole configuration. ``pricing`` is config/pricing.toml overlaid by
    the file's own ``[pricing]`` table."""

    server: ServerConfig = _setting(factory=ServerConfig)
    auth: AuthConfig = _setting(factory=AuthConfig)
    admin: AdminConfig = _setting(factory=AdminConfig)
    data: DataConfig = _setting(factory=DataConfig)
    router: RouterConfig = _setting(factory=RouterConfig)
    circuit_breaker: CircuitBreakerConfig = _setting(factory=CircuitBreakerConfig)
    retry: RetryConfig = _setting(factory=RetryConfig)
    failover: FailoverConfig = _setting(factory=FailoverConfig)
    telemetry: TelemetryConfig = _setting(factory=TelemetryConfig)
    limits: LimitsConfig = _setting(factory=LimitsConfig)
    budgets: BudgetsConfig = _setting(factory=BudgetsConfig)
    cache: CacheConfig = _setting(factory=CacheConfig)
    responses: ResponsesConfig = _setting(factory=ResponsesConfig)
    metrics: MetricsConfig = _setting(factory=MetricsConfig)
    log: LogConfig = _setting(factory=LogConfig)
    otel: OtelConfig = _setting(factory=OtelConfig)
    cluster: ClusterConfig = _setting(factory=ClusterConfig)
    database: DatabaseConfig = _setting(factory=DatabaseConfig)
    providers: tuple[ProviderSpec, ...] = _setting(())
    pools: tuple[PoolConfig, ...] = _setting(())
    splits: tuple[SplitConfig, ...] = _setting(())
    pricing: dict[str, ModelPrice] = attrs.field(factory=dict, hash=False)

    def provider(self, name: str) -> ProviderSpec | None:
        for spec in self.providers:
            if spec.name == name:
                return spec
        return None


@attrs.frozen
class _PricingFile:
    pricing: dict[str, ModelPrice] = attrs.field(factory=dict)


def data_dir_default(env: Mapping[str, str]) -> Path:
    """The data directory when neither the file nor ``$RUNESTONE_DATA_DIR`` names one (XDG's data home).

    ``XDG_DATA_HOME`` and ``HOME`` missing from ``env`` are read from the process environment, so the
    class default and ``load_config(env={})`` agree.
    """
    def get(name: str) -> str | None:
        return env[name] if name in env else os.environ.get(name)

    xdg = get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "runestone"
    home = get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "share" / "runestone"

