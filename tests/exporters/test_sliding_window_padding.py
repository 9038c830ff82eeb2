"""Sliding-window decoders (every layer windowed) decoding a left-padded batch past the window, with past.

The graph's past holds at most ``sliding_window - 1`` positions, and transformers works out from the positions seen
(with Python ``max``/``if``) which columns of the attention mask those keys are; the trace froze that offset at its
example's, so a left-padded row read its padding from the wrong columns once the batch passed the window (0.1-0.2
max logit error on these tiny models, both transformers lines; unpadded rows were exact, and validation never padded
a row with past). The graph now counts every position seen (the mask's length) and computes the offset in tensor
ops; validation left-pads a row of its with-past cases and tries rows past a short window."""

from __future__ import annotations

import importlib

import pytest
import torch
from exporters_helpers import ort_torch_logit_diffs

from bca_deploy import inject, save_adapter
from bca_deploy.exporters import ValidationError, export
from bca_deploy.models import load_model

WINDOW = 8


def _build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=64,
                  sliding_window=WINDOW)
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**config)), ["q_proj", "v_proj"]
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**config)), ["qkv_proj", "o_proj"]
    if name == "qwen2":  # max_window_layers=0: every layer sliding
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, max_window_layers=0, **config))
        return model, ["q_proj", "v_proj"]
    raise KeyError(name)


def _saved(tmp_path, name):
    model, targets = _build(name)
    model.save_pretrained(tmp_path / "model")
    inject(model, targets, block_size=8, init="normal", init_std=0.05, seed=0)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "model", [tmp_path / "adapter"]


@pytest.mark.parametrize(("name", "merge"), [("mistral", True), ("mistral", False), ("phi3", True), ("qwen2", True)])
def test_left_padded_batch_decodes_past_the_window_like_pytorch(tmp_path, name, merge):
    """Rows of 14 tokens, one left-padded by 3 (and one by 1), then 4 new tokens with past: every real token's logits
    match PyTorch with the adapter, which itself matches the row run alone."""
    model_dir, adapters = _saved(tmp_path, name)
    out = export(model_dir, tmp_path / "onnx", adapters, merge=merge, verbose=False)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, WINDOW + 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    diffs = ort_torch_logit_diffs(out, load_model(model_dir, adapters), ids, mask, 4)
    assert max(diffs) < 1e-4, diffs


def test_validation_catches_a_frozen_padding_offset(tmp_path, monkeypatch):
    """Traced the way it was (the cache counting only the past it holds), the default validation now fails: its
    with-past cases left-pad a row, and a short window gets rows past it."""
    export_module = importlib.import_module("bca_deploy.exporters.export")  # the module, not the function
    original = export_module._new_cache
    monkeypatch.setattr(export_module, "_new_cache", lambda config, flat, seen=None: original(config, flat))
    model_dir, adapters = _saved(tmp_path, "mistral")
    with pytest.raises(ValidationError, match="logits"):
        export(model_dir, tmp_path / "onnx", adapters, merge=True, verbose=False)
    assert not (tmp_path / "onnx").exists()
