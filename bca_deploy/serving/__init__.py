"""Multi-adapter serving: one base graph under onnxruntime, a different BCA adapter per row.

- :class:`MultiAdapterSession` — the runtime over an adapter-bank export (``bca-deploy export --bank``):
  register/unregister adapters while serving, ``run``/``embed``/``classify``/``generate`` with one
  adapter (or the base model) per row.
- :class:`GenerationEngine` — continuous batching for generation: requests join and leave a running
  batch at every step, each streaming :class:`TokenEvent` s (:mod:`bca_deploy.serving.engine`).
- :class:`AdapterStore` — a directory of adapter directories, addressed by name only.
- :mod:`bca_deploy.serving.http` — ``bca-deploy serve``: the HTTP front (FastAPI + uvicorn) with
  micro-batching into mixed batches, the OpenAI-compatible routes (:mod:`~bca_deploy.serving.openai`),
  limits and errors (:mod:`~bca_deploy.serving.options`, :mod:`~bca_deploy.serving.wire`) and metrics
  (:mod:`~bca_deploy.serving.metrics`); :mod:`bca_deploy.serving.ray` — the same on Ray Serve replicas.
  Each is imported on use (they need the ``serve`` / ``ray`` extras).

Names are imported on first use (PEP 562), so the CLI can read :mod:`bca_deploy.serving.options` for
``--help`` without importing onnxruntime or torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "MultiAdapterSession": ".session",
    "AdapterInfo": ".session",
    "BankSnapshot": ".session",
    "check_adapter_name": ".session",
    "BASE": ".session",
    "ADAPTER_NAME_PATTERN": ".session",
    "AdapterStore": ".store",
    "GenerationEngine": ".engine",
    "GenerationStream": ".engine",
    "TokenEvent": ".engine",
    "TokenLogprob": ".engine",
    "SamplingParams": ".engine",
    "SamplingParamsError": ".engine",
    "EngineOverloadedError": ".engine",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
