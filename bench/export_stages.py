"""Where the unmerged ``matmul`` graph's BCA nodes spend onnxruntime's kernel time, stage by stage (CPU).

One Llama-7B-shaped decoder layer (as in ``bench/export.py``: adapters on q, k, v, o, gate, up, down) is exported
unmerged with ``--fft matmul`` for each block size and profiled with onnxruntime's profiler at 512 tokens: one
warm-up run (dropped), then ``--runs`` runs, the graphs taking turns. Each BCA node (inside an adapted module's
scope, not in its ``base_layer``) is put in its stage by the transform constant it reads (forward stages, the
mix, inverse stages) or its operator (the output's 2-D transpose, the residual add); ``bench/export.py`` reports
the same time by operator.

    python3 bench/export_stages.py                   # writes bench/results/export_stages.{json,md}
    python3 bench/export_stages.py --runs 2 --block-sizes 256 --no-write
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ort_profile_after_warmup, write_results  # noqa: E402
from export import LLAMA_TARGETS, LlamaLayerBlock, _export_block, llama_layer_weights  # noqa: E402

_SCOPE = re.compile(r"/(" + "|".join(LLAMA_TARGETS) + r")/(?!base_layer/)")
# (substring of a constant the node reads, stage), first match wins; the constants are bca_dft_p<p>_<role>.
_BY_CONSTANT = [("_fwd_outer", "forward stage 1"), ("_fwd_inner", "forward stage 2"), ("_fwd", "forward (one MatMul)"),
                ("bca_freq_p", "mix"), ("_inv_inner", "inverse stage 1"), ("_inv_outer", "inverse stage 2"),
                ("_inv", "inverse (one Gemm)")]
_BY_OP = {"Transpose": "transpose", "Add": "residual add"}  # after onnxruntime's fusions: the output's 2-D one


def stage_of(inputs: list[str], op: str) -> str:
    """The stage of a BCA node reading ``inputs`` (names), of operator ``op``: see ``_BY_CONSTANT`` and ``_BY_OP``."""
    for key, stage in _BY_CONSTANT:
        if any(key in name for name in inputs):
            return stage
    return _BY_OP.get(op, f"other ({op})")


def profile_stages(paths: dict[str, Path], threads: int, runs: int, tokens: int) -> dict[str, dict]:
    """Per graph: ``kernel_ms`` (all kernels, per run), ``bca_ms`` and ``stages`` ({stage: ms per run})."""
    import onnx
    import onnxruntime as ort

    x = np.random.default_rng(tokens).standard_normal((1, tokens, 4096)).astype(np.float32)
    inputs, sessions = {}, {}
    for index, (name, path) in enumerate(paths.items()):
        graph = onnx.load(str(path), load_external_data=False).graph
        inputs[name] = {node.name: list(node.input) for node in graph.node}
        del graph
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(path.parent / f"stages_{index}")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name].run(None, {"hidden_states": x})  # warm-up: dropped by ort_profile_after_warmup
    names = list(sessions)
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sessions[name].run(None, {"hidden_states": x})
    out = {}
    for name, session in sessions.items():
        kernels, _ = ort_profile_after_warmup(session)
        total, stages = 0.0, defaultdict(float)
        for event in kernels:
            total += event["dur"]
            node = event["name"][: -len("_kernel_time")]
            if _SCOPE.search(node):
                original = node.split("/MatmulTransposeFusion")[0]  # a fused node keeps its MatMul's name first
                stages[stage_of(inputs[name].get(original, []), event.get("args", {}).get("op_name", "?"))] += event["dur"]
        out[name] = {"kernel_ms": total / runs / 1e3, "bca_ms": sum(stages.values()) / runs / 1e3,
                     "stages": {k: v / runs / 1e3 for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=4, help="profiled runs per graph after the warm-up (default 4)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/export_stages.*")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.threads < 1 or args.tokens < 1:
        parser.error("--runs, --threads and --tokens must be at least 1")
    from bca_deploy import inject

    config, state = llama_layer_weights()
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bca_export_stages_") as tmp:
        paths = {}
        for p in args.block_sizes:
            block = LlamaLayerBlock(config).eval()
            block.load_state_dict(state)
            inject(block, LLAMA_TARGETS, block_size=p, init="normal", init_std=0.02, seed=0)
            paths[f"p={p}"] = Path(tmp) / f"p{p}.onnx"
            _export_block(block, paths[f"p={p}"], "matmul")
            del block
        split = profile_stages(paths, args.threads, args.runs, args.tokens)
    load_end = list(os.getloadavg())
    rows = []
    for name, row in split.items():
        for stage, ms in row["stages"].items():
            rows.append({"graph": name, "stage": stage, "ms": ms, "share_of_bca": ms / row["bca_ms"],
                         "share_of_kernel": ms / row["kernel_ms"]})
        rows.append({"graph": name, "stage": "all BCA nodes", "ms": row["bca_ms"], "share_of_bca": 1.0,
                     "share_of_kernel": row["bca_ms"] / row["kernel_ms"]})
        print(f"{name}: kernel {row['kernel_ms']:.0f} ms per run, BCA {row['bca_ms']:.1f} ms "
              f"({100 * row['bca_ms'] / row['kernel_ms']:.1f}%): "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items()), flush=True)
    print(f"load average at the start {load_start}, at the end {load_end}")
    if args.no_write:
        return 0
    notes = f"""
One Llama-7B layer (q, k, v, o, gate, up, down adapted), unmerged `matmul` graph, {args.tokens} tokens,
onnxruntime CPUExecutionProvider, {args.threads} intra-op threads, default graph optimizations, {args.runs} profiled
runs per graph after a dropped warm-up, the graphs taking turns. `ms`: kernel time per run; `share_of_bca`: of the
BCA nodes' time; `share_of_kernel`: of all the graph's kernel time (the BCA nodes alone make the graph
1 / (1 - share) slower). Stages: forward stage 1 (A x A by A x C per block, batched), forward stage 2 (a FusedMatMul
reading stage 1 permuted), forward (one MatMul, Cf @ x^T, up to p = 64), the mix (R batched q x o GEMMs),
inverse stage 1 (per group), inverse stage 2 (one A x A GEMM), the transpose (after onnxruntime's fusions the
one left is the output's 2-D transpose), and the residual add (Add(base, Δ) after the 3-D base MatMul). Load average (1, 5, 15 min) at the start {load_start}, at the end {load_end} (2 cores).
"""
    json_path, md_path = write_results("export_stages", rows, title="Unmerged matmul graph: BCA kernel time by stage",
                                       notes=notes, extra={"graphs": split, "threads": args.threads, "runs": args.runs,
                                                           "load_start": load_start, "load_end": load_end})
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
