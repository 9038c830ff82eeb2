"""The options of ``bca-deploy train`` / ``evaluate`` as typed dataclasses, and the named recipes.

One definition serves every entry point: :class:`TrainConfig` is what :func:`bca_deploy.training.train`
takes, and both ``bca-deploy train`` and ``python -m bca_deploy.training train`` (torchrun) are generated
from its fields (:mod:`bca_deploy.training.cli`), so they have the same options, help and checks.
Each field carries its help text, its choices and its command-line kind in ``metadata``;
:meth:`TrainConfig.validate` reports every problem at once, naming the option.

Optimisation fields left as None take the recipe's value (:data:`RECIPES`); an explicit value always
wins over the recipe. This module imports neither torch nor transformers (``--help`` stays instant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import format_problems
from .errors import TrainingConfigError

__all__ = [
    "TASKS",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "PRECISIONS",
    "METRICS",
    "Recipe",
    "RECIPES",
    "recipe_for",
    "TrainConfig",
    "EvaluateConfig",
    "option_flag",
    "seed_range_problem",
]

TASKS = ("seq-cls", "causal-lm")
METHODS = ("bca", "head-only", "custom")
OPTIMIZERS = ("adamw", "adadelta")
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
METRICS = ("accuracy", "f1", "macro_f1", "mcc", "pearson", "mse", "loss", "perplexity")


# ---- recipes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A named set of optimisation defaults; every value can be overridden by its own option.

    Attributes:
        name / summary: how the recipe is called and a one-line description (start-up summary, --help).
        optimizer: ``adamw`` or ``adadelta``.
        lr: learning rate of the adapter kernels (divided by p when ``lr_divide_by_block_size``).
        head_lr: learning rate of the head and other ``modules_to_save`` (never divided).
        lr_divide_by_block_size: the BCA paper's heuristic α ← α/p for the kernels.
        weight_decay / scheduler / warmup_ratio / max_grad_norm: as the options of the same names
            (``max_grad_norm`` 0: no clipping).
        scaling: ΔW = scaling · BlockCirculant(w) for new adapters; ``"p"``: each module's own block size.
        adadelta_rho / adadelta_eps: Adadelta's decay and ε (used with ``optimizer="adadelta"``).
    """

    name: str
    summary: str
    optimizer: str
    lr: float
    head_lr: float
    lr_divide_by_block_size: bool
    weight_decay: float
    scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    scaling: float | str = 1.0
    adadelta_rho: float = 0.9
    adadelta_eps: float = 1e-6


# Chosen by bench/train_sweep.py on rows of SST-2 train.tsv that are never trained on (seq-cls) and on a
# tiny Llama pre-trained in-process then adapted to another text distribution (causal-lm); see
# bench/results/train_sweep_*.md for every candidate and README "Training" for why.
# seq-cls, stage 4 (mean of 2 seeds, held-out accuracy): with every linear layer of the encoder adapted
# (DEFAULT_TARGETS, BERT family) the kernels want a smaller lr than the new head: kernels 1e-3 / head 3e-3
# reached 86.8% against 85.5% for the earlier default (3e-3 / 3e-3 on query+value), while 3e-3 on every layer
# fell to 82.7%. On query+value alone, kernels at 1e-3 (85.4%) or 3e-3 were equal.
# causal-lm, stages 1 and 2 (held-out perplexity; the pre-trained base: 1,490): kernels at 3e-2 reached 369 / 371
# (2 seeds), 5e-2 369 / 372, 1e-1 392 / 408, 1e-2 417, 3e-3 566, 1e-3 782. A decoder adapter has no new head:
# head_lr only applies to --modules-to-save modules, which stay at the seq-cls head's 3e-3 (a whole dense layer).
RECIPES: dict[str, dict[str, Recipe]] = {
    "default": {
        "seq-cls": Recipe(
            name="default", summary="AdamW, lr 1e-3 (kernels), 3e-3 (head), linear decay after 6% warmup, clip 1.0",
            optimizer="adamw", lr=1e-3, head_lr=3e-3, lr_divide_by_block_size=False, weight_decay=0.0,
            scheduler="linear", warmup_ratio=0.06, max_grad_norm=1.0),
        "causal-lm": Recipe(
            name="default", summary="AdamW, lr 3e-2 (kernels), 3e-3 (saved modules), linear decay after 6% warmup, "
            "clip 1.0",
            optimizer="adamw", lr=3e-2, head_lr=3e-3, lr_divide_by_block_size=False, weight_decay=0.0,
            scheduler="linear", warmup_ratio=0.06, max_grad_norm=1.0),
    },
    # The paper's Adadelta recipe as printed (lr 0.1, kernels' lr / p, head at 0.1, batch 32), with the one
    # change that makes it train here: kernels scaled by p (ΔW = p · B(w)), the parameterization in which the
    # α/p heuristic moves ΔW like a dense weight under Adadelta(α) whatever p is (README "Training";
    # bench/results/paper_recipe_probe.md). The literal form: --recipe paper --scaling 1.
    "paper": {
        task: Recipe(
            name="paper", summary="the BCA paper's: Adadelta, lr 0.1, kernels' lr / p and kernels scaled by p, head at 0.1",
            optimizer="adadelta", lr=0.1, head_lr=0.1, lr_divide_by_block_size=True, weight_decay=0.0,
            scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0, scaling="p")
        for task in TASKS
    },
}


def recipe_for(name: str, task: str) -> Recipe:
    """The recipe ``name`` for ``task`` (raises :class:`TrainingConfigError` for an unknown one)."""
    if name not in RECIPES or task not in RECIPES[name]:
        raise TrainingConfigError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name][task]


# ---- fields -----------------------------------------------------------------------------------------


def _opt(default: Any, help: str, kind: str, choices: tuple[str, ...] | None = None, required: bool = False,
         library_only: bool = False, group: str = "") -> Any:
    """A dataclass field with its command-line description.

    ``kind``: ``path``, ``str``, ``int``, ``float``, ``flag`` (on/off switch), ``tristate`` (``--x/--no-x``,
    None = recipe or automatic), ``list`` (comma-separated, or a JSON array of strings), ``pattern``
    (``NAME=P,...``), ``choice``.
    """
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "required": required,
                                            "library_only": library_only, "group": group})


def option_flag(name: str) -> str:
    """The command-line flag of a config field (``max_grad_norm`` -> ``--max-grad-norm``)."""
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seed_range_problem(seed: Any) -> str | None:
    """The problem with an integer ``--seed`` outside torch's seed range, else None (the one rule for ``train``
    and ``demo``; a seed that is not an integer is the caller's type check)."""
    if _is_int(seed) and not 0 <= seed <= MAX_SEED:
        return f"--seed must be in [0, {MAX_SEED}] (torch's seed range), got {seed}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field_problems(config: Any) -> list[str]:
    """Type, range and choice problems of every field, from the fields' metadata."""
    problems = []
    for f in fields(config):
        value = getattr(config, f.name)
        flag = option_flag(f.name)
        meta = f.metadata
        kind = meta["kind"]
        if value is None:
            if meta["required"]:
                problems.append(f"{flag} is required")
            continue
        if kind == "choice":
            if value not in meta["choices"]:
                problems.append(f"{flag} {value!r}: choose one of {', '.join(meta['choices'])}")
        elif kind in ("flag", "tristate"):
            if not isinstance(value, bool):
                problems.append(f"{flag} must be true or false, got {value!r}")
        elif kind == "int":
            if not _is_int(value):
                problems.append(f"{flag} must be an integer, got {value!r}")
        elif kind == "float":
            if not _is_number(value):
                problems.append(f"{flag} must be a finite number, got {value!r}")
        elif kind == "scale":
            if value != "p" and not _is_number(value):
                problems.append(f"{flag} must be a finite number or 'p' (the block size), got {value!r}")
        elif kind in ("str", "path"):
            if not isinstance(value, (str, Path)) or not str(value):
                problems.append(f"{flag} must be a non-empty {'path' if kind == 'path' else 'string'}, got {value!r}")
        elif kind == "list":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(v, str) and v for v in value):
                problems.append(f"{flag} must be a non-empty list of names, got {value!r}")
        elif kind == "pattern":
            if not isinstance(value, dict) or not all(isinstance(k, str) and k and _is_int(v) and v >= 1
                                                      for k, v in value.items()):
                problems.append(f"{flag} must map module names to positive block sizes, got {value!r}")
    return problems


def _at_least(config: Any, problems: list[str], low: float, *names: str, strict: bool = False) -> None:
    """Add a problem for each of ``names`` (already of the right type, or None) below ``low``."""
    for name in names:
        value = getattr(config, name)
        if value is None or not _is_number(value):
            continue
        if value < low or (strict and value == low):
            problems.append(f"{option_flag(name)} must be {'>' if strict else '>='} {low:g}, got {value!r}")


def _column_problems(config: Any, problems: list[str]) -> None:
    """Columns that cannot mean what the options say: a column named twice as text, the label column read as
    text, a response that is its own prompt, conversations read as their own tools (each was accepted and trained
    on silently)."""
    columns = config.text_columns
    if isinstance(columns, (list, tuple)) and all(isinstance(c, str) for c in columns):
        twice = sorted({c for c in columns if list(columns).count(c) > 1})
        if twice:
            problems.append(f"--text-columns names {', '.join(map(repr, twice))} twice")
        if isinstance(config.label_column, str) and config.label_column in columns:
            problems.append(f"--text-columns includes the label column {config.label_column!r}: the labels would be "
                            "read as text")
    if isinstance(config.prompt_column, str) and config.prompt_column == config.response_column:
        problems.append(f"--prompt-column and --response-column are both {config.prompt_column!r}: the response "
                        "would be its own prompt")
    if isinstance(config.tools_column, str) and config.tools_column == config.messages_column:
        problems.append(f"--tools-column and --messages-column are both {config.tools_column!r}: the tools are a "
                        "column of their own beside the conversations (each row's list of functions)")


#: Seeds are what torch's generators take (a 64-bit signed integer), from 0.
MAX_SEED = 2**63 - 1


# ---- training ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every option of a training run. Field names are the options' names (``--max-grad-norm`` ↔ ``max_grad_norm``).

    Optimisation fields left as None come from ``recipe`` (see :data:`RECIPES`); :meth:`resolved` fills them.
    """

    # -- what to train on ---------------------------------------------------------------------------
    model: str | Path | None = _opt(
        None, "Base transformers model directory (weights, config, tokenizer): a bare encoder such as "
        "all-MiniLM-L6-v2, a *ForSequenceClassification checkpoint, or a causal LM.", "path", required=True,
        group="data")
    data: str | Path | None = _opt(
        None, "Training data: .tsv/.csv (header row) or .jsonl (one object per line; .json: that or an array of "
        "objects), UTF-8, or .parquet (one file; needs pyarrow). seq-cls: text column(s) + label; causal-lm: "
        "prompt + response, messages (conversations), or text.", "path", required=True, group="data")
    out: str | Path | None = _opt(
        None, "Output directory (best/, last/, train_log.jsonl, train_result.json). Must be empty or absent "
        "unless --resume or --overwrite.", "path", required=True, group="data")
    eval_data: str | Path | None = _opt(
        None, "Held-out data (same format), evaluated every --eval-every steps and at the end; picks best/.",
        "path", group="data")
    task: str = _opt("seq-cls", "seq-cls (sequence classification or regression) or causal-lm.", "choice",
                     TASKS, group="data")
    recipe: str = _opt(
        "default", "Optimisation defaults: 'default' (AdamW, chosen by measurement, see README) or 'paper' (the "
        "BCA paper's Adadelta recipe). Any optimisation option given explicitly overrides the recipe.",
        "choice", tuple(RECIPES), group="data")
    # -- columns and labels ---------------------------------------------------------------------------
    text_columns: list[str] | None = _opt(
        None, "seq-cls: one or two text columns, comma-separated (default: sentence, text, sentence1+sentence2, "
        "question+sentence, ...).", "list", group="columns")
    label_column: str = _opt("label", "seq-cls: the label column (integers, strings, or floats for regression).",
                             "str", group="columns")
    label_names: list[str] | None = _opt(
        None, "seq-cls: names of the classes 0..K-1, comma-separated (e.g. negative,positive; a JSON array of strings "
        "for names with commas); recorded in the "
        "adapter. Default: string labels' own names, else the base model's, else LABEL_i.", "list", group="columns")
    num_labels: int | None = _opt(
        None, "seq-cls: number of classes (default: the base model's trained head, else from the labels).", "int",
        group="columns")
    regression: bool | None = _opt(
        None, "seq-cls: float labels, one output, MSE loss (default: decided from the labels).", "tristate",
        group="columns")
    prompt_column: str = _opt("prompt", "causal-lm: the prompt column (no loss on it).", "str", group="columns")
    response_column: str = _opt("response", "causal-lm: the response column (loss on it, EOS appended; left at its "
                                "default, a file without it has its 'completion' read).", "str", group="columns")
    messages_column: str = _opt(
        "messages", "causal-lm: the conversation column (JSON: a list of {\"role\", \"content\"} objects as the "
        "chat route takes them: roles system/developer/user/assistant/tool, content a string or text parts, "
        "assistant tool_calls; the --tools-column beside it gives the functions), rendered with the model's chat "
        "template, loss on the assistant turns; used when there is no prompt/response pair.",
        "str", group="columns")
    tools_column: str = _opt(
        "tools", "causal-lm: the column beside the conversations giving each row's functions (a list of "
        "{\"type\": \"function\", \"function\": {...}}, or that list as a JSON string; null: none), handed to the "
        "chat template as serve hands a request's tools; read when the file has it.", "str", group="columns")
    text_column: str = _opt("text", "causal-lm: the plain-text column (loss on every token), used when there is "
                            "no prompt/response pair, messages column nor Alpaca instruction/output.", "str",
                            group="columns")
    max_length: int = _opt(128, "Tokens per example after truncation.", "int", group="columns")
    # -- the adapter --------------------------------------------------------------------------------
    method: str = _opt(
        "bca", "bca: block-circulant adapter (+ the head); head-only: the head alone (a baseline); custom: train a "
        "prepared model as given (library only: train(config, model=...)).", "choice", METHODS, group="adapter")
    targets: list[str] | None = _opt(
        None, "Target modules, comma-separated names matched as path suffixes, or all-linear (PEFT's shorthand: every "
        "linear layer but the output layer and the task head) (default: every linear layer of a BERT-family encoder; "
        "the query and value projections of other known model types).", "list", group="adapter")
    block_size: int = _opt(64, "Circulant block size p (divides every target's in and out features); kernels "
                           "train d_out*d_in/p parameters per module.", "int", group="adapter")
    block_size_pattern: dict[str, int] | None = _opt(
        None, "Per-module block sizes, NAME=P,... (e.g. value=128).", "pattern", group="adapter")
    scaling: float | str | None = _opt(
        None, "ΔW = scaling * BlockCirculant(w); 'p': each module's block size (default: the recipe's: 1 for "
        "default, p for paper).", "scale", group="adapter")
    init: str = _opt("zeros", "Kernel initialisation: zeros (the adapted model starts equal to the base), normal, "
                     "xavier_uniform, kaiming_uniform.", "choice",
                     ("zeros", "normal", "xavier_uniform", "kaiming_uniform"), group="adapter")
    init_std: float = _opt(0.02, "Standard deviation for --init normal.", "float", group="adapter")
    modules_to_save: list[str] | None = _opt(
        None, "Modules trained fully and saved with the adapter, comma-separated (default: the task head, "
        "classifier/score, plus any module the checkpoint lacks).", "list", group="adapter")
    no_head: bool = _opt(
        False, "seq-cls: keep the base model's own trained head, frozen and shared; only the kernels are trained "
        "and saved. Refused when the base model has no trained head.", "flag", group="adapter")
    new_head: bool = _opt(
        False, "seq-cls: replace the base model's trained classification head with a new one (needed to train "
        "another number of classes on a *ForSequenceClassification checkpoint).", "flag", group="adapter")
    # -- optimisation (None: the recipe's value) ----------------------------------------------------
    optimizer: str | None = _opt(None, "adamw or adadelta (default: the recipe's).", "choice", OPTIMIZERS,
                                 group="optimisation")
    lr: float | None = _opt(None, "Learning rate of the kernels (default: the recipe's).", "float",
                            group="optimisation")
    head_lr: float | None = _opt(None, "Learning rate of the head and other saved modules, never divided by p "
                                 "(default: the recipe's).", "float", group="optimisation")
    lr_divide_by_block_size: bool | None = _opt(
        None, "Divide the kernels' learning rate by p, the BCA paper's heuristic (default: the recipe's).",
        "tristate", group="optimisation")
    weight_decay: float | None = _opt(None, "Weight decay (decoupled for AdamW, L2 for Adadelta).", "float",
                                      group="optimisation")
    scheduler: str | None = _opt(None, "Learning-rate schedule after warmup: constant, linear or cosine decay.",
                                 "choice", SCHEDULERS, group="optimisation")
    warmup_ratio: float | None = _opt(None, "Linear warmup over this fraction of --max-steps.", "float",
                                      group="optimisation")
    warmup_steps: int | None = _opt(None, "Linear warmup over this many steps (instead of --warmup-ratio).", "int",
                                    group="optimisation")
    max_grad_norm: float | None = _opt(None, "Clip the gradient norm of the trained parameters (0: no clipping).",
                                       "float", group="optimisation")
    batch_size: int = _opt(32, "Examples per micro-batch per process.", "int", group="optimisation")
    grad_accum_steps: int = _opt(1, "Micro-batches per optimizer step (a step sees batch size x this x processes "
                                 "examples).", "int", group="optimisation")
    max_steps: int = _opt(1000, "Optimizer steps (--resume continues to the count the run started with).", "int",
                          group="optimisation")
    group_by_length: bool = _opt(
        True, "Batch examples of similar length together (within shuffled groups of 50 batches; the batches are "
        "then shuffled): far less padding, the same examples per epoch. --no-group-by-length: plain shuffled "
        "batches.", "flag", group="optimisation")
    seed: int = _opt(0, "Seeds the head's initialisation, the data order and dropout.", "int", group="optimisation")
    # -- evaluation, checkpoints, hardware ----------------------------------------------------------
    eval_every: int = _opt(0, "Evaluate every N steps (0: only at the end); needs --eval-data.", "int", group="run")
    eval_batch_size: int | None = _opt(None, "Evaluation batch size (default: --batch-size).", "int", group="run")
    metric_for_best: str | None = _opt(
        None, "Metric that picks best/ (default: accuracy, pearson for regression, perplexity for causal-lm).",
        "choice", METRICS, group="run")
    save_every: int | None = _opt(None, "Write last/ every N steps (default: --eval-every, else 100; 0: only at the "
                                  "end; always at the end).", "int", group="run")
    log_every: int = _opt(10, "Steps between lines of train_log.jsonl.", "int", group="run")
    device: str | None = _opt(None, "cuda, cuda:1, cpu, ... (default: CUDA when available; under torchrun "
                              "cuda:LOCAL_RANK).", "str", group="run")
    precision: str = _opt("auto", "auto (bf16 on GPUs that support it, else fp32), fp32 or bf16.", "choice",
                          PRECISIONS, group="run")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward (less memory, same "
                                        "gradients).", "flag", group="run")
    fsdp: bool = _opt(False, "Under torchrun: shard the base model and the adapter across the processes "
                      "(FSDP, one transformer block gathered at a time) instead of a whole copy on each (DDP); "
                      "also on under accelerate launch with an FSDP config.", "flag", group="run")
    resume: bool = _opt(False, "Continue the run in --out from its last checkpoint (exactly: same final weights "
                        "as an uninterrupted run).", "flag", group="run")
    overwrite: bool = _opt(False, "Replace the run in --out (its best/, last/, train_log.jsonl, train_result.json; "
                           "other files there are kept); the earlier run stays intact until the new one has written "
                           "its first checkpoint.", "flag", group="run")
    progress: bool = _opt(True, "Show the progress bar and summaries (rank 0).", "flag", group="run")

    # ---- checks --------------------------------------------------------------------------------

    def problems(self, *, has_model: bool = False, has_tokenizer: bool = False) -> list[str]:
        """Every problem with these options (empty when they are valid); ``has_*``: objects passed to train()."""
        problems = _field_problems(self)
        if self.model is None and has_model:
            problems = [p for p in problems if not p.startswith("--model ")]
        _at_least(self, problems, 1, "batch_size", "grad_accum_steps", "max_steps", "log_every", "block_size",
                  "eval_batch_size")
        _at_least(self, problems, 2, "max_length")
        _at_least(self, problems, 0, "eval_every", "save_every", "warmup_steps", "weight_decay", "max_grad_norm")
        _at_least(self, problems, 0, "lr", "head_lr", "init_std", strict=True)
        _at_least(self, problems, 1, "num_labels")
        if _is_number(self.warmup_ratio) and not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.scaling is not None and _is_number(self.scaling) and self.scaling == 0:
            problems.append("--scaling 0 makes the adapter a no-op; give a non-zero number")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            problems.append("--warmup-ratio and --warmup-steps both given: choose one")
        if self.resume is True and self.overwrite is True:
            problems.append("--resume and --overwrite both given: --resume continues the run in --out, --overwrite "
                            "replaces it; choose one")
        if _is_int(self.eval_every) and self.eval_every and self.eval_data is None:
            problems.append("--eval-every is set but there is no evaluation data: pass --eval-data")
        if self.metric_for_best is not None and self.eval_data is None:
            problems.append("--metric-for-best is set but there is no evaluation data: pass --eval-data")
        if self.method == "custom" and not has_model:
            problems.append("--method custom trains a prepared model: call train(config, model=...) (library only)")
        if self.model is not None and isinstance(self.model, (str, Path)) and str(self.model):
            if not Path(self.model).is_dir():
                problems.append(f"--model {self.model}: directory not found")
        elif has_model and not has_tokenizer:
            problems.append("no tokenizer: pass --model (a directory holding one) or train(config, tokenizer=...)")
        if self.task == "causal-lm":
            for name in ("label_names", "num_labels", "regression", "text_columns"):
                if getattr(self, name) is not None:
                    problems.append(f"{option_flag(name)} is for seq-cls; --task is causal-lm")
            if self.no_head or self.new_head:
                problems.append("--no-head/--new-head are for seq-cls; a causal LM keeps its own output layer")
        if self.no_head and self.new_head:
            problems.append("--no-head keeps the base model's head, --new-head replaces it: choose one")
        if self.no_head and self.modules_to_save:
            problems.append("--no-head saves only the kernels: drop --modules-to-save")
        if self.method == "head-only":
            given = [option_flag(n) for n in ("targets", "block_size_pattern", "scaling")
                     if getattr(self, n) is not None]
            if given:
                problems.append(f"{', '.join(given)}: for the adapter; --method head-only trains the head alone")
        if self.no_head and self.method == "head-only":
            problems.append("--no-head with --method head-only leaves nothing to train")
        if self.regression is True and self.label_names is not None:
            problems.append("--label-names names classes; --regression has none")
        if self.label_names is not None and isinstance(self.label_names, (list, tuple)):
            dupes = sorted({n for n in self.label_names if list(self.label_names).count(n) > 1})
            if dupes:
                problems.append(f"--label-names must be distinct, repeated: {', '.join(map(repr, dupes))}")
            if _is_int(self.num_labels) and len(self.label_names) != self.num_labels:
                problems.append(f"--label-names gives {len(self.label_names)} names but --num-labels is "
                                f"{self.num_labels}")
        if self.text_columns is not None and isinstance(self.text_columns, (list, tuple)) \
                and not 1 <= len(self.text_columns) <= 2:
            problems.append(f"--text-columns names one or two columns, got {len(self.text_columns)}")
        _column_problems(self, problems)
        if (problem := seed_range_problem(self.seed)) is not None:
            problems.append(problem)
        return problems

    def validate(self, *, has_model: bool = False, has_tokenizer: bool = False) -> None:
        """Raise :class:`TrainingConfigError` listing every problem (nothing is read or written before)."""
        problems = self.problems(has_model=has_model, has_tokenizer=has_tokenizer)
        if problems:
            raise TrainingConfigError(format_problems("invalid training options:", problems))

    # ---- recipe --------------------------------------------------------------------------------

    def resolved(self) -> TrainConfig:
        """A copy with every optimisation option the user left as None taken from the recipe."""
        recipe = recipe_for(self.recipe, self.task)
        values: dict[str, Any] = {}
        for name in ("optimizer", "lr", "head_lr", "lr_divide_by_block_size", "weight_decay", "scheduler",
                     "max_grad_norm", "scaling"):
            if getattr(self, name) is None:
                values[name] = getattr(recipe, name)
        if self.warmup_ratio is None and self.warmup_steps is None:
            values["warmup_ratio"] = recipe.warmup_ratio
        return replace(self, **values)

    @property
    def warmup(self) -> int:
        """Warmup steps (from ``warmup_steps`` or ``warmup_ratio`` of ``max_steps``)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round((self.warmup_ratio or 0.0) * self.max_steps))

    def overrides(self) -> dict[str, Any]:
        """The optimisation options given explicitly (those that override the recipe)."""
        return {name: getattr(self, name) for name in ("optimizer", "lr", "head_lr", "lr_divide_by_block_size",
                                                       "weight_decay", "scheduler", "warmup_ratio", "warmup_steps",
                                                       "max_grad_norm", "scaling")
                if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able values of every field (paths as strings)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


# ---- evaluation -------------------------------------------------------------------------------------


@dataclass
class EvaluateConfig:
    """Options of ``bca-deploy evaluate``: the task metric of a base model + adapter on a data file.

    Options left as None come from the adapter's ``bca_training.json`` (written by train), so the result
    equals the metric train logged for that checkpoint.
    """

    model: str | Path | None = _opt(None, "Base transformers model directory (the one the adapter was trained on).",
                                    "path", required=True)
    adapter: str | Path | None = _opt(None, "Adapter directory: a run of bca-deploy train (its best/, else "
                                      "last/), either of those, or any bca-deploy / PEFT C3A adapter (default: the base "
                                      "model alone).", "path")
    data: str | Path | None = _opt(None, "Labelled data file (.tsv/.csv/.jsonl/.parquet), as for train.",
                                   "path", required=True)
    task: str | None = _opt(None, "seq-cls or causal-lm (default: the adapter's).", "choice", TASKS)
    text_columns: list[str] | None = _opt(None, "seq-cls text column(s) (default: as trained).", "list")
    label_column: str | None = _opt(None, "seq-cls label column (default: as trained).", "str")
    prompt_column: str | None = _opt(None, "causal-lm prompt column (default: as trained).", "str")
    response_column: str | None = _opt(None, "causal-lm response column (default: as trained).", "str")
    messages_column: str | None = _opt(None, "causal-lm conversation column (default: as trained).", "str")
    tools_column: str | None = _opt(None, "causal-lm conversations' tools column (default: as trained).", "str")
    text_column: str | None = _opt(None, "causal-lm text column (default: as trained).", "str")
    label_names: list[str] | None = _opt(
        None, "seq-cls, a file of class ids: what its ids 0..K-1 mean, as the adapter's class names in the ids' order "
        "(e.g. negative,positive); each id is read as the adapter's class of that name. Needed when the adapter's "
        "classes were named by its training file (numbered in sorted order), which need not be this file's order.",
        "list")
    max_length: int | None = _opt(None, "Tokens per example (default: as trained).", "int")
    batch_size: int | None = _opt(None, "Evaluation batch size (default: as trained).", "int")
    device: str | None = _opt(None, "cuda, cpu, ... (default: CUDA when available).", "str")
    precision: str | None = _opt(None, "auto, fp32 or bf16 (default: as trained).", "choice", PRECISIONS)

    def problems(self, *, has_model: bool = False) -> list[str]:
        problems = _field_problems(self)
        if self.model is None and has_model:
            problems = [p for p in problems if not p.startswith("--model ")]
        _at_least(self, problems, 1, "batch_size")
        _at_least(self, problems, 2, "max_length")
        if isinstance(self.label_names, (list, tuple)):
            dupes = sorted({n for n in self.label_names if list(self.label_names).count(n) > 1})
            if dupes:
                problems.append(f"--label-names must be distinct, repeated: {', '.join(map(repr, dupes))}")
        if self.model is not None and isinstance(self.model, (str, Path)) and str(self.model) \
                and not Path(self.model).is_dir():
            problems.append(f"--model {self.model}: directory not found")
        if self.adapter is not None and isinstance(self.adapter, (str, Path)) and str(self.adapter) \
                and not Path(self.adapter).is_dir():
            problems.append(f"--adapter {self.adapter}: directory not found")
        _column_problems(self, problems)
        return problems

    def validate(self, *, has_model: bool = False) -> None:
        problems = self.problems(has_model=has_model)
        if problems:
            raise TrainingConfigError(format_problems("invalid evaluation options:", problems))
