"""The metrics store and its Prometheus exposition, read back by prometheus_client's parser."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runestone.telemetry.events import (
    ActorRestarted,
    AttemptFinished,
    BreakerTransition,
    FailoverEvent,
    RequestFinished,
    RetryScheduled,
)
from runestone.telemetry.metrics import OTHER, Histogram, MetricLabels, TelemetryMetrics, render_prometheus


def finished(provider="openai", model="gpt-4o", *, status="ok", error_type=None, latency=0.2, ttft=None,
             tokens_in=10, tokens_out=20, endpoint="chat", cost=0.0):
    return RequestFinished(
        request_id="r", key_id="k", provider=provider, model=model, endpoint=endpoint, stream=ttft is not None,
        status=status, http_status=200 if status == "ok" else 502, error_type=error_type, latency=latency,
        ttft=ttft, tokens_in=tokens_in, tokens_out=tokens_out, cost=cost, retries=0, failovers=0,
        route_reason="default", wall_time=1_700_000_000.0,
    )


def parse(body: bytes) -> dict[str, dict]:
    """family name -> {(sample name, frozenset(labels)): value}"""
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        out[family.name] = {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}
    return out


def sample(families, family, name, **labels):
    return families[family][(name, frozenset(labels.items()))]


def test_histogram_buckets_are_cumulative_and_le_inclusive():
    h = Histogram("h", "help", ("p",), (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(("a",), v)
    body = {s[0] + s[1]: s[2] for s in h.samples()}
    assert body['h_bucket{p="a",le="0.1"}'] == 2
    assert body['h_bucket{p="a",le="1"}'] == 4
    assert body['h_bucket{p="a",le="+Inf"}'] == 5
    assert body['h_count{p="a"}'] == 5
    assert body['h_sum{p="a"}'] == pytest.approx(4.65)


def test_render_parses_and_counts_equal_what_was_recorded():
    m = TelemetryMetrics()
    for _ in range(3):
        m.record_request(finished(latency=0.2, ttft=0.05), cost=0.001)
    m.record_request(finished(status="error", error_type="upstream_timeout", latency=30.0, tokens_in=5,
                              tokens_out=0), cost=0.0)
    m.record_request(finished("anthropic", "claude", endpoint="messages", latency=1.5, tokens_in=7,
                              tokens_out=3), cost=0.5)
    m.record_attempt(AttemptFinished("openai", "gpt-4o", False, "upstream_timeout", 30.0, None))
    m.record_attempt(AttemptFinished("openai", "gpt-4o", True, None, 0.2, 0.05))
    m.record_retry(RetryScheduled("openai", 1, 0.5, "timeout"))
    m.record_retry(RetryScheduled("openai", 2, 1.0, "timeout"))
    m.record_failover(FailoverEvent("failover", "main", "openai", "anthropic", 1))
    m.record_failover(FailoverEvent("fallback_success", "main", "openai", "anthropic", 2))
    m.record_breaker(BreakerTransition("openai", "closed", "open", "5 failures"))
    m.record_breaker(BreakerTransition("anthropic", "open", "half_open", "cool-down over"))
    m.record_restart(ActorRestarted("provider:openai", 1))
    m.record_restart(ActorRestarted("provider:openai", 2))

    f = parse(render_prometheus(m, in_flight={"openai": 4, "anthropic": 0}, dropped=9, cache_hits=2,
                                cache_misses=5, breaker_states={"vllm": "closed"}))

    req = "runestone_requests_total"
    assert sample(f, "runestone_requests", req, provider="openai", model="gpt-4o", endpoint="chat",
                  status="ok") == 3
    assert sample(f, "runestone_requests", req, provider="openai", model="gpt-4o", endpoint="chat",
                  status="error") == 1
    assert sample(f, "runestone_requests", req, provider="anthropic", model="claude", endpoint="messages",
                  status="ok") == 1
    assert sample(f, "runestone_errors", "runestone_errors_total", provider="openai", model="gpt-4o",
                  type="upstream_timeout") == 1
    dur = "runestone_request_duration_seconds"
    assert sample(f, dur, dur + "_count", provider="openai", model="gpt-4o") == 4
    assert sample(f, dur, dur + "_sum", provider="openai", model="gpt-4o") == pytest.approx(30.6)
    assert sample(f, dur, dur + "_bucket", provider="openai", model="gpt-4o", le="0.25") == 3
    assert sample(f, dur, dur + "_bucket", provider="openai", model="gpt-4o", le="+Inf") == 4
    ttft = "runestone_time_to_first_token_seconds"
    assert sample(f, ttft, ttft + "_count", provider="openai", model="gpt-4o") == 3
    assert ("runestone_time_to_first_token_seconds_count", frozenset({"provider": "anthropic",
            "model": "claude"}.items())) not in f[ttft]
    tok = "runestone_tokens_total"
    assert sample(f, "runestone_tokens", tok, provider="openai", model="gpt-4o", direction="in") == 35
    assert sample(f, "runestone_tokens", tok, provider="openai", model="gpt-4o", direction="out") == 60
    assert sample(f, "runestone_tokens", tok, provider="anthropic", model="claude", direction="out") == 3
    cost = "runestone_cost_usd_total"
    assert sample(f, "runestone_cost_usd", cost, provider="openai", model="gpt-4o") == pytest.approx(0.003)
    assert sample(f, "runestone_cost_usd", cost, provider="anthropic", model="claude") == pytest.approx(0.5)
    assert sample(f, "runestone_upstream_attempts", "runestone_upstream_attempts_total", provider="openai",
                  model="gpt-4o", outcome="error") == 1
    assert sample(f, "runestone_retries", "runestone_retries_total", provider="openai") == 2
    assert f["runestone_failovers"] == {("runestone_failovers_total", frozenset({("group", "main")})): 1}
    br = "runestone_circuit_breaker_state"
    assert sample(f, br, br, provider="openai") == 2
    assert sample(f, br, br, provider="anthropic") == 1
    assert sample(f, br, br, provider="vllm") == 0
    inf = "runestone_requests_in_flight"
    assert sample(f, inf, inf, provider="openai") == 4
    assert sample(f, inf, inf, provider="anthropic") == 0
    assert sample(f, "runestone_telemetry_events_dropped", "runestone_telemetry_events_dropped_total") == 9
    assert sample(f, "runestone_cache", "runestone_cache_total", result="hit") == 2
    assert sample(f, "runestone_cache", "runestone_cache_total", result="miss") == 5
    assert sample(f, "runestone_actor_restarts", "runestone_actor_restarts_total", actor="provider:openai") == 2


def test_render_declares_types_and_help_even_when_empty():
    body = render_prometheus(TelemetryMetrics()).decode()
    assert "# TYPE runestone_request_duration_seconds histogram\n" in body
    assert "# TYPE runestone_requests_total counter\n" in body
    assert "# TYPE runestone_circuit_breaker_state gauge\n" in body
    assert "# HELP runestone_requests_in_flight " in body
    assert body.endswith("\n")
    families = {f.name: f.type for f in text_string_to_metric_families(body)}
    assert families["runestone_time_to_first_token_seconds"] == "histogram"
    assert families["runestone_requests_in_flight"] == "gauge"


def test_label_values_are_escaped():
    m = TelemetryMetrics()
    nasty = 'we"ird\\model\nname'
    m.record_request(finished(model=nasty), cost=0.0)
    body = render_prometheus(m)
    assert b'model="we\\"ird\\\\model\\nname"' in body
    f = parse(body)
    assert sample(f, "runestone_requests", "runestone_requests_total", provider="openai", model=nasty,
                  endpoint="chat", status="ok") == 1


def test_values_render_as_prometheus_numbers():
    m = TelemetryMetrics()
    m.record_request(finished(latency=math.inf), cost=0.0)
    f = parse(render_prometheus(m))
    dur = "runestone_request_duration_seconds"
    assert sample(f, dur, dur + "_sum", provider="openai", model="gpt-4o") == math.inf
    assert sample(f, dur, dur + "_bucket", provider="openai", model="gpt-4o", le="120") == 0


class _Entry:
    def __init__(self, models, default_model=None):
        self.info = type("Info", (), {"models": frozenset(models)})()
        self.default_model = default_model


class _Catalog:
    """The shape of the published provider table: ``value`` and a ``version`` bumped on publish."""

    def __init__(self, **entries):
        self.value = entries
        self.version = 1

    def publish(self, **entries):
        self.value = entries
        self.version += 1


def test_labels_keep_registered_names_and_fold_the_rest_into_other():
    catalog = _Catalog(openai=_Entry(["gpt-4o", "gpt-4*"], "gpt-4o-mini"), vllm=_Entry(["*"]))
    labels = MetricLabels(catalog, route_name=lambda name: name in ("chat", "fast"))
    assert labels.pair("openai", "gpt-4o") == ("openai", "gpt-4o")
    assert labels.pair("openai", "gpt-4o-mini") == ("openai", "gpt-4o-mini")  # its default model
    # A wildcard serves names the client chose; they are not label values.
    assert labels.pair("openai", "gpt-4-made-up") == ("openai", OTHER)
    assert labels.pair("vllm", "anything") == ("vllm", OTHER)
    assert labels.pair("openai", "chat") == ("openai", OTHER)
    assert labels.pair("gone", "gpt-4o") == (OTHER, OTHER)
    # No provider answered: the asked name is kept when the operator configured it.
    assert labels.pair("", "gpt-4o") == ("", "gpt-4o")
    assert labels.pair("", "openai:gpt-4o") == ("", "openai:gpt-4o")
    assert labels.pair("", "fast") == ("", "fast")
    assert labels.pair("", "openai:made-up") == ("", OTHER)
    assert labels.pair("", "made-up") == ("", OTHER)
    assert (labels.provider("openai"), labels.provider("nope"), labels.provider("")) == ("openai", OTHER, "")
    # A registration (a new version of the table) is seen at once.
    catalog.publish(openai=_Entry(["gpt-4o"]), mistral=_Entry(["mistral-small"]))
    assert labels.pair("mistral", "mistral-small") == ("mistral", "mistral-small")
    assert labels.pair("vllm", "anything") == (OTHER, OTHER)
    # A pair labelled before is labelled anew for the new table (openai no longer has a default model).
    assert labels.pair("openai", "gpt-4o-mini") == ("openai", OTHER)
    assert labels.pair("openai", "gpt-4o") == ("openai", "gpt-4o")


def test_made_up_names_add_no_series():
    m = TelemetryMetrics(labels=MetricLabels(_Catalog(openai=_Entry(["gpt-4o"]))))
    m.record_request(finished(model="gpt-4o", ttft=0.1), cost=0.01)
    for i in range(3000):
        m.record_request(finished(model=f"m-{i}", ttft=0.1), cost=0.01)
        m.record_request(finished("", f"openai:m-{i}", status="error", error_type="http_500"), cost=0.0)
        m.record_attempt(AttemptFinished("openai", f"m-{i}", i % 2 == 0, None, 0.1, None))
        m.record_retry(RetryScheduled(f"p-{i}", 1, 0.1, "timeout"))
    f = parse(render_prometheus(m))
    models = {dict(labels)["model"] for family in f.values() for _, labels in family if "model" in dict(labels)}
    assert models == {"gpt-4o", OTHER}
    req = "runestone_requests_total"
    assert sample(f, "runestone_requests", req, provider="openai", model=OTHER, endpoint="chat", status="ok") == 3000
    assert sample(f, "runestone_requests", req, provider="", model=OTHER, endpoint="chat", status="error") == 3000
    assert sample(f, "runestone_upstream_attempts", "runestone_upstream_attempts_total", provider="openai",
                  model=OTHER, outcome="ok") == 1500
    assert f["runestone_retries"] == {("runestone_retries_total", frozenset({("provider", OTHER)})): 3000}


def test_without_a_catalog_the_first_names_are_kept_up_to_the_cap():
    labels = MetricLabels(cap=3)
    assert [labels.pair("a", f"m{i}")[1] for i in range(5)] == ["m0", "m1", "m2", OTHER, OTHER]
    assert labels.pair("a", "m1") == ("a", "m1")
    assert [labels.provider(p) for p in ("a", "b", "c", "d", "a")] == ["a", "b", "c", OTHER, "a"]
