"""Generation under concurrent clients: continuous batching (``GenerationEngine``) vs request-level batching.

Part of ``bench/serve.py`` (``--parts generation``); writes ``bench/results/serve_generation.json`` and ``.md``.

Models (random weights from a config, nothing downloaded), each exported as an adapter-bank
``text-generation-with-past`` graph (``fft="matmul"``) with ``--gen-adapters`` (16) distinct BCA adapters on
``q_proj``/``v_proj`` and served by ``MultiAdapterSession`` (onnxruntime CPU, ``--threads`` intra-op threads):

* **tiny**: Llama, hidden 32, 2 layers, 4 heads (2 KV heads), vocabulary 512, block size 8;
* **minilm**: Llama at all-MiniLM-L6-v2's size: hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocabulary 30522, block size 64.

Workload: C concurrent clients (closed loop, in-process asyncio tasks), each sending its share of the level's
requests one after another: a prompt of uniform random length in [``--gen-prompt``] token ids, a greedy
generation of ``--gen-workloads`` lengths (no end-of-sequence id in these configs, so every row runs its full length),
a uniformly random adapter of the 16. The same requests (fixed seed per level) go to every scheduler. Workloads
(the new tokens of a request; see :func:`new_tokens`):

* **uniform** (the default, issue 13's): uniform in [``--gen-new``];
* **heavy-tail**: many short answers and a few long ones, as chat traffic (vLLM's serving benchmark replays
  ShareGPT for it): a log-normal of median ``HEAVY_TAIL["median"]`` tokens and sigma ``HEAVY_TAIL["sigma"]``,
  rounded, at least ``--gen-new``'s minimum and at most ``HEAVY_TAIL["cap"]`` (seeded).

Continuous batching saves the decode row-steps of finished rows (and the padding of prompts): per workload the
results show the *row-step bound*, today's decode row-steps over continuous's (the speedup if a run cost only by its
rows), beside the measured ratio.

Schedulers:

* **continuous**: ``GenerationEngine(max_batch_rows=32)``: rows join the running batch at the next step and
  leave when done; the client reads a stream, so it sees each token when it is made;
* **request-level (today)** (what ``/v1/generate`` did before the engine): requests arriving within
  ``max_wait_ms`` (5 ms) of the first, up to 32 rows, form one batch; every row steps until the batch's longest
  row is done; every request answers when the batch ends, and requests that arrive meanwhile wait for the next
  batch. Its client sees all tokens at once: time to first token = its latency; ``ttft_computed``: when the
  batch's first (prefill) run ended, i.e. the server-side first token;
* **request-level**: the same, but finished rows leave the batch's steps (``MultiAdapterSession.generate``).

Per level and scheduler: generated tokens/s (all tokens / wall time of the level), time to first token p50/p99,
inter-token latency p50/p99 (gaps between a stream's tokens, client side; continuous only), request latency
p50/p99, and the engine's decode-step time and rows per step. Levels run ``--gen-repeats`` times with the
schedulers in alternating order; the ratio is the median of the per-repeat (paired) ratios.
Correctness in the same run: every request's tokens are the same under both schedulers, and a few requests
equal PyTorch ``generate`` of the prompt alone with its adapter (``mixed_adapters``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import percentile

RUN_COLUMNS = ("wall_s", "prefill_runs", "prefill_tokens", "prefill_s", "decode_runs", "decode_row_steps", "decode_s",
               "decode_ms_per_row_step", "outside_runs_s")
GOAL_SPEEDUP = 2.0  # continuous / today's request-level tokens/s at the highest concurrency
CONTINUOUS, REQUEST_LEVEL, TODAY = "continuous", "request-level", "request-level (today)"
VARIANTS = (CONTINUOUS, REQUEST_LEVEL, TODAY)
WORKLOADS = ("uniform", "heavy-tail")
#: The heavy-tailed workload's new tokens: a log-normal of this median and sigma, capped (mean ~26 before the cap; 10%
#: of requests above ~58 tokens, 1% above ~165).
HEAVY_TAIL = {"median": 16, "sigma": 1.0, "cap": 192}


# ---- models -----------------------------------------------------------------------------------------------------


MODELS = {
    "tiny": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, block_size=8, init_std=0.05),
    "minilm": dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=12, num_key_value_heads=12, block_size=64, init_std=0.02),
}


def build_decoder(kind: str, work: Path, adapters: int, max_positions: int) -> dict[str, Any]:
    """A random Llama of ``kind`` saved with ``adapters`` BCA adapters and exported as a validated bank graph."""
    import torch
    import transformers as tf

    from bca_deploy import inject, save_adapter
    from bca_deploy.exporters import export

    spec = dict(MODELS[kind])
    block_size, init_std = spec.pop("block_size"), spec.pop("init_std")
    config = tf.LlamaConfig(**spec, max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)
    root = work / f"decoder-{kind}"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(root / "model")
    dirs = []
    model = tf.LlamaForCausalLM.from_pretrained(root / "model")
    for i in range(adapters):
        name = f"a{i:02d}"
        inject(model, ["q_proj", "v_proj"], block_size=block_size, init="normal", init_std=init_std, seed=i,
               adapter_name=name)
        dirs.append(Path(save_adapter(model, root / "adapters" / name, adapter_name=name)))
    start = time.perf_counter()
    onnx = export(root / "model", root / "onnx", dirs, merge=False, bank=True, task="text-generation-with-past",
                  fft="matmul", cases=[(3, 8)], verbose=False)
    meta = json.loads((Path(onnx) / "bca_export.json").read_text())
    rows = meta.get("validation", {}).get("rows", [])
    return {"kind": kind, "model": root / "model", "adapters": dirs, "onnx": Path(onnx),
            "export_s": time.perf_counter() - start,
            "validation_max_abs_diff": max((r["max_abs_diff"] for r in rows), default=None)}


# ---- the request-level scheduler (the baseline) -----------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    prompt: list[int]
    adapter: str | None
    new: int
    future: asyncio.Future
    enqueued: float


class RequestLevelBatcher:
    """Request-level batching: a batch forms from requests arriving within ``max_wait_ms`` of its first (up to
    ``max_batch_rows``), runs to its end, then the next batch forms.

    ``rows_leave=True``: through ``MultiAdapterSession.generate`` (finished rows leave its steps);
    ``False``: today's ``generate`` on main before the engine: every row steps until the batch's longest row is
    done (finished rows are fed a pad token), the same ``DecodeBatch`` runs otherwise.
    """

    def __init__(self, session, max_batch_rows: int = 32, max_wait_ms: float = 5.0, rows_leave: bool = True) -> None:
        self.session = session
        self.rows_leave = rows_leave
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000.0
        self.first_run_end: list[float] = []  # end of each batch's first (prefill) run: the server-side first token
        self.batches: list[int] = []  # rows per batch
        real_run = session.run_ortvalues
        self._in_batch = threading.local()

        def recording_run(*args, **kwargs):
            out = real_run(*args, **kwargs)
            if getattr(self._in_batch, "first", False):
                self._in_batch.first = False
                self.first_run_end.append(time.perf_counter())
            return out

        session.run_ortvalues = recording_run
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def generate(self, prompt: list[int], adapter: str | None, new: int) -> tuple[list[int], float]:
        """The new tokens and the server-side first-token time of their batch."""
        assert self._queue is not None
        job = _Job(prompt, adapter, new, asyncio.get_running_loop().create_future(), time.perf_counter())
        await self._queue.put(job)
        return await job.future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        held: list[_Job] = []
        while True:
            batch = [held.pop(0) if held else await self._queue.get()]
            deadline = batch[0].enqueued + self.max_wait
            while len(batch) < self.max_batch_rows:
                timeout = deadline - time.perf_counter()
                try:
                    job = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(job)
            try:
                tokens, first = await loop.run_in_executor(None, self._run, batch)
            except Exception as exc:  # noqa: BLE001 - every job of the batch gets it
                for job in batch:
                    job.future.set_exception(exc)
                continue
            for job, out in zip(batch, tokens, strict=True):
                job.future.set_result((out, first))

    def _run(self, batch: list[_Job]) -> tuple[list[list[int]], float]:
        self._in_batch.first = True
        self.batches.append(len(batch))
        if self.rows_leave:
            out = self.session.generate([j.prompt for j in batch], [j.adapter for j in batch],
                                        max_new_tokens=[j.new for j in batch])
        else:
            out = self._generate_to_the_end(batch)
        return out, self.first_run_end[-1]

    def _generate_to_the_end(self, batch: list[_Job]) -> list[list[int]]:
        """Greedy generation where every row steps until the longest is done (as main's generate did)."""
        from bca_deploy.serving.decoding import DecodeBatch, DecodeRow

        snapshot = self.session.snapshot()
        decode = DecodeBatch(self.session)
        rows = [DecodeRow(j.prompt, j.adapter, snapshot) for j in batch]
        logits, _ = decode.prefill(rows)
        out: list[list[int]] = [[] for _ in batch]
        pad = self.session.pad_token_id
        for _ in range(max(j.new for j in batch)):
            for b, token in enumerate(logits.argmax(-1)):
                if len(out[b]) < batch[b].new:
                    out[b].append(int(token))
                rows[b].next_token = int(token) if len(out[b]) < batch[b].new else pad
            if all(len(o) == j.new for o, j in zip(out, batch)):
                break
            rows, logits, _ = decode.step()
        return out


# ---- clients --------------------------------------------------------------------------------------------------


def new_tokens(rng: random.Random, workload: str, new: tuple[int, int]) -> int:
    """One request's new tokens: ``uniform`` in ``new``; ``heavy-tail``: :data:`HEAVY_TAIL`'s capped log-normal, at
    least ``new[0]``."""
    if workload == "uniform":
        return rng.randint(*new)
    if workload == "heavy-tail":
        draw = rng.lognormvariate(math.log(HEAVY_TAIL["median"]), HEAVY_TAIL["sigma"])
        return max(new[0], min(HEAVY_TAIL["cap"], round(draw)))
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def make_requests(count: int, vocab: int, adapters: list[str], prompt: tuple[int, int], new: tuple[int, int],
                  seed: int, workload: str = "uniform") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))],
             "adapter": rng.choice(adapters), "new": new_tokens(rng, workload, new)} for _ in range(count)]


async def _run_level(variant: str, server, requests: list[dict], clients: int) -> dict[str, Any]:
    from bca_deploy.serving.engine import SamplingParams

    shares = [requests[k::clients] for k in range(clients)]
    records: list[dict[str, Any]] = []

    async def client(jobs: list[dict]) -> None:
        for job in jobs:
            t0 = time.perf_counter()
            if variant == "continuous":
                stream = server.submit(job["prompt"], job["adapter"], SamplingParams(max_new_tokens=job["new"]))
                times = []
                async for _ in stream:
                    times.append(time.perf_counter())
                records.append({"job": job, "tokens": list(stream.token_ids), "ttft": times[0] - t0,
                                "ttft_computed": stream.first_token_at - t0, "latency": times[-1] - t0,
                                "gaps": [b - a for a, b in zip(times, times[1:])]})
            else:
                tokens, first = await server.generate(job["prompt"], job["adapter"], job["new"])
                end = time.perf_counter()
                records.append({"job": job, "tokens": tokens, "ttft": end - t0, "ttft_computed": first - t0,
                                "latency": end - t0, "gaps": []})

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(jobs) for jobs in shares))
    wall = time.perf_counter() - start
    return {"records": records, "wall_s": wall, "cpu_s": time.process_time() - cpu,
            "load_1min": round(os.getloadavg()[0], 2)}


def paired_engine_rounds(kind: str, args, work: Path, ways: dict[str, Any],
                         session_options: dict[str, dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``GenerationEngine`` levels on ``kind``'s decoder, one per way per round, for paired A/B benchmarks.

    ``ways[name](session)`` sets a way up right before its level (and may change module state: the caller restores
    it); it may return keyword arguments for that level's ``GenerationEngine``. ``session_options[name]``: keyword
    arguments of a ``MultiAdapterSession`` of that way's own (onnxruntime settings); the other ways share one.
    ``args``: ``adapters``, ``threads``, ``clients``, ``rounds``. Each way runs once as a warm-up, then ``rounds``
    times in alternating order over the same 3·clients requests (prompts 8-64 tokens, 8-64 new).
    Returns per way a list of ``{"result": _run_level's result, "runs": RunMeter.take()}``, one per round.
    """
    import asyncio

    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.engine import GenerationEngine

    art = build_decoder(kind, work, args.adapters, 256)
    own = session_options or {}
    shared = MultiAdapterSession(art["onnx"], intra_op_threads=args.threads) if set(ways) - set(own) else None
    sessions = {way: MultiAdapterSession(art["onnx"], intra_op_threads=args.threads, **own[way]) if way in own
                else shared for way in ways}
    meters = {id(s): RunMeter(s) for s in sessions.values()}
    names = [d.name for d in art["adapters"]]
    requests = make_requests(3 * args.clients, MODELS[kind]["vocab_size"], names, (8, 64), (8, 64), seed=0)

    async def level(session, **engine_kwargs) -> dict:
        engine = GenerationEngine(session, **{"max_batch_rows": 32, "max_queued_rows": 4 * args.clients,
                                              **engine_kwargs})
        await engine.start()
        try:
            return await _run_level(CONTINUOUS, engine, requests, args.clients)
        finally:
            await engine.stop()

    for way, setup in ways.items():  # warm-up, every way
        asyncio.run(level(sessions[way], **(setup(sessions[way]) or {})))
    samples: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            session = sessions[way]
            engine_kwargs = ways[way](session) or {}
            meters[id(session)].take()
            result = asyncio.run(level(session, **engine_kwargs))
            samples[way].append({"result": result, "runs": meters[id(session)].take()})
    return samples


def paired_rows(kind: str, args, samples: dict[str, list[tuple[float, ...]]], way_column: str,
                columns: dict[str, Callable[[list[tuple[float, ...]]], float]], ratio_column: str,
                ratio_of: tuple[str, str]) -> list[dict[str, Any]]:
    """One result row per way of a paired engine benchmark: ``samples[way]`` holds one tuple per round whose first
    value is tokens/s; ``columns`` name what each row shows of its rounds; ``ratio_column``, on the row of
    ``ratio_of[0]``, is the median over rounds of its tokens/s over ``ratio_of[1]``'s in the same round (paired)."""
    top, bottom = (samples[way] for way in ratio_of)
    return [{"model": kind, "clients": args.clients, way_column: way,
             **{name: column(values) for name, column in columns.items()},
             ratio_column: statistics.median(a[0] / b[0] for a, b in zip(top, bottom)) if way == ratio_of[0] else None,
             "rounds": len(values)} for way, values in samples.items()]


def paired_engine_notes(args, specific: str, load_start, load_end, minutes: float) -> str:
    """A paired engine benchmark's results text: the shared workload and load lines around ``specific``."""
    return f"""
{args.clients} closed-loop clients (asyncio tasks reading streams), {3 * args.clients} requests per level (prompts
8-64 tokens, 8-64 new tokens, greedy, adapters uniform over {args.adapters}), `max_batch_rows` 32, onnxruntime CPU
with {args.threads} intra-op threads; the two ways alternate in each of {args.rounds} rounds (after a warm-up of
each). {specific}

Load average (1, 5, 15 min) at the start {load_start} and at the end {load_end} on {os.cpu_count()} cores; total
{minutes:.1f} min.
"""


def paired_engine_main(doc: str, measure, results_name: str, title: str, notes) -> None:
    """The command line of a paired engine benchmark (``bench/serve_handover.py``, ``bench/serve_prefill_logits.py``).

    ``measure(kind, args, work)`` returns the result rows of one model; ``notes(args, load_start, load_end,
    minutes)`` the results file's text. Options: ``--models``, ``--clients``, ``--rounds``, ``--adapters``,
    ``--threads``, ``--no-write``.
    """
    import argparse
    import tempfile

    from common import markdown_table, write_results

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args()
    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bca-bench-{results_name}-") as tmp:
        for kind in args.models:
            rows += measure(kind, args, Path(tmp))
            print(markdown_table(rows), flush=True)
    load_end = [round(v, 2) for v in os.getloadavg()]
    if args.no_write:
        return
    text = notes(args, load_start, load_end, (time.perf_counter() - start) / 60)
    print("wrote", *write_results(results_name, rows, notes=text, title=title))


def _summary(model: str, variant: str, clients: int, result: dict, steps: list[dict]) -> dict[str, Any]:
    records = result["records"]
    tokens = sum(len(r["tokens"]) for r in records)
    gaps = [g for r in records for g in r["gaps"]]
    ms = 1e3
    row = {"model": model, "clients": clients, "scheduler": variant, "requests": len(records), "tokens": tokens,
           "wall_s": result["wall_s"], "tokens_per_s": tokens / result["wall_s"],
           "tokens_per_cpu_s": tokens / result["cpu_s"], "load_1min": result["load_1min"],
           "ttft_p50_ms": percentile([r["ttft"] for r in records], 50) * ms,
           "ttft_p99_ms": percentile([r["ttft"] for r in records], 99) * ms,
           "ttft_computed_p50_ms": percentile([r["ttft_computed"] for r in records], 50) * ms,
           "ttft_computed_p99_ms": percentile([r["ttft_computed"] for r in records], 99) * ms,
           "itl_p50_ms": (percentile(gaps, 50) or 0) * ms if gaps else None,
           "itl_p99_ms": (percentile(gaps, 99) or 0) * ms if gaps else None,
           "latency_p50_ms": percentile([r["latency"] for r in records], 50) * ms,
           "latency_p99_ms": percentile([r["latency"] for r in records], 99) * ms}
    if steps:
        row["step_p50_ms"] = percentile([s["seconds"] for s in steps], 50) * ms
        row["rows_per_step"] = statistics.mean(s["rows"] for s in steps)
    runs = result.get("runs")
    if runs:
        row.update(runs)
        row["decode_ms_per_row_step"] = runs["decode_s"] / max(1, runs["decode_row_steps"]) * ms
        row["outside_runs_s"] = result["wall_s"] - runs["prefill_s"] - runs["decode_s"]
    return row


class RunMeter:
    """Times every onnxruntime run of a session (wraps its ``run_ortvalues``): prefills (more than one input
    position) and decode steps (one), with their rows and tokens, so a level's wall time splits into where
    it went. Both schedulers run through ``run_ortvalues``."""

    def __init__(self, session) -> None:
        self.runs: list[tuple[int, int, float]] = []  # (rows, positions, seconds)
        real = session.run_ortvalues

        def timed(feeds, *args, **kwargs):
            start = time.perf_counter()
            out = real(feeds, *args, **kwargs)
            rows, positions = feeds["input_ids"].shape
            self.runs.append((int(rows), int(positions), time.perf_counter() - start))
            return out

        session.run_ortvalues = timed

    def take(self) -> dict[str, float]:
        runs, self.runs = self.runs, []
        prefill = [r for r in runs if r[1] > 1]
        decode = [r for r in runs if r[1] == 1]
        return {"prefill_runs": len(prefill), "prefill_tokens": sum(r * n for r, n, _ in prefill),
                "prefill_s": sum(t for *_, t in prefill), "decode_runs": len(decode),
                "decode_row_steps": sum(r for r, *_ in decode), "decode_s": sum(t for *_, t in decode)}


# ---- the whole comparison -------------------------------------------------------------------------------------


def run(args, work: Path) -> dict[str, Any]:
    """Every model x level x repeat, both schedulers; returns rows, goals, correctness and settings."""
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.engine import GenerationEngine

    rows, paired, bounds, checks, models_info = [], {}, {}, [], []
    for kind in args.gen_models:
        print(f"  generation: exporting the {kind} decoder with {args.gen_adapters} adapters...", flush=True)
        art = build_decoder(kind, work, args.gen_adapters, args.gen_max_positions)
        names = [d.name for d in art["adapters"]]
        models_info.append({"model": kind, "export_validate_s": round(art["export_s"], 1),
                            "validation_max_abs_diff": art["validation_max_abs_diff"], **MODELS[kind]})
        print(f"    exported in {art['export_s']:.0f} s (validation max |diff| {art['validation_max_abs_diff']})",
              flush=True)
        spin = not args.gen_no_spin
        engine_session = MultiAdapterSession(art["onnx"], intra_op_threads=args.threads, spin=spin)
        batch_session = MultiAdapterSession(art["onnx"], intra_op_threads=args.threads, spin=spin)
        meters = {CONTINUOUS: RunMeter(engine_session), REQUEST_LEVEL: RunMeter(batch_session)}
        vocab = MODELS[kind]["vocab_size"]
        steps: list[dict] = []

        def observer(event: str, values) -> None:
            if event == "step":
                steps.append({"seconds": values["seconds"], "rows": values["rows"]})

        async def one(variant: str, requests: list[dict], clients: int) -> tuple[dict, list[dict]]:
            if variant == "continuous":
                server = GenerationEngine(engine_session, max_batch_rows=args.gen_max_batch_rows,
                                          max_queued_rows=4 * max(args.concurrency), observer=observer)
            else:
                server = RequestLevelBatcher(batch_session, max_batch_rows=args.gen_max_batch_rows,
                                             max_wait_ms=args.max_wait_ms, rows_leave=variant == REQUEST_LEVEL)
            await server.start()
            steps.clear()
            meter = meters[CONTINUOUS if variant == CONTINUOUS else REQUEST_LEVEL]
            meter.take()
            try:
                result = await _run_level(variant, server, requests, clients)
            finally:
                await server.stop()
            result["runs"] = meter.take()
            return result, list(steps)

        warm = make_requests(4, vocab, names, tuple(args.gen_prompt), (4, 8), seed=999)
        for variant in VARIANTS:
            asyncio.run(one(variant, warm, 4))
        tokens_of: dict[str, dict[tuple, list[int]]] = {}
        for workload, (level, clients) in ((w, lc) for w in args.gen_workloads for lc in enumerate(args.concurrency)):
            count = max(args.gen_requests_min, args.gen_requests_per_client * clients)
            requests = make_requests(count, vocab, names, tuple(args.gen_prompt), tuple(args.gen_new), seed=level,
                                     workload=workload)
            for rep in range(args.gen_repeats):
                shift = (level + rep) % len(VARIANTS)
                order = VARIANTS[shift:] + VARIANTS[:shift]  # rotating, so load drifts hit every scheduler alike
                got = {}
                for variant in order:
                    result, level_steps = asyncio.run(one(variant, requests, clients))
                    row = _summary(kind, variant, clients, result, level_steps)
                    row["workload"], row["repeat"] = workload, rep
                    rows.append(row)
                    got[variant] = row
                    by_job = {id(r["job"]): r["tokens"] for r in result["records"]}
                    tokens_of.setdefault(variant, {}).update({(workload, level, i): by_job[id(job)]
                                                              for i, job in enumerate(requests)})
                    print(f"    {kind} {workload} C={clients} rep {rep} {variant}: {row['tokens_per_s']:.0f} tok/s, "
                          f"TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms"
                          + (f", ITL p50/p99 {row['itl_p50_ms']:.1f}/{row['itl_p99_ms']:.1f} ms"
                             if row["itl_p50_ms"] is not None else "")
                          + (f", {row['rows_per_step']:.1f} rows/step" if "rows_per_step" in row else ""), flush=True)
                for baseline in VARIANTS[1:]:
                    paired.setdefault((kind, workload, clients, baseline), []).append(
                        got["continuous"]["tokens_per_s"] / got[baseline]["tokens_per_s"])
                    # the row-step bound: the speedup if a run cost by its rows alone (what continuous batching saves)
                    bounds.setdefault((kind, workload, clients, baseline), []).append(
                        got[baseline]["decode_row_steps"] / max(1, got["continuous"]["decode_row_steps"]))
            # correctness, same run: every scheduler gave every request the same tokens
            for baseline in VARIANTS[1:]:
                same = sum(tokens_of["continuous"][(workload, level, i)] == tokens_of[baseline][(workload, level, i)]
                           for i in range(len(requests)))
                checks.append({"model": kind, "workload": workload, "clients": clients,
                               "check": f"continuous == {baseline} (every request)", "equal": same,
                               "of": len(requests)})
        checks.append(_check_against_pytorch(art, tokens_of["continuous"], args))
        del engine_session, batch_session
    return {"rows": rows, "paired": paired, "bounds": bounds, "checks": checks, "models": models_info}


def _check_against_pytorch(art: dict, tokens: dict, args) -> dict[str, Any]:
    """The first few requests of the first level against PyTorch generate of the prompt alone."""
    import torch

    from bca_deploy.exporters.loading import load_model
    from bca_deploy.inject import mixed_adapters

    model = load_model(art["model"], "text-generation", art["adapters"]).eval()
    vocab = MODELS[art["kind"]]["vocab_size"]
    names = [d.name for d in art["adapters"]]
    clients = args.concurrency[0]
    count = max(args.gen_requests_min, args.gen_requests_per_client * clients)
    requests = make_requests(count, vocab, names, tuple(args.gen_prompt), tuple(args.gen_new), seed=0,
                             workload=args.gen_workloads[0])[:args.gen_check]
    equal = 0
    for i, job in enumerate(requests):
        ids = torch.tensor([job["prompt"]])
        with torch.no_grad(), mixed_adapters(model, [job["adapter"]]):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["new"],
                                 do_sample=False, pad_token_id=0)
        equal += out[0, len(job["prompt"]):].tolist() == tokens[(args.gen_workloads[0], 0, i)]
    return {"model": art["kind"], "workload": args.gen_workloads[0], "clients": clients, "check": "continuous == PyTorch generate alone (mixed_adapters)",
            "equal": equal, "of": len(requests)}


def report(result: dict[str, Any], args, load_start, load_end, total_s: float) -> None:
    """Tables, goals, and bench/results/serve_generation.{json,md}."""
    from common import markdown_table, write_results

    rows = result["rows"]
    keys = ("tokens_per_s", "tokens_per_cpu_s", "load_1min", "ttft_p50_ms", "ttft_p99_ms", "ttft_computed_p50_ms", "ttft_computed_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "latency_p50_ms", "latency_p99_ms", "step_p50_ms", "rows_per_step",
            *RUN_COLUMNS)
    table = []
    levels = dict.fromkeys((kind, workload, clients) for kind, workload, clients, _ in result["paired"])
    for kind, workload, clients in levels:
        for variant in VARIANTS:
            reps = [r for r in rows if r["model"] == kind and r["workload"] == workload and r["clients"] == clients
                    and r["scheduler"] == variant]
            out = {"model": kind, "workload": workload, "clients": clients, "scheduler": variant,
                   "requests": reps[0]["requests"], "tokens": reps[0]["tokens"], "repeats": len(reps)}
            for key in keys:
                values = [r[key] for r in reps if r.get(key) is not None]
                out[key] = statistics.median(values) if values else None
            for baseline, column in ((TODAY, "speedup_vs_today"), (REQUEST_LEVEL, "speedup_vs_rows_leave")):
                out[column] = statistics.median(result["paired"][(kind, workload, clients, baseline)]) \
                    if variant == CONTINUOUS else None
            out["row_step_bound_vs_today"] = statistics.median(result["bounds"][(kind, workload, clients, TODAY)]) \
                if variant == CONTINUOUS else None
            out["share_of_bound"] = out["speedup_vs_today"] / out["row_step_bound_vs_today"] \
                if variant == CONTINUOUS else None
            table.append(out)
    goals = []
    top, one = max(args.concurrency), min(args.concurrency)
    goal_workload = args.gen_workloads[0]  # the TTFT goals read the first workload; the tokens/s goal is uniform's only
    for kind in args.gen_models:
        for workload in args.gen_workloads:
            for baseline in (TODAY, REQUEST_LEVEL):
                ratio = statistics.median(result["paired"][(kind, workload, top, baseline)])
                bound = statistics.median(result["bounds"][(kind, workload, top, baseline)])
                goals.append({"model": kind, "workload": workload,
                              "goal": f"tokens/s continuous / {baseline} at {top} clients >= {GOAL_SPEEDUP}",
                              "value": ratio, "row_step_bound": bound,
                              "status": ("met" if ratio >= GOAL_SPEEDUP else "NOT met")
                              if baseline == TODAY and workload == "uniform" else "(for comparison)"})
        base = next(r for r in table if r["model"] == kind and r["workload"] == goal_workload and r["clients"] == one
                    and r["scheduler"] == TODAY)
        for clients in args.concurrency:
            cont = next(r for r in table if r["model"] == kind and r["workload"] == goal_workload
                        and r["clients"] == clients and r["scheduler"] == CONTINUOUS)
            step = cont["step_p50_ms"] or 0.0
            for label, reference in (("as delivered", base["ttft_p99_ms"]), ("as computed", base["ttft_computed_p99_ms"])):
                bound = reference + step
                goals.append({"model": kind, "workload": goal_workload,
                              "goal": f"TTFT p99 at {clients} clients <= today's at {one} client "
                                                     f"({label}) + one decode step at {clients}",
                              "value": cont["ttft_p99_ms"], "bound": bound,
                              "status": "met" if cont["ttft_p99_ms"] <= bound else "NOT met"})
    columns = ["model", "workload", "clients", "scheduler", "requests", "tokens", "tokens_per_s", "speedup_vs_today",
               "row_step_bound_vs_today", "share_of_bound", "speedup_vs_rows_leave", "tokens_per_cpu_s", "ttft_p50_ms",
               "ttft_p99_ms", "ttft_computed_p50_ms", "ttft_computed_p99_ms", "itl_p50_ms", "itl_p99_ms",
               "latency_p50_ms", "latency_p99_ms", "step_p50_ms", "rows_per_step", "load_1min", "repeats"]
    time_columns = ["model", "workload", "clients", "scheduler", "tokens", *RUN_COLUMNS]
    print()
    print(markdown_table(table, columns))
    print(markdown_table(table, time_columns))
    goal_columns = ["model", "workload", "goal", "value", "row_step_bound", "bound", "status"]
    print(markdown_table(goals, goal_columns))
    print(markdown_table(result["checks"]))
    if args.no_write:
        return
    notes = f"""
Medians over {args.gen_repeats} repeat(s) per level, the three schedulers back to back in rotating order;
`speedup_vs_today` / `speedup_vs_rows_leave` = median over repeats of continuous tokens/s / that scheduler's
tokens/s in the same repeat (paired). Requests per level: max({args.gen_requests_min}, {args.gen_requests_per_client}
x clients); prompts {args.gen_prompt[0]}-{args.gen_prompt[1]} tokens; new tokens per workload (greedy, no
end-of-sequence id: every row runs its length): **uniform** {args.gen_new[0]}-{args.gen_new[1]} (issue 13's goal is
measured on it), **heavy-tail** a log-normal of median {HEAVY_TAIL["median"]} and sigma {HEAVY_TAIL["sigma"]}, rounded,
in [{args.gen_new[0]}, {HEAVY_TAIL["cap"]}] (many short answers, a few long ones, as chat traffic; for comparison: its
ratio is not the goal); adapters uniform over {args.gen_adapters};
`max_batch_rows` {args.gen_max_batch_rows} for every scheduler; request-level `max_wait_ms` {args.max_wait_ms};
onnxruntime CPU, {args.threads} intra-op threads, {"sleeping" if args.gen_no_spin else "spinning"}
between runs{" (`--gen-no-spin`)" if args.gen_no_spin else " (onnxruntime's default)"}; clients are
asyncio tasks in the benchmark process (no HTTP).

- **continuous**: `GenerationEngine`; rows join at the next step, leave when done; clients read streams.
- **request-level (today)**: what `/v1/generate` did before the engine: a batch forms (requests within
  `max_wait_ms` of its first), every row steps until the batch's longest row is done, all answer together.
- **request-level**: the same batches, but finished rows leave the batch's steps (today's
  `MultiAdapterSession.generate`, which now shares the engine's `DecodeBatch`).
- `row_step_bound_vs_today`: today's decode row-steps / continuous's in the same repeat (median): the speedup
  continuous batching would reach if a run cost by its rows alone (it saves the row-steps of finished rows);
  `share_of_bound` = `speedup_vs_today` / that: how much of the bound the scheduler reaches. The bound assumes a
  run costs by its rows; the tiny decoder's runs cost mostly a fixed overhead (20 rows about what 32 cost), so
  there fewer row-steps give less than it says.
- `ttft_*`: submit → first token seen by the client; request-level clients get every token with the answer, so
  their TTFT is their latency. `ttft_computed_*`: submit → the end of the run that computed the first token (the
  batch's or the row's prefill): the best streaming could show.
- `itl_*`: gaps between consecutive tokens of one stream at the client (continuous only).
- `step_p50_ms`, `rows_per_step`: the engine's decode steps (its observer), continuous only.
- `tokens_per_cpu_s`: tokens / CPU seconds of the benchmark process during the level (all its threads): how
  much work each token cost, whatever share of the machine the process got; `load_1min`: the machine's 1-minute
  load average at the end of the level (2 cores: anything above 2 means the process waited for a CPU).

## Where the time goes

Every onnxruntime run of each scheduler's session, timed around `run_ortvalues` (medians over repeats):
`prefill_*`: runs over prompts (several positions; `prefill_tokens` counts padded positions too);
`decode_*`: one-position steps, `decode_row_steps` their rows summed (today's scheduler keeps stepping finished rows
until its batch's longest is done); `outside_runs_s` = wall − prefill − decode: scheduling, delivery, the clients.
On a CPU a run's cost grows with its rows and positions, so continuous batching saves the row-steps of finished rows
and the padding of prompts, not runs: the speedup it can reach here is bounded by how much of today's run time those
are.

{markdown_table(table, time_columns)}
## Goals

{markdown_table(goals, goal_columns)}
## Correctness (same run)

{markdown_table(result["checks"])}
## Models

{markdown_table(result["models"])}
Load average (1, 5, 15 min) at the start {load_start} and at the end {load_end} on {os.cpu_count()} cores; total
{total_s / 60:.1f} min.
"""
    extra = {"goals": goals, "correctness": result["checks"], "models": result["models"], "raw_rows": rows,
             "paired_ratios": {"/".join(map(str, key)): v for key, v in result["paired"].items()},
             "row_step_bounds": {"/".join(map(str, key)): v for key, v in result["bounds"].items()},
             "load_average_start": load_start, "load_average_end": load_end,
             "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "client"}}
    json_path, md_path = write_results("serve_generation", table, columns=columns, notes=notes, extra=extra,
                                       results_dir=args.out,
                                       title="Generation: continuous batching vs request-level batching "
                                             f"({args.gen_adapters} adapters, onnxruntime CPU)")
    print(f"wrote {json_path} and {md_path}")
