"""Validate an exported graph against the PyTorch model (adapters applied, unmerged) under onnxruntime.

One onnxruntime session runs several (batch, sequence) cases; every graph output of every case is
compared with PyTorch and reported (max absolute and relative difference, tolerance, pass); all
failures are collected and raised together as one :class:`ValidationError`. For decoders exported
with past key values each case has two steps: a prefill with an empty past, then new tokens fed with
the past each side produced itself, comparing the logits (or hidden states) and every present
key/value of both steps.

The reference is always the **fp32, unmerged** model: what was trained. So a merged graph is checked
for its merge too, and an fp16 graph for its rounding.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bca_deploy.errors import format_problems, require_readable
from bca_deploy.inject import mixed_adapters
from bca_deploy.models import cache_argument, cache_tensors, output_cache, position_limit

from .errors import ExportGraphError, ExportMetadataError, UnsupportedExportError, ValidationError, require
from .metadata import ExportMetadata, read_export_metadata

#: The adapter-bank graph's per-row slot input (see bca_deploy.exporters.bank; defined here to avoid an import cycle).
ADAPTER_IDS = "adapter_ids"

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "DEFAULT_CASES",
    "Case",
    "check_cases",
    "ValidationRow",
    "ValidationReport",
    "validate",
    "validate_model",
    "onnx_providers",
    "inference_session",
    "check_graph_file",
    "graph_interface",
    "session_interface",
    "bank_graph_problems",
    "bank_graph_message",
    "PositionTable",
    "graph_position_tables",
    "graph_position_limit",
    "graph_embedding_rows",
    "graph_limits",
    "ONNX_FILE",
]

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class Tolerance:
    """An output passes when ``|onnx − torch| ≤ atol + rtol·max|torch|`` element-wise.

    ``rtol`` is relative to the output's **scale** (its largest magnitude in that case), not to each
    element: float error from a different summation order is proportional to the magnitudes summed,
    which a near-zero logit of a row with logits around 14 shares with the large ones. The report's
    "max rel diff" column is the same ratio (max abs diff / scale).
    """

    atol: float
    rtol: float = 0.0

    def bound(self, expected: np.ndarray) -> float:
        """The largest difference allowed for an output whose reference values are ``expected``."""
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        return self.atol + self.rtol * scale

    def passes(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        """``actual`` is finite and within :meth:`bound` of ``expected`` everywhere (same shape)."""
        if not np.isfinite(actual).all():
            return False
        return actual.size == 0 or float(np.max(np.abs(actual - expected))) <= self.bound(expected)

    def overridden(self, atol: float | None = None, rtol: float | None = None) -> Tolerance:
        """This tolerance with ``atol``/``rtol`` replaced where given (the CLI's ``--atol``/``--rtol``)."""
        return Tolerance(atol=self.atol if atol is None else atol, rtol=self.rtol if rtol is None else rtol)

    def __str__(self) -> str:
        return _number(self.atol) + (f"+{_number(self.rtol)}·max|ref|" if self.rtol else "")


def _number(value: float) -> str:
    """``value`` in short scientific notation that keeps its significant digits (1e-04, 1.16e-03)."""
    return np.format_float_scientific(value, precision=3, trim="-", exp_digits=2) if np.isfinite(value) else "-"


#: Tolerances by exported dtype, applied to every output (logits, hidden states, present key/values).
#:
#: - ``fp32``: 1e-4 absolute + 1e-5 of the output's scale. The graph computes what PyTorch computes in
#:   the same precision; what is left is summation order (GEMM blocking, the DFT as a MatMul vs. an
#:   FFT), typically 1e-6..1e-5 of the scale: logits around 14 differ by up to ~1.2e-4, which an
#:   absolute 1e-4 alone refused. A graph that drops or misroutes an adapter differs by far more.
#: - ``fp16``: 1e-2 absolute + 1e-2 of the scale. The graph rounds weights and activations to fp16
#:   (11-bit mantissa, ~5e-4 relative per rounding) and is compared with the **fp32** model; rounding
#:   errors add up over layers. The BCA subgraph itself runs in fp32 between Casts. Real fp16
#:   deployments should also be judged on task metrics; this catches broken graphs, not the last ulp.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-5),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2),
}


@dataclass(frozen=True)
class Case:
    """One validation input: ``batch`` rows of ``seq`` tokens; decoders with past then feed ``new_tokens``."""

    batch: int
    seq: int
    new_tokens: int = 1

    @classmethod
    def of(cls, value: Case | Sequence[int]) -> Case:
        if isinstance(value, Case):
            return value
        values = tuple(int(v) for v in value)
        if len(values) not in (2, 3) or min(values) < 1:
            raise ValueError(f"a validation case is (batch, seq) or (batch, seq, new_tokens), all >= 1; got {value!r}")
        return cls(*values)


DEFAULT_CASES: tuple[Case, ...] = (Case(1, 5, 1), Case(2, 11, 3), Case(3, 16, 1))


#: The longest switch or window length :func:`threshold_cases` adds rows across (cheap rows only: a real model's
#: 4096-position window or longrope switch is left to ``--cases``).
THRESHOLD_ROWS_UP_TO = 256


def threshold_cases(config: Any, with_past: bool, limit: int | None = None) -> tuple[Case, ...]:
    """Rows across the lengths where a decoder computes differently, for the default validation: past a longrope
    config's switch to its long factors (:func:`~bca_deploy.exporters.loading.rope_switch_length`) and past a
    sliding window (:func:`bca_deploy.models.attention_window`), both as a prefill longer than the length and, with
    past, as a prefill just short of it that new tokens carry across (batches of 2: :func:`validate_model` left-pads
    the last row of every with-past case). Only where the length is at most :data:`THRESHOLD_ROWS_UP_TO` and the
    rows fit ``limit`` positions; the default cases (17 positions) never reach such a length, so a graph that froze
    the short-row behaviour used to validate."""
    from bca_deploy.models import attention_window

    from .loading import rope_switch_length

    cases = []
    for length in sorted({rope_switch_length(config), attention_window(config)} - {None}):
        if length > THRESHOLD_ROWS_UP_TO:
            continue
        cases += [Case(2, length + 1, 2), Case(2, length - 1, 3)] if with_past else [Case(1, length + 1)]
    steps = 1 if with_past else 0
    return tuple(c for c in cases if c.seq >= 1 and (limit is None or c.seq + steps * c.new_tokens <= limit))


def check_cases(cases: Sequence[Case | Sequence[int]] | None, config: Any, with_past: bool) -> tuple[Case, ...]:
    """The validation cases (default :data:`DEFAULT_CASES` and ``config``'s :func:`threshold_cases`), each checked
    against the model's positions (:func:`bca_deploy.models.position_limit`): a row of ``seq`` tokens, plus ``new_tokens`` steps for a graph
    with past, must fit, or the position lookup fails inside onnxruntime.

    Raises:
        UnsupportedExportError: listing every case that does not fit, with the model's limit.
    """
    limit = position_limit(config)
    parsed = tuple(Case.of(c) for c in cases) if cases else DEFAULT_CASES + threshold_cases(config, with_past, limit)
    if limit is None:
        return parsed
    problems = []
    for case in parsed:
        steps = case.new_tokens if with_past else 0
        if case.seq + steps > limit:
            problems.append(f"{case.batch}x{case.seq}" + (f" with {steps} new token(s): {case.seq + steps} positions"
                                                          if steps else f": {case.seq} tokens"))
    if problems:
        raise UnsupportedExportError(format_problems(
            f"validation cases longer than the model's {limit} positions (its position table); pass --cases "
            "with shorter rows:", problems))
    return parsed


@dataclass
class ValidationRow:
    """One output of one case. ``allowed``: the largest difference the tolerance allowed for it
    (:meth:`Tolerance.bound` of the reference values; NaN where nothing could be compared)."""

    output: str
    case: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    tolerance: str
    passed: bool
    note: str = ""
    allowed: float = float("nan")


@dataclass
class ValidationReport:
    """Every compared output of every case. ``str(report)`` is the printable table.

    ``max_rel_diff`` is ``max|onnx − torch| / max|torch|`` over the output: relative to the output's
    scale, so it stays meaningful where individual values cross zero.
    """

    onnx_path: str
    task: str
    dtype: str
    provider: str
    tolerance: str
    rows: list[ValidationRow] = field(default_factory=list)
    note: str = ""  # what may explain a failure (said after the failed comparisons)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[ValidationRow]:
        return [r for r in self.rows if not r.passed]

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=float("nan"))

    def table(self) -> str:
        header = ("output", "case", "shape", "max abs diff", "allowed", "max rel diff", "result")
        lines = [
            (r.output, r.case, "x".join(map(str, r.shape)), f"{r.max_abs_diff:.2e}", _number(r.allowed),
             f"{r.max_rel_diff:.2e}", ("pass" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""))
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"ONNX validation of {self.onnx_path} ({self.task}, {self.dtype}, {self.provider}) vs PyTorch fp32, "
               f"unmerged adapters; tolerance {self.tolerance} (allowed: that bound for each output)",
               fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        verdict = "all passed" if self.passed else f"{len(self.failures)} of {len(self.rows)} FAILED"
        out.append(f"{len(self.rows)} comparisons, max abs diff {self.max_abs_diff:.2e}: {verdict}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def raise_for_failures(self) -> None:
        """Raise :class:`ValidationError` listing every failed comparison (no-op if all passed)."""
        if self.passed:
            return
        problems = [
            f"{r.output} [{r.case}]: max abs diff {r.max_abs_diff:.3e}"
            + (f" > allowed {r.allowed:.3e}" if np.isfinite(r.allowed) else "") + f" (tolerance {r.tolerance})"
            + (f"; {r.note}" if r.note else "")
            for r in self.failures
        ] or ["no output was compared"]
        message = format_problems(f"{self.onnx_path} does not match PyTorch ({self.task}, {self.dtype}, "
                                  f"{self.provider}):", problems)
        raise ValidationError(message + (f"\nnote: {self.note}" if self.note else ""), self)


# ---- onnxruntime ----------------------------------------------------------------------------------


def onnx_providers(provider: str) -> list[str]:
    """onnxruntime execution providers for ``provider`` (``"cpu"`` or ``"cuda"``, with CPU fallback)."""
    ort = require("onnxruntime", "onnx", "running an ONNX graph")

    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UnsupportedExportError(
                f"provider='cuda' but this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime, or use provider='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UnsupportedExportError(f"provider must be 'cpu' or 'cuda'; got {provider!r}")


#: The largest ONNX file a graph can be: protobuf serializes at most 2 GiB (larger models keep their weights in
#: external data files, which onnxruntime maps). A file that claims more (a sparse file, another file renamed) is
#: refused from its size: onnxruntime and onnx would read it whole into memory first.
MAX_GRAPH_FILE_BYTES = 2**31 - 1


def _require_graph_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_GRAPH_FILE_BYTES:
        raise ExportGraphError(path, f"{size:,} bytes, more than an ONNX file can hold ({MAX_GRAPH_FILE_BYTES:,}: "
                                     "larger models keep their weights in external data files)")


def inference_session(onnx_path: str | Path, options: Any, provider: str = "cpu") -> Any:
    """onnxruntime's ``InferenceSession`` for ``onnx_path`` with ``options`` on ``provider``: the one place a
    graph is opened, so that a graph onnxruntime refuses is named as such and not reported as a bug.

    Raises:
        ExportGraphError: onnxruntime cannot load the file (not a model, truncated, an unknown operator,
            external data missing or outside the graph's directory), naming it and onnxruntime's reason.
        UnsupportedExportError: ``provider`` is unknown or this onnxruntime does not have it.
    """
    ort = require("onnxruntime", "onnx", "running an ONNX graph")
    providers = onnx_providers(provider)
    require_readable(onnx_path)  # onnxruntime reports an unreadable file as a graph it cannot parse
    _require_graph_size(Path(onnx_path))
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise  # an OSError, MemoryError, ...: the CLI reports those for what they are
        # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed."
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
        reason = re.sub(r"^Load model from .* failed:\s*", "", reason)
        raise ExportGraphError(onnx_path, f"{type(exc).__name__}: {reason}") from None


def check_graph_file(onnx_path: str | Path) -> Any:
    """Refuse a graph file that onnxruntime would refuse for its bytes, without building a session; return the
    graph (an ``onnx.ModelProto`` without its external data).

    The graph is parsed without its external data. It must hold a graph, and every external tensor must lie
    in a file inside the graph's directory, long enough for it (onnxruntime's own rule). This is for where a
    session costs too much: ``serve-ray`` checks the export before Ray starts replicas that each build
    their own. A file that passes can still fail to load (an operator this onnxruntime lacks):
    :func:`inference_session` names that.

    Raises:
        ExportGraphError: naming the file and what is wrong with it.
        OSError: the file is missing, not a regular file (a FIFO would block the reader) or not readable.
    """
    import os

    onnx = require("onnx", "onnx", "reading an ONNX graph")
    path = Path(onnx_path)
    require_readable(path)
    _require_graph_size(path)

    def refuse(reason: str):
        raise ExportGraphError(path, reason)

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as exc:  # an I/O error reading it (a link to /proc/self/mem): said with the file's name
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except Exception as exc:  # protobuf's DecodeError (random bytes, cut short) and kin
        refuse(f"not an ONNX model: {type(exc).__name__}: {str(exc).strip()[:200]}")
    if not model.graph.node:
        refuse("the file holds no graph")
    root = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        target = (path.parent / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(root):
            refuse(f"initializer {tensor.name[:200]!r} reads external data from {location[:200]!r}, outside the "
                   "graph's directory")
        if not target.is_file():
            refuse(f"initializer {tensor.name[:200]!r} reads external data from {location[:200]!r}, which is not "
                   "a file")
        try:
            end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
        except ValueError:
            refuse(f"initializer {tensor.name[:200]!r}: external data offset/length are not integers")
        size = target.stat().st_size
        if end > size:
            refuse(f"initializer {tensor.name[:200]!r} reads bytes up to {end} of {location[:200]!r}, which has {size}")
    return model


# ---- the interface of an adapter-bank graph --------------------------------------------------------------

#: The text inputs a bank graph may take, each fed as int64 (``input_ids`` is required).
BANK_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: The element types bca-deploy feeds and reads, as onnxruntime names them.
INT64, FLOAT = "tensor(int64)", "tensor(float)"
FLOAT_TYPES = ("tensor(float)", "tensor(float16)")
#: The outputs each task's bank graph must have (generation: with a present output per past input too).
BANK_TASK_OUTPUTS = {"feature-extraction": ("last_hidden_state",), "text-classification": ("logits",),
                     "text-generation-with-past": ("logits",)}


def graph_interface(model: Any) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(inputs, outputs, overridable)`` of an ``onnx.ModelProto``, each ``{name: type}`` with the types written as
    onnxruntime writes them (``tensor(int64)``): what :func:`bank_graph_problems` checks, without a session.
    ``inputs`` are the required ones; ``overridable`` the inputs an initializer backs."""
    from onnx import TensorProto

    def kind(value_info) -> str:
        if value_info.type.WhichOneof("value") != "tensor_type":
            return f"a {value_info.type.WhichOneof('value') or 'missing'} type"
        return f"tensor({TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()})"

    initialized = {t.name for t in model.graph.initializer}
    inputs = {i.name: kind(i) for i in model.graph.input if i.name not in initialized}
    overridable = {i.name: kind(i) for i in model.graph.input if i.name in initialized}
    return inputs, {o.name: kind(o) for o in model.graph.output}, overridable


def session_interface(session: Any) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """:func:`graph_interface` of an onnxruntime ``InferenceSession``."""
    return ({i.name: i.type for i in session.get_inputs()}, {o.name: o.type for o in session.get_outputs()},
            {i.name: i.type for i in session.get_overridable_initializers()})


def bank_graph_problems(metadata: ExportMetadata, inputs: dict[str, str], outputs: dict[str, str],
                        overridable: dict[str, str]) -> list[str]:
    """What keeps an adapter-bank graph from running the way bca-deploy feeds and reads it (``[]``: nothing),
    from its interface (:func:`graph_interface` or :func:`session_interface`) and the bank ``metadata`` records.

    The one rule for ``serve``, ``serve-ray``, ``validate`` and ``inspect``: every required input is one bca-deploy
    feeds (text inputs and the slot ids as int64, past key/values as float, bank inputs as float32); ``input_ids``
    and the slot ids are there; the outputs the task reads are there, as floats (a generation graph: a present
    output of the past's type for every past input, and the other way round). Before, such a graph loaded and every
    request failed inside onnxruntime ("Internal error") or was refused as the wrong task.
    """
    from .bank import HEAD_BIAS, HEAD_WEIGHT, LOGITS_TO_KEEP
    from .graph import _FREQ_PREFIX

    bank = metadata.bank
    bank_inputs = set(bank.layout)
    if bank.head is not None:
        bank_inputs |= set(bank.head.names())
    problems = []

    def typed(what: str, name: str, found: str, expected: tuple[str, ...]) -> None:
        if found not in expected:
            problems.append(f"{what} {name[:200]!r} is {found}, expected {' or '.join(expected)}")

    for name in ("input_ids", bank.ids_input):
        if name not in inputs and name not in overridable:
            problems.append(f"input {name!r} is missing")
    pasts = {}
    for name, found in inputs.items():
        if name in BANK_TEXT_INPUTS or name == bank.ids_input:
            typed("input", name, found, (INT64,))
        elif name in bank_inputs:
            typed("input", name, found, (FLOAT,))
        elif PAST_INPUT.fullmatch(name):
            typed("input", name, found, FLOAT_TYPES)
            pasts[name] = found
        else:
            problems.append(f"input {name[:200]!r} ({found}) is not one bca-deploy feeds (it feeds "
                            f"{', '.join(BANK_TEXT_INPUTS)}, {bank.ids_input}, past_key_values.N.key/value and the "
                            "bank's inputs)")
    for name, found in overridable.items():
        if name in bank_inputs:
            typed("input", name, found, (FLOAT,))
        elif name == bank.ids_input or name in BANK_TEXT_INPUTS or name == LOGITS_TO_KEEP:
            typed("input", name, found, (INT64,))
    missing = [name for name in sorted(bank_inputs) if name not in inputs and name not in overridable]
    if missing:  # a graph from another bank, or a metadata file from another export: every run would fail
        problems.append(f"the bank inputs {', '.join(n[:100] for n in missing[:3])}"
                        f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} the metadata records are not "
                        "inputs of the graph")
    unrecorded = [name for name in overridable if name not in bank_inputs
                  and (name.rpartition(".")[2] in (HEAD_WEIGHT, HEAD_BIAS) or name.rpartition(".")[2].startswith(_FREQ_PREFIX))]
    if unrecorded:  # fed their exported defaults, they would serve the export's slots under other names or labels
        problems.append(f"bank inputs of the graph the metadata does not record: "
                        f"{', '.join(n[:100] for n in unrecorded[:3])}{' ...' if len(unrecorded) > 3 else ''}")
    for name in BANK_TASK_OUTPUTS.get(metadata.task, ()):
        if name not in outputs:
            problems.append(f"output {name!r} is missing (a {metadata.task} graph gives it; outputs: "
                            f"{', '.join(n[:100] for n in list(outputs)[:8])})")
    for name, found in outputs.items():
        if name in ("logits", "last_hidden_state") or PRESENT_OUTPUT.fullmatch(name):
            typed("output", name, found, FLOAT_TYPES)
    if metadata.task == "text-generation-with-past" and not pasts:
        problems.append("no past_key_values.N.key/value inputs (a text-generation-with-past graph takes them)")
    elif metadata.task in ("feature-extraction", "text-classification") and pasts:
        problems.append(f"past_key_values inputs in a {metadata.task} graph (only text-generation-with-past "
                        "takes them)")
    presents = {n: t for n, t in outputs.items() if PRESENT_OUTPUT.fullmatch(n)}
    for name, found in pasts.items():
        present = name.replace("past_key_values", "present", 1)
        if present not in presents:
            problems.append(f"input {name!r} has no {present!r} output")
        elif presents[present] != found:
            problems.append(f"output {present!r} is {presents[present]}, expected {found} (as input {name!r})")
    for name in presents if pasts else ():  # a graph without past may output presents: nothing reads them
        if name.replace("present", "past_key_values", 1) not in pasts:
            problems.append(f"output {name!r} has no {name.replace('present', 'past_key_values', 1)!r} input")
    return problems


def bank_graph_message(onnx_path: str | Path, problems: Sequence[str]) -> str:
    """The one-line refusal of a bank graph with ``problems`` (:func:`bank_graph_problems`), naming the file."""
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    return (f"{onnx_path}: not the adapter-bank graph bca-deploy export wrote ({shown}); the graph was changed "
            "since: export it again")


# ---- the graph's own position limit ----------------------------------------------------------------------


@dataclass(frozen=True)
class PositionTable:
    """An absolute position-embedding table of a graph (:func:`graph_position_tables`).

    Attributes:
        name: the initializer (or constant) holding the table.
        rows: its first dimension: how many positions it embeds.
        offset: the row a sequence's first token reads (0; RoBERTa's ``padding_idx + 1``; OPT's 2).
        limit: the most tokens one row can have before a position falls outside the table (or, where the graph
            slices its position ids from a constant shorter than the table, outside that constant).
    """

    name: str
    rows: int
    offset: int
    limit: int

    def describe(self) -> str:
        """The table in words, for a note: ``'embeddings.position_embeddings.weight' (64 rows)``, with the offset."""
        offset = f", positions start at {self.offset}" if self.offset else ""
        return f"{self.name[:200]!r} ({self.rows} rows{offset})"


#: Element types of an embedding table (a Gather of any other type is not one).
_TABLE_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})
#: Ops a table passes through unchanged on its way to its Gather (an fp16 export may Cast it).
_TABLE_PASSTHROUGH = frozenset({"Cast", "Identity"})
#: Nodes that keep the values of token ids (input_ids on its way to the word-embedding lookup).
_IDS_PASSTHROUGH = _TABLE_PASSTHROUGH | {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
#: Bounds on what computes a Gather's indices for it to be probed: position ids come from the inputs' shapes,
#: the mask or ``position_ids`` through a few small ops; indices computed from weights are something else.
_MAX_INDEX_NODES = 256
_MAX_INDEX_CONSTANT_ELEMENTS = 1 << 22
#: Token ids the probe rows are filled with: two, so that one of them is not the padding id a graph compares with.
_PROBE_TOKENS = (3, 4)
#: The most elements one probe input may have (an input of fixed, declared dimensions is fed at that size).
_MAX_PROBE_FEED_ELEMENTS = 1 << 22


def _row_gathers(graph: Any) -> Iterator[Any]:
    """The graph's Gather nodes that pick rows (axis 0) of their data by their indices: embedding lookups."""
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and \
                not any(a.name == "axis" and a.i != 0 for a in node.attribute):
            yield node


def _constants_and_producers(graph: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({name: tensor} of the graph's initializers and Constant nodes, {output name: node producing it})``."""
    constants = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants.setdefault(node.output[0], value)
    return constants, producers


def graph_position_tables(model: Any) -> list[PositionTable]:
    """The absolute position-embedding tables of an ``onnx.ModelProto`` (external data not needed), each with the
    most tokens one row can have: what the graph itself can embed, whatever its ``config.json`` says.

    A table is a 2-D float initializer (or constant) read by a Gather on axis 0 whose indices, computed from the
    graph's inputs as bca-deploy feeds them for one row of L tokens (``input_ids`` of one repeated token,
    ``attention_mask`` of ones, ``token_type_ids`` of zeros, ``position_ids`` 0..L-1, an empty past, slot 0), are L
    consecutive integers ``offset .. offset+L-1``: the position ids the graph takes as an input (GPT-2), slices from a
    constant (BERT), or counts from the mask past the padding index (RoBERTa). Word-embedding and token-type lookups
    (one repeated index), relative-position buckets (L×L indices) and the bank's slot lookups are not that. The
    indices alone are computed: a small graph of the nodes they depend on runs in onnxruntime for L = 2 and 3, then
    for the limit ``rows - offset`` itself (a smaller limit where the indices stop being L consecutive positions
    sooner: a position-id constant shorter than the table). A model without such a table (rotary positions: Llama)
    gives ``[]``: its config is all there is to go by.
    """
    from onnx import TensorProto

    graph = model.graph
    constants, producers = _constants_and_producers(graph)
    inputs = {vi.name: vi for vi in graph.input}
    order = {id(node): i for i, node in enumerate(graph.node)}
    tables = []
    for node in _row_gathers(graph):
        source = _table_source(node.input[0], constants, producers)
        if source is None or node.input[1] in constants:
            continue
        table_name, table = source
        if len(table.dims) != 2 or TensorProto.DataType.Name(table.data_type) not in _TABLE_TYPES or table.dims[0] < 1:
            continue
        try:
            found = _probe_positions(model, node.input[1], constants, producers, inputs, order, int(table.dims[0]))
        except (ValueError, TypeError, KeyError, MemoryError, OverflowError):
            # a node onnx's helpers cannot copy, a shape numpy cannot make: this lookup is not probed, and the
            # limit is what config.json says (as for a graph without a table), not a failed start-up
            found = None
        if found is not None:
            offset, limit = found
            tables.append(PositionTable(table_name, int(table.dims[0]), offset, limit))
    return tables


def graph_position_limit(onnx_path: str | Path) -> PositionTable | None:
    """The tightest position table of the graph file ``onnx_path`` (:func:`graph_position_tables`; read by
    :func:`check_graph_file`, without its external data), or None where the graph has none.

    Raises:
        ExportGraphError, OSError: as :func:`check_graph_file`.
    """
    return graph_limits(onnx_path)[0]


def graph_limits(onnx_path: str | Path) -> tuple[PositionTable | None, int | None]:
    """``(`` :func:`graph_position_limit` ``,`` :func:`graph_embedding_rows` ``)`` of the graph file ``onnx_path``,
    read once.

    Raises:
        ExportGraphError, OSError: as :func:`check_graph_file`.
    """
    model = check_graph_file(onnx_path)
    tables = graph_position_tables(model)
    return (min(tables, key=lambda t: t.limit) if tables else None), graph_embedding_rows(model)


def graph_embedding_rows(model: Any) -> int | None:
    """How many token ids the graph embeds: the rows of the table its ``input_ids`` index (a 2-D initializer or
    constant read by a Gather on axis 0 whose indices are ``input_ids``, cast or reshaped), the fewest where
    there are several; None where no lookup reads ``input_ids`` so. An id from there on fails inside onnxruntime
    (an out-of-bounds Gather: a 500), whatever ``config.json``'s ``vocab_size`` claims."""
    graph = model.graph
    constants, producers = _constants_and_producers(graph)
    rows = []
    for node in _row_gathers(graph):
        indices = node.input[1]
        for _ in range(4):  # input_ids itself, or it cast or reshaped (GPT-2 views it as (-1, length)): same values
            producer = producers.get(indices)
            if producer is None or producer.op_type not in _IDS_PASSTHROUGH or not producer.input:
                break
            indices = producer.input[0]
        source = _table_source(node.input[0], constants, producers)
        if indices == "input_ids" and source is not None and len(source[1].dims) == 2 and source[1].dims[0] >= 1:
            rows.append(int(source[1].dims[0]))
    return min(rows) if rows else None


def _table_source(name: str, constants: dict[str, Any], producers: dict[str, Any]) -> tuple[str, Any] | None:
    """``(name, tensor)`` of the constant the tensor ``name`` is (through Cast/Identity nodes), or None."""
    for _ in range(4):
        if name in constants:
            return name, constants[name]
        node = producers.get(name)
        if node is None or node.op_type not in _TABLE_PASSTHROUGH or not node.input:
            return None
        name = node.input[0]
    return None


def _probe_positions(model: Any, indices: str, constants: dict[str, Any], producers: dict[str, Any],
                     inputs: dict[str, Any], order: dict[int, int], rows: int) -> tuple[int, int] | None:
    """``(offset, limit)`` when the tensor ``indices`` holds one row's positions (see :func:`graph_position_tables`),
    else None: not positions, or not computable from the inputs alone by a small graph."""
    from onnx import TensorProto, helper

    ort = require("onnxruntime", "onnx", "reading a graph's position table")
    nodes, needed, used = {}, set(), set()
    stack, seen = [indices], set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:
            if name in constants:  # an initializer (one the graph also lists as an input included)
                used.add(name)
            elif name in inputs:
                needed.add(name)
            else:
                return None
            continue
        if id(node) in nodes:
            continue
        if any(a.type in (helper.AttributeProto.GRAPH, helper.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        nodes[id(node)] = node
        if len(nodes) > _MAX_INDEX_NODES:
            return None
        stack.extend(node.input)
    held = [constants[n] for n in sorted(used)]
    held += [a.t for n in nodes.values() if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    if any(t.data_location == TensorProto.EXTERNAL for t in held) or \
            sum(int(np.prod(t.dims, dtype=np.int64)) for t in held) > _MAX_INDEX_CONSTANT_ELEMENTS:
        return None
    ordered = sorted(nodes.values(), key=lambda n: order[id(n)])
    out = "bca_positions/indices"
    probe = helper.make_model(
        helper.make_graph([*ordered, helper.make_node("Cast", [indices], [out], to=TensorProto.INT64)],
                          "bca_positions", [inputs[n] for n in sorted(needed)],
                          [helper.make_tensor_value_info(out, TensorProto.INT64, None)],
                          [constants[n] for n in sorted(used)]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # a subgraph onnxruntime will not build alone (shapes it cannot infer): not probed
        return None
    feeds_of = {vi.name: vi for vi in (inputs[n] for n in needed)}

    def offset_at(length: int, token: int) -> int | None:
        feeds = {}
        for name, vi in feeds_of.items():
            feed = _probe_feed(vi, length, token)
            if feed is None:
                return None
            feeds[name] = feed
        try:
            got = np.asarray(session.run([out], feeds)[0]).ravel()
        except Exception:  # the indices cannot be computed for this row: not a position lookup it can make
            return None
        if got.size != length or not np.array_equal(got, got[0] + np.arange(length)):
            return None
        return int(got[0])

    starts = {}
    for token in _PROBE_TOKENS:
        first = offset_at(2, token)
        if first is not None and first >= 0 and offset_at(3, token) == first:
            starts[token] = first
    if not starts:
        return None
    token = max(starts, key=starts.get)
    offset = starts[token]
    limit = rows - offset
    if limit < 1:
        return None
    if limit > 3 and offset_at(limit, token) != offset:
        low, high = 3, limit  # positions hold at low, not at high: the longest row whose positions are whole
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if offset_at(middle, token) == offset else (low, middle)
        limit = low
    return offset, limit


def _probe_feed(value_info: Any, length: int, token: int) -> np.ndarray | None:
    """One graph input for a probe row of ``length`` tokens (see :func:`graph_position_tables`), or None for an
    input of a type the probe does not feed."""
    from onnx import helper

    tensor = value_info.type.tensor_type
    if value_info.type.WhichOneof("value") != "tensor_type":
        return None
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    except (KeyError, ValueError):
        return None
    name = value_info.name
    if name == "input_ids":
        return np.full((1, length), token, dtype=dtype)
    if name == "attention_mask":
        return np.ones((1, length), dtype=dtype)
    if name == "token_type_ids":
        return np.zeros((1, length), dtype=dtype)
    if name == "position_ids":
        return np.arange(length, dtype=dtype)[None]
    past = PAST_INPUT.fullmatch(name) is not None
    shape = [d.dim_value if d.HasField("dim_value") else (1 if axis == 0 or not past else 0)
             for axis, d in enumerate(tensor.shape.dim)]
    if math.prod(shape) > _MAX_PROBE_FEED_ELEMENTS:  # a graph declaring a giant fixed input: not probed
        return None
    return np.zeros(shape, dtype=dtype)


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
#: Names optimum gives a decoder graph's past key/value inputs and present outputs.
PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT_OUTPUT = re.compile(r"present\.(\d+)\.(key|value)")


# ---- inputs -------------------------------------------------------------------------------------


def _text_inputs(session, config, batch: int, seq: int, rng: np.random.Generator, pad: bool,
                 adapter_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for a no-past graph: random ids, a mask with the last row right-padded when ``pad``;
    ``adapter_ids`` (one slot per row) for a bank graph."""
    feeds: dict[str, np.ndarray] = {}
    vocab = int(getattr(config, "vocab_size", 100))
    for inp in session.get_inputs():
        dtype = _NP_TYPES.get(inp.type, np.int64)
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, vocab, size=(batch, seq)).astype(dtype)
        elif inp.name == "attention_mask":
            mask = np.ones((batch, seq), dtype=dtype)
            if pad and batch > 1 and seq > 2:
                mask[-1, seq - seq // 3:] = 0
            feeds[inp.name] = mask
        elif inp.name == "token_type_ids":
            types = max(int(getattr(config, "type_vocab_size", 1) or 1), 1)
            feeds[inp.name] = rng.integers(0, types, size=(batch, seq)).astype(dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif inp.name == ADAPTER_IDS:
            if adapter_ids is None:
                raise UnsupportedExportError(
                    f"the graph has an {ADAPTER_IDS!r} input (an adapter-bank graph): pass slots= (the adapter "
                    "name of each bank slot) to validate it"
                )
            feeds[inp.name] = adapter_ids.astype(dtype)
        else:
            raise UnsupportedExportError(
                f"validation does not know how to feed graph input {inp.name!r} ({inp.type}, {inp.shape}); "
                "bca-deploy validates text models (input_ids, attention_mask, token_type_ids, position_ids, past)"
            )
    return feeds


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past key/value feeds (batch, heads, 0, head_dim) for every past input of ``session``."""
    feeds = {}
    for inp in session.get_inputs():
        if PAST_INPUT.fullmatch(inp.name):
            shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(inp.shape)]
            feeds[inp.name] = np.zeros(shape, dtype=_NP_TYPES[inp.type])
    return feeds


def _torch_kwargs(model: nn.Module, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    accepted = set(inspect.signature(model.forward).parameters)
    kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()
              if not PAST_INPUT.fullmatch(k) and k in accepted}
    return kwargs


# ---- outputs ------------------------------------------------------------------------------------


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value) of a transformers cache (``Cache`` object or legacy tuples), cloned."""
    return [(k.detach().clone(), v.detach().clone()) for k, v in cache_tensors(cache)]


def _reference_outputs(out: Any, names: Sequence[str]) -> dict[str, torch.Tensor | None]:
    cache = _cache_layers(output_cache(out)) if any(PRESENT_OUTPUT.fullmatch(n) for n in names) else []
    refs: dict[str, torch.Tensor | None] = {}
    for name in names:
        match = PRESENT_OUTPUT.fullmatch(name)
        if match:
            i = int(match.group(1))
            refs[name] = cache[i][0 if match.group(2) == "key" else 1] if i < len(cache) else None
        else:
            value = out.get(name) if hasattr(out, "get") else None
            refs[name] = value if isinstance(value, torch.Tensor) else None
    return refs


def _unpadded(name: str, got: np.ndarray, ref: torch.Tensor | None, mask: np.ndarray
              ) -> tuple[np.ndarray, torch.Tensor | None]:
    """``got`` and ``ref`` with the positions of padding tokens (``mask`` 0, over every position so far) zeroed in
    both: what a padded query position computes (it may attend to nothing) is no one's output. Present key/values
    are matched to the mask's last positions (a sliding-window layer holds only those); token outputs to the step's
    tokens."""
    if ref is None or got.ndim < 2 or mask.all():
        return got, ref
    if PRESENT_OUTPUT.fullmatch(name) and got.ndim == 4 and got.shape[2] <= mask.shape[1]:
        keep = mask[:, mask.shape[1] - got.shape[2]:][:, None, :, None]
    elif got.shape[0] == mask.shape[0] and got.shape[1] <= mask.shape[1]:
        keep = mask[:, mask.shape[1] - got.shape[1]:].reshape(got.shape[:2] + (1,) * (got.ndim - 2))
    else:
        return got, ref
    if tuple(ref.shape) != got.shape:
        return got, ref  # _compare reports the shape
    keep = keep.astype(bool)
    return np.where(keep, got, 0), ref.masked_fill(~torch.from_numpy(np.broadcast_to(keep, got.shape).copy()), 0)


def _compare(name: str, case: str, got: np.ndarray, ref: torch.Tensor | None, tol: Tolerance) -> ValidationRow:
    if ref is None:
        return ValidationRow(name, case, tuple(got.shape), float("inf"), float("inf"), str(tol), False,
                             "PyTorch has no such output")
    expected = ref.detach().to(torch.float64).cpu().numpy()
    actual = np.asarray(got, dtype=np.float64)
    if actual.shape != expected.shape:
        return ValidationRow(name, case, tuple(actual.shape), float("inf"), float("inf"), str(tol), False,
                             f"shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}")
    if actual.size == 0:
        return ValidationRow(name, case, tuple(actual.shape), 0.0, 0.0, str(tol), True, allowed=tol.atol)
    diff = np.abs(actual - expected)
    max_abs = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf")
    scale = float(np.max(np.abs(expected)))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    finite = bool(np.isfinite(actual).all())
    passed = tol.passes(actual, expected)
    return ValidationRow(name, case, tuple(actual.shape), max_abs, max_rel, str(tol), passed,
                         "" if finite else "NaN/Inf in ONNX output", allowed=tol.bound(expected))


# ---- the checks ---------------------------------------------------------------------------------


def _graph_dtype(session) -> str:
    types = {o.type for o in session.get_outputs()}
    return "fp16" if "tensor(float16)" in types else "fp32"


def validate_model(
    onnx_path: str | Path,
    reference: nn.Module,
    task: str,
    *,
    dtype: str | None = None,
    cases: Sequence[Case | Sequence[int]] | None = None,
    provider: str = "cpu",
    tolerance: Tolerance | None = None,
    seed: int = 0,
    slots: Sequence[str | None] | None = None,
    run_options: Any = None,
) -> ValidationReport:
    """Compare the graph at ``onnx_path`` with a live PyTorch ``reference`` (adapters applied, unmerged).

    Args:
        onnx_path: the ``model.onnx`` file.
        reference: the PyTorch model the graph should reproduce (fp32, in eval mode, on CPU).
        task: the optimum task it was exported for (``...-with-past`` decoders get two steps: a prefill whose last
            row is left-padded where the case has several rows, then new tokens with the past; padded positions
            are left out of the comparison).
        dtype: ``"fp32"`` or ``"fp16"`` (default: read from the graph's output types); picks the
            tolerance from :data:`TOLERANCES` unless ``tolerance`` is given.
        cases: ``(batch, seq)`` or ``(batch, seq, new_tokens)`` tuples; default :data:`DEFAULT_CASES`.
        provider: ``"cpu"`` or ``"cuda"`` (onnxruntime's CUDA execution provider).
        tolerance: overrides the table.
        seed: seed of the random token ids.
        slots: for an adapter-bank graph (:mod:`bca_deploy.exporters.bank`): the adapter name of each
            slot (``None`` for the base slot 0). Rows are spread over the slots (``adapter_ids``
            cycles through them, shifted per case) and the reference runs the same mixed batch with
            :func:`bca_deploy.inject.mixed_adapters`.
        run_options: ``onnxruntime.RunOptions`` for every run (e.g. with an active adapter file).

    Returns:
        The :class:`ValidationReport` (not raised on failure: call ``report.raise_for_failures()``).
    """
    ort = require("onnxruntime", "onnx", "validating an ONNX export")
    options = ort.SessionOptions()
    # Errors only: a bank graph's overridable initializers make onnxruntime warn once per input.
    options.log_severity_level = 3
    session = inference_session(onnx_path, options, provider)
    dtype = dtype or _graph_dtype(session)
    if dtype not in TOLERANCES:
        raise UnsupportedExportError(f"dtype must be one of {', '.join(TOLERANCES)}; got {dtype!r}")
    tol = tolerance or TOLERANCES[dtype]
    report = ValidationReport(str(onnx_path), task, dtype, provider, str(tol))
    output_names = [o.name for o in session.get_outputs()]
    with_past = any(PAST_INPUT.fullmatch(i.name) for i in session.get_inputs())
    rng = np.random.default_rng(seed)
    config = getattr(reference, "config", None)
    reference = reference.eval()
    for index, case in enumerate(check_cases(cases, config, with_past)):
        label = f"b={case.batch} s={case.seq}"
        ids, routing = None, contextlib.nullcontext()
        if slots is not None:
            ids = (np.arange(case.batch) + index) % len(slots)
            routing = mixed_adapters(reference, [slots[i] for i in ids])
            label += " ids=" + ",".join(map(str, ids))
        with torch.inference_mode(), routing:
            if not with_past:
                feeds = _text_inputs(session, config, case.batch, case.seq, rng, pad=True, adapter_ids=ids)
                kwargs = _torch_kwargs(reference, feeds)
                if "use_cache" in inspect.signature(reference.forward).parameters:
                    # graphs without past inputs may still output the present key/values
                    kwargs["use_cache"] = any(PRESENT_OUTPUT.fullmatch(n) for n in output_names)
                got = session.run(output_names, feeds, run_options)
                refs = _reference_outputs(reference(**kwargs), output_names)
                report.rows += [_compare(n, label, g, refs[n], tol) for n, g in zip(output_names, got, strict=True)]
                continue
            # step 1: prefill with an empty past; the last row left-padded, as batched generation pads
            non_past = [i for i in session.get_inputs() if not PAST_INPUT.fullmatch(i.name)]
            feeds = _text_inputs(_InputsView(non_past), config, case.batch, case.seq, rng, pad=False, adapter_ids=ids)
            mask = np.ones((case.batch, case.seq), dtype=np.int64)
            if case.batch > 1 and case.seq > 2 and "attention_mask" in feeds:
                mask[-1, : case.seq // 3] = 0
                feeds["attention_mask"] = mask.astype(feeds["attention_mask"].dtype)
            positions = np.maximum(mask.cumsum(-1) - 1, 0)  # as transformers' generate numbers left-padded rows
            if "position_ids" in feeds:
                feeds["position_ids"] = positions.astype(feeds["position_ids"].dtype)
            feeds.update(empty_past(session, case.batch))
            kwargs = _torch_kwargs(reference, feeds)
            out = reference(**kwargs, use_cache=True)
            refs = _reference_outputs(out, output_names)
            got = session.run(output_names, feeds, run_options)
            report.rows += [_compare(n, f"{label} step 1", *_unpadded(n, g, refs[n], mask), tol)
                            for n, g in zip(output_names, got, strict=True)]
            # step 2: new tokens with the past each side computed
            n_new = case.new_tokens
            feeds2 = _text_inputs(_InputsView(non_past), config, case.batch, n_new, rng, pad=False, adapter_ids=ids)
            mask2 = np.concatenate([mask, np.ones((case.batch, n_new), dtype=mask.dtype)], axis=1)
            if "attention_mask" in feeds2:
                feeds2["attention_mask"] = mask2.astype(feeds2["attention_mask"].dtype)
            if "position_ids" in feeds2:
                feeds2["position_ids"] = (positions[:, -1:] + np.arange(1, n_new + 1)).astype(feeds2["position_ids"].dtype)
            for name, value in zip(output_names, got, strict=True):
                match = PRESENT_OUTPUT.fullmatch(name)
                if match:
                    feeds2[f"past_key_values.{match.group(1)}.{match.group(2)}"] = value
            kwargs2 = _torch_kwargs(reference, feeds2)
            out2 = reference(**kwargs2, **{cache_argument(reference): output_cache(out)}, use_cache=True)
            refs2 = _reference_outputs(out2, output_names)
            got2 = session.run(output_names, feeds2, run_options)
            label2 = f"{label} step 2 (+{n_new})"
            report.rows += [_compare(n, label2, *_unpadded(n, g, refs2[n], mask2), tol)
                            for n, g in zip(output_names, got2, strict=True)]
    return report


class _InputsView:
    """A session stand-in exposing a subset of its inputs to :func:`_text_inputs`."""

    def __init__(self, inputs):
        self._inputs = inputs

    def get_inputs(self):
        return self._inputs


def _validate_bank(onnx_path: Path, model_dir: str | Path, adapter_dirs: Sequence[str | Path], metadata: ExportMetadata,
                   *, task: str | None, dtype: str | None, cases, provider: str, tolerance) -> ValidationReport:
    """An adapter-bank export re-checked as its export checked it: mixed batches over every slot, then each
    adapter file (:meth:`~bca_deploy.exporters.bank.BankPlan.validate`), against the same adapters in slot order."""
    from bca_deploy.models import adapter_names

    from .bank import BankPlan

    problems = bank_graph_problems(metadata, *graph_interface(check_graph_file(onnx_path)))
    if problems:  # refused before the model loads: onnxruntime's run would fail in the middle of the cases
        raise UnsupportedExportError(bank_graph_message(onnx_path, problems))
    slots = metadata.bank.adapters
    given = adapter_names([Path(d) for d in adapter_dirs]) if adapter_dirs else []
    if given != slots and adapter_dirs and adapter_names([Path(d) for d in adapter_dirs], safe=False) == slots:
        given = list(slots)  # exported before folder names were made safe (exp+1, not exp_1): the names it recorded
    if given != slots:
        raise UnsupportedExportError(
            f"{onnx_path.parent} is an adapter bank of slots {slots}; pass the adapters it was exported with, in that "
            f"order, with --adapter (got {given or 'none'})"
        )
    for name in slots:  # each adapter file as the export wrote it, before the model loads
        metadata.bank.checked_adapter_file(onnx_path.parent, name, ExportMetadataError)
    plan = BankPlan.load(model_dir, adapter_dirs, task or metadata.task, names=given)
    return plan.validate(onnx_path.parent, plan.reference_model(), dtype or metadata.dtype or "fp32", provider,
                         tolerance=tolerance, cases=cases)


def validate(
    onnx_dir: str | Path,
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path] = (),
    *,
    task: str | None = None,
    dtype: str | None = None,
    cases: Sequence[Case | Sequence[int]] | None = None,
    provider: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_failure: bool = True,
    verbose: bool = True,
) -> ValidationReport:
    """Validate an exported directory against the PyTorch model built from ``model_dir`` + ``adapter_dirs``.

    The reference is loaded in fp32 with every adapter applied and **unmerged**, whatever the export
    did; the graph runs under onnxruntime on each case (see :func:`validate_model`).

    Args:
        onnx_dir: a directory written by :func:`bca_deploy.exporters.export` (or optimum) holding
            ``model.onnx``.
        model_dir: the base model (a transformers checkpoint directory).
        adapter_dirs: the adapters the graph was exported with, in the same order.
        task: default: from ``bca_export.json`` in ``onnx_dir``, else the adapters' task, else
            inferred from ``model_dir``.
        dtype: ``"fp32"``/``"fp16"``; default: from the graph. Selects the tolerance in :data:`TOLERANCES`.
        cases: validation shapes; default :data:`DEFAULT_CASES` ((1, 5), (2, 11), (3, 16)).
        provider: ``"cpu"`` or ``"cuda"``.
        atol, rtol: override the tolerance table.
        raise_on_failure: raise :class:`ValidationError` if any comparison fails.
        verbose: print the table.

    Returns:
        The :class:`ValidationReport`.

    Raises:
        ValidationError: some output differs beyond tolerance or has the wrong shape (with
            ``raise_on_failure``); ``err.report`` holds every row.
    """
    from bca_deploy.models import load_model

    from .loading import resolve_export_task

    onnx_dir = Path(onnx_dir)
    onnx_path = onnx_dir / ONNX_FILE if onnx_dir.is_dir() else onnx_dir
    if not onnx_path.is_file():
        if os.path.lexists(onnx_path):  # a link to a device or to nothing, a pipe: the OSError saying what it is
            require_readable(onnx_path)
        raise FileNotFoundError(f"{onnx_path}: no ONNX model there (expected {ONNX_FILE} in an export directory)")
    metadata = read_export_metadata(onnx_path.parent)
    recorded_dtype = None if metadata is None else metadata.dtype
    tolerance = None
    if atol is not None or rtol is not None:
        tolerance = TOLERANCES.get(dtype or recorded_dtype or "fp32", TOLERANCES["fp32"]).overridden(atol, rtol)
    if metadata is not None and metadata.bank is not None:
        report = _validate_bank(onnx_path, model_dir, adapter_dirs, metadata, task=task, dtype=dtype, cases=cases,
                                provider=provider, tolerance=tolerance)
    else:
        model_task = resolve_export_task(model_dir, adapter_dirs, task or (metadata.task if metadata else None))
        reference = load_model(model_dir, adapter_dirs, model_task)
        report = validate_model(onnx_path, reference, model_task.export_task, dtype=dtype, cases=cases,
                                provider=provider, tolerance=tolerance)
    if not report.passed and metadata is not None:
        report.note = _other_inputs_note(metadata, model_dir, adapter_dirs)
    if verbose:
        print(report.table())
    if raise_on_failure:
        report.raise_for_failures()
    return report


def _other_inputs_note(metadata: ExportMetadata, model_dir: str | Path, adapter_dirs: Sequence[str | Path]) -> str:
    """When a validation fails: that the export was made from another model or other adapters than these,
    as its ``bca_export.json`` records them, else ""."""
    import os

    def same(recorded: str, given: str | Path) -> bool:
        return os.path.abspath(recorded) == os.path.abspath(given)

    recorded_model, recorded_adapters = metadata.base_model, metadata.adapters
    differs = []
    if recorded_model is not None and not same(recorded_model, model_dir):
        differs.append(f"--model {recorded_model[:300]}")
    if recorded_adapters is not None and (len(recorded_adapters) != len(adapter_dirs) or not all(
            same(r, g) for r, g in zip(recorded_adapters, adapter_dirs))):
        differs.append(" ".join(f"--adapter {a[:300]}" for a in recorded_adapters[:20]) or "no --adapter")
    if not differs:
        return ""
    return (f"{metadata.path} records that this graph was exported with {' and '.join(differs)}; validate "
            "against the same ones")
