"""Export a transformers model with BCA adapters to ONNX: merged (plain graph) or unmerged (base + BCA subgraph).

Both go through optimum-onnx's ``onnx_export_from_model`` (the TorchScript exporter), so every task
optimum supports for the architecture works, including decoders with past key values, and the output
directory loads with ``optimum.onnxruntime.ORTModelFor*``. Unmerged graphs carry each adapter as the
frequency-domain subgraph of :mod:`bca_deploy.exporters.graph`.

The export is written to a temporary directory beside ``out_dir``, validated there against PyTorch
(see :mod:`bca_deploy.exporters.validate`), and only then moved into place: a refused, failed or
invalid export leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from bca_deploy.inject import adapter_configs

from .bank import (
    ADAPTER_FILE_SUFFIX,
    ADAPTERS_DIR,
    BASE_SLOT,
    bank_layout,
    layout_to_dict,
    model_adapter_tensors,
    placeholder_kernels,
    rewrite_as_bank,
    stack_bank,
    write_adapter_file,
)
from .errors import ExportError, RuntimeVersionError, UnsupportedExportError
from .graph import DFT_MIN_OPSET, FFT_MODES, MATMUL_MIN_OPSET, exportable_adapters
from .validate import (
    ADAPTER_IDS,
    METADATA_FILE,
    ONNX_FILE,
    TOLERANCES,
    Case,
    Tolerance,
    validate_model,
)

__all__ = ["export", "DTYPES", "MIN_ORT_FOR_DFT", "MAX_OPSET", "check_runtime"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: onnxruntime runs a one-sided inverse DFT correctly from 1.27 (1.25-1.26 give a wrong shape silently).
MIN_ORT_FOR_DFT = (1, 27)
#: The TorchScript exporter (which optimum-onnx uses) goes up to opset 20.
MAX_OPSET = 20


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_runtime(fft: str | None, validate: bool) -> None:
    """Refuse an onnxruntime that cannot run (or is missing for validating) the requested graph.

    Raises:
        RuntimeVersionError: ``fft="dft"`` with onnxruntime older than 1.27, or no onnxruntime
            while ``validate=True``.
    """
    try:
        import onnxruntime
    except ImportError:
        if validate:
            raise RuntimeVersionError(
                "validation needs onnxruntime, which is not installed: pip install 'bca-deploy[onnx]' "
                "(or pass validate=False)"
            ) from None
        return
    if fft == "dft" and _version_tuple(onnxruntime.__version__) < MIN_ORT_FOR_DFT:
        raise RuntimeVersionError(
            f"fft='dft' emits one-sided inverse DFT nodes, which onnxruntime runs correctly from "
            f"{'.'.join(map(str, MIN_ORT_FOR_DFT))} on; this is onnxruntime {onnxruntime.__version__} "
            "(1.25-1.26 return a wrong shape, older versions reject the model). Upgrade onnxruntime, or use "
            "fft='matmul', which runs on any version"
        )


def _resolve_opset(opset: int | None, merge: bool, fft: str, default: int) -> int:
    low = 1 if merge else (DFT_MIN_OPSET if fft == "dft" else MATMUL_MIN_OPSET)
    if opset is None:
        return max(default, low)
    if opset > MAX_OPSET:
        raise UnsupportedExportError(
            f"opset {opset} is above {MAX_OPSET}, the highest the TorchScript exporter (used by optimum-onnx) emits"
        )
    if opset < low:
        what = "fft='dft' (DFT-20 with a one-sided inverse)" if fft == "dft" else "an unmerged BCA subgraph"
        raise UnsupportedExportError(f"opset {opset} is too low for {what}: use opset >= {low}"
                                     + (" or fft='matmul' (opset >= 13)" if fft == "dft" else ""))
    return opset


def _check_out_dir(out_dir: Path, overwrite: bool, protected: Sequence[Path]) -> None:
    from bca_deploy.errors import OutputExistsError

    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")
    resolved = out_dir.resolve()
    for path in protected:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            raise OutputExistsError(f"{out_dir}: is (or contains) the input {path}; choose another output directory")


def _default_opset(model, task: str) -> int:
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task=task, library_name="transformers"
    )
    return int(constructor(model.config).DEFAULT_ONNX_OPSET)


def _graph_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.startswith(ONNX_FILE))


def export(
    model_dir: str | Path,
    out_dir: str | Path,
    adapter_dirs: Sequence[str | Path] = (),
    *,
    merge: bool,
    task: str | None = None,
    opset: int | None = None,
    dtype: str = "fp32",
    fft: str = "matmul",
    overwrite: bool = False,
    validate: bool = True,
    provider: str = "cpu",
    cases: Sequence[Case | Sequence[int]] | None = None,
    atol: float | None = None,
    verbose: bool = True,
    bank: bool = False,
) -> Path:
    """Export ``model_dir`` with ``adapter_dirs`` applied to an ONNX directory, validated against PyTorch.

    Args:
        model_dir: a transformers checkpoint directory (or hub id) of an architecture optimum-onnx exports.
        out_dir: output directory: ``model.onnx`` (+ ``model.onnx_data`` above 2 GB), ``config.json``,
            tokenizer files if ``model_dir`` has them, and ``bca_export.json`` (how it was exported and
            the validation table). Loads with ``optimum.onnxruntime.ORTModelFor<task>``.
        adapter_dirs: bca-deploy or PEFT C3A adapter directories; all are applied (their deltas sum).
        merge: ``True``: merge the adapters into the base weights and export a plain graph (fastest;
            one adapter set per graph). ``False``: keep each adapted layer as base MatMul + BCA
            subgraph with the kernels stored in the frequency domain as named initializers
            ``<module>.bca_freq_p<p>`` (swappable per adapter at load time).
        task: an optimum task (``feature-extraction``, ``text-classification``,
            ``text-generation-with-past``...); default: inferred from the checkpoint, with past
            key values for decoders.
        opset: ONNX opset; default: optimum's for the architecture (18), at least 20 with ``fft="dft"``.
        dtype: ``"fp32"`` or ``"fp16"`` (weights and activations; the BCA subgraph computes in fp32).
        fft: for unmerged graphs, how the per-block real FFTs are written: ``"matmul"`` (default;
            MatMuls by precomputed cos/sin bases, fast on CPU and runs on every execution provider) or
            ``"dft"`` (ONNX DFT-20 nodes; onnxruntime >= 1.27; slow on CPU, no CUDA kernel).
            Ignored when ``merge=True``.
        overwrite: replace an existing non-empty ``out_dir``.
        validate: run the graph under onnxruntime on ``cases`` and compare every output with the
            PyTorch model (fp32, adapters unmerged); raise if any is beyond tolerance.
        provider: ``"cpu"`` or ``"cuda"``: the onnxruntime execution provider used to validate.
        cases: validation shapes (see :func:`bca_deploy.exporters.validate.validate_model`).
        atol: overrides the absolute tolerance of :data:`~bca_deploy.exporters.validate.TOLERANCES`.
        verbose: print the validation table.
        bank: export an **adapter-bank graph** (needs ``merge=False``): every adapter keeps its own
            slot, and an ``adapter_ids`` input picks each row's adapter (0 = base model only; i = the
            i-th adapter of ``adapter_dirs``). The frequency-domain kernels are graph inputs (with
            these adapters as defaults) that a runtime can replace to serve any adapter fitting the
            same modules and block sizes; ``adapters/<name>.onnx_adapter`` holds one onnxruntime
            ``AdapterFormat`` file per adapter. See :mod:`bca_deploy.exporters.bank`.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        UnsupportedExportError: architecture or task optimum cannot export (the message lists what
            it can), bad ``dtype``/``fft``/``opset``/``provider`` (before anything is loaded or written).
        RuntimeVersionError: ``fft="dft"`` with onnxruntime < 1.27.
        bca_deploy.errors.OutputExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
        bca_deploy.errors.AdapterMismatchError: an adapter does not fit the model (nothing written).
        ValidationError: the graph does not match PyTorch (nothing is left at ``out_dir``;
            ``err.report`` has the table; re-run with ``validate=False`` to inspect the graph).
    """
    from .loading import load_model, resolve_task
    from .validate import onnx_providers

    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter_dirs = [Path(d) for d in adapter_dirs]
    if dtype not in DTYPES:
        raise UnsupportedExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if fft not in FFT_MODES:
        raise UnsupportedExportError(f"fft must be one of {', '.join(FFT_MODES)}; got {fft!r}")
    if not merge and not adapter_dirs:
        raise UnsupportedExportError("merge=False needs at least one adapter directory (there is nothing to keep unmerged)")
    if bank and merge:
        raise UnsupportedExportError("bank=True keeps every adapter in its own slot, selected per row; it cannot be "
                                     "combined with merge=True (a merged graph holds one fixed adapter sum)")
    _check_out_dir(out_dir, overwrite, [model_dir, *adapter_dirs])
    check_runtime(None if merge else fft, validate)
    if validate:
        onnx_providers(provider)
    if opset is not None:
        _resolve_opset(opset, merge, fft, default=opset)
    task, _ = resolve_task(model_dir, task)

    model = load_model(model_dir, task, adapter_dirs)  # AdapterMismatchError surfaces here
    opset = _resolve_opset(opset, merge, fft, _default_opset(model, task))
    bank_plan = _BankPlan(model, adapter_dirs) if bank else None
    if merge:
        from bca_deploy.inject import remove_adapters

        remove_adapters(model, merge=True)
    keep_reference = validate and not merge and dtype == "fp32"
    if dtype != "fp32":
        _cast_base(model, DTYPES[dtype])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    _chmod_like_mkdir(tmp)
    try:
        export_start = time.perf_counter()
        _run_optimum_export(model, tmp, task, opset, None if merge else fft,
                            kernels=None if bank_plan is None else bank_plan.placeholders)
        if bank_plan is not None:
            bank_plan.write(tmp)
        export_s = time.perf_counter() - export_start
        report = None
        if validate:
            if keep_reference:
                reference = model
            else:
                del model
                reference = load_model(model_dir, task, adapter_dirs)
            tolerance = None
            if atol is not None:
                tolerance = Tolerance(atol=atol, rtol=TOLERANCES[dtype].rtol)
            report = validate_model(tmp / ONNX_FILE, reference, task, dtype=dtype, cases=cases, provider=provider,
                                    tolerance=tolerance, slots=None if bank_plan is None else bank_plan.slots)
            if bank_plan is not None:
                report.rows += bank_plan.validate_files(tmp, reference, task, dtype, provider, tolerance)
            report.onnx_path = str(out_dir / ONNX_FILE)
            if verbose:
                print(report.table())
            report.raise_for_failures()
        _write_metadata(tmp, model_dir, adapter_dirs, task, opset, dtype, merge, fft, export_s, report,
                        bank=None if bank_plan is None else bank_plan.metadata())
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        kind = "merged" if merge else f"unmerged ({fft})"
        if bank_plan is not None:
            kind = f"adapter-bank ({fft}, {len(bank_plan.names)} adapters)"
        print(f"exported {kind} {task} graph to {out_dir} ({_graph_size(out_dir) / 1e6:.1f} MB) "
              f"in {time.perf_counter() - start:.1f} s")
    return out_dir


class _BankPlan:
    """What an adapter-bank export needs: the layout, each adapter's slot, and the steps that use them."""

    #: one small mixed case per adapter file: its row, then a base row
    FILE_CASE = (2, 7)

    def __init__(self, model, adapter_dirs: Sequence[Path]) -> None:
        from .loading import adapter_names

        self.names = adapter_names(adapter_dirs)
        configs = adapter_configs(model)
        saved = [f"{directory} ({', '.join(configs[name].modules_to_save)})"
                 for directory, name in zip(adapter_dirs, self.names, strict=True)
                 if name in configs and configs[name].modules_to_save]
        if saved:
            raise UnsupportedExportError(
                "an adapter-bank graph shares every whole module among its rows, but these adapters save whole "
                f"modules of their own: {'; '.join(saved)}. Export each of them on its own (merged or unmerged)"
            )
        self.layout = bank_layout(model, self.names)
        self.placeholders = placeholder_kernels(self.layout)
        self.tensors = {name: model_adapter_tensors(model, name, self.layout) for name in self.names}
        self.slots: list[str | None] = [None, *self.names]
        self.base_model_prefix = getattr(model, "base_model_prefix", "") or ""
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)

    def adapter_file(self, directory: Path, name: str) -> Path:
        return directory / ADAPTERS_DIR / f"{name}{ADAPTER_FILE_SUFFIX}"

    def write(self, directory: Path) -> None:
        rewrite_as_bank(directory / ONNX_FILE, self.layout,
                        stack_bank([None, *(self.tensors[n] for n in self.names)], self.layout))
        for name in self.names:
            write_adapter_file(self.adapter_file(directory, name), self.tensors[name], self.layout)

    def validate_files(self, directory: Path, reference, task: str, dtype: str, provider: str, tolerance):
        """Each adapter file, activated with ``RunOptions.add_active_adapter``: ids (1, 0) against (adapter, base)."""
        import onnxruntime as ort

        rows = []
        for name in self.names:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.adapter_file(directory, name)))
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            report = validate_model(directory / ONNX_FILE, reference, task, dtype=dtype, cases=[self.FILE_CASE],
                                    provider=provider, tolerance=tolerance, slots=[None, name], run_options=options)
            for row in report.rows:
                row.case = f"{row.case} file={name}"
            rows += report.rows
        return rows

    def metadata(self) -> dict:
        return {
            "ids_input": ADAPTER_IDS,
            "base_slot": BASE_SLOT,
            "slots": self.slots,
            "adapter_files": {n: str(self.adapter_file(Path(ADAPTERS_DIR).parent, n)) for n in self.names},
            "base_model_prefix": self.base_model_prefix,
            "model_type": self.model_type,
            "tensors": layout_to_dict(self.layout),
        }


def _cast_base(model, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` but keep BCA kernels in fp32 (their frequency-domain constants are
    computed from them, and the subgraph runs in fp32)."""
    from bca_deploy.inject import bca_layers

    kernels = {(name, key): param.detach().clone()
               for name, layer in bca_layers(model) for key, param in layer.bca_kernels.items()}
    model.to(dtype)
    for name, layer in bca_layers(model):
        for key, param in layer.bca_kernels.items():
            param.data = kernels[(name, key)]


def _run_optimum_export(model, directory: Path, task: str, opset: int, fft: str | None, kernels=None) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*You are using the default legacy behaviour.*")
        try:
            if fft is None:
                onnx_export_from_model(model, directory, task=task, opset=opset, do_validation=False)
            else:
                with exportable_adapters(model, fft, kernels=kernels):
                    onnx_export_from_model(model, directory, task=task, opset=opset, do_validation=False)
        except (UnsupportedExportError, RuntimeVersionError):
            raise
        except Exception as exc:
            raise ExportError(f"optimum-onnx failed to export the {type(model).__name__} for {task!r}: {exc}") from exc
    if not (directory / ONNX_FILE).is_file():
        written = ", ".join(sorted(p.name for p in directory.iterdir()))
        raise ExportError(f"optimum-onnx wrote no {ONNX_FILE} (it wrote: {written}); several-graph exports are not supported")


def _write_metadata(directory: Path, model_dir: Path, adapter_dirs: Sequence[Path], task: str, opset: int,
                    dtype: str, merge: bool, fft: str, export_s: float, report, bank: dict | None = None) -> None:
    import bca_deploy

    data = {
        "format": "bca-deploy-onnx",
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


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp creates 0700; give the directory the mode a plain mkdir would (0777 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp``: the old directory is renamed aside first, then removed."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
