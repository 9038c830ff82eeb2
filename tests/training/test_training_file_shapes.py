"""Data files as users have them for ``train`` / ``evaluate``: the GLUE files as distributed (MRPC's ``#1 String``
columns and ``Quality`` label, MNLI's ``gold_label``, the unlabelled test splits), what pandas and ``datasets`` write
(booleans, ``-1`` for no label, ``to_json``'s whole-table layouts), spreadsheet rows of empty fields, class names in
another case, and the causal-LM formats of TRL (prompt/completion) and Alpaca (instruction/input/output).

Each file is written here byte for byte as its tool writes it (pandas and datasets are not installed in the test
environments; the bytes were taken from pandas 3.1 and datasets 5.2)."""

from __future__ import annotations

import csv
import json

import pytest

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train
from bca_deploy.training.data import (
    IGNORE_INDEX,
    check_label_range,
    load_causal_lm,
    load_seq_cls,
    tokenize_causal_lm,
)
from training_helpers import config, one_thread, tiny_model_dir, write_jsonl, write_tsv  # noqa: F401 - autouse fixture

ROWS = [("it was great fun", 1), ("awful and boring", 0), ("a fine film , truly", 1), ("dull , dull , dull", 0),
        ("the best of the year", 1), ("i hated it", 0), ("charming and warm", 1), ("a mess", 0)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("file-shapes")
    words = [s for s, _ in ROWS] + ["below is an instruction that describes a task paired with input provides further "
                                    "context write response appropriately completes the request ### : say"]
    return {"bert": tiny_model_dir(root / "bert", "bert-bare", words),
            "llama": tiny_model_dir(root / "llama", "llama", words)}


# ---- columns ----------------------------------------------------------------------------------------


def test_mrpc_as_glue_distributes_it_reads_its_string_columns(tmp_path):
    """GLUE's MRPC: ``Quality\\t#1 ID\\t#2 ID\\t#1 String\\t#2 String`` behind a byte-order mark. The pair is read
    without --text-columns (it was 'no text column'), and the label column's refusal names ``Quality``."""
    path = tmp_path / "mrpc.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n".encode()
                     + "".join(f"{y}\t{10 + i}\t{20 + i}\t{s}\t{s} indeed\n" for i, (s, y) in enumerate(ROWS)).encode())
    with pytest.raises(DataError, match=r"label column 'label' not found \(the file has 'Quality': pass --label-column "
                                        r"Quality\)") as refused:
        load_seq_cls(path)
    assert "no text column" not in str(refused.value)
    examples = load_seq_cls(path, label_column="Quality")
    assert examples.text_columns == ["#1 String", "#2 String"]
    assert examples.texts == [[s for s, _ in ROWS], [f"{s} indeed" for s, _ in ROWS]]
    assert examples.labels == [y for _, y in ROWS]


@pytest.mark.parametrize("column", ["gold_label", "is_duplicate", "score", "target", "class", "sentiment"])
def test_a_label_column_of_another_name_is_named_with_the_option(tmp_path, column):
    """MNLI/SNLI's ``gold_label``, QQP's ``is_duplicate``, STS-B's ``score``, the HF Trainer's ``labels``, ...: the
    refusal named none of them (but ``labels``) and said only 'pass --label-column'."""
    header = ["index", "sentence1", "sentence2", "label1", column]  # MNLI keeps annotator labels beside gold_label
    path = write_tsv(tmp_path / "data.tsv", [(i, s, s, y, y) for i, (s, y) in enumerate(ROWS)], header=header)
    with pytest.raises(DataError, match=rf"\(the file has '{column}': pass --label-column {column}\)"):
        load_seq_cls(path)
    assert load_seq_cls(path, label_column=column).labels == [y for _, y in ROWS]


@pytest.mark.parametrize("column, expected", [("review", "review"), ("content", "content"), ("tweet", "tweet"),
                                              ("#1 Text", "'#1 Text'")])
def test_a_text_column_of_another_name_is_named_with_the_option(tmp_path, column, expected):
    """A review data set's ``review`` column (or the one column beside the label, quoted for a shell when it must be):
    the refusal said 'pass --text-columns' with nothing to pass."""
    path = write_tsv(tmp_path / "data.tsv", [(i, s, y) for i, (s, y) in enumerate(ROWS)], header=["", column, "label"])
    with pytest.raises(DataError, match=rf"the file has '{column}': --text-columns {expected}\)"):
        load_seq_cls(path)
    assert load_seq_cls(path, text_columns=[column]).texts == [[s for s, _ in ROWS]]


def test_an_unlabelled_test_split_is_said_to_be_one(tmp_path):
    """GLUE's test.tsv (``index\\tsentence``) and datasets' test split (label -1 on every row, as to_json writes it):
    the first was refused as 'pass --label-column', the second told to pass a larger --num-labels."""
    test_tsv = write_tsv(tmp_path / "test.tsv", [(i, s) for i, (s, _) in enumerate(ROWS)], header=["index", "sentence"])
    with pytest.raises(DataError, match=r"no column besides its text and row numbers: an unlabelled test split\?"):
        load_seq_cls(test_tsv)
    test_jsonl = tmp_path / "test.jsonl"
    test_jsonl.write_text("".join(json.dumps({"sentence": s, "label": -1, "idx": i}, separators=(",", ":")) + "\n"
                                  for i, (s, _) in enumerate(ROWS)))
    examples = load_seq_cls(test_jsonl)
    with pytest.raises(DataError, match=r"-1 marks an unlabelled example .*: remove those rows") as refused:
        check_label_range(examples, 2)
    assert "--num-labels" not in str(refused.value) and "line 8: label -1" in str(refused.value)
    with pytest.raises(DataError, match="a larger --num-labels"):  # another id out of range: as before
        check_label_range(load_seq_cls(write_tsv(tmp_path / "three.tsv", [("a", 0), ("b", 2)])), 2)


# ---- rows and layouts -------------------------------------------------------------------------------------------


def test_spreadsheet_rows_of_empty_fields_are_blank_lines(tmp_path):
    """A spreadsheet saves rows it once formatted as ``,`` (CSV) or a tab (TSV): refused as an empty text and an
    empty label on that line. They hold nothing, as a blank line, and are passed over as one."""
    csv_path = tmp_path / "sheet.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:  # csv's own line ends: CRLF
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows([*ROWS[:4], ("", ""), *ROWS[4:], ("", ""), ("", "")])
    tsv_path = tmp_path / "sheet.tsv"
    tsv_path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in ROWS) + "\t\n \t \n\n")
    for path in (csv_path, tsv_path):
        examples = load_seq_cls(path)
        assert examples.texts == [[s for s, _ in ROWS]] and examples.labels == [y for _, y in ROWS]
    assert load_seq_cls(csv_path).lines == [2, 3, 4, 5, 7, 8, 9, 10]
    half = tmp_path / "half.tsv"  # a row with a value is still checked
    half.write_text("sentence\tlabel\nfine\t1\n\t0\n")
    with pytest.raises(DataError, match="line 3: empty text in column 'sentence'"):
        load_seq_cls(half)


# what pandas 3.1 writes for DataFrame({"sentence": ["a b", "c d"], "label": [1, 0]}).to_json(path, orient=...)
PANDAS_LAYOUTS = {
    "columns": '{"sentence":{"0":"a b","1":"c d"},"label":{"0":1,"1":0}}',  # the default orient
    "index": '{"0":{"sentence":"a b","label":1},"1":{"sentence":"c d","label":0}}',
    "split": '{"columns":["sentence","label"],"index":[0,1],"data":[["a b",1],["c d",0]]}',
    "table": '{"schema":{"fields":[{"name":"index","type":"integer"},{"name":"sentence","type":"string"},'
             '{"name":"label","type":"integer"}],"primaryKey":["index"],"pandas_version":"1.4.0"},'
             '"data":[{"index":0,"sentence":"a b","label":1},{"index":1,"sentence":"c d","label":0}]}',
    "columns-indented": json.dumps({"sentence": {"0": "a b", "1": "c d"}, "label": {"0": 1, "1": 0}}, indent=2),
}


# (an indented object in a .jsonl file is not among them: a .jsonl file is read a line at a time, so an object over
# several lines is malformed JSON lines, refused as such)
@pytest.mark.parametrize("layout, suffix", [(layout, suffix) for layout in sorted(PANDAS_LAYOUTS)
                                            for suffix in (".json", ".jsonl")
                                            if (layout, suffix) != ("columns-indented", ".jsonl")])
def test_a_whole_table_in_one_json_object_is_refused_naming_the_layout_and_the_call_that_writes_lines(
        tmp_path, layout, suffix):
    """``df.to_json(path)`` writes orient="columns": one object, read as one example whose text was an object ("line 1:
    column 'sentence' holds an object"); split and table were 'no text column'. Named, with the call to use."""
    path = tmp_path / f"frame{suffix}"
    path.write_text(PANDAS_LAYOUTS[layout])
    orient = layout.split("-")[0]
    named = "orient=\"columns\"" if orient in ("columns", "index") else f"orient=\"{orient}\""
    for read in (load_seq_cls, load_causal_lm):
        with pytest.raises(DataError) as refused:
            read(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: line 1: one JSON object holding the whole table"), message
        assert named in message and 'df.to_json(path, orient="records", lines=True)' in message, message
    records = tmp_path / "records.json"  # the records layout is read, as before
    records.write_text('[{"sentence":"a b","label":1},{"sentence":"c d","label":0}]')
    assert load_seq_cls(records).labels == [1, 0]
    one = tmp_path / "one.jsonl"  # a file of one example is still one example
    one.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert load_causal_lm(one).conversations == [[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]]


# ---- labels -----------------------------------------------------------------------------------------------------


def _boolean_csv(path):
    """ROWS with booleans for labels, as pandas' to_csv writes a bool column (``True``/``False``, fields quoted as
    needed, index=False)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sentence", "label"])
        writer.writerows((s, bool(y)) for s, y in ROWS)
    return path


def test_booleans_are_class_ids_in_every_format(tmp_path):
    """One boolean column, as pandas writes it to CSV (``True``) and to JSON (``true``): JSON's were class ids and the
    words sorted class names, so training on one and holding out the other was refused. Both are ids false=0, true=1
    (as in Python, pandas and datasets), named as the file spells them; a column with other words stays names."""
    csv_path = _boolean_csv(tmp_path / "bool.csv")
    json_path = write_jsonl(tmp_path / "bool.jsonl", [{"sentence": s, "label": bool(y)} for s, y in ROWS])
    ids = [y for _, y in ROWS]
    assert (load_seq_cls(csv_path).labels, load_seq_cls(csv_path).label_names) == (ids, ["False", "True"])
    assert (load_seq_cls(json_path).labels, load_seq_cls(json_path).label_names) == (ids, ["false", "true"])
    assert load_seq_cls(json_path, label_names=["neg", "pos"]).labels == ids
    given = load_seq_cls(json_path, label_names=["true", "false"])  # names holding the words: an order given
    assert given.labels == [1 - y for y in ids] and given.label_names == ["true", "false"]
    liar = write_tsv(tmp_path / "liar.tsv", [("a", "true"), ("b", "false"), ("c", "half-true")])
    assert load_seq_cls(liar).label_names == ["false", "half-true", "true"]


def test_a_boolean_training_file_evaluates_on_the_same_data_in_another_format(models, tmp_path):
    csv_path = _boolean_csv(tmp_path / "bool.csv")
    json_path = write_jsonl(tmp_path / "bool.jsonl", [{"sentence": s, "label": bool(y)} for s, y in ROWS])
    ids_path = write_tsv(tmp_path / "ids.tsv", ROWS)
    result = train(config(models["bert"], json_path, tmp_path / "run", max_steps=2, eval_data=csv_path))
    record = json.loads((result.best_dir / "bca_training.json").read_text())
    assert record["label_names"] == ["false", "true"] and not record.get("labels_named_by")
    by_ids = evaluate(EvaluateConfig(model=models["bert"], adapter=result.best_dir, data=ids_path, device="cpu"))
    for path in (csv_path, json_path):
        assert evaluate(EvaluateConfig(model=models["bert"], adapter=result.best_dir, data=path,
                                       device="cpu")) == by_ids


def test_a_class_name_in_another_case_is_refused_naming_the_class(tmp_path):
    train_path = write_tsv(tmp_path / "train.tsv", [(s, "positive" if y else "negative") for s, y in ROWS])
    dev_path = write_tsv(tmp_path / "dev.tsv", [(s, "Positive" if y else "Negative") for s, y in ROWS[:2]])
    names = load_seq_cls(train_path).label_names
    with pytest.raises(DataError) as refused:
        load_seq_cls(dev_path, label_names=names)
    assert ("line 2: label 'Positive' is not one of the classes 'negative', 'positive' (it differs only in case from "
            "'positive': class names are matched exactly)") in str(refused.value)
    unseen = write_tsv(tmp_path / "unseen.tsv", [("meh", "neutral")])
    with pytest.raises(DataError) as refused:
        load_seq_cls(unseen, label_names=names)
    assert "differs only in case" not in str(refused.value)


# ---- causal-lm --------------------------------------------------------------------------------------------------


ALPACA = [{"instruction": "say fun", "input": "it was great fun", "output": "a fine film"},
          {"instruction": "say {mess}", "input": "", "output": "a mess"}]
# Stanford Alpaca's prompts with the newline after "### Response:" that Axolotl's alpaca type adds, written out here
EXPECTED_PROMPTS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nsay fun\n\n### Input:\nit was great fun"
    "\n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nsay {mess}\n\n### Response:\n",
]


def test_alpaca_json_is_read_as_the_alpaca_prompt_with_loss_on_the_output(models, tmp_path):
    """An Alpaca ``.json`` (an array of instruction/input/output objects, as tatsu-lab ships alpaca_data.json) was
    refused; read as Alpaca's prompt (the input in it when there is one) and the output as the response."""
    from transformers import AutoTokenizer

    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ALPACA, indent=4))
    examples = load_causal_lm(path)
    assert examples.prompts == EXPECTED_PROMPTS and examples.responses == ["a fine film", "a mess"]
    assert examples.lines == [2, 7]
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id  # (a BERT-style one)
    data, _ = tokenize_causal_lm(examples, tokenizer, 128)
    for prompt, response, ids, labels in zip(EXPECTED_PROMPTS, examples.responses, data.input_ids, data.labels):
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids and labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert labels[len(prompt_ids):] == ids[len(prompt_ids):] == tokenizer(
            response, add_special_tokens=False)["input_ids"] + [end]
    missing = write_jsonl(tmp_path / "no_input.jsonl", [{"instruction": "say {mess}", "output": "a mess"}])
    assert load_causal_lm(missing).prompts == EXPECTED_PROMPTS[1:]  # no input key: an instruction without one


def test_alpaca_trains_and_evaluates_in_either_json_layout(models, tmp_path, capsys):
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(ALPACA * 4))
    lines = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    result = train(config(models["llama"], array, tmp_path / "run", task="causal-lm", max_steps=2, max_length=64,
                          eval_data=lines, progress=True))
    assert "read as instruction+input+output (the Alpaca prompt)" in capsys.readouterr().err
    assert evaluate(EvaluateConfig(model=models["llama"], adapter=result.best_dir, data=array,
                                   device="cpu")) == result.final_metrics


def test_an_instruction_prompt_column_that_leaves_out_the_input_is_refused(tmp_path):
    """``--prompt-column instruction --response-column output`` on Alpaca data trained every output without its
    input, silently."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    with pytest.raises(DataError, match=r"column 'input' holds text on line 1 \(item 1\) that --prompt-column instruction "
                                        r"leaves out of the prompts; leave out --prompt-column and --response-column"):
        load_causal_lm(path, prompt_column="instruction", response_column="output")
    with pytest.raises(DataError, match=r"column 'instruction' holds text on lines 1 \(item 1\), 1 \(item 2\) that "
                                        r"--prompt-column input"):
        load_causal_lm(path, prompt_column="input", response_column="output")
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "say", "context": "a fine film", "response": "ok"}])
    with pytest.raises(DataError, match=r"column 'context' holds text on line 1 .* write a prompt column holding"):
        load_causal_lm(dolly, prompt_column="instruction")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "say", "input": "", "output": "ok"}])
    assert load_causal_lm(empty, prompt_column="instruction", response_column="output").prompts == ["say"]


def test_trl_prompt_completion_reads_the_completion_as_the_response(tmp_path):
    """TRL's prompt-completion data (``{"prompt", "completion"}``) was refused for want of a 'response' column."""
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "the film was", "completion": " great fun"}])
    examples = load_causal_lm(path)
    assert (examples.prompts, examples.responses, examples.columns) == (["the film was"], [" great fun"],
                                                                         "prompt+completion")
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "response": "r", "completion": "c"}])
    assert load_causal_lm(both).responses == ["r"]


@pytest.mark.parametrize("record, hint", [
    ({"question": "q?", "answer": "a"}, "pass --prompt-column question --response-column answer"),
    ({"input": "q?", "output": "a"}, "pass --prompt-column input --response-column output"),
    ({"content": "some text"}, "pass --text-column content"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "pass --messages-column conversations"),
])
def test_a_causal_lm_file_of_other_columns_is_refused_with_the_options_for_them(tmp_path, record, hint):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError, match=hint):
        load_causal_lm(path)


def test_sharegpt_messages_are_named_as_such(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                          {"from": "gpt", "value": "yo"}]}])
    with pytest.raises(DataError, match=r"line 1: conversations\[0\] is a ShareGPT message .*human is user, gpt is "
                                        r"assistant"):
        load_causal_lm(path, messages_column="conversations")


def test_an_array_written_on_one_line_names_each_records_item(tmp_path):
    """pandas' ``df.to_json(path, orient="records")`` writes the whole array on one line: every record's problem said
    "line 1" (helper-111: "left out (lines 1, 1, 1, 1, 1 and 95 more)"). Records sharing a line are named by item."""
    rows = [{"sentence": "a b", "label": 0}, {"sentence": "c d", "label": 1}, {"sentence": "", "label": 1}]
    one_line = tmp_path / "records.json"
    one_line.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"line 1 \(item 3\): empty text in column 'sentence'"):
        load_seq_cls(one_line)
    indented = tmp_path / "indented.json"  # one record per line or more: lines alone, as before
    indented.write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"- line 10: empty text in column 'sentence'$"):
        load_seq_cls(indented)
    one_line.write_text(json.dumps(rows[:2]))
    examples = load_seq_cls(one_line)
    assert examples.lines == [1, 1] and json.dumps(examples.lines) == "[1, 1]"  # still line numbers to every reader
