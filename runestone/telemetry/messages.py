"""The calls the ``TelemetryHandler`` answers, one ``@attrs.frozen`` class each.

Its casts are the events of :mod:`runestone.telemetry.events` themselves. Anything else gets the
runtime's unknown-message policy (a call is answered ``Rejected``, a cast is counted and dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .sender import ExtraGauges

__all__ = ["Flush", "Health", "Metrics", "Subscribe", "Summary", "Unsubscribe", "Usage"]


@attrs.frozen
class Metrics:
    """The ``/metrics`` body (bytes), with the gauges the handler does not own (``None``: all zero)."""

    extra: ExtraGauges | None = None


@attrs.frozen
class Health:
    """``{provider: HealthView}``."""


@attrs.frozen
class Summary:
    """The ``OverallSummary`` of every request this incarnation has seen."""


@attrs.frozen
class Usage:
    """Usage rows from the ledger, flushed first: of ``key_id`` (None: every key), of ``team``, grouped."""

    key_id: str | None = None
    group_by: Sequence[str] = attrs.field(default=("model", "day"), converter=tuple)
    team: str | None = None


@attrs.frozen
class Subscribe:
    """Attach a live event feed: every event's ``to_dict()`` is sent to ``channel`` without blocking."""

    channel: Any


@attrs.frozen
class Unsubscribe:
    """Detach a live event feed; replies whether it was attached."""

    channel: Any


@attrs.frozen
class Flush:
    """Write the ledger's buffer now; replies the rows written."""
