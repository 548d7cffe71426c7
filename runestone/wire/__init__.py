"""The wire formats the gateway speaks, in one place, importing nothing else of Runestone's.

- :mod:`.errors`: a client-facing error in no API's shape (``ErrorInfo``), each API's error body, the
  upstream's own error read back (``parse_upstream_error``), credentials scrubbed from upstream text.
- :mod:`.openai`: chat and embeddings validation (``InvalidRequest`` naming the field), SSE encoding.
- :mod:`.completions`: the legacy completions API as a one-message chat and back.
- :mod:`.anthropic`: the Messages API as clients speak it to the gateway (validation, translation to the
  canonical chat body, the answer and the stream translated back).
- :mod:`.anthropic_upstream`: the canonical chat body sent to an Anthropic upstream, and its answers back.
- :mod:`.bedrock`: the canonical chat body as Amazon Bedrock's Converse API, and its answers and stream events back.
- :mod:`.reasoning`: how reasoning (thinking blocks, ``reasoning_content``, efforts) rides in the canonical body.
- :mod:`.sse`: the server-sent events parser and encoder.
- :mod:`.websocket`: what the WebSocket APIs share: a client's message id, the ``error`` message.
- :mod:`.token_estimate`: the gateway's one token estimate (budgets, the ``cost`` policy, ``count_tokens``,
  the fake's usage).
"""

from .errors import ErrorInfo as ErrorInfo
from .errors import InvalidRequest as InvalidRequest
from .errors import anthropic_error_body as anthropic_error_body
from .errors import openai_error_body as openai_error_body
from .errors import parse_upstream_error as parse_upstream_error
from .errors import scrub as scrub

__all__ = [
    "anthropic_error_body",
    "ErrorInfo",
    "InvalidRequest",
    "openai_error_body",
    "parse_upstream_error",
    "scrub",
]
