"""PEFT C3A interop: read an adapter saved by ``peft.C3AConfig`` and write one PEFT can load.

PEFT's C3A (peft 0.21) stores ``base_model.model.<path>.c3a_kernel`` of shape (d_out/b, d_in/b, b)
in **first-row** layout, and its ΔW is scaled by **1/in_features**:

    ΔW_peft = BlockCirculant_first_row(k) / in_features

bca-deploy's ΔW = scaling · BlockCirculant_first_column(w), so ``w = flip_circulant_layout(k)`` and
``scaling = 1 / in_features`` reproduce it exactly (the kernel values are moved, never rounded).
Going back, ``k = flip(w) · (scaling · in_features)``, and the multiplication is skipped when that
factor is 1, so a PEFT → bca-deploy → PEFT round trip is bit-exact.

PEFT's config has no place for bca-deploy's task record (the head's modules, ``num_labels``, ``id2label``):
a PEFT copy keeps it in the safetensors file's metadata (:data:`TASK_METADATA_KEY`, which PEFT never
reads), so a bca-deploy → PEFT → bca-deploy round trip keeps the labels.

peft itself is not imported here: conversion works on files and tensors only.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .config import (
    FORMAT_NAME,
    KERNEL_SUFFIX,
    AdapterConfig,
    ModuleSpec,
    TaskSpec,
    parse_json_object,
    show_json_value,
)
from .errors import AdapterFormatError, format_problems
from .ops import flip_circulant_layout

__all__ = ["is_peft_config", "from_peft", "to_peft", "peft_metadata", "describe_format", "format_name", "PEFT_PREFIX",
           "PEFT_KERNEL_SUFFIX", "PEFT_TASK_TYPES", "TASK_METADATA_KEY"]

PEFT_PREFIX = "base_model.model."
PEFT_KERNEL_SUFFIX = ".c3a_kernel"
_PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release this writer was verified against
#: bca-deploy task type -> PEFT ``task_type`` (what ``AutoPeftModelFor*`` and ``PeftModel.from_pretrained`` read).
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}
#: safetensors metadata key of a PEFT copy's bca-deploy task record (JSON of :meth:`TaskSpec.to_dict`).
TASK_METADATA_KEY = "bca_deploy.task"


def is_peft_config(data: dict[str, Any]) -> bool:
    return "peft_type" in data


def format_name(data: dict[str, Any]) -> str:
    """``"bca-deploy adapter"``, ``"PEFT C3A adapter"``, ``"PEFT LORA adapter"``... for a parsed ``adapter_config.json``."""
    if is_peft_config(data):
        return f"PEFT {data.get('peft_type')} adapter"
    return "bca-deploy adapter" if data.get("format") == FORMAT_NAME else "adapter of unknown format"


def describe_format(data: dict[str, Any], directory: str = "DIR") -> str:
    """Which format an ``adapter_config.json`` (parsed) is in, and what loads or converts it, in one line.

    PEFT cannot read bca-deploy's own format (``PeftModel.from_pretrained`` fails on it with its own
    error), so this line says so and gives the conversion command.
    """
    if is_peft_config(data):
        peft_type = data.get("peft_type")
        if peft_type != "C3A":
            return (f"PEFT {peft_type} adapter: bca-deploy reads PEFT adapters of type C3A only")
        task = data.get("task_type") or "no task_type"
        return (f"PEFT C3A adapter ({task}): loads with peft.PeftModel.from_pretrained and with bca_deploy.load_adapter; "
                f"bca-deploy convert --adapter {directory} --to bca --out OUT writes bca-deploy's format")
    if data.get("format") == FORMAT_NAME:
        return (f"bca-deploy adapter (format version {data.get('format_version')}): loads with bca_deploy.load_adapter; "
                f"PEFT cannot read it: bca-deploy convert --adapter {directory} --to peft --out OUT writes a PEFT C3A "
                "copy (Linear targets only)")
    return "unknown adapter format: neither bca-deploy's ('format': 'bca-deploy') nor PEFT's ('peft_type')"


def from_peft(
    peft_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    model_layer_types: dict[str, str] | None = None,
    source: str = "PEFT adapter",
    metadata: dict[str, str] | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Convert a PEFT C3A config + state dict to a bca-deploy config + tensors.

    Args:
        peft_config: the parsed ``adapter_config.json``.
        state: the tensors of ``adapter_model.safetensors``.
        model_layer_types: optional ``{path: "linear"|"conv1d"}`` from the target model (PEFT's C3A
            only supports Linear, so this only matters for error messages).
        source: name used in error messages (the directory).
        metadata: the safetensors file's metadata; a task record written by :func:`peft_metadata` is used
            when it is for the same task as PEFT's ``task_type`` (a copy whose ``task_type`` was edited
            since keeps the edit).

    Returns:
        (config, tensors) where tensors are keyed as in bca-deploy files: ``<path>.bca_kernel`` in
        first-column layout, plus ``<module>.<param>`` for PEFT's ``modules_to_save``.
    """
    peft_type = peft_config.get("peft_type")
    if peft_type != "C3A":
        raise AdapterFormatError(
            f"{source}: is a PEFT {peft_type} adapter; bca-deploy reads PEFT adapters of type C3A only"
        )
    if peft_config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"{source}: bias={peft_config['bias']!r} is not supported (bca-deploy adapters train no biases)"
        )
    problems: list[str] = []
    for name in ("block_size",):
        value = peft_config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{name} must be a positive integer, got {value!r}")
    target = peft_config.get("target_modules")
    if target is not None and not isinstance(target, str) and not (
            isinstance(target, list) and all(isinstance(t, str) for t in target)):
        problems.append(f"target_modules must be a string (a regex) or a list of module names, "
                        f"got {show_json_value(target)}")
    init = peft_config.get("init_weights")
    if init is not None and not isinstance(init, (bool, str)):
        problems.append(f"init_weights must be true, false or a method name such as 'gaussian', "
                        f"got {show_json_value(init)}")
    if not isinstance(peft_config.get("base_model_name_or_path"), (str, type(None))):
        problems.append(f"base_model_name_or_path must be a string, got {show_json_value(peft_config['base_model_name_or_path'])}")
    pattern = peft_config.get("block_size_pattern")
    if pattern is not None and not (isinstance(pattern, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pattern.values())):
        problems.append(f"block_size_pattern must map names to positive integers, got {pattern!r}"[:200])
    specs: dict[str, ModuleSpec] = {}
    kernels: dict[str, torch.Tensor] = {}  # PEFT's first-row kernels, converted once every check has passed
    tensors: dict[str, torch.Tensor] = {}
    extra_modules: list[str] = []
    base_copies: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"tensor {key!r}: expected a name starting with {PEFT_PREFIX!r}")
            continue
        path = key[len(PEFT_PREFIX):]
        if path.endswith(PEFT_KERNEL_SUFFIX):
            module = path[: -len(PEFT_KERNEL_SUFFIX)]
            if tensor.ndim != 3:
                problems.append(f"tensor {key!r}: shape {tuple(tensor.shape)}, expected (d_out/b, d_in/b, b)")
                continue
            if min(tensor.shape) < 1 or not tensor.dtype.is_floating_point:
                problems.append(f"tensor {key!r}: {tensor.dtype} {tuple(tensor.shape)}; expected a non-empty real "
                                "floating-point kernel")
                continue
            o, q, b = tensor.shape
            specs[module] = ModuleSpec(
                block_size=int(b),
                scaling=1.0 / (q * b),
                in_features=int(q * b),
                out_features=int(o * b),
                layer_type=(model_layer_types or {}).get(module, "linear"),
            )
            found = specs[module].problems(key)
            if found:  # checked before converting: a sparse file must not make us allocate its apparent size
                problems += found
                continue
            kernels[module] = tensor
        elif path.rpartition(".")[0].endswith(_PEFT_BASE_LAYER):
            # PEFT's save_embedding_layers (on by default when lm_head / embed_tokens are targets) saves the wrapped
            # layer's own frozen weights beside its kernel: the base model's, which the model supplies; checked
            # against the kernel's dimensions once every kernel is read, then left out
            base_copies[path] = tensor
        else:
            # modules_to_save: PEFT stores the trained copy under the plain module path.
            tensors[path] = tensor
            module = _saved_module(path, peft_config.get("modules_to_save"))
            if module not in extra_modules:
                extra_modules.append(module)
    problems += _base_copy_problems(base_copies, specs)
    if problems:
        raise AdapterFormatError(format_problems(f"{source}: not a valid PEFT C3A adapter:", problems))
    if not specs:
        raise AdapterFormatError(f"{source}: no '*{PEFT_KERNEL_SUFFIX}' tensors found; is this a C3A adapter?")
    task = _task_from_peft(peft_config.get("task_type"))
    recorded = _recorded_task(metadata, extra_modules, source)
    if recorded is not None and (task is None or recorded.type == task.type):
        task = recorded
    config = AdapterConfig(
        target_modules=sorted(target) if isinstance(target, (list, set)) else (target or sorted(specs)),
        block_size=int(peft_config.get("block_size", next(iter(specs.values())).block_size)),
        block_size_pattern={k: int(v) for k, v in (peft_config.get("block_size_pattern") or {}).items()},
        scaling=1.0,
        init="zeros" if peft_config.get("init_weights") is True else _peft_init_name(peft_config.get("init_weights")),
        modules=specs,
        modules_to_save=extra_modules,
        base_model_type=None,
        base_model_name_or_path=peft_config.get("base_model_name_or_path"),
        task=task,
    )
    for module, kernel in kernels.items():
        tensors[module + KERNEL_SUFFIX] = flip_circulant_layout(kernel.float())
    return config, tensors


_PEFT_BASE_LAYER = ".base_layer"


def _base_copy_problems(copies: dict[str, torch.Tensor], specs: dict[str, ModuleSpec]) -> list[str]:
    """What is wrong with PEFT's saved copies of adapted layers' base weights (``<module>.base_layer.weight`` /
    ``.bias``): each must belong to an adapted module and have its layer's shape (out, in) / (out,)."""
    problems = []
    for path, tensor in copies.items():
        layer, _, param = path.rpartition(".")
        module = layer[: -len(_PEFT_BASE_LAYER)]
        spec = specs.get(module)
        expected = None if spec is None else {"weight": (spec.out_features, spec.in_features),
                                              "bias": (spec.out_features,)}.get(param)
        if spec is None:
            problems.append(f"tensor {PEFT_PREFIX + path!r}: a base-layer weight of {module}, which the adapter does "
                            "not adapt")
        elif expected is None or tuple(tensor.shape) != expected:
            problems.append(f"tensor {PEFT_PREFIX + path!r}: shape {tuple(tensor.shape)}, expected the base layer's "
                            f"{param} of {module}, {expected}")
    return problems


def _saved_module(path: str, entries: Any) -> str:
    """The module a saved-whole tensor ``path`` belongs to: the outermost module on its path that one of PEFT's
    ``modules_to_save`` entries names (PEFT's rule: the path is the entry or ends with ``.<entry>``), so a nested
    head (RoBERTa's ``classifier.dense``, ``classifier.out_proj``) stays the one module ``classifier`` it was saved
    as; else the tensor's own module (a config without the list)."""
    names = [e for e in entries if isinstance(e, str) and e] if isinstance(entries, list) else []
    parts = path.split(".")[:-1]
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(prefix == e or prefix.endswith("." + e) for e in names):
            return prefix
    return path.rpartition(".")[0]


def _recorded_task(metadata: dict[str, str] | None, modules_to_save: list[str], source: str) -> TaskSpec | None:
    """The task record a PEFT copy carries in its safetensors metadata, checked like a bca-deploy config's."""
    raw = (metadata or {}).get(TASK_METADATA_KEY)
    if raw is None:
        return None
    where = f"{source}: safetensors metadata {TASK_METADATA_KEY!r}"
    task = TaskSpec.from_dict(parse_json_object(str(raw), where, "task record"), where)
    problems = task.problems(modules_to_save)
    if problems:
        raise AdapterFormatError(format_problems(f"{where}: invalid task record:", problems))
    return task


def peft_metadata(config: AdapterConfig) -> dict[str, str]:
    """The safetensors metadata of a PEFT copy of an adapter with ``config``: PEFT's own, plus the task record."""
    metadata = {"format": "pt"}
    if config.task is not None:
        metadata[TASK_METADATA_KEY] = json.dumps(config.task.to_dict(), sort_keys=True)
    return metadata


def _task_from_peft(task_type: Any) -> TaskSpec | None:
    """A PEFT ``task_type`` as a :class:`TaskSpec` (no head record: a saved classifier stays in
    ``modules_to_save`` and the base model's config gives its labels)."""
    for ours, theirs in PEFT_TASK_TYPES.items():
        if task_type == theirs:
            return TaskSpec(type=ours)
    return None


def _peft_init_name(init: Any) -> str:
    return {"gaussian": "normal", "kaiming_uniform": "kaiming_uniform"}.get(init, "xavier_uniform")


def to_peft(
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a bca-deploy config + tensors to PEFT C3A's ``adapter_config.json`` + state dict.

    The result loads with ``peft.AutoPeftModelFor*.from_pretrained(directory)``, which reads
    ``task_type`` (which class) and ``base_model_name_or_path`` (which base model).

    Args:
        config, tensors: the adapter.
        task_type: PEFT's ``task_type`` (``SEQ_CLS``, ``CAUSAL_LM``, ``FEATURE_EXTRACTION``...); default:
            from the adapter's recorded task (:data:`PEFT_TASK_TYPES`), else none.
        base_model_name_or_path: default: the base model the adapter records.

    Raises:
        AdapterFormatError: an adapted module is a ``Conv1D`` (PEFT's C3A supports Linear only).
    """
    recorded = PEFT_TASK_TYPES.get(config.task.type) if config.task is not None else None
    if task_type is None:
        task_type = recorded
    elif recorded is not None and task_type != recorded:
        raise AdapterFormatError(f"task_type {task_type!r} contradicts the adapter, which was trained for "
                                 f"{config.task.type} (PEFT {recorded}); leave --task-type out to use it")
    conv = [n for n, s in config.modules.items() if s.layer_type != "linear"]
    if conv:
        raise AdapterFormatError(
            "PEFT's C3A supports torch.nn.Linear only; these adapted modules are Conv1D: " + ", ".join(sorted(conv))
        )
    state: dict[str, torch.Tensor] = {}
    for name, spec in config.modules.items():
        kernel = tensors[name + KERNEL_SUFFIX].float()
        factor = spec.scaling * spec.in_features
        k = flip_circulant_layout(kernel)
        if abs(factor - 1.0) > 1e-12:
            k = k * factor
        state[PEFT_PREFIX + name + PEFT_KERNEL_SUFFIX] = k.contiguous()
    for key, tensor in tensors.items():
        if not key.endswith(KERNEL_SUFFIX):
            state[PEFT_PREFIX + key] = tensor.contiguous()
    block_sizes = {n: s.block_size for n, s in config.modules.items()}
    default = max(set(block_sizes.values()), key=list(block_sizes.values()).count)
    peft_config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or config.base_model_name_or_path,
        "bias": "none",
        "block_size": default,
        # Exact paths as targets: PEFT matches a list entry equal to the module path.
        "block_size_pattern": _peft_block_size_pattern(block_sizes, default),
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "peft_type": "C3A",
        "peft_version": _PEFT_VERSION_WRITTEN,
        "revision": None,
        "target_modules": sorted(config.modules),
        "task_type": task_type,
    }
    return peft_config, state


def _peft_block_size_pattern(block_sizes: dict[str, int], default: int) -> dict[str, int]:
    """Per-module overrides PEFT will apply to exactly the intended modules.

    PEFT tests ``re.match(rf".*\\.{key}$", path)``, which needs a dot before the key, so a full path
    never matches itself; the path minus its first component does, and is escaped so it matches
    nothing else among the adapted modules.
    """
    import re

    pattern: dict[str, int] = {}
    for name, p in sorted(block_sizes.items()):
        if p == default:
            continue
        head, dot, tail = name.partition(".")
        if not dot:
            raise AdapterFormatError(
                f"module {name!r} is at the top level with block size {p} != default {default}; "
                "PEFT's block_size_pattern cannot select it"
            )
        key = re.escape(tail)
        clashes = [n for n in block_sizes if n != name and re.match(rf".*\.{key}$", n) and block_sizes[n] != p]
        if clashes:
            raise AdapterFormatError(f"cannot write a PEFT block_size_pattern for {name!r}: it would also match {clashes}")
        pattern[key] = p
    return pattern
