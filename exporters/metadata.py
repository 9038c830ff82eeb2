"""``bca_export.json``: what an export directory records about itself, written once and read by one reader.

:func:`bca_deploy.exporters.export` writes it (:func:`write_export_metadata`) after the graph validated.
Everything that reads an export (``serve`` and :class:`~bca_deploy.serving.MultiAdapterSession`,
``validate``, the Ray deployment) reads it through :func:`read_export_metadata`: by the one JSON rule
(:func:`bca_deploy.config.read_json`: UTF-8, bounded size and nesting, a JSON object), with every field
they use typed before use and the files it names kept inside the export. The adapter-bank record is
:class:`~bca_deploy.exporters.bank.BankRecord`. A file that is not what the exporter writes is an
:class:`~bca_deploy.exporters.errors.ExportMetadataError` naming the file and each wrong field, never a
``KeyError`` from deep inside a server.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ExportMetadataError

if TYPE_CHECKING:  # pragma: no cover
    from .bank import BankRecord
    from .validate import ValidationReport

__all__ = ["METADATA_FILE", "FORMAT", "ExportMetadata", "read_export_metadata", "write_export_metadata"]

METADATA_FILE = "bca_export.json"
#: The ``format`` field of every ``bca_export.json`` this package writes.
FORMAT = "bca-deploy-onnx"


@dataclasses.dataclass(frozen=True)
class ExportMetadata:
    """An export's ``bca_export.json``, its fields typed.

    Attributes:
        path: the file.
        task: the exported task (``feature-extraction``, ``text-classification``, ``text-generation``...).
        dtype: ``"fp32"``/``"fp16"``; None when not recorded.
        merged: whether the adapters were merged into the weights; None when not recorded.
        bank: the adapter-bank record of a ``--bank`` export; None for any other export.
        fields: every field as written (versions, the validation table...), for display only.
    """

    path: Path
    task: str
    dtype: str | None
    merged: bool | None
    bank: BankRecord | None
    fields: Mapping[str, Any]

    @property
    def kind(self) -> str:
        """``adapter-bank``, ``merged`` or ``unmerged``: how the graph was exported, in words."""
        return "adapter-bank" if self.bank is not None else "merged" if self.merged else "unmerged"


def read_export_metadata(export_dir: str | Path) -> ExportMetadata | None:
    """The ``bca_export.json`` of ``export_dir``, or None when it has none (a directory optimum exported).

    Raises:
        AdapterFormatError: not readable as a bounded JSON object (see :func:`bca_deploy.config.read_json`).
        ExportMetadataError: a field of the wrong type, a bank record that is not what ``export --bank``
            writes, or a file it names outside the export; every problem at once, naming the file.
    """
    from bca_deploy.config import read_json

    path = Path(export_dir) / METADATA_FILE
    if not path.exists():
        return None
    data = read_json(path, what="metadata file")
    problems = []
    task, dtype, merged = data.get("task"), data.get("dtype"), data.get("merged")
    if not (isinstance(task, str) and task):
        problems.append(f"task must be a task name, got {str(task)[:40]!r}")
    if not isinstance(dtype, (str, type(None))):
        problems.append(f"dtype must be a string, got {type(dtype).__name__}")
    if not isinstance(merged, (bool, type(None))):
        problems.append(f"merged must be true or false, got {type(merged).__name__}")
    bank = None
    if data.get("bank") is not None:
        from .bank import BankRecord

        try:
            bank = BankRecord.from_dict(data["bank"])
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ExportMetadataError(f"{path}: malformed export metadata: {'; '.join(problems)}")
    return ExportMetadata(path, task, dtype, merged, bank, data)


def write_export_metadata(directory: Path, model_dir: Path, adapter_dirs: Sequence[Path], task: str, opset: int,
                          dtype: str, merge: bool, fft: str, export_s: float, report: ValidationReport | None,
                          bank: Mapping[str, Any] | None = None) -> None:
    """Write ``directory/bca_export.json`` (``bank``: :meth:`~bca_deploy.exporters.bank.BankPlan.metadata`)."""
    import torch

    import bca_deploy

    data = {
        "format": FORMAT,
        "bca_deploy_version": bca_deploy.__version__,
        "torch_version": torch.__version__,
        "task": task,
        "merged": merge,
        "fft": None if merge else fft,
        "opset": opset,
        "dtype": dtype,
        "base_model": str(model_dir),
        "adapters": [str(d) for d in adapter_dirs],
        "export_seconds": round(export_s, 3),
        "validation": report.to_dict() if report is not None else None,
        "bank": bank,
    }
    (directory / METADATA_FILE).write_text(json.dumps(data, indent=2) + "\n")
