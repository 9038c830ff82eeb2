"""Benchmark the block-circulant op against LoRA r=8 and PEFT's C3A op, one adapted layer's worth.

For each (tokens, d_in, d_out, p) the three adapter paths run on the same input, in one process:

* ``ours``: ``bca_deploy.ops.block_circulant_matmul(x, w)``, w of shape (d_out/p, d_in/p, p);
* ``lora``: ``(x @ A.T) @ B.T`` with A (8, d_in), B (d_out, 8) (rank 8);
* ``peft_c3a``: ``peft.tuners.c3a.utils.BlockCircularConvolution.apply(x, k) / d_in`` (as PEFT's layer calls it).

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
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bca_deploy.ops import block_circulant_matmul, flip_circulant_layout  # noqa: E402
from bench.common import (  # noqa: E402
    markdown_table,
    peak_memory,
    saved_tensor_bytes,
    time_interleaved,
    write_results,
)

SHAPES = [(2048, 768, 768, 64), (2048, 4096, 4096, 256), (2048, 4096, 11008, 128)]
LORA_RANK = 8
MIB = 2**20


def _methods(d_in: int, d_out: int, p: int, device: torch.device, gen: torch.Generator):
    """name -> (forward function of x, its parameters). ``ours`` and ``peft_c3a`` compute the same ΔW x."""
    kw = {"device": device, "dtype": torch.float32}
    k = torch.randn(d_out // p, d_in // p, p, generator=gen, **kw)  # PEFT first-row kernels
    w = (flip_circulant_layout(k) / d_in).requires_grad_()  # same ΔW in our first-column layout
    k.requires_grad_()
    a = (torch.randn(LORA_RANK, d_in, generator=gen, **kw) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, LORA_RANK, generator=gen, **kw) / LORA_RANK**0.5).requires_grad_()

    from peft.tuners.c3a.utils import BlockCircularConvolution

    def peft_c3a(x: torch.Tensor) -> torch.Tensor:
        return BlockCircularConvolution.apply(x, k) / d_in

    methods: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]] = {
        "ours": (lambda x: block_circulant_matmul(x, w), [w]),
        "lora": (lambda x: (x @ a.T) @ b.T, [a, b]),
        "peft_c3a": (peft_c3a, [k]),
    }
    return methods


def bench_shape(tokens: int, d_in: int, d_out: int, p: int, device: torch.device, args) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen, device=device).requires_grad_()
    g = torch.randn(tokens, d_out, generator=gen, device=device)
    methods = _methods(d_in, d_out, p, device, gen)

    with torch.no_grad():  # ours and PEFT's op must compute the same thing, or the timings mean nothing
        y_ours, y_peft = methods["ours"][0](x), methods["peft_c3a"][0](x)
        agree = ((y_ours - y_peft).norm() / y_peft.norm()).item()

    def clear_grads(params: list[torch.Tensor]) -> None:
        for t in (x, *params):
            t.grad = None

    def fwd_bwd(f, params) -> Callable[[], None]:
        def run() -> None:
            clear_grads(params)
            f(x).backward(g)

        return run

    def fwd(f) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                f(x)

        return run

    # The methods run round-robin, so that a change in the machine's load hits all of them alike.
    t_fb = time_interleaved(
        {name: fwd_bwd(f, params) for name, (f, params) in methods.items()},
        device,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    t_f = time_interleaved(
        {name: fwd(f) for name, (f, _) in methods.items()}, device, warmup=args.warmup, repeats=args.repeats
    )

    rows = []
    for name, (f, params) in methods.items():
        clear_grads(params)  # so that the measured call allocates the gradients and frees nothing older
        peak = peak_memory(lambda: f(x).backward(g), device)
        saved = saved_tensor_bytes(lambda: f(x), owned=[x, *params])
        fb, fo = t_fb[name], t_f[name]
        rows.append(
            {
                "threads": torch.get_num_threads(),
                "tokens": tokens,
                "d_in": d_in,
                "d_out": d_out,
                "p": p,
                "method": name,
                "fwd_bwd_ms": fb["median_ms"],
                "fwd_bwd_q1_ms": fb["q1_ms"],
                "fwd_bwd_q3_ms": fb["q3_ms"],
                "fwd_bwd_min_ms": fb["min_ms"],
                "fwd_ms": fo["median_ms"],
                "fwd_q1_ms": fo["q1_ms"],
                "fwd_q3_ms": fo["q3_ms"],
                "fwd_min_ms": fo["min_ms"],
                "peak_mib": peak / MIB,
                "saved_extra_mib": saved["saved_extra_bytes"] / MIB,
                "params": sum(t.numel() for t in params),
                "ours_vs_peft_rel_diff": agree,
            }
        )
        print(
            f"  {name:9s} fwd+bwd {fb['median_ms']:9.2f} ms  fwd {fo['median_ms']:9.2f} ms  "
            f"peak {peak / MIB:8.1f} MiB  saved extra {saved['saved_extra_bytes'] / MIB:6.2f} MiB",
            flush=True,
        )
    return rows


def _key(r: dict) -> tuple:
    return (r["threads"], r["tokens"], r["d_in"], r["d_out"], r["p"])


def ratios(rows: list[dict]) -> list[dict]:
    """One row per (threads, shape): ours/LoRA and PEFT/ours for forward+backward and forward-only time."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows):
        by = {r["method"]: r for r in rows if _key(r) == key}
        out.append(
            {
                "threads": key[0],
                "tokens": key[1],
                "d_in": key[2],
                "d_out": key[3],
                "p": key[4],
                "fwd_bwd ours/lora": by["ours"]["fwd_bwd_ms"] / by["lora"]["fwd_bwd_ms"],
                "fwd_bwd peft/ours": by["peft_c3a"]["fwd_bwd_ms"] / by["ours"]["fwd_bwd_ms"],
                "fwd ours/lora": by["ours"]["fwd_ms"] / by["lora"]["fwd_ms"],
                "fwd peft/ours": by["peft_c3a"]["fwd_ms"] / by["ours"]["fwd_ms"],
                "peak peft/ours": by["peft_c3a"]["peak_mib"] / by["ours"]["peak_mib"],
            }
        )
    return out


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
    parser.add_argument("--name", default="op", help="results go to bench/results/<name>.{json,md}")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    load_at_start = [round(v, 2) for v in os.getloadavg()]

    rows, skipped = [], []
    for tokens, d_in, d_out, p in SHAPES:
        if d_in % p or d_out % p:
            msg = f"skipped (tokens={tokens}, d_in={d_in}, d_out={d_out}, p={p}): p does not divide d_in and d_out"
            print(msg)
            skipped.append(msg)
    default_threads = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for tokens, d_in, d_out, p in SHAPES:
            if d_in % p or d_out % p:
                continue
            print(f"tokens={tokens} d_in={d_in} d_out={d_out} p={p} on {device}, {threads} thread(s)", flush=True)
            rows += bench_shape(tokens, d_in, d_out, p, device, args)
    torch.set_num_threads(default_threads)  # the machine description reports the default; rows carry their own

    summary = ratios(rows)
    columns = ["threads", "tokens", "d_in", "d_out", "p", "method", "fwd_bwd_ms", "fwd_ms", "peak_mib", "saved_extra_mib", "params"]
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
            "lora: rank 8, (x @ A.T) @ B.T; peft_c3a: BlockCircularConvolution.apply(x, k) / d_in (peft 0.21.2).",
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
