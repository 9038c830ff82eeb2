"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``; no pickle anywhere.

``load_adapter`` reads bca-deploy directories and PEFT C3A directories alike, checks the adapter
against the model it is loaded into (every missing, unexpected or mis-shaped tensor is reported at
once), and only then changes the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import check_inputs_outside, give_default_mode, write_dir
from .config import (
    CONFIG_FILE,
    KERNEL_SUFFIX,
    TRAINABLE_FILE,
    TRAINING_RECORD_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    PathOwners,
    local_base_dir,
    nested_adapters_hint,
    read_json,
    show_names,
)
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNameError,
    CheckpointFormatError,
    InvalidOptionError,
    NonFiniteError,
    OutputExistsError,
    format_problems,
    require_readable,
    why_not_readable,
)
from .fit import (
    align_paths,
    align_to_target,
    base_weights,
    check_adapter,
    model_target,
    model_type_problem,
    module_problem,
    output_layer_named_otherwise,
    resolve_tied,
    split_base_key,
    split_saved_key,
)
from .inject import (
    _BASE_ATTR,
    _CONFIGS_ATTR,
    _SAVED_ATTR,
    _add_adapters,
    _set_submodule,
    adapter_configs,
    adapter_names,
    add_saved_values,
    apply_head_labels,
    base_weight_keys,
    base_weight_parameter,
    base_weight_value,
    bca_layers,
    check_base_weights,
    check_injectable,
    check_saved_modules,
    freeze_base,
    register_adapter,
    register_base_weights,
    saved_modules,
    saved_value,
)
from .layers import BCALinear, is_adaptable, layer_type_of, require_adapter_name
from .peft_compat import (
    PEFT_KERNEL_SUFFIX,
    format_name,
    from_peft,
    is_peft_config,
    peft_metadata,
    peft_saved_entries,
    peft_saved_module,
    to_peft,
)

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "read_adapter_header",
    "AdapterHeader",
    "declared_size_problems",
    "saved_tensor_limit",
    "largest_tensor_elements",
    "adapter_state",
    "check_adapter_fits",
    "write_adapter_dir",
    "convert_adapter",
    "with_label_names",
    "align_module_paths",
    "align_paths",
    "peft_copied_modules",
    "MAX_ADAPTER_BYTES",
    "INSPECT_MAX_BYTES",
]

#: The largest adapter_model.safetensors read (kernels are small; this bounds memory on hostile input).
MAX_ADAPTER_BYTES = 16 * 1024**3
#: The largest adapter_model.safetensors ``bca-deploy inspect`` reads to check its values (as every reader checks
#: them). A larger one is described from its header alone (names, dtypes, shapes, declared sizes), its values unread:
#: reading a file costs up to ~3x its size in memory, which a command that describes a directory should not spend.
INSPECT_MAX_BYTES = 1 << 30
#: The most bytes one element of an adapter tensor takes (float64, the widest real floating dtype it may have).
_MAX_ITEMSIZE = 8
#: Tensors whose declared size does not fit the config (:func:`declared_size_problems`) are refused from the header,
#: unread, when together they declare more than this; fewer bytes are read, so that every problem of the adapter is
#: reported together (:func:`bca_deploy.fit.adapter_problems`), as for any other malformed adapter.
_UNREAD_MISFIT_BYTES = 16 << 20
#: What one such tensor counts against :data:`_UNREAD_MISFIT_BYTES` however few bytes it declares: reading one costs
#: about this much whatever its size (a tensor object, its name, its problem line), and 240,000 empty tensors the
#: config has no place for (a 16 MB header) took 52.8 s and 711 MB to read and refuse (so 4,096 at most are read).
_MISFIT_READ_COST = 4096
#: Tensors a file may hold under one ``modules_to_save`` entry (a module saved whole: a classifier head holds 2 to 4,
#: a whole decoder layer of a large MoE model a few thousand), and under no entry as base weights beyond the adapted
#: modules' own (resized embeddings). With each adapted module's kernel and base weight and bias, the most tensors an
#: adapter's file may declare (:func:`adapter_tensor_limit`), checked before any per-tensor work.
_TENSORS_PER_SAVED_MODULE = 4096
#: The adapted modules a PEFT C3A config may name where no model says how many layers its target_modules match: more
#: than any model's linear layers (DeepSeek-V3's 61 layers of 256 experts hold ~47,000).
_PEFT_MAX_KERNELS = 1 << 16


def adapter_state(
    model: nn.Module, adapter_name: str = "default", values: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``: ``<path>.bca_kernel`` (fp32) and modules_to_save params.

    ``values``: whole tensors by parameter name, used instead of the model's own parameters where given
    (a training run sharded with FSDP holds only its shards; it gathers them first).

    A module saved whole is saved with this adapter's own values: the model's parameters while they hold them
    (the adapter is the active one that saves it), else the copy kept for the adapter
    (:class:`bca_deploy.inject.SavedModules`), never another adapter's or the base model's. A Parameter saved under
    two names (a tied ``lm_head`` and input embedding, both saved whole) is written under each, as PEFT writes it.

    The base weights the adapter was loaded with (:func:`bca_deploy.fit.split_base_key`: PEFT's
    ``save_embedding_layers`` tensors, ``lm_head.base_layer.weight``) are saved again as base weights, with the base
    model's values (a merge's ΔW left out).
    """
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        raise AdapterNameError(f"model has no adapter named {adapter_name!r}; it has {sorted(adapter_configs(model))}")
    values = values or {}

    def value(name: str, param: torch.Tensor) -> torch.Tensor:
        return values.get(name, param).detach().cpu().contiguous()

    state: dict[str, torch.Tensor] = {}
    for name, layer in bca_layers(model):
        if adapter_name in layer.bca_kernels:
            kernel = value(f"{name}.bca_kernels.{adapter_name}", layer.bca_kernels[adapter_name])
            state[name + KERNEL_SUFFIX] = kernel.float()
    seen: set[int] = set()  # a Parameter saved under two names (tied weights) is written twice, not shared
    for module_path in config.modules_to_save:
        module = model.get_submodule(module_path)
        for pname, param in module.named_parameters():
            name = f"{module_path}.{pname}"
            stored = saved_value(model, adapter_name, name)  # None: the parameter holds this adapter's values
            if stored is not None:
                state[name] = stored.detach().to(dtype=param.dtype, device="cpu").contiguous()
            else:
                state[name] = value(name, param)
            if id(param) in seen:
                state[name] = state[name].clone()  # safetensors refuses tensors that share memory
            seen.add(id(param))
    for key in base_weight_keys(model, adapter_name):
        param = base_weight_parameter(model, key)
        name = next((n for n, p in model.named_parameters(remove_duplicate=False) if p is param), None)
        state[key] = values.get(name, base_weight_value(model, key)).detach().cpu().contiguous()
        if id(param) in seen:
            state[key] = state[key].clone()
        seen.add(id(param))
    return state


def write_adapter_dir(
    directory: str | Path, config_dict: dict[str, Any], state: dict[str, torch.Tensor], overwrite: bool = True,
    metadata: dict[str, str] | None = None, extra_json: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``, atomically.

    ``metadata``: the safetensors file's metadata (default ``{"format": "pt"}``, as transformers and PEFT write).
    ``extra_json``: more JSON files written with them (file name -> object), such as the training record.

    The directory is built beside ``directory`` and swapped in whole (:func:`bca_deploy.atomic.write_dir`),
    so a crash leaves the old adapter or the new one, never a mix; other files already in ``directory``
    are kept.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory}: exists and is not a directory")
    if directory.exists() and not overwrite and any(
        (directory / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)
    ):
        raise OutputExistsError(f"{directory}: already holds an adapter; pass --overwrite (overwrite=True in Python) to replace it")

    def build(tmp: Path) -> None:
        save_safetensors(state, tmp / WEIGHTS_FILE, metadata or {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")

    return write_dir(directory, build, overwrite=True, keep_existing=True)


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    format: str = "bca",
    task_type: str | None = None,
    overwrite: bool = True,
    values: Mapping[str, torch.Tensor] | None = None,
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
        values: whole tensors by parameter name to save instead of the model's own (see :func:`adapter_state`).

    Returns:
        The directory path.
    """
    config = adapter_configs(model).get(adapter_name)
    if config is None:
        raise AdapterNameError(f"model has no adapter named {adapter_name!r}; it has {sorted(adapter_configs(model))}")
    state = adapter_state(model, adapter_name, values)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"tensor {key} has NaN/Inf values; refusing to save a broken adapter")
    if format == "bca":
        return write_adapter_dir(directory, config.to_dict(), state, overwrite=overwrite)
    if format == "peft":
        peft_config, peft_state = to_peft(config, state, task_type=task_type)
        return write_adapter_dir(directory, peft_config, peft_state, overwrite=overwrite, metadata=peft_metadata(config))
    raise AdapterFormatError(f"format must be 'bca' or 'peft', got {format!r}")


def read_adapter(
    directory: str | Path, model: nn.Module | None = None, validate: bool = True, *, max_bytes: int | None = None,
    largest_elements: int | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory (bca-deploy or PEFT C3A) into a config and bca-deploy-keyed tensors.

    Args:
        directory: the adapter directory.
        model: optional model, for the layer types of PEFT adapters' modules.
        validate: check the tensors against the config (:func:`bca_deploy.fit.adapter_problems`: present,
            shapes, real floating dtypes, finite values, nothing unaccounted for). Callers that check the
            adapter against a target next pass False and get every problem from that one check.
        max_bytes: refuse a weights file larger than this before reading it (a server knows how large an
            adapter of its graph can be; a file that declares more, sparse on disk or not, would only be read
            into memory to be refused).
        largest_elements: the element count of the largest tensor of the model the adapter is for (default:
            ``model``'s, when given): a tensor saved whole (``modules_to_save``, a base weight) declared larger
            than :func:`saved_tensor_limit` of it is refused unread.

    The file's header is read first (:func:`read_adapter_header`), and before any tensor data is read, tensors are
    refused whose declared sizes do not fit the file, or do not fit the config (:func:`declared_size_problems`: a
    kernel larger than its module's, a tensor the config has no place for) and declare more than 16 MiB together
    (smaller ones are read, and reported with every other problem).

    Raises:
        AdapterFormatError: a missing or unreadable file, a malformed config (every wrong field listed),
            a corrupt safetensors file, tensors whose declared sizes do not fit it, or (``validate``) unusable
            tensors.
    """
    directory = Path(directory)
    data, weights = _adapter_files(directory)
    size = _weights_size(weights, max_bytes)  # the file's own size first: a file over the bound is refused unread
    header = _read_header(directory, data, weights, size, model, largest_elements)
    state, metadata = _read_tensors(weights, max_bytes)
    if is_peft_config(data):
        config, state = from_peft(data, state, _layer_types(model), source=str(directory), metadata=metadata,
                                  output_named_otherwise=_output_named_otherwise(model))
    else:
        config = header.config
    if validate:
        check_adapter(config, state, None, source=str(directory))
    return config, state


@dataclasses.dataclass(frozen=True)
class AdapterHeader:
    """An adapter directory as its files declare it, none of its tensor data read (what ``bca-deploy inspect``
    describes when the file is too large to read).

    Attributes:
        config: the adapter's config (a PEFT C3A directory's is built from its kernels' declared shapes).
        data: the parsed ``adapter_config.json``.
        weights: the weights file (``adapter_model.safetensors``).
        tensors: every tensor of the file (name, safetensors dtype, shape, declared bytes), in file order.
        metadata: the file's ``__metadata__`` (``{}`` when it has none).
        file_bytes: the file's size (its apparent size: a sparse file counts what it declares).
        shapes: each tensor's shape under its bca-deploy key, as :func:`read_adapter` would key it (a PEFT
            file's names converted).
    """

    config: AdapterConfig
    data: dict[str, Any]
    weights: Path
    tensors: tuple[Any, ...]  # bca_deploy.merge.TensorInfo
    metadata: dict[str, str]
    file_bytes: int
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        """The tensor data the header declares, in bytes."""
        return sum(t.nbytes for t in self.tensors)


def read_adapter_header(directory: str | Path, model: nn.Module | None = None) -> AdapterHeader:
    """Read an adapter directory's config and its weights file's safetensors header, no tensor data.

    The header is checked as every reader checks it (:func:`bca_deploy.merge.read_safetensors_header`: offsets
    contiguous, each tensor's size its shape's, the data section exactly the rest of the file) and against the
    config (:func:`declared_size_problems`; a PEFT C3A config is built from the kernels' shapes and checked by
    :func:`bca_deploy.peft_compat.from_peft`), so a file that declares tensors larger than it holds, or than the
    config gives them room for (by more than ``_UNREAD_MISFIT_BYTES``, 16 MiB: smaller misfits are left to
    :func:`read_adapter`, which reads them and reports them with every other problem), is refused having read a few
    KB: a sparse file declaring GiBs included.

    Args:
        directory: the adapter directory.
        model: optional model, for the layer types of PEFT adapters' modules (and, as in :func:`read_adapter`, the
            bound on tensors saved whole).

    Raises:
        AdapterFormatError: what :func:`read_adapter` raises for the directory, the config or the header, naming
            the file and the tensor.
    """
    directory = Path(directory)
    data, weights = _adapter_files(directory)
    size = _weights_size(weights, limits=False)  # nothing but the header is read
    return _read_header(directory, data, weights, size, model)


def declared_size_problems(config: AdapterConfig, tensors: Iterable[Any]) -> list[str]:
    """The tensors of a bca-deploy adapter file (header entries: ``name``, ``dtype``, ``shape``, ``nbytes``) whose
    declared size does not fit ``config``, one line each naming the tensor, what it declares and what the config
    gives it: a kernel larger than its module's ``(d_out/p, d_in/p, p)`` kernel in float64 (the widest dtype an
    adapter tensor may have), a tensor the config has no place for (a kernel of a module not in ``modules``, a
    tensor under no ``modules_to_save`` entry). A tensor of a module saved whole is not bounded here: its size is
    the model's, which the config does not record.

    Every tensor flagged here is one :func:`bca_deploy.fit.adapter_problems` refuses too, once read; this is the
    part of that rule the header alone decides, so that a file declaring GiBs is refused unread.
    """
    return [problem for _, problem in _misfits(config, tensors)]


def _misfits(config: AdapterConfig, tensors: Iterable[Any]) -> list[tuple[int, str]]:
    """``(declared bytes, problem)`` of each tensor :func:`declared_size_problems` flags, sorted by tensor name."""
    problems = []
    saved = PathOwners(config.modules_to_save)  # looked up, not every entry tested per tensor (split_saved_key)
    unsaved = f"unexpected (not a kernel, and not under any of modules_to_save {show_names(config.modules_to_save)})"
    for t in sorted(tensors, key=lambda t: t.name):
        # the messages are written for a misfit only: for 100,000 tensors that fit they were most of the time
        if t.name.endswith(KERNEL_SUFFIX):
            module = t.name[: -len(KERNEL_SUFFIX)]
            spec = config.modules.get(module)
            if spec is None:
                why = "unexpected (its module is not in the config's 'modules')"
            else:
                room = math.prod(spec.kernel_shape) * _MAX_ITEMSIZE
                if t.nbytes <= room:
                    continue
                why = (f"module {module} has a {spec.kernel_shape} kernel (d_out/p, d_in/p, p for in_features="
                       f"{spec.in_features}, out_features={spec.out_features}, p={spec.block_size}): at most "
                       f"{room:,} bytes, in float64")
        elif split_saved_key(t.name, saved)[0] is None and split_base_key(t.name) is None:
            why = unsaved
        else:
            continue
        # a tensor with no place is flagged however small: an empty one was let through as fitting its room of 0
        declared = f"declares {t.dtype} {list(t.shape)}, {t.nbytes:,} bytes"
        problems.append((t.nbytes, f"tensor {t.name}: {declared}; {why}"))
    return problems


def _adapter_files(directory: Path) -> tuple[dict[str, Any], Path]:
    """The parsed ``adapter_config.json`` of ``directory`` and the path of its weights file (which exists)."""
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: adapter directory not found")
    if not (directory / CONFIG_FILE).exists() and (directory / TRAINABLE_FILE).is_file():
        raise AdapterFormatError(
            f"{directory}: a checkpoint of a --method head-only/custom run (its trainable tensors, no adapter): "
            "bca-deploy evaluate reads it; merge, export, convert and serve need an adapter (train with --method "
            "bca, the default)")
    if not (directory / CONFIG_FILE).exists() and (hint := nested_adapters_hint(directory)):
        raise AdapterFormatError(f"{directory}: no {CONFIG_FILE}{hint}")
    data = read_json(directory / CONFIG_FILE, what="adapter config")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        hint = (" (adapter_model.bin is a pickle; bca-deploy loads safetensors only: save it again where you trust it "
                "with PeftModel.from_pretrained(base, DIR).save_pretrained(OUT), whose default is safetensors)"
                if (directory / "adapter_model.bin").exists() else "")
        what = f"{why_not_readable(weights)}; expected the adapter's weights (safetensors)" if weights.exists() else \
            "no such file"
        raise AdapterFormatError(f"{weights}: {what}{hint}")
    return data, weights


def _layer_types(model: nn.Module | None) -> dict[str, str] | None:
    """``{module path: layer type}`` of ``model``'s adaptable layers, for PEFT configs; None without a model."""
    if model is None:
        return None
    return {n: layer_type_of(m if not isinstance(m, BCALinear) else m.base_layer)
            for n, m in model.named_modules() if n and (is_adaptable(m) or isinstance(m, BCALinear))}


def _output_named_otherwise(model: nn.Module | None) -> str | None:
    """:func:`bca_deploy.fit.output_layer_named_otherwise` of ``model`` (None without a model), for PEFT configs."""
    return None if model is None else output_layer_named_otherwise(model)


def adapter_tensor_limit(data: dict[str, Any], model: nn.Module | None = None) -> tuple[int, str] | None:
    """``(most tensors, why)`` the weights file of an adapter whose ``adapter_config.json`` is ``data`` may declare:
    per adapted module its kernel, base weight and bias (a bca-deploy config lists its modules; a PEFT C3A config's
    target_modules match at most ``model``'s adaptable layers, or :data:`_PEFT_MAX_KERNELS` without one), and
    :data:`_TENSORS_PER_SAVED_MODULE` per ``modules_to_save`` entry and once more for other base weights. None where
    the config is too malformed to say (its own error is reported, by the reader of the config)."""
    saved = data.get("modules_to_save")
    saved = len(saved) if isinstance(saved, list) else 0
    if is_peft_config(data):
        layers = _layer_types(model)
        modules = len(layers) if layers is not None else _PEFT_MAX_KERNELS
        what = f"{modules:,} adaptable layers" if layers is not None else f"{modules:,} adapted modules"
    else:
        modules = data.get("modules")
        if not isinstance(modules, dict):
            return None
        modules = len(modules)
        what = f"{modules:,} adapted modules"
    limit = 3 * modules + _TENSORS_PER_SAVED_MODULE * (saved + 1)
    return limit, f"its config allows ({what}: a kernel, base weight and bias each; {saved:,} modules_to_save: " \
                  f"{_TENSORS_PER_SAVED_MODULE:,} tensors each, and as many other base weights)"


def _read_header(directory: Path, data: dict[str, Any], weights: Path, size: int,
                 model: nn.Module | None, largest_elements: int | None = None) -> AdapterHeader:
    """The config and the header of ``weights`` (``size`` bytes), checked against each other and, with
    ``largest_elements`` (or ``model``), the saved tensors' sizes against the model's (no tensor data read)."""
    from .merge import read_safetensors_header

    try:
        header = read_safetensors_header(weights, max_tensors=adapter_tensor_limit(data, model))
    except CheckpointFormatError as exc:  # the one header rule, as an adapter's error (it names the file)
        raise AdapterFormatError(str(exc)) from None
    if is_peft_config(data):  # from_peft checks shapes and dtypes only, before it converts: meta tensors serve
        meta: dict[str, torch.Tensor] = {}
        for t in header.tensors:
            tensor = t.meta_tensor()
            if tensor is None:
                raise AdapterFormatError(f"{weights}: tensor {t.name}: dtype {t.dtype!r}, which torch has no type for")
            meta[t.name] = tensor
        config, converted = from_peft(data, meta, _layer_types(model), source=str(directory), metadata=header.metadata,
                                      output_named_otherwise=_output_named_otherwise(model))
        shapes = {name: tuple(t.shape) for name, t in converted.items()}
    else:
        config = AdapterConfig.from_dict(data, source=str(directory / CONFIG_FILE))
        misfits = _misfits(config, header.tensors)
        if sum(max(nbytes, _MISFIT_READ_COST) for nbytes, _ in misfits) > _UNREAD_MISFIT_BYTES:
            raise AdapterFormatError(format_problems(
                f"{weights}: tensors whose declared size does not fit the adapter's config "
                f"({directory / CONFIG_FILE}); refused before reading any tensor data:", [p for _, p in misfits]))
        shapes = {t.name: tuple(t.shape) for t in header.tensors}
    if largest_elements is None and model is not None:
        largest_elements = largest_tensor_elements(model)
    if largest_elements is not None:  # after the config's own bounds, which name a misfit more precisely
        _refuse_oversized_saved(weights, header.tensors, largest_elements)
    return AdapterHeader(config, data, weights, tuple(header.tensors), dict(header.metadata or {}), size, shapes)


def saved_tensor_limit(largest_elements: int) -> int:
    """The most elements a tensor saved whole with an adapter (a ``modules_to_save`` copy, a base weight) may declare
    for a model whose largest tensor has ``largest_elements``: it is a copy of one of the model's tensors, at most
    resized (a vocabulary grown by added tokens), so 4 times that plus 2**20 is far beyond any real one, and a
    file declaring more (sparse on disk: 28 KB declaring 900 MB made merge peak at 3 GB) is refused unread."""
    return 4 * largest_elements + 2**20


def largest_tensor_elements(model: nn.Module) -> int:
    """Element count of ``model``'s largest parameter or buffer (for :func:`saved_tensor_limit`)."""
    return max((t.numel() for t in model.state_dict(keep_vars=True).values()), default=0)


def _refuse_oversized_saved(weights: Path, tensors: Iterable[Any], largest_elements: int) -> None:
    limit = saved_tensor_limit(largest_elements)
    over = [t for t in tensors if not t.name.endswith((KERNEL_SUFFIX, PEFT_KERNEL_SUFFIX))
            and math.prod(t.shape) > limit]
    if over:
        raise AdapterFormatError(format_problems(
            f"{weights}: tensors larger than any the model holds (its largest has {largest_elements:,} elements; a "
            f"tensor saved with an adapter is a copy of one, {limit:,} elements at most); refused before reading "
            "any tensor data:",
            [f"tensor {t.name}: declares {t.dtype} {list(t.shape)}, {math.prod(t.shape):,} elements" for t in over]))


def _utf8_path(path: Path) -> bool:
    """Whether safetensors (which takes paths as UTF-8 strings) can open ``path`` by name."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 reaches Python as lone surrogates
        return False
    return True


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its metadata (``{}`` when it has none), under any file name.

    Raises:
        Whatever safetensors raises for a damaged file (callers name the file).
    """
    if _utf8_path(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    from safetensors.torch import load

    from .merge import read_safetensors_header

    metadata = read_safetensors_header(path).metadata or {}
    return load(path.read_bytes()), dict(metadata)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` under any file name (one that is not UTF-8 is written from bytes), with the
    mode any other written file gets (``0o666 & ~umask``; safetensors itself writes 0o600)."""
    if _utf8_path(path):
        save_file(state, str(path), metadata=metadata)
        give_default_mode(path)
        return
    from safetensors.torch import save

    path.write_bytes(save(state, metadata=metadata))


def _weights_size(weights: Path, max_bytes: int | None = None, *, limits: bool = True) -> int:
    """The size of the weights file ``weights``, a regular file this user may read; with ``limits`` (what a reader of
    the tensors needs), one over ``max_bytes`` or :data:`MAX_ADAPTER_BYTES` is refused (unread)."""
    try:
        size = weights.stat().st_size
        require_readable(weights)
    except OSError as exc:
        raise AdapterFormatError(f"{weights}: cannot read ({exc.strerror or exc})") from exc
    if not limits:
        return size
    if size > MAX_ADAPTER_BYTES:
        raise AdapterFormatError(f"{weights}: {size} bytes; adapters over {MAX_ADAPTER_BYTES} bytes are refused")
    if max_bytes is not None and size > max_bytes:
        raise AdapterFormatError(f"{weights}: {size:,} bytes, more than any adapter of this graph holds ({max_bytes:,} "
                                 "bytes at most: every kernel, head tensor and base weight it can use, in float64); refused unread")
    return size


def _read_tensors(weights: Path, max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its metadata (``{}`` when it has none); a file over ``max_bytes``
    (default and at most :data:`MAX_ADAPTER_BYTES`) is refused before it is read."""
    _weights_size(weights, max_bytes)
    try:
        return load_safetensors(weights)
    except Exception as exc:  # safetensors raises its own error types (and OSError) for corrupt files
        raise AdapterFormatError(f"{weights}: cannot read safetensors file ({type(exc).__name__}: {exc})") from exc


def peft_copied_modules(directory: str | Path, modules_to_save: Iterable[str]) -> list[str]:
    """The entries of ``modules_to_save`` (those of the adapter in ``directory``, as read) that the adapter's trainer
    computed with a copy of their own: for a PEFT directory, the modules its ``adapter_config.json`` lists in
    ``modules_to_save`` (PEFT's rule, :func:`bca_deploy.peft_compat.peft_saved_module`), which
    ``PeftModel`` wraps in a ``ModulesToSaveWrapper`` (:func:`bca_deploy.peft_compat.peft_saved_entries`: with the
    heads its ``task_type`` adds); empty for bca-deploy's own format, whose modules saved whole are the model's own
    modules.

    The other tensors of a PEFT directory (its ``save_embedding_layers`` tensors: a resized vocabulary's embeddings,
    an adapted ``lm_head``'s base layer) are base weights, never in ``modules_to_save``
    (:func:`bca_deploy.fit.split_base_key`).
    """
    data = read_json(Path(directory) / CONFIG_FILE, what="adapter config")
    if not is_peft_config(data):
        return []
    entries = peft_saved_entries(data)
    return [m for m in modules_to_save if peft_saved_module(m, entries) is not None]


def check_adapter_fits(
    config: AdapterConfig, state: dict[str, torch.Tensor], model: nn.Module, source: str = "adapter"
) -> None:
    """Raise :class:`AdapterMismatchError` listing every way ``config``/``state`` do not fit ``model``.

    The model's view of :func:`bca_deploy.fit.check_adapter`.
    """
    check_adapter(config, state, model_target(model), source=source)


def align_module_paths(
    config: AdapterConfig, state: dict[str, torch.Tensor], model: nn.Module
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """:func:`bca_deploy.fit.align_paths` against ``model``'s modules and ``base_model_prefix``."""
    return align_to_target(config, state, model_target(model))


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Load a bca-deploy or PEFT C3A adapter directory into ``model`` and return it ready to use.

    Module paths that differ only by the model's ``base_model_prefix`` (an adapter trained on
    ``LlamaForCausalLM`` loaded into ``LlamaModel``, or the reverse) are aligned first. The adapter is
    then checked against the model by :func:`bca_deploy.fit.check_adapter` (model type, module paths,
    layer types and shapes, tensor names, shapes, dtypes and values); on any problem nothing is changed
    and :class:`AdapterMismatchError` lists every one. If anything fails while the adapter is being put
    in (even an interrupt), the model is restored as it was: same modules, weights, trainable flags and
    mode. PEFT C3A kernels are converted exactly (layout flip, 1/in_features scale).

    Base weights (:func:`bca_deploy.fit.split_base_key`: PEFT's ``save_embedding_layers`` tensors, the embeddings of
    a vocabulary resized before training and an adapted ``lm_head``'s ``base_layer.weight``; bca-deploy's files name
    them the same way) are written into the model as ``PeftModel.from_pretrained`` writes them: into the base
    model's own parameters, so they stay with the adapter disabled or removed, and a merge adds ΔW to them (the
    modules saved whole, ``modules_to_save``, are swapped in and out, as PEFT swaps its copies). On a model with
    tied word embeddings the two saved names are one Parameter, which gets the value PEFT leaves in it
    (:func:`bca_deploy.fit.resolve_tied`: ``lm_head``'s) and stays tied; a module PEFT computed with its own, untied
    copy of a tied Parameter is refused, naming it. Base weights another adapter of the model wrote with other
    values, or a module another adapter saves whole, are refused (:func:`bca_deploy.inject.check_base_weights`).

    Args:
        model: the base model (a fresh transformers model, or one already holding other adapters).
        directory: the adapter directory.
        adapter_name: name to give the adapter in the model.
        is_trainable: keep kernels trainable and the model in train mode; default is inference
            (``model.eval()``, kernels frozen).

    Returns:
        The same ``model``, adapted.

    Raises:
        AdapterFormatError: the directory is not a readable adapter.
        AdapterNameError: ``model`` already has an adapter named ``adapter_name``.
        AdapterMismatchError: the adapter does not fit ``model`` (every problem listed).
    """
    require_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise AdapterNameError(f"this {type(model).__name__} already has an adapter named {adapter_name!r}; "
                               "load it under another adapter_name or remove it first")
    read, state = read_adapter(directory, model, validate=False)
    target = model_target(model)
    config, state = align_to_target(read, state, target)
    # Name the format in the message: PEFT fails on bca-deploy's own format with its own error, so users
    # coming from PEFT learn here which format they have (bca-deploy inspect says how to convert it).
    data = read_json(Path(directory) / CONFIG_FILE, what="adapter config")
    kind = format_name(data)
    aligned = dict(zip(read.modules_to_save, config.modules_to_save))
    copied = {aligned[m] for m in peft_copied_modules(directory, read.modules_to_save)}
    # A tied Parameter saved under both its names (PEFT's save_embedding_layers on a tied lm_head): one value.
    config, state, tied_problems = resolve_tied(config, state, target, copied)
    check_adapter(config, state, target, source=f"{kind} {directory}", problems=tied_problems)
    check_injectable(model, config.modules, adapter_name)
    check_saved_modules(model, adapter_name, config.modules_to_save)
    # Base weights (PEFT's save_embedding_layers) go into the base model itself, where they stay with the adapter
    # disabled or unloaded, as PeftModel.from_pretrained loads them.
    based = base_weights(state, config.modules_to_save)
    base_values: dict[str, torch.Tensor] = {}
    for key in based:
        param = base_weight_parameter(model, key)
        base_values[key] = state[key].to(device=param.device, dtype=param.dtype)
    check_base_weights(model, adapter_name, base_values)
    # Everything the model will receive, converted before it changes.
    kernels = {name: state[name + KERNEL_SUFFIX].to(torch.float32) for name in config.modules}
    saved: dict[str, torch.Tensor] = {}  # parameter name -> the adapter's values of it
    params: list[torch.nn.Parameter] = [base_weight_parameter(model, key) for key in base_values]
    for key, tensor in state.items():
        if not key.endswith(KERNEL_SUFFIX) and key not in based:
            module_path, pname = split_saved_key(key, config.modules_to_save)
            param = dict(model.get_submodule(module_path).named_parameters())[pname]
            saved[f"{module_path}.{pname}"] = tensor.to(device=param.device, dtype=param.dtype)
            params.append(param)
    undo = _Undo(model, config.modules, params)
    try:
        _add_adapters(model, config.modules, adapter_name, "zeros", 0.0, None)
        with torch.no_grad():
            for name, layer in bca_layers(model):
                if name in kernels:
                    target_kernel = layer.bca_kernels[adapter_name]
                    target_kernel.copy_(kernels[name].to(target_kernel.device))
            for key, value in base_values.items():  # before add_saved_values takes the base values from the model
                base_weight_parameter(model, key).copy_(value)
        register_adapter(model, adapter_name, config)
        register_base_weights(model, adapter_name, list(base_values))
        # the base values of the saved modules are kept, the adapter's put in their place
        add_saved_values(model, adapter_name, config.modules_to_save, saved)
        freeze_base(model)
        if is_trainable:
            model.train()
        else:
            for param in model.parameters():
                param.requires_grad = False
            record = saved_modules(model)
            if record is not None:  # the saved modules stay frozen whichever adapter's values are put in
                record.frozen = dict.fromkeys(record.frozen, False)
            model.eval()
    except BaseException:
        undo.restore(adapter_name)
        raise
    if config.task is not None and config.task.head is not None:
        # pipelines and config readers name the classes as merge/serve do, while this adapter's head is in place
        apply_head_labels(model, adapter_name, config.task.head)
    return model


class _Undo:
    """What :func:`load_adapter` may change, recorded first so a failure puts the model back as it was."""

    def __init__(self, model: nn.Module, paths: Iterable[str], params: list[torch.nn.Parameter]) -> None:
        self.model = model
        self.registry = model.__dict__.get(_CONFIGS_ATTR)
        self.modules = {path: model.get_submodule(path) for path in paths}
        self.params = [(p, p.detach().clone()) for p in params]
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.training = {name: m.training for name, m in model.named_modules()}
        self.configs = adapter_configs(model)
        record = saved_modules(model)
        self.saved = record.snapshot() if record is not None else None
        self.base_weights = {a: list(k) for a, k in model.__dict__.get(_BASE_ATTR, {}).items()}

    def restore(self, adapter_name: str) -> None:
        for path, module in self.modules.items():
            current = self.model.get_submodule(path)
            if current is not module:
                _set_submodule(self.model, path, module)
            if isinstance(module, BCALinear) and adapter_name in module.bca_kernels:
                module.delete_adapter(adapter_name)
        with torch.no_grad():
            for param, value in self.params:
                param.copy_(value)
        for name, param in self.model.named_parameters():
            if name in self.requires_grad:
                param.requires_grad = self.requires_grad[name]
        for name, module in self.model.named_modules():
            if name in self.training:
                module.training = self.training[name]
        self.model.__dict__[_BASE_ATTR] = self.base_weights
        if self.saved is None:
            self.model.__dict__.pop(_SAVED_ATTR, None)
        else:
            self.model.__dict__[_SAVED_ATTR] = self.saved
        if self.registry is None:
            self.model.__dict__.pop(_CONFIGS_ATTR, None)
        else:
            self.model.__dict__[_CONFIGS_ATTR] = self.registry
            self.registry.clear()
            self.registry.update(self.configs)


def with_label_names(config: AdapterConfig, shapes: Mapping[str, tuple[int, ...]], names: list[str],
                     model_config: Any = None, source: str = "adapter") -> AdapterConfig:
    """``config`` with its seq-cls head's classes named ``names`` (class i is ``names[i]``).

    The head is the one the adapter records, else the label layer it saves whole without a record (a PEFT
    classifier: :func:`bca_deploy.models.saved_label_head`, which needs the base checkpoint's ``model_config``).

    Args:
        config: the adapter's config. shapes: its tensors' shapes (names as in ``config``). names: one per class.
        model_config: the base checkpoint's transformers config. source: the adapter, for messages.

    Raises:
        AdapterMismatchError: not a seq-cls adapter, no classifier saved with it (it uses the checkpoint's, whose
            labels its ``config.json`` names), or as many names as classes not given; names repeated or empty.
        InvalidOptionError: a saved classifier without a head record and no ``model_config`` to locate it.
    """
    from .config import MAX_LABEL_CHARS
    from .fit import model_type_problem
    from .models import saved_label_head

    def refuse(why: str) -> AdapterMismatchError:
        return AdapterMismatchError(f"label names for {source}: {why}")

    model_type = getattr(model_config, "model_type", None)
    if (problem := model_type_problem(config, model_type, "the given base model")) is not None:
        raise refuse(problem)
    task = config.task
    if task is None or task.type != "seq-cls":
        raise refuse(f"the adapter's task is {task.type if task else 'not recorded'}; label names name the classes "
                     "of a seq-cls (sequence classification) adapter's head"
                     + ("" if task else " (a PEFT classifier saved without task_type: add --task-type SEQ_CLS to "
                                        "record it)"))
    problems = []
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        problems.append("every name must be non-empty text")
    elif (odd := [n for n in names if not n.isprintable() or len(n) > MAX_LABEL_CHARS]):
        problems.append(f"names must be printable text of at most {MAX_LABEL_CHARS} characters, got "
                        f"{', '.join(repr(n[:40]) for n in odd[:3])}")
    if (repeated := sorted({n for n in names if names.count(n) > 1})):
        problems.append(f"names must be distinct, repeated: {', '.join(map(repr, repeated))}")
    if problems:
        raise refuse("; ".join(problems))
    head = task.head
    if head is None and config.modules_to_save:
        if model_config is None:
            raise InvalidOptionError(f"label names for {source}: the adapter saves {config.modules_to_save} without "
                                     "recording which is its classifier; give the base model (--model) to find it")
        head = saved_label_head(model_config, config.modules_to_save, shapes)
        if head is None:  # the adapter saves modules, and this model has no label layer among them of their shapes
            raise refuse(f"the given base model ({model_type or 'model_type unknown'}) has no classifier among the "
                         f"modules the adapter saves ({', '.join(config.modules_to_save)}) that their tensors fit: "
                         "give the base model the adapter was trained on")
    if head is None:
        raise refuse("the adapter saves no classifier of its own, so it classifies with the base checkpoint's head; "
                     "name those labels in the checkpoint's config.json (id2label)")
    if len(names) != head.num_labels:
        raise refuse(f"{len(names)} names given, but the adapter's classifier has {head.num_labels} outputs")
    id2label = dict(enumerate(names))
    head = dataclasses.replace(head, id2label=id2label, label2id={n: i for i, n in id2label.items()})
    # the model type is recorded by what checks the adapter against a model (convert with a model, training), not
    # here: a config alone does not tell that the adapter's modules are that model's
    return dataclasses.replace(config, task=dataclasses.replace(task, head=head))


def _recorded_base_config(config: AdapterConfig) -> Any:
    """The transformers config of the base checkpoint an adapter records (``base_model_name_or_path``) when that is a
    local directory with a ``config.json``, as PEFT's ``AutoPeftModel*`` loads it; else None (a hub name: nothing is
    downloaded). Only needed, and only read, to locate a PEFT classifier's label layer for label names."""
    from .models import load_config

    if config.task is None or config.task.head is not None or not config.modules_to_save:
        return None
    recorded = local_base_dir(config.base_model_name_or_path)
    return load_config(recorded) if recorded is not None else None


def describe_recorded_base(config: AdapterConfig) -> str:
    """The base model an adapter records, for ``inspect``, as the commands resolve it (:func:`local_base_dir`): a
    local model directory with its ``model_type`` and architecture read from its ``config.json`` (the adapter's
    recorded type first: PEFT records none), else why the recorded name is not one ("not found", a hub id: nothing
    is downloaded). Never raises: a base that cannot be read is described."""
    import os

    from .config import model_identity
    from .errors import BCAError

    recorded, model_type = config.base_model_name_or_path, config.base_model_type
    if not recorded:
        return f"{model_type or 'unknown'} (no path recorded)"
    base = local_base_dir(recorded)
    if base is not None:
        try:
            found, architecture = model_identity(base)
        except (BCAError, OSError) as exc:
            return f"{model_type or 'unknown'} ({recorded}: a local directory whose config.json cannot be read: {exc})"
        architecture = architecture or "architecture not recorded"
        if model_type and found and found != model_type:
            return (f"{model_type} ({recorded}: a local directory holding a {found} model ({architecture}), not the "
                    "adapter's base: pass its base with --model)")
        return f"{model_type or found or 'unknown'} ({recorded}: local directory, {architecture})"
    try:
        is_dir, exists = os.path.isdir(recorded), os.path.lexists(recorded)
    except (OSError, ValueError):  # a name too long, a NUL byte: not a path of this machine
        is_dir = exists = False
    if is_dir:
        why = "a directory without config.json, not a model directory"
    elif exists:
        why = "not a directory"
    elif os.path.isabs(recorded) or recorded.startswith(("./", "../", "~")):
        why = "not found on this machine"
    else:
        why = "no such local directory: a hub model id? nothing is downloaded"
    return f"{model_type or 'unknown'} ({recorded}: {why}; the commands take the base model with --model)"


def convert_adapter(
    source: str | Path,
    destination: str | Path,
    to: str,
    model: nn.Module | None = None,
    overwrite: bool = False,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    label_names: list[str] | None = None,
    model_config: Any = None,
    layers: nn.Module | None = None,
) -> Path:
    """Convert an adapter directory between the bca-deploy and PEFT C3A formats, file to file.

    Args:
        source: a bca-deploy or PEFT C3A adapter directory.
        destination: the output directory (refused if it holds an adapter, unless ``overwrite``).
        to: ``"bca"`` or ``"peft"``.
        model: optional base model; when given, the adapter is checked against it first and the
            bca-deploy config records its ``model_type``.
        overwrite: replace an existing adapter in ``destination``.
        task_type: PEFT's ``task_type`` (``SEQ_CLS``...): recorded as the adapter's task when it records none (a PEFT
            adapter saved without one; :func:`bca_deploy.peft_compat.with_task_type`), refused when it contradicts
            the recorded one; for ``to="peft"`` also written as PEFT's (default: from the recorded task).
        base_model_name_or_path: for ``to="peft"``: see :func:`bca_deploy.peft_compat.to_peft` (default: the
            adapter's recorded base model).
        label_names: the names of a seq-cls adapter's classes 0..K-1, recorded in the written adapter (both
            formats: a PEFT copy carries the record in its safetensors metadata), which ``merge``, ``export``
            and ``serve`` then use. PEFT saves no label names, so its classifiers are otherwise named as the base
            checkpoint names them, or ``LABEL_<i>``. See :func:`with_label_names`.
        model_config: the base checkpoint's config (``model``'s when given): where a PEFT classifier's label layer
            is, for ``label_names`` when the adapter records no head (default: the config of the checkpoint the
            adapter records as ``base_model_name_or_path``, when that is a local directory).
        layers: without ``model``, the base checkpoint's architecture (:func:`bca_deploy.models.meta_model`: on the
            meta device is enough): a PEFT adapter's config is checked against its layers as loading checks it
            (a module its rules adapt without a kernel in the file is refused: PEFT would draw a random one), and
            nothing else changes. Without either, the file's kernels are all there is to check.
    """
    if to not in ("bca", "peft"):
        raise AdapterFormatError(f"to must be 'bca' or 'peft', got {to!r}")
    check_inputs_outside(destination, [("the source adapter", source)])
    if model_config is None:
        model_config = getattr(model, "config", None)
    from .peft_compat import PEFT_TASK_TYPES, with_task_type

    def with_task(config: AdapterConfig) -> AdapterConfig:
        # a PEFT-only task_type (TOKEN_CLS...) is PEFT's to write (to="peft"); bca-deploy records it for no task
        return config if to == "peft" and task_type not in PEFT_TASK_TYPES.values() else \
            with_task_type(config, task_type)

    if label_names is not None:  # checked from the header first: a wrong count is refused before the tensors are read
        header = read_adapter_header(source)
        header_config = with_task(header.config)
        if model_config is None:
            model_config = _recorded_base_config(header_config)
        with_label_names(header_config, header.shapes, label_names, model_config, str(source))
    config, state = read_adapter(source, model if model is not None else layers, validate=model is None)
    if model is None and layers is not None:
        # checked against layers that are the adapter's at all: a model without its modules matches no rule, and
        # the check would pass having checked nothing
        target = model_target(layers)
        # another model type first: a PEFT adapter of a BERT fits a RoBERTa's layers by name and shape
        if (problem := model_type_problem(config, target.model_type, f"the base model checked against "
                                          f"({type(layers).__name__})")) is not None:
            raise AdapterMismatchError(f"{source}: {problem}")
        aligned, _ = align_to_target(config, state, target)
        absent = sorted(m for m in aligned.modules if m not in target.modules)
        if absent:
            raise AdapterMismatchError(
                f"{source}: the base model checked against ({type(layers).__name__}) lacks module(s) the adapter "
                f"adapts: {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}; not the model it was trained on")
        # each kernel of its module's shape, as loading checks it (the output said "checked against the layers" of a
        # model whose Linear(32 -> 32) the kernel of a (32 -> 64) weight was written for)
        misfits = [p for m, spec in sorted(aligned.modules.items())
                   if (p := module_problem(m, spec, target.modules[m], f"the base model checked against "
                                           f"({type(layers).__name__})")) is not None]
        if misfits:
            raise AdapterMismatchError(format_problems(f"{source} does not fit the base model checked against:",
                                                       misfits))
    config = with_task(config)
    if label_names is not None:
        config = with_label_names(config, {k: tuple(v.shape) for k, v in state.items()}, label_names, model_config,
                                  str(source))
    if model is not None:
        target = model_target(model)
        aligned, aligned_state = align_to_target(config, state, target)
        renamed = dict(zip(config.modules_to_save, aligned.modules_to_save))
        copied = {renamed[m] for m in peft_copied_modules(source, config.modules_to_save)}
        _, _, tied_problems = resolve_tied(aligned, aligned_state, target, copied)
        check_adapter(aligned, aligned_state, target, source=str(source), problems=tied_problems)
        config, state = aligned, aligned_state
        config.base_model_type = config.base_model_type or getattr(getattr(model, "config", None), "model_type", None)
    extra = _carried_training_record(Path(source), config)
    if to == "bca":
        return write_adapter_dir(destination, config.to_dict(), state, overwrite=overwrite, extra_json=extra)
    peft_config, peft_state = to_peft(config, state, task_type, base_model_name_or_path)
    return write_adapter_dir(destination, peft_config, peft_state, overwrite=overwrite, metadata=peft_metadata(config),
                             extra_json=extra)


def _carried_training_record(source: Path, config: AdapterConfig) -> dict[str, dict[str, Any]]:
    """``{TRAINING_RECORD_FILE: record}`` when ``source`` is a checkpoint ``train`` wrote, for the converted copy:
    ``evaluate`` reads the columns, max length and how the training file named its classes from it (without it, a
    held-out file of class ids is not checked against training names numbered in sorted order). Class names given
    to the conversion replace the recorded ones. Empty when there is none, or it does not read (then the copy is
    evaluated as any adapter from elsewhere)."""
    path = source / TRAINING_RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = read_json(path, what="training record")
    except AdapterFormatError:
        return {}
    head = config.task.head if config.task is not None else None
    if head is not None and isinstance(record.get("label_names"), list):
        record["label_names"] = [head.id2label[i] for i in range(head.num_labels)]
    return {TRAINING_RECORD_FILE: record}
