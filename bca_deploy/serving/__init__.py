"""Multi-adapter serving: one base graph under onnxruntime, a different BCA adapter per row.

- :class:`MultiAdapterSession` — the runtime over an adapter-bank export (``bca-deploy export --bank``):
  register/unregister adapters while serving, ``run``/``embed``/``classify``/``generate`` with one
  adapter (or the base model) per row.
- :class:`AdapterStore` — a directory of adapter directories, addressed by name only.
- :mod:`bca_deploy.serving.http` — ``bca-deploy serve``: the HTTP front (FastAPI + uvicorn) with
  micro-batching into mixed batches (imported on use: it needs the ``serve`` extra).
"""

from .session import ADAPTER_NAME_PATTERN, BASE, AdapterInfo, BankSnapshot, MultiAdapterSession, check_adapter_name
from .store import AdapterStore

__all__ = [
    "MultiAdapterSession",
    "AdapterInfo",
    "BankSnapshot",
    "AdapterStore",
    "check_adapter_name",
    "BASE",
    "ADAPTER_NAME_PATTERN",
]
