"""HTTP for the gateway, knowing nothing of LLMs and importing nothing else of ours.

Layout (the server split as hypercorn splits its trio server, the client as httpcore splits
its engine; modules with a leading underscore are private):

- the server: ``server`` (``serve_http``, ``HttpServer``: listener, accept loop, watchdog,
  graceful stop), ``_connection`` (one connection: parser callbacks, reads, writes, the client
  watch, drain, linger, WebSocket hand-over), ``_messages`` (``Request``, ``Response``,
  ``Limits``), ``websocket`` (``WebSocketAccept`` and the hand-over to trio-websocket),
  ``_server_wire`` (the bytes it writes);
- the client: ``transport`` (the seam providers call: ``Transport``, ``UpstreamResponse``,
  ``Timeouts``, ``PoolLimits``, and the ``MockTransport`` test double), ``client``
  (``FastTransport``, the default, and ``make_transport``, which picks a transport by name),
  ``_pool``, ``_connection_client`` and ``_response`` (its pool, connections and responses),
  ``httpx_transport`` (``HttpxTransport``, for proxies and HTTP/2);
- ``errors``: both exception trees, the client's and the server's, drawn in its docstring.

Imports go one way: ``errors`` imports nothing of ours and ``transport`` only ``errors``; the
implementations import the seam, ``client`` imports both implementations. This module
re-exports the public names; everything else is private to its module.
"""

from ._messages import (
    ErrorBody as ErrorBody,
    Handler as Handler,
    LastItem as LastItem,
    Limits as Limits,
    Request as Request,
    Response as Response,
)
from .client import (
    FastTransport as FastTransport,
    OriginStatistics as OriginStatistics,
    PreparedHeaders as PreparedHeaders,
    TransportStatistics as TransportStatistics,
    make_transport as make_transport,
    prepared_headers as prepared_headers,
)
from .errors import (
    BadRequest as BadRequest,
    BodyTooLarge as BodyTooLarge,
    ClientDisconnected as ClientDisconnected,
    ConnectError as ConnectError,
    ConnectTimeout as ConnectTimeout,
    HttpError as HttpError,
    LOCAL_RESOURCE_ERRNOS as LOCAL_RESOURCE_ERRNOS,
    LocalProtocolError as LocalProtocolError,
    LocalResourceError as LocalResourceError,
    PoolTimeout as PoolTimeout,
    ReadTimeout as ReadTimeout,
    RemoteProtocolError as RemoteProtocolError,
    RequestTimeout as RequestTimeout,
    TransportError as TransportError,
    TransportTimeout as TransportTimeout,
    WriteTimeout as WriteTimeout,
    local_resource_errors as local_resource_errors,
    local_resource_kind as local_resource_kind,
)
from .httpx_transport import HttpxTransport as HttpxTransport
from ._server_wire import HEAD_LINES as HEAD_LINES, header_block as header_block
from .server import (
    HttpServer as HttpServer,
    ServerStatistics as ServerStatistics,
    serve_http as serve_http,
)
from .transport import (
    HeaderList as HeaderList,
    MockRequest as MockRequest,
    MockResponse as MockResponse,
    MockTransport as MockTransport,
    PoolLimits as PoolLimits,
    Timeouts as Timeouts,
    Transport as Transport,
    UpstreamResponse as UpstreamResponse,
)
from .websocket import WebSocketAccept as WebSocketAccept

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "ConnectError",
    "ConnectTimeout",
    "ErrorBody",
    "FastTransport",
    "Handler",
    "HEAD_LINES",
    "header_block",
    "HeaderList",
    "HttpError",
    "HttpServer",
    "HttpxTransport",
    "LastItem",
    "Limits",
    "LOCAL_RESOURCE_ERRNOS",
    "local_resource_errors",
    "local_resource_kind",
    "LocalProtocolError",
    "LocalResourceError",
    "make_transport",
    "MockRequest",
    "MockResponse",
    "MockTransport",
    "OriginStatistics",
    "PoolLimits",
    "PreparedHeaders",
    "prepared_headers",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Request",
    "RequestTimeout",
    "Response",
    "serve_http",
    "ServerStatistics",
    "Timeouts",
    "Transport",
    "TransportError",
    "TransportStatistics",
    "TransportTimeout",
    "UpstreamResponse",
    "WebSocketAccept",
    "WriteTimeout",
]
