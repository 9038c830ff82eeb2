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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bca_deploy.errors import printable, require_readable, why_not_readable

from .errors import ExportMetadataError

if TYPE_CHECKING:  # pragma: no cover
    from .bank import BankRecord
    from .validate import ValidationReport

__all__ = ["METADATA_FILE", "FORMAT", "ExportMetadata", "read_export_metadata", "write_export_metadata", "describe_export"]

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

    @property
    def base_model(self) -> str | None:
        """The model directory it was exported from, as recorded (absolute since the recording was; older
        exports: as given); None when absent or not a plausible path. For messages only."""
        return _recorded_path(self.fields.get("base_model"))

    @property
    def adapters(self) -> list[str] | None:
        """The adapter directories it was exported with, as recorded (see :attr:`base_model`); None when the
        record has no list. For messages only."""
        listed = self.fields.get("adapters")
        return [p for p in map(_recorded_path, listed) if p] if isinstance(listed, list) else None


def _recorded_path(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 4096 else None


def read_export_metadata(export_dir: str | Path) -> ExportMetadata | None:
    """The ``bca_export.json`` of ``export_dir``, or None when it has none (a directory optimum exported).

    Raises:
        AdapterFormatError: not readable as a bounded JSON object (see :func:`bca_deploy.config.read_json`).
        ExportMetadataError: a field of the wrong type, a bank record that is not what ``export --bank``
            writes, or a file it names outside the export; every problem at once, naming the file.
    """
    from bca_deploy.config import read_json

    path = Path(export_dir) / METADATA_FILE
    if not os.path.lexists(path):  # there but not a file (a link to nothing): read_json names it
        return None
    data = read_json(path, what="metadata file")
    problems = []
    task, dtype, merged = data.get("task"), data.get("dtype"), data.get("merged")
    from bca_deploy.models import EXPORT_TASK_TYPES

    if not isinstance(task, str) or task not in EXPORT_TASK_TYPES:  # shown by inspect and /health: as an export writes
        problems.append(f"task must be one of {', '.join(EXPORT_TASK_TYPES)}, got {str(task)[:40]!r}")
    if not isinstance(dtype, (str, type(None))):
        problems.append(f"dtype must be a string, got {type(dtype).__name__}")
    elif dtype is not None and not (len(dtype) <= 16 and dtype.isprintable()):
        problems.append(f"dtype must be a dtype name such as 'fp32', got {dtype[:40]!r}")
    opset, fft = data.get("opset"), data.get("fft")  # shown by inspect, as written by an export
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 1 <= opset <= 1000):
        problems.append(f"opset must be an ONNX opset number, got {str(opset)[:40]!r}")
    if fft not in (None, "matmul", "dft"):
        problems.append(f"fft must be 'matmul', 'dft' or null, got {str(fft)[:40]!r}")
    if not isinstance(merged, (bool, type(None))):
        problems.append(f"merged must be true or false, got {type(merged).__name__}")
    bank = None
    if data.get("bank") is not None:
        from .bank import BankRecord

        try:
            bank = BankRecord.from_dict(data["bank"])
        except ValueError as exc:
            problems.append(str(exc))
        else:
            problem = _bank_model_type_problem(Path(export_dir), bank.model_type)
            if problem:
                problems.append(problem)
    if problems:
        raise ExportMetadataError(f"{path}: malformed export metadata: {'; '.join(problems)}")
    return ExportMetadata(path, task, dtype, merged, bank, data)


def _bank_model_type_problem(export_dir: Path, model_type: str | None) -> str | None:
    """Why ``bank.model_type`` (the type of the model the bank's graph was exported from, which every adapter
    registered on it must have been trained on) is not the ``model_type`` of the ``config.json`` the export ships
    beside the graph, or None. Edited (``"bert"`` -> ``"llama"``), it refused every adapter as trained on the wrong
    model ("base model_type is 'bert' but the bank graph is 'llama'"); emptied, it let any be registered. Nothing is
    compared where the export has no readable config.json (its reader names that) or the bank records no type."""
    from bca_deploy.config import model_identity

    config = export_dir / "config.json"
    if model_type is None or not config.is_file():
        return None
    try:
        shipped = model_identity(export_dir)[0]
    except (OSError, ValueError):  # a malformed config.json: refused by name where it is read (the session's config)
        return None
    if shipped is None or shipped == model_type:
        return None
    return (f"bank.model_type is {printable(repr(model_type)[:60])}, but the graph was exported from a "
            f"{printable(repr(shipped)[:60])} model (model_type in {config} beside it): one of the two files was "
            "edited or comes from another export; re-export the bank (bca-deploy export --bank)")


def write_export_metadata(directory: Path, model_dir: Path, adapter_dirs: Sequence[Path], task: str, opset: int,
                          dtype: str, merge: bool, fft: str, export_s: float, report: ValidationReport | None,
                          bank: Mapping[str, Any] | None = None) -> None:
    """Write ``directory/bca_export.json`` (``bank``: :meth:`~bca_deploy.exporters.bank.BankPlan.metadata`)."""
    import torch
    import transformers

    import bca_deploy

    data = {
        "format": FORMAT,
        "bca_deploy_version": bca_deploy.__version__,
        "torch_version": torch.__version__,
        # the tokenizer files are transformers' own: 5.x writes a tokenizer class 4.x cannot load
        "transformers_version": transformers.__version__,
        "task": task,
        "merged": merge,
        "fft": None if merge else fft,
        "opset": opset,
        "dtype": dtype,
        "base_model": os.path.abspath(model_dir),  # absolute: hints built from them work from any directory
        "adapters": [os.path.abspath(d) for d in adapter_dirs],
        "export_seconds": round(export_s, 3),
        "validation": report.to_dict() if report is not None else None,
        "bank": bank,
    }
    (directory / METADATA_FILE).write_text(json.dumps(data, indent=2) + "\n")


def describe_export(export_dir: str | Path) -> list[str]:
    """What an export directory holds, in lines for ``bca-deploy inspect``: how it was exported, the task, the
    adapters (a bank's slots), the validation recorded at export, its files, and how to serve it; or, when its
    graph file is one onnxruntime would refuse (:func:`~bca_deploy.exporters.validate.check_graph_file`), why.

    Raises:
        ExportMetadataError, AdapterFormatError: a malformed ``bca_export.json`` (as every reader refuses it).
    """
    from .errors import ExportGraphError
    from .validate import ONNX_FILE, bank_graph_problems, check_graph_file, graph_interface

    export_dir = Path(export_dir)
    metadata = read_export_metadata(export_dir)
    graph = [p for p in (export_dir / ONNX_FILE, export_dir / f"{ONNX_FILE}_data") if p.is_file()]
    # files only: a dangling link or a pipe left there (no bank lists it, serve never reads it) has no size to add
    adapter_files = sorted(p for p in (export_dir / "adapters").glob("*.onnx_adapter") if p.is_file())
    size = sum(p.stat().st_size for p in (*graph, *adapter_files))
    lines = [f"export:       {export_dir}"]
    if metadata is None:
        return lines + ["kind:         an ONNX directory without bca_export.json (not written by bca-deploy export; "
                        "optimum's?)", f"files:        {' + '.join(p.name for p in graph)} ({size / 1e6:.1f} MB)"]
    fields = metadata.fields
    how = "merged" if metadata.merged else f"unmerged ({fields.get('fft')} transforms)"
    if metadata.bank is not None:
        how = f"adapter bank, {how}"
    lines.append(f"kind:         {how}; opset {fields.get('opset')}, {metadata.dtype or 'dtype not recorded'}")
    lines.append(f"task:         {metadata.task}")
    if metadata.bank is not None:
        bank = metadata.bank
        names = bank.adapters
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        lines.append(f"adapters:     {shown or 'none'} (slots 1..{len(names)}; slot 0 is the base model)")
        modules = len({t.module for t in bank.layout.values()})
        sizes = sorted({t.block_size for t in bank.layout.values()})
        lines.append(f"bank inputs:  {len(bank.layout)} ({modules} modules, block sizes {', '.join(map(str, sizes))})")
        if bank.unused:  # adapted at export, left out: kernels adapters carry for them are ignored when served
            why = printable(bank.unused[0].reason[:200]) if len(bank.unused) == 1 else \
                "their outputs are not used by the graph"
            lines.append(f"left out:     {', '.join(printable(u.module[:200]) for u in bank.unused)} (adapted, but {why}; "
                         "kernels adapters carry for them are ignored when served)")
        if bank.base_weights is not None:  # what registration compares adapters' base weights with
            embeddings = sum(1 for d in bank.base_weights.values() if d.embedding)
            lines.append(f"base values:  digests of {len(bank.base_weights)} parameters ({embeddings} of the embeddings);"
                         " adapters' base weights must equal them")
        else:
            lines.append("base values:  not recorded (an older bca-deploy's export): an adapter's base weights are "
                         "refused, except an adapted layer's weight, taken unchecked; re-export to check them")
        if bank.head is not None:
            own = sorted(n for n, labels in bank.adapter_labels.items() if labels is not None)
            base = f"{bank.base_labels.num_labels} labels" if bank.base_labels is not None else "none"
            lines.append(f"heads:        per slot ({', '.join(bank.head.modules)}); base: {base}; own head: "
                         f"{', '.join(own) or 'none'}")
    else:
        adapters = fields.get("adapters")
        if isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
            lines.append(f"adapters:     {', '.join(adapters) or 'none (the base model)'}")
    lines.append(_validation_line(fields.get("validation")))
    version = fields.get("bca_deploy_version")
    if isinstance(version, str):
        made_with = f"bca-deploy {version[:40]}, torch {str(fields.get('torch_version'))[:40]}"
        if isinstance(fields.get("transformers_version"), str):
            made_with += f", transformers {fields['transformers_version'][:40]}"
        lines.append(f"exported by:  {made_with}")
    held = " + ".join([*(p.name for p in graph), *([f"{len(adapter_files)} adapter file{'s' if len(adapter_files) > 1 else ''}"] if adapter_files else [])])
    if export_dir / ONNX_FILE not in graph:
        if os.path.lexists(export_dir / ONNX_FILE):  # a link to a device or to nothing, a pipe: said as what it is
            return lines + [f"graph:        NOT loadable: {ONNX_FILE} is {why_not_readable(export_dir / ONNX_FILE)}"]
        return lines + [f"files:        no {ONNX_FILE}: an incomplete export, which nothing can load; export it again"]
    lines.append(f"files:        {held} ({size / 1e6:.1f} MB)")
    try:
        model = check_graph_file(export_dir / ONNX_FILE)
    except ExportGraphError as exc:  # described, not raised: inspect is how a user finds out what is wrong
        return lines + [f"graph:        NOT loadable: onnxruntime cannot load this graph ({exc.reason})"]
    if metadata.bank is not None:
        problems = bank_graph_problems(metadata, *graph_interface(model))
        if problems:
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            return lines + [f"graph:        NOT servable: not the adapter-bank graph bca-deploy export wrote "
                            f"({'; '.join(problems[:5])}{more}); export it again"]
        unreadable = []  # the bank's own list: a directory this user cannot list hides its files from a glob
        for name in metadata.bank.adapters:
            path = export_dir / metadata.bank.adapter_files[name]
            try:
                require_readable(path)
                if (problem := metadata.bank.adapter_file_problem(name, path)) is not None:
                    unreadable.append(f"{metadata.bank.adapter_files[name]} ({problem})")
            except OSError as exc:
                unreadable.append(f"{metadata.bank.adapter_files[name]} ({exc.strerror or exc})")
        if unreadable:
            return lines + [f"adapters:     NOT loadable: {', '.join(unreadable[:5])}"
                            f"{f' and {len(unreadable) - 5} more' if len(unreadable) > 5 else ''}"]
        unreadable = _served_file_problems(export_dir)
        if unreadable:
            return lines + [f"files:        NOT servable: {'; '.join(unreadable[:5])}"]
        lines.append(f"serve with:   bca-deploy serve {export_dir}")
    else:
        lines.append("serve with:   onnxruntime / optimum's ORTModel* (bca-deploy serve needs export --bank)")
    return lines


def _served_file_problems(export_dir: Path) -> list[str]:
    """What ``serve`` would refuse among an export's other files before loading them: config.json missing or not a
    regular readable file, and, when the export has a tokenizer (:func:`bca_deploy.config.has_tokenizer_files`, as
    serve decides whether to load one), any of its files present but not one (a pipe, a directory, a dangling link:
    :func:`bca_deploy.config.tokenizer_files`, the files serve's loader requires) or too large to be read
    (:func:`bca_deploy.config.tokenizer_file_size_problem`)."""
    from bca_deploy.config import has_tokenizer_files, tokenizer_file_size_problem, tokenizer_files

    config = export_dir / "config.json"
    present = [config] if os.path.lexists(config) else []
    problems = [] if present else ["no config.json"]
    if has_tokenizer_files(export_dir):  # else serve loads no tokenizer (token ids only) and reads none of them
        present += tokenizer_files(export_dir)
    for path in present:
        why = why_not_readable(path)
        if why == "a regular file" and path != config:
            why = tokenizer_file_size_problem(path) or why
        if why != "a regular file":
            problems.append(f"{path.name}: {why}")
    return problems


def _validation_line(validation: Any) -> str:
    """The validation recorded at export, in one line (display only: whatever is malformed reads as absent)."""
    rows = validation.get("rows") if isinstance(validation, Mapping) else None
    if not isinstance(rows, list) or not rows:
        return "validated:    not recorded"
    diffs = [r.get("max_abs_diff") for r in rows if isinstance(r, Mapping)]
    diffs = [d for d in diffs if isinstance(d, (int, float)) and not isinstance(d, bool)]
    passed = sum(1 for r in rows if isinstance(r, Mapping) and r.get("passed") is True)
    worst = f", max |onnxruntime - PyTorch| {max(diffs):.2e}" if diffs else ""
    return (f"validated:    {passed} of {len(rows)} comparisons passed at export{worst} "
            f"(tolerance {str(validation.get('tolerance'))[:40]}, {str(validation.get('provider'))[:20]})")
