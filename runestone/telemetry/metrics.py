"""The gateway's own small metrics and their Prometheus text exposition.

Counters, gauges and histograms are dicts keyed by label-value tuples, owned
by the telemetry handler's task, so recording is a dict lookup and an add with
no locks (``prometheus_client`` is deliberately not used at run time: its
per-sample locking and object graph cost more than the whole request budget).
Histograms store per-bucket counts (not cumulative) plus a sum; cumulation
happens only when rendering. :func:`render_prometheus` writes the text format
0.0.4: ``# HELP``/``# TYPE`` per family, escaped label values, ``_bucket``
series with ``le`` up to ``+Inf``, then ``_sum`` and ``_count``. Gauges that
must be exact at any instant (requests in flight, dropped events, cache
counters) live with the sender and are passed in at render time.

Label values are bounded by configuration, never by what clients send: a
``provider:model`` pin or a wildcard-served model lets a client choose the
model name, so :class:`MetricLabels` lets through only registered providers
and their listed models (and the route names a request may be counted under)
and folds every other name into one ``other`` series.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .events import (
    ActorRestarted,
    AttemptFinished,
    BreakerTransition,
    FailoverEvent,
    RequestFinished,
    RetryScheduled,
)

__all__ = [
    "BREAKER_STATE_VALUES",
    "Counter",
    "DEFAULT_LATENCY_BUCKETS",
    "DEFAULT_TTFT_BUCKETS",
    "Gauge",
    "Histogram",
    "MetricLabels",
    "OTHER",
    "TelemetryMetrics",
    "render_counter",
    "render_prometheus",
]

DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DEFAULT_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

#: The label value every provider or model name that is not registered is counted under.
OTHER = "other"

#: ``runestone_circuit_breaker_state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def _escape_label(value: Any) -> str:
    s = value if isinstance(value, str) else ("" if value is None else str(value))
    if "\\" in s or '"' in s or "\n" in s:
        s = s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return s


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    """A monotonically increasing value per label tuple."""

    __slots__ = ("name", "help", "labelnames", "values")
    type = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.values: dict[tuple, float] = {}

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def get(self, labels: tuple = ()) -> float:
        return self.values.get(labels, 0)

    def samples(self) -> Iterable[tuple[str, str, float]]:
        for labels, value in self.values.items():
            yield self.name, _labels(self.labelnames, labels), value


class Gauge(Counter):
    """A value per label tuple that can go anywhere."""

    __slots__ = ()
    type = "gauge"

    def set(self, labels: tuple, value: float) -> None:
        self.values[labels] = value


class Histogram:
    """Bucketed observations per label tuple.

    A series is a list: one count per bound (value <= bound, not cumulative),
    one overflow count for ``+Inf``, then the sum of observed values.
    """

    __slots__ = ("name", "help", "labelnames", "bounds", "series")
    type = "histogram"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]):
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.bounds = tuple(sorted(bounds))
        self.series: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def count(self, labels: tuple) -> int:
        series = self.series.get(labels)
        return 0 if series is None else sum(series[:-1])

    def total(self, labels: tuple) -> float:
        series = self.series.get(labels)
        return 0.0 if series is None else series[-1]

    def samples(self) -> Iterable[tuple[str, str, float]]:
        les = [_fmt(float(b)) for b in self.bounds] + ["+Inf"]
        for labels, series in self.series.items():
            cumulative = 0
            for le, n in zip(les, series):
                cumulative += n
                yield self.name + "_bucket", _labels(self.labelnames, labels, f'le="{le}"'), cumulative
            plain = _labels(self.labelnames, labels)
            yield self.name + "_sum", plain, series[-1]
            yield self.name + "_count", plain, cumulative


class MetricLabels:
    """Which provider and model names may become label values; any other name is ``other``.

    ``catalog`` is the published provider table (``.value``: ``{name: entry}``
    whose entries carry ``info.models`` and ``default_model``; ``.version``
    bumped on every publish). A provider label is then a registered provider's
    name, and a model label one of that provider's exact model names or its
    default model: wildcard entries (``gpt-4*``, ``*``) are left out because
    they match names the client makes up. A request that ended before any
    provider answered carries provider ``""`` and the name the client asked
    for; that name is kept when it is any registered model, a registered
    ``provider:model`` pair, or a name ``route_name`` accepts (failover
    groups, aliases, pools and splits: names the operator configured).

    Without a catalog (unit tests, tools) the first ``cap`` distinct names of
    each kind are kept and the rest are ``other``. Either way the set of label
    values, and so ``/metrics`` and the memory behind it, is bounded. The
    catalog is re-read only when its version changes, so a label costs a few
    dict lookups.
    """

    __slots__ = ("catalog", "route_name", "cap", "_version", "_models", "_any_model", "_seen", "_pairs")

    def __init__(self, catalog: Any = None, route_name: Callable[[str], bool] | None = None, cap: int = 100):
        self.catalog = catalog
        self.route_name = route_name
        self.cap = cap
        self._version: int | None = None
        self._models: dict[str, frozenset[str]] = {}
        self._any_model: frozenset[str] = frozenset()
        #: Without a catalog: the names of each kind let through so far, at most ``cap`` of each.
        self._seen: dict[str, set[str]] = {"provider": set(), "model": set()}
        #: (provider, model) -> their labels, for the catalog's version in ``_version`` (a served pair: a
        #: provider that answered; bounded, cleared with each new version).
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def _refresh(self) -> None:
        catalog = self.catalog
        version = catalog.version
        if version == self._version:
            return
        models = {}
        for name, entry in (catalog.value or {}).items():
            names = {m for m in entry.info.models if not m.endswith("*")}
            if entry.default_model:
                names.add(entry.default_model)
            models[name] = frozenset(names)
        self._models = models
        self._any_model = frozenset().union(*models.values())
        self._pairs = {}
        self._version = version

    def _capped(self, kind: str, name: str) -> str:
        seen = self._seen[kind]
        if name in seen:
            return name
        if len(seen) < self.cap:
            seen.add(name)
            return name
        return OTHER

    def provider(self, name: str) -> str:
        """The label of provider ``name``."""
        if not name:
            return name
        if self.catalog is None:
            return self._capped("provider", name)
        self._refresh()
        return name if name in self._models else OTHER

    def pair(self, provider: str, model: str) -> tuple[str, str]:
        """The (provider, model) labels of a request or attempt."""
        catalog = self.catalog
        if catalog is None:
            return self.provider(provider), self._capped("model", model)
        if provider:
            if catalog.version == self._version:
                labels = self._pairs.get((provider, model))
                if labels is not None:
                    return labels
            else:
                self._refresh()
            served = self._models.get(provider)
            labels = (OTHER, OTHER) if served is None else (provider, model if model in served else OTHER)
            pairs = self._pairs
            if len(pairs) >= 4096:  # bounded: model names come from clients
                pairs.clear()
            pairs[(provider, model)] = labels
            return labels
        self._refresh()
        if model in self._any_model:
            return provider, model
        pinned, sep, upstream = model.partition(":")
        if sep and upstream in self._models.get(pinned, ()):
            return provider, model
        route_name = self.route_name
        if route_name is not None and route_name(model):
            return provider, model
        return provider, OTHER


@attrs.define
class TelemetryMetrics:
    """Every metric the handler keeps, and how each event updates them.

    Owned by the handler's task; ``record_*`` methods are not thread-safe and
    need not be. ``breaker_states`` is the last state seen per provider;
    ``labels`` bounds the provider and model label values.
    """

    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    ttft_buckets: tuple[float, ...] = DEFAULT_TTFT_BUCKETS
    labels: MetricLabels = attrs.field(factory=MetricLabels)
    requests: Counter = attrs.field(init=False)
    errors: Counter = attrs.field(init=False)
    duration: Histogram = attrs.field(init=False)
    ttft: Histogram = attrs.field(init=False)
    tokens: Counter = attrs.field(init=False)
    cost: Counter = attrs.field(init=False)
    attempts: Counter = attrs.field(init=False)
    retries: Counter = attrs.field(init=False)
    failovers: Counter = attrs.field(init=False)
    actor_restarts: Counter = attrs.field(init=False)
    breaker_states: dict[str, str] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        pm = ("provider", "model")
        self.requests = Counter(
            "runestone_requests_total", "Client requests finished.", ("provider", "model", "endpoint", "status")
        )
        self.errors = Counter("runestone_errors_total", "Client requests that ended in an error.", pm + ("type",))
        self.duration = Histogram(
            "runestone_request_duration_seconds", "Client request duration.", pm, self.latency_buckets
        )
        self.ttft = Histogram(
            "runestone_time_to_first_token_seconds", "Time to the first token sent to the client.", pm,
            self.ttft_buckets,
        )
        self.tokens = Counter("runestone_tokens_total", "Tokens used.", pm + ("direction",))
        self.cost = Counter("runestone_cost_usd_total", "Cost of requests in USD.", pm)
        self.attempts = Counter(
            "runestone_upstream_attempts_total", "Upstream attempts, retries and failovers included.",
            pm + ("outcome",),
        )
        self.retries = Counter("runestone_retries_total", "Retries scheduled.", ("provider",))
        self.failovers = Counter("runestone_failovers_total", "Failovers to another provider of a group.", ("group",))
        self.actor_restarts = Counter("runestone_actor_restarts_total", "Actor restarts by supervisors.", ("actor",))

    def record_request(self, ev: RequestFinished, cost: float) -> None:
        """Count one finished request; ``cost`` is the resolved USD cost."""
        pm = provider, model = self.labels.pair(ev.provider, ev.model)
        self.requests.inc((provider, model, ev.endpoint, ev.status))
        if ev.status != "ok":
            self.errors.inc((provider, model, ev.error_type or "unknown"))
        self.duration.observe(pm, ev.latency)
        if ev.ttft is not None:
            self.ttft.observe(pm, ev.ttft)
        if ev.tokens_in:
            self.tokens.inc((provider, model, "in"), ev.tokens_in)
        if ev.tokens_out:
            self.tokens.inc((provider, model, "out"), ev.tokens_out)
        if cost:
            self.cost.inc(pm, cost)

    def record_attempt(self, ev: AttemptFinished) -> None:
        self.attempts.inc(self.labels.pair(ev.provider, ev.model) + ("ok" if ev.ok else "error",))

    def record_retry(self, ev: RetryScheduled) -> None:
        self.retries.inc((self.labels.provider(ev.provider),))

    def record_failover(self, ev: FailoverEvent) -> None:
        # Only an actual switch is a failover; the outcome kinds close one.
        if ev.kind == "failover":
            self.failovers.inc((ev.group,))

    def record_breaker(self, ev: BreakerTransition) -> None:
        self.breaker_states[ev.provider] = ev.to_state

    def record_restart(self, ev: ActorRestarted) -> None:
        self.actor_restarts.inc((ev.name,))

    def forget_provider(self, provider: str) -> None:
        """Drop gauges of a provider that left (counters keep their history)."""
        self.breaker_states.pop(provider, None)


def _family(out: list[str], name: str, help: str, type: str, samples: Iterable[tuple[str, str, float]]) -> None:
    out.append(f"# HELP {name} {_escape_help(help)}\n# TYPE {name} {type}\n")
    for sample_name, labels, value in samples:
        out.append(f"{sample_name}{labels} {_fmt(value)}\n")


def render_counter(name: str, help: str, labelnames: tuple[str, ...], values: Mapping[tuple, float]) -> bytes:
    """One counter family whose values another layer keeps (the HTTP layer's local resource errors)."""
    counter = Counter(name, help, labelnames)
    counter.values = dict(values)
    out: list[str] = []
    _family(out, name, help, counter.type, counter.samples())
    return "".join(out).encode()


def render_prometheus(
    metrics: TelemetryMetrics,
    *,
    in_flight: Mapping[str, int] | None = None,
    dropped: int = 0,
    cache_hits: int = 0,
    cache_misses: int = 0,
    breaker_states: Mapping[str, str] | None = None,
    actor_restarts: Mapping[str, int] | None = None,
    ledger_quarantined: int = 0,
) -> bytes:
    """The Prometheus text format (0.0.4) of ``metrics`` plus the given gauges.

    ``breaker_states`` (provider -> ``closed``/``half_open``/``open``), when
    given, wins over the states ``metrics`` learnt from transition events, as
    it comes straight from the breaker's published view. ``actor_restarts``
    (actor -> restarts), when given, is read from the supervisors themselves and
    wins over the counts learnt from ``ActorRestarted`` events: a restart of the
    telemetry handler itself can only be known that way.
    """
    if actor_restarts is not None:
        for actor, n in actor_restarts.items():
            key = (actor,)
            metrics.actor_restarts.values[key] = max(n, metrics.actor_restarts.values.get(key, 0))
    out: list[str] = []
    for metric in (
        metrics.requests,
        metrics.errors,
        metrics.duration,
        metrics.ttft,
        metrics.tokens,
        metrics.cost,
        metrics.attempts,
        metrics.retries,
        metrics.failovers,
        metrics.actor_restarts,
    ):
        _family(out, metric.name, metric.help, metric.type, metric.samples())

    states = dict(metrics.breaker_states)
    if breaker_states:
        states.update(breaker_states)
    _family(
        out,
        "runestone_circuit_breaker_state",
        "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
        "gauge",
        ((
            "runestone_circuit_breaker_state",
            _labels(("provider",), (p,)),
            BREAKER_STATE_VALUES.get(s, 0),
        ) for p, s in states.items()),
    )
    _family(
        out,
        "runestone_requests_in_flight",
        "Client requests being served.",
        "gauge",
        (("runestone_requests_in_flight", _labels(("provider",), (p,)), n) for p, n in (in_flight or {}).items()),
    )
    _family(
        out,
        "runestone_telemetry_events_dropped_total",
        "Telemetry events dropped because the handler's mailbox was full or it was down.",
        "counter",
        (("runestone_telemetry_events_dropped_total", "", dropped),),
    )
    _family(
        out,
        "runestone_cache_total",
        "Response cache lookups.",
        "counter",
        (
            ("runestone_cache_total", '{result="hit"}', cache_hits),
            ("runestone_cache_total", '{result="miss"}', cache_misses),
        ),
    )
    _family(
        out,
        "runestone_ledger_quarantined_total",
        "Usage rows the ledger could not store, kept in its quarantine file instead.",
        "counter",
        (("runestone_ledger_quarantined_total", "", ledger_quarantined),),
    )
    return "".join(out).encode()


def budget_families(spend_usd: Mapping[str, float], refusals: Mapping[tuple[str, str], int]) -> str:
    """Budget spend per team and budget refusals per (team, whose budget) in the text format: labels are
    team names (and "" for keys in no team), never keys, so the series stay as few as the teams."""
    out: list[str] = []
    _family(out, "runestone_budget_spend_usd_total", "Settled spend of managed keys in USD, per team.", "counter",
            (("runestone_budget_spend_usd_total", _labels(("team",), (t,)), v) for t, v in sorted(spend_usd.items())))
    _family(out, "runestone_budget_refusals_total",
            "Requests refused before dispatch because their worst-case cost did not fit a budget.", "counter",
            (("runestone_budget_refusals_total", _labels(("team", "budget"), k), n)
             for k, n in sorted(refusals.items())))
    return "".join(out)


def ledger_families(status: Any) -> str:
    """The usage ledger's state (a :class:`~runestone.telemetry.ledger.LedgerStatus`) in the text format: whether
    its database fails now, what waits, and what it could not store."""
    backend = _labels(("backend",), (status.backend,))
    out: list[str] = []
    _family(out, "runestone_ledger_degraded", "1 while the usage ledger's database fails (rows are buffered and "
            "retried), else 0.", "gauge", (("runestone_ledger_degraded", backend, int(status.state != "ok")),))
    _family(out, "runestone_ledger_pending_rows", "Usage rows waiting for the next flush.", "gauge",
            (("runestone_ledger_pending_rows", backend, status.pending),))
    _family(out, "runestone_ledger_database_failures_total", "Usage ledger flushes and reads its database failed.",
            "counter", (("runestone_ledger_database_failures_total", backend, status.failures),))
    _family(out, "runestone_ledger_overflowed_total", "Usage rows a full buffer sent to the quarantine file while "
            "the database failed.", "counter", (("runestone_ledger_overflowed_total", backend, status.overflowed),))
    _family(out, "runestone_ledger_lost_total", "Usage rows not even the quarantine file could take.", "counter",
            (("runestone_ledger_lost_total", backend, status.lost),))
    return "".join(out)
