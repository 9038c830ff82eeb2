"""Hostile and broken .parquet data files: a DataError naming the file (the CLI: exit 2, no traceback), the file left as
it was, nothing written to --out.

Truncated, not Parquet at all, a corrupt footer, a footer length claiming gigabytes, an encrypted footer, corrupt data
pages, strings that are not UTF-8, no rows, no row groups, a directory named ``x.parquet``, a folder of Parquet
shards, pyarrow missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")  # the test extra installs it (CI)
pq = pytest.importorskip("pyarrow.parquet")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from adversarial_helpers import assert_bca_error, assert_clean_cli_error, count, figures_fixture, run_cli  # noqa: E402
from training_helpers import sst2_rows, tiny_model_dir  # noqa: E402

from bca_deploy.training import data as data_module  # noqa: E402
from bca_deploy.training.data import load_seq_cls  # noqa: E402

figures = figures_fixture("test_parquet_hostile.py")

ROWS = sst2_rows("dev", 40)
SCHEMA = pa.schema([("sentence", pa.string()), ("label", pa.int64())])


def _good(path: Path) -> bytes:
    pq.write_table(pa.table({"sentence": [s for s, _ in ROWS], "label": [y for _, y in ROWS]}), path)
    return path.read_bytes()


def _with_tail(data: bytes, length: int | None = None, magic: bytes = b"PAR1") -> bytes:
    footer = int.from_bytes(data[-8:-4], "little") if length is None else length
    return data[:-8] + footer.to_bytes(4, "little") + magic


def _corrupt_footer(data: bytes) -> bytes:
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer
    return data[:start] + b"\xff" * footer + data[-8:]


def _corrupt_pages(data: bytes) -> bytes:
    middle = bytearray(data)
    for i in range(8, len(data) // 2):  # the data pages (the footer is at the end)
        middle[i] ^= 0x5A
    return bytes(middle)


def _not_utf8(path: Path) -> None:
    raw = pa.array([b"fine", b"caf\xe9 au lait"], pa.binary())  # latin-1 bytes stored as a string column
    texts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    pq.write_table(pa.table({"sentence": texts, "label": [1, 0]}), path)


def _zero_rows(path: Path) -> None:
    pq.write_table(SCHEMA.empty_table(), path)  # one row group of no rows


def _zero_row_groups(path: Path) -> None:
    pq.ParquetWriter(path, SCHEMA).close()


#: name -> (how to make the file from a good one's bytes (or write it), needle in the message)
CASES = {
    "empty": (lambda good, path: path.write_bytes(b""), "not a Parquet file (0 bytes"),
    "magic-only": (lambda good, path: path.write_bytes(b"PAR1"), "truncated Parquet file (4 bytes"),
    "tsv-named-parquet": (lambda good, path: path.write_bytes(b"sentence\tlabel\nfine\t1\n"),
                          "not a Parquet file (it starts with b'sent'"),
    "truncated": (lambda good, path: path.write_bytes(good[: len(good) // 2]), "truncated Parquet file"),
    "corrupt-footer": (lambda good, path: path.write_bytes(_corrupt_footer(good)), "its footer is corrupt"),
    "footer-claims-gigabytes": (lambda good, path: path.write_bytes(_with_tail(good, 3_000_000_000)),
                                "claims 3,000,000,000 bytes"),
    "encrypted-footer": (lambda good, path: path.write_bytes(_with_tail(good, magic=b"PARE")),
                         "an encrypted Parquet file"),
    "corrupt-pages": (lambda good, path: path.write_bytes(_corrupt_pages(good)), "cannot be read after row 0"),
    "not-utf8-strings": (lambda good, path: _not_utf8(path),
                         "row 2: column 'sentence' holds bytes that are not UTF-8 text"),
    "zero-rows": (lambda good, path: _zero_rows(path), "holds no rows (1 row group(s)"),
    "zero-row-groups": (lambda good, path: _zero_row_groups(path), "holds no rows (0 row group(s)"),
    "directory": (lambda good, path: path.mkdir(), "a directory, not a data file; the data files read are .tsv (.tab), "
                                                   ".csv, .jsonl (.ndjson, .json) or .parquet"),
    "folder-of-shards": (lambda good, path: (path.mkdir(), (path / "train-00000-of-00002.parquet").write_bytes(good),
                                             (path / "train-00001-of-00002.parquet").write_bytes(good)),
                         "a folder of Parquet files (train-00000-of-00002.parquet, train-00001-of-00002.parquet)"),
}


def _make(tmp_path: Path, name: str) -> Path:
    good = _good(tmp_path / "good.parquet")
    path = tmp_path / f"{name}.parquet"
    CASES[name][0](good, path)
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {"": path.read_bytes()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_broken_parquet_file_is_refused_naming_it(tmp_path, name):
    path = _make(tmp_path, name)
    before = _snapshot(path)
    error = assert_bca_error(lambda: load_seq_cls(path), f"load_seq_cls({name})")
    assert str(path) in str(error) and CASES[name][1] in str(error), (name, str(error))
    assert _snapshot(path) == before
    count("train data reader (Parquet)")


def test_a_footer_past_the_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    _good(path)
    monkeypatch.setattr(data_module, "MAX_PARQUET_FOOTER_BYTES", 64)
    monkeypatch.setattr(pq, "ParquetFile", None)  # any use of pyarrow's reader would fail the test
    error = assert_bca_error(lambda: load_seq_cls(path), "footer over the bound")
    assert "at most 64 are read" in str(error)


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_file_rewritten_while_it_is_read_is_refused_or_read_as_it_was(tmp_path, monkeypatch, how):
    """Another program rewrites the data file (other columns) after its footer is read and before its rows are: in
    place, a DataError naming the file (it was a KeyError traceback: the old footer's columns asked of the new file);
    written to a temporary name and renamed over it, the file as it was when opened (it was the new file's rows
    under the old footer's schema)."""
    path = tmp_path / "d.parquet"
    _good(path)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"other": list(range(3))}), other)
    original = data_module._parquet_type_problem

    def rewrite(*args, **kwargs):  # called between the footer's read and the rows'
        if how == "in place":
            path.write_bytes(other.read_bytes())
        else:
            other.replace(path)
        monkeypatch.setattr(data_module, "_parquet_type_problem", original)
        return original(*args, **kwargs)

    monkeypatch.setattr(data_module, "_parquet_type_problem", rewrite)
    if how == "in place":
        error = assert_bca_error(lambda: load_seq_cls(path), "rewritten in place")
        assert str(path) in str(error) and "rewritten while it was read" in str(error), str(error)
    else:
        examples = load_seq_cls(path)
        assert (examples.texts[0], examples.labels) == ([s for s, _ in ROWS], [y for _, y in ROWS])
        assert pq.read_table(path).column_names == ["other"]  # (what the test did)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("bert"), "bert", [s for s, _ in ROWS])


def test_without_pyarrow_a_parquet_file_names_the_install_command(tmp_path, monkeypatch, bert):
    path = tmp_path / "d.parquet"
    _good(path)
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(sys.modules, module, None)  # import pyarrow raises ImportError
    error = assert_bca_error(lambda: load_seq_cls(path), "no pyarrow")
    assert str(path) in str(error) and 'pip install "bca-deploy[parquet]"' in str(error), str(error)
    result = run_cli(["evaluate", "--model", bert, "--data", path])
    assert_clean_cli_error(result, "evaluate without pyarrow")
    assert 'pip install "bca-deploy[parquet]"' in result.output


@pytest.mark.parametrize("name", ["truncated", "footer-claims-gigabytes", "zero-rows", "folder-of-shards"])
def test_train_and_evaluate_exit_2_and_write_nothing(tmp_path, bert, name):
    path = _make(tmp_path, name)
    good = tmp_path / "good.parquet"
    fast = ["--block-size", "8", "--batch-size", "16", "--max-length", "32", "--max-steps", "2", "--no-progress"]
    for args in (["train", "--model", bert, "--data", path, *fast],
                 ["train", "--model", bert, "--data", good, "--eval-data", path, *fast]):
        out = tmp_path / "out"
        result = run_cli([*args, "--out", out])
        assert_clean_cli_error(result, args)
        assert str(path) in result.output and CASES[name][1] in result.output, result.output
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    result = run_cli(["evaluate", "--model", bert, "--data", path])
    assert_clean_cli_error(result, "evaluate")
    assert str(path) in result.output and CASES[name][1] in result.output, result.output
    count("train/evaluate CLI (Parquet)", 3)
