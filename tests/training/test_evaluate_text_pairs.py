"""``evaluate`` refuses a data file of the other kind than the adapter's head was trained on: single texts for a head
trained on text pairs (``task.head.text_pair`` true, as ``train`` records it), and pairs for one trained on single
texts. Before, naming the file's columns with ``--text-columns`` (or an adapter copied without its training record,
whose columns are then found in the file) printed metrics without a word: a label read off an input the head never
saw. The rule is the server's ``/v1/classify`` one (:func:`bca_deploy.config.text_pair_mismatch`); the refusal comes
before the model is loaded, and names the adapter, the file and its columns."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    config,
    one_thread,
    subprocess_env,
    text_pair_data,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pair-trained and a single-text-trained adapter of one tiny BERT, each also copied without its training
    record (an adapter handed on alone: only its adapter_config.json tells how its head was trained); and the pair
    run as written before the head recorded text_pair (its training record's columns tell)."""
    root = tmp_path_factory.mktemp("evaluate_pairs")
    model, pairs, single = text_pair_data(root)
    out = {"model": model, "pairs": pairs, "single": single,
           "pair": train(config(model, pairs, root / "pair", max_steps=1)).last_dir,
           "one": train(config(model, single, root / "one", max_steps=1)).last_dir}
    for name in ("pair", "one"):
        alone = root / f"{name}-alone"
        alone.mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(out[name] / file, alone / file)
        out[f"{name}-alone"] = alone
    out["pair-older"] = root / "pair-older"
    shutil.copytree(out["pair"], out["pair-older"])
    written = json.loads((out["pair-older"] / "adapter_config.json").read_text())
    del written["task"]["head"]["text_pair"]
    (out["pair-older"] / "adapter_config.json").write_text(json.dumps(written))
    assert json.loads((out["pair"] / "adapter_config.json").read_text())["task"]["head"]["text_pair"] is True
    assert json.loads((out["one"] / "adapter_config.json").read_text())["task"]["head"]["text_pair"] is False
    return out


@pytest.mark.parametrize("adapter, data, columns, read, trained", [
    ("pair", "single", ["sentence"], "single texts (text column 'sentence')", "text pairs (its head's text_pair is true)"),
    ("pair-alone", "single", None, "single texts (text column 'sentence')",
     "text pairs (its head's text_pair is true)"),
    ("pair-older", "single", ["sentence"], "single texts (text column 'sentence')",
     "text pairs (its bca_training.json records text_columns sentence1, sentence2)"),
    ("one", "pairs", ["sentence1", "sentence2"], "text pairs (text columns 'sentence1' + 'sentence2')",
     "single texts (its head's text_pair is false)"),
    ("one-alone", "pairs", None, "text pairs (text columns 'sentence1' + 'sentence2')",
     "single texts (its head's text_pair is false)"),
])
def test_a_file_of_the_other_kind_is_refused_before_the_model_loads(runs, monkeypatch, adapter, data, columns, read,
                                                                    trained):
    import bca_deploy.training.evaluation as evaluation

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was refused")

    monkeypatch.setattr(evaluation, "_load_for_evaluation", never)
    with pytest.raises(DataError) as caught:
        evaluate(EvaluateConfig(model=runs["model"], adapter=runs[adapter], data=runs[data], text_columns=columns,
                                device="cpu"))
    message = str(caught.value)
    assert f"{runs[data]}: not the kind of input adapter {runs[adapter]} was trained on" in message, message
    assert f"it is read as {read}, but adapter {runs[adapter]} was trained on {trained}" in message, message
    found = "'sentence', 'label'" if data == "single" else "'sentence1', 'sentence2', 'label'"
    assert f"columns found in {runs[data]}: {found}" in message, message


@pytest.mark.parametrize("adapter, data", [("pair", "pairs"), ("pair-alone", "pairs"), ("pair-older", "pairs"),
                                           ("one", "single"), ("one-alone", "single")])
def test_a_file_of_the_kind_the_head_was_trained_on_is_scored(runs, adapter, data):
    metrics = evaluate(EvaluateConfig(model=runs["model"], adapter=runs[adapter], data=runs[data], device="cpu"))
    assert metrics["n"] == 32


def test_the_cli_exits_2_naming_the_adapter_the_file_and_its_columns(runs):
    args = ["evaluate", "--model", str(runs["model"]), "--adapter", str(runs["pair"]), "--data", str(runs["single"]),
            "--text-columns", "sentence", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "bca_deploy.cli", *args], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "accuracy" not in result.stdout
    assert f"adapter {runs['pair']} was trained on text pairs" in result.stderr, result.stderr
    assert f"columns found in {runs['single']}: 'sentence', 'label'" in result.stderr, result.stderr
