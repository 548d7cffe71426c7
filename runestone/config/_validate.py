"""Checks that span fields: a provider's settings together, references between providers, groups, pools
and splits, uniqueness, orderings."""

from collections.abc import Collection, Mapping

from ._checks import upstream_host_allowed
from ._report import _Path, _Report
from .provider_types import PROVIDER_TYPE_REGISTRY
from .schema import Config, ProviderSpec


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
    kind = PROVIDER_TYPE_REGISTRY.get(spec.type)
    if kind is None:
        return  # the type's own check reports it
    if kind.base_url_required and not cfg.base_url:
        report.bad(path + ("config", "base_url"), None, kind.base_url_required)
    if cfg.preset is not None and "preset" not in kind.knobs:
        takers = " or ".join(f'"{t.name}"' for t in PROVIDER_TYPE_REGISTRY.values() if "preset" in t.knobs)
        report.bad(path + ("config", "preset"), cfg.preset, f"unset: presets apply to type {takers} providers")


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


