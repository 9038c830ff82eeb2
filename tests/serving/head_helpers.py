"""Classifier-head adapters on tiny models, and their own PyTorch models, for the head-bank tests.

Each adapter is what ``bca-deploy train`` leaves for a sequence classifier: BCA kernels plus its head
saved whole (``modules_to_save``), with the task recorded (``task.head``: num_labels, id2label). Its
**own model** (the reference every bank row is compared with) is built the way a user would, without
any bank code: ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=..., id2label=...)``
then ``load_adapter`` (which restores the head from the adapter).

Architectures (hidden size 32, vocabulary 128, 2 layers, seeded):

- ``bert``: base = a bare ``BertModel`` with its pooler (no classifier: base rows have no head);
- ``roberta``: base = a ``RobertaForSequenceClassification`` checkpoint with its own 3-label head
  (dense + tanh + out_proj on ``<s>``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bca_deploy import inject, load_adapter, read_adapter, save_adapter
from bca_deploy.config import task_spec_from_config
from bca_deploy.inject import adapter_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
BASE_LABELS = {"roberta": {0: "low", 1: "mid", 2: "high"}}


def build_base(arch: str) -> torch.nn.Module:
    """The seeded base checkpoint of ``arch`` (see the module docstring)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        return tf.BertModel(cfg)
    if arch == "roberta":
        labels = BASE_LABELS["roberta"]
        cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=66, num_labels=3, id2label=labels,
                               label2id={v: k for k, v in labels.items()})
        model = tf.RobertaForSequenceClassification(cfg)
        _widen_head(model, 0)
        return model
    raise KeyError(arch)


def _widen_head(model: torch.nn.Module, seed: int, modules: list[str] | None = None) -> None:
    """Redraw the head's Linear layers (or those of ``modules``) with std 1/sqrt(in): transformers' std 0.02
    squashes every difference."""
    generator = torch.Generator().manual_seed(1000 + seed)
    paths = modules or ["classifier"]
    with torch.no_grad():
        for module in (m for path in paths for m in model.get_submodule(path).modules()):
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)


def save_base(arch: str, directory: Path) -> Path:
    build_base(arch).save_pretrained(directory)
    return directory


def save_kernel_adapter(base_dir: Path, directory: Path, targets: list[str], block_size: int, seed: int) -> Path:
    """A kernel-only adapter (no head) trained in the checkpoint's own class."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base_dir)
    is_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    model = (AutoModelForSequenceClassification if is_head else AutoModel).from_pretrained(base_dir)
    inject(model, targets, block_size=block_size, init="normal", init_std=0.1, seed=seed)
    save_adapter(model, directory)
    return directory


def save_head_adapter(base_dir: Path, directory: Path, labels: list[str], targets: list[str],
                      block_size: int, seed: int, modules_to_save: list[str] | None = None) -> Path:
    """Train-like classifier adapter: non-zero kernels and a non-trivial head of ``len(labels)`` labels."""
    from transformers import AutoModelForSequenceClassification

    id2label = dict(enumerate(labels))
    torch.manual_seed(seed)
    # ignore_mismatched_sizes: a checkpoint with a head of another label count (its label layer is redrawn)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True)
    saved = modules_to_save or ["classifier"]
    _widen_head(model, seed, [m for m in saved if m.split(".")[0] == "classifier"])
    inject(model, targets, block_size=block_size, init="normal", init_std=0.1, seed=seed, modules_to_save=saved)
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, saved)
    save_adapter(model, directory)
    return directory


def own_model(base_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The PyTorch model a user would build for one adapter (or the base checkpoint alone), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    if adapter_dir is None:
        return AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    config, _ = read_adapter(adapter_dir)
    kwargs = {}
    if config.task is not None and config.task.head is not None:
        head = config.task.head
        kwargs = {"num_labels": head.num_labels, "id2label": dict(head.id2label), "label2id": dict(head.label2id),
                  "ignore_mismatched_sizes": True}  # the head comes from the adapter
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, **kwargs)
    return load_adapter(model, adapter_dir).eval()


def own_logits(model: torch.nn.Module, row: list[int]) -> np.ndarray:
    """Logits (num_labels,) of one unpadded row, float64."""
    x = torch.tensor([list(row)])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].double().numpy()


def token_rows(n: int, seed: int, low: int = 2, high: int = 9) -> list[list[int]]:
    """``n`` random rows of ids in [3, VOCAB) (never a pad or special id), lengths in [low, high)."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(low, high)))] for _ in range(n)]
