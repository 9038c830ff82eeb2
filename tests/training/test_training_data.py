"""Data readers, refusals of bad files, metrics, causal-LM label masking, atomic checkpoint directories."""

from __future__ import annotations

import math

import pytest
import torch

from bca_deploy.training import DataError, DataFileNotFoundError, MetricAccumulator
from bca_deploy.training.checkpoint import recover_dir, write_dir_atomically
from bca_deploy.training.data import (
    IGNORE_INDEX,
    check_label_range,
    load_causal_lm,
    load_seq_cls,
    read_records,
    tokenize_causal_lm,
)
from bca_deploy.training.metrics import classification_metrics
from training_helpers import SST2, one_thread, word_tokenizer, write_jsonl, write_tsv  # noqa: F401 - autouse fixture


def test_reads_sst2_tsv():
    examples = load_seq_cls(SST2 / "dev.tsv")
    assert len(examples) == 872
    assert examples.text_columns == ["sentence"] and not examples.regression
    assert set(examples.labels) == {0, 1}
    assert examples.lines[0] == 2  # line 1 is the header


def test_csv_jsonl_pairs_and_regression(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('premise,hypothesis,label\n"a, quoted one",b,1\nc,d,0\n')
    ex = load_seq_cls(csv_path)
    assert ex.text_columns == ["premise", "hypothesis"] and ex.texts[0][0] == "a, quoted one"
    jl = write_jsonl(tmp_path / "d.jsonl", [{"s1": "x", "s2": "y", "score": 3.8}, {"s1": "z", "s2": "w", "score": 1}])
    ex = load_seq_cls(jl, text_columns=["s1", "s2"], label_column="score")
    assert ex.regression and ex.labels == [3.8, 1.0]
    ex = load_seq_cls(jl, text_columns=["s1", "s2"], label_column="score", regression=True)
    assert ex.labels == [3.8, 1.0]


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="nope.tsv: data file not found") as info:
        load_seq_cls(tmp_path / "nope.tsv")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_missing_columns_name_file_and_list_found(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("hello", 1)], header=("review", "stars"))
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    msg = str(info.value)
    assert str(path) in msg and "no text column" in msg and "label column 'label' not found" in msg
    assert "columns found in" in msg and "'review', 'stars'" in msg
    with pytest.raises(DataError, match="text column 'text' not found"):
        load_seq_cls(path, text_columns=["text"], label_column="stars")


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty"):
        load_seq_cls(empty)
    (tmp_path / "nothing.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_seq_cls(tmp_path / "nothing.csv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match="line 3: 3 fields, the header has 2"):
        load_seq_cls(bad)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n[1, 2]\n{oops\n')
    with pytest.raises(DataError) as info:
        load_seq_cls(tmp_path / "bad.jsonl")
    assert "line 2: expected a JSON object" in str(info.value) and "line 3: not valid JSON" in str(info.value)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format '.txt'"):
        read_records(tmp_path / "data.txt")


def test_bad_labels_listed_with_lines(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("a", 1), ("b", "positive"), ("c", 0), ("", 1)])
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    msg = str(info.value)
    assert "line 3: label 'positive'" in msg and "line 5: empty text in column 'sentence'" in msg


def test_label_range(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("a", 1), ("b", 2), ("c", -1)])
    examples = load_seq_cls(path)
    with pytest.raises(DataError) as info:
        check_label_range(examples, 2)
    msg = str(info.value)
    assert "2 label(s) outside the classification head's range 0..1" in msg
    assert "line 3: label 2" in msg and "line 4: label -1" in msg


def test_causal_lm_masks_prompt_and_appends_eos(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", ["the movie was good bad great awful review sentiment positive negative"])
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "review : the movie was good", "response": "positive"},
        {"prompt": "review : awful", "response": "negative"},
    ])
    examples = load_causal_lm(path)
    assert examples.format == "prompt-response"
    data, dropped = tokenize_causal_lm(examples, tok, max_length=32)
    assert dropped == 0
    prompt_len = len(tok("review : the movie was good")["input_ids"])
    ids, labels = data.input_ids[0], data.labels[0]
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    response = tok("positive", add_special_tokens=False)["input_ids"]
    assert labels[prompt_len:] == ids[prompt_len:] == response + [tok.sep_token_id]
    batch = data.collate([0, 1])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # a prompt longer than max_length leaves no target: dropped
    _, dropped = tokenize_causal_lm(examples, tok, max_length=4)
    assert dropped == 2
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the movie was good"}])
    data, _ = tokenize_causal_lm(load_causal_lm(text), tok, max_length=32)
    assert data.labels[0] == data.input_ids[0]


def test_causal_lm_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_causal_lm(path)
    assert "'prompt' + 'response'" in str(info.value) and "'question', 'answer'" in str(info.value)


def test_classification_metrics_binary():
    # true\pred: [[TN=3, FP=1], [FN=2, TP=4]]
    m = classification_metrics(torch.tensor([[3.0, 1.0], [2.0, 4.0]], dtype=torch.float64))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    mcc = (4 * 3 - 1 * 2) / math.sqrt((4 + 1) * (4 + 2) * (3 + 1) * (3 + 2))
    assert m["mcc"] == pytest.approx(mcc)


def test_metric_accumulator_classification_regression_lm():
    acc = MetricAccumulator("seq-cls", num_labels=3)
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    labels = torch.tensor([0, 1, 1, 2])
    acc.update(logits[:2], labels[:2])
    acc.update(logits[2:], labels[2:])
    m = acc.compute()
    assert m["accuracy"] == 0.5 and m["n"] == 4 and "macro_f1" in m
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())

    reg = MetricAccumulator("seq-cls", regression=True)
    x = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.7])
    y = torch.tensor([0.0, 0.6, 0.1, 1.0, 0.5])
    reg.update(x[:3, None], y[:3])
    reg.update(x[3:, None], y[3:])
    m = reg.compute()
    assert m["pearson"] == pytest.approx(torch.corrcoef(torch.stack([x, y]))[0, 1].item(), abs=1e-6)
    assert m["mse"] == pytest.approx(((x - y) ** 2).mean().item())

    lm = MetricAccumulator("causal-lm")
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    lm.update(logits, labels)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    m = lm.compute()
    assert m["tokens"] == 5 and m["perplexity"] == pytest.approx(math.exp(nll.item()))


def test_atomic_directory_write(tmp_path):
    target = tmp_path / "last"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("one"))
    assert (target / "a.txt").read_text() == "one"

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, broken)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary directory left
    write_dir_atomically(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    # a crash between the two renames leaves the old checkpoint aside: recover_dir puts it back
    aside = tmp_path / ".last.old-x"
    aside.mkdir()
    target.rename(aside / "last")
    (tmp_path / ".last.tmp-y").mkdir()
    assert recover_dir(target) == target
    assert (target / "b.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
