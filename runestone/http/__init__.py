"""HTTP for the gateway, knowing nothing of LLMs and importing nothing else of ours.

Layout: ``server`` is the HTTP/1.1 server (with WebSocket hand-over in
``websocket``) that the front end serves on; ``client`` is the pooled upstream
client providers call through the one-method ``Transport`` seam, with
``FastTransport`` as the default and ``httpx_transport.HttpxTransport`` for
proxies and HTTP/2; ``errors`` holds the client's exception tree. This module
re-exports the public names; everything else is private to its module.
"""

from .client import (
    FastTransport as FastTransport,
    OriginStatistics as OriginStatistics,
    PoolLimits as PoolLimits,
    Timeouts as Timeouts,
    Transport as Transport,
    TransportStatistics as TransportStatistics,
    UpstreamResponse as UpstreamResponse,
    make_transport as make_transport,
)
from .errors import (
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    LOCAL_RESOURCE_ERRNOS as LOCAL_RESOURCE_ERRNOS,
    LocalProtocolError as LocalProtocolError,
    LocalResourceError as LocalResourceError,
    PoolTimeout as PoolTimeout,
    ReadTimeout as ReadTimeout,
    RemoteProtocolError as RemoteProtocolError,
    TransportError as TransportError,
    TransportTimeout as TransportTimeout,
    WriteTimeout as WriteTimeout,
    local_resource_errors as local_resource_errors,
    local_resource_kind as local_resource_kind,
)
from .httpx_transport import HttpxTransport as HttpxTransport
from .server import (
    BadRequest as BadRequest,
    BodyTooLarge as BodyTooLarge,
    ClientDisconnected as ClientDisconnected,
    Handler as Handler,
    HttpError as HttpError,
    HttpServer as HttpServer,
    Limits as Limits,
    Request as Request,
    RequestTimeout as RequestTimeout,
    Response as Response,
    ServerStatistics as ServerStatistics,
    WebSocketAccept as WebSocketAccept,
    serve_http as serve_http,
)
