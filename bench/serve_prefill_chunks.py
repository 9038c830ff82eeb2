"""Chunked prefill: how long a long prompt holds up the rows already decoding, by ``--max-prefill-tokens``.

``GenerationEngine`` runs at most ``max_prefill_tokens`` padded prompt tokens per prefill run and steps the running
rows between runs, so a prompt longer than that is prefilled in chunks. This benchmark measures, on the decoders of
``bench/serve_generation.py`` (tiny and MiniLM-sized Llama, 16 adapters, onnxruntime CPU), ``--streams`` (8)
streams decoding greedily while one ``--long``-token prompt (1,024) arrives, for each budget of ``--budgets``
(a budget at least the prompt's length prefills it in one run, as the engine did before chunking):

* the running streams' inter-token gaps (client side) from the long request's submission until its first token:
  the largest, against the median gap before it arrived;
* the long request's time to first token and its prefill runs' total time (chunking repeats the attention over
  the growing past, so it costs some time);
* every stream's tokens equal across budgets (greedy), and the long prompt's tokens too.

Budgets alternate order in each of ``--rounds`` rounds after a warm-up of each; figures are medians over rounds.

What a lower budget costs where prompts are short: ``--clients`` (32) closed-loop clients of
``bench/serve_generation.py``'s workload (prompts 8-64 tokens, 8-64 new) at each budget, paired rounds: tokens/s
(the paired ratio to the first budget) and inter-token latency p99 (a lower budget admits fewer rows per step).

    python bench/serve_prefill_chunks.py        # both models -> bench/results/serve_prefill_chunks.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/serve_generation.py

from common import percentile  # noqa: E402

ONE_RUN = 10**9  # a budget no prompt reaches: the whole prompt in one run


async def _level(session, budget: int, streams: list[dict], long: dict, observer_events: list) -> dict[str, Any]:
    from bca_deploy.serving.engine import GenerationEngine, SamplingParams

    def observe(event, values):
        if event == "prefill":
            observer_events.append((time.perf_counter(), values["tokens"], values["seconds"]))

    engine = GenerationEngine(session, max_batch_rows=32, max_prefill_tokens=budget, observer=observe)
    await engine.start()
    try:
        times: list[list[float]] = [[] for _ in streams]
        tokens: list[list[int]] = [[] for _ in streams]
        started = asyncio.Event()

        async def reader(i: int, job: dict) -> None:
            stream = engine.submit(job["prompt"], job["adapter"], SamplingParams(max_new_tokens=job["new"]))
            async for event in stream:
                times[i].append(time.perf_counter())
                tokens[i].append(event.token_id)
                if i == 0 and len(times[0]) == 16:
                    started.set()

        readers = [asyncio.create_task(reader(i, job)) for i, job in enumerate(streams)]
        await started.wait()  # the streams are decoding
        observer_events.clear()
        sent = time.perf_counter()
        long_stream = engine.submit(long["prompt"], long["adapter"], SamplingParams(max_new_tokens=long["new"]))
        long_tokens = []
        first = None
        async for event in long_stream:
            first = first or time.perf_counter()
            long_tokens.append(event.token_id)
        await asyncio.gather(*readers)
    finally:
        await engine.stop()
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:]) if sent <= b and a <= first]
    before = [b - a for ts in times for a, b in zip(ts, ts[1:]) if b < sent]
    prefill = [e for e in observer_events if e[1] > len(streams)]  # the long prompt's runs (not decode-sized)
    return {"max_gap_ms": 1e3 * max(gaps), "usual_gap_ms": 1e3 * statistics.median(before),
            "ttft_s": first - sent, "prefill_runs": len(prefill), "prefill_s": sum(e[2] for e in prefill),
            "tokens": tokens, "long_tokens": long_tokens}


def measure(kind: str, args, work: Path) -> list[dict[str, Any]]:
    import serve_generation as sg

    from bca_deploy.serving import MultiAdapterSession

    art = sg.build_decoder(kind, work, args.adapters, args.long + 256)
    session = MultiAdapterSession(art["onnx"], intra_op_threads=args.threads)
    names = [d.name for d in art["adapters"]]
    vocab = sg.MODELS[kind]["vocab_size"]
    streams = sg.make_requests(args.streams, vocab, names, (8, 32), (200, 200), seed=1)
    long = sg.make_requests(1, vocab, names, (args.long, args.long), (4, 4), seed=2)[0]
    budgets = [b if b > 0 else ONE_RUN for b in args.budgets]
    samples: dict[int, list[dict]] = {b: [] for b in budgets}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for budget in (budgets if round_ % 2 == 0 else budgets[::-1]):
            result = asyncio.run(_level(session, budget, streams, long, []))
            if round_:
                samples[budget].append(result)
            print(f"{kind} round {round_} budget {budget}: max gap {result['max_gap_ms']:.0f} ms, "
                  f"ttft {result['ttft_s']:.2f} s", flush=True)
    reference = samples[budgets[0]][0]
    rows = []
    for budget in budgets:
        runs = samples[budget]
        same = all(r["tokens"] == reference["tokens"] and r["long_tokens"] == reference["long_tokens"] for r in runs)
        rows.append({"model": kind, "max_prefill_tokens": "one run" if budget == ONE_RUN else budget,
                     "long_prompt_tokens": args.long, "streams": args.streams,
                     "max_gap_ms": statistics.median(r["max_gap_ms"] for r in runs),
                     "usual_gap_ms": statistics.median(r["usual_gap_ms"] for r in runs),
                     "long_ttft_s": statistics.median(r["ttft_s"] for r in runs),
                     "long_prefill_runs": runs[0]["prefill_runs"],
                     "long_prefill_s": statistics.median(r["prefill_s"] for r in runs),
                     "tokens_equal": same, "rounds": len(runs)})
    return rows


def measure_clients(kind: str, args, work: Path) -> list[dict[str, Any]]:
    """The closed-loop 32-client levels of ``serve_generation`` at each budget (paired rounds)."""
    import serve_generation as sg

    budgets = [b if b > 0 else ONE_RUN for b in args.budgets]
    rounds = sg.paired_engine_rounds(kind, args, work, {b: (lambda b: lambda session: {"max_prefill_tokens": b})(b)
                                                         for b in budgets})

    def tokens_per_s(sample) -> float:
        return sum(len(r["tokens"]) for r in sample["result"]["records"]) / sample["result"]["wall_s"]

    rows = []
    for budget, samples in rounds.items():
        gaps = [[g for r in s["result"]["records"] for g in r["gaps"]] for s in samples]
        rows.append({"model": kind, "max_prefill_tokens": "one run" if budget == ONE_RUN else budget,
                     "clients": args.clients, "tokens_per_s": statistics.median(tokens_per_s(s) for s in samples),
                     "paired_ratio": statistics.median(tokens_per_s(s) / tokens_per_s(b)
                                                       for s, b in zip(samples, rounds[budgets[0]])),
                     "itl_p99_ms": 1e3 * statistics.median(percentile(g, 99) for g in gaps),
                     "rounds": len(samples)})
    return rows


def main() -> None:
    from common import markdown_table, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["tiny", "minilm"], default=["tiny", "minilm"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 512, 128],
                        help="--max-prefill-tokens values to compare (0: one run, however long)")
    parser.add_argument("--long", type=int, default=1024, help="tokens of the long prompt")
    parser.add_argument("--streams", type=int, default=8, help="streams decoding when it arrives")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients of the short-prompt levels")
    parser.add_argument("--client-budgets", type=int, nargs="+", default=[4096, 512],
                        help="--max-prefill-tokens values of the short-prompt levels")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args()
    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows: list[dict] = []
    client_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bca-bench-prefill-chunks-") as tmp:
        for kind in args.models:
            rows += measure(kind, args, Path(tmp))
            print(markdown_table(rows), flush=True)
        if args.clients:
            level_args = argparse.Namespace(**{**vars(args), "budgets": args.client_budgets})
            for kind in args.models:
                client_rows += measure_clients(kind, level_args, Path(tmp) / "clients")
                print(markdown_table(client_rows), flush=True)
    load_end = [round(v, 2) for v in os.getloadavg()]
    if args.no_write:
        return
    text = f"""
{args.streams} streams (prompts 8-32 tokens, 200 new tokens, greedy, random adapters of {args.adapters}) decode when
one request of a {args.long}-token prompt (4 new tokens) arrives; `max_batch_rows` 32, onnxruntime CPU with
{args.threads} intra-op threads. Gaps: the running streams' inter-token gaps, client side, from the long request's
submission to its first token (`max_gap_ms`: the largest), against their median gap before it (`usual_gap_ms`). `long_prefill_s`: the long
prompt's prefill runs' onnxruntime time in all. "one run": a budget above the prompt's length (the engine before
chunked prefill). `tokens_equal`: every stream's and the long request's tokens equal those of the first budget, in
every round. Medians over {args.rounds} rounds (budgets alternate order; one warm-up round).

Where prompts are short: {args.clients} closed-loop clients, {3 * args.clients} requests per level (prompts 8-64
tokens, 8-64 new, greedy), each budget of {args.client_budgets} once per round, {args.rounds} rounds after a warm-up;
`paired_ratio`: tokens/s over the first budget's in the same round (median); `itl_p99_ms`: inter-token latency p99.

{markdown_table(client_rows) if client_rows else ""}

Command: `python bench/serve_prefill_chunks.py {' '.join(sys.argv[1:])}`. Load average (1, 5, 15 min) at the start
{load_start} and at the end {load_end} on {os.cpu_count()} cores; total {(time.perf_counter() - start) / 60:.1f} min.
"""
    print("wrote", *write_results("serve_prefill_chunks", rows, notes=text,
                                  title="Chunked prefill: running streams' gaps while a long prompt is prefilled"))


if __name__ == "__main__":
    main()
