"""Runestone: an OpenAI-compatible LLM gateway on Trio, shaped like an OTP application.

Layers, imports pointing one way (see DESIGN.md):
runtime <- telemetry <- resilience <- providers <- routing <- front <- app/cli;
``http`` is used by ``providers`` and ``front``; ``runtime`` and ``http`` import
nothing of ours.
"""

__version__ = "0.1.0"
