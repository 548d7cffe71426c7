"""The environment overlay: the only part of the config package that knows environment variable names.
Each variable is set into the raw document before structuring, and its name recorded as the value's
source (so a bad value is reported with the variable that gave it)."""

from collections.abc import Mapping
from typing import Any

import attrs

from ._report import _is_homogeneous_tuple, _Path, _resolve, _unwrap_optional
from .provider_types import PROVIDER_TYPE_REGISTRY
from .schema import Config, ProviderConfig

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
_ENV_PROVIDERS = tuple(
    (t.env.prefix, t.env.name, t.name, t.env.models) for t in PROVIDER_TYPE_REGISTRY.values() if t.env is not None
)
_ENV_PROVIDER_SETTINGS = (
    ("API_KEY", "api_key"),
    ("BASE_URL", "base_url"),
    ("TIMEOUT", "timeout_ms"),
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


