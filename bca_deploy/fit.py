"""Does an adapter fit a target? The one check, used by every path that applies an adapter.

``load_adapter`` (a PyTorch model), the streaming merge (a safetensors checkpoint), the adapter-bank
export and serving registration (a bank graph's layout) all describe what they apply an adapter to as a
:class:`Target` and call :func:`check_adapter`, which reports every problem at once:

* **the adapter itself** (:func:`adapter_problems`, no target needed): each kernel present, of its
  module's ``(d_out/p, d_in/p, p)`` shape, a real floating dtype (fp16/bf16/fp32/fp64: complex, bool and
  integer kernels are refused), non-empty and finite; each other tensor under one of ``modules_to_save``
  or a base weight (:func:`split_base_key`), floating and finite; no tensor the config does not account for (a ``modules: {}`` config with kernels
  present is refused, not merged as nothing); something to apply; a task head whose output layer has
  ``num_labels`` rows. The config's own types and values (block sizes, finite positive scaling, paths)
  are checked when it is parsed (:meth:`bca_deploy.config.AdapterConfig.problems`).
* **against the target** (:func:`target_problems`): the base ``model_type``; every adapted module found,
  of the layer type the adapter declares (``linear`` vs ``conv1d``: a ``conv1d`` adapter on a square
  Linear would add ΔWᵀ; an embedding table or anything else is refused), with the same in/out features
  and stored weight shape, a block size the target holds (bank graphs), a weight dtype the target can
  add to (checkpoints); every ``modules_to_save`` tensor a parameter of the target with the same shape
  (or a target that takes no whole modules says so); every base weight a floating parameter of the target of
  exactly its shape (a bank graph, whose rows share the base model, takes none it cannot tell equal to its own).

Module paths that differ from the target's only by its ``base_model_prefix`` (``bert.``, ``model.``,
``transformer.``...) are aligned first, all or nothing (:func:`align_to_target`); a task head the target lacks
(``classifier`` in a ``BertModel``) does not keep the rest from aligning, and is named once with the class that has
it (:func:`missing_heads`). A Parameter the target holds under two names (a tied ``lm_head`` and input embedding) may
be saved under either or both, and gets the one value PEFT gives it (:func:`resolve_tied`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import (
    KERNEL_SUFFIX,
    LAYER_TYPES,
    AdapterConfig,
    ModuleSpec,
    PathOwners,
    recorded_base_type,
    show_names,
)
from .errors import AdapterFormatError, AdapterMismatchError, format_problems, printable
from .layers import BCALinear, is_adaptable, layer_dims, layer_type_of

__all__ = [
    "REAL_FLOAT_DTYPES",
    "ModuleInfo",
    "ParamInfo",
    "Target",
    "model_target",
    "bank_target",
    "adapter_problems",
    "target_problems",
    "module_problem",
    "check_adapter",
    "base_name_note",
    "recorded_base_note",
    "say_base_note",
    "ForeignBaseWarning",
    "align_paths",
    "align_to_target",
    "resolve_tied",
    "missing_heads",
    "HEAD_MODULES",
    "split_saved_key",
    "split_base_key",
    "base_key",
    "base_weights",
    "BASE_LAYER",
    "tensor_problem",
    "dtype_problem",
    "slot_problems",
]

#: The dtypes an adapter tensor may have: real floating point.
REAL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ModuleInfo:
    """One module of a target, as far as the target knows it.

    Attributes:
        kind: ``"linear"``, ``"conv1d"``, or what else the module is (``"Embedding"``, ``"LayerNorm"``...);
            ``"unknown"`` when the target cannot tell (a checkpoint without a usable config.json).
        in_features: d_in, when known.
        out_features: d_out, when known.
        weight_shape: the weight's stored shape ((out, in) for Linear, (in, out) for Conv1D), when known.
        dtype: the stored weight's dtype name, when it matters (checkpoints: ``"F32"``...).
        block_sizes: the block sizes the target holds for this module (bank graphs); None: any.
        key: where the weight is in the target (a checkpoint tensor name), when that differs from the path.
    """

    kind: str
    in_features: int | None = None
    out_features: int | None = None
    weight_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    block_sizes: tuple[int, ...] | None = None
    key: str | None = None


@dataclass(frozen=True)
class ParamInfo:
    """One parameter a ``modules_to_save`` tensor may replace.

    Attributes:
        shape: its shape in the target.
        dtype: its dtype name (for messages).
        floating: whether it is floating point (only floating parameters are replaced).
        key: its name in the target (a checkpoint tensor name); None when the target does not hold it yet
            (a head that a classification checkpoint written by merge adds).
    """

    shape: tuple[int, ...]
    dtype: str = ""
    floating: bool = True
    key: str | None = None


@dataclass
class Target:
    """What an adapter is applied to, described abstractly (a model, a checkpoint, a bank graph).

    Attributes:
        description: names the target in messages (``"this BertModel"``, ``"checkpoint /m"``...).
        modules: adaptable and other modules by path, in the target's own naming.
        params: the parameters ``modules_to_save`` tensors may replace, by name; None when the target takes
            no whole modules (then ``no_params_reason`` says why).
        model_type: ``config.model_type`` of the target, when known.
        prefixes: ``base_model_prefix`` candidates tried when aligning adapter paths (usually one).
        weight_dtypes: the stored weight dtypes an adapted module may have; None: any.
        resizable: parameter names whose shape an adapter may change (a classification head written with
            the adapter's own number of labels).
        no_params_reason: why ``params`` is None.
        tied: parameters the target holds under several names (transformers ties an ``lm_head`` to the input
            embedding by giving both modules one Parameter): each such name -> every name of that Parameter, in
            the order the target lists its parameters (the order ``load_state_dict`` writes them in, so the last
            name's value is the one that stays); the first name is the one it is stored under.
        lists_every_module: ``modules`` lists every module of the target (a model, a checkpoint's architecture),
            not only the adapted ones (a bank graph): then a module it lacks is missing from the model, and a
            task head it lacks is named as such (:func:`target_problems`).
        head_advice: how a message says which class to use instead, for an adapter whose task head the target
            lacks; ``{cls}`` and ``{auto}`` are replaced (``BertForSequenceClassification``,
            ``AutoModelForSequenceClassification``).
        base_matches: for a target that cannot take base weights (:func:`split_base_key`; a bank graph, whose rows
            share the base model): ``base_matches(parameter name, value)`` says whether the target's own value of
            the parameter equals ``value`` (cast to the dtype the target holds it in): True, and the base weight
            changes nothing and is accepted; False, and it is refused as another value; a string, and it is refused
            for the reason it gives (the target lacks the parameter, cannot tell...). When set, it decides for every
            base weight, whatever ``params`` lists. None: a target without ``params`` refuses every base weight.
        renamed: for a module path the target lacks, why the installed transformers has it under another name or
            not as a layer (:func:`line_naming`: an adapter made with the other transformers line), or None.
        name_or_path: the checkpoint the target was loaded from (``config._name_or_path``, a merged checkpoint's
            directory), when known: an adapter recording another base is applied with a warning
            (:func:`base_name_note`).
    """

    description: str
    modules: Mapping[str, ModuleInfo]
    params: Mapping[str, ParamInfo] | None = None
    model_type: str | None = None
    prefixes: tuple[str, ...] = ()
    weight_dtypes: tuple[str, ...] | None = None
    resizable: frozenset[str] = frozenset()
    no_params_reason: str = "it takes no whole modules"
    absent: str = "not found in"
    tied: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    lists_every_module: bool = True
    head_advice: str = "use a {cls} ({auto})"
    base_matches: Callable[[str, torch.Tensor], bool | str] | None = None
    renamed: Callable[[str], str | None] | None = None
    name_or_path: str | None = None
    _owners: set[str] | None = field(default=None, repr=False, compare=False)

    def has_path(self, path: str) -> bool:
        """Whether ``path`` names a module of the target (or a module owning some of its parameters)."""
        if path in self.modules:
            return True
        if self._owners is None:
            owners: set[str] = set()
            for name in self.params or {}:
                parts = name.split(".")
                owners.update(".".join(parts[:i]) for i in range(1, len(parts)))
            self._owners = owners
        return path in self._owners


# ---- targets ------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: A target parameter's dtype name (a model's torch name, a checkpoint's safetensors name) -> the torch dtype.
_CAST_DTYPES = {"float16": torch.float16, "F16": torch.float16, "bfloat16": torch.bfloat16, "BF16": torch.bfloat16,
                "float32": torch.float32, "F32": torch.float32}


def _cast_problem(tensor: torch.Tensor, dtype_name: str) -> str | None:
    """What goes wrong when a finite ``tensor`` replaces a parameter held as ``dtype_name``: values beyond that
    dtype's range become Inf (a float64 1e300 into float32, a float32 1e5 into float16), or None."""
    dtype = _CAST_DTYPES.get(dtype_name)
    if (dtype is None or tensor.is_meta or not tensor.dtype.is_floating_point
            or torch.finfo(tensor.dtype).max <= torch.finfo(dtype).max):
        return None
    if not torch.isfinite(tensor).all():  # said by tensor_problem
        return None
    largest = tensor.abs().max() if tensor.numel() else None
    if largest is None or torch.isfinite(largest.to(dtype)):  # the cast rounds as the copy into the target will
        return None
    largest = float(largest)
    return (f"values up to {largest:.3g} overflow the {dtype_name} the target holds it in (largest "
            f"{torch.finfo(dtype).max:.3g}): they would become Inf")


def model_target(model: nn.Module, description: str | None = None) -> Target:
    """The :class:`Target` of a PyTorch model (real or on the ``meta`` device), BCA layers seen through.

    Every module is listed with its kind (Linear/Conv1D with their dims; other modules by class name) and
    every parameter (adapter kernels and the wrapped layers' own ``base_layer`` naming excepted) as a
    parameter ``modules_to_save`` tensors may replace.
    """
    modules: dict[str, ModuleInfo] = {}
    inside: set[str] = set()  # BCALinear layers and everything under them (their base layer, their kernels)
    for name, module in model.named_modules():  # parents come before their children
        if not name:
            continue
        if name.rpartition(".")[0] in inside:
            inside.add(name)
            continue
        base = module.base_layer if isinstance(module, BCALinear) else module
        if isinstance(module, BCALinear):
            inside.add(name)
        if is_adaptable(base):
            d_in, d_out = layer_dims(base)
            modules[name] = ModuleInfo(layer_type_of(base), d_in, d_out, tuple(base.weight.shape))
        else:
            modules[name] = ModuleInfo(type(base).__name__)
    params: dict[str, ParamInfo] = {}
    names: dict[int, list[str]] = {}  # id(Parameter) -> every name it has, in the model's order
    # every name of a shared Parameter (a tied lm_head's weight is the input embedding's): an adapter may save it
    # under either (PEFT's save_embedding_layers saves both)
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".bca_kernels." in f".{name}":
            continue
        plain = name.replace(".base_layer.", ".")
        params[plain] = ParamInfo(tuple(param.shape), _dtype_name(param.dtype), param.is_floating_point(), name)
        names.setdefault(id(param), []).append(plain)
    prefix = getattr(model, "base_model_prefix", "") or ""
    return Target(
        description=description or f"this {type(model).__name__}",
        modules=modules,
        params=params,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        prefixes=(prefix,) if prefix else (),
        tied={n: tuple(group) for group in names.values() if len(group) > 1 for n in group},
        head_advice="load it into {cls} ({auto})",
        renamed=line_naming(model, modules, params),
        name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )


def conversion_mapping(model: nn.Module) -> tuple[list, list]:
    """How transformers 5.x converts ``model``'s stored checkpoint keys as it loads them: ``(renamings, converters)``,
    its one-to-one ``WeightRenaming``s (GPT-NeoX's ``embed_out`` -> ``lm_head``, Mixtral's ``block_sparse_moe`` ->
    ``mlp``, the legacy ``gamma``/``beta``) and its ``WeightConverter``s, which fuse several stored tensors into one
    parameter (Mixtral's and Qwen2-MoE's per-expert Linears into 3-D ``experts.gate_up_proj``/``down_proj``).
    ``([], [])`` on transformers 4.x, which loads checkpoints as stored (its legacy renames are the model's
    ``_fix_state_dict_key_on_load``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = list(get_model_conversion_mapping(model))
    except Exception:  # noqa: BLE001 - a transformers without (this form of) the mapping: keys as stored
        return [], []
    return ([t for t in mapping if isinstance(t, WeightRenaming)],
            [t for t in mapping if isinstance(t, WeightConverter)])


def converted_key(key: str, renamings: list, converters: list) -> tuple[str, bool]:
    """``key`` (a stored checkpoint key) as transformers 5.x loads it: its renamings applied, then at most one
    converter (:func:`conversion_mapping`); with whether a converter took it (the name is then a fused parameter's,
    made of several stored tensors)."""
    from transformers.core_model_loading import rename_source_key

    name, pattern = rename_source_key(key, renamings, converters)
    return name, pattern is not None


def fused_experts_reason(cls: str, version: str, parameters: Sequence[str]) -> str:
    """Why no adapter applies to a per-expert Linear of ``cls`` on transformers ``version`` (5.x), which fuses them
    into ``parameters`` (the model's names): the one wording for an adapter made with 4.x (:func:`line_naming`) and
    for targets that name the experts (:func:`bca_deploy.inject.unmatched_targets`)."""
    shown = ", ".join(dict.fromkeys(".".join(p.split(".")[-2:]) for p in parameters))
    return (f"transformers {version} fuses the experts of {cls} into 3-D parameters ({shown}: every expert's weight "
            "in one tensor), not one Linear per expert as transformers 4.x has them, so no adapter applies to an "
            "expert")


def fused_source(key: str, renamings: list, converters: list) -> tuple[str, object, str] | None:
    """For a stored checkpoint ``key`` that a converter of :func:`conversion_mapping` fuses with others as transformers
    5.x loads it: ``(parameter, converter, source pattern)``, the parameter's name as :func:`converted_key` gives it,
    the converter and which of its source patterns took ``key``; None for any other key."""
    from transformers.core_model_loading import rename_source_key

    name, pattern = rename_source_key(key, renamings, converters)
    if pattern is None:
        return None
    converter = next((c for c in converters if pattern in c.source_patterns), None)
    return None if converter is None else (name, converter, pattern)


def fused_piece_shape(converter: object, shape: Sequence[int]) -> tuple[tuple[int, ...], int | None] | None:
    """The shape each stored tensor of ``converter`` (:func:`fused_source`) has where the fused parameter has
    ``shape``, with how many it stacks per source pattern (the experts; None where it stacks none): its operations
    undone in reverse order. Mixtral's ``gate_up_proj`` (E, 2*I, H), made of every expert's ``w1`` and ``w3``
    stacked (``MergeModulelist(dim=0)``) then the two joined (``Concatenate(dim=1)``): each ``w1``/``w3`` (I, H),
    E of each. None for a converter with other operations (the shapes it takes are not worked out here)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    shape, count = list(shape), None
    sources = len(getattr(converter, "source_patterns", ()))
    for op in reversed(list(getattr(converter, "operations", ()))):
        if type(op) is Concatenate and sources and 0 <= op.dim < len(shape) and shape[op.dim] % sources == 0:
            shape[op.dim] //= sources
        elif type(op) is MergeModulelist and count is None and 0 <= op.dim < len(shape):
            count = shape.pop(op.dim)
        else:
            return None
    return tuple(shape), count


def fused_expert_modules(model: nn.Module) -> dict[str, str]:
    """The per-expert Linears transformers 5.x fuses into ``model``'s 3-D parameters, one example path per source
    pattern and parameter (expert 0: ``model.layers.0.mlp.experts.0.w1``, as 4.x names it) -> the parameter it is
    fused into (``model.layers.0.mlp.experts.gate_up_proj``); empty on transformers 4.x. Each path is checked to
    convert to its parameter (:func:`converted_key`), so an example made up wrong is left out."""
    renamings, converters = conversion_mapping(model)
    if not converters:
        return {}
    found: dict[str, str] = {}
    for name, _ in model.named_parameters():
        for converter in converters:
            for target in converter.target_patterns:
                target = target.replace("\\", "")
                if not (name.endswith(target) if target.startswith(".") else
                        name == target or name.endswith("." + target)):
                    continue
                for source in converter.source_patterns:
                    example = name[: len(name) - len(target)] + source.replace("\\", "").replace("*", "0")
                    with contextlib.suppress(Exception):  # a pattern this cannot make an example of
                        if converted_key(example, renamings, converters) == (name, True):
                            found[example.removesuffix(".weight")] = name
    return found


def line_naming(model: nn.Module, modules: Mapping[str, ModuleInfo],
                params: Mapping[str, ParamInfo]) -> Callable[[str], str | None]:
    """The rule for an adapter module the installed transformers names otherwise than the line it was made with:
    ``naming(path)`` says why ``model`` (its ``modules`` and ``params``, :func:`model_target`'s) lacks ``path`` (a
    module or a module saved whole), or None.

    * transformers 5.x (:func:`conversion_mapping`): ``path``'s weight is one of the per-expert tensors 5.x fuses
      into a 3-D parameter (a Linear of transformers 4.x, none of 5.x: no adapter applies to it), or 5.x renames it
      one to one as it loads the checkpoint (GPT-NeoX's ``embed_out`` is 5.x's ``lm_head``);
    * transformers 4.x: ``path`` is an ``lm_head`` where the model's output embedding has another name (GPT-NeoX's
      ``embed_out``, which 5.x renames ``lm_head``).
    """
    cls = type(model).__name__
    found: dict[str, object] = {}

    def facts() -> dict[str, object]:  # worked out on the first module the model lacks (loading checks many models)
        if not found:
            import transformers

            found["version"] = transformers.__version__
            found["renamings"], found["converters"] = conversion_mapping(model)
            found["output"] = None if found["renamings"] or found["converters"] else _output_layer(model)
        return found

    def naming(path: str) -> str | None:
        f = facts()
        version, renamings, converters, output = f["version"], f["renamings"], f["converters"], f["output"]
        advice = f"apply it with transformers {{line}} (the line it was made with), or retrain it on transformers {version}"
        if renamings or converters:
            name, fused = converted_key(f"{path}.weight", renamings, converters)
            if fused and name in params:
                return (f"module {path}: {fused_experts_reason(cls, version, [name])}; "
                        + advice.format(line="4.x") + " with targets other than the experts (q_proj, v_proj...)")
            module = name.removesuffix(".weight")
            if not fused and module != path and module in modules:
                return (f"module {path}: transformers {version} names it {module} in {cls} (it renames the stored "
                        f"{path} as it loads the checkpoint): the adapter was made with transformers 4.x; "
                        + advice.format(line="4.x"))
            return None
        top, dot, rest = path.partition(".")
        if top == "lm_head" and output is not None and f"{output}{dot}{rest}" in modules:
            return (f"module {path}: {cls} names its language-modeling head {output} in transformers {version} "
                    "(transformers 5.x renames it lm_head): the adapter was made with transformers 5.x; "
                    + advice.format(line="5.x"))
        return None

    return naming


#: The models whose output layer (``get_output_embeddings``) transformers 5.x renames ``lm_head`` as it loads a
#: checkpoint, by class, with that layer's stored (4.x) name: 5.x's ``conversion_mapping`` (``^embed_out.`` ->
#: ``lm_head.``), which 4.x lacks. Other output layers named otherwise keep their names on 5.x (DistilBERT's
#: ``vocab_projector``, ELECTRA's ``generator_lm_head``, BioGPT's ``output_projection``, GPT-NeoX-Japanese's
#: ``embed_out``): nothing about the line follows from their names.
OUTPUT_LAYERS_5X_RENAMES = {"GPTNeoXForCausalLM": "embed_out"}


def _output_layer(model: nn.Module) -> str | None:
    """The path of ``model``'s output layer (``get_output_embeddings``) where transformers 5.x renames it ``lm_head``
    (:data:`OUTPUT_LAYERS_5X_RENAMES`), else None."""
    if (stored := OUTPUT_LAYERS_5X_RENAMES.get(type(model).__name__)) is None:
        return None
    with contextlib.suppress(Exception):  # a model without (a working) get_output_embeddings
        head = model.get_output_embeddings()
        path = next((n for n, m in model.named_modules() if head is not None and m is head), None)
        if path == stored:
            return path
    return None


def output_layer_named_otherwise(model: nn.Module) -> str | None:
    """The path of ``model``'s output layer where the installed transformers is 4.x (loads checkpoints as stored:
    :func:`conversion_mapping` is empty) and names this top-level module otherwise than ``lm_head``, the name
    transformers 5.x gives it as it loads (GPT-NeoX's ``embed_out``), else None: :func:`line_naming`'s rule, for a
    PEFT config that adapts the layer by its 4.x name while its file, made on 5.x where that name matches nothing,
    has no kernel for it. (A nested output layer, BERT's ``cls.predictions.decoder``, keeps its name on 5.x.)"""
    renamings, converters = conversion_mapping(model)
    path = None if renamings or converters else _output_layer(model)
    return path if path is not None and "." not in path else None


def prefix_forms(name: str, prefix: str) -> list[str]:
    """``name`` (a stored checkpoint key, renamed as transformers loads it) as a model's state dict may hold it: as
    stored, with the model's ``base_model_prefix`` added, and with it dropped where the key has it (a bare encoder's
    keys in a classifier, a classifier's in a bare encoder); the first of these the model has is the one."""
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}", *([name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [])]


def bank_target(
    layout: Mapping[str, object],
    model_type: str | None = None,
    base_model_prefix: str = "",
    description: str = "the bank graph",
    params: Mapping[str, ParamInfo] | None = None,
    base_matches: Callable[[str, torch.Tensor], bool | str] | None = None,
    name_or_path: str | None = None,
) -> Target:
    """The :class:`Target` of an adapter-bank graph from its layout.

    Args:
        layout: ``{bank input name: entry}``; each entry has ``module``, ``block_size``, ``in_features``,
            ``out_features`` and ``layer_type`` (:class:`bca_deploy.exporters.bank.BankTensor`).
        model_type: the exported model's ``model_type``.
        base_model_prefix: the exported model's ``base_model_prefix``.
        description: names the graph in messages.
        params: whole-module tensors the graph can take per adapter (a head bank); None: none.
        base_matches: whether the graph's own value of a base-model parameter (by name) equals a given tensor (see
            :class:`Target`): an adapter's base weights equal to the graph's are accepted, any other is refused.
        name_or_path: the model directory the graph was exported from (``bca_export.json``'s ``base_model``): an
            adapter recording another base checkpoint is taken with a warning (:func:`base_name_note`).
    """
    sizes: dict[str, list[int]] = {}
    dims: dict[str, tuple[str, int, int]] = {}
    for entry in layout.values():
        sizes.setdefault(entry.module, []).append(int(entry.block_size))
        dims[entry.module] = (entry.layer_type, int(entry.in_features), int(entry.out_features))
    modules = {}
    for path, (kind, d_in, d_out) in dims.items():
        shape = (d_in, d_out) if kind == "conv1d" else (d_out, d_in)
        modules[path] = ModuleInfo(kind, d_in, d_out, shape, block_sizes=tuple(sorted(sizes[path])))
    return Target(
        description=description,
        modules=modules,
        params=params,
        model_type=model_type,
        prefixes=(base_model_prefix,) if base_model_prefix else (),
        no_params_reason="every row of a bank graph shares its whole modules; serve it merged (bca-deploy export "
                         "--merge) or exported on its own",
        absent="not adapted in",
        lists_every_module=False,
        base_matches=base_matches,
        name_or_path=name_or_path,
    )


# ---- path alignment -----------------------------------------------------------------------------


def split_saved_key(key: str, modules_to_save: Sequence[str] | PathOwners) -> tuple[str | None, str]:
    """``('classifier', 'out_proj.weight')`` for ``'classifier.out_proj.weight'``: the longest saved module owning it.

    For many keys pass ``PathOwners(modules_to_save)``: its prefixes are looked up, where a list is tested entry by
    entry (4,000 saved modules' tensors were 16 million tests; 50,000, minutes)."""
    if isinstance(modules_to_save, PathOwners):
        found = modules_to_save.of(key, itself=False)  # shortest first
        owners = found[-1:]
    else:
        owners = [m for m in modules_to_save if key.startswith(m + ".")]
    if not owners:
        return None, key
    owner = max(owners, key=len)
    return owner, key[len(owner) + 1:]


#: What names a base weight in an adapter's tensors: ``<module>.base_layer.<param>``.
BASE_LAYER = "base_layer"


def split_base_key(key: str, modules_to_save: Sequence[str] = ()) -> tuple[str, str] | None:
    """``('lm_head', 'weight')`` for the base weight ``'lm_head.base_layer.weight'``, else None.

    A base weight is the base model's own value of parameter ``<param>`` of ``<module>`` as the adapter was trained
    with it (PEFT's ``save_embedding_layers``: a resized vocabulary's embeddings, an adapted ``lm_head``'s frozen
    weight). Applying the adapter writes it into the base model, where it stays with adapters disabled or removed
    (``PeftModel.from_pretrained`` loads it with ``load_state_dict``), and ΔW is added to it when merged. The name
    is PEFT's for an adapted layer's base layer, used for every module (``model.embed_tokens.base_layer.weight``);
    a tensor under one of ``modules_to_save`` is that module's own (:func:`split_saved_key`), never a base weight.
    """
    if key.endswith(KERNEL_SUFFIX) or split_saved_key(key, modules_to_save)[0] is not None:
        return None
    head, _, param = key.rpartition(".")
    module, _, last = head.rpartition(".")
    if last != BASE_LAYER or not module or not param:
        return None
    return module, param


def base_key(module: str, param: str) -> str:
    """The name of the base weight of ``<module>.<param>`` in an adapter's tensors (:func:`split_base_key`)."""
    return f"{module}.{BASE_LAYER}.{param}"


def base_weights(state: Iterable[str], modules_to_save: Sequence[str] = ()) -> dict[str, str]:
    """``{tensor name: parameter name}`` of the base weights among an adapter's tensor names (:func:`split_base_key`):
    ``{'lm_head.base_layer.weight': 'lm_head.weight'}``."""
    out = {}
    for key in state:
        split = split_base_key(key, modules_to_save)
        if split is not None:
            out[key] = f"{split[0]}.{split[1]}"
    return out


def align_paths(
    config: AdapterConfig, state: Mapping[str, torch.Tensor], prefix: str | Iterable[str], exists: Callable[[str], bool]
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Add or drop a ``base_model_prefix`` on every adapter path when that makes them all known to ``exists``.

    An adapter trained on ``LlamaForCausalLM`` names ``model.layers.0.self_attn.q_proj``; ``LlamaModel``
    calls that module ``layers.0.self_attn.q_proj`` (and the other way round for an adapter trained on a
    bare encoder applied to a model with a task head). Only an all-or-nothing rename is applied: one rule
    (``prefix`` may list several candidates) for every path, taken only when it makes every path resolve that
    resolves at all. A path that resolves under no rule (a task head the target lacks: ``classifier`` in a
    ``BertModel``, ``lm_head`` in a ``LlamaModel``) does not keep the others from aligning; it is renamed by the
    same rule where the rule applies to it, else kept, and the fit check names it. When no rule makes every
    resolvable path resolve (some only as they are, others only renamed), the inputs are returned unchanged and
    the fit check reports what is not found.
    """
    based = [split_base_key(k)[0] for k in base_weights(state, config.modules_to_save)]
    paths = list(dict.fromkeys([*config.modules, *config.modules_to_save, *based]))
    state = dict(state)
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    if not paths or all(exists(p) for p in paths):
        return config, state
    rules: list[Callable[[str], str | None]] = []
    for candidate in (p for p in prefixes if p):
        head = candidate + "."
        rules += [lambda p, h=head: p[len(h):] if p.startswith(h) else None, lambda p, h=head: h + p]
    attempts = [{p: rule(p) for p in paths} for rule in rules]
    resolves = [{p for p, r in attempt.items() if r is not None and exists(r)} for attempt in attempts]
    resolvable = {p for p in paths if exists(p)}.union(*resolves)
    if not resolvable or resolvable <= {p for p in paths if exists(p)}:
        return config, state  # nothing resolves, or what resolves does as it is: nothing to rename
    renamed: dict[str, str] | None = None
    for attempt, resolved in zip(attempts, resolves):
        if resolved == resolvable:
            candidate_names = {p: r if r is not None else p for p, r in attempt.items()}
            if len(set(candidate_names.values())) == len(candidate_names):  # two paths never become one
                renamed = candidate_names
                break
    if renamed is None:
        return config, state
    owners = sorted(paths, key=len, reverse=True)  # most specific module first
    new_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(KERNEL_SUFFIX) and key[: -len(KERNEL_SUFFIX)] in renamed:
            new_state[renamed[key[: -len(KERNEL_SUFFIX)]] + KERNEL_SUFFIX] = tensor
            continue
        owner = next((p for p in owners if key.startswith(p + ".")), None)
        new_state[key if owner is None else renamed[owner] + key[len(owner):]] = tensor
    task = config.task
    if task is not None and task.head is not None:
        task = dataclasses.replace(task, head=dataclasses.replace(
            task.head, modules=[renamed.get(m, m) for m in task.head.modules]))
    config = dataclasses.replace(
        config,
        modules={renamed[p]: spec for p, spec in config.modules.items()},
        modules_to_save=[renamed[p] for p in config.modules_to_save],
        task=task,
    )
    return config, new_state


def align_to_target(
    config: AdapterConfig, state: Mapping[str, torch.Tensor], target: Target
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """:func:`align_paths` against ``target`` (its prefixes, its modules and parameters)."""
    return align_paths(config, state, target.prefixes, target.has_path)


def resolve_tied(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    target: Target,
    copied: Collection[str] = (),
    fold: bool = False,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], list[str]]:
    """Saved tensors naming one tied Parameter of ``target`` (``target.tied``) given the one value PEFT gives it.

    transformers ties a causal LM's ``lm_head`` to its input embedding by giving both modules one Parameter. PEFT's
    ``save_embedding_layers`` (on when the vocabulary was resized before training, as chat fine-tunes that add
    tokens do) saves it under both names, ``model.embed_tokens.weight`` and ``lm_head.weight``, and
    ``PeftModel.from_pretrained`` writes both into that one Parameter in place (``load_state_dict``), in the
    model's parameter order: the tie stays, and the value under the last name (``lm_head.weight``) is the one the
    model computes with, whatever the other holds. Each such group of saved tensors gets that value here: under
    each of its names (``fold`` False: a model, which holds the Parameter under every name, so the adapter is saved
    again as it was read), or as one tensor under the name the Parameter is stored under (``fold``: a checkpoint,
    which stores ``model.embed_tokens.weight`` alone), its ``modules_to_save`` entries following. Base weights
    (:func:`split_base_key`: ``model.embed_tokens.base_layer.weight``) are grouped by their parameter's name the same
    way, and folded under the base weight name of the stored one; a group holding both a base weight and a tensor
    saved whole is a problem (one Parameter cannot be both).

    Args:
        config, state: the adapter, paths aligned to ``target``.
        target: what it is applied to.
        copied: modules saved whole that the adapter's trainer computed with a copy of their own (PEFT's
            ``modules_to_save``: its ``ModulesToSaveWrapper`` copies the module, so a tied ``lm_head`` listed there
            is untied from the embedding while the adapter is active). ``target`` cannot give such a module other
            values than the module it is tied to: unless the adapter saves every name of the Parameter with one
            value (then the copies compute as the tied Parameter), each is a problem, and its tensors are left as
            they are (with ``fold``, left out: the problem names them).
        fold: one tensor per Parameter, under the first of its names the target holds.

    Returns:
        The config and tensors, and the problems (one line per module in ``copied`` whose weight ``target`` ties,
        naming the module, the other name of its Parameter and the way out).
    """
    based = base_weights(state, config.modules_to_save)  # base weights: under their parameter's name here
    groups: dict[tuple[str, ...], list[str]] = {}
    for key in state:
        names = target.tied.get(based.get(key, key))
        if names is not None and not key.endswith(KERNEL_SUFFIX):
            groups.setdefault(names, []).append(key)
    if not groups:
        return config, dict(state), []
    problems: list[str] = []
    new_state = dict(state)
    for names, saved in groups.items():
        order = {key: names.index(based.get(key, key)) for key in saved}
        kinds = [key in based for key in saved]
        if any(kinds) and not all(kinds):  # one Parameter: the base model's value and a module's own at once
            base = ", ".join(k for k in saved if k in based)
            whole = ", ".join(k for k in saved if k not in based)
            problems.append(
                f"tensors {base} (a base weight, written into the base model) and {whole} (saved whole, the "
                f"adapter's own) are one Parameter in {target.description} (tied weights): it cannot hold both. "
                "Untie them in the base model first (config tie_word_embeddings false), then apply the adapter again")
            if fold:
                for key in saved:
                    del new_state[key]
            continue
        owners = {key: split_saved_key(key, config.modules_to_save)[0] for key in saved if key not in based}
        untied = sorted(key for key, owner in owners.items() if owner in copied)
        # copies that hold one value under every name compute as the tied Parameter does (a PEFT copy of an
        # adapter whose embeddings were saved tied, as save_adapter(format="peft") wrote one back before base
        # weights were told apart from modules saved whole)
        same = set(saved) == set(names) and all(torch.equal(state[k], state[saved[0]]) for k in saved)
        if untied and not same:
            for key in untied:
                others = ", ".join(n for n in names if n != key)
                problems.append(
                    f"module {owners[key]}: saved whole with its own copy (PEFT modules_to_save), so the adapter "
                    f"computes {key} untied from {others}, with other values; in {target.description} the two are "
                    f"one Parameter (tied weights), so its values would replace {others} too. Untie them in the base "
                    f"model first ({key} its own tensor, config tie_word_embeddings false), then apply the adapter "
                    "again")
            if fold:  # said once here; a checkpoint stores one of the names, the others would be "not found" too
                for key in saved:
                    del new_state[key]
            continue
        value = state[max(saved, key=order.__getitem__)]  # the last one written, as load_state_dict writes them
        for key in saved:
            if fold:
                del new_state[key]
            else:
                new_state[key] = value
        if fold:  # under the first name the target holds (a checkpoint stores one of them)
            name = next((n for n in names if n in (target.params or {})), names[0])
            if saved[0] in based:
                module, _, param = name.rpartition(".")
                name = base_key(module, param)
            new_state[name] = value
    if not fold:
        return config, new_state, problems
    saved_keys = [k for k in new_state if not k.endswith(KERNEL_SUFFIX) and split_base_key(k, config.modules_to_save)
                  is None]
    entries = [m for m in config.modules_to_save if any(split_saved_key(k, [m])[0] == m for k in saved_keys)]
    for key in saved_keys:
        if split_saved_key(key, entries)[0] is None:
            entries.append(key.rpartition(".")[0])
    return dataclasses.replace(config, modules_to_save=entries), new_state, problems


# ---- the checks ---------------------------------------------------------------------------------


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def dtype_problem(dtype: torch.dtype) -> str | None:
    """Why an adapter tensor cannot have ``dtype`` (float8, integer, complex...), or None: one rule for every format."""
    if dtype not in REAL_FLOAT_DTYPES:
        return f"dtype {_dtype_name(dtype)}; adapter tensors must be real floating point (float16, bfloat16, " \
               "float32 or float64)"
    return None


def tensor_problem(tensor: torch.Tensor) -> str | None:
    """What makes ``tensor`` unusable as an adapter tensor (dtype, emptiness, NaN/Inf), or None."""
    if (bad := dtype_problem(tensor.dtype)) is not None:
        return bad
    if tensor.numel() == 0:
        return f"is empty (shape {tuple(tensor.shape)})"
    if not torch.isfinite(tensor).all():
        return "has NaN/Inf values"
    return None


def _shown_key(key: str, limit: int = 200) -> str:
    """A tensor name from the file, for a message: its first ``limit`` characters, those that are not printable escaped
    (a line break in a name forged a line of the message)."""
    return printable(key[:limit]) + (f"... ({len(key):,} characters)" if len(key) > limit else "")


def adapter_problems(config: AdapterConfig, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every way ``state`` does not match ``config`` or holds unusable values (no target needed)."""
    problems: list[str] = []
    for name, spec in sorted(config.modules.items()):
        key = name + KERNEL_SUFFIX
        kernel = state.get(key)
        if kernel is None:
            problems.append(f"tensor {key}: missing from the adapter (module {name} is in the config's 'modules')")
            continue
        bad = tensor_problem(kernel)
        if bad is None and tuple(kernel.shape) != spec.kernel_shape:
            bad = f"shape {tuple(kernel.shape)}, expected {spec.kernel_shape} (d_out/p, d_in/p, p) for " \
                  f"in_features={spec.in_features}, out_features={spec.out_features}, p={spec.block_size}"
        if bad is None and (largest := float(kernel.abs().max()) * abs(float(spec.scaling))) > _FLOAT32_MAX:
            # each finite alone, their product is ΔW's entries: every path computes them in float32 (or narrower)
            bad = (f"scaling {spec.scaling:g} times kernel values up to {float(kernel.abs().max()):g} is {largest:g}, "
                   "beyond float32's range: ΔW would be infinite")
        if bad is not None:
            problems.append(f"tensor {key}: {bad}")
    saved_seen: set[str] = set()
    saved = PathOwners(config.modules_to_save)
    for key, tensor in sorted(state.items()):
        if key.endswith(KERNEL_SUFFIX):
            if key[: -len(KERNEL_SUFFIX)] not in config.modules:
                problems.append(f"tensor {_shown_key(key)}: unexpected (its module is not in the config's 'modules'"
                                + (", which is empty)" if not config.modules else ")"))
            continue
        owner, _ = split_saved_key(key, saved)
        if owner is None and split_base_key(key) is None:
            problems.append(f"tensor {_shown_key(key)}: unexpected (not a kernel, not under any of modules_to_save "
                            f"{show_names(config.modules_to_save)}, and not a base weight <module>.{BASE_LAYER}.<param>)")
            continue
        if owner is not None:
            saved_seen.add(owner)
        bad = tensor_problem(tensor)
        if bad is not None:
            problems.append(f"tensor {key}: {bad}")
    for entry in config.modules_to_save:
        if entry not in saved_seen:
            problems.append(f"modules_to_save entry {entry}: no tensors of it in the adapter")
    if not config.modules and not config.modules_to_save:
        problems.append("the adapter has no modules and no modules_to_save: nothing to apply")
    head = config.task.head if config.task is not None else None
    if head is not None:
        weights = {k: tuple(t.shape) for k, t in state.items()
                   if any(k.startswith(m + ".") for m in head.modules) and k.endswith("weight") and t.ndim == 2}
        if weights and not any(shape[0] == head.num_labels for shape in weights.values()):
            problems.append(f"task.head.num_labels is {head.num_labels} but no head weight has {head.num_labels} "
                            f"rows: {', '.join(f'{k} {list(s)}' for k, s in sorted(weights.items()))}")
    return problems


def module_problem(
    name: str, spec: ModuleSpec, info: ModuleInfo | None, target: str, absent: str = "not found in"
) -> str | None:
    """What keeps adapted module ``name`` (its ``spec``) from fitting the target's module ``info``, or None."""
    where = f"module {name}"
    if info is None:
        return f"{where}: {absent} {target}"
    if info.kind == "unknown":
        if info.weight_shape is not None and tuple(info.weight_shape) != spec.weight_shape:
            return (f"{where}: weight {list(info.weight_shape)} in {target}, the adapter expects "
                    f"{list(spec.weight_shape)} ({spec.layer_type}, in={spec.in_features}, out={spec.out_features})")
        return None
    if info.kind not in LAYER_TYPES:
        return f"{where}: is a {info.kind} in {target}, expected a Linear or Conv1D"
    if info.kind != spec.layer_type:
        return (f"{where}: is a {_kind_name(info.kind)} in {target}, but the adapter declares it a "
                f"{_kind_name(spec.layer_type)} (its ΔW would be applied transposed)")
    if (info.in_features, info.out_features) != (spec.in_features, spec.out_features):
        shape = f"weight {tuple(info.weight_shape)} " if info.weight_shape is not None else ""
        # both shapes and the adapter's tensor: a model of another size (the kernel is ΔW of the trained weight)
        return (f"{where}: {shape}(in={info.in_features}, out={info.out_features}) but the adapter was "
                f"trained on in={spec.in_features}, out={spec.out_features} (its kernel, shape {spec.kernel_shape} at "
                f"block size {spec.block_size}, is ΔW of a weight {spec.weight_shape})")
    if info.weight_shape is not None and tuple(info.weight_shape) != spec.weight_shape:
        return (f"{where}: weight stored as {list(info.weight_shape)} in {target}, expected "
                f"{list(spec.weight_shape)} for a {_kind_name(spec.layer_type)}")
    if info.block_sizes is not None and spec.block_size not in info.block_sizes:
        return (f"{where}: block size {spec.block_size}; {target} holds block size(s) "
                f"{', '.join(map(str, info.block_sizes))} for this module")
    return None


def _kind_name(kind: str) -> str:
    return {"linear": "Linear", "conv1d": "Conv1D"}.get(kind, kind)


def model_type_problem(config: AdapterConfig, model_type: str | None, description: str) -> str | None:
    """The adapter was trained on another ``model_type`` than the target's (``description``); None when they agree
    or either is unknown. The adapter's type is :func:`bca_deploy.config.recorded_base_type`'s: its own record, else
    (PEFT records none) the type of the local base model directory it records, so that a PEFT adapter of a BERT is
    not merged into a RoBERTa whose module names and shapes it happens to fit."""
    recorded, where = recorded_base_type(config)
    if recorded and model_type and recorded != model_type:
        return f"base model_type is {recorded!r}{where} but {description} is {model_type!r}"
    return None


class ForeignBaseWarning(UserWarning):
    """An adapter is applied to a model other than the base it records (:func:`base_name_note`)."""


def _hub_cache_name(text: str) -> str | None:
    """The model name of the first hub cache snapshot path in ``text`` (``...models--org--NAME/snapshots/<sha>...``:
    ``NAME``, what follows the folder's last ``--``), else None. Read by splitting at ``/``, in one pass: the regex it
    replaces (``models--(?:[^/]+--)?(?P<name>[^/]+)/snapshots/``) backtracked cubically, so a recorded base of
    16,000 characters (an adapter config's or ``bank.adapter_bases``' string, which nothing bounds) held a load for a
    minute."""
    parts = text.split("/")
    for k in range(len(parts) - 2):
        at = parts[k].find("models--")
        if at < 0 or parts[k + 1] != "snapshots" or not parts[k + 2]:
            continue
        rest = parts[k][at + len("models--"):]
        if not rest:
            continue
        cut = rest.rfind("--", 1, len(rest) - 1)  # an org before it (one character at least), a name after it
        return rest[cut + 2:] if cut >= 0 else rest
    return None


def _base_name(name_or_path: str) -> str:
    """The model's own name in a ``base_model_name_or_path`` / ``_name_or_path``: a hub id's name (``org/NAME``), a
    local directory's folder name, a hub cache snapshot's model name (``models--org--NAME/snapshots/<sha>``); lower
    case. Two spellings of one checkpoint (a hub id and the directory it was downloaded to) get the same name."""
    text = name_or_path.replace("\\", "/").rstrip("/")
    if (name := _hub_cache_name(text)) is not None:
        return name.lower()
    return text.rpartition("/")[2].lower()


def base_name_note(config: AdapterConfig, target: Target, source: str = "adapter") -> str | None:
    """A warning when the adapter records a base checkpoint (``base_model_name_or_path``) that is not the one
    ``target`` was loaded from, by name (:func:`_base_name`) and, for two local directories, by file; None when they
    agree or either is unknown.

    Only a warning: a model fine-tuned from the recorded base, or a copy of it under another name, is what one
    applies an adapter to too, and the names alone cannot tell it from another model of the same type and shapes
    (another model type is refused by :func:`model_type_problem`). The user is told which base the adapter records,
    so that a kernel learned on another model is not merged into this one without a word (PEFT says nothing).
    """
    return recorded_base_note(config.base_model_name_or_path, target.name_or_path, target.description, source)


def recorded_base_note(recorded: object, applied: object, description: str, source: str = "adapter") -> str | None:
    """:func:`base_name_note` of the base checkpoint an adapter records (``recorded``) against the one a target was
    loaded from (``applied``, named ``description`` in the message): for what carries the recorded name without its
    config (a bank's exported adapter, :meth:`~bca_deploy.serving.MultiAdapterSession.register_exported`)."""
    if not isinstance(recorded, str) or not recorded.strip() or not isinstance(applied, str) or not applied.strip():
        return None
    if _base_name(recorded) == _base_name(applied):
        return None
    with contextlib.suppress(OSError, ValueError):  # not two files of this machine: compared by name alone
        if os.path.samefile(recorded, applied):
            return None
    # both names quoted (repr): they come from files (bca_export.json's base_model, an adapter's config), and a
    # control character in one must not reach the operator's terminal as itself
    where = description if applied in description else f"{description} ({applied[:200]!r})"
    return (f"{source} records base model {recorded[:200]!r}, but is applied to {where}: its modules and shapes fit, "
            "so it is applied; unless this is that model, a copy of it or a model fine-tuned from it, the adapter's "
            "kernels were learned on other weights and the result is wrong")


def note_foreign_base(config: AdapterConfig, target: Target, source: str = "adapter",
                      warn: Callable[[str], object] | None = None, stacklevel: int = 2) -> None:
    """Say :func:`base_name_note`'s warning when the adapter records another base checkpoint than ``target``'s: to
    ``warn`` when given (a server's log), else as a :class:`ForeignBaseWarning` attributed ``stacklevel`` frames up
    from the caller (as :func:`warnings.warn` counts them). Every path that applies an adapter once it fits says it
    so: load, convert, export, a bank session's ``register`` and ``register_exported``."""
    say_base_note(base_name_note(config, target, source), warn, stacklevel=stacklevel + 1)


def say_base_note(note: str | None, warn: Callable[[str], object] | None = None, stacklevel: int = 2) -> None:
    """Say a foreign-base ``note`` (:func:`base_name_note`, :func:`recorded_base_note`; None: nothing to say) to
    ``warn`` when given, else as a :class:`ForeignBaseWarning` attributed ``stacklevel`` frames up from the caller."""
    if note is None:
        return
    if warn is not None:
        warn(note)
    else:
        warnings.warn(note, ForeignBaseWarning, stacklevel=stacklevel + 1)


def target_problems(config: AdapterConfig, state: Mapping[str, torch.Tensor], target: Target) -> list[str]:
    """Every way ``config``/``state`` do not fit ``target`` (paths already aligned).

    A task head the target lacks (:func:`missing_heads`: ``classifier`` in a ``BertModel``, ``lm_head`` in a
    ``LlamaModel``) is one line naming the module and the class to use, not one per tensor.
    """
    problems: list[str] = []
    if (problem := model_type_problem(config, target.model_type, target.description)) is not None:
        problems.append(problem)
    heads = {**missing_heads(config, state, target), **_renamed_modules(config, state, target)}
    by_module: list[tuple[str, str]] = []
    for name, spec in sorted(config.modules.items()):
        info = target.modules.get(name)
        problem = heads.get(name) or module_problem(name, spec, info, target.description, target.absent)
        if problem is None and info is not None and target.weight_dtypes is not None \
                and info.dtype not in target.weight_dtypes:
            problem = (f"module {name}: its weight is {info.dtype} in {target.description}; adapters are added to "
                       f"{', '.join(target.weight_dtypes)} weights only")
        if problem is not None:
            by_module.append((name, problem))
    problems += _grouped(by_module)
    based = base_weights(state, config.modules_to_save)
    problems += _base_weight_problems(state, based, target, heads)
    saved = sorted(k for k in state if not k.endswith(KERNEL_SUFFIX) and k not in based)
    if saved and target.params is None:
        problems.append(f"it saves whole modules ({', '.join(config.modules_to_save)}) and {target.description} "
                        f"cannot take them: {target.no_params_reason}")
    elif saved:
        problems += [heads[m] for m in config.modules_to_save if m in heads and m not in config.modules]
        head = config.task.head if config.task is not None else None
        label_hint = True  # said once: how to build a model with the adapter's head
        for key in saved:
            owner = split_saved_key(key, config.modules_to_save)[0]
            if owner in heads:
                continue  # said once for its module
            info = target.params.get(key)
            if info is None:
                problems.append(f"tensor {_shown_key(key)}: no such parameter in {target.description}")
            elif not info.floating:
                problems.append(f"tensor {key}: {target.description} holds it as {info.dtype}, not floating point")
            elif tuple(state[key].shape) != tuple(info.shape) and key not in target.resizable:
                hint = ""
                # the adapter's label layer: its recorded head's, or a classifier PEFT saved without a record
                is_head = owner is not None and (owner in head.modules if head is not None
                                                 else HEAD_MODULES.get(owner.split(".")[0]) == "seq-cls")
                rows = state[key].shape[0] if state[key].ndim else None
                if label_hint and is_head and rows != info.shape[0] and (head is None or rows == head.num_labels):
                    label_hint = False
                    hint = (f" (the adapter's classifier has {rows} labels: build the model with num_labels={rows}, "
                            "e.g. AutoModelForSequenceClassification.from_pretrained(base, num_labels=...), or use "
                            "bca_deploy.models.load_model(base, [adapter]), which reads the head from the adapter"
                            + ("; on the command line, record the adapter's task first: bca-deploy convert --adapter "
                               "DIR --to bca --task-type SEQ_CLS --out NEW, a PEFT classifier saved without task_type "
                               "being taken for its base model's task" if config.task is None else "") + ")")
                problems.append(f"tensor {key}: shape {tuple(state[key].shape)}, {target.description} has "
                                f"{tuple(info.shape)}{hint}")
            elif (cast := _cast_problem(state[key], info.dtype)) is not None:
                problems.append(f"tensor {key}: {cast}")
    return problems


def _renamed_modules(config: AdapterConfig, state: Mapping[str, torch.Tensor], target: Target) -> dict[str, str]:
    """``{module path: problem}`` for the adapter's modules (adapted, saved whole, or given a base weight) that
    ``target`` lacks because the installed transformers names them otherwise (:attr:`Target.renamed`: an adapter made
    with the other transformers line); said once per module, in place of "not found"."""
    if target.renamed is None:
        return {}
    based = [split_base_key(k)[0] for k in base_weights(state, config.modules_to_save)]
    paths = dict.fromkeys([*config.modules, *config.modules_to_save, *based])
    return {path: why for path in paths if not target.has_path(path) and (why := target.renamed(path)) is not None}


def _base_weight_problems(state: Mapping[str, torch.Tensor], based: Mapping[str, str], target: Target,
                          heads: Mapping[str, str]) -> list[str]:
    """Every base weight (``based``: tensor name -> parameter name, :func:`base_weights`) that ``target`` cannot
    take: a parameter it lacks, holds as no floating point, or holds at another shape (the base weight replaces the
    target's own value, so its shape is the target's: a vocabulary resized to another size does not fit)."""
    problems = []
    for key, name in sorted(based.items()):
        module = split_base_key(key)[0]
        if module in heads:
            continue  # said once for its module
        what = f"tensor {key}: the base model's own {name} the adapter was trained with"
        if target.base_matches is not None:  # a bank graph: it takes its own value only, whatever it lists
            verdict = target.base_matches(name, state[key])
            if verdict is True:
                continue  # the target's own value: nothing to replace
            why = verdict if isinstance(verdict, str) else (
                f"it is not {target.description}'s own value of {name}, which every row of a bank graph shares (the "
                "adapter was trained with other base values: on a resized vocabulary, or training biases as PEFT's "
                "bias='c3a_only' does)")
            problems.append(f"{what}; {target.description} cannot take it: {why}. Export the adapter on its own "
                            "(bca-deploy export, --merge or not), not into a bank, or apply it with load_adapter or "
                            "bca-deploy merge; or bank it on the base model it was trained on, which `bca-deploy merge "
                            "--model BASE --adapter ADAPTER --weight 0 --out TRAINED_BASE` writes (its base weights, no "
                            "ΔW), exporting the bank with --model TRAINED_BASE")
            continue
        info = None if target.params is None else target.params.get(name)
        if target.params is None or (info is None and not target.lists_every_module):
            problems.append(f"{what}; {target.description} cannot take it (every row of a bank graph shares the base "
                            "model's weights): apply the adapter with load_adapter or bca-deploy merge, or export it "
                            "on its own (bca-deploy export, --merge or not)")
        elif info is None:
            problems.append(f"{what}; {target.description} has no such parameter")
        elif not info.floating:
            problems.append(f"{what}; {target.description} holds it as {info.dtype}, not floating point")
        elif tuple(state[key].shape) != tuple(info.shape):
            problems.append(f"{what}: shape {tuple(state[key].shape)}, {target.description} has {tuple(info.shape)} "
                            "(a base weight replaces the model's own: a vocabulary resized to another size does not "
                            f"fit; use a base resized to {state[key].shape[0]} rows, as the adapter was trained)")
        elif (cast := _cast_problem(state[key], info.dtype)) is not None:
            problems.append(f"{what}: {cast}")
    return problems


#: Top-level modules that are a task head beside the base model (not part of ``BertModel``, ``LlamaModel``...), by
#: name: the task whose model class has them.
HEAD_MODULES = {"lm_head": "causal-lm", "classifier": "seq-cls", "score": "seq-cls", "pre_classifier": "seq-cls"}
_HEAD_WORDS = {"causal-lm": ("a language-modeling head", "ForCausalLM", "AutoModelForCausalLM"),
               "seq-cls": ("a classification head", "ForSequenceClassification", "AutoModelForSequenceClassification")}


def missing_heads(config: AdapterConfig, state: Mapping[str, torch.Tensor], target: Target) -> dict[str, str]:
    """``{module path: problem}`` for the adapter's modules (adapted or saved whole) that are a task head the target
    lacks: the adapter otherwise fits (some of its modules or tensors are found in ``target``), the module's
    top-level name is a head's (:data:`HEAD_MODULES`) and ``target`` has no module of that name. The line names the
    module and the class that has the head: the adapter's recorded architecture, else transformers' class for the
    task and the target's ``model_type`` (a SEQ_CLS adapter in a ``BertModel``: ``BertForSequenceClassification``).
    Empty for a target that lists only some of its modules (a bank graph) or that the adapter does not fit at all (a
    different model: there every module is simply not found)."""
    if not target.lists_every_module or not target.modules:  # (a target of whole modules only: no base to fit)
        return {}
    params = target.params or {}
    based_params = base_weights(state, config.modules_to_save)
    if not (any(m in target.modules for m in config.modules)
            or any(k in params for k in state if not k.endswith(KERNEL_SUFFIX))
            or any(n in params for n in based_params.values())):
        return {}
    from .config import task_architecture

    task = config.task
    out: dict[str, str] = {}
    based = [split_base_key(k)[0] for k in based_params]
    for path in dict.fromkeys([*config.modules, *config.modules_to_save, *based]):
        top = path.split(".")[0]
        if top not in HEAD_MODULES or target.has_path(top):
            continue
        kind = HEAD_MODULES[top]
        what, suffix, auto = _HEAD_WORDS[kind]
        recorded = task.architecture if task is not None and (task.architecture or "").endswith(suffix) else None
        cls = recorded or task_architecture(kind, target.model_type)
        advice = target.head_advice.format(cls=cls, auto=auto) if cls else f"use the {auto} class of this model type"
        if recorded is None and (task is None or task.type != kind):
            advice += ", or the class it was trained with"  # the name says which head; the adapter does not
        out[path] = (f"module {path}: {target.description} has no such module; the adapter was trained on a model "
                     f"with {what} ({top}): {advice}")
    return out


def _grouped(by_module: Sequence[tuple[str, str]], most: int = 3) -> list[str]:
    """``module <name>: <reason>`` lines, those sharing one reason said once with the modules it covers (a
    whole adapter at the wrong block size was one identical line per module: 36 for MiniLM)."""
    reasons: dict[str, list[str]] = {}
    for name, problem in by_module:
        reasons.setdefault(problem.removeprefix(f"module {name}: "), []).append(name)
    lines = []
    for reason, names in reasons.items():
        if len(names) <= most:
            lines += [f"module {name}: {reason}" for name in names]
        else:
            shown = ", ".join(names[:most])
            lines.append(f"{len(names)} modules ({shown}, ... {names[-1]}): {reason.replace('this module', 'them')}")
    return lines


def check_adapter(
    config: AdapterConfig,
    state: Mapping[str, torch.Tensor],
    target: Target | None = None,
    source: str = "adapter",
    problems: Sequence[str] = (),
) -> None:
    """Raise if the adapter is unusable, or does not fit ``target``, listing every problem at once.

    Args:
        config: the adapter's config (paths aligned to the target, see :func:`align_to_target`).
        state: its tensors, keyed as in bca-deploy files.
        target: what it is applied to; None checks the adapter alone.
        source: names the adapter in the message (its directory).
        problems: problems the caller found already (:func:`resolve_tied`'s), listed with the others.

    Raises:
        AdapterFormatError: without a target, the adapter's tensors are missing, unexpected, of a wrong
            shape or dtype, empty or non-finite.
        AdapterMismatchError: with a target, any of the above or a misfit (every problem listed).
    """
    problems = adapter_problems(config, state) + list(problems)
    if target is None:
        if problems:
            raise AdapterFormatError(format_problems(f"{source} is not a usable adapter:", problems))
        return
    problems += target_problems(config, state, target)
    if problems:
        raise AdapterMismatchError(format_problems(f"{source} does not fit {target.description}:", problems))
    note_foreign_base(config, target, source, stacklevel=2)


def slot_problems(tensors: Mapping[str, object], layout: Mapping[str, object]) -> list[str]:
    """Problems of bank slots computed elsewhere (``{bank input: (1, R, q, o)}`` arrays) against a layout.

    Each key must be a bank input of ``layout`` (entries with ``slot_shape``), each value a real floating
    array of that shape with finite values.
    """
    import numpy as np

    problems: list[str] = []
    for key, value in tensors.items():
        entry = layout.get(key)
        array = np.asarray(value)
        if entry is None:
            problems.append(f"{key}: not a bank input of this graph")
        elif array.dtype.kind != "f":
            problems.append(f"{key}: dtype {array.dtype}, expected real floating point")
        elif tuple(array.shape) != tuple(entry.slot_shape):
            problems.append(f"{key}: shape {tuple(array.shape)}, expected {tuple(entry.slot_shape)}")
        elif not np.isfinite(array).all():
            problems.append(f"{key}: NaN/Inf values")
    return problems
