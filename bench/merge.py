"""Streaming checkpoint merge: time against a plain file copy, and peak memory against the largest shard.

Builds a Llama-shaped bf16 checkpoint with random weights (written tensor by tensor with bca-deploy's
own safetensors writer, so building it needs no more RAM than one tensor) and a bca-deploy adapter on
q, k, v, o, gate, up and down with block size p (non-zero kernels), then alternates:

* **copy**: ``shutil.copy`` of every file of the checkpoint into a fresh directory (in this process);
* **merge**: ``bca_deploy.merge.merge_checkpoint`` in a fresh subprocess, which reports its own wall
  time (imports excluded) and its peak RSS (``ru_maxrss``).

Page caches cannot be dropped here (no root), so both read the checkpoint from the page cache after
the first pass; the order is copy first, then merge, alternating for ``--repeats`` rounds, with
``os.sync()`` before each timed step so neither pays for the other's dirty pages. Neither fsyncs.

Goals (issue #4): merge time / copy time ≤ 1.5, and merge peak RSS ≤ largest shard + 1 GiB.

    PYTHONPATH=. python3 bench/merge.py                 # ~1.1B parameters (TinyLlama shape), 2 GB shards
    PYTHONPATH=. python3 bench/merge.py --size 7b       # Llama-2-7B shape, ~13.5 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bca_deploy.config import KERNEL_SUFFIX, AdapterConfig, ModuleSpec  # noqa: E402
from bca_deploy.adapter_io import write_adapter_dir  # noqa: E402
from bca_deploy.merge import SAFE_WEIGHTS_INDEX_NAME, SafetensorsWriter, TensorInfo  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, attention heads, kv heads, vocab)
    "tiny": (512, 1536, 4, 8, 4, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of a LlamaForCausalLM, in transformers' order."""
    hidden, inter, layers, heads, kv_heads, vocab = SIZES[size]
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        out += [
            (f"{pre}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{pre}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{pre}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{pre}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{pre}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{pre}.mlp.up_proj.weight", (inter, hidden)),
            (f"{pre}.mlp.down_proj.weight", (hidden, inter)),
            (f"{pre}.input_layernorm.weight", (hidden,)),
            (f"{pre}.post_attention_layernorm.weight", (hidden,)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def build_checkpoint(directory: Path, size: str, shard_bytes: int, seed: int = 0) -> dict:
    """Write config.json, generation_config.json, the shards and the index; return a description."""
    from transformers import GenerationConfig, LlamaConfig

    hidden, inter, layers, heads, kv_heads, vocab = SIZES[size]
    directory.mkdir(parents=True)
    LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, torch_dtype="bfloat16",
    ).save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(directory)

    entries = [TensorInfo.new(name, "BF16", shape) for name, shape in llama_tensors(size)]
    shards: list[list[TensorInfo]] = [[]]
    for e in entries:  # transformers' rule: start a new shard when this tensor would overflow the current one
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(e)
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)] if n > 1 else ["model.safetensors"]

    # Random values: one 64M-value pool, sliced at moving offsets (the merge's speed does not depend on them).
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.bfloat16)
    cursor = 0
    weight_map = {}
    for name, shard in zip(names, shards):
        with SafetensorsWriter(directory / name, shard, {"format": "pt"}) as writer:
            for e in shard:
                count = e.nbytes // 2
                parts = []
                while count:
                    take = min(count, pool.numel() - cursor)
                    parts.append(pool[cursor: cursor + take])
                    cursor = (cursor + take + 7919) % pool.numel()
                    count -= take
                writer.write(e.name, torch.cat(parts).view(e.shape) if len(parts) > 1 else parts[0].view(e.shape))
                weight_map[e.name] = name
    total = sum(e.nbytes for e in entries)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    sizes = [(directory / s).stat().st_size for s in names]
    return {
        "size": size,
        "parameters": sum(e.nbytes // 2 for e in entries),
        "bytes": total,
        "shards": n,
        "largest_shard_bytes": max(sizes),
        "largest_adapted_tensor_bytes": max(e.nbytes for e in entries if e.name.rsplit(".", 2)[-2] in TARGETS),
    }


def build_adapter(directory: Path, size: str, block_size: int, seed: int = 1) -> dict:
    """A bca-deploy adapter on every q/k/v/o/gate/up/down with N(0, 0.02) kernels."""
    gen = torch.Generator().manual_seed(seed)
    specs, state = {}, {}
    for name, shape in llama_tensors(size):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        d_out, d_in = shape
        spec = ModuleSpec(block_size=block_size, scaling=1.0, in_features=d_in, out_features=d_out)
        specs[module] = spec
        state[module + KERNEL_SUFFIX] = torch.randn(spec.kernel_shape, generator=gen) * 0.02
    config = AdapterConfig(
        target_modules=list(TARGETS), block_size=block_size, init="normal", modules=specs, base_model_type="llama"
    )
    write_adapter_dir(directory, config.to_dict(), state)
    return {"block_size": block_size, "modules": len(specs), "kernel_parameters": config.num_parameters}


def child_merge(model_dir: str, adapter_dir: str, out_dir: str) -> None:
    """Run in the subprocess: one merge, then print a JSON line with its time and memory."""
    import psutil

    from bca_deploy.merge import merge_checkpoint

    rss_before = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    merge_checkpoint(model_dir, [(adapter_dir, 1.0)], out_dir, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # VmHWM: this process's peak resident set since exec. (ru_maxrss is not used: after fork + exec it
    # still counts the parent's RSS at fork time.)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"merge_s": seconds, "merge_cpu_s": cpu, "peak_rss_bytes": peak, "rss_before_merge_bytes": rss_before}))


def tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def plain_copy(src: Path, dst: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, kernel time included) of copying every file."""
    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    dst.mkdir()
    for path in sorted(src.iterdir()):
        shutil.copy(path, dst / path.name)
    return time.perf_counter() - t0, time.process_time() - c0


def run_merge(src: Path, adapter: Path, dst: Path) -> dict:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child-merge", str(src), str(adapter), str(dst)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"merge subprocess failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="model shape (default: 1b, ~1.1B params)")
    parser.add_argument("--shard-size-gb", type=float, default=2.0, help="max shard size in GB (default 2)")
    parser.add_argument("--block-size", type=int, default=256, help="adapter block size p (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="copy/merge rounds, alternating (default 3)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary checkpoint goes (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/merge.*")
    parser.add_argument("--child-merge", nargs=3, metavar=("MODEL", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_merge:
        child_merge(*args.child_merge)
        return

    hidden, inter, layers, *_ = SIZES[args.size]
    expected = sum(2 * __import__("math").prod(s) for _, s in llama_tensors(args.size))
    free = shutil.disk_usage(args.workdir).free
    if free < 3.2 * expected:
        sys.exit(f"need ~{3.2 * expected / 2**30:.1f} GiB free in {args.workdir} (checkpoint, copy, merged); "
                 f"{free / 2**30:.1f} GiB free")
    work = Path(tempfile.mkdtemp(prefix="bca-bench-merge-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        ckpt = build_checkpoint(work / "model", args.size, int(args.shard_size_gb * 1e9))
        adapter = build_adapter(work / "adapter", args.size, args.block_size)
        print(f"built {ckpt['parameters'] / 1e9:.2f}B-parameter bf16 checkpoint ({ckpt['bytes'] / 2**30:.2f} GiB, "
              f"{ckpt['shards']} shards) and adapter in {time.perf_counter() - t0:.1f}s", flush=True)
        rows = []
        for r in range(args.repeats):
            load = os.getloadavg()[0]
            copy_s, copy_cpu = plain_copy(work / "model", work / "copy")
            assert tree_bytes(work / "copy") == tree_bytes(work / "model")
            shutil.rmtree(work / "copy")
            m = run_merge(work / "model", work / "adapter", work / "merged")
            shutil.rmtree(work / "merged")
            row = {
                "round": r + 1,
                "copy_s": copy_s,
                "merge_s": m["merge_s"],
                "merge_process_s": m["process_s"],
                "merge/copy": m["merge_s"] / copy_s,
                "copy_cpu_s": copy_cpu,
                "merge_cpu_s": m["merge_cpu_s"],
                "cpu merge/copy": m["merge_cpu_s"] / copy_cpu,
                "peak_rss_GiB": m["peak_rss_bytes"] / 2**30,
                "rss_before_merge_GiB": m["rss_before_merge_bytes"] / 2**30,
                "peak_rss/largest_shard": m["peak_rss_bytes"] / ckpt["largest_shard_bytes"],
                "load_avg_1m": load,
            }
            rows.append(row)
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        summary = {
            "round": "median",
            **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"},
        }
        rows.append(summary)
        largest_gib = ckpt["largest_shard_bytes"] / 2**30
        goals = {
            "ratio_goal": 1.5,
            "ratio_met": summary["merge/copy"] <= 1.5,
            "rss_goal_GiB": largest_gib + 1.0,
            "rss_met": summary["peak_rss_GiB"] <= largest_gib + 1.0,
        }
        columns = list(rows[0])
        from bench.common import markdown_table

        print()
        print(markdown_table(rows, columns))
        print(json.dumps({"checkpoint": ckpt, "adapter": adapter, **goals}, indent=2))
        if not args.no_write:
            from bench.common import write_results

            notes = (
                f"Checkpoint: Llama-shaped `{args.size}` (hidden {hidden}, intermediate {inter}, {layers} layers), "
                f"{ckpt['parameters'] / 1e9:.2f}B parameters, bf16, {ckpt['bytes'] / 2**30:.2f} GiB in "
                f"{ckpt['shards']} shard(s), largest shard {largest_gib:.2f} GiB; random weights. Adapter: "
                f"p={adapter['block_size']} on {adapter['modules']} modules (q,k,v,o,gate,up,down), "
                f"{adapter['kernel_parameters'] / 1e6:.2f}M kernel parameters, N(0, 0.02).\n\n"
                "copy_s: `shutil.copy` of every file into a fresh directory (in-process). merge_s: "
                "`merge_checkpoint` in a fresh subprocess, imports excluded (merge_process_s includes "
                "starting Python and importing torch). Page caches cannot be dropped without root: the "
                "checkpoint was just written, so both read it from the page cache; copy runs first and merge "
                "second in each round, with `os.sync()` before each. Neither fsyncs its output. *_cpu_s: CPU time "
                "(user + system, all threads) of the copying process / of the merge call, a steadier measure than "
                "wall time on a shared machine. peak_rss is "
                "the merge process's VmHWM (peak resident set since exec; includes the Python + torch baseline, "
                "rss_before_merge).\n\n"
                f"Goals: merge/copy ≤ {goals['ratio_goal']} — {'met' if goals['ratio_met'] else 'NOT met'}; "
                f"peak RSS ≤ largest shard + 1 GiB = {goals['rss_goal_GiB']:.2f} GiB — "
                f"{'met' if goals['rss_met'] else 'NOT met'}.\n\n"
                "Where the merge's time goes (instrumented runs of the 1b case on this machine, CPU seconds): "
                "writing the adapted weights ~0.9-1.2, reading them ~0.35-0.45, the merge math ~0.7-0.8 "
                "(~0.6 ns per weight: widen to fp32, add the Toeplitz view of the kernels, round, finite check), "
                "kernel-side copies of the untouched tensors ~0.25; the plain copy itself costs ~0.75-1.3. Writing "
                "runs on its own thread, so with a free second core the wall time is about max(read + math, "
                "write), estimated at ~1.5x a copy; with both cores busy with other jobs the threads cannot "
                "overlap and the wall time is the sum.\n\n"
                f"The machine is shared with other jobs ({os.cpu_count()} cores; load_avg_1m is the 1-minute "
                "load average when each round started), so times vary between rounds; the median of the rounds "
                "is the summary row."
            )
            paths = write_results(
                "merge", rows, columns=columns, title="Streaming merge vs plain copy", notes=notes,
                extra={"checkpoint": ckpt, "adapter": adapter, "goals": goals},
            )
            print("wrote", *paths)
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
