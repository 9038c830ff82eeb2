"""Loading what a run trains: tokenizer, the base model for the task, its head; saving and restoring what
a run trained. The head rules (trained or new, refused when random) live here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TRAINABLE_FILE
from ..errors import BCAError, first_line, format_problems
from ..models import load_saved_tokenizer, position_limit
from .errors import TrainingConfigError

__all__ = ["DEFAULT_TARGETS", "HEAD_MODULE_NAMES", "TRAINABLE_FILE", "quiet_loading", "load_tokenizer",
           "load_model_config", "load_for_training", "require_causal", "empty_for_training", "head_paths",
           "default_modules_to_save",
           "default_targets", "head_param_names", "kernel_block_sizes", "Labels", "BaseHead", "base_head",
           "load_trained", "save_adapter_files"]

# Target modules per model_type. BERT family: every linear layer of the encoder (query, key, value, the
# attention output and both feed-forward layers; "output.dense" matches attention.output.dense and the
# feed-forward output.dense), which beat query+value by 1.3 points of held-out accuracy at the same budget
# with the default recipe's kernel lr (all-MiniLM-L6-v2, SST-2, p=128, 300 x 32: 86.8% vs 85.5%, mean of 2
# seeds; bench/results/train_sweep_seq-cls.md, stage 4) at 6x the kernel parameters; p must divide the
# intermediate size too. Others: the query and value projections (the paper's choice).
_BERT_LINEAR = ["query", "key", "value", "output.dense", "intermediate.dense"]
DEFAULT_TARGETS = {
    "bert": list(_BERT_LINEAR),
    "roberta": list(_BERT_LINEAR),
    "xlm-roberta": list(_BERT_LINEAR),
    "electra": list(_BERT_LINEAR),
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    # The rest as PEFT's own defaults for these model types (its LoRA / C3A target mapping; phi's without fc1/fc2, so
    # every decoder gets its attention projections only): the fused query-key-value projection where there is one.
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "modernbert": ["Wqkv"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    # exported model types PEFT has no default for: their query and value projections
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
    "smollm3": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
}
HEAD_MODULE_NAMES = ("classifier", "score")


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' "newly initialized ... You should probably TRAIN this model" (and its progress bars)
    while loading.

    On our paths that warning is wrong or redundant: a new head is trained (and reported in the start-up
    summary), or the head is restored from the adapter right after loading.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # 5.x draws a "Loading weights" bar even for a tiny model (and under --no-progress)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir):
    load_model_config(model_dir)  # AutoTokenizer reads config.json too: a missing or malformed one is named as such
    try:
        with quiet_loading():
            tokenizer = load_saved_tokenizer(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many types (a broken tokenizer.json:
        # tokenizers' own Exception), each the same refusal here
        raise TrainingConfigError(
            f"--model {model_dir}: cannot load a tokenizer ({type(exc).__name__}: {first_line(exc, 200)}); save the "
            "model's tokenizer there (from Python: pass tokenizer= to train() or evaluate())"
        ) from None
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else tokenizer.unk_token
    return tokenizer


def fit_max_length(max_length: int, model_config, tokenizer=None, warn=None) -> int:
    """``max_length``, or the model's :func:`position_limit` where that is lower (one example longer than the
    position table fails in the forward pass); ``warn`` gets a line saying so."""
    limit = position_limit(model_config, tokenizer)
    if limit is None or max_length <= limit:
        return max_length
    if warn is not None:
        warn(f"max_length {max_length} is more than the model's {limit} positions: examples are cut at {limit} tokens")
    return limit


def load_model_config(model_dir):
    """``--model``'s transformers config (:func:`bca_deploy.models.load_config`: the one reader)."""
    from ..models import load_config

    return load_config(model_dir)


# what transformers raises for a model directory it cannot build a model from
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)


def _head_config(head: Labels | None) -> dict[str, Any]:
    """The config values of a seq-cls model for ``head``'s classes (the same whether the weights are read or not)."""
    assert head is not None
    return dict(num_labels=head.num_labels, id2label=dict(enumerate(head.names)),
                label2id={n: i for i, n in enumerate(head.names)}, problem_type=head.problem_type)


def load_for_training(model_dir, task: str, dtype: torch.dtype, head: Labels | None = None,
                new_head: bool = False) -> tuple[nn.Module, list[str]]:
    """The transformers model for ``task`` and the parameter names it had to initialise (missing or resized).

    seq-cls: ``AutoModelForSequenceClassification`` with ``head``'s classes, names and problem type; a
    trained head of another size is replaced only when ``new_head`` (checked by the caller before).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..errors import CheckpointFormatError
    from ..models import require_config_fits_weights, require_readable_weights

    # never the directory's own Python code (auto_map): transformers would ask on a terminal, and run it on "y"
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, "trust_remote_code": False}
    try:
        require_readable_weights(model_dir)
        require_config_fits_weights(model_dir)  # from the headers, before from_pretrained builds the config's model
        with quiet_loading():
            if task == "seq-cls":
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    str(model_dir), ignore_mismatched_sizes=new_head, **_head_config(head), **kwargs)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except CheckpointFormatError:
        raise
    except _LOAD_ERRORS as exc:
        raise TrainingConfigError(f"--model {model_dir}: cannot load it for {task} ({first_line(exc)})") from None
    except BCAError:
        raise
    except Exception as exc:  # noqa: BLE001 - config.json and the weights disagree, no memory holds the config's model,
        # or transformers cannot build it (a negative vocab_size, an unknown activation): the checkpoint's error
        from ..models import config_mismatch

        raise config_mismatch(model_dir, exc) from None
    if task == "causal-lm":
        require_causal(model, model_dir)
    if Path(model_dir).is_dir():
        # recorded in the adapter as base_model_name_or_path (what convert --to peft hands AutoPeftModelFor*): a path
        # typed relative to where training ran would name another directory, or none, wherever else it is read
        model.config._name_or_path = os.path.abspath(model_dir)
    new = list(info.get("missing_keys", []))
    new += [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])]
    return model, new


#: How far the outputs at earlier positions may move when only the last token changes before the model counts as
#: reading later tokens: a causal model's move by nothing (rounding at most); a BERT read both ways, even random
#: and tiny, by ~1e-2 of its largest logit.
_CAUSAL_RTOL = 1e-4


def require_causal(model: nn.Module, model_dir) -> None:
    """Raise :class:`TrainingConfigError` if ``model``'s outputs at a position depend on later tokens.

    ``AutoModelForCausalLM`` builds a BERT-family encoder (BERT, RoBERTa, ELECTRA, ... checkpoints, all-MiniLM-L6-v2)
    as its ``*LMHeadModel`` / ``*ForCausalLM``, which attends both ways unless its config says ``is_decoder``: a
    next-token loss on it trains the model to read the answer, and its held-out perplexity says it learnt. Checked
    by behaviour, so it holds for any architecture: two forward passes of four tokens that differ in the last one.
    """
    embeddings = model.get_input_embeddings()
    vocabulary = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None),
                                                                        "vocab_size", None)
    if not vocabulary or vocabulary < 3:
        return
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    if device is None:
        return
    first = torch.tensor([[1, 2, 1, 2]], device=device) % vocabulary  # (1, 4)
    other = first.clone()
    other[0, -1] = (int(first[0, -1]) + 1) % vocabulary
    was_training = model.training
    model.eval()  # no dropout: both passes must see the same network
    try:
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
                      for ids in (first, other)]  # (3, vocab) each: the positions before the changed token
    finally:
        model.train(was_training)
    moved = (logits[0] - logits[1]).abs().max().item()
    if moved > _CAUSAL_RTOL * max(logits[0].abs().max().item(), 1e-6):
        model_type = getattr(model.config, "model_type", None)
        raise TrainingConfigError(
            f"--model {model_dir}: --task causal-lm needs a causal language model (a decoder such as Llama, Qwen2, "
            f"GPT-2), but this {model_type or type(model).__name__} model reads later tokens (its "
            f"{type(model).__name__} attends both ways, as an encoder does): a next-token loss would train it to read "
            "the answer. Train a decoder checkpoint with --task causal-lm, or this one with --task seq-cls")


def empty_for_training(model_dir, task: str, dtype: torch.dtype, head: Labels | None = None) -> nn.Module:
    """The model :func:`load_for_training` builds, on the meta device: its structure and config, no weights read
    and no memory taken. For the FSDP ranks other than the first, which receive their shards' values from it
    (:func:`bca_deploy.training.sharding.shard_from_first`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False,
                                                **(_head_config(head) if task == "seq-cls" else {}))
            with torch.device("meta"):
                factory = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
                model = factory.from_config(config)
    except _LOAD_ERRORS as exc:
        raise TrainingConfigError(f"--model {model_dir}: cannot load it for {task} ({first_line(exc)})") from None
    return model.to(dtype)


def head_paths(model: nn.Module) -> list[str]:
    """The outermost ``classifier``/``score`` modules of a classification model."""
    paths = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in HEAD_MODULE_NAMES]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def default_modules_to_save(model: nn.Module, task: str, missing_keys: Sequence[str]) -> list[str]:
    """Modules to train fully: the task head (``classifier``/``score``) and any module the checkpoint lacked."""
    candidates = {k.rpartition(".")[0] for k in missing_keys if "." in k}
    if task == "seq-cls":
        candidates |= set(head_paths(model))
    present = {n for n, _ in model.named_modules() if n}
    paths = sorted(c for c in candidates if c in present)
    # keep outermost modules only ("classifier" covers "classifier.dense")
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TrainingConfigError(
        f"no default target modules for model_type {model_type!r}: pass --targets, e.g. the query and value "
        f"projections; defaults exist for {', '.join(sorted(DEFAULT_TARGETS))}"
    )


def head_param_names(model: nn.Module, modules_to_save: Sequence[str]) -> set[str]:
    """Trainable parameters inside a ``modules_to_save`` module (matched as a path component run)."""
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        for entry in modules_to_save:
            e = entry.split(".")
            if any(parts[i : i + len(e)] == e for i in range(len(parts) - len(e) + 1)):
                names.add(name)
                break
    return names


def kernel_block_sizes(model: nn.Module) -> dict[str, int]:
    """Kernel parameter name -> its block size p."""
    from ..inject import bca_layers

    out = {}
    for path, layer in bca_layers(model):
        for adapter in layer.bca_kernels:
            out[f"{path}.bca_kernels.{adapter}"] = layer.block_sizes[adapter]
    return out


@dataclass
class Labels:
    """The classes of a seq-cls run: how many, their names (id order), and the head they train."""

    num_labels: int
    names: list[str]
    regression: bool
    head: str  # "new", "trained" (the base model's, trained further), "base" (--no-head), "given" (model=)

    @property
    def problem_type(self) -> str:
        return "regression" if self.regression else "single_label_classification"


@dataclass
class BaseHead:
    """What the base model brings for seq-cls: a trained classification head or none."""

    trained: bool
    num_labels: int | None
    names: list[str] | None  # real class names from its config (not LABEL_i), if any
    architecture: str | None


def base_head(model_config: Any, model: nn.Module | None) -> BaseHead:
    architectures = list(getattr(model_config, "architectures", None) or [])
    if model is not None:
        architectures = [type(model).__name__]
    trained = any(a.endswith("ForSequenceClassification") for a in architectures)
    names = None
    raw = dict(getattr(model_config, "id2label", None) or {})
    num = getattr(model_config, "num_labels", None) if trained else None
    if trained and num and len(raw) == num:
        id2label = {int(k): str(v) for k, v in raw.items()}
        if sorted(id2label) == list(range(num)) and any(v != f"LABEL_{k}" for k, v in id2label.items()):
            names = [id2label[i] for i in range(num)]
    return BaseHead(trained, num, names, architectures[0] if architectures else None)


def load_trained(model: nn.Module, adapter_dir: Path, method: str) -> set[str]:
    """Apply what :func:`train` saved: a BCA adapter, or the trainable parameters (head-only/custom).

    Returns:
        The names of the parameters restored from the trainable tensors (empty for an adapter).
    """
    if (adapter_dir / "adapter_config.json").is_file():
        from ..adapter_io import load_adapter

        load_adapter(model, adapter_dir)
        return set()
    path = adapter_dir / TRAINABLE_FILE
    if not path.is_file():
        raise TrainingConfigError(f"{adapter_dir}: neither adapter_config.json nor {TRAINABLE_FILE} found")
    from ..adapter_io import load_safetensors
    from ..errors import AdapterMismatchError, CheckpointFormatError
    from ..merge import read_safetensors_header
    from .checkpoint import trained_value_problems

    try:  # the one header rule (offsets, sizes, the file's length), then names, shapes and dtypes, before any data:
        header = read_safetensors_header(path)  # a tensor declared larger than its parameter was read whole first
    except CheckpointFormatError as exc:
        raise TrainingConfigError(str(exc)) from None
    params = dict(model.named_parameters())
    problems = [f"{t.name}: no such parameter in {type(model).__name__}" for t in header.tensors
                if t.name not in params]
    problems += [f"{t.name}: shape {t.shape}, the model's is {tuple(params[t.name].shape)}"
                 for t in header.tensors if t.name in params and tuple(params[t.name].shape) != t.shape]
    # what train writes (the rule resume reads its trainer state by): dtypes from the header, before any data
    problems += trained_value_problems({t.name: t for t in header.tensors})
    if problems:
        raise AdapterMismatchError(format_problems(f"{path} does not fit the model:", problems))
    try:
        state, _ = load_safetensors(path)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise TrainingConfigError(f"{path}: cannot read safetensors file ({exc})") from None
    damaged = trained_value_problems(state)  # the values, once read
    if damaged:
        raise TrainingConfigError(format_problems(f"{path}: the trained tensors are damaged:", damaged))
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.to(params[key].dtype))
    model.eval()
    return set(state)


def save_adapter_files(model: nn.Module, directory: Path, method: str,
                       values: Mapping[str, torch.Tensor] | None = None) -> None:
    """The run's adapter (``--method bca``) or its trainable tensors into ``directory``; ``values``: whole
    tensors by parameter name in place of the model's own (a sharded run's gathered parameters)."""
    if method == "bca":
        from ..adapter_io import save_adapter

        save_adapter(model, directory, values=values)
        return
    from ..adapter_io import save_safetensors

    values = values or {}
    state = {n: values.get(n, p).detach().float().cpu().contiguous() for n, p in model.named_parameters()
             if p.requires_grad}
    save_safetensors(state, directory / TRAINABLE_FILE, {"format": "pt"})
