"""Runestone's configuration: the schema, how it is loaded, and how bad values are reported.

A configuration is a tree of frozen attrs classes rooted at :class:`Config`.
:func:`load_config` reads a TOML file (the embedded default
``config/runestone.toml`` unless told otherwise), applies the environment
variables on top of the file's values, structures the result with cattrs
(strictly: ``"5"`` is not an integer, ``1`` is not ``true``, unknown keys are
errors) and then checks every value and the cross references between them
(provider names, failover groups). Every problem becomes one line naming the
key, the value given, where it came from and what is allowed; a secret is shown
as ``***``. The same machinery serves the control plane: a provider or a
failover group described as a dict (``{"name", "type", "config": {...}}``) is
read by :func:`provider_spec_from_dict` / :func:`group_spec_from_dict` and
written back by :func:`provider_spec_to_dict` / :func:`group_spec_to_dict`.
Loading is synchronous and done once at start (or on a control message); none
of this runs per request.
"""

import difflib
import functools
import os
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.gen import mapping_structure_factory

__all__ = [
    "ANTHROPIC_DEFAULT_MODELS",
    "AdminConfig",
    "AuthConfig",
    "BudgetsConfig",
    "CacheConfig",
    "ClusterConfig",
    "CircuitBreakerConfig",
    "Config",
    "ConfigError",
    "COST_TIERS",
    "DataConfig",
    "DatabaseConfig",
    "DEFAULT_BASE_URLS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PRICING_PATH",
    "FAILOVER_STRATEGIES",
    "FailoverConfig",
    "FailoverGroupSpec",
    "LimitsConfig",
    "MetricsConfig",
    "LogConfig",
    "ModelPrice",
    "PoolConfig",
    "OPENAI_DEFAULT_MODELS",
    "OtelConfig",
    "PROVIDER_TYPES",
    "ProviderConfig",
    "ProviderSpec",
    "RetryConfig",
    "ROUTER_POLICIES",
    "RouterConfig",
    "ServerConfig",
    "SplitConfig",
    "SplitVariantConfig",
    "TelemetryConfig",
    "TRANSPORTS",
    "check_config",
    "config_to_dict",
    "group_spec_from_dict",
    "group_spec_to_dict",
    "load_config",
    "load_pricing",
    "provider_spec_from_dict",
    "provider_spec_to_dict",
]

_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = _ROOT / "config" / "runestone.toml"
DEFAULT_PRICING_PATH = _ROOT / "config" / "pricing.toml"

ROUTER_POLICIES = ("default", "health", "enhanced", "cost")
FAILOVER_STRATEGIES = (
    "round_robin",
    "priority",
    "load_balanced",
    "least_loaded",
    "fastest_first",
    "cost",
)
PROVIDER_TYPES = ("openai", "anthropic", "fake", "azure", "gemini", "bedrock")
TRANSPORTS = ("fast", "httpx")
COST_TIERS = ("low", "medium", "high")

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
}
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

# What the providers registered from OPENAI_API_KEY / ANTHROPIC_API_KEY serve
# until someone lists models explicitly: the vendors' current public model ids.
OPENAI_DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
ANTHROPIC_DEFAULT_MODELS = (
    "claude-opus-4-5",
    "claude-opus-4-1",
    "claude-sonnet-4-5",
    "claude-sonnet-4-0",
    "claude-haiku-4-5",
    "claude-3-7-sonnet-latest",
    "claude-3-5-haiku-latest",
)


class ConfigError(Exception):
    """A configuration that cannot be used.

    ``str(error)`` is one line, ``"config error: <problem>"``, naming the first
    problem found; ``problems`` holds every problem found (without the
    prefix), in file order. Secrets never appear in either.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message.removeprefix("config error: "),)


# --------------------------------------------------------------------------
# Field helpers: each setting carries its own check and the words for what it
# allows, so a type error and a range error read the same.


@attrs.frozen
class _Check:
    """A predicate on a structured value and the phrase saying what passes."""

    test: Callable[[Any], bool] = attrs.field(repr=False)
    allowed: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def _int_at_least(low: int) -> _Check:
    return _Check(lambda v: v >= low, f"an integer >= {low}")


def _int_between(low: int, high: int) -> _Check:
    return _Check(lambda v: low <= v <= high, f"an integer in {low}..{high}")


def _optional_int_at_least(low: int) -> _Check:
    return _Check(lambda v: v is None or v >= low, f"an integer >= {low}")


def _number_at_least(low: float) -> _Check:
    return _Check(lambda v: v >= low, f"a number >= {low:g}")


def _number_above(low: float) -> _Check:
    return _Check(lambda v: v > low, f"a number > {low:g}")


def _number_in(low: float, high: float, *, low_open: bool = False) -> _Check:
    # Chained comparisons are False for NaN, and an infinity is above any bound.
    shown = f"{int(high)}" if float(high).is_integer() else f"{high:g}"
    if low_open:
        return _Check(lambda v: low < v <= high, f"a number > {low:g} and <= {shown}")
    return _Check(lambda v: low <= v <= high, f"a number in {low:g}..{shown}")


def _optional_int_between(low: int, high: int) -> _Check:
    return _Check(lambda v: v is None or low <= v <= high, f"an integer in {low}..{high}")


def _fraction(*, zero_ok: bool = True) -> _Check:
    if zero_ok:
        return _Check(lambda v: 0.0 <= v <= 1.0, "a number in 0..1")
    return _Check(lambda v: 0.0 < v <= 1.0, "a number > 0 and <= 1")


def _one_of(choices: tuple[str, ...]) -> _Check:
    return _Check(lambda v: v in choices, "one of " + ", ".join(choices))


def _non_empty_str() -> _Check:
    return _Check(lambda v: bool(v.strip()), "a non-empty string")


def _strings() -> _Check:
    return _Check(
        lambda v: all(s.strip() for s in v), "an array of non-empty strings"
    )


def _distinct_strings() -> _Check:
    return _Check(
        lambda v: all(s.strip() for s in v) and len(set(v)) == len(v),
        "an array of distinct non-empty strings",
    )


# What a host (and port) may be made of: a DNS name (punycode for non-ASCII ones), IPv4, or [IPv6].
_AUTHORITY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:[]")
_USERINFO_CHARS = _AUTHORITY_CHARS | frozenset("~!$&'()*+,;=%@")


def parse_upstream_url(url: str, *, userinfo: bool = False) -> SplitResult:
    """``url`` split by the one parser the gateway uses for upstream URLs (``urllib.parse.urlsplit``,
    as the fast transport does), after refusing everything two parsers could read differently.

    Raises ValueError saying what is wrong: not printable ASCII (control characters such as CR or LF,
    spaces, backslashes), a scheme other than http/https, no host, user info (unless ``userinfo``, as a
    proxy may carry credentials), a query or fragment, or an invalid port. So ``http://X#@127.0.0.1`` is
    refused rather than shown as 127.0.0.1 while requests go to X.
    """
    if not url.isascii() or any(c <= " " or c in "\\\x7f" for c in url):
        raise ValueError("must be printable ASCII: no spaces, backslashes or control characters such as CR or LF")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(parts.scheme.lower() + "://"):
        raise ValueError("must start with http:// or https://")
    if "#" in url or "?" in url:
        raise ValueError("must have no query or fragment ('?' or '#')")
    allowed = _USERINFO_CHARS if userinfo else _AUTHORITY_CHARS
    if "@" in parts.netloc and not userinfo:
        raise ValueError("must have no user info ('user@'): send credentials as api_key")
    if not allowed.issuperset(parts.netloc):
        raise ValueError("must have a host of letters, digits, '-', '.', an IPv4 or a [bracketed] IPv6 address")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.port == 0:  # raises ValueError for a port out of range or not a number
        raise ValueError("must have a port in 1..65535")
    return parts


def _url_check(*, userinfo: bool) -> _Check:
    def ok(v: str | None) -> bool:
        if v is None:
            return True
        try:
            parse_upstream_url(v, userinfo=userinfo)
        except ValueError:
            return False
        return True

    extra = "" if userinfo else ", no user info"
    return _Check(ok, f"an http:// or https:// URL of printable ASCII with a host{extra}, no query or fragment")


def _http_url() -> _Check:
    return _url_check(userinfo=False)


def _server_url(schemes: tuple[str, ...]) -> _Check:
    """A URL of one of ``schemes`` with a host (user info allowed: it is a server's credential)."""

    def ok(v: str | None) -> bool:
        if v is None:
            return True
        if not v.isascii() or not v.isprintable():
            return False
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return False
        return parts.scheme in schemes and bool(parts.hostname) and not parts.fragment

    return _Check(ok, f"a {' or '.join(s + '://' for s in schemes)} URL of printable ASCII with a host")


def _proxy_url() -> _Check:
    return _url_check(userinfo=True)


def _is_host_pattern(v: str) -> bool:
    host = v[2:] if v.startswith("*.") else v
    return bool(host) and _AUTHORITY_CHARS.issuperset(host)


def upstream_host_allowed(url: str | None, hosts: Collection[str]) -> bool:
    """Is ``url``'s host in the allow-list ``hosts`` (``[admin] upstream_hosts``; empty allows any)?

    An entry is a host name or address, compared case-insensitively, or ``*.example.com`` for any
    name under example.com. ``url`` is parsed as it will be used (:func:`parse_upstream_url`).
    """
    if not hosts or url is None:
        return True
    try:
        host = parse_upstream_url(url).hostname or ""
    except ValueError:
        return False
    for entry in hosts:
        entry = entry.lower().strip("[]")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _is_name(v: str) -> bool:
    # Names end up in URLs of the admin API and in metric labels.
    return 0 < len(v) <= 64 and _NAME_CHARS.issuperset(v)


def _name() -> _Check:
    return _Check(_is_name, "a name of 1 to 64 letters, digits, '-', '_' or '.'")


def _mask(value: object) -> str:
    return "'***'" if value else repr(value)


def _mask_all(values: tuple[str, ...]) -> str:
    return "(" + ", ".join("'***'" for _ in values) + ")"


def _setting(
    default: Any = attrs.NOTHING,
    check: _Check | None = None,
    *,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
    repr_: Callable[[Any], str] | None = None,
) -> Any:
    metadata: dict[str, Any] = {}
    if check is not None:
        metadata["check"] = check
    if secret:
        metadata["secret"] = True
    return attrs.field(
        default=default,
        factory=factory,
        metadata=metadata,
        repr=repr_ or (_mask if secret else True),
    )


def _seconds(ms_field: str) -> property:
    def get(self: Any) -> float:
        return getattr(self, ms_field) / 1000.0

    return property(get, doc=f"``{ms_field}`` in seconds.")


# --------------------------------------------------------------------------
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
    policy: str = _setting("default", _one_of(ROUTER_POLICIES))


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
    strategy: str = _setting("priority", _one_of(FAILOVER_STRATEGIES))
    max_attempts: int = _setting(3, _int_between(1, 100))
    health_threshold: float = _setting(0.5, _fraction())


@attrs.frozen
class FailoverConfig:
    strategy: str = _setting("priority", _one_of(FAILOVER_STRATEGIES))
    max_attempts: int = _setting(3, _int_between(1, 100))
    health_threshold: float = _setting(0.5, _fraction())
    groups: tuple[FailoverGroupSpec, ...] = _setting(())


def _weights() -> _Check:
    return _Check(
        lambda v: all(0 <= w <= 1_000_000 for w in v) and (not v or sum(v) > 0),
        "an array of numbers in 0..1000000, not all 0",
    )


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


def _redact_url(url: str | None) -> str | None:
    """``http://user:pw@host/x`` -> ``http://***@host/x``; other URLs unchanged. Split as the URL is used."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # unparsable (a bad [IPv6]): show nothing that could be a credential
        return "***" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _url_repr(url: str | None) -> str:
    return repr(_redact_url(url))


@attrs.frozen
class ClusterConfig:
    """Sharing state between instances (``runestone serve --workers N``, or several machines): on when
    ``redis_url`` is set (``RUNESTONE_REDIS_URL``). Without it, every instance keeps its own state."""

    redis_url: str | None = _setting(None, _server_url(("redis", "rediss")), repr_=_url_repr)


@attrs.frozen
class DatabaseConfig:
    """Where the ledger, keys, teams and the control store live: Postgres when ``url`` is set
    (``RUNESTONE_DATABASE_URL``), else SQLite files in the data directory."""

    url: str | None = _setting(None, _server_url(("postgresql", "postgres")), repr_=_url_repr)


@attrs.frozen
class ProviderConfig:
    """One provider's settings; knobs that do not apply to its type are ignored.

    ``retry_attempts`` None means ``[retry].max_attempts``. A ``proxy`` or
    ``http2`` needs the httpx transport.
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
    #: Orders providers under the cost policy when a model has no price.
    cost_tier: str = _setting("medium", _one_of(COST_TIERS))
    transport: str = _setting("fast", _one_of(TRANSPORTS))
    proxy: str | None = _setting(None, _proxy_url(), repr_=_url_repr)
    http2: bool = _setting(False)
    retry_attempts: int | None = _setting(None, _optional_int_between(1, 100))
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
class ModelPrice:
    """List price of a model in USD per million tokens."""

    input_per_mtok: float = _setting(check=_number_at_least(0.0))
    output_per_mtok: float = _setting(0.0, _number_at_least(0.0))

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one request's usage."""
        return (
            input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        ) / 1_000_000


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


# --------------------------------------------------------------------------
# Strict structuring. cattrs' defaults call int()/bool()/str() on whatever
# they get, so "false" would become True; these hooks accept only the
# matching TOML/JSON type.


class _WrongType(TypeError):
    pass


def _strict_int(value: Any, _: type) -> int:
    if type(value) is not int:
        raise _WrongType
    return value


def _strict_float(value: Any, _: type) -> float:
    if type(value) is not float and type(value) is not int:
        raise _WrongType
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if type(value) is not bool:
        raise _WrongType
    return value


def _strict_str(value: Any, _: type) -> str:
    if type(value) is not str:
        raise _WrongType
    return value


def _is_homogeneous_tuple(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _strict_tuple_factory(t: Any, converter: cattrs.Converter) -> Callable[[Any, Any], tuple]:
    inner = homogenous_tuple_structure_factory(t, converter)

    def structure(value: Any, cl: Any) -> tuple:
        # A string is iterable; it must not become a tuple of characters.
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        return inner(value, cl)

    return structure


def _strict_dict_factory(t: Any, converter: cattrs.Converter) -> Callable[[Any, Any], dict]:
    inner = mapping_structure_factory(t, converter)

    def structure(value: Any, cl: Any) -> dict:
        if not isinstance(value, Mapping):
            raise _WrongType
        return inner(value, cl)

    return structure


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(float, _strict_float)
_converter.register_structure_hook(bool, _strict_bool)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook_factory(_is_homogeneous_tuple, _strict_tuple_factory)
_converter.register_structure_hook_factory(
    lambda t: typing.get_origin(t) is dict, _strict_dict_factory
)


# --------------------------------------------------------------------------
# Problem reporting.

_Path = tuple[str | int, ...]
_SECRET_NAMES = frozenset(("api_key", "api_keys", "admin_key", "aws_secret_access_key", "aws_session_token"))
_URL_NAMES = frozenset(("base_url", "proxy"))
_BARE_KEY_CHARS = _NAME_CHARS - {"."}
_MISSING = object()


def _dotted(path: _Path) -> str:
    out: list[str] = []
    for seg in path:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
            continue
        key = seg if seg and _BARE_KEY_CHARS.issuperset(seg) else _quote(seg)
        out.append("." + key if out else key)
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    # Control characters escaped as TOML writes them: a problem line stays one line, and shows a CR.
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    if any(c < " " or c == "\x7f" for c in s):
        s = "".join(c if " " <= c != "\x7f" else _ESCAPES.get(c, f"\\u{ord(c):04x}") for c in s)
    return '"' + s + '"'


def _show(value: Any) -> str:
    """A value as it would be written in TOML, cut short to keep one line."""
    if value is True:
        text = "true"
    elif value is False:
        text = "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = _quote(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{_quote(str(k))} = {_show(v)}" for k, v in value.items()) + "}"
    else:
        text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _is_secret_path(path: _Path) -> bool:
    return any(isinstance(seg, str) and seg in _SECRET_NAMES for seg in path)


def _unwrap_optional(t: Any) -> Any:
    if typing.get_origin(t) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _resolve(root: type, path: _Path) -> tuple[attrs.Attribute | None, Any]:
    """The attrs field a path falls under (None at the root) and the type at the path."""
    field: attrs.Attribute | None = None
    cur: Any = root
    for seg in path:
        cur = _unwrap_optional(cur)
        origin = typing.get_origin(cur)
        if isinstance(seg, str) and attrs.has(cur):
            f = attrs.fields_dict(cur).get(seg)
            if f is None:
                return field, None
            field, cur = f, f.type
        elif origin is tuple:
            cur = typing.get_args(cur)[0]
        elif origin is dict:
            cur = typing.get_args(cur)[1]
        else:
            return field, None
    return field, cur


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _allowed_for(root: type, path: _Path) -> str:
    field, t = _resolve(root, path)
    if field is not None and (check := field.metadata.get("check")) is not None:
        if field.type is t or _unwrap_optional(field.type) is t:
            return check.allowed
    t = _unwrap_optional(t)
    if t in _TYPE_WORDS:
        return _TYPE_WORDS[t]
    if attrs.has(t) or typing.get_origin(t) is dict:
        return "a table"
    if _is_homogeneous_tuple(t):
        inner = typing.get_args(t)[0]
        if attrs.has(inner):
            return "an array of tables"
        return "an array of " + {int: "integers", float: "numbers", str: "strings"}.get(inner, "values")
    return "a valid value"


def _lookup(raw: Any, path: _Path) -> Any:
    for seg in path:
        try:
            raw = raw[seg]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


@attrs.define
class _Report:
    """Problems found while reading one document, in the order found."""

    root: type
    raw: Any
    #: Where a value came from when not from the document itself.
    sources: dict[_Path, str] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)

    def bad(self, path: _Path, value: Any, allowed: str) -> None:
        if path and path[-1] in _URL_NAMES and isinstance(value, str):
            value = _redact_url(value)  # a refused URL may still carry a password
        shown = "***" if _is_secret_path(path) and value not in (None, "", ()) else _show(value)
        source = self.sources.get(path)
        origin = f" (from {source})" if source else ""
        self.problems.append(f"{_dotted(path)} = {shown}{origin}: must be {allowed}")

    def missing(self, path: _Path) -> None:
        self.problems.append(
            f"{_dotted(path)} is required: must be {_allowed_for(self.root, path)}"
        )

    def unknown(self, path: _Path, known: Collection[str]) -> None:
        hint = difflib.get_close_matches(str(path[-1]), list(known), n=1)
        suffix = f" (did you mean {hint[0]}?)" if hint else ""
        self.problems.append(f"unknown key {_dotted(path)}{suffix}")

    def from_structuring(self, exc: BaseException, path: _Path = ()) -> None:
        for note in getattr(exc, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                path = path + (note.name,)
            elif isinstance(note, IterableValidationNote):
                path = path + (note.index,)
        if isinstance(exc, ForbiddenExtraKeysError):
            known = [a.name for a in attrs.fields(exc.cl)]
            for key in sorted(exc.extra_fields):
                self.unknown(path + (key,), known)
        elif isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                self.from_structuring(sub, path)
        else:
            value = _lookup(self.raw, path)
            if value is _MISSING:
                self.missing(path)
            else:
                self.bad(path, value, _allowed_for(self.root, path))

    def check_values(self, cls: type, raw: Any, path: _Path = ()) -> None:
        """Run the check of every setting given in ``raw``, depth first in
        declaration order. Works on the raw data so that a document with a
        type error elsewhere still gets all its values checked; a value that
        does not structure is skipped here (structuring reports it)."""
        if not isinstance(raw, Mapping):
            return
        for field in attrs.fields(cls):
            if field.name not in raw:
                continue
            value = raw[field.name]
            here = path + (field.name,)
            t = _unwrap_optional(field.type)
            args = typing.get_args(t)
            # tuple[X, ...] holds X first; dict[str, X] holds X last.
            inner = (args[0] if typing.get_origin(t) is tuple else args[-1]) if args else None
            if attrs.has(t):
                self.check_values(t, value, here)
            elif _is_homogeneous_tuple(t) and attrs.has(inner) and isinstance(value, list):
                for i, item in enumerate(value):
                    self.check_values(inner, item, here + (i,))
            elif typing.get_origin(t) is dict and attrs.has(inner) and isinstance(value, Mapping):
                for key, item in value.items():
                    self.check_values(inner, item, here + (key,))
            check = field.metadata.get("check")
            if check is None:
                continue
            try:
                typed = _converter.structure(value, field.type)
            except Exception:
                continue
            if not check(typed):
                self.bad(here, typed, check.allowed)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError("config error: " + self.problems[0], tuple(self.problems))


def _structure(report: _Report, data: Any, cls: type) -> Any:
    """Structure and check ``data`` as ``cls``, or raise ConfigError with every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config error: expected a table, got {_show(data)}")
    try:
        obj = _converter.structure(data, cls)
    except Exception as exc:  # cattrs reports any failure as an exception tree
        report.from_structuring(exc)
        report.check_values(cls, data)
        report.raise_if_any()
        raise
    report.check_values(cls, data)
    return obj


def _check_provider(report: _Report, spec: ProviderSpec, path: _Path, upstream_hosts: Collection[str] = ()) -> None:
    cfg = spec.config
    if not upstream_host_allowed(spec.base_url, upstream_hosts):
        report.bad(path + ("config", "base_url"), spec.base_url,
                   "a URL whose host is in admin.upstream_hosts (" + ", ".join(upstream_hosts) + ")")
    if cfg.transport == "fast" and (cfg.proxy or cfg.http2):
        report.bad(
            path + ("config", "transport"),
            cfg.transport,
            '"httpx" when proxy or http2 is set',
        )
    if spec.type == "azure" and not cfg.base_url:
        report.bad(path + ("config", "base_url"), None, "the Azure OpenAI endpoint (https://NAME.openai.azure.com, "
                   "or .../openai/v1 for the v1 API)")
    if cfg.preset is not None and spec.type != "openai":
        report.bad(path + ("config", "preset"), cfg.preset, 'unset: presets apply to type "openai" providers')


def _check_cross(report: _Report, cfg: Config) -> None:
    """Checks that span fields: references, uniqueness, orderings."""
    cb = cfg.circuit_breaker
    if cb.minimum_requests > cb.window_size:
        report.bad(
            ("circuit_breaker", "minimum_requests"),
            cb.minimum_requests,
            f"an integer <= circuit_breaker.window_size ({cb.window_size})",
        )
    if cfg.retry.max_delay_ms < cfg.retry.base_delay_ms:
        report.bad(
            ("retry", "max_delay_ms"),
            cfg.retry.max_delay_ms,
            f"an integer >= retry.base_delay_ms ({cfg.retry.base_delay_ms})",
        )
    if cfg.metrics.require_key and not (cfg.metrics.key or cfg.auth.admin_key):
        report.bad(("metrics", "require_key"), True, "false unless metrics.key or auth.admin_key is set")
    seen: dict[str, int] = {}
    for i, spec in enumerate(cfg.providers):
        if spec.name in seen:
            report.bad(
                ("providers", i, "name"),
                spec.name,
                f"unique (already the name of providers[{seen[spec.name]}])",
            )
        else:
            seen[spec.name] = i
        _check_provider(report, spec, ("providers", i), cfg.admin.upstream_hosts)
    known = ", ".join(seen) or "none configured"
    groups: dict[str, int] = {}
    for i, group in enumerate(cfg.failover.groups):
        if group.name in groups:
            report.bad(
                ("failover", "groups", i, "name"),
                group.name,
                f"unique (already the name of failover.groups[{groups[group.name]}])",
            )
        else:
            groups[group.name] = i
        for j, member in enumerate(group.providers):
            if member not in seen:
                report.bad(
                    ("failover", "groups", i, "providers", j),
                    member,
                    f"the name of a configured provider ({known})",
                )
    _check_pools_and_splits(report, cfg, seen, groups)


def _check_pools_and_splits(
    report: _Report, cfg: Config, providers: Mapping[str, int], groups: Mapping[str, int]
) -> None:
    """Pool and split names are unique among pools, splits and groups; pool
    members are configured providers; a variant never routes to a split."""
    known = ", ".join(providers) or "none configured"
    names: dict[str, str] = {name: f"failover.groups[{i}]" for name, i in groups.items()}
    for i, pool in enumerate(cfg.pools):
        if pool.name in names:
            report.bad(("pools", i, "name"), pool.name, f"unique (already the name of {names[pool.name]})")
        else:
            names[pool.name] = f"pools[{i}]"
        for j, member in enumerate(pool.providers):
            if member not in providers:
                report.bad(
                    ("pools", i, "providers", j),
                    member,
                    f"the name of a configured provider ({known})",
                )
        if pool.weights and len(pool.weights) != len(pool.providers):
            report.bad(
                ("pools", i, "weights"),
                pool.weights,
                f"an array of {len(pool.providers)} weights, one per provider",
            )
    splits: set[str] = set()
    for i, split in enumerate(cfg.splits):
        if split.name in names:
            report.bad(("splits", i, "name"), split.name, f"unique (already the name of {names[split.name]})")
        else:
            names[split.name] = f"splits[{i}]"
        splits.add(split.name)
        variants: dict[str, int] = {}
        for j, variant in enumerate(split.variants):
            if variant.name in variants:
                report.bad(
                    ("splits", i, "variants", j, "name"),
                    variant.name,
                    f"unique in the split (already the name of variants[{variants[variant.name]}])",
                )
            else:
                variants[variant.name] = j
        if split.variants and sum(v.weight for v in split.variants) <= 0:
            last = len(split.variants) - 1
            report.bad(
                ("splits", i, "variants", last, "weight"),
                split.variants[last].weight,
                "a number > 0 when every other variant's weight is 0",
            )
    for i, split in enumerate(cfg.splits):
        for j, variant in enumerate(split.variants):
            if variant.model in splits or variant.model.partition("/")[0] in splits:
                report.bad(
                    ("splits", i, "variants", j, "model"),
                    variant.model,
                    "a model, provider:model, alias, failover group or pool, not a split",
                )


# --------------------------------------------------------------------------
# The environment.

_TRUE = frozenset(("true", "1", "yes", "on"))
_FALSE = frozenset(("false", "0", "no", "off"))

_ENV_SETTINGS: tuple[tuple[str, _Path], ...] = (
    ("PORT", ("server", "port")),
    ("RUNESTONE_API_KEYS", ("auth", "api_keys")),
    ("RUNESTONE_ADMIN_KEY", ("auth", "admin_key")),
    ("RUNESTONE_DATA_DIR", ("data", "dir")),
    ("RUNESTONE_ROUTER_POLICY", ("router", "policy")),
    ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", ("circuit_breaker", "failure_threshold")),
    ("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", ("circuit_breaker", "recovery_timeout_ms")),
    ("RETRY_MAX_ATTEMPTS", ("retry", "max_attempts")),
    ("RETRY_BASE_DELAY_MS", ("retry", "base_delay_ms")),
    ("RETRY_BACKOFF_FACTOR", ("retry", "backoff_factor")),
    ("RETRY_JITTER", ("retry", "jitter")),
    ("FAILOVER_STRATEGY", ("failover", "strategy")),
    ("FAILOVER_MAX_ATTEMPTS", ("failover", "max_attempts")),
    ("FAILOVER_HEALTH_THRESHOLD", ("failover", "health_threshold")),
    ("MAX_CONCURRENT_PER_TENANT", ("limits", "max_concurrent_per_tenant")),
    ("RUNESTONE_METRICS_REQUIRE_KEY", ("metrics", "require_key")),
    ("RUNESTONE_METRICS_KEY", ("metrics", "key")),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", ("otel", "endpoint")),
    ("RUNESTONE_REDIS_URL", ("cluster", "redis_url")),
    ("RUNESTONE_DATABASE_URL", ("database", "url")),
)

# (prefix, provider name, provider type, default models)
_ENV_PROVIDERS = (
    ("OPENAI", "openai-default", "openai", OPENAI_DEFAULT_MODELS),
    ("ANTHROPIC", "anthropic-default", "anthropic", ANTHROPIC_DEFAULT_MODELS),
)
_ENV_PROVIDER_SETTINGS = (
    ("API_KEY", "api_key"),
    ("BASE_URL", "base_url"),
    ("TIMEOUT", "timeout_ms"),
    ("RETRY_ATTEMPTS", "retry_attempts"),
    ("CIRCUIT_BREAKER", "circuit_breaker"),
)


def _parse_env(text: str, t: Any) -> Any:
    """An environment string as the setting's type; left as the string when it
    does not parse, so the type check reports it with the variable's name."""
    t = _unwrap_optional(t)
    stripped = text.strip()
    if t is bool:
        low = stripped.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if t is int:
        try:
            return int(stripped)
        except ValueError:
            return text
    if t is float:
        try:
            return float(stripped)
        except ValueError:
            return text
    if _is_homogeneous_tuple(t):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _set_in(raw: dict, path: _Path, value: Any) -> dict:
    """A copy of ``raw`` with ``value`` at ``path``; containers on the way are
    copied (or created), the rest is shared."""
    head, rest = path[0], path[1:]
    copy: Any = list(raw) if isinstance(raw, list) else dict(raw)
    if not rest:
        copy[head] = value
        return copy
    child = raw[head] if isinstance(raw, list) else raw.get(head)
    if not isinstance(child, (dict, list)):
        child = {}
    copy[head] = _set_in(child, rest, value)
    return copy


def _apply_env(raw: dict, env: Mapping[str, str], sources: dict[_Path, str]) -> dict:
    """The file's data with the environment's settings on top.

    Empty variables count as unset. OPENAI_API_KEY (ANTHROPIC_API_KEY)
    registers the provider ``openai-default`` (``anthropic-default``) unless
    the file has one of that name, which it then updates; the other
    OPENAI_*/ANTHROPIC_* variables apply to that provider only.
    """
    for var, path in _ENV_SETTINGS:
        text = env.get(var)
        if text:
            raw = _set_in(raw, path, _parse_env(text, _resolve(Config, path)[1]))
            sources[path] = var
    for prefix, name, kind, models in _ENV_PROVIDERS:
        providers = raw.get("providers")
        if providers is not None and not isinstance(providers, list):
            continue  # the type check reports it
        providers = providers or []
        index = next(
            (i for i, p in enumerate(providers) if isinstance(p, dict) and p.get("name") == name),
            None,
        )
        if index is None:
            if not env.get(prefix + "_API_KEY"):
                continue
            index = len(providers)
            entry = {"name": name, "type": kind, "config": {"models": list(models)}}
            raw = _set_in(raw, ("providers",), [*providers, entry])
        for suffix, key in _ENV_PROVIDER_SETTINGS:
            var = f"{prefix}_{suffix}"
            text = env.get(var)
            if text:
                path: _Path = ("providers", index, "config", key)
                field_type = attrs.fields_dict(ProviderConfig)[key].type
                raw = _set_in(raw, path, _parse_env(text, field_type))
                sources[path] = var
    return raw


# The standard AWS variables, for every ``bedrock`` provider of the file that leaves the setting out.
_AWS_ENV = (
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    ("AWS_SESSION_TOKEN", "aws_session_token"),
    ("AWS_REGION", "region"),
    ("AWS_DEFAULT_REGION", "region"),
)


def _apply_aws_env(raw: dict, env: Mapping[str, str], sources: dict[_Path, str]) -> dict:
    providers = raw.get("providers")
    if not isinstance(providers, list):
        return raw
    for i, p in enumerate(providers):
        if not isinstance(p, dict) or p.get("type") != "bedrock":
            continue
        for var, key in _AWS_ENV:
            config = raw["providers"][i].get("config")
            text = env.get(var)
            if text and not (isinstance(config, dict) and config.get(key) is not None):
                path: _Path = ("providers", i, "config", key)
                raw = _set_in(raw, path, text)
                sources[path] = var
    return raw


_GROUP_INHERITED = ("strategy", "max_attempts", "health_threshold")


def _inherit_group_defaults(raw: dict, sources: dict[_Path, str]) -> dict:
    """Fill each ``[[failover.groups]]`` entry's missing fields from ``[failover]``."""
    failover = raw.get("failover")
    if not isinstance(failover, dict) or not isinstance(failover.get("groups"), list):
        return raw
    groups = []
    for i, group in enumerate(failover["groups"]):
        if isinstance(group, dict):
            group = dict(group)
            for key in _GROUP_INHERITED:
                if key not in group and key in failover:
                    group[key] = failover[key]
                    sources[("failover", "groups", i, key)] = sources.get(
                        ("failover", key), "failover." + key
                    )
        groups.append(group)
    return _set_in(raw, ("failover", "groups"), groups)


# --------------------------------------------------------------------------
# Loading.


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from None


@functools.lru_cache(maxsize=4)
def _load_pricing_cached(path: str, mtime_ns: int) -> dict[str, ModelPrice]:
    raw = _read_toml(Path(path))
    try:
        return _structure(_Report(_PricingFile, raw), raw, _PricingFile).pricing
    except ConfigError as exc:
        lines = tuple(f"{path}: {p}" for p in exc.problems)
        raise ConfigError("config error: " + lines[0], lines) from None


def load_pricing(path: str | os.PathLike[str] | None = None) -> dict[str, ModelPrice]:
    """The pricing table (``config/pricing.toml`` by default), as a new dict."""
    p = Path(path) if path is not None else DEFAULT_PRICING_PATH
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        mtime = 0  # _read_toml reports it
    return dict(_load_pricing_cached(str(p), mtime))


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


def _resolve_data_dir(raw: dict, sources: dict[_Path, str], env: Mapping[str, str], path: Path) -> dict:
    """``[data] dir`` made absolute, so the data never lands wherever a command happens to run."""
    data = raw.get("data")
    value = data.get("dir") if isinstance(data, dict) else None
    if value is None:
        return _set_in(raw, ("data", "dir"), str(data_dir_default(env)))
    if not isinstance(value, str) or not value:
        return raw  # the type check reports it
    where = Path(value).expanduser()
    if not where.is_absolute():
        base = Path.cwd() if sources.get(("data", "dir")) == "RUNESTONE_DATA_DIR" else path.resolve().parent
        where = base / where
    return _set_in(raw, ("data", "dir"), str(where))


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read, override, structure and check the configuration.

    ``path`` None means ``$RUNESTONE_CONFIG`` or else the embedded
    ``config/runestone.toml``; ``env`` None means ``os.environ``. Raises
    :class:`ConfigError` (one line; every problem in ``.problems``).
    """
    if env is None:
        env = os.environ
    if path is None:
        path = env.get("RUNESTONE_CONFIG") or DEFAULT_CONFIG_PATH
    raw = _read_toml(Path(path))
    sources: dict[_Path, str] = {}
    raw = _apply_env(raw, env, sources)
    raw = _apply_aws_env(raw, env, sources)
    raw = _resolve_data_dir(raw, sources, env, Path(path))
    raw = _inherit_group_defaults(raw, sources)
    report = _Report(Config, raw, sources)
    config = _structure(report, raw, Config)
    _check_cross(report, config)
    report.raise_if_any()
    return attrs.evolve(config, pricing={**load_pricing(), **config.pricing})


def check_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """Every problem of a configuration as ``config error: ...`` lines; [] if it loads."""
    try:
        load_config(path, env)
    except ConfigError as exc:
        return ["config error: " + p for p in exc.problems]
    return []


# --------------------------------------------------------------------------
# The control plane's dict forms.


def provider_spec_from_dict(d: Mapping[str, Any], upstream_hosts: Collection[str] = ()) -> ProviderSpec:
    """A provider from ``{"name", "type", "config": {...}}``; ConfigError names the bad field.

    The same checks as a provider of the configuration file, ``[admin] upstream_hosts`` included
    when given: the admin API, the control socket and the persisted registrations all come here."""
    report = _Report(ProviderSpec, d)
    spec = _structure(report, d, ProviderSpec)
    _check_provider(report, spec, (), upstream_hosts)
    report.raise_if_any()
    return spec


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def provider_spec_to_dict(spec: ProviderSpec, redact: bool = True) -> dict[str, Any]:
    """The dict form of a provider; unset (None) settings are left out.

    With ``redact`` the api_key reads ``"***"`` and credentials in URLs are masked.
    """
    config: dict[str, Any] = {}
    for field in attrs.fields(ProviderConfig):
        value = getattr(spec.config, field.name)
        if value is None:
            continue
        if redact:
            if field.metadata.get("secret") and value:
                value = "***"
            elif field.name in ("base_url", "proxy"):
                value = _redact_url(value)
        config[field.name] = _plain(value)
    return {"name": spec.name, "type": spec.type, "config": config}


def group_spec_from_dict(
    d: Mapping[str, Any],
    defaults: FailoverConfig | None = None,
    known_providers: Collection[str] | None = None,
) -> FailoverGroupSpec:
    """A failover group from its dict form; left-out fields come from
    ``defaults`` (``[failover]``). With ``known_providers``, every member must
    be one of them."""
    if isinstance(d, Mapping) and defaults is not None:
        d = {**{k: getattr(defaults, k) for k in _GROUP_INHERITED}, **d}
    report = _Report(FailoverGroupSpec, d)
    group = _structure(report, d, FailoverGroupSpec)
    if known_providers is not None:
        known = ", ".join(known_providers) or "none configured"
        for j, member in enumerate(group.providers):
            if member not in known_providers:
                report.bad(("providers", j), member, f"the name of a configured provider ({known})")
    report.raise_if_any()
    return group


def group_spec_to_dict(group: FailoverGroupSpec) -> dict[str, Any]:
    return {f.name: _plain(getattr(group, f.name)) for f in attrs.fields(FailoverGroupSpec)}


def _to_plain(obj: Any, redact: bool) -> Any:
    if isinstance(obj, ProviderSpec):
        return provider_spec_to_dict(obj, redact)
    if attrs.has(type(obj)):
        out = {}
        for field in attrs.fields(type(obj)):
            value = getattr(obj, field.name)
            if redact and field.metadata.get("secret") and value:
                value = ["***" for _ in value] if isinstance(value, tuple) else "***"
            out[field.name] = _to_plain(value, redact)
        return out
    if isinstance(obj, tuple):
        return [_to_plain(v, redact) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v, redact) for k, v in obj.items()}
    return obj


def config_to_dict(config: Config, redact: bool = True) -> dict[str, Any]:
    """The whole configuration as plain data (for state dumps), secrets masked by default."""
    return _to_plain(config, redact)
