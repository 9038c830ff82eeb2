"""Training and evaluation of block-circulant adapters (``bca-deploy train`` / ``evaluate``).

- :func:`train` — fine-tune a transformers model with a BCA adapter (the paper's recipe by default:
  Adadelta, lr 0.1 / p for the kernels, the head trained fully at lr 0.1), on CPU, one GPU, or under
  ``torchrun`` (DDP); checkpoints ``best/`` and ``last/``, exact resume.
- :func:`evaluate` — the task metric of a base model + adapter on a data file.

Run as a module for ``torchrun``: ``torchrun --nproc_per_node 2 -m bca_deploy.training train ...``.
"""

from .data import TASKS, load_causal_lm, load_seq_cls, read_records
from .errors import DataError, DataFileNotFoundError, TrainingConfigError
from .metrics import MetricAccumulator, primary_metric
from .trainer import (
    DEFAULT_LR,
    DEFAULT_TARGETS,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    TrainResult,
    evaluate,
    train,
)

__all__ = [
    "train",
    "evaluate",
    "TrainResult",
    "TASKS",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "PRECISIONS",
    "DEFAULT_LR",
    "DEFAULT_TARGETS",
    "DataError",
    "DataFileNotFoundError",
    "TrainingConfigError",
    "MetricAccumulator",
    "primary_metric",
    "read_records",
    "load_seq_cls",
    "load_causal_lm",
]
