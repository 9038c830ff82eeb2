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
reads), so a bca-deploy → PEFT → bca-deploy round trip keeps the labels; the base model_type travels the same
way (:data:`BASE_MODEL_TYPE_METADATA_KEY`).

peft itself is not imported here: conversion works on files and tensors only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
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
from .fit import base_key, dtype_problem, split_base_key, tensor_problem
from .ops import flip_circulant_layout

__all__ = ["is_peft_config", "from_peft", "to_peft", "peft_metadata", "with_task_type", "describe_format",
           "format_name", "PEFT_PREFIX",
           "PEFT_KERNEL_SUFFIX", "PEFT_TASK_TYPES", "TASK_METADATA_KEY", "peft_saved_entries",
           "peft_saved_module"]

PEFT_PREFIX = "base_model.model."
PEFT_KERNEL_SUFFIX = ".c3a_kernel"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release this writer was verified against
#: bca-deploy task type -> PEFT ``task_type`` (what ``AutoPeftModelFor*`` and ``PeftModel.from_pretrained`` read).
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}
#: Every ``task_type`` PEFT reads (its ``TaskType``); another value (``"FOO"``, ``"seq_cls"``, ``1``) makes PEFT refuse
#: the file ("Invalid task type").
PEFT_ALL_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: safetensors metadata key of a PEFT copy's bca-deploy task record (JSON of :meth:`TaskSpec.to_dict`).
TASK_METADATA_KEY = "bca_deploy.task"
#: safetensors metadata key of a PEFT copy's recorded base ``model_type`` (PEFT's config has no field for it, and
#: without it the copy's fit check could not refuse a model of another architecture as the original's does).
BASE_MODEL_TYPE_METADATA_KEY = "bca_deploy.base_model_type"


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
    output_named_otherwise: str | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Convert a PEFT C3A config + state dict to a bca-deploy config + tensors.

    The kernels in the file are the adapted modules, each with its kernel's block size. The config must agree
    with them as PEFT reads it (:class:`_PeftRules`: ``target_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``exclude_modules``, ``modules_to_save``, ``block_size``, ``block_size_pattern``), since
    ``PeftModel.from_pretrained`` builds the adapted modules from the config and only then reads the kernels:

    - a kernel whose block size is not the one the config gives its module is refused (PEFT refuses the file);
    - a kernel for a module the config does not adapt is refused (PEFT ignores it, so PEFT's numbers and ours
      would differ);
    - given the model (``model_layer_types``), a Linear layer the config adapts without a kernel in the file is
      refused (PEFT would give it a new random kernel); with ``init_weights`` true PEFT's new kernel is zero, a
      no-op, so the file gives PEFT's numbers with that layer left unadapted, and loads;
    - given the model, a kernel for a layer that is no Linear (GPT-2's Conv1D) is refused: PEFT's C3A adapts
      ``torch.nn.Linear`` only (it raises TypeError for anything else), so no PEFT file has such a kernel.

    Args:
        peft_config: the parsed ``adapter_config.json``.
        state: the tensors of ``adapter_model.safetensors``.
        model_layer_types: optional ``{path: "linear"|"conv1d"}`` of the target model's layers: the layer types
            of the adapted modules (PEFT's C3A only supports Linear: another type is refused) and the Linear layers
            whose kernels must be in the file when the config adapts them (paths may differ from the file's by
            one ``base_model_prefix``).
        source: name used in error messages (the directory).
        metadata: the safetensors file's metadata; a task record written by :func:`peft_metadata` is used
            when it is for the same task as PEFT's ``task_type`` (a copy whose ``task_type`` was edited
            since keeps the edit).
        output_named_otherwise: the target model's output layer where transformers 4.x names it otherwise than
            5.x's ``lm_head`` (:func:`bca_deploy.fit.output_layer_named_otherwise`): a config adapting it whose file
            has no kernel for it is said to be of transformers 5.x, where that name matches nothing.

    Returns:
        (config, tensors) where tensors are keyed as in bca-deploy files: ``<path>.bca_kernel`` in
        first-column layout, plus ``<module>.<param>`` for PEFT's ``modules_to_save``
        (:func:`peft_saved_entries`), plus ``<module>.base_layer.<param>`` for every other tensor, which PEFT loads
        into the base model itself (its ``save_embedding_layers`` tensors: base weights,
        :func:`bca_deploy.fit.split_base_key`).

    Raises:
        AdapterFormatError: every problem at once (fields, tensors, and the config's disagreements with the
            kernels, each naming the module, the field and what was expected), before anything is converted.
    """
    peft_type = peft_config.get("peft_type")
    if peft_type != "C3A":
        raise AdapterFormatError(
            f"{source}: is a PEFT {peft_type} adapter; bca-deploy reads PEFT adapters of type C3A only"
        )
    if peft_config.get("bias", "none") not in ("none", "c3a_only"):
        raise AdapterFormatError(
            f"{source}: bias={peft_config['bias']!r} is not supported: bca-deploy reads the biases PEFT trains with "
            "bias='c3a_only' (those of the adapted layers) or none; with 'all' PEFT trains and saves every other bias "
            "of the model too (LayerNorms, unadapted layers, both copies of a saved module's), which bca-deploy does "
            "not load (train with bias='c3a_only' or 'none')"
        )
    problems: list[str] = []
    saved_entries = peft_saved_entries(peft_config)
    for name in ("block_size",):
        value = peft_config.get(name, PEFT_DEFAULT_BLOCK_SIZE)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, got {show_json_value(value)}")
    target = peft_config.get("target_modules")
    if target is not None and not isinstance(target, str) and not (
            isinstance(target, list) and all(isinstance(t, str) for t in target)):
        problems.append(f"target_modules must be a string (a regex) or a list of module names, "
                        f"got {show_json_value(target)}")
    init = peft_config.get("init_weights")
    if init is not None and not isinstance(init, (bool, str)):
        problems.append(f"init_weights must be true, false or a method name such as 'gaussian', "
                        f"got {show_json_value(init)}")
    task_type = peft_config.get("task_type")
    if task_type is not None and task_type not in PEFT_ALL_TASK_TYPES:
        # it was taken for no task (a classifier for its bare base model's task); PEFT refuses the file
        problems.append(f"task_type must be one of PEFT's task types ({', '.join(PEFT_ALL_TASK_TYPES)}) or null, got "
                        f"{show_json_value(task_type)} (PEFT refuses it: 'Invalid task type')")
    if not isinstance(peft_config.get("base_model_name_or_path"), (str, type(None))):
        problems.append(f"base_model_name_or_path must be a string, got {show_json_value(peft_config['base_model_name_or_path'])}")
    pattern = peft_config.get("block_size_pattern")
    if pattern is not None and not (isinstance(pattern, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pattern.values())):
        problems.append(f"block_size_pattern must map names to positive integers, got {pattern!r}"[:200])
    rules, rule_field_problems = _PeftRules.parse(peft_config)
    if problems:
        rules = None  # a field they are made of is wrong (reported above)
    problems += rule_field_problems
    specs: dict[str, ModuleSpec] = {}
    kernels: dict[str, torch.Tensor] = {}  # PEFT's first-row kernels, converted once every check has passed
    tensors: dict[str, torch.Tensor] = {}
    extra_modules: list[str] = []
    base_copies: dict[str, torch.Tensor] = {}
    bad_kernels: set[str] = set()  # modules whose kernel tensor is unusable (reported as such)
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            problems.append(f"tensor {key!r}: expected a name starting with {PEFT_PREFIX!r}")
            continue
        path = key[len(PEFT_PREFIX):]
        if path.endswith(PEFT_KERNEL_SUFFIX):
            module = path[: -len(PEFT_KERNEL_SUFFIX)]
            bad_dtype = dtype_problem(tensor.dtype)  # float8 too: the same rule as bca-deploy's own format
            if tensor.ndim != 3 or min(tensor.shape) < 1 or bad_dtype is not None:
                bad_kernels.add(module)
            if tensor.ndim != 3:
                problems.append(f"tensor {key!r}: shape {tuple(tensor.shape)}, expected (d_out/b, d_in/b, b)")
                continue
            if bad_dtype is not None:
                problems.append(f"tensor {key!r}: {bad_dtype}")
                continue
            if min(tensor.shape) < 1:
                problems.append(f"tensor {key!r}: shape {tuple(tensor.shape)}; expected a non-empty kernel")
                continue
            o, q, b = tensor.shape
            specs[module] = ModuleSpec(
                block_size=int(b),
                scaling=1.0 / (q * b),
                in_features=int(q * b),
                out_features=int(o * b),
                layer_type="linear",  # PEFT's C3A builds Linear layers only (a Conv1D is refused below)
            )
            found = specs[module].problems(key)
            if found:  # checked before converting: a sparse file must not make us allocate its apparent size
                problems += found
                continue
            if tensor.dtype == torch.float64 and not tensor.is_meta and (largest := float(torch.where(
                    torch.isfinite(tensor), tensor.abs(), 0).max())) > _FLOAT32_MAX:  # (a header read: no values)
                # finite in the file, Inf once held in float32 as every path holds kernels: was "has NaN/Inf values"
                problems.append(f"tensor {key!r}: float64 values up to {largest:.3g} overflow float32 (largest "
                                f"{_FLOAT32_MAX:.3g}), in which kernels are held: they would become Inf")
                continue
            if (bad := _own_tensor_problem(key, module, tensor)) is not None:
                problems.append(bad)
                continue
            kernels[module] = tensor
        elif split_base_key(path) is not None:
            # PEFT's save_embedding_layers (on by default when lm_head is a target) saves the adapted layer's own
            # frozen weight beside its kernel, which PEFT loads into the base layer: a base weight (checked against
            # the kernel's dimensions once every kernel is read)
            base_copies[path] = tensor
        elif (module := peft_saved_module(path.rpartition(".")[0], saved_entries)) is not None:
            # modules_to_save: PEFT stores the trained copy under the plain module path.
            if (bad := _own_tensor_problem(key, module, tensor)) is not None:
                problems.append(bad)
                continue
            tensors[path] = tensor
            if module not in extra_modules:
                extra_modules.append(module)
        else:
            # any other tensor PEFT loads into the base model itself (load_state_dict): save_embedding_layers' input
            # and output embeddings of a resized vocabulary; a base weight, named as bca-deploy names them
            module, _, param = path.rpartition(".")
            if not module:
                problems.append(f"tensor {key!r}: expected a parameter of a module (<module>.<param>)")
                continue
            if (PEFT_PREFIX + module + PEFT_KERNEL_SUFFIX) in state:
                problems.append(f"tensor {key!r}: {module} is adapted, so PEFT names its base layer's {param} "
                                f"{PEFT_PREFIX + base_key(module, param)!r} (and ignores this name)")
                continue
            tensors[base_key(module, param)] = tensor
    problems += _base_copy_problems(base_copies, specs)
    problems += _layer_type_problems(set(specs) | bad_kernels, model_layer_types)
    if rules is not None:
        problems += _rule_problems(rules, kernels, set(specs) | bad_kernels, model_layer_types,
                                   peft_config.get("init_weights", "xavier_uniform"), output_named_otherwise)
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
        base_model_type=_recorded_model_type(metadata, source),
        base_model_name_or_path=peft_config.get("base_model_name_or_path"),
        task=task,
    )
    for module, kernel in kernels.items():
        tensors[module + KERNEL_SUFFIX] = flip_circulant_layout(kernel.float())
    tensors.update(base_copies)  # <module>.base_layer.<param>: PEFT's name is bca-deploy's
    return config, tensors


def _own_tensor_problem(key: str, module: str, tensor: torch.Tensor) -> str | None:
    """The problem (:func:`~bca_deploy.fit.tensor_problem`: dtype, emptiness, NaN/Inf; a header's meta tensor: its dtype
    only) of one of the adapter's own tensors in a PEFT file, a kernel or a ``modules_to_save`` copy, named by the
    file's own key ``key`` and its ``module``, else None.

    The one rule for the name a user sees for a PEFT file's tensor: the adapter's own tensors are named as the file
    names them (``safetensors`` lists that key; converted, the later checks would name them by bca-deploy's keys,
    ``<module>.bca_kernel`` or ``classifier.weight``, which are in no file the user has), so they are checked here.
    Base weights (``save_embedding_layers``) are left to those checks, which name them by bca-deploy's
    ``<module>.base_layer.<param>`` beside "the base model's own <param> the adapter was trained with": what they are,
    whichever file held them."""
    bad = dtype_problem(tensor.dtype) if tensor.is_meta else tensor_problem(tensor)
    return None if bad is None else f"tensor {key!r} (module {module}): {bad}"


# ---- which modules a PEFT C3A config adapts, and with which block size (PEFT 0.21's rules) ---------------

#: ``C3AConfig.block_size``'s default: what PEFT uses when ``adapter_config.json`` has no ``block_size``.
PEFT_DEFAULT_BLOCK_SIZE = 256
#: PEFT's ``target_modules`` shorthand for every Linear layer, expanded against the model by ``get_peft_model``
#: (a saved config lists the modules it stood for).
_ALL_LINEAR = "all-linear"


@dataclass
class _PeftRules:
    """The fields of a PEFT C3A config that decide which modules PEFT adapts and each one's block size, checked.

    PEFT (``peft.tuners.tuners_utils.check_target_module_exists`` and ``C3AModel._create_and_replace``) adapts
    module ``key`` (its path in the model PEFT wrapped, as the file names it) unless ``exclude_modules`` names it,
    unless it is inside a ``modules_to_save`` entry; then when ``target_modules`` selects it: a string is a regex
    matched against the whole path, a list names paths or path ends (``key == t`` or ``key.endswith("." + t)``),
    and with a list ``layers_to_transform`` keeps only modules in those layers, the layer index being the number
    after ``layers_pattern`` (or after the path's second part when no pattern is given). Its block size is the
    value of the first ``block_size_pattern`` key ``k`` for which ``.*\\.k$`` matches the path, else of a key equal
    to the path, else ``block_size``.

    ``exclude_modules`` is no field of peft 0.21's ``C3AConfig`` (``PeftModel.from_pretrained`` drops it with a
    warning); it is honoured here as every tuner that has it honours it, since a file that carries it was trained
    with those modules left out.
    """

    target: list[str] | str | None
    layers: list[int] | int | None
    layers_pattern: list[str]
    exclude: list[str] | str | None
    modules_to_save: list[str]
    block_size: int
    block_size_field: str
    block_size_pattern: dict[str, int]
    entries: int = 0  # how many names and patterns the fields above hold (what matching one path costs)
    _compiled: dict[str, re.Pattern] = field(default_factory=dict, repr=False)

    def _re(self, regex: str) -> re.Pattern:
        """``regex`` compiled once per config (re's own cache holds 512: more entries would be compiled per path)."""
        if regex not in self._compiled:
            self._compiled[regex] = re.compile(regex)
        return self._compiled[regex]

    @classmethod
    def parse(cls, peft_config: dict[str, Any]) -> tuple[_PeftRules | None, list[str]]:
        """The rules of ``peft_config`` and every problem with the fields they are made of (the rules are None when
        there is one: what PEFT would adapt is then unknown). Field types of ``block_size``, ``target_modules`` and
        ``block_size_pattern`` are checked by :func:`from_peft` itself; here only what that leaves."""
        problems: list[str] = []
        target = peft_config.get("target_modules")
        layers = peft_config.get("layers_to_transform")
        pattern = peft_config.get("layers_pattern")
        exclude = peft_config.get("exclude_modules")
        saved = peft_config.get("modules_to_save")
        if layers is not None and not _is_index(layers) and not (
                isinstance(layers, list) and all(_is_index(i) for i in layers)):
            problems.append(f"layers_to_transform must be a layer index or a list of them, "
                            f"got {show_json_value(layers)}")
        if pattern is not None and not isinstance(pattern, str) and not (
                isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)):
            problems.append(f"layers_pattern must be a string or a list of strings, got {show_json_value(pattern)}")
        if exclude is not None and not isinstance(exclude, str) and not (
                isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
            problems.append(f"exclude_modules must be a string (a regex) or a list of module names, "
                            f"got {show_json_value(exclude)}")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
            problems.append(f"modules_to_save must be a list of module names, got {show_json_value(saved)}")
        if isinstance(target, str):
            for name, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
                if value is not None:
                    problems.append(f"{name} is {show_json_value(value)}, but target_modules is a regex "
                                    f"({target[:80]!r}); PEFT's C3AConfig refuses {name} with a regex target: "
                                    f"set it to null or give target_modules as a list of names")
        regexes = []  # (what, the regular expression PEFT builds from it)
        if isinstance(target, str) and target != _ALL_LINEAR:
            regexes.append(("target_modules", target))
        if isinstance(exclude, str):
            regexes.append(("exclude_modules", exclude))
        for entry in saved if isinstance(saved, list) else []:
            if isinstance(entry, str):
                regexes.append((f"modules_to_save entry {entry[:80]!r}", _inside_saved(entry)))
        for entry in [pattern] if isinstance(pattern, str) else pattern if isinstance(pattern, list) else []:
            if isinstance(entry, str):
                regexes.append((f"layers_pattern {entry[:80]!r}", _layer_index(entry)))
        block_pattern = peft_config.get("block_size_pattern") or {}
        for key in block_pattern if isinstance(block_pattern, dict) else ():
            if not isinstance(key, str):
                problems.append(f"block_size_pattern key {show_json_value(key)} is not a string")
                continue
            regexes.append((f"block_size_pattern key {key[:80]!r}", _sized(key)))
        entries = len(regexes) + sum(len(v) for v in (target, layers) if isinstance(v, list))
        if entries > _MAX_RULE_ENTRIES:
            # Each entry is compiled and matched against every module path (a store entry a server loads: 300,000
            # block_size_pattern keys took minutes): such a config is not cross-checked, as an unbounded pattern is not.
            return None, problems
        for what, regex in regexes:
            try:
                re.compile(regex)
            except re.error as exc:
                problems.append(f"{what} is not a valid regular expression ({exc.msg}); PEFT matches it as one")
        block_size = peft_config.get("block_size", PEFT_DEFAULT_BLOCK_SIZE)
        target_ok = target is None or isinstance(target, str) or (
            isinstance(target, list) and all(isinstance(t, str) for t in target))
        sizes_ok = _is_index(block_size) and block_size > 0 and isinstance(block_pattern, dict) and all(
            _is_index(v) and v > 0 for v in block_pattern.values())
        if problems or not target_ok or not sizes_ok:  # the last two: reported by from_peft
            return None, problems
        if not all(_bounded_regex(regex) for _, regex in regexes):
            # Python's re backtracks: "(.*)*x" takes longer than the universe's age on a 40-character path, and these
            # strings come from the file (a store entry a server loads). Such a config is not cross-checked: its
            # kernels alone say what is adapted, as before the rules were checked (PEFT itself would hang on it).
            return None, problems
        return cls(
            target=sorted(target) if isinstance(target, list) else target,
            layers=layers if not isinstance(layers, list) or layers else None,  # PEFT: an empty list selects all
            # PEFT: null, "" or [] means the default layer-index rule; a list's entries are tried in turn
            layers_pattern=([pattern] if isinstance(pattern, str) and pattern
                            else pattern if isinstance(pattern, list) else []),
            exclude=exclude or None,
            modules_to_save=peft_saved_entries(peft_config),
            block_size=block_size,
            block_size_field="block_size" if "block_size" in peft_config
            else f"block_size (absent: PEFT's default {PEFT_DEFAULT_BLOCK_SIZE})",
            block_size_pattern=dict(block_pattern),
            entries=entries,
        ), []

    @property
    def selects(self) -> bool:
        """Whether the rules say which modules are adapted without the model: ``target_modules`` null (PEFT's
        default targets for the model type) or ``"all-linear"`` do not."""
        return self.target is not None and self.target != _ALL_LINEAR

    def describe(self) -> str:
        """The fields that select modules, as set (for messages)."""
        parts = [f"target_modules {_short(self.target)}"]
        if self.layers is not None:
            parts.append(f"layers_to_transform {self.layers!r}")
            if self.layers_pattern:
                parts.append(f"layers_pattern {self.layers_pattern!r}")
        if self.exclude is not None:
            parts.append(f"exclude_modules {_short(self.exclude)}")
        if self.modules_to_save:
            parts.append(f"modules_to_save {self.modules_to_save!r}")
        return ", ".join(parts)

    def why_not(self, key: str) -> str | None:
        """Why PEFT does not adapt module ``key`` (a path as the file names it), or None when it does."""
        exclude = self.exclude
        if isinstance(exclude, str):
            if self._re(exclude).fullmatch(key):
                return f"exclude_modules {exclude!r} matches it"
        elif exclude is not None:
            hit = next((e for e in exclude if key == e or key.endswith("." + e)), None)
            if hit is not None:
                return f"exclude_modules entry {hit!r} excludes it"
        inside = next((m for m in self.modules_to_save if self._re(_inside_saved(m)).match(key)), None)
        if inside is not None:
            return f"it is inside modules_to_save entry {inside!r}, which PEFT saves whole and never adapts"
        target = self.target
        if isinstance(target, str):
            return None if self._re(target).fullmatch(key) else f"target_modules {target!r} does not match its whole path"
        if key in target:
            return None  # named exactly: layers_to_transform does not apply
        if not any(key.endswith("." + t) for t in target):
            return f"target_modules {_short(target)} names neither it nor its path's end"
        if self.layers is None:
            return None
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for layer_pattern in self.layers_pattern:
                match = self._re(_layer_index(layer_pattern)).match(key)
                if match is not None:
                    break
        if match is None:
            how = (f"after layers_pattern {self.layers_pattern!r}" if self.layers_pattern
                   else "after its path's second part")
            return f"layers_to_transform {self.layers!r} is set, and its path has no layer index {how}"
        index = int(match.group("idx"))
        wanted = [self.layers] if isinstance(self.layers, int) else self.layers
        if index not in wanted:
            return f"it is in layer {index}, not in layers_to_transform {self.layers!r}"
        return None

    def block_size_of(self, key: str) -> tuple[int, str]:
        """The block size PEFT gives module ``key``, and the config field it comes from."""
        for pattern_key, value in self.block_size_pattern.items():
            if self._re(_sized(pattern_key)).match(key):
                return value, f"block_size_pattern[{pattern_key!r}]"
        if key in self.block_size_pattern:
            return self.block_size_pattern[key], f"block_size_pattern[{key!r}]"
        return self.block_size, self.block_size_field


#: The most names and patterns (``target_modules`` and ``layers_to_transform`` entries, ``modules_to_save`` entries,
#: ``block_size_pattern`` keys...) a PEFT config may hold to be cross-checked against its kernels, and the most
#: matches of one against the paths (entries x paths): real configs list at most one entry per adapted module (a
#: 126-layer model's 7 projections: 882). Past either, the config is not cross-checked (never refused): its kernels
#: alone say what is adapted, as for a pattern whose backtracking is unbounded.
_MAX_RULE_ENTRIES = 10_000
_MAX_RULE_MATCHES = 2_000_000
#: Module paths longer than this are not matched against a config's regular expressions (real ones are under 200
#: characters); with _MAX_UNBOUNDED_REPEATS, the bound on how long one match can backtrack.
_MAX_MATCHED_PATH = 200
#: The most unbounded repeats (``*``, ``+``, ``{n,}``) a config's regular expression may hold to be matched: a
#: pattern with k of them can backtrack about len(path)^k / k! steps on each path (20,000 at k = 2 here).
_MAX_UNBOUNDED_REPEATS = 2
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})


def _bounded_regex(regex: str) -> bool:
    """Whether matching ``regex`` against a module path of at most :data:`_MAX_MATCHED_PATH` characters takes bounded
    time: no repeated group that holds another repeat or an alternation (``(.*)*``, ``(a|a)+``: exponential
    backtracking), no backreference, at most :data:`_MAX_UNBOUNDED_REPEATS` unbounded repeats (polynomial). What
    PEFT's configs usually hold passes (``.*\\.(q_proj|v_proj)``, ``^(?!.*lm_head).*``, ``.*decoder.*(q|v)$``); a
    pattern that does not is not cross-checked (see :meth:`_PeftRules.parse`), never refused."""
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    try:
        tree = parser.parse(regex)
    except Exception:  # not compiled: reported where it is compiled
        return False
    unbounded = 0

    def bounded(items: Any, repeated: bool) -> bool:
        nonlocal unbounded
        for op, av in items:
            name = getattr(op, "name", str(op))
            if name in _REPEATS:
                low, high, body = av
                many = high > 1
                if many and repeated:
                    return False
                unbounded += high == parser.MAXREPEAT
                if not bounded(body, repeated or many):
                    return False
            elif name == "BRANCH":
                if repeated or not all(bounded(alt, repeated) for alt in av[1]):
                    return False
            elif name == "SUBPATTERN":
                if not bounded(av[-1], repeated):
                    return False
            elif name in ("ASSERT", "ASSERT_NOT"):
                if not bounded(av[1], repeated):
                    return False
            elif name == "ATOMIC_GROUP":
                if not bounded(av, repeated):
                    return False
            elif name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE",
                          "GROUPREF_UNI_IGNORE"):
                return False
        return True

    return bounded(tree, False) and unbounded <= _MAX_UNBOUNDED_REPEATS


# The regular expressions PEFT builds from the config's strings (checked once in _PeftRules.parse, used where matched).
def _inside_saved(entry: str) -> str:
    """A module path inside ``modules_to_save`` entry ``entry`` (PEFT never adapts one)."""
    return rf"(^|.*\.){entry}($|\..*)"


def _layer_index(layers_pattern: str) -> str:
    """A module path's layer index, the number after ``layers_pattern`` (group ``idx``)."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _sized(key: str) -> str:
    """A module path that ``block_size_pattern`` key ``key`` gives its size (a suffix match)."""
    return rf".*\.{key}$"


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut at ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rule_problems(rules: _PeftRules, kernels: dict[str, torch.Tensor], source_paths: set[str],
                   model_layer_types: dict[str, str] | None, init_weights: Any,
                   output_named_otherwise: str | None = None) -> list[str]:
    """Every way the file's kernels disagree with the config's rules (:class:`_PeftRules`): a kernel whose block size
    is not the one the config gives its module (PEFT refuses to load it: size mismatch); a kernel for a module the
    rules do not adapt (PEFT ignores it: the module runs unadapted); and, given the model's layers
    (``model_layer_types``), a Linear layer the rules adapt without a kernel in the file (PEFT gives it a new random
    kernel). Not refused: such a layer when ``init_weights`` is true, since PEFT's new kernel is then zero (a no-op):
    PEFT's numbers are the file's kernels' alone, which is what is loaded. Each names the module, the field and what
    was expected.

    ``kernels``: PEFT's valid kernels by module path; ``source_paths``: every module path the file has a kernel
    tensor for (valid or not); ``output_named_otherwise``: see :func:`from_peft` (the model's output layer, which
    transformers 5.x names ``lm_head``: a config adapting it by its other name without its kernel in the file was
    made on 5.x, where the name matched nothing and PEFT adapted no output layer).
    """
    problems: list[str] = []
    if any(len(path) > _MAX_MATCHED_PATH for path in (*source_paths, *(model_layer_types or ()))):
        return problems  # not a path of any real model: not matched against the config's patterns (see _bounded_regex)
    if (rules.entries + 1) * (len(source_paths) + len(model_layer_types or ())) > _MAX_RULE_MATCHES:
        return problems  # matching would take minutes (see _MAX_RULE_MATCHES): not cross-checked
    for module, kernel in kernels.items():
        key = PEFT_PREFIX + module + PEFT_KERNEL_SUFFIX
        b = int(kernel.shape[-1])
        p, field_name = rules.block_size_of(module)
        if p != b:
            problems.append(
                f"module {module}: the config gives it block size {p} ({field_name}), but its kernel {key} has "
                f"shape {tuple(kernel.shape)}, block size {b}; PEFT refuses to load this file (size mismatch): "
                f"set {field_name.split(' ')[0]} to {b}"
                + (", or give the module its size in block_size_pattern" if field_name.startswith("block_size ")
                   or field_name == "block_size" else ""))
    if not rules.selects:
        return problems
    for module in sorted(source_paths):
        reason = rules.why_not(module)
        if reason is not None:
            peft = ("peft 0.21's C3AConfig drops exclude_modules and loads it, a PEFT that honours the field ignores "
                    "it" if reason.startswith("exclude_modules") else "PEFT ignores it (the module runs unadapted)")
            problems.append(
                f"tensor {PEFT_PREFIX + module + PEFT_KERNEL_SUFFIX}: a kernel for module {module}, which the config "
                f"does not adapt: {reason}; {peft}, so which numbers are meant is unknown: fix the config "
                f"({rules.describe()}) or remove the kernel")
    if model_layer_types and init_weights is not True:  # true: PEFT's new kernel is zero, its numbers the file's
        linear = [path for path, kind in model_layer_types.items() if kind == "linear"]
        in_file = _paths_as_in_file(source_paths, linear)
        init = init_weights if isinstance(init_weights, str) else "xavier_uniform"
        fresh = f"a new randomly initialised kernel ({init})"
        missing = [(path, in_file[path]) for path in sorted(in_file or {}, key=lambda p: in_file[p])
                   if in_file[path] not in source_paths and rules.why_not(in_file[path]) is None]
        # routed experts' Linears with no kernel while no expert has one: the file of an adapter made with
        # transformers 5.x, which fuses the experts (its PEFT adapted the shared expert's and dense layers' alone)
        experts = [] if any(_EXPERT_PATH.search(m) for m in source_paths) else [
            (path, module) for path, module in missing if _EXPERT_PATH.search(module)]
        for path, module in missing:
            if (path, module) not in experts:
                named = f" ({path} in this model)" if path != module else ""
                problem = (f"module {module}{named}: the config adapts it ({rules.describe()}), but the file has no "
                           f"kernel for it ({PEFT_PREFIX + module + PEFT_KERNEL_SUFFIX} is missing); PEFT would give it "
                           f"{fresh}")
                if path == output_named_otherwise:
                    problems.append(_output_named_otherwise_problem(problem, module))
                else:
                    problems.append(problem + ": fix the config (layers_to_transform, target_modules, exclude_modules) "
                                    "to name the trained modules")
        if experts:
            problems.append(_unfused_experts_problem([m for _, m in experts], source_paths, rules, fresh))
    return problems


def _output_named_otherwise_problem(problem: str, module: str) -> str:
    """:func:`_rule_problems`' line for the model's output layer ``module`` (transformers 4.x's name, 5.x's
    ``lm_head``) that the config adapts while the file has no kernel for it: the file of an adapter made with
    transformers 5.x, where ``target_modules`` naming ``module`` matched nothing (PEFT adapted the other layers alone);
    PEFT on 4.x gives the layer a new random kernel. ``problem``: the line's start, what is missing."""
    import transformers

    return (f"{problem}. It is this model's output layer, which transformers 5.x names lm_head as it loads the "
            f"checkpoint: the adapter was made with transformers 5.x, where the config's {module!r} names no module "
            f"and PEFT adapted no output layer. Apply it with transformers 5.x (the line it was made with); on "
            f"transformers {transformers.__version__}, remove {module!r} from target_modules to apply the trained "
            "modules alone")


#: A path inside a mixture of experts' list of routed experts (``mlp.experts.3.gate_proj``, Mixtral's
#: ``block_sparse_moe.experts.0.w1``): Linears of transformers 4.x that 5.x fuses into 3-D parameters.
_EXPERT_PATH = re.compile(r"(?:^|\.)experts\.\d+\.")


def _unfused_experts_problem(experts: list[str], source_paths: set[str], rules: _PeftRules, fresh: str) -> str:
    """:func:`_rule_problems`' one line for routed experts' Linears (``experts``, on transformers 4.x) that the config's
    rules adapt while the file has a kernel for no expert: an adapter made with transformers 5.x, where the same
    ``target_modules`` adapt the shared expert's and dense layers' Linears alone (5.x fuses the routed experts into 3-D
    parameters, :func:`bca_deploy.inject.unmatched_targets`); PEFT on 4.x gives each expert a new random kernel."""
    import transformers

    leaves = {m.rpartition(".")[2] for m in experts}
    others = sorted(m for m in source_paths if m.rpartition(".")[2] in leaves)
    longer = ", ".join(dict.fromkeys(".".join(m.split(".")[-2:]) for m in others)) or "shared_expert.gate_proj..."
    shown = ", ".join(experts[:3]) + (f", ... {experts[-1]}" if len(experts) > 3 else "")
    kernels = f"only for other layers of those names ({', '.join(others[:2])}{', ...' if len(others) > 2 else ''})" \
        if others else "for none of them"
    return (f"{len(experts)} modules ({shown}): routed experts' Linears the config adapts ({rules.describe()}), but "
            f"the file has a kernel for no expert, {kernels}: the adapter was made with transformers 5.x, which fuses "
            "the routed experts into 3-D parameters (no expert is a Linear there, so PEFT adapted the other layers "
            f"alone). On transformers {transformers.__version__} each expert is a Linear, and PEFT would give each "
            f"{fresh}: apply the adapter with transformers 5.x, or name the trained modules in target_modules by paths "
            f"no expert's ends with ({longer})")


_LAYER_KINDS = {"conv1d": "transformers Conv1D"}


def _layer_type_problems(source_paths: set[str], model_layer_types: dict[str, str] | None) -> list[str]:
    """A kernel for a layer of the model that is no Linear (GPT-2's Conv1D ``c_attn``, ``c_fc``...): PEFT's C3A
    raises TypeError for such a target (``get_peft_model`` and ``PeftModel.from_pretrained`` alike), so no PEFT
    adapter holds its kernel, and whether it means ΔW of the layer's stored (in, out) weight or of its transpose is
    not said anywhere. Paths may differ from the model's by one ``base_model_prefix``."""
    if not model_layer_types:
        return []
    in_file = _paths_as_in_file(source_paths, list(model_layer_types))
    if in_file is None:  # the fit check names the modules the model does not have
        return []
    problems = []
    for path, module in sorted(in_file.items(), key=lambda item: item[1]):
        kind = model_layer_types[path]
        if module in source_paths and kind != "linear":
            named = f" ({path} in this model)" if path != module else ""
            problems.append(
                f"module {module}{named}: a {_LAYER_KINDS.get(kind, kind)} layer in this model, but PEFT's C3A adapts "
                "torch.nn.Linear only (PEFT refuses the target: TypeError 'only `torch.nn.Linear` is supported'), so "
                f"no PEFT adapter has its kernel {PEFT_PREFIX + module + PEFT_KERNEL_SUFFIX} and which ΔW it means is "
                "unknown: train it with bca-deploy (which adapts Conv1D layers) or target Linear layers")
    return problems


def _paths_as_in_file(file_paths: set[str], model_paths: list[str]) -> dict[str, str] | None:
    """``{model path: the path the adapter file names it by}`` for the model's ``model_paths``, when one prefix
    added to or dropped from every model path (a ``base_model_prefix``: ``bert.``, ``model.``) makes every one of
    ``file_paths`` a model module; None when none does (the fit check then names the modules not found)."""
    known = set(model_paths)
    unknown = sorted(file_paths - known)
    if not unknown:
        return {p: p for p in model_paths}
    first = unknown[0]
    heads: list[tuple[str, str]] = []
    for path in model_paths:
        if first.endswith("." + path):
            heads.append(("add", first[: -len(path) - 1]))
        elif path.endswith("." + first):
            heads.append(("drop", path[: -len(first) - 1]))
    for kind, head in sorted(set(heads)):
        if kind == "add":
            mapping = {p: f"{head}.{p}" for p in model_paths}
        else:
            mapping = {p: p[len(head) + 1:] for p in model_paths if p.startswith(head + ".")}
        if file_paths <= set(mapping.values()):
            return mapping
    return None


def _base_copy_problems(copies: dict[str, torch.Tensor], specs: dict[str, ModuleSpec]) -> list[str]:
    """What is wrong with PEFT's saved copies of adapted layers' base weights (``<module>.base_layer.weight`` /
    ``.bias``): each must belong to an adapted module and have its layer's shape (out, in) / (out,)."""
    problems = []
    for path, tensor in copies.items():
        module, param = split_base_key(path)
        spec = specs.get(module)
        expected = None if spec is None else {"weight": (spec.out_features, spec.in_features),
                                              "bias": (spec.out_features,)}.get(param)
        if spec is None:
            problems.append(f"tensor {PEFT_PREFIX + path!r}: the base layer's {param} of {module}, which the file has "
                            f"no kernel for (PEFT names the base layer of an adapted module only, and would ignore "
                            f"this tensor); for {module}'s own {param} PEFT writes {PEFT_PREFIX + module}.{param}")
        elif expected is None or tuple(tensor.shape) != expected:
            problems.append(f"tensor {PEFT_PREFIX + path!r}: shape {tuple(tensor.shape)}, expected the base layer's "
                            f"{param} of {module}, {expected}")
    return problems


#: The heads ``PeftModelForSequenceClassification`` (and ``...ForTokenClassification``) add to ``modules_to_save``
#: whatever the config lists (peft 0.21: ``classifier_module_names``).
_PEFT_TASK_SAVED = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def peft_saved_entries(peft_config: dict[str, Any]) -> list[str]:
    """The ``modules_to_save`` entries PEFT wraps in a copy of their own (``ModulesToSaveWrapper``) when it loads
    ``peft_config`` (a parsed ``adapter_config.json``): the config's list, plus the heads its ``task_type`` adds.
    Every other tensor of the file PEFT loads into the base model itself (a base weight)."""
    raw = peft_config.get("modules_to_save")
    entries = [e for e in raw if isinstance(e, str) and e] if isinstance(raw, list) else []
    return list(dict.fromkeys([*entries, *_PEFT_TASK_SAVED.get(peft_config.get("task_type"), ())]))


def peft_base_weight_name(path: str, entries: list[str]) -> str | None:
    """bca-deploy's name of the base weight that PEFT file tensor ``path`` (its name without :data:`PEFT_PREFIX`) is,
    or None: a kernel, a tensor of a module PEFT saves whole (:func:`peft_saved_module` of ``entries``), or not a
    module's parameter. :func:`from_peft`'s rule, for readers that see only the file's tensor names."""
    if path.endswith(PEFT_KERNEL_SUFFIX):
        return None
    if split_base_key(path) is not None:
        return path
    module, _, param = path.rpartition(".")
    if not module or peft_saved_module(module, entries) is not None:
        return None
    return base_key(module, param)


def peft_saved_module(module: str, entries: list[str]) -> str | None:
    """The module PEFT wraps in a copy of its own (``ModulesToSaveWrapper``) that ``module`` is or is inside, or None.

    PEFT's rule (peft 0.21 ``_set_trainable``) is that a module is wrapped when its path ends with one of the
    ``modules_to_save`` entries (:func:`peft_saved_entries`). No dot is needed before the entry: SEQ_CLS's
    ``classifier`` also wraps DistilBERT's ``pre_classifier``. The outermost such module is returned, so a nested head
    (RoBERTa's ``classifier.dense``, ``classifier.out_proj``) stays the one module ``classifier`` it was saved as.
    Where this is None, PEFT loads the tensor into the base model itself (a base weight)."""
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if any(prefix.endswith(e) for e in entries):
            return prefix
    return None


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


def _recorded_model_type(metadata: dict[str, str] | None, source: str) -> str | None:
    """The base ``model_type`` a PEFT copy carries in its safetensors metadata (None: not recorded)."""
    from .config import model_type_problem_of

    value = (metadata or {}).get(BASE_MODEL_TYPE_METADATA_KEY)
    if (problem := model_type_problem_of(value)) is not None:
        raise AdapterFormatError(f"{source}: safetensors metadata {BASE_MODEL_TYPE_METADATA_KEY!r} {problem}")
    return value


def peft_metadata(config: AdapterConfig) -> dict[str, str]:
    """The safetensors metadata of a PEFT copy of an adapter with ``config``: PEFT's own, plus the task record and
    the base model_type."""
    metadata = {"format": "pt"}
    if config.task is not None:
        metadata[TASK_METADATA_KEY] = json.dumps(config.task.to_dict(), sort_keys=True)
    if config.base_model_type:
        metadata[BASE_MODEL_TYPE_METADATA_KEY] = config.base_model_type
    return metadata


def with_task_type(config: AdapterConfig, task_type: str | None) -> AdapterConfig:
    """``config`` recording the task of PEFT ``task_type`` (``SEQ_CLS``...) when it records none: a PEFT adapter saved
    without ``task_type`` (optional in PEFT) records no task, and a classifier saved so was taken for its bare base
    model's task by every stage. None: ``config`` as it is.

    Raises:
        AdapterFormatError: a task_type bca-deploy does not load, or one contradicting the task ``config`` records.
    """
    if task_type is None:
        return config
    spec = _task_from_peft(task_type)
    if spec is None:
        raise AdapterFormatError(f"task_type {task_type!r}: bca-deploy records {', '.join(PEFT_TASK_TYPES.values())} "
                                 "adapters' tasks")
    if config.task is None:
        return dataclasses.replace(config, task=spec)
    if config.task.type != spec.type:
        raise _contradicted(task_type, config)
    return config


def _contradicted(task_type: str, config: AdapterConfig) -> AdapterFormatError:
    assert config.task is not None
    recorded = PEFT_TASK_TYPES.get(config.task.type, config.task.type)
    return AdapterFormatError(f"task_type {task_type!r} contradicts the adapter, which was trained for "
                              f"{config.task.type} (PEFT {recorded}); leave --task-type out to use it")


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
        raise _contradicted(task_type, config)
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
    base_problems = []
    for key, tensor in tensors.items():
        if key.endswith(KERNEL_SUFFIX):
            continue
        split = split_base_key(key, config.modules_to_save)
        if split is not None and split[0] not in config.modules:
            # a base weight of a module PEFT does not adapt: PEFT names it as the module's own parameter (as its
            # save_embedding_layers does) and loads it into the base model, being in none of modules_to_save
            module, param = split
            owner = peft_saved_module(module, peft_saved_entries(
                {"modules_to_save": list(config.modules_to_save), "task_type": task_type}))
            if owner is not None:
                base_problems.append(f"tensor {key}: the base weight of {module}.{param}, inside {owner}, which "
                                     "modules_to_save saves whole: PEFT would load it into that module's copy")
            key = f"{module}.{param}"
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
    # PEFT must build exactly these modules, each at its size, from the config (its modules_to_save entries are
    # regexes that exclude whatever path they match a part of): read back with PEFT's rules before it is written
    rules, problems = _PeftRules.parse(peft_config)
    kernels = {name: state[PEFT_PREFIX + name + PEFT_KERNEL_SUFFIX] for name in config.modules}
    problems += _rule_problems(rules, kernels, set(kernels), None, True) if rules is not None else []
    problems += base_problems
    if problems:
        raise AdapterFormatError(format_problems(
            "cannot write a PEFT C3A config that makes PEFT adapt exactly this adapter's modules:", problems))
    return peft_config, state


def _peft_block_size_pattern(block_sizes: dict[str, int], default: int) -> dict[str, int]:
    """Per-module overrides PEFT will apply to exactly the intended modules.

    PEFT gives a module the size of the first key ``k`` for which ``re.match(rf".*\\.{k}$", path)`` holds, and
    when none does, of a key equal to the path (``block_size_pattern.get(path, block_size)``). A nested module gets
    its path minus its first component, escaped, as its key (the regex needs a dot before the key, so it matches
    the module itself and, checked here, no other adapted module of another size). A top-level module (``lm_head``)
    gets its own name: no such regex can match a path without a dot, so PEFT reaches the exact lookup; the same
    key read as a regex must match no other adapted module of another size.
    """
    pattern: dict[str, int] = {}
    for name, p in sorted(block_sizes.items()):
        if p == default:
            continue
        head, dot, tail = name.partition(".")
        key = re.escape(tail) if dot else name
        try:
            clashes = [n for n in block_sizes if n != name and re.match(_sized(key), n) and block_sizes[n] != p]
        except re.error as exc:
            raise AdapterFormatError(
                f"module {name!r} is at the top level with block size {p} != default {default}, and PEFT would read "
                f"its name as a regular expression, which it is not ({exc.msg}); PEFT's block_size_pattern cannot "
                "select it") from None
        if clashes:
            raise AdapterFormatError(f"cannot write a PEFT block_size_pattern for {name!r}: it would also match {clashes}")
        pattern[key] = p
    return pattern
