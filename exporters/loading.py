"""What the exporters export, and the task of an export (from the adapters, the checkpoint or the caller).

Loading the model itself is :func:`bca_deploy.models.load_model` (one loader for every stage). Nothing
here imports optimum: exports run on transformers 4.x and 5.x through ``torch.onnx.export``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bca_deploy.models import ModelTask, adapter_names
from bca_deploy.models import load_model as _load_for_task
from bca_deploy.models import resolve_task as _resolve_model_task

from .errors import UnsupportedExportError

__all__ = ["ENCODER_TASKS", "DECODER_TASKS", "ENCODER_MODEL_TYPES", "DECODER_MODEL_TYPES", "NOT_EXPORTED",
           "NOT_EXPORTED_SETTINGS",
           "supported_tasks", "architecture_problem", "hybrid_attention_problem", "mixture_of_experts_problem",
           "rope_type", "rope_switch_length", "is_decoder", "resolve_task", "resolve_export_task", "load_model",
           "adapter_names", "AdapterExport", "adapter_export"]

#: Tasks of an encoder graph (no past): the last hidden state, or a classifier's logits.
ENCODER_TASKS = ("feature-extraction", "text-classification")
#: Tasks of a decoder graph: logits or hidden states, each with or without past key/values.
DECODER_TASKS = ("feature-extraction", "feature-extraction-with-past", "text-classification", "text-generation",
                 "text-generation-with-past")
#: Architectures (``config.model_type``) whose export is tested on transformers 4.57 and 5.x, both merged
#: and unmerged (see tests/exporters). Others are refused rather than exported untested.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "albert", "mpnet",
                       "modernbert")
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "phi3", "gemma2", "gemma3_text",
                       "smollm3", "olmo2", "granite", "stablelm", "phi", "gptj", "gpt_neox", "falcon")
#: Architectures transformers has whose export was tried here and is not exact, with why: refused by name (other
#: types outside the lists above are refused as untested). Mixture-of-experts configs of any type are refused by
#: :func:`mixture_of_experts_problem`, settings of an exported type by :data:`NOT_EXPORTED_SETTINGS`.
NOT_EXPORTED = {
    "cohere": "its rotary embedding interleaves the halves it rotates (repeat_interleave), which the TorchScript "
              "exporter cannot write (torch.onnx.export fails with 'All tensors must have the same rank', on both "
              "transformers lines)",
    "cohere2": "its rotary embedding interleaves the halves it rotates, as Cohere's, which the TorchScript exporter "
               "cannot write",
}
#: ``(model_type, config field)`` of an exported type whose graph is not exact where the field is set, with why.
NOT_EXPORTED_SETTINGS = {
    ("falcon", "alibi"): "ALiBi positions (Falcon-RW): the traced graph types the ALiBi slopes complex128, which "
                         "onnxruntime refuses to load (both transformers lines); Falcon with rotary positions (the "
                         "default) exports",
}


def is_decoder(model_type: str) -> bool:
    """Whether ``model_type`` exports as a decoder (causal attention, position ids, past key/values)."""
    return model_type in DECODER_MODEL_TYPES


def supported_tasks(model_type: str) -> list[str]:
    """The ONNX tasks bca-deploy exports for ``model_type`` (e.g. ``"llama"``), sorted.

    Raises:
        UnsupportedExportError: an architecture bca-deploy does not export (the message lists those it does).
    """
    if model_type in ENCODER_MODEL_TYPES:
        return sorted(ENCODER_TASKS)
    if model_type in DECODER_MODEL_TYPES:
        return sorted(DECODER_TASKS)
    why = f": {NOT_EXPORTED[model_type]}" if model_type in NOT_EXPORTED else ""
    raise UnsupportedExportError(
        f"bca-deploy cannot export model_type {model_type!r} to ONNX{why}. It exports these model types: "
        f"{', '.join(sorted(ENCODER_MODEL_TYPES + DECODER_MODEL_TYPES))}"
    )


def _transformers_version(given: str | None) -> tuple[str, int]:
    """``(version, major)`` of ``given``, or of the installed transformers when None."""
    if given is None:
        import transformers

        given = transformers.__version__
    return given, int(given.split(".")[0])


def hybrid_attention_problem(config, transformers_version: str | None = None) -> str | None:
    """Why a config's mix of full and sliding-window attention layers cannot be exported here, or None.

    On transformers 4.x, a decoder whose ``layer_types`` mixes ``full_attention`` and ``sliding_attention``
    (Qwen2/Qwen3 with ``use_sliding_window`` and ``max_window_layers`` below the layer count) traces a graph
    whose sliding layers are wrong once a row outgrows the window; it validates on short rows, so it is
    refused up front. Measured on tiny models (window 16, rows of 36 tokens): 0.27 max abs logit error on
    4.57, exact on 5.x; all-sliding (Mistral, Phi-3, Qwen2 with ``max_window_layers=0``) and all-full
    configs are exact on both lines.
    """
    transformers_version, major = _transformers_version(transformers_version)
    if major >= 5:
        return None
    kinds = set(getattr(config, "layer_types", None) or ())
    if not {"full_attention", "sliding_attention"} <= kinds:
        return None
    return (f"this {config.model_type} config mixes full and sliding-window attention layers (layer_types "
            f"{list(config.layer_types)}, sliding_window {getattr(config, 'sliding_window', None)}); on "
            f"transformers {transformers_version} its exported graph would be wrong for rows longer than the "
            "window. Export it with transformers 5.x (the README's transformers 5.x stack), where it is exact")


def mixture_of_experts_problem(config) -> str | None:
    """Why a mixture-of-experts config (any of its fields counting experts, ``num_experts``, ``num_local_experts``,
    ``n_routed_experts``..., above 1) cannot be exported, or None.

    The router sends each token to its experts by data-dependent indexing, which a traced graph freezes to the
    trace example's routing. Measured on a tiny Qwen3-MoE: on transformers 4.57 a classifier's graph passed export
    validation, and the same model's bank graph then failed in onnxruntime on mixed rows (a ``Split`` of the
    example's expert sizes); with past, validation failed the same way; on 5.x ``torch.onnx.export`` fails
    (``aten::histc``). Merging is exact.
    """
    from bca_deploy.models import config_counts

    experts = [(field, count) for field, count in config_counts(config.to_dict())
               if field.endswith("experts") and count > 1]
    if not experts:
        return None
    field, count = experts[0]
    return (f"bca-deploy cannot export model_type {config.model_type!r} to ONNX: this config is a mixture-of-experts "
            f"model ({field} {count}), whose router picks each token's experts by data-dependent indexing, which a "
            "traced graph freezes to the example's routing. `bca-deploy merge` still writes the adapted model as a "
            "standalone transformers checkpoint, for transformers or another runtime")


def rope_type(config) -> str | None:
    """The RoPE scaling type of a decoder config (``"longrope"``, ``"dynamic"``, ``"yarn"``...), or None for plain
    RoPE or none: ``rope_parameters["rope_type"]`` on transformers 5.x, ``rope_scaling``'s ``rope_type`` (or its
    older ``type``) on 4.x."""
    for field in ("rope_parameters", "rope_scaling"):
        params = getattr(config, field, None)
        if isinstance(params, dict):
            kind = params.get("rope_type", params.get("type"))
            if isinstance(kind, str) and kind != "default":
                return kind
    return None


def rope_switch_length(config, transformers_version: str | None = None) -> int | None:
    """The positions past which a ``longrope`` config (Phi-3 128k style) switches from its short to its long
    factors, by transformers' own rule, or None for any other config.

    transformers picks the long factors when ``max(position_ids) + 1`` exceeds this length:
    ``rope_parameters["original_max_position_embeddings"]`` on 5.x; on 4.x the config's own
    ``original_max_position_embeddings`` where it has that field (Phi-3), else ``max_position_embeddings``
    (so a 4.x Llama never switches within its positions). The export traces the switch as a graph op
    (:func:`bca_deploy.exporters.export`), and validation tries rows across it where they are short
    (:func:`bca_deploy.exporters.validate.check_cases`).
    """
    if rope_type(config) != "longrope":
        return None
    _, major = _transformers_version(transformers_version)
    params = getattr(config, "rope_parameters", None) if major >= 5 else None
    if isinstance(params, dict) and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    if hasattr(config, "original_max_position_embeddings") and config.original_max_position_embeddings:
        return int(config.original_max_position_embeddings)
    return int(config.max_position_embeddings)


def architecture_problem(model_dir: str | Path, config) -> str | None:
    """Why ``model_dir`` (whose config is ``config``) cannot be exported whatever its adapters and task, or None:
    an encoder-decoder model, a mixture-of-experts model, a model type bca-deploy does not export (with why, for
    those in :data:`NOT_EXPORTED`), a setting of its type it does not (:data:`NOT_EXPORTED_SETTINGS`), or a
    hybrid-attention config on transformers 4.x. The one rule for
    :func:`resolve_export_task` and for the next commands ``train`` prints."""
    if getattr(config, "is_encoder_decoder", False):
        return (f"{model_dir}: {config.model_type} is an encoder-decoder model (several graphs); bca-deploy exports "
                "single-graph encoder or decoder models (BERT, RoBERTa, Llama, Qwen2, GPT-2...)")
    problem = mixture_of_experts_problem(config)
    if problem:
        return f"{model_dir}: {problem}"
    try:
        supported_tasks(config.model_type)
    except UnsupportedExportError as exc:
        return f"{model_dir}: {exc}"
    for (model_type, field), why in NOT_EXPORTED_SETTINGS.items():
        if config.model_type == model_type and getattr(config, field, None):
            return (f"{model_dir}: bca-deploy cannot export this {model_type} config ({field}="
                    f"{getattr(config, field)!r}) to ONNX: {why}")
    problem = hybrid_attention_problem(config)
    return f"{model_dir}: {problem}" if problem else None


def resolve_export_task(
    model_dir: str | Path, adapter_dirs: Sequence[str | Path] = (), task: str | None = None, *, bank: bool = False,
) -> ModelTask:
    """The task to export ``model_dir`` with ``adapter_dirs`` for, checked against what the architecture supports.

    ``task`` (if given) must agree with the adapters' recorded task; without it the adapters' task is
    used (seq-cls → ``text-classification`` with the adapter's head; causal-lm →
    ``text-generation-with-past``), else the checkpoint's architecture (decoders with past). ``bank``:
    adapters may bring different heads (a bank graph holds one per adapter).

    Raises:
        UnsupportedExportError: an architecture or task bca-deploy does not export (the message lists
            what it does), an encoder-decoder model, or a hybrid-attention config on transformers 4.x
            (:func:`hybrid_attention_problem`).
        bca_deploy.models.TaskError: ``task`` contradicts the adapters (see :func:`bca_deploy.models.resolve_task`).
    """
    from bca_deploy.models import load_config

    config = load_config(model_dir)
    problem = architecture_problem(model_dir, config)
    if problem:
        raise UnsupportedExportError(problem)
    resolved = _resolve_model_task(model_dir, adapter_dirs, task, model_config=config, one_head=not bank)
    problem = _task_problem(config.model_type, resolved.export_task, resolved.source)
    if problem:
        raise UnsupportedExportError(problem)
    return resolved


def _task_problem(model_type: str, export_task: str, source: str) -> str | None:
    """Why a ``model_type`` model is not exported for ``export_task`` (decided by ``source``, for the message), or
    None. Raises :class:`UnsupportedExportError` for a model type not exported at all (:func:`supported_tasks`)."""
    tasks = supported_tasks(model_type)
    if export_task in tasks:
        return None
    return (f"bca-deploy cannot export a {model_type} model for task {export_task!r} (from {source}); tasks it "
            f"exports for {model_type}: {', '.join(tasks)}. `bca-deploy merge` still writes the adapted model as a "
            "standalone transformers checkpoint (its head included), for transformers or another exporter")


@dataclasses.dataclass(frozen=True)
class AdapterExport:
    """What ``bca-deploy export`` would do with one adapter (:func:`adapter_export`).

    Attributes:
        task: the export task (``text-generation-with-past``...); None when refused, or when it is the base
            checkpoint's to decide (the adapter records no task and its base is not a local directory).
        problem: why export refuses the adapter (its own message); None when it does not.
        base: the local base checkpoint this was decided against (the adapter's ``base_model_name_or_path``, see
            :func:`bca_deploy.adapter_io.local_base_dir`); None when decided from the adapter alone (its recorded
            ``model_type`` and task), so the checkpoint passed with ``--model`` may still be refused.
    """

    task: str | None
    problem: str | None
    base: Path | None


def adapter_export(adapter_dir: str | Path) -> AdapterExport:
    """What ``bca-deploy export --adapter adapter_dir`` would export, by the rule export applies
    (:func:`resolve_export_task`): against the adapter's recorded base checkpoint when that is a local directory
    (its architecture, config and the adapter's fit to it), else from what the adapter records (its base
    ``model_type`` against :func:`supported_tasks`, its task). Never raises for an adapter or base it refuses."""
    from bca_deploy.adapter_io import local_base_dir, read_adapter_header
    from bca_deploy.errors import BCAError

    adapter_dir = Path(adapter_dir)
    try:
        config = read_adapter_header(adapter_dir).config
    except (BCAError, OSError) as exc:
        return AdapterExport(None, str(exc), None)
    base = local_base_dir(config.base_model_name_or_path)
    if base is not None:
        try:
            return AdapterExport(resolve_export_task(base, [adapter_dir]).export_task, None, base)
        except (BCAError, OSError) as exc:  # refused (or the base is unreadable): export says the same
            return AdapterExport(None, str(exc), base)
    task = config.task.export_task if config.task is not None else None
    model_type = config.base_model_type
    if model_type:
        try:
            supported_tasks(model_type)
        except UnsupportedExportError as exc:
            return AdapterExport(None, str(exc), None)
        if task and (problem := _task_problem(model_type, task, f"adapter {adapter_dir}")):
            return AdapterExport(None, problem, None)
    return AdapterExport(task, None, None)


def resolve_task(model_dir: str | Path, task: str | None = None,
                 adapter_dirs: Sequence[str | Path] = ()) -> tuple[str, str]:
    """``(export task, model_type)`` of :func:`resolve_export_task`."""
    from bca_deploy.models import load_config

    resolved = resolve_export_task(model_dir, adapter_dirs, task)
    return resolved.export_task, load_config(model_dir).model_type


def load_model(
    model_dir: str | Path,
    task: str | ModelTask | None,
    adapter_dirs: Sequence[str | Path] = (),
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """:func:`bca_deploy.models.load_model` with the exporters' argument order: the model a graph is
    exported from and validated against (fp32, eval mode, every adapter active and unmerged)."""
    return _load_for_task(model_dir, adapter_dirs, task, dtype=dtype)
