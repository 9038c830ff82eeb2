"""Data readers, refusals of bad files, metrics, causal-LM label masking, atomic checkpoint directories."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bca_deploy.training import DataError, DataFileNotFoundError, MetricAccumulator
from bca_deploy.training.checkpoint import recover_dir, write_dir_atomically
from bca_deploy.training.data import (
    IGNORE_INDEX,
    check_label_range,
    load_causal_lm,
    load_dataset,
    load_seq_cls,
    read_records,
    tokenize_causal_lm,
    tokenize_seq_cls,
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
    assert "line 5: empty text in column 'sentence'" in msg
    path = write_tsv(tmp_path / "e.tsv", [("a", 1), ("b", "positive"), ("c", 0), ("d", 1)])
    with pytest.raises(DataError, match="line 3: label 'positive' in column 'label' mixes class names with numbers"):
        load_seq_cls(path)
    # as many names as numbers: the name is named (a stray byte made '1\x00' a name), not the valid line
    path = write_tsv(tmp_path / "f.tsv", [("a", "1\x00"), ("b", 0)])
    with pytest.raises(DataError, match=r"line 2: label '1\\x00' in column 'label' mixes") as info:
        load_seq_cls(path)
    assert "line 3" not in str(info.value)


def test_a_json_line_giving_a_key_twice_is_refused(tmp_path):
    """json keeps the last of two "label" keys silently (the server refuses duplicate keys): which was meant?"""
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "a", "label": 1, "label": 0}\n{"sentence": "b", "label": 0}\n')
    with pytest.raises(DataError, match="line 1: key 'label' appears more than once"):
        load_seq_cls(path)


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


def test_a_huge_line_is_cut_before_it_is_tokenized_with_the_same_tokens(tmp_path):
    """A tokenizer reads a whole text before truncating it (one 30 MB line took 5.8 GB to train on): texts are cut
    to max_length × 1024 characters first, and the tokens kept are the uncut text's."""
    tok = word_tokenizer(tmp_path / "tok", ["the movie was good bad great"])
    seen: list[int] = []

    def recording(*texts, **kwargs):
        seen.extend(len(t) for column in texts for t in column)
        return tok(*texts, **kwargs)

    huge = "the movie was good " * 200_000  # 3.8 M characters
    path = write_tsv(tmp_path / "d.tsv", [(huge, 1), ("bad", 0)])
    data = tokenize_seq_cls(load_seq_cls(path), recording, max_length=16)
    assert max(seen) == 16 * 1024
    assert data.input_ids[0] == tok(huge, truncation=True, max_length=16)["input_ids"]
    lm = write_jsonl(tmp_path / "t.jsonl", [{"text": huge}])
    seen.clear()
    data, _ = tokenize_causal_lm(load_causal_lm(lm), recording, max_length=16)
    assert max(seen) == 16 * 1024 and data.input_ids[0] == tok(huge, truncation=True, max_length=16)["input_ids"]


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
    # a checkpoint's own files: --overwrite replaces only an output (atomic.replace_refusal)
    write_dir_atomically(target, lambda d: (d / "bca_training.json").write_text("one"))
    assert (target / "bca_training.json").read_text() == "one"

    def broken(d):
        (d / "bca_training.json").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, broken)
    assert (target / "bca_training.json").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary directory left
    write_dir_atomically(target, lambda d: (d / "trainer_state.pt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["trainer_state.pt"]

    # a crash between the two renames leaves the old checkpoint aside: recover_dir puts it back
    aside = tmp_path / ".last.old-0a1b2c3d"  # the layout writers before 0.2 left
    aside.mkdir()
    target.rename(aside / "last")
    (tmp_path / ".last.tmp-y_2kq8zv").mkdir()
    assert recover_dir(target) == target
    assert (target / "trainer_state.pt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


# ---- hostile and careless files: every problem a typed error naming the line ----------------------------


def test_utf8_with_or_without_bom(tmp_path):
    plain = tmp_path / "plain.tsv"
    plain.write_bytes("sentence\tlabel\ncafé crème\t1\n".encode("utf-8"))
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + "sentence\tlabel\ncafé crème\t1\n".encode("utf-8"))
    a, b = load_seq_cls(plain), load_seq_cls(bom)
    assert a.text_columns == b.text_columns == ["sentence"] and a.texts == b.texts == [["café crème"]]
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x", "label": 0}).encode() + b"\n")
    assert load_seq_cls(jl).labels == [0]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_undecodable_bytes_name_the_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    good = '{"sentence": "fine", "label": 1}\n' if suffix == ".jsonl" else "fine\t1\n".replace("\t", "," if suffix == ".csv" else "\t")
    header = "" if suffix == ".jsonl" else ("sentence,label\n" if suffix == ".csv" else "sentence\tlabel\n")
    bad = good.replace("fine", "caf\xe9").encode("latin-1")
    path.write_bytes(header.encode() + good.encode() + bad)
    line, column = (2, 18) if suffix == ".jsonl" else (3, 4)
    with pytest.raises(DataError, match=rf"line {line} is not UTF-8 text \(byte 0xe9 at column {column}\)"):
        load_seq_cls(path)


def test_odd_json_values_are_refused_with_their_lines(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        json.dumps({"text": "fine", "label": 1}),
        json.dumps({"text": {"nested": "object"}, "label": 0}),
        json.dumps({"text": ["a", "list"], "label": 0}),
        json.dumps({"text": 3.5, "label": 0}),
        json.dumps({"text": None, "label": 1}),
        json.dumps({"text": "ok", "label": [1]}),
        json.dumps({"text": "ok", "label": {"x": 1}}),
        '{"text": "ok", "label": NaN}',
        json.dumps({"text": "ok", "label": None}),
        '{"text": "lone \\ud800 surrogate", "label": 1}',
        json.dumps({"text": "ok"}),
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    msg = str(info.value)
    for part in ("line 2: column 'text' holds an object, expected a string",
                 "line 3: column 'text' holds an array", "line 4: column 'text' holds a number",
                 "line 5: no value in column 'text'", "line 6: label in column 'label': an array is not a label",
                 "line 7: label in column 'label': an object is not a label",
                 "line 8: label in column 'label': nan is not a finite number",
                 "line 9: label in column 'label': null is not a label",
                 "line 10: column 'text' holds a lone surrogate '\\ud800' at character 6",
                 "line 11: label in column 'label': missing (no such field)"):
        assert part in msg, (part, msg)
    (tmp_path / "deep.jsonl").write_text(deep + "\n" + json.dumps({"text": "x", "label": 1}) + "\n")
    with pytest.raises(DataError, match="line 1: (JSON nested too deeply|expected a JSON object)"):
        load_seq_cls(tmp_path / "deep.jsonl")
    (tmp_path / "deep2.jsonl").write_text('{"text": ' + deep + ', "label": 1}\n')
    with pytest.raises(DataError, match="line 1: JSON nested too deeply"):
        load_seq_cls(tmp_path / "deep2.jsonl")
    (tmp_path / "lm.jsonl").write_text('{"prompt": "a", "response": "b \\udfff"}\n{"prompt": 1, "response": "x"}\n')
    with pytest.raises(DataError) as info:
        load_causal_lm(tmp_path / "lm.jsonl")
    assert "line 1: column 'response' holds a lone surrogate" in str(info.value)
    assert "line 2: column 'prompt' holds a number" in str(info.value)


def test_string_labels_are_class_names(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("a", "positive"), ("b", "negative"), ("c", "positive")])
    ex = load_seq_cls(path)
    assert ex.label_names == ["negative", "positive"] and ex.labels == [1, 0, 1] and not ex.regression
    ex = load_seq_cls(path, label_names=["positive", "negative"])
    assert ex.labels == [0, 1, 0]
    with pytest.raises(DataError, match="line 3: label 'negative' is not one of the classes 'positive', 'meh'"):
        load_seq_cls(path, label_names=["positive", "meh"])
    # a stray number among names (or a stray name among class ids) is refused, not made a class
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": t, "label": "good"} for t in "abc"] + [{"text": "d", "label": 2}])
    with pytest.raises(DataError, match="line 4: label '2' in column 'label' mixes class names with numbers"):
        load_seq_cls(mixed)
    with pytest.raises(DataError, match="line 3: label 'good' in column 'label' is not a number"):
        load_seq_cls(write_tsv(tmp_path / "r.tsv", [("a", 0.5), ("b", "good")]), regression=True)


def test_number_of_classes_is_bounded(tmp_path):
    from bca_deploy.config import MAX_NUM_LABELS
    from bca_deploy.training.data import classes_needed

    ex = load_seq_cls(write_tsv(tmp_path / "d.tsv", [("a", 0), ("b", 4)]))
    assert classes_needed(ex) == 5
    ex = load_seq_cls(write_tsv(tmp_path / "h.tsv", [("a", 0), ("b", MAX_NUM_LABELS)]))
    with pytest.raises(DataError, match=f"line 3: label {MAX_NUM_LABELS} implies"):
        classes_needed(ex)
    names = write_tsv(tmp_path / "n.tsv", [(f"t{i}", f"class{i}") for i in range(MAX_NUM_LABELS + 1)])
    with pytest.raises(DataError, match="distinct label names"):
        load_seq_cls(names)


def test_malformed_csv_and_headers(tmp_path):
    dup = tmp_path / "dup.tsv"
    dup.write_text("sentence\tsentence\nx\ty\n")
    with pytest.raises(DataError, match="names column\\(s\\) 'sentence' more than once"):
        load_seq_cls(dup)
    nul = tmp_path / "nul.csv"
    nul.write_text('sentence,label\n"unterminated,1\n')
    with pytest.raises(DataError):
        load_seq_cls(nul)
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(DataError, match="dir.tsv: a directory, not a data file"):
        load_seq_cls(tmp_path / "dir.tsv")
    import os

    os.mkfifo(tmp_path / "fifo.tsv")  # these were all "data file not found", though each path exists
    (tmp_path / "loop.tsv").symlink_to(tmp_path / "loop.tsv")
    for name, needle in (("fifo.tsv", "a named pipe \\(FIFO\\), not a regular file"),
                         ("loop.tsv", "a loop of symbolic links")):
        with pytest.raises(DataError, match=f"{name}: {needle}"):
            load_seq_cls(tmp_path / name)
    with pytest.raises(DataError, match="/dev/null: a device, not a regular file"):
        load_seq_cls("/dev/null")


def test_a_stray_quote_that_closes_on_a_later_line_is_refused_not_glued_into_one_example(tmp_path):
    """``"unclosed,negative`` opened a quote that the next line's ``"a"`` closed: the lax reader glued the two lines
    into one text with the next row's label, and the file trained with a row fewer, silently (helper-75)."""
    path = tmp_path / "stray.csv"
    path.write_text('sentence,label\n"ok",positive\n"unclosed,negative\n"a",positive\n"b",negative\n')
    with pytest.raises(DataError, match=r"line 3: malformed CSV \(',' expected after '\"'; a quote opened on line 3 "
                                        r"closes on line 4\)"):
        load_seq_cls(path)
    fine = tmp_path / "fine.csv"  # quotes as spreadsheets write them: doubled inside, line breaks and commas quoted
    fine.write_text('sentence,label\n"he said ""hi"", then left",positive\n"two\nlines",negative\nplain,positive\n')
    examples = load_seq_cls(fine)
    assert examples.texts == [['he said "hi", then left', "two\nlines", "plain"]] and examples.lines == [2, 3, 5]


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "")])
def test_an_empty_json_lines_file_is_said_to_be_empty(tmp_path, name, content):
    """As an empty TSV or CSV is: it said "no text column ... columns found: (none)" (helper-75)."""
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}: the file is empty \\(expected one JSON object per line"):
        load_seq_cls(tmp_path / name)


def test_a_pair_of_text_columns_wins_over_one_of_them(tmp_path):
    """GLUE QNLI's columns (question, sentence): reading 'sentence' alone would drop every question."""
    path = tmp_path / "qnli.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n0\twhat is it\tit is a test\tentailment\n")
    examples = load_seq_cls(path)
    assert examples.text_columns == ["question", "sentence"]
    assert [column[0] for column in examples.texts] == ["what is it", "it is a test"]


def test_macro_f1_averages_the_classes_that_occur_as_scikit_learn_does():
    """5 classes; the labels and predictions use 0, 1, 3 only (a held-out subset)."""
    from bca_deploy.training.metrics import classification_metrics

    truth = [0, 0, 1, 1, 1, 3, 3, 0]
    pred = [0, 1, 1, 1, 3, 3, 0, 0]
    confusion = torch.zeros(5, 5, dtype=torch.float64)
    for t, p in zip(truth, pred):
        confusion[t, p] += 1
    # sklearn.metrics.f1_score(truth, pred, average="macro"), per class: 0: 2·2/(3+3), 1: 2·2/(3+3), 3: 2·1/(2+2)
    assert classification_metrics(confusion)["macro_f1"] == pytest.approx((4 / 6 + 4 / 6 + 2 / 4) / 3)


def test_regression_targets_too_large_for_float32_training_are_refused_with_their_lines(tmp_path):
    """A target of 1e39 (beyond float32) or 1e20 (whose squared error is) made the loss infinite at the first step,
    reported as "lower the learning rate"; under torchrun only the process that drew the row stopped. Now the file is
    refused before training, naming each line. Targets up to the bound load as written."""
    path = tmp_path / "reg.tsv"
    path.write_text("sentence\tlabel\n" + "a\t0.5\n" + "b\t1e39\n" + "c\t-2.5e20\n" + "d\t1e18\n")
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    message = str(info.value)
    for part in ("line 3: label 1e+39 in column 'label' is too large for training: regression targets must be "
                 "within ±1e+18", "line 4: label -2.5e+20"):
        assert part in message, (part, message)
    assert "line 2" not in message and "line 5" not in message
    path.write_text("sentence\tlabel\n" + "a\t0.5\n" + "e\t-1e18\n")
    assert load_seq_cls(path).labels == [0.5, -1e18]


def test_hostile_and_careless_delimited_files_are_refused_cheaply_and_named_well(tmp_path):
    """helper-64: a 300 MB file with no line break was read whole as one column name (5.6 GB peak, a message of
    400 MB); 40,000 header columns took 15 s (a quadratic repeat check); an unclosed quote was reported at the line
    where the swallowed record ended; --label-column sentence trained the labels as their own text."""
    sparse = tmp_path / "zeros.tsv"
    with open(sparse, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: no disk used
    with pytest.raises(DataError, match=r"the first line is not a header of column names \(over 1,048,576") as err:
        load_seq_cls(sparse)
    assert len(str(err.value)) < 400
    wide = tmp_path / "wide.tsv"
    wide.write_text("\t".join(f"c{i}" for i in range(40_000)) + "\tc7\n" + "\t".join("x" * 40_001) + "\n")
    with pytest.raises(DataError, match=r"names column\(s\) 'c7' more than once"):  # counted once: 15 s before
        load_seq_cls(wide)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('sentence,label\na fine film,1\n"an open quote,0\nthird line,1\nfourth,0\n')
    with pytest.raises(DataError, match=r"line 3: malformed CSV \(unexpected end of data; a quote opened on line 3 "
                                        r"is never closed\)"):
        load_seq_cls(unclosed)
    multiline = tmp_path / "multiline.csv"
    multiline.write_text('sentence,label\n"two\nlines",1\nnext,0,extra\n')
    with pytest.raises(DataError, match=r"line 4: 3 fields, the header has 2"):  # the line its record starts on
        load_seq_cls(multiline)
    # the label column is never picked as the text: the next candidate is, or none
    both = write_tsv(tmp_path / "both.tsv", [("a film", "good", "1")], header=("sentence", "text", "label"))
    assert load_seq_cls(both, label_column="sentence").text_columns == ["text"]
    alone = write_tsv(tmp_path / "alone.tsv", [("a film", "1")], header=("sentence", "label"))
    with pytest.raises(DataError, match="no text column"):
        load_seq_cls(alone, label_column="sentence")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "unterminated')
    with pytest.raises(DataError) as err:
        load_seq_cls(broken)
    assert "at at" not in str(err.value) and "Unterminated string starting at column" in str(err.value)


def test_whole_decimal_scores_are_marked(tmp_path, capsys):
    """Scores 0.0-5.0 written as whole decimals are regression targets marked whole (the trainer's note names
    --no-regression: pandas writes integer columns with a missing value so); integers are class ids."""
    rows = [(f"text {i}", f"{i % 6}.0") for i in range(24)]
    examples = load_seq_cls(write_tsv(tmp_path / "scores.tsv", rows))
    assert examples.whole_scores and examples.regression and max(examples.labels) == 5.0
    ids = load_seq_cls(write_tsv(tmp_path / "ids.tsv", [(t, y[0]) for t, y in rows]))
    assert not ids.whole_scores and not ids.regression


def test_tokenizing_in_chunks_gives_the_ids_of_one_call(monkeypatch, tmp_path):
    """Texts are tokenized TOKENIZE_CHUNK at a time (one call kept ~2 KB of Encoding per row: 2.2 GB for a
    million rows): the ids, pairs' token types and causal-LM targets are those of a single call."""
    from bca_deploy.training import data
    from bca_deploy.training.data import LMExamples, SeqClsExamples

    tokenizer = word_tokenizer(tmp_path / "tok", [f"the film was good {i}" for i in range(30)])
    texts = [f"the film {'was ' * (i % 7)}good {i}" for i in range(23)]
    pairs = SeqClsExamples(texts=[texts, texts[::-1]], labels=[i % 2 for i in range(23)], regression=False,
                           text_columns=["a", "b"], label_column="label", lines=list(range(2, 25)), path=Path("x"))
    lm = LMExamples(prompts=None, responses=None, texts=texts, lines=list(range(2, 25)), path=Path("y"))
    whole = tokenizer(texts, texts[::-1], truncation=True, max_length=12)
    lm_whole = tokenize_causal_lm(lm, tokenizer, 12)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 5)
    chunked = tokenize_seq_cls(pairs, tokenizer, 12)
    assert chunked.input_ids == whole["input_ids"] and chunked.token_type_ids == whole["token_type_ids"]
    lm_chunked = tokenize_causal_lm(lm, tokenizer, 12)
    assert lm_chunked[0].input_ids == lm_whole[0].input_ids and lm_chunked[0].labels == lm_whole[0].labels



def test_a_csv_header_with_a_quoted_line_break_is_read(tmp_path):
    """Spreadsheets quote a header cell holding a line break; such a header is a few characters over two lines, read
    as before (helper-66: the header bound refused it)."""
    path = tmp_path / "quoted.csv"
    path.write_text('"sentence\ntext",label\ngood,1\nbad,0\n')
    examples = load_seq_cls(path, text_columns=["sentence\ntext"])
    assert examples.texts == [["good", "bad"]] and examples.labels == [1, 0] and examples.lines == [3, 4]


def test_a_file_split_at_the_wrong_delimiter_says_so(tmp_path):
    """helper-64: a .csv written with ';' (or a .tsv with commas) read as one column named 'text;label', with no hint."""
    semi = tmp_path / "semi.csv"
    semi.write_text("text;label\na film;1\n")
    with pytest.raises(DataError, match=r"one column whose name holds ';': the file is split at commas \(\.csv\)"):
        load_seq_cls(semi)
    commas = tmp_path / "commas.tsv"
    commas.write_text("sentence,label\na film,1\n")
    with pytest.raises(DataError, match=r"holds ',': the file is split at tabs \(\.tsv/\.tab\)"):
        load_seq_cls(commas)


def test_a_response_is_tokenized_as_it_follows_its_prompt(tmp_path):
    """helper-78: with a SentencePiece-style tokenizer (Llama-2, Mistral) a response `` Grace`` tokenized alone is
    ``['▁', '▁Grace']``; after its prompt it is ``['▁Grace']``, what serving continues a prompt with. Trained on the
    first, the adapter answered with an extra space."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁", "▁Say", "▁it", ":", "▁Grace", "▁finds", "▁the", "▁apple", "."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # Llama-2's legacy normalizer: a "▁" prepended to every text, spaces written "▁"
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", "merged_with_next"),
                                                  pre_tokenizers.Split(":", "isolated"),
                                                  pre_tokenizers.Split(".", "isolated")])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    alone = tok.convert_ids_to_tokens(tok(" Grace finds the apple.", add_special_tokens=False)["input_ids"])
    assert alone[:2] == ["▁", "▁Grace"]  # the dummy prefix: the extra token of a text tokenized alone
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say it:", "response": " Grace finds the apple."}])
    data, _ = tokenize_causal_lm(load_causal_lm(path), tok, max_length=32)
    ids, labels = data.input_ids[0], data.labels[0]
    whole = tok("Say it: Grace finds the apple.")["input_ids"]
    assert ids == whole + [tok.eos_token_id]  # the text's own tokens: no '▁' before '▁Grace'
    prompt = len(tok("Say it:")["input_ids"])
    assert labels == [IGNORE_INDEX] * prompt + whole[prompt:] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids[prompt:prompt + 1]) == ["▁Grace"]
    # a response beginning inside the prompt's last token ("Say i" + "t:") has no tokens past the prompt's: trained on
    # it tokenized alone, which a served prompt does not continue with; said by line, as TRL warns (helper-78); an
    # example whose prompt fills max_length is left out, also said by line (it was dropped silently)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Say it:", "response": " Grace finds the apple."},
                                              {"prompt": "Say i", "response": "t: Grace."},
                                              {"prompt": "Say it: Grace finds the apple.", "response": " Grace."}])
    notes: list[str] = []
    data, dropped = tokenize_causal_lm(load_causal_lm(path), tok, max_length=8, warn=notes.append)
    assert dropped == 1 and data.lines == [1, 2]
    assert len(notes) == 2, notes
    assert notes[0].startswith("1 of 3 responses begin inside the prompt's last token") and "line 2)" in notes[0]
    assert notes[1].startswith("1 example has no target token within max_length=8") and "line 3)" in notes[1]


def test_a_text_of_one_token_is_named_as_such_not_as_a_prompt_past_max_length(tmp_path):
    """A ``text`` example of one word, with a tokenizer that adds no BOS (Qwen's, GPT-2's), has no next token to
    predict. The note said "no target token within max_length=128 (the prompt fills it)... raise --max-length", which
    names a prompt the file does not have and a fix that does not help; it now says the text is a single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "a", "heroes", "film", "sharply", "made"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a film sharply made"}, {"text": "heroes"}, {"text": "a film"}])
    notes: list[str] = []
    data, dropped = tokenize_causal_lm(load_causal_lm(path), tok, max_length=128, warn=notes.append)
    assert dropped == 1 and data.lines == [1, 3]
    assert notes == ["1 text is a single token, with nothing after it to predict, and is left out (line 2)"], notes


@pytest.mark.parametrize("kind", ["tsv", "csv", "jsonl"])
def test_a_field_or_line_past_the_limit_is_refused_by_line_without_reading_it_whole(tmp_path, monkeypatch, kind):
    """helper-80: one 900 MB line of a sparse file took 5.9 GB of memory to train on (a text is cut at max_length x
    1,024 characters anyway); a field or JSON line over MAX_FIELD_CHARS is now refused, naming its line."""
    from bca_deploy.training import data as data_module

    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 1000)
    long = "good " * 400  # 2,000 characters
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"sentence": t, "label": 1}) + "\n" for t in ("fine", long, "bad")))
    else:
        sep = "\t" if kind == "tsv" else ","
        path.write_text(f"sentence{sep}label\nfine{sep}1\n{long}{sep}0\nbad{sep}0\n")
    with pytest.raises(DataError, match=r"line (3|2): a field over .* characters.*split a longer one"):
        load_seq_cls(path)
    path.write_text(path.read_text().replace(long, "good"))
    assert len(load_seq_cls(path).labels) == 3


@pytest.mark.parametrize("kind", ["tsv", "csv"])
@pytest.mark.parametrize("cell", ["", "x"])
def test_a_line_of_separators_past_the_limit_is_refused_before_csv_splits_it(tmp_path, monkeypatch, kind, cell):
    """Each field was bounded, a line was not: csv split a whole line into its fields first, and a 200 MB line of tabs
    (200 million empty fields, then skipped as a blank spreadsheet row) took 62 s and 2 GB; of 'x<tab>', as many
    one-letter fields before the row was refused for its field count. A line over MAX_FIELD_CHARS is refused by
    line, as a JSON line is, its rest unread."""
    from bca_deploy.training import data as data_module

    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 1000)
    sep = "\t" if kind == "tsv" else ","
    path = tmp_path / f"d.{kind}"
    path.write_text(f"sentence{sep}label\nfine{sep}1\n" + (cell + sep) * 2_000 + f"\nbad{sep}0\n")
    with pytest.raises(DataError, match=r"line 3: a field over [\d,]+ characters.*split a longer one"):
        load_seq_cls(path)
    path.write_text(f"sentence{sep}label\nfine{sep}1\n" + sep * 500 + f"\nbad{sep}0\n")  # under it: a blank row
    assert len(load_seq_cls(path).labels) == 2


def test_a_json_file_of_lines_is_read_a_line_at_a_time_not_whole(tmp_path, monkeypatch):
    """helper-97: a .json file that is not an array was read whole before its lines were: a 500 MB line took 2.8 GB
    and 39 s to refuse (the same file named .jsonl: 0.3 GB, 2 s). It is now read as a .jsonl file is."""
    import tracemalloc

    from bca_deploy.training import data as data_module

    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 1000)
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"sentence": "good " * 1_600_000, "label": 1}) + "\n"
                    + json.dumps({"sentence": "fine", "label": 0}) + "\n")  # an 8 MB line
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"line 1: a field over .* characters"):
            load_seq_cls(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing it"


def test_causal_lm_columns_read_as_classification_data_suggest_the_task(tmp_path):
    """helper-78: prompt/response data given without --task causal-lm was refused without naming the option."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say it:", "response": " fine"}])
    with pytest.raises(DataError, match=r"these are causal-LM columns \('prompt' \+ 'response'\): pass --task causal-lm"):
        load_seq_cls(path)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a line", "label": 1}])
    assert len(load_seq_cls(path).labels) == 1  # a text + label file is classification data, as before


@pytest.mark.parametrize("record, named", [
    ({"instruction": "Rate it.", "input": "a fine film", "output": "positive"}, "'instruction' + 'output'"),
    ({"prompt": "Say it:", "completion": " fine"}, "'prompt' + 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "'messages'"),
])
def test_every_layout_the_causal_lm_reader_takes_suggests_the_task(tmp_path, record, named):
    """Alpaca, TRL prompt/completion and conversation files given without --task causal-lm were refused as
    classification data with no word of the task (only prompt/response and a lone text column got the hint); the
    hint now comes from the causal-LM reader's own column rule, so it names exactly what that reader would read."""
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError, match=rf"these are causal-LM columns \({re.escape(named)}\): pass --task causal-lm"):
        load_seq_cls(path)
    load_causal_lm(path)  # and that reader takes the file


def test_sharegpt_conversations_read_as_classification_data_suggest_the_task_and_the_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"pass --task causal-lm \(task='causal-lm'\); the file has 'conversations': "
                                        r"pass --messages-column conversations"):
        load_seq_cls(path)


def test_prompts_that_fill_max_length_say_how_long_the_shortest_is(tmp_path):
    """Every Alpaca prompt was longer than the default --max-length 128 (its preamble alone is ~50 tokens): the
    error said "raise max_length" and not to what. It now gives the shortest prompt's length, counted by the
    tokenizer, and a value above it."""
    tokenizer = word_tokenizer(tmp_path / "tok", ["w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 yes no"])
    words = " ".join(f"w{i % 10}" for i in range(40))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": words, "response": " yes"},
                                              {"prompt": words + " w1 w2", "response": " no"}])
    shortest = len(tokenizer(words)["input_ids"])  # 40 words + [CLS] + [SEP]
    with pytest.raises(DataError, match=rf"the shortest prompt is {shortest} tokens: raise max_length \(CLI: "
                                        r"--max-length\) above it, e\.g\. --max-length 128 leaves room"):
        load_dataset(path, "causal-lm", tokenizer, 16)
    assert len(load_dataset(path, "causal-lm", tokenizer, 128)[1]) == 2


def test_a_wide_file_keeps_only_the_columns_read_and_is_still_checked_whole(tmp_path):
    """helper-105: a 48 MB CSV of 120,000 columns took 61 s and 972 MB to load, every field of every row kept in a dict
    though two are read. read_records(keep=...) keeps only those (load_seq_cls/load_causal_lm pass theirs); the header
    is still every column, and a ragged row, a repeated column name or a missing column is refused as before."""
    width = 120_000
    header = ["sentence", *(f"c{i}" for i in range(width - 2)), "label"]
    filler = ",".join("1" * (width - 2))
    rows = [f"a fine film,{filler},1", f"a dull film,{filler},0"]
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    records, columns, lines = read_records(wide, keep={"sentence", "label", "text"})
    assert columns == header and lines == [2, 3]
    assert records == [{"sentence": "a fine film", "label": "1"}, {"sentence": "a dull film", "label": "0"}]
    assert read_records(wide)[0][1]["c7"] == "1"  # all of them without keep
    examples = load_seq_cls(wide)
    assert examples.texts == [["a fine film", "a dull film"]] and examples.labels == [1, 0]
    assert load_seq_cls(wide, text_columns="c7").texts == [["1", "1"]]  # a named column is kept, whatever it is
    wide.write_text(",".join(header) + "\n" + "\n".join([rows[0], rows[1] + ",extra", rows[0]]) + "\n")
    with pytest.raises(DataError, match=f"line 3: {width + 1} fields, the header has {width}"):
        load_seq_cls(wide)
    with pytest.raises(DataError, match="line 3: .* fields"):
        load_causal_lm(wide)
    wide.write_text(",".join([*header, "c7"]) + "\n" + rows[0] + ",1\n")
    with pytest.raises(DataError, match=r"names column\(s\) 'c7' more than once"):
        load_seq_cls(wide)
    wide.write_text(",".join(header).replace("label", "score") + "\n" + rows[0] + "\n")
    with pytest.raises(DataError, match=r"label column 'label' not found(.|\n)*\(120,000 in all\)"):
        load_seq_cls(wide)
    jsonl = write_jsonl(tmp_path / "wide.jsonl", [{"prompt": "Q", "response": "A", **{f"c{i}": i for i in range(9)}}])
    records, columns, _ = read_records(jsonl, keep={"prompt", "response", "text"})
    assert records == [{"prompt": "Q", "response": "A"}] and len(columns) == 11
    assert load_causal_lm(jsonl).responses == ["A"]
