"""The operator's commands against a live gateway: ``runestone providers|groups|state|chat|events`` (and
``keys|teams``, in runestone.governance.cli).

Each command is a short-lived WebSocket client (trio-websocket) of the gateway: the control socket
``/v1/control`` with the admin key for providers, groups, state and the event feed, and ``/v1/ws`` with a
client key for ``chat``, whose tokens are printed as they arrive. ``--url`` (default ``$RUNESTONE_URL`` or
``http://127.0.0.1:4003``), ``--admin-key`` (``$RUNESTONE_ADMIN_KEY``) and ``--api-key``
(``$RUNESTONE_API_KEY``) say where and as whom. Results go to stdout; a failure is one line on stderr
and the exit status says what kind: 0 done, 1 the gateway refused (the line says why), 2 bad usage,
3 the gateway could not be reached or dropped the connection, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import orjson
import trio
import trio_websocket

from ..config import FAILOVER_STRATEGY_REGISTRY

__all__ = ["add_control_commands", "CliError", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:4003"
REFUSED, UNREACHABLE = 1, 3


class CliError(Exception):
    """A command failed: ``status`` is the exit status, the message the one line shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _out(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _ws_url(base: str, path: str) -> str:
    base = base.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    elif not base.startswith(("ws://", "wss://")):
        raise CliError(2, f"--url must start with http:// or https:// (got {base!r})")
    return base + path


def _rejection(exc: trio_websocket.ConnectionRejected) -> str:
    try:
        message = orjson.loads(exc.body or b"")["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = (exc.body or b"").decode("utf-8", "replace").strip()[:200] or "no reason given"
    return f"the gateway refused the connection ({exc.status_code}): {message}"


class Session:
    """One WebSocket to the gateway: requests by id, replies matched to them, other messages passed by."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self._next = 0

    async def send(self, message: dict) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())

    async def receive(self) -> dict:
        try:
            raw = await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            detail = f" ({reason.code}: {reason.reason})" if reason is not None and reason.reason else ""
            raise CliError(UNREACHABLE, f"the gateway closed the connection{detail}") from None
        return orjson.loads(raw)

    async def request(self, op: str, **fields: Any) -> Any:
        """Run one control operation; its result, or CliError with the gateway's reason."""
        self._next += 1
        rid = f"cli-{self._next}"
        await self.send({"type": op, "id": rid, **fields})
        while True:
            msg = await self.receive()
            if msg.get("id") != rid and msg.get("id") is not None:
                continue
            if msg.get("type") == "result":
                return msg.get("result")
            if msg.get("type") == "error":
                raise _refusal(msg)


def _refusal(msg: dict) -> CliError:
    error = msg.get("error") or {}
    message = error.get("message") or "the gateway refused the request"
    if error.get("code") == "authentication_required":
        message = "the gateway needs a key: pass --admin-key/--api-key or set RUNESTONE_ADMIN_KEY/RUNESTONE_API_KEY"
    return CliError(REFUSED, message)


class _Connect:
    """``async with _Connect(args, path, key) as session``: connect, or fail with a one-line CliError."""

    def __init__(self, args, path: str, key: str | None) -> None:
        self.url = _ws_url(args.url or os.environ.get("RUNESTONE_URL") or DEFAULT_URL, path)
        self.headers = [(b"authorization", b"Bearer " + key.encode())] if key else []
        self.timeout = args.timeout
        self._cm = None

    async def __aenter__(self) -> Session:
        self._cm = trio_websocket.open_websocket_url(self.url, extra_headers=self.headers,
                                                     connect_timeout=self.timeout, disconnect_timeout=2)
        try:
            ws = await self._cm.__aenter__()
        except trio_websocket.ConnectionRejected as exc:
            raise CliError(REFUSED, _rejection(exc)) from None
        except (OSError, trio_websocket.HandshakeError) as exc:
            # trio-websocket wraps the socket error; its text is on the cause.
            reason = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
            raise CliError(UNREACHABLE, f"cannot connect to {self.url}: {reason}") from None
        return Session(ws)

    async def __aexit__(self, *exc_info) -> bool:
        try:
            return await self._cm.__aexit__(*exc_info)
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError):
            # The work is done; a messy goodbye is not worth a failure status.
            return False


def _admin_key(args) -> str | None:
    return args.admin_key or os.environ.get("RUNESTONE_ADMIN_KEY") or None


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get("RUNESTONE_API_KEY") or None


def _control(args):
    return _Connect(args, "/v1/control", _admin_key(args))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _out("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(2, f"--set takes KEY=VALUE (got {pair!r})")
        out[key.strip()] = _value(value)
    return out


# -- commands -------------------------------------------------------------------------------------------


async def providers_list(args) -> None:
    async with _control(args) as s:
        rows = await s.request("list_providers")
    if args.json:
        _out(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    _table([[p["name"], p["type"], p["status"], p["circuit_state"], str(p["in_flight"]), ",".join(p["models"])]
            for p in rows], ["NAME", "TYPE", "STATUS", "CIRCUIT", "IN-FLIGHT", "MODELS"])


def _provider_from_args(args) -> dict:
    if args.json:
        try:
            provider = orjson.loads(args.json)
        except orjson.JSONDecodeError as exc:
            raise CliError(2, f"--json is not valid JSON: {exc.msg}") from None
        if not isinstance(provider, dict):
            raise CliError(2, "--json must be a provider object {\"name\", \"type\", \"config\"}")
        provider.setdefault("name", args.name)
        return provider
    if not args.type:
        raise CliError(2, "providers add needs --type (openai, anthropic or fake) or --json")
    config = _settings(args.set)
    if args.base_url:
        config["base_url"] = args.base_url
    key = args.key or (os.environ.get(args.key_env) if args.key_env else None)
    if args.key_env and not key:
        raise CliError(2, f"--key-env names {args.key_env}, which is not set")
    if key:
        config["api_key"] = key
    if args.models:
        config["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return {"name": args.name, "type": args.type, "config": config}


async def providers_add(args) -> None:
    provider = _provider_from_args(args)
    async with _control(args) as s:
        got = await s.request("register_provider", provider=provider)
    _out(f"registered provider {got['name']} ({got['type']}; models: {', '.join(got['models']) or 'none'})")


async def providers_remove(args) -> None:
    fields = {"name": args.name}
    if args.grace_ms is not None:
        fields["grace_ms"] = args.grace_ms
    async with _control(args) as s:
        got = await s.request("unregister_provider", **fields)
    if got["drained"]:
        _out(f"unregistered provider {got['name']} (drained)")
    else:
        _out(f"unregistered provider {got['name']} ({got['in_flight_left']} request(s) were still in flight when "
             "the grace ran out)")


async def groups_list(args) -> None:
    async with _control(args) as s:
        rows = await s.request("list_groups")
    if args.json:
        _out(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    _table([[g["name"], g["strategy"], str(g["max_attempts"]), ",".join(g["providers"]) or "(all)",
             str((g.get("stats") or {}).get("group", {}).get("requests", 0))] for g in rows],
           ["NAME", "STRATEGY", "MAX-ATTEMPTS", "PROVIDERS", "REQUESTS"])


async def groups_add(args) -> None:
    group: dict[str, Any] = {"name": args.name, "providers": [p.strip() for p in args.providers.split(",") if p.strip()]}
    if args.strategy:
        group["strategy"] = args.strategy
    if args.max_attempts is not None:
        group["max_attempts"] = args.max_attempts
    if args.health_threshold is not None:
        group["health_threshold"] = args.health_threshold
    async with _control(args) as s:
        got = await s.request("create_group", group=group)
    _out(f"created group {got['name']} ({got['strategy']}: {', '.join(got['providers'])})")


async def groups_remove(args) -> None:
    async with _control(args) as s:
        await s.request("delete_group", name=args.name)
    _out(f"deleted group {args.name}")


async def state(args) -> None:
    async with _control(args) as s:
        if not args.watch:
            dump = await s.request("dump_state")
            _out(orjson.dumps(dump, option=orjson.OPT_INDENT_2).decode())
            return
        shown = 0
        while args.count is None or shown < args.count:
            if shown:
                await trio.sleep(args.interval)
            providers = await s.request("list_providers")
            dump = await s.request("dump_state")
            sender = dump.get("telemetry_sender") or {}
            in_flight = sum((sender.get("in_flight") or {}).values())
            _out(f"--- {time.strftime('%H:%M:%S')}  requests in flight: {in_flight}  "
                 f"telemetry events dropped: {sender.get('dropped', 0)}")
            _table([[p["name"], p["status"], p["circuit_state"], str(p["in_flight"])] for p in providers],
                   ["PROVIDER", "STATUS", "CIRCUIT", "IN-FLIGHT"])
            shown += 1


async def chat(args) -> None:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    request: dict[str, Any] = {"model": args.model, "messages": messages}
    if args.max_tokens is not None:
        request["max_tokens"] = args.max_tokens
    async with _Connect(args, "/v1/ws", _api_key(args)) as s:
        await s.send({"type": "chat", "id": "cli", "request": request})
        while True:
            msg = await s.receive()
            kind = msg.get("type")
            if kind == "chunk":
                for choice in msg["chunk"].get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        _out(text, end="")
            elif kind == "done":
                _out()
                usage = msg.get("usage") or {}
                print(f"[{msg.get('provider')}/{msg.get('model')}: {usage.get('prompt_tokens', 0)} prompt + "
                      f"{usage.get('completion_tokens', 0)} completion tokens]", file=sys.stderr)
                return
            elif kind == "error":
                if msg.get("id") == "cli":
                    _out()
                raise _refusal(msg)


async def events(args) -> None:
    async with _control(args) as s:
        await s.request("subscribe")
        seen = 0
        while args.count is None or seen < args.count:
            msg = await s.receive()
            if msg.get("type") == "event":
                _out(orjson.dumps(msg["event"]).decode())
                seen += 1


# -- wiring ---------------------------------------------------------------------------------------------


def _run(command):
    def run(args) -> int:
        try:
            trio.run(command, args)
        except CliError as exc:
            print(f"runestone: {exc}", file=sys.stderr)
            return exc.status
        except KeyboardInterrupt:
            return 130
        return 0

    return run


def add_control_commands(sub) -> None:
    """Add ``providers``, ``groups``, ``state``, ``chat`` and ``events`` to the ``runestone`` subcommands."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--url", help=f"the gateway (default: $RUNESTONE_URL or {DEFAULT_URL})")
    where.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the connection")
    admin = argparse.ArgumentParser(add_help=False, parents=[where])
    admin.add_argument("--admin-key", help="the admin key (default: $RUNESTONE_ADMIN_KEY)")
    client = argparse.ArgumentParser(add_help=False, parents=[where])
    client.add_argument("--api-key", help="a client API key (default: $RUNESTONE_API_KEY)")

    p = sub.add_parser("providers", help="list, add or remove providers of a running gateway")
    ps = p.add_subparsers(dest="action", required=True)
    c = ps.add_parser("list", parents=[admin], help="the registered providers")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_run(providers_list))
    c = ps.add_parser("add", parents=[admin], help="register a provider (nothing else restarts)")
    c.add_argument("name")
    c.add_argument("--type", choices=["openai", "anthropic", "fake"])
    c.add_argument("--base-url")
    c.add_argument("--key", help="the provider's API key (prefer --key-env: command lines are visible)")
    c.add_argument("--key-env", metavar="VAR", help="read the provider's API key from this environment variable")
    c.add_argument("--models", help="comma-separated model names it serves")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other provider setting (repeatable)")
    c.add_argument("--json", help="the whole provider as JSON instead of the options above")
    c.set_defaults(func=_run(providers_add))
    c = ps.add_parser("remove", parents=[admin], help="drain and unregister a provider")
    c.add_argument("name")
    c.add_argument("--grace-ms", type=int, help="how long its requests in flight may take to finish")
    c.set_defaults(func=_run(providers_remove))

    g = sub.add_parser("groups", help="list, add or remove failover groups of a running gateway")
    gs = g.add_subparsers(dest="action", required=True)
    c = gs.add_parser("list", parents=[admin], help="the failover groups and their counts")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_run(groups_list))
    c = gs.add_parser("add", parents=[admin], help="create a failover group")
    c.add_argument("name")
    c.add_argument("--providers", required=True, help="comma-separated provider names, in order")
    c.add_argument("--strategy", help="how the group orders its providers: " + ", ".join(FAILOVER_STRATEGY_REGISTRY)
                   + " (default: [failover] strategy)")
    c.add_argument("--max-attempts", type=int)
    c.add_argument("--health-threshold", type=float)
    c.set_defaults(func=_run(groups_add))
    c = gs.add_parser("remove", parents=[admin], help="delete a failover group")
    c.add_argument("name")
    c.set_defaults(func=_run(groups_remove))

    c = sub.add_parser("state", parents=[admin], help="the live state dump of a running gateway")
    c.add_argument("--watch", action="store_true", help="a provider summary every --interval seconds")
    c.add_argument("--interval", type=float, default=2.0)
    c.add_argument("--count", type=int, help="with --watch: stop after this many summaries")
    c.set_defaults(func=_run(state))

    c = sub.add_parser("chat", parents=[client], help="stream one answer to the terminal over /v1/ws")
    c.add_argument("prompt")
    c.add_argument("--model", default=os.environ.get("RUNESTONE_MODEL", "default"),
                   help="a model, provider:model or failover group (default: the default group)")
    c.add_argument("--system", help="a system message")
    c.add_argument("--max-tokens", type=int)
    c.set_defaults(func=_run(chat))

    c = sub.add_parser("events", parents=[admin], help="tail the live telemetry events (one JSON per line)")
    c.add_argument("--count", type=int, help="stop after this many events")
    c.set_defaults(func=_run(events))

    from ..governance.cli import add_key_commands

    add_key_commands(sub, admin)
