"""Parity of exported graphs with PyTorch: 5 architectures × {merged, unmerged-dft, unmerged-matmul}.

Every export validates itself under onnxruntime (3 shapes; decoders: prefill + a step with past),
so a passing export *is* the parity check; the tests below also look at what the graph contains,
generate with plain onnxruntime (both transformers lines) and load it back through optimum's
``ORTModelFor*`` classes (where optimum-onnx is installed: the transformers 4.x stack).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from exporters_helpers import SPECS, VARIANTS, exported, tiny  # noqa: F401  (fixtures)

from bca_deploy import adapters_disabled, read_adapter
from bca_deploy.exporters import TOLERANCES
from bca_deploy.exporters.loading import load_model
from exporters_helpers import ort_greedy


def _ort_class(task: str):
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is installed on the transformers 4.x stack only")
    from optimum.onnxruntime import (
        ORTModelForCausalLM,
        ORTModelForFeatureExtraction,
        ORTModelForSequenceClassification,
    )

    return {"feature-extraction": ORTModelForFeatureExtraction, "text-classification": ORTModelForSequenceClassification,
            "text-generation-with-past": ORTModelForCausalLM}[task]


def _expected_subgraphs(adapter_dirs) -> int:
    """One frequency-domain constant per (adapted module, distinct block size)."""
    pairs = set()
    for directory in adapter_dirs:
        config, _ = read_adapter(directory)
        pairs |= {(name, spec.block_size) for name, spec in config.modules.items()}
    return len(pairs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_export_matches_pytorch(exported, tiny, name, variant):
    out = exported(name, variant)
    meta = json.loads((out / "bca_export.json").read_text())
    spec = SPECS[name]
    assert meta["task"] == spec.task and meta["merged"] == (variant == "merged")
    assert meta["validation"]["passed"], meta["validation"]
    rows = meta["validation"]["rows"]
    steps = 2 if spec.task.endswith("-with-past") else 1
    outputs = 1 + (4 if steps == 2 else 0)  # logits/hidden state (+ 2 layers × key, value)
    assert len(rows) == 3 * steps * outputs
    assert max(r["max_abs_diff"] for r in rows) <= TOLERANCES["fp32"].atol

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    ops = {n.op_type for n in graph.node}
    freq = sorted(n for n in initializers if ".bca_freq_p" in n)
    model_dir, adapter_dirs = tiny(name)
    if variant == "merged":
        assert not freq and "DFT" not in ops
    else:
        assert len(freq) == _expected_subgraphs(adapter_dirs)
        assert ("DFT" in ops) == (variant == "dft")
        assert meta["opset"] == (20 if variant == "dft" else 18)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_encoder_loads_with_ort_model(exported, tiny, name, variant):
    """``ORTModelFor*`` runs the directory; the adapters change the output far beyond tolerance."""
    out = exported(name, variant)
    model_dir, adapter_dirs = tiny(name)
    task = SPECS[name].task
    ort_model = _ort_class(task).from_pretrained(out)
    reference = load_model(model_dir, task, adapter_dirs)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    key = "last_hidden_state" if task == "feature-extraction" else "logits"
    got = ort_model(**inputs)[key]
    with torch.no_grad():
        want = reference(**inputs)[key]
        with adapters_disabled(reference):
            base = reference(**inputs)[key]
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOLERANCES["fp32"].atol, rtol=0)
    if name == "bert":  # (roberta's saved classifier head differs from the checkpoint's: not a BCA delta)
        assert (want - base).abs().max() > 100 * TOLERANCES["fp32"].atol


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_with_plain_onnxruntime(exported, tiny, name, variant):
    """Greedy decoding with plain onnxruntime (left-padded batch, past fed back) picks PyTorch's tokens."""
    out = exported(name, variant)
    model_dir, adapter_dirs = tiny(name)
    reference = load_model(model_dir, "text-generation-with-past", adapter_dirs)
    ids = torch.randint(2, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ort_greedy(out, ids, mask, 10), want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_matches_pytorch(exported, tiny, name, variant):
    """``ORTModelForCausalLM.generate`` picks the same tokens as the PyTorch model with its adapters."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is installed on the transformers 4.x stack only")
    from optimum.onnxruntime import ORTModelForCausalLM

    out = exported(name, variant)
    model_dir, adapter_dirs = tiny(name)
    reference = load_model(model_dir, "text-generation-with-past", adapter_dirs)
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  eos_token_id=None, min_new_tokens=12)
    want = reference.generate(**kwargs)
    got = ort_model.generate(**kwargs)
    assert want.shape == (2, 18)
    assert torch.equal(torch.as_tensor(got), want)
    with adapters_disabled(reference):
        base = reference.generate(**kwargs)
    assert not torch.equal(base, want), "the adapters should change the greedy continuation"


def test_unused_outputs_follow_the_graphs_dataflow():
    """The modules an adapter-bank export leaves out (``bank.unused_modules``): those whose output the task's graph
    outputs do not depend on, found by following the model's dataflow back from the graph's outputs, with the
    outermost unused module around each named in the reason; everything the outputs use is kept."""
    import transformers as tf
    from torch import nn

    from bca_deploy.exporters.bank import unreachable_modules
    from bca_deploy.exporters.export import _unused_outputs
    from exporters_helpers import build_model

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3)
    encoder = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    assert _unused_outputs(tf.BertModel(config).eval(), "feature-extraction", ["pooler.dense", *encoder]) == {
        "pooler.dense": "its output is not used by the exported graph (feature-extraction outputs last_hidden_state; "
                        "the pooler is not part of it)"}
    # a classifier's logits come from the pooler: nothing is left out
    classifier = tf.BertForSequenceClassification(config).eval()
    assert _unused_outputs(classifier, "text-classification",
                           ["bert.pooler.dense", "classifier", *(f"bert.{m}" for m in encoder)]) == {}
    llama = ["lm_head", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    assert _unused_outputs(build_model("llama").eval(), "text-generation-with-past", llama) == {}

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.never = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.head = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
            self.gate = nn.Linear(4, 1)

        def forward(self, x):
            y = self.a(x)
            self.b(x)  # computed, never used
            self.head(y)
            return y * (self.gate(y) > 0)  # the gate reaches the output through a comparison only

    toy = Toy()
    x = torch.randn(2, 4)
    assert unreachable_modules(toy, lambda: toy(x), ["a", "b", "head.0", "never"]) == {
        "b": None, "head.0": "head", "never": None}
    # a use the dataflow walk cannot see (a comparison): changing the gate's output changes the outputs, so it is used
    assert unreachable_modules(toy, lambda: toy(x), ["gate", "b"]) == {"b": None}
