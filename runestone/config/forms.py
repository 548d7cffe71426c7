"""The control plane's dict forms: a provider (``{"name", "type", "config": {...}}``) or a failover group
read with the same checks as the file's, and written back (secrets masked by default)."""

from collections.abc import Collection, Mapping
from typing import Any

import attrs

from ..runtime import plain
from ._checks import _redact_url, _url_repr
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


def _url_settings(cls: type) -> tuple[str, ...]:
    """The settings of ``cls`` that are URLs which may carry credentials (shown redacted by their repr)."""
    return tuple(f.name for f in attrs.fields(cls) if f.repr is _url_repr)


def _redact_urls(section: dict[str, Any], cls: type) -> dict[str, Any]:
    for name in _url_settings(cls):
        if section.get(name):
            section[name] = _redact_url(section[name])
    return section


def provider_spec_to_dict(spec: ProviderSpec, redact: bool = True) -> dict[str, Any]:
    """The dict form of a provider; unset (None) settings are left out.

    With ``redact`` the api_key reads ``"***"`` and credentials in URLs are masked.
    """
    config = {k: v for k, v in plain(spec.config, redact=redact).items() if v is not None}
    if redact:
        _redact_urls(config, ProviderConfig)
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
    return plain(group)


def config_to_dict(config: Config, redact: bool = True) -> dict[str, Any]:
    """The whole configuration as plain data (for state dumps), secrets masked by default (credentials in
    URLs too: ``[cluster] redis_url``, ``[database] url``, ...); each provider in its dict form
    (:func:`provider_spec_to_dict`)."""
    out = plain(config, redact=redact)
    if redact:
        for field in attrs.fields(Config):
            if attrs.has(field.type) and isinstance(out.get(field.name), dict):
                _redact_urls(out[field.name], field.type)
    out["providers"] = [provider_spec_to_dict(spec, redact) for spec in config.providers]
    return out
