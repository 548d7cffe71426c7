"""Reasoning in the canonical chat body: how a model's thinking travels between wire formats.

Vendors name the same thing differently: Anthropic's ``thinking`` request parameter and its ``thinking`` /
``redacted_thinking`` content blocks (signed, and required back unchanged on the next turn of a tool loop),
OpenAI-compatible hosts' ``reasoning_content`` (or ``reasoning``) on messages and stream deltas, OpenAI's
``reasoning_effort`` and the Responses API's ``reasoning`` items, Bedrock's ``reasoningContent`` blocks. The
canonical chat body (OpenAI's shape, see :mod:`runestone.wire.openai`) carries all of them with these fields:

- request ``reasoning_effort`` (OpenAI's own: ``none``/``minimal``/``low``/``medium``/``high``/``xhigh``);
- request ``thinking``: Anthropic's object (``{"type": "enabled", "budget_tokens": N}``, ``{"type":
  "disabled"}``, ``{"type": "adaptive"}``), set by the ``/v1/messages`` decoder. Anthropic and Bedrock
  upstreams send it as it is; an OpenAI upstream gets the nearest ``reasoning_effort`` instead
  (:func:`effort_for_thinking`); ``reasoning_effort`` going to Anthropic or Bedrock becomes a thinking
  budget (:func:`thinking_for`, :data:`EFFORT_BUDGETS`);
- assistant message ``reasoning_content``: the reasoning text (``reasoning`` is read as a synonym);
- assistant message ``thinking_blocks``: gateway-private, Anthropic-shaped blocks kept verbatim
  (``{"type": "thinking", "thinking", "signature"}``, ``{"type": "redacted_thinking", "data"}``), so a signed
  block a client returns reaches an Anthropic (or Bedrock) upstream byte for byte. An answer carries both
  fields; when a client sends both back, ``thinking_blocks`` wins (it is what the signature covers);
- stream delta ``reasoning_content`` (text) and ``thinking_blocks`` fragments ``{"index": k, "type", ...}``:
  fragments of one index concatenate their ``thinking``, ``signature`` and ``data`` strings, as tool call
  argument fragments do (:class:`ThinkingBlocks` puts them together).

Where a format has no counterpart, the request is refused with a 400 naming the field rather than dropped:
reasoning without a signature cannot be sent to Anthropic (it verifies signatures), and a redacted block
(Anthropic's encrypted reasoning) cannot be sent to an OpenAI-compatible upstream. Reasoning tokens are
output tokens for every vendor (they are in ``completion_tokens`` and priced as output); where the
upstream counts them apart they appear as ``usage.completion_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest

__all__ = [
    "EFFORT_BUDGETS",
    "ThinkingBlocks",
    "check_thinking_blocks",
    "effort_for_thinking",
    "for_openai_upstream",
    "put_thinking",
    "reasoning_of",
    "thinking_for",
]

#: Anthropic's thinking budget (tokens) for each OpenAI ``reasoning_effort``; None: no thinking.
EFFORT_BUDGETS: dict[str, int | None] = {"none": None, "minimal": None, "low": 1024, "medium": 4096,
                                         "high": 16384, "xhigh": 32768}
#: Anthropic's smallest thinking budget.
MIN_BUDGET = 1024


def reasoning_of(obj: dict) -> str | None:
    """The reasoning text of a message or delta (``reasoning_content``, or ``reasoning`` as some hosts name it)."""
    text = obj.get("reasoning_content")
    if text is None:
        text = obj.get("reasoning")
    return text if isinstance(text, str) and text else None


def put_thinking(message: dict, blocks: list[dict]) -> dict:
    """``message`` (an assistant turn or answer in the canonical body) with its thinking ``blocks``: verbatim
    as ``thinking_blocks`` and, where they hold text, that text joined as ``reasoning_content``; unchanged
    when there are none."""
    if blocks:
        text = "".join(b.get("thinking") or "" for b in blocks)
        if text:
            message["reasoning_content"] = text
        message["thinking_blocks"] = blocks
    return message


#: The ``thinking_blocks`` signature prefix of a Gemini thought part's signature ...
GEMINI_THOUGHT_PREFIX = "gemini:"
#: ... and of the signature Gemini put on an answer's text part (a block with no thinking text of its own).
GEMINI_TEXT_PREFIX = "gemini-text:"


def signed_by(block: dict) -> str:
    """Which vendor signed a thinking block: ``"gemini"`` for the signatures the Gemini translation wraps,
    else ``"anthropic"`` (Anthropic's signatures are opaque and carry no prefix)."""
    signature = block.get("signature") or ""
    if signature.startswith((GEMINI_THOUGHT_PREFIX, GEMINI_TEXT_PREFIX)):
        return "gemini"
    return "anthropic"


def check_thinking_blocks(blocks: Any, param: str) -> list[dict]:
    """``thinking_blocks`` of an assistant message, checked: a 400 naming the block when one is malformed."""
    if not isinstance(blocks, list):
        raise InvalidRequest(param, f"{param} must be an array of thinking blocks")
    for j, block in enumerate(blocks):
        p = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise InvalidRequest(f"{p}.thinking", f"{p}.thinking must be a string")
            if not isinstance(block.get("signature", ""), str):
                raise InvalidRequest(f"{p}.signature", f"{p}.signature must be a string")
        elif kind == "redacted_thinking":
            if not isinstance(block.get("data"), str) or not block["data"]:
                raise InvalidRequest(f"{p}.data", f"{p}.data must be a non-empty string")
        else:
            raise InvalidRequest(f"{p}.type", f"{p}.type must be 'thinking' or 'redacted_thinking'")
    return blocks


def thinking_for(body: dict, max_tokens: int) -> dict | None:
    """The Anthropic ``thinking`` object for a canonical body, or None for none.

    ``thinking`` goes as it is; else ``reasoning_effort`` becomes a budget below ``max_tokens`` (Anthropic
    requires ``budget_tokens < max_tokens`` and at least 1024): a 400 when ``max_tokens`` leaves no room.
    """
    thinking = body.get("thinking")
    if thinking is not None:
        return thinking
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise InvalidRequest("reasoning_effort", "'reasoning_effort' must be one of " + ", ".join(EFFORT_BUDGETS))
    budget = EFFORT_BUDGETS[effort]
    if budget is None:
        return None
    budget = min(budget, max_tokens - 1)
    if budget < MIN_BUDGET:
        raise InvalidRequest("max_tokens", f"reasoning_effort {effort!r} needs max_tokens above {MIN_BUDGET} on this "
                             "provider (its thinking budget must be at least 1024 tokens and below max_tokens)")
    return {"type": "enabled", "budget_tokens": budget}


def effort_for_thinking(thinking: Any) -> str | None:
    """The ``reasoning_effort`` nearest an Anthropic ``thinking`` object (None when thinking is off)."""
    if not isinstance(thinking, dict):
        return None
    kind = thinking.get("type")
    if kind == "adaptive":
        return "medium"
    if kind != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget <= EFFORT_BUDGETS["low"]:
        return "low"
    return "medium" if budget <= EFFORT_BUDGETS["medium"] else "high"


def for_openai_upstream(body: dict) -> dict:
    """``body`` as an OpenAI-compatible upstream takes it: ``thinking`` as ``reasoning_effort``, and the
    gateway-private ``thinking_blocks`` taken off assistant messages (their text stays as ``reasoning_content``).

    ``body`` itself is returned when it has neither (the usual case: no copy). A redacted block has no
    counterpart there: a 400 naming it.
    """
    messages = body.get("messages")
    marked = False
    if isinstance(messages, list):
        for m in messages:  # (a loop, not any() over a generator: this runs for every request)
            if isinstance(m, dict) and "thinking_blocks" in m:
                marked = True
                break
    if not marked and "thinking" not in body:
        return body
    out = dict(body)
    thinking = out.pop("thinking", None)
    if thinking is not None and out.get("reasoning_effort") is None:
        effort = effort_for_thinking(thinking)
        if effort is not None:
            out["reasoning_effort"] = effort
    if marked:
        converted = []
        for i, msg in enumerate(messages):
            if isinstance(msg, dict) and "thinking_blocks" in msg:
                msg = dict(msg)
                blocks = check_thinking_blocks(msg.pop("thinking_blocks"), f"messages[{i}].thinking_blocks")
                for j, block in enumerate(blocks):
                    if block["type"] == "redacted_thinking":
                        raise InvalidRequest(f"messages[{i}].thinking_blocks[{j}]",
                                             "a redacted_thinking block (Anthropic's encrypted reasoning) can only go "
                                             "back to an Anthropic or Bedrock provider; this one speaks OpenAI's format")
                if reasoning_of(msg) is None:
                    text = "".join(b["thinking"] for b in blocks)
                    if text:
                        msg["reasoning_content"] = text
            converted.append(msg)
        out["messages"] = converted
    return out


class ThinkingBlocks:
    """Thinking blocks put together from stream delta fragments (``{"index", "type", ...}``), in index order."""

    __slots__ = ("_blocks",)

    def __init__(self) -> None:
        self._blocks: dict[int, dict] = {}

    def feed(self, fragments: Any) -> None:
        if not isinstance(fragments, list):
            return
        for frag in fragments:
            if not isinstance(frag, dict):
                continue
            index = frag.get("index", 0)
            block = self._blocks.get(index)
            if block is None:
                block = self._blocks[index] = {"type": frag.get("type") or "thinking"}
            for key in ("thinking", "signature", "data"):
                piece = frag.get(key)
                if isinstance(piece, str):
                    block[key] = block.get(key, "") + piece

    def blocks(self) -> list[dict]:
        out = []
        for _, block in sorted(self._blocks.items()):
            if block["type"] == "thinking":
                out.append({"type": "thinking", "thinking": block.get("thinking", ""),
                            "signature": block.get("signature", "")})
            else:
                out.append({"type": "redacted_thinking", "data": block.get("data", "")})
        return out

    def __bool__(self) -> bool:
        return bool(self._blocks)
