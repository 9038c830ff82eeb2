"""The trainer: BCA fine-tuning with the paper's recipe, on one device or under ``torchrun`` (DDP).

One code path for CPU and GPU: CUDA when present (bf16 autocast and a bf16 base model on GPUs that
support it; kernels, head and optimizer state stay fp32), CPU otherwise. Under ``torchrun`` the process
group is initialised from the environment (NCCL on CUDA, gloo on CPU), each rank reads its shard of the
data (:class:`~torch.utils.data.DistributedSampler`) and only rank 0 writes.

Recipe (Ding et al., BCA): Adadelta, learning rate 0.1 divided by the block size p for the kernels, batch
32; the classification head (``modules_to_save``) is trained fully with the undivided learning rate.

Outputs in ``out_dir``:

- ``last/``: the adapter after the latest checkpoint step plus ``trainer_state.pt`` (resume);
- ``best/``: the adapter with the best evaluation metric so far;
- ``train_log.jsonl``: one JSON object per logging step and per evaluation.

Each adapter directory holds the adapter files (bca-deploy format for ``method="bca"``;
``trainable_parameters.safetensors`` for ``head-only``/``custom``) and ``bca_training.json`` (task,
labels, columns, max length...), so :func:`evaluate` needs only the base model, the adapter and a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OutputExistsError, format_problems
from .checkpoint import STATE_FILE, load_state, recover_dir, rng_state, save_state, set_rng_state, write_dir_atomically
from .data import IGNORE_INDEX, TASKS, TokenizedDataset, check_label_range, load_dataset, pad_token_id
from .errors import DataError, DataFileNotFoundError, TrainingConfigError
from .metrics import METRIC_DIRECTIONS, MetricAccumulator, is_better, primary_metric

__all__ = [
    "train",
    "evaluate",
    "TrainResult",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "PRECISIONS",
    "DEFAULT_LR",
    "DEFAULT_TARGETS",
    "TRAINING_FILE",
    "TRAINABLE_FILE",
]

METHODS = ("bca", "head-only", "custom")
OPTIMIZERS = ("adadelta", "adamw")
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_LR = {"adadelta": 0.1, "adamw": 1e-3}
# Query and value projections per model_type (the paper adapts query and value).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
}
HEAD_MODULE_NAMES = ("classifier", "score")
TRAINING_FILE = "bca_training.json"
TRAINABLE_FILE = "trainable_parameters.safetensors"
LOG_FILE = "train_log.jsonl"
# Options that must be equal for a resumed run to continue the same trajectory.
_RESUME_KEYS = (
    "task", "method", "targets", "block_size", "block_size_pattern", "scaling", "init", "modules_to_save",
    "optimizer", "lr", "head_lr", "lr_divide_by_block_size", "weight_decay", "scheduler", "warmup_steps",
    "batch_size", "grad_accum_steps", "max_length", "seed", "world_size", "num_labels", "regression",
    "max_grad_norm", "precision", "train_examples",
)


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 has the full picture; other ranks get the same numbers).

    Attributes:
        out_dir: the output directory.
        last_dir: ``out_dir/last`` (adapter + trainer state).
        best_dir: ``out_dir/best``, or None without evaluation data.
        step: optimizer steps done (``max_steps`` unless stopped early).
        metric: the name of the metric that picks ``best``.
        best_metric / best_step: its best value and the step it was reached.
        final_metrics: evaluation metrics at the last step (None without evaluation data).
        history: every evaluation, ``{"step": s, **metrics}``.
        train_loss: mean training loss over the last logging window.
        samples_per_second / tokens_per_second: training throughput of this invocation (all ranks,
            evaluation and checkpoint time excluded; tokens are non-padding tokens).
        train_seconds: time spent in training steps in this invocation.
        peak_memory_bytes / peak_memory_kind: ``torch.cuda.max_memory_allocated`` on CUDA
            (``"cuda_max_allocated"``), the process's peak resident set size on CPU (``"max_rss"``).
        trainable_parameters: ``{"adapter": kernels or other non-head trainables, "head": head}``.
        resumed_from: the step a resumed run started from (None for a fresh run).
    """

    out_dir: Path
    last_dir: Path
    best_dir: Path | None
    step: int
    metric: str
    best_metric: float | None
    best_step: int | None
    final_metrics: dict[str, float] | None
    history: list[dict[str, Any]]
    train_loss: float
    samples_per_second: float
    tokens_per_second: float
    train_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    trainable_parameters: dict[str, int]
    world_size: int
    device: str
    precision: str
    resumed_from: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


# ---- distributed ----------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_request: str | None) -> tuple[_Dist, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; pick this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device_request is None or str(device_request).startswith("cuda"))
    if world <= 1:
        if device_request is not None:
            return _Dist(), torch.device(device_request)
        return _Dist(), torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _barrier(d: _Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


# ---- options --------------------------------------------------------------------------------------


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _check_options(opts: dict[str, Any]) -> None:
    problems = []
    if opts["task"] not in TASKS:
        problems.append(f"task {opts['task']!r}: choose one of {', '.join(TASKS)}")
    if opts["method"] not in METHODS:
        problems.append(f"method {opts['method']!r}: choose one of {', '.join(METHODS)}")
    if opts["method"] == "custom" and not opts["has_model"]:
        problems.append("method 'custom' trains a prepared model: pass model=")
    if opts["model_dir"] is None and not opts["has_model"]:
        problems.append("no model: pass model_dir (CLI: --model) or model=")
    if opts["model_dir"] is None and not opts["has_tokenizer"]:
        problems.append("no tokenizer: pass model_dir (which holds the tokenizer) or tokenizer=")
    if opts["model_dir"] is not None and not Path(opts["model_dir"]).exists():
        problems.append(f"model directory {opts['model_dir']} not found")
    if opts["optimizer"] not in OPTIMIZERS:
        problems.append(f"optimizer {opts['optimizer']!r}: choose one of {', '.join(OPTIMIZERS)}")
    if opts["scheduler"] not in SCHEDULERS:
        problems.append(f"scheduler {opts['scheduler']!r}: choose one of {', '.join(SCHEDULERS)}")
    if opts["precision"] not in PRECISIONS:
        problems.append(f"precision {opts['precision']!r}: choose one of {', '.join(PRECISIONS)}")
    for key in ("lr", "head_lr", "max_grad_norm"):
        value = opts[key]
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a positive number, got {value!r}")
    if not (isinstance(opts["weight_decay"], (int, float)) and opts["weight_decay"] >= 0):
        problems.append(f"weight_decay must be >= 0, got {opts['weight_decay']!r}")
    for key, low in (("batch_size", 1), ("eval_batch_size", 1), ("max_steps", 1), ("grad_accum_steps", 1),
                     ("max_length", 2), ("eval_every", 0), ("save_every", 0), ("warmup_steps", 0),
                     ("log_every", 1), ("block_size", 1)):
        value = opts[key]
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            problems.append(f"{key} must be an integer >= {low}, got {value!r}")
    if opts["eval_every"] and opts["eval_path"] is None:
        problems.append("eval_every is set but there is no evaluation data: pass eval_path (CLI: --eval-data)")
    metric = opts["metric_for_best"]
    if metric is not None and metric not in METRIC_DIRECTIONS:
        problems.append(f"metric_for_best {metric!r}: choose one of {', '.join(METRIC_DIRECTIONS)}")
    if opts["num_labels"] is not None and not (isinstance(opts["num_labels"], int) and opts["num_labels"] >= 1):
        problems.append(f"num_labels must be a positive integer, got {opts['num_labels']!r}")
    if problems:
        raise TrainingConfigError(format_problems("invalid training options:", problems))


# ---- model ----------------------------------------------------------------------------------------


def _load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise TrainingConfigError(
            f"{model_dir}: cannot load a tokenizer ({exc}); save one there or pass tokenizer="
        ) from exc


def _load_model(model_dir, task: str, num_labels: int | None, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """The transformers model for ``task`` and the parameter names it had to initialise (missing or resized)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if task == "seq-cls":
        # A checkpoint whose head has another number of classes gets a new head (reported as mismatched).
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    new = list(info.get("missing_keys", []))
    new += [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])]
    return model, new


def _default_modules_to_save(model: nn.Module, task: str, missing_keys: Sequence[str]) -> list[str]:
    """Modules to train fully: the task head (``classifier``/``score``) and any module the checkpoint lacked."""
    candidates = {k.rpartition(".")[0] for k in missing_keys if "." in k}
    if task == "seq-cls":
        candidates |= {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in HEAD_MODULE_NAMES}
    present = {n for n, _ in model.named_modules() if n}
    paths = sorted(c for c in candidates if c in present)
    # keep outermost modules only ("classifier" covers "classifier.dense")
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TrainingConfigError(
        f"no default target modules for model_type {model_type!r}: pass targets (CLI: --targets), "
        f"e.g. the query and value projections; defaults exist for {', '.join(sorted(DEFAULT_TARGETS))}"
    )


def _head_param_names(model: nn.Module, modules_to_save: Sequence[str]) -> set[str]:
    """Trainable parameters inside a ``modules_to_save`` module (matched as a path component run)."""
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        for entry in modules_to_save:
            e = entry.split(".")
            if any(parts[i : i + len(e)] == e for i in range(len(parts) - len(e) + 1)):
                names.add(name)
                break
    return names


def _kernel_block_sizes(model: nn.Module) -> dict[str, int]:
    """Kernel parameter name -> its block size p."""
    from ..inject import bca_layers

    out = {}
    for path, layer in bca_layers(model):
        for adapter in layer.bca_kernels:
            out[f"{path}.bca_kernels.{adapter}"] = layer.block_sizes[adapter]
    return out


def _place_model(model: nn.Module, device: torch.device, precision: str, fp32_names: set[str]) -> None:
    """Move to ``device``; bf16: frozen floating parameters in bf16, the ``fp32_names`` ones in fp32."""
    model.to(device)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if name in fp32_names or param.requires_grad:
            if param.dtype != torch.float32:
                param.data = param.data.float()
        elif precision == "bf16" and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)


# ---- optimisation ---------------------------------------------------------------------------------


def _param_groups(model: nn.Module, head_names: set[str], lr: float, head_lr: float, divide: bool,
                  weight_decay: float) -> list[dict[str, Any]]:
    """One group per kernel block size (lr / p when ``divide``), one for other adapter parameters,
    one for the head (undivided ``head_lr``)."""
    block_sizes = _kernel_block_sizes(model)
    by_p: dict[int, list[nn.Parameter]] = {}
    other, head = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in block_sizes:
            by_p.setdefault(block_sizes[name], []).append(param)
        elif name in head_names:
            head.append(param)
        else:
            other.append(param)
    groups = [
        {"params": params, "lr": lr / p if divide else lr, "name": f"bca_p{p}", "weight_decay": weight_decay}
        for p, params in sorted(by_p.items())
    ]
    if other:
        groups.append({"params": other, "lr": lr, "name": "adapter", "weight_decay": weight_decay})
    if head:
        groups.append({"params": head, "lr": head_lr, "name": "head", "weight_decay": weight_decay})
    return groups


def _make_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == "adadelta":
        return torch.optim.Adadelta(groups, rho=0.9, eps=1e-6)
    return torch.optim.AdamW(groups)


def _lr_lambda(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---- forward / loss -------------------------------------------------------------------------------


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _loss(logits: torch.Tensor, labels: torch.Tensor, task: str, regression: bool) -> torch.Tensor:
    logits = logits.float()
    if task == "causal-lm":
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V)
        shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
        return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    if regression:
        return nn.functional.mse_loss(logits.reshape(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def _run_eval(model: nn.Module, dataset: TokenizedDataset, task: str, num_labels: int, regression: bool,
              batch_size: int, device: torch.device, precision: str, d: _Dist) -> dict[str, float]:
    """Metrics over ``dataset``: each rank takes every world_size-th example (no padding), sums are all-reduced.

    Examples are batched in order of length (stable), so a given dataset and batch size always gives the
    same batches, in :func:`train` and in :func:`evaluate` alike.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    shard = order[d.rank :: d.world_size]
    acc = MetricAccumulator(task, num_labels=num_labels, regression=regression, device=device)
    for start in range(0, len(shard), batch_size):
        batch = _to_device(dataset.collate(shard[start : start + batch_size]), device)
        with _autocast(device, precision):
            logits = model(**_model_inputs(batch)).logits
        acc.update(logits, batch["labels"])
    acc.all_reduce()
    model.train(was_training)
    return acc.compute()


# ---- saving ---------------------------------------------------------------------------------------


def _save_adapter_files(model: nn.Module, directory: Path, method: str) -> None:
    if method == "bca":
        from ..adapter_io import save_adapter

        save_adapter(model, directory)
        return
    from safetensors.torch import save_file

    state = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(directory / TRAINABLE_FILE), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _append_log(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---- train ----------------------------------------------------------------------------------------


def train(
    model_dir: str | Path | None,
    data_path: str | Path,
    task: str = "seq-cls",
    out_dir: str | Path = "bca-out",
    *,
    eval_path: str | Path | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    method: str = "bca",
    targets: Sequence[str] | str | None = None,
    block_size: int = 64,
    block_size_pattern: dict[str, int] | None = None,
    scaling: float = 1.0,
    init: str = "zeros",
    init_std: float = 0.02,
    modules_to_save: Sequence[str] | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    regression: bool | None = None,
    num_labels: int | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    text_column: str = "text",
    max_length: int = 128,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    max_steps: int = 1000,
    grad_accum_steps: int = 1,
    optimizer: str = "adadelta",
    lr: float | None = None,
    head_lr: float | None = None,
    lr_divide_by_block_size: bool | None = None,
    weight_decay: float = 0.0,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    eval_every: int = 0,
    save_every: int | None = None,
    metric_for_best: str | None = None,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    precision: str = "auto",
    gradient_checkpointing: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model_dir`` on ``data_path`` with a block-circulant adapter (or the head alone).

    Every input is checked before the first step (options, data files and columns, labels against
    the head, target modules and block sizes), and all problems of a kind are reported at once.

    Args:
        model_dir: a transformers model directory (weights + tokenizer); may be None with ``model=``
            and ``tokenizer=``.
        data_path: training data, TSV/CSV/JSONL (see :mod:`bca_deploy.training.data`).
        task: ``"seq-cls"`` (text(s) + label) or ``"causal-lm"`` (prompt/response or text).
        out_dir: where ``last/``, ``best/`` and ``train_log.jsonl`` go.
        eval_path: evaluation data (same format); enables ``best/`` and the task metric.
        model: a model to use instead of loading ``model_dir`` (with ``method="custom"``: already
            prepared, e.g. a PEFT model; every parameter with ``requires_grad`` is trained).
        tokenizer: a tokenizer to use instead of loading it from ``model_dir``.
        method: ``"bca"`` (inject adapters, default), ``"head-only"`` (train ``modules_to_save``
            only) or ``"custom"`` (train ``model`` as given).
        targets: module names (suffixes) or one regex; default: query and value for known model types.
        block_size / block_size_pattern / scaling / init / init_std: see :func:`bca_deploy.inject`.
        modules_to_save: modules trained fully and saved with the adapter; default: the task head
            (``classifier``/``score``) plus any module the checkpoint did not provide.
        text_columns / label_column / regression: seq-cls columns and label kind (default: floats →
            regression with one output and MSE; ints → classes).
        num_labels: classes of the head; default: ``max(label) + 1`` over the training data.
        prompt_column / response_column / text_column: causal-lm columns.
        max_length: tokens per example after truncation.
        batch_size: examples per micro-batch per process; the optimizer sees
            ``batch_size × grad_accum_steps × world_size`` examples per step.
        eval_batch_size: default ``batch_size``; recorded so :func:`evaluate` batches identically.
        max_steps: optimizer steps (a resumed run continues to this count).
        optimizer: ``"adadelta"`` (the paper's; rho 0.9, eps 1e-6) or ``"adamw"``.
        lr: default 0.1 for Adadelta, 1e-3 for AdamW.
        head_lr: learning rate of ``modules_to_save``; default ``lr`` (never divided by p).
        lr_divide_by_block_size: kernels of block size p train with ``lr / p`` (the paper's α ← α/p);
            default True for Adadelta, False for AdamW.
        weight_decay: decoupled for AdamW, L2 for Adadelta.
        scheduler / warmup_steps: ``constant`` (default), ``linear`` or ``cosine`` decay after a linear warmup.
        max_grad_norm: clip the gradient norm of trainable parameters (default: no clipping).
        eval_every: evaluate every this many steps (0: only at the end); needs ``eval_path``.
        save_every: write ``last/`` every this many steps; default ``eval_every`` or 100.
        metric_for_best: default accuracy (classification), pearson (regression), perplexity (LM).
        log_every: steps between log lines in ``train_log.jsonl`` (and progress-bar refreshes).
        seed: seeds head initialisation, data order and dropout; equal seeds give equal runs.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available (under torchrun: ``cuda:LOCAL_RANK``).
        precision: ``"auto"`` (bf16 on GPUs that support it, else fp32), ``"fp32"`` or ``"bf16"``.
        gradient_checkpointing: recompute activations in the backward (less memory, same gradients).
        resume: continue from ``out_dir/last`` if it holds a checkpoint (exactly: same final weights as
            an uninterrupted run); start fresh if there is none.
        overwrite: start fresh even if ``out_dir`` holds checkpoints (they are replaced as training goes).
        progress: show a tqdm bar (rank 0) with loss, lr, tokens/s and ETA.
        on_step: ``on_step(step, logs)`` called on every rank after each optimizer step (and after the
            evaluation/checkpoint of that step); raising in it stops training there.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingConfigError: invalid options, or a checkpoint that does not match them on resume.
        DataError / DataFileNotFoundError: missing file or column, empty data, bad label.
        TargetModuleError / BlockSizeError: from :func:`bca_deploy.inject`.
        OutputExistsError: ``out_dir`` holds checkpoints and neither ``resume`` nor ``overwrite`` is set.
    """
    opts = dict(
        task=task, method=method, model_dir=None if model_dir is None else str(model_dir), has_model=model is not None,
        has_tokenizer=tokenizer is not None, optimizer=optimizer, scheduler=scheduler, precision=precision,
        lr=lr, head_lr=head_lr, max_grad_norm=max_grad_norm, weight_decay=weight_decay, batch_size=batch_size,
        eval_batch_size=eval_batch_size, max_steps=max_steps, grad_accum_steps=grad_accum_steps,
        max_length=max_length, eval_every=eval_every, save_every=save_every, warmup_steps=warmup_steps,
        log_every=log_every, block_size=block_size, eval_path=eval_path, metric_for_best=metric_for_best,
        num_labels=num_labels,
    )
    _check_options(opts)
    if lr is None:
        lr = DEFAULT_LR[optimizer]
    if head_lr is None:
        head_lr = lr
    if lr_divide_by_block_size is None:
        lr_divide_by_block_size = optimizer == "adadelta"
    eval_batch_size = eval_batch_size or batch_size
    save_every = save_every if save_every is not None else (eval_every or 100)
    out_dir = Path(out_dir)

    d, dev = _init_distributed(device)
    try:
        return _train(**locals())
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(**a: Any) -> TrainResult:
    d: _Dist = a["d"]
    dev: torch.device = a["dev"]
    out_dir: Path = a["out_dir"]
    task, method = a["task"], a["method"]
    precision = _resolve_precision(a["precision"], dev)
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingConfigError(f"precision bf16 requested but {torch.cuda.get_device_name(dev)} does not support it")

    # -- output directory ------------------------------------------------------------------------
    last_dir = recover_dir(out_dir / "last") if out_dir.exists() else None
    resume_state = None
    if last_dir is not None and (last_dir / STATE_FILE).is_file():
        if a["resume"]:
            resume_state = load_state(last_dir)
        elif not a["overwrite"]:
            raise OutputExistsError(
                f"{out_dir} already holds a training checkpoint ({last_dir}); pass resume=True (CLI: --resume) "
                "to continue it or overwrite=True (CLI: --overwrite) to start over"
            )

    # -- tokenizer and data (checked before the model is loaded) ---------------------------------
    tokenizer = a["tokenizer"] if a["tokenizer"] is not None else _load_tokenizer(a["model_dir"])
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else tokenizer.unk_token
    data_kwargs = dict(text_columns=a["text_columns"], label_column=a["label_column"], regression=a["regression"],
                       prompt_column=a["prompt_column"], response_column=a["response_column"],
                       text_column=a["text_column"])
    errors: list[DataError] = []
    train_examples = train_data = eval_examples = eval_data = None
    for which, path in (("train", a["data_path"]), ("eval", a["eval_path"])):
        if path is None:
            continue
        try:
            examples, data = load_dataset(path, task, tokenizer, a["max_length"], **data_kwargs)
        except DataError as exc:
            errors.append(exc)
            continue
        if which == "train":
            train_examples, train_data = examples, data
        else:
            eval_examples, eval_data = examples, data
    if len(errors) == 1:
        raise errors[0]
    if errors:  # both files are bad: report both at once
        kind = DataFileNotFoundError if all(isinstance(e, DataFileNotFoundError) for e in errors) else DataError
        raise kind("\n".join(str(e) for e in errors))
    regression = bool(task == "seq-cls" and train_examples.regression)
    if task == "seq-cls" and eval_examples is not None and eval_examples.regression != regression:
        raise DataError(
            f"{eval_examples.path}: labels are {'real-valued' if eval_examples.regression else 'integers'} but the "
            f"training labels in {train_examples.path} are {'real-valued' if regression else 'integers'}; "
            "pass regression=True/False to read both the same way"
        )
    num_labels = a["num_labels"]
    if task == "seq-cls":
        if regression:
            if num_labels not in (None, 1):
                raise TrainingConfigError(f"regression labels need num_labels=1, got {num_labels}")
            num_labels = 1
        elif num_labels is None and a["model"] is not None and _head_out_features(a["model"]):
            num_labels = _head_out_features(a["model"])  # a given model: its head decides
        elif num_labels is None:
            num_labels = max(2, max(train_examples.labels) + 1) if min(train_examples.labels) >= 0 else 2
        for examples in (train_examples, eval_examples):
            if examples is not None:
                check_label_range(examples, num_labels)
    metric = a["metric_for_best"] or primary_metric(task, regression)
    allowed = {"causal-lm": {"loss", "perplexity"}}.get(task) or (
        {"pearson", "mse", "loss"} if regression else {"accuracy", "mcc", "f1", "macro_f1", "loss"})
    if metric not in allowed:
        raise TrainingConfigError(
            f"metric_for_best {metric!r} is not computed for this task; choose one of {sorted(allowed)}")

    # -- model ----------------------------------------------------------------------------------
    random.seed(a["seed"])
    torch.manual_seed(a["seed"])
    load_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = a["model"]
    missing: list[str] = []
    if model is None:
        model, missing = _load_model(a["model_dir"], task, num_labels, load_dtype)
    if task == "seq-cls" and getattr(model, "config", None) is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id(tokenizer)
    if task == "seq-cls" and method != "custom":
        head_out = _head_out_features(model)
        if head_out is not None and head_out != num_labels:
            raise DataError(
                f"the model's classification head has {head_out} outputs but the data needs num_labels={num_labels}")
    modules_to_save = list(a["modules_to_save"]) if a["modules_to_save"] is not None else (
        _default_modules_to_save(model, task, missing) if method != "custom" else [])
    targets = a["targets"]
    if method == "bca":
        from ..inject import inject

        if targets is None:
            targets = _default_targets(model)
        inject(model, targets, block_size=a["block_size"], block_size_pattern=a["block_size_pattern"],
               scaling=a["scaling"], init=a["init"], init_std=a["init_std"], seed=a["seed"],
               modules_to_save=modules_to_save)
    elif method == "head-only":
        from ..inject import _resolve_modules_to_save

        if not modules_to_save:
            raise TrainingConfigError(
                "method 'head-only' needs modules_to_save (the model has no classifier/score head)")
        paths = _resolve_modules_to_save(model, modules_to_save)
        for name, param in model.named_parameters():
            param.requires_grad = any(name.startswith(p + ".") for p in paths)
        modules_to_save = paths
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise TrainingConfigError("the model has no trainable parameter (nothing requires grad)")
    head_names = _head_param_names(model, modules_to_save)
    kernel_names = set(_kernel_block_sizes(model))
    n_params = {
        "adapter": sum(p.numel() for n, p in model.named_parameters() if n in trainable and n not in head_names),
        "head": sum(p.numel() for n, p in model.named_parameters() if n in head_names),
    }
    _place_model(model, dev, precision, trainable | kernel_names)
    if task == "causal-lm" and getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if a["gradient_checkpointing"]:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TrainingConfigError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    groups = _param_groups(model, head_names, a["lr"], a["head_lr"], a["lr_divide_by_block_size"], a["weight_decay"])
    opt = _make_optimizer(a["optimizer"], groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(a["scheduler"], a["warmup_steps"], a["max_steps"]))

    run_config = {
        "task": task, "method": method, "targets": targets, "block_size": a["block_size"],
        "block_size_pattern": a["block_size_pattern"] or {}, "scaling": a["scaling"], "init": a["init"],
        "modules_to_save": modules_to_save, "optimizer": a["optimizer"], "lr": a["lr"], "head_lr": a["head_lr"],
        "lr_divide_by_block_size": a["lr_divide_by_block_size"], "weight_decay": a["weight_decay"],
        "scheduler": a["scheduler"], "warmup_steps": a["warmup_steps"], "batch_size": a["batch_size"],
        "grad_accum_steps": a["grad_accum_steps"], "max_length": a["max_length"], "seed": a["seed"],
        "world_size": d.world_size, "num_labels": num_labels, "regression": regression,
        "max_grad_norm": a["max_grad_norm"], "precision": precision, "train_examples": len(train_data),
        "max_steps": a["max_steps"], "eval_batch_size": a["eval_batch_size"], "eval_every": a["eval_every"],
        "save_every": a["save_every"], "model_dir": None if a["model_dir"] is None else str(a["model_dir"]),
        "data_path": str(a["data_path"]),
        "eval_path": None if a["eval_path"] is None else str(a["eval_path"]),
    }
    training_info = {
        "task": task, "method": method, "num_labels": num_labels, "regression": regression,
        "text_columns": train_examples.text_columns if task == "seq-cls" else None,
        "label_column": a["label_column"], "prompt_column": a["prompt_column"],
        "response_column": a["response_column"], "text_column": a["text_column"], "max_length": a["max_length"],
        "eval_batch_size": a["eval_batch_size"], "modules_to_save": modules_to_save, "metric": metric,
        "model_dir": None if a["model_dir"] is None else str(a["model_dir"]), "precision": precision,
    }

    # -- resume ---------------------------------------------------------------------------------
    step = micro = 0
    best_metric = best_step = None
    history: list[dict[str, Any]] = []
    resumed_from = None
    if resume_state is not None:
        saved = resume_state["run_config"]
        keys = list(_RESUME_KEYS) + (["max_steps"] if a["scheduler"] != "constant" else [])
        diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {run_config.get(k)!r}"
                 for k in keys if _norm(saved.get(k)) != _norm(run_config.get(k))]
        if diffs:
            raise TrainingConfigError(format_problems(
                f"{last_dir} was written by a run with other options; resume with the same options "
                "(or pass overwrite=True to start over):", diffs))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in resume_state["trainable"].items():
                params[name].copy_(tensor.to(params[name].dtype))
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        step, micro = int(resume_state["step"]), int(resume_state["micro_step"])
        best_metric, best_step = resume_state.get("best_metric"), resume_state.get("best_step")
        history = json.loads(resume_state.get("history_json", "[]"))
        resumed_from = step
    random.seed(a["seed"] + d.rank)
    torch.manual_seed(a["seed"] + d.rank)  # dropout differs per rank, repeatable per seed
    if resume_state is not None:
        set_rng_state(resume_state["rng"][d.rank])

    train_model: nn.Module = model
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # -- data order -----------------------------------------------------------------------------
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(train_data, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=a["seed"])
    bs = a["batch_size"]
    batches_per_epoch = math.ceil(len(sampler) / bs)
    cached: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> list[int]:
        epoch, pos = divmod(index, batches_per_epoch)
        if epoch not in cached:
            cached.clear()
            sampler.set_epoch(epoch)
            order = list(sampler)
            cached[epoch] = [order[i : i + bs] for i in range(0, len(order), bs)]
        return cached[epoch][pos]

    # -- helpers that write (rank 0) --------------------------------------------------------------
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:  # a fresh start (overwrite=True, or nothing to resume): drop the old run
            for stale in ("best", "last"):
                if (out_dir / stale).is_dir():
                    shutil.rmtree(out_dir / stale)
            if (out_dir / LOG_FILE).exists():
                (out_dir / LOG_FILE).unlink()
    _barrier(d)

    def write_adapter(tmp: Path, metrics: dict[str, float] | None) -> None:
        """The adapter (or trainable tensors) plus the training info evaluate() needs, into tmp."""
        _save_adapter_files(model, tmp, method)
        _write_json(tmp / TRAINING_FILE, {**training_info, "step": step, "metrics": metrics})

    def save_last(metrics: dict[str, float] | None) -> None:
        rngs = [rng_state()]
        if d.active:
            import torch.distributed as dist

            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state())
        if not d.is_main:
            return

        def build(tmp: Path) -> None:
            write_adapter(tmp, metrics)
            save_state(tmp, {
                "step": step, "micro_step": micro, "run_config": run_config,
                "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
                "best_metric": best_metric, "best_step": best_step, "history_json": json.dumps(history),
            })

        write_dir_atomically(out_dir / "last", build)

    def save_best(metrics: dict[str, float]) -> None:
        if not d.is_main:
            return
        write_dir_atomically(out_dir / "best", lambda tmp: write_adapter(tmp, metrics))

    # -- loop -----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    max_steps, accum = a["max_steps"], a["grad_accum_steps"]
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not a["progress"] or not d.is_main)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    train_seconds = 0.0
    samples = tokens = 0
    window_loss: list[float] = []
    window_tokens = 0
    window_time = 0.0
    last_loss = float("nan")
    final_metrics = None
    train_model.train()
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            step_loss = 0.0
            step_tokens = 0
            for k in range(accum):
                indices = micro_batch(micro)
                micro += 1
                batch = _to_device(train_data.collate(indices), dev)
                sync = contextlib.nullcontext() if (not d.active or k == accum - 1) else train_model.no_sync()
                with sync:
                    with _autocast(dev, precision):
                        logits = train_model(**_model_inputs(batch)).logits
                    loss = _loss(logits, batch["labels"], task, regression)
                    (loss / accum).backward()
                step_loss += float(loss.detach()) / accum
                step_tokens += int(batch["attention_mask"].sum())
                samples += len(indices) * d.world_size
            if a["max_grad_norm"] is not None:
                torch.nn.utils.clip_grad_norm_(trainable_params, a["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"training loss is {step_loss} at step {step}: lower the learning rate (lr={a['lr']}) "
                    "or set max_grad_norm"
                )
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            tokens += step_tokens * d.world_size
            window_loss.append(step_loss)
            window_tokens += step_tokens * d.world_size
            window_time += elapsed
            logs: dict[str, Any] = {"step": step, "loss": step_loss, "lr": opt.param_groups[0]["lr"],
                                    "lr_groups": {g["name"]: g["lr"] for g in opt.param_groups}}
            if step % a["log_every"] == 0 or step == max_steps:
                last_loss = sum(window_loss) / len(window_loss)
                record = {"step": step, "loss": last_loss, "lr": opt.param_groups[0]["lr"],
                          "tokens_per_s": window_tokens / window_time if window_time else 0.0,
                          "epoch": micro / batches_per_epoch}
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if d.is_main:
                    _append_log(out_dir, record)
                window_loss, window_tokens, window_time = [], 0, 0.0
            bar.update(1)

            evaluate_now = eval_data is not None and (
                (a["eval_every"] and step % a["eval_every"] == 0) or step == max_steps)
            if evaluate_now:
                metrics = _run_eval(model, eval_data, task, num_labels, regression, a["eval_batch_size"], dev,
                                    precision, d)
                history.append({"step": step, **metrics})
                logs["eval"] = metrics
                if d.is_main:
                    _append_log(out_dir, {"step": step, "eval": metrics})
                if a["progress"] and d.is_main:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                           if isinstance(v, float)))
                final_metrics = metrics if step == max_steps else final_metrics
                if is_better(metric, metrics[metric], best_metric):
                    best_metric, best_step = metrics[metric], step
                    save_best(metrics)
            if (a["save_every"] and step % a["save_every"] == 0) or step == max_steps:
                save_last(history[-1] if history and history[-1]["step"] == step else None)
            if a["on_step"] is not None:
                a["on_step"](step, logs)
    finally:
        bar.close()
    if eval_data is not None and final_metrics is None and history and history[-1]["step"] == step:
        final_metrics = {k: v for k, v in history[-1].items() if k != "step"}
    _barrier(d)

    if dev.type == "cuda":
        peak, peak_kind = int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
    else:
        peak, peak_kind = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "max_rss"
    return TrainResult(
        out_dir=out_dir,
        last_dir=out_dir / "last",
        best_dir=(out_dir / "best") if eval_data is not None else None,
        step=step,
        metric=metric,
        best_metric=best_metric,
        best_step=best_step,
        final_metrics=final_metrics,
        history=history,
        train_loss=last_loss,
        samples_per_second=samples / train_seconds if train_seconds else 0.0,
        tokens_per_second=tokens / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        trainable_parameters=n_params,
        world_size=d.world_size,
        device=str(dev),
        precision=precision,
        resumed_from=resumed_from,
        config=run_config,
    )


def _norm(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare equal."""
    return json.loads(json.dumps(value, default=str))


def _head_out_features(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


# ---- evaluate -------------------------------------------------------------------------------------


def evaluate(
    model_dir: str | Path | None,
    adapter_dir: str | Path | None,
    data_path: str | Path,
    *,
    task: str | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    regression: bool | None = None,
    num_labels: int | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    text_column: str | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> dict[str, float]:
    """The task metrics of ``model_dir`` + ``adapter_dir`` on ``data_path``.

    Options left as None come from the adapter's ``bca_training.json`` (written by :func:`train`),
    so the result equals the metric :func:`train` logged for that checkpoint. Without ``adapter_dir``
    the base model is evaluated (then ``task`` and, for classification, ``num_labels`` are needed).

    Args:
        model_dir: the base model directory (also the tokenizer's, unless ``tokenizer=``).
        adapter_dir: a ``best/`` or ``last/`` directory from :func:`train`, or any bca-deploy / PEFT C3A
            adapter directory (a classification head is then taken from its ``modules_to_save``).
        data_path: TSV/CSV/JSONL file with labels (seq-cls) or targets (causal-lm).
        model / tokenizer: use these instead of loading ``model_dir``.
        device / precision: as in :func:`train` (default: what the adapter was trained with, resolved on
            this machine).

    Returns:
        The metrics (``accuracy``, ``f1``, ``mcc``, ``loss``, ``n`` for classification; ``pearson``,
        ``mse`` for regression; ``loss``, ``perplexity``, ``tokens`` for causal-lm).
    """
    info: dict[str, Any] = {}
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise TrainingConfigError(f"{adapter_dir}: adapter directory not found")
        if (adapter_dir / TRAINING_FILE).is_file():
            info = json.loads((adapter_dir / TRAINING_FILE).read_text())
    task = task or info.get("task") or "seq-cls"
    if task not in TASKS:
        raise TrainingConfigError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    if model_dir is None and (model is None or tokenizer is None):
        raise TrainingConfigError("pass model_dir (CLI: --model), or both model= and tokenizer=")
    if model_dir is not None and not Path(model_dir).exists():
        raise TrainingConfigError(f"model directory {model_dir} not found")
    def pick(given, key, default):
        return given if given is not None else info.get(key, default)

    max_length = pick(max_length, "max_length", 128)
    batch_size = pick(batch_size, "eval_batch_size", 32)
    regression = pick(regression, "regression", None)
    d, dev = _init_distributed(device)
    try:
        precision = _resolve_precision(pick(precision, "precision", "auto"), dev)
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_dir)
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else tokenizer.unk_token
        examples, data = load_dataset(
            data_path, task, tokenizer, max_length,
            text_columns=pick(text_columns, "text_columns", None),
            label_column=pick(label_column, "label_column", "label"),
            regression=regression, prompt_column=pick(prompt_column, "prompt_column", "prompt"),
            response_column=pick(response_column, "response_column", "response"),
            text_column=pick(text_column, "text_column", "text"),
        )
        regression = bool(task == "seq-cls" and examples.regression)
        num_labels = pick(num_labels, "num_labels", None)
        if task == "seq-cls":
            if examples.labels is None:
                raise DataError(f"{data_path}: no label column to evaluate against")
            if regression:
                num_labels = 1
            elif num_labels is None:
                raise TrainingConfigError("num_labels is unknown: pass num_labels (CLI: --num-labels)")
            check_label_range(examples, num_labels)
        method = info.get("method", "bca")
        modules_to_save = list(info.get("modules_to_save") or [])
        if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file() and not modules_to_save:
            from ..adapter_io import read_adapter

            modules_to_save = read_adapter(adapter_dir)[0].modules_to_save
        if model is None:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            model, _ = _load_model(model_dir, task, num_labels, dtype)
        if task == "seq-cls" and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id(tokenizer)
        from ..inject import _resolve_modules_to_save

        keep_fp32 = set()
        for path in _resolve_modules_to_save(model, modules_to_save) if modules_to_save else []:
            model.get_submodule(path).float()  # the head was trained in fp32: load it without rounding
            keep_fp32 |= {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
        if adapter_dir is not None:
            _load_trained(model, adapter_dir, method)
        keep_fp32 |= set(_kernel_block_sizes(model))
        for param in model.parameters():
            param.requires_grad = False
        _place_model(model, dev, precision, keep_fp32)
        return _run_eval(model, data, task, num_labels or 1, regression, batch_size, dev, precision, d)
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _load_trained(model: nn.Module, adapter_dir: Path, method: str) -> None:
    """Apply what :func:`train` saved: a BCA adapter, or the trainable parameters (head-only/custom)."""
    if (adapter_dir / "adapter_config.json").is_file():
        from ..adapter_io import load_adapter

        load_adapter(model, adapter_dir)
        return
    path = adapter_dir / TRAINABLE_FILE
    if not path.is_file():
        raise TrainingConfigError(f"{adapter_dir}: neither adapter_config.json nor {TRAINABLE_FILE} found")
    from safetensors.torch import load_file

    from ..errors import AdapterMismatchError

    state = load_file(str(path))
    params = dict(model.named_parameters())
    problems = [f"{k}: no such parameter in {type(model).__name__}" for k in state if k not in params]
    problems += [f"{k}: shape {tuple(t.shape)}, the model's is {tuple(params[k].shape)}"
                 for k, t in state.items() if k in params and params[k].shape != t.shape]
    if problems:
        raise AdapterMismatchError(format_problems(f"{path} does not fit the model:", problems))
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.to(params[key].dtype))
    model.eval()
