"""Training and evaluation of block-circulant adapters (``bca-deploy train`` / ``evaluate``).

- :class:`TrainConfig` — every option of a run (typed, with help text; validation lists every problem);
  :data:`RECIPES` — the named optimisation defaults (``default``, chosen by measurement; ``paper``).
- :func:`train` — ``train(config, *, model=None, tokenizer=None, on_step=None)``: fine-tune a transformers
  model with a BCA adapter on CPU, one GPU, or under ``torchrun`` (DDP); checkpoints ``best/`` and
  ``last/``, exact resume; the adapter records its task, head and labels.
- :func:`evaluate` — ``evaluate(EvaluateConfig(...))``: the task metric of a base model + adapter on a file.

Run as a module for ``torchrun``: ``torchrun --nproc_per_node 2 -m bca_deploy.training train ...`` (the same
command as ``bca-deploy train``).

Names are imported on first use, so ``import bca_deploy.training.config`` (what ``--help`` needs) does not
import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# name -> module that defines it (relative to this package)
_EXPORTS = {
    "TrainConfig": ".config",
    "EvaluateConfig": ".config",
    "Recipe": ".config",
    "RECIPES": ".config",
    "recipe_for": ".config",
    "TASKS": ".config",
    "METHODS": ".config",
    "OPTIMIZERS": ".config",
    "SCHEDULERS": ".config",
    "PRECISIONS": ".config",
    "DataError": ".errors",
    "DataFileNotFoundError": ".errors",
    "TrainingConfigError": ".errors",
    "CheckpointError": ".errors",
    "TrainingDivergedError": ".errors",
    "TrainingTerminated": ".errors",
    "train": ".trainer",
    "evaluate": ".evaluation",
    "TrainResult": ".trainer",
    "DEFAULT_TARGETS": ".trainer",
    "MetricAccumulator": ".metrics",
    "primary_metric": ".metrics",
    "read_records": ".data",
    "load_seq_cls": ".data",
    "load_causal_lm": ".data",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
