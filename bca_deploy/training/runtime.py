"""What training and evaluation share at run time: processes (torchrun), devices and precision, the loss,
and the evaluation loop whose numbers ``train`` logs and ``evaluate`` reproduces exactly."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BCAError
from .data import IGNORE_INDEX, TokenizedDataset
from .errors import DataError, TrainingConfigError
from .metrics import MetricAccumulator

__all__ = ["Dist", "init_distributed", "barrier", "on_main", "on_every_rank", "any_rank",
           "peer_failure", "destroy", "joined_process_group", "resolve_precision",
           "autocast", "place_model", "model_inputs", "task_loss", "to_device", "run_eval"]


@dataclass
class Dist:
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


def usable_device(request: str) -> torch.device:
    """The torch device ``--device`` names, if this machine can train on it: ``cpu``, ``cuda``/``cuda:N`` (a
    CUDA build of torch with that GPU) or ``mps`` (Apple silicon).

    Raises:
        TrainingConfigError: naming the request and why (not a device name, a device type training cannot use
            such as ``meta``, no CUDA in this torch, no such GPU).
    """
    try:
        device = torch.device(request)
    except RuntimeError as exc:
        raise TrainingConfigError(f"--device {request!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise TrainingConfigError(f"--device {request!r}: {why} (torch {torch.__version__}); use --device cpu "
                                      "or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingConfigError(f"--device {request!r}: this machine has {torch.cuda.device_count()} CUDA "
                                      f"device(s), numbered from 0")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TrainingConfigError(f"--device {request!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise TrainingConfigError(f"--device {request!r}: training runs on cpu, cuda, cuda:N or mps, not on "
                                  f"{device.type} devices")
    return device


#: Whether this process created a torchrun process group (see :func:`joined_process_group`).
_joined_group = False


def joined_process_group() -> bool:
    """Whether :func:`init_distributed` joined a process group in this process: the CLI then ends the process
    without the interpreter's teardown (``bca_deploy.cli``), where gloo was seen to abort a finished worker."""
    return _joined_group


def init_distributed(device_request: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; pick this rank's device."""
    global _joined_group
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device_request is None or str(device_request).startswith("cuda"))
    if world <= 1:
        if device_request is not None:
            return Dist(), usable_device(device_request)
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = _joined_group = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def on_main(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0; a BCAError it raises is raised on every rank (so none waits forever)."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except BCAError as exc:
            error = exc
    if d.active:
        import torch.distributed as dist

        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            refusal = TrainingConfigError(f"rank 0 refused the run: {box[0][1]}")
            refusal.reported_by_first_process = True  # rank 0 prints it
            raise refusal
    if error is not None:
        raise error
    return result


def on_every_rank(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; a BCAError it raises on any of them is raised on every rank, printed once.

    For the steps each process does alike (reading and checking the data files): each finds the same problem,
    and torchrun showed it once per process before its own summary; a problem one process alone finds (a file its
    machine cannot read) left the others waiting at the next collective. Rank 0 raises its own error, else the
    first failing rank's (named); the other ranks raise theirs (or that one) marked
    :attr:`~bca_deploy.errors.BCAError.reported_by_first_process`, which the CLI does not print again.
    """
    result, error = None, None
    try:
        result = fn()
    except BCAError as exc:
        error = exc
    if d.active:
        import torch.distributed as dist

        found: list[Any] = [None] * d.world_size
        dist.all_gather_object(found, None if error is None else (isinstance(error, DataError), str(error)))
        failed = [(rank, entry) for rank, entry in enumerate(found) if entry is not None]
        if failed and not (d.is_main and error is not None):
            rank, (is_data, text) = failed[0]
            if error is None:
                error = (DataError if is_data else TrainingConfigError)(text if rank == 0 else f"rank {rank}: {text}")
            error.reported_by_first_process = not d.is_main
    if error is not None:
        raise error
    return result


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process of the run; every process gets the same answer (one all-reduce of a
    scalar on ``device``, which NCCL needs to be the process's GPU), so all of them act on it together."""
    if not d.active:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


#: What the collective backends say when another process of the group is gone (killed, crashed, out of memory):
#: gloo raises a plain RuntimeError ("Connection closed by peer", "Connection reset by peer"), NCCL a DistError.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl")


def peer_failure(d: Dist, exc: BaseException) -> bool:
    """Whether ``exc`` is this process finding that another process of the distributed run is gone (its own error,
    and the launcher's summary, say why), rather than a failure of its own."""
    if not d.active or not isinstance(exc, RuntimeError):
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_GONE)


def destroy(d: Dist) -> None:
    if d.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16")
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def place_model(model: nn.Module, device: torch.device, precision: str, fp32_names: set[str],
                move: bool = True) -> None:
    """Move to ``device`` (unless ``move`` is False: FSDP moves each rank's shards itself); bf16: frozen
    floating parameters in bf16, the ``fp32_names`` ones in fp32."""
    if move:
        model.to(device)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if name in fp32_names or param.requires_grad:
            if param.dtype != torch.float32:
                param.data = param.data.float()
        elif precision == "bf16" and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, regression: bool) -> torch.Tensor:
    logits = logits.float()
    if task == "causal-lm":
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V)
        shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
        return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    if regression:
        return nn.functional.mse_loss(logits.reshape(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def run_eval(model: nn.Module, dataset: TokenizedDataset, task: str, num_labels: int, regression: bool,
              batch_size: int, device: torch.device, precision: str, d: Dist, lockstep: bool = False
              ) -> dict[str, float]:
    """Metrics over ``dataset``: each rank takes every world_size-th example (no padding), sums are all-reduced.

    Examples are batched in order of length (stable), so a given dataset and batch size always gives the
    same batches, in :func:`train` and in :func:`evaluate` alike.

    ``lockstep``: every rank runs as many forwards as the rank with the most batches (a sharded model's
    forward is a collective); a rank with fewer repeats one of its batches and does not count it.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    shard = order[d.rank :: d.world_size]
    acc = MetricAccumulator(task, num_labels=num_labels, regression=regression, device=device)
    starts = list(range(0, len(shard), batch_size))
    runs = len(starts)
    if lockstep and d.active:
        runs = math.ceil(math.ceil(len(order) / d.world_size) / batch_size)  # rank 0 has the most examples
    for run in range(runs):
        counted = run < len(starts)
        indices = shard[starts[run] : starts[run] + batch_size] if counted else (shard or order)[:1]
        batch = to_device(dataset.collate(indices), device)
        with autocast(device, precision):
            logits = model(**model_inputs(batch)).logits
        if counted:
            acc.update(logits, batch["labels"])
    if lockstep and hasattr(model, "reshard"):
        model.reshard()  # FSDP keeps the root's parameters (embeddings, head) gathered after a forward
    acc.all_reduce()
    model.train(was_training)
    return acc.compute()
