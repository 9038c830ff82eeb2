"""Adapter-bank graphs: one unmerged graph that serves many adapters, chosen per row by ``adapter_ids``.

An unmerged export (:mod:`bca_deploy.exporters.graph`) mixes the spectra of a layer's input with one
frequency-domain constant ``W`` of shape (1, R, q, o). A bank graph replaces every such constant by
a **graph input** holding a stack of them, one slot per adapter::

    <module>.bca_freq_p<p>   (S, 1, R, q, o)  float32   slot s = adapter s; slot 0 = zeros (base only)
    adapter_ids              (batch,)          int64     the slot of each row

and each layer gathers its rows' slots before the mix, so row b is multiplied by slot
``adapter_ids[b]`` only::

    Wb = Transpose(Gather(bank, adapter_ids, axis=0))   (1, R, B, q, o)
    P  = X.view(1, R, B, T, q) @ Wb                     (1, R, B, T, o)   (was (1, R, N, q) @ W)

Everything before and after the mix is the single-adapter graph unchanged, so a bank costs a Gather and
a Transpose of ``B`` small kernels per layer over the single-adapter graph. The slot axis comes first so
that each slot is one contiguous block: gathering 64 rows' slots out of 1,025 reads 64 blocks (measured
under onnxruntime, 12 MiniLM inputs: +4 ms over a 17-slot bank), where a slot axis in the middle read
8,448 scattered 144-byte pieces (+52 ms, as much as 8% of a 64-row batch). The bank tensors are initializers listed
as graph inputs: run the graph with only ``adapter_ids`` and the adapters it was exported with are
used (slot i = the i-th adapter, in export order); feed the bank inputs to serve any other set of
adapters (what :class:`bca_deploy.serving.MultiAdapterSession` does, with only the slots a batch
needs); or activate one adapter file per run (``adapters/<name>.onnx_adapter``, an onnxruntime
``AdapterFormat`` file holding every bank tensor as two slots: zeros and the adapter) with
``RunOptions.add_active_adapter``, then ``adapter_ids`` is 1 for adapted rows and 0 for base rows.

A **text-classification** bank holds each slot's classifier head as well (see "classification heads"
below): every Linear layer of the head (BERT's ``classifier``, RoBERTa's ``classifier.dense`` and
``classifier.out_proj``, a decoder's ``score``; whatever Linear layers an adapter saves whole) becomes
bank inputs ``(S, in, out)`` / ``(S, out)`` gathered per row, the label layer with a dynamic label axis,
and every LayerNorm of the task head (ModernBERT's ``head.norm``) its scale and shift ``(S, F)``, ``(S, F)``:
slot 0 holds the checkpoint's head (or none), slot i adapter i's own head (or the checkpoint's when it
saves none). Each row's logits are exactly its own model's; labels a slot does not have are -inf.

An adapted module whose output the exported graph does not use has no bank input: ``torch.onnx.export`` prunes
it (a ``BertModel``'s pooler in a feature-extraction graph, which outputs ``last_hidden_state`` only; PEFT's
``all-linear`` adapts ``pooler.dense``). The export leaves it out of the layout after checking, in PyTorch, that
the graph's outputs do not depend on it (:func:`unreachable_modules`), says so, and records it
(:class:`UnusedModule`, ``bank.unused_modules``): serving registers adapters with a kernel for it, that kernel
ignored, while a module the bank does not hold at all is still refused.

The graph is rewritten with ``onnx`` after the single-adapter graph was exported with placeholder
constants (:func:`placeholder_kernels`, :func:`exportable_heads`); nothing here depends on how the
exporter names other tensors. :class:`BankPlan` is the export's side: load, plan, write, validate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bca_deploy.config import KERNEL_SUFFIX, MAX_LABEL_CHARS, PROBLEM_TYPES, AdapterConfig
from bca_deploy.errors import AdapterMismatchError, format_problems, onnxruntime_reason, require_readable
from bca_deploy.fit import HEAD_MODULES
from bca_deploy.inject import bca_layers
from bca_deploy.layers import BCALinear

from .errors import ExportError, ExportMetadataError, UnsupportedExportError
from .graph import _FREQ_PREFIX, _scalar_type, frequency_kernels, frequency_shape
from .validate import ADAPTER_IDS, ONNX_FILE

if TYPE_CHECKING:  # pragma: no cover
    from .validate import ValidationReport

__all__ = [
    "ADAPTER_IDS",
    "BASE_SLOT",
    "SLOT_AXIS",
    "ADAPTERS_DIR",
    "ADAPTER_FILE_SUFFIX",
    "BankTensor",
    "UnusedModule",
    "bank_layout",
    "placeholder_kernels",
    "model_adapter_tensors",
    "adapter_tensors",
    "adapter_slot",
    "stack_bank",
    "rewrite_as_bank",
    "LOGITS_TO_KEEP",
    "write_adapter_file",
    "layout_to_dict",
    "layout_from_dict",
    "HEAD_WEIGHT",
    "HEAD_BIAS",
    "LABELS_DIM",
    "LABEL_PAD",
    "HEAD_BASE_FILE",
    "HeadLayer",
    "HeadLabels",
    "HeadWeights",
    "HeadLayout",
    "BankRecord",
    "BaseDigest",
    "base_digest",
    "base_weight_modules",
    "model_base_matches",
    "model_base_digests",
    "bank_base_matches",
    "model_head_modules",
    "head_layout_problems",
    "model_head_weights",
    "adapter_head",
    "exportable_heads",
    "per_row_inputs",
    "unreachable_modules",
    "unused_reason",
    "stack_head",
    "BankPlan",
]

#: Slot 0 of every bank is zeros: the base model alone.
BASE_SLOT = 0
#: The slot axis of a bank tensor (S, 1, R, q, o) and of a head bank tensor (S, in, out), (S, out).
SLOT_AXIS = 0
#: Sub-directory of an export holding one onnxruntime AdapterFormat file per adapter.
ADAPTERS_DIR = "adapters"
ADAPTER_FILE_SUFFIX = ".onnx_adapter"
#: dim_param of the slot axis in the graph's input declarations.
SLOTS_DIM = "bca_slots"
#: Generation banks' int64 scalar input (default 0: every position): the logits of only the last k positions,
#: as transformers' ``logits_to_keep``. Serving feeds 1, so a prefill skips the output layer on its prompt
#: positions (for a 30k vocabulary that layer is ~40% of a prefill's time).
LOGITS_TO_KEEP = "logits_to_keep"
#: dim_param of the logits' position axis in a graph with :data:`LOGITS_TO_KEEP`.
LOGITS_POSITIONS_DIM = "logits_positions"
# Ops through which the output layer's input reaches the logits position by position (one activation input).
_POSITIONWISE = frozenset({"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity"})


@dataclasses.dataclass(frozen=True)
class BankTensor:
    """One bank input: the frequency-domain kernels of one (module, block size) pair, stacked over slots."""

    module: str
    block_size: int
    in_features: int
    out_features: int
    layer_type: str

    @property
    def name(self) -> str:
        """The graph input's name: ``<module>.bca_freq_p<p>`` (the single-adapter initializer's name)."""
        return f"{self.module}.{_FREQ_PREFIX}{self.block_size}"

    @property
    def slot_shape(self) -> tuple[int, int, int, int]:
        """(1, R, q, o): one slot, as :func:`~bca_deploy.exporters.graph.frequency_kernels` returns it."""
        return frequency_shape(self.block_size, self.in_features, self.out_features)

    def bank_shape(self, slots: int) -> tuple[int, int, int, int, int]:
        return (slots, *self.slot_shape)


def layout_to_dict(layout: Mapping[str, BankTensor]) -> list[dict]:
    return [dataclasses.asdict(t) for t in layout.values()]


def layout_from_dict(entries: Sequence[Mapping]) -> dict[str, BankTensor]:
    """The layout a bank's metadata records (:func:`layout_to_dict`), every field checked.

    Raises:
        ValueError: an entry that is not such a record (a field missing or of the wrong type or range).
    """
    from bca_deploy.config import MAX_FEATURES

    tensors = []
    for e in entries:
        if not isinstance(e, Mapping):
            raise ValueError(f"a bank tensor must be an object, got {type(e).__name__}")
        t = BankTensor(**{f.name: e.get(f.name) for f in dataclasses.fields(BankTensor)})
        sizes = (t.block_size, t.in_features, t.out_features)
        if not (isinstance(t.module, str) and t.module and t.layer_type in ("linear", "conv1d")
                and all(type(v) is int and 1 <= v <= MAX_FEATURES for v in sizes)
                and t.in_features % t.block_size == 0 and t.out_features % t.block_size == 0):
            raise ValueError(f"malformed bank tensor {str(dict(e))[:200]}")
        tensors.append(t)
    return {t.name: t for t in tensors}


@dataclasses.dataclass(frozen=True)
class UnusedModule:
    """An adapted module a bank graph leaves out: its output does not reach the graph's outputs.

    ``torch.onnx.export`` prunes what the outputs do not depend on (a ``BertModel``'s pooler in a
    feature-extraction graph, which outputs ``last_hidden_state`` only), so such a module has no bank input;
    any kernel on it changes nothing the graph computes. The bank records it (``bank.unused_modules`` of
    ``bca_export.json``) so an adapter carrying a kernel for it still registers (that kernel ignored), while a
    module the graph does adapt at a block size it does not hold, or one it does not hold at all, is still
    refused. The module's layer type and sizes are kept: a kernel of another shape is one trained on another model.
    """

    module: str
    layer_type: str
    in_features: int
    out_features: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> UnusedModule:
        """The record :meth:`to_dict` wrote, every field checked.

        Raises:
            ValueError: not such a record (a field missing or of the wrong type or range).
        """
        from bca_deploy.config import MAX_FEATURES

        if not isinstance(data, Mapping):
            raise ValueError(f"an unused module must be an object, got {type(data).__name__}")
        entry = cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})
        if not (isinstance(entry.module, str) and entry.module and entry.layer_type in ("linear", "conv1d")
                and all(type(v) is int and 1 <= v <= MAX_FEATURES for v in (entry.in_features, entry.out_features))
                and isinstance(entry.reason, str)):
            raise ValueError(f"malformed unused module {str(dict(data))[:200]}")
        return entry


# ---- base weights -------------------------------------------------------------------------------------------
#
# An adapter's base weights (bca_deploy.fit.split_base_key: ``lm_head.base_layer.weight``, PEFT's
# save_embedding_layers) are the base model's own values of parameters as the adapter was trained with them. Every
# row of a bank graph shares the base model, so a bank takes an adapter's base weights only when they equal its own
# (then they change nothing); any other value is refused (fit.Target.base_matches). At export the model is in memory
# and is compared with exactly (:func:`model_base_matches`); a served bank has only its graph, so the export records
# a digest of each base-model parameter an adapter can carry as a base weight (:func:`model_base_digests`, the
# ``bank.base_weights`` of bca_export.json) and registration compares digests (:func:`bank_base_matches`).

#: The dtypes a recorded base-weight digest may name (the graph's floating dtypes).
_DIGEST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}
_OTHER_BASE = "the adapter was trained on another base model, e.g. a resized vocabulary"


@dataclasses.dataclass(frozen=True)
class BaseDigest:
    """A base-model parameter as a bank graph holds it: its dtype, shape and the sha256 of its bytes in that dtype
    (C order, the machine's byte order: little-endian on every platform onnxruntime ships for). ``embedding``: a
    parameter of the input or output embeddings (which PEFT's ``save_embedding_layers`` saves whole: registration
    reads adapter files that large, :attr:`~bca_deploy.serving.MultiAdapterSession.max_adapter_bytes`)."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str
    embedding: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256, "embedding": self.embedding}

    @classmethod
    def from_dict(cls, data: Any) -> BaseDigest:
        """The record :meth:`to_dict` wrote, every field checked.

        Raises:
            ValueError: not such a record.
        """
        from bca_deploy.config import MAX_FEATURES

        if isinstance(data, Mapping):
            dtype, shape, digest = data.get("dtype"), data.get("shape"), data.get("sha256")
            embedding = data.get("embedding", False)
            if (dtype in _DIGEST_DTYPES and isinstance(shape, list) and len(shape) <= 8
                    and all(type(d) is int and 0 <= d <= MAX_FEATURES for d in shape) and isinstance(digest, str)
                    and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
                    and isinstance(embedding, bool)):
                return cls(dtype, tuple(shape), digest, embedding)
        got = str(dict(data) if isinstance(data, Mapping) else data)[:200]
        raise ValueError("expected {dtype: a floating dtype, shape: [ints], sha256: 64 hex digits, embedding: "
                         f"true/false}}, got {got}")

    def matches(self, value: torch.Tensor) -> bool:
        """Whether ``value`` cast to :attr:`dtype` is the recorded parameter, byte for byte."""
        return tuple(value.shape) == self.shape and base_digest(value, _DIGEST_DTYPES[self.dtype]) == self.sha256


def base_digest(value: torch.Tensor, dtype: torch.dtype) -> str:
    """The sha256 of ``value`` cast to ``dtype``, over its bytes in C order."""
    import hashlib

    flat = value.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters by the name an adapter's base weight gives them (a BCA layer's ``base_layer`` seen
    through, kernels left out; a tied Parameter under each of its names)."""
    return {name.replace(".base_layer.", "."): param for name, param in model.named_parameters(remove_duplicate=False)
            if ".bca_kernels." not in f".{name}"}


def model_base_matches(model: nn.Module) -> Callable[[str, torch.Tensor], bool | str]:
    """:attr:`bca_deploy.fit.Target.base_matches` for a bank exported from ``model`` (in memory): a base weight
    matches when, cast to the parameter's dtype, it equals the model's own value exactly (``torch.equal``)."""
    params = _plain_parameters(model)

    def matches(name: str, value: torch.Tensor) -> bool | str:
        own = params.get(name)
        if own is None:
            return f"the base model has no parameter {name}"
        if tuple(value.shape) != tuple(own.shape):
            return f"shape {tuple(value.shape)}, the base model's {name} is {tuple(own.shape)} ({_OTHER_BASE})"
        return torch.equal(own.detach(), value.detach().to(own.dtype))

    return matches


def embedding_modules(model: nn.Module) -> list[str]:
    """The paths of ``model``'s input and output embeddings (what PEFT's ``save_embedding_layers`` saves)."""
    embeddings = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            found = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            found = None
        if isinstance(found, nn.Module):
            embeddings.append(found)
    return [path for path, module in model.named_modules(remove_duplicate=False)
            if any(module is e for e in embeddings)]


def base_weight_modules(model: nn.Module, modules: Sequence[str]) -> list[str]:
    """The modules whose parameters an adapter can carry as base weights: ``modules`` (those a bank adapts) and the
    model's input and output embeddings (PEFT's ``save_embedding_layers``)."""
    return list(dict.fromkeys([*modules, *embedding_modules(model)]))


def model_base_digests(model: nn.Module, modules: Sequence[str]) -> dict[str, BaseDigest]:
    """``{parameter name: BaseDigest}`` of every floating parameter of ``modules`` (:func:`base_weight_modules`),
    in the dtype ``model`` holds it (the exported graph's); a tied Parameter under each of its names, hashed once."""
    embeddings = set(embedding_modules(model))
    wanted = embeddings | set(modules)
    digests: dict[str, BaseDigest] = {}
    seen: dict[int, str] = {}
    for name, param in _plain_parameters(model).items():
        module = name.rpartition(".")[0]
        dtype = str(param.dtype).removeprefix("torch.")
        if module not in wanted or dtype not in _DIGEST_DTYPES:
            continue
        if id(param) not in seen:
            seen[id(param)] = base_digest(param, param.dtype)
        digests[name] = BaseDigest(dtype, tuple(param.shape), seen[id(param)], module in embeddings)
    return digests


def bank_base_matches(digests: Mapping[str, BaseDigest] | None, layout: Mapping[str, BankTensor],
                      unused: Sequence[UnusedModule] = ()) -> Callable[[str, torch.Tensor], bool | str]:
    """:attr:`bca_deploy.fit.Target.base_matches` for a served bank graph, from its export's record.

    ``digests`` (:attr:`BankRecord.base_weights`): a base weight matches when, cast to the recorded dtype, its bytes
    hash to the recorded digest; a parameter the bank recorded no digest of is refused (it can not tell).
    None (a bank exported before the digests were recorded): as bca-deploy did then, the weight of a module the bank
    adapts (PEFT's copy of an adapted ``lm_head``'s frozen weight) is taken when its shape is that layer's, its values
    left to the model (the bank cannot tell them); any other base weight is refused, saying to re-export (a bias:
    PEFT's ``bias='c3a_only'`` trains them, which bca-deploy refused then).
    """
    if digests is not None:
        def matches(name: str, value: torch.Tensor) -> bool | str:
            record = digests.get(name)
            if record is None:
                return (f"the bank graph recorded no value of {name} at export (it records the embeddings' and its "
                        "adapted modules' parameters)")
            if tuple(value.shape) != record.shape:
                return f"shape {tuple(value.shape)}, the bank graph's {name} is {record.shape} ({_OTHER_BASE})"
            return record.matches(value)

        return matches
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in [*layout.values(), *unused]:
        weight = ((entry.in_features, entry.out_features) if entry.layer_type == "conv1d"
                  else (entry.out_features, entry.in_features))
        shapes[f"{entry.module}.weight"] = weight

    def unrecorded(name: str, value: torch.Tensor) -> bool | str:
        shape = shapes.get(name)
        if shape is None:
            return (f"this bank was exported before bca-deploy recorded the base model's values (bank.base_weights "
                    f"in {_metadata_file()}), so it cannot tell {name} equal to its own; re-export the bank "
                    "(bca-deploy export --bank) to take adapters whose base weights equal its own")
        if tuple(value.shape) != shape:
            return f"shape {tuple(value.shape)}, the bank graph's {name} is {shape} ({_OTHER_BASE})"
        return True

    return unrecorded


def _metadata_file() -> str:
    from .metadata import METADATA_FILE

    return METADATA_FILE


def bank_layout(model: nn.Module, adapter_names: Sequence[str]) -> dict[str, BankTensor]:
    """The bank inputs a graph needs to serve ``adapter_names``: one per (adapted module, block size) in use.

    A module that one adapter adapts with p=64 and another with p=128 gets two bank inputs (each
    adapter's slot in the other is zeros); a module an adapter does not touch is zeros in its slot.
    """
    layout: dict[str, BankTensor] = {}
    for path, layer in bca_layers(model):
        for p in sorted({layer.block_sizes[n] for n in adapter_names if n in layer.bca_kernels}):
            entry = BankTensor(path, p, layer.in_features, layer.out_features, layer.layer_type)
            layout[entry.name] = entry
    if not layout:
        raise ExportError(f"none of the adapters {list(adapter_names)} adapts any layer of this model; nothing to bank")
    return layout


def placeholder_kernels(layout: Mapping[str, BankTensor]):
    """``kernels=`` for :func:`~bca_deploy.exporters.graph.exportable_adapters`: one distinct random kernel per bank input.

    The values are replaced by the bank inputs afterwards; they only need to be distinct, so the
    exporter keeps one initializer per bank input (it may merge equal constants).
    """
    by_module: dict[str, list[BankTensor]] = {}
    for entry in layout.values():
        by_module.setdefault(entry.module, []).append(entry)
    index = {name: i for i, name in enumerate(sorted(layout))}

    def kernels(path: str, layer: BCALinear) -> dict[int, torch.Tensor]:
        out = {}
        for entry in by_module.get(path, []):
            p = entry.block_size
            generator = torch.Generator().manual_seed(1_000_003 + index[entry.name])
            out[p] = torch.randn(entry.out_features // p, entry.in_features // p, p, generator=generator)
        return out

    return kernels


_ONE_THREAD = threading.Lock()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run PyTorch single-threaded inside the block (process-wide, serialized by a lock).

    A kernel's transform is a few dozen 64-point FFTs: with 2 intra-op threads each call waits for a second
    thread to wake up, which on the shared 2-core machine took 12 ms per ``rfft`` against 0.1 ms on one
    thread (measured while other jobs ran): registering a MiniLM q/v adapter took ~200 ms instead of ~5.
    """
    with _ONE_THREAD:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _frequency(kernel: torch.Tensor, scaling: float) -> np.ndarray:
    # scaling · kernel in fp32 exactly as BCALinear.scaled_kernel computes it, then the float64 transform.
    k = kernel.detach().float()
    if scaling != 1.0:
        k = k * scaling
    return frequency_kernels(k).numpy()


def model_adapter_tensors(model: nn.Module, adapter_name: str, layout: Mapping[str, BankTensor]) -> dict[str, np.ndarray]:
    """The slot of adapter ``adapter_name`` (held by ``model``) in every bank input it touches: ``{name: (1, R, q, o)}``."""
    tensors: dict[str, np.ndarray] = {}
    for path, layer in bca_layers(model):
        if adapter_name not in layer.bca_kernels:
            continue
        name = BankTensor(path, layer.block_sizes[adapter_name], layer.in_features, layer.out_features,
                          layer.layer_type).name
        if name not in layout:
            raise ExportError(f"{path}: adapter {adapter_name!r} (p={layer.block_sizes[adapter_name]}) has no bank input")
        tensors[name] = _frequency(layer.bca_kernels[adapter_name], layer.scalings[adapter_name])
    return tensors


def head_params(head: HeadLayout):
    """The head layers' parameters as the one fit check sees them (:class:`bca_deploy.fit.ParamInfo`, PyTorch
    shapes); the label layer's are resizable (any number of labels), checked by :func:`adapter_head`."""
    from bca_deploy.fit import ParamInfo

    params, resizable = {}, set()
    for layer in head.layers:
        params.update({name: ParamInfo(shape, "float32") for name, shape in layer.torch_params().items()})
        if layer.labels:
            resizable |= {f"{layer.module}.weight", f"{layer.module}.bias"}
    return params, frozenset(resizable)


def adapter_slot(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, BankTensor],
    base_model_prefix: str = "",
    source: str = "adapter",
    head: HeadLayout | None = None,
    base_head: HeadWeights | None = None,
    model_type: str | None = None,
    unused: Sequence[UnusedModule] = (),
    base_matches: Callable[[str, torch.Tensor], bool | str] | None = None,
    task: str | None = None,
    name_or_path: str | None = None,
    warn: Callable[[str], object] | None = None,
) -> tuple[dict[str, np.ndarray], HeadWeights | None]:
    """An adapter read from disk (:func:`bca_deploy.read_adapter`) → its slot: kernels and classifier head.

    The adapter is checked against the graph by the one fit check (:func:`bca_deploy.fit.check_adapter`
    on :func:`bca_deploy.fit.bank_target`, the head layers as the parameters whole modules may replace):
    module paths that differ from the graph's only by ``base_model_prefix`` are aligned, and every
    problem (with those of :func:`adapter_head`) is collected and raised at once. A kernel on one of the
    ``unused`` modules (:class:`UnusedModule`: adapted when the bank was exported, left out because the graph
    does not use its output) is checked for that module's layer type and sizes, at any block size, and
    ignored: it changes nothing the graph computes. Any other module the layout does not hold is refused. A base
    weight (:func:`bca_deploy.fit.split_base_key`) is taken only when ``base_matches`` says it equals the graph's
    own value (it then changes nothing: every row shares the base model), else refused, naming it.

    Args:
        head: the graph's per-slot classifier head (None: the graph has none, and an adapter saving
            whole modules is refused).
        base_head: the base checkpoint's head layers (fill the layers an adapter does not save).
        model_type: the graph's ``model_type`` (an adapter trained on another is refused).
        unused: the bank's :attr:`BankRecord.unused` modules.
        base_matches: whether the graph's own value of a base-model parameter equals an adapter's base weight
            (:func:`bank_base_matches` of the bank's record); None: every base weight is refused.
        task: the graph's export task: an adapter recording another task is refused, as ``export`` refuses it
            (a causal-lm adapter with a classifier in a classification bank served its rows as LABEL_0/1).
        name_or_path: the model directory the graph was exported from (:attr:`ExportMetadata.base_model`): an
            adapter that fits but records another base checkpoint is taken with the warning load, merge and export
            give (:func:`bca_deploy.fit.note_foreign_base`), to ``warn`` when given, else as a
            :class:`~bca_deploy.fit.ForeignBaseWarning`.

    Returns:
        ``({bank input: (1, R, q, o)}, head)``: the frequency-domain kernels of every bank input the
        adapter touches, and its own head (see :func:`adapter_head`; None: its rows use the base head).

    Raises:
        AdapterMismatchError: a module the graph does not adapt (and did not leave out as unused), a block
            size or shape the bank does not hold, a missing, mis-typed or non-finite tensor, another
            ``model_type``, ``modules_to_save`` that are not a head the bank holds, or a base weight that is not
            the graph's own value (each named).
    """
    from bca_deploy.fit import (
        ModuleInfo,
        adapter_problems,
        align_to_target,
        bank_target,
        note_foreign_base,
        target_problems,
    )

    params, resizable = (None, frozenset()) if head is None else head_params(head)
    target = bank_target(layout, model_type, base_model_prefix, params=params, base_matches=base_matches,
                         name_or_path=name_or_path)
    ignored = {u.module for u in unused if u.module not in target.modules}
    modules = dict(target.modules)
    for u in unused:
        if u.module in ignored:  # any block size: the graph does not compute this module
            shape = (u.in_features, u.out_features) if u.layer_type == "conv1d" else (u.out_features, u.in_features)
            modules[u.module] = ModuleInfo(u.layer_type, u.in_features, u.out_features, shape)
    target = dataclasses.replace(target, modules=modules, resizable=resizable)
    config, state = align_to_target(config, state, target)
    problems = adapter_problems(config, state) + target_problems(config, state, target)
    if task is not None and config.task is not None:
        from bca_deploy.models import EXPORT_TASK_TYPES

        wanted = EXPORT_TASK_TYPES.get(task)
        if wanted is not None and config.task.type != wanted:
            problems.insert(0, f"it was trained for {config.task.type}; this graph serves {task} ({wanted} adapters)")
    tensors: dict[str, np.ndarray] = {}
    with _one_torch_thread():
        own_head, head_problems = adapter_head(config, state, head, base_head)
        if not problems:
            for path, spec in sorted(config.modules.items()):
                if path in ignored:
                    continue
                entry = BankTensor(path, spec.block_size, spec.in_features, spec.out_features, spec.layer_type)
                tensors[entry.name] = _frequency(state[path + KERNEL_SUFFIX], spec.scaling)
    problems += head_problems
    if problems:
        raise AdapterMismatchError(format_problems(f"{source} does not fit {target.description}:", problems))
    note_foreign_base(config, target, source, warn, stacklevel=2)
    return tensors, own_head


def adapter_tensors(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, BankTensor],
    base_model_prefix: str = "",
    source: str = "adapter",
    model_type: str | None = None,
) -> dict[str, np.ndarray]:
    """The kernels of :func:`adapter_slot` for a graph without a per-slot head (``modules_to_save`` refused)."""
    return adapter_slot(config, state, layout, base_model_prefix, source, model_type=model_type)[0]


def stack_bank(slots: Sequence[Mapping[str, np.ndarray] | None], layout: Mapping[str, BankTensor]) -> dict[str, np.ndarray]:
    """Bank inputs for ``slots`` (``None`` = zeros): ``{name: (S, 1, R, q, o) float32}``, S = len(slots)."""
    banks: dict[str, np.ndarray] = {}
    for name, entry in layout.items():
        bank = np.zeros(entry.bank_shape(len(slots)), dtype=np.float32)
        for s, tensors in enumerate(slots):
            if tensors is not None and name in tensors:
                bank[s] = tensors[name]
        banks[name] = bank
    return banks


# ---- classification heads --------------------------------------------------------------------------
#
# A text-classification bank holds each slot's classifier head as well: every Linear layer of the head
# becomes two more bank inputs, gathered per row like the kernels,
#
#     <module>.bca_head_weight   (S, in, out)   float32   the Linear's weight, transposed
#     <module>.bca_head_bias     (S, out)       float32
#
# and the layer computes ``y[b] = x[b] @ W[ids[b]] + bias[ids[b]]`` (x batch-first, any middle axes).
# The **label layer** (the head's last Linear, whose outputs are the logits) has a dynamic output axis
# ``bca_labels``: each slot's weights fill its own ``num_labels`` columns and the rest of the bank's
# width is padding (weights 0, bias -inf), so a padding label never wins an argmax and gets probability
# 0 under softmax or sigmoid. A slot without a head (the base model of a bare-encoder checkpoint) has a
# NaN bias: its logits are NaN, and ``MultiAdapterSession.classify`` refuses such rows.

#: Buffer / bank input names of a head Linear: ``<module>.bca_head_weight`` and ``<module>.bca_head_bias``.
HEAD_WEIGHT = "bca_head_weight"
HEAD_BIAS = "bca_head_bias"
#: dim_param of the label axis of the label layer's bank inputs and of the logits.
LABELS_DIM = "bca_labels"
#: File of an export holding the base checkpoint's head layers (numpy ``.npz``; absent layers are absent).
HEAD_BASE_FILE = "bca_head_base.npz"
#: What fills a label column a slot does not have: its weight column is 0, its bias this.
LABEL_PAD = -np.inf


#: :attr:`HeadLayer.kind` of a Linear layer and of a LayerNorm's affine (the kinds of layer a bank head holds).
HEAD_LINEAR = "linear"
HEAD_NORM = "norm"


@dataclasses.dataclass(frozen=True)
class HeadLayer:
    """One layer of the classifier head, held per slot: a Linear, or the affine of a LayerNorm.

    A **norm** layer (``kind="norm"``: an ``nn.LayerNorm`` saved whole, ModernBERT's ``head.norm``) keeps the
    normalisation in the graph, shared by every row (it has no parameters), and holds its scale and shift per
    slot: ``y[b] = layer_norm(x[b]) * weight[ids[b]] + bias[ids[b]]``, bank inputs ``(S, F)`` and ``(S, F)``.

    Attributes:
        module: the layer's path in the graph's model (``classifier``, ``classifier.out_proj``, ``head.norm``...).
        in_features: its input width.
        out_features: its output width; for the label layer, the width of the exported default bank
            (the axis is dynamic: each slot has its own number of labels). A norm's is its input width.
        labels: whether this is the label layer (the head's last Linear; its outputs are the logits).
        bias: whether the layer has a bias (the label layer always gets a bias input, for the padding; a layer
            without one has a bias input of zeros).
        kind: :data:`HEAD_LINEAR` or :data:`HEAD_NORM`.
    """

    module: str
    in_features: int
    out_features: int
    labels: bool
    bias: bool
    kind: str = HEAD_LINEAR

    @property
    def norm(self) -> bool:
        return self.kind == HEAD_NORM

    @property
    def weight_name(self) -> str:
        return f"{self.module}.{HEAD_WEIGHT}"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.{HEAD_BIAS}"

    def slot_shapes(self, width: int | None = None) -> dict[str, tuple[int, ...]]:
        """``{weight_name: (in, out), bias_name: (out,)}`` with ``out = width`` for the label layer; a norm's
        ``{weight_name: (features,), bias_name: (features,)}``."""
        if self.norm:
            return {self.weight_name: (self.out_features,), self.bias_name: (self.out_features,)}
        out = (width or self.out_features) if self.labels else self.out_features
        return {self.weight_name: (self.in_features, out), self.bias_name: (out,)}

    def torch_params(self) -> dict[str, tuple[int, ...]]:
        """The module's parameters in PyTorch's shapes (``<module>.weight``, and ``.bias`` if it has one or is
        the label layer): what an adapter's ``modules_to_save`` tensors for it are."""
        weight = (self.out_features,) if self.norm else (self.out_features, self.in_features)
        params = {f"{self.module}.weight": weight}
        if self.bias or self.labels:
            params[f"{self.module}.bias"] = (self.out_features,)
        return params

    def slot_tensors(self, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, np.ndarray]:
        """The slot tensors of this layer from its PyTorch parameters (a Linear's weight transposed; no bias: zeros)."""
        weight = weight.detach().to(torch.float32)
        out = weight.shape[0]
        return {self.weight_name: (weight if self.norm else weight.T).contiguous().numpy().copy(),
                self.bias_name: (np.zeros(out, dtype=np.float32) if bias is None
                                 else bias.detach().to(torch.float32).numpy().copy())}


@dataclasses.dataclass(frozen=True)
class HeadLabels:
    """What ``classify`` needs of a slot's head: its label names (by index), how to score them, and whether it was
    trained on text pairs (:attr:`~bca_deploy.config.HeadSpec.text_pair`; None: not recorded)."""

    id2label: tuple[str, ...]
    problem_type: str | None = None
    text_pair: bool | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def to_dict(self) -> dict[str, Any]:
        out = {"num_labels": self.num_labels, "id2label": {str(i): v for i, v in enumerate(self.id2label)},
               "problem_type": self.problem_type}
        if self.text_pair is not None:  # (absent when not recorded: files stay as earlier versions wrote them)
            out["text_pair"] = self.text_pair
        return out

    @classmethod
    def from_dict(cls, data: Any) -> HeadLabels:
        """The labels :meth:`to_dict` wrote, every field checked.

        Raises:
            ValueError: naming the field: ``num_labels`` not a positive integer, ``id2label`` not an object
                whose keys are exactly ``"0"``..``str(num_labels - 1)`` and whose values are strings, or a
                ``problem_type`` transformers does not define, a ``text_pair`` that is not a boolean or null.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"labels must be an object, got {type(data).__name__}")
        count, names, problem_type = data.get("num_labels"), data.get("id2label"), data.get("problem_type")
        if type(count) is not int or count < 1:
            raise ValueError(f"num_labels must be a positive integer, got {str(count)[:40]!r}")
        # the length first: a huge num_labels is refused without building its key set
        if not (isinstance(names, Mapping) and len(names) == count and set(names) == {str(i) for i in range(count)}
                and all(isinstance(v, str) for v in names.values())):
            raise ValueError(f"id2label must map each of \"0\"..\"{count - 1}\" to a label name")
        if problem_type not in (None, *PROBLEM_TYPES):
            raise ValueError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)} or null, "
                             f"got {str(problem_type)[:40]!r}")
        labels = tuple(names[str(i)] for i in range(count))
        if any(len(name) > MAX_LABEL_CHARS for name in labels):
            raise ValueError(f"id2label names must be at most {MAX_LABEL_CHARS} characters")
        if len(set(labels)) != count:  # an answer's scores are keyed by name: two would collapse into one
            raise ValueError("id2label names must be distinct")
        text_pair = data.get("text_pair")
        if text_pair is not None and not isinstance(text_pair, bool):
            raise ValueError(f"text_pair must be true, false or null, got {str(text_pair)[:40]!r}")
        return cls(labels, problem_type, text_pair)

    @classmethod
    def of(cls, num_labels: int, id2label: Mapping[Any, str] | None, problem_type: str | None,
           text_pair: bool | None = None) -> HeadLabels:
        """Labels from a transformers config / HeadSpec; indexes without a name become ``LABEL_<i>``."""
        names = {int(k): str(v) for k, v in (id2label or {}).items()}
        return cls(tuple(names.get(i, f"LABEL_{i}") for i in range(num_labels)), problem_type, text_pair)


@dataclasses.dataclass(frozen=True)
class HeadWeights:
    """One slot's head: the tensors of (some of) the head layers and, if complete, its labels.

    ``tensors`` maps ``weight_name`` to (in, out) and ``bias_name`` to (out,), float32, the label layer
    with its own ``num_labels`` columns. ``labels`` is None when the head is incomplete (the base model
    of a bare encoder has no label layer): rows of such a slot cannot be classified.
    """

    tensors: Mapping[str, np.ndarray]
    labels: HeadLabels | None


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """The classifier head a bank graph holds per slot: its modules and their Linear layers, in module order."""

    modules: tuple[str, ...]
    layers: tuple[HeadLayer, ...]

    @property
    def label_layer(self) -> HeadLayer:
        return next(layer for layer in self.layers if layer.labels)

    def names(self) -> list[str]:
        return [n for layer in self.layers for n in (layer.weight_name, layer.bias_name)]

    def slot_shapes(self, width: int) -> dict[str, tuple[int, ...]]:
        return {k: v for layer in self.layers for k, v in layer.slot_shapes(width).items()}

    def slot_values(self, head: HeadWeights | None, width: int) -> dict[str, np.ndarray]:
        """The bank slot of ``head`` at label width ``width``: every head input, padded; layers ``head``
        lacks (or ``head=None``) are zeros with a NaN bias, so rows of an incomplete head give NaN logits."""
        tensors = {} if head is None else head.tensors
        values: dict[str, np.ndarray] = {}
        for layer in self.layers:
            weight_shape, bias_shape = layer.slot_shapes(width).values()
            weight = np.zeros(weight_shape, dtype=np.float32)
            bias = np.full(bias_shape, np.nan if layer.weight_name not in tensors else (
                LABEL_PAD if layer.labels else 0.0), dtype=np.float32)
            if layer.weight_name in tensors:
                w, b = tensors[layer.weight_name], tensors[layer.bias_name]
                weight[..., :w.shape[-1]] = w
                bias[:b.shape[0]] = b
            values[layer.weight_name], values[layer.bias_name] = weight, bias
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"modules": list(self.modules), "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Any) -> HeadLayout:
        """The layout :meth:`to_dict` wrote, every field checked.

        Raises:
            ValueError: naming the field: ``modules`` not a list of module paths, a layer that is not a
                :class:`HeadLayer` record (paths, sizes in 1..MAX_FEATURES, booleans), or not exactly one
                label layer.
        """
        from bca_deploy.config import MAX_FEATURES

        if not isinstance(data, Mapping):
            raise ValueError(f"head must be an object, got {type(data).__name__}")
        modules, entries = data.get("modules"), data.get("layers")
        if not (isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)):
            raise ValueError("head.modules must be a non-empty list of module paths")
        if not (isinstance(entries, list) and entries):
            raise ValueError("head.layers must be a non-empty list")
        layers = []
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ValueError(f"a head layer must be an object, got {type(entry).__name__}")
            # "kind" absent: an export from before norm layers, every layer a Linear
            layer = HeadLayer(**{f.name: entry.get(f.name, f.default) for f in dataclasses.fields(HeadLayer)})
            if not (isinstance(layer.module, str) and layer.module
                    and all(type(v) is int and 1 <= v <= MAX_FEATURES for v in (layer.in_features, layer.out_features))
                    and type(layer.labels) is bool and type(layer.bias) is bool
                    and layer.kind in (HEAD_LINEAR, HEAD_NORM)
                    and (not layer.norm or (layer.in_features == layer.out_features and not layer.labels))):
                raise ValueError(f"malformed head layer {str(dict(entry))[:200]}")
            layers.append(layer)
        if sum(layer.labels for layer in layers) != 1:
            raise ValueError("head.layers must hold exactly one label layer (labels: true)")
        return cls(tuple(modules), tuple(layers))


def _export_file(value: Any, field: str, problems: list[str]) -> str | None:
    """A file of the export its metadata names: a relative path that stays inside the export directory."""
    if isinstance(value, str) and value and value.isprintable() and not Path(value).is_absolute() \
            and ".." not in Path(value).parts:
        return value
    problems.append(f"{field} must be a path inside the export, got {str(value)[:100]!r}")
    return None


def _recorded_base(value: Any) -> str:
    """A ``bank.adapter_bases`` entry: the base checkpoint an adapter records, a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be the name or path of the base checkpoint the adapter records, got {value!r}"[:200])
    return value


def _record_map(data: Mapping[str, Any], field: str, parse: Callable[[Any], Any], problems: list[str]) -> dict | None:
    """``bank.<field>``, an object of name -> entry, each read by ``parse`` (a ValueError: malformed); None where absent
    (banks exported before it was recorded). At most five malformed entries are named: a file of 100,000 bad entries
    is not a 30 MB message."""
    raw = data.get(field)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"bank.{field} must be an object, got {type(raw).__name__}")
        return None
    out, malformed = {}, 0
    for name, entry in raw.items():
        try:
            out[name] = parse(entry)
        except ValueError as exc:
            malformed += 1
            if malformed <= 5:
                problems.append(f"bank.{field}[{str(name)[:80]!r}]: {exc}")
    if malformed > 5:
        problems.append(f"bank.{field}: {malformed - 5:,} more malformed entries")
    return out


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """A file of the export as it was written: its size in bytes and the sha256 of its bytes."""

    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileDigest:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            size = os.fstat(f.fileno()).st_size
        return cls(size, digest.hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any) -> FileDigest:
        if not isinstance(data, Mapping):
            raise ValueError(f"must be an object with 'bytes' and 'sha256', got {type(data).__name__}")
        size, sha = data.get("bytes"), data.get("sha256")
        if type(size) is not int or size < 0:
            raise ValueError(f"bytes must be a non-negative integer, got {str(size)[:40]}")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {str(sha)[:80]!r}")
        return cls(size, sha)

    def problem(self, path: Path) -> str | None:
        """Why ``path`` is not this file (its size first: a file of another size is not read), or None."""
        size = path.stat().st_size
        if size != self.size:
            return f"{size:,} bytes, the export wrote {self.size:,}"
        if FileDigest.of(path).sha256 != self.sha256:
            return "its sha256 differs from the one the export recorded"
        return None


@dataclasses.dataclass(frozen=True)
class BankRecord:
    """What an export's ``bca_export.json`` records about its adapter-bank graph (written by
    :meth:`BankPlan.metadata`): the one reader of it, for serving, ``validate`` and the Ray deployment.

    Attributes:
        ids_input: the graph's per-row slot input (:data:`ADAPTER_IDS`).
        slots: the exported adapters by slot; slot 0 (:data:`BASE_SLOT`) is None, the base model.
        adapter_files: adapter name -> its AdapterFormat file, relative to the export directory.
        layout: bank input name -> :class:`BankTensor`.
        base_model_prefix: the transformers model's ``base_model_prefix`` ("" when it has none).
        model_type: the model's ``config.model_type``.
        head: the per-slot classifier head, or None for a graph without one.
        base_head_file: the base checkpoint's head layers (:data:`HEAD_BASE_FILE`), relative; None: none.
        base_labels: the base checkpoint's labels, or None.
        adapter_labels: adapter name -> the labels of its own head (None: it uses the base head).
        unused: adapted modules the graph does not use, left out of the layout (:class:`UnusedModule`); empty
            for a bank exported before they were recorded (``bank.unused_modules``).
        base_weights: parameter name -> :class:`BaseDigest` of each base-model parameter an adapter can carry as a
            base weight (``bank.base_weights``: the embeddings' and the adapted modules'), as the graph holds it;
            None for a bank exported before they were recorded (:func:`bank_base_matches` then does as bca-deploy
            did: takes base weights of adapted modules at their layer's shape, refuses others).
        adapter_digests: adapter name -> the :class:`FileDigest` of its adapter file as the export wrote it
            (``bank.adapter_digests``), checked before the file is used (:meth:`adapter_file_problem`); None for a
            bank exported before they were recorded.
        adapter_bases: adapter name -> the base checkpoint its config records (``base_model_name_or_path``,
            ``bank.adapter_bases``), for those that record one: its adapter file carries no config, and registering
            it says what :func:`bca_deploy.fit.base_name_note` says of another base. Empty for a bank exported before
            they were recorded.
    """

    ids_input: str
    slots: tuple[str | None, ...]
    adapter_files: Mapping[str, str]
    layout: Mapping[str, BankTensor]
    base_model_prefix: str = ""
    model_type: str | None = None
    head: HeadLayout | None = None
    base_head_file: str | None = None
    base_labels: HeadLabels | None = None
    adapter_labels: Mapping[str, HeadLabels | None] = dataclasses.field(default_factory=dict)
    unused: tuple[UnusedModule, ...] = ()
    base_weights: Mapping[str, BaseDigest] | None = None
    adapter_digests: Mapping[str, FileDigest] | None = None
    adapter_bases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def adapters(self) -> list[str]:
        """The exported adapters' names, in slot order."""
        return [s for s in self.slots if s is not None]

    @classmethod
    def from_dict(cls, data: Any) -> BankRecord:
        """Read the ``bank`` field of ``bca_export.json``, checking every field before any is used.

        Raises:
            ValueError: every problem found, each naming its field (``bank.slots``, ``bank.tensors``...),
                ending with how to fix it (re-export).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"bank must be an object, got {type(data).__name__}; re-export the bank")
        problems: list[str] = []
        if type(data.get("slot_axis")) is not int or data["slot_axis"] != SLOT_AXIS:
            problems.append(f"bank.slot_axis is {str(data.get('slot_axis'))[:20]}, this bca-deploy reads banks with "
                            f"slots on axis {SLOT_AXIS} (exported by an older bca-deploy?)")
        ids_input = data.get("ids_input")
        if not (isinstance(ids_input, str) and ids_input):
            problems.append("bank.ids_input must be the name of the graph's slot input")
        slots = data.get("slots")
        names: list[str] = []
        if not (isinstance(slots, list) and slots and slots[BASE_SLOT] is None
                and all(isinstance(s, str) and s for s in slots[1:])):
            problems.append(f"bank.slots must be a list of adapter names after null (the base model's slot), "
                            f"got {str(slots)[:100]}")
        else:
            names = slots[1:]
            if len(set(names)) != len(names):
                problems.append(f"bank.slots names an adapter twice: {str(names)[:200]}")
        files = data.get("adapter_files")
        adapter_files: dict[str, str] = {}
        if not isinstance(files, Mapping):
            problems.append(f"bank.adapter_files must be an object, got {type(files).__name__}")
        else:
            for name, relative in files.items():
                checked = _export_file(relative, f"bank.adapter_files[{name[:40]!r}]", problems)
                if checked is not None:
                    adapter_files[name] = checked
            if names and set(files) != set(names):
                problems.append(f"bank.adapter_files must have one file per slot's adapter ({str(names)[:200]}), "
                                f"has {str(sorted(files))[:200]}")
        tensors = data.get("tensors")
        layout: dict[str, BankTensor] = {}
        if not (isinstance(tensors, list) and tensors):
            problems.append("bank.tensors must be a non-empty list")
        else:
            try:
                layout = layout_from_dict(tensors)
            except ValueError as exc:
                problems.append(f"bank.tensors: {exc}")
        prefix, model_type = data.get("base_model_prefix"), data.get("model_type")
        for field, value in (("base_model_prefix", prefix), ("model_type", model_type)):
            if not isinstance(value, (str, type(None))):
                problems.append(f"bank.{field} must be a string or null, got {type(value).__name__}")
        if model_type == "":  # read as "no type": any adapter's fit check passed it
            problems.append("bank.model_type must be the model type the graph was exported from (config.json's "
                            "model_type, such as 'bert') or null, got ''")
        head = base_labels = base_file = None
        adapter_labels: dict[str, HeadLabels | None] = {}
        raw_head = data.get("head")
        if raw_head is not None:
            try:
                head = HeadLayout.from_dict(raw_head)
            except ValueError as exc:
                problems.append(f"bank.{exc}" if str(exc).startswith("head") else f"bank.head: {exc}")
            if isinstance(raw_head, Mapping):
                if raw_head.get("base_file") is not None:
                    base_file = _export_file(raw_head["base_file"], "bank.head.base_file", problems)
                try:
                    base_labels = None if raw_head.get("base") is None else HeadLabels.from_dict(raw_head["base"])
                except ValueError as exc:
                    problems.append(f"bank.head.base: {exc}")
                own = raw_head.get("adapters") or {}
                if not isinstance(own, Mapping):
                    problems.append(f"bank.head.adapters must be an object, got {type(own).__name__}")
                else:
                    for name, labels in own.items():
                        try:
                            adapter_labels[name] = None if labels is None else HeadLabels.from_dict(labels)
                        except ValueError as exc:
                            problems.append(f"bank.head.adapters[{name[:40]!r}]: {exc}")
        unused: list[UnusedModule] = []
        raw_unused = data.get("unused_modules")  # absent from banks exported before it was recorded
        if raw_unused is not None:
            if not isinstance(raw_unused, list):
                problems.append(f"bank.unused_modules must be a list, got {type(raw_unused).__name__}")
            else:
                for entry in raw_unused:
                    try:
                        unused.append(UnusedModule.from_dict(entry))
                    except ValueError as exc:
                        problems.append(f"bank.unused_modules: {exc}")
                adapted = {t.module for t in layout.values()}
                both = sorted({u.module for u in unused} & adapted)
                if both:
                    problems.append(f"bank.unused_modules lists {', '.join(both)[:200]}, which bank.tensors adapts")
        base_weights = _record_map(data, "base_weights", BaseDigest.from_dict, problems)
        adapter_digests = _record_map(data, "adapter_digests", FileDigest.from_dict, problems)
        if adapter_digests is not None and names and set(data["adapter_digests"]) != set(names):
            problems.append(f"bank.adapter_digests must have one entry per slot's adapter ({str(names)[:200]}), has "
                            f"{str(sorted(data['adapter_digests']))[:200]}")
        adapter_bases = _record_map(data, "adapter_bases", _recorded_base, problems) or {}
        strangers = sorted(set(adapter_bases) - set(names)) if names else []
        if strangers:  # a typo'd name would silently turn its adapter's warning off
            problems.append(f"bank.adapter_bases names adapters the bank does not hold ({str(strangers[:5])[:200]}"
                            f"{f' and {len(strangers) - 5:,} more' if len(strangers) > 5 else ''}); its adapters are "
                            f"{str(names)[:200]}")
        if problems:
            raise ValueError("; ".join(problems) + "; re-export the bank (bca-deploy export --bank)")
        return cls(ids_input, tuple(slots), adapter_files, layout, prefix or "", model_type, head, base_file,
                   base_labels, adapter_labels, tuple(unused), base_weights, adapter_digests, adapter_bases)

    def adapter_file_problem(self, name: str, path: Path) -> str | None:
        """Why ``path`` is not exported adapter ``name``'s file, or None: it is larger than any adapter file of this
        bank (:meth:`adapter_file_limit`, checked for every export: onnxruntime reads the whole file into memory), or
        its size, then its sha256, differ from what ``bca_export.json`` records (an older export records none). A
        file copied from another export with the same shapes was served as this adapter, with another's numbers."""
        size, limit = path.stat().st_size, self.adapter_file_limit()
        if size > limit:
            return f"{size:,} bytes, more than an adapter file of this bank holds (at most {limit:,})"
        if self.adapter_digests is None or name not in self.adapter_digests:
            return None
        problem = self.adapter_digests[name].problem(path)
        return None if problem is None else f"not the adapter file this bank exported for {name!r} ({problem})"

    def checked_adapter_file(self, export_dir: str | Path, name: str, error: type[Exception]) -> Path:
        """Exported adapter ``name``'s file in ``export_dir``, readable (else the OSError naming it) and the one the
        export wrote (:meth:`adapter_file_problem`, else ``error`` naming it): what serve, serve-ray and validate
        check before onnxruntime reads the file."""
        path = Path(export_dir) / self.adapter_files[name]
        require_readable(path)
        if (problem := self.adapter_file_problem(name, path)) is not None:
            raise error(f"{path}: {problem}; export the bank again")
        return path

    def adapter_file_limit(self) -> int:
        """The most bytes an exported adapter file of this bank takes: its two slots (zeros, then the adapter) of
        every bank input, the head's at the widest exported label count, in float32, plus 16 MiB for the format's
        own records. A file beyond it (a sparse file declaring GiBs) was read whole by onnxruntime before any check:
        20 GiB took a server to 20.9 GB."""
        elements = sum(math.prod(t.slot_shape) for t in self.layout.values())
        if self.head is not None:
            widths = [labels.num_labels for labels in (self.base_labels, *self.adapter_labels.values()) if labels]
            elements += sum(math.prod(shape) for shape in self.head.slot_shapes(max([1, *widths])).values())
        return 2 * 4 * elements + (16 << 20)


def _outermost(paths: Sequence[str]) -> list[str]:
    paths = sorted(set(paths))
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def model_head_modules(model: nn.Module) -> list[str]:
    """The task head of a transformers model: its top-level children with parameters other than the base model
    (``classifier`` of ``BertForSequenceClassification``, ``score`` of ``LlamaForSequenceClassification``...)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def head_layout_problems(model: nn.Module, modules: Sequence[str]) -> tuple[HeadLayout | None, list[str]]:
    """The :class:`HeadLayout` of ``modules`` in ``model`` (their Linear and LayerNorm layers), or the reasons
    there is none.

    This is the one rule of what a bank head may hold: every parameter of the modules must belong to an
    ``nn.Linear`` (weight and bias) or, in the task head (outside the base model, ``base_model_prefix``: ModernBERT's
    ``head.norm``), an ``nn.LayerNorm`` over the last axis (its scale and shift: the normalisation itself has no
    parameters, so the graph shares it and gathers each row's affine); anything else saved whole (an embedding, a
    LayerNorm of the encoder, a BCA-adapted layer) is refused.
    The label layer is the last Linear in module order; its outputs must be ``config.num_labels`` wide.
    """
    problems: list[str] = []
    layers: list[tuple[str, nn.Module]] = []
    modules = _outermost(modules)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def head_norm(name: str, sub: nn.Module) -> bool:
        return (type(sub) is nn.LayerNorm and sub.elementwise_affine and len(sub.normalized_shape) == 1
                and not (prefix and (name == prefix or name.startswith(prefix + "."))))

    for path in modules:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such module in this {type(model).__name__}")
            continue
        owned: set[str] = set()
        for name, sub in module.named_modules(prefix=path):
            if isinstance(sub, BCALinear):
                problems.append(f"{name}: adapted by BCA and saved whole at once; a bank cannot hold both")
            elif type(sub) is nn.Linear or head_norm(name, sub):
                layers.append((name, sub))
                owned.update(f"{name}.{p}" for p, _ in sub.named_parameters(recurse=False))
        for pname, _ in module.named_parameters(prefix=path):
            if pname not in owned:
                owner = pname.rsplit(".", 1)[0]
                kind = type(model.get_submodule(owner)).__name__
                problems.append(f"{owner}: a {kind} (parameter {pname}); a bank graph holds per-adapter Linear "
                                "layers (and the classifier head's LayerNorms) only, so this module cannot differ "
                                "per row")
    linears = [(name, sub) for name, sub in layers if type(sub) is nn.Linear]
    if problems or not linears:
        return None, problems or [f"{', '.join(modules)}: no Linear layer to hold per slot"]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda item: order[item[0]])
    linears.sort(key=lambda item: order[item[0]])
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    last_name, last = linears[-1]
    if num_labels is not None and last.out_features != num_labels:
        return None, [f"{last_name}: the head's last Linear has {last.out_features} outputs but the model has "
                      f"{num_labels} labels; cannot tell which layer gives the labels"]
    return HeadLayout(tuple(modules), tuple(
        HeadLayer(name, linear.in_features, linear.out_features, labels=name == last_name,
                  bias=linear.bias is not None) if type(linear) is nn.Linear else
        HeadLayer(name, linear.normalized_shape[0], linear.normalized_shape[0], labels=False,
                  bias=linear.bias is not None, kind=HEAD_NORM) for name, linear in layers)), []


def model_head_weights(model: nn.Module, layout: HeadLayout, missing: Sequence[str] = ()) -> HeadWeights | None:
    """The head ``model`` holds, as slot tensors: layers with any parameter in ``missing`` (not in the
    checkpoint, initialized at random by transformers) are left out; labels from ``model.config`` when
    every layer is there. None when no layer is."""
    missing = set(missing)
    tensors: dict[str, np.ndarray] = {}
    for layer in layout.layers:
        linear = model.get_submodule(layer.module)
        params = [f"{layer.module}.weight"] + ([f"{layer.module}.bias"] if linear.bias is not None else [])
        if missing.intersection(params):
            continue
        tensors.update(layer.slot_tensors(linear.weight, linear.bias))
    if not tensors:
        return None
    labels = None
    if len(tensors) == 2 * len(layout.layers):
        config = model.config
        labels = HeadLabels.of(layout.label_layer.out_features, getattr(config, "id2label", None),
                               getattr(config, "problem_type", None))
    return HeadWeights(tensors, labels)


def adapter_head(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    layout: HeadLayout | None,
    base: HeadWeights | None,
) -> tuple[HeadWeights | None, list[str]]:
    """The head an adapter (paths aligned to the graph) brings to its slot, and what the fit check cannot see.

    Its ``modules_to_save`` tensors are the weights and biases of (some of) the graph's head layers:
    whether each is one, of the graph's shape and finite is the one fit check's business (the head layers
    are its target parameters). This adds the label layer's rules (its size is the adapter's: weight
    ``(num_labels, in)`` and bias ``(num_labels,)`` agreeing, ``1 <= num_labels <=``
    :data:`~bca_deploy.config.MAX_NUM_LABELS`) and fills the layers the adapter does not save from
    ``base`` (the checkpoint's head; a layer neither has is a problem). Labels: ``task.head``'s names if
    recorded, else ``LABEL_<i>``; the base's when the adapter does not save the label layer.

    Returns:
        ``(head, problems)``; ``(None, [])`` for an adapter without ``modules_to_save`` (its rows use the
        base head) or a graph without a per-slot head (the fit check refuses whole modules there).
    """
    from bca_deploy.config import MAX_NUM_LABELS
    from bca_deploy.fit import split_base_key

    # base weights are the base model's values, checked by the fit check (Target.base_matches), never a head's
    saved = {k: v for k, v in state.items()
             if not k.endswith(KERNEL_SUFFIX) and split_base_key(k, config.modules_to_save) is None}
    if layout is None or (not config.modules_to_save and not saved):
        return None, []
    problems: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    label = layout.label_layer
    num_labels = None
    for layer in layout.layers:
        weight, bias = saved.get(f"{layer.module}.weight"), saved.get(f"{layer.module}.bias")
        if layer.labels and (weight is not None or bias is not None):
            rows = {tuple(t.shape)[0] for t in (weight, bias) if t is not None and t.ndim >= 1}
            num_labels = min(rows) if rows else 0
            bad = [f"tensor {layer.module}.{kind}: shape {tuple(t.shape)}" for kind, t, want in
                   (("weight", weight, (num_labels, layer.in_features)), ("bias", bias, (num_labels,)))
                   if t is not None and tuple(t.shape) != want]
            if bad or len(rows) != 1 or not 1 <= num_labels <= MAX_NUM_LABELS:
                problems.append(f"{', '.join(bad) or layer.module}; the label layer {layer.module} takes weight "
                                f"(num_labels, {layer.in_features}) and bias (num_labels,) with one num_labels in "
                                f"1..{MAX_NUM_LABELS}")
                continue
        if weight is not None and bias is None and layer.bias:  # the label layer too: its bias was taken as zeros
            problems.append(f"{layer.module}.bias: missing (the adapter saves {layer.module}.weight)")
        elif bias is not None and weight is None:
            problems.append(f"{layer.module}.weight: missing (the adapter saves {layer.module}.bias)")
        elif weight is not None:
            tensors.update(layer.slot_tensors(weight, bias))
        elif base is not None and layer.weight_name in base.tensors:
            tensors[layer.weight_name] = base.tensors[layer.weight_name]
            tensors[layer.bias_name] = base.tensors[layer.bias_name]
        else:
            problems.append(f"{layer.module}: the adapter saves no weights for this head layer and the base "
                            "checkpoint has none either")
    if problems:
        return None, problems
    head_spec = config.task.head if config.task is not None else None
    if num_labels is None:  # the label layer is the checkpoint's
        if base is None or base.labels is None:
            return None, [f"{label.module}: the adapter saves no weights for the label layer and the base "
                          "checkpoint has none either"]
        labels = base.labels
    elif head_spec is not None and head_spec.num_labels == num_labels:
        labels = HeadLabels.of(num_labels, head_spec.id2label, head_spec.problem_type, head_spec.text_pair)
    else:  # no task recorded (the fit check refuses a task.head that disagrees with the weights)
        labels = HeadLabels.of(num_labels, None, None)
    return HeadWeights(tensors, labels), []


class _HeadLinear(torch.autograd.Function):
    """``x @ weight + bias`` in fp32, emitted as ``MatMul(x, <module>.bca_head_weight)`` + ``Add(bias)`` so the
    bank rewrite finds both placeholders by name. Export only: not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        return (x.float() @ weight + bias).to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, bias):  # pragma: no cover - run by the ONNX exporter
        return _fp32_weight_op(g, "MatMul", x, weight, bias)


def _fp32_weight_op(g, op: str, x, weight, bias):  # pragma: no cover - run by the ONNX exporter
    """``Add(<op>(x, weight), bias)`` computed in fp32 (``x`` cast there and back when it is not): the graph of
    :class:`_HeadLinear` (``MatMul``) and :class:`_HeadAffine` (``Mul``)."""
    from torch.onnx import symbolic_helper as sym

    x_type = _scalar_type(x)
    if x_type not in (None, "Float"):
        x = g.op("Cast", x, to_i=torch.onnx.TensorProtoDataType.FLOAT)
    y = g.op("Add", g.op(op, x, weight), bias)
    if x_type not in (None, "Float"):
        y = g.op("Cast", y, to_i=sym.cast_pytorch_to_onnx[x_type])
    return y


class _HeadAffine(torch.autograd.Function):
    """``x * weight + bias`` in fp32 (a LayerNorm's affine), emitted as ``Mul(x, <module>.bca_head_weight)`` +
    ``Add(bias)`` so the bank rewrite finds both placeholders by name. Export only: not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        return (x.float() * weight + bias).to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, bias):  # pragma: no cover - run by the ONNX exporter
        return _fp32_weight_op(g, "Mul", x, weight, bias)


def _check_head_batch(self: nn.Module, x: torch.Tensor) -> None:
    batch = self._bca_head_batch[0]
    if batch is not None and (x.dim() < 2 or int(x.shape[0]) != batch):
        raise ExportError(f"{self._bca_head_path}: its input has shape {tuple(x.shape)}, not batch-first "
                          f"(batch {batch}); a bank can hold a head layer only if each row's input is its own")


def _head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    _check_head_batch(self, x)
    return _HeadLinear.apply(x, getattr(self, HEAD_WEIGHT), getattr(self, HEAD_BIAS))


def _head_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # the normalisation has no parameters (shared by every row); only its affine is the slot's
    _check_head_batch(self, x)
    y = torch.nn.functional.layer_norm(x, self.normalized_shape, None, None, self.eps)
    return _HeadAffine.apply(y, getattr(self, HEAD_WEIGHT), getattr(self, HEAD_BIAS))


@contextlib.contextmanager
def exportable_heads(model: nn.Module, head: HeadLayout, width: int) -> Iterator[nn.Module]:
    """Make the head layers of ``model`` export as bank placeholders (in place; restored on exit).

    Each layer of ``head`` gets the buffers ``bca_head_weight`` (in, out) and ``bca_head_bias`` (out,)
    (the label layer ``width`` wide), distinct random values the bank rewrite replaces by graph inputs,
    and a forward computing ``x @ weight + bias`` through :class:`_HeadLinear` (a norm layer:
    ``layer_norm(x) * weight + bias`` through :class:`_HeadAffine`). A layer whose input is not batch-first
    during the export raises :class:`ExportError`.
    """
    batch: list[int | None] = [None]

    def remember_batch(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch[0] = int(ids.shape[0]) if isinstance(ids, torch.Tensor) else None

    hook = model.register_forward_pre_hook(remember_batch, with_kwargs=True)
    patched: list[nn.Module] = []
    try:
        for index, layer in enumerate(head.layers):
            linear = model.get_submodule(layer.module)
            patched.append(linear)
            generator = torch.Generator().manual_seed(2_000_003 + index)
            for name, shape in zip((HEAD_WEIGHT, HEAD_BIAS), layer.slot_shapes(width).values(), strict=True):
                linear.register_buffer(name, torch.randn(shape, generator=generator), persistent=True)
            linear._bca_head_batch = batch
            linear._bca_head_path = layer.module
            linear.forward = types.MethodType(_head_norm_forward if layer.norm else _head_forward, linear)
        yield model
    finally:
        hook.remove()
        for linear in patched:
            for name in (HEAD_WEIGHT, HEAD_BIAS):
                if name in linear._buffers:
                    delattr(linear, name)
            for attr in ("forward", "_bca_head_batch", "_bca_head_path"):
                linear.__dict__.pop(attr, None)


class _SharedInputSeen(Exception):
    """Stops a bank trace once the model's forward has shown an adapted layer fed an input its rows share."""


def _leading_batch(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None


@contextlib.contextmanager
def per_row_inputs(model: nn.Module, layout: Mapping[str, BankTensor], names: Sequence[str],
                   sources: Mapping[str, str] | None = None) -> Iterator[nn.Module]:
    """Refuse a bank of adapters that adapt a layer whose input is not one row per batch row (in place; hooks
    removed on exit).

    A bank graph gives row b the kernels of slot ``adapter_ids[b]``, so every banked layer's input must be
    ``(batch, ..., in_features)`` with the model's batch first. Some layers run on a tensor the whole batch
    shares instead: DeBERTa-v2's ``pos_key_proj`` / ``pos_query_proj`` project the relative-position embeddings
    (shape ``(1, 2k, hidden)``), and with ``share_att_key`` its ``query_proj`` / ``key_proj`` take them too. No
    per-row kernel can apply there (PyTorch's ``mixed_adapters`` refuses them as well). While the block runs
    (around the bank's trace), each adapted layer of ``layout`` records the first input whose leading dimension
    is not the batch of the model's ``input_ids``; once the model's forward has returned with any, the trace is
    stopped and :class:`UnsupportedExportError` names every such module, its input shape and its adapters
    (``sources``: adapter name -> its directory, for the message), and what to export instead.

    Raises:
        UnsupportedExportError: some adapted layer's input is shared by the batch (raised from the block, after
            the model's forward; an error the block raises for another reason is replaced by it then too).
    """
    modules = {entry.module for entry in layout.values()}
    batch: list[int | None] = [None]
    found: dict[str, tuple[tuple[int, ...], int]] = {}

    def remember_batch(module, args, kwargs):
        batch[0] = _leading_batch(args, kwargs)

    def stop_if_found(module, args, kwargs, output):
        if found:
            raise _SharedInputSeen()

    def watch(path: str):
        def check(layer, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            rows = batch[0]
            if rows is None or path in found or not isinstance(x, torch.Tensor):
                return
            shape = tuple(int(n) for n in x.shape)
            if len(shape) < 2 or shape[0] != rows:
                found[path] = (shape, rows)
        return check

    handles = [model.register_forward_pre_hook(remember_batch, with_kwargs=True),
               model.register_forward_hook(stop_if_found, with_kwargs=True)]
    layers = {path: layer for path, layer in bca_layers(model) if path in modules}
    try:
        handles += [layer.register_forward_pre_hook(watch(path), with_kwargs=True) for path, layer in layers.items()]
        try:
            yield model
        except Exception:
            if not found:
                raise
        if found:
            raise _shared_input_error(found, {p: [n for n in names if n in layer.bca_kernels]
                                              for p, layer in layers.items()}, names, sources or {}) from None
    finally:
        for handle in handles:
            handle.remove()


def _shared_input_error(found: Mapping[str, tuple[tuple[int, ...], int]], adapters: Mapping[str, Sequence[str]],
                        names: Sequence[str], sources: Mapping[str, str]) -> UnsupportedExportError:
    """The refusal of :func:`per_row_inputs`: each module, its input, its adapters; then what works instead."""
    problems = []
    for path in sorted(found, key=list(adapters).index):
        shape, rows = found[path]
        problems.append(f"{path} (adapted by {', '.join(adapters[path])}): its input has shape {shape} while "
                        f"tracing a batch of {rows} rows")
    culprits = [n for n in names if any(n in adapters[path] for path in found)]
    named = ", ".join(f"{n} ({sources[n]})" if n in sources else n for n in culprits)
    leaves = sorted({path.rsplit(".", 1)[-1] for path in found})
    header = ("an adapter-bank graph gives each row of a batch its own adapter, so every layer a banked adapter "
              "adapts needs an input of shape (batch, ..., in_features), one row per batch row; these layers take "
              "an input the whole batch shares (such as DeBERTa-v2's relative-position embeddings, which "
              "pos_key_proj / pos_query_proj project, and query_proj / key_proj too when share_att_key is set), "
              "so a bank cannot apply a different adapter to each row there:")
    advice = (f"Export {'this adapter' if len(culprits) == 1 else 'each of these adapters'}, {named}, on its own, "
              "without --bank (bank=False): a merged (--merge) or unmerged (--no-merge) "
              "graph applies it to the shared input as PyTorch does and validates against it; or bank adapters "
              f"trained without {', '.join(leaves)} in their target_modules")
    return UnsupportedExportError(format_problems(header, problems, limit=12) + "\n" + advice)


# ---- modules the graph does not use ---------------------------------------------------------------


def _outputs_of(run: Callable[[], Any]) -> list[torch.Tensor]:
    outputs = run()
    return [outputs] if isinstance(outputs, torch.Tensor) else [t for t in outputs if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def _output_hooks(model: nn.Module, paths: Sequence[str], change: Callable[[str, torch.Tensor], torch.Tensor]):
    """Each module of ``paths`` (those ``model`` has) returns ``change(path, output)`` for a floating tensor output."""

    def hook_of(path: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                return change(path, output)
            return None
        return hook

    handles = []
    try:
        for path in paths:
            with contextlib.suppress(AttributeError):
                handles.append(model.get_submodule(path).register_forward_hook(hook_of(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reached_leaves(outputs: Sequence[torch.Tensor]) -> set[int]:
    """``id`` of every autograd leaf the outputs' graph reaches (walked, nothing differentiated)."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return reached


def _perturbing_changes_outputs(model: nn.Module, run: Callable[[], Any], paths: Sequence[str],
                                reference: Sequence[torch.Tensor]) -> bool:
    """Whether adding large random noise to the outputs of ``paths`` (then subtracting it, a second run) changes any
    bit of the outputs of ``run()``: a use the dataflow walk cannot see (a comparison, an index) changes them."""
    for sign in (1.0, -1.0):
        generator = torch.Generator().manual_seed(0)  # the same noise in both runs, the sign flipped

        def noisy(path: str, output: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
            scale = 4.0 * (1.0 + float(output.detach().abs().max())) if output.numel() else 1.0
            return output + sign * scale * noise

        with _output_hooks(model, paths, noisy), torch.no_grad():
            got = _outputs_of(run)
        if len(got) != len(reference) or not all(torch.equal(a, b) for a, b in zip(got, reference, strict=True)):
            return True
    return False


def unreachable_modules(model: nn.Module, run: Callable[[], Any], paths: Sequence[str]) -> dict[str, str | None]:
    """Which of the modules ``paths`` of ``model`` have an output that the outputs of ``run()`` do not depend on.

    ``run`` runs ``model``'s forward as the exported graph does (the graph's inputs, its outputs only) and returns
    those outputs (a tensor or a sequence of them). Two checks, both needed:

    * the dataflow: while ``run`` runs, every module of ``paths`` and each of their ancestors that returns a
      floating tensor gets a zero scalar leaf added to its output, and the autograd graph is walked back from the
      outputs (nothing is differentiated): a module whose leaf is not reached, or that never ran, feeds no output
      through any differentiable op. This is the dataflow ``torch.onnx.export`` prunes by: the placeholder kernel
      of such a module is not in the exported graph.
    * the values: large random noise added to (then subtracted from) those modules' outputs changes no bit of the
      outputs, so no use the walk cannot see (through a comparison or an index) is missed either.

    Returns:
        ``{path: owner}`` for every unused module of ``paths``: ``owner`` is its outermost ancestor whose output is
        unused as well (``pooler`` for a ``BertModel``'s ``pooler.dense`` in a feature-extraction graph), or None.
        Modules whose output the outputs use are absent.
    """
    candidates: set[str] = set()
    for path in paths:
        parts = path.split(".")
        candidates.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    leaves: dict[str, torch.Tensor] = {}

    def add_leaf(path: str, output: torch.Tensor) -> torch.Tensor:
        if path not in leaves:
            leaves[path] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        return output + leaves[path]

    with _output_hooks(model, sorted(candidates), add_leaf), torch.enable_grad():
        reached = _reached_leaves(_outputs_of(run))

    def unused(path: str) -> bool:
        return path in leaves and id(leaves[path]) not in reached

    found = [p for p in dict.fromkeys(paths) if not (p in leaves and not unused(p))]
    if found:
        with torch.no_grad():
            reference = _outputs_of(run)
        if _perturbing_changes_outputs(model, run, found, reference):  # some are used after all: which
            found = [p for p in found if not _perturbing_changes_outputs(model, run, [p], reference)]
    result: dict[str, str | None] = {}
    for path in found:
        parts = path.split(".")
        result[path] = next((a for a in (".".join(parts[:i]) for i in range(1, len(parts))) if unused(a)), None)
    return result


def unused_reason(task: str, outputs: Sequence[str], owner: str | None) -> str:
    """Why a module is left out of a bank, in words: what the graph outputs, and what is not part of it."""
    names = [o for o in outputs if not o.startswith("present.")]
    if len(names) < len(outputs):
        names.append("present.* (the key/value cache)")
    what = f"{task} outputs {', '.join(names)}"
    if owner is not None:
        return f"its output is not used by the exported graph ({what}; the {owner} is not part of it)"
    return f"its output is not used by the exported graph ({what}, which do not depend on it)"


# ---- the graph rewrite -----------------------------------------------------------------------------


def _batch_dim(graph) -> str:
    for value in graph.input:
        if value.name == "input_ids":
            dim = value.type.tensor_type.shape.dim[0]
            if dim.dim_param:
                return dim.dim_param
    return "batch_size"


def _uses_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def rewrite_as_bank(
    onnx_path: str | Path,
    layout: Mapping[str, BankTensor],
    defaults: Mapping[str, np.ndarray],
    head: HeadLayout | None = None,
    logits_to_keep: bool = False,
) -> None:
    """Turn the single-adapter graph at ``onnx_path`` (exported with :func:`placeholder_kernels`) into a bank graph.

    Each ``<module>.bca_freq_p<p>`` initializer of shape (1, R, q, o) becomes a graph input of shape
    (``bca_slots``, 1, R, q, o) with ``defaults[name]`` as its initializer, gathered by
    ``adapter_ids`` on the slot axis (then transposed to (1, R, B, q, o)); the Reshape in front of each
    mix gains the batch axis. With
    ``head`` (a graph exported under :func:`exportable_heads`), each head layer's placeholders become
    the inputs ``<module>.bca_head_weight`` (``bca_slots``, in, out) and ``<module>.bca_head_bias``
    (``bca_slots``, out), gathered per row; the label layer's ``out`` and the logits' last axis become
    ``bca_labels``. With ``logits_to_keep`` (generation graphs), the output layer's input is sliced to its last
    :data:`LOGITS_TO_KEEP` positions (an overridable input, default 0: all), where the ``logits`` output is
    computed from one MatMul with a constant weight through position-wise ops only; otherwise the graph is left
    computing every position. The file is rewritten in place (external data too, if the graph used it).

    Raises:
        ExportError: the graph does not have the expected structure (a bank input missing, or not
            consumed by a MatMul fed by a Reshape; a head placeholder not consumed by one MatMul + Add).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    graph = model.graph
    external = _uses_external_data(model) or sum(np.asarray(d).nbytes for d in defaults.values()) > 1 << 30
    initializers = {t.name: t for t in graph.initializer}
    head_names = [] if head is None else head.names()
    missing = [name for name in [*layout, *head_names] if name not in initializers]
    if missing:
        raise ExportError(f"the exported graph has no initializer {missing[0]} (and {len(missing) - 1} more bank "
                          "inputs missing); cannot build the bank")
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in _node_reads(node):  # a placeholder read inside an If branch is refused below
            consumers.setdefault(inp, []).append(node)

    batch_shape = "bca_bank/batch"
    extra_inits = []
    new_nodes_before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    shape_heads: dict[int, str] = {}
    shape_tails: dict[int, str] = {}
    reshaped_outputs: set[str] = set()
    for name, entry in layout.items():
        _, two_f, q, _ = entry.slot_shape
        rows, gathered = f"{name}/bank_rows", f"{name}/bank_gather"
        users = consumers.get(name, [])
        if not users:
            raise ExportError(f"bank input {name} is not used by the exported graph")
        for k, node in enumerate(users):
            if node.op_type != "MatMul" or list(node.input).index(name) != 1:
                raise ExportError(f"bank input {name} feeds a {node.op_type} node ({node.name}); expected the B "
                                  "input of a MatMul")
            reshape = producers.get(node.input[0])
            if reshape is None or reshape.op_type != "Reshape":
                raise ExportError(f"the mix of {name} is not fed by a Reshape; cannot insert the batch axis")
            if two_f not in shape_heads:
                shape_heads[two_f] = f"bca_bank/shape_head_{two_f}"
                extra_inits.append(numpy_helper.from_array(np.array([1, two_f], dtype=np.int64), shape_heads[two_f]))
            if q not in shape_tails:
                shape_tails[q] = f"bca_bank/shape_tail_{q}"
                extra_inits.append(numpy_helper.from_array(np.array([-1, q], dtype=np.int64), shape_tails[q]))
            shape5 = f"{name}/bank_shape_{k}"
            reshaped = f"{name}/bank_spectra_{k}"
            nodes = [
                helper.make_node("Concat", [shape_heads[two_f], batch_shape, shape_tails[q]], [shape5], axis=0,
                                 name=f"{name}/BankShape_{k}"),
                helper.make_node("Reshape", [reshape.input[0], shape5], [reshaped], name=f"{name}/BankReshape_{k}"),
            ]
            if k == 0:  # (B, 1, R, q, o) -> (1, R, B, q, o): one contiguous slot per row read
                nodes.append(helper.make_node("Gather", [name, ADAPTER_IDS], [rows], axis=SLOT_AXIS,
                                              name=f"{name}/BankGather"))
                nodes.append(helper.make_node("Transpose", [rows], [gathered], perm=[1, 2, 0, 3, 4],
                                              name=f"{name}/BankTranspose"))
            new_nodes_before.setdefault(id(node), []).extend(nodes)
            reshaped_outputs.update(node.output)  # rank 4 → 5: drop any recorded shape
            node.input[0] = reshaped
            node.input[1] = gathered

    new_nodes_after: dict[int, list] = {}
    label_outputs = [] if head is None else _rewrite_head(head, consumers, batch_shape, new_nodes_before,
                                                          new_nodes_after, extra_inits, reshaped_outputs)
    sliced = logits_to_keep and _keep_last_logits(graph, producers, initializers, new_nodes_before, extra_inits,
                                                  reshaped_outputs)
    ordered = [helper.make_node("Shape", [ADAPTER_IDS], [batch_shape], name="bca_bank/Shape")]
    for node in graph.node:
        ordered.extend(new_nodes_before.get(id(node), []))
        ordered.append(node)
        ordered.extend(new_nodes_after.get(id(node), []))
    del graph.node[:]
    graph.node.extend(_prune_dead(ordered, {o.name for o in graph.output}))
    if label_outputs:  # everything computed from the logits has a dynamic label axis now
        reached = _downstream(graph.node, label_outputs)
        reshaped_outputs.update(reached)
        for value in graph.output:
            if value.name in reached and value.type.tensor_type.shape.dim:
                value.type.tensor_type.shape.dim[-1].dim_param = LABELS_DIM

    kept = [t for t in graph.initializer if t.name not in layout and t.name not in head_names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(extra_inits)
    for name, entry in layout.items():
        value = np.ascontiguousarray(defaults[name], dtype=np.float32)
        if value.shape[1:] != entry.slot_shape:
            raise ExportError(f"default bank for {name} has shape {value.shape}; expected {entry.bank_shape(-1)}")
        graph.initializer.append(numpy_helper.from_array(value, name))
    for layer in () if head is None else head.layers:
        for name, shape in layer.slot_shapes().items():
            value = np.ascontiguousarray(defaults[name], dtype=np.float32)
            if value.shape[1:-1] != shape[:-1] or (not layer.labels and value.shape[1:] != shape):
                raise ExportError(f"default bank for {name} has shape {value.shape}; expected (slots, *{shape})")
            graph.initializer.append(numpy_helper.from_array(value, name))
    produced = {out for node in graph.node for out in node.output}
    stale = [v for v in graph.value_info if v.name not in produced or v.name in reshaped_outputs]
    for v in stale:
        graph.value_info.remove(v)
    batch_dim = _batch_dim(graph)
    graph.input.append(helper.make_tensor_value_info(ADAPTER_IDS, TensorProto.INT64, [batch_dim]))
    for name, entry in layout.items():
        two, two_f, q, o = entry.slot_shape
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [SLOTS_DIM, two, two_f, q, o]))
    for layer in () if head is None else head.layers:
        out = LABELS_DIM if layer.labels else layer.out_features
        weight_dims = [out] if layer.norm else [layer.in_features, out]
        graph.input.append(helper.make_tensor_value_info(layer.weight_name, TensorProto.FLOAT, [SLOTS_DIM, *weight_dims]))
        graph.input.append(helper.make_tensor_value_info(layer.bias_name, TensorProto.FLOAT, [SLOTS_DIM, out]))
    if sliced:
        graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), LOGITS_TO_KEEP))
        graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
        for value in graph.output:
            if value.name == "logits" and len(value.type.tensor_type.shape.dim) == 3:
                value.type.tensor_type.shape.dim[1].dim_param = LOGITS_POSITIONS_DIM

    data_file = onnx_path.name + "_data"
    if external:
        stale_data = onnx_path.parent / data_file
        if stale_data.exists():
            stale_data.unlink()  # the external-data writer appends: start from an empty file
        onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=1024)
    else:
        tmp = onnx_path.with_suffix(".bank.tmp")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, onnx_path)
    onnx.checker.check_model(str(onnx_path))


def _keep_last_logits(graph, producers: Mapping[str, Any], initializers: Mapping[str, Any],
                      before: dict[int, list], extra_inits: list, reshaped: set[str]) -> bool:
    """Slice the output layer's input to its last :data:`LOGITS_TO_KEEP` positions (axis 1); False if not found.

    From ``logits`` back through position-wise ops with one activation input (a softcap, a bias) to a MatMul
    ``(B, T, H) @ W`` whose ``W`` is constant: that MatMul's activation input ``x`` becomes
    ``Slice(x, starts=[-k], ends=[INT64_MAX], axes=[1])``; k = 0 keeps every position (the slice starts at 0),
    k = 1 the last (generation pads on the left, so it is every row's last real token).
    """
    from onnx import helper, numpy_helper

    if "logits" not in {o.name for o in graph.output}:
        return False
    constant = set(initializers)  # and every output computed from constants alone (nodes in topological order)
    for node in graph.node:
        if all(i in constant for i in _node_reads(node)):
            constant.update(node.output)
    chain, name = [], "logits"
    while True:
        node = producers.get(name)
        if node is None:
            return False
        variable = [i for i in node.input if i and i not in constant]
        if len(variable) != 1:
            return False
        chain.append(node)
        if node.op_type == "MatMul":
            if node.input[0] != variable[0]:
                return False
            break
        if node.op_type not in _POSITIONWISE:
            return False
        name = variable[0]
    matmul = chain[-1]
    p = "bca_bank/logits_to_keep"
    extra_inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{p}/one"))  # shape [1]; axis 1
    extra_inits.append(numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), f"{p}/ends"))
    before.setdefault(id(matmul), []).extend([
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{p}/minus_k"], name=f"{p}/Neg"),
        helper.make_node("Reshape", [f"{p}/minus_k", f"{p}/one"], [f"{p}/starts"], name=f"{p}/Starts"),
        helper.make_node("Slice", [matmul.input[0], f"{p}/starts", f"{p}/ends", f"{p}/one"], [f"{p}/x"],
                         name=f"{p}/Slice"),
    ])
    matmul.input[0] = f"{p}/x"
    reshaped.update(out for node in chain for out in node.output)  # their recorded position axis is stale
    return True


def _rewrite_head(head: HeadLayout, consumers: Mapping[str, list], batch_shape: str, before: dict[int, list],
                  after: dict[int, list], extra_inits: list, reshaped: set[str]) -> list[str]:
    """Rewire each head layer ``MatMul(x, W) + b`` to per-row weights; returns the label layer's output names.

    Per layer (x: (..., in), batch-first)::

        xs = Reshape(x, [B, -1, in])                        (B, T', in)
        y  = xs @ Gather(W_bank, ids, 0)                    (B, T', out)
           + Unsqueeze(Gather(b_bank, ids, 0), 1)           (B, 1, out)
        out = Reshape(y, shape(x)[:-1] + [-1])              (..., out)

    A norm layer's affine ``Mul(x, W) + b`` the same way, its scale gathered as its shift:
    ``y = xs * Unsqueeze(Gather(W_bank, ids, 0), 1) + ...`` (B, T', F).
    """
    from onnx import helper, numpy_helper

    constants = {"bca_bank/axes_1": [1], "bca_bank/minus_one": [-1], "bca_bank/zero": [0]}
    for name, values in constants.items():
        extra_inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    tails: set[int] = set()
    label_outputs = []
    for layer in head.layers:
        w, b = layer.weight_name, layer.bias_name
        users_w, users_b = consumers.get(w, []), consumers.get(b, [])
        op = "Mul" if layer.norm else "MatMul"
        if len(users_w) != 1 or users_w[0].op_type != op or list(users_w[0].input).index(w) != 1:
            raise ExportError(f"head input {w} is not the B input of exactly one {op} "
                              f"({[n.op_type for n in users_w]}); cannot bank the head")
        matmul = users_w[0]
        if len(users_b) != 1 or users_b[0].op_type != "Add" or matmul.output[0] not in users_b[0].input:
            raise ExportError(f"head input {b} is not added to the output of {matmul.name}; cannot bank the head")
        add = users_b[0]
        x, final, p = matmul.input[0], add.output[0], f"{layer.module}/bank_head"
        tail = f"bca_bank/head_tail_{layer.in_features}"
        if layer.in_features not in tails:
            tails.add(layer.in_features)
            extra_inits.append(numpy_helper.from_array(np.array([-1, layer.in_features], dtype=np.int64), tail))
        before.setdefault(id(matmul), []).extend([
            helper.make_node("Concat", [batch_shape, tail], [f"{p}/x_shape"], axis=0, name=f"{p}/XShape"),
            helper.make_node("Reshape", [x, f"{p}/x_shape"], [f"{p}/x"], name=f"{p}/XRows"),
            *([helper.make_node("Gather", [w, ADAPTER_IDS], [f"{p}/weight_rows"], axis=0, name=f"{p}/WeightGather"),
               helper.make_node("Unsqueeze", [f"{p}/weight_rows", "bca_bank/axes_1"], [f"{p}/weight"],
                                name=f"{p}/WeightRows")] if layer.norm else
              [helper.make_node("Gather", [w, ADAPTER_IDS], [f"{p}/weight"], axis=0, name=f"{p}/WeightGather")]),
        ])
        matmul.input[0], matmul.input[1] = f"{p}/x", f"{p}/weight"
        before.setdefault(id(add), []).extend([
            helper.make_node("Gather", [b, ADAPTER_IDS], [f"{p}/bias_rows"], axis=0, name=f"{p}/BiasGather"),
            helper.make_node("Unsqueeze", [f"{p}/bias_rows", "bca_bank/axes_1"], [f"{p}/bias"], name=f"{p}/BiasRows"),
        ])
        add.input[list(add.input).index(b)] = f"{p}/bias"
        add.output[0] = f"{p}/y"
        after.setdefault(id(add), []).extend([
            helper.make_node("Shape", [x], [f"{p}/in_shape"], name=f"{p}/InShape"),
            helper.make_node("Slice", [f"{p}/in_shape", "bca_bank/zero", "bca_bank/minus_one"], [f"{p}/lead"],
                             name=f"{p}/Lead"),
            helper.make_node("Concat", [f"{p}/lead", "bca_bank/minus_one"], [f"{p}/y_shape"], axis=0,
                             name=f"{p}/YShape"),
            helper.make_node("Reshape", [f"{p}/y", f"{p}/y_shape"], [final], name=f"{p}/YRows"),
        ])
        reshaped.update({matmul.output[0], final})
        if layer.labels:
            label_outputs.append(final)
    return label_outputs


def _node_reads(node) -> list[str]:
    """Every outer tensor ``node`` reads: its inputs and the names its subgraphs take from the enclosing scope.

    An ``If`` branch (or a ``Loop``/``Scan`` body) may use a tensor of the main graph without listing it among
    the node's inputs: DeBERTa-v2 with relative attention exports ``log_bucket_position``'s ``torch.where`` as
    an ``If`` whose branches read ``Constant`` outputs that no main-graph node reads. Dead-node pruning and the
    dataflow walks must count those reads, or such a Constant is dropped and the graph no longer checks
    ("Nodes in a graph must be topologically sorted ... is not output of any previous nodes").
    """
    from onnx import AttributeProto

    reads = [i for i in node.input if i]
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            reads += _outer_reads(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for sub in attr.graphs:
                reads += _outer_reads(sub)
    return reads


def _outer_reads(graph) -> list[str]:
    """The names ``graph`` (a subgraph) reads but does not define: those of its enclosing scopes."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local.update(t.values.name for t in graph.sparse_initializer)
    outer = []
    for node in graph.node:
        outer += [i for i in _node_reads(node) if i not in local]
        local.update(node.output)
    outer += [v.name for v in graph.output if v.name not in local]  # an output may be an outer tensor itself
    return outer


def _downstream(nodes, names: Sequence[str]) -> set[str]:
    """Every tensor computed (transitively) from ``names``, ``names`` included (``nodes`` in topological order;
    a node whose subgraph reads one of them counts as computed from it)."""
    reached = set(names)
    for node in nodes:
        if any(i in reached for i in _node_reads(node)):
            reached.update(node.output)
    return reached


def _prune_dead(nodes: list, graph_outputs: set[str]) -> list:
    """Drop nodes none of whose outputs is used (the Reshapes the bank replaced, and their shape constants).

    A tensor read only inside a subgraph (:func:`_node_reads`) is used: DeBERTa-v2's relative-position ``If``
    branches read Constants no other node reads, and pruning them left the bank graph invalid.
    """
    reads = [_node_reads(node) for node in nodes]  # once: the loop below may run a few rounds
    while True:
        used = set(graph_outputs)
        for names in reads:
            used.update(names)
        keep = [any(o in used for o in n.output) for n in nodes]
        if all(keep):
            return nodes
        nodes = [n for n, k in zip(nodes, keep, strict=True) if k]
        reads = [r for r, k in zip(reads, keep, strict=True) if k]


# ---- per-adapter files ---------------------------------------------------------------------------


def write_adapter_file(path: str | Path, tensors: Mapping[str, np.ndarray], layout: Mapping[str, BankTensor],
                       heads: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write an onnxruntime ``AdapterFormat`` file activating one adapter on a bank graph.

    It holds every bank input as a two-slot bank, ``[zeros, adapter]``, and, for a graph with a
    per-slot head, ``heads`` (:func:`stack_head` of ``[base head, adapter's head]``): with it active
    (``RunOptions.add_active_adapter``), ``adapter_ids`` 1 selects the adapter and 0 the base model.
    """
    import onnxruntime as ort

    path = Path(path)
    banks = stack_bank([None, tensors], layout)
    banks.update(heads or {})
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(bank) for name, bank in banks.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    adapter.export_adapter(str(tmp))
    os.replace(tmp, path)
    return path


def stack_head(slots: Sequence[HeadWeights | None], head: HeadLayout) -> dict[str, np.ndarray]:
    """Head bank inputs for ``slots`` (``None``: no head): ``{name: (S, in, out)}`` and ``{name: (S, out)}``.

    The label layer is as wide as the widest head among ``slots`` (at least 1).
    """
    label = head.label_layer.weight_name
    width = max([h.tensors[label].shape[1] for h in slots if h is not None and label in h.tensors] or [1])
    values = [head.slot_values(h, width) for h in slots]
    return {name: np.stack([v[name] for v in values]) for name in head.names()}


# ---- the export plan ------------------------------------------------------------------------------


def _load_kernels(model: nn.Module, name: str, config: AdapterConfig, state: Mapping[str, torch.Tensor],
                  source: str) -> None:
    """Load only the kernels of an adapter (paths aligned) into ``model`` as ``name``; its head is the bank's business.

    Its base weights (:func:`bca_deploy.fit.split_base_key`) are checked against the model (a floating parameter of
    their shape), then taken only when they equal the model's own values (:func:`model_base_matches`: every row of
    the bank shares the base model, so they change nothing), else refused naming each; nothing is loaded then.
    """
    from bca_deploy.adapter_io import check_adapter_fits
    from bca_deploy.fit import Target, split_base_key, target_problems
    from bca_deploy.inject import inject_modules, register_adapter

    kernels = {k: v for k, v in state.items() if k.endswith(KERNEL_SUFFIX)}
    based = {k: v for k, v in state.items() if split_base_key(k, config.modules_to_save) is not None}
    task = None if config.task is None else dataclasses.replace(config.task, head=None)
    config = dataclasses.replace(config, modules_to_save=[], task=task)
    check_adapter_fits(config, {**kernels, **based}, model, source=source)
    if based:
        bank = Target("the bank graph", modules={}, lists_every_module=False, base_matches=model_base_matches(model))
        problems = target_problems(dataclasses.replace(config, modules={}), based, bank)
        if problems:
            raise AdapterMismatchError(format_problems(f"{source} does not fit the bank graph:", problems))
    inject_modules(model, config.modules, adapter_name=name, init="zeros")
    with torch.no_grad():
        for path, layer in bca_layers(model):
            if name in layer.bca_kernels:
                layer.bca_kernels[name].copy_(kernels[path + KERNEL_SUFFIX].to(torch.float32))
    register_adapter(model, name, config)


def _head_fit_problems(config: AdapterConfig, state: Mapping[str, torch.Tensor], head: HeadLayout) -> list[str]:
    """The one fit check of an adapter's saved modules against the head layers alone (its kernels are checked
    against the model when they are loaded)."""
    from bca_deploy.fit import Target, split_base_key, target_problems

    params, resizable = head_params(head)
    target = Target("the bank graph's head", modules={}, params=params, resizable=resizable)
    saved = {k: v for k, v in state.items()  # base weights: checked against the model (_load_kernels)
             if not k.endswith(KERNEL_SUFFIX) and split_base_key(k, config.modules_to_save) is None}
    return target_problems(dataclasses.replace(config, modules={}), saved, target)


def _plan_head(model: nn.Module, task: str, adapter_dirs: Sequence[Path], configs: Sequence[AdapterConfig]) -> HeadLayout | None:
    """The per-slot head of a bank for ``task``: the model's head plus every adapter's ``modules_to_save``.

    None for tasks without a classifier head, and for a classifier whose head is not made of the layers a bank
    holds (:func:`head_layout_problems`) when no adapter brings its own (every row then shares the checkpoint's head).

    Raises:
        UnsupportedExportError: adapters save whole modules the bank cannot hold per row (each named).
    """
    saving = [f"{d} ({', '.join(c.modules_to_save)})" for d, c in zip(adapter_dirs, configs, strict=True)
              if c.modules_to_save]
    if task != "text-classification":
        if saving:
            # the text-classification advice only where what they save is a classifier head (a saved lm_head, norm
            # or pooler has no bank that holds it per row)
            heads = all(HEAD_MODULES.get(m.split(".")[0]) == "seq-cls" for c in configs for m in c.modules_to_save)
            raise UnsupportedExportError(
                f"these adapters save whole modules of their own: {'; '.join(saving)}. A {task} bank graph shares "
                "every whole module among its rows (only text-classification banks hold one per row: an adapter's "
                "classifier head): " + ("export them for text-classification, or each on its own (merged or unmerged)"
                                        if heads else "export each adapter on its own (merged or unmerged)")
            )
        return None
    modules = model_head_modules(model) + [m for c in configs for m in c.modules_to_save]
    head, problems = head_layout_problems(model, modules)
    if head is None and saving:
        raise UnsupportedExportError(format_problems(
            f"an adapter-bank graph cannot hold these adapters' whole modules per row ({'; '.join(saving)}):", problems))
    return head


def _compare_logits(case: str, got: np.ndarray, want: np.ndarray, tolerance):
    """One validation row for head-bank logits: real labels within ``tolerance``, padding -inf, headless rows NaN."""
    from .validate import ValidationRow

    if got.shape != want.shape:
        return ValidationRow("logits", case, tuple(got.shape), float("inf"), float("inf"), str(tolerance), False,
                             f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    real, pad, none = np.isfinite(want), np.isneginf(want), np.isnan(want)
    diff = np.abs(got[real] - want[real])
    max_abs = float(diff.max()) if diff.size and np.isfinite(diff).all() else (0.0 if not diff.size else float("inf"))
    scale = float(np.abs(want[real]).max()) if real.any() else 0.0
    notes = []
    if not np.isneginf(got[pad]).all():
        notes.append("padding labels are not -inf")
    if not np.isnan(got[none]).all():
        notes.append("rows without a head are not NaN")
    headless = int(none.all(axis=-1).sum())
    passed = not notes and tolerance.passes(got[real], want[real])
    if headless:
        notes.append(f"{headless} row(s) without a head: NaN")
    return ValidationRow("logits", case, tuple(got.shape), max_abs, max_abs / scale if scale > 0 else 0.0,
                         str(tolerance), passed, "; ".join(notes), allowed=tolerance.bound(want[real]))


@contextlib.contextmanager
def _head_swapped(model: nn.Module, head: HeadLayout, weights: HeadWeights) -> Iterator[nn.Module]:
    """``model`` with ``weights`` as its head layers (the label layer ``num_labels`` wide): that slot's own
    PyTorch model while the block runs; the model's own head is restored after."""
    saved = []
    try:
        for layer in head.layers:
            linear = model.get_submodule(layer.module)
            saved.append((linear, linear.weight, linear.bias, getattr(linear, "out_features", None)))
            value = weights.tensors[layer.weight_name]
            weight = torch.from_numpy(np.ascontiguousarray(value if layer.norm else value.T))
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linear.bias = nn.Parameter(torch.from_numpy(weights.tensors[layer.bias_name].copy()), requires_grad=False)
            if not layer.norm:
                linear.out_features = weight.shape[0]
        yield model
    finally:
        for linear, weight, bias, out_features in saved:
            linear.weight = weight
            if out_features is not None:
                linear.out_features = out_features
            if bias is None:
                del linear.bias
                linear.register_parameter("bias", None)
            else:
                linear.bias = bias


class BankPlan:
    """What an adapter-bank export needs: the model, the layout, each adapter's slot, and the steps that use them.

    Built by :meth:`load` from the base checkpoint and the adapter directories: the model holds every
    adapter's kernels (for tracing and as the validation reference); a text-classification bank also
    holds each slot's classifier head (:class:`HeadLayout`): slot 0 the checkpoint's own (or none, for
    a bare encoder), slot i adapter i's ``modules_to_save`` head, or the checkpoint's where it saves none.
    """

    #: one small mixed case per adapter file: its row, then a base row
    FILE_CASE = (2, 7)

    def __init__(self, model: nn.Module, names: Sequence[str], task: str, *, head: HeadLayout | None = None,
                 base_head: HeadWeights | None = None, heads: Mapping[str, HeadWeights | None] | None = None,
                 source: tuple[Path, Sequence[Path]] | None = None, model_task: Any = None,
                 adapter_bases: Mapping[str, str] | None = None) -> None:
        self.model = model
        self.model_task = model_task  # the bca_deploy.models.ModelTask the model was loaded for
        self.names = list(names)
        self.task = task
        self.layout = bank_layout(model, self.names)
        self.placeholders = placeholder_kernels(self.layout)
        self.tensors = {name: model_adapter_tensors(model, name, self.layout) for name in self.names}
        self.slots: list[str | None] = [None, *self.names]
        self.head = head
        self.base_head = base_head
        self.heads = dict(heads or {})
        self.source = source
        self.base_model_prefix = getattr(model, "base_model_prefix", "") or ""
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.unused: list[UnusedModule] = []  # adapted modules the graph does not use (see leave_out)
        self.adapter_digests: dict[str, FileDigest] = {}  # each adapter file as write() wrote it
        # the base checkpoint each adapter records (its base_model_name_or_path), for registration's foreign-base note
        self.adapter_bases = {n: b for n, b in (adapter_bases or {}).items() if isinstance(b, str) and b.strip()}

    @classmethod
    def load(cls, model_dir: str | Path, adapter_dirs: Sequence[str | Path], task: Any = None,
             names: Sequence[str] | None = None) -> BankPlan:
        """Load ``model_dir`` with every adapter's kernels for the bank's task, and plan the bank (heads included).

        ``names``: the slots' names (default: :func:`bca_deploy.models.adapter_names` of the directories; a bank
        exported before folder names were made safe gives its recorded ones).

        ``task``: a :class:`bca_deploy.models.ModelTask`, or a task name / None resolved by
        :func:`~bca_deploy.exporters.loading.resolve_export_task` with ``bank=True`` (adapters may bring
        different heads: the bank keeps one per slot). The model is :func:`bca_deploy.models.load_base`'s,
        with the checkpoint's own head (if any); each adapter's kernels are checked (the one fit check) and
        loaded, its head planned.

        Raises:
            bca_deploy.errors.AdapterFormatError: an adapter directory is malformed.
            bca_deploy.errors.AdapterMismatchError: an adapter's kernels or head do not fit (every problem), or it
                carries base weights other than the model's own values (each named: every row shares the base
                model, so a bank takes only base weights equal to it).
            bca_deploy.models.TaskError: adapters of different tasks, or a task contradicting them.
            UnsupportedExportError: whole modules a bank cannot hold per row (named), or no slot with a
                classifier head.
        """
        from bca_deploy.adapter_io import align_module_paths, read_adapter
        from bca_deploy.models import ModelTask, _check_missing, adapter_names, load_base

        from .loading import resolve_export_task

        model_dir, adapter_dirs = Path(model_dir), [Path(d) for d in adapter_dirs]
        names = list(names) if names is not None else adapter_names(adapter_dirs)
        model_task = task if isinstance(task, ModelTask) else resolve_export_task(model_dir, adapter_dirs, task, bank=True)
        model_task = dataclasses.replace(model_task, head=None)  # the checkpoint's head; the adapters' go in the bank
        model, missing = load_base(model_dir, model_task)
        adapters = [align_module_paths(*read_adapter(d, model), model) for d in adapter_dirs]
        head = _plan_head(model, model_task.export_task, adapter_dirs, [config for config, _ in adapters])
        head_params = set()
        if head is not None:
            both = sorted({layer.module for layer in head.layers} & {m for c, _ in adapters for m in c.modules})
            if both:
                raise UnsupportedExportError(
                    f"{', '.join(both)}: adapted by BCA and part of the classifier head; a bank holds a head layer per "
                    "slot or a kernel per slot, not both. Export such an adapter on its own, without --bank (unmerged "
                    "or --merge: both take it), or train it without adapting "
                    f"{'that layer' if len(both) == 1 else 'those layers'} (PEFT's all-linear adapts a pooler's dense "
                    "layer)")
            head_params = {f"{layer.module}.{p}" for layer in head.layers for p in ("weight", "bias")}
        _check_missing(model, model_dir, model_task, [k for k in missing if k not in head_params], [])
        base_head = None if head is None else model_head_weights(model, head, missing)
        heads: dict[str, HeadWeights | None] = {}
        problems: list[str] = []
        for directory, name, (config, state) in zip(adapter_dirs, names, adapters, strict=True):
            found = [] if head is None else _head_fit_problems(config, state, head)
            if not found:
                heads[name], found = adapter_head(config, state, head, base_head)
            problems += [f"{directory}: {p}" for p in found]
        if problems:
            raise AdapterMismatchError(format_problems("adapter heads that do not fit the bank graph:", problems))
        if head is not None and (base_head is None or base_head.labels is None) and all(
                h is None for h in heads.values()):
            absent = sorted(k for k in missing if k in head_params)
            raise UnsupportedExportError(
                f"no slot of this bank can classify: {model_dir} has no trained head ({', '.join(absent)} missing) "
                "and no adapter saves one. Export adapters trained with their head (modules_to_save), or a "
                "checkpoint that has a classifier head"
            )
        for directory, name, (config, state) in zip(adapter_dirs, names, adapters, strict=True):
            _load_kernels(model, name, config, state, str(directory))
        model.requires_grad_(False)
        return cls(model.eval(), names, model_task.export_task, head=head, base_head=base_head, heads=heads,
                   source=(model_dir, adapter_dirs), model_task=model_task,
                   adapter_bases={n: c.base_model_name_or_path for n, (c, _) in zip(names, adapters, strict=True)})

    def reference_model(self) -> nn.Module:
        """The fp32 PyTorch model to validate against: :attr:`model` unless it was cast, else a fresh load."""
        if all(p.dtype == torch.float32 for p in self.model.parameters()) or self.source is None:
            return self.model
        return BankPlan.load(self.source[0], self.source[1], self.model_task).model

    def slot_head(self, name: str | None) -> HeadWeights | None:
        """The head rows of adapter ``name`` (None: the base model) use."""
        own = self.heads.get(name) if name is not None else None
        return own if own is not None else self.base_head

    def adapter_file(self, directory: Path, name: str) -> Path:
        return directory / ADAPTERS_DIR / f"{name}{ADAPTER_FILE_SUFFIX}"

    @contextlib.contextmanager
    def exportable(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` ready for the bank's trace: its adapted layers watched by :func:`per_row_inputs` (a layer
        whose input is shared by the batch's rows is refused, naming it, before anything is rewritten or
        validated), the head layers as placeholders (with a per-slot head)."""
        sources = None if self.source is None else dict(zip(self.names, map(str, self.source[1]), strict=True))
        with per_row_inputs(model, self.layout, self.names, sources):
            if self.head is None:
                yield model
                return
            width = stack_head([self.slot_head(n) for n in self.slots],
                               self.head)[self.head.label_layer.bias_name].shape[1]
            with exportable_heads(model, self.head, width):
                yield model

    def absent_modules(self, onnx_path: Path) -> list[str]:
        """The adapted modules of the layout whose placeholder kernel the traced graph at ``onnx_path`` lacks
        (``torch.onnx.export`` prunes what its outputs do not depend on); ``[]`` when every one is there."""
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        present = {t.name for t in graph.initializer}
        return sorted({entry.module for name, entry in self.layout.items() if name not in present})

    def leave_out(self, unused: Mapping[str, str]) -> list[UnusedModule]:
        """Leave the modules of ``unused`` (path -> why: :func:`unused_reason`) out of the bank: no bank input, no
        slot tensors, recorded in :meth:`metadata` (``unused_modules``) so serving ignores kernels for them.

        Only for modules whose output the graph does not use (:func:`unreachable_modules`), so leaving their kernels
        out changes nothing the graph computes; the validation against PyTorch (every kernel applied) checks it.

        Raises:
            UnsupportedExportError: every adapted module is unused: the bank would be the base model alone.
        """
        layers = dict(bca_layers(self.model))
        for path, reason in sorted(unused.items()):
            if any(entry.module == path for entry in self.layout.values()):
                layer = layers[path]
                self.unused.append(UnusedModule(path, layer.layer_type, layer.in_features, layer.out_features, reason))
        gone = {u.module for u in self.unused}
        layout = {name: entry for name, entry in self.layout.items() if entry.module not in gone}
        if not layout:
            raise UnsupportedExportError(
                f"the exported {self.task} graph uses none of the modules these adapters adapt "
                f"({', '.join(sorted(gone))}: {self.unused[0].reason}); a bank of them would compute the base model "
                "alone. Adapt modules the graph computes, or export another task")
        self.layout = layout
        self.tensors = {n: {k: v for k, v in t.items() if k in layout} for n, t in self.tensors.items()}
        return self.unused

    def notes(self) -> list[str]:
        """What the export says about the bank besides its validation: each module left out, and why."""
        by_module = {path: [n for n in self.names if n in layer.bca_kernels] for path, layer in bca_layers(self.model)}
        return [f"note: {u.module} (adapted by {', '.join(by_module.get(u.module, [])) or 'an adapter'}) is left out "
                f"of the bank: {u.reason}. Its kernels change nothing the graph computes; adapters registered with "
                "one still load, that kernel ignored" for u in self.unused]

    def write(self, directory: Path) -> None:
        defaults = stack_bank([None, *(self.tensors[n] for n in self.names)], self.layout)
        if self.head is not None:
            defaults.update(stack_head([self.slot_head(n) for n in self.slots], self.head))
        rewrite_as_bank(directory / ONNX_FILE, self.layout, defaults, self.head,
                        logits_to_keep=self.task.startswith("text-generation"))
        for name in self.names:
            heads = None if self.head is None else stack_head([self.base_head, self.slot_head(name)], self.head)
            write_adapter_file(self.adapter_file(directory, name), self.tensors[name], self.layout, heads)
            self.adapter_digests[name] = FileDigest.of(self.adapter_file(directory, name))
        if self.base_head is not None:
            np.savez(directory / HEAD_BASE_FILE, **self.base_head.tensors)

    def validate(self, directory: Path, reference: nn.Module, dtype: str, provider: str, tolerance=None,
                 cases=None) -> ValidationReport:
        """The bank graph against PyTorch: mixed batches over every slot, then each adapter file activated.

        Without a per-slot head, :func:`~bca_deploy.exporters.validate.validate_model` with ``slots``
        (the reference runs the mixed batch under ``mixed_adapters``). With one, each row's logits are
        compared with its slot's own model (adapter active, that slot's head swapped in): real labels
        within tolerance, padding labels -inf, rows of a slot without a head NaN.
        """
        import onnxruntime as ort

        from .validate import TOLERANCES, ValidationReport, validate_model

        onnx_path = directory / ONNX_FILE
        tol = tolerance or TOLERANCES[dtype]
        if self.head is None:
            report = validate_model(onnx_path, reference, self.task, dtype=dtype, cases=cases, provider=provider,
                                    tolerance=tolerance, slots=self.slots)
        else:
            report = ValidationReport(str(onnx_path), self.task, dtype, provider, str(tol))
            report.rows += self._validate_heads(onnx_path, reference, self.slots, cases, provider, tol)
        for name in self.names:
            path = self.adapter_file(directory, name)
            require_readable(path)  # onnxruntime would report an unreadable file as "Invalid fd"
            adapter = ort.LoraAdapter()
            try:
                adapter.Load(str(path))
            except (OSError, MemoryError):
                raise
            except Exception as exc:  # onnxruntime raises RuntimeError/Fail (pybind) for a file it cannot parse
                raise ExportMetadataError(f"{path}: not a readable onnxruntime adapter file ({type(exc).__name__}: "
                                          f"{onnxruntime_reason(exc)}); export the bank again") from None
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            try:
                if self.head is None:
                    rows = validate_model(onnx_path, reference, self.task, dtype=dtype, cases=[self.FILE_CASE],
                                          provider=provider, tolerance=tolerance, slots=[None, name],
                                          run_options=options).rows
                else:
                    rows = self._validate_heads(onnx_path, reference, [None, name], [self.FILE_CASE], provider, tol,
                                                run_options=options)
            except Exception as exc:
                if type(exc).__name__ != "InvalidArgument":  # onnxruntime's: a tensor the graph has no input for
                    raise
                raise ExportMetadataError(f"{path}: not an adapter file of this bank graph ({onnxruntime_reason(exc)}); "
                                          "export the bank again") from None
            for row in rows:
                row.case = f"{row.case} file={name}"
            report.rows += rows
        return report

    def _validate_heads(self, onnx_path: Path, reference: nn.Module, slots: Sequence[str | None], cases,
                        provider: str, tolerance, run_options=None) -> list:
        import onnxruntime as ort

        from bca_deploy.inject import mixed_adapters

        from .validate import _text_inputs, _torch_kwargs, check_cases, inference_session

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = inference_session(onnx_path, options, provider)
        rng = np.random.default_rng(0)
        rows = []
        for index, case in enumerate(check_cases(cases, reference.config, with_past=False)):
            ids = (np.arange(case.batch) + index) % len(slots)
            feeds = _text_inputs(session, reference.config, case.batch, case.seq, rng, pad=True, adapter_ids=ids)
            got = session.run(["logits"], feeds, run_options)[0].astype(np.float64)
            heads = [self.slot_head(name) for name in slots]
            width = max([got.shape[-1]] + [h.labels.num_labels for h in heads if h is not None and h.labels])
            want = np.full((case.batch, width), LABEL_PAD)
            kwargs = _torch_kwargs(reference, feeds)
            for s in sorted(set(ids.tolist())):
                picked = np.flatnonzero(ids == s)
                if heads[s] is None or heads[s].labels is None:
                    want[picked] = np.nan
                    continue
                with torch.inference_mode(), _head_swapped(reference, self.head, heads[s]), \
                        mixed_adapters(reference, [slots[s]] * len(picked)):
                    logits = reference(**{k: v[torch.from_numpy(picked)] for k, v in kwargs.items()}).logits
                want[picked, :heads[s].labels.num_labels] = logits.double().numpy()
            label = f"b={case.batch} s={case.seq} ids=" + ",".join(map(str, ids))
            rows.append(_compare_logits(label, got, want, tolerance))
        return rows

    def metadata(self) -> dict:
        head = None
        if self.head is not None:
            base = self.base_head
            head = {
                **self.head.to_dict(),
                "base": None if base is None or base.labels is None else base.labels.to_dict(),
                "base_file": None if base is None else HEAD_BASE_FILE,
                "adapters": {n: None if h is None else h.labels.to_dict() for n, h in self.heads.items()},
            }
        return {
            "ids_input": ADAPTER_IDS,
            "base_slot": BASE_SLOT,
            "slot_axis": SLOT_AXIS,
            "slots": self.slots,
            "adapter_files": {n: str(self.adapter_file(Path(ADAPTERS_DIR).parent, n)) for n in self.names},
            "base_model_prefix": self.base_model_prefix,
            "model_type": self.model_type,
            "tensors": layout_to_dict(self.layout),
            "unused_modules": [u.to_dict() for u in self.unused],
            "head": head,
            # what registration compares an adapter's base weights with (bank_base_matches): digests, not values
            "base_weights": {name: d.to_dict() for name, d in sorted(self.base_digests().items())},
            # what serve and validate check an adapter file against before reading it
            "adapter_digests": {name: self.adapter_digests[name].to_dict() for name in self.names},
            # what registering an exported adapter compares with the graph's base (its file carries no config)
            "adapter_bases": {name: self.adapter_bases[name] for name in self.names if name in self.adapter_bases},
        }

    def base_digests(self) -> dict[str, BaseDigest]:
        """The :class:`BaseDigest` of each parameter an adapter can carry as a base weight (the embeddings', every
        adapted module's, those left out included), as :attr:`model` holds it now: after the export cast it to the
        graph's dtype, the graph's values."""
        modules = [entry.module for entry in self.layout.values()] + [u.module for u in self.unused]
        return model_base_digests(self.model, list(dict.fromkeys(modules)))
