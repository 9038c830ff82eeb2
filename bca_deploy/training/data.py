"""Data files for training and evaluation: read, check, tokenize, batch.

Formats, chosen by extension:

- ``.tsv`` / ``.tab``: tab-separated with a header row; quotes are text, as in GLUE's files, unless the file is
  quoted as ``pandas.DataFrame.to_csv(sep="\\t")`` writes it (``"a ""b"" c"``; see :func:`_tsv_reading`);
- ``.csv``: comma-separated with a header row, standard CSV quoting;
- ``.jsonl`` / ``.ndjson`` / ``.json``: one JSON object per line; a ``.json`` file may instead hold one
  array of objects (``[{...}, {...}]``, as ``pandas.DataFrame.to_json(orient="records")`` writes);
- ``.parquet``: one Parquet file (as the Hugging Face hub stores data sets: ``glue/sst2/train-00000-of-00001.parquet``),
  read with pyarrow (``pip install "bca-deploy[parquet]"``), only the columns used, a row group at a time
  (:func:`_read_parquet`). Its rows are numbered from 1 in messages (``row 5``).

Text files are UTF-8, with or without a byte-order mark; other bytes are refused with the line they are on.

Tasks:

- ``seq-cls``: one text column (or two, for sentence pairs) and a label column. Integer labels are
  classes ``0..K-1``; booleans are classes false=0, true=1; string labels are class names (ids in sorted order
  unless names are given); numbers written as decimals (STS-B's ``3.800``, and ``4.0``: pandas and JSON write a float
  column so) mean regression (one output, MSE loss), as HF's ``run_glue`` takes a float column for regression
  (:func:`decide_regression`).
- ``causal-lm``: ``prompt`` + ``response`` (or ``completion``) columns (loss on the response tokens only, an EOS
  token is appended), else a ``messages`` column (a conversation: a list of ``{"role", "content"}`` objects as the
  chat route takes them, read by its rules in :mod:`bca_deploy.serving.tools`, rendered with the tokenizer's chat
  template, loss on the assistant turns only), else Alpaca's ``instruction`` + ``input`` +
  ``output`` (:data:`ALPACA_PROMPT`, loss on the output), else one ``text`` column (loss on every token).

Every reader collects all problems (missing columns with the columns found, unparsable labels with
their line numbers, an empty file) and raises one :class:`~bca_deploy.training.errors.DataError`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
from array import array as typed_array
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import torch

from ..config import MAX_NUM_LABELS, DuplicateKeyError, parse_json_value, text_pair_mismatch, unique_key_object
from ..errors import AdapterFormatError, first_line, format_problems, open_regular
from ..models import token_names
from ..models import tokenizer_pad_id as pad_token_id
# the chat rules serve and training share (serving.tools imports no pydantic, no onnxruntime)
from ..serving.tools import (CHAT_ROLES, MAX_TOOLS_BYTES, content_text, lone_surrogate_problem, message_tool_problems,
                             parsers_reading, template_message, tool_calls_problems, tools_problems,
                             unanswered_tool_message)
from .errors import DataError, DataFileNotFoundError
from .loading import quiet_loading

__all__ = [
    "TASKS",
    "TEXT_COLUMN_CANDIDATES",
    "IGNORE_INDEX",
    "read_records",
    "SeqClsExamples",
    "LMExamples",
    "load_seq_cls",
    "load_causal_lm",
    "seen_in_training",
    "causal_lm_fields",
    "CHAT_ROLES",
    "check_label_range",
    "classes_needed",
    "TokenizedDataset",
    "tokenize_seq_cls",
    "tokenize_causal_lm",
    "load_dataset",
]

TASKS = ("seq-cls", "causal-lm")
# Text columns looked for, in order, when ``text_columns`` is not given (GLUE/SuperGLUE names).
# Pairs first: GLUE's QNLI file has ``question`` and ``sentence``, and reading ``sentence`` alone would drop
# half of every example without a word.
TEXT_COLUMN_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "passage"),
    ("#1 String", "#2 String"),  # MRPC as GLUE distributes it (its label column is Quality)
    ("sentence",),
    ("text",),
)
#: Columns that often hold the labels (or the text) in data sets as distributed and in exports (MNLI/SNLI
#: ``gold_label``, QQP ``is_duplicate``, MRPC ``Quality``, STS-B ``score``, the HF Trainer's ``labels``, ...). A file
#: without the label column (or any text column the reader looks for) is refused naming the one it has, with the
#: option: named, never picked, as a column called ``score`` or ``input`` may hold something else.
LABEL_COLUMN_HINTS = ("labels", "gold_label", "is_duplicate", "Quality", "score", "target", "class", "category",
                      "sentiment", "label_text", "y")
TEXT_COLUMN_HINTS = ("content", "review", "document", "tweet", "comment", "body", "input", "query", "utterance",
                     "text_a", "sentences")
#: Columns that number the rows (pandas' unnamed index, GLUE's ``index``, ``datasets``' ``idx``): never a text.
_ROW_NUMBER_COLUMNS = ("", "unnamed: 0", "index", "idx", "id", "__index_level_0__")
IGNORE_INDEX = -100  # label id that the loss skips (prompt tokens, padding)
_EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".parquet": "parquet"}
#: The data files' extensions, for messages: every one :data:`_EXTENSIONS` reads (a .json file was not named).
_FORMATS = ".tsv (.tab), .csv, .jsonl (.ndjson, .json) or .parquet"


# ---- reading ------------------------------------------------------------------------------------


def _not_a_file(path: Path) -> str:
    """Why ``path`` is not a readable regular file, in words (for the data-file refusal)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
        return "data file not found" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "a directory, not a data file"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
        else "a socket" if stat.S_ISSOCK(mode) else "something"
    return f"{kind}, not a regular file"


def read_records(path: str | Path, keep: Collection[str] | None = None, nested: Collection[str] = (),
                 ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """Read a TSV/CSV/JSONL file (UTF-8, with or without a byte-order mark) or a Parquet file.

    Args:
        path: the file.
        keep: the columns a caller reads (None: all): each record holds only those of them the row has. Every row
            is still checked whole (its field count, its quoting); the other columns are just not kept (a 48 MB file
            of 120,000 columns peaked at 972 MB with every field of every row in a dict, 240 MB without). A Parquet
            file's other columns are not read at all.
        nested: the kept columns that may hold lists of objects (a ``messages`` column of conversations). A kept
            Parquet column of any other type than numbers, booleans and strings is refused naming its type (a JSON
            value's type is checked per row, by the rules that read it).

    Returns:
        ``(records, columns, line_numbers)``: one dict per row, the column names (the header, or the
        union of JSON keys in first-seen order: every column, kept or not), and the 1-based line of each record in
        the file (for a Parquet file, its 1-based row, as :class:`_Row`).

    Raises:
        DataFileNotFoundError: ``path`` does not exist (or is a folder of Parquet files).
        DataError: unknown extension, bytes that are not UTF-8 (the message gives the line and byte), a row
            with the wrong number of fields, a line that is not a JSON object or is nested too deeply.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir() and (shards := _parquet_shards(path)):
            raise DataFileNotFoundError(_refuse_parquet_folder(path, shards))
        raise DataFileNotFoundError(f"{path}: {_not_a_file(path)}; the data files read are {_FORMATS}")
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use {_FORMATS} "
            "(a header row for TSV/CSV, one JSON object per line for JSONL)"
        )
    try:
        if kind == "parquet":
            return _read_parquet(path, keep, nested)
        if kind == "jsonl":
            if path.suffix.lower() == ".json":
                return _read_json(path, keep)
            return _read_jsonl(path, keep)
        return _read_delimited(path, kind, keep)
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _open_text(path: Path, newline: str | None = None) -> TextIO:
    """``path`` open as UTF-8 text (a byte-order mark skipped) once it is known to be a regular file
    (:func:`~bca_deploy.errors.open_regular`): :func:`read_records` looks at the path first, and a named pipe put
    there since was opened and waited on for ever (a device read on and on)."""
    return io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline=newline)


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is: found by decoding the file line by line."""
    try:
        with open_regular(path) as f:
            for number, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = raw[exc.start]
                    return (f"{path}: line {number} is not UTF-8 text (byte 0x{byte:02x} at column {exc.start + 1}); "
                            "save the file as UTF-8")
    except OSError as exc:  # replaced since it was read
        return f"{path}: the file is not UTF-8 text ({exc.strerror or exc} when read again); save it as UTF-8"
    return f"{path}: the file is not UTF-8 text; save it as UTF-8"


def _kept(record: dict[str, Any], keep: Collection[str] | None) -> dict[str, Any]:
    """``record`` with only the keys in ``keep`` (all for None)."""
    return record if keep is None else {k: record[k] for k in keep if k in record}


@dataclass
class _Reading:
    """One reading of a TSV/CSV file: its records (the kept columns), header, record lines and row problems."""

    records: list[dict[str, str]]
    columns: list[str]
    lines: list[int]
    problems: list[str]
    quote_opens: bool = False  # some field (header included) starts with '"': a quoted field, or text that does


#: How a TSV file's quotes were read, for messages: as text (``csv.QUOTE_NONE``, GLUE's files) or as quoting (what
#: ``csv.writer`` and ``pandas.DataFrame.to_csv(sep="\t")`` write around a field holding a tab, a line break or a quote).
_AS_TEXT = "quotes as text (as GLUE's TSVs hold them)"
_AS_QUOTING = "quoted fields (as pandas' to_csv(sep='\\t') and csv.writer write them)"
#: What to save a table as when its TSV quotes cannot be told apart.
_SAVE_UNAMBIGUOUS = ("save it as .csv (pandas: df.to_csv(path, index=False)) or as JSON lines (df.to_json(path, "
                     "orient='records', lines=True)), whose quoting is not in doubt")


def _read_delimited(path: Path, kind: str, keep: Collection[str] | None = None,
                    ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """A TSV/CSV file's records. A CSV file is read with standard quoting. A TSV file is read as GLUE's are, its quotes
    text (``csv.QUOTE_NONE``: GLUE's sentences hold unbalanced ``"``), unless a field starts with a quote: then it is
    also read with quoting, as ``pandas.DataFrame.to_csv(sep="\\t")`` writes a field holding a tab, a line break or a
    quote (``"a ""b"" c"``), and :func:`_tsv_reading` picks the reading the file is written for (read as text, such a
    file's texts kept their doubled quotes, silently, and a field holding a tab or a line break broke its row)."""
    csv.field_size_limit(MAX_FIELD_CHARS)
    if kind == "csv":
        reading = _read_rows(path, kind, keep, quoted=True)
    else:
        reading = _read_rows(path, kind, keep, quoted=False)
        if reading.quote_opens:
            try:
                quoted = _read_rows(path, kind, keep, quoted=True)
            except DataError as exc:  # its header read with quotes as text: not a file of quoted fields
                quoted = _Reading([], [], [], [str(exc).removeprefix(f"{path}: ")])
            reading = _tsv_reading(path, reading, quoted)
    if reading.problems:
        raise DataError(format_problems(f"{path}: malformed {kind.upper()} rows:", reading.problems, limit=10))
    return reading.records, reading.columns, reading.lines


def _tsv_reading(path: Path, as_text: _Reading, quoted: _Reading) -> _Reading:
    """The reading of a TSV file with a field that starts with a quote: quotes as text (``as_text``) or as quoting
    (``quoted``).

    The one whose rows are whole is taken (a field holding a tab or a line break breaks the rows read as text; a quote
    in GLUE's text, ``"I know," he said``, is no quoted field). When both are whole and differ, the fields that differ
    decide: a quoted field holding a quote (``"a ""b"" c"``) is what pandas writes, and pandas quotes no field that
    holds none, so a field wrapped in quotes with no quote inside (``"Hello there."``) is text, as GLUE's files
    hold it. A file with both kinds, or whose rows differ in number, is refused naming a line of each: never a row
    merged or a field split silently.
    """
    if bool(as_text.problems) != bool(quoted.problems):
        return quoted if as_text.problems else as_text
    if as_text.problems:  # neither reads: the problems of the reading with fewer, and a word on the other
        best, other = (quoted, as_text) if len(quoted.problems) < len(as_text.problems) else (as_text, quoted)
        how = _AS_QUOTING if best is quoted else _AS_TEXT
        other_how = _AS_TEXT if best is quoted else _AS_QUOTING
        best.problems = [f"read with {how}: {best.problems[0]}", *best.problems[1:],
                         f"read with {other_how} instead: {len(other.problems)}"
                         f"{'+' if len(other.problems) > 10 else ''} problem(s), the first {other.problems[0]}"]
        return best
    if as_text.columns != quoted.columns:
        # a quoted header ("sentence"\t"label"): csv.QUOTE_ALL / QUOTE_NONNUMERIC (a column name holds no quotes)
        return quoted
    if as_text.lines != quoted.lines:
        # a quoted field over several lines whose lines also read as rows of their own
        i = next((i for i, (a, b) in enumerate(zip(as_text.lines, quoted.lines)) if a != b),
                 min(len(as_text.lines), len(quoted.lines)))
        opens = quoted.lines[i - 1] if i else as_text.lines[0]  # the record read as quoting over several lines
        ends = f"line {quoted.lines[i] - 1}" if i < len(quoted.lines) else "the end of the file"
        raise DataError(f"{path}: line {opens}: its quotes can be read two ways: as quoted fields (as pandas writes a "
                        f"field holding a line break), a field that opens with a quote there goes on to {ends}; with "
                        f"quotes as text (as GLUE's TSVs hold them), every line is a row ({len(as_text.lines):,} rows "
                        f"against {len(quoted.lines):,}); {_SAVE_UNAMBIGUOUS}")
    escaped = wrapped = None  # the first field that differs only as pandas writes it / only by quotes around it
    for line, text_row, quoted_row in zip(as_text.lines, as_text.records, quoted.records):
        for column, value in quoted_row.items():
            if value != text_row.get(column):
                if '"' in value:
                    escaped = escaped or (line, column, text_row.get(column))
                else:
                    wrapped = wrapped or (line, column, text_row.get(column))
        if escaped and wrapped:
            (a, column_a, raw_a), (b, column_b, raw_b) = escaped, wrapped
            raise DataError(f"{path}: its quotes can be read two ways: line {a}, column {column_a!r} holds "
                            f"{_cut(raw_a)}, a quote escaped as pandas writes it (read: a quoted field), and line {b}, "
                            f"column {column_b!r} holds {_cut(raw_b)}, a text in quotes with none inside, which "
                            f"pandas would not quote (read: quotes as text, as GLUE's TSVs hold them); "
                            f"{_SAVE_UNAMBIGUOUS}")
    return quoted if escaped else as_text


def _cut(text: str, limit: int = 60) -> str:
    """``repr`` of a field for a message, cut at ``limit`` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}..."


class _LineTooLong(Exception):
    """A physical line of a TSV/CSV file over :data:`MAX_FIELD_CHARS` (raised through ``csv.reader``)."""


def _bounded_lines(f: TextIO) -> Iterator[str]:
    """The lines of ``f`` for ``csv.reader``, each read to :data:`MAX_FIELD_CHARS` characters at most (a longer one
    raises :class:`_LineTooLong`, its rest unread): csv splits a whole line into its fields before any bound is
    looked at, and a 200 MB line of tabs (200 million empty fields, read as a blank row) took 62 s and 2 GB. No row
    of a JSON lines file may be longer either."""
    while line := f.readline(MAX_FIELD_CHARS + 1):
        if len(line) > MAX_FIELD_CHARS:
            raise _LineTooLong
        yield line


def _read_rows(path: Path, kind: str, keep: Collection[str] | None, quoted: bool) -> _Reading:
    """Read ``path`` with standard quoting (``quoted``) or with quotes as text, collecting row problems; a bad
    header raises."""
    problems: list[str] = []
    records, lines = [], []
    quote_opens = False
    # utf-8-sig: a byte-order mark (as some editors write) is not part of the first column's name
    example = "sentence\tlabel" if kind == "tsv" else "sentence,label"  # a header, for messages
    with _open_text(path, newline="") as f:
        # bounded before csv reads it: a file with no line break (a sparse file of zeros) was read whole as one column
        # name and put into the messages (a 300 MB file peaked at 5.6 GB before its refusal)
        if len(f.readline(MAX_HEADER_CHARS + 2).rstrip("\r\n")) > MAX_HEADER_CHARS:
            raise DataError(f"{path}: the first line is not a header of column names (over {MAX_HEADER_CHARS:,} "
                            f"characters); expected a first line such as {example!r}")
        f.seek(0)
        delimiter = "\t" if kind == "tsv" else ","
        if quoted:
            # strict: text after a closing quote is an error, not glued on (a stray opening quote used to swallow the
            # next line into this record, with the next record's label, and leave a row fewer without a word)
            reader = csv.reader(_bounded_lines(f), delimiter=delimiter, strict=True)
        else:
            reader = csv.reader(_bounded_lines(f), delimiter=delimiter, quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header row and examples)") from None
        except _LineTooLong:  # a quote opened in the header swallowed the lines after it
            raise DataError(f"{path}: the first record is not a header of column names (a line over "
                            f"{MAX_FIELD_CHARS:,} characters); expected a first line such as {example!r}") from None
        except csv.Error as exc:
            raise DataError(f"{path}: line 1: malformed header ({exc})") from None
        columns = [c.strip() for c in header]
        quote_opens = any(c.startswith('"') for c in header)
        if any("\x00" in c for c in columns):  # UTF-16 without a byte-order mark reads as UTF-8 with a NUL a letter
            raise DataError(f"{path}: line 1: the header holds NUL characters (text has none: is the file UTF-16 or "
                            f"binary? save it as UTF-8 text); expected a first line such as {example!r}")
        header_chars = sum(map(len, columns))
        if header_chars > MAX_HEADER_CHARS:
            # a CSV header whose quote is never closed swallows the lines after it into one column name (a quoted
            # line break in a header, as spreadsheets write, is a header of a few characters over two lines)
            spans = (f" over {reader.line_num:,} lines (a quote opened in it is never closed)"
                     if reader.line_num > 1 else "")
            raise DataError(f"{path}: the first record is not a header of column names ({header_chars:,} "
                            f"characters{spans}; a header has at most {MAX_HEADER_CHARS:,}); expected a first line "
                            f"such as {example!r}")
        counts = collections.Counter(columns)  # (columns.count per column took 15 s for 40,000 columns)
        repeated = sorted(c for c, n in counts.items() if n > 1)
        if repeated:
            raise DataError(f"{path}: the header names column(s) {', '.join(_short(c) for c in repeated[:10])} "
                            "more than once")
        # the fields kept of each row, by position (names are unique: checked above); a row of every column in a
        # dict was 4 s of 5 for a 120,000-column file, and most of its 972 MB
        where = range(len(columns)) if keep is None else [i for i, c in enumerate(columns) if c in keep]
        if len(where) == len(columns):
            def pick(row: list[str]) -> dict[str, str]:
                return dict(zip(columns, row))
        else:
            kept = [(columns[i], i) for i in where]

            def pick(row: list[str]) -> dict[str, str]:
                return {c: row[i] for c, i in kept}
        while True:
            start = reader.line_num + 1  # the line this record starts on (a quoted field may span several)
            try:
                row = next(reader)
            except StopIteration:
                break
            except _LineTooLong:  # its rest would come back as more broken rows: stop here, as for a field
                problems.append(f"line {reader.line_num + 1}: {_TOO_LONG}")
                break
            except csv.Error as exc:
                if "field limit" in str(exc):  # the rest of that line would come back as more broken rows: stop here
                    problems.append(f"line {start}: {_TOO_LONG}")
                    break
                # (end of data: a quote opened on the file's last line is never closed either)
                spans = f"; a quote opened on line {start} is never closed" if "end of data" in str(exc) else (
                    "" if reader.line_num <= start else f"; a quote opened on line {start} closes on line "
                    f"{reader.line_num}")
                problems.append(f"line {start}: malformed {kind.upper()} ({exc}{spans})")
                if len(problems) > 10:
                    break
                continue
            line = start
            if not quoted and not quote_opens:
                quote_opens = any(field.startswith('"') for field in row)
            if not any(field.strip() for field in row):
                # a blank line, or a row of empty fields (',,' / tabs: a spreadsheet's saved empty rows): no data
                continue
            if len(row) != len(columns):
                spans = f" (a record of lines {start}-{reader.line_num}: a quote opened on line {start} is closed " \
                    "further down, or never)" if reader.line_num > start else ""
                problems.append(f"line {start}: {len(row)} fields, the header has {len(columns)}{spans}")
                continue
            records.append(pick(row))
            lines.append(line)
    return _Reading(records, columns, lines, problems, quote_opens)


def _json_problem(exc: ValueError | RecursionError, line: int) -> str:
    """What a JSON parsing error ``exc`` on ``line`` of a data file is, as its message says it."""
    if isinstance(exc, DuplicateKeyError):
        return f"{_at(line)}: key {exc.key!r} appears more than once (which one is meant?)"
    if isinstance(exc, json.JSONDecodeError):
        return f"{_at(line)}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return f"{_at(line)}: JSON nested too deeply"
    # e.g. an integer of more than 4,300 digits (Python's conversion limit)
    return f"{_at(line)}: a value JSON cannot hold here ({str(exc).split(';')[0][:120]})"


def _read_jsonl(path: Path, keep: Collection[str] | None = None,
                ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """One JSON object per line of ``path`` (each with only the keys in ``keep``, when given)."""
    problems: list[str] = []
    records, lines, columns = [], [], {}
    with _open_text(path) as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_FIELD_CHARS + 1), ""), start=1):
            if len(raw) > MAX_FIELD_CHARS:  # read in bounded pieces: one 300 MB line took 1 GB to refuse
                problems.append(f"line {number}: {_TOO_LONG}")
                while raw and not raw.endswith("\n"):  # the rest of it, a piece at a time
                    raw = f.readline(MAX_FIELD_CHARS + 1)
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw, object_pairs_hook=unique_key_object)
            except (ValueError, RecursionError) as exc:
                problems.append(_json_problem(exc, number))
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {number}: expected a JSON object, got {_json_type(obj)}")
                continue
            if not records:
                first = obj
            records.append(_kept(obj, keep))
            lines.append(number)
            columns.update(dict.fromkeys(obj))
    if problems:
        raise DataError(format_problems(f"{path}: malformed JSON lines:", problems, limit=10))
    if len(records) == 1:
        _refuse_a_table_in_one_object(path, first, lines[0])
    if not records:  # as for TSV and CSV: not "no text column" with no columns found
        raise DataError(f"{path}: the file is empty (expected one JSON object per line, e.g. "
                        '{"sentence": "a fine film", "label": 1})')
    return records, list(columns), lines


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json(path: Path, keep: Collection[str] | None = None,
               ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """A ``.json`` file: one array of objects (its first character a ``[``), else one object per line.

    Each record's line number is where its object starts. A file holding a single object over several lines
    (pretty-printed) is refused in one line saying which layouts are read, not with a problem per line.
    """
    if _first_json_character(path) == "[":  # an array is parsed whole
        with _open_text(path) as f:
            text = f.read()
        return _read_json_array(path, text, _JSON_SPACE.match(text).end(), keep)
    try:
        # read line by line, as a .jsonl file: a .json file read whole first took 2.8 GB and 39 s to refuse a
        # 500 MB line that the same file named .jsonl is refused for in 2 s and 0.3 GB
        return _read_jsonl(path, keep)
    except DataError:
        if path.stat().st_size > MAX_FIELD_CHARS:  # too large to read whole for a better message
            raise
        with _open_text(path) as f:
            text = f.read()
        start = _JSON_SPACE.match(text).end()
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict) and text.count("\n", start, len(text.rstrip())) > 0:
            _refuse_a_table_in_one_object(path, whole, 1 + text.count("\n", 0, start))
            lists = [k for k, v in whole.items() if isinstance(v, list)]
            where = f" (its key {lists[0]!r} holds a list: save that list as the file)" if len(lists) == 1 else ""
            raise DataError(f"{path}: one JSON object spread over several lines{where}; expected one example "
                            "object per line (JSON Lines) or a JSON array of example objects "
                            '([{"sentence": ..., "label": ...}, ...])') from None
        raise


#: How pandas and ``datasets`` write one example per line (what the JSON readers read), for the refusals below.
_ONE_PER_LINE = ("df.to_json(path, orient=\"records\", lines=True) (pandas) and Dataset.to_json(path) (datasets) "
                 "write them")


def _refuse_a_table_in_one_object(path: Path, obj: dict[str, Any], line: int) -> None:
    """Refuse a file whose only JSON object holds a whole table in one of pandas' other ``to_json`` layouts.

    Read as one record, ``DataFrame.to_json(path)`` (orient ``columns``, pandas' default) was refused as "line 1:
    column 'sentence' holds an object", and orient ``split``/``table`` as a file without the text column. No example
    has these shapes (a text is a string, a conversation a list): the layout is named with the call that writes the
    lines the reader reads. Rows are not guessed out of them: ``columns`` and ``index`` differ only in which keys are
    rows.

    Raises:
        DataError: ``obj`` is such a table.
    """
    keys = set(obj)
    layout = None
    if keys in ({"columns", "data"}, {"columns", "index", "data"}) and isinstance(obj.get("data"), list):
        layout = "pandas' to_json(orient=\"split\")"
    elif keys == {"schema", "data"} and isinstance(obj.get("schema"), dict) and isinstance(obj.get("data"), list):
        layout = "pandas' to_json(orient=\"table\")"
    elif obj and all(isinstance(v, dict) for v in obj.values()):
        layout = ("pandas' DataFrame.to_json(path) with its default orient=\"columns\" (an object per column, keyed "
                  "by row), or orient=\"index\" (an object per row, keyed by its index)")
    if layout is not None:
        raise DataError(f"{path}: line {line}: one JSON object holding the whole table, as {layout} writes it; expected "
                        f"one example object per line (JSON Lines) or a JSON array of example objects: {_ONE_PER_LINE}")


def _first_json_character(path: Path) -> str:
    """The first character of ``path`` past JSON whitespace ('' for none), read a piece at a time."""
    with _open_text(path) as f:
        while piece := f.read(1 << 16):
            text = piece.lstrip(" \t\n\r")
            if text:
                return text[0]
    return ""


def _read_json_array(path: Path, text: str, start: int, keep: Collection[str] | None = None,
                     ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """The objects of the JSON array that starts at ``text[start]``, each with the line its object starts on."""
    decoder = json.JSONDecoder(object_pairs_hook=unique_key_object)
    problems: list[str] = []
    records, lines, columns = [], [], {}
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _JSON_SPACE.match(text, start + 1).end()
    if text.startswith("]", pos):
        raise DataError(f"{path}: the JSON array is empty (expected an array of example objects)")
    else:
        while True:
            number = line_at(pos)
            try:
                obj, end = decoder.raw_decode(text, pos)
            except DuplicateKeyError as exc:  # a problem of this record alone: the array goes on after it
                problems.append(_json_problem(exc, number))
                try:
                    obj, end = json.JSONDecoder().raw_decode(text, pos)
                except (ValueError, RecursionError):
                    break
                obj = None
            except (ValueError, RecursionError) as exc:  # the rest of the array cannot be found
                problems.append(_json_problem(exc, exc.lineno if isinstance(exc, json.JSONDecodeError) else number))
                break
            if obj is not None:
                if isinstance(obj, dict):
                    records.append(_kept(obj, keep))
                    lines.append(number)
                    columns.update(dict.fromkeys(obj))
                else:
                    problems.append(f"line {number}: expected a JSON object in the array, got {_json_type(obj)}")
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
                break
            problems.append(f"line {line_at(pos)}: expected ',' or ']' after an array item"
                            + (" (the array is not closed)" if pos >= len(text) else ""))
            break
    if not problems and pos < len(text):
        problems.append(f"line {line_at(pos)}: more data after the array ends (expected one array of objects)")
    if problems:
        raise DataError(format_problems(f"{path}: malformed JSON array:", problems, limit=10))
    if len(set(lines)) < len(lines):  # items share lines (pandas' to_json(orient="records") writes one line)
        lines = [_LineItem(number, item) for item, number in enumerate(lines, 1)]
    return records, list(columns), lines


class _LineItem(int):
    """A record's line, for messages, with its place in a JSON array whose items share lines: ``line 1 (item 5)``, not
    "line 1" for every record of an array written on one line (pandas' ``to_json(orient="records")``). An int
    everywhere else (sorting, JSON)."""

    item: int

    def __new__(cls, line: int, item: int) -> _LineItem:
        value = super().__new__(cls, line)
        value.item = item
        return value

    def __str__(self) -> str:
        return f"{int(self)} (item {self.item})"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)


def _json_type(value: Any) -> str:
    """The JSON name of a value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


# ---- Parquet ------------------------------------------------------------------------------------

_PARQUET_MAGIC = b"PAR1"
_PARQUET_INSTALL = 'pip install "bca-deploy[parquet]"'
#: The largest Parquet footer (schema and row-group metadata) read: a footer is KBs for a data set of a few columns
#: (SST-2's train split written by pyarrow: 802 bytes); a corrupt or hostile length field claiming gigabytes is
#: refused before a byte of it is read (the TSV header has its bound too: :data:`MAX_HEADER_CHARS`).
MAX_PARQUET_FOOTER_BYTES = 64 * 1024 * 1024
#: Rows decoded from a Parquet file per batch: what one batch holds in memory beyond the records (its cells are checked
#: against :data:`MAX_FIELD_CHARS`, as a CSV field is, before they become Python strings).
_PARQUET_BATCH_ROWS = 1024
#: How much more memory the kept columns of a Parquet file may decode to than the file's size (beyond
#: :data:`_PARQUET_FREE_BYTES`). A text file's records are bounded by its size; a Parquet column can compress a
#: billion equal rows into a few kB (run-length and dictionary encoding), so its decoded size is bounded here instead:
#: SST-2's train split (67,349 rows, 3.0 MB as pyarrow writes it) counts 2.7x its size, and a file past 100x repeats
#: the same rows over and over, or was built to exhaust memory.
MAX_PARQUET_EXPANSION = 100
_PARQUET_FREE_BYTES = 256 * 1024 * 1024
#: What one row counts against that bound beyond its texts: below what it costs read (a dict of two values is ~200
#: bytes in Python), so that only a file of repeats reaches the bound.
_ROW_BYTES = 64


class _Row(int):
    """A Parquet record's place: its 1-based row (a Parquet file has no lines). Messages say ``row 5``
    (:func:`_at`); an int everywhere else (sorting, JSON)."""


def _at(line: int) -> str:
    """Where a record is, for messages: ``line 5`` of a text file, ``row 5`` of a Parquet file."""
    return f"row {line}" if isinstance(line, _Row) else f"line {line}"


def _parquet_shards(path: Path) -> list[str]:
    """The ``.parquet`` files directly in the folder ``path`` (a multi-file data set), sorted; [] when unreadable."""
    try:
        return sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".parquet")
    except OSError:
        return []


def _refuse_parquet_folder(path: Path, shards: Sequence[str]) -> str:
    """The refusal of a folder of Parquet files. One file is read: a folder's files may differ in schema and in order
    (``datasets``, Spark and pyarrow each name and sort shards their own way), and which rows were trained on would
    depend on it; the hub stores GLUE's splits as one file each."""
    shown = ", ".join(shards[:5]) + (f", ... ({len(shards)} files)" if len(shards) > 5 else "")
    return (f"{path}: a folder of Parquet files ({shown}), not one data file; pass one of them (such as "
            f"{_as_option(str(path / shards[0]))}), or join them into one first: python -c \"import pyarrow.parquet as "
            f"pq; pq.write_table(pq.read_table('{path}'), 'all.parquet')\"")


def _is_text(types: Any, kind: Any) -> bool:
    """Whether the Arrow type ``kind`` is a string type (``types``: ``pyarrow.types``): string, large_string, or
    string_view (pyarrow 16+ writes and reads it back as such: the file keeps the Arrow schema)."""
    return types.is_string(kind) or types.is_large_string(kind) or (hasattr(types, "is_string_view")
                                                                    and types.is_string_view(kind))


#: Parquet encodings of string pages that pyarrow cannot decode into a dictionary (``read_dictionary``: "Not yet
#: implemented: DecodeArrow of DictAccumulator for DeltaLengthByteArrayDecoder"): what Parquet's v2 writers use for
#: strings (Spark's and DuckDB's v2 files, pyarrow's ``column_encoding``).
_DELTA_STRING_ENCODINGS = frozenset({"DELTA_BYTE_ARRAY", "DELTA_LENGTH_BYTE_ARRAY"})


def _delta_encoded(metadata: Any) -> set[str]:
    """The top-level columns of a Parquet file (``metadata``: its footer) with a page in a delta string encoding in
    any row group: read as strings, a batch at a time, not as dictionaries."""
    found: set[str] = set()
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if _DELTA_STRING_ENCODINGS.intersection(chunk.encodings):
                found.add(chunk.path_in_schema)
    return found


def _parquet_type_problem(name: str, kind: Any, nested: bool) -> str | None:
    """Why a kept Parquet column of Arrow type ``kind`` cannot be read (None when it can): numbers, booleans, strings
    (and their dictionaries, as pandas writes a categorical), all-null columns, and for ``nested`` columns lists of
    structs (conversations)."""
    import pyarrow.types as pt

    def scalar(t: Any) -> bool:
        return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t) or _is_text(pt, t) or pt.is_null(t)

    if scalar(kind) or (pt.is_dictionary(kind) and scalar(kind.value_type)):
        return None
    if nested and (pt.is_list(kind) or pt.is_large_list(kind)) and pt.is_struct(kind.value_type):
        return None
    if pt.is_binary(kind) or pt.is_large_binary(kind) or pt.is_fixed_size_binary(kind):
        what = "binary bytes, not text: decode them to strings"
    elif pt.is_nested(kind):
        what = "a nested value"
    elif pt.is_temporal(kind):
        what = "a date or time: write it as a string"
    elif pt.is_decimal(kind):
        what = "a decimal: cast it to float64"
    else:
        what = "a type not read"
    wanted = ("a list of {role, content} structs, " if nested else "") + "numbers, booleans or strings"
    return f"column {name!r} has Parquet/Arrow type {kind} ({what}); expected {wanted}"


def _read_parquet(path: Path, keep: Collection[str] | None, nested: Collection[str] = (),
                  ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """A Parquet file's records: the kept columns only, a batch of rows at a time, with the bounds the text readers
    have (each cell :data:`MAX_FIELD_CHARS`; the footer :data:`MAX_PARQUET_FOOTER_BYTES`; the decoded size
    :data:`MAX_PARQUET_EXPANSION` x the file). Values are what JSON would hold (ints, floats, booleans, strings,
    None), so the one set of rules reads them; float32 values are their shortest decimal (STS-B's ``3.8``, not
    ``3.799999952316284``).

    Raises:
        DataError: pyarrow is not installed (the message has the install command), the file is not Parquet
            (its magic bytes), is truncated, its footer is corrupt or too large, it has no rows, a column name
            repeats, a kept column has a type that is not read (named with its type), a cell is too long, or
            it decodes to too much.
    """
    # One open file for every read (the frame, the footer, the rows), the footer read once: a file replaced between
    # them (written to a temporary name and renamed over, as pipelines and pyarrow's own writers of data sets do) was
    # read as the old footer over the new rows, and a column the new file lacks was a KeyError traceback.
    with open_regular(path) as handle:
        return _read_parquet_file(path, handle, keep, nested)


def _read_parquet_file(path: Path, handle: BinaryIO, keep: Collection[str] | None, nested: Collection[str],
                       ) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """:func:`_read_parquet` of ``path`` open as ``handle``."""
    problem = _parquet_frame_problem(handle)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet files needs pyarrow ({exc}); install it with: "
                        f"{_PARQUET_INSTALL}") from None
    try:
        with pq.ParquetFile(handle) as probe:
            schema, metadata = probe.schema_arrow, probe.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: its footer is corrupt "
                        f"({first_line(exc, 200)})") from None
    columns = list(schema.names)
    repeated = sorted(c for c, n in collections.Counter(columns).items() if n > 1)
    if repeated:
        raise DataError(f"{path}: the schema names column(s) {', '.join(_short(c) for c in repeated[:10])} "
                        "more than once")
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    if metadata.num_rows != sum(groups) or any(n < 0 for n in groups):
        raise DataError(f"{path}: not a readable Parquet file: its footer is corrupt (it counts {metadata.num_rows:,} "
                        f"rows, its row groups {sum(groups):,})")
    if metadata.num_rows == 0:
        shown = ", ".join(_short(c) for c in columns[:50]) or "(none)"
        raise DataError(f"{path}: the Parquet file holds no rows ({metadata.num_row_groups} row group(s); its columns: "
                        f"{shown}); expected examples")
    # only these are read (SST-2's dev split beside an unused column of 100 kB per row, an 87 MB file: 23 MB over the
    # imports; read whole, 800 MB)
    needed = [c for c in columns if keep is None or c in keep]
    problems = [p for c in needed if (p := _parquet_type_problem(c, schema.field(c).type, c in nested))]
    if problems:
        raise DataError(format_problems(f"{path}: columns that cannot be read:", problems, limit=10))
    budget = _PARQUET_FREE_BYTES + MAX_PARQUET_EXPANSION * os.fstat(handle.fileno()).st_size
    if metadata.num_rows * _ROW_BYTES > budget:  # refused before a row is read (41,943,040 rows in 418 kB: 1.8 s)
        raise DataError(_too_much(path, metadata.num_rows * _ROW_BYTES, budget, f"its {metadata.num_rows:,} rows"))
    # (a delta-encoded column cannot be decoded into a dictionary: such a valid file was refused as "truncated or
    # corrupt"; it is read as strings, a batch at a time, its cells still checked before they become Python strings)
    delta = _delta_encoded(metadata)
    dictionaries = [c for c in needed if c not in delta and (_is_text(pa.types, schema.field(c).type)
                                                             or pa.types.is_dictionary(schema.field(c).type))]
    records: list[dict[str, Any]] = []
    used = 0
    problems = []
    try:
        # strings read as dictionaries: a dictionary-encoded column (how Parquet writers store repeated texts) stays
        # one entry per distinct text until its lengths are checked, not a copy per row
        with pq.ParquetFile(handle, metadata=metadata, read_dictionary=dictionaries) as parquet:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=needed, use_threads=False):
                first = len(records) + 1
                values: dict[str, list[Any]] = {}
                sizes = [_ROW_BYTES * batch.num_rows]
                for name, array in zip(batch.schema.names, batch.columns):
                    lengths = _cell_lengths(pa, pc, array)
                    if lengths is not None:
                        for i in pc.indices_nonzero(pc.greater(lengths, MAX_FIELD_CHARS)).to_pylist():
                            problems.append(f"row {first + i}: column {name!r}: {_TOO_LONG}")
                        sizes.append(pc.sum(lengths).as_py() or 0)
                    else:
                        sizes.append(array.nbytes)
                used += sum(sizes)
                if used > budget:
                    raise DataError(_too_much(path, used, budget, f"its first {first + batch.num_rows - 1:,} rows"))
                if problems:
                    if len(problems) > 10:
                        break
                    records.extend({} for _ in range(batch.num_rows))  # (kept only as a count: refused below)
                    continue
                for name, array in zip(batch.schema.names, batch.columns):
                    try:
                        values[name] = _python_values(pa, array)
                    except UnicodeDecodeError:  # a writer that did not check its strings (Parquet's are UTF-8)
                        problems.append(f"row {first + _first_not_utf8(array)}: column {name!r} holds bytes that "
                                        "are not UTF-8 text; write the column as UTF-8 strings")
                if problems:
                    break
                if values:
                    records.extend(dict(zip(values, row)) for row in zip(*values.values()))
                else:  # no column kept (the file lacks those read): the rows are still counted
                    records.extend({} for _ in range(batch.num_rows))
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: the Parquet file cannot be read after row {len(records):,} (is it truncated or "
                        f"corrupt, or was it rewritten while it was read? {first_line(exc, 200)})") from None
    if problems:
        raise DataError(format_problems(f"{path}: malformed Parquet rows:", problems, limit=10))
    if len(records) != metadata.num_rows:
        raise DataError(f"{path}: the Parquet file holds {len(records):,} rows where its footer counts "
                        f"{metadata.num_rows:,} (is it truncated or corrupt?)")
    return records, columns, [_Row(n) for n in range(1, len(records) + 1)]


def parquet_class_names(path: Path, column: str) -> list[str] | None:
    """The class names a Parquet file written by ``datasets`` gives its integer ``column`` (a ``ClassLabel``: the
    ``huggingface`` schema metadata, ``info.features[column].names``, in id order), or None: not recorded, or not a
    list of distinct non-empty names. As HF's ``run_glue`` reads ``features["label"].names``: GLUE's hub files write
    ids, and these names say what they mean. None for a file read as another format (read_records' extensions)."""
    if _EXTENSIONS.get(Path(path).suffix.lower()) != "parquet":
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_regular(path) as handle, pq.ParquetFile(handle) as parquet:
            raw = (parquet.schema_arrow.metadata or {}).get(b"huggingface")
        if raw is None:
            return None
        feature = json.loads(raw).get("info", {}).get("features", {}).get(column)
    except (pa.ArrowException, OSError, ValueError, AttributeError, RecursionError):
        return None  # (the rows were read: metadata that does not read as datasets writes it is not used)
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    if (not isinstance(names, list) or not 2 <= len(names) <= MAX_NUM_LABELS
            or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names)):
        return None
    return names


def _first_not_utf8(array: Any) -> int:
    """The 0-based index of the first cell of a string ``array`` that is not UTF-8 (0 if none is found)."""
    for i in range(len(array)):
        try:
            array[i].as_py()
        except UnicodeDecodeError:
            return i
    return 0


def _parquet_frame_problem(f: BinaryIO) -> str | None:
    """What is wrong with ``path``'s Parquet frame (None: nothing), read from its first and last bytes: the magic
    ``PAR1`` at both ends and a footer length that fits the file and :data:`MAX_PARQUET_FOOTER_BYTES`. Checked
    before pyarrow reads it, so a footer length claiming gigabytes is never allocated."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(4)
    if size < 12:
        return (f"not a Parquet file ({size} bytes; a Parquet file starts and ends with {_PARQUET_MAGIC!r} around "
                "its footer)" if head != _PARQUET_MAGIC else
                f"a truncated Parquet file ({size} bytes: it ends before its footer)")
    f.seek(size - 8)
    tail = f.read(8)
    if head != _PARQUET_MAGIC:
        return (f"not a Parquet file (it starts with {head!r}, not {_PARQUET_MAGIC!r}); .parquet files are read as "
                "Parquet: name a text file .tsv, .csv or .jsonl")
    if tail[4:] == b"PARE":
        return "an encrypted Parquet file (its footer is encrypted); decrypt it first"
    if tail[4:] != _PARQUET_MAGIC:
        return (f"a truncated Parquet file (it does not end with {_PARQUET_MAGIC!r}: cut short, or still being "
                "written); copy or download it again")
    footer = int.from_bytes(tail[:4], "little")
    if footer > size - 12:
        return (f"not a readable Parquet file: its footer is corrupt (it claims {footer:,} bytes in a file of "
                f"{size:,})")
    if footer > MAX_PARQUET_FOOTER_BYTES:
        return (f"its Parquet footer is {footer:,} bytes; at most {MAX_PARQUET_FOOTER_BYTES:,} are read (a data set's "
                "footer is kilobytes: rewrite the file with fewer columns or larger row groups)")
    return None


def _too_much(path: Path, used: int, budget: int, rows: str) -> str:
    """The refusal of a Parquet file whose ``rows`` (words) read would take ``used`` bytes, over ``budget``."""
    return (f"{path}: {rows} would take over {used:,} bytes read (the columns used), more than "
            f"{MAX_PARQUET_EXPANSION} times the file's size ({budget:,} bytes allowed): a file that compresses so well "
            "repeats the same rows, or was built to exhaust memory; remove the repeated rows")


def _cell_lengths(pa: Any, pc: Any, array: Any) -> Any:
    """The characters in each string cell of ``array`` (an Arrow array; dictionaries by their entries, without
    decoding them per row), or None for a column of another type."""
    if pa.types.is_dictionary(array.type):
        if not _is_text(pa.types, array.type.value_type):
            return None
        return pc.take(_cell_lengths(pa, pc, array.dictionary), array.indices)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return pc.utf8_length(array)
    if _is_text(pa.types, array.type):  # string_view: utf8_length has no kernel for it (pyarrow 26); one batch cast
        return pc.utf8_length(array.cast(pa.large_string()))
    return None


def _python_values(pa: Any, array: Any) -> list[Any]:
    """``array``'s cells as the values JSON would hold. float32/float16 cells as their shortest decimal in that
    precision: written as 3.8 and stored in 32 bits, a score read as 3.799999952316284 would differ from the same data
    read from TSV."""
    import numpy as np

    kind = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
    narrow = np.float16 if pa.types.is_float16(kind) else np.float32 if pa.types.is_float32(kind) else None
    values = array.to_pylist()
    if narrow is None:
        return values
    return [None if v is None else float(str(narrow(v))) for v in values]  # numpy's str: the shortest round trip


#: The most characters a data file's header row may hold (column names together): far beyond any real header, and
#: what keeps a file with no line break from being taken whole as one column name.
MAX_HEADER_CHARS = 1 << 20

#: The longest field (CSV/TSV) or line (JSON lines) a data file may have, in characters: past every cut a text gets
#: (max_length x CHARS_PER_TOKEN_BOUND, up to a max_length of 16,384), so nothing trainable is refused; a sparse
#: file's 900 MB line took 5.9 GB to read.
MAX_FIELD_CHARS = 16 * 1024 * 1024
_TOO_LONG = (f"a field over {MAX_FIELD_CHARS:,} characters; a text is cut at max_length x 1,024 characters when it is "
             "tokenized, so split a longer one into several rows")


def _short(name: str, limit: int = 80) -> str:
    """``repr`` of a column name for a message, cut at ``limit`` characters."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name):,} characters)"


def _columns_message(path: Path, columns: Sequence[str]) -> str:
    shown = ", ".join(_short(c) for c in columns[:50])
    shown += f", ... ({len(columns):,} in all)" if len(columns) > 50 else ""
    message = f"columns found in {path}: {shown or '(none)'}"
    if path.suffix.lower() in (".tsv", ".tab", ".csv") and any(_DECIMAL.fullmatch(c.strip()) for c in columns):
        # a header cell that is a number: the file has no header row, its first example was taken for one
        message += (" (a number among them: line 1 looks like an example, not a header; the file needs a first "
                    "line naming its columns, such as 'sentence" + ("\\t" if path.suffix.lower() != ".csv" else ",")
                    + "label')")
    suffix = path.suffix.lower()
    if len(columns) == 1 and suffix in (".tsv", ".tab", ".csv"):
        # one column whose name holds another file type's delimiter: the file is read by its extension
        read_at = "," if suffix == ".csv" else "\t"
        other = next((d for d in ("\t", ",", ";", "|") if d != read_at and d in columns[0]), None)
        if other is not None:
            read_as = "commas (.csv)" if suffix == ".csv" else "tabs (.tsv/.tab)"
            message += (f" (one column whose name holds {other!r}: the file is split at {read_as} by its extension; "
                        "save it with that delimiter, or name it for the one it uses: .tsv for tabs, .csv for commas)")
    return message


def _near(wanted: str, columns: Sequence[str]) -> str | None:
    """A column named as ``wanted`` in another case or number (``Label``, ``labels``, ``Texts``), if one."""
    def key(name: str) -> str:
        name = name.strip().lower()
        return name[:-1] if name.endswith("s") else name

    return next((c for c in columns if c != wanted and key(c) == key(wanted)), None)


def _hinted(hints: Sequence[str], columns: Sequence[str], besides: Sequence[str] = (), lone: bool = True,
            ) -> str | None:
    """The column of ``columns`` to name in a refusal: the first of ``hints`` it has (in any case), else (``lone``)
    the one column left past ``besides`` and the row numbers (a file of ``review`` and ``label``: ``review``), else
    None."""
    lower = {c.strip().lower(): c for c in columns}
    found = next((lower[h.lower()] for h in hints if h.lower() in lower), None)
    if found is not None or not lone:
        return found
    left = [c for c in columns if c not in besides and c.strip().lower() not in _ROW_NUMBER_COLUMNS]
    return left[0] if len(left) == 1 else None


def _as_option(name: str) -> str:
    """``name`` as it is typed after an option in a shell (quoted when it holds a space, a '#', a quote, ...)."""
    import shlex

    return shlex.quote(name)


def _text_problem(value: Any, column: str, allow_empty: bool = False) -> str | None:
    """Why ``value`` cannot be a text of ``column`` (None when it can)."""
    if value is None:
        return f"no value in column {column!r}"
    if not isinstance(value, str):
        return f"column {column!r} holds {_json_type(value)}, expected a string"
    if not allow_empty and not value.strip():
        return f"empty text in column {column!r}"
    if "\x00" in value:  # no text holds one: binary data, or UTF-16 read as UTF-8 (tokenizers drop it, or keep it)
        return (f"column {column!r} holds a NUL character at character {value.index(chr(0)) + 1} (text has none: "
                "is the file binary, or UTF-16? save it as UTF-8 text)")
    surrogate = lone_surrogate_problem(value)  # a lone surrogate ("\ud800" in JSON) has no UTF-8 form
    return None if surrogate is None else f"column {column!r} {surrogate}"


# ---- examples -----------------------------------------------------------------------------------


@dataclass
class SeqClsExamples:
    """Sequence-classification examples.

    Attributes:
        texts: per text column, the list of strings (one or two columns).
        labels: class ids (ints) or regression targets (floats), or None when the file has no labels.
        regression: whether labels are real-valued.
        text_columns / label_column: the columns used.
        lines: 1-based line of each example in its file (for messages).
        path: the file.
        label_names: when the file's labels are names (``positive``...), booleans (``false``/``true``: ids 0/1) or
            names were given: the class names in id order (``labels`` holds their ids); None for plain integer
            labels.
        named_labels: the file writes its labels as class names (not ids).
        whole_scores: regression targets all whole numbers (``4.0``): what a column of class ids written as decimals
            (pandas writes an integer column holding a missing value as floats) looks like too.
    """

    texts: list[list[str]]
    labels: list[int] | list[float] | None
    regression: bool
    text_columns: list[str]
    label_column: str
    lines: list[int]
    path: Path
    label_names: list[str] | None = None
    named_labels: bool = False
    whole_scores: bool = False

    def __len__(self) -> int:
        return len(self.texts[0])

    @property
    def class_ids(self) -> bool:
        """Whether the file writes its labels as class ids (not names, not regression targets, not absent)."""
        return not (self.regression or self.labels is None or self.named_labels)


@dataclass
class LMExamples:
    """Causal-LM examples: ``prompts``/``responses`` (instruction format), ``conversations`` (lists of
    ``{"role", "content"}`` messages) or ``texts`` (plain)."""

    prompts: list[str] | None
    responses: list[str] | None
    texts: list[str] | None
    lines: list[int]
    path: Path
    conversations: list[list[dict[str, Any]]] | None = None
    tools: list[list[Any] | None] | None = None  # per conversation, the functions its template is given (None: none)
    columns: str = ""  # the columns read, for the start-up summary ("prompt+completion", ...)
    # set when the conversations are tokenized: how many assistant turns with tool calls were read back, and the
    # --tool-call-parser names that read each of them back (see _tokenize_conversations)
    tool_call_turns: int = 0
    tool_call_parsers: tuple[str, ...] = ()
    # where no parser reads a turn's calls as the server decodes them but one does with its special tokens kept: those
    # special tokens (e.g. '<tool_call>' saved as special), which the server's decode leaves out of an answer
    tool_call_special_tags: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def format(self) -> str:
        if self.conversations is not None:
            return "messages"
        return "text" if self.texts is not None else "prompt-response"


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


class _Name(str):
    """A label that is a class name, not a number (keeps names apart from numeric strings)."""


def _parse_label(value: Any) -> int | float | _Name | str:
    """int (class id), float (regression target), :class:`_Name` (class name), or a problem message (str)."""
    if isinstance(value, bool):  # as the words: a column of booleans is one rule whatever the format (_booleans_as_ids)
        return _Name("true" if value else "false")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else f"{value!r} is not a finite number"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "empty label"
        # Plain ASCII numerals only: Python's int()/float() would also take "1_0" (10), other scripts' digits
        # and "nan"/"inf", turning what the file calls a name into a silently different class.
        if _INTEGER.fullmatch(text):
            try:
                return int(text)
            except ValueError:  # more digits than Python converts
                return f"{text[:20]}... ({len(text)} digits) is not a class id"
        if _NON_FINITE.fullmatch(text):
            # a missing or broken target as Python and pandas write it ('nan', 'inf'), as JSON's NaN is refused: as a
            # class name it was blamed as a name among numbers, or on the real targets where it was the most common
            return f"{text!r} is not a finite number"
        if not _DECIMAL.fullmatch(text):
            return _Name(text)
        number = float(text)
        return number if math.isfinite(number) else f"{text[:40]!r} is not a finite number"
    if isinstance(value, list):  # a multi-label row, as datasets writes a Sequence(ClassLabel) column (GoEmotions)
        return (f"{_json_type(value)} is not a label: one class per example (multi-label classification, several "
                "classes per example, is not supported)")
    return f"{_json_type(value)} is not a label"


def load_seq_cls(
    path: str | Path,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    regression: bool | None = None,
    require_labels: bool = True,
    label_names: Sequence[str] | None = None,
    columns_from: str | None = None,
    head_text_pair: bool | None = None,
    head_of: str = "the model",
    head_record: str | None = None,
) -> SeqClsExamples:
    """Read a sequence-classification file and check it.

    Labels may be integer class ids ``0..K-1``, class names (``positive``; mapped to ids in sorted order,
    or in the order of ``label_names``) or real numbers (regression).

    Args:
        path: TSV/CSV/JSONL file.
        text_columns: one or two text columns; default: the first of :data:`TEXT_COLUMN_CANDIDATES`
            present in the file.
        label_column: the label column.
        regression: force regression (float labels) or classification; default: decided from the labels
            (:func:`decide_regression`).
        require_labels: refuse a file without the label column.
        label_names: the class names, in id order; a name label outside them is refused.
        columns_from: where ``text_columns`` / ``label_column`` came from when the user did not name them (an
            adapter's training record), added to the message when the file lacks one.
        head_text_pair: whether the head that will read the examples was trained on text pairs (its recorded
            :attr:`~bca_deploy.config.HeadSpec.text_pair`; None: not recorded, either kind is read), ``head_of``
            naming whose head it is and ``head_record`` where that was read (default: the head's ``text_pair``):
            text columns of the other kind are refused, by the rule the server's ``/v1/classify`` applies
            (:func:`~bca_deploy.config.text_pair_mismatch`).

    Raises:
        DataFileNotFoundError, DataError: see :func:`read_records`; also missing columns (the message
            lists the columns found), text columns of the other kind than ``head_text_pair``, no examples, empty
            or non-string texts, labels that are neither numbers nor names, more than
            :data:`~bca_deploy.config.MAX_NUM_LABELS` classes.
    """
    path = Path(path)
    # only the columns that may be read are kept: those named, else every candidate (one is picked once the header is
    # known), and the label
    named = TEXT_COLUMN_CANDIDATES if text_columns is None else [[text_columns] if isinstance(text_columns, str)
                                                                 else text_columns]
    keep = {c for group in [*named, [label_column]] for c in group if isinstance(c, str)}
    records, columns, lines = read_records(path, keep)
    problems: list[str] = []
    if text_columns is None:
        # never the label column itself (--label-column sentence trained on its own labels as text)
        found = next((c for c in TEXT_COLUMN_CANDIDATES if all(x in columns for x in c) and label_column not in c),
                     None)
        if found is None:
            near = next((n for c in TEXT_COLUMN_CANDIDATES if len(c) == 1 for n in [_near(c[0], columns)] if n), None)
            near = near or _hinted(TEXT_COLUMN_HINTS, columns, besides=[label_column, *LABEL_COLUMN_HINTS])
            problems.append(
                "no text column: pass text_columns (CLI: --text-columns"
                + (f"; the file has {near!r}: --text-columns {_as_option(near)}" if near else "") + "); looked for "
                + " / ".join("+".join(c) for c in TEXT_COLUMN_CANDIDATES)
            )
            text_columns = []
        else:
            text_columns = list(found)
    else:
        text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
        if not 1 <= len(text_columns) <= 2:
            problems.append(f"text_columns must name one or two columns, got {text_columns}")
        problems += [f"text column {c!r} not found" + (f" (the file has {_near(c, columns)!r})" if _near(c, columns)
                                                        else "") for c in text_columns if c not in columns]
    has_labels = label_column in columns
    if require_labels and not has_labels:
        # (the one column left is named only beside text columns found: else it may be the text)
        near = _near(label_column, columns) or _hinted(LABEL_COLUMN_HINTS, columns, besides=text_columns,
                                                        lone=bool(text_columns))
        bare = text_columns and not [c for c in columns if c not in text_columns
                                     and c.strip().lower() not in _ROW_NUMBER_COLUMNS]
        problems.append(f"label column {label_column!r} not found " + (
            f"(the file has {near!r}: pass --label-column {_as_option(near)})" if near else
            "(the file has no column besides its text and row numbers: an unlabelled test split? training and "
            "evaluation need labelled examples)" if bare else "(pass label_column / --label-column)"))
    if problems:
        if columns_from is not None:  # the user never named the missing column: say whose it is
            problems.append(columns_from)
        problems.append(_columns_message(path, columns))
        # --task causal-lm forgotten: columns the causal-LM reader takes as they are (a lone text column: beside
        # others it may be a classifier's text), or with one of its options (ShareGPT's conversations...)
        causal = causal_lm_fields(columns)
        also = _causal_lm_hint(columns) if causal is None and not has_labels else None
        if causal is not None and (causal[1] != "text" or columns == ["text"]):
            problems.append(f"these are causal-LM columns ({' + '.join(repr(c) for c in causal[0])}): pass --task "
                            "causal-lm (task='causal-lm') to train a language-model adapter on them")
        elif also is not None and "--messages-column" in also:
            problems.append(f"these look like conversations for a language model: pass --task causal-lm "
                            f"(task='causal-lm'); {also}")
        raise DataError(format_problems(f"{path}: cannot read sequence-classification data:", problems))
    pairs = len(text_columns) == 2
    if (trained := text_pair_mismatch(head_text_pair, pairs, head_record)) is not None:
        # checked before a text is read: scored, every example would be a label read off an input the head never saw
        read = (f"text pairs (text columns {_short(text_columns[0])} + {_short(text_columns[1])})" if pairs
                else f"single texts (text column {_short(text_columns[0])})")
        fix = ("pass --text-columns naming the one text column of a file of single texts (text_columns=[...])"
               if pairs else "pass --text-columns FIRST,SECOND naming the two text columns of a file of text pairs "
               "(text_columns=[first, second])")
        raise DataError(format_problems(f"{path}: not the kind of input {head_of} was trained on:", [
            f"it is read as {read}, but {head_of} {trained}", fix, _columns_message(path, columns)]))
    if not records:
        raise DataError(f"{path}: the data set is empty (a header but no examples)")

    texts: list[list[str]] = [[] for _ in text_columns]
    parsed: list[Any] = []
    for record, line in zip(records, lines):
        for k, column in enumerate(text_columns):
            value = record.get(column)
            problem = _text_problem(value, column)
            if problem:
                problems.append(f"{_at(line)}: {problem}")
            texts[k].append(value if isinstance(value, str) else "")
        if has_labels:
            label = _parse_label(record[label_column]) if label_column in record else "missing (no such field)"
            if type(label) is str:  # a problem message, not a label
                problems.append(f"{_at(line)}: label in column {label_column!r}: {label}")
            parsed.append(label)
    labels: list[Any] | None = None
    names = list(label_names) if label_names is not None else None
    if has_labels and not problems:
        parsed, names = _booleans_as_ids(parsed, names)
        labels, names, regression = _labels(parsed, lines, label_column, regression, names, problems)
    if problems:
        raise DataError(format_problems(f"{path}: bad examples:", problems, limit=10))
    examples = SeqClsExamples(
        texts=texts,
        labels=labels,
        regression=bool(regression),
        text_columns=list(text_columns),
        label_column=label_column,
        lines=lines,
        path=path,
        label_names=names,
        named_labels=not regression and any(isinstance(v, _Name) for v in parsed),
        whole_scores=bool(regression) and bool(labels) and all(float(v).is_integer() for v in labels),
    )
    written = parquet_class_names(path, label_column) if examples.class_ids else None
    if written is not None:
        # the file says what its ids mean: its names, in the ids' order, name the classes of a file read alone (a run
        # trained on it records them); beside given classes holding them, its ids are read as those classes, as a
        # file of the names is (a held-out hub file of 0/1 beside a run trained on the words was refused)
        if names is None:
            examples = dataclasses.replace(examples, label_names=list(written))
        elif set(written) <= set(names):  # (the same order too: the ids are then known to mean those names)
            examples = dataclasses.replace(examples, labels=ids_named(examples, written, names), named_labels=True)
    return examples


def ids_named(examples: SeqClsExamples, file_names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """The labels of ``examples`` (class ids of the file, id i meaning ``file_names[i]``) as ids of ``class_names``.

    Raises:
        DataError: the file's labels are not class ids, an id has no name, or a name is not one of the classes.
    """
    if not examples.class_ids:
        kind = "regression targets" if examples.regression else "class names" if examples.named_labels else "absent"
        raise DataError(f"{examples.path}: --label-names names the class ids of a file, and this file's labels are "
                        f"{kind}")
    unknown = [n for n in file_names if n not in class_names]
    if unknown:
        raise DataError(f"--label-names {', '.join(map(repr, unknown[:10]))}: not classes of the adapter, whose "
                        f"classes are {_shown(list(class_names))}")
    _refuse_unlabelled(examples, len(file_names))
    problems = [f"{_at(line)}: label {y} has no name in --label-names ({len(file_names)} given)"
                for line, y in zip(examples.lines, examples.labels) if not 0 <= y < len(file_names)]
    if problems:
        raise DataError(format_problems(f"{examples.path}: class ids without a name:", problems, limit=10))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[file_names[y]] for y in examples.labels]


def check_ids_mean_these_names(examples: SeqClsExamples, names: Sequence[str], named_by: str) -> None:
    """Refuse class ids in ``examples`` when the classes are ``names`` numbered in sorted order because the training
    file ``named_by`` wrote them as names: what an id means there is this program's numbering, not the writer's (a
    dev file of SST-2's own 0/1 beside training names good/not_good scored 0.22 for a 0.78 model, silently).

    Raises:
        DataError: the file's labels are ids; the message shows each id's name and how to write the file.
    """
    if not examples.class_ids:
        return
    _refuse_unlabelled(examples, len(names))
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:10])) + (" ..." if len(names) > 10 else "")
    raise DataError(f"{examples.path}: its labels are class ids, but the classes were named by the training file "
                    f"{named_by} and numbered in sorted order ({shown}), which need not be what these ids mean: write "
                    "this file's labels as the class names, or say what its ids mean with --label-names (evaluate) or "
                    "by training with --label-names in the ids' order")


#: The largest regression target trained on: the MSE loss squares the error in float32 (max 3.4e38), so a target
#: near 1.8e19 makes the loss infinite at the first step, which would be reported as a learning-rate problem.
MAX_REGRESSION_TARGET = 1e18


def _short_number(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text.lstrip('+-'))} digits)"


_BOOLEANS = ("false", "true")
#: Class names that data sets write for an example without a label (SNLI's and MNLI's files: "-" where the annotators
#: did not agree): read as a class like any other, with a note (``train``), since a file may mean it as one.
UNLABELLED_MARKS = ("-",)


def _booleans_as_ids(parsed: list[Any], names: list[str] | None) -> tuple[list[Any], list[str] | None]:
    """A label column of booleans as class ids false=0, true=1, named by the file's own spelling (or by ``names``).

    One rule for JSON's ``true`` and the words pandas and spreadsheets write (``True``, ``FALSE``), so a data set
    saved to CSV and to JSON trains and evaluates alike (JSON's booleans were class ids and the words sorted class
    names, so a held-out file in the other format was refused), and ids and booleans mean the same classes, as in
    Python, pandas and datasets. Names given that hold the file's words verbatim (``--label-names true,false``, an
    adapter trained on those words) are matched as names instead: an order given is kept. A column that also holds
    other words (``half-true``) is a column of class names.
    """
    if not parsed or not all(isinstance(v, _Name) and v.lower() in _BOOLEANS for v in parsed):
        return parsed, names
    if names is not None and all(v in names for v in parsed):
        return parsed, names
    spelled = {v.lower(): str(v) for v in parsed}
    return [_BOOLEANS.index(v.lower()) for v in parsed], names or [spelled.get(b, b) for b in _BOOLEANS]


def decide_regression(parsed: Sequence[Any]) -> bool:
    """Whether a label column that the user did not say the task of holds regression targets: labels read by
    :func:`_parse_label`, regression when none is a class name and one is a number written as a decimal (``3.8``, and
    ``4.0`` too: STS-B's own file writes ``4.000``, pandas a float column ``4.0``, JSON a float ``4.0``).

    As HF's ``run_glue`` decides (a float column is regression, an integer one classification): whole decimals were
    class ids here, and STS-B scores that happened to be whole trained a 6-class classifier. Integers (``0``..``5``)
    stay class ids, as there: a column of whole scores written as integers is classification unless ``--regression``
    is given.
    """
    return not any(isinstance(v, _Name) for v in parsed) and any(isinstance(v, float) for v in parsed)


#: Label columns whose name says they hold scores on a scale (STS-B's ``score``, review ``rating``/``stars``,
#: SICK's ``relatedness_score``): integers there are read as class ids all the same (decide_regression), with a note.
SCORE_COLUMNS = ("score", "scores", "rating", "ratings", "stars", "similarity", "similarity_score", "relatedness",
                 "relatedness_score")


def scores_read_as_classes(examples: SeqClsExamples, num_labels: int) -> str | None:
    """The note for integer labels read as ``num_labels`` class ids (more than two) from a column whose name says it
    holds scores (:data:`SCORE_COLUMNS`): STS-B's scores written as integers (pandas' int column, ``round()``) trained
    a 6-class classifier picked by accuracy, where a user of the data set expects regression; None otherwise."""
    if not examples.class_ids or num_labels <= 2 or examples.label_column.strip().casefold() not in SCORE_COLUMNS:
        return None
    return (f"{examples.path}: the labels in column {examples.label_column!r} are integers, read as class ids: a "
            f"{num_labels}-class classifier, judged by accuracy; if they are scores on a scale (as STS-B's 0-5), pass "
            "--regression: one output, MSE loss, judged by pearson")


def _labels(parsed: list[Any], lines: list[int], column: str, regression: bool | None, names: list[str] | None,
            problems: list[str]) -> tuple[list[Any], list[str] | None, bool]:
    """Turn parsed labels into ids (or floats), deciding the label kind; appends problems."""
    is_name = [isinstance(v, _Name) for v in parsed]
    if regression is None:
        regression = decide_regression(parsed)
    if regression:
        bad = [f"{_at(line)}: label {str(v)!r} in column {column!r} is not a number (regression needs real-valued "
               "labels)" for v, line in zip(parsed, lines) if isinstance(v, _Name)]
        bad += [f"{_at(line)}: label {_short_number(v)} in column {column!r} is too large for training: regression "
                f"targets must be within ±{MAX_REGRESSION_TARGET:.0e} (the loss squares the error in float32)"
                for v, line in zip(parsed, lines) if not isinstance(v, _Name) and abs(v) > MAX_REGRESSION_TARGET]
        problems += bad
        return ([] if bad else [float(v) for v in parsed]), None, True
    if any(is_name) and not all(is_name):
        # one stray word in a column of class ids (or one id among names) is a mistake, not a new class
        # (a tie blames the names: a number with a stray character, '1\x00', is the likelier slip)
        minority = [x for x in zip(parsed, lines, is_name) if x[2] == (sum(is_name) <= len(is_name) / 2)]
        problems += [f"{_at(line)}: label {str(v)!r} in column {column!r} mixes class names with numbers"
                     for v, line, _ in minority]
        return [], None, False
    if any(is_name):  # a column of class names
        as_text = [str(v) for v in parsed]
        if names is None:
            names = sorted(set(as_text))
            if len(names) > MAX_NUM_LABELS:
                problems.append(f"{len(names):,} distinct label names in column {column!r}; at most "
                                f"{MAX_NUM_LABELS:,} classes are supported")
                return [], None, False
        index = {name: i for i, name in enumerate(names)}
        folded = collections.defaultdict(list)  # a name in another case: said, not matched (which one is meant?)
        for name in names:
            folded[name.casefold()].append(name)
        if names == [f"LABEL_{i}" for i in range(len(names))] and not all(t in index for t in as_text):
            # the names transformers gives numbered classes (the classes were trained as ids): no other name means
            # one of them, and the fix is said first, before the lines it is about
            problems.append(f"the classes {_shown(names)} are the names transformers gives classes trained as ids "
                            f"0..{len(names) - 1}: write the labels of column {column!r} as those ids")
        problems += [f"{_at(line)}: label {t!r} is not one of the classes {_shown(names)}"
                     + (f" (it differs only in case from {folded[t.casefold()][0]!r}: class names are matched exactly)"
                        if len(folded[t.casefold()]) == 1 else "")
                     for line, t in zip(lines, as_text) if t not in index]
        return [index.get(t, -1) for t in as_text], names, False
    ids = []
    for value, line in zip(parsed, lines):
        if isinstance(value, float) and not value.is_integer():
            problems.append(f"{_at(line)}: label {value!r} in column {column!r} is not an integer class id")
        ids.append(int(value))
    return ids, names, False


def _shown(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_label_range(examples: SeqClsExamples, num_labels: int, head: str = "the classification head",
                      fix: str = "fix the labels or pass a larger --num-labels") -> None:
    """Raise :class:`DataError` if a class id is outside ``0..num_labels-1`` (lists the offenders).

    ``head`` names what has ``num_labels`` outputs and ``fix`` says what to do, for the message.
    """
    if examples.regression or examples.labels is None:
        return
    bad = [(line, y) for line, y in zip(examples.lines, examples.labels) if not 0 <= y < num_labels]
    if bad:
        shown = [f"{_at(line)}: label {y}" + (" (class ids start at 0)" if y < 0 else "") for line, y in bad]
        if all(y == -1 for _, y in bad):
            # how datasets writes an example without a label (GLUE's test splits, SNLI's pairs without a gold label);
            # the loss would fail on it (HF's run_glue stops with an IndexError or a device-side assert)
            fix = ("-1 marks an unlabelled example (as datasets writes GLUE's test splits): remove those rows, or use a "
                   "labelled split")
        raise DataError(format_problems(
            f"{examples.path}: {len(bad)} label(s) outside {head}'s range 0..{num_labels - 1} "
            f"(num_labels={num_labels}); {fix}:", shown, limit=10,
        ))


def _refuse_unlabelled(examples: SeqClsExamples, num_labels: int) -> None:
    """Refuse class ids of -1 (an unlabelled example, as ``datasets`` writes GLUE's test splits) by
    :func:`check_label_range`'s message, before a check of what the ids mean would blame them on the numbering."""
    if any(y == -1 for y in examples.labels or ()):
        check_label_range(examples, num_labels, "the head", "fix the labels")


def classes_needed(examples: SeqClsExamples) -> int:
    """How many classes the labels of ``examples`` imply: the names, else the largest id + 1 (at least 2).

    Raises:
        DataError: more than :data:`~bca_deploy.config.MAX_NUM_LABELS` (the line with the largest label is
            named), so one stray label cannot ask for a huge head.
    """
    if examples.label_names is not None:
        return len(examples.label_names)
    if not examples.labels:
        return 2
    largest = max(examples.labels)
    if largest >= MAX_NUM_LABELS:
        line = examples.lines[examples.labels.index(largest)]
        raise DataError(
            f"{examples.path}: {_at(line)}: label {largest} implies {largest + 1:,} classes; at most "
            f"{MAX_NUM_LABELS:,} are supported (labels are class ids 0..K-1)"
        )
    return max(2, largest + 1)


#: The column read beside a conversation column, when the file has it (the default of ``--tools-column``): the
#: functions the conversation's model may call (``[{"type": "function", "function": {"name", "description"?,
#: "parameters"?}}]``, or that list as a JSON string, as Hugging Face data sets often store it), handed to the chat
#: template as ``serve`` hands a request's ``tools``: ``apply_chat_template(..., tools=...)``.
TOOLS_COLUMN = "tools"


def _conversation_problem(value: Any, column: str) -> str | None:
    """What is wrong with one row's conversation (None: nothing): a list of ``{"role", "content"}`` objects, roles
    among :data:`CHAT_ROLES`, at least one assistant turn; by the chat route's rules (:mod:`bca_deploy.serving.tools`:
    the same shapes and bounds, each problem with its path) a content a string or a list of text parts
    (:func:`~bca_deploy.serving.tools.content_text`), an assistant's ``tool_calls``, a tool message's
    ``tool_call_id``, the content of an assistant message with calls null or absent."""
    if not isinstance(value, list) or not value:
        return (f"{column!r} must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                f"{_json_type(value) if value != [] else 'an empty list'}")
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, dict):
            return f"{where} must be an object with \"role\" and \"content\", got {_json_type(message)}"
        role, content = message.get("role"), message.get("content")
        if "role" not in message and "from" in message and "value" in message:
            return (f"{where} is a ShareGPT message ({{\"from\", \"value\"}}); expected {{\"role\", \"content\"}} "
                    "with roles 'system', 'user', 'assistant' (ShareGPT's human is user, gpt is assistant)")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            got = "none" if "role" not in message else repr(role)[:40]
            return f"{where}.role must be one of {', '.join(map(repr, CHAT_ROLES))}, got {got}"
        calls = _tool_calls(message)
        # transformers' documented shape (arguments an object, no ids) as well as OpenAI's: what data sets hold
        if calls is not None and (problems := tool_calls_problems(calls, f"{where}.tool_calls", openai_shape=False)):
            return "; ".join(problems)
        for key in ("tool_call_id", "name"):  # strings the template may write into the prompt, as serve takes them
            field = message.get(key)
            if field is not None and not isinstance(field, str):
                return f"{where}.{key} must be a string, got {_json_type(field)}"
            if field is not None and (problem := _text_problem(field, f"{where}.{key}", allow_empty=True)):
                return problem  # a lone surrogate was the tokenizer's TypeError on the rendered prompt
        call_id = message.get("tool_call_id")
        if content is None and calls is None:
            got = "none" if "content" not in message else _json_type(content)
            return f"{where}.content must be a string or a list of text parts, got {got}" + (
                " (an assistant message may have tool_calls instead)" if role == "assistant" else "")
        content, problem = content_text(content)  # text parts joined as serve joins them
        if problem is not None:
            return f"{where}.content: {problem}"
        problems = message_tool_problems(role, content is not None, calls, call_id, openai_shape=False)
        if problems:
            return "; ".join(f"{where}.{p}" for p in problems)
        text = _text_problem(content, f"{where}.content", allow_empty=True) if content is not None else None
        if text:  # NUL, lone surrogate: the text rule
            return text
    found = unanswered_tool_message([(m["role"], _tool_calls(m), m.get("tool_call_id")) for m in value])
    if found is not None:  # serve's rule: a tool message answers a call of the assistant message it follows
        return f"{column}[{found[0]}].{found[1]}"
    if not any(m["role"] == "assistant" for m in value):
        return f"{column!r} has no \"assistant\" message: nothing to train on (the loss is on the assistant turns)"
    return None


def _tool_calls(message: dict[str, Any]) -> Any:
    """A message's ``tool_calls``, None when absent, null or empty (a Parquet struct's field of a message without
    calls is null; an answer sent back without calls has ``[]``: the server reads both as none)."""
    calls = message.get("tool_calls")
    return None if calls is None or calls == [] else calls


def _template_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A checked conversation as the chat template sees it: each message as ``serve`` hands a request's message to
    the template (:func:`~bca_deploy.serving.tools.template_message`: text parts joined into one text by
    :func:`~bca_deploy.serving.tools.content_text`, an assistant's call arguments as dicts, a tool message's
    ``tool_call_id``, a message's ``name`` when given: serve keeps it, so training does)."""
    return [template_message(m["role"], content_text(m.get("content"))[0] or "", m.get("name"), _tool_calls(m),
                             m.get("tool_call_id"))
            for m in messages]


def _tools_value(value: Any, column: str = TOOLS_COLUMN) -> tuple[list[Any] | None, str | None]:
    """``(tools, problem)`` of a row's tools cell (of ``column``, named in the problem): null, an empty list or ``""``
    is no tools; a list or a string of a JSON list is checked by the server's rules
    (:func:`~bca_deploy.serving.tools.tools_problems`: at most 128 tools, 1 MiB as JSON, each problem with its
    path)."""
    if value is None or value == [] or value == "":
        return None, None
    if isinstance(value, str):
        if len(value) > 4 * MAX_TOOLS_BYTES:
            return None, f"{column}: {len(value):,} characters; at most {MAX_TOOLS_BYTES:,} bytes are taken"
        try:  # by the one rule every JSON file is read by: no key twice, no NaN or Infinity, nesting bounded
            value = parse_json_value(value, column, "tools string")
        except AdapterFormatError as exc:
            return None, f"{first_line(exc, 200)}; expected a list of tools, or that list written as JSON"
    problems = tools_problems(value, column)
    if problems:
        return None, "; ".join(problems)
    return value or None, None


def _without_struct_nulls(value: Any) -> Any:
    """A Parquet cell of structs as the JSON it was written from: Arrow gives every struct in a column every field
    any of them has, null where the row had none (a tool without a description got ``"description": null``, one
    tool's schema another's properties as nulls, a text part beside an image part ``"image_url": null``), so a null
    field is read as absent, as a message's null ``tool_calls`` is. (A JSON string column keeps its nulls: it is
    read as written.)"""
    if isinstance(value, dict):
        return {k: _without_struct_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_struct_nulls(v) for v in value]
    return value


#: Stanford Alpaca's prompts, with the newline after ``### Response:`` that Axolotl's ``alpaca`` type adds (the
#: response then starts a line of its own instead of continuing the prompt's last token). A file of ``instruction``,
#: ``input`` (optional, may be empty) and ``output`` columns trains on ``output`` after this prompt; served, the same
#: prompt text goes to ``/v1/completions``.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_COLUMNS = ("instruction", "input", "output")
#: Read as the response when the file has no ``--response-column`` column and that option is left at its default:
#: TRL's prompt-completion format.
COMPLETION_COLUMN = "completion"
#: The columns that make an instruction's prompt together (Alpaca's instruction and input, Dolly's context): one of
#: them read as the prompt column alone, the prompts would lose the others.
_INSTRUCTION_PARTS = ("instruction", "input", "context")


def alpaca_prompt(instruction: str, context: str) -> str:
    """The Alpaca prompt of one example (:data:`ALPACA_PROMPT`, or :data:`ALPACA_PROMPT_NO_INPUT` for an empty
    ``context``); the texts are put in as they are (no ``str.format``: a ``{`` in them is text)."""
    template = ALPACA_PROMPT if context.strip() else ALPACA_PROMPT_NO_INPUT
    head, rest = template.split("{instruction}")
    if not context.strip():
        return head + instruction + rest
    middle, tail = rest.split("{input}")
    return head + instruction + middle + context + tail


def causal_lm_fields(columns: Sequence[str], prompt_column: str = "prompt", response_column: str = "response",
                     messages_column: str = "messages", text_column: str = "text") -> tuple[list[str], str] | None:
    """The columns :func:`load_causal_lm` reads from a file with ``columns`` and their layout, by the first layout
    they hold: ``[prompt, response]`` (``"prompt-response"``; the response read from :data:`COMPLETION_COLUMN` when
    ``response_column`` is left at its default and absent), ``[messages]`` (``"messages"``), Alpaca's
    ``["instruction", "output"]`` (``"alpaca"``: + ``input``, put in :data:`ALPACA_PROMPT`), ``[text]``
    (``"text"``); None when they hold none of them."""
    response = response_column if response_column in columns else (
        COMPLETION_COLUMN if response_column == "response" and COMPLETION_COLUMN in columns else None)
    if prompt_column in columns and response is not None:
        return [prompt_column, response], "prompt-response"
    if messages_column in columns:
        return [messages_column], "messages"
    if "instruction" in columns and "output" in columns:
        return ["instruction", "output"], "alpaca"
    if text_column in columns:
        return [text_column], "text"
    return None


def load_causal_lm(
    path: str | Path,
    prompt_column: str = "prompt",
    response_column: str = "response",
    text_column: str = "text",
    messages_column: str = "messages",
    tools_column: str = TOOLS_COLUMN,
    columns_from: str | None = None,
    warn: Callable[[str], Any] | None = None,
) -> LMExamples:
    """Read a causal-LM file, by the first of these its columns hold: ``prompt_column`` + ``response_column`` (or
    :data:`COMPLETION_COLUMN` for the default response column), ``messages_column`` (conversations, with each row's
    functions in ``tools_column`` when the file has it), Alpaca's ``instruction`` + ``output`` (+ ``input``, put in
    :data:`ALPACA_PROMPT`), ``text_column``. ``columns_from``: where ``tools_column`` came from when the user did not
    name it (an adapter's training record), added to the message when the file lacks it. ``warn``: gets a line when
    conversations have tool calls and no row lists its functions.

    Raises:
        DataFileNotFoundError, DataError: see :func:`read_records`; also no such columns (the columns found, and the
            options for those the file has), bad values by line, and a prompt column of one part of an instruction
            (``instruction``, ``input``, ``context``) beside another part holding text that it would leave out;
            conversations beside no ``tools_column`` named otherwise than :data:`TOOLS_COLUMN` (the columns found).
    """
    path = Path(path)
    keep = {c for c in (prompt_column, response_column, messages_column, text_column, COMPLETION_COLUMN,
                        tools_column, *ALPACA_COLUMNS, *_INSTRUCTION_PARTS) if isinstance(c, str)}
    records, columns, lines = read_records(path, keep, nested={messages_column, tools_column})
    layout = causal_lm_fields(columns, prompt_column, response_column, messages_column, text_column)
    if layout is None:
        hint = _causal_lm_hint(columns)
        raise DataError(
            f"{path}: causal-lm data needs columns {prompt_column!r} + {response_column!r} (loss on the response; "
            f"or {COMPLETION_COLUMN!r}), {messages_column!r} (conversations: loss on the assistant turns), "
            f"'instruction' + 'output' (+ 'input': Alpaca) or {text_column!r} (loss on every token); "
            f"{_columns_message(path, columns)}" + (f"; {hint}" if hint else "")
        )
    fields, kind = layout
    alpaca = kind == "alpaca"
    if not records:
        raise DataError(f"{path}: the data set is empty (no examples)")
    if fields == [messages_column]:
        if tools_column != TOOLS_COLUMN and tools_column not in columns:
            # a column named for the functions and not in the file: its conversations trained on their calls without
            # the functions in the prompts (a run with tools in every request served them), without a word
            raise DataError(f"{path}: --tools-column {_short(tools_column)} is not a column of the file, so its "
                            "conversations would be read without their functions; name the column holding each row's "
                            f"functions ({_columns_message(path, columns)})"
                            + (f"; {columns_from}" if columns_from else ""))
        conversations, tools, problems = [], [], []
        with_tools = tools_column in columns and tools_column != messages_column
        # a tools string read once per distinct value: a data set gives every row the same tools (100,000 rows of
        # one 15 kB string were parsed and checked 100,000 times, each row holding its own copy of the parsed list)
        read_tools: dict[str, tuple[list[Any] | None, str | None]] = {}
        parquet = _EXTENSIONS.get(path.suffix.lower()) == "parquet"
        for record, line in zip(records, lines):
            value = record.get(messages_column)
            if parquet:  # a text part beside an image part in the column got "image_url": null: absent, as written
                value = _without_struct_nulls(value)
            problem = _conversation_problem(value, messages_column)
            cell = record.get(tools_column) if with_tools else None
            if isinstance(cell, str):
                if cell not in read_tools:
                    read_tools[cell] = _tools_value(cell, tools_column)
                row_tools, tools_problem = read_tools[cell]
            else:
                row_tools, tools_problem = _tools_value(_without_struct_nulls(cell) if parquet else cell, tools_column)
            for found in (problem, tools_problem):
                if found:
                    problems.append(f"{_at(line)}: {found}")
            if problem or tools_problem:
                continue
            conversations.append(_template_conversation(value))
            tools.append(row_tools)
        if problems:
            raise DataError(format_problems(f"{path}: bad conversations:", problems, limit=10))
        calling = sum(any(m.get("tool_calls") for m in c) for c in conversations)
        if calling and not any(tools) and warn is not None:
            # trained to call functions its prompts never list, while a served request lists them in its tools: the
            # functions are likely in a column of another name
            warn(f"{path}: {calling:,} conversation{'s have' if calling > 1 else ' has'} tool calls and no row "
                 f"lists its functions (no {tools_column!r} column, or it is empty): the model learns to call "
                 f"functions its prompts never show; name the column holding them with --tools-column "
                 f"({_columns_message(path, columns)})")
        return LMExamples(None, None, None, lines, path, conversations=conversations, tools=tools,
                          columns=messages_column + (f"+{tools_column}" if with_tools else ""))
    if prompt_column in _INSTRUCTION_PARTS and len(fields) == 2 and not alpaca:
        _refuse_unread_context(path, records, lines, columns, fields)
    values: dict[str, list[str]] = {f: [] for f in fields}
    contexts: list[str] = []
    problems = []
    for record, line in zip(records, lines):
        for field_name in fields:
            value = record.get(field_name)
            problem = _text_problem(value, field_name, allow_empty=field_name == prompt_column)
            if problem:
                problems.append(f"{_at(line)}: {problem}")
            values[field_name].append(value if isinstance(value, str) else "")
        if alpaca:
            context = record.get("input")  # absent or null: an instruction without one, as Axolotl reads it
            problem = None if context is None else _text_problem(context, "input", allow_empty=True)
            if problem:
                problems.append(f"{_at(line)}: {problem}")
            contexts.append(context if isinstance(context, str) else "")
    if problems:
        raise DataError(format_problems(f"{path}: bad examples:", problems, limit=10))
    if alpaca:
        prompts = [alpaca_prompt(i, c) for i, c in zip(values["instruction"], contexts)]
        return LMExamples(prompts, values["output"], None, lines, path,
                          columns="instruction+input+output (the Alpaca prompt)")
    if len(fields) == 2:
        return LMExamples(values[fields[0]], values[fields[1]], None, lines, path, columns="+".join(fields))
    return LMExamples(None, None, values[text_column], lines, path, columns=text_column)


def _refuse_unread_context(path: Path, records: list[dict[str, Any]], lines: list[int], columns: Sequence[str],
                           fields: Sequence[str]) -> None:
    """Refuse prompts read from one part of an instruction (:data:`_INSTRUCTION_PARTS`) beside another part holding
    text that no column read takes in: trained without it, an example's response answers what its prompt no longer
    says (Alpaca read with ``--prompt-column instruction --response-column output`` trained on every output without
    its input, silently)."""
    for column in _INSTRUCTION_PARTS:
        if column not in columns or column in fields:
            continue
        held = [i for i, record in enumerate(records) if isinstance(record.get(column), str) and record[column].strip()]
        if held:
            how = ("leave out --prompt-column and --response-column: instruction + input + output is read as Alpaca "
                   "data (both in the Alpaca prompt)" if {"instruction", "output"} <= set(columns)
                   and column != "context" else
                   f"write a prompt column holding the {fields[0]} and its {column} (and pass it as --prompt-column)")
            raise DataError(f"{path}: column {column!r} holds text on {_lines_of(lines, held)}"
                            f" that --prompt-column {fields[0]} leaves out of the prompts; {how}")


def _causal_lm_hint(columns: Sequence[str]) -> str | None:
    """The options that read a causal-LM file of other column names (None: none to suggest)."""
    for prompt, response in (("question", "answer"), ("input", "output"), ("query", "response"), ("source", "target")):
        if prompt in columns and response in columns:
            return f"the file has {prompt!r} and {response!r}: pass --prompt-column {prompt} --response-column {response}"
    conversation = next((c for c in ("conversations", "conversation", "dialog", "chat") if c in columns), None)
    if conversation is not None:
        return (f"the file has {conversation!r}: pass --messages-column {conversation} (a list of {{\"role\", "
                "\"content\"} messages)")
    text = _hinted(TEXT_COLUMN_HINTS, columns)
    return f"the file has {text!r}: pass --text-column {_as_option(text)}" if text else None


# ---- tokenized data -----------------------------------------------------------------------------


class TokenizedDataset:
    """Token ids per example and a ``collate`` that pads a batch on the right.

    Attributes:
        input_ids: per example, its token ids (no padding).
        token_type_ids: per example (BERT-style sentence pairs), or None.
        labels: seq-cls: one int/float per example; causal-lm: per example, one id per token
            (:data:`IGNORE_INDEX` where no loss is taken).
        pad_id: id used to pad ``input_ids``.
        lines: per example, its 1-based line in the file (for messages), when known.
    """

    def __init__(self, input_ids, labels, pad_id: int, token_type_ids=None, task: str = "seq-cls",
                 regression: bool = False, lines: Sequence[int] | None = None) -> None:
        self.input_ids = input_ids
        self.lines = list(lines) if lines is not None else None
        self.labels = labels
        self.pad_id = int(pad_id)
        self.token_type_ids = token_type_ids
        self.task = task
        self.regression = regression

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_tokens(self, indices: Sequence[int]) -> int:
        return sum(len(self.input_ids[i]) for i in indices)

    def fingerprint(self) -> str:
        """SHA-256 of what training reads, in order: each example's token ids, token types and labels.

        What a resumed run must see again to continue the same trajectory: the count alone let a resume go on
        with another file of as many rows, other columns, another ``--tools-column`` or chat template, and skip
        ahead by the old data position into examples the first part never trained on."""
        digest = hashlib.sha256(f"{self.task}:{self.regression}:{self.pad_id}:{len(self.input_ids)}".encode())

        def add(values: Sequence[int] | Sequence[float], typecode: str = "q") -> None:
            digest.update(len(values).to_bytes(8, "little"))  # delimits one example's list from the next
            digest.update(typed_array(typecode, values).tobytes())

        for i in range(len(self.input_ids)):
            add(self.input_ids[i])
            if self.token_type_ids is not None:
                add(self.token_type_ids[i])
            if self.labels is not None:
                label = self.labels[i]
                if self.task == "causal-lm":
                    add(label)
                else:
                    add([label], "d" if self.regression else "q")
        return digest.hexdigest()

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Batch of ``indices``: ``input_ids``, ``attention_mask`` (B, T), ``token_type_ids`` if any,
        ``labels`` ((B,) long/float for seq-cls, (B, T) long for causal-lm), T = longest example."""
        seqs = [self.input_ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            types = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, i in enumerate(indices):
                types[row, : len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i], dtype=torch.long)
            batch["token_type_ids"] = types
        if self.labels is not None:
            if self.task == "causal-lm":
                labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
                for row, i in enumerate(indices):
                    labels[row, : len(self.labels[i])] = torch.tensor(self.labels[i], dtype=torch.long)
                batch["labels"] = labels
            else:
                dtype = torch.float32 if self.regression else torch.long
                batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=dtype)  # (B,)
        return batch


def _eos_token_id(tokenizer) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


#: Texts are cut to ``max_length`` × this many characters before they are tokenized: a tokenizer reads a whole text
#: before truncating (a 30 MB line took 5.8 GB), while the tokens kept come from the first few hundred characters;
#: only a text whose first ``max_length`` tokens span more than this many characters each (a run of whitespace that
#: long) could tokenize differently.
CHARS_PER_TOKEN_BOUND = 1024


def cut_texts(texts: Sequence[str], max_length: int) -> list[str]:
    """``texts`` with each cut to ``max_length`` × :data:`CHARS_PER_TOKEN_BOUND` characters (see there)."""
    limit = max(1, max_length) * CHARS_PER_TOKEN_BOUND
    return [t if len(t) <= limit else t[:limit] for t in texts]


#: Texts tokenized per call: a fast tokenizer's result keeps an Encoding per text (its tokens, offsets, masks), ~2 KB
#: each, so a million-row file tokenized in one call held ~2.2 GB; in chunks only the ids are kept.
TOKENIZE_CHUNK = 4096


def _encode(tokenizer, columns: Sequence[Sequence[str]],
            **options: Any) -> tuple[list[list[int]], list[list[int]] | None]:
    """``tokenizer(*columns, **options)``'s ``input_ids`` and ``token_type_ids`` (None when it gives none), called
    :data:`TOKENIZE_CHUNK` texts at a time so that only the ids outlive each call."""
    input_ids: list[list[int]] = []
    token_types: list[list[int]] | None = []
    for start in range(0, len(columns[0]), TOKENIZE_CHUNK):
        encoded = tokenizer(*(column[start:start + TOKENIZE_CHUNK] for column in columns), **options)
        input_ids += encoded["input_ids"]
        types = encoded.get("token_type_ids")
        if types is None or token_types is None:
            token_types = None  # a tokenizer without them (RoBERTa): none for any chunk
        else:
            token_types += types
    return input_ids, token_types


def tokenize_seq_cls(examples: SeqClsExamples, tokenizer, max_length: int) -> TokenizedDataset:
    """Tokenize with truncation to ``max_length`` (pairs: longest-first), no padding."""
    texts = [cut_texts(column, max_length) for column in examples.texts]
    input_ids, token_types = _encode(tokenizer, texts, truncation=True, max_length=max_length, padding=False)
    return TokenizedDataset(input_ids, examples.labels, pad_token_id(tokenizer),
                            token_types if len(examples.texts) == 2 else None,
                            task="seq-cls", regression=examples.regression, lines=examples.lines)


def _no_longer_max_length(max_length: int, positions: int | None, option: str) -> str | None:
    """Where ``max_length`` is the model's ``positions`` (:func:`bca_deploy.models.position_limit`) already, why a
    longer ``option`` cannot hold an example that fills it (the model reads no more tokens, trained or served);
    else None."""
    if positions is None or max_length < positions:
        return None
    return (f"the model reads at most {positions:,} tokens (its positions), so no longer {option} holds them: shorten "
            "them (a shorter system prompt, fewer or shorter tools and turns)")


def _causal_lm_rows(examples: LMExamples, tokenizer, max_length: int, warn: Callable[[str], Any] | None,
                    model: str | Path | None) -> list[tuple[int, list[int], list[int]]]:
    """``(line, ids, target)`` per example, in order, cut at ``max_length`` (see :func:`tokenize_causal_lm`)."""
    eos = _eos_token_id(tokenizer)
    rows: list[tuple[int, list[int], list[int]]] = []
    if examples.format == "messages":
        rows = list(_tokenize_conversations(examples, tokenizer, max_length, model))
        if examples.tool_call_turns and not examples.tool_call_parsers and examples.tool_call_special_tags \
                and warn is not None:
            # the calls are trained on as the template writes them, but a served answer is decoded without special
            # tokens (as vLLM decodes one): no --tool-call-parser would find the calls, and train's serve line says
            # only that; say why while the run can still be changed
            tags = ", ".join(map(repr, examples.tool_call_special_tags))
            warn(f"the tool calls the chat template writes are read back only with the tokenizer's "
                 f"special tokens {tags} kept, and a served answer is decoded without special tokens, so "
                 "no --tool-call-parser finds them (the chat route answers them as text); save the tokenizer with "
                 "those tags as added tokens that are not special (special: false in tokenizer.json's added_tokens, "
                 "as Qwen2.5 and Hermes ship '<tool_call>')")
        return rows
    if examples.format == "text":
        encoded, _ = _encode(tokenizer, [cut_texts(examples.texts, max_length)], truncation=True, max_length=max_length)
        rows = [(line, list(ids), list(ids)) for line, ids in zip(examples.lines, encoded)]
    else:
        cut_prompts, cut_responses = cut_texts(examples.prompts, max_length), cut_texts(examples.responses, max_length)
        prompts, _ = _encode(tokenizer, [cut_prompts], add_special_tokens=True)
        wholes, _ = _encode(tokenizer, [[p + r for p, r in zip(cut_prompts, cut_responses)]], add_special_tokens=True)
        suffix = _appended_special_tokens(tokenizer)
        responses = [_response_in_context(list(p_ids), list(whole), suffix) for p_ids, whole in zip(prompts, wholes)]
        alone = [i for i, ids in enumerate(responses) if not ids]  # a token spans the boundary: tokenized alone
        if alone:
            apart, _ = _encode(tokenizer, [[cut_responses[i] for i in alone]], add_special_tokens=False)
            for i, ids in zip(alone, apart):
                responses[i] = ids
            if warn is not None:
                warn(f"{len(alone):,} of {len(responses):,} responses begin inside the prompt's last token (prompt + "
                     f"response tokenizes across the boundary: {_lines_of(examples.lines, alone)}); they are trained "
                     "on the response tokenized alone, which a served prompt does not continue with: end the prompts "
                     "with a separator (a space, a newline) that the tokenizer keeps as its own token")
        end = [eos] if eos is not None else []
        for line, p_ids, r_ids in zip(examples.lines, prompts, responses):
            # Some tokenizers add a trailing special token (BERT's [SEP]) to the prompt; keep it as a separator.
            rows.append((line, (list(p_ids) + list(r_ids) + end)[:max_length],
                         ([IGNORE_INDEX] * len(p_ids) + list(r_ids) + end)[:max_length]))
    return rows


def tokenize_causal_lm(examples: LMExamples, tokenizer, max_length: int,
                       warn: Callable[[str], Any] | None = None,
                       model: str | Path | None = None,
                       positions: int | None = None) -> tuple[TokenizedDataset, int]:
    """Tokenize for next-token prediction, truncated on the right to ``max_length``.

    messages: each conversation rendered with the tokenizer's chat template and tokenized as ``serve`` tokenizes a
    chat prompt; labels on the assistant turns only (:func:`_tokenize_conversations`; ``model``: the model directory,
    named when its tokenizer has no chat template).

    prompt/response: ``prompt ids (with the tokenizer's special tokens) + response ids + EOS``, labels
    :data:`IGNORE_INDEX` on the prompt; the response ids are those prompt + response gets past the prompt's
    (:func:`_response_in_context`), else the response tokenized alone. text: every token is a target. Examples
    left with no target token after truncation (a prompt longer than ``max_length``) are dropped. ``warn`` gets a line
    naming the responses tokenized alone (TRL warns of the same mismatch) and the examples dropped, by data line;
    where ``max_length`` is the model's ``positions`` (:func:`bca_deploy.models.position_limit`) it says that no
    longer ``--max-length`` holds them, rather than to raise it.

    Returns:
        The dataset and how many examples were dropped.
    """
    # a conversation (or prompt) longer than the tokenizer's model_max_length is tokenized whole to find its turns,
    # then cut: transformers' "Token indices sequence length is longer than the specified maximum sequence length
    # for this model ... will result in indexing errors" would be about a sequence no model runs
    with quiet_loading():
        rows = _causal_lm_rows(examples, tokenizer, max_length, warn, model)
    input_ids, labels, lines = [], [], []
    gone: list[int] = []  # examples left with no target token (the first token is never one: nothing precedes it)
    for index, (line, ids, target) in enumerate(rows):
        if all(t == IGNORE_INDEX for t in target[1:]):
            gone.append(index)
            continue
        input_ids.append(ids)
        labels.append(target)
        lines.append(line)
    dropped = len(gone)
    if dropped and warn is not None and len(input_ids):
        one = dropped == 1
        if examples.format == "text":  # every token is a target: only a text of one token has none (no BOS added)
            warn(f"{dropped:,} {'text is' if one else 'texts are'} a single token, with nothing after it to predict, "
                 f"and {'is' if one else 'are'} left out ({_lines_of(examples.lines, gone)})")
        else:
            warn(f"{dropped:,} {'example has' if one else 'examples have'} no target token within "
                 f"max_length={max_length} (the prompt fills it) and {'is' if one else 'are'} left out "
                 f"({_lines_of(examples.lines, gone)}); "
                 f"{_no_longer_max_length(max_length, positions, '--max-length') or 'raise --max-length'} to train "
                 "on them")
    return TokenizedDataset(input_ids, labels, pad_token_id(tokenizer), task="causal-lm", lines=lines), dropped


def _not_a_turn_prefix(before: str, through: str, whole: str) -> str:
    """Why a conversation's assistant turn cannot be told apart (its renders' tokens are not a prefix of the whole's):
    ``before`` (the turns before it, with the generation prompt), ``through`` (up to it) and ``whole`` rendered."""
    if whole.startswith(before) and whole.startswith(through):
        # the texts follow one another: the tokenizer joins the generation prompt's end to the reply's start (a
        # template whose prompt ends in a space, "assistant: ", before a byte-level BPE's " Hello" token)
        tail = before.rstrip("\n").rpartition("\n")[2][-40:] or before[-40:]
        return (f"the chat template's text is the turns one after another, but the tokenizer reads text across a "
                f"turn's edge as one token (the generation prompt ends {tail!r}, and its end joins the reply's "
                "start), so the prompt serve sends before a reply is not how the reply was trained to follow it; a "
                "generation prompt that ends in a space does this: end it with a newline or a special token, or use "
                "prompt/response columns for this model")
    return ("the chat template does not write the conversation as its turns one after another (the conversation "
            "rendered up to that reply, with the generation prompt, is not a prefix of the whole: the template "
            "rewrites earlier turns), so the assistant turns cannot be told apart; use prompt/response columns for "
            "this model")


#: Seconds and MiB one render of a training conversation's chat template may take (the bounds ``serve`` applies by
#: default to a chat request's render).
CHAT_RENDER_TIMEOUT_S = 5.0
CHAT_RENDER_MEMORY_MB = 512


#: How many assistant turns with tool calls are read back by the parsers (the first ones; a data set writes every
#: turn with one template, and each read is two parses of one turn).
TOOL_CALL_TURNS_READ = 16


def _read_back_tool_calls(examples: LMExamples, tokenizer, span: list[int], message: dict[str, Any]) -> None:
    """Which ``--tool-call-parser`` reads an assistant turn's calls back out of the text the model is trained to
    write for it (``span``: the turn's token ids, decoded as the server decodes an answer, special tokens left out):
    the parsers that read every turn so far stay in ``examples.tool_call_parsers``. A run trained on calls only one
    parser reads prints that parser in its serve command."""
    text = tokenizer.decode(span, skip_special_tokens=True)
    calls = [(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]]
    fitting = parsers_reading(text, calls)
    if not fitting and not examples.tool_call_special_tags:
        special = set(tokenizer.all_special_ids)
        tags = tuple(dict.fromkeys(tokenizer.convert_ids_to_tokens(t) for t in span if t in special
                                   and t != tokenizer.eos_token_id))
        if tags and parsers_reading(tokenizer.decode(span, skip_special_tokens=False), calls):
            examples.tool_call_special_tags = tags
    examples.tool_call_parsers = tuple(fitting) if examples.tool_call_turns == 0 else \
        tuple(name for name in examples.tool_call_parsers if name in fitting)
    examples.tool_call_turns += 1


def _tokenize_conversations(examples: LMExamples, tokenizer, max_length: int,
                            model: str | Path | None) -> list[tuple[int, list[int], list[int]]]:
    """``(line, ids, labels)`` per conversation: the conversation rendered with the tokenizer's chat template, as
    ``serve`` renders and tokenizes a ``/v1/chat/completions`` request's messages (the same renderer: a worker process,
    each render bounded in time, memory and length; :data:`~bca_deploy.serving.chat_template.CHAT_TOKENIZE_OPTIONS`),
    truncated to ``max_length``; labels are the token ids of the assistant turns, :data:`IGNORE_INDEX` elsewhere.

    An assistant message ``i``'s span is what ``messages[:i + 1]`` renders past ``messages[:i]`` rendered with the
    generation prompt (what serve sends the model before it answers): its content and the template's end of turn.
    That holds only when each of those renders' tokens is a prefix of the whole conversation's; a template that
    rewrites earlier turns (drops past reasoning, numbers turns from the end) is refused, naming the line.

    Raises:
        DataError: the tokenizer has no chat template (naming ``model``), or a conversation the template refuses,
            stops at a bound, renders past ``max_length`` × :data:`CHARS_PER_TOKEN_BOUND` characters, or whose
            assistant spans are not token prefixes (every such line named).
    """
    from ..errors import ServingError
    from ..serving.chat_template import (CHAT_TOKENIZE_OPTIONS, ChatTemplateLimitError, ChatTemplateRenderer,
                                         ChatTemplateRenderError, RenderedTooLongError, chat_template_source)

    path = examples.path
    where = model if model is not None else "the base model"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: conversations are rendered with the tokenizer's chat "
                        f"template, and the tokenizer of {where} has none; give the data as prompt/response columns "
                        "(--prompt-column, --response-column) instead, or save a chat template with the model's "
                        "tokenizer (chat_template.jinja)")
    source = chat_template_source(model)
    renderer = ChatTemplateRenderer(lambda: tokenizer, source=f"{where}: {source}", timeout_s=CHAT_RENDER_TIMEOUT_S,
                                    memory_mb=CHAT_RENDER_MEMORY_MB, workers=1)
    limit = max(1, max_length) * CHARS_PER_TOKEN_BOUND
    out, problems = [], []

    def render(messages, prompt: bool) -> str:
        # a row's tools as serve hands a request's to the template: apply_chat_template(..., tools=tools)
        return renderer.render_sync(messages, limit, add_generation_prompt=prompt,
                                    template_kwargs={"tools": tools} if tools else None)

    def ids_of(messages, prompt: bool) -> list[int]:
        return list(tokenizer(render(messages, prompt), **CHAT_TOKENIZE_OPTIONS)["input_ids"])

    conversations = examples.conversations or []
    try:
        for line, messages, tools in zip(examples.lines, conversations, examples.tools or [None] * len(conversations)):
            if len(problems) > 10:  # enough to show; each refused render may have taken the full time bound
                break
            try:
                whole = ids_of(messages, False)
                target = [IGNORE_INDEX] * len(whole)
                bad = None
                for i, message in enumerate(messages):
                    if message["role"] != "assistant":
                        continue
                    before = ids_of(messages[:i], True)
                    if len(before) >= max_length and before[:max_length] == whole[:max_length]:
                        break  # this reply and every later one start past the cut: two renders per turn saved
                    through = ids_of(messages[:i + 1], False)
                    if whole[:len(before)] != before or whole[:len(through)] != through or len(through) < len(before):
                        bad = i
                        break
                    target[len(before):len(through)] = whole[len(before):len(through)]
                    if message.get("tool_calls") and examples.tool_call_turns < TOOL_CALL_TURNS_READ:
                        _read_back_tool_calls(examples, tokenizer, whole[len(before):len(through)], message)
            except RenderedTooLongError as exc:
                problems.append(f"{_at(line)}: the chat template writes the conversation as {exc.chars:,} characters; "
                                f"at most {limit:,} are read at max_length={max_length} (shorten it, or raise "
                                "--max-length)")
                continue
            except ChatTemplateRenderError as exc:
                problems.append(f"{_at(line)}: the chat template refused the conversation ({exc.why})")
                continue
            except ChatTemplateLimitError as exc:
                problems.append(f"{_at(line)}: {str(exc).removeprefix('messages: ').split(' (--chat-template')[0]}")
                continue
            if bad is not None:
                problems.append(f"{_at(line)}: message {bad} (assistant): " + _not_a_turn_prefix(
                    render(messages[:bad], True), render(messages[:bad + 1], False), render(messages, False)))
                continue
            out.append((line, whole[:max_length], target[:max_length]))
    except ServingError as exc:  # a worker could not start or died
        raise DataError(f"{path}: the chat template of {where} cannot be rendered: {exc}") from None
    finally:
        renderer.close()
    if problems:
        raise DataError(format_problems(f"{path}: conversations the chat template of {where} ({source}) cannot "
                                        "train on:", problems, limit=10))
    return out


def _lines_of(lines: Sequence[Any], indices: Sequence[int], shown: int = 5) -> str:
    """``line 3, 8, 12 and 4 more`` (``rows ...`` of a Parquet file): where the examples at ``indices`` are in their
    data file."""
    named = [str(lines[i]) for i in indices[:shown]]
    more = f" and {len(indices) - shown:,} more" if len(indices) > shown else ""
    word = "row" if indices and isinstance(lines[indices[0]], _Row) else "line"  # (a Parquet file has no lines)
    return f"{word}{'s' if len(indices) > 1 else ''} {', '.join(named)}{more}"


def _example_key(examples: SeqClsExamples | LMExamples, i: int) -> Any:
    """What example ``i`` of ``examples`` is as a model input, for comparing two files: its text(s) with runs of
    white space as one space (a TSV's trailing space, a JSON copy's stripped one: the tokenizer reads them alike);
    a conversation with its tools, as JSON."""
    if isinstance(examples, SeqClsExamples):
        return tuple(" ".join(column[i].split()) for column in examples.texts)
    if examples.conversations is not None:
        tools = examples.tools[i] if examples.tools is not None else None
        return json.dumps([examples.conversations[i], tools], sort_keys=True, default=str)
    if examples.texts is not None:
        return " ".join(examples.texts[i].split())
    return (" ".join(examples.prompts[i].split()), " ".join(examples.responses[i].split()))


def seen_in_training(training: SeqClsExamples | LMExamples, held_out: SeqClsExamples | LMExamples) -> list[int]:
    """The indices of the examples of ``held_out`` whose input is also an example of ``training`` (the same text or
    texts, conversation or prompt and response, white space aside): scored, they measure what was learnt by heart,
    not what carries over (the same file passed twice, or a held-out split cut from rows the training file holds)."""
    if type(training) is not type(held_out):
        return []
    trained = {_example_key(training, i) for i in range(len(training))}
    return [i for i in range(len(held_out)) if _example_key(held_out, i) in trained]


def seen_in_training_note(training: SeqClsExamples | LMExamples, held_out: SeqClsExamples | LMExamples) -> str | None:
    """The note for held-out examples that are training examples too (None: there are none)."""
    seen = seen_in_training(training, held_out)
    if not seen:
        return None
    return (f"{held_out.path}: {len(seen):,} of its {len(held_out):,} examples ({len(seen) / len(held_out):.0%}) are "
            f"also in the training data {training.path} ({_lines_of(held_out.lines, seen)}): the held-out metrics, "
            "and the best/ checkpoint they pick, count examples the adapter was trained on; hold out rows "
            "the training file does not have")


def _appended_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer appends after a text (BERT's [SEP], an ``add_eos_token`` EOS; 0 for
    Llama's BOS-only or a byte-level BPE), from one probe text."""
    bare = tokenizer("x y", add_special_tokens=False)["input_ids"]
    full = tokenizer("x y", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return len(full) - start - len(bare)
    return 0


def _response_in_context(prompt_ids: list[int], whole_ids: list[int], suffix: int) -> list[int] | None:
    """The response's tokens as the tokenizer writes them after the prompt: the ids of prompt + response past the
    prompt's own (None where the two do not share the prompt's tokens: a token spans the boundary).

    Tokenized alone, a response that starts with a space gets a SentencePiece tokenizer's dummy prefix too
    (Llama-2, Mistral: `` Grace`` -> ``['▁', '▁Grace']``), a token no prompt + response text ever gives: the
    adapter learnt to answer with an extra space. In context it is ``['▁Grace']``, what serving continues with.
    """
    core = prompt_ids[:len(prompt_ids) - suffix]
    whole = whole_ids[:len(whole_ids) - suffix]
    if len(whole) <= len(core) or whole[:len(core)] != core:
        return None
    return whole[len(core):]


def check_token_range(dataset: TokenizedDataset, vocabulary: int | None, path: str | Path, tokenizer,
                      model: str | Path) -> None:
    """Raise :class:`DataError` if the tokenizer gave ids (or a pad id) the model has no embedding row for.

    ``vocabulary``: the model's embedded ids (:func:`bca_deploy.models.vocabulary_size`; None: unknown, no
    check). Such ids come from a tokenizer that does not belong to the model (or tokens added to it without
    resizing the embeddings); the embedding lookup would fail mid-training with an ``IndexError``.
    """
    if not vocabulary:
        return
    bad = []
    for index, ids in enumerate(dataset.input_ids):
        outside = sorted({int(t) for t in ids if not 0 <= int(t) < vocabulary})
        if outside:
            line = dataset.lines[index] if dataset.lines is not None else index + 1
            bad.append((line, outside))
    problems = [f"{_at(line)}: id{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids[:5]))}"
                + (" ..." if len(ids) > 5 else "") + _token_names(tokenizer, ids[:5]) for line, ids in bad]
    if not 0 <= dataset.pad_id < vocabulary:
        problems.insert(0, f"the pad id {dataset.pad_id}{_token_names(tokenizer, [dataset.pad_id])}")
    if problems:
        raise DataError(format_problems(
            f"{path}: the tokenizer of {model} gives token ids the model has no embedding for (vocab_size "
            f"{vocabulary}: ids 0..{vocabulary - 1}); the tokenizer does not belong to this model, or tokens were "
            "added to it without resizing the model's embeddings. Save the model's own tokenizer in the model "
            "directory (from Python, train() and evaluate() also take tokenizer=):", problems, limit=10))


def _token_names(tokenizer, ids: Sequence[int]) -> str:
    names = token_names(tokenizer, ids)
    return f" ({', '.join(names)})" if names else ""


def _max_length_advice(examples: LMExamples, tokenizer, max_length: int, positions: int | None = None) -> str:
    """How far to raise ``max_length`` when every prompt fills it: the shortest prompt's length in tokens (read
    up to 16 × ``max_length``), for prompt/response data; conversations and texts get the plain advice. Where
    ``max_length`` is the model's ``positions`` already, no longer one helps: the examples must be shortened."""
    at_limit = _no_longer_max_length(max_length, positions, "max_length (CLI: --max-length)")
    if at_limit is not None:
        return at_limit
    if examples.format != "prompt-response":
        return "raise max_length (CLI: --max-length)"
    reach = 16 * max_length
    ids, _ = _encode(tokenizer, [cut_texts(examples.prompts, reach)], add_special_tokens=True)
    shortest = min((len(i) for i in ids), default=0)
    if shortest >= reach:
        return f"every prompt is longer than {reach:,} tokens: shorten the prompts"
    return (f"the shortest prompt is {shortest:,} tokens: raise max_length (CLI: --max-length) above it, e.g. "
            f"--max-length {1 << (shortest + 64 - 1).bit_length()} leaves room for a response")


def load_dataset(
    path: str | Path,
    task: str,
    tokenizer,
    max_length: int,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    regression: bool | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    text_column: str = "text",
    messages_column: str = "messages",
    tools_column: str = TOOLS_COLUMN,
    label_names: Sequence[str] | None = None,
    warn: Callable[[str], Any] | None = None,
    columns_from: str | None = None,
    model: str | Path | None = None,
    head_text_pair: bool | None = None,
    head_of: str = "the model",
    head_record: str | None = None,
    positions: int | None = None,
):
    """Read and tokenize ``path`` for ``task``; returns ``(examples, dataset)``.

    ``label_names``, ``head_*`` (seq-cls): see :func:`load_seq_cls`; ``columns_from``: see it and
    :func:`load_causal_lm`. ``warn``
    (causal-lm): gets lines about examples tokenized or left out unlike the rest (:func:`tokenize_causal_lm`).
    ``model`` (causal-lm conversations): the model directory, named when its tokenizer has no chat template.
    ``tools_column`` (causal-lm conversations): the column of each row's functions (:data:`TOOLS_COLUMN`).
    ``positions`` (causal-lm): the model's :func:`~bca_deploy.models.position_limit`, named instead of "raise
    max_length" for examples that do not fit where ``max_length`` is that limit already.
    """
    if task == "seq-cls":
        examples = load_seq_cls(path, text_columns, label_column, regression, label_names=label_names,
                                columns_from=columns_from, head_text_pair=head_text_pair, head_of=head_of,
                                head_record=head_record)
        return examples, tokenize_seq_cls(examples, tokenizer, max_length)
    if task == "causal-lm":
        examples = load_causal_lm(path, prompt_column, response_column, text_column, messages_column, tools_column,
                                  columns_from=columns_from, warn=warn)
        dataset, dropped = tokenize_causal_lm(examples, tokenizer, max_length,
                                              warn=None if warn is None else lambda line: warn(f"{path}: {line}"),
                                              model=model, positions=positions)
        if len(dataset) == 0:
            raise DataError(f"{path}: no example has a target token within max_length={max_length} ({dropped} "
                            f"dropped: prompts too long); "
                            f"{_max_length_advice(examples, tokenizer, max_length, positions)}")
        return examples, dataset
    raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
