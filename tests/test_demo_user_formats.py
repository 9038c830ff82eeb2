"""The demo's split of a user's data file: its training and held-out parts are written in a format train reads back
as the same rows, whatever format the user's file is in (a .parquet, .tab or .json file's rows were written as
comma-separated text under the user's extension, which train could not read)."""

from __future__ import annotations

import json

import pytest

from bca_deploy.demo import DemoConfig, _Demo, _UserData
from bca_deploy.training.data import read_records

ROWS = [{"text": f"sentence number {i}", "label": i % 2} for i in range(10)]


def _user_file(path):
    """``ROWS`` saved as ``path``'s format says."""
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    return path


@pytest.mark.parametrize("name", ["data.parquet", "data.tab", "data.json"])
def test_the_split_of_a_users_file_reads_back_as_its_rows(tmp_path, name):
    path = _user_file(tmp_path / name)
    records, columns, _ = read_records(path)
    user = _UserData(path, records[:8], records[8:], columns, "text", None, 2, len(records))
    demo = _Demo(DemoConfig(out=tmp_path / "out"), tmp_path / "model", tmp_path / "tmp", tmp_path / "out", print)
    task = demo.prepare_data(user)[0]
    as_written = [{k: str(v) for k, v in r.items()} for r in read_records(task.train_file)[0]]
    assert as_written == [{k: str(v) for k, v in r.items()} for r in ROWS[:8]], task.train_file
    assert [r["text"] for r in read_records(task.heldout_file)[0]] == [r["text"] for r in ROWS[8:]]


def test_a_parquet_file_with_a_column_the_demo_does_not_read_is_split(tmp_path):
    """An embedding column (a list) beside the text and label: not read, not refused (it was, read whole)."""
    import sys
    from pathlib import Path

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
    from training_helpers import tiny_model_dir

    from bca_deploy.demo import _read_user_data

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "embedding": [0.5, float(i)]} for i, r in enumerate(ROWS)]), path)
    model = tiny_model_dir(tmp_path / "bert", "bert", [r["text"] for r in ROWS])
    user = _read_user_data(path, 0, AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model), model)
    assert user.columns == ["text", "label"] and user.total == len(ROWS)
    assert sorted(r["text"] for r in user.train + user.heldout) == sorted(r["text"] for r in ROWS)
    assert all(set(r) == {"text", "label"} for r in user.train + user.heldout)


@pytest.mark.parametrize("data, dev", [(None, "YOUR_DEV.tsv"), ("reviews.tsv", "YOUR_DEV.tsv"),
                                       ("reviews.csv", "YOUR_DEV.csv"), ("reviews.jsonl", "YOUR_DEV.jsonl"),
                                       ("reviews.parquet", "YOUR_DEV.parquet"), ("reviews.json", "YOUR_DEV.json")])
def test_the_next_train_command_names_a_dev_file_in_the_users_format(tmp_path, data, dev):
    """``demo --data reviews.jsonl`` printed ``--eval-data YOUR_DEV.tsv``: copied with a dev file of the user's own
    format, the name (train reads a file by its extension) did not match it. Now the dev placeholder has the data's
    extension."""
    from bca_deploy.demo import Classifier

    path = tmp_path / data if data else None
    demo = _Demo(DemoConfig(data=path, export_onnx=False), tmp_path / "model", tmp_path / "tmp", tmp_path / "out",
                 lambda line: None)
    demo.result.classifiers = [Classifier("yours", ["bad", "good"], "yours", 8, 2, [(1, 0.5)], tmp_path / "a",
                                          tmp_path / "s")]
    train = next(c for c in demo.next_commands() if c.startswith("bca-deploy train"))
    assert f" --eval-data {dev} " in train, train
    assert f" --data {path if data else 'YOUR_TRAIN.tsv'} " in train, train
