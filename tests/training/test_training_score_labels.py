"""Whole-number scores (an STS-B subset whose scores are 0..5) written as decimals: a float column is regression, as
HF's run_glue decides (``is_regression = label dtype is float32/float64``); integers stay class ids; a task option
(``--no-regression``, ``--num-labels``) says otherwise."""

from __future__ import annotations

import json

import pytest

import bca_deploy as bd
from bca_deploy.training import DataError, EvaluateConfig, evaluate, train
from bca_deploy.training.data import load_seq_cls
from training_helpers import config, one_thread, sst2_rows, tiny_model_dir, write_jsonl  # noqa: F401 - autouse

SCORES = [4, 3, 0, 5, 2, 1, 4, 3]

# the dtype pandas 3.1.1 gives each column (pd.read_csv(...)["score"].dtype), which is the dtype the csv loader of
# datasets gives run_glue: float64 is regression there
CSV_COLUMNS = {
    "glue": ("{}.000", "float64"),  # STS-B as GLUE distributes it, every score whole
    "pandas": ("{}.0", "float64"),  # a float column as DataFrame.to_csv writes it
    "exponent": ("{}e0", "float64"),
    "integers": ("{}", "int64"),
}


def _table(path, spell, separator="\t"):
    rows = [(f"sentence {i} one", f"sentence {i} two", spell.format(s)) for i, s in enumerate(SCORES)]
    path.write_text(separator.join(("sentence1", "sentence2", "score")) + "\n"
                    + "".join(separator.join(row) + "\n" for row in rows))
    return path


def test_a_float_column_is_regression_even_when_every_score_is_whole(tmp_path):
    """Each column reads as regression exactly when pandas types it float64 (JSON: when json types it float, as
    datasets' arrow reader does); whole decimals were 6 class ids."""
    for name, (spell, dtype) in CSV_COLUMNS.items():
        for suffix, separator in ((".tsv", "\t"), (".csv", ",")):
            examples = load_seq_cls(_table(tmp_path / f"{name}{suffix}", spell, separator), label_column="score")
            assert examples.regression == (dtype == "float64"), (name, suffix)
            assert examples.labels == ([float(s) for s in SCORES] if examples.regression else SCORES)
            assert examples.whole_scores == examples.regression
    mixed = tmp_path / "mixed.csv"  # one decimal among integers: pandas' float64
    mixed.write_text("sentence,label\na,1\nb,2.0\nc,0\n")
    assert load_seq_cls(mixed).regression
    for number, regression in ((float, True), (int, False)):
        records = [{"sentence1": f"s {i}", "sentence2": f"t {i}", "label": number(s)} for i, s in enumerate(SCORES)]
        path = write_jsonl(tmp_path / f"{number.__name__}.jsonl", records)
        assert isinstance(json.loads(path.read_text().splitlines()[0])["label"], float) == regression
        assert load_seq_cls(path).regression == regression
    # a task option says classification: whole decimals are class ids
    ids = load_seq_cls(tmp_path / "pandas.tsv", label_column="score", regression=False)
    assert not ids.regression and ids.labels == SCORES and not ids.whole_scores


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    texts = [s for s, _ in sst2_rows("train", 64)] + [f"sentence {i} one two" for i in range(8)]
    return {"bare": tiny_model_dir(root / "bare", "bert-bare", texts),
            "bert": tiny_model_dir(root / "bert", "bert", texts)}  # its classification head saved: 2 classes


def test_training_on_whole_decimal_scores(models, tmp_path, capsys):
    """Training on STS-B scores written 4.0 trains one output (MSE) with a note naming --no-regression; --num-labels 6
    or --no-regression trains 6 classes without it; a base whose trained head has 2 classes is refused naming both
    fixes; an adapter without a training record is evaluated by its head (2 classes: 1.0 is class 1)."""
    data = _table(tmp_path / "scores.tsv", "{}.0")
    result = train(config(models["bare"], data, tmp_path / "a", label_column="score", max_steps=1))
    assert result.config["regression"] and result.config["num_labels"] == 1 and result.metric == "pearson"
    head = bd.read_adapter(result.last_dir)[0].task.head
    assert head.num_labels == 1 and head.problem_type == "regression"
    err = capsys.readouterr().err
    assert f"note: {data}: labels written as decimals (such as 4.0) are read as real-valued scores" in err
    assert "pass --no-regression to read them as class ids" in err
    for option in ({"num_labels": 6}, {"regression": False}):
        result = train(config(models["bare"], data, tmp_path / f"b{len(option)}{list(option)[0]}",
                              label_column="score", max_steps=1, **option))
        assert not result.config["regression"] and result.config["num_labels"] == 6, option
        assert "real-valued scores" not in capsys.readouterr().err
    with pytest.raises(DataError, match=r"trained head has 2 classes \(whole numbers written as decimals: pass "
                                        r"--no-regression to read them as class ids\); pass --new-head"):
        train(config(models["bert"], data, tmp_path / "c", label_column="score", max_steps=1))
    # an adapter made elsewhere (no bca_training.json) with a 2-class head, on a file of 0.0/1.0 labels
    binary = _table(tmp_path / "binary.tsv", "{}")
    binary.write_text(binary.read_text().replace("\t4\n", "\t1\n").replace("\t3\n", "\t0\n").replace("\t5\n", "\t1\n")
                      .replace("\t2\n", "\t0\n"))
    result = train(config(models["bare"], binary, tmp_path / "d", label_column="score", max_steps=1))
    (result.last_dir / "bca_training.json").unlink()
    decimals = tmp_path / "decimals.tsv"
    decimals.write_text(binary.read_text().replace("\t1\n", "\t1.0\n").replace("\t0\n", "\t0.0\n"))
    metrics = evaluate(EvaluateConfig(model=models["bare"], adapter=result.last_dir, data=decimals, max_length=32,
                                      text_columns=["sentence1", "sentence2"], label_column="score"))
    assert "accuracy" in metrics and metrics["n"] == len(SCORES)
