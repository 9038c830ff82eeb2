"""Errors the ONNX exporters raise on purpose (all subclass :class:`bca_deploy.errors.BCAError`)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from bca_deploy.errors import BCAError, MissingExtraError

if TYPE_CHECKING:  # pragma: no cover
    from .validate import ValidationReport

__all__ = ["ExportError", "UnsupportedExportError", "RuntimeVersionError", "ExportMetadataError", "ExportGraphError",
           "ValidationError", "MissingExtraError", "require"]


class ExportError(BCAError, RuntimeError):
    """An ONNX export could not be produced."""


class UnsupportedExportError(BCAError, ValueError):
    """The request cannot be exported as asked: architecture, task, opset, dtype, provider or layout.

    Raised before anything is written; the message lists what is supported instead.
    """


class RuntimeVersionError(UnsupportedExportError):
    """The installed onnxruntime cannot run the requested graph correctly (e.g. one-sided inverse DFT < 1.27)."""


class ExportMetadataError(BCAError, ValueError):
    """An export directory's ``bca_export.json`` is not what the exporter writes (a field of the wrong type, a
    bank record from another version, a file named outside the export); the message names the file and fields."""


class ExportGraphError(BCAError, ValueError):
    """An export's ONNX graph is one onnxruntime refuses to load: not a model, truncated, tampered with, or
    reading external data from outside its directory. The message names the file and onnxruntime's reason.

    Attributes:
        path: the graph file.
        reason: why it cannot be loaded, without the file's name (what ``inspect`` shows).
    """

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: onnxruntime cannot load this graph ({reason}); the file is not what bca-deploy "
                         "export wrote (damaged, truncated or changed since): export it again")
        self.path, self.reason = path, reason


class ValidationError(BCAError, ValueError):
    """The exported graph's outputs differ from PyTorch's beyond tolerance, or have the wrong shape.

    Attributes:
        report: the full :class:`~bca_deploy.exporters.validate.ValidationReport` (every output and
            case, not only the failures).
    """

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError`: "<feature> needs <module> ... pip install 'bca-deploy[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{feature} needs {module}, which is not installed: pip install 'bca-deploy[{extra}]'"
        ) from None
