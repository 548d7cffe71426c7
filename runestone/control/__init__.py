"""The control plane: what changes a running gateway, and what keeps those changes.

  plane.py  ControlPlane: register/update/unregister providers, failover groups, circuit resets; every
            change one typed value through ControlPlane.apply, with hooks told of each applied change
  socket.py ControlSocket: the /v1/control protocol without its transport (a message in, messages out)
  store.py  ControlStore and ControlState: the changes over the configuration, persisted (control.json)
  cli.py    the operator's client of a running gateway (``runestone providers|groups|state|...``)

The HTTP routes and the ``/v1/control`` WebSocket plumbing (upgrade, authentication, framing) that decode
requests and call these live in ``runestone/front/admin.py``.
"""

from .plane import MAX_GRACE as MAX_GRACE
from .plane import ControlChange as ControlChange
from .plane import ControlPlane as ControlPlane
from .plane import CreateGroup as CreateGroup
from .plane import DeleteGroup as DeleteGroup
from .plane import RegisterProvider as RegisterProvider
from .plane import UnregisterProvider as UnregisterProvider
from .plane import UpdateGroup as UpdateGroup
from .plane import UpdateProvider as UpdateProvider
from .socket import ControlSession as ControlSession
from .socket import ControlSocket as ControlSocket
from .store import ControlState as ControlState
from .store import ControlStore as ControlStore
from .store import ControlStoreError as ControlStoreError

from . import plane  # noqa: E402 - the module, for __all__

__all__ = [*plane.__all__, "ControlSession", "ControlSocket", "ControlState", "ControlStore", "ControlStoreError"]
