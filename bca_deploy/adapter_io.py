"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``; no pickle anywhere.

``load_adapter`` reads bca-deploy directories and PEFT C3A directories alike, checks the adapter
against the model it is loaded into (every missing, unexpected or mis-shaped tensor is reported at
once), and only then changes the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import CONFIG_FILE, KERNEL_SUFFIX, WEIGHTS_FILE, AdapterConfig, read_json
from .errors import AdapterFormatError, AdapterMismatchError, OutputExistsError, format_problems
from .inject import adapter_configs, freeze_base, inject_modules, register_adapter, bca_layers
from .layers import BCALinear, is_adaptable, layer_dims, layer_type_of
from .peft_compat import from_peft, is_peft_config, to_peft

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "adapter_state",
    "check_adapter_fits",
    "write_adapter_dir",
    "convert_adapter",
    "align_module_paths",
    "align_paths",
    "kernel_problem",
]


def kernel_problem(state: dict[str, torch.Tensor], module: str, spec, check_finite: bool = True) -> str | None:
    """What is wrong with module ``module``'s kernel in an adapter's tensors ``state``, or None.

    Checks that ``<module>.bca_kernel`` exists, has ``spec.kernel_shape``, and (``check_finite``) holds no NaN/Inf.
    """
    kernel = state.get(module + KERNEL_SUFFIX)
    if kernel is None:
        return f"kernel tensor {module + KERNEL_SUFFIX} is missing from the adapter"
    if tuple(kernel.shape) != spec.kernel_shape:
        return f"kernel shape {tuple(kernel.shape)}, expected {spec.kernel_shape}"
    if check_finite and not torch.isfinite(kernel).all():
        return "kernel has NaN/Inf values"
    return None


def adapter_state(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``: ``<path>.bca_kernel`` (fp32) and modules_to_save params."""
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        raise ValueError(f"model has no adapter named {adapter_name!r}; it has {sorted(adapter_configs(model))}")
    state: dict[str, torch.Tensor] = {}
    for name, layer in bca_layers(model):
        if adapter_name in layer.bca_kernels:
            state[name + KERNEL_SUFFIX] = layer.bca_kernels[adapter_name].detach().float().cpu().contiguous()
    for module_path in config.modules_to_save:
        module = model.get_submodule(module_path)
        for pname, param in module.named_parameters():
            state[f"{module_path}.{pname}"] = param.detach().cpu().contiguous()
    return state


def write_adapter_dir(
    directory: str | Path, config_dict: dict[str, Any], state: dict[str, torch.Tensor], overwrite: bool = True
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    Files are written in a temporary directory beside ``directory`` and moved into place with
    ``os.replace``, so a crash leaves either the old files or the new ones, never half of one.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFormatError(f"{directory}: exists and is not a directory")
    if directory.exists() and not overwrite and any(
        (directory / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)
    ):
        raise OutputExistsError(f"{directory}: already holds an adapter; pass overwrite=True (CLI: --overwrite) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
        if not directory.exists():
            os.replace(tmp, directory)
            return directory
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    format: str = "bca",
    task_type: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Save adapter ``adapter_name`` of ``model`` to ``directory``.

    Args:
        model: a model adapted with :func:`bca_deploy.inject` or :func:`load_adapter`.
        directory: output directory (created; existing adapter files are replaced atomically).
        adapter_name: which adapter to save.
        format: ``"bca"`` (bca-deploy format) or ``"peft"`` (PEFT C3A, loadable with
            ``peft.PeftModel.from_pretrained``; Linear targets only).
        task_type: PEFT ``task_type`` to record with ``format="peft"`` (e.g. ``"SEQ_CLS"``).
        overwrite: if False, refuse a directory that already holds an adapter.

    Returns:
        The directory path.
    """
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        raise ValueError(f"model has no adapter named {adapter_name!r}; it has {sorted(adapter_configs(model))}")
    state = adapter_state(model, adapter_name)
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {key} has NaN/Inf values; refusing to save a broken adapter")
    if format == "bca":
        return write_adapter_dir(directory, config.to_dict(), state, overwrite=overwrite)
    if format == "peft":
        peft_config, peft_state = to_peft(config, state, task_type=task_type)
        return write_adapter_dir(directory, peft_config, peft_state, overwrite=overwrite)
    raise ValueError(f"format must be 'bca' or 'peft', got {format!r}")


def read_adapter(directory: str | Path, model: nn.Module | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory (bca-deploy or PEFT C3A) into a config and bca-deploy-keyed tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: adapter directory not found")
    data = read_json(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle; bca-deploy loads safetensors only)" if (directory / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{weights}: no such file{hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterFormatError(f"{weights}: cannot read safetensors file ({exc})") from exc
    if is_peft_config(data):
        layer_types = None
        if model is not None:
            layer_types = {n: layer_type_of(m if not isinstance(m, BCALinear) else m.base_layer)
                           for n, m in model.named_modules() if n and (is_adaptable(m) or isinstance(m, BCALinear))}
        return from_peft(data, state, layer_types, source=str(directory))
    return AdapterConfig.from_dict(data, source=str(directory / CONFIG_FILE)), state


def check_adapter_fits(
    config: AdapterConfig, state: dict[str, torch.Tensor], model: nn.Module, source: str = "adapter"
) -> None:
    """Raise :class:`AdapterMismatchError` listing every way ``config``/``state`` do not fit ``model``."""
    problems: list[str] = []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.base_model_type and model_type and config.base_model_type != model_type:
        problems.append(f"base model_type is {config.base_model_type!r} but the model is {model_type!r}")
    for name, spec in sorted(config.modules.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name}: not found in this {type(model).__name__}")
            continue
        base = module.base_layer if isinstance(module, BCALinear) else module
        if not is_adaptable(base):
            problems.append(f"module {name}: is a {type(base).__name__}, expected a Linear or Conv1D")
            continue
        d_in, d_out = layer_dims(base)
        if (d_in, d_out) != (spec.in_features, spec.out_features):
            problems.append(
                f"module {name}: weight {tuple(base.weight.shape)} (in={d_in}, out={d_out}) but the adapter "
                f"was trained on in={spec.in_features}, out={spec.out_features}"
            )
        key = name + KERNEL_SUFFIX
        if key not in state:
            problems.append(f"tensor {key}: missing from {WEIGHTS_FILE}")
        elif tuple(state[key].shape) != spec.kernel_shape:
            problems.append(f"tensor {key}: shape {tuple(state[key].shape)}, expected {spec.kernel_shape}")
    for key, tensor in state.items():
        if key.endswith(KERNEL_SUFFIX):
            if key[: -len(KERNEL_SUFFIX)] not in config.modules:
                problems.append(f"tensor {key}: unexpected (its module is not in the config's 'modules')")
            continue
        module_path, pname = _split_saved_key(key, config.modules_to_save)
        if module_path is None:
            problems.append(f"tensor {key}: unexpected (not a kernel, and not under any of modules_to_save "
                            f"{config.modules_to_save})")
            continue
        try:
            target = model.get_submodule(module_path)
            param = dict(target.named_parameters())[pname]
        except (AttributeError, KeyError):
            problems.append(f"tensor {key}: no such parameter in this {type(model).__name__}")
            continue
        if tuple(param.shape) != tuple(tensor.shape):
            problems.append(f"tensor {key}: shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}")
    if problems:
        raise AdapterMismatchError(format_problems(f"{source} does not fit the model:", problems))


def _split_saved_key(key: str, modules_to_save: list[str]) -> tuple[str | None, str]:
    """('classifier', 'out_proj.weight') for 'classifier.out_proj.weight': the longest saved module owning it."""
    owners = [m for m in modules_to_save if key.startswith(m + ".")]
    if not owners:
        return None, key
    owner = max(owners, key=len)
    return owner, key[len(owner) + 1:]


def align_module_paths(
    config: AdapterConfig, state: dict[str, torch.Tensor], model: nn.Module
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Add or drop the model's ``base_model_prefix`` on every adapter path when that makes them all fit.

    An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0.self_attn.q_proj``; ``LlamaModel``
    calls that module ``layers.0.self_attn.q_proj`` (and the other way round for an adapter trained on a
    bare encoder and loaded into one with a task head). Only an all-or-nothing rename is applied; if
    neither direction makes **every** path resolve, the inputs are returned unchanged and
    :func:`check_adapter_fits` reports the mismatch.
    """
    def exists(path: str) -> bool:
        try:
            model.get_submodule(path)
            return True
        except AttributeError:
            return False

    return align_paths(config, state, getattr(model, "base_model_prefix", "") or "", exists)


def align_paths(
    config: AdapterConfig, state: dict[str, torch.Tensor], prefix: str, exists: Callable[[str], bool]
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """:func:`align_module_paths` against any set of module paths: ``exists(path)`` says if one is known.

    Used where no PyTorch model is at hand (the serving runtime checks adapters against an exported graph).
    """
    paths = list(config.modules) + list(config.modules_to_save)
    if not prefix or not paths or all(exists(p) for p in paths):
        return config, state
    head = prefix + "."
    for rename in (lambda p: p[len(head):] if p.startswith(head) else None, lambda p: head + p):
        renamed = {p: rename(p) for p in paths}
        if all(r is not None and exists(r) for r in renamed.values()):
            break
    else:
        return config, state
    owners = sorted(paths, key=len, reverse=True)  # most specific module first
    new_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(KERNEL_SUFFIX) and key[: -len(KERNEL_SUFFIX)] in renamed:
            new_state[renamed[key[: -len(KERNEL_SUFFIX)]] + KERNEL_SUFFIX] = tensor
            continue
        owner = next((p for p in owners if key.startswith(p + ".")), None)
        new_state[key if owner is None else renamed[owner] + key[len(owner):]] = tensor
    config = dataclasses.replace(
        config,
        modules={renamed[p]: spec for p, spec in config.modules.items()},
        modules_to_save=[renamed[p] for p in config.modules_to_save],
    )
    return config, new_state


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Load a bca-deploy or PEFT C3A adapter directory into ``model`` and return it ready to use.

    Module paths that differ only by the model's ``base_model_prefix`` (an adapter trained on
    ``LlamaForCausalLM`` loaded into ``LlamaModel``, or the reverse) are aligned first. The adapter
    is then checked against the model (model type, module paths, layer shapes, tensor names and shapes); on any mismatch nothing is changed and :class:`AdapterMismatchError` lists
    every problem. PEFT C3A kernels are converted exactly (layout flip, 1/in_features scale).

    Args:
        model: the base model (a fresh transformers model, or one already holding other adapters).
        directory: the adapter directory.
        adapter_name: name to give the adapter in the model.
        is_trainable: keep kernels trainable and the model in train mode; default is inference
            (``model.eval()``, kernels frozen).

    Returns:
        The same ``model``, adapted.
    """
    config, state = align_module_paths(*read_adapter(directory, model), model)
    check_adapter_fits(config, state, model, source=str(directory))
    inject_modules(model, config.modules, adapter_name=adapter_name, init="zeros")
    with torch.no_grad():
        for name, layer in bca_layers(model):
            key = name + KERNEL_SUFFIX
            if key in state and adapter_name in layer.bca_kernels:
                layer.bca_kernels[adapter_name].copy_(state[key].to(torch.float32))
        for key, tensor in state.items():
            if key.endswith(KERNEL_SUFFIX):
                continue
            module_path, pname = _split_saved_key(key, config.modules_to_save)
            param = dict(model.get_submodule(module_path).named_parameters())[pname]
            param.copy_(tensor.to(param.dtype))
    register_adapter(model, adapter_name, config)
    freeze_base(model)
    if is_trainable:
        model.train()
    else:
        for param in model.parameters():
            param.requires_grad = False
        model.eval()
    return model


def convert_adapter(
    source: str | Path,
    destination: str | Path,
    to: str,
    model: nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an adapter directory between the bca-deploy and PEFT C3A formats, file to file.

    Args:
        source: a bca-deploy or PEFT C3A adapter directory.
        destination: the output directory (refused if it holds an adapter, unless ``overwrite``).
        to: ``"bca"`` or ``"peft"``.
        model: optional base model; when given, the adapter is checked against it first and the
            bca-deploy config records its ``model_type``.
        overwrite: replace an existing adapter in ``destination``.
    """
    if to not in ("bca", "peft"):
        raise ValueError(f"to must be 'bca' or 'peft', got {to!r}")
    if Path(source).resolve() == Path(destination).resolve():
        raise ValueError(f"{destination}: the output directory must differ from the source")
    config, state = read_adapter(source, model)
    if model is not None:
        check_adapter_fits(config, state, model, source=str(source))
        config.base_model_type = config.base_model_type or getattr(getattr(model, "config", None), "model_type", None)
    if to == "bca":
        return write_adapter_dir(destination, config.to_dict(), state, overwrite=overwrite)
    peft_config, peft_state = to_peft(config, state)
    return write_adapter_dir(destination, peft_config, peft_state, overwrite=overwrite)
