"""What the exporters can export (asked of optimum's ``TasksManager``), and loading a model with its adapters.

optimum-onnx is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bca_deploy.adapter_io import load_adapter

from .errors import UnsupportedExportError

__all__ = ["supported_tasks", "resolve_task", "load_model", "adapter_names"]


def _tasks_manager():
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return TasksManager


def _model_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def supported_tasks(model_type: str) -> list[str]:
    """The ONNX tasks optimum-onnx can export for ``model_type`` (e.g. ``"llama"``), sorted.

    Raises:
        UnsupportedExportError: optimum-onnx cannot export this architecture at all (the message
            lists the model types it can export).
    """
    manager = _tasks_manager()
    try:
        tasks = manager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        known = sorted(manager._SUPPORTED_MODEL_TYPE)  # the registry optimum itself reads
        raise UnsupportedExportError(
            f"optimum-onnx cannot export model_type {model_type!r} to ONNX. It exports these model types: "
            f"{', '.join(known)}"
        ) from None
    return sorted(tasks)


def resolve_task(model_dir: str | Path, task: str | None = None) -> tuple[str, str]:
    """Check that optimum-onnx can export ``model_dir`` for ``task`` and return ``(task, model_type)``.

    With ``task=None`` the task is inferred from the checkpoint's architecture as optimum does
    (``LlamaForCausalLM`` → ``text-generation``), upgraded to ``<task>-with-past`` where the
    architecture supports it. Synonyms (``causal-lm``, ``sequence-classification``...) are mapped.

    Raises:
        UnsupportedExportError: unknown architecture, a task this architecture cannot be exported
            for (the message lists those it can), or an encoder-decoder model (several graphs; not
            supported by bca-deploy's exporter).
    """
    config = _model_config(model_dir)
    model_type = config.model_type
    tasks = supported_tasks(model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedExportError(
            f"{model_dir}: {model_type} is an encoder-decoder model, which optimum exports as several graphs; "
            "bca-deploy exports single-graph encoder or decoder models (BERT, RoBERTa, Llama, Qwen2, GPT-2...)"
        )
    manager = _tasks_manager()
    if task is None:
        task = _infer_task(config)
        if task is None:
            raise UnsupportedExportError(
                f"{model_dir}: cannot infer the task from its config (architectures={config.architectures}); "
                f"pass task=, one of: {', '.join(tasks)}"
            )
        if f"{task}-with-past" in tasks:
            task = f"{task}-with-past"
    else:
        task = manager.map_from_synonym(task)
    if task not in tasks:
        raise UnsupportedExportError(
            f"optimum-onnx cannot export a {model_type} model for task {task!r}; tasks it supports for "
            f"{model_type}: {', '.join(tasks)}"
        )
    return task, model_type


_TASK_BY_SUFFIX = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForMultipleChoice", "multiple-choice"),
    ("Model", "feature-extraction"),
)


def _infer_task(config) -> str | None:
    """The task of ``config.architectures[0]``, as optimum infers it from a model class.

    optimum cannot infer a task from a local directory, so the class named in config.json is looked
    up in transformers and handed to optimum; a suffix table covers classes optimum does not map.
    """
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return None
    name = architectures[0]
    import transformers

    model_class = getattr(transformers, name, None)
    if model_class is not None:
        try:
            return _tasks_manager()._infer_task_from_model_or_model_class(model_class=model_class)
        except (KeyError, ValueError, RuntimeError):
            pass
    for suffix, task in _TASK_BY_SUFFIX:
        if name.endswith(suffix):
            return task
    return None


def adapter_names(adapter_dirs: Sequence[str | Path]) -> list[str]:
    """One adapter name per directory: its folder name, made unique with a suffix where needed."""
    names: list[str] = []
    for directory in adapter_dirs:
        base = Path(directory).name or "adapter"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def load_model(
    model_dir: str | Path,
    task: str,
    adapter_dirs: Sequence[str | Path] = (),
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load ``model_dir`` with the transformers class optimum uses for ``task``, then every adapter.

    All adapters are active and sum (unmerged). The model is in eval mode on CPU.

    Raises:
        bca_deploy.errors.AdapterMismatchError: an adapter does not fit the model (nothing loaded).
        bca_deploy.errors.AdapterFormatError: an adapter directory is malformed.
    """
    manager = _tasks_manager()
    # No dtype argument: transformers 4.x loads fp32 by default (and renamed torch_dtype to dtype).
    with torch.random.fork_rng():
        # Weights missing from the checkpoint get the same "random" values in every load, so the model
        # that is exported and the reference it is validated against are the same model.
        torch.manual_seed(0)
        model, info = manager.get_model_from_task(
            task, str(model_dir), framework="pt", library_name="transformers", output_loading_info=True
        )
    if dtype != torch.float32:
        model = model.to(dtype)
    # load_adapter aligns paths that differ by base_model_prefix (LlamaForCausalLM vs LlamaModel).
    for directory, name in zip(adapter_dirs, adapter_names(adapter_dirs), strict=True):
        load_adapter(model, directory, adapter_name=name)
    _check_no_random_weights(model, model_dir, task, info.get("missing_keys", []))
    return model.eval()


def _check_no_random_weights(model: nn.Module, model_dir: str | Path, task: str, missing: Sequence[str]) -> None:
    """Refuse a task head that transformers had to initialize at random (the checkpoint lacks it and no
    adapter's ``modules_to_save`` supplied it): such a graph would compute noise. Random weights
    inside the base model (e.g. a pooler a checkpoint was saved without) only get a warning."""
    import warnings

    from bca_deploy.inject import adapter_configs

    supplied = tuple(p + "." for config in adapter_configs(model).values() for p in config.modules_to_save)
    random = sorted(k for k in missing if not k.startswith(supplied))
    if not random:
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_head_model = bool(prefix) and hasattr(model, prefix)
    head = [k for k in random if is_head_model and not k.startswith(prefix + ".")]
    if head:
        raise UnsupportedExportError(
            f"{model_dir} has no weights for {', '.join(head)}: transformers initialized them at random for "
            f"task {task!r}. Export a task the checkpoint was saved for, or train and save that head with the "
            "adapter (modules_to_save)"
        )
    warnings.warn(f"{model_dir}: no weights for {', '.join(random)} (initialized by transformers); they are "
                  "exported as initialized", stacklevel=3)
