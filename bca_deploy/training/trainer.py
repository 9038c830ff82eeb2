"""The trainer: BCA fine-tuning on one device or under ``torchrun`` (DDP), as a recipe of short steps.

:func:`train` runs :class:`_TrainingRun`, whose steps follow torchtune's recipes: ``setup_output`` (the
rules for ``--out``), ``setup_data`` (files, labels against the head), ``setup_model`` (load, head, inject),
``setup_optimizer`` (parameter groups, schedule), ``restore`` (``--resume``), ``train_loop`` and
``save_checkpoint``. Every input is checked before anything is written.

One code path for CPU and GPU: CUDA when present (bf16 autocast and a bf16 base model on GPUs that support
it; kernels, head and optimizer state stay fp32), CPU otherwise. Under ``torchrun`` the process group is
initialised from the environment (NCCL on CUDA, gloo on CPU), each rank reads its shard of the data
(:class:`~torch.utils.data.DistributedSampler`) and only rank 0 writes.

Outputs in ``--out`` (see :class:`~bca_deploy.training.checkpoint.RunDirectory` for how an earlier run there
is kept until the new one has a checkpoint):

- ``last/``: the adapter after the latest checkpoint step plus ``trainer_state.pt`` (resume);
- ``best/``: the adapter with the best evaluation metric so far;
- ``train_log.jsonl``: one JSON object per logging step and per evaluation;
- ``train_result.json``: the :class:`TrainResult` of the finished run.

Each adapter directory holds the adapter files (bca-deploy format, with the task, head and labels in
``adapter_config.json``; ``trainable_parameters.safetensors`` for ``head-only``/``custom``) and
``bca_training.json`` (columns, max length...), so :func:`evaluate` needs only the base model, the adapter
and a file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import check_inputs_outside, write_text
from ..config import MAX_NUM_LABELS, TaskSpec, repeated_label, task_spec_from_config
from ..errors import format_problems
from ..models import (describe_ids_past_vocabulary, classifier_pad_id, ids_past_vocabulary, position_limit,
                      vocabulary_size)
from .checkpoint import (LOG_FILE, RESULT_FILE, STATE_FILE, RunDirectory, load_state, rng_state, save_state,
                         set_rng_state, trained_value_problems, write_dir_atomically)
from .config import Recipe, TrainConfig, recipe_for
from .data import (UNLABELLED_MARKS, SeqClsExamples, check_ids_mean_these_names, check_label_range, check_token_range,
                   classes_needed, load_dataset, parquet_class_names, scores_read_as_classes,
                   seen_in_training_note)
from .errors import (CheckpointError, DataError, DataFileNotFoundError, PeerFailedError, TrainingConfigError,
                     TrainingDivergedError, TrainingTerminated)
from .evaluation import TRAINING_FILE, evaluate
from .loading import (
    DEFAULT_TARGETS,
    TRAINABLE_FILE,
    Labels,
    base_head,
    default_modules_to_save,
    default_targets,
    empty_for_training,
    fit_max_length,
    head_param_names,
    head_paths,
    kernel_block_sizes,
    load_for_training,
    load_model_config,
    load_tokenizer,
    save_adapter_files,
)
from .metrics import is_better, primary_metric
from .runtime import (
    Dist,
    any_rank,
    autocast,
    barrier,
    destroy,
    init_distributed,
    model_inputs,
    on_every_rank,
    on_main,
    peer_failure,
    place_model,
    resolve_precision,
    run_eval,
    task_loss,
    to_device,
)
from .sharding import (
    align_with_first,
    full_optimizer_state,
    full_trainable,
    gradient_sync,
    ignored_accelerate_settings,
    load_optimizer_state,
    load_trainable,
    shard,
    shard_from_first,
    sharding_source,
)

__all__ = [
    "train",
    "evaluate",
    "TrainResult",
    "DEFAULT_TARGETS",
    "TRAINING_FILE",
    "TRAINABLE_FILE",
    "RESULT_FILE",
    "LOG_FILE",
]

# Options that must be equal for a resumed run to continue the same trajectory.
_RESUME_KEYS = (
    "task", "method", "targets", "block_size", "block_size_pattern", "scaling", "init", "modules_to_save",
    "optimizer", "lr", "head_lr", "lr_divide_by_block_size", "weight_decay", "scheduler", "warmup",
    "batch_size", "grad_accum_steps", "max_length", "seed", "world_size", "num_labels", "regression",
    "max_grad_norm", "precision", "train_examples", "adadelta_rho", "adadelta_eps", "label_names", "group_by_length",
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
        train_loss: mean training loss over the last logging window; a resume that trained no step (the run was
            at --max-steps already) keeps the one ``train_log.jsonl`` records for its step, else None (written as
            null, as every number that is not finite: JSON has no NaN, and the next resume reads this file back).
        samples_per_second / tokens_per_second: training throughput of this invocation (all ranks,
            evaluation and checkpoint time excluded; tokens are non-padding tokens).
        train_seconds: time spent in training steps in this invocation.
        train_cpu_seconds: CPU time this process spent in them (on a shared machine, the cost of the steps
            without the time other processes held the cores).
        peak_memory_bytes / peak_memory_kind: ``torch.cuda.max_memory_allocated`` on CUDA
            (``"cuda_max_allocated"``), the process's peak resident set size on CPU (``"max_rss"``).
        trainable_parameters: ``{"adapter": kernels or other non-head trainables, "head": head}``.
        base_parameters: parameters of the base model (frozen ones included).
        task: the :class:`~bca_deploy.config.TaskSpec` recorded in the adapter, as a dict (None for custom).
        recipe: the recipe's name; ``config``: every resolved option of the run.
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
    train_loss: float | None
    samples_per_second: float
    tokens_per_second: float
    train_seconds: float
    train_cpu_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    trainable_parameters: dict[str, int]
    world_size: int
    device: str
    precision: str
    base_parameters: int = 0
    task: dict[str, Any] | None = None
    recipe: str = "default"
    resumed_from: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        """The adapter to use next: ``best/`` when there was evaluation data, else ``last/``."""
        return self.best_dir if self.best_dir is not None else self.last_dir

    def to_dict(self) -> dict[str, Any]:
        """The fields as ``train_result.json`` holds them: paths as strings, numbers that are not finite (a metric
        undefined on the data, such as the Pearson correlation of constant predictions) as None."""
        return _finite_or_none(json.loads(json.dumps(dataclasses.asdict(self), default=str)))


def _finite_or_none(value: Any) -> Any:
    """``value`` (parsed JSON) with every float that is not finite replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# ---- optimisation ---------------------------------------------------------------------------------


def _param_groups(model: nn.Module, head_names: set[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group per kernel block size (lr / p when dividing), one for other adapter parameters,
    one for the head (undivided ``head_lr``)."""
    block_sizes = kernel_block_sizes(model)
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
    divide = cfg.lr_divide_by_block_size
    groups = [
        {"params": params, "lr": cfg.lr / p if divide else cfg.lr, "name": f"bca_p{p}", "weight_decay": cfg.weight_decay}
        for p, params in sorted(by_p.items())
    ]
    if other:
        groups.append({"params": other, "lr": cfg.lr, "name": "adapter", "weight_decay": cfg.weight_decay})
    if head:
        groups.append({"params": head, "lr": cfg.head_lr, "name": "head", "weight_decay": cfg.weight_decay})
    return groups


def _make_optimizer(cfg: TrainConfig, recipe: Recipe, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, rho=recipe.adadelta_rho, eps=recipe.adadelta_eps)
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


def _length_grouped(order: list[int], input_ids: Sequence[Sequence[int]], batch_size: int, seed: int,
                    epoch: int, group: int = 50) -> list[list[int]]:
    """Batches of ``order`` with similar lengths: sort runs of ``group`` batches by length, cut, shuffle batches.

    The one short batch (when ``len(order)`` is not a multiple of ``batch_size``) stays last, as without
    grouping, so every other batch is whole.
    """
    full = len(order) - len(order) % batch_size
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, full, span):
        chunk = sorted(order[start : min(start + span, full)], key=lambda i: len(input_ids[i]), reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches + ([order[full:]] if full < len(order) else [])


# ---- saving ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole or not at all (a Ctrl-C or SIGTERM mid-write leaves the earlier file)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_number_or_none(value: Any) -> bool:
    """A number, or None where :meth:`TrainResult.to_dict` wrote one that is not finite (or none was recorded)."""
    return value is None or _is_number(value)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


#: Every field of ``train_result.json`` and what it must hold for a finished resume to print it (null allowed only
#: where :class:`TrainResult` allows None, or :meth:`TrainResult.to_dict` writes it for a number that is not finite).
_RESULT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "out_dir": lambda v: isinstance(v, str), "last_dir": lambda v: isinstance(v, str),
    "best_dir": lambda v: v is None or isinstance(v, str), "step": _is_count, "metric": lambda v: isinstance(v, str),
    "best_metric": _is_number_or_none, "best_step": lambda v: v is None or _is_count(v),
    "final_metrics": lambda v: v is None or (isinstance(v, dict) and all(map(_is_number_or_none, v.values()))),
    "history": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
    "train_loss": _is_number_or_none,
    **dict.fromkeys(("samples_per_second", "tokens_per_second", "train_seconds", "train_cpu_seconds"), _is_number),
    "peak_memory_bytes": _is_count, "peak_memory_kind": lambda v: isinstance(v, str),
    "trainable_parameters": lambda v: isinstance(v, dict) and all(_is_count(v.get(k)) for k in ("adapter", "head")),
    "world_size": _is_count, "device": lambda v: isinstance(v, str), "precision": lambda v: isinstance(v, str),
    "base_parameters": _is_count, "task": lambda v: v is None or isinstance(v, dict),
    "recipe": lambda v: isinstance(v, str), "resumed_from": lambda v: v is None or _is_count(v),
    "config": lambda v: isinstance(v, dict),
}


def _recorded_result(data: dict[str, Any], out: Path, step: int, evaluated: bool) -> TrainResult | None:
    """``data`` (a ``train_result.json``) as the :class:`TrainResult` of the finished run in ``out`` at ``step``, or
    None when it is not one: a field missing, unknown or of another type (a hand-edited file printed its strings as
    numbers, or failed in the summary with a traceback), or paths and step other than this run's (a run moved to
    another folder printed its old paths as the adapter to use)."""
    if set(data) != set(_RESULT_FIELDS) or not all(ok(data[key]) for key, ok in _RESULT_FIELDS.items()):
        return None
    best = out / "best" if evaluated else None
    if (data["out_dir"], data["last_dir"], data["best_dir"], data["step"]) != \
            (str(out), str(out / "last"), None if best is None else str(best), step):
        return None
    return TrainResult(**{**data, "out_dir": out, "last_dir": out / "last", "best_dir": best})


def _scale_by_block_size(model: nn.Module, adapter: str = "default") -> None:
    """Set each module's scale to its block size p (ΔW = p · B(w)), in the layers and in the recorded config."""
    import dataclasses as dc

    from ..inject import adapter_configs, bca_layers

    config = adapter_configs(model)[adapter]
    for path, layer in bca_layers(model):
        p = layer.block_sizes[adapter]
        layer.scalings[adapter] = float(p)
        config.modules[path] = dc.replace(config.modules[path], scaling=float(p))


def _optimizer_state_problems(opt: torch.optim.Optimizer) -> list[str]:
    """Where a restored optimizer's per-parameter state does not fit its parameters (a tensor of another shape, as
    a hand-edited or foreign ``trainer_state.pt`` holds: torch loads it as given and fails at the first step) or
    holds NaN/Inf (the run went on and was said to diverge)."""
    problems = []
    for g, group in enumerate(opt.param_groups):
        for i, param in enumerate(group["params"]):
            for key, value in opt.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    problems.append(f"optimizer state {key!r} of parameter {i} of group {g} has shape "
                                    f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
                elif isinstance(value, torch.Tensor) and value.is_floating_point() and \
                        not bool(torch.isfinite(value).all()):  # trained on, then blamed on the learning rate
                    problems.append(f"optimizer state {key!r} of parameter {i} of group {g} holds NaN/Inf values")
    return problems


def _history_problems(history: Any, step: int) -> list[str]:
    """Where a restored evaluation history is not a list of ``{"step": int, metric: number}`` records up to ``step``."""
    if not isinstance(history, list):
        return [f"the history is {type(history).__name__}, expected a list"]
    for n, record in enumerate(history):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool) \
                or not 0 <= record["step"] <= step:
            return [f"history entry {n} is not an evaluation record with a step from 0 to {step}"]
    return []


def _norm(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare equal."""
    return json.loads(json.dumps(value, default=str))


# ---- train ----------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` with a block-circulant adapter (or the head alone).

    Every input is checked before the first step (options, the output directory, data files and
    columns, labels against the head, target modules and block sizes), and all problems of a kind are
    reported at once. Nothing is written before the checks pass; an earlier run in ``config.out`` is kept
    until this one has written its first checkpoint.

    Args:
        config: the options (:class:`~bca_deploy.training.config.TrainConfig`); optimisation options left
            None come from ``config.recipe``.
        model: a model to use instead of loading ``config.model`` (with ``method="custom"``: already
            prepared, e.g. a PEFT model; every parameter with ``requires_grad`` is trained).
        tokenizer: a tokenizer to use instead of loading it from ``config.model``.
        on_step: ``on_step(step, logs)`` called on every rank after each optimizer step (and after the
            evaluation/checkpoint of that step); raising in it stops training there.

    Returns:
        A :class:`TrainResult` (also written to ``out/train_result.json``).

    Raises:
        TrainingConfigError: invalid or inconsistent options (all listed at once).
        OutputExistsError: ``out`` is not empty and neither ``resume`` nor ``overwrite`` is set.
        CheckpointError: ``resume`` with nothing resumable, a damaged checkpoint, or other options.
        DataError / DataFileNotFoundError: missing file or column, empty data, bad or out-of-range label.
        TargetModuleError / BlockSizeError: from :func:`bca_deploy.inject`.
    """
    if not isinstance(config, TrainConfig):
        raise TrainingConfigError(f"train() takes a TrainConfig, got {type(config).__name__}")
    config.validate(has_model=model is not None, has_tokenizer=tokenizer is not None)
    resolved = config.resolved()
    d, dev = init_distributed(resolved.device)
    with _termination_interrupts() as signals:
        try:
            return _TrainingRun(resolved, config, d, dev, model, tokenizer, on_step, signals).run()
        finally:
            # Under torchrun, a process killed beside this one gets this one SIGTERM from the launcher while it is
            # finding that out (gloo's "connection closed by peer") and tearing down: the signal, at its default
            # action then, killed it before anything said what --out holds. From here on it is ignored.
            signals.ignore()
            destroy(d)


class _TrainingRun:
    """One training run, in the order :meth:`run` calls its steps; ``cfg`` has the recipe filled in."""

    def __init__(self, cfg: TrainConfig, given: TrainConfig, d: Dist, dev: torch.device, model: nn.Module | None,
                 tokenizer: Any, on_step: Callable[[int, dict[str, Any]], None] | None,
                 signals: _TerminationSignals) -> None:
        self.cfg, self.given, self.d, self.dev = cfg, given, d, dev
        self.signals = signals  # train()'s termination handler: ignored once the run unwinds
        self.model, self.tokenizer, self.on_step = model, tokenizer, on_step
        self.model_given = model is not None
        self.recipe = recipe_for(cfg.recipe, cfg.task)
        self.precision = resolve_precision(cfg.precision, dev)
        # absolute: --out . (or ../run) from inside the run it replaces names the old, deleted folder after the swap
        self.out = Path(os.path.abspath(cfg.out))
        self.rundir: RunDirectory | None = None
        self.resume_state: dict[str, Any] | None = None
        self.labels: Labels | None = None
        self.step = self.micro = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.saved_step: int | None = None  # the step of the checkpoint in --out/last (None: none of this run's yet)
        self.logged_loss: float | None = None  # the loss train_log.jsonl records for the step resumed from
        self.printer = _Printer(enabled=cfg.progress and d.is_main)
        self.sharding = sharding_source(cfg.fsdp)
        ignored = ignored_accelerate_settings()
        if ignored and d.is_main:
            print(f"note: accelerate's config asks for what this trainer does not apply: {'; '.join(ignored)}",
                  file=sys.stderr)
        if self.sharding is not None and not d.active:
            if d.is_main:
                print(f"note: FSDP ({self.sharding}) shards across processes; this is one process, so the model "
                      "trains whole (launch with torchrun --nproc_per_node N to shard it)", file=sys.stderr)
            self.sharding = None
        self.sharded_blocks: int | None = None

    def run(self) -> TrainResult:
        try:
            self.setup_output()
            on_every_rank(self.d, self.setup_data)
            self.setup_model()
            self.setup_optimizer()
            self.restore()
            if self.resumed_from is not None and self.step >= self.cfg.max_steps:
                finished = self._finished_result()
                if finished is not None:
                    return finished
            self.printer.start(self)
            self.train_loop()
            result = self.result()
            if self.d.is_main:
                _write_json(self.out / RESULT_FILE, result.to_dict())
            return result
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (TrainingTerminated): say what is left, how to go on
            self.signals.ignore()
            if self.d.is_main:
                with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone: the unwind goes on
                    how = f"terminated ({exc.signal_name})" if isinstance(exc, TrainingTerminated) else "interrupted"
                    print(self._stopped_note(how), file=sys.stderr, flush=True)
            raise
        except RuntimeError as exc:
            self.signals.ignore()  # the launcher's SIGTERM often comes now: it must not cut short what is said below
            if not peer_failure(self.d, exc):
                raise
            # Another process is gone (killed, out of memory, its own error): not a bug here. Say so, and what is left
            # (rank 0 writes the checkpoints, so only it knows which one --out holds).
            left = self._stopped_note("stopped") if self.d.is_main else (
                f"{self.out / 'last'} holds the run's latest checkpoint if rank 0 wrote one; run the same command with "
                "--resume to continue from it")
            raise PeerFailedError(f"rank {self.d.rank}: another process of this distributed run stopped (its own error, "
                                  f"and the launcher's summary, say why); {left}") from None
        finally:
            if self.rundir is not None:
                self.rundir.close()

    def _stopped_note(self, how: str) -> str:
        """What a run stopped early (``how``: interrupted, terminated...) left in ``--out`` and the command that
        continues it."""
        where = f"at step {self.step} of {self.cfg.max_steps}" if self.step else "before the first step"
        saved = self.saved_step
        resume = "run the same command with --resume" + (" in place of --overwrite" if self.cfg.overwrite else "") + \
            " to continue from it"
        if saved is None and self.cfg.resume:  # stopped while setting up: the checkpoint resumed from is untouched
            return f"training {how} {where}: {self.out / 'last'} is as it was; {resume}"
        if saved is None:  # nothing of this run is in --out: it is as it was
            try:
                before = "what was there is kept as it was" if any(self.out.iterdir()) else "nothing was written there"
            except OSError:
                before = "nothing was written there"
            return f"training {how} {where}, before its first checkpoint: {before} ({self.out})"
        return (f"training {how} {where}: {self.out / 'last'} holds the checkpoint of step {saved}; {resume} (the "
                "final adapter is the one an uninterrupted run gives)")

    def _finished_result(self) -> TrainResult | None:
        """The result a finished run wrote, when ``--resume`` finds nothing left to do (None: none readable, or not
        this run's: the caller then writes it again from the checkpoint, as it does for a missing one)."""
        from ..config import read_json
        from ..errors import BCAError

        try:  # by the one JSON rule (a regular file within its bound): a link to /dev/zero was read until memory ran
            data = read_json(self.out / RESULT_FILE, what="training result")  # out, a named pipe blocked for ever
        except BCAError:
            return None
        result = _recorded_result(data, self.out, self.step, self.eval_data is not None)
        if result is None:
            return None
        if self.d.is_main:
            print(f"note: {self.out} already reached step {self.step} (--max-steps {self.cfg.max_steps}): nothing to "
                  f"resume; its {RESULT_FILE} is kept as it was", file=sys.stderr)
        return result

    # -- output directory ---------------------------------------------------------------------------

    def setup_output(self) -> None:
        """Apply the rules for ``--out`` (rank 0 locks and checks it); load the state to resume from."""
        cfg = self.cfg
        if not cfg.resume:  # a new run replaces --out: nothing it reads may live there
            on_main(self.d, lambda: check_inputs_outside(self.out, [
                ("the model directory", cfg.model), ("the training data", cfg.data),
                ("the evaluation data", cfg.eval_data)]))
        self.rundir = on_main(self.d, lambda: RunDirectory.open(self.out, cfg.resume, cfg.overwrite))
        barrier(self.d)
        if cfg.resume:
            self.resume_state = load_state(self.out / "last")

    @property
    def run_path(self) -> Path:
        """Where this run writes now (a staging directory until its first checkpoint, then ``--out``)."""
        return self.rundir.path if self.rundir is not None else self.out

    # -- data -------------------------------------------------------------------------------------------

    def setup_data(self) -> None:
        """Read and tokenize the files; decide the classes and check every label against the head."""
        cfg = self.cfg
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model)
        elif getattr(self.tokenizer, "pad_token_id", None) is None:
            self.tokenizer.pad_token = getattr(self.tokenizer, "eos_token", None) or self.tokenizer.unk_token
        self.base = None
        names_to_read = cfg.label_names
        model_config = self.model.config if self.model_given else load_model_config(cfg.model)
        if cfg.task == "seq-cls":
            self.base = base_head(model_config, self.model)
            if cfg.no_head and not self.base.trained:
                raise TrainingConfigError(
                    f"--no-head keeps the base model's own classification head, but {cfg.model} has none "
                    f"(architecture {self.base.architecture or 'unknown'}): its head would be random. Train "
                    "without --no-head (the head is trained and saved with the adapter)"
                )
            if names_to_read is None and self.base.trained and not cfg.new_head and cfg.method != "custom":
                names_to_read = self.base.names
                repeated = repeated_label(dict(enumerate(names_to_read))) if names_to_read else None
                if repeated:  # the adapter would record them, and an answer's scores are keyed by name
                    raise TrainingConfigError(
                        f"--model {cfg.model}: the base model's classification head names its classes in its "
                        f"config's id2label, where {repeated}; the adapter's classes need distinct names: pass "
                        f"--label-names with one name per class ({self.base.num_labels}, in id order)")
        note = lambda line: self.d.is_main and print(f"note: {line}", file=sys.stderr)  # noqa: E731
        # --num-labels K > 1 says classification: whole decimals are then class ids, not scores (decide_regression)
        regression = False if cfg.regression is None and (cfg.num_labels or 0) > 1 else cfg.regression
        kwargs = dict(text_columns=cfg.text_columns, label_column=cfg.label_column, regression=regression,
                      prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                      text_column=cfg.text_column, messages_column=cfg.messages_column,
                      tools_column=cfg.tools_column, warn=note, model=cfg.model,
                      positions=position_limit(model_config, self.tokenizer))
        fitted = fit_max_length(cfg.max_length, model_config, self.tokenizer, warn=note)
        if fitted != cfg.max_length:
            cfg = self.cfg = dataclasses.replace(cfg, max_length=fitted)
        vocabulary = vocabulary_size(model_config, self.model if self.model_given else None)
        train_ex, self.train_data, errors = None, None, []
        try:
            train_ex, self.train_data = load_dataset(cfg.data, cfg.task, self.tokenizer, cfg.max_length,
                                                     label_names=names_to_read, **kwargs)
            check_token_range(self.train_data, vocabulary, cfg.data, self.tokenizer, cfg.model)
        except DataError as exc:
            errors.append(exc)
        eval_ex, self.eval_data = None, None
        eval_kwargs = dict(kwargs)
        if train_ex is not None and cfg.task == "seq-cls":
            eval_kwargs["regression"] = train_ex.regression  # read both files the same way

        def read_eval(names: list[str] | None) -> tuple[Any, Any]:
            examples, dataset = load_dataset(cfg.eval_data, cfg.task, self.tokenizer, cfg.max_length,
                                             label_names=names, **eval_kwargs)
            check_token_range(dataset, vocabulary, cfg.eval_data, self.tokenizer, cfg.model)
            return examples, dataset

        if cfg.eval_data is not None:
            try:
                eval_ex, self.eval_data = read_eval(names_to_read if train_ex is None else
                                                    getattr(train_ex, "label_names", None))
            except DataError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:  # both files are bad: report both at once
            kind = DataFileNotFoundError if all(isinstance(e, DataFileNotFoundError) for e in errors) else DataError
            raise kind("\n".join(str(e) for e in errors))
        if eval_ex is not None and (seen := seen_in_training_note(train_ex, eval_ex)):
            note(seen)  # scored as held out, they would pick best/ by what was learnt by heart
        extra = ids_past_vocabulary(self.tokenizer, vocabulary)
        if extra and self.d.is_main:  # this data does not use them; served texts that do will be refused
            print(f"note: {describe_ids_past_vocabulary(self.tokenizer, extra, vocabulary)}: this data does not use "
                  "them; texts that do are refused when served", file=sys.stderr)
        self.train_examples, self.eval_examples = train_ex, eval_ex
        self.regression = False
        self.labels_named_by: str | None = None  # the training file whose class names were numbered in sorted order
        if cfg.task == "seq-cls":
            self.labels = self._decide_labels(train_ex, eval_ex)
            self.regression = self.labels.regression
            if train_ex.whole_scores and self.d.is_main and regression is None:
                # STS-B-like scores are 0.0-5.0; pandas writes an integer column holding a missing value as 0.0/1.0
                print(f"note: {cfg.data}: labels written as decimals (such as {train_ex.labels[0]:.1f}) are read as "
                      "real-valued scores: regression, one output, MSE loss (as HF's run_glue reads a float column); "
                      "every one is a whole number: pass --no-regression to read them as class ids instead",
                      file=sys.stderr)
            if regression is None and cfg.num_labels is None and self.d.is_main and \
                    (scores := scores_read_as_classes(train_ex, self.labels.num_labels)):
                print(f"note: {scores}", file=sys.stderr)
            unlabelled = [n for n in (self.labels.names or []) if n.strip() in UNLABELLED_MARKS]
            if unlabelled and not self.regression and self.d.is_main:
                # SNLI and MNLI's files write "-" for a pair without a gold label; HF datasets maps it to -1 and
                # run_glue drops it: here it would silently become a class of its own
                rows = sum(1 for y in train_ex.labels if self.labels.names[y] in unlabelled)
                print(f"note: {cfg.data}: {rows:,} row(s) have the label {unlabelled[0]!r}, trained as a class of its "
                      f"own ({self.labels.num_labels} classes); SNLI and MNLI write it for a pair without a gold "
                      "label: remove those rows unless it is a class", file=sys.stderr)
            if not self.regression and train_ex.named_labels and names_to_read is None:
                # the ids are this program's numbering of the file's names: a held-out file of ids is ambiguous
                self.labels_named_by = str(cfg.data)
                if eval_ex is not None:
                    check_ids_mean_these_names(eval_ex, self.labels.names, self.labels_named_by)
            if eval_ex is not None and eval_ex.label_names not in (None, self.labels.names):
                # the training file numbered its classes and the held-out file named them: its names were
                # numbered by their own order; read them against the classes the adapter records, as
                # evaluate does (a name that is not one of them is refused)
                try:
                    self.eval_examples, self.eval_data = read_eval(self.labels.names)
                except DataError as exc:
                    recorded = ", ".join(self.labels.names[:10]) + (" ..." if len(self.labels.names) > 10 else "")
                    raise DataError(f"{exc}\n{cfg.data} numbers its classes, so the labels of {cfg.eval_data} must "
                                    f"be those numbers or the class names the adapter records ({recorded}); or "
                                    "name the classes in both files, or pass --label-names") from None
        self.metric = cfg.metric_for_best or primary_metric(cfg.task, self.regression)
        allowed = {"causal-lm": {"loss", "perplexity"}}.get(cfg.task) or (
            {"pearson", "mse", "loss"} if self.regression else {"accuracy", "mcc", "f1", "macro_f1", "loss"})
        if self.metric not in allowed:
            raise TrainingConfigError(
                f"--metric-for-best {self.metric!r} is not computed for this task; choose one of {sorted(allowed)}")
        if self.metric == "accuracy" and cfg.metric_for_best is None and self.d.is_main:
            self._note_majority_class()

    def _decide_labels(self, train_ex: SeqClsExamples, eval_ex: SeqClsExamples | None) -> Labels:
        """Number of classes, names and head kind; labels outside the head are refused, never a new head."""
        cfg, base = self.cfg, self.base
        if train_ex.regression:
            if cfg.num_labels not in (None, 1):
                raise TrainingConfigError(f"--num-labels {cfg.num_labels}: regression labels need one output")
            if base.trained and base.num_labels != 1 and not cfg.new_head and cfg.method != "custom":
                ids = (" (whole numbers written as decimals: pass --no-regression to read them as class ids)"
                       if train_ex.whole_scores and cfg.regression is None else "")
                raise DataError(f"{train_ex.path}: the labels are real numbers (regression) but the base model's "
                                f"trained head has {base.num_labels} classes{ids}; pass --new-head to train a new "
                                "one-output head")
            return Labels(1, ["LABEL_0"], True, self._head_kind())
        keeps_head = base.trained and not cfg.new_head or cfg.method == "custom"
        if keeps_head:
            num = base.num_labels
            if cfg.num_labels is not None and cfg.num_labels != num:
                raise TrainingConfigError(
                    f"--num-labels {cfg.num_labels}, but the base model's trained head has {num} classes; pass "
                    f"--new-head to replace it with a new {cfg.num_labels}-class head, or drop --num-labels")
            where, fix = (f"the base model's trained head ({num} classes)",
                          "pass --new-head to train a new head for these labels, or fix the labels")
        else:
            num = cfg.num_labels if cfg.num_labels is not None else classes_needed(train_ex)
            if num > MAX_NUM_LABELS:
                raise TrainingConfigError(f"--num-labels {num}: at most {MAX_NUM_LABELS:,} classes are supported")
            where, fix = "the classification head", "fix the labels or pass a larger --num-labels"
        names = cfg.label_names or train_ex.label_names or (base.names if keeps_head else None)
        if names is not None and len(names) != num:
            raise DataError(f"{train_ex.path}: {len(names)} class names ({', '.join(names[:10])}) for a head of "
                            f"{num} classes")
        if num < 2:  # one output under cross-entropy: the loss is 0 whatever the weights, nothing is learnt
            only = f" ({names[0]!r})" if names else ""
            raise DataError(f"{train_ex.path}: one class{only} makes no classifier; name the other classes with "
                            "--label-names (a class may have no training example) or pass --num-labels, or "
                            "--regression for one real-valued output")
        for examples in (train_ex, eval_ex):
            if examples is eval_ex and examples is not None and examples.label_names not in (None, names):
                continue  # its names were numbered by its own order: setup_data reads it again against the classes
            if examples is not None:
                check_label_range(examples, num, where, fix)
        used = set(train_ex.labels or ())
        if len(used) == 1 and self.d.is_main:
            (only,) = used
            name = names[only] if names else f"LABEL_{only}"
            print(f"note: every label in {train_ex.path} is class {only} ({name!r}) of {num}: the head can only "
                  "learn to answer it", file=sys.stderr)
        elif train_ex.label_names is None and len(used) < num and self.d.is_main:
            # class ids: a head of max id + 1 outputs; ids that start at 1, or one stray large id, leave
            # classes no example teaches (the head is no smaller for it)
            unused = [i for i in range(num) if i not in used]
            shown = ", ".join(map(str, unused[:5])) + (f", ... ({len(unused):,} in all)" if len(unused) > 5 else "")
            print(f"note: {train_ex.path}: no training example of class {shown} of the head's {num:,} (class ids "
                  "run 0..K-1)", file=sys.stderr)
        return Labels(num, list(names) if names else [f"LABEL_{i}" for i in range(num)], False, self._head_kind())

    #: The share of the held-out labels one class may have before accuracy, the default --metric-for-best, is noted as
    #: a poor judge of checkpoints: at 4 to 1 a head that answers that class alone scores 0.8 (a 95/5 split of SST-2
    #: scored 0.95 with an MCC of 0 after 3 steps, and was best/).
    MAJORITY_NOTED = 0.8

    def _note_majority_class(self) -> None:
        """Say so when one class makes up most of the held-out labels that pick best/ by accuracy."""
        labels = getattr(self.eval_examples, "labels", None)
        if not labels:
            return
        label, count = collections.Counter(labels).most_common(1)[0]
        share = count / len(labels)
        if share >= self.MAJORITY_NOTED:
            name = self.labels.names[label]
            print(f"note: {self.cfg.eval_data}: {share:.0%} of the labels are class {label} ({name!r}): answering it "
                  f"alone scores accuracy {share:.4f}, which picks best/; --metric-for-best mcc or macro_f1 judges "
                  "every class", file=sys.stderr)

    def _head_kind(self) -> str:
        if self.model_given:
            return "given"
        if self.cfg.no_head:
            return "base"
        return "trained" if self.base.trained and not self.cfg.new_head else "new"

    # -- model --------------------------------------------------------------------------------------

    def setup_model(self) -> None:
        """Load the base model for the task, decide the head, inject the adapter, place on the device."""
        cfg = self.cfg
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        missing: list[str] = []
        if not self.model_given:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            if self.sharding is not None and not self.d.is_main:  # the first rank reads the weights, and sends them
                self.model = empty_for_training(cfg.model, cfg.task, dtype, self.labels)
            else:
                self.model, missing = load_for_training(cfg.model, cfg.task, dtype, self.labels, cfg.new_head)
            if self.sharding is not None:
                missing = align_with_first(self.model, missing, str(cfg.model))
        model = self.model
        if cfg.task == "seq-cls" and getattr(model, "config", None) is not None:
            pad = classifier_pad_id(model.config, self.tokenizer)  # recorded in the adapter's head
            for data in (self.train_data, self.eval_data):  # padded with the id the classifier reads past
                if pad is not None and data is not None:
                    data.pad_id = pad
        heads = head_paths(model) if cfg.task == "seq-cls" else []
        self.new_head_keys = [k for k in missing if any(k.startswith(p + ".") for p in heads)]
        if cfg.no_head and self.new_head_keys:
            raise TrainingConfigError(f"--no-head keeps the base model's own head, but {cfg.model} lacks its weights "
                                      f"({', '.join(self.new_head_keys)}): it would be random")
        if cfg.modules_to_save is not None:
            modules_to_save = list(cfg.modules_to_save)
        elif cfg.no_head or cfg.method == "custom":
            modules_to_save = []
        else:
            modules_to_save = default_modules_to_save(model, cfg.task, missing)
        self.targets = cfg.targets
        if cfg.method == "bca":
            from ..inject import inject

            if self.targets is None:
                self.targets = default_targets(model)
            by_p = cfg.scaling == "p"
            from ..inject import UnmatchedTargetsWarning, adapter_configs, bca_layers, is_all_linear, unmatched_targets

            with warnings.catch_warnings():
                # said once below as a note, as --targets: the warning's rule and words (unmatched_targets)
                warnings.simplefilter("ignore", UnmatchedTargetsWarning)
                inject(model, self.targets, block_size=cfg.block_size, block_size_pattern=cfg.block_size_pattern,
                       scaling=1.0 if by_p else cfg.scaling, init=cfg.init, init_std=cfg.init_std, seed=cfg.seed,
                       modules_to_save=modules_to_save)
            if by_p:
                _scale_by_block_size(model)
            if self.d.is_main and not is_all_linear(self.targets) and (note := unmatched_targets(
                    model, self.targets, [name for name, _ in bca_layers(model)], "--targets")) is not None:
                # an entry that matched nothing beside others that did trains less than asked: transformers 5.x
                # fuses Mixtral's expert w1/w2 into 3-D parameters, so --targets q_proj,w1,w2 adapted q_proj alone
                print(f"note: {note}", file=sys.stderr)

            modules_to_save = adapter_configs(model)["default"].modules_to_save
        elif cfg.method == "head-only":
            from ..inject import _resolve_modules_to_save

            if not modules_to_save:
                raise TrainingConfigError("--method head-only needs --modules-to-save (the model has no "
                                          "classifier/score head)")
            paths = _resolve_modules_to_save(model, modules_to_save)
            for name, param in model.named_parameters():
                param.requires_grad = any(name.startswith(p + ".") for p in paths)
            modules_to_save = paths
        self.modules_to_save = modules_to_save
        self.task_spec = self._task_spec()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise TrainingConfigError("the model has no trainable parameter (nothing requires grad)")
        self.head_names = head_param_names(model, modules_to_save)
        self.n_params = {
            "adapter": sum(p.numel() for n, p in model.named_parameters() if n in trainable and n not in self.head_names),
            "head": sum(p.numel() for n, p in model.named_parameters() if n in self.head_names),
        }
        self.base_params = sum(p.numel() for n, p in model.named_parameters()
                               if ".bca_kernels." not in f".{n}" and "lora_" not in n)
        place_model(model, self.dev, self.precision, trainable | set(kernel_block_sizes(model)),
                    move=self.sharding is None)
        if (cfg.task == "causal-lm" or cfg.gradient_checkpointing) and getattr(model, "config", None) is not None:
            model.config.use_cache = False  # (transformers says so once per forward when checkpointing with a cache)
        if cfg.gradient_checkpointing:
            # transformers 5.x names it activation checkpointing (the old name warns, and goes in 6.x); 4.x has the old
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise TrainingConfigError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        if self.sharding is not None:  # a given model is whole on every rank; else only the first read the weights
            self.sharded_blocks = shard(model, self.dev) if self.model_given else shard_from_first(model, self.dev)

    def _task_spec(self) -> TaskSpec | None:
        """The task, head architecture and labels recorded in the adapter (checked now, not at the first save)."""
        cfg, model = self.cfg, self.model
        if cfg.method == "custom" or getattr(model, "config", None) is None:
            return None
        model.config.architectures = [type(model).__name__]  # e.g. BertForSequenceClassification, not BertModel
        if cfg.task == "seq-cls":
            model.config.problem_type = self.labels.problem_type
        head = self.modules_to_save if cfg.task == "seq-cls" and not cfg.no_head else None
        spec = task_spec_from_config(cfg.task, model.config, head)
        if cfg.task == "seq-cls" and spec.head is not None:
            names = dict(enumerate(self.labels.names))
            # text_pair: served, the head then refuses single texts (or pairs, trained on single texts)
            spec = dataclasses.replace(spec, head=dataclasses.replace(
                spec.head, id2label=names, label2id={v: k for k, v in names.items()},
                text_pair=len(self.train_examples.text_columns) == 2))
        problems = spec.problems(self.modules_to_save)
        if problems:
            raise TrainingConfigError(format_problems("the adapter's task entry would be invalid:", problems))
        if cfg.method == "bca":
            from ..inject import adapter_configs

            adapter_configs(model)["default"].task = spec
        return spec

    # -- optimizer ------------------------------------------------------------------------------------

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        self.groups = _param_groups(self.model, self.head_names, cfg)
        self.opt = _make_optimizer(cfg, self.recipe, self.groups)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg.scheduler, cfg.warmup, cfg.max_steps))
        self.run_config = {
            **cfg.to_dict(), "fsdp": self.sharded_blocks is not None,  # also when accelerate's config asked
            "targets": self.targets, "block_size_pattern": cfg.block_size_pattern or {},
            "modules_to_save": self.modules_to_save, "warmup": cfg.warmup, "world_size": self.d.world_size,
            "num_labels": self.labels.num_labels if self.labels else None, "regression": self.regression,
            "label_names": self.labels.names if self.labels else None, "precision": self.precision,
            "train_examples": len(self.train_data), "train_data_sha256": self.train_data.fingerprint(),
            "adadelta_rho": self.recipe.adadelta_rho,
            "adadelta_eps": self.recipe.adadelta_eps, "given": self.given.overrides(),
            # the --tool-call-parser names that read the training conversations' tool calls back (None: no calls)
            "tool_call_parsers": list(self.train_examples.tool_call_parsers)
            if getattr(self.train_examples, "tool_call_turns", 0) else None,
        }
        self.training_info = {
            "task": cfg.task, "method": cfg.method, "num_labels": self.run_config["num_labels"],
            "regression": self.regression, "label_names": self.run_config["label_names"],
            "labels_named_by": self.labels_named_by,
            "text_columns": self.train_examples.text_columns if cfg.task == "seq-cls" else None,
            "label_column": cfg.label_column, "prompt_column": cfg.prompt_column,
            "response_column": cfg.response_column, "text_column": cfg.text_column,
            "messages_column": cfg.messages_column, "tools_column": cfg.tools_column, "max_length": cfg.max_length,
            "eval_batch_size": cfg.eval_batch_size or cfg.batch_size, "modules_to_save": self.modules_to_save,
            "metric": self.metric, "model_dir": None if cfg.model is None else str(cfg.model),
            "precision": self.precision, "recipe": cfg.recipe, "no_head": cfg.no_head,
        }

    # -- resume -------------------------------------------------------------------------------------

    def _names_read_since(self, saved_names: Any) -> bool:
        """Whether a checkpoint's ``label_names`` are transformers' ``LABEL_0 .. LABEL_{K-1}`` of a run on class ids
        whose training file is a Parquet file naming those ids in its ``datasets`` metadata (GLUE's hub files), which
        the code before :func:`~bca_deploy.training.data.parquet_class_names` did not read: the same ids, the same
        classes, now named, so the resume goes on (noted), the adapter recording the names."""
        names = self.labels.names if self.labels is not None and not self.regression else None
        if not names or saved_names != [f"LABEL_{i}" for i in range(len(names))] or names == saved_names:
            return False
        examples = self.train_examples
        if not (isinstance(examples, SeqClsExamples) and examples.class_ids and examples.label_names == names
                and self.cfg.label_names is None
                and parquet_class_names(examples.path, examples.label_column) == names):
            return False
        if self.d.is_main:
            print(f"note: {self.out / 'last'} numbers its classes LABEL_0 .. LABEL_{len(names) - 1}: it was written "
                  f"before the class names in {examples.path}'s metadata were read; the resumed run names the same "
                  f"ids {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}", file=sys.stderr)
        return True

    def restore(self) -> None:
        """Continue exactly where ``last/`` stopped: weights, optimizer, schedule, data position, RNGs."""
        state = self.resume_state
        cfg = self.cfg
        if state is not None:
            last = self.out / "last"
            saved = state["run_config"]
            keys = list(_RESUME_KEYS) + (["max_steps"] if cfg.scheduler != "constant" else [])
            if self._names_read_since(saved.get("label_names")):  # the same classes, now named: not another run
                keys.remove("label_names")
            diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {self.run_config.get(k)!r}"
                     for k in keys if _norm(saved.get(k)) != _norm(self.run_config.get(k))]
            # the examples themselves (a checkpoint written before they were recorded is not held to them)
            if saved.get("train_examples") == self.run_config["train_examples"] \
                    and saved.get("train_data_sha256") not in (None, self.run_config["train_data_sha256"]):
                diffs.append(f"training data: the {self.run_config['train_examples']} examples read from "
                             f"{cfg.data} (columns, labels, chat template, tools, --max-length applied) are not the "
                             "ones the checkpoint was trained on")
            if diffs:
                raise CheckpointError(format_problems(
                    f"{last} was written by a run with other options; resume with the same options "
                    "(or pass --overwrite to start over):", diffs))
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            saved_params = state["trainable"]
            problems = [f"{n}: in the checkpoint, not trained by this run" for n in saved_params if n not in params]
            problems += [f"{n}: trained by this run, missing from the checkpoint" for n in params if n not in saved_params]
            problems += [f"{n}: shape {tuple(t.shape)} in the checkpoint, {tuple(params[n].shape)} here"
                         for n, t in saved_params.items() if n in params and t.shape != params[n].shape]
            # values no run writes: integers were cast into the parameters silently (kernels truncated to whole
            # numbers, the run went on), NaN/Inf trained on and was then blamed on the learning rate ("diverged")
            damaged = trained_value_problems(saved_params)
            if damaged:
                raise CheckpointError(format_problems(
                    f"{last / STATE_FILE}: the trainer state is damaged; pass --overwrite to start the run over:",
                    damaged))
            if problems:
                raise CheckpointError(format_problems(
                    f"{last / STATE_FILE} does not fit this run (resume with the options it was written with, or "
                    "pass --overwrite to start over):", problems))
            try:
                if self.sharded_blocks is not None:
                    load_optimizer_state(self.opt, state["optimizer"])
                else:
                    self.opt.load_state_dict(state["optimizer"])
                self.sched.load_state_dict(state["scheduler"])
                rngs = state["rng"]
                rng = rngs[self.d.rank]
                history = json.loads(state.get("history_json", "[]"))
                problems = _optimizer_state_problems(self.opt) + _history_problems(history, int(state["step"]))
                if problems:
                    raise ValueError("; ".join(problems[:3]))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise CheckpointError(f"{last / STATE_FILE}: damaged optimizer, schedule, history or RNG state "
                                      f"({exc}); pass --overwrite to start over") from None
            load_trainable(self.model, saved_params)
            self.step, self.micro = int(state["step"]), int(state["micro_step"])
            self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step")
            self.history = history
            self.resumed_from = self.saved_step = self.step
            if self.d.is_main:
                self.logged_loss = _trim_log(self.out / LOG_FILE, self.step)
        random.seed(cfg.seed + self.d.rank)
        torch.manual_seed(cfg.seed + self.d.rank)  # dropout differs per rank, repeatable per seed
        if state is not None:
            try:
                set_rng_state(rng)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"{self.out / 'last' / STATE_FILE}: damaged RNG state ({exc}); "
                                      "pass --overwrite to start over") from None

    # -- checkpoints --------------------------------------------------------------------------------

    def _write_adapter(self, tmp: Path, metrics: dict[str, float] | None, values: dict[str, torch.Tensor]) -> None:
        """The adapter (or trainable tensors) plus the training info evaluate() needs, into tmp."""
        save_adapter_files(self.model, tmp, self.cfg.method, values)
        _write_json(tmp / TRAINING_FILE, {**self.training_info, "step": self.step, "metrics": metrics})

    def _trainable_for_saving(self) -> dict[str, torch.Tensor] | None:
        """Whole trainable tensors on the CPU for rank 0 to write (None on the other ranks of an unsharded run);
        sharded, a gather every rank takes part in."""
        if self.sharded_blocks is None and not self.d.is_main:
            return None
        saved = {f"{path}.{name}" for path in self.modules_to_save
                 for name, _ in self.model.get_submodule(path).named_parameters()}  # the adapter's own copies
        return full_trainable(self.model, saved)

    def save_checkpoint(self, metrics: dict[str, float] | None, values: dict[str, torch.Tensor] | None) -> None:
        """Write ``last/`` (adapter + trainer state, ``values`` from :meth:`_trainable_for_saving`); the first
        one puts the run in place of ``--out``."""
        rngs = [rng_state()]
        if self.d.active:
            import torch.distributed as dist

            rngs = [None] * self.d.world_size
            dist.all_gather_object(rngs, rng_state())
        # one layout whatever the sharding, so a run resumes under DDP or FSDP alike
        optimizer = full_optimizer_state(self.opt) if self.sharded_blocks is not None \
            else self.opt.state_dict()
        if not self.d.is_main:
            return

        def build(tmp: Path) -> None:
            self._write_adapter(tmp, metrics, values)
            save_state(tmp, {
                "step": self.step, "micro_step": self.micro, "run_config": _norm(self.run_config),
                "trainable": values,
                "optimizer": optimizer, "scheduler": self.sched.state_dict(), "rng": rngs,
                "best_metric": self.best_metric, "best_step": self.best_step,
                "history_json": json.dumps(self.history),
            })

        write_dir_atomically(self.run_path / "last", build)
        self.rundir.first_checkpoint_written()
        self.saved_step = self.step

    def save_best(self, metrics: dict[str, float], values: dict[str, torch.Tensor] | None) -> None:
        if self.d.is_main:
            write_dir_atomically(self.run_path / "best", lambda tmp: self._write_adapter(tmp, metrics, values))

    def _log(self, record: dict[str, Any]) -> None:
        if self.d.is_main:
            with open(self.run_path / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -----------------------------------------------------------------------------------

    def _batches(self) -> Callable[[int], list[int]]:
        """micro-batch index -> example indices: a seeded shuffle per epoch, this rank's shard.

        With ``group_by_length`` each run of 50 optimizer steps' worth of the shuffled examples is sorted by
        length and cut into steps, the epoch's steps are shuffled again, and each step is cut into its
        micro-batches (as transformers' ``group_by_length``, but per optimizer step, so gradient accumulation
        still equals the bigger batch): a batch pads to a length close to its examples' own, which on
        short-sentence data like SST-2 cuts the tokens computed per step about threefold. Deterministic per
        (seed, epoch), so resume is exact.
        """
        from torch.utils.data import DistributedSampler

        cfg = self.cfg
        sampler = DistributedSampler(self.train_data, num_replicas=self.d.world_size, rank=self.d.rank, shuffle=True,
                                     seed=cfg.seed)
        bs, per_step = cfg.batch_size, cfg.batch_size * cfg.grad_accum_steps
        self.batches_per_epoch = math.ceil(len(sampler) / bs)
        cached: dict[int, list[list[int]]] = {}

        def micro_batch(index: int) -> list[int]:
            epoch, pos = divmod(index, self.batches_per_epoch)
            if epoch not in cached:
                cached.clear()
                sampler.set_epoch(epoch)
                order = list(sampler)
                if cfg.group_by_length:
                    steps = _length_grouped(order, self.train_data.input_ids, per_step, cfg.seed, epoch)
                    order = [i for step in steps for i in step]
                cached[epoch] = [order[i : i + bs] for i in range(0, len(order), bs)]
            return cached[epoch][pos]

        return micro_batch

    def train_loop(self) -> None:
        cfg, d, dev = self.cfg, self.d, self.dev
        micro_batch = self._batches()
        train_model: nn.Module = self.model
        if d.active and self.sharded_blocks is None:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        save_every = cfg.save_every if cfg.save_every is not None else (cfg.eval_every or 100)
        accum = cfg.grad_accum_steps
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.train_seconds = self.train_cpu_seconds = 0.0
        self.samples = self.tokens = 0
        window_loss: list[float] = []
        window_tokens, window_time = 0, 0.0
        # a resume with no step left to train reports the loss its last logging window recorded
        self.last_loss: float | None = self.logged_loss
        self.initial_loss: float | None = None
        self.final_metrics = None
        bar = self.printer.bar(cfg.max_steps, self.step)
        train_model.train()
        try:
            while self.step < cfg.max_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                step_loss, step_tokens = 0.0, 0
                for k in range(accum):
                    indices = micro_batch(self.micro)
                    self.micro += 1
                    batch = to_device(self.train_data.collate(indices), dev)
                    if self.sharded_blocks is not None:
                        gradient_sync(train_model, k == accum - 1)
                        sync = contextlib.nullcontext()
                    else:
                        sync = contextlib.nullcontext() if (not d.active or k == accum - 1) else train_model.no_sync()
                    with sync:
                        with autocast(dev, self.precision):
                            logits = train_model(**model_inputs(batch)).logits
                        loss = task_loss(logits, batch["labels"], cfg.task, self.regression)
                        (loss / accum).backward()
                    step_loss += float(loss.detach()) / accum
                    step_tokens += int(batch["attention_mask"].sum())
                    self.samples += len(indices) * d.world_size
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                lrs = {g["name"]: g["lr"] for g in self.opt.param_groups}  # the rates this step used
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                # Every process stops at the same step (one that stopped alone would leave the others to fail on
                # the broken connection).
                if any_rank(d, not math.isfinite(step_loss), dev):
                    seen = "is not finite on another process" if math.isfinite(step_loss) else f"is {step_loss}"
                    clip = "lower --max-grad-norm" if cfg.max_grad_norm else "set --max-grad-norm"
                    raise TrainingDivergedError(f"training loss {seen} at step {self.step}: lower the learning rate "
                                                f"(--lr {cfg.lr}) or {clip}")
                elapsed = time.perf_counter() - t0
                self.train_seconds += elapsed
                self.train_cpu_seconds += time.process_time() - c0
                self.tokens += step_tokens * d.world_size
                if self.initial_loss is None and self.resumed_from is None:
                    self.initial_loss = step_loss  # the loss of the model before any update
                window_loss.append(step_loss)
                window_tokens += step_tokens * d.world_size
                window_time += elapsed
                logs: dict[str, Any] = {"step": self.step, "loss": step_loss, "lr_groups": lrs}
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.last_loss = sum(window_loss) / len(window_loss)
                    self._log({"step": self.step, "loss": self.last_loss, "lr": lrs,
                               "tokens_per_s": window_tokens / window_time if window_time else 0.0,
                               "epoch": self.micro / self.batches_per_epoch})
                    window_loss, window_tokens, window_time = [], 0, 0.0
                self.printer.update(bar, self.last_loss if self.last_loss is not None else step_loss, lrs)
                self._after_step(logs, save_every)
                if self.on_step is not None:
                    self.on_step(self.step, logs)
        finally:
            self.printer.close(bar)
        self._note_divergence()
        if self.eval_data is not None and self.final_metrics is None and self.history \
                and self.history[-1]["step"] == self.step:
            self.final_metrics = {k: v for k, v in self.history[-1].items() if k != "step"}
        barrier(d)

    def _note_divergence(self) -> None:
        """Say so when the training loss ended far above where it started: the run diverged without reaching NaN
        (a learning rate far too high), and its adapter is worse than none."""
        start, end = self.initial_loss, self.last_loss
        if not self.d.is_main or start is None or end is None or not math.isfinite(end) \
                or end <= max(3 * start, start + 1):
            return
        cfg = self.cfg
        rates = f"--lr {cfg.lr:g}" + (f", --head-lr {cfg.head_lr:g}" if cfg.head_lr is not None else "")
        print(f"warning: the training loss rose from {start:.4g} at step 1 to {end:.4g} at the end: the run diverged "
              f"(its adapter fits the data worse than the untrained model); lower the learning rate ({rates})"
              + ("" if cfg.max_grad_norm else " or clip gradients (--max-grad-norm 1)"), file=sys.stderr, flush=True)

    def _after_step(self, logs: dict[str, Any], save_every: int) -> None:
        """Evaluate and checkpoint when this step calls for it."""
        cfg, step = self.cfg, self.step
        best = None
        if self.eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            metrics = run_eval(self.model, self.eval_data, cfg.task, self.labels.num_labels if self.labels else 1,
                                self.regression, cfg.eval_batch_size or cfg.batch_size, self.dev, self.precision,
                                self.d, lockstep=self.sharded_blocks is not None)
            self.history.append({"step": step, **metrics})
            logs["eval"] = metrics
            self._log({"step": step, "eval": metrics})
            self.printer.eval(step, metrics)
            if step == cfg.max_steps:
                self.final_metrics = metrics
            if is_better(self.metric, metrics[self.metric], self.best_metric):
                self.best_metric, self.best_step = metrics[self.metric], step
                best = metrics
        last = (save_every and step % save_every == 0) or step == cfg.max_steps
        if best is None and not last:
            return
        values = self._trainable_for_saving()  # once for best/ and last/ of the same step
        if best is not None:
            self.save_best(best, values)
        if last:
            last_eval = self.history[-1] if self.history and self.history[-1]["step"] == step else None
            self.save_checkpoint(last_eval, values)

    # -- result -------------------------------------------------------------------------------------

    def result(self) -> TrainResult:
        if self.dev.type == "cuda":
            peak, peak_kind = int(torch.cuda.max_memory_allocated(self.dev)), "cuda_max_allocated"
        else:
            peak, peak_kind = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "max_rss"
        return TrainResult(
            out_dir=self.out,
            last_dir=self.out / "last",
            best_dir=(self.out / "best") if self.eval_data is not None else None,
            step=self.step,
            metric=self.metric,
            best_metric=self.best_metric,
            best_step=self.best_step,
            final_metrics=self.final_metrics,
            history=self.history,
            train_loss=self.last_loss,
            samples_per_second=self.samples / self.train_seconds if self.train_seconds else 0.0,
            tokens_per_second=self.tokens / self.train_seconds if self.train_seconds else 0.0,
            train_seconds=self.train_seconds,
            train_cpu_seconds=self.train_cpu_seconds,
            peak_memory_bytes=peak,
            peak_memory_kind=peak_kind,
            trainable_parameters=self.n_params,
            base_parameters=self.base_params,
            world_size=self.d.world_size,
            device=str(self.dev),
            precision=self.precision,
            task=None if self.task_spec is None else self.task_spec.to_dict(),
            recipe=self.cfg.recipe,
            resumed_from=self.resumed_from,
            config=_norm(self.run_config),
        )


#: Signals that stop a run the way Ctrl-C does (see :func:`_termination_interrupts`): SIGTERM (``kill``, a scheduler,
#: ``docker stop``) and SIGHUP (the terminal or SSH session the run was started from closed).
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class _TerminationSignals:
    """What :func:`_termination_interrupts` does with the next SIGTERM/SIGHUP: raise :class:`TrainingTerminated`
    until :meth:`ignore` (or a first signal), nothing after."""

    def __init__(self) -> None:
        self.ignoring = False

    def ignore(self) -> None:
        """From now until the end of the ``with`` block, the signals do nothing: the run is unwinding (after a first
        signal, or an error) and says what ``--out`` holds; a signal then must not end the process before it has."""
        self.ignoring = True


@contextlib.contextmanager
def _termination_interrupts() -> Iterator[_TerminationSignals]:
    """While training, :data:`TERMINATION_SIGNALS` raise :class:`TrainingTerminated` where the run is, as Ctrl-C raises
    ``KeyboardInterrupt``: the run unwinds (a staging directory is removed, the lock file released) instead of
    dying on the spot with both left beside ``--out``. Only in the main thread, and only for a signal that still
    has its default action (a handler the program installed, or SIGHUP ignored by ``nohup``, is left alone); a
    second signal while unwinding, or one after the run called :meth:`_TerminationSignals.ignore`, is ignored."""
    signals = _TerminationSignals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    handled = [number for number in TERMINATION_SIGNALS if signal.getsignal(number) is signal.SIG_DFL]

    def handler(signum, frame):
        if not signals.ignoring:
            signals.ignore()
            raise TrainingTerminated(signum)

    for number in handled:
        signal.signal(number, handler)
    try:
        yield signals
    finally:
        for number in handled:
            signal.signal(number, signal.SIG_DFL)


_MAX_LOG_BYTES = 1 << 30  # a training log past this (millions of steps) is left as it is on resume


def _trim_log(path: Path, step: int) -> float | None:
    """Drop the records of steps after ``step`` (the resumed checkpoint's) from the log: the resumed run logs those
    steps again, and the log then reads as an uninterrupted run's. A line cut short by a kill is dropped too.

    Returns:
        The training loss the log records for ``step`` (its logging window's mean), None when it records none.
    """
    from ..errors import open_regular, read_at_most

    try:  # a regular file of a plausible size only: a link to /dev/zero filled 22 GB, a FIFO blocked the resume
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size > _MAX_LOG_BYTES:
                return None
            lines = read_at_most(handle, _MAX_LOG_BYTES).decode("utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return None
    kept, loss = [], None
    for line in lines:
        try:
            record = json.loads(line)
            done = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
        except ValueError:
            done = False
        if done and line.endswith("\n"):
            kept.append(line)
            if record["step"] == step and "loss" in record:
                loss = record["loss"] if _is_number(record["loss"]) else None
    if len(kept) != len(lines):
        with contextlib.suppress(OSError):  # a log that cannot be rewritten keeps its extra lines
            write_text(path, "".join(kept))
    return loss


def _terminal_size(stream) -> tuple[int, int] | None:
    """(columns, lines) of the terminal ``stream`` writes to; None when it is not a terminal."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError):
        return None


class _Printer:
    """The start-up summary and progress bar on stderr (rank 0, unless ``progress`` is off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def start(self, run: _TrainingRun) -> None:
        if self.enabled:
            from .report import start_summary

            self._say(start_summary(run))

    def bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        # A terminal that reports a size of 0 (a pty nobody sized: `script`, some CI runners) makes tqdm print
        # empty lines (0 columns, or 0 rows for its bar positions); draw a 100 x 24 bar there instead.
        sized = 0 not in (_terminal_size(sys.stderr) or (1, 1))
        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=sized,
                    ncols=None if sized else 100, nrows=None if sized else 24, disable=not self.enabled,
                    file=sys.stderr)

    def update(self, bar, loss: float, lrs: dict[str, float]) -> None:
        if self.enabled:
            from .report import lr_postfix

            bar.set_postfix_str(f"loss {loss:.4f}, {lr_postfix(lrs)}", refresh=False)
        bar.update(1)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            from .report import format_metrics

            tqdm.write(f"step {step}: {format_metrics(metrics)}", file=sys.stderr)

    def close(self, bar) -> None:
        bar.close()


