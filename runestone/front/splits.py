"""The HTTP face of pools and A/B splits: their configuration and each variant's metrics, read by clients.

``GET /v1/splits`` lists the splits, each with its variants' weights, ratios and metrics (requests, errors,
error rate, latency mean and percentiles, tokens, cost); ``GET /v1/splits/{name}`` shows one;
``POST /v1/splits/{name}/reset`` (admin) zeroes a split's metrics to start a new measurement;
``GET /v1/pools`` lists the pools with their members' weights and shares. Reading is a copy of in-memory
counters and a sort of each variant's bounded latency window: nothing here touches the request path.
"""

from __future__ import annotations

from urllib.parse import unquote

from ..http.server import Request, Response
from ..routing.executor import GatewayError
from .deps import FrontDeps

__all__ = ["install"]

_PREFIX = "/v1/splits/"


def install(front, deps: FrontDeps) -> None:
    routes = deps.splits

    def find(name: str):
        split = routes.splits.get(name)
        if split is None:
            known = ", ".join(sorted(routes.splits)) or "none configured"
            raise GatewayError(404, f"no split named {name!r} (splits: {known}); GET /v1/splits lists them",
                               param="name", code="split_not_found")
        return split

    async def list_splits(request: Request, caller) -> Response:
        return Response.json({"object": "list", "data": [s.describe() for s in routes.splits.values()]})

    async def show_split(request: Request, caller) -> Response:
        return Response.json(find(unquote(request.path[len(_PREFIX):])).describe())

    async def reset_split(request: Request, caller) -> Response:
        name, sep, action = unquote(request.path[len(_PREFIX):]).rpartition("/")
        if not sep or action != "reset":
            raise GatewayError(404, f"no route for POST {request.path}; to zero a split's metrics use "
                               "POST /v1/splits/{name}/reset", code="not_found")
        split = find(name)
        split.reset()
        return Response.json(split.describe())

    async def list_pools(request: Request, caller) -> Response:
        return Response.json({"object": "list", "data": [p.describe() for p in routes.pools.values()]})

    add = front.routes.add
    add("GET", "/v1/splits", list_splits, "client")
    add("GET", _PREFIX + "*", show_split, "client")
    add("POST", _PREFIX + "*", reset_split, "admin")
    add("GET", "/v1/pools", list_pools, "client")
