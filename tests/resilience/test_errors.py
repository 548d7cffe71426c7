"""The upstream error taxonomy: what counts against a breaker, what may be retried."""

import pytest

from runestone.routing.executor import client_error
import trio

from runestone.resilience.errors import UpstreamError, counts_as_failure, is_retryable


def http(status: int, **kw) -> UpstreamError:
    return UpstreamError("p1", "http", f"status {status}", status=status, **kw)


@pytest.mark.parametrize(
    ("status", "counts", "retryable"),
    [
        (500, True, True),
        (502, True, True),
        (503, True, True),
        (504, True, True),
        (529, True, True),
        (429, True, True),
        (408, True, True),
        (409, False, True),
        (400, False, False),
        # The upstream refusing the gateway's own credential: the provider is unusable, another may serve.
        (401, True, True),
        (403, True, True),
        (404, False, False),
        (413, False, False),
        (422, False, False),
    ],
)
def test_http_status_matrix(status, counts, retryable):
    err = http(status)
    assert err.counts_for_breaker is counts
    assert err.retryable is retryable
    assert counts_as_failure(err) is counts
    assert is_retryable(err) is retryable
    assert counts_as_failure(status) is counts
    assert is_retryable(status) is retryable


@pytest.mark.parametrize("kind", ["timeout", "connect", "protocol", "stream_cut", "malformed"])
def test_transport_and_stream_kinds_count_and_retry(kind):
    err = UpstreamError("p1", kind, "boom")
    assert counts_as_failure(err) and is_retryable(err)
    assert client_error(err).code == f"upstream_{kind}"


@pytest.mark.parametrize(
    "exc",
    [TimeoutError(), trio.TooSlowError(), ConnectionResetError(), OSError("refused"), trio.BrokenResourceError()],
)
def test_plain_transport_exceptions(exc):
    assert counts_as_failure(exc)
    assert is_retryable(exc)


def test_unknown_exception_counts_but_is_not_retried():
    exc = KeyError("bug")
    assert counts_as_failure(exc)
    assert not is_retryable(exc)


def test_other_libraries_errors_classified_by_status():
    class Response:
        status_code = 422

    class StatusError(Exception):
        response = Response()

    class SdkError(Exception):
        status_code = 503

    assert not counts_as_failure(StatusError())
    assert not is_retryable(StatusError())
    assert counts_as_failure(SdkError()) and is_retryable(SdkError())


async def test_cancellation_is_neither():
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            assert not counts_as_failure(exc)
            assert not is_retryable(exc)
            raise


def test_constructor_validates_and_formats():
    with pytest.raises(ValueError):
        UpstreamError("p1", "weird", "x")
    with pytest.raises(ValueError):
        UpstreamError("p1", "http", "no status")
    err = http(429, retry_after=2.5)
    assert err.retry_after == 2.5
    assert str(err) == "p1: http 429: status 429"
    refusal = client_error(err)
    assert refusal.status == 429 and refusal.type == "rate_limit_error" and refusal.param is None
    assert refusal.headers == [(b"retry-after", b"2")]
    assert client_error(http(400)).type == "invalid_request_error"
    failure = client_error(http(502))
    assert (failure.status, failure.message, failure.type, failure.code) == (
        502, "provider 'p1': upstream returned 502: status 502", "api_error", "upstream_502")
    refused = client_error(http(401))
    assert refused.status == 502 and refused.code == "provider_auth_failed" and "not your API key" in refused.message
    with pytest.raises(UpstreamError) as info:
        raise http(503)
    assert info.value.status == 503
