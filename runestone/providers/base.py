"""The provider seam: one small interface between the request path and an upstream model API.

An *adapter* knows one wire format (OpenAI, Anthropic, the built-in fake). The request path hands it an
OpenAI-shaped chat body (already validated, ``model`` set to the upstream model) and gets back either a
finished ``chat.completion`` or a :class:`ChatStream`: an async iterator whose items are lists of
``chat.completion.chunk`` JSON payloads (``bytes``, unframed: the front door's encoder frames them in its own
wire format). Each item is what one upstream read produced, so relaying it is one socket write (DESIGN.md:
write once per upstream read). The end marker is not an item: ``finished`` turns true with the last one.

Failures are :class:`~runestone.resilience.errors.UpstreamError`; an adapter raises them for anything the
upstream did wrong, including a stream that ends before its end marker or carries a malformed chunk, so the
breaker, retry and failover logic judge them all the same way.

Every value the gateway keeps from an upstream is checked here, where it enters: token counts are integers
(integral floats accepted, ``bool`` not) in ``0..MAX_TOKENS``; ids and model names are strings of at most
``MAX_NAME_CHARS``. (Numbers are finite by construction: orjson refuses ``NaN`` and ``Infinity``.) A value out
of range is a ``protocol`` error of that attempt, so it fails over like any broken answer; it is logged once per
provider (then every 1000th time), not per request.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Protocol

import attrs
import orjson

from ..http.errors import (
    ConnectError,
    LocalResourceError,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
)
from ..resilience.errors import UpstreamError
from ..resilience.retry import parse_retry_after
from ..wire.errors import parse_upstream_error, scrub
from ..wire.sse import SSEError, SSEParser
from ..telemetry.ledger import MAX_NAME_CHARS, MAX_TOKENS
from ..telemetry.observe import note_finish_reasons

__all__ = [
    "Adapter",
    "ChatStream",
    "ChatResult",
    "Usage",
    "UpstreamStream",
    "append_chunks",
    "usage_from",
    "transport_error",
    "upstream_http_error",
    "open_exchange",
    "read_exchange",
    "upstream_stream_error",
    "MAX_NAME_CHARS",
    "MAX_TOKENS",
    "check_name",
    "check_usage",
    "model_ids",
    "out_of_range",
    "secrets_of",
    "token_count",
]

log = logging.getLogger(__name__)


@attrs.define(slots=True)
class Usage:
    """Token counts one request consumed, as the upstream reported them (0 when it did not)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@attrs.define(slots=True)  # not frozen: one per answer, and a frozen __init__ costs 2-6x as much
class ChatResult:
    """A finished non-streaming answer: the client-ready JSON bytes and what the ledger needs."""

    body: bytes
    usage: Usage


class ChatStream(Protocol):
    """An open upstream stream; iterate for lists of chunk payloads, always ``aclose()`` (idempotent).

    ``usage`` is filled in as the upstream reports it; ``finished`` turns true once the upstream's end
    marker was seen (with the last item, which may be an empty list).
    """

    usage: Usage
    finished: bool

    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...

    async def __anext__(self) -> list[bytes]: ...

    def set_deadline(self, deadline: float | None) -> None:
        """Reads from now on fail as an ``UpstreamError`` of kind ``timeout`` once ``deadline`` passes."""

    @property
    def at_end(self) -> bool:
        """``finished``, and nothing is left to read: ``aclose()`` will not block."""

    async def drain(self) -> None:
        """After ``finished``: read what is left of the upstream's answer, so its connection can be reused."""

    async def aclose(self) -> None: ...


class Adapter(Protocol):
    """What a provider type implements. ``body`` is OpenAI-shaped; ``include_usage`` is the client's wish.

    Every adapter bounds every wait of a call by ``deadline`` (trio's clock; the HTTP adapters through their
    transport), and its streams have ``set_deadline`` (and ``drain()``, ``at_end``): the pipeline opens no
    cancel scope around attempts or stream reads.
    """

    async def complete(self, body: dict, *, request_id: str, deadline: float | None = None) -> ChatResult: ...

    async def open_stream(self, body: dict, *, request_id: str, include_usage: bool,
                          deadline: float | None = None) -> ChatStream: ...

    async def embed(self, body: dict, deadline: float | None = None) -> ChatResult: ...

    async def list_models(self) -> list[str]: ...

    async def aclose(self, *, abort_in_use: bool = True) -> None: ...


class UpstreamStream:
    """The part every wire format's stream shares: the open upstream response, its SSE parser, usage and
    the end marker flag; ``aclose()`` closes the upstream exchange (idempotent). A stream of SSE events
    ending with a marker implements ``_event`` (and names the marker in ``_END``); any other implements
    ``__anext__``."""

    __slots__ = ("_provider", "_cm", "_response", "_it", "_parser", "usage", "finished", "_closed", "_secrets")

    #: The end marker, as a stream cut before it says.
    _END = "its end marker"

    def __init__(self, provider: str, cm, response, secrets=()) -> None:
        self._provider = provider
        self._secrets = secrets
        self._cm = cm
        self._response = response
        self._it = response.__aiter__()
        self._parser = SSEParser()
        self.usage = Usage()
        self.finished = False
        self._closed = False

    def __aiter__(self):
        return self

    async def _read(self) -> bytes | None:
        """The next upstream read, None at the end of the body; a transport failure is an UpstreamError."""
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            return None
        except TransportError as exc:
            raise transport_error(self._provider, exc, self._secrets) from None

    def _feed(self, raw: bytes) -> list:
        """The SSE events ``raw`` completes; malformed framing is an UpstreamError."""
        try:
            return self._parser.feed(raw)
        except SSEError as exc:
            raise UpstreamError(self._provider, "malformed", f"upstream sent a malformed event stream: {exc}") from None

    async def _events(self, end_marker: str) -> list:
        """The events completed by the next upstream read(s); never an empty list.

        A stream that ends before ``end_marker``, a transport failure and malformed framing are
        UpstreamErrors, so the breaker and failover judge them like any other failure.
        """
        while True:
            raw = await self._read()
            if raw is None:
                raise UpstreamError(self._provider, "stream_cut", f"upstream stream ended before {end_marker}")
            events = self._feed(raw)
            if events:
                return events

    async def __anext__(self) -> list[bytes]:
        """What the next upstream read(s) give to relay, never an empty list (until the end marker's read)."""
        if self.finished or self._closed:
            raise StopAsyncIteration
        while True:
            out: list[bytes] = []
            for ev in await self._events(self._END):
                if self._event(ev, out):
                    self.finished = True
                    return out
            if out:
                return out

    def _event(self, ev, out: list[bytes]) -> bool:
        """Append to ``out`` what SSE event ``ev`` relays; True for the end marker."""
        raise NotImplementedError

    def set_deadline(self, deadline: float | None) -> None:
        """Bound the reads from now on by ``deadline`` (trio's clock): past it a read fails as a timeout."""
        self._response.set_deadline(deadline)

    @property
    def at_end(self) -> bool:
        """The end marker came and the upstream body is read to its end: nothing is left to drain, and
        ``aclose()`` returns the connection without blocking."""
        return self.finished and self._response.at_end

    async def drain(self) -> None:
        """After the end marker: read what is left of the body (the chunked terminator, as a rule: one read),
        so that the connection goes back to the pool instead of being closed. Gives up quietly after a few
        reads or on any error; ``aclose()`` then closes the connection."""
        try:
            for _ in range(4):
                await self._it.__anext__()
        except (StopAsyncIteration, TransportError):
            pass

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._cm.__aexit__(None, None, None)


def append_chunks(out: list, chunks) -> None:
    """Translated chat chunks appended to ``out`` as JSON, each finish reason noted for the request's span."""
    dumps = orjson.dumps
    for chunk in chunks:
        if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
            note_finish_reasons(chunk["choices"])
        out.append(dumps(chunk))


def secrets_of(config) -> tuple[str, ...]:
    """The credentials an adapter sends upstream, to be scrubbed from anything the upstream says back."""
    key = getattr(config, "api_key", None)
    return (key,) if key else ()
# provider -> out-of-range values seen, for a log line per provider that does not repeat per request.
_out_of_range_seen: dict[str, int] = {}


def out_of_range(provider: str, what: str, shown: str) -> UpstreamError:
    """The ``protocol`` error for an upstream value out of range, logged once per provider (then every 1000th)."""
    n = _out_of_range_seen.get(provider, 0) + 1
    if n > 1 or len(_out_of_range_seen) < 1000:  # bounded: registered providers are far fewer
        _out_of_range_seen[provider] = n
    if n == 1 or n % 1000 == 0:
        log.warning("provider %r sent an out-of-range %s (%s); each such answer fails its attempt (%d so far)",
                    provider, what, shown, n)
    return UpstreamError(provider, "protocol", f"upstream sent an out-of-range {what} ({shown})")


def token_count(provider: str, u: dict, name: str) -> int:
    """``u[name]`` as a token count: missing or null is 0; anything but an integer in ``0..MAX_TOKENS`` is an
    out-of-range protocol error."""
    v = u.get(name)
    if v is None:
        return 0
    t = type(v)
    if t is int:
        if 0 <= v <= MAX_TOKENS:
            return v
    elif t is float and 0 <= v <= MAX_TOKENS and v.is_integer():
        return int(v)
    shown = repr(v) if t in (int, float, bool) else t.__name__
    raise out_of_range(provider, f"usage.{name}", shown[:40])


def check_usage(provider: str, u, names, field: str = "usage") -> None:
    """An upstream's usage object ``u`` (absent or null is none): an object whose counts ``names`` are each a
    :func:`token_count`; checked before anything adds them up."""
    if u is None:
        return
    if not isinstance(u, dict):
        raise UpstreamError(provider, "malformed", f"upstream {field} is not an object")
    for name in names:
        token_count(provider, u, name)


def check_name(provider: str, obj: dict, name: str) -> None:
    """``obj[name]`` (an id or a model name) is absent, null or a string of at most ``MAX_NAME_CHARS``."""
    v = obj.get(name)
    if v is None or (type(v) is str and len(v) <= MAX_NAME_CHARS):
        return
    shown = f"{len(v)} characters" if type(v) is str else type(v).__name__
    raise out_of_range(provider, name, shown)


def model_ids(provider: str, data: list) -> list[str]:
    """The string ``id`` of each model object of a ``/models`` listing, each checked by :func:`check_name`."""
    ids = []
    for m in data:
        if isinstance(m, dict) and isinstance(m.get("id"), str):
            check_name(provider, m, "id")
            ids.append(m["id"])
    return ids


def usage_from(provider: str, u: Any, usage: Usage) -> None:
    """Copy an OpenAI-shaped ``usage`` object's counts into ``usage``, each checked by :func:`token_count`."""
    if not isinstance(u, dict):
        raise UpstreamError(provider, "malformed", "upstream usage is not an object")
    prompt = token_count(provider, u, "prompt_tokens")
    completion = token_count(provider, u, "completion_tokens")
    usage.prompt_tokens, usage.completion_tokens = prompt, completion  # both or neither


def transport_error(provider: str, exc: BaseException, secrets=()) -> UpstreamError:
    """Classify a transport failure once, for breaker, retry and the client's error message."""
    if isinstance(exc, LocalResourceError):  # before timeouts: PoolTimeout is both
        return UpstreamError(provider, "local", f"out of {exc.resource}")
    if isinstance(exc, TransportTimeout):
        return UpstreamError(provider, "timeout", f"upstream timed out ({type(exc).__name__})")
    if isinstance(exc, ConnectError):
        return UpstreamError(provider, "connect", scrub(f"could not connect to upstream: {exc}", secrets))
    if isinstance(exc, RemoteProtocolError):
        return UpstreamError(provider, "protocol", scrub(f"upstream broke the HTTP protocol: {exc}", secrets))
    if isinstance(exc, TransportError):
        return UpstreamError(provider, "connect", scrub(f"upstream connection failed: {exc}", secrets))
    return UpstreamError(provider, "connect", f"upstream connection failed: {type(exc).__name__}")


def upstream_http_error(provider: str, status: int, headers, body: bytes, secrets=()) -> UpstreamError:
    """An upstream HTTP error status as an UpstreamError: its own words (scrubbed of ``secrets`` and of
    anything shaped like a credential) and its requested pause."""
    detail = parse_upstream_error(body, secrets)
    return UpstreamError(
        provider,
        "http",
        f"upstream returned {status}: {detail.message}",
        status=status,
        retry_after=parse_retry_after(headers),
        detail=detail,
    )


async def open_exchange(provider: str, transport, method: str, url: str, headers, body: bytes, *, timeouts=None,
                        deadline: float | None = None, secrets=(), http_error=upstream_http_error):
    """Send a request; ``(cm, response)`` once a 200 head arrived. Any other status is read and raised as
    ``http_error(provider, status, headers, body, secrets)``; a transport failure as :func:`transport_error`."""
    cm = transport.stream(method, url, headers, body, timeouts=timeouts, deadline=deadline)
    try:
        response = await cm.__aenter__()
    except TransportError as exc:
        raise transport_error(provider, exc, secrets) from None
    if response.status != 200:
        try:
            raw = await response.read()
        except TransportError:
            raw = b""
        finally:
            await cm.__aexit__(None, None, None)
        raise http_error(provider, response.status, response.headers, raw, secrets)
    return cm, response


async def read_exchange(provider: str, cm, response, secrets=()) -> bytes:
    """The whole body of an exchange :func:`open_exchange` opened, which it then closes."""
    try:
        return await response.read()
    except TransportError as exc:
        raise transport_error(provider, exc, secrets) from None
    finally:
        await cm.__aexit__(None, None, None)


def upstream_stream_error(provider: str, err, secrets=(), status: int | None = None) -> UpstreamError:
    """An error event in the middle of an upstream stream (OpenAI's ``{"error": ...}`` chunk, Anthropic's
    ``error`` event): the stream is cut, with the upstream's words kept for the client."""
    detail = parse_upstream_error(orjson.dumps({"error": err}) if err is not None else b"", secrets)
    return UpstreamError(provider, "stream_cut", f"upstream reported an error mid-stream: {detail.message}",
                         detail=detail)


def new_created() -> int:
    return int(time.time())


def loads_object(provider: str, data: bytes, what: str) -> dict[str, Any]:
    """Parse an upstream JSON object; anything else is a ``malformed`` upstream error, never skipped."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(provider, "malformed", f"upstream sent invalid JSON in {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise UpstreamError(provider, "malformed", f"upstream sent a {type(obj).__name__} where {what} should be an object")
    return obj
