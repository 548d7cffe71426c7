"""The control plane's dict forms: a provider (``{"name", "type", "config": {...}}``) or a failover group
read with the same checks as the file's, and written back (secrets masked by default)."""

from collections.abc import Collection, Mapping
from typing import Any

import attrs

from ._checks import _redact_url
from ._report import _Report, _structure
from ._validate import _check_provider
from .load import _GROUP_INHERITED
from .schema import Config, FailoverConfig, FailoverGroupSpec, ProviderConfig, ProviderSpec

__all__ = [
    "config_to_dict",
    "group_spec_from_dict",
    "group_spec_to_dict",
    "provider_spec_from_dict",
    "provider_spec_to_dict",
]


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
