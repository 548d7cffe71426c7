"""Resilience: circuit breakers, retry policy and failover, for one gateway.

Layers inside: ``errors`` (what went wrong, and whether it counts or may be
retried) <- ``breaker`` (with ``refuses``, the one breaker predicate) <-
``ordering`` (the one ordering mechanism: policy objects that order providers,
used by failover strategies, router policies and pools) <- ``retry``,
``failover`` (pure state machines and policies, time passed in) <- ``breaker_manager``, ``failover_manager`` (the
actors that own that state and publish immutable views for the request path).
Those actors refuse a call with the runtime's ``Rejected``, and publish into
the runtime's ``Published`` cells. The public names are re-exported here.
"""

from .breaker import ALLOW as ALLOW
from .breaker import ASK as ASK
from .breaker import DENY as DENY
from .breaker import BreakerSettings as BreakerSettings
from .breaker import BreakerView as BreakerView
from .breaker import CircuitBreaker as CircuitBreaker
from .breaker import Transition as Transition
from .breaker import check as check
from .breaker import refuses as refuses
from .breaker_manager import Acquire as Acquire
from .breaker_manager import CircuitBreakerManager as CircuitBreakerManager
from .breaker_manager import Configure as Configure
from .breaker_manager import GetState as GetState
from .breaker_manager import Outcome as Outcome
from .breaker_manager import Release as Release
from .breaker_manager import Remove as Remove
from .breaker_manager import Reset as Reset
from .breaker_manager import outcome as outcome
from .errors import UpstreamError as UpstreamError
from .errors import counts_as_failure as counts_as_failure
from .errors import is_retryable as is_retryable
from .failover import STRATEGIES as STRATEGIES
from .failover import GroupSelector as GroupSelector
from .failover import GroupSpec as GroupSpec
from .failover import ProviderInfo as ProviderInfo
from .failover import RouteState as RouteState
from .failover import order_candidates as order_candidates
from .failover_manager import CreateGroup as CreateGroup
from .failover_manager import DeleteGroup as DeleteGroup
from .failover_manager import FailoverManager as FailoverManager
from .failover_manager import GetGroup as GetGroup
from .failover_manager import GetStats as GetStats
from .failover_manager import GroupOutcome as GroupOutcome
from .failover_manager import ListGroups as ListGroups
from .failover_manager import ResetStats as ResetStats
from .failover_manager import UpdateGroup as UpdateGroup
from .failover_manager import FailoverStats as FailoverStats
from .failover_manager import GroupStats as GroupStats
from .failover_manager import ProviderStats as ProviderStats
from .ordering import Key as Key
from .ordering import breakers_last as breakers_last
from .ordering import rotated as rotated
from .ordering import sorted_by as sorted_by
from .ordering import split_refused as split_refused
from .ordering import weighted_first as weighted_first
from .ordering import weighted_shuffle as weighted_shuffle
from .retry import RetryPolicy as RetryPolicy
from .retry import parse_retry_after as parse_retry_after
from .retry import retry_policy as retry_policy

__all__ = [
    "Acquire",
    "ALLOW",
    "ASK",
    "breakers_last",
    "BreakerSettings",
    "BreakerView",
    "check",
    "CircuitBreaker",
    "CircuitBreakerManager",
    "Configure",
    "counts_as_failure",
    "CreateGroup",
    "DeleteGroup",
    "DENY",
    "FailoverManager",
    "FailoverStats",
    "GetGroup",
    "GetState",
    "GetStats",
    "GroupOutcome",
    "GroupSelector",
    "GroupSpec",
    "GroupStats",
    "is_retryable",
    "Key",
    "ListGroups",
    "order_candidates",
    "Outcome",
    "outcome",
    "parse_retry_after",
    "ProviderInfo",
    "ProviderStats",
    "refuses",
    "Release",
    "Remove",
    "Reset",
    "ResetStats",
    "retry_policy",
    "RetryPolicy",
    "rotated",
    "RouteState",
    "sorted_by",
    "split_refused",
    "STRATEGIES",
    "Transition",
    "UpdateGroup",
    "UpstreamError",
    "weighted_first",
    "weighted_shuffle",
]
