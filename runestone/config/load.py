"""Loading: the TOML file, the environment on top, the data directory made absolute, group defaults,
then structuring and every check; and the pricing table."""

import functools
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import attrs

from ._env import _apply_aws_env, _apply_env, _set_in
from ._report import ConfigError, _Path, _Report, _structure
from ._validate import _check_cross
from .pricing import ModelPrice
from .schema import DEFAULT_CONFIG_PATH, DEFAULT_PRICING_PATH, Config, _PricingFile, data_dir_default

__all__ = [
    "check_config",
    "load_config",
    "load_pricing",
]

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


