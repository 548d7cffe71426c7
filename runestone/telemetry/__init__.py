"""Telemetry: events, metrics, health scores, costs and the usage ledger.

Layers inside: ``events`` (immutable facts) <- ``metrics``, ``health``,
``costs``, ``ledger`` (pure state, owned by one task) <- ``handler`` (the
``TelemetryHandler`` actor that owns them all; its calls in ``messages``). ``sender.Telemetry`` is the
hot path's non-blocking way in. Beside them, on the request's own task:
``observe`` (the per-request scope and the sender's tap) feeding ``access_log``
(one JSON line per request) and ``otel`` (OpenTelemetry spans; the SDK is
imported only when tracing is on), each drained by a ``_drain.DrainThread``. The public names are
re-exported here.
"""

from .access_log import AccessLog as AccessLog
from .costs import ModelPrice as ModelPrice
from .costs import cost_of as cost_of
from .costs import estimate_costs as estimate_costs
from .costs import price_for as price_for
from .events import ActorRestarted as ActorRestarted
from .events import AttemptFinished as AttemptFinished
from .events import BreakerTransition as BreakerTransition
from .events import Event as Event
from .events import FailoverEvent as FailoverEvent
from .events import ProviderRegistered as ProviderRegistered
from .events import ProviderStatusEvent as ProviderStatusEvent
from .events import ProviderUnregistered as ProviderUnregistered
from .events import RequestFinished as RequestFinished
from .events import RetryScheduled as RetryScheduled
from .health import HealthParams as HealthParams
from .health import HealthTracker as HealthTracker
from .health import HealthTable as HealthTable
from .health import HealthView as HealthView
from .ledger import UsageLedger as UsageLedger
from .messages import Flush as Flush
from .messages import Health as Health
from .messages import Metrics as Metrics
from .messages import Subscribe as Subscribe
from .messages import Summary as Summary
from .messages import Unsubscribe as Unsubscribe
from .messages import Usage as Usage
from .metrics import TelemetryMetrics as TelemetryMetrics
from .observe import RequestObserver as RequestObserver
from .observe import RequestScope as RequestScope
from .otel import Tracing as Tracing
from .metrics import render_prometheus as render_prometheus
from .sender import ExtraGauges as ExtraGauges
from .sender import Telemetry as Telemetry
from .handler import OverallSummary as OverallSummary
from .handler import TelemetryHandler as TelemetryHandler
from .handler import TelemetryStats as TelemetryStats

__all__ = [
    "AccessLog",
    "ActorRestarted",
    "AttemptFinished",
    "BreakerTransition",
    "cost_of",
    "estimate_costs",
    "Event",
    "ExtraGauges",
    "FailoverEvent",
    "Flush",
    "Health",
    "HealthParams",
    "HealthTable",
    "HealthTracker",
    "HealthView",
    "Metrics",
    "ModelPrice",
    "OverallSummary",
    "price_for",
    "ProviderRegistered",
    "ProviderStatusEvent",
    "ProviderUnregistered",
    "render_prometheus",
    "RequestFinished",
    "RequestObserver",
    "RequestScope",
    "RetryScheduled",
    "Subscribe",
    "Summary",
    "Telemetry",
    "TelemetryHandler",
    "TelemetryMetrics",
    "TelemetryStats",
    "Tracing",
    "Unsubscribe",
    "Usage",
    "UsageLedger",
]
