"""Tiny random transformers models, BCA adapters and shared exports for the exporter tests.

The fixtures ``tiny`` and ``exported`` live here, not in a ``conftest.py``: ``tests/conftest.py`` is
imported by other test modules as ``conftest``, and a second ``conftest.py`` in this folder would
shadow it. Test modules import the fixtures they use (``from exporters_helpers import exported, tiny``);
the caches are module-level, so each model is written and each export is done once per session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bca_deploy import inject, save_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class TinySpec:
    """One architecture under test: how to build it, what to adapt, which task to export."""

    name: str
    task: str
    targets: tuple[str, ...]
    block_size: int = 8
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    adapter_format: str = "bca"
    second_adapter: tuple[str, ...] = ()  # targets of a second adapter (p=16), exported together with the first


VARIANTS = ("merged", "dft", "matmul")  # merged graph; unmerged with DFT-20 nodes; unmerged with MatMul DFTs

SPECS = {
    "bert": TinySpec("bert", "feature-extraction", ("query", "value", "intermediate.dense"), block_size_pattern={"value": 16}),
    "roberta": TinySpec("roberta", "text-classification", ("query", "key", "value"), modules_to_save=("classifier.out_proj",)),
    "llama": TinySpec("llama", "text-generation-with-past",
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      second_adapter=("q_proj", "v_proj")),
    "qwen2": TinySpec("qwen2", "text-generation-with-past", ("q_proj", "k_proj", "v_proj", "o_proj"), adapter_format="peft"),
    "gpt2": TinySpec("gpt2", "text-generation-with-past", ("c_attn", "c_proj", "c_fc")),
}


def build_model(name: str) -> torch.nn.Module:
    """A 2-layer random model with hidden size 32, vocabulary 128 (seeded: the same every time)."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        return tf.BertModel(cfg, add_pooling_layer=False)
    if name == "roberta":
        cfg = tf.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=66, num_labels=3)
        return tf.RobertaForSequenceClassification(cfg)
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return tf.LlamaForCausalLM(cfg)
    if name == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return tf.Qwen2ForCausalLM(cfg)
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    raise KeyError(name)


def write_model_and_adapters(name: str, root: Path) -> tuple[Path, list[Path]]:
    """Save the base model and its adapter(s) (non-zero kernels) under ``root``; return their directories."""
    spec = SPECS[name]
    model_dir, adapter_dirs = root / "model", [root / "adapter"]
    model = build_model(name)
    model.save_pretrained(model_dir)
    inject(model, list(spec.targets), block_size=spec.block_size, block_size_pattern=dict(spec.block_size_pattern),
           init="normal", init_std=0.05, seed=0, modules_to_save=list(spec.modules_to_save))
    if spec.modules_to_save:  # make the saved head differ from the checkpoint's, so loading it matters
        with torch.no_grad():
            for path in spec.modules_to_save:
                for param in model.get_submodule(path).parameters():
                    param.add_(0.1)
    save_adapter(model, adapter_dirs[0], format=spec.adapter_format)
    if spec.second_adapter:
        inject(model, list(spec.second_adapter), block_size=16, init="normal", init_std=0.05, seed=1,
               adapter_name="second")
        adapter_dirs.append(root / "adapter_second")
        save_adapter(model, adapter_dirs[1], adapter_name="second")
    return model_dir, adapter_dirs


_MODELS: dict[str, tuple[Path, list[Path]]] = {}
_EXPORTS: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(name) -> (model_dir, adapter_dirs)``: a saved tiny model and its adapter directories."""

    def get(name: str) -> tuple[Path, list[Path]]:
        if name not in _MODELS:
            _MODELS[name] = write_model_and_adapters(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return _MODELS[name]

    return get


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """``exported(name, variant) -> out_dir``: the validated export of a tiny model (done once per session)."""
    from bca_deploy.exporters import export

    def get(name: str, variant: str) -> Path:
        key = (name, variant)
        if key not in _EXPORTS:
            model_dir, adapter_dirs = tiny(name)
            out = tmp_path_factory.mktemp(f"onnx-{name}-{variant}") / "onnx"
            merge = variant == "merged"
            _EXPORTS[key] = export(model_dir, out, adapter_dirs, merge=merge, fft="matmul" if merge else variant,
                                   task=SPECS[name].task, verbose=False)
        return _EXPORTS[key]

    return get


def ort_greedy(onnx_dir: Path, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with plain onnxruntime on a text-generation-with-past graph (no optimum, no bca-deploy
    runtime): the prompt once, then one token per step, each step feeding back the graph's own present
    key/values. Position ids follow the mask, as transformers' ``generate`` computes them (left padding)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), dtype=np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    mask = mask.numpy().astype(np.int64)
    tokens = ids.numpy().astype(np.int64)
    step_ids = tokens
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    for _ in range(new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if any(i.name == "position_ids" for i in session.get_inputs()):
            feeds["position_ids"] = positions[:, -step_ids.shape[1]:]
        outputs = dict(zip(names, session.run(names, feeds), strict=True))
        step_ids = outputs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens = np.concatenate([tokens, step_ids], axis=1)
        past = {f"past_key_values.{n[len('present.'):]}": v for n, v in outputs.items() if n.startswith("present.")}
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    return torch.from_numpy(tokens)


def ort_torch_logit_diffs(onnx_dir: Path, reference: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                          new_tokens: int) -> list[float]:
    """Prefill ``ids`` (``mask``: 0 on left padding) then ``new_tokens`` single steps, PyTorch's greedy token fed to
    both, through onnxruntime with the graph's own present key/values and through ``reference`` with its cache; the
    max |logit difference| over real (unpadded) tokens at each step. Position ids follow the mask, as transformers'
    ``generate`` numbers them."""
    import numpy as np
    import onnxruntime as ort

    from bca_deploy.models import cache_argument, output_cache

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step, cache, diffs = ids, None, []
    with torch.no_grad():
        for _ in range(new_tokens + 1):
            step_positions = positions[:, -step.shape[1]:]
            kwargs = {} if cache is None else {cache_argument(reference): cache}
            out = reference(input_ids=step, attention_mask=mask, position_ids=step_positions, use_cache=True, **kwargs)
            feeds = {"input_ids": step.numpy(), "attention_mask": mask.numpy(), "position_ids": step_positions.numpy(),
                     **past}
            got = dict(zip(names, session.run(names, feeds), strict=True))
            real = mask[:, -step.shape[1]:].numpy().astype(bool)
            diffs.append(float(np.abs(got["logits"] - out.logits.numpy())[real].max()))
            cache = output_cache(out)
            past = {f"past_key_values.{n[len('present.'):]}": v for n, v in got.items() if n.startswith("present.")}
            step = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return diffs


#: Ways an export's ``model.onnx`` can be something onnxruntime refuses (:func:`damage_graph`).
GRAPH_DAMAGE = ("random bytes", "empty", "truncated", "external data outside its directory")


def damage_graph(graph: Path, how: str) -> None:
    """Make ``graph`` (an exported ``model.onnx``) one onnxruntime refuses to load, as ``how`` (of :data:`GRAPH_DAMAGE`)
    says; "external data outside its directory" points an initializer at a file beside the export directory, which
    exists and is large enough, so that escaping the directory is the only reason to refuse it."""
    if how == "random bytes":
        graph.write_bytes(os.urandom(4096))
    elif how == "empty":
        graph.write_bytes(b"")
    elif how == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif how == "external data outside its directory":
        import onnx

        model = onnx.load(str(graph))
        tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        outside = graph.parent.parent / "outside.bin"
        outside.write_bytes(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in {"location": f"../{outside.name}", "offset": "0", "length": str(outside.stat().st_size)}.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(graph))
    else:
        raise ValueError(f"unknown damage {how!r}")


def graph_feeds(session, ids, slot: int | None = None) -> dict:
    """An exported graph's inputs for token ids ``ids`` (batch, seq): no padding, an empty past, and ``adapter_ids``
    = ``slot`` on a bank graph."""
    import numpy as np

    b, s = ids.shape
    feeds = {}
    for node in session.get_inputs():
        if node.name == "input_ids":
            feeds[node.name] = np.asarray(ids).astype(np.int64)
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones((b, s), np.int64)
        elif node.name == "token_type_ids":
            feeds[node.name] = np.zeros((b, s), np.int64)
        elif node.name == "position_ids":
            feeds[node.name] = np.tile(np.arange(s, dtype=np.int64), (b, 1))
        elif node.name.startswith("past_key_values"):
            feeds[node.name] = np.zeros([b if i == 0 else 0 if i == 2 else d for i, d in enumerate(node.shape)],
                                        np.float32)
        elif node.name == "adapter_ids" and slot is not None:
            feeds[node.name] = np.full((b,), slot, np.int64)
    return feeds
