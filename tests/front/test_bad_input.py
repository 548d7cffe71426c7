"""Bad input: each case a clear 4xx in OpenAI's error shape, nothing crashes, memory stays flat; and a
hypothesis fuzz run against the routes /openapi.json describes finds no 5xx."""

import socket
import threading
import textwrap

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runestone.app import Application
from runestone.config import load_config

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A gateway in its own thread and trio run, shared by this module's sync tests."""
    tmp = tmp_path_factory.mktemp("bad-input")
    path = tmp / "runestone.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        host = "127.0.0.1"
        port = 0
        max_body_bytes = 65536
        header_timeout_ms = 2000
        [data]
        dir = "{tmp / 'data'}"
        [[providers]]
        name = "fake"
        type = "fake"
        [providers.config]
        models = ["fake-model", "fake-embedding"]
    """))
    app = Application(load_config(str(path), env={}))
    ready = threading.Event()
    box = {}

    async def main():
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as n:
            await n.start(app.run)
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield app
    trio.from_thread.run_sync(app.request_stop, trio_token=box["token"])
    thread.join(15)


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _assert_error(r: httpx.Response, status: int, *, param: str | None = None, text: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "File \"" not in r.text
    if param is not None:
        assert err["param"] == param
    if text is not None:
        assert text in err["message"]
    return err


def test_each_bad_input_gets_a_clear_4xx(live):
    url = f"http://127.0.0.1:{live.port}"
    with httpx.Client(base_url=url) as http:
        post = lambda content, **kw: http.post("/v1/chat/completions", content=content, **kw)  # noqa: E731
        _assert_error(post(b"{not json"), 400, text="not valid JSON")
        _assert_error(post(b""), 400, text="empty")
        _assert_error(post(b"[1, 2]"), 400, text="JSON object")
        _assert_error(post(b'{"model": "fake-model", "messages": "\xff\xfe"}'), 400, text="not valid JSON")
        _assert_error(post(b"[" * 5000 + b"]" * 5000), 400)
        deep = b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
        _assert_error(post(deep), 400)
        _assert_error(post(orjson.dumps({"messages": CHAT["messages"]})), 400, param="model")
        _assert_error(post(orjson.dumps({**CHAT, "model": 5})), 400, param="model")
        _assert_error(post(orjson.dumps({**CHAT, "messages": []})), 400, param="messages")
        _assert_error(post(orjson.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]})), 400,
                      param="messages[0].role")
        _assert_error(post(orjson.dumps({**CHAT, "messages": [{"role": "user", "content": 7}]})), 400,
                      param="messages[0].content")
        _assert_error(post(orjson.dumps({**CHAT, "temperature": "hot"})), 400, param="temperature")
        _assert_error(post(orjson.dumps({**CHAT, "temperature": 9})), 400, param="temperature")
        _assert_error(post(orjson.dumps({**CHAT, "stream": "yes"})), 400, param="stream")
        _assert_error(post(orjson.dumps({**CHAT, "max_tokens": True})), 400, param="max_tokens")
        _assert_error(post(orjson.dumps({**CHAT, "runestone": {"policy": "fastest"}})), 400)
        _assert_error(post(orjson.dumps({**CHAT, "model": "no-such-model"})), 404, param="model",
                      text="GET /v1/models")
        _assert_error(post(b"x" * 70000), 413, text="65536")
        # Unknown fields pass through to providers that accept them.
        assert post(orjson.dumps({**CHAT, "some_future_field": {"a": 1}})).status_code == 200
        _assert_error(http.post("/v1/embeddings", json={"model": "fake-embedding", "input": 5}), 400, param="input")
        _assert_error(http.get("/v1/chat/completions"), 405)
        _assert_error(http.get("/no/such/path"), 404)
        # The gateway still serves after all of that.
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_slow_loris_headers_get_408_and_others_are_served(live):
    with socket.create_connection(("127.0.0.1", live.port)) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never finishes the head
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}") as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        slow.settimeout(60)  # only a hang trips this
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = slow.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 408")


def test_memory_stays_flat_under_bad_input(live):
    url = f"http://127.0.0.1:{live.port}"
    bodies = [b"{bad", b"[]", orjson.dumps({"model": 1}), orjson.dumps({**CHAT, "messages": [{"role": "x"}]}),
              b"x" * 60000, orjson.dumps({**CHAT, "model": "nope"})]
    with httpx.Client(base_url=url) as http:
        for body in bodies * 50:  # warm up allocator pools and caches
            http.post("/v1/chat/completions", content=body)
        before = _rss_kib()
        for body in bodies * 400:  # 2,400 bad requests
            assert 400 <= http.post("/v1/chat/completions", content=body).status_code < 500
        after = _rss_kib()
    assert after - before < 8 * 1024, f"RSS grew by {after - before} KiB over 2,400 bad requests"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _shaped(schema: dict):
    """Bodies near the schema: its property names with random values, random keys dropped or added."""
    props = list(schema.get("properties", {}))
    return st.dictionaries(st.sampled_from(props) if props else st.text(max_size=8), _json, max_size=len(props) + 1)


def test_fuzz_from_openapi_finds_no_5xx(live):
    url = f"http://127.0.0.1:{live.port}"
    with httpx.Client(base_url=url, timeout=10) as http:
        doc = http.get("/openapi.json").json()
        targets = []
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if method == "post" and "{" not in path and not path.startswith("/admin"):
                    schema = op["requestBody"]["content"]["application/json"]["schema"]
                    targets.append((path, schema))
        assert any(p == "/v1/chat/completions" for p, _ in targets)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(data=st.data())
        def check(data):
            path, schema = data.draw(st.sampled_from(targets))
            body = data.draw(_shaped(schema) | _json)
            if isinstance(body, dict) and body.get("stream") is True:
                body["stream"] = False  # keep each example a single quick response
            r = http.post(path, content=orjson.dumps(body))
            assert r.status_code < 500, (path, body, r.text)
            if r.status_code >= 400:
                payload = r.json()
                assert "error" in payload, payload

        check()
        assert http.get("/health").status_code == 200
