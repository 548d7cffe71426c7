"""/dashboard in a real browser: Debian's headless Chromium, driven by Selenium through chromium-driver.

The page is loaded from a live gateway with two providers. It draws the supervision tree and both
providers; failures injected at one upstream open its breaker, and the page shows it (the provider card and
the event feed); a crash injected into the failover manager is restarted by its supervisor, and the page's
tree shows the restart. A screenshot is saved in the test's temporary directory. Then the page is fed an
hour of ticks and thousands of events by hand, and holds no more than its bounded buffers; once the browser
is gone, the gateway keeps no subscription for it. With managed keys and teams that have spent, a page opened
with the admin key (HTTP Basic) lists the busiest of each by spend, in order.

The browser runs on real time (the page's own timers), so this test uses the real clock: every wait is for
a condition, bounded, never a fixed sleep.
"""

from __future__ import annotations

import functools
import queue
import shutil
import threading

import httpx
import pytest
import trio

from gatewaytest import provider_toml

MODEL = "gpt-4o-mini"
WAIT = 30  # seconds any one condition may take to show on the page


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        # scripts/test installs both (scripts/_venv.sh); never a silent skip.
        pytest.fail("Debian's chromium and chromium-driver are needed for this test; scripts/test installs them "
                    "(apt-get install chromium chromium-driver)")
    return browser, driver


class Browser:
    """One Chrome session on a thread of its own; ``await run(fn)`` runs ``fn(driver)`` there."""

    def __init__(self, browser: str, driver: str) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(browser, driver), daemon=True)
        self._started = queue.Queue()
        self._thread.start()

    def _main(self, browser: str, driver: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        try:
            options = webdriver.ChromeOptions()
            options.binary_location = browser
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1280,1000", "--js-flags=--expose-gc", "--no-first-run",
                        "--disable-background-networking", "--disable-extensions"):
                options.add_argument(arg)
            chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        except BaseException as exc:
            self._started.put(exc)
            return
        self._started.put(None)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                fn, reply = job
                try:
                    reply.put((True, fn(chrome)))
                except BaseException as exc:
                    reply.put((False, exc))
        finally:
            chrome.quit()

    async def started(self) -> None:
        error = await trio.to_thread.run_sync(self._started.get)
        if error is not None:
            raise error

    async def run(self, fn):
        reply: queue.Queue = queue.Queue()
        self._jobs.put((fn, reply))
        ok, value = await trio.to_thread.run_sync(reply.get)
        if not ok:
            raise value
        return value

    async def close(self) -> None:
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join, 60)


def _wait_for(css: str):
    def wait(chrome):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(chrome, WAIT).until(ec.presence_of_element_located((By.CSS_SELECTOR, css))).text
    return wait


def _inject_crash(app, name: str) -> None:
    """As tests/e2e/test_faults_actor_crash.py: the running incarnation's next cast raises."""
    ref = app.registry.whereis(name)

    async def boom(message):
        raise RuntimeError(f"injected crash in {name}")

    ref.actor.handle_cast = boom
    ref.cast(("injected",))


async def test_the_page_shows_the_tree_a_breaker_opening_and_a_restart(gateway_factory, fake_factory, tmp_path):
    browser_path, driver_path = _chromium()
    flaky, flaky_knobs = await fake_factory()
    steady, _ = await fake_factory(ttfb_ms=5, chunk_delay_ms=1)
    gw = await gateway_factory(
        "[telemetry]\nusage_ledger = false\n"
        "[circuit_breaker]\nfailure_threshold = 3\nrecovery_timeout_ms = 600000\n"
        '[[failover.groups]]\nname = "chat"\nproviders = ["flaky", "steady"]\nstrategy = "priority"\n'
        + provider_toml("flaky", "openai", base_url=f"http://127.0.0.1:{flaky.port}/v1", api_key="sk-x",
                        models=[MODEL], priority=1)
        + provider_toml("steady", "openai", base_url=f"http://127.0.0.1:{steady.port}/v1", api_key="sk-y",
                        models=[MODEL], priority=2))
    app = gw.app
    handler = app.registry.whereis("telemetry_handler").actor
    assert handler.subscribers == []

    browser = Browser(browser_path, driver_path)
    await browser.started()
    try:
        await browser.run(lambda chrome: chrome.get(gw.url + "/dashboard"))
        # The tree and the providers are drawn.
        await browser.run(_wait_for('[data-node="runestone"][data-status="running"]'))
        await browser.run(_wait_for('[data-node="enhanced_provider_supervisor"]'))
        await browser.run(_wait_for('[data-node="front"]'))
        await browser.run(_wait_for('[data-provider="flaky"][data-breaker="closed"]'))
        await browser.run(_wait_for('[data-provider="steady"]'))
        await browser.run(_wait_for('#conn[data-state="live"]'))
        assert len(handler.subscribers) == 1

        async with httpx.AsyncClient(base_url=gw.v1, timeout=30) as http:
            async def chat(stream: bool = False) -> httpx.Response:
                return await http.post("/chat/completions", json={
                    "model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hello"}]})

            for i in range(6):
                assert (await chat(stream=i % 2 == 0)).status_code == 200
            # Failures injected at the flaky upstream: its breaker opens, the group fails over to steady.
            flaky_knobs.fault_status = 500
            for _ in range(20):
                assert (await chat()).status_code == 200
                view = (app.breaker_views.value or {}).get("flaky")
                if view is not None and view.state == "open":
                    break
            assert app.breaker_views.value["flaky"].state == "open"
            for i in range(4):
                assert (await chat(stream=i % 2 == 0)).status_code == 200

        await browser.run(_wait_for('[data-provider="flaky"][data-breaker="open"]'))
        text = await browser.run(_wait_for('.ev[data-kind="breaker_transition"]'))
        assert "flaky" in text and "open" in text
        await browser.run(_wait_for('.ev[data-kind="failover"]'))
        await browser.run(_wait_for('[data-group="chat"]'))

        # A crash injected into the failover manager: restarted by its supervisor, shown in the tree.
        await browser.run(_wait_for('[data-node="failover_manager"][data-restarts="0"]'))
        _inject_crash(app, "failover_manager")
        for _ in range(500):
            if app.restarts.get("failover_manager"):
                break
            await trio.sleep(0.01)
        assert app.restarts.get("failover_manager") == 1
        await browser.run(_wait_for('[data-node="failover_manager"][data-restarts="1"][data-status="running"]'))
        restarted = await browser.run(_wait_for('.ev[data-kind="actor_restarted"]'))
        assert "failover_manager" in restarted

        shot = tmp_path / "dashboard.png"
        await browser.run(lambda chrome: chrome.save_screenshot(str(shot)))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        # An hour of ticks and many events, fed by hand: the page holds only its bounded buffers.
        stats = await browser.run(functools.partial(_feed_an_hour, providers=["flaky", "steady"]))
        assert stats["ticks"] >= 3600
        assert stats["events"] == stats["rows"] == 300
        assert stats["points"] == 300 and stats["transitions"] <= 8 and stats["fallbacks"] <= 8
        assert stats["providers"] == stats["cards"] == 2 and stats["kinds"] <= 40 and stats["groups"] <= 100
        assert stats["heap"] < 8 * 1024 * 1024, f"the page holds {stats['heap']} bytes of JavaScript heap"
    finally:
        await browser.close()

    # Nobody watches: the feed left the telemetry handler's subscribers.
    for _ in range(200):
        if not handler.subscribers and app.dashboard.feeds == 0:
            break
        await trio.sleep(0.05)
    assert handler.subscribers == [] and app.dashboard.feeds == 0


def _feed_an_hour(chrome, providers: list[str]) -> dict:
    """3600 ticks with every kind of event, through the page's own handler; then its sizes and heap."""
    chrome.execute_script("""
        const d = window.runestoneDashboard, names = arguments[0];
        const base = Date.now() / 1000;
        for (let i = 0; i < 3600; i++) {
          const window = {};
          for (const n of names) window[n] = {attempts: 40, errors: i % 7, p50: 0.01 + (i % 13) / 1000,
                                              p95: 0.05, p99: 0.08, ttft_p50: 0.004, ttft_p95: 0.02};
          const events = [];
          events.push({kind: "breaker_transition", provider: names[i % names.length], from_state: "closed",
                       to_state: "open", reason: "failures " + i});
          events.push({kind: "failover", group: "group-" + (i % 150), from_provider: names[0],
                       to_provider: names[1], attempts: 2});
          events.push({kind: "kind-" + (i % 60), detail: "synthetic " + i});
          d.handle({type: "tick", time: base + i, tick: 1, tree: null,
                    providers: names.map((n) => ({name: n, type: "openai", status: "running",
                      breaker: i % 3 ? "open" : "closed", in_flight: i % 5, health: 0.5, health_status: "degraded",
                      success_rate: 0.9, p50: 0.01, p95: 0.05, requests: i, errors: 0, consecutive_failures: 0})),
                    window, requests: {finished: 80, errors: 2}, events, events_skipped: 0, groups: [],
                    splits: [], in_flight: {count: 0, oldest: []}, keys: [], telemetry: {dropped: 0}});
        }
        d.render();
    """, providers)
    stats = chrome.execute_script("return window.runestoneDashboard.stats()")
    chrome.execute_script("window.gc && window.gc()")
    stats["heap"] = chrome.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"]
    return stats


async def test_the_page_shows_the_busiest_keys_and_teams_by_spend(gateway_factory, fake_factory, tmp_path):
    """With managed keys and teams, the page lists the busiest of each by spend in the budget period."""
    from test_dashboard import ADMIN, _spend_setup

    browser_path, driver_path = _chromium()
    gw, keys = await _spend_setup(gateway_factory, fake_factory)
    browser = Browser(browser_path, driver_path)
    await browser.started()
    try:
        # The admin key as the Basic password, as an operator types it when the browser asks.
        await browser.run(lambda chrome: chrome.get(gw.url.replace("://", f"://operator:{ADMIN}@") + "/dashboard"))
        await browser.run(_wait_for('#conn[data-state="live"]'))
        first = await browser.run(_wait_for(f'#keys tr[data-key="{keys["indexer"]["id"]}"]'))
        assert "indexer" in first and "search" in first and "$0.0120" in first
        await browser.run(_wait_for(f'#keys tr[data-key="{keys["lonely"]["id"]}"]'))
        search = await browser.run(_wait_for('#teams tr[data-team="search"]'))
        assert "$0.0160" in search
        await browser.run(_wait_for('#teams tr[data-team="support"]'))

        def order(chrome):
            # Read in one script, on the page's own thread: the page re-renders its tables on every update, so
            # rows found by one WebDriver call may be gone (stale) by the next one that reads them.
            return chrome.execute_script(
                "const rows = (sel, attr) => [...document.querySelectorAll(sel)].map(r => r.getAttribute(attr));"
                "return [rows('#keys tr[data-key]', 'data-key'), rows('#teams tr[data-team]', 'data-team')];")

        key_rows, team_rows = await browser.run(order)
        assert key_rows == [keys[n]["id"] for n in ("indexer", "helpdesk", "ranker", "lonely")]
        assert team_rows == ["search", "support"]
        shot = tmp_path / "dashboard-spend.png"
        await browser.run(lambda chrome: chrome.save_screenshot(str(shot)))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        await browser.close()
