"""Held-out files as users bring them to ``train --eval-data`` and ``evaluate``: rows the training file holds too,
unlabelled test splits, labels written as the other kind (names for ids), scores written as integers."""

from __future__ import annotations

import pytest

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train
from bca_deploy.training.data import load_causal_lm, load_seq_cls, seen_in_training
from training_helpers import config, data_and_bert, one_thread, write_jsonl  # noqa: F401 - one_thread: autouse


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_and_bert(tmp_path_factory.mktemp("held-out"), 256)


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


def test_held_out_rows_that_the_training_file_holds_are_noted(files, tmp_path, capsys):
    """A held-out file sharing rows with the training file (the same file passed twice, a split cut from rows the
    training file keeps) scored them as unseen and picked best/ by them, without a word: noted with how many and
    their lines. SST-2's TSV writes a trailing space a JSON copy strips: the same text to the tokenizer."""
    train_rows, dev_rows = _rows(files["small"]), _rows(files["dev"])
    mixed = tmp_path / "held.tsv"
    # lines 2-7: dev rows; lines 8-11: training rows 10-13, their white space changed
    mixed.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in dev_rows[:6])
                     + "".join(f"  {' '.join(s.split())}\t{y}\n" for s, y in train_rows[10:14]))
    train(config(files["bert"], files["small"], tmp_path / "run", max_steps=1, eval_data=mixed))
    err = capsys.readouterr().err
    assert (f"note: {mixed}: 4 of its 10 examples (40%) are also in the training data {files['small']} "
            "(lines 8, 9, 10, 11)") in err, err
    train(config(files["bert"], files["small"], tmp_path / "apart", max_steps=1, eval_data=files["dev"]))
    assert "also in the training data" not in capsys.readouterr().err


def test_the_same_example_is_found_for_each_kind_of_file(tmp_path):
    """Text pairs (both texts: the same first sentence beside another second one is another input), prompt and
    response, conversations with their tools."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\na\tb\t0\nc\td\t1\n")
    held = tmp_path / "held_pairs.tsv"
    held.write_text("sentence1\tsentence2\tlabel\na\tx\t0\nc \td\t1\n")
    assert seen_in_training(load_seq_cls(pairs), load_seq_cls(held)) == [1]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    trained = write_jsonl(tmp_path / "train.jsonl", [{"messages": chat}, {"messages": chat[:1] + [
        {"role": "assistant", "content": "bye"}]}])
    held_chat = write_jsonl(tmp_path / "held.jsonl", [{"messages": chat, "tools": tools}, {"messages": chat}])
    assert seen_in_training(load_causal_lm(trained), load_causal_lm(held_chat)) == [1]
    prompts = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "completion": "q"},
                                                  {"prompt": "p", "completion": "r"}])
    held_prompts = write_jsonl(tmp_path / "hpr.jsonl", [{"prompt": "p", "completion": "r "}])
    assert seen_in_training(load_causal_lm(prompts), load_causal_lm(held_prompts)) == [0]


def _evaluate(files, adapter, data, **options):
    return evaluate(EvaluateConfig(model=files["bert"], adapter=adapter, data=data, device="cpu", **options))


def test_an_unlabelled_split_is_said_to_be_one_beside_class_names(files, tmp_path):
    """A held-out file of -1 labels (datasets' GLUE test splits) beside an adapter whose classes are names was blamed
    on the numbering of its ids ('its labels are class ids, but the classes were named by the training file'), or
    with --label-names on names it lacks ('label -1 has no name'): now the unlabelled split is named, as where the
    classes are ids."""
    names = {"1": "good", "0": "not_good"}
    named = tmp_path / "named.tsv"
    named.write_text("sentence\tlabel\n" + "".join(f"{s}\t{names[y]}\n" for s, y in _rows(files["small"])))
    unlabelled = tmp_path / "test.tsv"
    unlabelled.write_text("sentence\tlabel\n" + "".join(f"{s}\t-1\n" for s, _ in _rows(files["dev"])[:8]))
    said = r"8 label\(s\) outside the (classification )?head's range 0\.\.1 .*-1 marks an unlabelled example"
    with pytest.raises(DataError, match=said):
        train(config(files["bert"], named, tmp_path / "refused", max_steps=1, new_head=True, eval_data=unlabelled))
    run = train(config(files["bert"], named, tmp_path / "run", max_steps=1, new_head=True))
    with pytest.raises(DataError, match=said):
        _evaluate(files, run.last_dir, unlabelled)
    with pytest.raises(DataError, match=said):
        _evaluate(files, run.last_dir, unlabelled, label_names=["not_good", "good"])


def test_class_names_beside_an_adapter_trained_on_ids_say_to_write_the_ids(files, tmp_path):
    """An adapter trained on ids 0/1 records the classes as transformers names them (LABEL_0, LABEL_1); a held-out
    file naming its classes (negative/positive) was refused line by line with no word of what to write."""
    run = train(config(files["bert"], files["small"], tmp_path / "run", max_steps=1))
    names = {"1": "positive", "0": "negative"}
    named = tmp_path / "named.tsv"
    named.write_text("sentence\tlabel\n" + "".join(f"{s}\t{names[y]}\n" for s, y in _rows(files["dev"])[:8]))
    with pytest.raises(DataError) as caught:
        _evaluate(files, run.last_dir, named)
    message = str(caught.value)
    assert ("- the classes 'LABEL_0', 'LABEL_1' are the names transformers gives classes trained as ids 0..1: write "
            "the labels of column 'label' as those ids\n  - line 2: label ") in message, message
    assert _evaluate(files, run.last_dir, files["dev"])["n"] == 128  # the ids themselves read as before


def test_integer_scores_read_as_classes_are_noted(files, tmp_path, capsys):
    """STS-B-like scores 0-5 written as integers in a column called score trained a 6-class classifier judged by
    accuracy, with no word of it (a user of the data set expects regression): noted with --regression; given, the run
    is regression; a label column of other ids, or --num-labels, says nothing."""
    rows = _rows(files["small"])
    scores = tmp_path / "scores.tsv"
    scores.write_text("sentence\tscore\n" + "".join(f"{s}\t{i % 6}\n" for i, (s, _) in enumerate(rows)))
    train(config(files["bert"], scores, tmp_path / "classes", max_steps=1, label_column="score", new_head=True))
    said = (f"note: {scores}: the labels in column 'score' are integers, read as class ids: a 6-class classifier, "
            "judged by accuracy; if they are scores on a scale (as STS-B's 0-5), pass --regression")
    assert said in capsys.readouterr().err
    result = train(config(files["bert"], scores, tmp_path / "regression", max_steps=1, label_column="score",
                          new_head=True, regression=True))
    assert "read as class ids" not in capsys.readouterr().err
    assert _evaluate(files, result.last_dir, scores).keys() >= {"pearson", "mse"}
    train(config(files["bert"], scores, tmp_path / "six", max_steps=1, label_column="score", new_head=True,
                 num_labels=6))
    classes = tmp_path / "classes.tsv"
    classes.write_text(scores.read_text().replace("\tscore\n", "\tlabel\n", 1))
    train(config(files["bert"], classes, tmp_path / "ids", max_steps=1, new_head=True))
    assert "read as class ids" not in capsys.readouterr().err


def test_a_multi_label_row_says_one_class_per_example(tmp_path):
    """A row of several classes (datasets' Sequence(ClassLabel), GoEmotions' JSON) was 'an array is not a label':
    now it says what is read instead."""
    path = write_jsonl(tmp_path / "multi.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": [0, 2]}])
    with pytest.raises(DataError, match=r"line 2: label in column 'label': an array is not a label: one class per "
                                        r"example \(multi-label classification, several classes per example, is not "
                                        r"supported\)"):
        load_seq_cls(path)


def _hub_parquet(path, rows, names):
    """``rows`` (text, class id) as ``datasets``' ``to_parquet`` writes a ``ClassLabel`` column (GLUE's hub files):
    int64 ids, the names in the schema's ``huggingface`` metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"sentence": {"dtype": "string", "_type": "Value"}, "label": {"names": names, "_type": "ClassLabel"},
                "idx": {"dtype": "int32", "_type": "Value"}}
    table = pa.table({"sentence": [s for s, _ in rows], "label": pa.array([int(y) for _, y in rows], pa.int64()),
                      "idx": pa.array(range(len(rows)), pa.int32())})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}), path)
    return path


def test_a_hub_parquet_files_class_names_say_what_its_ids_mean(files, tmp_path):
    """datasets writes a ClassLabel column as ids with the names in the file's metadata (GLUE's sst2 on the hub:
    negative, positive; MNLI: entailment, neutral, contradiction, not in sorted order). A run trained on it recorded
    LABEL_0, LABEL_1, and the same held-out file beside a run trained on the names was refused as ids of unknown
    meaning: now the names are the classes (in the ids' order) and the ids are read as them, scored as the names
    file scores."""
    pytest.importorskip("pyarrow")
    mnli = ["entailment", "neutral", "contradiction"]  # ids' order; sorted: contradiction, entailment, neutral
    rows = [(s, int(y) + (i % 2)) for i, (s, y) in enumerate(_rows(files["small"]))]  # ids 0..2
    hub = _hub_parquet(tmp_path / "train.parquet", rows, mnli)
    by_hub = train(config(files["bert"], hub, tmp_path / "hub", max_steps=1, new_head=True))
    import json

    assert json.loads((by_hub.last_dir / "bca_training.json").read_text())["label_names"] == mnli
    named = tmp_path / "named.tsv"  # the same rows with their names: numbered in sorted order by the run
    named.write_text("sentence\tlabel\n" + "".join(f"{s}\t{mnli[y]}\n" for s, y in rows))
    by_names = train(config(files["bert"], named, tmp_path / "names", max_steps=1, new_head=True, eval_data=hub))
    assert by_names.final_metrics == train(config(files["bert"], named, tmp_path / "names2", max_steps=1, new_head=True,
                                                  eval_data=named)).final_metrics
    assert _evaluate(files, by_names.last_dir, hub) == _evaluate(files, by_names.last_dir, named)
    # names whose sorted order is the ids' (SST-2's negative, positive): known to mean them, not refused as ids
    sst2 = [(s, y % 2) for s, y in rows]
    words = tmp_path / "words.tsv"
    words.write_text("sentence\tlabel\n" + "".join(f"{s}\t{['negative', 'positive'][y]}\n" for s, y in sst2))
    by_words = train(config(files["bert"], words, tmp_path / "words", max_steps=1, new_head=True))
    binary = _hub_parquet(tmp_path / "sst2.parquet", sst2, ["negative", "positive"])
    assert _evaluate(files, by_words.last_dir, binary) == _evaluate(files, by_words.last_dir, words)
    # ids beside classes the metadata does not name (an adapter trained on ids): read as ids, as before
    ids = train(config(files["bert"], _hub_parquet(tmp_path / "ids.parquet", rows, ["a", "b", "c"]), tmp_path / "ids",
                       max_steps=1, new_head=True, label_names=["x", "y", "z"]))
    assert _evaluate(files, ids.last_dir, hub)["n"] == len(rows)


def test_a_run_on_a_hub_parquet_file_checkpointed_before_its_names_were_read_resumes(files, tmp_path, capsys):
    """A checkpoint written by the code before the file's ClassLabel names were read records LABEL_0, LABEL_1 (and no
    train_data_sha256); the same file now names those ids, and --resume was refused as another run ('label_names:
    checkpoint has ['LABEL_0', 'LABEL_1'], this run has ['negative', 'positive']'): the same classes, resumed, noted.
    Other names (a run given --label-names before) are still another run."""
    import json

    import torch

    from bca_deploy.training import CheckpointError

    pytest.importorskip("pyarrow")
    hub = _hub_parquet(tmp_path / "sst2.parquet", [(s, int(y)) for s, y in _rows(files["small"])],
                       ["negative", "positive"])
    out = tmp_path / "run"
    train(config(files["bert"], hub, out, max_steps=2, new_head=True, scheduler="constant"))
    state_path = out / "last" / "trainer_state.pt"

    def written_before(names):  # the run config as the code before wrote it
        state = torch.load(state_path, weights_only=True)
        state["run_config"].pop("train_data_sha256")
        state["run_config"]["label_names"] = names
        torch.save(state, state_path)

    written_before(["LABEL_0", "LABEL_1"])
    capsys.readouterr()
    resumed = train(config(files["bert"], hub, out, max_steps=4, new_head=True, scheduler="constant", resume=True))
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert "numbers its classes LABEL_0 .. LABEL_1: it was written before the class names in" in capsys.readouterr().err
    assert json.loads((resumed.last_dir / "bca_training.json").read_text())["label_names"] == ["negative", "positive"]
    written_before(["bad", "good"])
    with pytest.raises(CheckpointError, match=r"label_names: checkpoint has \['bad', 'good'\]"):
        train(config(files["bert"], hub, out, max_steps=6, new_head=True, scheduler="constant", resume=True))
