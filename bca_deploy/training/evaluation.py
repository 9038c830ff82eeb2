"""``bca-deploy evaluate``: the task metrics of a base model + adapter on a labelled file.

The base model is loaded for the adapter's recorded task by :func:`bca_deploy.models.load_model` (the one
loader every stage uses); adapters written by ``--method head-only``/``custom`` (trainable tensors, not a
bca-deploy adapter) are restored here. The numbers equal what ``train`` logged for the same checkpoint:
the same tokenization, batching and metric code (:func:`bca_deploy.training.runtime.run_eval`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MAX_NUM_LABELS, TRAINING_RECORD_FILE, TaskSpec, show_json_value, read_json, run_adapter_dir
from ..errors import format_problems
from ..models import classifier_pad_id, position_limit, vocabulary_size
from .config import METHODS, PRECISIONS, EvaluateConfig
from .data import TASKS, check_ids_mean_these_names, check_label_range, check_token_range, ids_named, load_dataset
from .errors import DataError, TrainingConfigError
from .loading import (
    Labels,
    fit_max_length,
    load_for_training,
    load_model_config,
    load_tokenizer,
    load_trained,
    quiet_loading,
    require_causal,
)
from .runtime import destroy, init_distributed, on_every_rank, place_model, resolve_precision, run_eval

__all__ = ["evaluate", "TRAINING_FILE"]

TRAINING_FILE = TRAINING_RECORD_FILE


def evaluate(config: EvaluateConfig, *, model: nn.Module | None = None, tokenizer: Any = None) -> dict[str, float]:
    """The task metrics of ``config.model`` + ``config.adapter`` on ``config.data``.

    Options left as None come from the adapter's ``bca_training.json`` (written by :func:`train`) and its
    task entry, so the result equals the metric :func:`train` logged for that checkpoint. Without an
    adapter the base model is evaluated (for seq-cls it must have a trained head).

    Returns:
        The metrics (``accuracy``, ``f1``, ``mcc``, ``loss``, ``n`` for classification; ``pearson``,
        ``mse`` for regression; ``loss``, ``perplexity``, ``tokens`` for causal-lm).
    """
    if not isinstance(config, EvaluateConfig):
        raise TrainingConfigError(f"evaluate() takes an EvaluateConfig, got {type(config).__name__}")
    config.validate(has_model=model is not None)
    if config.model is None and (model is None or tokenizer is None):
        raise TrainingConfigError("pass --model, or both model= and tokenizer= to evaluate()")
    adapter = run_adapter_dir(config.adapter) if config.adapter is not None else None
    info: dict[str, Any] = {}
    spec: TaskSpec | None = None
    if adapter is not None:
        info = _read_training_info(adapter)
        _note_another_base(adapter, info.get("model_dir"), config.model)
        spec = _adapter_task(adapter)
        unhandled = _unhandled_task(adapter, spec)
        if unhandled is not None:  # run as seq-cls it would print a meaningless metric (or a wrong contradiction)
            raise TrainingConfigError(f"{adapter}: the adapter is for {unhandled}; bca-deploy evaluate handles "
                                      f"{' and '.join(TASKS)} only")
    task = config.task or info.get("task") or (spec.type if spec is not None and spec.type in TASKS else None) \
        or "seq-cls"

    def pick(given, key, default):
        return given if given is not None else info.get(key, default)

    trained_on_pairs, pairs_record = _trained_on_pairs(spec, info)
    d, dev = init_distributed(config.device)
    try:
        def prepare() -> tuple[str, nn.Module, Any, int, bool]:
            # every rank reads the data alike: a problem in it is printed once (rank 0), not once per process
            nonlocal model, tokenizer
            precision = resolve_precision(pick(config.precision, "precision", "auto"), dev)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
            names = info.get("label_names") or (list(spec.head.id2label[i] for i in range(spec.head.num_labels))
                                                if spec is not None and spec.head is not None else None)
            regression = info.get("regression")
            if regression is None and spec is not None and spec.head is not None:
                # no training record (an adapter made elsewhere): the head says, as in transformers (one output is
                # regression), not the file, whose whole decimals (1.0) would read as scores (decide_regression)
                regression = spec.head.num_labels == 1
            model_config = model.config if model is not None else load_model_config(config.model)
            max_length = fit_max_length(pick(config.max_length, "max_length", 128), model_config, tokenizer,
                                        warn=lambda line: print(f"note: {line}", file=sys.stderr))
            examples, data = load_dataset(
                config.data, task, tokenizer, max_length,
                text_columns=pick(config.text_columns, "text_columns", None),
                label_column=pick(config.label_column, "label_column", "label"),
                regression=regression, prompt_column=pick(config.prompt_column, "prompt_column", "prompt"),
                response_column=pick(config.response_column, "response_column", "response"),
                text_column=pick(config.text_column, "text_column", "text"),
                messages_column=pick(config.messages_column, "messages_column", "messages"),
                tools_column=pick(config.tools_column, "tools_column", "tools"), model=config.model,
                label_names=names if names and not regression else None,
                warn=lambda line: print(f"note: {line}", file=sys.stderr),
                columns_from=_recorded_columns(adapter, config, info, task),
                head_text_pair=trained_on_pairs, head_of=f"adapter {adapter}", head_record=pairs_record,
                positions=position_limit(model_config, tokenizer),
            )
            regression = bool(task == "seq-cls" and examples.regression)
            if model is None:
                model = _load_for_evaluation(config, adapter, task, info, spec, precision, regression)
            check_token_range(data, vocabulary_size(model.config, model), config.data, tokenizer, config.model)
            num_labels = getattr(model.config, "num_labels", 1) if task == "seq-cls" else 1
            if task == "seq-cls":
                if examples.labels is None:
                    raise DataError(f"{config.data}: no label column to evaluate against")
                if config.label_names is not None:
                    if not names:
                        raise DataError(f"--label-names maps {config.data}'s class ids to the adapter's class names, "
                                        "and the adapter records none")
                    examples = dataclasses.replace(examples, labels=ids_named(examples, config.label_names, names),
                                                   named_labels=True)
                    data.labels = examples.labels
                elif names and info.get("labels_named_by"):
                    check_ids_mean_these_names(examples, names, info["labels_named_by"])
                check_label_range(examples, num_labels, "the model's head", "fix the labels")
                pad = classifier_pad_id(model.config, tokenizer)  # (an adapter trained here records its own)
                if pad is not None:
                    data.pad_id = pad  # the id the classifier reads past: padding must be it
            return precision, model, data, num_labels, regression

        precision, model, data, num_labels, regression = on_every_rank(d, prepare)
        for param in model.parameters():
            param.requires_grad = False
        keep_fp32 = {n for n, _ in model.named_parameters() if ".bca_kernels." in f".{n}"}
        for path in info.get("modules_to_save") or []:
            with contextlib.suppress(AttributeError):
                keep_fp32 |= {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
        place_model(model, dev, precision, keep_fp32)
        batch_size = pick(config.batch_size, "eval_batch_size", 32)
        return run_eval(model, data, task, num_labels, regression, batch_size, dev, precision, d)
    finally:
        destroy(d)


def _recorded_columns(adapter: Path | None, config: EvaluateConfig, info: dict[str, Any], task: str) -> str | None:
    """Whose column names the data is read by when they come from the adapter's training record, not from the user
    (seq-cls: the text and label columns; causal-lm: the conversations' tools column), for the message of a file
    that lacks them; None when the user named them all."""
    keys = ("text_columns", "label_column") if task == "seq-cls" else ("tools_column",)
    taken = [f"--{key.replace('_', '-')} {', '.join(info[key]) if isinstance(info[key], list) else info[key]}"
             for key in keys if getattr(config, key) is None and info.get(key)]
    if not taken:
        return None
    named = ("pass --text-columns / --label-column to name this file's" if task == "seq-cls" else
             "pass --tools-column to name this file's (--tools-column tools: conversations without functions)")
    return (f"the columns are those {adapter} was trained on ({'; '.join(taken)}, recorded in its "
            f"bca_training.json); {named}")


def _trained_on_pairs(spec: TaskSpec | None, info: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Whether the adapter's head was trained on text pairs, and where that was read (None: the head's own
    ``text_pair``, :attr:`~bca_deploy.config.HeadSpec.text_pair`): else its training record's text columns (a
    ``head-only`` or ``custom`` run, or one from before the head recorded it); ``(None, None)`` when neither tells
    (evaluated as given)."""
    if spec is not None and spec.head is not None and spec.head.text_pair is not None:
        return spec.head.text_pair, None
    columns = info.get("text_columns")
    if not columns:
        return None, None
    return len(columns) == 2, f"its {TRAINING_FILE} records text_columns {', '.join(columns)}"


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_count(value: Any, most: int) -> bool:
    return type(value) is int and 1 <= value <= most


# The fields of bca_training.json that evaluate uses: a check and what it expects (null is always allowed).
_INFO_FIELDS: dict[str, tuple[Any, str]] = {
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "num_labels": (lambda v: _is_count(v, MAX_NUM_LABELS), f"an integer in 1..{MAX_NUM_LABELS}"),
    "regression": (lambda v: type(v) is bool, "true or false"),
    "label_names": (_is_names, "a list of label names"),
    "text_columns": (lambda v: _is_names(v) and 1 <= len(v) <= 2, "a list of one or two column names"),
    "modules_to_save": (_is_names, "a list of module paths"),
    "max_length": (lambda v: _is_count(v, 1 << 20), "a positive integer"),
    "eval_batch_size": (lambda v: _is_count(v, 1 << 20), "a positive integer"),
    **{key: (lambda v: isinstance(v, str) and bool(v), "a column name")
       for key in ("label_column", "prompt_column", "response_column", "text_column", "messages_column",
                   "tools_column")},
}


def _note_another_base(adapter: Path, recorded: Any, given: Any) -> None:
    """Say so when the run's recorded base model is a directory of this machine other than the one evaluated on: a
    checkpoint of the same shapes loads the adapter without a word and gives other numbers. A recorded path this
    machine does not have (the run trained elsewhere) says nothing either way."""
    if not isinstance(recorded, str) or given is None:
        return
    try:
        if not Path(recorded).is_dir() or Path(recorded).samefile(given):
            return
    except (OSError, ValueError):  # not a path of this machine
        return
    print(f"note: {adapter} was trained on {recorded} ({TRAINING_FILE}); evaluating it on {given}", file=sys.stderr)


def _read_training_info(adapter: Path) -> dict[str, Any]:
    """``bca_training.json`` of a run's checkpoint ({} when there is none), by the one JSON rule, with every
    field :func:`evaluate` uses typed (all problems at once, naming the file and the fields)."""
    path = adapter / TRAINING_FILE
    if not path.is_file():
        return {}
    info = read_json(path, what="training record")
    problems = [f"{key}: expected {expected}, got {show_json_value(info[key])}"
                for key, (ok, expected) in _INFO_FIELDS.items() if info.get(key) is not None and not ok(info[key])]
    names, count = info.get("label_names"), info.get("num_labels")
    if not problems and names is not None and count is not None and len(names) != count:
        problems.append(f"label_names: {len(names)} names for num_labels {count}")
    if problems:
        raise TrainingConfigError(format_problems(f"{path} is not a training record bca-deploy wrote:", problems))
    return info


def _adapter_task(adapter: Path) -> TaskSpec | None:
    if not (adapter / "adapter_config.json").is_file():
        return None
    from ..adapter_io import read_adapter_header

    return read_adapter_header(adapter).config.task  # the tensors are read (and checked) where the model loads them


def _unhandled_task(adapter: Path, spec: TaskSpec | None) -> str | None:
    """The adapter's task when it is one evaluate does not handle (``feature-extraction``, or a PEFT
    ``task_type`` bca-deploy records no task for, such as ``TOKEN_CLS``), else None (handled, or not recorded)."""
    if spec is not None:
        return None if spec.type in TASKS else f"task {spec.type!r}"
    path = adapter / "adapter_config.json"
    if not path.is_file():
        return None
    raw = read_json(path, what="adapter config")
    task_type = raw.get("task_type") if "peft_type" in raw else None
    if isinstance(task_type, str) and task_type not in ("SEQ_CLS", "CAUSAL_LM"):
        return f"PEFT task_type {task_type!r}"
    return None


def _load_for_evaluation(config: EvaluateConfig, adapter: Path | None, task: str, info: dict[str, Any],
                         spec: TaskSpec | None, precision: str, regression: bool) -> nn.Module:
    """The base model for the adapter's task with the adapter (and its head) applied.

    bca-deploy and PEFT adapters (and no adapter) go through :func:`bca_deploy.models.load_model`, which
    refuses a head that nothing restores; ``head-only``/``custom`` runs saved their trainable tensors, which
    are restored into the model their ``bca_training.json`` describes.
    """
    if adapter is None or (adapter / "adapter_config.json").is_file():
        from ..models import load_model

        with quiet_loading():
            model = load_model(config.model, [adapter] if adapter is not None else [], task)
        if task == "causal-lm":  # as training refuses it (load_for_training): a perplexity that read the answer
            require_causal(model, config.model)
        return model
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    head = None
    if task == "seq-cls":
        num = int(info.get("num_labels") or 0)
        if not num:
            raise TrainingConfigError(f"{adapter / TRAINING_FILE}: no num_labels recorded; cannot rebuild the head")
        names = info.get("label_names") or [f"LABEL_{i}" for i in range(num)]
        head = Labels(num, list(names), bool(info.get("regression")), "adapter")
    # a run trained with --new-head over a checkpoint head of another size: that head is replaced, and must then
    # come back whole from the run's tensors
    resized = head is not None and getattr(load_model_config(config.model), "num_labels", None) != head.num_labels
    model, initialised = load_for_training(config.model, task, dtype, head, new_head=resized)
    restored = load_trained(model, adapter, info.get("method", "bca"))
    missing = sorted(set(initialised) - restored) if resized else []
    if missing:
        raise TrainingConfigError(format_problems(
            f"{adapter}: the run's head has {head.num_labels} classes, --model {config.model}'s another number, "
            "and these parameters are in neither:", missing))
    return model.eval()
