"""The router policies and the failover strategies: one registry each, so that adding one touches one entry.

Each :class:`NamedOrdering` says what a name stands for: the ordering, written as
``runestone.resilience.ordering`` writes its orderings (their ``repr``, e.g. ``sorted_by(cost, priority,
name)``) and built from that text by ``ordering.ordering_of`` when first used, so the config stays below
the code that orders; and a line saying what it does. ``[router] policy`` and a request's
``runestone.policy`` are checked against :data:`ROUTER_POLICY_REGISTRY`, ``[failover] strategy`` and a
group's ``strategy`` against :data:`FAILOVER_STRATEGY_REGISTRY`; ``routing.policies.POLICIES`` and
``resilience.failover.STRATEGIES`` are views of them, and so are the OpenAPI enum and the errors listing
the valid names. A new ordering made of the existing keys and shapes is one entry here; a new sort key or
shape is added to ``runestone/resilience/ordering.py`` too.
"""

import attrs

__all__ = ["FAILOVER_STRATEGY_REGISTRY", "NamedOrdering", "ROUTER_POLICY_REGISTRY"]


@attrs.frozen
class NamedOrdering:
    """One router policy or failover strategy."""

    name: str
    #: The ordering in ``resilience.ordering``'s notation (what its ``repr`` shows): a shape
    #: (``sorted_by``, ``rotated``, ``weighted_shuffle``, ``weighted_first``) of sort keys (``priority``,
    #: ``name``, ``weight``, ``health``, ``ttft``, ``cost``, ``in_flight``, ``score``).
    ordering: str
    #: What it does, in a line.
    about: str


def _registry(*entries: NamedOrdering) -> dict[str, NamedOrdering]:
    return {e.name: e for e in entries}


#: Router policies. Ties fall back to priority, then name, so a decision is deterministic.
ROUTER_POLICY_REGISTRY: dict[str, NamedOrdering] = _registry(
    NamedOrdering("default", "sorted_by(priority, weight, name)", "lower priority first, then higher weight"),
    NamedOrdering("health", "sorted_by(health, priority, name)", "higher health score first"),
    NamedOrdering("enhanced", "sorted_by(score, priority, name)",
                  "highest enhanced_score first (a blend of health, latency, load and priority)"),
    NamedOrdering("cost", "sorted_by(cost, priority, name)", "cheapest estimate first, unpriced last"),
)

#: Failover strategies: how a group's providers are ordered for one request.
FAILOVER_STRATEGY_REGISTRY: dict[str, NamedOrdering] = _registry(
    NamedOrdering("round_robin", "rotated()", "the group's order, rotated one step per request"),
    NamedOrdering("priority", "sorted_by(priority)",
                  "the group's listed order, except that a lower priority goes first"),
    NamedOrdering("load_balanced", "weighted_shuffle()",
                  "a random order, each provider ahead of the others in proportion to its weight (0: last)"),
    NamedOrdering("least_loaded", "rotated(in_flight)",
                  "fewest requests in flight first; ties keep the round-robin order"),
    NamedOrdering("fastest_first", "sorted_by(ttft, priority, name)",
                  "lowest time-to-first-token average first, unmeasured after"),
    NamedOrdering("cost", "sorted_by(cost, priority, name)", "cheapest estimate first, unpriced after"),
)
