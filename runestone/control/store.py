"""What the control plane changed at run time, kept on disk so that a restart brings it back.

Operators register, update and unregister providers and create, update and delete failover groups while
the gateway runs. :class:`ControlState` is the sum of those changes *over* the configuration file: the
providers and groups set at run time (whole, with their secrets, since a restart must be able to rebuild
them) and the names of configured ones that were removed. At start the application overlays it on the
configuration (:meth:`ControlState.catalog`, :meth:`ControlState.groups_over`), so a change made at run
time wins over the file until it is undone at run time. :class:`ControlStore` keeps it as one small JSON
document, ``control.json`` in the data directory, replaced atomically (written to a temporary file in the
same directory, flushed to disk, then ``os.replace``): a crash leaves either the old document or the new
one, never half of one. The file holds provider API keys, so it is created readable by its owner only.

With ``[database] url`` the document is in Postgres and ``control.copy.json`` is its local copy. A change the
database cannot take (it is down, or this instance started without it and has not read it yet) is applied
here and answered as done: the new state goes to the local copy, and the names it changed (``kind``,
``name``: no settings, so no secret) are appended to the *outbox*, ``control.outbox.json``, both written
and flushed to disk before the answer. Once the database answers, the outbox is *merged* into its document
in one transaction holding the row: the database's document is read (it may hold changes other instances
made meanwhile, which this instance never loaded), each name in the outbox is set to this instance's
value for it, in order, and the result is saved, with each entry's ``(origin, seq)`` in
``outbox_applied`` so a retried merge applies it once. **What wins**: for a name this instance changed
while cut off, this instance's value (the outbox is newer than anything it read); for every other name,
the database's. The merged state is then this instance's (:meth:`ControlPlane.adopt` applies the rest).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import orjson
import trio

from ..config import RETIRED_PROVIDER_SETTINGS, ConfigError, ProviderSpec, provider_spec_from_dict, provider_spec_to_dict
from ..resilience.failover import GroupSpec

__all__ = ["ControlState", "ControlStore", "ControlStoreError", "group_to_dict", "FILE_NAME"]

log = logging.getLogger("runestone.control")

FILE_NAME = "control.json"
#: With a database url: the local copy of the database's document, in the data directory.
COPY_NAME = "control.copy.json"
#: With a database url: the changes waiting for it, in the data directory.
OUTBOX_NAME = "control.outbox.json"
_VERSION = 1
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class ControlStoreError(Exception):
    """The persisted control state cannot be read or written; the message names the file and the problem."""


def group_to_dict(group: GroupSpec) -> dict[str, Any]:
    """A failover group in the control plane's dict form (the same keys as a configured group)."""
    return {
        "name": group.name,
        "providers": list(group.providers),
        "strategy": group.strategy,
        "max_attempts": group.max_attempts,
        "health_threshold": group.health_threshold,
    }


def _without_retired(data: Mapping[str, Any]) -> Mapping[str, Any]:
    config = data.get("config")
    if isinstance(config, Mapping) and not RETIRED_PROVIDER_SETTINGS.isdisjoint(config):
        return {**data, "config": {k: v for k, v in config.items() if k not in RETIRED_PROVIDER_SETTINGS}}
    return data


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@attrs.frozen
class ControlState:
    """Run-time changes over the configuration; immutable, each change makes a new state.

    ``providers`` maps a name to the full dict form of a provider registered or updated at run time
    (secrets included); ``removed_providers`` names providers removed at run time, so a configured
    one stays removed after a restart. ``groups`` and ``removed_groups`` are the same for failover
    groups. A name is never in both a mapping and its removed set.
    """

    providers: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=_frozen_map)
    removed_providers: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    groups: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=_frozen_map)
    removed_groups: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)

    # -- changes ----------------------------------------------------------------------------------

    def with_provider(self, spec: ProviderSpec) -> ControlState:
        providers = dict(self.providers)
        providers[spec.name] = provider_spec_to_dict(spec, redact=False)
        return attrs.evolve(self, providers=providers, removed_providers=self.removed_providers - {spec.name})

    def without_provider(self, name: str, *, configured: bool = True) -> ControlState:
        """Forget ``name``; a ``configured`` one (in the file) is remembered as removed, so it stays removed."""
        providers = dict(self.providers)
        providers.pop(name, None)
        removed = self.removed_providers | {name} if configured else self.removed_providers - {name}
        return attrs.evolve(self, providers=providers, removed_providers=removed)

    def with_group(self, group: GroupSpec) -> ControlState:
        groups = dict(self.groups)
        groups[group.name] = group_to_dict(group)
        return attrs.evolve(self, groups=groups, removed_groups=self.removed_groups - {group.name})

    def without_group(self, name: str, *, configured: bool = True) -> ControlState:
        """Forget group ``name``; a ``configured`` one is remembered as removed."""
        groups = dict(self.groups)
        groups.pop(name, None)
        removed = self.removed_groups | {name} if configured else self.removed_groups - {name}
        return attrs.evolve(self, groups=groups, removed_groups=removed)

    def reverted(self, kind: str, name: str, earlier: ControlState) -> ControlState:
        """This state with ``name``'s entries (``kind`` "provider" or "group") as they were in ``earlier``."""
        if kind == "provider":
            entries, removed = dict(self.providers), set(self.removed_providers)
            old_entries, old_removed = earlier.providers, earlier.removed_providers
        else:
            entries, removed = dict(self.groups), set(self.removed_groups)
            old_entries, old_removed = earlier.groups, earlier.removed_groups
        entries.pop(name, None)
        removed.discard(name)
        if name in old_entries:
            entries[name] = old_entries[name]
        if name in old_removed:
            removed.add(name)
        if kind == "provider":
            return attrs.evolve(self, providers=entries, removed_providers=removed)
        return attrs.evolve(self, groups=entries, removed_groups=removed)

    # -- overlay on the configuration ---------------------------------------------------------------

    def provider_specs(self, upstream_hosts: Collection[str] = ()) -> dict[str, ProviderSpec]:
        """The persisted providers, parsed; ControlStoreError names the first one that is not valid."""
        out = {}
        for name, data in self.providers.items():
            try:
                # Settings since retired were written by older versions: read the registration without them.
                spec = provider_spec_from_dict(_without_retired(data), upstream_hosts)
            except ConfigError as exc:
                raise ControlStoreError(f"persisted provider {name!r} is not valid: {'; '.join(exc.problems) or exc}")
            if spec.name != name:
                raise ControlStoreError(f"persisted provider {name!r} carries the name {spec.name!r}")
            out[name] = spec
        return out

    def catalog(self, configured: Iterable[ProviderSpec],
                upstream_hosts: Collection[str] = ()) -> dict[str, ProviderSpec]:
        """The providers to start with: configured ones not removed, overlaid by run-time ones, in that order."""
        out = {s.name: s for s in configured if s.name not in self.removed_providers}
        out.update(self.provider_specs(upstream_hosts))
        return out

    def groups_over(self, configured: Iterable[GroupSpec]) -> list[GroupSpec]:
        """The failover groups to start with: configured ones not removed, overlaid by run-time ones."""
        out = {g.name: g for g in configured if g.name not in self.removed_groups}
        for name, data in self.groups.items():
            try:
                group = GroupSpec(
                    name=data["name"], providers=tuple(data["providers"]), strategy=data["strategy"],
                    max_attempts=data["max_attempts"], health_threshold=data["health_threshold"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ControlStoreError(f"persisted failover group {name!r} is not valid: {exc}") from None
            out[name] = group
        return list(out.values())

    # -- wire form ------------------------------------------------------------------------------------

    def to_json(self) -> bytes:
        return orjson.dumps({
            "version": _VERSION,
            "providers": {k: dict(v) for k, v in sorted(self.providers.items())},
            "removed_providers": sorted(self.removed_providers),
            "groups": {k: dict(v) for k, v in sorted(self.groups.items())},
            "removed_groups": sorted(self.removed_groups),
        }, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, raw: bytes, where: str = FILE_NAME) -> ControlState:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ControlStoreError(f"{where} is not valid JSON ({exc.msg} at byte {exc.pos}); fix or remove it")
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ControlStoreError(f"{where} is not a version {_VERSION} control state document; fix or remove it")
        providers = data.get("providers", {})
        groups = data.get("groups", {})
        removed_p = data.get("removed_providers", [])
        removed_g = data.get("removed_groups", [])
        if not (isinstance(providers, dict) and all(isinstance(v, dict) for v in providers.values())
                and isinstance(groups, dict) and all(isinstance(v, dict) for v in groups.values())
                and isinstance(removed_p, list) and all(isinstance(v, str) for v in removed_p)
                and isinstance(removed_g, list) and all(isinstance(v, str) for v in removed_g)):
            raise ControlStoreError(f"{where} does not have the shape of a control state document; fix or remove it")
        state = cls(providers, removed_p, groups, removed_g)
        # Parse now, so that a bad entry stops the start with its name rather than surfacing later.
        state.provider_specs()
        state.groups_over(())
        return state


class ControlStore:
    """``control.json`` in a data directory, or (``database_url``) one document in Postgres (see
    :class:`runestone.storage.control.ControlDocument`). ``load`` is for start-up (synchronous, before the tree
    runs); ``save`` runs the file or database work in a thread. Callers serialise their ``save`` calls."""

    def __init__(self, data_dir: str | os.PathLike[str], *, database_url: str | None = None) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / FILE_NAME
        self._document = None
        #: With a database: why its document could not be read at start (None once read or written).
        self.degraded: str | None = None
        #: Where the state loaded came from: "database", "local copy", "nothing" (no copy) or "file".
        self.source = "file"
        #: The state last loaded or saved here (what the local copy holds).
        self._current = ControlState()
        #: The outbox, once read: {"origin": ..., "next": seq, "entries": [{"seq", "kind", "name"}, ...]}.
        self._outbox: dict | None = None
        self.outbox_path = self.dir / OUTBOX_NAME
        self._lock = trio.Lock()
        if database_url:
            from ..storage.control import ControlDocument

            self._document = ControlDocument(database_url)
            self.source = "database"
            self.path = self.dir / COPY_NAME

    @property
    def where(self) -> str:
        """Where the state is kept, as dumps may show it: the file, or the database url without credentials."""
        return str(self.path) if self._document is None else self._document.where

    def load(self) -> ControlState:
        """The persisted state, or an empty one when nothing was ever saved.

        With a database that cannot be read, the local copy of its document (``control.copy.json``, written
        after each read and save), or nothing; ``degraded`` says why."""
        if self._document is not None:
            self._read_outbox()
            try:
                if self.outbox:  # left by a previous run: merged first
                    self._current = self._read_file()
                    self._current = state = self._merge_sync()
                    return state
                raw = self._document.read()
            except self._document.failures as exc:
                self.degraded = f"cannot read the control state from {self._document.where}: {exc}"
                self._current = state = self._read_file()
                self.source = "local copy" if self.path.exists() else "nothing"
                return state
            self._current = state = ControlState() if raw is None else ControlState.from_json(raw, self._document.where)
            try:
                self._write(state.to_json())
            except ControlStoreError as exc:
                log.warning("the local copy of the control state was not written: %s", exc)
            return state
        return self._read_file()

    @property
    def outbox(self) -> int:
        """Changes waiting in the outbox for the database."""
        return len(self._outbox["entries"]) if self._outbox else 0

    @property
    def pending(self) -> bool:
        """The database has not taken everything yet: never read since start, or changes wait."""
        return self._document is not None and (self.degraded is not None or self.outbox > 0)

    def _read_outbox(self) -> dict:
        if self._outbox is None:
            try:
                data = orjson.loads(self.outbox_path.read_bytes())
                if not (isinstance(data, dict) and isinstance(data.get("origin"), str)
                        and isinstance(data.get("next"), int) and isinstance(data.get("entries"), list)):
                    raise ValueError("not an outbox")
            except FileNotFoundError:
                data = {"origin": uuid.uuid4().hex, "next": 1, "entries": []}
            except (OSError, ValueError) as exc:
                raise ControlStoreError(f"cannot read {self.outbox_path} ({exc}): fix or remove it") from None
            self._outbox = data
        return self._outbox

    def _queue(self, state: ControlState) -> None:
        """``state`` as the local copy, and the names it changes appended to the outbox (blocking)."""
        outbox = self._read_outbox()
        added = []
        for kind, name in _changed(self._current, state):
            added.append({"seq": outbox["next"], "kind": kind, "name": name})
            outbox["next"] += 1
        outbox["entries"].extend(added)
        try:
            self._write(orjson.dumps(outbox), self.outbox_path)
            self._write(state.to_json())
        except ControlStoreError:
            del outbox["entries"][len(outbox["entries"]) - len(added):]
            raise
        self._current = state

    def _merge_sync(self) -> ControlState:
        """Merge the outbox into the database's document (blocking; see the module docstring), make the
        result the local copy and empty the outbox; the merged state. The database's failures propagate."""
        outbox = self._read_outbox()
        entries = {e["seq"]: e for e in outbox["entries"]}
        local, where = self._current, self._document.where

        def change(doc: bytes | None, todo: list[int]) -> bytes:
            state = ControlState() if doc is None else ControlState.from_json(doc, where)
            for seq in todo:
                state = state.reverted(entries[seq]["kind"], entries[seq]["name"], local)
            return state.to_json()

        raw = self._document.merge(outbox["origin"], sorted(entries), change)
        state = ControlState() if raw is None else ControlState.from_json(raw, where)
        self.degraded = None
        self.source = "database"
        log.warning("the control state's database took the %d change(s) that waited in the local outbox",
                    len(entries))
        outbox["entries"] = [e for e in outbox["entries"] if e["seq"] not in entries]
        try:
            self._write(state.to_json())
            self._write(orjson.dumps(outbox), self.outbox_path)
        except ControlStoreError as exc:  # merged once: a retry skips the entries by (origin, seq)
            log.warning("the local copy of the control state was not written: %s", exc)
        self._current = state
        return state

    def _read_file(self) -> ControlState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ControlState()
        except OSError as exc:
            raise ControlStoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return ControlState.from_json(raw, str(self.path))

    async def save(self, state: ControlState) -> None:
        """Replace the file (or the database's document) with ``state``, atomically. Raises ControlStoreError;
        the old one is then kept.

        The write runs in a worker thread and is not abandoned on cancellation: once begun, the file
        ends up either old or new, and the caller learns which by whether this returned.
        """
        data = state.to_json()
        if self._document is None:
            await trio.to_thread.run_sync(self._write, data)
            return
        with trio.CancelScope(shield=True):
            async with self._lock:
                if not self.pending:
                    try:
                        await trio.to_thread.run_sync(self._document.write, data)
                    except self._document.failures as exc:
                        log.warning("cannot write the control state to %s (%s): the change is in force here and "
                                    "waits in the local outbox", self._document.where, exc)
                    else:
                        self._current = state
                        try:
                            await trio.to_thread.run_sync(self._write, data)
                        except ControlStoreError as exc:
                            log.warning("the local copy of the control state was not written: %s", exc)
                        return
                await trio.to_thread.run_sync(self._queue, state)

    async def recheck(self) -> ControlState | None:
        """While :attr:`pending`: try the database again (merging the outbox into its document, or reading it
        when nothing waits); the state it then holds, to be made this instance's, or None while it cannot
        answer. ControlStoreError when its document is not valid."""
        async with self._lock:
            if not self.pending:
                return None
            try:
                return await trio.to_thread.run_sync(self._recheck_sync)
            except self._document.failures as exc:
                self.degraded = self.degraded and f"cannot read the control state from {self._document.where}: {exc}"
                return None

    def _recheck_sync(self) -> ControlState:
        if self.outbox:
            return self._merge_sync()
        raw = self._document.read()
        state = ControlState() if raw is None else ControlState.from_json(raw, self._document.where)
        self.degraded = None
        self.source = "database"
        self._write(state.to_json())
        self._current = state
        return state

    def _write(self, data: bytes, path: Path | None = None) -> None:
        """``data`` as the file at ``path`` (the state's file by default), replaced atomically and on disk."""
        path = self.path if path is None else path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            # The rename itself must reach the disk too, or a crash could bring the old file back.
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ControlStoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def _changed(old: ControlState, new: ControlState) -> list[tuple[str, str]]:
    """The (kind, name) whose entries differ between ``old`` and ``new``, sorted."""
    out = []
    for kind, a, b, ra, rb in (("provider", old.providers, new.providers, old.removed_providers, new.removed_providers),
                               ("group", old.groups, new.groups, old.removed_groups, new.removed_groups)):
        for name in sorted(set(a) | set(b) | ra | rb):
            if a.get(name) != b.get(name) or (name in ra) != (name in rb):
                out.append((kind, name))
    return out
