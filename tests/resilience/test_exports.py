"""The package's re-exports stay in step with its modules' public names."""

import importlib

import runestone.resilience as resilience

MODULES = ["breaker", "breaker_manager", "errors", "failover", "failover_manager", "ordering", "retry"]


def test_reexports_are_the_modules_objects():
    for name in MODULES:
        module = importlib.import_module(f"runestone.resilience.{name}")
        for public in module.__all__:
            if hasattr(resilience, public):
                assert getattr(resilience, public) is getattr(module, public), (name, public)


def test_main_api_is_reexported():
    for public in [
        "CircuitBreaker",
        "CircuitBreakerManager",
        "FailoverManager",
        "GroupSelector",
        "RetryPolicy",
        "UpstreamError",
        "Acquire",
        "GroupOutcome",
        "Outcome",
        "check",
        "counts_as_failure",
        "order_candidates",
        "parse_retry_after",
        "retry_policy",
    ]:
        assert hasattr(resilience, public), public
