"""Prefills that compute the last position's logits only (``logits_to_keep`` = 1) vs every position's.

A generation bank graph computes its output layer (hidden x vocabulary) for every input position unless it is fed
``logits_to_keep``; ``MultiAdapterSession`` feeds 1 on prefills, since only the last position's logits pick the
next token. This benchmark serves the decoders of ``bench/serve_generation.py`` (tiny and MiniLM-sized Llama,
16 adapters, onnxruntime CPU) through ``GenerationEngine`` with closed-loop clients reading streams, both ways
(``session.keeps_last_logits`` True / False) alternating in each round, and reports tokens/s, time to first
token, and the prefill runs' time per prompt position; ratios are medians of the per-round (paired) ratios.
Every request's tokens are checked equal under both ways.

    python bench/serve_prefill_logits.py           # both models, 32 clients, 5 rounds -> bench/results/serve_prefill_logits.*
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/serve_generation.py

WAYS = {"last position": True, "every position": False}


def measure(kind: str, args, work: Path) -> list[dict]:
    import serve_generation as sg

    def way(keep_last: bool):
        return lambda session: setattr(session, "keeps_last_logits", keep_last)

    rounds = sg.paired_engine_rounds(kind, args, work, {name: way(k) for name, k in WAYS.items()})
    tokens = {name: [[tuple(r["tokens"]) for r in sorted(s["result"]["records"], key=lambda r: id(r["job"]))]
                     for s in runs] for name, runs in rounds.items()}
    first = tokens["last position"][0]
    if any(t != first for runs in tokens.values() for t in runs):
        raise SystemExit(f"{kind}: the two ways generated different tokens")

    def per_round(s: dict) -> dict[str, float]:
        result, runs = s["result"], s["runs"]
        ttfts = [r["ttft"] for r in result["records"]]
        return {"tokens_per_s": sum(len(r["tokens"]) for r in result["records"]) / result["wall_s"],
                "ttft_p50_ms": 1e3 * sg._pct(ttfts, 50), "ttft_p99_ms": 1e3 * sg._pct(ttfts, 99),
                "prefill_us_per_position": 1e6 * runs["prefill_s"] / max(1, runs["prefill_tokens"]),
                "prefill_share": runs["prefill_s"] / result["wall_s"]}

    values = {name: [per_round(s) for s in runs] for name, runs in rounds.items()}
    last, every = values["last position"], values["every position"]
    rows = []
    for name, samples in values.items():
        row = {"model": kind, "clients": args.clients, "prefill logits": name}
        row.update({k: statistics.median(v[k] for v in samples) for k in samples[0]})
        if name == "last position":
            row["tokens_per_s_vs_every (paired)"] = statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(last, every))
            row["prefill_time_vs_every (paired)"] = statistics.median(
                a["prefill_us_per_position"] / b["prefill_us_per_position"] for a, b in zip(last, every))
        row["rounds"] = len(samples)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["tiny", "minilm"], default=["tiny", "minilm"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args()
    from common import markdown_table, write_results

    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bca-bench-prefill-logits-") as tmp:
        for kind in args.models:
            rows += measure(kind, args, Path(tmp))
            print(markdown_table(rows), flush=True)
    load_end = [round(v, 2) for v in os.getloadavg()]
    if args.no_write:
        return
    notes = f"""
{args.clients} closed-loop clients (asyncio tasks reading streams), {3 * args.clients} requests per level (prompts
8-64 tokens, 8-64 new tokens, greedy, adapters uniform over {args.adapters}), `max_batch_rows` 32, onnxruntime CPU
with {args.threads} intra-op threads; the two ways alternate in each of {args.rounds} rounds (after a warm-up of
each); every request's tokens were equal under both. `prefill_us_per_position`: the prefill runs' onnxruntime time
per prompt position (padding included); `prefill_share`: the prefill runs' share of the level's wall time.
Vocabularies: tiny 512, MiniLM-sized 30,522 (hidden 384: the output layer is 45% of a position's multiply-adds).

Load average (1, 5, 15 min) at the start {load_start} and at the end {load_end} on {os.cpu_count()} cores; total
{(time.perf_counter() - start) / 60:.1f} min.
"""
    paths = write_results("serve_prefill_logits", rows, notes=notes,
                          title="Generation: prefill logits of the last position only vs every position")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
