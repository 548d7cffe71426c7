"""No secret leaves the gateway: state dumps (the dashboard's too), listings, live events, errors, log lines,
access-log lines and trace spans are searched for every client key, the admin key and every provider credential
after traffic and control operations."""

from runestone.telemetry.messages import Summary
import logging

import httpx
import orjson
import trio
import trio_websocket

from gatewaytest import provider_toml, start_otlp_receiver

SECRETS = {
    "client": "ck-SECRET-CLIENT-1111",
    "admin": "ak-SECRET-ADMIN-2222",
    "config_key": "sk-SECRET-CONFIG-3333",
    "runtime_key": "sk-SECRET-RUNTIME-4444",
    "url_password": "pw-SECRET-URL-5555",
    "proxy_password": "px-SECRET-PROXY-6666",
    "rejected_key": "sk-SECRET-REJECTED-7777",
    "updated_key": "sk-SECRET-UPDATED-8888",
}


#: Secrets of managed keys, learnt from the one answer that shows each (kept out of ``seen``).
MANAGED: dict[str, str] = {}


def _leaks(text: str) -> list[str]:
    return [name for name, secret in {**SECRETS, **MANAGED}.items() if secret in text]


async def test_no_secret_in_dumps_events_errors_or_logs(gateway_factory, fake_factory, caplog, nursery, tmp_path):
    caplog.set_level(logging.DEBUG)
    upstream, _ = await fake_factory()
    base = f"http://127.0.0.1:{upstream.port}"
    receiver = await start_otlp_receiver(nursery)
    access = tmp_path / "access.log"
    gw = await gateway_factory(
        f'[auth]\napi_keys = ["{SECRETS["client"]}"]\nadmin_key = "{SECRETS["admin"]}"\n'
        f'[log]\naccess = true\naccess_path = "{access}"\n[otel]\nendpoint = "{receiver.url}"\n'
        + provider_toml("cfg-openai", "openai", base_url=base + "/v1", api_key=SECRETS["config_key"],
                        models=["gpt-4o-mini"]))
    admin = {"authorization": f"Bearer {SECRETS['admin']}"}
    client = {"authorization": f"Bearer {SECRETS['client']}"}
    seen: list[str] = []  # every byte a client or operator received, as text
    events: list[dict] = []

    async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{gw.port}/v1/control", extra_headers=[(b"authorization", admin["authorization"].encode())]
    ) as control:
        await control.send_message(orjson.dumps({"type": "subscribe", "id": "s"}).decode())

        async def read_control():
            while True:
                raw = await control.get_message()
                seen.append(raw)
                msg = orjson.loads(raw)
                if msg["type"] == "event":
                    events.append(msg["event"])

        async with trio.open_nursery() as n:
            n.start_soon(read_control)
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
                async def call(method, path, **kw):
                    r = await http.request(method, path, **kw)
                    seen.append(r.text)
                    return r

                r = await call("POST", "/admin/providers", headers=admin, json={
                    "name": "rt-anthropic", "type": "anthropic",
                    "config": {"base_url": base, "api_key": SECRETS["runtime_key"], "models": ["claude-haiku-4-5"]}})
                assert r.status_code == 201, r.text
                # Credentials in a base URL are refused (send them as api_key), without echoing them.
                r = await call("POST", "/admin/providers", headers=admin, json={
                    "name": "url-credentials", "type": "fake",
                    "config": {"base_url": f"http://user:{SECRETS['url_password']}@example.invalid/v1"}})
                assert r.status_code == 400 and "base_url" in r.text, r.text
                r = await call("POST", "/admin/providers", headers=admin, json={
                    "name": "with-credentials", "type": "fake",
                    "config": {"base_url": "http://example.invalid/v1",
                               "proxy": f"http://proxy:{SECRETS['proxy_password']}@proxy.invalid:8080",
                               "transport": "httpx", "models": ["cred-model"]}})
                assert r.status_code == 201, r.text
                r = await call("POST", "/admin/providers", headers=admin, json={
                    "name": "bad", "type": "openai", "config": {"api_key": [SECRETS["rejected_key"]]}})
                assert r.status_code == 400
                r = await call("PATCH", "/admin/providers/rt-anthropic", headers=admin,
                               json={"config": {"api_key": SECRETS["updated_key"], "timeout_ms": "never"}})
                assert r.status_code == 400
                r = await call("PATCH", "/admin/providers/rt-anthropic", headers=admin,
                               json={"config": {"api_key": SECRETS["updated_key"]}})
                assert r.status_code == 200

                # Managed keys: the answers that show a secret are the only ones not searched.
                assert (await call("POST", "/admin/teams", headers=admin, json={
                    "name": "secret-team", "budget": {"usd": 5, "period": "day"}})).status_code == 201
                r = await http.post("/admin/keys", headers=admin, json={"name": "managed", "team": "secret-team",
                                                                       "budget": {"usd": 0.0, "period": "day"}})
                assert r.status_code == 201
                managed_id = r.json()["id"]
                MANAGED["managed_first"] = r.json()["secret"]
                r = await http.post(f"/admin/keys/{managed_id}/rotate", headers=admin, json={"grace_ms": 60_000})
                MANAGED["managed_rotated"] = r.json()["secret"]
                gone = (await http.post("/admin/keys", headers=admin, json={"name": "gone"})).json()
                MANAGED["managed_revoked"] = gone["secret"]
                assert (await call("DELETE", f"/admin/keys/{gone['id']}", headers=admin)).status_code == 200
                for secret in MANAGED.values():
                    key_headers = {"authorization": f"Bearer {secret}"}
                    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                    # A $0 budget: refused for its budget (both secrets), the revoked one for itself.
                    r = await call("POST", "/v1/chat/completions", headers=key_headers, json=chat)
                    assert r.status_code in (401, 429), r.text
                    await call("GET", "/v1/key", headers=key_headers)
                    await call("POST", "/v1/messages", headers={"x-api-key": secret}, json={
                        "model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 401
                await call("PATCH", f"/admin/keys/{managed_id}", headers=admin, json={"budget": {"usd": "x"}})
                await call("PATCH", f"/admin/keys/{managed_id}", headers=admin, json={"budget": None})
                assert (await call("POST", "/v1/chat/completions", headers={
                    "authorization": f"Bearer {MANAGED['managed_rotated']}"}, json=chat)).status_code == 200

                for model in ("gpt-4o-mini", "claude-haiku-4-5", "cred-model"):
                    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    assert (await call("POST", "/v1/chat/completions", headers=client, json=chat)).status_code == 200
                    r = await call("POST", "/v1/chat/completions", headers=client, json={**chat, "stream": True})
                    assert r.status_code == 200
                await call("POST", "/v1/chat/completions", headers={"authorization": "Bearer wrong-key"}, json={})
                await call("GET", "/admin/state", headers=client)
                async with trio_websocket.open_websocket_url(
                        f"ws://127.0.0.1:{gw.port}/v1/ws", extra_headers=[(b"authorization",
                                                                          client["authorization"].encode())]) as ws:
                    await ws.send_message(orjson.dumps({"type": "chat", "id": 1, "request": {
                        "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}}).decode())
                    while True:
                        raw = await ws.get_message()
                        seen.append(raw)
                        if orjson.loads(raw)["type"] != "chunk":
                            break

                for path in ("/admin/keys", f"/admin/keys/{managed_id}", "/admin/teams", "/admin/teams/secret-team",
                             "/v1/usage", "/admin/state", "/admin/providers", "/admin/providers/rt-anthropic",
                             "/admin/providers/with-credentials", "/admin/groups", "/health/detailed",
                             "/health/providers", "/metrics", "/dashboard/state"):
                    r = await call("GET", path, headers=admin)
                    assert r.status_code == 200, (path, r.text)
                state = (await call("GET", "/admin/state", headers=admin)).json()
                for op in ("dump_state", "list_keys", "list_teams", "list_providers"):
                    await control.send_message(orjson.dumps({"type": op, "id": op}).decode())
                assert (await call("DELETE", "/admin/providers/rt-anthropic", headers=admin)).status_code == 200
                await gw.app.registry.whereis("telemetry_handler").call(Summary())
            with trio.fail_after(60):  # only a hang trips this
                while not any(e["kind"] == "provider_unregistered" for e in events) or not any(
                        '"id":"list_providers"' in s for s in seen):
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()

    # The dumps are real: they show the providers and their redacted settings.
    providers = next(c for c in state["tree"]["children"] if c["id"] == "enhanced_provider_supervisor")
    snapshots = {c["id"]: c["snapshot"] for c in providers["children"]}
    assert snapshots["cfg-openai"]["config"]["api_key"] == "***"
    assert snapshots["with-credentials"]["config"]["proxy"] == "http://***@proxy.invalid:8080"
    assert {"request_finished", "attempt_finished", "provider_registered", "provider_unregistered"} <= {
        e["kind"] for e in events}
    # The secrets were really in use: the runtime provider served with its (updated) key.
    assert gw.app.config.auth.admin_key == SECRETS["admin"]
    assert not _leaks("\n".join(seen)), "a secret reached a client or an operator"
    assert not _leaks(orjson.dumps(events).decode()), "a secret is in the event feed"
    assert not _leaks(orjson.dumps(gw.app.dump_state(), default=str).decode()), "a secret is in the state dump"
    assert any(e["kind"] == "budget_exceeded" for e in events)
    stored = b"".join(p.read_bytes() for p in gw.app.data_dir.iterdir() if p.is_file())
    # (Registered providers' credentials are persisted by design; managed keys' secrets never are.)
    assert not [n for n, secret in MANAGED.items() if secret.encode() in stored], "a key's secret was stored"
    log_text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert caplog.records, "nothing was logged: the log check would prove nothing"
    assert not _leaks(log_text), "a secret is in a log line"
    observer = gw.app.observer
    assert await trio.to_thread.run_sync(observer.tracing.force_flush)
    assert len([s for s in receiver.spans if s["kind"] == 2]) >= 6, "too few request spans to prove anything"
    assert not _leaks(orjson.dumps(receiver.spans).decode()), "a secret is in a trace span"
    assert await trio.to_thread.run_sync(observer.access_log.sync, 10)
    access_lines = access.read_text().splitlines()
    assert len(access_lines) >= 8, "too few access-log lines to prove anything"
    assert not _leaks("\n".join(access_lines)), "a secret is in an access-log line"
