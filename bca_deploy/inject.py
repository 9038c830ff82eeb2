"""Find target modules in a model and wrap them in :class:`BCALinear`; enable, disable, remove.

Every check (pattern matched nothing, wrong layer type, block size that does not divide) runs over
all targets before the model is touched, so a refused call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, ModuleSpec, block_size_for, pattern_key_matches
from .errors import (
    AdapterMismatchError,
    AdapterNameError,
    BlockSizeError,
    InvalidOptionError,
    TargetModuleError,
    format_problems,
)
from .layers import (
    BASE_ADAPTER,
    BCALinear,
    RowAdapters,
    block_size_message,
    is_adaptable,
    layer_dims,
    layer_type_of,
    require_adapter_name,
)

__all__ = [
    "inject",
    "inject_modules",
    "check_injectable",
    "match_target_modules",
    "ALL_LINEAR",
    "all_linear_targets",
    "is_all_linear",
    "bca_layers",
    "adapter_configs",
    "set_adapter",
    "enable_adapters",
    "disable_adapters",
    "adapters_disabled",
    "remove_adapters",
    "trainable_parameters",
    "mixed_adapters",
    "adapter_names",
    "check_saved_modules",
    "shared_weight_layers",
    "SavedModules",
    "saved_modules",
    "add_saved_values",
    "saved_value",
    "base_weight_keys",
    "base_weight_parameter",
    "base_weight_value",
    "check_base_weights",
    "register_base_weights",
    "apply_head_labels",
    "unmatched_targets",
    "fused_targets",
    "UnmatchedTargetsWarning",
]

_CONFIGS_ATTR = "bca_adapter_configs"


#: PEFT's shorthand for every Linear (and Conv1D) layer but the output layer: ``target_modules="all-linear"``.
ALL_LINEAR = "all-linear"


def is_all_linear(target_modules: Sequence[str] | str | None) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` (as a string, or alone in a list: ``--targets
    all-linear``)."""
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR
    return target_modules is not None and list(target_modules) == [ALL_LINEAR]


def all_linear_targets(model: nn.Module, modules_to_save: Sequence[str] = ()) -> list[str]:
    """The paths ``"all-linear"`` adapts, in model order: every Linear/Conv1D layer, as PEFT selects them, except the
    model's output layer (``get_output_embeddings()``: ``lm_head``), a task head beside the base model (top-level
    ``classifier``, ``score``, ``pre_classifier``: :data:`bca_deploy.fit.HEAD_MODULES`; trained whole, not adapted)
    and what lies inside ``modules_to_save`` (saved whole)."""
    from .fit import HEAD_MODULES

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    saved = _resolve_modules_to_save(model, modules_to_save) if modules_to_save else []
    paths = []
    for name, module in model.named_modules():
        if not name or isinstance(_parent_module(model, name), BCALinear) or not is_adaptable(_base_of(module)):
            continue
        if module is output or name.split(".")[0] in HEAD_MODULES:
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        paths.append(name)
    return paths


def _matches(name: str, target_modules: Sequence[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _entries(target_modules: Sequence[str] | str) -> dict[str, Sequence[str] | str]:
    """Each entry of ``target_modules`` -> what selects the paths it names (:func:`_matches`): a list's entries one by
    one, a regex string as itself."""
    if isinstance(target_modules, str):
        return {target_modules: target_modules}
    return {t: [t] for t in target_modules}


class UnmatchedTargetsWarning(UserWarning):
    """Entries of a target list matched no layer beside others that did, or name per-expert Linears the installed
    transformers fuses (:func:`unmatched_targets`)."""


def fused_targets(model: nn.Module, target_modules: Sequence[str] | str) -> tuple[list[str], str | None]:
    """The entries of ``target_modules`` (the regex itself, for a string) that name per-expert Linears transformers
    5.x fuses into 3-D parameters in ``model`` (Mixtral's ``w1``/``w2``, Qwen2-MoE's ``gate_proj``/``up_proj``/
    ``down_proj``: :func:`bca_deploy.fit.fused_expert_modules`, 4.x's names), with why no adapter applies to them
    (:func:`bca_deploy.fit.fused_experts_reason`); ``([], None)`` on transformers 4.x, where each expert is a Linear
    the entries select. One rule for :func:`unmatched_targets` and :func:`match_target_modules`' refusal."""
    from .fit import fused_expert_modules, fused_experts_reason

    experts = fused_expert_modules(model)
    if not experts:
        return [], None
    entries = _entries(target_modules)
    fused = {t: [p for path, p in experts.items() if _matches(path, entries[t])] for t in entries}
    named = [t for t in entries if fused[t]]
    if not named:
        return [], None
    import transformers

    return named, fused_experts_reason(type(model).__name__, transformers.__version__,
                                       [p for t in named for p in fused[t]])


def unmatched_targets(model: nn.Module, target_modules: Sequence[str] | str, matched: Sequence[str],
                      option: str = "target_modules") -> str | None:
    """What to say of ``target_modules`` adapting less than asked while it adapts something (``matched``, the adapted
    paths), or None. Neither is an error (PEFT adapts the same modules without a word):

    * entries of a list that select none of ``matched`` while others do;
    * entries (or the regex) naming per-expert Linears that transformers 5.x fuses into 3-D parameters
      (:func:`fused_targets`), whether or not they selected other layers: Qwen2-MoE's ``gate_proj`` adapts its shared
      expert's Linears and dense layers' on 5.x, every routed expert's as well on 4.x, so the same targets train
      another adapter on each line (the adapter applies alike on both: it records the paths it adapts).

    The one wording of :func:`inject`'s warning and of ``train``'s note (``option`` names the entries as the caller
    took them: ``target_modules``, ``--targets``)."""
    if not matched:
        return None
    entries = _entries(target_modules)
    unmatched = [] if isinstance(target_modules, str) else [
        t for t in target_modules if not any(_matches(n, [t]) for n in matched)]
    named, reason = fused_targets(model, target_modules)
    partial = [t for t in named if t not in unmatched]
    cls = type(model).__name__
    said = []
    if unmatched:
        message = (f"{option} {', '.join(unmatched)} matched no Linear/Conv1D layer of {cls}; adapting {len(matched)} "
                   "layers matched by the others")
        if fused := [t for t in named if t in unmatched]:
            message += f". {', '.join(fused)}: {reason}; adapt them with transformers 4.x, or target other modules"
        said.append(message)
    if partial:
        hit = [n for n in matched if any(_matches(n, entries[t]) for t in partial)]
        longer = ", ".join(dict.fromkeys(".".join(n.split(".")[-2:]) for n in hit))
        said.append(f"{option} {', '.join(partial)} adapted {len(hit)} layer{'s' * (len(hit) != 1)} of {cls} "
                    f"({', '.join(hit[:2])}{', ...' if len(hit) > 2 else ''}) and none of its routed experts: {reason}; "
                    f"transformers 4.x adapts every expert's Linear as well for the same {option}. To adapt these "
                    f"layers alone, name them by paths no expert's ends with ({longer}); to adapt the experts, use "
                    "transformers 4.x")
    return ". ".join(said) or None


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, BCALinear) else module


def match_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Paths of the modules selected by ``target_modules``, in model order.

    A list selects modules whose path equals an entry or ends with ``"." + entry`` (``"query"``
    selects every ``...attention.self.query``); a string is a regex that must match the whole path.

    Raises:
        TargetModuleError: nothing matched (the message lists the adaptable modules), or a match
            is not a Linear/Conv1D.
    """
    if not target_modules:
        raise TargetModuleError("target_modules is empty: name the modules to adapt, e.g. ['query', 'value']")
    names, problems = [], []
    for name, module in model.named_modules():
        if isinstance(_parent_module(model, name), BCALinear):
            continue  # the wrapped base layer itself
        if not name or not _matches(name, target_modules):
            continue
        if not is_adaptable(_base_of(module)):
            problems.append(
                f"{name} is a {type(module).__name__}, not a Linear or Conv1D; narrow target_modules"
            )
            continue
        names.append(name)
    if problems:
        raise TargetModuleError(format_problems("target_modules selected modules that cannot be adapted:", problems))
    if not names:
        paths = [n for n, m in model.named_modules() if n and is_adaptable(m)]
        adaptable = sorted({n.rsplit(".", 1)[-1] for n in paths})
        named, reason = fused_targets(model, target_modules)
        raise TargetModuleError(
            f"target_modules {target_modules!r} matched no module of this {type(model).__name__}; "
            f"its Linear/Conv1D module names are: {', '.join(adaptable) or '(none)'}"
            + (f". {', '.join(named)}: {reason}; adapt the experts with transformers 4.x, or target other modules"
               if named else "")
            + (_regex_hint(target_modules, paths) if isinstance(target_modules, str) else "")
        )
    return names


def _regex_hint(pattern: str, paths: Sequence[str]) -> str:
    """Why a regex string matched nothing: it must match a module's whole path (PEFT's rule), so ``'query'``, which
    the list of names beside it seems to allow, matches no path; an example path and the two ways to write it."""
    if not paths:
        return ""
    path = next((p for p in paths if p.rsplit(".", 1)[-1] in pattern), paths[0])
    leaf = path.rsplit(".", 1)[-1]
    return (f". A string is a regular expression matched against each module's whole path (as PEFT matches it), "
            f"such as '{path}': write r'.*\\.{leaf}' to match the paths ending in .{leaf}, or pass a list "
            f"(['{leaf}']) to match path endings")


def _parent_module(model: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return None
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_injectable(model: nn.Module, specs: dict[str, ModuleSpec], adapter_name: str = "default") -> None:
    """Raise if any module in ``specs`` is missing, of the wrong type or shape, or refuses its block size.

    The module rules are :func:`bca_deploy.fit.module_problem`'s (the one fit check). Every problem is
    collected and reported in one error; the model is not touched.
    """
    from .fit import model_target, module_problem

    require_adapter_name(adapter_name)
    target = model_target(model)
    problems: list[str] = []
    block_problems: list[str] = []
    for name, spec in specs.items():
        problem = module_problem(name, spec, target.modules.get(name), target.description)
        if problem is not None:
            problems.append(problem)
            continue
        module = model.get_submodule(name)
        if isinstance(module, BCALinear) and adapter_name in module.bca_kernels:
            problems.append(f"{name}: already has an adapter named {adapter_name!r}")
            continue
        p = spec.block_size
        if not isinstance(p, int) or p < 1 or spec.in_features % p or spec.out_features % p:
            block_problems.append(block_size_message(name, spec.in_features, spec.out_features, p))
    if problems:
        raise TargetModuleError(format_problems("cannot inject BCA adapters:", problems + block_problems))
    if block_problems:
        raise BlockSizeError(format_problems("block size does not fit:", block_problems))


def inject_modules(
    model: nn.Module,
    specs: dict[str, ModuleSpec],
    adapter_name: str = "default",
    init: str = "zeros",
    init_std: float = 0.02,
    seed: int | None = None,
) -> None:
    """Wrap each module path in ``specs`` (if not already) and add adapter ``adapter_name``.

    All paths, layer types, shapes and block sizes are checked (:func:`check_injectable`) before
    the model changes.
    """
    check_injectable(model, specs, adapter_name)
    _add_adapters(model, specs, adapter_name, init, init_std, seed)


def _add_adapters(
    model: nn.Module, specs: dict[str, ModuleSpec], adapter_name: str, init: str, init_std: float, seed: int | None
) -> None:
    """Wrap and add, for specs already passed by :func:`check_injectable`."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    for name in sorted(specs):
        module = model.get_submodule(name)
        if not isinstance(module, BCALinear):
            module = BCALinear(module, name=name)
            _set_submodule(model, name, module)
        spec = specs[name]
        module.add_adapter(adapter_name, spec.block_size, spec.scaling, init=init, init_std=init_std,
                           generator=generator)


def inject(
    model: nn.Module,
    target_modules: Sequence[str] | str,
    block_size: int = 64,
    block_size_pattern: dict[str, int] | None = None,
    scaling: float = 1.0,
    init: str = "zeros",
    init_std: float = 0.02,
    adapter_name: str = "default",
    seed: int | None = None,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """Add a block-circulant adapter to the selected Linear/Conv1D modules of ``model`` (in place).

    The base model's parameters are frozen (``requires_grad=False``); only the new kernels and the
    parameters of ``modules_to_save`` (e.g. a classification head) are trainable.

    Args:
        model: any ``nn.Module``, typically a transformers model.
        target_modules: module names matched as path suffixes (``["query", "value"]``), one regex
            matched against the full path (``r".*\\.(q|v)_proj"``), or PEFT's ``"all-linear"`` (every Linear/Conv1D
            layer but the output layer and the task head: :func:`all_linear_targets`).
        block_size: p, the circulant block size; must divide d_in and d_out of every target.
        block_size_pattern: per-module overrides ``{name or regex: p}`` (PEFT C3A semantics).
        scaling: ΔW = scaling · BlockCirculant(w).
        init: ``zeros`` (default; the adapted model equals the base exactly), ``normal``,
            ``xavier_uniform`` or ``kaiming_uniform``.
        init_std: std for ``init="normal"``.
        adapter_name: name of the adapter (a layer can hold several).
        seed: seed for non-zero inits (kernels are drawn in sorted module order).
        modules_to_save: module paths (or suffixes) trained and saved whole beside the adapter. The adapter's
            copy starts from the model's values, which are kept as the base model's: they are in place again
            while adapters are disabled or the active adapter saves no such module (as PEFT; see
            :class:`SavedModules`).

    Returns:
        The same ``model``, adapted.

    Warns:
        UnmatchedTargetsWarning: entries of a ``target_modules`` list matched nothing beside others that did, or
            entries name per-expert Linears transformers 5.x fuses (:func:`unmatched_targets`: Mixtral's ``w1``/``w2``;
            Qwen2-MoE's ``gate_proj``, which adapts the shared expert alone there, every expert on 4.x).

    Raises:
        TargetModuleError: a pattern matched nothing or matched a non-Linear module.
        BlockSizeError: p does not divide a target (the message lists valid sizes per module).
    """
    pattern = dict(block_size_pattern or {})
    if is_all_linear(target_modules):
        target_modules = ALL_LINEAR  # recorded as given; the paths it selects are the adapter's modules
        names = all_linear_targets(model, modules_to_save)
        if not names:
            raise TargetModuleError(f"target_modules {ALL_LINEAR!r} selected no Linear/Conv1D layer of "
                                    f"{type(model).__name__} (its output layer and task head are left out)")
    else:
        names = match_target_modules(model, target_modules)
        if (note := unmatched_targets(model, target_modules, names)) is not None:
            warnings.warn(note, UnmatchedTargetsWarning, stacklevel=2)
    _check_pattern(pattern, names)
    specs = {}
    for name in names:
        d_in, d_out = layer_dims(_base_of(model.get_submodule(name)))
        specs[name] = ModuleSpec(
            block_size=block_size_for(name, block_size, pattern),
            scaling=float(scaling),
            in_features=d_in,
            out_features=d_out,
            layer_type=layer_type_of(_base_of(model.get_submodule(name))),
        )
    check_injectable(model, specs, adapter_name)
    save_paths = _resolve_modules_to_save(model, modules_to_save)
    check_saved_modules(model, adapter_name, save_paths)
    config = AdapterConfig(
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        block_size=block_size,
        block_size_pattern=pattern,
        scaling=float(scaling),
        init=init,
        modules=specs,
        modules_to_save=save_paths,
        base_model_type=getattr(getattr(model, "config", None), "model_type", None),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    _add_adapters(model, specs, adapter_name, init, init_std, seed)  # specs checked above
    register_adapter(model, adapter_name, config)
    add_saved_values(model, adapter_name, save_paths)  # the adapter's copy starts from the base values
    freeze_base(model)
    return model


def _check_pattern(pattern: dict[str, int], names: Sequence[str]) -> None:
    """Refuse ``block_size_pattern`` keys that are not regular expressions or select none of the targeted
    modules (a typo would otherwise train every module at the default size, silently)."""
    problems = []
    for key in pattern:
        try:
            if not any(pattern_key_matches(key, name) for name in names):
                problems.append(f"block_size_pattern key {key[:80]!r} matches none of the {len(names)} targeted "
                                f"modules (e.g. {names[0]!r}); a key is a module path or a regex matching its end")
        except re.error as exc:
            problems.append(f"block_size_pattern key {key[:80]!r} is not a valid regular expression ({exc.msg})")
    if problems:
        raise TargetModuleError(format_problems("invalid block_size_pattern:", problems))


def _resolve_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for entry in modules_to_save:
        found = [n for n, _ in model.named_modules() if n and (n == entry or n.endswith("." + entry))]
        found = [n for n in found if not isinstance(_parent_module(model, n), BCALinear)]
        if not found:
            raise TargetModuleError(f"modules_to_save entry {entry!r} matched no module of this {type(model).__name__}")
        paths.extend(n for n in found if n not in paths)
    # A module whose weights are another's (an lm_head tied to the input embeddings): the model lists the shared
    # parameter under the other name only, so it was never made trainable and saved the base values: refused.
    owner = {id(param): name for name, param in model.named_parameters()}
    for path in paths:
        for pname, param in model.get_submodule(path).named_parameters():
            shared = owner.get(id(param), f"{path}.{pname}")
            if not shared.startswith(tuple(p + "." for p in paths)):
                module = shared.rsplit(".", 1)[0]
                raise TargetModuleError(
                    f"modules_to_save entry {path!r}: its {pname} is the parameter {shared!r} (tied: the config's "
                    f"tie_word_embeddings), so it cannot be trained and saved alone; save {module!r} instead (the "
                    f"tied {path} follows it), or adapt {path!r} with a kernel (target_modules)")
    return paths


def register_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    """Remember ``config`` on the model so :func:`save_adapter` can write it later.

    Raises:
        AdapterMismatchError: ``config`` saves a module whole that another adapter of ``model`` saves too
            (:func:`check_saved_modules`); :func:`load_adapter` then puts the model back as it was.
    """
    check_saved_modules(model, adapter_name, config.modules_to_save)
    configs = model.__dict__.setdefault(_CONFIGS_ATTR, {})
    configs[adapter_name] = config


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _shares_parameters(model: nn.Module, a: str, b: str) -> bool:
    """Whether modules ``a`` and ``b`` of ``model`` hold a Parameter in common (a tied ``lm_head`` and the input
    embedding: one Parameter under two names); False where either path names no module."""
    try:
        mine = {id(p) for p in model.get_submodule(a).parameters()}
        return any(id(p) in mine for p in model.get_submodule(b).parameters())
    except AttributeError:
        return False


def check_saved_modules(model: nn.Module, adapter_name: str, modules_to_save: Sequence[str]) -> None:
    """Refuse an adapter that saves a module whole (``modules_to_save``, e.g. a classifier head) that another
    adapter of ``model`` already saves: a model holds one copy of that module, so the second adapter's values
    would replace the first's, and the first (``set_adapter``, ``save_adapter``) would silently compute with,
    and save, the second's head. PEFT keeps one copy per adapter; here each such adapter needs its own model.
    Modules whose parameters are one (tied weights: ``lm_head`` and ``model.embed_tokens``) are the same copy.

    Raises:
        AdapterMismatchError: naming both adapters and the module, in one line.
    """
    for other, config in adapter_configs(model).items():
        if other == adapter_name:
            continue
        for mine in modules_to_save:
            clash = next((theirs for theirs in config.modules_to_save
                          if _overlaps(mine, theirs) or _shares_parameters(model, mine, theirs)), None)
            if clash is not None:
                raise AdapterMismatchError(
                    f"adapter {adapter_name!r} saves module {mine} whole, and adapter {other!r} of this "
                    f"{type(model).__name__} saves {clash}: a model holds one copy of it, so {other!r} would "
                    f"run and save with {adapter_name!r}'s; load {adapter_name!r} into its own copy of the base "
                    f"model (or remove_adapters first)"
                )


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The :class:`AdapterConfig` of every adapter injected into ``model``, by adapter name."""
    return dict(model.__dict__.get(_CONFIGS_ATTR, {}))


def freeze_base(model: nn.Module) -> None:
    """Freeze everything but BCA kernels and the parameters of each adapter's ``modules_to_save``."""
    trainable_prefixes = tuple(
        p + "." for cfg in adapter_configs(model).values() for p in cfg.modules_to_save
    )
    record = saved_modules(model)
    for name, param in model.named_parameters():
        trainable = ".bca_kernels." in f".{name}" or name.startswith(trainable_prefixes)
        if record is not None and name in record.base and name not in record.live:
            # the base values are in place (no active adapter saves it): frozen, as PEFT's original module;
            # the flag is given back when an adapter's values are put in
            record.frozen[name] = trainable
            trainable = False
        param.requires_grad = trainable


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter kernel parameters that require grad, all other trainable parameters)."""
    kernels = other = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".bca_kernels." in f".{name}":
            kernels += param.numel()
        else:
            other += param.numel()
    return kernels, other


def bca_layers(model: nn.Module) -> Iterator[tuple[str, BCALinear]]:
    """(path, layer) for every :class:`BCALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BCALinear):
            yield name, module


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s) on every layer that has them (others deactivated).

    A module saved whole (``modules_to_save``) gets the values of the active adapter that saves it, or the base
    model's when none does (as PEFT). Two active adapters saving the same module are refused.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {known}")
    record = saved_modules(model)
    owner = record.owners_for(wanted) if record is not None else {}  # raises before anything changes
    for _, layer in bca_layers(model):
        layer.set_active_adapters([n for n in wanted if n in layer.bca_kernels])
    if record is not None:
        record.owner = owner
        _sync_saved(model)


def disable_adapters(model: nn.Module) -> None:
    """Make every adapted layer compute the base layer only (kernels are kept), and every module saved whole
    hold the base model's values (each adapter's own are kept)."""
    for _, layer in bca_layers(model):
        layer.adapters_disabled = True
    _set_disabled(model, True)


def enable_adapters(model: nn.Module) -> None:
    """Undo :func:`disable_adapters`: the active adapters' kernels and saved modules are in use again."""
    for _, layer in bca_layers(model):
        layer.adapters_disabled = False
    _set_disabled(model, False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model): base_out = model(x)``; restores the previous state."""
    previous = {name: layer.adapters_disabled for name, layer in bca_layers(model)}
    record = saved_modules(model)
    was_disabled = record.disabled if record is not None else False
    disable_adapters(model)
    try:
        yield model
    finally:
        for name, layer in bca_layers(model):
            layer.adapters_disabled = previous.get(name, False)
        _set_disabled(model, was_disabled)


def _set_disabled(model: nn.Module, disabled: bool) -> None:
    record = saved_modules(model)
    if record is not None:
        record.disabled = disabled
        _sync_saved(model)


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Unwrap every :class:`BCALinear` back to its base layer, optionally merging active adapters first.

    With ``merge=True`` this is "merge and unload": the result is a plain model whose weights carry
    the adapters. Without it, the base weights are restored (unmerged) and the adapters dropped.
    A layer whose weight is shared with another module (a tied ``lm_head``) is untied when merged, and
    the config's ``tie_word_embeddings`` set to False (see :func:`untie_for_merge`).

    A module saved whole (``modules_to_save``) keeps the active adapter's values with ``merge=True`` (they are
    part of the merged model) and gets the base model's back without it.
    """
    layers = list(bca_layers(model))
    tied = shared_weight_layers(model, layers) if merge else {}
    for name, layer in layers:
        if merge:
            layer.merge(keep_original=False, untie=name in tied)
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if merge:
        mark_untied(model, [layer for _, layer in layers])
    else:
        restore_tie_config(model, [])
    _unload_saved(model, merge)
    labels = model.__dict__.pop(_LABELS_ATTR, None)
    if labels is not None and not merge:  # the base model's head is back: so are its labels
        _set_labels(model, labels["base"])
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_BASE_ATTR, None)  # base weights stay in the base model, as PEFT's unload leaves them
    model.__dict__.pop(_TIE_ATTR, None)  # the layers are gone: nothing can be tied back any more
    model.__dict__.pop(_SAVED_ATTR, None)
    return model


# ---- class names of a loaded head ----------------------------------------------------------------------

_LABELS_ATTR = "bca_head_labels"  # {"base": the model's own, "adapters": {name: its head's}}
_LABEL_FIELDS = ("id2label", "label2id", "problem_type")


def apply_head_labels(model: nn.Module, adapter_name: str, head: Any) -> None:
    """Record adapter ``adapter_name``'s head labels (a :class:`~bca_deploy.config.HeadSpec`, loaded with it): while
    its head is the one in place (:func:`set_adapter`, not disabled), ``model.config`` names the classes as it does
    (``id2label``, ``label2id``, ``problem_type``: what transformers' pipelines show), else as the model's own, which
    :func:`remove_adapters` without merging puts back."""
    config = getattr(model, "config", None)
    if config is None or head is None:
        return
    record = model.__dict__.setdefault(_LABELS_ATTR, {
        "base": {key: copy.deepcopy(getattr(config, key, None)) for key in _LABEL_FIELDS}, "adapters": {}})
    record["adapters"][adapter_name] = {"id2label": {int(i): n for i, n in head.id2label.items()},
                                        "label2id": {n: int(i) for n, i in head.label2id.items()},
                                        "problem_type": head.problem_type}
    _sync_labels(model)


def _sync_labels(model: nn.Module) -> None:
    """``model.config``'s class names: those of the adapter whose saved head is in place, else the model's own."""
    record = model.__dict__.get(_LABELS_ATTR)
    if record is None:
        return
    saved = saved_modules(model)
    live = set(saved.live.values()) if saved is not None else set()
    owner = next((name for name in record["adapters"] if name in live), None)
    labels = record["base"] if owner is None else record["adapters"][owner]
    if owner is not None and labels["problem_type"] is None:  # the head records none: the model's own stays
        labels = {**labels, "problem_type": record["base"]["problem_type"]}
    _set_labels(model, labels)


def _set_labels(model: nn.Module, labels: dict[str, Any]) -> None:
    for key in _LABEL_FIELDS:
        setattr(model.config, key, copy.deepcopy(labels[key]))


# ---- tied weights (an lm_head sharing its weight Parameter with the input embedding) ------------------

_TIE_ATTR = "bca_untied_configs"


def shared_weight_layers(model: nn.Module, layers: Sequence[tuple[str, BCALinear]]) -> dict[str, list[str]]:
    """``{layer path: [other parameter names]}`` for the layers whose base weight Parameter is also a parameter
    of another module of ``model`` (found by identity, whatever the tying mechanism: transformers ties an
    ``lm_head`` to the input embedding by assigning the same Parameter). Merging into such a weight in place
    would change the other module too; :meth:`BCALinear.merge` with ``untie=True`` gives the layer its own."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():  # each module object once
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{module_name}.{pname}" if module_name else pname)
    shared = {}
    for path, layer in layers:
        own = f"{path}.base_layer.weight"
        others = [n for n in owners.get(id(layer.base_layer.weight), []) if n != own]
        if others:
            shared[path] = others
    return shared


def _tie_configs(model: nn.Module) -> list[object]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        with contextlib.suppress(Exception):
            text = get_text()
            if text is not None and all(text is not c for c in configs):
                configs.append(text)
    return configs


def mark_untied(model: nn.Module, layers: Sequence[BCALinear]) -> None:
    """After a merge untied some of ``layers``: set ``tie_word_embeddings`` False in the model's config(s), so
    ``save_pretrained`` writes both weights and ``from_pretrained`` keeps them apart (transformers re-ties them
    on loading while the flag is True, which would drop the merged weight). Remembered, so
    :func:`restore_tie_config` sets it back once every layer is tied again."""
    if not any(layer.untied for layer in layers):
        return
    record = model.__dict__.setdefault(_TIE_ATTR, [])
    for config in _tie_configs(model):
        if getattr(config, "tie_word_embeddings", None) is True:
            config.tie_word_embeddings = False
            record.append(config)


def restore_tie_config(model: nn.Module, layers: Sequence[BCALinear]) -> None:
    """Set ``tie_word_embeddings`` back to True where :func:`mark_untied` cleared it, once none of ``layers`` is
    untied any more."""
    if any(layer.untied for layer in layers):
        return
    for config in model.__dict__.pop(_TIE_ATTR, []):
        config.tie_word_embeddings = True


# ---- modules saved whole (modules_to_save): the base values and each adapter's own ---------------------

_SAVED_ATTR = "bca_saved_modules"


class SavedModules:
    """The values of the modules that adapters save whole (``modules_to_save``, e.g. a classifier head), by
    parameter name: the base model's (taken when the first adapter that saves the module is put in) and each
    saving adapter's own. The model's parameter holds one of them, the *live* values: the active adapter's that
    saves it, else the base model's (disabled adapters: the base model's). PEFT's ``ModulesToSaveWrapper`` keeps
    the same: the original module and a copy per adapter.

    The parameter itself is what trains, so an adapter's values are kept in :attr:`stores` only while they are not
    live (copied out of the parameter when another's are put in, and back when they return).

    Attributes:
        base: parameter name -> the base model's values.
        saves: adapter -> the parameter names it saves.
        stores: adapter -> {parameter name -> its values}, for its parameters that are not live.
        owner: parameter name -> the active adapter that saves it (absent: none does).
        live: parameter name -> the adapter whose values the parameter holds (absent: the base model's).
        disabled: adapters are disabled (:func:`disable_adapters`): the base values are live.
        frozen: parameter name -> its ``requires_grad`` while the base values, frozen, stand in for it.
    """

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}
        self.saves: dict[str, list[str]] = {}
        self.stores: dict[str, dict[str, torch.Tensor]] = {}
        self.owner: dict[str, str] = {}
        self.live: dict[str, str] = {}
        self.disabled = False
        self.frozen: dict[str, bool] = {}

    def snapshot(self) -> SavedModules:
        """A copy to put back on failure (tensors are shared: none is ever changed in place)."""
        copy = SavedModules()
        copy.base, copy.owner, copy.live = dict(self.base), dict(self.owner), dict(self.live)
        copy.frozen = dict(self.frozen)
        copy.saves = {a: list(n) for a, n in self.saves.items()}
        copy.stores = {a: dict(v) for a, v in self.stores.items()}
        copy.disabled = self.disabled
        return copy

    def owners_for(self, active: Sequence[str]) -> dict[str, str]:
        """parameter name -> the adapter of ``active`` that saves it; refuses two that save the same one."""
        owner: dict[str, str] = {}
        for adapter in active:
            for name in self.saves.get(adapter, ()):
                if name in owner and owner[name] != adapter:
                    raise InvalidOptionError(
                        f"adapters {owner[name]!r} and {adapter!r} both save {name} whole; a model computes with "
                        "one copy of it, so only one of them can be active at a time")
                owner[name] = adapter
        return owner


def saved_modules(model: nn.Module) -> SavedModules | None:
    """The :class:`SavedModules` of ``model`` (None while no adapter of it saves a module whole)."""
    return model.__dict__.get(_SAVED_ATTR)


def _saved_param_names(model: nn.Module, paths: Sequence[str]) -> list[str]:
    names: list[str] = []
    for path in paths:
        for pname, _ in model.get_submodule(path).named_parameters():
            if f"{path}.{pname}" not in names:
                names.append(f"{path}.{pname}")
    return names


def add_saved_values(
    model: nn.Module, adapter_name: str, paths: Sequence[str], values: dict[str, torch.Tensor] | None = None
) -> None:
    """Record adapter ``adapter_name``'s values of the modules ``paths`` it saves whole, and put them in place (the
    new adapter is active, as its kernels are; the base model's values stay while adapters are disabled).

    ``values``: the adapter's tensors by parameter name (a loaded adapter's); a parameter not given starts from
    the base model's values (an injected adapter's head, as PEFT copies the original module). The base values of
    a module are taken here, from the model, the first time an adapter that saves it is added.
    """
    names = _saved_param_names(model, paths)
    if not names:
        return
    record = saved_modules(model)
    if record is None:
        record = model.__dict__.setdefault(_SAVED_ATTR, SavedModules())
        record.disabled = any(layer.adapters_disabled for _, layer in bca_layers(model))  # disable_adapters before
    values = values or {}
    store = record.stores.setdefault(adapter_name, {})
    for name in names:
        if name not in record.base:
            # nothing else saves it, so the parameter holds the base model's values
            record.base[name] = model.get_parameter(name).detach().clone()
        given = values.get(name)
        store[name] = given if given is not None else record.base[name].clone()
        record.owner[name] = adapter_name
    record.saves[adapter_name] = names
    _sync_saved(model)


def _sync_saved(model: nn.Module, target: dict[str, str] | None = None) -> None:
    """Put in place, for each parameter saved whole, the values ``target`` names (parameter name -> adapter; absent:
    the base model's); default: the active owner's, or the base model's while adapters are disabled. The values
    leaving the parameter are kept in their adapter's store first (they may have been trained)."""
    record = saved_modules(model)
    if record is None:
        return
    if target is None:
        target = {} if record.disabled else record.owner
    with torch.no_grad():
        for name in record.base:
            current, new = record.live.get(name), target.get(name)
            if current == new:
                continue
            param = model.get_parameter(name)
            if current is not None:
                record.stores[current][name] = param.detach().clone()
            else:  # the base values leave: the parameter trains again as its adapter's
                param.requires_grad = record.frozen.pop(name, param.requires_grad)
            if new is None:
                record.frozen[name] = param.requires_grad
                param.requires_grad = False
                param.copy_(record.base[name])
                record.live.pop(name, None)
            else:
                param.copy_(record.stores[new].pop(name))
                record.live[name] = new
    _sync_labels(model)  # the class names follow the head in place


def saved_value(model: nn.Module, adapter_name: str, name: str) -> torch.Tensor | None:
    """Adapter ``adapter_name``'s own values of parameter ``name`` (saved whole) when the model's parameter does
    not hold them (another adapter's or the base model's are live); None when it does, or nothing is recorded."""
    record = saved_modules(model)
    if record is None or name not in record.saves.get(adapter_name, ()) or record.live.get(name) == adapter_name:
        return None
    return record.stores[adapter_name][name]


def _unload_saved(model: nn.Module, merge: bool) -> None:
    """Before unwrapping: the active adapter's values in place (``merge``), else the base model's; the
    ``requires_grad`` flags as they were before any base values stood in."""
    record = saved_modules(model)
    if record is None:
        return
    _sync_saved(model, dict(record.owner) if merge else {})
    for name, flag in record.frozen.items():
        model.get_parameter(name).requires_grad = flag
    record.frozen.clear()


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name ``model`` holds (registered configs and layer kernels), sorted."""
    names = set(adapter_configs(model)) | {n for _, layer in bca_layers(model) for n in layer.bca_kernels}
    return sorted(names)


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Route row b of every batch run inside the block through adapter ``names[b]`` only.

    ``None`` or :data:`~bca_deploy.layers.BASE_ADAPTER` (``"__base__"``) selects the base model for
    that row. Each row's output equals running that row alone with its adapter active; the active
    adapter set is ignored inside the block and restored after it. Works for any forward whose
    activations keep the batch as their first dimension, ``model.generate`` with greedy or sampled
    decoding included (not beam search, which expands the batch)::

        with mixed_adapters(model, ["support", "legal", None]):
            logits = model(**batch).logits            # 3 rows, 3 adapters (the last: base only)

    Raises:
        ValueError: an unknown adapter name (the message lists the model's adapters), an empty list,
            an adapter merged into the base weights, or an adapter with ``modules_to_save`` (a head
            every row shares) mixed with other choices (checked before anything runs).

    Modules saved whole are shared by every row: inside the block they hold the values of the one adapter the
    batch names, when it saves them, else the base model's; they are put back after it.
    """
    names = [BASE_ADAPTER if n is None else str(n) for n in names]
    if not names:
        raise InvalidOptionError("mixed_adapters needs one adapter name per row; got an empty list")
    layers = [layer for _, layer in bca_layers(model)]
    known = adapter_names(model)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {known} (or {BASE_ADAPTER!r} / None for "
                         "the base model)")
    merged = sorted({f"{layer.module_name}: {m}" for layer in layers for m in layer.merged_adapters})
    if merged:
        raise InvalidOptionError(f"cannot route rows while adapters are merged into the base weights ({merged[:3]}...); "
                         "unmerge first")
    chosen = sorted(set(names))
    configs = adapter_configs(model)
    saving = [n for n in chosen if n in configs and configs[n].modules_to_save]
    if saving and len(chosen) > 1:
        raise InvalidOptionError(
            f"adapter(s) {saving} save whole modules ({', '.join(configs[saving[0]].modules_to_save)}) that every row "
            "of a batch shares, so they cannot be mixed with other adapters or the base model in one batch"
        )
    rows = RowAdapters(names)
    previous = [layer.row_adapters for layer in layers]
    record = saved_modules(model)
    live_before = dict(record.live) if record is not None else {}
    for layer in layers:
        layer.row_adapters = rows
    try:
        if record is not None:
            # every row shares the saved modules: one adapter alone in the batch runs with its own values,
            # anything else (base rows, adapters that save nothing) with the base model's
            only = chosen[0] if len(chosen) == 1 and chosen[0] != BASE_ADAPTER else None
            _sync_saved(model, {n: only for n in record.saves.get(only, ())} if only is not None else {})
        yield model
    finally:
        for layer, before in zip(layers, previous):
            layer.row_adapters = before
        if record is not None:
            _sync_saved(model, live_before)


# ---- base weights (PEFT's save_embedding_layers): the base model's own values an adapter was trained with ---------

_BASE_ATTR = "bca_base_weights"


def base_weight_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """The base weights adapter ``adapter_name`` wrote into ``model`` when it was loaded, by their names in an adapter
    file (``lm_head.base_layer.weight``: :func:`bca_deploy.fit.split_base_key`); :func:`bca_deploy.save_adapter`
    writes them again."""
    return list(model.__dict__.get(_BASE_ATTR, {}).get(adapter_name, ()))


def register_base_weights(model: nn.Module, adapter_name: str, keys: Sequence[str]) -> None:
    """Remember that adapter ``adapter_name`` carries the base weights ``keys`` (written into the model already)."""
    record = model.__dict__.setdefault(_BASE_ATTR, {})
    if keys:
        record[adapter_name] = list(keys)
    else:
        record.pop(adapter_name, None)


def base_weight_parameter(model: nn.Module, key: str) -> nn.Parameter:
    """The parameter of ``model`` that the base weight ``key`` (``<module>.base_layer.<param>``) is the value of: the
    module's own, or its base layer's when the module is adapted."""
    from .fit import split_base_key

    module, param = split_base_key(key)
    return getattr(_base_of(model.get_submodule(module)), param)


def base_weight_value(model: nn.Module, key: str) -> torch.Tensor:
    """The base model's value of base weight ``key`` (:func:`base_weight_parameter`), a merge's ΔW left out.

    Raises:
        InvalidOptionError: the module's weight holds merged adapters and no copy of it from before the merge was
            kept (``merge(keep_original=False)``).
    """
    from .fit import split_base_key

    module, param = split_base_key(key)
    layer = model.get_submodule(module)
    if isinstance(layer, BCALinear) and param == "weight" and layer.merged_adapters:
        if layer.untied:
            return layer._tied_weight[0].detach()
        if layer._weight_before_merge is not None:
            return layer._weight_before_merge
        raise InvalidOptionError(
            f"{module}: adapters {layer.merged_adapters} are merged into its weight and no copy from before the merge "
            f"was kept (merge(keep_original=False)), so its base weight {key} is not known: unmerge first")
    return base_weight_parameter(model, key).detach()


def check_base_weights(model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]) -> None:
    """Refuse base weights (``values``: ``{base weight name: value}``) that adapter ``adapter_name`` cannot write into
    ``model`` without changing what its other adapters compute: a parameter another adapter saves whole (the model
    would run that adapter with this one's base values, and lose the base model's), a parameter another adapter
    wrote other base values into, or a weight holding merged adapters.

    Raises:
        AdapterMismatchError: naming the tensor, the other adapter and the way out, in one line each.
    """
    problems: list[str] = []
    record = saved_modules(model)
    written = model.__dict__.get(_BASE_ATTR, {})
    for key, value in values.items():
        param = base_weight_parameter(model, key)
        if record is not None:
            for name in record.base:
                if model.get_parameter(name) is param:
                    owners = [a for a, names in record.saves.items() if name in names and a != adapter_name]
                    if owners:
                        problems.append(
                            f"tensor {key}: a base weight of adapter {adapter_name!r}, but adapter {owners[0]!r} of "
                            f"this {type(model).__name__} saves {name} whole (the same Parameter), and the model keeps "
                            "one base value of it; load the adapter into its own copy of the base model")
        for other, keys in written.items():
            clash = next((k for k in keys if other != adapter_name and base_weight_parameter(model, k) is param), None)
            if clash is not None and not torch.equal(param.detach(), value.to(device=param.device, dtype=param.dtype)):
                problems.append(
                    f"tensor {key}: a base weight of adapter {adapter_name!r} with other values than adapter {other!r} "
                    f"of this {type(model).__name__} wrote into it ({clash}); a model has one base model: load the "
                    "adapter into its own copy of the base model")
        for path, layer in bca_layers(model):
            if layer.merged_adapters and (layer.base_layer.weight is param or (
                    layer.untied and layer._tied_weight[0] is param)):
                problems.append(f"tensor {key}: adapters {layer.merged_adapters} are merged into {path}'s weight, the "
                                "same Parameter; unmerge first")
    if problems:
        raise AdapterMismatchError(format_problems(
            f"cannot write adapter {adapter_name!r}'s base weights into this {type(model).__name__}:", problems))
