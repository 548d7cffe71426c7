"""Presets for OpenAI-compatible hosts: ``preset = "groq"`` on an ``openai`` provider sets its base URL and quirks.

Each host speaks OpenAI's chat API with known differences, collected here in one table (README: "OpenAI-compatible
hosts"): parameters it refuses (the gateway answers a clear 400 naming the parameter before anything is sent,
instead of relaying the host's own less helpful error, or a silent difference), parameters it does not take
and that can be left out without changing the answer (dropped), whether it is asked for stream usage with
``stream_options`` or sends usage on its last chunk unasked (and refuses ``stream_options``), and where it puts
reasoning text: a host that says ``reasoning`` gets the same text mirrored into ``reasoning_content``, the field
most OpenAI-compatible clients read, so one client works against every preset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
import orjson

from ..config import OPENAI_PRESETS
from ..wire.errors import InvalidRequest

__all__ = ["PRESETS", "Preset", "Refusal", "preset_base_url", "preset_of", "rename_reasoning"]


@attrs.frozen
class Refusal:
    """A parameter the host refuses unless it has one of ``allowed`` values (None: any value is refused)."""

    why: str
    allowed: tuple = ()
    #: Refused only for models whose name starts with one of these (empty: every model).
    models: tuple[str, ...] = ()

    def refuses(self, value, model: str) -> bool:
        if value is None or value in self.allowed or value is False:
            return False
        return not self.models or model.startswith(self.models)


def _no_names(messages):
    """Messages without ``name`` (a host that refuses the field on messages)."""
    return [{k: v for k, v in m.items() if k != "name"} if isinstance(m, dict) and "name" in m else m
            for m in messages]


def _no_history_reasoning(messages):
    """Assistant messages without ``reasoning_content`` (DeepSeek answers 400 when the history carries it)."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"}
            if isinstance(m, dict) and m.get("role") == "assistant" and "reasoning_content" in m else m
            for m in messages]


@attrs.frozen
class Preset:
    name: str
    refused: Mapping[str, Refusal] = attrs.field(factory=dict)
    #: Parameters left out: the host does not take them, and without them its answer is the same.
    dropped: tuple[str, ...] = ()
    #: Parameters renamed to the host's own names.
    renamed: Mapping[str, str] = attrs.field(factory=dict)
    #: "stream_options": asked with ``stream_options.include_usage``; "last_chunk": sent unasked.
    stream_usage: str = "stream_options"
    #: The host's field for reasoning text when it is not ``reasoning_content`` (mirrored into it).
    reasoning_field: str | None = None
    #: Rewrites of ``messages`` the host needs.
    messages: tuple[Callable, ...] = ()
    #: For the README table: where the host's reasoning text is.
    reasoning_note: str = "none"

    @property
    def base_url(self) -> str:
        return OPENAI_PRESETS[self.name]

    def prepare(self, body: dict) -> dict:
        """``body`` as this host takes it; InvalidRequest (a 400 naming the parameter) for what it refuses."""
        model = body.get("model") or ""
        for param, refusal in self.refused.items():
            if refusal.refuses(body.get(param), model):
                raise InvalidRequest(param, f"{param} is not supported by {self.name} ({refusal.why}); "
                                     "leave it out or route to another provider", code="unsupported_parameter")
        out = body
        if any(p in body for p in self.dropped) or any(p in body for p in self.refused):
            out = {k: v for k, v in body.items() if k not in self.dropped and k not in self.refused}
        for ours, theirs in self.renamed.items():
            if ours in out:
                out = {**out}
                value = out.pop(ours)
                out.setdefault(theirs, value)
        if self.messages and isinstance(out.get("messages"), list):
            messages = out["messages"]
            for rewrite in self.messages:
                messages = rewrite(messages)
            out = {**out, "messages": messages}
        return out


_NO_LOGPROBS = "it has no token log probabilities"
PRESETS: dict[str, Preset] = {
    "groq": Preset(
        "groq",
        refused={"logprobs": Refusal(_NO_LOGPROBS), "top_logprobs": Refusal(_NO_LOGPROBS),
                 "logit_bias": Refusal("it takes no logit bias"), "n": Refusal("it returns one choice", (1,))},
        messages=(_no_names,), reasoning_field="reasoning",
        reasoning_note="`reasoning` (mirrored into `reasoning_content`)"),
    "mistral": Preset(
        "mistral",
        refused={"logit_bias": Refusal("it takes no logit bias"), "logprobs": Refusal(_NO_LOGPROBS),
                 "top_logprobs": Refusal(_NO_LOGPROBS)},
        dropped=("user", "store", "metadata", "service_tier", "stream_options"),
        renamed={"seed": "random_seed", "max_completion_tokens": "max_tokens"},
        stream_usage="last_chunk", reasoning_note="`thinking` content chunks (relayed as sent)"),
    "deepseek": Preset(
        "deepseek",
        refused={"logprobs": Refusal("deepseek-reasoner has no log probabilities", models=("deepseek-reasoner",)),
                 "top_logprobs": Refusal("deepseek-reasoner has no log probabilities", models=("deepseek-reasoner",)),
                 "n": Refusal("it returns one choice", (1,))},
        dropped=("service_tier", "store", "metadata"),
        messages=(_no_history_reasoning,),
        reasoning_note="`reasoning_content`; dropped from earlier turns, which it refuses"),
    "together": Preset("together", dropped=("service_tier", "store", "metadata"), reasoning_field="reasoning",
                       reasoning_note="`reasoning` (mirrored into `reasoning_content`)"),
    "fireworks": Preset("fireworks", dropped=("service_tier", "store", "metadata"),
                        reasoning_note="`reasoning_content`"),
    "openrouter": Preset("openrouter", reasoning_field="reasoning",
                         reasoning_note="`reasoning` (mirrored into `reasoning_content`)"),
    "ollama": Preset("ollama", refused={"logit_bias": Refusal("it takes no logit bias")},
                     dropped=("service_tier", "store", "metadata", "parallel_tool_calls"),
                     reasoning_field="reasoning", reasoning_note="`reasoning` (mirrored into `reasoning_content`)"),
    "vllm": Preset("vllm", dropped=("service_tier", "store", "metadata"), reasoning_field="reasoning",
                   reasoning_note="`reasoning_content`, or `reasoning` in newer versions (mirrored)"),
}
assert set(PRESETS) == set(OPENAI_PRESETS)


def preset_of(config) -> Preset | None:
    name = getattr(config, "preset", None)
    return PRESETS[name] if name else None


def preset_base_url(config) -> str | None:
    preset = preset_of(config)
    return preset.base_url if preset is not None else None


def rename_reasoning(obj: dict, data: bytes, field: str, where: str = "delta") -> bytes:
    """``data`` (the JSON of ``obj``, a chunk or a completion) with each choice's ``field`` text also under
    ``reasoning_content``; unchanged (the same bytes) when no choice has it."""
    if b'"' + field.encode() + b'"' not in data:
        return data
    changed = False
    for choice in obj.get("choices") or ():
        part = choice.get(where) if isinstance(choice, dict) else None
        if isinstance(part, dict) and isinstance(part.get(field), str) and "reasoning_content" not in part:
            part["reasoning_content"] = part[field]
            changed = True
    return orjson.dumps(obj) if changed else data
