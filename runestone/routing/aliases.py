"""Model aliases: short names (``fast``, ``smart``, ``cheap``) a client may use in place of a model.

An alias names a model (routed like any model), a ``provider:model`` pair (pinned to that provider) or a
failover group. The aliases live in a TOML file — ``$RUNESTONE_ALIASES``, else the embedded
``config/aliases.toml`` — under one ``[aliases]`` table. :class:`AliasWatcher` is the actor that owns
them: it loads the file when it starts, checks the file's identity (mtime, size, inode) every
``interval`` seconds and reloads it when that changes, publishing a plain dict into the Gateway's
``aliases`` cell, which the request path reads without a mailbox. A file that does not parse or holds
a bad alias is refused as a whole: the aliases in use stay, and one warning line says why. Aliases of
aliases are resolved at load time, so a lookup on the request path is one dict ``get``.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs
import trio

from ..config import DEFAULT_CONFIG_PATH
from ..runtime import Actor, Published

__all__ = ["AliasError", "AliasWatcher", "AliasWatcherSnapshot", "DEFAULT_ALIASES_PATH", "Reload", "aliases_path",
           "load_aliases", "parse_aliases"]

log = logging.getLogger("runestone.routing.aliases")

DEFAULT_ALIASES_PATH = DEFAULT_CONFIG_PATH.parent / "aliases.toml"


class AliasError(ValueError):
    """An alias file that cannot be used; the message names the file's problem in one line."""


def aliases_path(env: Mapping[str, str] | None = None) -> Path:
    """``$RUNESTONE_ALIASES`` if set, else the embedded ``config/aliases.toml``."""
    env = os.environ if env is None else env
    value = env.get("RUNESTONE_ALIASES")
    return Path(value) if value else DEFAULT_ALIASES_PATH


def _check_name(kind: str, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip() or any(c.isspace() for c in value):
        raise AliasError(f"{where}: the {kind} must be a non-empty string without spaces, not {value!r}")
    return value


def parse_aliases(text: str, source: str = "aliases") -> dict[str, str]:
    """The ``{alias: target}`` map of an alias file's text, chains resolved; AliasError if unusable.

    An alias name may not contain ``:`` (that form pins a provider). A chain ``a -> b -> c`` resolves
    to ``a -> c``; a cycle is an error.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AliasError(f"{source} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"aliases"})
    if extra:
        raise AliasError(f"{source}: unknown top-level key(s) {', '.join(extra)}; put aliases under [aliases]")
    table = data.get("aliases", {})
    if not isinstance(table, dict):
        raise AliasError(f"{source}: 'aliases' must be a table of name = \"target\" pairs")
    raw: dict[str, str] = {}
    for name, target in table.items():
        _check_name("alias name", name, f"{source}: aliases.{name}")
        if ":" in name:
            raise AliasError(f"{source}: aliases.{name}: an alias name may not contain ':' (provider:model "
                             "already means a pinned provider)")
        raw[name] = _check_name("target", target, f"{source}: aliases.{name}")
    resolved: dict[str, str] = {}
    for name, target in raw.items():
        seen = [name]
        while target in raw:
            if target in seen:
                raise AliasError(f"{source}: aliases form a cycle: {' -> '.join(seen + [target])}")
            seen.append(target)
            target = raw[target]
        resolved[name] = target
    return resolved


def load_aliases(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read and parse an alias file; AliasError (one line) if it cannot be read or used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AliasError(f"cannot read {path}: {exc}") from None
    return parse_aliases(text, str(path))


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@attrs.frozen
class Reload:
    """Call: read the alias file now; replies the map in use afterwards."""


@attrs.frozen
class AliasWatcherSnapshot:
    """What a state dump shows of the alias watcher."""

    #: The file watched.
    path: str
    #: The aliases in use, as published.
    aliases: dict[str, str]
    #: Successful loads since the actor started (the first load included).
    loads: int
    #: Files refused since the actor started.
    rejected: int
    #: Why the last refused file was refused, if the file in place now is one.
    error: str | None


class AliasWatcher(Actor):
    """Owns the alias map: loads the file, watches it, publishes into ``cell``.

    The published dict is never mutated after publishing; a reload publishes a new one. One call:
    :class:`Reload` (load now, whatever the file's identity, and return the map in use afterwards; a
    refused file leaves the old map in use and the snapshot's ``error`` says why). Anything else gets
    the runtime's unknown-message policy.
    """

    def __init__(self, cell: Published, path: str | os.PathLike[str], *, interval: float = 2.0, registry=None,
                 name: str = "alias_watcher") -> None:
        super().__init__(name, registry=registry)
        self.cell = cell
        self.path = Path(path)
        self.interval = interval
        self._identity: tuple[int, int, int] | None = None
        self._loads = 0
        self._rejected = 0
        self._error: str | None = None

    async def init(self) -> None:
        self._identity = None
        self._error = None
        self._check(force=True)
        self.nursery.start_soon(self._watch, name=f"{self.name}/watch")

    async def _watch(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self._check()

    def _check(self, force: bool = False) -> None:
        identity = _identity(self.path)
        if identity == self._identity and not force:
            return
        self._identity = identity
        current = self.cell.value or {}
        if identity is None:
            # No file means no aliases; say so only if aliases were in use, since the file is optional.
            if current:
                log.warning("alias file %s is gone: dropping the %d alias(es) in use", self.path, len(current))
                self.cell.publish({})
            self._error = None
            return
        try:
            aliases = load_aliases(self.path)
        except AliasError as exc:
            self._rejected += 1
            self._error = str(exc)
            log.warning("alias file refused, keeping the %d alias(es) in use: %s", len(current), exc)
            return
        self._loads += 1
        self._error = None
        if aliases != current:
            self.cell.publish(aliases)
            log.info("aliases loaded from %s: %d alias(es)", self.path, len(aliases))

    async def handle_call(self, message):
        match message:
            case Reload():
                self._check(force=True)
                return dict(self.cell.value or {})
            case _:
                return self.unknown_call(message)

    def snapshot(self) -> AliasWatcherSnapshot:
        return AliasWatcherSnapshot(path=str(self.path), aliases=dict(self.cell.value or {}), loads=self._loads,
                                    rejected=self._rejected, error=self._error)
