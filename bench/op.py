"""Benchmark the block-circulant op against LoRA r=8 and PEFT's C3A op, one adapted layer's worth.

For each (tokens, d_in, d_out, p) of ``bench.common.OP_SHAPES`` the three adapter paths of
``bench.common.op_methods`` run on the same input, in one process (``bench/gpu.py``'s op section runs the
same code on CUDA):

* ``ours``: ``bca_deploy.ops.block_circulant_matmul(x, w)``, w of shape (d_out/p, d_in/p, p);
* ``lora``: ``(x @ A.T) @ B.T`` with A (8, d_in), B (d_out, 8) (rank 8);
* ``peft_c3a``: ``peft.tuners.c3a.utils.BlockCircularConvolution.apply(x.float(), k) / d_in`` (as PEFT's layer calls it).

``--precision fp32`` (the CPU default): input and parameters fp32. ``--precision bf16`` (the CUDA
default): a bf16 base's activations as input, fp32 parameters, bf16 autocast around each method.

Measured: forward+backward time (``x`` requires grad, so grad_x is computed as in a real adapted layer,
and a fixed random upstream gradient is fed with ``y.backward(g)``), forward-only time under
``torch.no_grad()``, peak memory of one forward+backward and the activation bytes autograd saves beyond
the input and the parameters (see ``bench/common.py`` for how memory is measured).

Usage::

    PYTHONPATH=. python3 bench/op.py --device cpu --repeats 30
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OP_PRECISIONS,
    OP_SHAPES,
    bench_op_shape,
    markdown_table,
    op_ratios,
    write_results,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before each measurement")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to run with, e.g. 1,2 (default: torch's choice)",
    )
    parser.add_argument("--precision", choices=OP_PRECISIONS, default=None,
                        help="fp32: input and parameters fp32; bf16: bf16 input (a bf16 base's activations), fp32 "
                             "parameters, bf16 autocast (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--shapes", default=None,
                        help="semicolon-separated tokens,d_in,d_out,p (default: the three shapes of bench.common.OP_SHAPES)")
    parser.add_argument("--name", default="op", help="results go to bench/results/<name>.{json,md}")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    precision_note = ("precision fp32: input and parameters fp32." if precision == "fp32" else
                      "precision bf16: bf16 input (a bf16 base's activations), fp32 parameters, bf16 autocast.")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes else OP_SHAPES
    load_at_start = [round(v, 2) for v in os.getloadavg()]

    rows, skipped = [], []
    for tokens, d_in, d_out, p in shapes:
        if d_in % p or d_out % p:
            msg = f"skipped (tokens={tokens}, d_in={d_in}, d_out={d_out}, p={p}): p does not divide d_in and d_out"
            print(msg)
            skipped.append(msg)
    default_threads = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for tokens, d_in, d_out, p in shapes:
            if d_in % p or d_out % p:
                continue
            print(f"tokens={tokens} d_in={d_in} d_out={d_out} p={p} on {device}, {threads} thread(s), {precision}",
                  flush=True)
            rows += bench_op_shape(tokens, d_in, d_out, p, device, precision=precision, warmup=args.warmup,
                                   repeats=args.repeats, inner=10 if device.type == "cuda" else 1)
    torch.set_num_threads(default_threads)  # the machine description reports the default; rows carry their own

    summary = op_ratios(rows)
    columns = ["threads", "precision", "tokens", "d_in", "d_out", "p", "method", "fwd_bwd_ms", "fwd_ms", "peak_mib", "saved_extra_mib", "params"]
    print()
    print(markdown_table(rows, columns))
    print(markdown_table(summary))
    notes = "\n".join(
        [
            "## Ratios (time ratios of medians; >1 in `peft/ours` means ours is faster)",
            "",
            markdown_table(summary),
            f"fwd_bwd: `y = f(x); y.backward(g)` with x (tokens, d_in) requiring grad; fwd: under `torch.no_grad()`. "
            f"Times are medians of {args.repeats} runs after {args.warmup} warmup runs, the three methods run "
            "round-robin (one run each per round) so that load from other processes hits them alike; quartiles "
            "and minima are in the JSON, and the machine's load average is recorded below. "
            "peak_mib: peak bytes allocated by PyTorch during one fwd+bwd (CPU: profiler allocation trace, "
            "CUDA: max_memory_allocated); saved_extra_mib: bytes autograd saves beyond x and the parameters. "
            "lora: rank 8, (x @ A.T) @ B.T; peft_c3a: BlockCircularConvolution.apply(x.float(), k) / d_in (peft). "
            + precision_note,
            "",
            "On a shared machine, a run with more threads than idle cores is dominated by threads waiting for "
            "each other at the end of every parallel op (a descheduled OpenMP thread stalls the others); ops "
            "made of many small parallel steps (ours: a few per token chunk) suffer most. Compare rows of the "
            "same thread count, and prefer the 1-thread rows when the load average exceeds the core count. "
            f"Load average (1, 5, 15 min) when this run started: {load_at_start}; when it ended: see Machine.",
            *skipped,
        ]
    )
    paths = write_results(
        args.name,
        rows,
        device=device,
        columns=columns,
        title="Block-circulant op vs LoRA r=8 vs PEFT C3A (one layer, forward+backward)",
        notes=notes,
        extra={
            "ratios": summary,
            "skipped": skipped,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "load_average_at_start": load_at_start,
        },
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
