"""The gateway's taxonomy of upstream failures and the two questions asked of them.

Every failure an attempt can meet is classified once, here, so that the circuit
breaker, the retry policy and failover agree on what happened. Providers raise
``UpstreamError`` for anything the upstream did (an HTTP error status, a cut or
malformed stream); transport failures may also surface as the plain Python
exceptions they are (``TimeoutError``, ``trio.TooSlowError``, ``OSError``,
``trio.BrokenResourceError``). Two questions are asked of any of them:

* ``counts_as_failure`` -- is it evidence that the *provider* is unwell? (for the
  breaker). A client's own mistake (400, 401, 403, 404, 413, 422) is not.
* ``is_retryable`` -- may another attempt (the same provider after a pause, or the
  next candidate) succeed where this one failed?

The tree::

    Exception
    └── UpstreamError            kind:
          "http"        status >= 500, 408, 429: breaker failure, retryable
                        401, 403: the upstream refused the gateway's own credential:
                        breaker failure, retryable (another provider may take it)
                        other 4xx: the client's fault, neither
          "timeout"     connect/read/first-token deadline passed: both
          "connect"     could not reach the upstream: both
          "protocol"    the upstream broke HTTP: both
          "stream_cut"  the body ended before its end marker: both
          "malformed"   the body was not what the wire format says: both
          "local"       the gateway itself ran out (file descriptors, memory, its pool):
                        neither; the client gets the gateway's own 503

``trio.Cancelled`` (the client went away, or the request deadline) is neither:
it says nothing about the provider.
"""

from __future__ import annotations

import trio

__all__ = ["UpstreamError", "KINDS", "counts_as_failure", "is_retryable"]

KINDS = frozenset({"http", "timeout", "connect", "protocol", "stream_cut", "malformed", "local"})

# 408 and 429 are the upstream telling us it is overwhelmed or slow, not that the
# request was wrong; 409 is what OpenAI returns on a transient lock conflict and its
# SDK retries it, but it is not a sign of an unwell provider.
_RETRYABLE_4XX = frozenset({401, 403, 408, 409, 429})
_BREAKER_4XX = frozenset({401, 403, 408, 429})
#: The upstream refused the gateway's provider credential: never the client's key, whatever the status says.
CREDENTIAL_REFUSED = frozenset({401, 403})



class UpstreamError(Exception):
    """A failure attributable to one upstream provider during one attempt.

    ``status`` is the upstream's HTTP status when it sent one; ``retry_after`` is
    the upstream's requested pause in seconds, already parsed (see
    ``runestone.resilience.retry.parse_retry_after``); ``detail`` is what the
    upstream said of its error (``runestone.wire.errors.UpstreamErrorBody``:
    message, type, code, param), already scrubbed of credentials, so that the
    client can be given it unchanged. ``message`` is the gateway's one-line
    account, for logs and for clients when there is no ``detail``.
    """

    __slots__ = ("provider", "status", "kind", "message", "retry_after", "detail")

    def __init__(
        self,
        provider: str,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        detail=None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown upstream error kind {kind!r}; expected one of {sorted(KINDS)}")
        if kind == "http" and status is None:
            raise ValueError("an 'http' upstream error needs its status")
        super().__init__(provider, kind, message)
        self.provider = provider
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.detail = detail

    def __str__(self) -> str:
        status = f" {self.status}" if self.status is not None else ""
        return f"{self.provider}: {self.kind}{status}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"UpstreamError(provider={self.provider!r}, kind={self.kind!r}, status={self.status!r}, "
            f"message={self.message!r}, retry_after={self.retry_after!r})"
        )

    @property
    def client_fault(self) -> bool:
        """True when the upstream rejected the request itself (a 4xx other than 401/403/408/409/429)."""
        status = self.status
        return self.kind == "http" and status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX

    @property
    def retryable(self) -> bool:
        """May another attempt succeed? False for a request the upstream judged wrong, and for
        local exhaustion: any other provider would meet the same limits."""
        if self.kind != "http":
            return self.kind != "local"
        status = self.status
        return status >= 500 or status in _RETRYABLE_4XX  # type: ignore[operator]

    @property
    def counts_for_breaker(self) -> bool:
        """Is this evidence that the provider is unwell?"""
        if self.kind != "http":
            return self.kind != "local"
        status = self.status
        return status >= 500 or status in _BREAKER_4XX  # type: ignore[operator]



def _status_of(error: object) -> int | None:
    # Exceptions from other HTTP libraries (httpx.HTTPStatusError carries a
    # response, SDK errors a status_code) are classified by status, duck-typed so
    # that this module need not import them.
    status = getattr(error, "status_code", None)
    if status is None:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def counts_as_failure(error: object) -> bool:
    """Should this outcome count against the provider's circuit breaker?

    Accepts an exception or a bare HTTP status. Cancellation never counts; a
    client-caused 4xx never counts; timeouts, connection errors, 5xx, 408, 429
    and broken or malformed streams do. An exception of an unknown type counts:
    it escaped the code that talks to the provider, and not counting it is how
    a breaker ends up never opening.
    """
    if isinstance(error, UpstreamError):
        return error.counts_for_breaker
    if isinstance(error, int):
        return error >= 500 or error in _BREAKER_4XX
    if isinstance(error, trio.Cancelled):
        return False
    status = _status_of(error)
    if status is not None:
        return status >= 500 or status in _BREAKER_4XX
    return isinstance(error, BaseException) and not isinstance(error, (KeyboardInterrupt, SystemExit))


def is_retryable(error: object) -> bool:
    """May another attempt succeed where this one failed?

    Timeouts, connection errors and broken streams are; a client fault is not.
    An exception of an unknown type is not: it is most likely a bug on our side
    that a second attempt would only repeat.
    """
    if isinstance(error, UpstreamError):
        return error.retryable
    if isinstance(error, int):
        return error >= 500 or error in _RETRYABLE_4XX
    if isinstance(error, trio.Cancelled):
        return False
    if isinstance(error, (TimeoutError, trio.TooSlowError, OSError, trio.BrokenResourceError)):
        return True
    status = _status_of(error)
    if status is not None:
        return status >= 500 or status in _RETRYABLE_4XX
    return False
