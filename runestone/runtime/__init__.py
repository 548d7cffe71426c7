"""The actor runtime: OTP's gen_server and supervisor on trio; knows nothing of LLMs.

Layers, each importing only those above it:
``_errors`` (the error tree), ``_registry`` (names -> addresses), ``_published``
(single-writer snapshot cells), ``_replies`` (``Rejected`` replies) and
``_plain`` (live values -> plain JSON data);
``_spec`` (child specs and reports); ``_actor`` (mailbox, ActorRef, NamedRef,
Actor); ``_supervisor`` (strategies, restart types, intensity, shutdown: OTP's
``supervisor.erl``, its differences listed there);
``_dump`` (state dumps of a live tree). The names below are the public API.
"""

from ._actor import Actor as Actor
from ._actor import ActorLifecycle as ActorLifecycle
from ._actor import ActorRef as ActorRef
from ._actor import Batch as Batch
from ._actor import Coalescer as Coalescer
from ._actor import NamedRef as NamedRef
from ._dump import dump_state as dump_state
from ._errors import ActorDead as ActorDead
from ._errors import ActorError as ActorError
from ._errors import CallTimeout as CallTimeout
from ._errors import MailboxFull as MailboxFull
from ._errors import Shutdown as Shutdown
from ._errors import SupervisorEscalation as SupervisorEscalation
from ._plain import plain as plain
from ._published import Published as Published
from ._registry import Registry as Registry
from ._registry import default_registry as default_registry
from ._replies import Rejected as Rejected
from ._replies import unwrap as unwrap
from ._spec import ChildInfo as ChildInfo
from ._spec import ChildSpec as ChildSpec
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorSnapshot as SupervisorSnapshot

__all__ = [
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorLifecycle",
    "ActorRef",
    "Batch",
    "Coalescer",
    "CallTimeout",
    "ChildInfo",
    "ChildSpec",
    "default_registry",
    "dump_state",
    "MailboxFull",
    "NamedRef",
    "plain",
    "Published",
    "Registry",
    "Rejected",
    "Shutdown",
    "Supervisor",
    "SupervisorEscalation",
    "SupervisorSnapshot",
    "unwrap",
]
