"""FSDP for training: the frozen base model and the adapter sharded across the torchrun ranks.

With DDP every rank holds the whole base model, so the largest model that trains is the largest one a
single GPU holds. FSDP (PyTorch's ``fully_shard``, FSDP2) keeps 1/world_size of every parameter on each
rank and gathers one transformer block at a time for its forward and backward, as ``accelerate launch``
with an FSDP config does for full fine-tuning. The adapter's kernels and the head are sharded with the
block they sit in; only they have gradients, so only they are reduce-scattered.

What a run writes does not depend on the sharding: checkpoints hold whole tensors and the optimizer
state in ``torch.optim.Optimizer.state_dict()``'s layout, as a DDP run writes them, so a run saved under
FSDP resumes under DDP and the other way round (with the same number of processes).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import TrainingConfigError

__all__ = ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "sharding_source", "ignored_accelerate_settings",
           "shard", "align_with_first", "shard_from_first", "full_trainable", "load_trainable",
           "full_optimizer_state", "load_optimizer_state", "gradient_sync"]

#: What ``accelerate launch`` sets for an FSDP config (``--use_fsdp``, or ``distributed_type: FSDP``).
ACCELERATE_USE_FSDP = "ACCELERATE_USE_FSDP"
#: What it sets for a DeepSpeed config, which this trainer does not run.
ACCELERATE_USE_DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"

_TRUE = {"1", "true", "yes", "y", "on"}


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def sharding_source(fsdp_option: bool, environ: Mapping[str, str] | None = None) -> str | None:
    """Who asked for FSDP: ``"--fsdp"``, accelerate's FSDP config, or None (DDP).

    Raises:
        TrainingConfigError: accelerate was launched with a DeepSpeed config (its ZeRO stages would be
            silently replaced by DDP otherwise).
    """
    environ = os.environ if environ is None else environ
    if _env_flag(environ, ACCELERATE_USE_DEEPSPEED):
        raise TrainingConfigError(
            f"accelerate launch asked for DeepSpeed ({ACCELERATE_USE_DEEPSPEED}={environ[ACCELERATE_USE_DEEPSPEED]}): "
            "bca-deploy trains with DDP, or with FSDP (--fsdp, or an accelerate config with distributed_type: FSDP); "
            "launch with one of those")
    if fsdp_option:
        return "--fsdp"
    if _env_flag(environ, ACCELERATE_USE_FSDP):
        return f"accelerate's FSDP config ({ACCELERATE_USE_FSDP}={environ[ACCELERATE_USE_FSDP]})"
    return None


def ignored_accelerate_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The settings of an ``accelerate launch`` config this trainer does not apply, each with what it does
    instead (for a note: accelerate's own Trainer integration would have honoured them)."""
    environ = os.environ if environ is None else environ

    def value(name: str) -> str:
        return environ.get(name, "").strip()

    ignored = []
    if value("ACCELERATE_MIXED_PRECISION").lower() in {"bf16", "fp16", "fp8"}:
        ignored.append(f"mixed precision {value('ACCELERATE_MIXED_PRECISION')} (pass --precision bf16)")
    if _env_flag(environ, ACCELERATE_USE_FSDP):
        if value("FSDP_SHARDING_STRATEGY").upper() not in {"", "FULL_SHARD", "1"}:
            ignored.append(f"sharding strategy {value('FSDP_SHARDING_STRATEGY')} (this trainer shards fully)")
        if value("FSDP_OFFLOAD_PARAMS").lower() in _TRUE:
            ignored.append("parameter offload to the CPU (the shards stay on the device)")
        if value("FSDP_RESHARD_AFTER_FORWARD").lower() in {"false", "0", "no"}:
            ignored.append("reshard_after_forward false (blocks are resharded after their forward)")
        if value("FSDP_ACTIVATION_CHECKPOINTING").lower() in _TRUE:
            ignored.append("activation checkpointing (pass --gradient-checkpointing)")
        if value("FSDP_TRANSFORMER_CLS_TO_WRAP"):
            ignored.append(f"the classes to wrap {value('FSDP_TRANSFORMER_CLS_TO_WRAP')} (this trainer wraps the "
                           "model's _no_split_modules)")
    return ignored


def _block_classes(model: nn.Module) -> set[str]:
    """The class names transformers keeps whole when it splits a model (``_no_split_modules``): its
    transformer blocks, the unit FSDP gathers at a time (as accelerate's transformer-based wrap does)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(model: nn.Module, device: torch.device, mesh=None) -> int:
    """Shard ``model`` in place over the default process group, one FSDP unit per transformer block plus
    the root (embeddings, final norm, head), and move each rank's shards to ``device``.

    ``mesh``: the 1-D device mesh over every rank (default: a new one). Call after the adapter is injected and
    the dtypes are set, before the optimizer is built: the parameters become ``DTensor`` shards (same names).

    Returns:
        The number of transformer blocks sharded as their own units (0: the model is one unit).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    classes = _block_classes(model)
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def align_with_first(model: nn.Module, missing: list[str], source: str = "") -> list[str]:
    """Before the adapter is injected: every rank takes the first rank's list of parameters the checkpoint lacked
    and its dtype for each tensor (the others built ``model`` on the meta device without reading the weights;
    see :func:`bca_deploy.training.loading.empty_for_training`), and checks it holds the same tensors (names
    and shapes). Returns the list. ``source``: the ``--model`` path, for the error."""
    import torch.distributed as dist

    first = dist.get_rank() == 0
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    shared = [(missing, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}) if first else None]
    dist.broadcast_object_list(shared, src=0)
    missing, layout = shared[0]
    if not first:
        differ = sorted(set(layout) ^ set(tensors)) or \
            [n for n, t in tensors.items() if tuple(t.shape) != layout[n][1]]
        if differ:  # the values are sent tensor by tensor, by name: both sides must hold the same tensors
            raise TrainingConfigError(f"--model {source}: the model built from its "
                                      "config differs from the one its checkpoint loads, in "
                                      f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}; FSDP cannot "
                                      "send it its shards (train without --fsdp)")
        for name, tensor in tensors.items():
            if tensor.dtype != layout[name][0]:
                tensor.data = tensor.data.to(layout[name][0])
    return list(missing)


def shard_from_first(model: nn.Module, device: torch.device) -> int:
    """:func:`shard` for a model only the first rank has read: the others built it on the meta device
    (:func:`bca_deploy.training.loading.empty_for_training`). Each parameter goes from the first rank to the
    others one tensor at a time, each rank receiving its own shard (a scatter), and each buffer is broadcast;
    then the first rank shards its own copy. So one process holds the whole model while loading, as with
    accelerate's ``fsdp_cpu_ram_efficient_loading``; the first holds what it held when every rank read it.
    Returns what :func:`shard` returns."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if dist.get_rank() == 0:
        _send_values(model, device, mesh)
        return shard(model, device, mesh)
    blocks = shard(model, device, mesh)
    model.to_empty(device=device)
    _send_values(model, device, mesh)
    return blocks


@torch.no_grad()
def _send_values(model: nn.Module, device: torch.device, mesh) -> None:
    """The first rank's values into every rank's shards (the same collectives, in the same order, on every rank:
    the first rank's model is whole, the others' already sharded)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    first = dist.get_rank() == 0
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if first:
            whole = param.detach().to(device)
        else:  # the shape to receive into (what is in it is never read)
            whole = torch.empty(param.shape, dtype=param.dtype, device=device)
        local = distribute_tensor(whole, mesh, [Shard(0)], src_data_rank=0).to_local()
        if not first:
            assert isinstance(param, DTensor)
            param.to_local().copy_(local)
        del whole, local
    for _, buffer in sorted(model.named_buffers(), key=lambda item: item[0]):
        dist.broadcast(buffer.to(device) if first else buffer, src=0)  # the others' are on the device already


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def full_trainable(model: nn.Module, also: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` for every trainable parameter, and the parameters named in ``also``
    (what the adapter saves though it is frozen, such as a head tied to the frozen embeddings). A collective:
    every rank calls it, and every rank gets the tensors."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    # every name of a tied parameter (GPT-2's lm_head.weight is transformer.wte.weight): savers look tensors up
    # by the module they save, and a name left out would be read from the shard
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad and name not in also:
            continue
        if id(param) not in gathered:
            value = param.detach()
            if isinstance(value, DTensor):
                value = value.full_tensor()
            gathered[id(param)] = value.to("cpu", copy=True)
        out[name] = gathered[id(param)]
    return out


def load_trainable(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (sharded or not) trainable parameters: each rank keeps its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, param in _trainable(model):
            tensor = saved[name]
            if isinstance(param, DTensor):
                # every rank read the whole tensor from the checkpoint: each cuts its own shard, no traffic
                local = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(tensor.to(param.dtype))


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` as an unsharded run has it: every sharded state tensor (Adadelta's running
    averages, AdamW's moments) gathered whole onto the CPU. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    state = opt.state_dict()

    def whole(value: Any) -> Any:
        return value.full_tensor().cpu() if isinstance(value, DTensor) else value

    return {**state, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}}


def load_optimizer_state(opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load an ``opt.state_dict()`` of the unsharded layout into a sharded run's optimizer: each rank cuts
    its shard of every state tensor shaped like its parameter. Every rank calls it with the whole state.

    Raises:
        ValueError / KeyError / TypeError: the state does not fit the optimizer's groups.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]

    def shard_of(value: Any, param: torch.Tensor) -> Any:
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return value

    by_index = {int(i): {k: shard_of(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
    opt.load_state_dict({**state, "state": by_index})


def gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP's ``no_sync``: with gradient accumulation, reduce-scatter only on the last micro-batch."""
    model.set_requires_gradient_sync(enabled)
