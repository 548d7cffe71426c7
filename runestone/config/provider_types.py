"""The provider types: one registry, so that adding a type touches this table (and the adapter module).

Each :class:`ProviderType` says what the rest of the tree needs to know of a type: the adapter class that
serves it (imported by the provider supervisor when a provider of the type is built, so the config stays a
leaf), its capabilities, the vendor's default base URL, the settings only it reads, and, for the vendors
that have one, the provider the environment registers (``OPENAI_API_KEY`` registers ``openai-default``).
``[providers] type`` is checked against this table, ``ProviderSpec.base_url`` falls back to its URL, the
environment overlay reads its prefixes.
"""

import importlib
from typing import Any

import attrs

__all__ = ["ANTHROPIC_DEFAULT_MODELS", "OPENAI_DEFAULT_MODELS", "PROVIDER_TYPE_REGISTRY", "EnvProvider",
           "ProviderType", "provider_type"]

# What the providers registered from OPENAI_API_KEY / ANTHROPIC_API_KEY serve
# until someone lists models explicitly: the vendors' current public model ids.
OPENAI_DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
ANTHROPIC_DEFAULT_MODELS = (
    "claude-opus-4-5",
    "claude-opus-4-1",
    "claude-sonnet-4-5",
    "claude-sonnet-4-0",
    "claude-haiku-4-5",
    "claude-3-7-sonnet-latest",
    "claude-3-5-haiku-latest",
)

_ALL = frozenset({"streaming", "tools", "vision", "embeddings"})
_NO_EMBEDDINGS = frozenset({"streaming", "tools", "vision"})


@attrs.frozen
class EnvProvider:
    """The provider ``{prefix}_API_KEY`` registers (and the other ``{prefix}_*`` variables configure)."""

    prefix: str
    name: str
    models: tuple[str, ...]


@attrs.frozen
class ProviderType:
    """One provider type and what the tree needs to know of it."""

    name: str
    #: ``"module:Class"``; the class is called ``(name, config, transport, timeouts)``, or ``(name, config)``
    #: when ``transport`` is false.
    adapter: str
    capabilities: frozenset[str]
    default_base_url: str | None = None
    #: The settings of ``ProviderConfig`` that only this type reads (the others are common to all).
    knobs: frozenset[str] = frozenset()
    #: The adapter talks to an upstream over a transport (the fake answers in process).
    transport: bool = True
    #: Set when the type has no default base URL and needs one: what to ask for.
    base_url_required: str | None = None
    env: EnvProvider | None = None

    def adapter_class(self) -> Any:
        module, _, cls = self.adapter.partition(":")
        return getattr(importlib.import_module(module), cls)


PROVIDER_TYPE_REGISTRY: dict[str, ProviderType] = {
    t.name: t
    for t in (
        ProviderType(
            "openai", "runestone.providers.openai:OpenAIAdapter", _ALL, "https://api.openai.com/v1",
            frozenset({"responses_api", "preset"}),
            env=EnvProvider("OPENAI", "openai-default", OPENAI_DEFAULT_MODELS),
        ),
        ProviderType(
            "anthropic", "runestone.providers.anthropic:AnthropicAdapter", _NO_EMBEDDINGS,
            "https://api.anthropic.com", frozenset({"default_max_tokens", "anthropic_version"}),
            env=EnvProvider("ANTHROPIC", "anthropic-default", ANTHROPIC_DEFAULT_MODELS),
        ),
        ProviderType(
            "fake", "runestone.providers.fake:FakeAdapter", _ALL,
            knobs=frozenset({"chunks", "ttfb_ms", "chunk_delay_ms", "text", "fail_rate", "fail_status"}),
            transport=False,
        ),
        ProviderType(
            "azure", "runestone.providers.azure:AzureAdapter", _ALL,
            knobs=frozenset({"api_version", "deployments", "azure_auth"}),
            base_url_required="the Azure OpenAI endpoint (https://NAME.openai.azure.com, or .../openai/v1 for the v1 API)",
        ),
        ProviderType(
            "gemini", "runestone.providers.gemini:GeminiAdapter", _ALL,
            "https://generativelanguage.googleapis.com/v1beta",
        ),
        ProviderType(
            "bedrock", "runestone.providers.bedrock:BedrockAdapter", _NO_EMBEDDINGS,
            knobs=frozenset({"region", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}),
        ),
    )
}


def provider_type(name: str) -> ProviderType:
    """The registered type ``name``; KeyError if there is none (a loaded config has only registered ones)."""
    return PROVIDER_TYPE_REGISTRY[name]
