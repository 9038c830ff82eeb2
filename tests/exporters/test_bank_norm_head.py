"""A bank of ModernBERT adapters that bring their own head: ``head.dense`` + activation + ``head.norm`` (a LayerNorm),
then ``classifier``, what ``bca-deploy train`` saves on a bare ModernBERT checkpoint (``modules_to_save``: the head
modules the checkpoint lacks, plus ``classifier``). The bank was refused ("head.norm: a LayerNorm ... cannot differ
per row"); it now holds the norm's scale and shift per slot.

Every row is checked against its adapter's own PyTorch model, built without bank code: transformers'
``AutoModelForSequenceClassification.from_pretrained(base, num_labels=...)`` then ``load_adapter``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from head_helpers import own_logits, own_model, token_rows  # noqa: E402

from bca_deploy import inject, save_adapter  # noqa: E402
from bca_deploy.config import task_spec_from_config  # noqa: E402
from bca_deploy.exporters import export  # noqa: E402
from bca_deploy.inject import adapter_configs  # noqa: E402

ATOL = 1e-4
#: what train saves on a bare ModernBERT checkpoint (its head modules are missing there)
SAVED = ["classifier", "head.dense", "head.norm"]
#: adapter -> (labels, seed)
ADAPTERS = {"two": (["neg", "pos"], 1), "three": (["x", "y", "z"], 2)}


def _config():
    import transformers as tf

    return tf.ModernBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, global_attn_every_n_layers=2,
                               local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=2,
                               cls_token_id=1, reference_compile=False)


def _save_adapter(base: Path, directory: Path, labels: list[str], seed: int) -> Path:
    """Kernels on Wqkv and the whole head drawn far from transformers' init (the norm's scale and shift included:
    a shared or dropped affine would move every row's logits)."""
    import transformers as tf

    id2label = dict(enumerate(labels))
    torch.manual_seed(seed)
    model = tf.ModernBertForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for path in SAVED:
            for name, param in model.get_submodule(path).named_parameters():
                scale = 1 / param.shape[-1] ** 0.5 if name == "weight" and param.dim() == 2 else 0.5
                offset = 1.0 if path == "head.norm" and name == "weight" else 0.0
                param.copy_(offset + scale * torch.randn(param.shape, generator=generator))
    inject(model, ["Wqkv"], block_size=8, init="normal", init_std=0.1, seed=seed, modules_to_save=SAVED)
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, SAVED)
    save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def norm_bank(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("norm-bank")
    torch.manual_seed(0)
    tf.ModernBertModel(_config()).save_pretrained(root / "base")  # bare: base rows have no head
    dirs = {name: _save_adapter(root / "base", root / name, labels, seed)
            for name, (labels, seed) in ADAPTERS.items()}
    onnx_dir = export(root / "base", root / "onnx", list(dirs.values()), merge=False, bank=True,
                      task="text-classification", cases=[(3, 6)], verbose=False)
    return root / "base", dirs, onnx_dir


def test_a_bank_holds_each_adapters_layernorm_head(norm_bank):
    """One mixed batch through MultiAdapterSession.classify (rows of different lengths, 2 and 3 labels): each row's
    logits equal its own model's; the layout holds the norm as a per-slot layer."""
    import json

    from bca_deploy.serving import MultiAdapterSession

    base, dirs, onnx_dir = norm_bank
    head = json.loads((onnx_dir / "bca_export.json").read_text())["bank"]["head"]
    assert [(layer["module"], layer["kind"]) for layer in head["layers"]] == [
        ("head.dense", "linear"), ("head.norm", "norm"), ("classifier", "linear")]
    models = {name: own_model(base, d) for name, d in dirs.items()}
    session = MultiAdapterSession(onnx_dir)
    choice = ["two", "three", "three", "two", "three"]
    rows = token_rows(len(choice), seed=5)
    for b, (result, name) in enumerate(zip(session.classify(rows, choice), choice, strict=True)):
        want = own_logits(models[name], rows[b])
        np.testing.assert_allclose(result["logits"], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({name})")
        assert list(result["scores"]) == ADAPTERS[name][0]
    # the two heads differ: a row through the other adapter's head gives other logits
    other = own_logits(models["three"], rows[0])
    assert not np.allclose(own_logits(models["two"], rows[0])[:2], other[:2], atol=1e-2)


def test_a_layernorm_head_registers_and_unregisters_at_runtime(norm_bank, tmp_path):
    """Serving registers such an adapter from its directory (the same head checks as the export) and drops it."""
    from bca_deploy.serving import MultiAdapterSession

    base, dirs, onnx_dir = norm_bank
    session = MultiAdapterSession(onnx_dir)
    session.unregister("three")
    fresh = _save_adapter(base, tmp_path / "four", ["a", "b", "c", "d"], 3)
    session.register("four", fresh)
    rows = token_rows(3, seed=9)
    choice = ["four", "two", "four"]
    for b, (result, name) in enumerate(zip(session.classify(rows, choice), choice, strict=True)):
        want = own_logits(own_model(base, fresh if name == "four" else dirs[name]), rows[b])
        np.testing.assert_allclose(result["logits"], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({name})")
    session.unregister("four")
    assert "four" not in session.adapters()
