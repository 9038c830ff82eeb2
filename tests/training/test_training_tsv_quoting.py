"""TSV files as two kinds of tools write them: GLUE's, whose quotes are text (read with ``csv.QUOTE_NONE``: sentences
hold unbalanced ``"``), and pandas' ``to_csv(sep="\\t")`` / ``csv.writer``, which quote a field holding a tab, a line
break or a quote (``"a ""b"" c"``). Each is read as its writer meant; a file that reads both ways is refused with the
line, never a row merged or a field split."""

from __future__ import annotations

import csv
import shutil

import pytest

from bca_deploy.training import DataError
from bca_deploy.training.data import load_seq_cls, read_records
from training_helpers import SST2, one_thread  # noqa: F401 - one_thread is an autouse fixture

# texts users' tables hold: what pandas has to quote (a quote, a tab, a line break) and what it does not
TEXTS = ['she said "hi" twice', '"Quoted whole"', "a\ttab inside", "two\nlines", 'ends with a quote"',
         '"starts only', "plain, with a comma", "it 's a charming journey . "]

# the bytes pandas 3.1.1 writes for DataFrame({"sentence": TEXTS, "label": [0, 1] * 4}).to_csv(path, sep="\t",
# index=False): written here so the test needs no pandas
PANDAS_TSV = ('sentence\tlabel\n"she said ""hi"" twice"\t0\n"""Quoted whole"""\t1\n"a\ttab inside"\t0\n"two\nlines"\t1\n'
              '"ends with a quote"""\t0\n"""starts only"\t1\nplain, with a comma\t0\nit \'s a charming journey . \t1\n')

# GLUE-style rows (MNLI/RTE sentences): quotes are text, some unbalanced, one a whole sentence in quotes
GLUE_TEXTS = ['"I don\'t know," he said.', '"Hello there."', 'he said "no', 'ok" fine', '"yes"', "no quotes"]


def _csv_writer_tsv(path, rows, quoting=csv.QUOTE_MINIMAL):
    """A TSV written as pandas' to_csv(sep="\\t") writes it: csv.writer, tab-delimited, '\\n' line ends."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=quoting)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def test_pandas_tsv_reads_as_pandas_wrote_it(tmp_path):
    """pandas' TSV (quoted fields) gives back the frame's texts: was 'line 5: 3 fields', and with quotes alone
    (no tab, no line break) the texts kept their doubled quotes silently."""
    path = tmp_path / "pandas.tsv"
    path.write_text(PANDAS_TSV, encoding="utf-8")
    examples = load_seq_cls(path)
    assert examples.texts == [TEXTS] and examples.labels == [0, 1] * 4
    assert examples.lines == [2, 3, 4, 5, 7, 8, 9, 10]  # the line each record starts on ("two\nlines" spans 5-6)
    # quotes only: every line also reads as a row with its quotes as text; read as pandas wrote it
    only_quotes = [(t, i % 2) for i, t in enumerate(TEXTS) if "\t" not in t and "\n" not in t]
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC):
        records, columns, _ = read_records(_csv_writer_tsv(tmp_path / f"q{quoting}.tsv", only_quotes, quoting))
        assert columns == ["sentence", "label"]
        assert [(r["sentence"], int(r["label"])) for r in records] == only_quotes


def test_glue_tsv_quotes_stay_text_and_sst2_is_read_whole(tmp_path):
    """GLUE's quotes are text (as csv.QUOTE_NONE reads them, GLUE's loaders' reading), even a sentence in quotes
    ("Hello there.", which pandas would not quote); SST-2 keeps its 67,349 / 872 rows, byte-equal; a GLUE file whose
    quotes would also read as one field over three lines is refused naming the line (was read silently)."""
    path = tmp_path / "glue.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(GLUE_TEXTS)))
    assert [r["sentence"] for r in read_records(path)[0]] == GLUE_TEXTS
    wrapped = tmp_path / "wrapped.tsv"  # quoted reading whole too: every quoted field holds no quote, so text
    wrapped.write_text('sentence\tlabel\n"Hello there."\t1\n"yes"\t0\nno quotes\t1\n')
    assert [r["sentence"] for r in read_records(wrapped)[0]] == ['"Hello there."', '"yes"', "no quotes"]
    for split, count in (("train", 67_349), ("dev", 872)):
        with open(SST2 / f"{split}.tsv", newline="", encoding="utf-8") as f:
            expected = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        records, _, _ = read_records(SST2 / f"{split}.tsv")
        assert len(records) == count and [[r["sentence"], r["label"]] for r in records] == expected
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[10] = '"' + lines[10]  # line 11 opens a quote, line 13's text closes one before its tab
    text, label = lines[12].rstrip("\n").split("\t")
    lines[12] = f'{text}"\t{label}\n'
    merged = tmp_path / "dev.tsv"
    merged.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(merged)
    message = str(info.value)
    assert f"{merged}: line 11:" in message and "goes on to line 13" in message and "every line is a row" in message
    assert ".csv" in message and "lines=True" in message  # the fix


def test_tsv_quotes_both_ways_in_one_file_are_refused(tmp_path):
    """A field quoted as pandas writes it ("a ""b"" c") beside one that pandas would not quote ("Hello there.") cannot
    be read one way: refused naming both lines and the fix (was read with quotes as text, silently)."""
    path = tmp_path / "mixed.tsv"
    path.write_text('sentence\tlabel\nplain\t0\n"she said ""hi"" twice"\t1\n"Hello there."\t0\n')
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}: its quotes can be read two ways")
    assert "line 3, column 'sentence'" in message and "line 4, column 'sentence'" in message
    assert "df.to_csv(path, index=False)" in message


def test_a_broken_pandas_tsv_names_its_line_as_quoted_fields(tmp_path):
    """A pandas TSV with one quote left open (an edit by hand) is refused at that line as a file of quoted fields,
    not with a problem for every tab and line break inside its other fields (what reading quotes as text gives)."""
    path = tmp_path / "broken.tsv"
    shutil.copyfile(_csv_writer_tsv(tmp_path / "ok.tsv", [(t, 0) for t in TEXTS] * 3), path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + '"an open quote\t1\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert "read with quoted fields" in message and "line 29: malformed TSV" in message and "never closed" in message
    assert "read with quotes as text" in message  # and the other reading, in a line
