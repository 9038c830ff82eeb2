"""What a training run tells its user: the start-up summary, the progress bar's rates, the final summary.

Plain functions from a run (or its :class:`~bca_deploy.training.trainer.TrainResult`) to text, shared by
``bca-deploy train`` and ``python -m bca_deploy.training train``, so both print the same.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import TrainResult, _TrainingRun

__all__ = ["start_summary", "lr_postfix", "format_metrics", "final_summary", "format_duration"]

# metric -> decimals shown
_DECIMALS = {"accuracy": 4, "f1": 4, "macro_f1": 4, "mcc": 4, "pearson": 4, "mse": 4, "loss": 4, "perplexity": 2}


def format_metrics(metrics: dict[str, Any]) -> str:
    """``accuracy 0.8331, f1 0.8412, loss 0.3811, n 872``: rounded, in a stable order."""
    parts = []
    for name, value in metrics.items():
        if value is None:  # a number that was not finite, as train_result.json holds it
            parts.append(f"{name} n/a")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.{_DECIMALS.get(name, 4)}f}")
        else:
            parts.append(f"{name} {value:,}" if isinstance(value, int) else f"{name} {value}")
    return ", ".join(parts)


def lr_postfix(lrs: dict[str, float]) -> str:
    """The learning rates a step used, kernels and head apart: ``lr kernels 3.0e-03 (p=128), head 3.0e-03``."""
    kernels = [(name[5:], lr) for name, lr in lrs.items() if name.startswith("bca_p")]
    parts = []
    if kernels:
        shown = ", ".join(f"{lr:.1e} (p={p})" for p, lr in kernels) if len(kernels) > 1 else f"{kernels[0][1]:.1e}"
        parts.append(f"lr kernels {shown}")
    if "adapter" in lrs:
        parts.append(f"adapter {lrs['adapter']:.1e}")
    if "head" in lrs:
        parts.append(f"head {lrs['head']:.1e}")
    return ", ".join(parts) if parts else "lr " + ", ".join(f"{v:.1e}" for v in lrs.values())


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _count(n: int) -> str:
    return f"{n:,}"


def start_summary(run: _TrainingRun) -> str:
    """What is about to be trained: data, model, adapter, head, recipe, budget, device, output."""
    cfg = run.cfg
    lines = [f"bca-deploy train: {cfg.task}, recipe {cfg.recipe!r}"]
    data = f"{cfg.data} ({_count(len(run.train_data))} rows)"
    if cfg.task == "seq-cls":  # which columns were read, when the reader chose them
        data += f", text {'+'.join(run.train_examples.text_columns)}"
    elif getattr(run.train_examples, "columns", ""):  # causal-lm: which format the file was read as
        data += f", read as {run.train_examples.columns}"
    if run.eval_data is not None:
        data += f"; eval {cfg.eval_data} ({_count(len(run.eval_data))} rows)"
    lines.append(f"  data      {data}")
    arch = type(run.model).__name__
    base_arch = run.base.architecture if run.base is not None else None
    origin = f" from a {base_arch} checkpoint" if base_arch and base_arch != arch else ""
    lines.append(f"  model     {cfg.model or '(given)'}: {arch}{origin}, {_count(run.base_params)} parameters")
    adapter_n, head_n = run.n_params["adapter"], run.n_params["head"]
    share = 100.0 * (adapter_n + head_n) / run.base_params if run.base_params else 0.0
    if cfg.method == "bca":
        from ..inject import bca_layers

        layers = list(bca_layers(run.model))
        sizes = sorted({layer.block_sizes["default"] for _, layer in layers})
        lines.append(f"  adapter   BCA p={'/'.join(map(str, sizes))} on {', '.join(run.targets)} "
                     f"({len(layers)} modules): {_count(adapter_n)} kernel parameters")
    elif cfg.method == "head-only":
        lines.append("  adapter   none (head only)")
    else:
        lines.append(f"  adapter   the given model's trainable parameters: {_count(adapter_n)}")
    if run.labels is not None:
        kind = {"new": "new, trained", "trained": "the base model's, trained further", "base":
                "the base model's, frozen and shared (--no-head: not saved)", "given": "the given model's"}
        labels = ", ".join(run.labels.names[:8]) + (f", ... ({run.labels.num_labels})" if run.labels.num_labels > 8
                                                      else "")
        what = "regression (1 output)" if run.labels.regression else f"{run.labels.num_labels} labels: {labels}"
        saved = f"{', '.join(run.modules_to_save)}: " if run.modules_to_save else ""
        lines.append(f"  head      {saved}{kind[run.labels.head]} ({_count(head_n)} parameters); {what}")
    lines.append(f"  trained   {_count(adapter_n + head_n)} parameters ({share:.3f}% of the base)")
    r = run.cfg
    given = run.given.overrides()
    over = f"; overridden: {', '.join(f'{k}={v}' for k, v in given.items())}" if given else ""
    divided = " / p" if r.lr_divide_by_block_size else ""
    clip = f", clip {r.max_grad_norm:g}" if r.max_grad_norm else ""
    if cfg.method == "bca" and r.scaling not in (None, 1, 1.0):
        clip += ", kernels scaled by p" if r.scaling == "p" else f", kernels scaled by {r.scaling:g}"
    head_lr = f" (head {r.head_lr:g})" if head_n else ""  # a causal-lm run trains no head
    lines.append(f"  recipe    {r.recipe}: {r.optimizer}, lr {r.lr:g}{divided}{head_lr}, {r.scheduler}"
                 f" schedule, warmup {r.warmup} steps{clip}{over}")
    epochs = r.max_steps * r.batch_size * r.grad_accum_steps * run.d.world_size / max(1, len(run.train_data))
    start = f", resuming at step {run.step}" if run.resumed_from is not None else ""
    lines.append(f"  steps     {_count(r.max_steps)} x batch {r.batch_size * r.grad_accum_steps * run.d.world_size}"
                 f" ({epochs:.2f} epochs){start}")
    procs = f", {run.d.world_size} processes" if run.d.active else ""
    if run.sharded_blocks is not None:
        procs += (f", FSDP: {run.sharded_blocks} blocks sharded" if run.sharded_blocks else ", FSDP: one unit")
    elif run.d.active:
        procs += ", DDP"
    lines.append(f"  device    {run.dev} ({run.precision}{procs})")
    save_every = r.save_every if r.save_every is not None else (r.eval_every or 100)
    first = min(save_every or r.max_steps, r.max_steps)
    where = f"{run.out}" + ("" if run.resumed_from is not None else
                            f" (in place from the first checkpoint, step {_count(first)})")
    lines.append(f"  output    {where}")
    return "\n".join(lines)


def _q(path: Any) -> str:
    return shlex.quote(str(path))


def final_summary(result: TrainResult, model_dir: str | Path | None, eval_data: str | Path | None = None) -> str:
    """Where the adapter went, the metrics (rounded), and the next commands with the real paths."""
    lines = [f"done: {result.step} steps in {format_duration(result.train_seconds)} "
             f"({result.samples_per_second:.1f} samples/s), final train loss "
             + (f"{result.train_loss:.4f}" if result.train_loss is not None else
                f"not recorded (no step trained now, and train_log.jsonl records no loss for step {result.step})")]
    if result.final_metrics:
        best = f" (best {result.metric} {result.best_metric:.4f} at step {result.best_step})" \
            if result.best_metric is not None else ""
        lines.append(f"eval at step {result.step}: {format_metrics(result.final_metrics)}{best}")
    adapter = result.adapter_dir
    n = result.trainable_parameters
    task = result.task or {}
    head = task.get("head") or {}
    what = [task.get("type", "custom"), task.get("architecture") or ""]
    if head and (result.config or {}).get("regression"):
        what.append("regression (1 output)")
    elif head:
        names = list(head.get("id2label", {}).values())
        what.append(f"{head.get('num_labels')} labels ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    elif task.get("type") == "seq-cls":
        what.append("the base model's head (not saved)")
    lines.append(f"adapter: {adapter} ({', '.join(w for w in what if w)}; {n['adapter']:,} kernel + "
                 f"{n['head']:,} head parameters); last checkpoint: {result.last_dir}")
    lines.append(f"details: {result.out_dir / 'train_log.jsonl'}, {result.out_dir / 'train_result.json'}")
    if model_dir is None:
        return "\n".join(lines)
    m, a = _q(model_dir), _q(adapter)
    # outputs beside the run, never in it: train --overwrite of the run would delete them with it
    def beside(suffix: str) -> str:
        return _q(result.out_dir.parent / f"{result.out_dir.name}-{suffix}")

    # a held-out file in the training data's format (the reader goes by its extension)
    suffix = Path(str((result.config or {}).get("data") or "")).suffix or ".tsv"
    data = _q(eval_data) if eval_data is not None else f"HELDOUT{suffix}"
    lines.append("next:")
    lines.append(f"  bca-deploy evaluate --model {m} --adapter {a} --data {data}")
    if (adapter / "adapter_config.json").is_file():
        lines.append(f"  bca-deploy merge --model {m} --adapter {a} --out {beside('merged')}")
        refusal = export_refusal(model_dir)
        if refusal is None:
            lines.append(f"  bca-deploy export --model {m} --adapter {a} --merge --out {beside('onnx')}")
            serve, note = _tool_call_serving((result.config or {}).get("tool_call_parsers"))
            lines.append(f"  bca-deploy export --model {m} --adapter {a} --bank --out {beside('bank')} && "
                         f"bca-deploy serve {beside('bank')}{serve}")
            if note:
                lines.append(f"  ({note})")
        else:
            lines.append(f"  (no ONNX export or serving for this model: {refusal})")
    return "\n".join(lines)


def _tool_call_serving(parsers: list[str] | None) -> tuple[str, str | None]:
    """``(serve options, note)`` for a run whose training conversations had tool calls (``parsers``: the
    ``--tool-call-parser`` names that read them back; None: no calls): the options that have the chat route return
    the calls the adapter was trained to write as ``tool_calls``, or a note when no parser reads them."""
    if parsers is None:
        return "", None
    if parsers:
        return f" --enable-auto-tool-choice --tool-call-parser {parsers[0]}", None
    from ..serving.limits import TOOL_CALL_PARSERS
    return "", (f"the training conversations' tool calls are written in a form no --tool-call-parser "
                f"({', '.join(TOOL_CALL_PARSERS)}) reads back: the chat route answers them as text")


def export_refusal(model_dir: str | Path) -> str | None:
    """Why ``bca-deploy export`` would refuse ``model_dir``'s architecture (its own message), or None: so that the
    next commands printed after training are ones that work."""
    from ..errors import BCAError
    from ..exporters.loading import architecture_problem
    from ..models import load_config

    try:
        return architecture_problem(model_dir, load_config(model_dir))
    except BCAError as exc:  # a config export could not read either
        return str(exc)
