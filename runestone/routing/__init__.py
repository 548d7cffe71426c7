"""Routing: from the model a client names to an ordered plan of attempts, and the one request pipeline.

Layers inside, each importing only those before it: ``errors`` (``GatewayError``, the request path's
refusals in no wire format); ``policies`` (router policies: the client's ``Requirements`` and ``route``,
ordering with ``runestone.resilience.ordering``), ``splits`` (named pools and A/B splits), ``aliases``
(the alias file and its ``AliasWatcher`` actor), ``pool`` (``InFlightTable``, the one owner of what is
in flight, and the ``ProviderPool`` actor); ``executor`` (``Gateway.serve(ModelRequest)``: planning,
attempts, accounting). The public names are re-exported here.
"""

from .aliases import AliasWatcher as AliasWatcher
from .aliases import Reload as Reload
from .errors import GatewayError as GatewayError
from .executor import Completed as Completed
from .executor import Gateway as Gateway
from .executor import ModelRequest as ModelRequest
from .executor import Streaming as Streaming
from .policies import POLICIES as POLICIES
from .policies import Requirements as Requirements
from .policies import RouteDecision as RouteDecision
from .policies import parse_requirements as parse_requirements
from .policies import route as route
from .pool import InFlightRequest as InFlightRequest
from .pool import InFlightTable as InFlightTable
from .pool import ProviderPool as ProviderPool
from .splits import NamedRoutes as NamedRoutes
from .splits import Pool as Pool
from .splits import Split as Split

__all__ = [
    "AliasWatcher", "Completed", "Gateway", "GatewayError", "InFlightRequest", "InFlightTable", "ModelRequest",
    "NamedRoutes", "POLICIES", "Pool", "ProviderPool", "Reload", "Requirements", "RouteDecision", "Split",
    "Streaming", "parse_requirements", "route",
]
