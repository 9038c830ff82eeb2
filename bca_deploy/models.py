"""Loading a base model for an adapter's task: the one place that picks the transformers class.

An adapter records what it was trained for (:class:`bca_deploy.config.TaskSpec`: ``seq-cls`` with its
head's ``num_labels``/``id2label``, ``causal-lm``, ``feature-extraction``). Every later stage (export,
evaluation, serving tests, the demo) loads the base model the same way, through :func:`load_model`:

1. :func:`resolve_task` decides the task: an explicit ``task`` (which must agree with the adapters),
   else the adapters' ``TaskSpec``, else the base checkpoint's ``architectures``.
2. :func:`load_base` loads ``AutoModel`` / ``AutoModelForSequenceClassification`` (with the head's
   label count and names) / ``AutoModelForCausalLM`` in float32, without transformers' "newly
   initialized ... You should probably TRAIN this model" warning when the adapters restore those
   weights; a head that nothing restores is refused, since it would compute noise.
3. Every adapter is checked against the model before any is loaded (all-or-nothing), then loaded.

Works on transformers 4.45+ and 5.x; nothing here imports optimum.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import EXPORT_TASKS, MAX_NUM_LABELS, RUN_ADAPTER_FOLDERS, HeadSpec, TaskSpec, run_adapter_dir
from .errors import AdapterMismatchError, BCAError, CheckpointFormatError, require_readable

__all__ = [
    "attention_window",
    "position_limit",
    "tokenizer_limit",
    "ids_past_vocabulary",
    "describe_ids_past_vocabulary",
    "token_names",
    "vocabulary_size",
    "load_config",
    "TaskError",
    "ModelTask",
    "EXPORT_TASK_TYPES",
    "TASK_SYNONYMS",
    "resolve_task",
    "task_from_architecture",
    "load_base",
    "config_fit_problems",
    "config_counts",
    "count_problem",
    "layer_count_problem",
    "require_config_fits_weights",
    "MAX_CONFIG_COUNT",
    "require_readable_weights",
    "weights_file_problem",
    "load_model",
    "adapter_name_of",
    "adapter_names",
    "cache_argument",
    "output_cache",
    "cache_tensors",
]


def load_config(model_dir: str | Path):
    """The transformers config of ``model_dir``: its ``config.json`` read first by the one JSON rule
    (:func:`bca_deploy.config.read_json`; NaN allowed, as some configs hold it), then by transformers.

    Every stage that reads a model's or an export's config goes through here, so a malformed one is the same
    error everywhere (train, evaluate, export, validate, serve), never transformers' own exception.

    Raises:
        InputNotFoundError: no ``config.json`` in ``model_dir``.
        CheckpointFormatError: not a bounded JSON object, or transformers cannot build a config from it (an
            unknown ``model_type``, a field of the wrong type...), naming the file.
    """
    from transformers import AutoConfig

    from .config import adapter_as_model_hint, read_json
    from .errors import AdapterFormatError, CheckpointFormatError, InputNotFoundError, first_line

    path = Path(model_dir) / "config.json"
    if not os.path.lexists(path):
        raise InputNotFoundError(f"{model_dir}: no config.json (expected a transformers model directory)"
                                 f"{adapter_as_model_hint(model_dir)}")
    require_readable(path)  # a pipe, a directory, a dangling link: said as such, by name (never read blocking)
    try:
        data = read_json(path, what="model config", allow_nan=True, unique_keys=False)
    except AdapterFormatError as exc:
        raise CheckpointFormatError(str(exc)) from None
    problem = count_problem(data, str(path))
    if problem is not None:  # transformers expands some into per-layer lists (qwen2's layer_types) while reading it
        raise CheckpointFormatError(problem)
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except MemoryError:
        raise CheckpointFormatError(f"{path}: transformers ran out of memory reading this config; check its sizes "
                                    "(num_hidden_layers...)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointFormatError(f"{path}: transformers cannot read this config ({type(exc).__name__}: "
                                    f"{first_line(exc)})") from None


#: The largest count of layers or experts a ``config.json`` may give, in any of its fields (``num_hidden_layers``,
#: ``n_layer``, ``decoder_layers``, ``num_local_experts``..., nested configs' included). The deepest published
#: transformer has 1,000 layers (DeepNet), released models at most ~130 (Llama-3.1-405B: 126), and the most experts
#: 2,048 (Switch-C); transformers builds one module per layer or expert, and expands some counts into lists while
#: merely reading the config (qwen2's ``layer_types``: 1e8 layers took 113 s and 12 GiB), so a larger count is refused
#: before transformers reads the file.
MAX_CONFIG_COUNT = 10_000

_COUNT_FIELD = re.compile(r"(?:^|_)(?:layers?|experts)$")
#: The fields that give a model's number of layers (others ending in ``layers`` do not: qwen2's ``max_window_layers``
#: defaults to 28 whatever the depth).
_LAYER_COUNTS = frozenset({"num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                           "num_encoder_layers", "num_decoder_layers"})


def config_counts(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, int]]:
    """``(field, value)`` of every integer field of a parsed ``config.json`` that counts layers or experts (its name
    ends in ``layers``, ``layer`` or ``experts``), in nested configs too (``text_config.num_hidden_layers``)."""
    found: list[tuple[str, int]] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            found += config_counts(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool) and _COUNT_FIELD.search(str(key)):
            found.append((f"{prefix}{key}", value))
    return found


def count_problem(config: Mapping[str, Any], source: str) -> str | None:
    """Why ``config`` (a parsed ``config.json``, read from ``source``) is refused before anything reads it further:
    a count of layers or experts above :data:`MAX_CONFIG_COUNT`; else None."""
    too_many = [f"{name}={value}" for name, value in config_counts(config) if value > MAX_CONFIG_COUNT]
    if not too_many:
        return None
    return (f"{source}: {', '.join(too_many[:5])}: more layers or experts than any model has (at most "
            f"{MAX_CONFIG_COUNT:,} are read)")


def layer_count_problem(config: Mapping[str, Any], tensors: int, source: str) -> str | None:
    """Why ``config`` (a parsed ``config.json``) cannot describe a checkpoint of ``tensors`` tensors, or None: a
    model stores at least one tensor per layer, so a layer count above ``tensors`` is not this checkpoint's, and
    building it would take time and memory in proportion (a hostile config can ask for millions of modules)."""
    for name, value in config_counts(config):
        if name.rpartition(".")[2] in _LAYER_COUNTS and value > tensors:
            return f"{source}: {name}={value}, but the checkpoint holds only {tensors} tensors"
    return None


def require_config_fits_weights(model_dir: str | Path) -> None:
    """Refuse a checkpoint whose ``config.json`` does not describe its safetensors weights, from the headers alone
    and before any model is built in memory: the rule :func:`config_fit_problems` (the streaming merge's check),
    with the model built on the meta device. ``from_pretrained`` would otherwise build the config's model for real
    first: millions of layers for an edited ``num_hidden_layers`` (minutes, then out of memory), gigabytes for an
    edited ``max_position_embeddings``; and, where a classifier head is replaced (``ignore_mismatched_sizes``),
    load it with the mismatched tensors initialized at random. A directory without ``model.safetensors`` or an
    index, or a config transformers cannot build, is left to ``from_pretrained`` (its own error).

    Raises:
        CheckpointFormatError: naming config.json and every tensor or layer list that does not fit.
    """
    from .merge import _key_map, _read_checkpoint, _structure

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return
    ckpt = _read_checkpoint(model_dir)
    try:
        model = _structure(ckpt, None, None)  # refuses more layers than stored tensors before building any
    except CheckpointFormatError:
        raise
    except Exception:  # noqa: BLE001 - no structure to be had: from_pretrained says why
        return
    locations = ckpt.locations()
    stored = {key: (info.dtype, info.shape) for key, (_, info) in locations.items()}
    files = {key: shard for key, (shard, _) in locations.items()}
    problems = config_fit_problems(model, stored, _key_map(model, locations), files=files)
    if problems:
        raise config_misfit_error(model_dir, ckpt.model_type, model, problems, "use")


def meta_model(model_dir: str | Path, task: str | None = None) -> nn.Module | None:
    """The checkpoint built on the meta device as ``task`` (``seq-cls``, ``causal-lm``, ``feature-extraction``) loads
    it: its layers' paths and types, no memory; None where none can be built (no safetensors weights, a config
    transformers cannot build). Without ``task``, or for a task transformers has no class of this model type for, the
    checkpoint's own architecture (config.json's ``architectures``). What a PEFT config's rules (which modules it
    adapts) are checked against where no model is loaded (``convert``): a PEFT classifier was trained on the
    classification model, not on the pre-training heads a checkpoint may also hold (``lm_head.dense``, ``cls.*``).

    Raises:
        CheckpointFormatError: a malformed checkpoint, or a config asking for more layers than it stores tensors.
    """
    from .config import task_architecture
    from .errors import CheckpointFormatError
    from .merge import _read_checkpoint, _structure

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return None
    try:
        ckpt = _read_checkpoint(model_dir)
        model_type = (ckpt.config or {}).get("model_type")
        architecture = task_architecture(task, model_type if isinstance(model_type, str) else None) if task else None
        return _structure(ckpt, architecture, None)
    except CheckpointFormatError:
        raise
    except Exception:  # noqa: BLE001 - no structure to be had (loading it says why, with its own error)
        return None


class TaskError(BCAError, ValueError):
    """The task asked for, the adapters' recorded tasks and the base checkpoint do not agree."""


#: Each export task and the adapter task type (:data:`bca_deploy.config.TASK_TYPES`) it serves.
EXPORT_TASK_TYPES: dict[str, str] = {
    "feature-extraction": "feature-extraction",
    "feature-extraction-with-past": "feature-extraction",
    "text-classification": "seq-cls",
    "text-generation": "causal-lm",
    "text-generation-with-past": "causal-lm",
}

#: Other names users type for a task (optimum's synonyms and the adapter task types).
TASK_SYNONYMS: dict[str, str] = {
    "seq-cls": "text-classification",
    "sequence-classification": "text-classification",
    "sentiment-analysis": "text-classification",
    "causal-lm": "text-generation-with-past",
    "causal-lm-with-past": "text-generation-with-past",
    "default": "feature-extraction",
    "default-with-past": "feature-extraction-with-past",
}

#: Architecture name suffix -> adapter task type, for checkpoints whose adapters record no task.
_TYPE_BY_SUFFIX = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForSequenceClassification", "seq-cls"),
    ("Model", "feature-extraction"),
)


@dataclasses.dataclass(frozen=True)
class ModelTask:
    """The task a model is loaded for.

    Attributes:
        type: the adapter task type (``seq-cls``, ``causal-lm``, ``feature-extraction``).
        export_task: the ONNX export task (``text-classification``, ``text-generation-with-past``...).
        head: the classifier head the adapters bring (its labels set the model's config); None when the
            model keeps the checkpoint's own head or has none.
        source: where the task came from, for messages (``"task='...'"``, an adapter directory, the config).
    """

    type: str
    export_task: str
    head: HeadSpec | None = None
    source: str = ""


def _normalize(task: str) -> str:
    """An explicit task name → an export task (``seq-cls`` → ``text-classification``...)."""
    name = TASK_SYNONYMS.get(task, task)
    if name not in EXPORT_TASK_TYPES:
        known = sorted(set(EXPORT_TASK_TYPES) | set(TASK_SYNONYMS))
        raise TaskError(f"task {task!r} is not one bca-deploy loads or exports; use one of: {', '.join(known)}")
    return name


def task_from_architecture(config: Any) -> str | None:
    """The adapter task type of a checkpoint's ``architectures[0]`` (``BertModel`` → ``feature-extraction``), or None."""
    architectures = getattr(config, "architectures", None) or []
    for name in architectures[:1]:
        for suffix, task_type in _TYPE_BY_SUFFIX:
            if name.endswith(suffix):
                return task_type
    return None


def _adapter_tasks(adapter_dirs: Sequence[Path], model_dir: Path, model_config: Any) -> list[tuple[Path, TaskSpec]]:
    """Each adapter's recorded task; a seq-cls one that saves its classifier without recording it gets the head
    :func:`saved_label_head` finds (``model_config``: the checkpoint's, loaded here if None and needed).

    Raises:
        AdapterMismatchError: an adapter records another base ``model_type`` than the checkpoint's (checked first:
            a bert adapter on a llama checkpoint is that, not a task llama cannot be exported for).
    """
    from .adapter_io import read_adapter_header
    from .errors import format_problems
    from .fit import model_type_problem

    model_type = _checkpoint_model_type(model_dir, model_config)
    found = []
    for directory in adapter_dirs:
        header = read_adapter_header(directory)  # the config and the tensors' shapes: no tensor data is read here
        config = header.config
        if (problem := model_type_problem(config, model_type, f"checkpoint {model_dir}")) is not None:
            raise AdapterMismatchError(format_problems(f"{directory} does not fit checkpoint {model_dir}:", [problem]))
        spec = config.task
        if spec is None:
            continue
        if spec.type == "seq-cls" and spec.head is None and config.modules_to_save:
            if model_config is None:
                model_config = load_config(model_dir)
            head = saved_label_head(model_config, config.modules_to_save, header.shapes)
            if head is not None:
                spec = dataclasses.replace(spec, head=head)
        found.append((directory, spec))
    return found


def _checkpoint_model_type(model_dir: Path, model_config: Any) -> str | None:
    """``model_type`` of the checkpoint: ``model_config``'s, else its ``config.json``'s as read (no transformers
    config is built here); None when it has none or the file cannot be read (the load that follows says why)."""
    from .config import read_json

    if model_config is not None:
        model_type = getattr(model_config, "model_type", None)
    else:
        try:
            model_type = read_json(model_dir / "config.json", what="model config", allow_nan=True,
                                   unique_keys=False).get("model_type")
        except (BCAError, OSError):
            return None
    return model_type if isinstance(model_type, str) and model_type else None


def _peft_task_not_exported(adapter_dirs: Sequence[Path]) -> tuple[Path, str] | None:
    """The first PEFT adapter whose ``task_type`` is one bca-deploy does not load for (TOKEN_CLS...), and that type."""
    from .config import read_json
    from .peft_compat import PEFT_TASK_TYPES, is_peft_config

    for directory in adapter_dirs:
        try:
            data = read_json(directory / "adapter_config.json", what="adapter config")
        except BCAError:
            continue
        peft_task = data.get("task_type") if is_peft_config(data) else None
        if isinstance(peft_task, str) and peft_task not in PEFT_TASK_TYPES.values():
            return directory, peft_task[:40]
    return None


def saved_label_head(model_config: Any, modules_to_save: Sequence[str],
                     shapes: Mapping[str, Sequence[int]]) -> HeadSpec | None:
    """The classifier head a seq-cls adapter saves whole without recording it (PEFT's SEQ_CLS adapters: the
    classifier is in ``modules_to_save``, its labels are not written); None when it saves no label layer.

    PEFT's usual recipe loads a bare encoder (whose config says 2 labels, and which holds no classifier) as
    ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)``, trains with the classifier in
    ``modules_to_save`` and writes no labels: the saved label layer's rows are the only record of how many there
    are. The label layer is the last Linear of the saved head modules in the model's module order (the rule the
    adapter bank applies, :func:`bca_deploy.exporters.bank.head_layout_problems`), found on the checkpoint's
    seq-cls model built on the meta device (no memory). Its labels are the checkpoint's when it has as many
    (names, ``problem_type``), else ``LABEL_<i>`` as transformers names them.

    Args:
        model_config: the checkpoint's config.
        modules_to_save: the adapter's modules saved whole.
        shapes: the adapter's tensor names (model paths) and shapes.
    """
    import transformers

    from .exporters.bank import head_layout_problems

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForSequenceClassification.from_config(model_config)
    except Exception:  # noqa: BLE001 - no seq-cls model for this config: loading it says why, with its own error
        return None
    owners = {".".join(parts[:i]) for parts in (name.split(".") for name in shapes) for i in range(1, len(parts))}
    saved = [m for m in modules_to_save if m in owners]  # entries with tensors (a list of 100,000 names costs no more)
    if not saved:
        return None
    layout, _ = head_layout_problems(model, saved)
    if layout is not None:
        modules, label_module = list(layout.modules), layout.label_layer.module
    else:
        # Not a head a bank can hold per row (a saved module with parameters other than Linear/LayerNorm ones): the label
        # layer is still the last Linear of the saved modules; only ``export --bank`` refuses such a head (it says why)
        modules = [m for m in sorted(set(saved)) if not any(m.startswith(q + ".") for q in saved if q != m)]
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        linear = [name for path in modules if path in order
                  for name, sub in model.get_submodule(path).named_modules(prefix=path) if isinstance(sub, nn.Linear)]
        if not linear:
            return None  # no label layer saved: the loader's fit check names what does not fit
        label_module = max(linear, key=order.__getitem__)
    weight, bias = shapes.get(f"{label_module}.weight"), shapes.get(f"{label_module}.bias")
    rows = {tuple(t)[0] for t in (weight, bias) if t is not None and len(t) >= 1}
    if len(rows) != 1:
        return None  # not saved, or weight and bias disagree: the fit check says so
    num_labels = rows.pop()
    if not 1 <= num_labels <= MAX_NUM_LABELS:
        return None
    same = num_labels == getattr(model_config, "num_labels", None)
    given = {int(k): str(v) for k, v in (getattr(model_config, "id2label", None) or {}).items()} if same else {}
    names = {i: given.get(i, f"LABEL_{i}") for i in range(num_labels)}
    if len(set(names.values())) < num_labels:  # a label2id needs distinct names
        names = {i: f"LABEL_{i}" for i in range(num_labels)}
    return HeadSpec(modules=modules, num_labels=num_labels, id2label=names,
                    label2id={name: i for i, name in names.items()},
                    problem_type=getattr(model_config, "problem_type", None) if same else None)


def resolve_task(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path] = (),
    task: str | None = None,
    *,
    model_config: Any = None,
    one_head: bool = True,
) -> ModelTask:
    """Decide what to load ``model_dir`` as: ``task`` if given, else the adapters' task, else the checkpoint's.

    Args:
        model_dir: the base checkpoint directory.
        adapter_dirs: the adapters that will be applied; their ``TaskSpec`` (if recorded) decides the task.
        task: an explicit task: an export task (``text-classification``, ``text-generation-with-past``,
            ``text-generation``, ``feature-extraction``, ``feature-extraction-with-past``), an adapter task
            type (``seq-cls``, ``causal-lm``), or a synonym.
        model_config: the checkpoint's config, if already loaded.
        one_head: refuse adapters that bring different classifier heads (one model holds one head). An
            adapter bank, which keeps a head per adapter, passes False; the result then has no ``head``.

    Raises:
        TaskError: an unknown task; adapters recording different tasks; an explicit task that
            contradicts an adapter's; no task given, recorded or inferable.
        AdapterMismatchError: several adapters bring different classifier heads (one model holds one head).
    """
    adapter_dirs = [Path(d) for d in adapter_dirs]
    recorded = _adapter_tasks(adapter_dirs, Path(model_dir), model_config)
    types = sorted({spec.type for _, spec in recorded})
    if len(types) > 1:
        listed = "; ".join(f"{d} ({spec.type})" for d, spec in recorded)
        raise TaskError(f"these adapters were trained for different tasks: {listed}. Apply adapters of one task together")
    heads = [(d, spec.head) for d, spec in recorded if spec.head is not None]
    head = heads[0][1] if heads else None
    different = [d for d, h in heads if (h.num_labels, h.id2label) != (head.num_labels, head.id2label)]
    if different and not one_head:
        head = None
    elif different:
        raise AdapterMismatchError(
            f"{heads[0][0]} and {', '.join(map(str, different))} each bring their own classifier head, with different "
            "labels; one model holds one head. Export them as an adapter bank (export --bank), which keeps a head per "
            "adapter, or apply one at a time"
        )
    if task is not None:
        export_task = _normalize(task)
        wanted = EXPORT_TASK_TYPES[export_task]
        if recorded and wanted != types[0]:
            directory, spec = recorded[0]
            raise TaskError(
                f"task {task!r} contradicts {directory}, which was trained for {spec.type} (exported as "
                f"{spec.export_task!r}); leave the task out to use the adapter's"
            )
        return ModelTask(wanted, export_task, head if wanted == "seq-cls" else None, f"task={task!r}")
    if recorded:
        directory, spec = recorded[0]
        return ModelTask(spec.type, EXPORT_TASKS[spec.type], head, f"adapter {directory}")
    if model_config is None:
        model_config = load_config(model_dir)
    task_type = task_from_architecture(model_config)
    if task_type is None:
        other = _peft_task_not_exported(adapter_dirs)
        if other is not None:  # a PEFT TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM... adapter: say so, not "pass a task"
            directory, peft_task = other
            raise TaskError(
                f"{directory} was trained for PEFT task_type {peft_task!r}, which bca-deploy does not export or serve "
                "(it exports SEQ_CLS, CAUSAL_LM and FEATURE_EXTRACTION adapters); `bca-deploy merge` writes the "
                "adapted model (the kernels merged, the modules it saves, such as its classifier, in place) as a "
                "checkpoint for transformers' AutoModelFor<task>, and bca_deploy.load_adapter applies it in PyTorch"
            )
        raise TaskError(
            f"{model_dir}: cannot tell the task: no adapter records one and config.json's architectures "
            f"({getattr(model_config, 'architectures', None)}) name no known head; pass a task "
            f"({', '.join(sorted(EXPORT_TASK_TYPES))})"
        )
    return ModelTask(task_type, EXPORT_TASKS[task_type], None, f"{model_dir}/config.json architectures")


_HUB_REVISION = re.compile(r"[0-9a-f]{40}")


def adapter_name_of(directory: str | Path, safe: bool = True) -> str:
    """The name an adapter directory goes by: its folder name, the run's name for ``RUN/best`` / ``RUN/last``, or the
    repository's for a Hugging Face cache snapshot (``models--org--tone-adapter/snapshots/<commit>``: ``tone-adapter``).

    ``runs/sentiment/best`` is ``sentiment`` (what the user called the run), not ``best``. Characters outside
    letters, digits, ``_`` and ``-`` become ``_`` (``runs/sst2.v1`` is ``sst2_v1``), and it starts with a letter or
    digit: it names the adapter in the model (a PyTorch key: no ``.``, :func:`bca_deploy.layers.adapter_name_problem`)
    and, in a bank, on the server's routes (:data:`bca_deploy.serving.session.ADAPTER_NAME_PATTERN`). ``safe=False``:
    the folder name as it is (how banks exported before names were made safe recorded their slots).
    """
    path = Path(directory)
    name = path.name
    if safe and _HUB_REVISION.fullmatch(name) and path.parent.name == "snapshots" \
            and path.parent.parent.name.startswith("models--"):
        # a Hugging Face cache snapshot (models--org--repo/snapshots/<commit>): the repository's name, not the commit
        name = path.parent.parent.name.rpartition("--")[2] or name
    if name in RUN_ADAPTER_FOLDERS:
        run = path.parent.name
        if run in ("", ".", ".."):  # "best" given from inside the run: the run's own folder name
            run = path.resolve().parent.name
        name = run or name
    if safe:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", name).lstrip("_-")[:128]
    return name or "adapter"


def adapter_names(adapter_dirs: Sequence[str | Path], safe: bool = True) -> list[str]:
    """One adapter name per directory (:func:`adapter_name_of`), made unique with a suffix where needed."""
    names: list[str] = []
    for directory in adapter_dirs:
        base = adapter_name_of(directory, safe)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def _auto_class(task_type: str):
    import transformers

    return {"seq-cls": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM,
            "feature-extraction": transformers.AutoModel}[task_type]


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` (transformers >= 4.56; 5.x loads the checkpoint's dtype by default) or ``torch_dtype=``."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def weights_file_problem(path: str | Path) -> str | None:
    """What is wrong with a weights file (or shard index) there by name that is not a regular file, for a message
    naming it ("<path>: a named pipe (FIFO), not a regular file, expected a safetensors file"; a link to nothing, a
    cache's missing blob, says so); None for a regular file. The one rule merge, train, evaluate, export and validate
    refuse such a file by, as a :class:`CheckpointFormatError` (exit code 2), before anything reads it."""
    from .errors import why_not_readable

    path = Path(path)
    if path.is_file():
        return None
    why = why_not_readable(path)
    what = f"a symbolic link that leads to no file ({why})" if os.path.islink(path) and not path.exists() else why
    expected = ("a JSON index of shards" if path.name.endswith(".index.json") else
                "a safetensors file" if path.suffix == ".safetensors" else "a PyTorch weights file")
    return f"{path}: {what}, expected {expected}"


def require_readable_weights(model_dir: str | Path) -> None:
    """Refuse ``model_dir``'s weights files (and shard indexes) that are not regular files (a named pipe, a device, a
    directory, a link to nothing: :func:`weights_file_problem`, a :class:`CheckpointFormatError` naming each), then
    raise the ``PermissionError`` naming one this user may not read: transformers reports one as "No such file or
    directory", and blocks for ever on a pipe. Every loader of a checkpoint calls it first."""
    if not Path(model_dir).is_dir():
        return  # what is missing is for the loader to say
    paths = [path for path in sorted(Path(model_dir).iterdir())
             if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")]
    problems = [problem for problem in map(weights_file_problem, paths) if problem]
    if problems:
        raise CheckpointFormatError("; ".join(problems))
    for path in paths:
        require_readable(path)


def load_base(
    model_dir: str | Path,
    task: ModelTask | str,
    *,
    dtype: torch.dtype = torch.float32,
    head_from_adapters: bool | None = None,
) -> tuple[nn.Module, list[str]]:
    """Load the base model for ``task`` and return it with the names of the weights the checkpoint lacked.

    A seq-cls task with a head from the adapters gets that head's ``num_labels``, ``id2label``,
    ``label2id`` and ``problem_type`` (a checkpoint head of another size is dropped: the adapter's
    replaces it). Weights the checkpoint lacks are initialized with a fixed seed (every load gives the
    same values) and transformers' warning about them is silenced: the caller decides (see
    :func:`load_model`).

    Args:
        model_dir: the checkpoint directory.
        task: a :class:`ModelTask` or an export task / adapter task type.
        dtype: weights' dtype (default float32 on both transformers lines).
        head_from_adapters: whether the classifier head will be restored from the adapters (default:
            ``task.head is not None``).

    Returns:
        ``(model in eval mode, missing weight names)``.
    """
    import transformers

    require_readable_weights(model_dir)
    require_config_fits_weights(model_dir)
    if isinstance(task, str):
        export_task = _normalize(task)
        task = ModelTask(EXPORT_TASK_TYPES[export_task], export_task)
    kwargs: dict[str, Any] = _dtype_kwarg(dtype)
    head = task.head if task.type == "seq-cls" else None
    if head is not None:
        kwargs.update(head.config_values())
    if head_from_adapters if head_from_adapters is not None else head is not None:
        kwargs["ignore_mismatched_sizes"] = True
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # 5.x draws a "Loading weights" bar for every load
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(newly initialized|TRAIN this model).*")
            torch.manual_seed(0)
            model, info = _auto_class(task.type).from_pretrained(str(model_dir), output_loading_info=True,
                                                                  trust_remote_code=False, **kwargs)
    except BCAError:
        raise
    except Exception as exc:  # noqa: BLE001 - what transformers raises for a config or checkpoint it cannot build
        raise config_mismatch(model_dir, exc) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if task.type == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = saved_tokenizer_pad_id(model_dir)  # (see classifier_pad_id)
    missing = list(info.get("missing_keys") or []) + [m[0] if isinstance(m, tuple) else m
                                                       for m in info.get("mismatched_keys") or []]
    return model.eval(), sorted(set(missing))


def config_mismatch(model_dir: str | Path, exc: BaseException) -> BaseException:
    """What building the model from ``config.json`` or loading the checkpoint into it raised, as the checkpoint's
    error when the two disagree (a tensor of another shape than the config gives it) or the config asks for a model
    no memory holds (an edited ``vocab_size``); anything else as a :class:`CheckpointFormatError` naming the
    directory and transformers' own words."""
    from .errors import CheckpointFormatError, first_line

    text = str(exc)
    if "size mismatch" in text or "ignore_mismatched_sizes" in text:  # 4.x names the tensors; 5.x logs a report
        shapes = [line.strip() for line in text.splitlines() if "size mismatch" in line]
        what = " (" + "; ".join(shapes[:3])[:400] + ")" if shapes else " (a tensor's shape differs from the config's)"
        return CheckpointFormatError(f"{model_dir}: its weights do not fit its config.json{what}: "
                                     f"{CONFIG_MISFIT_CAUSE}")
    if isinstance(exc, MemoryError) or "allocate" in text:
        return CheckpointFormatError(f"{model_dir}: its config.json describes a model larger than this machine's memory "
                                     f"({first_line(exc, 200)}); check the config's sizes (vocab_size, hidden_size, "
                                     "num_hidden_layers...)")
    # anything else transformers raised building the model or reading its weights (a negative vocab_size, a size
    # given as text, an unknown activation, a LayerNorm stored as integers): the checkpoint's fault, said as such
    return CheckpointFormatError(f"{model_dir}: transformers cannot build the model from its config.json and weights "
                                 f"({type(exc).__name__}: {first_line(exc, 300)}); check config.json's values and the "
                                 "weights' dtypes")


#: Why a checkpoint's weights do not fit its config.json, for every message that says they do not.
CONFIG_MISFIT_CAUSE = ("the config's sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers...) were "
                       "changed, or it belongs to another checkpoint")


def config_misfit_error(model_dir: Path, model_type: str | None, model: nn.Module, problems: Sequence[str],
                        action: str) -> CheckpointFormatError:
    """The one error for a checkpoint whose weights do not fit its config.json (:func:`config_fit_problems`' lines),
    with what to do: ``action`` is the stage's verb (``use``, ``merge into``)."""
    from .errors import format_problems

    nothing = "; nothing was written" if action == "merge into" else ""
    causes = []
    if any(_DTYPE_PROBLEM in p for p in problems):
        causes.append("Weights converted to an integer or 8-bit dtype (or quantized without a quantization_config in "
                      f"config.json) are not read: {action} the checkpoint as saved in {', '.join(WEIGHT_DTYPES)}")
    if not causes or not all(_DTYPE_PROBLEM in p for p in problems):
        causes.append(f"{CONFIG_MISFIT_CAUSE[0].upper()}{CONFIG_MISFIT_CAUSE[1:]}: {action} the checkpoint this config "
                      "belongs to, or restore its config.json")
    return CheckpointFormatError(format_problems(
        f"{model_dir}: its weights do not fit its config.json ({model_dir / 'config.json'}, model_type "
        f"{model_type!r}, built as {type(model).__name__}){nothing}:", problems) + "\n" + "\n".join(causes))


_DTYPE_PROBLEM = "one of the model's floating-point parameters"

#: The safetensors dtypes a model's floating-point parameters are read from (an 8-bit float, an integer or a complex
#: dtype is a quantized or corrupted checkpoint: 4.x failed on F8 with an internal error, 5.x converted it silently).
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")


def config_fit_problems(model: nn.Module, stored: Mapping[str, tuple[str, Sequence[int]]],
                        names: Mapping[str, str], *, skip: Sequence[str] = (),
                        files: Mapping[str, str] | None = None) -> list[str]:
    """Where a checkpoint's tensors do not fit ``model``, the model its ``config.json`` builds: the rule
    :func:`config_mismatch` applies to what ``from_pretrained`` raises, checked from the tensors' headers alone (a
    streaming merge builds ``model`` on the meta device: shapes, no memory). One line per problem, naming the tensor
    (and its file, from ``files``), the stored shape and the config's:

    * a floating-point tensor both hold (a parameter or persistent buffer) whose stored shape differs from the
      config's (an edited ``hidden_size``, ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``...).
      Integer tensors are not compared: their shape is a quantization's packing, or an index buffer's;
    * a list of layers (``nn.ModuleList``: ``num_hidden_layers``...) with config entries the checkpoint stores no
      tensor of (transformers would initialize them at random). Entries stored past the config's last are not
      problems: checkpoints with multi-token-prediction layers (DeepSeek-V3, GLM-4.5: ``model.layers.<N>``, N =
      ``num_hidden_layers``) store them so, transformers leaves them out of the model as it does for the base
      checkpoint, and the merge copies them unchanged;
    * an output embedding (``lm_head``) the config unties (``tie_word_embeddings: false``) where the checkpoint was
      saved tied (it stores the input embedding only): transformers would initialize it at random;
    * a floating-point parameter stored in a dtype other than :data:`WEIGHT_DTYPES` (an integer, boolean, complex or
      8-bit float tensor), unless config.json records a ``quantization_config``;
    * not one of the model's parameters stored (the config of another architecture).

    Parameters the checkpoint lacks are not problems otherwise: a tied ``lm_head`` is the input embedding (``model``
    is tied as ``from_pretrained`` ties it, so it is not a parameter of its own), and a pooler or head a checkpoint
    was saved without is initialized by transformers on every load of it, this checkpoint's included. The reverse of
    the tie is not seen from headers: a config that ties ``lm_head`` where the checkpoint stores one of its own
    (transformers keeps the embedding) needs the two tensors' values compared.

    Args:
        model: the model ``config.json`` builds, tied.
        stored: checkpoint key -> (safetensors dtype name, stored shape).
        names: checkpoint key -> the model's state-dict name, for the keys that name one of the model's tensors
            (after legacy renames and the ``base_model_prefix`` added or dropped).
        skip: model-name prefixes not checked (a classifier head the caller writes itself).
        files: checkpoint key -> the file holding it, for messages.
    """
    files = files or {}
    where = lambda key: f" ({files[key]})" if key in files else ""  # noqa: E731
    skip = tuple(skip)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    floating = {name for name, p in model.named_parameters() if p.is_floating_point()}
    # a quantized checkpoint (its config records how) stores packed integer or 8-bit tensors on purpose
    quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    problems: list[str] = []
    for key, name in sorted(names.items()):
        dtype, shape = stored[key]
        if name not in expected or name.startswith(skip):
            continue
        shown = key if key == name else f"{key} (the model's {name})"
        if (problem := _stored_tensor_problem(f"{shown}{where(key)}", dtype, shape, expected[name],
                                              name in floating, quantized)) is not None:
            problems.append(problem)
    from .fit import prefix_forms

    prefix = getattr(model, "base_model_prefix", "") or ""

    def model_forms(key: str) -> list[str]:  # the names a key may stand for in the model's namespace
        return [names[key]] if key in names else prefix_forms(key, prefix)

    problems += _fused_fit_problems(model, stored, names, expected, floating, quantized, skip, where)
    forms = [(key, form) for key in stored for form in model_forms(key)]
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not path or path.startswith(skip):
            continue
        wanted = {i for i, entry in enumerate(module) if entry.state_dict()}
        held: dict[int, str] = {}
        for key, form in forms:
            index, dot, _ = form[len(path) + 1:].partition(".")
            if form.startswith(path + ".") and dot and index.isdigit():
                held.setdefault(int(index), key)
        absent = sorted(wanted - set(held))
        if not wanted or not held or not absent:
            continue
        if _EXPERTS.search(path.rpartition(".")[2]):  # an expert per entry: named as 5.x's fused rule names them
            leaves = list(module[absent[0]].state_dict())
            shown = ", ".join(f"{path}.{_index_ranges(absent)}.{leaf}" for leaf in leaves[:4])
            problems.append(f"{path}: {_experts_built(len(module))}; the checkpoint holds no tensor {shown}"
                            f"{', ...' if len(leaves) > 4 else ''}, which transformers would initialize at random")
            continue
        count = f"{len(module)} entr{'y' if len(module) == 1 else 'ies'}"
        problems.append(f"{path}: config.json builds {count} (num_hidden_layers...); the checkpoint holds no tensor "
                        f"of {path}.{_index_ranges(absent)}, which transformers would initialize at random")
    params = {name for name, _ in model.named_parameters()}
    held_names = set(names.values())
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_weight, input_weight = getattr(output, "weight", None), getattr(embedding, "weight", None)
    if isinstance(output_weight, nn.Parameter) and isinstance(input_weight, nn.Parameter) \
            and output_weight is not input_weight:
        by_id = {id(p): n for n, p in model.named_parameters()}
        output_name, input_name = by_id.get(id(output_weight)), by_id.get(id(input_weight))
        if output_name and input_name and not output_name.startswith(skip) and output_name not in held_names \
                and input_name in held_names:
            problems.append(f"{output_name}: config.json gives it a weight of its own (tie_word_embeddings false), "
                            f"the checkpoint stores none: it was saved tied to {input_name}, and transformers would "
                            f"initialize {output_name} at random")
    if params and not params & held_names:
        problems.append(f"none of the checkpoint's {len(stored)} tensors (e.g. {', '.join(sorted(stored)[:3])}) is one "
                        f"of the weights of the {type(model).__name__} config.json describes (e.g. "
                        f"{', '.join(sorted(params)[:3])})")
    return problems


#: A layer list whose entries are a mixture of experts' (Mixtral's ``block_sparse_moe.experts``, Qwen2-MoE's
#: ``mlp.experts``, DeepSeek's...), by its name.
_EXPERTS = re.compile(r"experts?$")


def _experts_built(count: int) -> str:
    """How :func:`config_fit_problems` says the config's count of experts, on either transformers line (4.x's list of
    expert Linears, 5.x's fused parameters)."""
    return f"config.json builds {count} expert{'s' * (count != 1)} (num_local_experts, num_experts...)"


def _stored_tensor_problem(shown: str, dtype: str, shape: Sequence[int], wanted: Sequence[int] | None,
                           floating: bool, quantized: bool) -> str | None:
    """:func:`config_fit_problems`' rule for one stored tensor (``shown``: its key as the message names it): a float
    parameter stored in a dtype weights are not read as (not in a quantized checkpoint), or a float tensor whose
    shape is not ``wanted`` (the one the config builds; None: not checked); None when it fits."""
    if floating and dtype not in WEIGHT_DTYPES and not quantized:
        return (f"tensor {shown}: stored as {dtype}, but it is {_DTYPE_PROBLEM} (weights are read as "
                f"{', '.join(WEIGHT_DTYPES)}; transformers would convert it silently or fail, and config.json records "
                "no quantization_config)")
    if wanted is not None and (dtype.startswith("F") or dtype == "BF16") and tuple(shape) != tuple(wanted):
        return f"tensor {shown}: stored {list(shape)}, config.json gives {list(wanted)}"
    return None


def _fused_fit_problems(model: nn.Module, stored: Mapping[str, tuple[str, Sequence[int]]], names: Mapping[str, str],
                        expected: Mapping[str, tuple[int, ...]], floating: set[str], quantized: bool,
                        skip: tuple[str, ...], where: Any) -> list[str]:
    """:func:`config_fit_problems`' rule for the stored tensors transformers 5.x fuses as it loads them (Mixtral's and
    Qwen2-MoE's per-expert ``w1``/``w2``/``w3``, ``gate_proj``/``up_proj``/``down_proj`` into 3-D
    ``experts.gate_up_proj``/``down_proj``; :func:`bca_deploy.fit.conversion_mapping`): each one's shape as the fused
    parameter's implies it (``gate_up_proj`` (E, 2*I, H): each ``w1``/``w3`` (I, H)) and its dtype; and, for a fused
    parameter some of whose tensors are stored, every expert of every source (transformers 5.x refuses a fused
    parameter of another shape, or initializes it at random). Nothing on transformers 4.x, which loads each expert's
    Linear as stored: the per-tensor and layer-list rules check them."""
    from .fit import conversion_mapping, fused_piece_shape, fused_source, prefix_forms

    renamings, converters = conversion_mapping(model)
    if not converters:
        return []
    import transformers

    prefix = getattr(model, "base_model_prefix", "") or ""
    problems: list[str] = []
    # fused parameter -> (converter, source pattern -> {expert index or None: stored key})
    groups: dict[str, tuple[object, dict[str, dict[int | None, str]]]] = {}
    for key in sorted(stored):
        if key in names or (found := fused_source(key, renamings, converters)) is None:
            continue
        fused, converter, pattern = found
        name = next((f for f in prefix_forms(fused, prefix) if f in expected), None)
        if name is None or name.startswith(skip):
            continue
        digits = [int(part) for part in key.split(".") if part.isdigit()]
        index = digits[-1] if digits else None  # the expert's: the last index in the key (layers.1.experts.2.w1)
        groups.setdefault(name, (converter, {}))[1].setdefault(pattern, {})[index] = key
    for name, (converter, by_pattern) in groups.items():
        implied = fused_piece_shape(converter, expected[name])
        for pattern, keys in by_pattern.items():
            for key in keys.values():
                dtype, shape = stored[key]
                shown = f"{key}{where(key)} (one expert's part of the model's {name} {list(expected[name])}: " \
                        f"transformers {transformers.__version__} fuses them into it)"
                if (problem := _stored_tensor_problem(shown, dtype, shape, implied[0] if implied is not None else None,
                                                      name in floating, quantized)) is not None:
                    problems.append(problem)
        count = implied[1] if implied is not None else None
        if count is None:
            continue
        for pattern in getattr(converter, "source_patterns", ()):
            keys = by_pattern.get(pattern, {})
            example = next((k for i, k in keys.items() if i is not None), None) or next(iter(
                k for held in by_pattern.values() for i, k in held.items() if i is not None), None)
            if example is None:
                continue
            absent = sorted(set(range(count)) - set(keys))
            extra = sorted(i for i in keys if i is not None and i >= count)
            if not absent and not extra:
                continue
            head, _, tail = example.rpartition(f".{[p for p in example.split('.') if p.isdigit()][-1]}.")
            if pattern not in by_pattern:  # no tensor of this source at all: its leaf from the pattern
                leaf = pattern.replace("\\", "").rpartition("*.")[2]
                tail = leaf
            what = []
            if absent:
                what.append(f"holds no tensor {head}.{_index_ranges(absent)}.{tail}")
            if extra:
                what.append(f"holds {head}.{_index_ranges(extra)}.{tail} past them")
            problems.append(f"{name}: {_experts_built(count)}; the checkpoint {' and '.join(what)}: transformers {transformers.__version__} fuses every "
                            "expert's tensor into this one parameter, and would refuse it or initialize it at random")
    return problems


def _index_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"{0..2, 5}"`` (one index: ``"5"``), for messages about layer lists."""
    if len(indices) == 1:
        return str(indices[0])
    runs: list[str] = []
    start = previous = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == previous + 1:
            previous = i
            continue
        runs.append(str(start) if start == previous else f"{start}..{previous}")
        if i is not None:
            start = previous = i
    return "{" + ", ".join(runs) + "}"


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes outside the base model (``classifier.``, ``lm_head.``, ``score.``...)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix):
        return ()
    return tuple(f"{name}." for name, _ in model.named_children() if name != prefix)


def _check_missing(model: nn.Module, model_dir: Path, task: ModelTask, missing: Sequence[str],
                   supplied: Sequence[str]) -> None:
    """Refuse weights the checkpoint lacks that the task uses and no adapter restores: a head (:class:`TaskError`),
    or any other (:class:`~bca_deploy.errors.CheckpointFormatError`)."""
    owners = tuple(p + "." for p in supplied)
    left = [k for k in missing if not k.startswith(owners)]
    if task.type == "feature-extraction":
        # A feature-extraction model outputs the last hidden state: a pooler (BertModel's) is never used.
        left = [k for k in left if not (k.startswith("pooler.") or ".pooler." in k)]
    if not left:
        return
    heads = _head_prefixes(model)
    head = [k for k in left if k.startswith(heads)]
    if head:
        raise TaskError(
            f"{model_dir} has no weights for {', '.join(head)} and no adapter restores them: the "
            f"{type(model).__name__} ({task.export_task}) would compute noise. Use adapters trained with their "
            "head (saved with the adapter), a checkpoint saved with that head, or another task"
        )
    # Random weights the model computes with make every output wrong while the export validates (its reference has
    # the same random weights): refused, as merge refuses to write a checkpoint that lacks them.
    from .errors import CheckpointFormatError

    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    raise CheckpointFormatError(
        f"{model_dir} has no weights for {shown}, and no adapter restores them: transformers would initialize them at "
        f"random and the {type(model).__name__} would compute with them. Use the complete checkpoint the adapters "
        "were trained on"
    )


def load_model(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path] = (),
    task: str | ModelTask | None = None,
    *,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    is_trainable: bool = False,
) -> nn.Module:
    """Load ``model_dir`` for its adapters' task and apply every adapter (all active; their deltas sum).

    Args:
        model_dir: the base checkpoint directory (a bare encoder such as ``BertModel``, a
            ``*ForSequenceClassification``, a ``*ForCausalLM``...).
        adapter_dirs: bca-deploy or PEFT C3A adapter directories, or training runs' (``train --out RUN``: its
            best/, else last/; :func:`bca_deploy.config.run_adapter_dir`).
        task: see :func:`resolve_task` (default: from the adapters, else the checkpoint).
        names: the adapter names in the model (default: :func:`adapter_names` of the directories).
        dtype: weights' dtype.
        is_trainable: keep the adapters trainable (default: inference, eval mode).

    Returns:
        The model, in eval mode unless ``is_trainable``.

    Raises:
        TaskError: see :func:`resolve_task`; or the task's head is in neither the checkpoint nor an adapter.
        bca_deploy.errors.CheckpointFormatError: another weight the model uses is in neither.
        bca_deploy.errors.AdapterMismatchError: an adapter does not fit (every adapter is checked, and
            every problem listed, before any is loaded).
        bca_deploy.errors.AdapterFormatError: an adapter directory is malformed.
    """
    from .adapter_io import align_module_paths, check_adapter_fits, load_adapter, read_adapter

    model_dir = Path(model_dir)
    adapter_dirs = [run_adapter_dir(d) for d in adapter_dirs]  # a training run's directory: its best/ or last/
    names = list(names) if names is not None else adapter_names(adapter_dirs)
    if len(names) != len(adapter_dirs):
        raise ValueError(f"got {len(names)} names for {len(adapter_dirs)} adapter directories")
    resolved = task if isinstance(task, ModelTask) else resolve_task(model_dir, adapter_dirs, task)
    model, missing = load_base(model_dir, resolved)
    problems: list[str] = []
    supplied: list[str] = []
    for directory in adapter_dirs:
        config, state = align_module_paths(*read_adapter(directory, model), model)
        supplied += config.modules_to_save
        try:
            check_adapter_fits(config, state, model, source=str(directory))
        except AdapterMismatchError as exc:
            problems.append(str(exc))
    if problems:
        raise AdapterMismatchError("\n".join(problems))
    _check_missing(model, model_dir, resolved, missing, supplied)
    for directory, name in zip(adapter_dirs, names, strict=True):
        load_adapter(model, directory, adapter_name=name, is_trainable=is_trainable)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model if is_trainable else model.eval()


def vocabulary_size(config: Any, model: nn.Module | None = None) -> int | None:
    """How many token ids the model embeds (ids ``0..V-1``): its input embedding's rows when ``model`` is
    given (what the lookup indexes), else the config's ``vocab_size`` (its text config's for multimodal
    configs); None when neither says."""
    if model is not None:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embedding, "num_embeddings", None)
        if isinstance(rows, int) and rows > 0:
            return rows
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def ids_past_vocabulary(tokenizer: Any, vocabulary: int | None) -> list[int]:
    """The tokenizer's token ids the model has no embedding row for (``vocabulary`` and up, sorted; empty when
    none): tokens added to a tokenizer without resizing the model's embeddings, or a tokenizer of another model.
    Texts that use them cannot be run; the rest can. Read from the ids themselves, not the tokenizer's length: a
    vocabulary with gaps has ids past its length."""
    if not vocabulary or tokenizer is None:
        return []
    try:
        ids = tokenizer.get_vocab().values()
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: its length is all there is
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
        return list(range(vocabulary, size))
    return sorted({int(i) for i in ids if isinstance(i, int) and i >= vocabulary})


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The id rows are padded with: the tokenizer's pad id, else EOS (as usual for models without a pad token),
    else SEP or UNK, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "sep_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def classifier_pad_id(model_config: Any, tokenizer: Any) -> int | None:
    """A seq-cls model's ``pad_token_id``, set to :func:`tokenizer_pad_id` where the config has none (None: neither
    gives one). Rows of a batch are padded with it.

    A decoder classifier (Llama, GPT-2...) reads the last token that is not ``pad_token_id``, and transformers
    refuses a batch of more than one row without one. Training, evaluation and export give a config without one
    the same id (and training records it in the adapter's head, :class:`bca_deploy.config.HeadSpec`), so every
    stage reads the same token; and padding with any other id (a tokenizer's own, where the config names another)
    would make short rows be read at a padding position."""
    if getattr(model_config, "pad_token_id", None) is None and tokenizer is not None:
        model_config.pad_token_id = tokenizer_pad_id(tokenizer)
    pad = getattr(model_config, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and not isinstance(pad, bool) else None


from .config import has_tokenizer_files, tokenizer_files  # noqa: E402,F401 - beside their users; re-exported


def load_saved_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in ``directory``, as every stage loads one: ``AutoTokenizer`` without transformers'
    warnings, and never with the directory's own Python code (``auto_map``: transformers would ask on a terminal
    whether to run it, and run it on "y"). Raises what transformers raises for files it cannot load; an OSError naming
    a file present that is not a regular readable one; :class:`CheckpointFormatError` naming one over
    :data:`bca_deploy.config.MAX_TOKENIZER_FILE_BYTES` (unread)."""
    import transformers

    from .config import tokenizer_file_size_problem
    from .errors import CheckpointFormatError, require_readable

    for path in tokenizer_files(directory):  # transformers skips what is not a file: a dangling tokenizer_config.json
        require_readable(path)  # link (a cache's missing blob) gave another tokenizer class, with a BOS added
        if (problem := tokenizer_file_size_problem(path)) is not None:  # read whole by transformers: bounded here
            raise CheckpointFormatError(f"{path}: {problem}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        try:  # once, as every stage calls it: a tokenizer_config.json field of the wrong type (model_max_length
            # "lots", model_input_names 5) loads and then fails every text (a server answered each with a 500)
            ids = tokenizer(["a b"])["input_ids"][0]
            tokenizer("a b", truncation=True, max_length=8)
            tokenizer.decode(list(ids), skip_special_tokens=True)
        except Exception as exc:  # noqa: BLE001 - whatever it raises, the tokenizer cannot be used
            why = str(exc).splitlines()[0][:90] if str(exc) else ""
            raise ValueError(f"check tokenizer_config.json's field types: it fails on a two-word text "
                             f"({type(exc).__name__}: {why})") from None
        return tokenizer
    finally:
        transformers.logging.set_verbosity(verbosity)


def saved_tokenizer_pad_id(model_dir: str | Path) -> int | None:
    """:func:`tokenizer_pad_id` of the tokenizer saved in ``model_dir``; None when it has none that loads (a
    classifier trained by bca-deploy records its pad id, so this is for adapters from elsewhere, e.g. PEFT)."""
    if not has_tokenizer_files(model_dir):
        return None
    try:
        tokenizer = load_saved_tokenizer(model_dir)
    except Exception:  # noqa: BLE001 - a tokenizer that does not load gives no id; the stage that needs one says so
        return None
    return tokenizer_pad_id(tokenizer)


def token_names(tokenizer: Any, ids: Sequence[int]) -> list[str] | None:
    """``repr`` of each id's token, for messages; None when the tokenizer cannot name them all (a tokenizer
    that cannot name an id is no reason to hide the problem the message is about)."""
    try:
        names = tokenizer.convert_ids_to_tokens(list(ids))
    except Exception:
        return None
    if not isinstance(names, list) or len(names) != len(ids) or not all(isinstance(n, str) for n in names):
        return None
    return [repr(n) for n in names]


def describe_ids_past_vocabulary(tokenizer: Any, ids: Sequence[int], vocabulary: int) -> str:
    """One clause for a note or an error: how many tokens, their ids (``ids``: sorted), the first few by name."""
    names = token_names(tokenizer, ids[:5]) or [str(i) for i in ids[:5]]
    shown = ", ".join(names) + (", ..." if len(ids) > 5 else "")
    span = f"ids {ids[0]}..{ids[-1]}" if len(ids) > 1 else f"id {ids[0]}"
    return (f"{len(ids)} token(s) of the tokenizer have no embedding row in the model ({span}: {shown}; the model "
            f"embeds {vocabulary})")


#: Model types whose position ids start after the padding index (RoBERTa's ``create_position_ids_from_input_ids``:
#: ``padding_idx + 1`` onwards), so ``max_position_embeddings`` − (pad id + 1) positions hold tokens: 512 of
#: RoBERTa's 514.
POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                                     "longformer", "roberta-prelayernorm", "xmod", "mpnet", "ibert", "luke"})


def position_limit(config: Any, tokenizer: Any = None) -> int | None:
    """The most tokens one row can have in this model (None when nothing says): its position table
    (``max_position_embeddings``, GPT-2's ``n_positions``) less RoBERTa's padding offset
    (:data:`POSITIONS_AFTER_PADDING`), or the tokenizer's ``model_max_length`` where that is lower.
    A longer row fails in the position-embedding lookup, in PyTorch and in the exported graph alike. Both files
    only claim it: a served export's graph can hold fewer positions than its edited ``config.json`` says, and
    :attr:`bca_deploy.serving.MultiAdapterSession.max_positions` takes the graph's own table where it has one."""
    limits = []
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", None) in POSITIONS_AFTER_PADDING:
                pad = getattr(config, "pad_token_id", None)
                value -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
            limits.append(value)
    limits.append(tokenizer_limit(tokenizer))
    limits = [int(v) for v in limits if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**7]
    return min(limits) if limits else None


def tokenizer_limit(tokenizer: Any) -> int | None:
    """The tokenizer's ``model_max_length`` where it states one (None for transformers' "no limit" placeholder,
    ``int(1e30)``, and for anything that is not a positive whole number below 10**7). A claim only: the graph's
    position table (:func:`bca_deploy.exporters.validate.graph_position_tables`) is what a served row must fit."""
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**7 else None


def attention_window(config: Any) -> int | None:
    """The sliding window of a decoder some or all of whose layers attend only to their last W positions, else None.

    Such a model's cache keeps at most W − 1 past positions per sliding layer, on both transformers lines, and
    its exported graph does the same (its ``present`` outputs stop growing), so a row generated through the
    graph can hold at most W positions. ``sliding_window`` counts only where the config turns it on
    (``use_sliding_window``, ``layer_types``).
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


# ---- transformers 4.x / 5.x differences the exporter and validator share -------------------------


def cache_argument(model: nn.Module) -> str:
    """The keyword that passes a KV cache to ``model.forward``: ``cache`` (transformers 5.x) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` on 5.x, ``output.past_key_values`` on 4.x), or None."""
    if hasattr(output, "get"):
        for key in ("cache", "past_key_values"):
            value = output.get(key)
            if value is not None:
                return value
    return None


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` of a transformers cache: a ``Cache`` object (4.56+: ``.layers``; older:
    ``key_cache``/``value_cache``), an encoder-decoder cache's self-attention part, or legacy tuples."""
    if cache is None:
        return []
    if hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(kv[0], kv[1]) for kv in cache]
