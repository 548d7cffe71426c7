"""Upstream error bodies read back, each API's error body, and credentials scrubbed from upstream text."""

from __future__ import annotations

import orjson
import pytest

from runestone.wire.errors import (
    ErrorInfo,
    anthropic_error_body,
    anthropic_type,
    openai_error_body,
    parse_upstream_error,
    scrub,
)

KEY = "sk-proj-abcdefghijklmnop1234"


@pytest.mark.parametrize("text", [
    f"Incorrect API key provided: {KEY}",
    "header was Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
    'request had {"x-api-key": "0123456789abcdef0123"}',
    "GET /v1beta/models?key=AIzaSyA-0123456789abcdefghij failed",
    "anthropic key sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA leaked",
])
def test_credentials_and_credential_shaped_text_are_scrubbed(text):
    out = scrub(text, (KEY,))
    assert "[redacted]" in out
    for secret in (KEY, "abcdefghijklmnopqrstuvwxyz012345", "0123456789abcdef0123", "AIzaSyA-0123456789abcdefghij",
                   "sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"):
        assert secret not in out


def test_plain_text_is_left_alone():
    text = "This model's maximum context length is 8192 tokens; your messages resulted in 9000 tokens."
    assert scrub(text, (KEY,)) == text
    assert scrub("", (KEY,)) == ""


def test_a_configured_secret_of_any_shape_is_removed():
    assert scrub("the key was hunter2-secret!", ("hunter2-secret!",)) == "the key was [redacted]"


def test_openai_and_anthropic_error_bodies_are_read_field_by_field():
    body = orjson.dumps({"error": {"message": f"bad key {KEY}", "type": "invalid_request_error",
                                   "param": "messages", "code": "context_length_exceeded"}})
    got = parse_upstream_error(body, (KEY,))
    assert (got.type, got.code, got.param, got.shape) == (
        "invalid_request_error", "context_length_exceeded", "messages", "openai")
    assert KEY not in got.message
    got = parse_upstream_error(orjson.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                                        "message": "Overloaded"}}))
    assert (got.message, got.type, got.shape) == ("Overloaded", "overloaded_error", "anthropic")


def test_anything_else_becomes_a_short_scrubbed_message():
    html = f"<html><body><h1>502 Bad Gateway</h1>{KEY}</body></html>".encode() + b"x" * 1000
    got = parse_upstream_error(html, (KEY,))
    assert got.type is None and KEY not in got.message and len(got.message) <= 220
    assert parse_upstream_error(b"").message == "no details"
    assert parse_upstream_error(b'{"error": "plain string"}').message == "plain string"
    assert parse_upstream_error(b'{"detail": "Not Found"}').message == "Not Found"


@pytest.mark.parametrize("status, type_, want", [
    (400, "invalid_request_error", "invalid_request_error"),
    (429, "requests", "rate_limit_error"),
    (502, "server_error", "api_error"),
    (503, "server_error", "overloaded_error"),
    (504, "timeout_error", "timeout_error"),
    (404, "not_found_error", "not_found_error"),
    (422, None, "invalid_request_error"),
])
def test_anthropic_types_for_the_shared_vocabulary(status, type_, want):
    assert anthropic_type(status, type_) == want


def test_bodies():
    info = ErrorInfo(400, "must be a string", "invalid_request_error", "messages[0].content", "invalid_value")
    assert orjson.loads(openai_error_body(info)) == {"error": {
        "message": "must be a string", "type": "invalid_request_error", "param": "messages[0].content",
        "code": "invalid_value"}}
    assert orjson.loads(anthropic_error_body(info)) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages[0].content: must be a string"}}
