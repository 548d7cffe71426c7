"""The runtime's public names: the list other packages code against."""

from __future__ import annotations

import types

import runestone.runtime as runtime

PUBLIC = {
    "Actor", "ActorDead", "ActorError", "ActorLifecycle", "ActorRef", "Batch", "CallTimeout", "ChildInfo", "ChildSpec",
    "Coalescer",
    "MailboxFull", "NamedRef", "Published", "Registry", "Rejected", "Shutdown", "Supervisor",
    "SupervisorEscalation", "SupervisorSnapshot", "default_registry", "dump_state", "plain", "unwrap",
}


def test_public_names_are_exactly_the_documented_ones():
    exported = {
        name for name, value in vars(runtime).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == PUBLIC


def test_public_names_live_in_private_modules():
    for name in PUBLIC - {"default_registry"}:
        module = getattr(runtime, name).__module__
        assert module.startswith("runestone.runtime._"), (name, module)


def test_errors_form_one_tree():
    for name in ("ActorDead", "CallTimeout", "MailboxFull", "Shutdown", "SupervisorEscalation"):
        assert issubclass(getattr(runtime, name), runtime.ActorError)
    assert issubclass(runtime.SupervisorEscalation, runtime.Shutdown)
    assert issubclass(runtime.ActorError, Exception)
