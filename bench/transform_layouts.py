"""How the unmerged graph's block transforms could be laid out in onnxruntime, side by side in one run (CPU).

The unmerged BCA subgraph (``bca_deploy/exporters/graph.py``) computes a forward transform of every block of
the input, ``X = F(x)``: x (N·q, p) → X (R, N·q), and an inverse one added to the base output,
``y = base + G(P)``: P (R, N·o) → y (N·o, p). This script builds each candidate layout as a small ONNX graph
and times it alone, so that a layout can be judged without the noise of a whole layer:

forward
  - ``two-stage``: Transpose(x) then the two stage MatMuls (Cooley–Tukey, p = A·C);
  - ``two-stage-no-transpose``: the first stage as a broadcast MatMul over x viewed (N·q, A, C) and the second
    reading that result through a Transpose that onnxruntime fuses into its FusedMatMul (transB + transBatchB),
    so no activation is copied; the same constants and the same numbers (what graphs use for p > 64);
  - ``one-matmul``: Cf @ xᵀ (onnxruntime packs xᵀ inside the GEMM; what graphs use up to p = 64);
inverse
  - ``two-stage``: the two stage MatMuls, then Transpose and Add (every two-stage plan: p >= 64, divisible by 4);
  - ``one-gemm``: Gemm(Pᵀ, Ci, base) (single-stage plans).

Times are CPU seconds of the calling thread (onnxruntime with 1 intra-op thread, so the run is on that
thread), per run, medians over ``--repeats`` rounds in rotating order: CPU time is less sensitive than wall
time to other work on the machine. Every variant's output is checked against the graph module's PyTorch
math for the same constants before timing.

    python3 bench/transform_layouts.py                # writes bench/results/transform_layouts.{json,md}
    python3 bench/transform_layouts.py --repeats 5    # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_round_robin, write_results  # noqa: E402

from bca_deploy.exporters.graph import _single_stage, _two_stage, spectral_plan  # noqa: E402

#: (workload, tokens, d_in, d_out): a Llama-7B MLP down projection and attention projection at 512 tokens,
#: all-MiniLM-L6-v2's attention projection at 8 x 128 tokens.
WORKLOADS = [("llama-down", 512, 11008, 4096), ("llama-q", 512, 4096, 4096), ("minilm-q", 1024, 384, 384)]
BLOCK_SIZES = {"llama-down": (64, 128, 256), "llama-q": (64, 128, 256), "minilm-q": (64, 128)}
FORWARD = ("two-stage", "two-stage-no-transpose", "one-matmul")
INVERSE = ("two-stage", "one-gemm")


def _model(nodes: list, inits: dict[str, np.ndarray], inputs: dict[str, tuple[int, ...]]) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "transform",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _shape(*dims: int) -> np.ndarray:
    return np.array(dims, dtype=np.int64)


def forward_graph(variant: str, p: int, blocks: int) -> bytes:
    """The forward transform x (blocks, p) → X (R, blocks) as ``variant`` lays it out."""
    from onnx import helper

    plan = spectral_plan(p)
    a, c, g, r = plan.outer, plan.inner, plan.groups, plan.rows
    node = helper.make_node
    if variant == "one-matmul":
        fwd = _single_stage(plan)["fwd"].float().numpy()
        return _model([node("Transpose", ["x"], ["xt"], perm=[1, 0]), node("MatMul", ["Cf", "xt"], ["out"])],
                      {"Cf": fwd}, {"x": (blocks, p)})
    if not plan.two_stage:
        raise ValueError(f"p={p} has no two-stage plan")
    two = _two_stage(plan)
    t1, t2 = two["fwd_outer"].float().numpy(), two["fwd_inner"].float().numpy()
    if variant == "two-stage":
        nodes = [node("Transpose", ["x"], ["xt"], perm=[1, 0]), node("Reshape", ["xt", "s1"], ["x1"]),
                 node("MatMul", ["T1", "x1"], ["z"]), node("Reshape", ["z", "s2"], ["z2"]),
                 node("MatMul", ["T2", "z2"], ["X"]), node("Reshape", ["X", "s3"], ["out"])]
        shapes = {"s1": _shape(a, -1), "s2": _shape(g, 2 * c, -1), "s3": _shape(r, -1)}
    elif variant == "two-stage-no-transpose":
        nodes = [node("Reshape", ["x", "s1"], ["x1"]), node("MatMul", ["T1", "x1"], ["z"]),  # (blocks, A, C)
                 node("Reshape", ["z", "s2"], ["z2"]),  # (blocks, A/2, 2C)
                 node("Transpose", ["z2"], ["zt"], perm=[1, 2, 0]),  # fused: FusedMatMul transB + transBatchB
                 node("MatMul", ["T2", "zt"], ["X"]), node("Reshape", ["X", "s3"], ["out"])]
        shapes = {"s1": _shape(-1, a, c), "s2": _shape(-1, g, 2 * c), "s3": _shape(r, -1)}
    else:
        raise ValueError(f"unknown forward variant {variant!r}")
    return _model(nodes, {"T1": t1, "T2": t2, **shapes}, {"x": (blocks, p)})


def inverse_graph(variant: str, p: int, blocks: int) -> bytes:
    """base (blocks, p) + the inverse transform of P (R, blocks), as ``variant`` lays it out."""
    from onnx import helper

    plan = spectral_plan(p)
    a, c, g, r = plan.outer, plan.inner, plan.groups, plan.rows
    node = helper.make_node
    inputs = {"P": (r, blocks), "base": (blocks, p)}
    if variant == "one-gemm":
        inv = _single_stage(plan)["inv"].float().numpy()
        return _model([node("Gemm", ["P", "Ci", "base"], ["out"], transA=1)], {"Ci": inv}, inputs)
    if variant != "two-stage":
        raise ValueError(f"unknown inverse variant {variant!r}")
    two = _two_stage(plan)
    t2i, t1i = two["inv_inner"].float().numpy(), two["inv_outer"].float().numpy()
    nodes = [node("Reshape", ["P", "s1"], ["p1"]), node("MatMul", ["T2i", "p1"], ["u"]),
             node("Reshape", ["u", "s2"], ["u2"]), node("MatMul", ["T1i", "u2"], ["yt"]),
             node("Reshape", ["yt", "s3"], ["yt2"]), node("Transpose", ["yt2"], ["y"], perm=[1, 0]),
             node("Add", ["base", "y"], ["out"])]
    shapes = {"s1": _shape(g, 3 * c, -1), "s2": _shape(a, -1), "s3": _shape(p, -1)}
    return _model(nodes, {"T2i": t2i, "T1i": t1i, **shapes}, inputs)


def reference_forward(x: np.ndarray, p: int) -> np.ndarray:
    """X (R, blocks) by the single-stage constants in float64: what every forward variant must give."""
    fwd = _single_stage(spectral_plan(p))["fwd"]
    return (fwd @ torch.from_numpy(x).double().T).numpy()


def reference_inverse(prod: np.ndarray, base: np.ndarray, p: int) -> np.ndarray:
    """base + the inverse transform of the product rows, by the single-stage constants in float64."""
    inv = _single_stage(spectral_plan(p))["inv"]
    return base + (torch.from_numpy(prod).double().T @ inv).numpy()


def session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def cpu_times(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median CPU ms per call of each function, one call of each per round, the order rotating every round."""
    _, times = time_round_robin(fns, warmup, repeats, clock=time.process_time)
    return {name: statistics.median(t) for name, t in times.items()}


def landed(kind: str, p: int) -> str:
    """The layout the exporter emits for block size ``p`` (see graph._mode)."""
    from bca_deploy.exporters.graph import _ONE_STAGE_FORWARD_MAX_P

    if not spectral_plan(p).two_stage:
        return "one-matmul" if kind == "forward" else "one-gemm"
    if kind == "forward":
        return "one-matmul" if p <= _ONE_STAGE_FORWARD_MAX_P else "two-stage-no-transpose"
    return "two-stage"


def bench_workload(name: str, tokens: int, d_in: int, d_out: int, p: int, warmup: int, repeats: int,
                   rng: np.random.Generator) -> list[dict]:
    rows = []
    for kind, variants, blocks in (("forward", FORWARD, tokens * d_in // p), ("inverse", INVERSE, tokens * d_out // p)):
        plan = spectral_plan(p)
        if kind == "forward":
            x = rng.standard_normal((blocks, p)).astype(np.float32)
            feeds, reference = {"x": x}, reference_forward(x, p)
            build = forward_graph
        else:
            prod = rng.standard_normal((plan.rows, blocks)).astype(np.float32)
            base = rng.standard_normal((blocks, p)).astype(np.float32)
            feeds, reference = {"P": prod, "base": base}, reference_inverse(prod, base, p)
            build = inverse_graph
        sessions = {v: session(build(v, p, blocks)) for v in variants}
        scale = float(np.abs(reference).max())
        errors = {v: float(np.abs(s.run(None, feeds)[0] - reference).max()) / scale for v, s in sessions.items()}
        bad = {v: e for v, e in errors.items() if not e < 1e-5}
        if bad:
            raise SystemExit(f"{name} p={p} {kind}: variants differ from the reference: {bad}")
        ms = cpu_times({v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}, warmup, repeats)
        ours = landed(kind, p)
        for v in variants:
            rows.append({"workload": name, "tokens": tokens, "d_in": d_in, "d_out": d_out, "p": p, "transform": kind,
                         "layout": v, "exported": "yes" if v == ours else "", "cpu_ms": ms[v],
                         "vs_exported": ms[v] / ms[ours], "max_rel_error": errors[v]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per workload (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS),
                        help="comma-separated subset of " + ", ".join(w[0] for w in WORKLOADS))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    chosen = [w for w in WORKLOADS if w[0] in args.workloads.split(",")]
    if not chosen:
        parser.error(f"--workloads: none of {args.workloads!r} is one of {[w[0] for w in WORKLOADS]}")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for name, tokens, d_in, d_out in chosen:
        for p in BLOCK_SIZES[name]:
            new = bench_workload(name, tokens, d_in, d_out, p, args.warmup, args.repeats, rng)
            for row in new:
                print(f"{row['workload']:11s} p={row['p']:<4d} {row['transform']:8s} {row['layout']:24s} "
                      f"{row['cpu_ms']:8.2f} ms  {row['vs_exported']:.2f}x{'  (exported)' if row['exported'] else ''}",
                      flush=True)
            rows += new
    notes = """
CPU ms per run of each layout alone (1 intra-op thread, CPU time of the calling thread, medians over rounds in
rotating order); `vs_exported`: that time over the layout the exporter emits for this p. Every layout's output
was checked against the single-stage constants in float64 (`max_rel_error`). The forward transform of an input is
shared by the layers that read it; the inverse runs once per adapted layer.
"""
    json_path, md_path = write_results("transform_layouts", rows, title="Block-transform layouts under onnxruntime (CPU)",
                                       notes=notes, extra={"repeats": args.repeats, "warmup": args.warmup})
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
