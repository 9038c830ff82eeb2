"""The adapter configuration: what is adapted, with which block size and scale, on which base model.

This is the in-memory form of ``adapter_config.json``. It records the identity of the base model
(``model_type`` and the shape of every adapted weight) so an adapter can be checked against a model
or a checkpoint before anything is computed or written.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError, format_problems, open_regular, read_at_most, why_not_readable

__all__ = [
    "RUN_ADAPTER_FOLDERS",
    "show_json_value",
    "repeated_label",
    "run_adapter_dir",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "KERNEL_SUFFIX",
    "INITS",
    "LAYER_TYPES",
    "TASK_TYPES",
    "PROBLEM_TYPES",
    "EXPORT_TASKS",
    "MAX_NUM_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_FEATURES",
    "MAX_JSON_BYTES",
    "read_json",
    "parse_json_object",
    "path_problem",
    "PathOwners",
    "ModuleSpec",
    "HeadSpec",
    "text_pair_mismatch",
    "TaskSpec",
    "task_spec_from_config",
    "task_architecture",
    "AdapterConfig",
    "local_base_dir",
    "recorded_base_type",
    "block_size_for",
    "valid_block_sizes",
]

FORMAT_NAME = "bca-deploy"
FORMAT_VERSION = 1
LAYOUT = "first-column"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: What ``train`` records beside a checkpoint's adapter (columns, labels, max length...): ``evaluate`` reads it, and
#: ``convert`` carries it to the converted adapter.
TRAINING_RECORD_FILE = "bca_training.json"
KERNEL_SUFFIX = ".bca_kernel"
INITS = ("zeros", "normal", "xavier_uniform", "kaiming_uniform")
LAYER_TYPES = ("linear", "conv1d")
#: What an adapter was trained for. ``feature-extraction``: a bare model (embeddings), no head.
TASK_TYPES = ("seq-cls", "causal-lm", "feature-extraction")
#: transformers' ``config.problem_type`` values for sequence classification.
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
#: The ONNX (optimum) task each adapter task exports as.
EXPORT_TASKS = {"seq-cls": "text-classification", "causal-lm": "text-generation-with-past",
                "feature-extraction": "feature-extraction"}
#: The most classes a classification head may have (a bound, so one bad label cannot ask for a huge head).
MAX_NUM_LABELS = 100_000
#: The longest label name: names are in every classification answer (a 1 MB one was, twice, in each).
MAX_LABEL_CHARS = 1000
#: Token ids are below this (an int32 bound: ONNX graphs and tokenizers hold ids as int32/int64).
MAX_TOKEN_ID = 1 << 31
#: The largest in/out features of an adapted layer (a bound on hostile configs; real layers are far smaller).
MAX_FEATURES = 1 << 24


@dataclass
class ModuleSpec:
    """One adapted module.

    Attributes:
        block_size: p; divides both ``in_features`` and ``out_features``.
        scaling: ΔW = scaling · BlockCirculant(w).
        in_features: d_in of the base layer.
        out_features: d_out of the base layer.
        layer_type: ``"linear"`` (weight stored (d_out, d_in)) or ``"conv1d"`` (transformers'
            GPT-2 ``Conv1D``, weight stored transposed, (d_in, d_out)).
    """

    block_size: int
    scaling: float
    in_features: int
    out_features: int
    layer_type: str = "linear"

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored in the model / checkpoint."""
        if self.layer_type == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        p = self.block_size
        return (self.out_features // p, self.in_features // p, p)

    def problems(self, name: str) -> list[str]:
        """Every way this spec is invalid, each naming module ``name`` (empty when it is valid)."""
        out: list[str] = []
        where = f"module {name}"
        for attr in ("in_features", "out_features"):
            value = getattr(self, attr)
            if not _is_int(value) or not 1 <= value <= MAX_FEATURES:
                out.append(f"{where}: {attr} must be an integer in 1..{MAX_FEATURES}, got {show_json_value(value)}")
        p = self.block_size
        if not _is_int(p) or p < 1:
            out.append(f"{where}: block_size must be a positive integer, got {show_json_value(p)}")
        elif not out and (self.in_features % p or self.out_features % p):
            out.append(
                f"{where}: block size {p} does not divide its shape (in_features={self.in_features}, "
                f"out_features={self.out_features}); valid block sizes: "
                f"{', '.join(map(str, valid_block_sizes(self.in_features, self.out_features)[:12]))}"
            )
        if not _is_positive_number(self.scaling):
            out.append(f"{where}: scaling must be a finite positive number, got {show_json_value(self.scaling)}")
        if not isinstance(self.layer_type, str) or self.layer_type not in LAYER_TYPES:
            out.append(f"{where}: layer_type must be one of {', '.join(LAYER_TYPES)}, got {show_json_value(self.layer_type)}")
        return out


@dataclass
class HeadSpec:
    """A task head trained with the adapter and saved whole beside the kernels.

    Attributes:
        modules: module paths of the head (each also listed in ``modules_to_save``), e.g. ``["classifier"]``.
        num_labels: outputs of the head (1 for regression).
        id2label: class index -> label name, for every index ``0..num_labels-1``.
        label2id: the inverse of ``id2label``.
        problem_type: transformers' ``config.problem_type`` (``single_label_classification``...), or None.
        pad_token_id: the model config's ``pad_token_id`` the head was trained with, or None when it had none.
            A decoder classifier (Llama, GPT-2...) reads the last token that is not this id, so every later
            stage must pool at the same token; transformers refuses a batch of several rows without it.
        text_pair: whether the head was trained on text pairs (two text columns: MRPC, RTE, STS-B...; True) or on
            single texts (False), as ``train`` records it; None when not recorded (an adapter made elsewhere, or
            before it was recorded). Served, a head trained on pairs refuses single texts and the other way round.
    """

    modules: list[str]
    num_labels: int
    id2label: dict[int, str]
    label2id: dict[str, int]
    problem_type: str | None = None
    pad_token_id: int | None = None
    text_pair: bool | None = None

    def config_values(self) -> dict[str, Any]:
        """The transformers config values of a model with this head (the one list every stage sets): labels,
        problem type and pad id where recorded."""
        values: dict[str, Any] = {"num_labels": self.num_labels, "id2label": dict(self.id2label),
                                  "label2id": dict(self.label2id)}
        if self.problem_type is not None:
            values["problem_type"] = self.problem_type
        if self.pad_token_id is not None:
            values["pad_token_id"] = self.pad_token_id
        return values


def text_pair_mismatch(text_pair: bool | None, pairs: bool, record: str | None = None) -> str | None:
    """How a classifier head was trained, when inputs that are text pairs (``pairs`` true) or single texts are not
    what it was trained on: its recorded ``text_pair`` (:attr:`HeadSpec.text_pair`) is the other kind. None when
    they are the kind it was trained on, or when it records nothing (an adapter made elsewhere, or before it was
    recorded: either kind is taken). ``record``: where ``text_pair`` was read, for the message (default: the head's
    ``text_pair``).

    The one rule for every stage that feeds a trained head texts (the server's ``/v1/classify``, ``evaluate``):
    a head fed the other kind answers without a word, a label read off an input it never saw.
    """
    if text_pair is None or text_pair == pairs:
        return None
    record = record or f"its head's text_pair is {'true' if text_pair else 'false'}"
    return f"was trained on {'text pairs' if text_pair else 'single texts'} ({record})"


@dataclass
class TaskSpec:
    """What the adapter was trained for, so later stages need no ``--task``.

    Attributes:
        type: one of :data:`TASK_TYPES`.
        architecture: the transformers class the adapter was trained in (``BertForSequenceClassification``,
            ``LlamaForCausalLM``, ``BertModel``...), or None when unknown.
        head: the head trained and saved with the adapter; None when the adapter carries no head (a bare
            model, a causal LM, or a classifier trained with the base model's own, shared head).
    """

    type: str
    architecture: str | None = None
    head: HeadSpec | None = None

    @property
    def export_task(self) -> str:
        """The ONNX export task (``text-classification``, ``text-generation-with-past``, ``feature-extraction``)."""
        return EXPORT_TASKS[self.type]

    def problems(self, modules_to_save: list[str] | None = None) -> list[str]:
        """Every way this spec is invalid (empty when it is valid)."""
        out: list[str] = []
        if self.type not in TASK_TYPES:
            out.append(f"task.type {self.type!r}: expected one of {', '.join(TASK_TYPES)}")
        arch = self.architecture
        if arch is not None and not (isinstance(arch, str) and arch.isidentifier() and arch.isascii()):
            out.append(f"task.architecture must be a transformers class name or null, got {show_json_value(arch)}")
        head = self.head
        if head is None:
            return out
        if self.type != "seq-cls":
            out.append(f"task.head is only meaningful for seq-cls, not {self.type!r}")
        n = head.num_labels
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_NUM_LABELS):
            out.append(f"task.head.num_labels must be an integer in 1..{MAX_NUM_LABELS}, got {n!r}")
            return out
        if not (isinstance(head.modules, list) and head.modules and all(path_problem(m) is None for m in head.modules)):
            out.append(f"task.head.modules must be a non-empty list of module paths, got {head.modules!r}")
        elif modules_to_save is not None:
            missing = [m for m in head.modules if m not in modules_to_save]
            if missing:
                out.append(f"task.head.modules {missing} are not in modules_to_save {modules_to_save}")
        if sorted(head.id2label) != list(range(n)):
            out.append(f"task.head.id2label must name every class 0..{n - 1} exactly once, got keys "
                       f"{sorted(head.id2label)[:10]}")
        if any(not (isinstance(v, str) and _encodable(v)) for v in head.id2label.values()):
            out.append("task.head.id2label values must be strings (valid UTF-8 text)")
        elif any(len(v) > MAX_LABEL_CHARS for v in head.id2label.values()):
            out.append(f"task.head.id2label values must be label names of at most {MAX_LABEL_CHARS} characters")
        elif repeated := repeated_label(head.id2label):
            # label2id, the inverse, cannot show it (a name twice keeps one of its classes there, as written), and a
            # classifier's answer keys its scores by name: one class's score was dropped without a word
            out.append(f"task.head.id2label names must be distinct (an answer's scores are keyed by label name): "
                       f"{repeated}")
        elif {v: k for k, v in head.id2label.items()} != head.label2id:
            out.append("task.head.label2id must be the inverse of id2label (label names must be unique)")
        if head.problem_type is not None and head.problem_type not in PROBLEM_TYPES:
            out.append(f"task.head.problem_type {head.problem_type!r}: expected one of {', '.join(PROBLEM_TYPES)}")
        pad = head.pad_token_id
        if pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < MAX_TOKEN_ID):
            out.append(f"task.head.pad_token_id must be a token id (an integer in 0..{MAX_TOKEN_ID - 1}) or null, got "
                       f"{show_json_value(pad)}")
        if head.text_pair is not None and not isinstance(head.text_pair, bool):
            out.append(f"task.head.text_pair must be true, false or null, got {show_json_value(head.text_pair)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        head = None
        if self.head is not None:
            head = {
                "modules": list(self.head.modules),
                "num_labels": self.head.num_labels,
                "id2label": {str(k): v for k, v in sorted(self.head.id2label.items())},
                "label2id": dict(self.head.label2id),
                "problem_type": self.head.problem_type,
            }
            if self.head.pad_token_id is not None:  # (absent otherwise: files stay as earlier versions wrote them)
                head["pad_token_id"] = self.head.pad_token_id
            if self.head.text_pair is not None:  # (absent when not recorded, as pad_token_id)
                head["text_pair"] = self.head.text_pair
        return {"type": self.type, "architecture": self.architecture, "head": head}

    @classmethod
    def from_dict(cls, data: Any, source: str = "adapter config") -> TaskSpec:
        """Parse the ``task`` entry of ``adapter_config.json``; every problem is reported at once."""
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{source}: 'task' must be an object, got {type(data).__name__}")
        head_data = data.get("head")
        head = None
        problems: list[str] = []
        if head_data is not None:
            if not isinstance(head_data, dict):
                raise AdapterFormatError(f"{source}: 'task.head' must be an object or null, got {type(head_data).__name__}")
            id2label_raw = head_data.get("id2label") or {}
            label2id_raw = head_data.get("label2id") or {}
            id2label: dict[int, str] = {}
            if not isinstance(id2label_raw, dict) or not isinstance(label2id_raw, dict):
                problems.append("task.head.id2label and task.head.label2id must be objects")
            else:
                for key, value in id2label_raw.items():
                    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
                        problems.append(f"task.head.id2label key {key!r} is not an integer")
                    elif int(key) in id2label:
                        problems.append(f"task.head.id2label names class {int(key)} twice")
                    else:
                        id2label[int(key)] = value
            head = HeadSpec(
                modules=head_data.get("modules"),
                num_labels=head_data.get("num_labels"),
                id2label=id2label,
                label2id=dict(label2id_raw) if isinstance(label2id_raw, dict) else {},
                problem_type=head_data.get("problem_type"),
                pad_token_id=head_data.get("pad_token_id"),
                text_pair=head_data.get("text_pair"),
            )
        unknown = sorted(set(data) - {"type", "architecture", "head"})
        if unknown:
            problems.append(f"task: unknown key(s) {unknown}")
        spec = cls(type=data.get("type"), architecture=data.get("architecture"), head=head)
        problems += spec.problems()
        if problems:
            raise AdapterFormatError(format_problems(f"{source}: invalid 'task' entry:", problems))
        return spec


def task_spec_from_config(
    task: str, model_config: Any, head_modules: list[str] | None, architecture: str | None = None
) -> TaskSpec:
    """The :class:`TaskSpec` of a model trained for ``task``, read off its transformers config.

    Args:
        task: one of :data:`TASK_TYPES`.
        model_config: the model's ``PretrainedConfig`` (``architectures``, ``num_labels``, ``id2label``...).
        head_modules: the head's module paths when the head is saved with the adapter; None or empty when
            the adapter carries no head.
        architecture: the class the adapter was trained in (``type(model).__name__``); default: the
            config's ``architectures[0]`` when it is a class for ``task``, else transformers' auto class for
            the task and ``model_type`` (a classifier trained from a bare encoder directory, whose config
            still says ``BertModel``, is recorded as ``BertForSequenceClassification``).
    """
    if architecture is None:
        candidates = list(getattr(model_config, "architectures", None) or [])
        architecture = next((a for a in candidates if isinstance(a, str) and _architecture_fits(task, a)), None)
        if architecture is None:
            architecture = task_architecture(task, getattr(model_config, "model_type", None))
    head = None
    if task == "seq-cls" and head_modules:
        num_labels = int(model_config.num_labels)
        raw = dict(getattr(model_config, "id2label", None) or {})
        id2label = {int(k): str(v) for k, v in raw.items()} if len(raw) == num_labels else {}
        if sorted(id2label) != list(range(num_labels)):
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        pad = getattr(model_config, "pad_token_id", None)
        head = HeadSpec(modules=list(head_modules), num_labels=num_labels, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()},
                        problem_type=getattr(model_config, "problem_type", None),
                        pad_token_id=pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else None)
    return TaskSpec(type=task, architecture=architecture, head=head)


def _architecture_fits(task: str, name: str) -> bool:
    if task == "seq-cls":
        return name.endswith("ForSequenceClassification")
    if task == "causal-lm":
        return name.endswith(("ForCausalLM", "LMHeadModel"))
    return name.endswith("Model") and "For" not in name and "LMHead" not in name


def task_architecture(task: str, model_type: str | None) -> str | None:
    """transformers' auto class name for ``task`` and ``model_type`` (``BertForSequenceClassification``...), or None."""
    if not model_type:
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    names = {"seq-cls": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "feature-extraction": modeling_auto.MODEL_MAPPING_NAMES}.get(task, {})
    name = names.get(model_type)
    return name if isinstance(name, str) else None


def valid_block_sizes(in_features: int, out_features: int) -> list[int]:
    """Every p that divides both dimensions (the block sizes a layer accepts), ascending."""
    g = math.gcd(in_features, out_features)
    small = [p for p in range(1, math.isqrt(g) + 1) if g % p == 0]
    return sorted(set(small) | {g // p for p in small})


def block_size_for(module_name: str, block_size: int, block_size_pattern: dict[str, int]) -> int:
    """The block size of ``module_name``: the first override whose key matches, else the default.

    A key matches when it equals the module path or, as in PEFT's C3A, when ``.*\\.{key}$``
    matches it (so ``"query"`` or ``"layer.0.attention.self.query"`` both work).
    """
    for key, value in block_size_pattern.items():
        if pattern_key_matches(key, module_name):
            return int(value)
    return int(block_size)


def pattern_key_matches(key: str, module_name: str) -> bool:
    """Whether a ``block_size_pattern`` key selects ``module_name`` (see :func:`block_size_for`).

    Raises:
        re.error: ``key`` is not a valid regular expression (callers name the option).
    """
    return key == module_name or re.match(rf".*\.{key}$", module_name) is not None


@dataclass
class AdapterConfig:
    """Everything in ``adapter_config.json`` (format version 1).

    Attributes:
        target_modules: the user's selection (names matched as path suffixes, or one regex).
        block_size: default p.
        block_size_pattern: per-module overrides, ``{name or regex: p}``.
        scaling: default scale applied to new modules.
        init: how kernels were initialised (``zeros`` makes the adapter a no-op at start).
        modules: per adapted module path, its :class:`ModuleSpec`; the authority when loading.
        modules_to_save: paths of modules saved whole beside the kernels (e.g. a classifier head).
        base_model_type: ``config.model_type`` of the base model, if known.
        base_model_name_or_path: where the base model came from, informational.
        task: what the adapter was trained for (task type, architecture, head and labels); None for
            adapters written without that knowledge (older files, PEFT conversions, plain ``inject``).
    """

    target_modules: list[str] | str
    block_size: int
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    scaling: float = 1.0
    init: str = "zeros"
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    task: TaskSpec | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise AdapterFormatError(format_problems("invalid adapter config:", problems))

    def problems(self) -> list[str]:
        """Every way this config is invalid (types, ranges, block sizes, paths, the task), all at once."""
        out: list[str] = []
        tm = self.target_modules
        if not (isinstance(tm, str) and tm) and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
            out.append(f"target_modules must be a non-empty string or a list of strings, got {show_json_value(tm)}")
        if not _is_int(self.block_size) or self.block_size < 1:
            out.append(f"block_size must be a positive integer, got {show_json_value(self.block_size)}")
        if not isinstance(self.block_size_pattern, dict):
            out.append(f"block_size_pattern must be an object mapping names to block sizes, got {show_json_value(self.block_size_pattern)}")
        else:
            for key, value in self.block_size_pattern.items():
                if not _is_int(value) or value < 1:
                    out.append(f"block_size_pattern[{key!r}] must be a positive integer, got {show_json_value(value)}")
        if not _is_finite_number(self.scaling):
            out.append(f"scaling must be finite, got {show_json_value(self.scaling)}")
        elif self.scaling <= 0:
            out.append(f"scaling must be positive, got {self.scaling!r}")
        if not isinstance(self.init, str) or self.init not in INITS:
            out.append(f"init must be one of {', '.join(INITS)}; got {show_json_value(self.init)}")
        if not isinstance(self.modules, dict):
            out.append(f"modules must be an object mapping module paths to their specs, got {show_json_value(self.modules)}")
        else:
            for name, spec in self.modules.items():
                bad = path_problem(name)
                if bad:
                    out.append(f"modules key {show_json_value(name)}: {bad}")
                elif not isinstance(spec, ModuleSpec):
                    out.append(f"module {name}: expected a module spec, got {show_json_value(spec)}")
                else:
                    out.extend(spec.problems(name))
        saved_ok = isinstance(self.modules_to_save, list)
        if not saved_ok:
            out.append(f"modules_to_save must be a list of module paths, got {show_json_value(self.modules_to_save)}")
        else:
            seen: set[str] = set()
            for entry in self.modules_to_save:
                bad = path_problem(entry)
                if bad:
                    out.append(f"modules_to_save entry {show_json_value(entry)}: {bad}")
                    saved_ok = False
                    continue  # (not hashable, perhaps: a list)
                if entry in seen:
                    out.append(f"modules_to_save lists {entry} twice")
                else:
                    seen.add(entry)
        if saved_ok and isinstance(self.modules, dict) and self.modules_to_save:
            owners = PathOwners(self.modules_to_save)
            for name in self.modules:
                owner = owners.first_of(name) if isinstance(name, str) else None
                if owner is not None:
                    out.append(f"module {name}: adapted, but also inside {owner}, which modules_to_save replaces whole")
        if (problem := model_type_problem_of(self.base_model_type)) is not None:
            out.append(f"base_model_type {problem}")
        value = self.base_model_name_or_path
        if value is not None and not (isinstance(value, str) and _encodable(value)):
            out.append(f"base_model_name_or_path must be a string or null, got {show_json_value(value)}")
        if self.task is not None:
            if not isinstance(self.task, TaskSpec):
                out.append(f"task must be a TaskSpec or null, got {show_json_value(self.task)}")
            else:
                out.extend(self.task.problems(self.modules_to_save if saved_ok else None))
        return out

    @property
    def num_parameters(self) -> int:
        """Trainable kernel parameters: Σ d_out·d_in / p over adapted modules."""
        return sum(s.in_features * s.out_features // s.block_size for s in self.modules.values())

    # ---- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": LAYOUT,
            "base_model": {
                "model_type": self.base_model_type,
                "name_or_path": self.base_model_name_or_path,
                "adapted_weights": {f"{n}.weight": list(s.weight_shape) for n, s in sorted(self.modules.items())},
            },
            "target_modules": self.target_modules,
            "block_size": self.block_size,
            "block_size_pattern": dict(self.block_size_pattern),
            "scaling": self.scaling,
            "init": self.init,
            "modules_to_save": list(self.modules_to_save),
            "modules": {n: asdict(s) for n, s in sorted(self.modules.items())},
            "task": None if self.task is None else self.task.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "adapter config") -> AdapterConfig:
        """Parse ``adapter_config.json``'s content; every wrong type or value is reported at once.

        Raises:
            AdapterFormatError: naming ``source``, each field, what came in and what was expected.
        """
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {show_json_value(data)}")
        if data.get("format") != FORMAT_NAME:
            raise AdapterFormatError(
                f"{source}: 'format' is {show_json_value(data.get('format'))}, expected {FORMAT_NAME!r} "
                "(for a PEFT C3A adapter, use load_adapter, which converts it)"
            )
        version = data.get("format_version")
        if type(version) is not int or version < FORMAT_VERSION:  # true, "1", 1.0, 0: no version any bca-deploy writes
            raise AdapterFormatError(f"{source}: format_version {show_json_value(version)}, expected the integer "
                                     f"{FORMAT_VERSION}")
        if version != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{source}: format_version {show_json_value(version)} is not supported by this bca-deploy "
                f"(it reads version {FORMAT_VERSION}); upgrade bca-deploy to read newer adapters"
            )
        if data.get("layout") != LAYOUT:
            raise AdapterFormatError(f"{source}: layout {show_json_value(data.get('layout'))}, expected {LAYOUT!r}")
        problems: list[str] = []
        for key in ("target_modules", "block_size", "modules"):
            if key not in data:
                problems.append(f"'{key}' is missing")
        raw_modules = data.get("modules", {})
        modules: Any = raw_modules
        if isinstance(raw_modules, dict):
            modules = {}
            fields = {f for f in ModuleSpec.__dataclass_fields__}
            required = fields - {"layer_type"}
            for name, spec in raw_modules.items():
                if not isinstance(spec, dict):
                    problems.append(f"module {show_json_value(name)}: expected an object with {', '.join(sorted(required))}, "
                                    f"got {show_json_value(spec)}")
                    continue
                unknown = sorted(set(spec) - fields)
                missing = sorted(required - set(spec))
                if unknown or missing:
                    problems.append(f"module {show_json_value(name)}: " + "; ".join(
                        ([f"unknown key(s) {unknown}"] if unknown else [])
                        + ([f"missing key(s) {missing}"] if missing else [])))
                    continue
                modules[name] = ModuleSpec(**spec)
        base = data.get("base_model")
        if base is None:
            base = {}
        if not isinstance(base, dict):
            problems.append(f"base_model must be an object or null, got {show_json_value(base)}")
            base = {}
        task: TaskSpec | None = None
        if data.get("task") is not None:
            try:
                task = TaskSpec.from_dict(data["task"], source)
            except AdapterFormatError as exc:
                problems.append(str(exc).removeprefix(f"{source}: "))
        pattern = data.get("block_size_pattern")
        saved = data.get("modules_to_save")
        kwargs = dict(
            target_modules=data.get("target_modules", []),
            block_size=data.get("block_size", 1),
            block_size_pattern={} if pattern is None else pattern,
            scaling=data.get("scaling", 1.0),
            init=data.get("init", "zeros"),
            modules=modules,
            modules_to_save=[] if saved is None else saved,
            base_model_type=base.get("model_type"),
            base_model_name_or_path=base.get("name_or_path"),
        )
        unchecked = cls.__new__(cls)
        unchecked.__dict__.update(kwargs, task=task)
        problems += unchecked.problems()
        if problems:
            raise AdapterFormatError(format_problems(f"{source}: invalid adapter config:", problems))
        # checked whole just above: cls(**kwargs) would check it all again in __post_init__ (twice the time, seconds
        # for 100,000 modules)
        return unchecked

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))


#: The largest JSON file read (an adapter config is a few KB; this bounds memory on hostile input).
MAX_JSON_BYTES = 16 * 1024 * 1024


def read_json(path: Path, what: str = "file", allow_nan: bool = False, unique_keys: bool = True) -> dict[str, Any]:
    """Read a JSON object from ``path``, with errors that name the file and say what is wrong.

    Refused (:class:`AdapterFormatError`): a missing file, one larger than :data:`MAX_JSON_BYTES`,
    bytes that are not UTF-8, invalid or too deeply nested JSON, NaN/Infinity literals (unless
    ``allow_nan``: transformers writes them in model configs), a key twice in one object (unless not
    ``unique_keys``: a model config is read as transformers reads it, the last one kept), and anything but an
    object at the top level.
    """
    return _object(read_json_value(path, what, allow_nan, unique_keys), str(Path(path)))


def local_base_dir(recorded: Any) -> Path | None:
    """An adapter's recorded ``base_model_name_or_path`` when it is a local directory with a ``config.json`` (as
    PEFT's ``AutoPeftModel*`` would load it), else None: a hub name (nothing is downloaded), or not a string."""
    if not isinstance(recorded, str) or not recorded:
        return None
    try:
        return Path(recorded) if (Path(recorded) / "config.json").is_file() else None
    except (OSError, ValueError):  # a name too long, a NUL byte: not a directory of this machine
        return None


def recorded_base_type(config: AdapterConfig) -> tuple[str | None, str]:
    """The ``model_type`` of the base model an adapter was trained on, and where it was read (for messages).

    The adapter's own record first (bca-deploy's ``base_model.model_type``; a PEFT copy bca-deploy wrote carries it in
    its safetensors metadata). PEFT itself records no type, only ``base_model_name_or_path``: when that is a local
    model directory (:func:`local_base_dir`: the base PEFT's ``AutoPeftModel*`` would load), its ``config.json``'s
    ``model_type`` is the adapter's, as it is for PEFT. ``(None, "")`` when neither tells (a hub id: nothing is
    downloaded; a config.json that does not read or records no type).
    """
    if config.base_model_type:
        return config.base_model_type, ""
    base = local_base_dir(config.base_model_name_or_path)
    if base is None:
        return None, ""
    try:
        model_type, _ = model_identity(base)
    except (AdapterFormatError, OSError):  # a config.json that does not read tells nothing: as if no base recorded
        return None, ""
    return model_type, (f" (the type of the base model it records, {str(base)[:200]}, read from its config.json: "
                        "PEFT records no type)")


def model_identity(directory: str | Path) -> tuple[str | None, str | None]:
    """``(model_type, architecture)`` that a transformers model directory's ``config.json`` records (``architecture``:
    the first of its ``architectures``), each None where it records no string; read as transformers reads a model
    config. Raises what :func:`read_json` raises."""
    data = read_json(Path(directory) / "config.json", what="model config", allow_nan=True, unique_keys=False)
    model_type, architectures = data.get("model_type"), data.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    return (model_type if isinstance(model_type, str) else None,
            architecture if isinstance(architecture, str) else None)


def _a(what: str) -> str:
    """``what`` (a file's kind in a message: "adapter config", "model config") with its article."""
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def read_json_value(path: Path, what: str = "file", allow_nan: bool = False, unique_keys: bool = True) -> Any:
    """:func:`read_json` for a file whose top level may be any JSON value (sentence-transformers' ``modules.json``
    is an array)."""
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a directory, a FIFO, a device: say what it is, never "no such file"
            raise AdapterFormatError(f"{path}: {why_not_readable(path)}; expected a JSON {what}")
        if os.path.islink(path):  # there by name, a link to nothing (a cache's missing blob) or a loop
            raise AdapterFormatError(f"{path}: a symbolic link that leads to no file ({why_not_readable(path)}); "
                                     f"expected a JSON {what}")
        raise AdapterFormatError(f"{path}: no such {what}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise AdapterFormatError(f"{path}: {size} bytes; {_a(what)} of more than {MAX_JSON_BYTES} bytes is refused")
        # opened as a regular file without blocking, and read to the bound only: a named pipe or a larger file put
        # there since the look above (a path an adapter records, outside any store) is refused, never waited on
        with open_regular(path) as f:
            raw = read_at_most(f, MAX_JSON_BYTES)
        if len(raw) > MAX_JSON_BYTES:
            raise AdapterFormatError(f"{path}: more than {MAX_JSON_BYTES} bytes; {_a(what)} of more than "
                                     f"{MAX_JSON_BYTES} bytes is refused")
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                 "JSON files must be UTF-8") from exc
    return parse_json_value(text, str(path), what, allow_nan, unique_keys)


def parse_json_object(text: str, source: str, what: str = "file", allow_nan: bool = False,
                      unique_keys: bool = True) -> dict[str, Any]:
    """The JSON object in ``text`` (read from ``source``): :func:`parse_json_value`, which must be an object."""
    return _object(parse_json_value(text, source, what, allow_nan, unique_keys), source)


def _object(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{source}: expected a JSON object, got {show_json_value(data)}")
    return data


def parse_json_value(text: str, source: str, what: str = "file", allow_nan: bool = False,
                     unique_keys: bool = True) -> Any:
    """The JSON value in ``text`` (read from ``source``), with :func:`read_json`'s rules and errors: at most
    :data:`MAX_JSON_BYTES` characters, valid and not too deeply nested, no NaN/Infinity (nor a number too large
    to be finite, such as 1e400) unless ``allow_nan``, no key twice in one object unless not ``unique_keys``
    (Python's reader keeps the last: a second ``"task": null`` would change an adapter's labels silently)."""
    if len(text) > MAX_JSON_BYTES:
        raise AdapterFormatError(f"{source}: {len(text)} characters; {_a(what)} of more than {MAX_JSON_BYTES} is refused")
    hook = unique_key_object if unique_keys else None
    try:
        data = json.loads(text, object_pairs_hook=hook, parse_int=_json_int) if allow_nan else json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_json_int,
            object_pairs_hook=hook)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{source}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise AdapterFormatError(f"{source}: JSON nested too deeply to be {_a(what)}") from None
    except ValueError as exc:  # NaN / Infinity literals
        raise AdapterFormatError(f"{source}: {exc}") from exc
    return data


class DuplicateKeyError(ValueError):
    """A JSON object with a key twice (``key``): which value counts would depend on the parser (Python's keeps the
    last silently). Raised by :func:`unique_key_object` from inside ``json.loads``; each reader says it its own way."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key[:80]!r} appears twice in one object (which one is meant?)")
        self.key = key


def unique_key_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: the object's pairs as a dict, a key given twice refused
    (:class:`DuplicateKeyError`). The one duplicate-key rule of every JSON reader: files, data rows, request bodies."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (write a finite number)")


def _json_int(literal: str) -> int:
    """A JSON integer, one too long for Python to read (``sys.get_int_max_str_digits()``: 4300 digits) refused in
    words: Python's own error told the user to call ``sys.set_int_max_str_digits()``."""
    if len(literal) <= 4300:  # Python's default limit, the case of every real file: one comparison
        return int(literal)
    digits = len(literal.lstrip("-"))
    if digits > (limit := sys.get_int_max_str_digits() or digits):
        raise ValueError(f"a number of {digits} digits ({literal[:12]}...) is too long to be read (at most {limit})")
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400: valid JSON that Python reads as Infinity
        raise ValueError(f"{literal[:40]} is too large for a number (Infinity is not valid JSON)")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _is_positive_number(value: Any) -> bool:
    return _is_finite_number(value) and value > 0


#: The longest ``model_type`` an adapter may record (transformers' are under 40 characters).
MAX_MODEL_TYPE_CHARS = 100


def model_type_problem_of(value: Any) -> str | None:
    """Why ``value`` cannot be a recorded base ``model_type`` (None: it can, or it is None). The one rule of every
    place one is read: an adapter config, a PEFT copy's safetensors metadata."""
    if value is None or (isinstance(value, str) and value.isprintable() and 0 < len(value) <= MAX_MODEL_TYPE_CHARS):
        return None
    return f"must be printable text of 1-{MAX_MODEL_TYPE_CHARS} characters (a transformers model_type) or null, got " \
           f"{show_json_value(value)}"


def _encodable(text: str) -> bool:
    """False for strings that cannot be written as UTF-8 (lone surrogates from ``\\ud800`` escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_problem(path: Any) -> str | None:
    """What is wrong with ``path`` as a module path (``a.b.0.c``), or None.

    A path is a string of dot-separated, non-empty parts of printable characters without whitespace,
    at most 1,000 characters, encodable as UTF-8.
    """
    if not isinstance(path, str):
        return f"a module path must be a string, got {show_json_value(path)}"
    if not path or len(path) > 1000:
        return f"a module path must have 1..1000 characters, got {len(path)}"
    if not _encodable(path):
        return f"{path!r} is not valid text (lone surrogate)"
    # whole-string tests in C, not a Python test of every character (seconds for 100,000 modules): a printable
    # character that is whitespace is a space (str.isspace and str.isprintable share no other), and an empty part is a
    # dot at either end or two together
    if not path.isprintable() or " " in path or path[0] == "." or path[-1] == "." or ".." in path:
        return f"{path!r} is not a module path (dot-separated names without spaces or control characters)"
    return None


class PathOwners:
    """Which of ``entries`` (module paths, e.g. ``modules_to_save``) hold a module path: the path itself, or a prefix of
    it ending before a dot (``name == m or name.startswith(m + ".")``). Found by looking up the path's prefixes, not
    by testing every entry against every path (100,000 of each were 10**10 tests)."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.first: dict[str, int] = {}  # each entry's first position in ``entries``
        for index, entry in enumerate(entries):
            self.first.setdefault(entry, index)
        self.longest = max(map(len, self.first), default=0)

    def of(self, name: str, itself: bool = True) -> list[str]:
        """The entries holding ``name`` (with ``itself``, one equal to it counts), shortest first."""
        found = []
        dot = name.find(".", 0, self.longest + 1)
        while dot >= 0:  # an owner is a prefix ending before a dot, no longer than the longest entry
            if name[:dot] in self.first:
                found.append(name[:dot])
            dot = name.find(".", dot + 1, self.longest + 1)
        if itself and name in self.first:
            found.append(name)
        return found

    def first_of(self, name: str) -> str | None:
        """The entry holding ``name`` (or equal to it) that comes first in ``entries``, or None."""
        return min(self.of(name), key=self.first.__getitem__, default=None)


def show_names(names: Sequence[str], limit: int = 8) -> str:
    """A list of names for a message, its first ``limit`` shown (``['a', 'b', ...] (12 in all)``): a message repeated
    per tensor once held a whole 100,000-entry ``modules_to_save``, 1.1 MB per line, 1.3 GB for 1,000 stray tensors."""
    names = list(names)
    if len(names) <= limit:
        return repr(names)
    return f"{repr(names[:limit])[:-1]}, ...] ({len(names):,} in all)"


def repeated_label(id2label: dict[int, str]) -> str | None:
    """The first label name ``id2label`` gives two classes, as ``'name' names classes i and j``; None if none."""
    first: dict[str, int] = {}
    for index in sorted(id2label):
        name = id2label[index]
        if name in first:
            return f"{show_json_value(name)} names classes {first[name]} and {index}"
        first[name] = index
    return None


def show_json_value(value: Any, limit: int = 80) -> str:
    """A short description of a JSON value for messages: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # as the client wrote it (JSON), not Python's True
        return "true" if value else "false"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, dict):
        return f"an object {text}" if len(text) < 40 else "an object"
    if isinstance(value, list):
        return f"a list {text}" if len(text) < 40 else "a list"
    if isinstance(value, (str, int, float)):
        return text
    return type(value).__name__


#: What a ``--method head-only``/``custom`` run saves instead of an adapter: its trainable tensors.
TRAINABLE_FILE = "trainable_parameters.safetensors"

#: Files whose presence means a directory holds a tokenizer (any one of them): the fast tokenizer's file, its config,
#: and the vocabulary file of each tokenizer class of the model types bca-deploy exports, as transformers names them
#: (``vocab_files_names``; XLM-RoBERTa reads ``sentencepiece.bpe.model``, DeBERTa-v2/v3 ``spm.model``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "spm.model")

#: Every file a saved tokenizer may read: each present must be a regular file
#: (:func:`bca_deploy.models.load_saved_tokenizer`; ``inspect`` checks an export's the same way).
TOKENIZER_READS = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


#: The largest tokenizer file read (bytes). transformers, tokenizers and sentencepiece read each file whole into memory
#: before they parse it, so a sparse file declaring gigabytes (8 GB of zeros as tokenizer_config.json) took that much
#: memory, or the process was killed, before any error; the largest published tokenizer files are tens of MB.
MAX_TOKENIZER_FILE_BYTES = 512 * 1024 * 1024


def tokenizer_file_size_problem(path: str | Path) -> str | None:
    """Why the tokenizer file ``path`` (a regular file) is too large to read (:data:`MAX_TOKENIZER_FILE_BYTES`), or
    None: the one size rule of every reader of a saved tokenizer (:func:`bca_deploy.models.load_saved_tokenizer`) and
    of ``inspect``'s check of an export's files."""
    size = os.stat(path).st_size
    if size <= MAX_TOKENIZER_FILE_BYTES:
        return None
    return (f"{size:,} bytes; a tokenizer file of more than {MAX_TOKENIZER_FILE_BYTES:,} bytes is refused unread (the "
            "largest published ones are tens of MB)")


def tokenizer_files(directory: str | Path) -> Iterator[Path]:
    """Each file of :data:`TOKENIZER_READS` present in ``directory``, in that order: present by its name, whatever
    it is (a dangling link, a pipe, a directory count: the reader then refuses it by name rather than transformers
    skipping it or blocking on it). The one walk of a saved tokenizer's files: what
    :func:`bca_deploy.models.load_saved_tokenizer` requires to be readable, and what ``inspect`` checks in an export."""
    for name in TOKENIZER_READS:
        path = Path(directory) / name
        if os.path.lexists(path):
            yield path


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer (one of :data:`TOKENIZER_FILES` present, loadable or not, as
    :func:`tokenizer_files` finds it): without one no stage loads a tokenizer there, so its other files are not read."""
    return any(path.name in TOKENIZER_FILES for path in tokenizer_files(directory))


#: Folders a training run writes its adapters to (``bca-deploy train --out RUN``: RUN/best, RUN/last), in the
#: order a run stands for them: best/ (chosen on --eval-data) when there is one, else last/.
RUN_ADAPTER_FOLDERS = ("best", "last")


def nested_adapters(directory: str | Path, keep: Callable[[Path], bool] | None = None) -> list[str]:
    """The names of the adapter directories right inside ``directory`` (sorted; of its first 1,000 entries).

    PEFT's ``save_pretrained`` writes an adapter not named ``default`` into a folder of its name, beside (or, with no
    ``default``, instead of) the ``adapter_config.json`` of ``default``.

    ``keep``: only folders whose ``adapter_config.json`` path it accepts, asked before that file is looked at (an
    adapter store's rule: nothing reached through a link out of the store is stat'ed or named)."""
    path = Path(directory)
    try:
        return sorted(c.name for c in itertools.islice(path.iterdir(), 1000)
                      if (keep is None or keep(c / CONFIG_FILE)) and (c / CONFIG_FILE).is_file())
    except OSError:
        return []


#: The folders a transformers ``Trainer`` saves its checkpoints to in its ``output_dir`` (``checkpoint-<step>``;
#: transformers' ``PREFIX_CHECKPOINT_DIR``): of a PEFT model, each an adapter directory.
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def nested_adapters_hint(directory: str | Path, entry: str | None = None,
                         keep: Callable[[Path], bool] | None = None) -> str:
    """For a directory without ``adapter_config.json``: the adapter directories right inside it
    (:func:`nested_adapters`), as a hint ("" when none); users pass the parent.

    Two layouts hold them: PEFT's ``save_pretrained`` (an adapter not named ``default`` in a folder of its name), and
    a transformers ``Trainer``'s ``output_dir`` (``checkpoint-<step>`` folders, each an adapter saved during training):
    there the hint names the last checkpoint by step (the first by name was ``checkpoint-2`` of 2 and 4, or
    ``checkpoint-1000`` of 500, 1000 and 1500), and the best one when its ``trainer_state.json`` records one here.

    ``entry``: the directory is adapter store entry ``entry`` (:class:`~bca_deploy.serving.AdapterStore`), whose
    adapters are loaded by name, one folder each: the hint names the folders inside the entry (``entry/b``, never
    the store's location) and says to give the one wanted an entry of its own; ``keep``: :func:`nested_adapters`'s.
    """
    path = Path(directory)
    names = nested_adapters(path, keep)
    if not names:
        return ""
    # a store loads a folder of its own by name (a link inside the store is followed)
    own = "an entry of its own in the adapter store (move or link it there) and load it by that name"
    shown = (lambda name: str(path / name)) if entry is None else (lambda name: f"{entry}/{name}")  # noqa: E731
    steps = {n: int(m.group(1)) for n in names if (m := _TRAINER_CHECKPOINT.fullmatch(n))}
    if len(steps) == len(names):
        ordered = sorted(names, key=steps.__getitem__)
        listed = ", ".join(f"{n}/" for n in ordered) if len(ordered) <= 5 else \
            ", ".join(f"{n}/" for n in ordered[:2]) + ", ..., " + ", ".join(f"{n}/" for n in ordered[-2:])
        best = _trainer_best_checkpoint(path / ordered[-1])
        chosen = (f"the best, {shown(best)} (trainer_state.json's best_model_checkpoint), or the last, "
                  f"{shown(ordered[-1])}" if best in steps and best != ordered[-1] else f"the last, {shown(ordered[-1])}")
        which = "pass one, such as" if entry is None else f"give one {own}, such as"
        return (f"; it holds the checkpoint{'' if len(names) == 1 else 's'} {listed} of a transformers Trainer run "
                f"(its output_dir; each checkpoint is an adapter saved during training): {which} {chosen}")
    listed = ", ".join(f"{n}/" for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return (f"; it holds the adapter director{'y' if len(names) == 1 else 'ies'} {listed} (PEFT saves an adapter not "
            f"named 'default' in a folder of its name): " + (
        f"pass {shown(names[0])}" if entry is None else f"give {shown(names[0])} {own}"))


def _trainer_best_checkpoint(checkpoint: Path) -> str | None:
    """The folder name of the best checkpoint a ``Trainer`` checkpoint's ``trainer_state.json`` records
    (``best_model_checkpoint``, set with ``metric_for_best_model``), or None: not recorded, or not readable (a hint
    never fails for it)."""
    try:
        best = read_json(checkpoint / "trainer_state.json", what="trainer state").get("best_model_checkpoint")
    except (AdapterFormatError, OSError):
        return None
    return Path(best).name if isinstance(best, str) and best else None


def adapter_as_model_hint(directory: str | Path) -> str:
    """For a directory given as a base model that has no model in it: when it is an adapter directory (or a training
    run holding one, :func:`run_adapter_dir`), a hint saying so and what goes where, with the base model the adapter
    records ("" otherwise). PEFT's ``save_pretrained`` writes ``adapter_model.safetensors`` beside the config, which
    was taken for a checkpoint in another format ("convert the checkpoint to safetensors first")."""
    adapter = run_adapter_dir(directory)
    if not (adapter / CONFIG_FILE).is_file():
        return ""
    try:
        data = read_json(adapter / CONFIG_FILE, what="adapter config")
    except AdapterFormatError:
        data = {}
    base = data.get("base_model_name_or_path") if "peft_type" in data else (
        data.get("base_model") or {}).get("name_or_path") if isinstance(data.get("base_model"), dict) else None
    kind = (f"a PEFT {data['peft_type']} adapter" if isinstance(data.get("peft_type"), str)
            else "a bca-deploy adapter" if data.get("format") == FORMAT_NAME else "an adapter")
    where = "" if adapter == Path(directory) else f" (a training run's, in {adapter.name}/)"
    recorded = f"; it records {show_json_value(base)[:200]}" if isinstance(base, str) and base else ""
    return (f"; it is {kind}{where}, not a base model: give it as the adapter (--adapter), and as the model (--model) "
            f"the base model it was trained on{recorded}")


def run_adapter_dir(directory: str | Path) -> Path:
    """The adapter directory ``directory`` stands for.

    An adapter directory (it holds ``adapter_config.json``) stands for itself; a training run's directory
    (``bca-deploy train --out RUN``) for its ``best/`` adapter, or ``last/`` when it has no ``best/`` (a run
    without ``--eval-data``). Anything else is returned as given, for the reader to name what is missing.
    The one rule for every command that takes an adapter and for :class:`~bca_deploy.serving.AdapterStore`
    (here because this module imports no torch: the CLI applies it while parsing options). A folder holding either
    file by name stands for itself whatever the file is (a link to nothing, a pipe): its reader names it, rather than
    best/ with a broken config being passed over for last/ without a word.
    """
    path = Path(directory)
    saved = lambda folder: os.path.lexists(folder / CONFIG_FILE) or os.path.lexists(folder / TRAINABLE_FILE)  # noqa: E731
    if saved(path):
        return path
    for folder in RUN_ADAPTER_FOLDERS:
        if saved(path / folder):
            return path / folder
    return path
