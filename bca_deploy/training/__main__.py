"""``python -m bca_deploy.training {train,evaluate} ...``: the entry point ``torchrun`` can launch.

    torchrun --nproc_per_node 2 -m bca_deploy.training train --model DIR --data train.tsv \\
        --eval-data dev.tsv --out runs/sst2 --block-size 128

Each option maps one to one onto a keyword argument of :func:`bca_deploy.training.train` /
:func:`~bca_deploy.training.evaluate`. The result is printed as one JSON object (rank 0). Errors in the
input are printed as one message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _pattern(value: str) -> dict[str, int]:
    out = {}
    for item in _csv(value):
        name, _, p = item.partition("=")
        if not p:
            raise argparse.ArgumentTypeError(f"expected NAME=P[,NAME=P...], got {item!r}")
        out[name.strip()] = int(p)
    return out


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["seq-cls", "causal-lm"], help="default: seq-cls (evaluate: from the adapter)")
    p.add_argument("--text-columns", type=_csv, help="one or two text columns, comma-separated")
    p.add_argument("--label-column")
    p.add_argument("--regression", type=_bool, help="float labels, MSE (default: decided from the labels)")
    p.add_argument("--num-labels", type=int)
    p.add_argument("--prompt-column")
    p.add_argument("--response-column")
    p.add_argument("--text-column")
    p.add_argument("--max-length", type=int)
    p.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bca_deploy.training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune with a block-circulant adapter")
    t.add_argument("--model", dest="model_dir", required=True, help="transformers model directory")
    t.add_argument("--data", dest="data_path", required=True, help="training data (.tsv/.csv/.jsonl)")
    t.add_argument("--eval-data", dest="eval_path", help="evaluation data (same format)")
    t.add_argument("--out", dest="out_dir", required=True, help="output directory (best/, last/, train_log.jsonl)")
    _data_options(t)
    t.add_argument("--method", choices=["bca", "head-only"])
    t.add_argument("--targets", type=_csv, help="target modules, comma-separated (default: query,value)")
    t.add_argument("--block-size", type=int)
    t.add_argument("--block-size-pattern", type=_pattern, help="NAME=P,... per-module block sizes")
    t.add_argument("--scaling", type=float)
    t.add_argument("--init", choices=["zeros", "normal", "xavier_uniform", "kaiming_uniform"])
    t.add_argument("--modules-to-save", type=_csv)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--grad-accum-steps", type=int)
    t.add_argument("--optimizer", choices=["adadelta", "adamw"])
    t.add_argument("--lr", type=float)
    t.add_argument("--head-lr", type=float)
    t.add_argument("--lr-divide-by-block-size", type=_bool)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--scheduler", choices=["constant", "linear", "cosine"])
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--max-grad-norm", type=float)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--metric-for-best")
    t.add_argument("--log-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--gradient-checkpointing", action="store_true", default=None)
    t.add_argument("--resume", action="store_true", default=None)
    t.add_argument("--overwrite", action="store_true", default=None)
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)

    e = sub.add_parser("evaluate", help="task metric of a model + adapter on a data file")
    e.add_argument("--model", dest="model_dir", required=True)
    e.add_argument("--adapter", dest="adapter_dir", help="adapter directory (best/ or last/ from train)")
    e.add_argument("--data", dest="data_path", required=True)
    _data_options(e)
    e.add_argument("--batch-size", type=int)
    return parser


def _kwargs(ns: argparse.Namespace, positional: tuple[str, ...]) -> tuple[list[Any], dict[str, Any]]:
    values = {k: v for k, v in vars(ns).items() if k != "command"}
    args = [values.pop(k) for k in positional]
    return args, {k: v for k, v in values.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from ..errors import BCAError
    from .trainer import evaluate, train

    try:
        if ns.command == "train":
            args, kwargs = _kwargs(ns, ("model_dir", "data_path"))
            kwargs.setdefault("task", "seq-cls")
            result: Any = asdict(train(*args, **kwargs))
        else:
            args, kwargs = _kwargs(ns, ("model_dir", "adapter_dir", "data_path"))
            result = evaluate(*args, **kwargs)
    except BCAError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
