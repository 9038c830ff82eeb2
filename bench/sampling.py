"""The sampled rows' share of a decode step: ``choose_tokens`` for a 32-row batch, before and after top-p's partial sort.

Each row is sampled from its own seeded generator after temperature, min-p, top-k and top-p (vLLM's order,
:class:`bca_deploy.serving.decoding.Sampler`). Top-p used to sort the whole vocabulary per row
(``argsort(-probs, kind="stable")``) and draw with ``Generator.choice(V, p=probs)``, which checks ``p`` in O(V)
first; now it sorts only the tokens its prefix can reach (``np.partition`` first) and draws from the cumulative
sums directly. "before" below is that old code, kept here as the baseline; both give the same token for the same
seed (checked on every row of every setting before timing). Settings: OpenAI's default (temperature 1, top-p 1),
Llama 3's generation_config.json (temperature 0.6, top-p 0.9), a common top-k 50 + top-p 0.95, min-p 0.05, and
greedy (argmax: unchanged, for scale). Logits: standard normal times ``scale`` (1.5: flat, where top-p 0.9 at
temperature 0.6 needs a large part of the vocabulary and is sorted whole, the worst case; 3; 8: peaked, as a trained
model's are), float32.

    python bench/sampling.py                 # 32k and 128k vocabularies -> bench/results/sampling.{json,md}
    python bench/sampling.py --no-write --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

SETTINGS = {
    "greedy": {"do_sample": False},
    "temperature 1, top-p 1 (OpenAI default)": {"temperature": 1.0},
    "temperature 0.6, top-p 0.9 (Llama 3 default)": {"temperature": 0.6, "top_p": 0.9},
    "top-k 50, top-p 0.95": {"temperature": 1.0, "top_k": 50, "top_p": 0.95},
    "min-p 0.05": {"temperature": 1.0, "min_p": 0.05},
}


def _before(params, logits: np.ndarray, generator) -> int:
    """The old ``Sampler.draw`` (whole-vocabulary stable sort for top-p, ``Generator.choice``), as the baseline."""
    scores = logits.astype(np.float64)
    top = scores.max()
    scores = (scores - top) / params.temperature
    if params.min_p > 0.0:
        probs = np.exp(scores)
        probs /= probs.sum()
        scores = np.where(probs < params.min_p * probs.max(), -np.inf, scores)
    if 0 < params.top_k < scores.size:
        cutoff = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < cutoff, -np.inf, scores)
    probs = np.exp(scores)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < params.top_p
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    return int(generator.choice(probs.size, p=probs))


def main() -> None:
    from common import markdown_table, time_interleaved, write_results

    from bca_deploy.serving.decoding import Sampler, SamplingParams, choose_tokens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows in the batch (default 32)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_256], help="vocabulary sizes")
    parser.add_argument("--scale", type=float, nargs="+", default=[1.5, 3.0, 8.0], help="logits' standard deviations")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per way (default 15)")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing under bench/results")
    args = parser.parse_args()
    for name, value in (("--rows", args.rows), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if any(v < 2 for v in args.vocab):
        parser.error("--vocab: each size must be at least 2")

    rows = []
    for vocab in args.vocab:
        for scale in args.scale:
            logits = (np.random.default_rng(0).standard_normal((args.rows, vocab)) * scale).astype(np.float32)
            for setting, fields in SETTINGS.items():
                params = SamplingParams(seed=7, **{"do_sample": True, **fields})
                check = [Sampler(params) for _ in range(args.rows)]
                old_generators = [np.random.default_rng(7) for _ in range(args.rows)]
                ours, _ = choose_tokens(logits, check)
                theirs = [int(np.argmax(logits[r])) if not params.do_sample else
                          _before(params, logits[r], old_generators[r]) for r in range(args.rows)]
                if ours != theirs:
                    raise SystemExit(f"{setting}, vocab {vocab}: the tokens differ from the old code's: {ours} vs "
                                     f"{theirs}")
                samplers = [Sampler(params) for _ in range(args.rows)]
                generators = [np.random.default_rng(7) for _ in range(args.rows)]

                def after() -> None:
                    choose_tokens(logits, samplers)

                def before() -> None:
                    for r in range(args.rows):
                        if params.do_sample:
                            _before(params, logits[r], generators[r])
                        else:
                            int(np.argmax(logits[r]))

                times = time_interleaved({"before": before, "after": after}, warmup=2, repeats=args.repeats)
                b, a = times["before"]["median_ms"], times["after"]["median_ms"]
                rows.append({"vocab": vocab, "logit_std": scale, "setting": setting, "before_ms": round(b, 3),
                             "after_ms": round(a, 3), "before/after": round(b / a, 2)})
                print(f"vocab {vocab:>7,}  std {scale:g}  {setting:<46} before {b:8.2f} ms  after {a:8.2f} ms  "
                      f"x{b / a:.2f}", flush=True)
    print()
    print(markdown_table(rows))
    if not args.no_write:
        load = os.getloadavg()[0]
        notes = (f"Milliseconds per decode step for the sampling of {args.rows} rows (`choose_tokens`), median of "
                 f"{args.repeats} interleaved steps per way; both ways draw the same tokens (checked first). "
                 f"1-minute load at the end: {load:.1f}.")
        paths = write_results("sampling", rows, title="Sampling a 32-row step: top-p's partial sort vs the whole "
                              "vocabulary's", notes=notes)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
