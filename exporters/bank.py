"""Adapter-bank graphs: one unmerged graph that serves many adapters, chosen per row by ``adapter_ids``.

An unmerged export (:mod:`bca_deploy.exporters.graph`) mixes the spectra of a layer's input with one
frequency-domain constant ``W`` of shape (2, 2F, q, o). A bank graph replaces every such constant by
a **graph input** holding a stack of them, one slot per adapter::

    <module>.bca_freq_p<p>   (2, 2F, S, q, o)  float32   slot s = adapter s; slot 0 = zeros (base only)
    adapter_ids              (batch,)          int64     the slot of each row

and each layer gathers its rows' slots before the mix, so row b is multiplied by slot
``adapter_ids[b]`` only::

    Wb = Gather(bank, adapter_ids, axis=2)       (2, 2F, B, q, o)
    P  = X.view(1, 2F, B, T, q) @ Wb             (2, 2F, B, T, o)   (was (1, 2F, N, q) @ W)

Everything before and after the mix is the single-adapter graph unchanged, so a bank costs a Gather of
``B`` small kernels per layer over the single-adapter graph. The bank tensors are initializers listed
as graph inputs: run the graph with only ``adapter_ids`` and the adapters it was exported with are
used (slot i = the i-th adapter, in export order); feed the bank inputs to serve any other set of
adapters (what :class:`bca_deploy.serving.MultiAdapterSession` does, with only the slots a batch
needs); or activate one adapter file per run (``adapters/<name>.onnx_adapter``, an onnxruntime
``AdapterFormat`` file holding every bank tensor as two slots: zeros and the adapter) with
``RunOptions.add_active_adapter``, then ``adapter_ids`` is 1 for adapted rows and 0 for base rows.

The graph is rewritten with ``onnx`` after optimum-onnx has exported the single-adapter graph with
placeholder constants; nothing here depends on how optimum names other tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bca_deploy.config import KERNEL_SUFFIX, AdapterConfig
from bca_deploy.errors import AdapterMismatchError, format_problems
from bca_deploy.inject import bca_layers
from bca_deploy.layers import BCALinear

from .errors import ExportError
from .graph import _FREQ_PREFIX, frequency_kernels
from .validate import ADAPTER_IDS

__all__ = [
    "ADAPTER_IDS",
    "BASE_SLOT",
    "SLOT_AXIS",
    "ADAPTERS_DIR",
    "ADAPTER_FILE_SUFFIX",
    "BankTensor",
    "bank_layout",
    "placeholder_kernels",
    "model_adapter_tensors",
    "adapter_tensors",
    "stack_bank",
    "rewrite_as_bank",
    "write_adapter_file",
    "layout_to_dict",
    "layout_from_dict",
]

#: Slot 0 of every bank is zeros: the base model alone.
BASE_SLOT = 0
#: The slot axis of a bank tensor (2, 2F, S, q, o).
SLOT_AXIS = 2
#: Sub-directory of an export holding one onnxruntime AdapterFormat file per adapter.
ADAPTERS_DIR = "adapters"
ADAPTER_FILE_SUFFIX = ".onnx_adapter"
#: dim_param of the slot axis in the graph's input declarations.
SLOTS_DIM = "bca_slots"


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
        """(2, 2F, q, o): one slot, as :func:`~bca_deploy.exporters.graph.frequency_kernels` returns it."""
        p = self.block_size
        return (2, 2 * (p // 2 + 1), self.in_features // p, self.out_features // p)

    def bank_shape(self, slots: int) -> tuple[int, int, int, int, int]:
        two, two_f, q, o = self.slot_shape
        return (two, two_f, slots, q, o)


def layout_to_dict(layout: Mapping[str, BankTensor]) -> list[dict]:
    return [dataclasses.asdict(t) for t in layout.values()]


def layout_from_dict(entries: Sequence[Mapping]) -> dict[str, BankTensor]:
    tensors = [BankTensor(**{f.name: e[f.name] for f in dataclasses.fields(BankTensor)}) for e in entries]
    return {t.name: t for t in tensors}


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


def _frequency(kernel: torch.Tensor, scaling: float) -> np.ndarray:
    # scaling · kernel in fp32 exactly as BCALinear.scaled_kernel computes it, then the float64 transform.
    k = kernel.detach().float()
    if scaling != 1.0:
        k = k * scaling
    return frequency_kernels(k).numpy()


def model_adapter_tensors(model: nn.Module, adapter_name: str, layout: Mapping[str, BankTensor]) -> dict[str, np.ndarray]:
    """The slot of adapter ``adapter_name`` (held by ``model``) in every bank input it touches: ``{name: (2, 2F, q, o)}``."""
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


def adapter_tensors(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, BankTensor],
    base_model_prefix: str = "",
    source: str = "adapter",
) -> dict[str, np.ndarray]:
    """An adapter read from disk (:func:`bca_deploy.read_adapter`) → its slot in every bank input it touches.

    Module paths that differ from the graph's only by ``base_model_prefix`` are aligned (an adapter
    trained on ``LlamaForCausalLM`` served by a ``LlamaModel`` graph). Every problem is collected and
    raised at once.

    Raises:
        AdapterMismatchError: a module the graph does not adapt, a block size or shape the bank does
            not hold, a missing or non-finite kernel, or ``modules_to_save`` (whole modules, e.g. a
            classifier head, cannot differ per row of one graph).
    """
    from bca_deploy.adapter_io import align_paths, kernel_problem

    modules = {entry.module for entry in layout.values()}
    config, state = align_paths(config, dict(state), base_model_prefix, lambda path: path in modules)
    problems: list[str] = []
    if config.modules_to_save:
        problems.append(
            f"it saves whole modules ({', '.join(config.modules_to_save)}), which every row of a bank graph shares; "
            "serve it merged (bca-deploy export --merge) or exported on its own"
        )
    tensors: dict[str, np.ndarray] = {}
    for path, spec in sorted(config.modules.items()):
        entry = BankTensor(path, spec.block_size, spec.in_features, spec.out_features, spec.layer_type)
        if entry.name not in layout:
            held = sorted(e.block_size for e in layout.values() if e.module == path)
            if held:
                problems.append(f"{path}: block size {spec.block_size}; the bank graph holds block size(s) "
                                f"{', '.join(map(str, held))} for this module")
            else:
                problems.append(f"{path}: not adapted in the bank graph (it adapts {len(modules)} modules, e.g. "
                                f"{', '.join(sorted(modules)[:3])})")
            continue
        bank_entry = layout[entry.name]
        if bank_entry != entry:
            problems.append(f"{path}: {spec.layer_type} {spec.in_features}→{spec.out_features}; the graph's module is "
                            f"{bank_entry.layer_type} {bank_entry.in_features}→{bank_entry.out_features}")
            continue
        problem = kernel_problem(state, path, spec)
        if problem is not None:
            problems.append(f"{path}: {problem}")
            continue
        tensors[entry.name] = _frequency(state[path + KERNEL_SUFFIX], spec.scaling)
    if problems:
        raise AdapterMismatchError(format_problems(f"{source} does not fit the bank graph:", problems))
    return tensors


def stack_bank(slots: Sequence[Mapping[str, np.ndarray] | None], layout: Mapping[str, BankTensor]) -> dict[str, np.ndarray]:
    """Bank inputs for ``slots`` (``None`` = zeros): ``{name: (2, 2F, S, q, o) float32}``, S = len(slots)."""
    banks: dict[str, np.ndarray] = {}
    for name, entry in layout.items():
        bank = np.zeros(entry.bank_shape(len(slots)), dtype=np.float32)
        for s, tensors in enumerate(slots):
            if tensors is not None and name in tensors:
                bank[:, :, s] = tensors[name]
        banks[name] = bank
    return banks


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


def rewrite_as_bank(onnx_path: str | Path, layout: Mapping[str, BankTensor], defaults: Mapping[str, np.ndarray]) -> None:
    """Turn the single-adapter graph at ``onnx_path`` (exported with :func:`placeholder_kernels`) into a bank graph.

    Each ``<module>.bca_freq_p<p>`` initializer of shape (2, 2F, q, o) becomes a graph input of shape
    (2, 2F, ``bca_slots``, q, o) with ``defaults[name]`` as its initializer, gathered by
    ``adapter_ids`` on the slot axis; the Reshape in front of each mix gains the batch axis. The file
    is rewritten in place (external data too, if the graph used it).

    Raises:
        ExportError: the graph does not have the expected structure (a bank input missing, or not
            consumed by a MatMul fed by a Reshape).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    graph = model.graph
    external = _uses_external_data(model) or sum(np.asarray(d).nbytes for d in defaults.values()) > 1 << 30
    initializers = {t.name: t for t in graph.initializer}
    missing = [name for name in layout if name not in initializers]
    if missing:
        raise ExportError(f"the exported graph has no initializer {missing[0]} (and {len(missing) - 1} more bank "
                          "inputs missing); cannot build the bank")
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    batch_shape = "bca_bank/batch"
    extra_inits = []
    new_nodes_before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    shape_heads: dict[int, str] = {}
    shape_tails: dict[int, str] = {}
    reshaped_outputs: set[str] = set()
    for name, entry in layout.items():
        _, two_f, q, _ = entry.slot_shape
        gathered = f"{name}/bank_gather"
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
            if k == 0:
                nodes.append(helper.make_node("Gather", [name, ADAPTER_IDS], [gathered], axis=SLOT_AXIS,
                                              name=f"{name}/BankGather"))
            new_nodes_before.setdefault(id(node), []).extend(nodes)
            reshaped_outputs.update(node.output)  # rank 4 → 5: drop any recorded shape
            node.input[0] = reshaped
            node.input[1] = gathered

    ordered = [helper.make_node("Shape", [ADAPTER_IDS], [batch_shape], name="bca_bank/Shape")]
    for node in graph.node:
        ordered.extend(new_nodes_before.get(id(node), []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(_prune_dead(ordered, {o.name for o in graph.output}))

    kept = [t for t in graph.initializer if t.name not in layout]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(extra_inits)
    for name, entry in layout.items():
        value = np.ascontiguousarray(defaults[name], dtype=np.float32)
        if value.shape[:SLOT_AXIS] + value.shape[SLOT_AXIS + 1:] != entry.slot_shape:
            raise ExportError(f"default bank for {name} has shape {value.shape}; expected {entry.bank_shape(-1)}")
        graph.initializer.append(numpy_helper.from_array(value, name))
    produced = {out for node in graph.node for out in node.output}
    stale = [v for v in graph.value_info if v.name not in produced or v.name in reshaped_outputs]
    for v in stale:
        graph.value_info.remove(v)
    batch_dim = _batch_dim(graph)
    graph.input.append(helper.make_tensor_value_info(ADAPTER_IDS, TensorProto.INT64, [batch_dim]))
    for name, entry in layout.items():
        two, two_f, q, o = entry.slot_shape
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [two, two_f, SLOTS_DIM, q, o]))

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


def _prune_dead(nodes: list, graph_outputs: set[str]) -> list:
    """Drop nodes none of whose outputs is used (the Reshapes the bank replaced, and their shape constants)."""
    while True:
        used = set(graph_outputs)
        for node in nodes:
            used.update(node.input)
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


# ---- per-adapter files ---------------------------------------------------------------------------


def write_adapter_file(path: str | Path, tensors: Mapping[str, np.ndarray], layout: Mapping[str, BankTensor]) -> Path:
    """Write an onnxruntime ``AdapterFormat`` file activating one adapter on a bank graph.

    It holds every bank input as a two-slot bank, ``[zeros, adapter]``: with it active
    (``RunOptions.add_active_adapter``), ``adapter_ids`` 1 selects the adapter and 0 the base model.
    """
    import onnxruntime as ort

    path = Path(path)
    banks = stack_bank([None, tensors], layout)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(bank) for name, bank in banks.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    adapter.export_adapter(str(tmp))
    os.replace(tmp, path)
    return path
