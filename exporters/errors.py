"""Errors the ONNX exporters raise on purpose (all subclass :class:`bca_deploy.errors.BCAError`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bca_deploy.errors import BCAError

if TYPE_CHECKING:  # pragma: no cover
    from .validate import ValidationReport

__all__ = ["ExportError", "UnsupportedExportError", "RuntimeVersionError", "ValidationError"]


class ExportError(BCAError, RuntimeError):
    """An ONNX export could not be produced."""


class UnsupportedExportError(BCAError, ValueError):
    """The request cannot be exported as asked: architecture, task, opset, dtype, provider or layout.

    Raised before anything is written; the message lists what is supported instead.
    """


class RuntimeVersionError(UnsupportedExportError):
    """The installed onnxruntime cannot run the requested graph correctly (e.g. one-sided inverse DFT < 1.27)."""


class ValidationError(BCAError, ValueError):
    """The exported graph's outputs differ from PyTorch's beyond tolerance, or have the wrong shape.

    Attributes:
        report: the full :class:`~bca_deploy.exporters.validate.ValidationReport` (every output and
            case, not only the failures).
    """

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report
