"""Malformed training data files through train's data reader: a DataError with a message, never a traceback.

Bytes that are not UTF-8, a byte-order mark (accepted), broken and deeply nested JSON lines, lone
surrogates, empty and binary files, a directory. (Labels against the head and the bound on the number of
classes are checked when training starts: tests/training.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import assert_bca_error, count, figures_fixture  # noqa: E402

from bca_deploy.training.data import load_seq_cls, read_records  # noqa: E402

figures = figures_fixture("test_data_inputs.py")

GOOD_TSV = "sentence\tlabel\nit was great\t1\nit was awful\t0\n"

# file name -> (content, needle in the message)
BAD: dict[str, tuple[bytes, str]] = {
    "latin1.tsv": ("sentence\tlabel\ncaf\xe9 au lait\t1\n".encode("latin-1"), "UTF-8"),
    "latin1.jsonl": ('{"sentence": "caf\xe9", "label": 1}\n'.encode("latin-1"), "UTF-8"),
    "utf16.csv": ("sentence,label\nhello,1\n".encode("utf-16"), "UTF-8"),
    "binary.tsv": (bytes(range(256)) * 8, "UTF-8"),
    "nested.jsonl": (b'{"sentence": ' + b"[" * 100_000 + b"]" * 100_000 + b', "label": 1}\n', "line 1"),
    "broken.jsonl": (b'{"sentence": "x", "label": 1}\n{"sentence": \n', "line 2"),
    "not-objects.jsonl": (b"[1, 2]\n3\n", "line 1"),
    # int() would read "1_0" as class 10 and "١" (Arabic-Indic one) as 1: they are names, and names mixed with numbers
    "underscore-label.tsv": (b"sentence\tlabel\nx\t1_0\ny\t0\n", "mixes class names with numbers"),
    "other-script-digit.tsv": ("sentence\tlabel\nx\t\u0661\ny\t0\n".encode(), "mixes class names with numbers"),
    "huge-integer.jsonl": (b'{"sentence": "x", "label": 1, "id": ' + b"1" * 4_400 + b"}\n", "line 1"),
    "lone-surrogate.jsonl": (b'{"sentence": "bad \\ud800 text", "label": 1}\n', "line 1"),
    "empty.tsv": (b"", "empty"),
    "header-only.tsv": (b"sentence\tlabel\n", "no examples"),
    "ragged.tsv": (b"sentence\tlabel\nx\t1\textra\n", "line 2"),
    "no-label-column.tsv": (b"sentence\tscore\nx\t1\n", "label"),
    # a NUL in a text was trained on (BERT's tokenizer drops it); UTF-16 without a byte-order mark is valid UTF-8 with
    # a NUL after each letter, and was refused as "line 3: 1 fields, the header has 2"
    "nul-in-text.csv": (b"sentence,label\nhello\x00world,1\nok,0\n", "line 2: column 'sentence' holds a NUL"),
    "nul-escaped.jsonl": (b'{"sentence": "a\\u0000b", "label": 1}\n', "line 1: column 'sentence' holds a NUL"),
    "utf16-no-bom.csv": ("sentence,label\nhello,1\n".encode("utf-16-le"), "line 1: the header holds NUL characters"),
    # 'nan'/'inf' as pandas and Python write a broken target were class names: mixed with numbers, the real targets
    # were blamed when the broken ones were the most
    "nan-targets.tsv": (b"sentence\tlabel\na\t0.5\nb\tnan\nc\tinf\nd\t-Infinity\n",
                        "line 3: label in column 'label': 'nan' is not a finite number"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_data_file_refused(tmp_path, name):
    content, needle = BAD[name]
    path = tmp_path / name
    path.write_bytes(content)
    error = assert_bca_error(lambda: load_seq_cls(path), f"load_seq_cls({name})")
    assert str(path) in str(error) and needle.lower() in str(error).lower(), (name, str(error))
    assert path.read_bytes() == content
    count("train data reader")


def test_directory_and_missing_file_refused(tmp_path):
    for path in (tmp_path, tmp_path / "missing.tsv"):
        assert_bca_error(lambda: read_records(path), f"read_records({path})")
        count("train data reader")


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_TSV.encode())
    examples = load_seq_cls(path)
    assert list(examples.labels) == [1, 0]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"sentence": s, "label": y})
                                                for s, y in (("good", 1), ("bad", 0))).encode())
    assert list(load_seq_cls(jsonl).labels) == [1, 0]


def test_a_named_pipe_put_in_place_of_a_data_file_after_the_look_is_refused_not_waited_on(tmp_path):
    """read_records looks at the path (a regular file?) and its reader then opens it again: a named pipe put there in
    between blocked train and evaluate for ever, in every format. The swap is simulated by a first look that says "a
    file"; each reader must then refuse the pipe, in a bounded time."""
    pipes = []
    for suffix in (".tsv", ".csv", ".jsonl", ".json", ".parquet"):
        pipes.append(tmp_path / f"data{suffix}")
        os.mkfifo(pipes[-1])
    code = (
        "import pathlib, sys\n"
        "pipes = sys.argv[1:]\n"
        "looked = pathlib.Path.is_file\n"
        "pathlib.Path.is_file = lambda self: True if str(self) in pipes else looked(self)\n"
        "from bca_deploy.training.data import read_records\n"
        "from bca_deploy.errors import BCAError\n"
        "for pipe in pipes:\n"
        "    try:\n"
        "        read_records(pathlib.Path(pipe))\n"
        "    except BCAError as exc:\n"
        "        print('refused:', exc, flush=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, *map(str, pipes)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    for pipe in pipes:
        assert f"refused: {pipe}: cannot read the file (a named pipe (FIFO), not a regular file)" in run.stdout, \
            (pipe, run.stdout)
    count("train data reader")
