"""Export a transformers model with BCA adapters to ONNX: merged (plain graph) or unmerged (base + BCA subgraph).

Both go through ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``), on transformers
4.x and 5.x alike, without optimum: :func:`_trace_export` wraps the model so the graph has optimum's
layout (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``/``position_ids`` where the model
takes them, ``past_key_values.N.key/value``; outputs ``last_hidden_state`` or ``logits``,
``present.N.key/value``; the same dynamic axis names), so the directory also loads with
``optimum.onnxruntime.ORTModelFor*`` wherever optimum is installed. Unmerged graphs carry each adapter
as the frequency-domain subgraph of :mod:`bca_deploy.exporters.graph` (emitted by its TorchScript
symbolics). Why not optimum's exporter, and why not the dynamo exporter: see the README's ONNX section
(``bench/export_paths.py`` measures optimum's path against this one).

The export is written to a temporary directory beside ``out_dir``, validated there against PyTorch
(see :mod:`bca_deploy.exporters.validate`), and only then moved into place: a refused, failed or
invalid export leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from bca_deploy.atomic import atomic_dir, copied_link_problem
from bca_deploy.config import TOKENIZER_READS, run_adapter_dir
from bca_deploy.errors import first_line

from .bank import BankPlan
from .errors import ExportError, ExportGraphError, RuntimeVersionError, UnsupportedExportError, require
from .graph import DFT_MIN_OPSET, FFT_MODES, MATMUL_MIN_OPSET, exportable_adapters
from .metadata import write_export_metadata
from .validate import (
    ONNX_FILE,
    TOLERANCES,
    Case,
    check_cases,
    validate_model,
)

__all__ = ["export", "DTYPES", "MIN_ORT_FOR_DFT", "MIN_OPSET", "MAX_OPSET", "DEFAULT_OPSET", "check_runtime"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: onnxruntime runs a one-sided inverse DFT correctly from 1.27 (1.25-1.26 give a wrong shape silently).
MIN_ORT_FOR_DFT = (1, 27)
#: The TorchScript exporter goes up to opset 20.
MAX_OPSET = 20
#: The lowest opset any export is made at: transformers' attention (scaled_dot_product_attention) needs 14.
MIN_OPSET = 14
#: The default opset of merged and unmerged-MatMul graphs (optimum's for these architectures; fft="dft" needs 20).
DEFAULT_OPSET = 18
#: Graphs whose initializers exceed this many bytes are saved with their tensors in ``model.onnx_data``
#: (protobuf files cannot exceed 2 GiB).
EXTERNAL_DATA_BYTES = 2**31 - 2**26
#: Files copied from the base model directory into an export (tokenizer and generation settings).
_COPIED_FILES = (*TOKENIZER_READS, "generation_config.json")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_runtime(fft: str | None, validate: bool) -> None:
    """Refuse a missing onnx, or an onnxruntime that cannot run (or is missing for validating) the requested graph.

    Raises:
        MissingExtraError: onnx is not installed, or onnxruntime is not while ``validate=True``
            (the message names the ``onnx`` extra).
        RuntimeVersionError: ``fft="dft"`` with onnxruntime older than 1.27.
    """
    require("onnx", "onnx", "ONNX export")
    try:
        import onnxruntime
    except ImportError:
        if validate:
            require("onnxruntime", "onnx", "validating an ONNX export (pass validate=False / --no-validate to skip it)")
        return
    if fft == "dft" and _version_tuple(onnxruntime.__version__) < MIN_ORT_FOR_DFT:
        raise RuntimeVersionError(
            f"fft='dft' emits one-sided inverse DFT nodes, which onnxruntime runs correctly from "
            f"{'.'.join(map(str, MIN_ORT_FOR_DFT))} on; this is onnxruntime {onnxruntime.__version__} "
            "(1.25-1.26 return a wrong shape, older versions reject the model). Upgrade onnxruntime, or use "
            "fft='matmul', which runs on any version"
        )


def _resolve_opset(opset: int | None, merge: bool, fft: str, default: int) -> int:
    low = MIN_OPSET if merge else max(MIN_OPSET, DFT_MIN_OPSET if fft == "dft" else MATMUL_MIN_OPSET)
    if opset is None:
        return max(default, low)
    if opset > MAX_OPSET:
        raise UnsupportedExportError(f"opset {opset} is above {MAX_OPSET}, the highest the TorchScript exporter emits")
    if opset < low:
        what = ("fft='dft' (DFT-20 with a one-sided inverse)" if fft == "dft" and not merge
                else "the models' attention (scaled_dot_product_attention exports from opset 14)")
        raise UnsupportedExportError(f"opset {opset} is too low for {what}: use opset >= {low}"
                                     + (f" or fft='matmul' (opset >= {MIN_OPSET})" if fft == "dft" and not merge else ""))
    return opset


def _check_out_dir(out_dir: Path, overwrite: bool, protected: Sequence[Path], adapters: Sequence[Path] = ()) -> None:
    from bca_deploy.atomic import check_inputs_outside, check_outside_adapters, check_target, recover

    recover(out_dir)  # an export killed earlier: its temporary tree removed, a replaced tree restored
    check_inputs_outside(out_dir, [("the input", path) for path in protected])  # named first: the sharper reason
    check_outside_adapters(out_dir, [("the adapter", path) for path in adapters])
    check_target(out_dir, overwrite)


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
    rtol: float | None = None,
    verbose: bool = True,
    bank: bool = False,
) -> Path:
    """Export ``model_dir`` with ``adapter_dirs`` applied to an ONNX directory, validated against PyTorch.

    Args:
        model_dir: a transformers checkpoint directory of an architecture listed by
            :func:`~bca_deploy.exporters.supported_tasks` (a bare encoder such as all-MiniLM-L6-v2's
            ``BertModel``, a ``*ForSequenceClassification``, a ``*ForCausalLM``...).
        out_dir: output directory: ``model.onnx`` (+ ``model.onnx_data`` above 2 GB), ``config.json``
            (for text-classification: ``architectures``, ``num_labels``, ``id2label``/``label2id`` of
            the adapter's head), tokenizer and generation files if ``model_dir`` has them, and
            ``bca_export.json`` (how it was exported and the validation table). Loads with plain
            onnxruntime, :class:`~bca_deploy.serving.MultiAdapterSession` (bank graphs) and
            ``optimum.onnxruntime.ORTModelFor<task>``.
        adapter_dirs: bca-deploy or PEFT C3A adapter directories (or training runs': their best/, else last/);
            all are applied (their deltas sum).
        merge: ``True``: merge the adapters into the base weights and export a plain graph (fastest;
            one adapter set per graph). ``False``: keep each adapted layer as base MatMul + BCA
            subgraph with the kernels stored in the frequency domain as named initializers
            ``<module>.bca_freq_p<p>`` (swappable per adapter at load time).
        task: ``feature-extraction``, ``text-classification``, ``text-generation-with-past``,
            ``text-generation`` or ``feature-extraction-with-past`` (or ``seq-cls``/``causal-lm``);
            default: the task the adapters record (seq-cls → text-classification with the adapter's
            head, causal-lm → text-generation-with-past), else the checkpoint's architecture. A task
            that contradicts the adapters' is refused.
        opset: ONNX opset; default 18, 20 with ``fft="dft"``.
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
        atol, rtol: override the absolute tolerance and the one relative to each output's scale of
            :data:`~bca_deploy.exporters.validate.TOLERANCES` (see
            :class:`~bca_deploy.exporters.validate.Tolerance`).
        verbose: print the validation table.
        bank: export an **adapter-bank graph** (needs ``merge=False``): every adapter keeps its own
            slot, and an ``adapter_ids`` input picks each row's adapter (0 = base model only; i = the
            i-th adapter of ``adapter_dirs``). The frequency-domain kernels are graph inputs (with
            these adapters as defaults) that a runtime can replace to serve any adapter fitting the
            same modules and block sizes; ``adapters/<name>.onnx_adapter`` holds one onnxruntime
            ``AdapterFormat`` file per adapter. For ``text-classification`` the classifier head is
            banked too: each adapter's own head (its ``modules_to_save``, any number of labels) or the
            checkpoint's, chosen per row like the kernels. An adapted module whose output the graph does not
            use (a ``BertModel``'s ``pooler.dense`` in a feature-extraction graph: PEFT's ``all-linear`` adapts
            it) gets no bank input: it is named in the output (``verbose``) and recorded in ``bca_export.json``
            (``bank.unused_modules``), and serving ignores kernels for it. See :mod:`bca_deploy.exporters.bank`.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        UnsupportedExportError: an architecture or task bca-deploy does not export (the message lists
            what it does), bad ``dtype``/``fft``/``opset``/``provider`` (before anything is loaded or written);
            with ``bank=True``, adapters of a layer whose input every row shares (DeBERTa-v2's relative-position
            projections: each such module named, seen while tracing, before the graph is rewritten or validated),
            or adapters all of whose modules the graph does not use (the bank would be the base model).
        bca_deploy.models.TaskError: ``task`` contradicts the adapters, or the task's head is in neither
            the checkpoint nor an adapter.
        RuntimeVersionError: ``fft="dft"`` with onnxruntime < 1.27.
        bca_deploy.errors.OutputExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
        bca_deploy.errors.AdapterMismatchError: an adapter does not fit the model (nothing written).
        ValidationError: the graph does not match PyTorch (nothing is left at ``out_dir``;
            ``err.report`` has the table; re-run with ``validate=False`` to inspect the graph).
    """
    from bca_deploy.models import load_model

    from .loading import is_decoder, resolve_export_task
    from .validate import onnx_providers

    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter_dirs = [run_adapter_dir(d) for d in adapter_dirs]  # a training run's directory: its best/ or last/
    if dtype not in DTYPES:
        raise UnsupportedExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if fft not in FFT_MODES:
        raise UnsupportedExportError(f"fft must be one of {', '.join(FFT_MODES)}; got {fft!r}")
    if not merge and not adapter_dirs:
        raise UnsupportedExportError("an unmerged export (merge=False, the CLI's default) needs at least one --adapter "
                                     "(there is nothing to keep unmerged); pass --adapter, or --merge for the base model")
    if bank and merge:
        raise UnsupportedExportError("--bank (bank=True) keeps every adapter in its own slot, selected per row; it "
                                     "cannot be combined with --merge (merge=True): a merged graph holds one fixed "
                                     "adapter sum")
    if merge and fft == "dft":
        raise UnsupportedExportError("fft='dft' (--fft dft) shapes the BCA subgraph of an unmerged graph; a merged "
                                     "graph has none: leave it out, or export unmerged (--no-merge)")
    _check_out_dir(out_dir, overwrite, [model_dir, *adapter_dirs], adapter_dirs)
    check_runtime(None if merge else fft, validate)
    if validate:
        onnx_providers(provider)
    if opset is not None:
        _resolve_opset(opset, merge, fft, default=opset)
    _check_copied_links(model_dir, ["config.json", *_COPIED_FILES])  # before any of them is read
    model_task = resolve_export_task(model_dir, adapter_dirs, task, bank=bank)
    _check_copied_files(model_dir)
    notes = [note for note in (_check_tokenizer(model_dir),) if note]  # printed with the result
    sentence_files = _sentence_transformers_files(model_dir) if model_task.export_task == "feature-extraction" else []
    # AdapterMismatchError surfaces here; a bank holds each adapter's own head in its slot (bank.BankPlan)
    bank_plan = BankPlan.load(model_dir, adapter_dirs, model_task) if bank else None
    model = bank_plan.model if bank_plan is not None else load_model(model_dir, adapter_dirs, model_task)
    task = model_task.export_task
    if task == "text-classification" and is_decoder(model.config.model_type):
        notes += _decoder_classifier_pad_note(model, model_dir, model_task)
    if validate:  # a case longer than the model's positions would fail inside onnxruntime after the export
        cases = check_cases(cases, model.config, task.endswith("-with-past"))
    opset = _resolve_opset(opset, merge, fft, DEFAULT_OPSET)
    if merge:
        from bca_deploy.inject import remove_adapters

        remove_adapters(model, merge=True)
    keep_reference = validate and not merge and dtype == "fp32"
    if dtype != "fp32":
        _cast_base(model, DTYPES[dtype])

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # moved into place only if everything below succeeds
        export_start = time.perf_counter()
        with contextlib.nullcontext() if bank_plan is None else bank_plan.exportable(model):
            _trace_export(model, tmp, task, opset, None if merge else fft,
                          kernels=None if bank_plan is None else bank_plan.placeholders)
        if bank_plan is not None:  # adapted modules the graph does not use (a BertModel's pooler) leave the bank
            absent = bank_plan.absent_modules(tmp / ONNX_FILE)
            if absent:
                bank_plan.leave_out(_unused_outputs(model, task, absent))
        _write_model_files(model, model_dir, tmp, sentence_files)
        if bank_plan is not None:
            bank_plan.write(tmp)
        export_s = time.perf_counter() - export_start
        report = None
        if validate:
            if keep_reference:
                reference = model
            elif bank_plan is not None:
                reference = bank_plan.reference_model()
            else:
                del model
                reference = load_model(model_dir, adapter_dirs, model_task)
            tolerance = None
            if atol is not None or rtol is not None:
                tolerance = TOLERANCES[dtype].overridden(atol, rtol)
            try:
                if bank_plan is not None:
                    report = bank_plan.validate(tmp, reference, dtype, provider, tolerance, cases)
                else:
                    report = validate_model(tmp / ONNX_FILE, reference, task, dtype=dtype, cases=cases,
                                            provider=provider, tolerance=tolerance)
            except ExportGraphError as exc:
                raise _unloadable_export(exc, model_dir, out_dir) from None
            # a failed export writes nothing: its report names the graph it would have put at --out
            report.onnx_path = (str(out_dir / ONNX_FILE) if report.passed
                                else f"the graph exported for {out_dir} (not written)")
            if verbose:
                print(report.table())
            report.raise_for_failures()
        write_export_metadata(tmp, model_dir, adapter_dirs, task, opset, dtype, merge, fft, export_s, report,
                              bank=None if bank_plan is None else bank_plan.metadata())
    if verbose:
        for note in notes:
            print(f"note: {note}")
        kind = "merged" if merge else f"unmerged ({fft})"
        if bank_plan is not None:
            for line in bank_plan.notes():
                print(line)
            count = len(bank_plan.names)
            kind = f"adapter-bank ({fft}, {count} adapter{'' if count == 1 else 's'})"
            # the name each adapter is served and requested by (its folder's, or its run's, made a safe name)
            for directory, name in zip(adapter_dirs, bank_plan.names, strict=True):
                print(f"adapter {name}: {directory}")
        print(f"exported {kind} {task} graph to {out_dir} ({_graph_size(out_dir) / 1e6:.1f} MB) "
              f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def _unloadable_export(exc: ExportGraphError, model_dir: Path, out_dir: Path) -> ExportError:
    """The error for a graph this export has just written that onnxruntime refuses to load: ExportGraphError's own
    words ("damaged, truncated or changed since: export it again") fit a file read later, not this one, which
    exporting again would write the same."""
    import onnxruntime

    from bca_deploy.config import model_identity

    model_type = model_identity(model_dir)[0] or "this model"
    return ExportError(f"onnxruntime {onnxruntime.__version__} cannot load the graph exported from {model_dir} "
                       f"({exc.reason}); nothing was written to {out_dir}. Exporting {model_type} this way is not "
                       "supported with the installed onnxruntime: try --merge or another --opset, and report it with "
                       "the command (bca-deploy --debug export ... shows the details)")


def _decoder_classifier_pad_note(model: nn.Module, model_dir: Path, model_task) -> list[str]:
    """A decoder classifier reads each row's last token that is not its ``pad_token_id``: refuse one that has none
    (from config.json, the adapter's head or the base's tokenizer, :func:`bca_deploy.models.load_base`); say so when
    only the tokenizer gave it (a PEFT classifier on Llama), since the adapter may have been trained with another.

    Raises:
        UnsupportedExportError: no pad id anywhere.
    """
    from bca_deploy.models import load_config

    pad = model.config.pad_token_id
    if pad is None:
        raise UnsupportedExportError(
            f"{model_dir}: this {model.config.model_type} classifier reads each row's last token that is not its "
            "pad_token_id, and neither config.json, the adapter's head nor a tokenizer in that directory gives one: "
            f"set pad_token_id in {model_dir}/config.json to the id the adapter was trained with (training pads with "
            "the tokenizer's pad id, else its EOS id)")
    recorded = model_task.head.pad_token_id if model_task.head is not None else None
    if recorded is not None or load_config(model_dir).pad_token_id is not None:
        return []
    return [f"the classifier reads each text's last token that is not id {pad}, the pad id of {model_dir}'s tokenizer "
            "(neither config.json nor the adapter names one); if the adapter was trained with another, set "
            "pad_token_id in config.json to it"]


def _sentence_transformers_files(model_dir: Path) -> list[str]:
    """The sentence-transformers files of ``model_dir`` an embeddings export keeps (pooling, normalisation, text
    length: what ``serve``'s ``/v1/embeddings`` follows, :class:`bca_deploy.sentence_embedding.EmbeddingRecipe`),
    each checked to read as JSON first.

    Raises:
        ExportError: one links outside ``model_dir`` (:func:`_check_copied_links`), or does not read as JSON (nor
            would sentence-transformers load it).
    """
    from bca_deploy.config import read_json_value
    from bca_deploy.errors import BCAError
    from bca_deploy.sentence_embedding import sentence_transformers_files

    names = sentence_transformers_files(model_dir)
    _check_copied_links(model_dir, names)
    for name in names:
        try:
            read_json_value(model_dir / name, what="sentence-transformers file")
        except BCAError as exc:
            raise ExportError(f"{exc}; sentence-transformers cannot load the model with it either: fix the file, or "
                              "remove the model's sentence-transformers files") from None
    return names


def _check_copied_files(model_dir: Path) -> None:
    """Refuse a file the export copies from ``model_dir`` (:data:`_COPIED_FILES`) that is there by name but is not a
    regular file this user may read (a named pipe, a device, a directory, a dangling link), before anything is
    written: it was left out without a word (a generation_config.json pipe: the export got transformers' default
    generation config, other end-of-sequence ids than the model's).

    Raises:
        ExportError: naming the file and what it is.
    """
    from bca_deploy.errors import why_not_readable

    for name in _COPIED_FILES:
        path = model_dir / name
        if os.path.lexists(path) and (why := why_not_readable(path)) != "a regular file":
            raise ExportError(f"{path}: {why}; an export copies the model directory's {name}: replace it with the "
                              "file, or remove it")


def _check_copied_links(model_dir: Path, names: Sequence[str]) -> None:
    """Refuse a file of ``model_dir`` whose content the export carries (``names``: its config, :data:`_COPIED_FILES`,
    the sentence-transformers files) that links outside ``model_dir`` (:func:`bca_deploy.atomic.copied_link_problem`),
    before anything is written.

    Raises:
        ExportError: naming the file, where it points, and what to do.
    """
    for name in names:
        path = model_dir / name
        if os.path.lexists(path) and (problem := copied_link_problem(path, model_dir, "the model directory",
                                                                     "an export copies")):
            raise ExportError(problem)


def _check_tokenizer(model_dir: Path) -> str | None:
    """Refuse a tokenizer in ``model_dir`` that does not load (an export would carry it, and ``serve`` refuses to
    start with it); return a note when it has tokens the model cannot embed (``serve`` refuses texts using them).

    Raises:
        ExportError: ``model_dir`` has tokenizer files and transformers cannot load them.
    """
    from bca_deploy.models import (describe_ids_past_vocabulary, has_tokenizer_files, ids_past_vocabulary,
                                   load_config, load_saved_tokenizer, vocabulary_size)

    if not has_tokenizer_files(model_dir):
        return None
    try:
        tokenizer = load_saved_tokenizer(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many types for broken files
        raise ExportError(f"{model_dir}: its tokenizer does not load ({type(exc).__name__}: {first_line(exc, 200)}); "
                          "an export copies it, and serve refuses to start with it. Save the model's tokenizer there, "
                          "or remove its files to export a graph that takes token ids only") from None
    vocabulary = vocabulary_size(load_config(model_dir))
    extra = ids_past_vocabulary(tokenizer, vocabulary)
    if not extra:
        return None
    return f"{describe_ids_past_vocabulary(tokenizer, extra, vocabulary)}; serve refuses texts that use them"


def _unused_outputs(model: nn.Module, task: str, modules: Sequence[str]) -> dict[str, str]:
    """Those of ``modules`` whose output the ``task`` graph does not use, each with why (for the bank's record).

    The model's forward is run as :func:`_trace_export` traces it (the same inputs, the graph's outputs only) and
    its dataflow followed back from those outputs (:func:`~bca_deploy.exporters.bank.unreachable_modules`): a
    ``BertModel``'s pooler computes ``pooler_output``, which a feature-extraction graph (``last_hidden_state``)
    does not output, so ``torch.onnx.export`` prunes it. A module missing from the graph for any other reason is
    not returned (the bank rewrite then refuses it, naming it).
    """
    from .bank import unreachable_modules, unused_reason
    from .loading import is_decoder

    spec = _graph_spec(model, task, is_decoder(model.config.model_type))

    def run() -> tuple[torch.Tensor, ...]:
        with _graph_forward(model, spec):
            return model(*spec.dummy)

    owners = unreachable_modules(model, run, modules)
    return {path: unused_reason(task, spec.outputs, owner) for path, owner in owners.items()}


def _cast_base(model, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` but keep BCA kernels in fp32 (their frequency-domain constants are
    computed from them, and the subgraph runs in fp32), and trace its attention in eager form.

    Eager, because the TorchScript exporter writes SDPA's boolean mask as ``Where(mask, 0.0, -inf)`` over
    **float32** constants whatever the query's dtype: the scores, the softmax and then the residual stream
    are promoted to float32, and the graph is one onnxruntime cannot run (a LayerNormalization bound to
    float and float16: GPT-2 and, on transformers 5.x, the BERT family; float32 ``present`` outputs beside
    float16 ``past`` inputs: Gemma). The eager path builds its additive mask in the model's dtype.
    Both compute the same attention; fp32 exports keep the model's own implementation.
    """
    from bca_deploy.inject import bca_layers

    kernels = {(name, key): param.detach().clone()
               for name, layer in bca_layers(model) for key, param in layer.bca_kernels.items()}
    model.to(dtype)
    for name, layer in bca_layers(model):
        for key, param in layer.bca_kernels.items():
            param.data = kernels[(name, key)]
    if not hasattr(model, "set_attn_implementation"):  # transformers before 4.56: the attribute layers read
        model.config._attn_implementation = "eager"
        return
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # 4.x BERT-family classes say they keep theirs (they run fine)
    try:
        model.set_attn_implementation("eager")
    finally:
        transformers.logging.set_verbosity(verbosity)


# ---- the TorchScript export ------------------------------------------------------------------------


@dataclasses.dataclass
class _GraphSpec:
    """What the traced graph takes and returns, in optimum's names and dynamic axes."""

    inputs: list[str]  # the non-past inputs, in order
    outputs: list[str]
    main_output: str  # the model output behind outputs[0] (``last_hidden_state`` or ``logits``)
    layers: int  # past/present key-value pairs (0 without past)
    dummy: tuple[torch.Tensor, ...]  # example values: the inputs, then key, value of each layer's past
    dynamic_axes: dict[str, dict[int, str]]
    takes_use_cache: bool

    @property
    def input_names(self) -> list[str]:
        return self.inputs + [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]


_BATCH, _SEQ, _PAST = "batch_size", "sequence_length", "past_sequence_length"
_TOTAL = "past_sequence_length + sequence_length"
# a sliding-window layer's past and present hold at most ``sliding_window - 1`` positions, not the full layers' count
_SLIDING_PAST, _SLIDING_TOTAL = "sliding_past_sequence_length", "sliding_present_sequence_length"


def _sliding_layers(config, layers: int) -> set[int]:
    """The indices of the decoder layers whose cache keeps only a sliding window (``layer_types``' sliding ones;
    every layer where the config has a window and no ``layer_types``; none without a window).

    Their past and present axes get names of their own: onnxruntime takes outputs whose axes share a name to have
    the same size, and in a config mixing full and sliding layers the first of them sliding (Gemma 2 and 3, whose
    first five of six layers slide), it wrote a full layer's keys into a buffer sized for a sliding layer's present
    ("Shape mismatch attempting to re-use buffer", transformers 5.x; on a tiny Qwen3 with ``layer_types`` sliding,
    full too). Mixes whose first layer is full (Qwen2/Qwen3's ``max_window_layers``) happened to run.
    """
    from bca_deploy.models import attention_window

    if attention_window(config) is None:
        return set()
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        return set(range(layers))
    return {i for i, kind in enumerate(kinds[:layers]) if kind == "sliding_attention"}


def _graph_spec(model: nn.Module, task: str, decoder: bool) -> _GraphSpec:
    """The inputs and outputs of ``task``'s graph for ``model``, with example values to trace it with.

    Encoders take ``input_ids``, ``attention_mask`` and ``token_type_ids`` (where the model has more
    than one token type); decoders ``input_ids``, ``attention_mask``, ``position_ids`` and, with past,
    a ``past_key_values.N.key/value`` pair per layer, whose example values come from a real forward (so
    head counts and sizes are the model's own). The example mask has a padded position, so no "every
    token is attended" shortcut can be traced into the graph.

    A decoder's ``text-classification`` graph takes no ``position_ids``, as optimum exports it (its
    ``TextDecoderWithPositionIdsOnnxConfig`` adds them for text generation and feature extraction only):
    ``ORTModelForSequenceClassification`` feeds none, so with them the graph could not run there ("Input
    position_ids is required by model but not provided"). The model then numbers positions 0..L-1, as
    transformers does when called without them; a classifier's rows are padded on the right (serve pads them
    so), where those are the positions of every real token.
    """
    from bca_deploy.models import cache_tensors, output_cache

    config = model.config
    parameters = inspect.signature(model.forward).parameters
    with_past = task.endswith("-with-past")
    batch, seq, past = 2, 5, (4 if with_past else 0)
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
              "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64)}
    axes: dict[str, dict[int, str]] = {"input_ids": {0: _BATCH, 1: _SEQ},
                                       "attention_mask": {0: _BATCH, 1: _TOTAL if with_past else _SEQ}}
    if decoder:
        inputs["attention_mask"][1, 0] = 0  # left padding, as batched generation has
        if "position_ids" in parameters and task != "text-classification":
            inputs["position_ids"] = torch.arange(past, past + seq).expand(batch, seq).contiguous()
            axes["position_ids"] = {0: _BATCH, 1: _SEQ}
    else:
        inputs["attention_mask"][1, -2:] = 0  # right padding
        if "token_type_ids" in parameters and int(getattr(config, "type_vocab_size", 1) or 1) > 1:
            inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
            axes["token_type_ids"] = {0: _BATCH, 1: _SEQ}
    main = "logits" if task.startswith(("text-generation", "text-classification")) else "last_hidden_state"
    outputs = [main]
    axes[main] = {0: _BATCH} if task == "text-classification" else {0: _BATCH, 1: _SEQ}
    pasts: list[torch.Tensor] = []
    if with_past:
        with torch.no_grad():
            prefix = torch.randint(0, vocab, (batch, past), generator=generator)
            pasts = [t for pair in cache_tensors(output_cache(model(input_ids=prefix, use_cache=True))) for t in pair]
        sliding = _sliding_layers(config, len(pasts) // 2)
        for i in range(len(pasts) // 2):
            for kv in ("key", "value"):
                axes[f"past_key_values.{i}.{kv}"] = {0: _BATCH, 2: _SLIDING_PAST if i in sliding else _PAST}
                axes[f"present.{i}.{kv}"] = {0: _BATCH, 2: _SLIDING_TOTAL if i in sliding else _TOTAL}
                outputs.append(f"present.{i}.{kv}")
    return _GraphSpec(list(inputs), outputs, main, len(pasts) // 2, (*inputs.values(), *pasts), axes,
                      "use_cache" in parameters)


def _new_cache(config, flat: Sequence[torch.Tensor], seen: torch.Tensor | int | None = None):
    """A transformers ``DynamicCache`` holding the past key/values ``flat`` = (key 0, value 0, key 1, ...).

    ``seen``: how many positions came before this step (the attention mask's length less the new tokens), where
    that can exceed the past held: a sliding-window layer's past stops at ``sliding_window - 1`` positions, and
    its cache must still count every position seen (see :func:`_sliding_mask_sizes`).
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers < 4.56
        cache = DynamicCache()
    for i in range(0, len(flat), 2):
        cache.update(flat[i], flat[i + 1], i // 2)
    if seen is not None:
        for layer in getattr(cache, "layers", ()):
            if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
                layer.cumulative_length = seen
                layer.get_mask_sizes = functools.partial(_sliding_mask_sizes, layer)
    return cache


def _sliding_mask_sizes(layer, query) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_length, kv_offset)`` of a sliding-window cache layer for the attention mask, as transformers' own
    ``get_mask_sizes`` computes them (the keys: the past held, at most ``sliding_window - 1``, plus the new tokens;
    the first of them at position ``max(seen - sliding_window + 1, 0)`` of the attention mask), in tensor ops.

    transformers decides both with Python ``max``/``if`` on the positions seen, and the graph held only the past
    (``sliding_window - 1`` once full): the trace froze the padding mask's offset at the example's, so a left-padded
    row decoding past the window read its padding from the wrong columns (0.1-0.2 max logit error on a tiny
    Mistral, window 8, both lines; unpadded rows, where every column is 1, were exact). ``query``: the new tokens'
    count (5.x) or their cache positions (4.x).
    """
    new = query.shape[0] if isinstance(query, torch.Tensor) and query.dim() == 1 else query
    seen = torch.as_tensor(layer.cumulative_length)
    window = layer.sliding_window
    return torch.clamp(seen, max=window - 1) + new, torch.clamp(seen - window + 1, min=0)


@contextlib.contextmanager
def _graph_forward(model: nn.Module, spec: _GraphSpec) -> Iterator[nn.Module]:
    """Give ``model`` (in place, restored on exit) a forward taking and returning the graph's flat tensors.

    The model itself is traced (not a wrapper), so initializer names are its own parameter paths:
    ``<module>.bca_freq_p<p>``, what the bank rewrite and adapter swapping look for.
    """
    from bca_deploy.models import cache_argument, cache_tensors, output_cache

    original = model.forward
    cache_keyword = cache_argument(model)

    def forward(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict = dict(zip(spec.inputs, args[: len(spec.inputs)], strict=True))
        if spec.layers:
            seen = None
            if "attention_mask" in kwargs and "input_ids" in kwargs:  # every position before this step
                seen = kwargs["attention_mask"].shape[1] - kwargs["input_ids"].shape[1]
            kwargs[cache_keyword] = _new_cache(model.config, args[len(spec.inputs):], seen)
        if spec.takes_use_cache:
            kwargs["use_cache"] = bool(spec.layers)
        out = original(**kwargs)
        flat = [out[spec.main_output]]
        if spec.layers:
            flat += [t for pair in cache_tensors(output_cache(out)) for t in pair]
        return tuple(flat)

    model.forward = forward
    try:
        yield model
    finally:
        model.__dict__.pop("forward", None)


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """On transformers 4.53-4.57, build attention masks without ``torch.vmap`` while tracing.

    Those versions expand their mask functions (causal, padding, sliding window...) over (batch, head,
    query, key) indices with ``vmap``, which the TorchScript tracer cannot follow; transformers 5.x
    broadcasts index tensors instead, and so does this replacement (the same mask functions, applied
    to broadcast indices). Other versions are left alone.
    """
    try:
        from transformers import masking_utils as mu
    except ImportError:  # transformers < 4.53: masks are built without vmap
        yield
        return
    if not hasattr(mu, "sdpa_mask_recent_torch"):
        yield
        return

    def sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=mu.causal_mask_function,
                  attention_mask=None, local_size=None, allow_is_causal_skip=True, **_):
        q_length = cache_position.shape[0]
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding, q_length, kv_length, kv_offset, local_size):
            return None
        if padding is not None:
            mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
        device = cache_position.device
        batch = torch.arange(batch_size, device=device)[:, None, None, None]
        head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
        mask = mask_function(batch, head, cache_position[None, None, :, None], kv)  # (B|1, 1, q, kv)
        return mask.expand(batch_size, 1, q_length, kv_length)

    def eager_mask(*args, dtype=torch.float32, **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
        return torch.where(mask, torch.tensor(0.0, dtype=dtype), torch.finfo(dtype).min)

    registry = mu.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {name: registry[name] for name in ("sdpa", "eager")}
    registry.register("sdpa", sdpa_mask)
    registry.register("eager", eager_mask)
    try:
        yield
    finally:
        for name, function in saved.items():
            registry.register(name, function)


@contextlib.contextmanager
def _traceable_rope(model: nn.Module) -> Iterator[None]:
    """Trace a ``longrope`` model's switch from short to long RoPE factors as a graph op (``Where``).

    transformers switches when ``max(position_ids) + 1`` exceeds :func:`~bca_deploy.exporters.loading.
    rope_switch_length`. On 4.x it decides in Python, so the trace froze the short factors (rows of 5 + 4
    positions): a Phi-3 128k-style graph validated on short rows and was wrong past the switch (0.037 max
    logit error on a tiny Phi-3 switching at 16 positions). On 5.x it selects with ``torch.where`` but copies
    the result into the buffer in place, which this exporter cannot write (``aten::copy``: the export failed).
    Here each longrope rotary embedding computes its ``inv_freq`` with ``torch.where`` on the graph's
    position ids and runs transformers' own forward beneath the ``dynamic_rope_update`` decorator. Restored
    on exit; other models are left alone.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from .loading import rope_switch_length

    switch = rope_switch_length(model.config)
    patched = []
    if switch is not None:
        for module in model.modules():
            if getattr(module, "rope_type", None) != "longrope" or "inv_freq" not in module._buffers:
                continue
            short = getattr(module, "original_inv_freq", module._buffers["inv_freq"]).detach().float().clone()
            long, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, short.device, seq_len=switch + 1)
            module.forward = functools.partial(_longrope_forward, module, inspect.unwrap(type(module).forward),
                                               short, long.float(), switch)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _longrope_forward(module: nn.Module, forward, short: torch.Tensor, long: torch.Tensor, switch: int,
                      x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
    """A longrope rotary embedding's forward (``forward``: transformers' own, undecorated) with ``inv_freq``
    chosen in the graph: the long factors where the batch's largest position id + 1 exceeds ``switch``."""
    saved = module._buffers["inv_freq"]
    module._buffers["inv_freq"] = torch.where(position_ids.max() + 1 > switch, long, short)
    try:
        return forward(module, x, position_ids, *args, **kwargs)
    finally:
        module._buffers["inv_freq"] = saved


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what the tracer says that means nothing to a user of a validated export.

    TracerWarnings (a Python value baked into the trace: shapes, flags), the TorchScript exporter's
    note on advanced indexing with negative indices (transformers indexes with non-negative ones), and
    transformers' advice logged while tracing. Real problems still surface: the export is validated.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*aten::index operator of advanced indexing.*")
            warnings.filterwarnings("ignore", message=r".*Found different candidate ONNX initializers.*")
            # torch >= 2.9 calls this exporter "legacy"; it is the one whose symbolics emit the BCA subgraph.
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _trace_export(model: nn.Module, directory: Path, task: str, opset: int, fft: str | None, kernels=None) -> None:
    """Write ``directory/model.onnx``: ``model`` traced for ``task`` by ``torch.onnx.export(dynamo=False)``.

    ``fft=None`` exports the model as it is (merged adapters); otherwise its BCA layers export as the
    subgraph of :mod:`~bca_deploy.exporters.graph` (``kernels`` as in
    :func:`~bca_deploy.exporters.graph.exportable_adapters`). Graphs whose initializers exceed
    :data:`EXTERNAL_DATA_BYTES` keep their tensors in one ``model.onnx_data`` file.
    """
    from .loading import is_decoder

    spec = _graph_spec(model, task, is_decoder(model.config.model_type))
    scratch = directory / ".trace"
    scratch.mkdir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_quiet_export())
        stack.enter_context(_traceable_masks())
        stack.enter_context(_traceable_rope(model))
        if fft is not None:
            stack.enter_context(exportable_adapters(model, fft, kernels=kernels))
        stack.enter_context(_graph_forward(model, spec))
        try:
            torch.onnx.export(model, spec.dummy, str(scratch / ONNX_FILE), input_names=spec.input_names,
                              output_names=spec.outputs, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        except Exception as exc:
            # the first line: torch appends the whole TorchScript graph (tens of KB) to its messages
            raise ExportError(f"torch.onnx.export failed on the {type(model).__name__} for {task!r} at opset "
                              f"{opset}: {type(exc).__name__}: {first_line(exc, 500)}") from exc
    _save_graph(scratch, directory)
    shutil.rmtree(scratch)


def _save_graph(scratch: Path, directory: Path) -> None:
    """Move the traced graph into ``directory``: one file, or ``model.onnx`` + ``model.onnx_data`` when large.

    The TorchScript exporter writes a graph over 2 GiB as one file per tensor; those are gathered here.
    """
    source = scratch / ONNX_FILE
    tensor_bytes = sum(p.stat().st_size for p in scratch.iterdir())
    if tensor_bytes <= EXTERNAL_DATA_BYTES and [p.name for p in scratch.iterdir()] == [ONNX_FILE]:
        os.replace(source, directory / ONNX_FILE)
        return
    import onnx

    graph = onnx.load(str(source))  # with its external tensors
    onnx.save_model(graph, str(directory / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_FILE + "_data", size_threshold=1024)


def _write_model_files(model: nn.Module, model_dir: Path, directory: Path, extra_files: Sequence[str]) -> None:
    """``config.json`` of the exported model (its class in ``architectures``; a classifier's labels), the
    generation config of a decoder, the tokenizer files of ``model_dir``, and ``extra_files`` of it (for embeddings:
    :func:`_sentence_transformers_files`)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(directory))
    if type(model).__name__.endswith("ForSequenceClassification"):
        # transformers derives num_labels from id2label and does not write it; readers other than
        # transformers (and people) look for it.
        path = directory / "config.json"
        data = json.loads(path.read_text())
        data["num_labels"] = len(data.get("id2label") or {}) or int(config.num_labels)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and not (model_dir / "generation_config.json").is_file():
        with contextlib.suppress(ValueError):  # a generation config transformers refuses to save is left out
            if model.can_generate():
                generation.save_pretrained(str(directory))
    names = [*_COPIED_FILES, *extra_files]
    for name in names:
        source = model_dir / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, directory / name)
