"""``runestone keys|teams ...``: managed keys and teams of a running gateway, over the control socket.

Same connection, options and exit statuses as the other operator commands (runestone.control.cli). A new
or rotated key's secret is printed once, on its own line, and is nowhere to be found afterwards.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from ..control.cli import CliError, _control, _out, _run, _table

__all__ = ["add_key_commands"]


def _budget(args) -> dict | None:
    if args.budget_usd is None:
        if args.period is not None:
            raise CliError(2, "--period needs --budget-usd")
        return None
    return {"usd": args.budget_usd, "period": args.period or "month"}


def _limits(args) -> dict | None:
    limits = {k: getattr(args, k) for k in ("rpm", "rph", "tpm", "max_concurrent") if getattr(args, k) is not None}
    return limits or None


def _fields(args, team: bool) -> dict:
    out: dict[str, Any] = {}
    if args.json:
        try:
            out = orjson.loads(args.json)
        except orjson.JSONDecodeError as exc:
            raise CliError(2, f"--json is not valid JSON: {exc.msg}") from None
        if not isinstance(out, dict):
            raise CliError(2, "--json must be a JSON object")
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if _budget(args) is not None:
        out["budget"] = _budget(args)
    if _limits(args) is not None:
        out["limits"] = _limits(args)
    if not team:
        if args.team is not None:
            out["team"] = args.team or None
        if args.expires_at is not None:
            out["expires_at"] = args.expires_at
    return out


def _money(spend: dict | None) -> str:
    if not spend:
        return "-"
    left = spend.get("remaining_usd")
    return f"${spend['spent_usd']:.4f}" + (f" (${left:.4f} left, {spend['period']})" if left is not None else "")


def _print(obj, args) -> None:
    _out(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())


async def keys_list(args) -> None:
    async with _control(args) as s:
        rows = await s.request("list_keys")
    if args.json:
        return _print(rows, args)
    _table([[k["id"], k["name"], k["team"] or "-", k["status"], _money(k.get("spend"))] for k in rows],
           ["ID", "NAME", "TEAM", "STATUS", "SPEND"])


async def keys_create(args) -> None:
    fields = _fields(args, team=False)
    fields["name"] = args.name
    async with _control(args) as s:
        got = await s.request("create_key", key=fields)
    _out(f"created key {got['id']} ({got['name']}); its secret, shown this once:")
    _out(got["secret"])


async def keys_show(args) -> None:
    async with _control(args) as s:
        _print(await s.request("get_key", key_id=args.id), args)


async def keys_update(args) -> None:
    fields = _fields(args, team=False)
    if args.name is not None:
        fields["name"] = args.name
    if not fields:
        raise CliError(2, "keys update needs something to change (see --help)")
    async with _control(args) as s:
        _print(await s.request("update_key", key_id=args.id, key=fields), args)


async def keys_rotate(args) -> None:
    async with _control(args) as s:
        got = await s.request("rotate_key", key_id=args.id, grace_ms=args.grace_ms)
    until = got.get("previous_secret_valid_until")
    _out(f"rotated key {got['id']}" + (f"; the old secret works until {until}" if until else "; the old secret no "
                                        "longer works") + "; the new secret, shown this once:")
    _out(got["secret"])


async def keys_revoke(args) -> None:
    async with _control(args) as s:
        await s.request("revoke_key", key_id=args.id)
    _out(f"revoked key {args.id}")


async def teams_list(args) -> None:
    async with _control(args) as s:
        rows = await s.request("list_teams")
    if args.json:
        return _print(rows, args)
    _table([[t["name"], str(len(t["keys"])), ",".join(t["models"]) if t["models"] is not None else "(all)",
             _money(t.get("spend"))] for t in rows], ["TEAM", "KEYS", "MODELS", "SPEND"])


async def teams_create(args) -> None:
    fields = _fields(args, team=True)
    fields["name"] = args.name
    async with _control(args) as s:
        got = await s.request("create_team", team=fields)
    _out(f"created team {got['name']}")


async def teams_show(args) -> None:
    async with _control(args) as s:
        _print(await s.request("get_team", name=args.name), args)


async def teams_update(args) -> None:
    fields = _fields(args, team=True)
    if not fields:
        raise CliError(2, "teams update needs something to change (see --help)")
    async with _control(args) as s:
        _print(await s.request("update_team", name=args.name, team=fields), args)


async def teams_delete(args) -> None:
    async with _control(args) as s:
        await s.request("delete_team", name=args.name)
    _out(f"deleted team {args.name}")


def add_key_commands(sub, admin: argparse.ArgumentParser) -> None:
    """Add ``keys`` and ``teams``; ``admin`` is the parent parser with --url, --timeout and --admin-key."""
    shaping = argparse.ArgumentParser(add_help=False)
    shaping.add_argument("--models", help="comma-separated allow-list (prefix* matches a prefix)")
    shaping.add_argument("--budget-usd", type=float, help="the budget in USD per --period")
    shaping.add_argument("--period", choices=["day", "week", "month", "total"], help="budget period (default month)")
    for limit in ("rpm", "rph", "tpm"):
        shaping.add_argument(f"--{limit}", type=int)
    shaping.add_argument("--max-concurrent", dest="max_concurrent", type=int)
    shaping.add_argument("--json", help="fields as a JSON object (the options above win)")
    key_only = argparse.ArgumentParser(add_help=False, parents=[shaping])
    key_only.add_argument("--team", help="the key's team ('' for none)")
    key_only.add_argument("--expires-at", help="Unix seconds or ISO 8601 UTC")

    k = sub.add_parser("keys", help="managed client keys of a running gateway")
    ks = k.add_subparsers(dest="action", required=True)
    c = ks.add_parser("list", parents=[admin], help="every managed key (no secrets)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_run(keys_list))
    c = ks.add_parser("create", parents=[admin, key_only], help="issue a key; prints its secret once")
    c.add_argument("name")
    c.set_defaults(func=_run(keys_create))
    c = ks.add_parser("show", parents=[admin], help="one key with its spend")
    c.add_argument("id")
    c.set_defaults(func=_run(keys_show))
    c = ks.add_parser("update", parents=[admin, key_only], help="change a key")
    c.add_argument("id")
    c.add_argument("--name")
    c.set_defaults(func=_run(keys_update))
    c = ks.add_parser("rotate", parents=[admin], help="a new secret; the old one works --grace-ms more")
    c.add_argument("id")
    c.add_argument("--grace-ms", type=int, default=0)
    c.set_defaults(func=_run(keys_rotate))
    c = ks.add_parser("revoke", parents=[admin], help="revoke a key at once")
    c.add_argument("id")
    c.set_defaults(func=_run(keys_revoke))

    t = sub.add_parser("teams", help="teams of managed keys of a running gateway")
    ts = t.add_subparsers(dest="action", required=True)
    c = ts.add_parser("list", parents=[admin], help="every team with its spend")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_run(teams_list))
    c = ts.add_parser("create", parents=[admin, shaping], help="create a team")
    c.add_argument("name")
    c.set_defaults(func=_run(teams_create))
    c = ts.add_parser("show", parents=[admin], help="one team with its keys and spend")
    c.add_argument("name")
    c.set_defaults(func=_run(teams_show))
    c = ts.add_parser("update", parents=[admin, shaping], help="change a team")
    c.add_argument("name")
    c.set_defaults(func=_run(teams_update))
    c = ts.add_parser("delete", parents=[admin], help="delete a team with no active keys")
    c.add_argument("name")
    c.set_defaults(func=_run(teams_delete))
