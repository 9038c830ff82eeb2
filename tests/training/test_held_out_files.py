"""Held-out files as users bring them to ``train --eval-data`` and ``evaluate``: rows the training file holds too,
unlabelled test splits, labels written as the other kind (names for ids), scores written as integers."""

from __future__ import annotations

import pytest

from bca_deploy.training import train
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
    prompts = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "completion": "q"}, {"prompt": "p", "completion": "r"}])
    held_prompts = write_jsonl(tmp_path / "hpr.jsonl", [{"prompt": "p", "completion": "r "}])
    assert seen_in_training(load_causal_lm(prompts), load_causal_lm(held_prompts)) == [0]
