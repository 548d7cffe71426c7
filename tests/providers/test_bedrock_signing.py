"""SigV4 and the AWS event-stream framing: botocore's signer against AWS's published test vector, the fake's
verifier against botocore's signer, and the fake's framing encoder against botocore's decoder."""

import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

from runestone.providers.fake_bedrock import event_message, exception_message, verify_sigv4

# AWS Signature Version 4 test suite, "get-vanilla" (the published canonical request, string to sign, signature).
VANILLA_KEY = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
VANILLA_CANONICAL = ("GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
                     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
VANILLA_STS_HASH = "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
VANILLA_SIGNATURE = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


class FakeRequest:
    """What verify_sigv4 reads of a server request: method, raw path and query, header list."""

    def __init__(self, method, path, query, headers):
        self.method, self.path, self.query = method, path, query
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    def header(self, name: bytes):
        return next((v for k, v in self.headers if k == name), None)


def test_botocore_signs_the_published_vector():
    request = AWSRequest(method="GET", url="https://example.amazonaws.com/",
                         headers={"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"})
    request.context["timestamp"] = "20150830T123600Z"
    signer = SigV4Auth(Credentials(*VANILLA_KEY), "service", "us-east-1")
    canonical = signer.canonical_request(request)
    assert canonical == VANILLA_CANONICAL
    sts = signer.string_to_sign(request, canonical)
    assert sts.splitlines() == ["AWS4-HMAC-SHA256", "20150830T123600Z", "20150830/us-east-1/service/aws4_request",
                                VANILLA_STS_HASH]
    assert signer.signature(sts, request) == VANILLA_SIGNATURE


def test_the_fakes_verifier_accepts_the_published_vector_and_nothing_else():
    auth = ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={VANILLA_SIGNATURE}")
    headers = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z", "Authorization": auth}
    creds = {VANILLA_KEY[0]: VANILLA_KEY[1]}
    assert verify_sigv4(FakeRequest("GET", "/", "", headers), b"", creds, service="service") is None
    # One changed byte anywhere: the path, the body, a signed header, the secret, the service.
    refusals = [
        verify_sigv4(FakeRequest("GET", "/x", "", headers), b"", creds, service="service"),
        verify_sigv4(FakeRequest("GET", "/", "", headers), b"{}", creds, service="service"),
        verify_sigv4(FakeRequest("GET", "/", "", {**headers, "Host": "example.amazonaws.con"}), b"", creds,
                     service="service"),
        verify_sigv4(FakeRequest("GET", "/", "", headers), b"", {VANILLA_KEY[0]: "other"}, service="service"),
        verify_sigv4(FakeRequest("GET", "/", "", headers), b"", creds, service="bedrock"),
        verify_sigv4(FakeRequest("GET", "/", "", {k: v for k, v in headers.items() if k != "Authorization"}), b"",
                     creds, service="service"),
    ]
    assert [r.status for r in refusals] == [403] * 6
    kinds = [dict(r.headers)[b"x-amzn-errortype"].split(b":")[0] for r in refusals]
    assert kinds == [b"InvalidSignatureException"] * 5 + [b"MissingAuthenticationTokenException"]


def test_a_bedrock_request_signed_by_botocore_verifies_with_its_session_token():
    body = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
    url = "http://127.0.0.1:4010/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials("AKIATEST", "secret/key", "session-token"), "bedrock", "eu-west-1").add_auth(request)
    headers = {"Host": "127.0.0.1:4010", **dict(request.headers)}
    assert "x-amz-security-token" in headers["Authorization"]  # botocore signs the token in
    server_request = FakeRequest("POST", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", "", headers)
    assert verify_sigv4(server_request, body, {"AKIATEST": "secret/key"}) is None
    tampered = FakeRequest("POST", server_request.path, "", {**headers, "X-Amz-Security-Token": "other"})
    assert verify_sigv4(tampered, body, {"AKIATEST": "secret/key"}).status == 403


def test_event_stream_frames_decode_with_botocore_at_any_split():
    frames = [event_message({":event-type": "contentBlockDelta", ":content-type": "application/json",
                             ":message-type": "event"}, orjson.dumps({"contentBlockIndex": 0, "delta": {"text": "hé"}})),
              exception_message("ThrottlingException", "slow down")]
    data = b"".join(frames)
    for cut in range(1, len(data)):
        buffer = EventStreamBuffer()
        got = []
        for part in (data[:cut], data[cut:]):
            buffer.add_data(part)
            got.extend(buffer)
        assert [m.headers.get(":event-type") or m.headers.get(":exception-type") for m in got] == \
            ["contentBlockDelta", "throttlingException"]
        assert orjson.loads(got[0].payload)["delta"]["text"] == "hé"
        assert got[1].headers[":message-type"] == "exception"
    broken = bytearray(frames[0])
    broken[-6] ^= 1  # a payload byte: the message CRC no longer matches
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(broken))
    with pytest.raises(ChecksumMismatch):
        list(buffer)
