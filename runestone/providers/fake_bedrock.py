"""Amazon Bedrock's Converse API as the fake provider speaks it: SigV4 checked, answers event-stream framed.

:func:`verify_sigv4` recomputes a request's signature with botocore's own signer (the canonical request,
string to sign and signing key of ``botocore.auth.SigV4Auth``) from the credentials the fake knows, and
compares; a request that is unsigned, signed for another service, or signed with another secret gets the
403 AWS answers. :func:`event_message` writes one message of the AWS event-stream framing (a prelude of
total and header lengths with its CRC32, string headers, the payload, the message CRC32): botocore has a
decoder, which the gateway uses, but no encoder, so the fake has this one. :func:`converse_answer` and
:func:`converse_stream_frames` write a fake-model answer (:mod:`.fake_content`) as Converse's JSON or as
ConverseStream's events, in the order Bedrock sends them.
"""

from __future__ import annotations

import hmac
import re
import struct
import zlib

import orjson

from ..http.server import Response
from .fake_content import FakeAnswer

__all__ = ["bedrock_error", "converse_answer", "converse_stream_frames", "event_message", "verify_sigv4"]

_EXCEPTIONS = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
               408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
               500: "InternalServerException", 503: "ServiceUnavailableException"}
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request,\s*"
                   r"SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})$")
EVENT_STREAM = ((b"content-type", b"application/vnd.amazon.eventstream"),)


def bedrock_error(status: int, message: str, name: str | None = None, headers=()) -> Response:
    """An error as Bedrock answers one: the exception's name in ``x-amzn-ErrorType``, ``{"message"}``."""
    name = name or _EXCEPTIONS.get(status) or ("InternalServerException" if status >= 500 else "ValidationException")
    return Response(status, [(b"content-type", b"application/json"),
                             (b"x-amzn-errortype", f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/".encode()),
                             *headers], orjson.dumps({"message": message}))


def verify_sigv4(request, body: bytes, credentials: dict[str, str], service: str = "bedrock") -> Response | None:
    """None when ``request`` carries a valid SigV4 signature by one of ``credentials`` (access key id ->
    secret) for ``service``; else the 403 AWS answers."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    header = request.header(b"authorization")
    if header is None:
        return bedrock_error(403, "Missing Authentication Token", "MissingAuthenticationTokenException")
    m = _AUTH.match(header.decode("latin-1"))
    if m is None:
        return bedrock_error(403, "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'.",
                             "IncompleteSignatureException")
    key_id, date, region, signed_for, signed_names, signature = m.groups()
    secret = credentials.get(key_id)
    if secret is None:
        return bedrock_error(403, "The security token included in the request is invalid.",
                             "UnrecognizedClientException")
    if signed_for != service:
        return bedrock_error(403, f"Credential should be scoped to correct service: '{service}'.",
                             "InvalidSignatureException")
    amz_date = (request.header(b"x-amz-date") or b"").decode("latin-1")
    if amz_date[:8] != date:
        return bedrock_error(403, "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                             "from HTTP.", "InvalidSignatureException")
    names = signed_names.split(";")
    if "host" not in names:
        return bedrock_error(403, "'Host' must be a 'SignedHeader' in the AWS Authorization.",
                             "InvalidSignatureException")
    headers = {}
    for name in names:
        values = [v.decode("latin-1") for k, v in request.headers if k.decode("latin-1") == name]
        if not values:
            return bedrock_error(403, f"Signed header {name!r} is missing.", "InvalidSignatureException")
        headers[name] = ",".join(values)
    url = "http://" + headers["host"] + request.path + (f"?{request.query}" if request.query else "")
    aws = AWSRequest(method=request.method, url=url, data=body, headers=headers)
    aws.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(key_id, secret, headers.get("x-amz-security-token")), service, region)
    expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
    if not hmac.compare_digest(expected, signature):
        return bedrock_error(403, "The request signature we calculated does not match the signature you provided. "
                             "Check your AWS Secret Access Key and signing method.", "InvalidSignatureException")
    return None


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32), string headers
    (name length, name, type 7, value length, value), payload, CRC32 of everything before it."""
    head = b"".join(struct.pack(">B", len(k)) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
                    for k, v in headers.items())
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(kind: str, data: dict) -> bytes:
    # Bedrock pads each event with a "p" member of varying length (against traffic analysis): clients ignore it.
    data = {**data, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"[: 4 + len(kind)]}
    return event_message({":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
                         orjson.dumps(data))


def exception_message(name: str, message: str) -> bytes:
    """An exception in the middle of a stream (``:message-type`` exception, the name lower camel case)."""
    return event_message({":exception-type": name[:1].lower() + name[1:], ":content-type": "application/json",
                          ":message-type": "exception"}, orjson.dumps({"message": message}))


def _stop_reason(answer: FakeAnswer) -> str:
    choice = answer.choices[0]
    if choice.tool_call is not None:
        return "tool_use"
    if choice.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if choice.stop_sequence is not None else "end_turn"


def _usage(answer: FakeAnswer) -> dict:
    return {"inputTokens": answer.prompt_tokens, "outputTokens": answer.completion_tokens,
            "totalTokens": answer.prompt_tokens + answer.completion_tokens}


def _reasoning_block(block: dict) -> dict:
    if block["type"] == "thinking":
        return {"reasoningContent": {"reasoningText": {"text": block["thinking"], "signature": block["signature"]}}}
    return {"reasoningContent": {"redactedContent": block["data"]}}


def converse_answer(answer: FakeAnswer) -> dict:
    """The Converse response for a fake answer (its first choice: Converse has no ``n``)."""
    choice = answer.choices[0]
    content = []
    if choice.thinking_block is not None:
        content.append(_reasoning_block(choice.thinking_block))
    if choice.tool_call is not None:
        call = choice.tool_call
        content.append({"toolUse": {"toolUseId": "tooluse_" + call.id.removeprefix("call_"), "name": call.name,
                                    "input": orjson.loads(call.arguments)}})
    else:
        content.append({"text": choice.text})
    return {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": _stop_reason(answer),
            "usage": _usage(answer), "metrics": {"latencyMs": 1}}


def converse_stream_frames(answer: FakeAnswer) -> list[bytes]:
    """ConverseStream's events for a fake answer: messageStart; per content block its start (tool use
    only), deltas and stop; messageStop; metadata with the usage."""
    choice = answer.choices[0]
    frames = [_event("messageStart", {"role": "assistant"})]
    index = 0
    block = choice.thinking_block
    if block is not None:
        if block["type"] == "thinking":
            frames += [_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": p}}})
                       for p in choice.reasoning_pieces]
            frames.append(_event("contentBlockDelta", {"contentBlockIndex": 0,
                                                       "delta": {"reasoningContent": {"signature": block["signature"]}}}))
        else:
            frames.append(_event("contentBlockDelta", {"contentBlockIndex": 0,
                                                       "delta": {"reasoningContent": {"redactedContent": block["data"]}}}))
        frames.append(_event("contentBlockStop", {"contentBlockIndex": 0}))
        index = 1
    if choice.tool_call is not None:
        call = choice.tool_call
        frames.append(_event("contentBlockStart", {"contentBlockIndex": index, "start": {"toolUse": {
            "toolUseId": "tooluse_" + call.id.removeprefix("call_"), "name": call.name}}}))
        frames += [_event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": p}}})
                   for p in call.pieces]
    else:
        frames += [_event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": p}})
                   for p in choice.pieces]
    frames.append(_event("contentBlockStop", {"contentBlockIndex": index}))
    frames.append(_event("messageStop", {"stopReason": _stop_reason(answer)}))
    frames.append(_event("metadata", {"usage": _usage(answer), "metrics": {"latencyMs": 1}}))
    return frames
