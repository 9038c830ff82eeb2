"""Task metrics from sufficient statistics, so data-parallel ranks can sum them with one all-reduce.

- classification: a confusion matrix → ``accuracy``, ``mcc`` (Matthews; the multi-class form of
  Gorodkin 2004, equal to the usual binary MCC for two classes), binary ``f1`` (positive class 1),
  multi-class ``macro_f1`` (the mean over the classes that occur among the labels or the predictions,
  as scikit-learn's ``f1_score(average="macro")``: a held-out subset without some class is not marked
  down for it); plus mean cross-entropy ``loss``.
- regression: n, Σx, Σy, Σx², Σy², Σxy, Σ(x−y)² → ``pearson``, ``mse`` (= ``loss``).
- causal-lm: Σ token NLL and token count → ``loss`` (mean NLL per target token), ``perplexity``.

All sums are float64 on the accumulator's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

__all__ = ["MetricAccumulator", "primary_metric", "is_better", "METRIC_DIRECTIONS"]

# metric name -> True if higher is better
METRIC_DIRECTIONS = {
    "accuracy": True,
    "f1": True,
    "macro_f1": True,
    "mcc": True,
    "pearson": True,
    "mse": False,
    "loss": False,
    "perplexity": False,
}


def primary_metric(task: str, regression: bool = False) -> str:
    """The metric used to pick the best checkpoint by default."""
    if task == "causal-lm":
        return "perplexity"
    return "pearson" if regression else "accuracy"


def is_better(name: str, value: float, best: float | None) -> bool:
    """Whether ``value`` improves on ``best`` for metric ``name`` (NaN never does)."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if METRIC_DIRECTIONS.get(name, True) else value < best


class MetricAccumulator:
    """Accumulate one task's statistics over batches; :meth:`compute` turns them into metrics.

    Args:
        task: ``"seq-cls"`` or ``"causal-lm"``.
        num_labels: number of classes (seq-cls classification).
        regression: seq-cls with one real-valued output.
        device: where the statistics live (the model's device, so all-reduce works on NCCL).
    """

    def __init__(self, task: str, num_labels: int = 2, regression: bool = False, device: torch.device | str = "cpu"):
        self.task = task
        self.num_labels = num_labels
        self.regression = regression
        if task == "causal-lm":
            size = 2  # nll_sum, tokens
        elif regression:
            size = 7  # n, sx, sy, sxx, syy, sxy, sse
        else:
            size = 2 + num_labels * num_labels  # loss_sum, n, confusion[true, pred]
        self.stats = torch.zeros(size, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits: seq-cls (B, K) (regression: (B, 1)); causal-lm (B, T, V), unshifted.
            labels: seq-cls (B,); causal-lm (B, T) with :data:`IGNORE_INDEX` where no loss is taken.
        """
        logits = logits.float()
        if self.task == "causal-lm":
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V)
            shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
            nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            self.stats[0] += nll.double()
            self.stats[1] += (shift_labels != IGNORE_INDEX).sum().double()
        elif self.regression:
            x = logits.reshape(-1).double()  # (B,) predictions
            y = labels.reshape(-1).double()  # (B,) targets
            self.stats += torch.stack([
                torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), ((x - y) ** 2).sum(),
            ]).to(self.stats.device)
        else:
            k = self.num_labels
            loss = F.cross_entropy(logits, labels, reduction="sum")
            pred = logits.argmax(dim=-1)  # (B,)
            confusion = torch.bincount(labels * k + pred, minlength=k * k).double()  # (K·K,)
            self.stats[0] += loss.double()
            self.stats[1] += labels.numel()
            self.stats[2:] += confusion.to(self.stats.device)

    def all_reduce(self) -> None:
        """Sum the statistics over data-parallel ranks (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.stats)

    def compute(self) -> dict[str, float]:
        s = self.stats.cpu().tolist()
        if self.task == "causal-lm":
            nll, tokens = s
            loss = nll / tokens if tokens else float("nan")
            return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan"),
                    "tokens": int(tokens)}
        if self.regression:
            n, sx, sy, sxx, syy, sxy, sse = s
            if n == 0:
                return {"pearson": float("nan"), "mse": float("nan"), "loss": float("nan"), "n": 0}
            cov = sxy - sx * sy / n
            var_x = sxx - sx * sx / n
            var_y = syy - sy * sy / n
            pearson = cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else float("nan")
            return {"pearson": pearson, "mse": sse / n, "loss": sse / n, "n": int(n)}
        k = self.num_labels
        loss_sum, n = s[0], s[1]
        confusion = torch.tensor(s[2:], dtype=torch.float64).reshape(k, k)  # [true, pred]
        metrics = classification_metrics(confusion)
        metrics["loss"] = loss_sum / n if n else float("nan")
        metrics["n"] = int(n)
        return metrics


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, mcc and f1 (binary) or macro_f1 (multi-class) from a (K, K) [true, pred] count matrix."""
    total = float(confusion.sum())
    if total == 0:
        return {"accuracy": float("nan"), "mcc": float("nan")}
    correct = float(confusion.diagonal().sum())
    true_counts = confusion.sum(dim=1)  # (K,)
    pred_counts = confusion.sum(dim=0)  # (K,)
    numerator = correct * total - float((true_counts * pred_counts).sum())
    denominator = math.sqrt((total**2 - float((pred_counts**2).sum())) * (total**2 - float((true_counts**2).sum())))
    metrics = {"accuracy": correct / total, "mcc": numerator / denominator if denominator > 0 else 0.0}
    tp = confusion.diagonal()
    f1 = torch.where(true_counts + pred_counts > 0, 2 * tp / (true_counts + pred_counts), torch.zeros_like(tp))
    if confusion.shape[0] == 2:
        metrics["f1"] = float(f1[1])
    else:
        metrics["macro_f1"] = float(f1[true_counts + pred_counts > 0].mean())
    return metrics
