"""ONNX exporters for BCA-adapted models (installed as ``bca_deploy.exporters``).

- :func:`export` — a transformers checkpoint + adapter directories → a validated ONNX directory,
  merged (plain graph) or unmerged (base MatMul + frequency-domain BCA subgraph; ``fft="matmul"`` or
  ``"dft"``), for every task optimum-onnx supports for the architecture.
- :func:`validate` — run an exported directory under onnxruntime and compare every output with the
  PyTorch model (fp32, adapters unmerged); :class:`ValidationReport` is the table.
- :func:`exportable_adapters` — context manager that makes a live model's BCA layers exportable by
  ``torch.onnx.export(dynamo=False)`` (what :func:`export` uses; handy for custom modules).

optimum-onnx and onnxruntime are imported when these functions run, not at import.
"""

from .errors import (
    ExportError,
    RuntimeVersionError,
    UnsupportedExportError,
    ValidationError,
)
from .export import export
from .graph import (
    FFT_MODES,
    bca_delta,
    dft_bases,
    exportable_adapters,
    frequency_kernels,
)
from .loading import resolve_task, supported_tasks
from .validate import (
    DEFAULT_CASES,
    TOLERANCES,
    Case,
    Tolerance,
    ValidationReport,
    ValidationRow,
    validate,
    validate_model,
)

__all__ = [
    "export",
    "validate",
    "validate_model",
    "exportable_adapters",
    "bca_delta",
    "frequency_kernels",
    "dft_bases",
    "supported_tasks",
    "resolve_task",
    "FFT_MODES",
    "TOLERANCES",
    "DEFAULT_CASES",
    "Case",
    "Tolerance",
    "ValidationReport",
    "ValidationRow",
    "ExportError",
    "UnsupportedExportError",
    "RuntimeVersionError",
    "ValidationError",
]
