"""Events are cheap slotted values with a kind and a plain-data form."""

import inspect

import attrs
import orjson
import pytest

from runestone.telemetry import events as ev


def test_kinds_and_plain_data():
    attempt = ev.AttemptFinished("a", "m", False, "timeout", 1.5, None)
    assert attempt.kind == "attempt_finished"
    assert attempt.to_dict() == {"kind": "attempt_finished", "provider": "a", "model": "m", "ok": False,
                                 "error_type": "timeout", "latency": 1.5, "ttft": None}
    failover = ev.FailoverEvent("fallback_exhausted", "g", "a", None, 3)
    assert failover.kind == "fallback_exhausted"
    assert list(failover.to_dict()) == ["kind", "group", "from_provider", "to_provider", "attempts"]
    alert = ev.ProviderStatusEvent("provider_failed", "a", 0.0)
    assert alert.to_dict() == {"kind": "provider_failed", "provider": "a", "score": 0.0}
    orjson.dumps(ev.ActorRestarted("provider:a", 2).to_dict())


def test_every_event_is_slotted_without_validators_and_has_a_kind():
    # Not frozen (see runestone.telemetry.events): built once or twice per request, with a plain __init__.
    classes = [ev.RequestFinished, ev.AttemptFinished, ev.BreakerTransition, ev.RetryScheduled,
               ev.FailoverEvent, ev.ProviderStatusEvent, ev.ActorRestarted, ev.ProviderRegistered,
               ev.ProviderUnregistered]
    for cls in classes:
        fields = attrs.fields(cls)
        event = cls(*["x"] * len(fields))
        assert not hasattr(event, "__dict__")
        assert "_setattr" not in inspect.getsource(cls.__init__)  # attrs' frozen __init__ goes through it
        assert all(f.validator is None for f in fields)
        assert event.to_dict()["kind"] == event.kind
    constant = [cls.kind for cls in classes if "kind" not in attrs.fields_dict(cls)]
    assert len(constant) == 7 and len(set(constant)) == 7
