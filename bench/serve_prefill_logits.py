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

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/serve_generation.py

from common import percentile  # noqa: E402

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
                "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
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


def notes(args, load_start, load_end, minutes: float) -> str:
    import serve_generation as sg

    return sg.paired_engine_notes(args, """Every request's tokens were equal both ways. `prefill_us_per_position`: the
prefill runs' onnxruntime time per prompt position (padding included); `prefill_share`: the prefill runs' share of
the level's wall time. Vocabularies: tiny 512, MiniLM-sized 30,522 (hidden 384: the output layer is 45% of a
position's multiply-adds).""", load_start, load_end, minutes)


def main() -> None:
    import serve_generation as sg

    sg.paired_engine_main(__doc__, measure, "serve_prefill_logits",
                          "Generation: prefill logits of the last position only vs every position", notes)


if __name__ == "__main__":
    main()
