"""Parquet data files (as the Hugging Face hub stores data sets) read as the same rows as TSV and JSON lines.

The reference is the data itself: one Python list written with pyarrow, with the csv module and with json, and the
three files read back must give the same records, examples and training run.
"""

from __future__ import annotations

import csv
import json

import pytest

pa = pytest.importorskip("pyarrow")  # the test extra installs it (CI); the reader itself needs it only for .parquet
pq = pytest.importorskip("pyarrow.parquet")

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train  # noqa: E402
from bca_deploy.training import data as data_module  # noqa: E402
from bca_deploy.training.data import load_causal_lm, load_seq_cls, read_records  # noqa: E402
from training_helpers import (  # noqa: E402,F401 - one_thread is an autouse fixture
    config,
    data_and_bert,
    one_thread,
    read_tensors,
    sst2_rows,
)


def _write_all(directory, rows, types=None):
    """``rows`` (dicts with the same keys) as ``.parquet`` (pyarrow, column types ``types`` where given, "dictionary":
    dictionary-encoded strings), ``.tsv`` (csv module, values as ``str`` writes them) and ``.jsonl``; returns the three
    paths."""
    columns, types = list(rows[0]), types or {}
    arrays = {}
    for c in columns:
        kind = types.get(c)
        values = pa.array([r[c] for r in rows], type=None if kind == "dictionary" else kind)
        arrays[c] = values.dictionary_encode() if kind == "dictionary" else values
    table = pa.table(arrays)
    parquet = directory / "d.parquet"
    pq.write_table(table, parquet, row_group_size=2)  # several row groups, read across their boundaries
    tsv = directory / "d.tsv"
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None)
        writer.writerow(columns)
        writer.writerows([_tsv(r[c]) for c in columns] for r in rows)
    jsonl = directory / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return parquet, tsv, jsonl


def _tsv(value):
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _examples(examples):
    return (examples.texts, examples.labels, examples.regression, examples.label_names, examples.text_columns,
            examples.named_labels, len(examples))


SST2_LIKE = [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(sst2_rows("dev", 7))]
#: GLUE's layouts as the hub stores them: SST-2 (sentence, ClassLabel int, idx), MNLI-like pairs with string labels
#: stored as a dictionary (pandas' categorical), STS-B scores as float32 (and float16), booleans.
TABLES = {
    "sst2": (SST2_LIKE, {"label": pa.int64(), "idx": pa.int32()}),
    "pairs-named": ([{"premise": f"a man sleeps {i}", "hypothesis": f"a man is awake {i}",
                      "label": ["entailment", "neutral", "contradiction"][i % 3]} for i in range(7)],
                    {"label": "dictionary"}),
    "stsb": ([{"sentence1": f"a cat {i}", "sentence2": f"the cat {i}", "label": v}
              for i, v in enumerate([3.8, 0.0, 5.0, 2.6, 4.2, 1.75, 3.0])], {"label": pa.float32()}),
    "stsb-float16": ([{"sentence1": f"a cat {i}", "sentence2": f"the cat {i}", "label": v}
                      for i, v in enumerate([3.8, 0.0, 5.0, 2.6, 4.2, 1.75, 3.0])], {"label": pa.float16()}),
    "booleans": ([{"question1": f"q {i}?", "question2": f"r {i}?", "label": bool(i % 2)} for i in range(5)], None),
    "ints-as-int8": ([{"text": f"t {i}", "label": i % 4} for i in range(9)], {"label": pa.int8()}),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_parquet_reads_as_the_same_examples_as_tsv_and_jsonl(tmp_path, name):
    rows, types = TABLES[name]
    parquet, tsv, jsonl = _write_all(tmp_path, rows, types)
    from_parquet = _examples(load_seq_cls(parquet))
    assert from_parquet == _examples(load_seq_cls(tsv)) == _examples(load_seq_cls(jsonl)), name
    columns = list(rows[0])
    records, found, lines = read_records(parquet)
    assert found == columns and lines == list(range(1, len(rows) + 1))
    assert records == [json.loads(line) for line in jsonl.read_text().splitlines()], name


def test_only_the_columns_read_are_decoded(tmp_path, monkeypatch):
    """A file with a big column nobody reads: the reader asks pyarrow for the kept columns alone, a batch at a time."""
    rows = [{"sentence": s, "label": y, "embedding": [0.5] * 64} for s, y in sst2_rows("dev", 20)]
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    asked = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append((kwargs.get("columns"), kwargs.get("batch_size")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    examples = load_seq_cls(path)  # the list column is not read: not refused, not decoded
    assert examples.texts[0] == [s for s, _ in sst2_rows("dev", 20)]
    assert asked == [(["sentence", "label"], data_module._PARQUET_BATCH_ROWS)]


def test_nulls_are_named_by_row_and_column(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"sentence": ["fine", None, "ok", "good"], "label": pa.array([1, 0, None, 1])}), path)
    with pytest.raises(DataError) as caught:
        load_seq_cls(path)
    message = str(caught.value)
    assert str(path) in message
    assert "row 2: no value in column 'sentence'" in message
    assert "row 3: label in column 'label': null is not a label" in message


@pytest.mark.parametrize("column, message", [
    (pa.array([[1, 2], [3]]), "column 'label' has Parquet/Arrow type list<element: int64>"),
    (pa.array([{"a": 1}, {"a": 2}]), "column 'label' has Parquet/Arrow type struct<a: int64>"),
    (pa.array([b"\x00", b"\x01"]), "column 'label' has Parquet/Arrow type binary (binary bytes, not text"),
    (pa.array([1, 2], pa.timestamp("s")), "column 'label' has Parquet/Arrow type timestamp[ms] (a date or time"),
])
def test_a_nested_or_binary_column_that_is_read_is_refused_naming_its_type(tmp_path, column, message):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": column}), path)
    with pytest.raises(DataError, match="columns that cannot be read") as caught:
        load_seq_cls(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": [0, 1], "extra": column}), path)
    assert load_seq_cls(path).labels == [0, 1]  # the same column not read: no refusal


def test_conversations_read_as_from_json_lines(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(3)]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_causal_lm(path).conversations == load_causal_lm(jsonl).conversations == [r["messages"] for r in rows]


def test_a_cell_over_the_field_bound_is_refused_by_row(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 50)
    path = tmp_path / "long.parquet"
    texts = ["short", "x" * 51, "y" * 51]
    pq.write_table(pa.table({"sentence": pa.array(texts).dictionary_encode(), "label": [0, 1, 0]}), path)
    with pytest.raises(DataError, match="malformed Parquet rows") as caught:
        load_seq_cls(path)
    assert "row 2: column 'sentence'" in str(caught.value) and "row 3: column 'sentence'" in str(caught.value)


@pytest.mark.parametrize("encoding", ["DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY"])
def test_delta_encoded_strings_read_as_pyarrow_reads_them(tmp_path, encoding):
    """Parquet v2 writers' string encodings (Spark's, DuckDB's; pyarrow's column_encoding): pyarrow cannot decode them
    into a dictionary, and such a valid file was refused as "truncated or corrupt"."""
    rows = [{"sentence": s, "label": y} for s, y in sst2_rows("dev", 9)]
    for kind in (pa.string(), pa.large_string(), pa.string_view()):
        path = tmp_path / f"delta-{kind}.parquet"
        table = pa.table({"sentence": pa.array([r["sentence"] for r in rows], kind),
                          "label": [r["label"] for r in rows]})
        pq.write_table(table, path, use_dictionary=False, column_encoding={"sentence": encoding}, row_group_size=4)
        assert encoding in pq.ParquetFile(path).metadata.row_group(0).column(0).encodings  # what is tested
        records, columns, _ = read_records(path)
        assert records == pq.read_table(path).to_pylist() == rows and columns == ["sentence", "label"], kind
        assert load_seq_cls(path).texts[0] == [r["sentence"] for r in rows]


@pytest.mark.parametrize("delta", [False, True])
def test_a_string_view_cell_over_the_field_bound_is_refused_by_row(tmp_path, monkeypatch, delta):
    # pyarrow 16+ writes string_view columns and reads them back as such: their cells went unchecked
    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 50)
    path = tmp_path / "long-view.parquet"
    texts = ["short", "x" * 51, "y" * 51]
    encodings = {"use_dictionary": False, "column_encoding": {"sentence": "DELTA_LENGTH_BYTE_ARRAY"}} if delta else {}
    pq.write_table(pa.table({"sentence": pa.array(texts, pa.string_view()), "label": [0, 1, 0]}), path, **encodings)
    assert pa.types.is_string_view(pq.ParquetFile(path).schema_arrow.field("sentence").type)
    with pytest.raises(DataError, match="malformed Parquet rows") as caught:
        load_seq_cls(path)
    assert "row 2: column 'sentence'" in str(caught.value) and "row 3: column 'sentence'" in str(caught.value)


def test_rows_that_decode_to_far_more_than_the_file_are_refused(tmp_path, monkeypatch):
    """200,000 equal rows compress to a few kB (run-length and dictionary encoding): bounded by the file's size."""
    monkeypatch.setattr(data_module, "_PARQUET_FREE_BYTES", 0)
    path = tmp_path / "repeats.parquet"
    n = 200_000
    pq.write_table(pa.table({"sentence": pa.array(["the same sentence, again and again"] * n).dictionary_encode(),
                             "label": pa.array([1] * n, pa.int8())}), path)
    with pytest.raises(DataError, match="more than 100 times the file's size") as caught:
        load_seq_cls(path)
    assert str(path) in str(caught.value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_and_bert(tmp_path_factory.mktemp("parquet-train"), 256)


def _as_parquet(tsv, parquet):
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    pq.write_table(pa.table({"sentence": [s for s, _ in rows], "label": pa.array([int(y) for _, y in rows], pa.int64()),
                             "idx": list(range(len(rows)))}), parquet, row_group_size=16)
    return parquet


def test_a_run_on_parquet_trains_and_evaluates_as_on_the_same_tsv(files, tmp_path):
    data = _as_parquet(files["small"], tmp_path / "train.parquet")
    held = _as_parquet(files["dev"], tmp_path / "dev.parquet")
    by_parquet = train(config(files["bert"], data, tmp_path / "pq", max_steps=3, eval_data=held))
    by_tsv = train(config(files["bert"], files["small"], tmp_path / "tsv", max_steps=3, eval_data=files["dev"]))
    a, b = read_tensors(by_parquet.out_dir / "last"), read_tensors(by_tsv.out_dir / "last")
    assert a.keys() == b.keys() and a
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()]
    scored = [evaluate(EvaluateConfig(model=files["bert"], adapter=run.out_dir, data=d, device="cpu"))
              for run, d in ((by_parquet, held), (by_tsv, files["dev"]))]
    assert scored[0] == scored[1] and "accuracy" in scored[0], scored
