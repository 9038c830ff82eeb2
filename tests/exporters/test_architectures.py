"""The architectures the exporter lists beyond the main matrix (test_export.py): each exports unmerged and
validates against PyTorch on both transformers lines (one small case each, to keep the suite quick)."""

from __future__ import annotations

import json

import pytest
import torch

from bca_deploy import inject, save_adapter
from bca_deploy.exporters import export
from bca_deploy.exporters.loading import DECODER_MODEL_TYPES, ENCODER_MODEL_TYPES


def _build(name: str):
    """(model, target modules, task it exports as, modules_to_save) for a 2-layer random model."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=128, max_position_embeddings=64)
    if name == "xlm-roberta":
        config = tf.XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     **{**small, "max_position_embeddings": 66})
        return tf.XLMRobertaModel(config), ["query", "value"], "feature-extraction", []
    if name == "distilbert":
        config = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=2, **small)
        return tf.DistilBertForSequenceClassification(config), ["q_lin", "v_lin"], "text-classification", ["classifier"]
    if name == "mistral":
        config = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, **small)
        return tf.MistralForCausalLM(config), ["q_proj", "v_proj", "down_proj"], "text-generation-with-past", []
    if name == "qwen3":
        config = tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, **small)
        return tf.Qwen3ForCausalLM(config), ["q_proj", "v_proj", "o_proj"], "text-generation-with-past", []
    raise KeyError(name)


MAIN_MATRIX = ("bert", "roberta", "llama", "qwen2", "gpt2")


def test_every_listed_architecture_is_tested():
    assert set(ENCODER_MODEL_TYPES + DECODER_MODEL_TYPES) == {*MAIN_MATRIX, "xlm-roberta", "distilbert", "mistral", "qwen3"}


@pytest.mark.parametrize("name", ["xlm-roberta", "distilbert", "mistral", "qwen3"])
def test_unmerged_export_validates(tmp_path, name):
    model, targets, task, saved = _build(name)
    model.save_pretrained(tmp_path / "model")
    inject(model, targets, block_size=8, init="normal", init_std=0.05, seed=0, modules_to_save=saved)
    save_adapter(model, tmp_path / "adapter")
    out = export(tmp_path / "model", tmp_path / "onnx", [tmp_path / "adapter"], merge=False, verbose=False,
                 cases=[(2, 5, 2)])
    meta = json.loads((out / "bca_export.json").read_text())
    assert meta["task"] == task and meta["validation"]["passed"]
    assert len(meta["validation"]["rows"]) == (1 if task != "text-generation-with-past" else 2 * 5)
