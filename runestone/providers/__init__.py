"""Providers: the upstreams the gateway sends requests to, one adapter per kind, and their actors.

``base`` is the seam (``Adapter``, ``ChatResult``, ``Usage`` and the helpers every adapter shares);
``openai``, ``anthropic``, ``azure``, ``gemini``, ``bedrock`` and ``fake`` are the adapters (the wire
translation itself is in ``runestone.wire``); ``supervisor`` holds the ``ProviderTable`` (published
entries the request path reads), one ``ProviderActor`` per registered provider and the
``EnhancedProviderSupervisor`` over them. ``fake_server`` and its neighbours are an OpenAI-compatible
test and bench upstream. The public names are re-exported here.
"""

from .base import Adapter as Adapter
from .base import ChatResult as ChatResult
from .base import Usage as Usage
from .supervisor import EnhancedProviderSupervisor as EnhancedProviderSupervisor
from .supervisor import ProviderActor as ProviderActor
from .supervisor import ProviderEntry as ProviderEntry
from .supervisor import ProviderTable as ProviderTable
from .supervisor import canonical_provider as canonical_provider

__all__ = ["Adapter", "ChatResult", "EnhancedProviderSupervisor", "ProviderActor", "ProviderEntry", "ProviderTable",
           "Usage", "canonical_provider"]
