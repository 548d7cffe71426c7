"""The ``azure`` provider type: Azure OpenAI, in its two URL schemes.

- The deployment scheme (``base_url = "https://NAME.openai.azure.com"``): a model is served by a deployment,
  ``{base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`` (and
  ``/embeddings``); ``deployments`` maps the model names clients ask for to deployment names (a model not in
  the map is taken to be deployed under its own name, as the portal suggests).
- The v1 scheme (``base_url`` ending in ``/openai/v1``): OpenAI's own paths under that base, with no
  api-version; the body's ``model`` is the deployment name (mapped the same way).

The key goes in the ``api-key`` header, or with ``azure_auth = "bearer"`` as a Microsoft Entra ID bearer token.
Answers are OpenAI's, with Azure's content-filter annotations (``prompt_filter_results`` at the top,
``content_filter_results`` per choice, in streams too), relayed unchanged; a completion the filter stopped has
``finish_reason: "content_filter"``. A prompt the filter refused is Azure's 400 with code ``content_filter``
(and ``param`` ``prompt``); OpenAI's error shape has no ``innererror``, so what it says (the policy code and the
categories that were filtered, at which severity) is kept in the message.
"""

from __future__ import annotations

from urllib.parse import quote

from ..http import prepared_headers
from ..resilience.errors import UpstreamError
from ..resilience.retry import parse_retry_after
from ..wire.errors import UpstreamErrorBody, loads_or_none, parse_upstream_error
from .base import model_ids
from .openai import OpenAIAdapter

__all__ = ["AzureAdapter", "content_filter_summary"]

#: The api-version of the deployments listing used for discovery in the deployment scheme: Azure's data-plane
#: ``Deployments_List`` (``GET {endpoint}/openai/deployments``) is published in the stable authoring API
#: 2022-12-01 only (azure-rest-api-specs, ``cognitiveservices/data-plane/AzureOpenAI/authoring``); from
#: 2023-05-15 on that API lists models (``GET {endpoint}/openai/models``, ``Models_List``) and deployments are
#: managed through Azure Resource Manager, which takes an Entra ID token rather than the resource's key.
DEPLOYMENTS_LIST_VERSION = "2022-12-01"
#: Deployment states worth serving (the others: ``notRunning``, ``running``, ``failed``, ``canceled``, ``deleted``).
_SERVING = ("succeeded", None)


def content_filter_summary(inner) -> str:
    """Azure's ``innererror`` in words: ``ResponsibleAIPolicyViolation: self_harm (medium) filtered``."""
    if not isinstance(inner, dict):
        return ""
    code = inner.get("code") if isinstance(inner.get("code"), str) else "innererror"
    results = inner.get("content_filter_result") or inner.get("content_filter_results")
    hits = []
    if isinstance(results, dict):
        for category, r in results.items():
            if isinstance(r, dict) and r.get("filtered"):
                severity = r.get("severity")
                hits.append(f"{category} ({severity})" if isinstance(severity, str) else
                            f"{category} (detected)" if r.get("detected") else str(category))
    return f"{code[:80]}: " + (", ".join(hits)[:500] + " filtered" if hits else "no category named")


class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: the OpenAI adapter's relay with Azure's URLs, authentication and error details."""

    def __init__(self, name: str, config, transport, timeouts=None) -> None:
        super().__init__(name, config, transport, timeouts)
        base = (config.base_url or "").rstrip("/")
        self._v1 = base.endswith("/openai/v1")
        self._base = base
        self._api_version = quote(config.api_version, safe="-._~")
        self._deployments = dict(config.deployments or {})
        headers = [h for h in self._headers if h[0] != b"authorization"]
        key = config.api_key
        if key:
            if config.azure_auth == "bearer":
                headers.append((b"authorization", b"Bearer " + key.encode()))
            else:
                headers.append((b"api-key", key.encode()))
        self._headers = prepared_headers(headers)
        if self._v1:
            self._models_url = base + "/models"
        else:  # the Responses API of the deployment scheme has other paths; /v1/responses is translated to chat
            self.speaks_responses = False

    def deployment(self, model: str) -> str:
        return self._deployments.get(model, model)

    def _url(self, model: str, operation: str) -> str:
        if self._v1:
            return f"{self._base}/{operation}"
        dep = quote(self.deployment(model), safe="-._~")
        return f"{self._base}/openai/deployments/{dep}/{operation}?api-version={self._api_version}"

    def _target(self, body: dict, path: str) -> tuple[str, dict]:
        model = body.get("model") or ""
        if self._v1:
            dep = self.deployment(model)
            return self._url(model, path), (body if dep == model else {**body, "model": dep})
        # The deployment names the model: the body carries none (Azure ignores it; a gateway sends no more than needed).
        return self._url(model, path), {k: v for k, v in body.items() if k != "model"}

    def _chat_target(self, body: dict) -> tuple[str, dict]:
        return self._target(body, "chat/completions")

    def _embed_target(self, body: dict) -> tuple[str, dict]:
        return self._target(body, "embeddings")

    def _http_error(self, status: int, headers, raw: bytes) -> UpstreamError:
        detail = parse_upstream_error(raw, self._secrets)
        inner = None
        doc = loads_or_none(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            inner = doc["error"].get("innererror")
        if inner is not None:
            summary = content_filter_summary(inner)
            detail = UpstreamErrorBody(f"{detail.message} ({summary})" if summary else detail.message,
                                       detail.type, detail.code, detail.param, detail.shape)
        return UpstreamError(self.name, "http", f"upstream returned {status}: {detail.message}", status=status,
                             retry_after=parse_retry_after(headers), detail=detail)

    async def list_models(self) -> list[str]:
        """v1: ``GET /openai/v1/models``. Deployment scheme: the resource's deployments (``GET
        /openai/deployments?api-version=2022-12-01``; their names are what requests address, and the model each
        runs is mapped to it when no map entry says otherwise); a deployment that did not succeed is not served.
        A resource that no longer answers that listing (a 404) is asked for its models instead (``GET
        /openai/models?api-version={api_version}``): those it can run, each taken as deployed under its own name."""
        if self._v1:
            return await super().list_models()
        try:
            _, obj = await self._read_json(f"{self._base}/openai/deployments?api-version={DEPLOYMENTS_LIST_VERSION}",
                                           b"", method="GET")
        except UpstreamError as exc:
            if exc.status != 404:
                raise
            return await self._models_listing()
        data = obj.get("data")
        if not isinstance(data, list):
            raise UpstreamError(self.name, "malformed", "upstream deployments listing has no 'data' list")
        data = [d for d in data if isinstance(d, dict) and d.get("status") in _SERVING]
        names = model_ids(self.name, data)
        served = list(names)
        for d in data:
            if isinstance(d.get("model"), str) and isinstance(d.get("id"), str):
                model = d["model"][:200]
                if model not in self._deployments and model not in names:
                    self._deployments[model] = d["id"]
                    served.append(model)
        return served

    async def _models_listing(self) -> list[str]:
        _, obj = await self._read_json(f"{self._base}/openai/models?api-version={self._api_version}", b"",
                                       method="GET")
        data = obj.get("data")
        if not isinstance(data, list):
            raise UpstreamError(self.name, "malformed", "upstream models listing has no 'data' list")
        runnable = [m for m in data if isinstance(m, dict) and m.get("status") in _SERVING
                    and isinstance(m.get("capabilities"), dict) and m["capabilities"].get("inference")]
        return model_ids(self.name, runnable)
