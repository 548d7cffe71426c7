"""Keys and teams as data: frozen records, parsed from the admin API's JSON and dumped back without secrets.

A managed key is known by its id (``key_`` + 12 random hex digits); its secret is shown once, when it is
made or rotated, and kept only as its SHA-256 digest (secrets are 32 random bytes, so a fast hash is as
safe as a slow one: there is no dictionary to search). A rotated key keeps its previous digest until
``previous_until``. Money is kept in nano-USD integers (:data:`NANO` per dollar), so that adding up
reservations is exact and "exactly ten fit" means ten.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

import attrs
import orjson

from ..front.limits import LimitValues
from ..routing.errors import GatewayError
from .periods import PERIODS, iso

__all__ = ["NANO", "Budget", "KeyRecord", "Team", "allows", "parse_key", "parse_key_patch", "parse_team",
           "parse_team_patch", "usd"]

#: Nano-USD per USD: budgets, reservations and spend are integers of these.
NANO = 1_000_000_000
MAX_NAME = 128
MAX_MODELS = 256
MAX_METADATA_BYTES = 4096
#: The largest budget a key or team may have, in USD.
MAX_USD = 1e9
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_KEY_FIELDS = frozenset({"name", "team", "models", "budget", "limits", "expires_at", "metadata"})
_TEAM_FIELDS = frozenset({"name", "models", "budget", "limits"})
_LIMIT_FIELDS = ("rpm", "rph", "tpm", "max_concurrent")
NO_LIMITS = LimitValues()


def usd(nano: int | float) -> float:
    """Nano-USD as USD."""
    return nano / NANO


@attrs.frozen
class Budget:
    """``usd`` to spend per ``period`` (day, week, month, total)."""

    nano: int
    period: str

    def to_dict(self) -> dict:
        return {"usd": usd(self.nano), "period": self.period}


@attrs.frozen
class Team:
    name: str
    models: tuple[str, ...] | None = None
    budget: Budget | None = None
    limits: LimitValues = NO_LIMITS
    created_at: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "models": list(self.models) if self.models is not None else None,
                "budget": self.budget.to_dict() if self.budget else None, "limits": _limits_dict(self.limits),
                "created_at": iso(self.created_at)}

    def to_doc(self) -> dict:
        return {**self.to_dict(), "created_at": self.created_at}


@attrs.frozen
class KeyRecord:
    id: str
    name: str
    digest: bytes = attrs.field(repr=False)
    team: str | None = None
    models: tuple[str, ...] | None = None
    budget: Budget | None = None
    limits: LimitValues = NO_LIMITS
    expires_at: float | None = None
    metadata: dict = attrs.field(factory=dict, hash=False)
    created_at: float = 0.0
    revoked_at: float | None = None
    previous_digest: bytes | None = attrs.field(default=None, repr=False)
    previous_until: float | None = None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_dict(self, now: float) -> dict:
        """The key as listings show it: no secret, no digest."""
        return {"id": self.id, "object": "api_key", "name": self.name, "team": self.team,
                "models": list(self.models) if self.models is not None else None,
                "budget": self.budget.to_dict() if self.budget else None, "limits": _limits_dict(self.limits),
                "expires_at": iso(self.expires_at), "metadata": self.metadata, "created_at": iso(self.created_at),
                "revoked_at": iso(self.revoked_at), "status": self.status(now),
                "previous_secret_valid_until": iso(self.previous_until)
                if self.previous_until is not None and now < self.previous_until else None}

    def to_doc(self) -> dict:
        """What the store keeps (digests as hex; no secret exists to keep)."""
        return {"id": self.id, "name": self.name, "digest": self.digest.hex(), "team": self.team,
                "models": list(self.models) if self.models is not None else None,
                "budget": self.budget.to_dict() if self.budget else None, "limits": _limits_dict(self.limits),
                "expires_at": self.expires_at, "metadata": self.metadata, "created_at": self.created_at,
                "revoked_at": self.revoked_at,
                "previous_digest": self.previous_digest.hex() if self.previous_digest else None,
                "previous_until": self.previous_until}


def _limits_dict(limits: LimitValues) -> dict:
    return {f: getattr(limits, f) for f in _LIMIT_FIELDS}


def allows(models: tuple[str, ...] | None, model: str) -> bool:
    """Is ``model`` on the allow-list ``models`` (None: every model; ``prefix*`` entries match prefixes)?"""
    if models is None:
        return True
    for m in models:
        if m == model or (m.endswith("*") and model.startswith(m[:-1])):
            return True
    return False


# -- parsing ------------------------------------------------------------------------------------------------


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _bad(f"'name' must name the {what}: 1 to {MAX_NAME} letters, digits or ._:@- (starting with a letter "
                   "or digit)", "name")
    return value


def _key_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or not value.isprintable():
        raise _bad(f"'name' must be a non-empty printable string of at most {MAX_NAME} characters", "name")
    return value


def _models(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) > MAX_MODELS
            or not all(isinstance(m, str) and 0 < len(m) <= 512 for m in value)):
        raise _bad(f"'models' must be a list of at most {MAX_MODELS} model names (\"prefix*\" matches a prefix), or "
                   "null for every model", "models")
    return tuple(dict.fromkeys(value))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _budget(value: Any) -> Budget | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"usd", "period"} or "usd" not in value:
        raise _bad("'budget' must be {\"usd\": <dollars>, \"period\": \"day\"|\"week\"|\"month\"|\"total\"} or null",
                   "budget")
    amount = value["usd"]
    if not _number(amount) or not 0 <= amount <= MAX_USD:
        raise _bad(f"'budget.usd' must be a number of dollars between 0 and {MAX_USD:g}", "budget.usd")
    period = value.get("period", "month")
    if period not in PERIODS:
        raise _bad(f"'budget.period' must be one of {', '.join(PERIODS)}", "budget.period")
    return Budget(round(amount * NANO), period)


def _limits(value: Any) -> LimitValues:
    if value is None:
        return NO_LIMITS
    if not isinstance(value, dict):
        raise _bad("'limits' must be an object {\"rpm\", \"rph\", \"tpm\", \"max_concurrent\"} (0 = off)", "limits")
    unknown = sorted(set(value) - set(_LIMIT_FIELDS))
    if unknown:
        raise _bad(f"unknown limit(s) {', '.join(unknown)}: limits are {', '.join(_LIMIT_FIELDS)}", f"limits.{unknown[0]}")
    out = {}
    for f in _LIMIT_FIELDS:
        v = value.get(f, 0)
        if v is None:
            v = 0
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 10**9:
            raise _bad(f"'limits.{f}' must be an integer between 0 (off) and 1000000000", f"limits.{f}")
        out[f] = v
    return LimitValues(**out)


def _expires(value: Any) -> float | None:
    if value is None:
        return None
    if _number(value) and 0 < value < 1e11:
        return float(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    raise _bad("'expires_at' must be a time: Unix seconds or ISO 8601 (\"2030-01-31T00:00:00Z\"), or null", "expires_at")


def _metadata(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("'metadata' must be an object", "metadata")
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        raise _bad("'metadata' must be plain JSON", "metadata") from None
    if size > MAX_METADATA_BYTES:
        raise _bad(f"'metadata' must be at most {MAX_METADATA_BYTES} bytes of JSON", "metadata")
    return value


def _object(data: Any, fields: frozenset, what: str) -> dict:
    if not isinstance(data, dict):
        raise _bad(f"a {what} must be a JSON object with {', '.join(sorted(fields))}", what)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise _bad(f"unknown {what} field(s) {', '.join(unknown)}: a {what} has {', '.join(sorted(fields))}",
                   unknown[0])
    return data


def _team_ref(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not _NAME.match(value)):
        raise _bad("'team' must be a team's name or null", "team")
    return value


_KEY_PARSERS = {"name": _key_name, "team": _team_ref, "models": _models, "budget": _budget, "limits": _limits,
                "expires_at": _expires, "metadata": _metadata}
_TEAM_PARSERS = {"models": _models, "budget": _budget, "limits": _limits}


def parse_key(data: Any) -> dict:
    """The fields of a new key (``name`` required), parsed; a 400 naming the first wrong one."""
    data = _object(data, _KEY_FIELDS, "key")
    if "name" not in data:
        raise _bad("a key needs a 'name'", "name")
    return {f: _KEY_PARSERS[f](data.get(f)) for f in _KEY_FIELDS}


def parse_key_patch(data: Any) -> dict:
    """The fields a PATCH changes (null clears), parsed."""
    data = _object(data, _KEY_FIELDS, "key")
    return {f: _KEY_PARSERS[f](v) for f, v in data.items()}


def parse_team(data: Any) -> dict:
    data = _object(data, _TEAM_FIELDS, "team")
    return {"name": _name(data.get("name"), "team"), **{f: p(data.get(f)) for f, p in _TEAM_PARSERS.items()}}


def parse_team_patch(data: Any) -> dict:
    data = _object(data, _TEAM_FIELDS, "team")
    if "name" in data:
        raise _bad("a team cannot be renamed; create a new one and move its keys", "name")
    return {f: _TEAM_PARSERS[f](v) for f, v in data.items()}


# -- the store's documents -----------------------------------------------------------------------------------


def _budget_doc(doc: dict | None) -> Budget | None:
    return Budget(round(doc["usd"] * NANO), doc["period"]) if doc else None


def team_from_doc(doc: dict) -> Team:
    return Team(doc["name"], tuple(doc["models"]) if doc.get("models") is not None else None,
                _budget_doc(doc.get("budget")), LimitValues(**(doc.get("limits") or {})),
                float(doc.get("created_at") or 0.0))


def key_from_doc(doc: dict) -> KeyRecord:
    prev = doc.get("previous_digest")
    return KeyRecord(
        doc["id"], doc["name"], bytes.fromhex(doc["digest"]), doc.get("team"),
        tuple(doc["models"]) if doc.get("models") is not None else None, _budget_doc(doc.get("budget")),
        LimitValues(**(doc.get("limits") or {})), doc.get("expires_at"), doc.get("metadata") or {},
        float(doc.get("created_at") or 0.0), doc.get("revoked_at"), bytes.fromhex(prev) if prev else None,
        doc.get("previous_until"))
