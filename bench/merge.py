"""Streaming checkpoint merge: time against a plain file copy, and peak memory against the largest shard.

Builds a Llama-shaped bf16 checkpoint with random weights (written tensor by tensor with bca-deploy's
own safetensors writer, so building it needs no more RAM than one tensor) and a bca-deploy adapter on
q, k, v, o, gate, up and down with block size p (non-zero kernels), then alternates:

* **copy**: ``shutil.copy`` of every file of the checkpoint into a fresh directory (in this process);
* **merge**: ``bca_deploy.merge.merge_checkpoint`` in a fresh subprocess, which reports its own wall
  time (imports excluded) and its peak RSS (``ru_maxrss``).

Page caches cannot be dropped here (no root), so both read the checkpoint from the page cache after
the first pass; the order is copy first, then merge, alternating for ``--repeats`` rounds, with
``os.sync()`` before each timed step so neither pays for the other's dirty pages. The merge fsyncs its
output (its atomic writer does, so a kill or a power cut never leaves half an ``--out``); the plain copy
does not, so each round also times a **durable copy** (the same copy, then an fsync of every file and of
the directory) and reports merge/durable_copy beside merge/copy.

Goals (issues #4, #15): merge time / copy time ≤ 1.5, and merge peak RSS ≤ largest shard + 1 GiB.
``--profile`` adds the CPU time of each stage of the write path (where the time goes).

    PYTHONPATH=. python3 bench/merge.py --profile       # ~1.1B parameters (TinyLlama shape), 2 GB shards
    PYTHONPATH=. python3 bench/merge.py --size 7b       # Llama-2-7B shape, ~12.6 GiB -> bench/results/merge_7b.*
"""

from __future__ import annotations

import argparse
import json
import math
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
from bca_deploy.atomic import _fsync_tree  # noqa: E402  (the writer's own fsync, for the durable copy)
from bca_deploy.merge import SAFE_WEIGHTS_INDEX_NAME, SafetensorsWriter, TensorInfo  # noqa: E402
from bench.common import markdown_table, write_results  # noqa: E402

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
        architectures=["LlamaForCausalLM"],  # as in a real checkpoint: the fit check builds this class
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


def child_merge(model_dir: str, adapter_dir: str, out_dir: str, fsync: str = "fsync") -> None:
    """Run in the subprocess: one merge, then print a JSON line with its times and memory.

    transformers and the checkpoint's model class (LlamaForCausalLM: its module imports transformers'
    generation code, which imports scikit-learn and SciPy when they are installed) are imported first and
    timed apart: the merge's fit check builds that architecture on the meta device; like importing torch,
    it is a per-process cost, not the merge's work. The planning (reading the adapters, the fit check, the plan) is timed
    inside the call, so the write path's share is known.
    """
    import psutil

    import bca_deploy.merge as merge_module

    t0, c0 = time.perf_counter(), time.process_time()
    import transformers

    config = json.loads((Path(model_dir) / "config.json").read_text())
    getattr(transformers, config["architectures"][0])  # see the docstring

    import_s, import_cpu = time.perf_counter() - t0, time.process_time() - c0
    planning = {"s": 0.0, "cpu": 0.0}
    real_plan = merge_module._plan_merge

    def timed_plan(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_plan(*args, **kwargs)
        finally:
            planning["s"] += time.perf_counter() - t
            planning["cpu"] += time.process_time() - c

    merge_module._plan_merge = timed_plan
    rss_before = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    merge_module.merge_checkpoint(model_dir, [(adapter_dir, 1.0)], out_dir, progress=False, fsync=fsync == "fsync")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # VmHWM: this process's peak resident set since exec. (ru_maxrss is not used: after fork + exec it
    # still counts the parent's RSS at fork time.)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"merge_s": seconds, "merge_cpu_s": cpu, "plan_s": planning["s"], "plan_cpu_s": planning["cpu"],
                      "import_transformers_s": import_s, "import_transformers_cpu_s": import_cpu,
                      "peak_rss_bytes": peak, "rss_before_merge_bytes": rss_before, "workers": merge_module._WORKERS}))


def profile_stages(model_dir: Path, adapter_dir: Path, scratch_dir: Path) -> list[dict]:
    """Where the write path's time goes: each of its stages run alone over the whole checkpoint.

    One thread, the checkpoint in the page cache (it was just written), the stages in the order the merge
    runs them, each timed by its own thread CPU time: per work item, mapping its rows; per chunk of it,
    widening bf16 to fp32 from the mapping, adding the kernel's strided Toeplitz view (numpy), rounding back
    to bf16, the finite check and ``pwrite`` into a new file; unmapping the item; ``copy_file_range`` of the
    untouched tensors. Also: the wall time of the whole single-thread pass, and a plain ``shutil.copy`` of
    the same shards (CPU time of this process, and wall time) for scale, run first (each pass writes into
    memory the previous one's deleted files freed).
    """
    import numpy as np

    from bca_deploy import merge as m

    torch.set_num_threads(1)
    ckpt = m._read_checkpoint(model_dir)
    plan = m._plan_merge(ckpt, m._read_adapters([(adapter_dir, 1.0)]))
    cpu: dict[str, float] = {}
    elements = 0

    def timed(stage: str, fn):
        c0 = time.thread_time()
        result = fn()
        cpu[stage] = cpu.get(stage, 0.0) + time.thread_time() - c0
        return result

    os.sync()
    c0, w0 = time.process_time(), time.perf_counter()
    for shard in ckpt.shards:
        shutil.copy(model_dir / shard, scratch_dir / shard)
    copy_cpu, copy_wall = time.process_time() - c0, time.perf_counter() - w0
    for shard in ckpt.shards:
        (scratch_dir / shard).unlink()
    os.sync()
    wall0 = time.perf_counter()
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        src_fd = os.open(model_dir / shard, os.O_RDONLY)
        out_fd = os.open(scratch_dir / shard, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        scratch = m._Scratch()
        for info in header.tensors:
            begin = header.data_start + info.offset
            if info.name not in plan.terms:
                def copy_all() -> None:
                    done = 0
                    while done < info.nbytes:
                        done += os.copy_file_range(src_fd, out_fd, info.nbytes - done, begin + done, begin + done)

                timed("copy_file_range (untouched tensors)", copy_all)
                continue
            terms = plan.terms[info.name]
            views = timed("delta views (per tensor)", lambda: [t.delta_view() for t in terms])
            rows_total, cols = info.shape
            step = m._block_rows(info)
            p = terms[0].block_size
            chunk = max(1, m._CHUNK_ELEMENTS // cols)
            for start in range(0, rows_total, step):
                stop = min(rows_total, start + step)
                n = stop - start
                offset = begin + start * cols * 2
                mapping, lead = timed("map the work item's rows (mmap)",
                                      lambda: m._map_rows(src_fd, offset, n * cols * 2, 2))
                rows = torch.frombuffer(mapping, dtype=torch.bfloat16, count=n * cols, offset=lead).view(n, cols)
                for lo in range(start, stop, chunk):
                    hi = min(stop, lo + chunk)
                    acc = scratch.acc(hi - lo, cols)
                    timed("widen bf16 -> fp32 (from the mapped page cache)",
                          lambda: acc.copy_(rows[lo - start: hi - start]))
                    timed("add the Toeplitz view (fp32)",
                          lambda: m._add_term_rows(acc.numpy(), lo, hi, p, views[0]))
                    raw = scratch.raw((hi - lo) * cols * 2)
                    out = torch.frombuffer(raw, dtype=torch.bfloat16, count=(hi - lo) * cols).view(hi - lo, cols)
                    timed("round to bf16", lambda: out.copy_(acc))
                    timed("finite check (aminmax)", lambda: [float(v) for v in torch.aminmax(out)])
                    timed("pwrite the chunk", lambda: m._pwrite_all(out_fd, raw, begin + lo * cols * 2))
                    del out
                del rows
                timed("unmap the work item", mapping.close)
                elements += n * cols
        os.close(src_fd)
        os.close(out_fd)
    wall = time.perf_counter() - wall0
    for shard in ckpt.shards:
        (scratch_dir / shard).unlink()
    total = sum(cpu.values())
    rows = [{"stage": k, "cpu_s": v, "ns_per_adapted_element": v / elements * 1e9, "share": v / total}
            for k, v in cpu.items()]
    rows.append({"stage": "sum of the stages' CPU times", "cpu_s": total,
                 "ns_per_adapted_element": total / elements * 1e9, "share": 1.0})
    rows.append({"stage": "the single-thread pass, wall", "cpu_s": wall, "ns_per_adapted_element": wall / elements * 1e9,
                 "share": None})
    rows.append({"stage": "plain copy of the shards (shutil.copy), CPU", "cpu_s": copy_cpu,
                 "ns_per_adapted_element": copy_cpu / elements * 1e9, "share": None})
    rows.append({"stage": "plain copy of the shards (shutil.copy), wall", "cpu_s": copy_wall,
                 "ns_per_adapted_element": copy_wall / elements * 1e9, "share": None})
    return rows


def tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def plain_copy(src: Path, dst: Path, durable: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, kernel time included) of copying every file.

    ``durable``: then fsync every copied file and the directory with the merge's own atomic writer's function
    (:func:`bca_deploy.atomic._fsync_tree`), so the merge can also be compared with a copy that is as durable.
    """
    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    dst.mkdir()
    for path in sorted(src.iterdir()):
        shutil.copy(path, dst / path.name)
    if durable:
        _fsync_tree(dst)  # what the merge's atomic writer does to its output before putting it in place
    return time.perf_counter() - t0, time.process_time() - c0


def run_merge(src: Path, adapter: Path, dst: Path, fsync: bool = True) -> dict:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child-merge", str(src), str(adapter), str(dst), "fsync" if fsync else "no-fsync"],
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
    parser.add_argument("--profile", action="store_true",
                        help="also time each stage of the write path alone (where the time goes)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary checkpoint goes (default /tmp)")
    parser.add_argument("--name", default=None,
                        help="results go to bench/results/<name>.{json,md} (default: merge, or merge_<size> "
                             "for sizes other than 1b)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    parser.add_argument("--child-merge", nargs=4, metavar=("MODEL", "ADAPTER", "OUT", "FSYNC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_merge:
        child_merge(*args.child_merge)
        return
    name = args.name or ("merge" if args.size == "1b" else f"merge_{args.size}")

    hidden, inter, layers, *_ = SIZES[args.size]
    expected = sum(2 * math.prod(s) for _, s in llama_tensors(args.size))
    free = shutil.disk_usage(args.workdir).free
    if free < 3.2 * expected:
        sys.exit(f"need ~{3.2 * expected / 2**30:.1f} GiB free in {args.workdir} (checkpoint, copy, merged); "
                 f"{free / 2**30:.1f} GiB free")
    from bca_deploy.merge import _WORKERS

    load_at_start = [round(v, 2) for v in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bca-bench-merge-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        ckpt = build_checkpoint(work / "model", args.size, int(args.shard_size_gb * 1e9))
        adapter = build_adapter(work / "adapter", args.size, args.block_size)
        print(f"built {ckpt['parameters'] / 1e9:.2f}B-parameter bf16 checkpoint ({ckpt['bytes'] / 2**30:.2f} GiB, "
              f"{ckpt['shards']} shards) and adapter in {time.perf_counter() - t0:.1f}s", flush=True)
        stages = []
        if args.profile:
            (work / "profile").mkdir()
            stages = profile_stages(work / "model", work / "adapter", work / "profile")
            print(markdown_table(stages), flush=True)
        rows = []
        for r in range(args.repeats):
            load = os.getloadavg()[0]
            copy_s, copy_cpu = plain_copy(work / "model", work / "copy")
            if tree_bytes(work / "copy") != tree_bytes(work / "model"):
                raise RuntimeError("the plain copy is incomplete")
            shutil.rmtree(work / "copy")
            durable_s, _ = plain_copy(work / "model", work / "copy", durable=True)
            shutil.rmtree(work / "copy")
            m = run_merge(work / "model", work / "adapter", work / "merged")
            shutil.rmtree(work / "merged")
            fast = run_merge(work / "model", work / "adapter", work / "merged", fsync=False)
            shutil.rmtree(work / "merged")
            row = {
                "round": r + 1,
                "copy_s": copy_s,
                "merge_s": m["merge_s"],
                "plan_s": m["plan_s"],
                "write_s": m["merge_s"] - m["plan_s"],
                "merge_process_s": m["process_s"],
                "merge/copy": m["merge_s"] / copy_s,
                "durable_copy_s": durable_s,
                "merge/durable_copy": m["merge_s"] / durable_s,
                "write/copy": (m["merge_s"] - m["plan_s"]) / copy_s,
                "merge_no_fsync_s": fast["merge_s"],
                "merge_no_fsync/copy": fast["merge_s"] / copy_s,
                "copy_cpu_s": copy_cpu,
                "merge_cpu_s": m["merge_cpu_s"],
                "plan_cpu_s": m["plan_cpu_s"],
                "cpu merge/copy": m["merge_cpu_s"] / copy_cpu,
                "cpu write/copy": (m["merge_cpu_s"] - m["plan_cpu_s"]) / copy_cpu,
                "import_transformers_s": m["import_transformers_s"],
                "peak_rss_GiB": m["peak_rss_bytes"] / 2**30,
                "rss_before_merge_GiB": m["rss_before_merge_bytes"] / 2**30,
                "peak_rss/largest_shard": m["peak_rss_bytes"] / ckpt["largest_shard_bytes"],
                "load_avg_1m": load,
            }
            rows.append(row)
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        # Paired ratio: each round's merge against the copy just before it, then the median of those.
        summary = {
            "round": "median",
            **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"},
        }
        rows.append(summary)
        largest_gib = ckpt["largest_shard_bytes"] / 2**30
        goals = {
            "ratio_goal": 1.5,
            "ratio_met": summary["merge/copy"] <= 1.5,
            "write_ratio_met": summary["write/copy"] <= 1.5,
            "durable_ratio_met": summary["merge/durable_copy"] <= 1.5,
            "no_fsync_ratio_met": summary["merge_no_fsync/copy"] <= 1.5,
            "rss_goal_GiB": largest_gib + 1.0,
            "rss_met": summary["peak_rss_GiB"] <= largest_gib + 1.0,
        }
        columns = list(rows[0])
        print()
        print(markdown_table(rows, columns))
        print(json.dumps({"checkpoint": ckpt, "adapter": adapter, **goals}, indent=2))
        if not args.no_write:
            notes = _notes(args, ckpt, adapter, goals, stages, load_at_start, _WORKERS)
            paths = write_results(
                name, rows, columns=columns, title=f"Streaming merge vs plain copy ({args.size})", notes=notes,
                extra={"checkpoint": ckpt, "adapter": adapter, "goals": goals, "stages": stages,
                       "merge_workers": _WORKERS, "load_average_at_start": load_at_start},
            )
            print("wrote", *paths)
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _notes(args, ckpt: dict, adapter: dict, goals: dict, stages: list[dict], load_at_start: list[float],
           workers: int) -> str:
    hidden, inter, layers, *_ = SIZES[args.size]
    largest_gib = ckpt["largest_shard_bytes"] / 2**30
    text = (
        f"Checkpoint: Llama-shaped `{args.size}` (hidden {hidden}, intermediate {inter}, {layers} layers), "
        f"{ckpt['parameters'] / 1e9:.2f}B parameters, bf16, {ckpt['bytes'] / 2**30:.2f} GiB in "
        f"{ckpt['shards']} shard(s), largest shard {largest_gib:.2f} GiB; random weights. Adapter: "
        f"p={adapter['block_size']} on {adapter['modules']} modules (q,k,v,o,gate,up,down), "
        f"{adapter['kernel_parameters'] / 1e6:.2f}M kernel parameters, N(0, 0.02).\n\n"
        "copy_s: `shutil.copy` of every file into a fresh directory (in-process; the kernel copies with "
        "`sendfile`, one thread). merge_s: the `merge_checkpoint` call in a fresh subprocess, imports excluded "
        "(merge_process_s includes starting Python and importing torch and transformers; "
        "import_transformers_s is the import of transformers and of the checkpoint's model class, which the fit "
        "check builds on the meta device; that module imports transformers' generation code, which imports "
        "scikit-learn and SciPy where installed). plan_s: the planning inside the call "
        "(adapters read, fit check, plan); write_s = merge_s - plan_s: the write path (adapted row blocks read through a "
        "mapping of the checkpoint, merged and written with pwrite; other tensors copied with copy_file_range), which runs " f"{workers} worker threads here (`min(4, cores)`). write/copy is the "
        "write path against the copy. Page caches cannot be dropped without root: "
        "the checkpoint was just written, so both read it from the page cache as far as it fits in memory; "
        "copy, durable copy and merge run in this order in each round, with `os.sync()` before each. The merge "
        "fsyncs every file and directory of its output before putting it in place (bca_deploy.atomic: a kill or "
        "a power cut never leaves a half-written --out); the plain copy does not fsync, durable_copy_s is the "
        "same copy followed by an fsync of every file and of the directory, so merge/durable_copy compares "
        "outputs that are equally durable. merge_no_fsync_s: the same merge with `fsync=False` (CLI `--no-fsync`: "
        "still atomic against a kill, not against a power cut), run last in each round, so "
        "merge_no_fsync/copy compares outputs that are equally (not) durable. merge/copy is per round (paired), the summary row the median of each column. *_cpu_s: "
        "CPU time (user + system, all threads) of the copying process / of the merge call. peak_rss is "
        "the merge process's VmHWM (peak resident set since exec; includes the Python + torch baseline, "
        "rss_before_merge).\n\n"
        f"Goals: merge/copy ≤ {goals['ratio_goal']} — {'met' if goals['ratio_met'] else 'NOT met'} (against the "
        f"durable copy: {'met' if goals['durable_ratio_met'] else 'NOT met'}; without fsync against the plain "
        f"copy, merge_no_fsync/copy: {'met' if goals['no_fsync_ratio_met'] else 'NOT met'}; the write path "
        f"alone, write/copy: {'met' if goals['write_ratio_met'] else 'NOT met'}); "
        f"peak RSS ≤ largest shard + 1 GiB = {goals['rss_goal_GiB']:.2f} GiB — "
        f"{'met' if goals['rss_met'] else 'NOT met'}.\n\n"
        f"The machine is shared with other jobs ({os.cpu_count()} cores; load_avg_1m is the 1-minute "
        f"load average when each round started, {load_at_start} (1, 5, 15 min) at the start of the run), "
        "so times vary between rounds; compare the paired ratios.\n"
    )
    if stages:
        text += (
            "\n## Where the write path's time goes (`--profile`)\n\n"
            "Each stage of the write path run alone over the whole checkpoint, one thread, source in the page "
            "cache, thread CPU time per stage (see `profile_stages`); ns_per_adapted_element divides by the "
            "number of adapted weight values:\n\n" + markdown_table(stages)
        )
    return text


if __name__ == "__main__":
    main()
