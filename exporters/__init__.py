"""ONNX exporters for BCA-adapted models (installed as ``bca_deploy.exporters``).

- :func:`export` — a transformers checkpoint + adapter directories → a validated ONNX directory,
  merged (plain graph) or unmerged (base MatMul + frequency-domain BCA subgraph; ``fft="matmul"`` or
  ``"dft"``), through ``torch.onnx.export`` on transformers 4.x and 5.x (no optimum needed); the task
  comes from the adapters (:func:`bca_deploy.models.resolve_task`).
- :func:`validate` — run an exported directory under onnxruntime and compare every output with the
  PyTorch model (fp32, adapters unmerged); :class:`ValidationReport` is the table.
- :func:`exportable_adapters` — context manager that makes a live model's BCA layers exportable by
  ``torch.onnx.export(dynamo=False)`` (what :func:`export` uses; handy for custom modules).

onnx and onnxruntime are imported when these functions run, not at import.
"""

from .errors import (
    ExportError,
    ExportGraphError,
    MissingExtraError,
    RuntimeVersionError,
    UnsupportedExportError,
    ValidationError,
)
from .export import export
from .graph import (
    FFT_MODES,
    bca_delta,
    exportable_adapters,
    frequency_kernels,
    frequency_shape,
    spectral_plan,
)
from .loading import resolve_export_task, resolve_task, supported_tasks
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
    "frequency_shape",
    "spectral_plan",
    "supported_tasks",
    "resolve_task",
    "resolve_export_task",
    "FFT_MODES",
    "TOLERANCES",
    "DEFAULT_CASES",
    "Case",
    "Tolerance",
    "ValidationReport",
    "ValidationRow",
    "ExportError",
    "ExportGraphError",
    "MissingExtraError",
    "UnsupportedExportError",
    "RuntimeVersionError",
    "ValidationError",
]
