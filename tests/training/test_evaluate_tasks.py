"""``evaluate`` refuses adapters for tasks it does not handle (a PEFT TOKEN_CLS or FEATURE_EXTRACTION adapter),
naming the adapter's task, instead of running them as sequence classification."""

from __future__ import annotations

import pytest

from bca_deploy.training import EvaluateConfig, TrainingConfigError, evaluate
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    data_and_bert,
    one_thread,
    subprocess_env,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_and_bert(tmp_path_factory.mktemp("evaluate-tasks"), 64)


def _peft_adapter(files, task_type: str):
    from peft import C3AConfig, get_peft_model
    from transformers import AutoModel, BertForTokenClassification

    directory = files["root"] / task_type.lower()
    if not directory.exists():
        loader = BertForTokenClassification if task_type == "TOKEN_CLS" else AutoModel
        model = get_peft_model(loader.from_pretrained(files["bert"]),
                               C3AConfig(task_type=task_type, target_modules=["query"], block_size=8))
        model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("task_type, named", [("TOKEN_CLS", "PEFT task_type 'TOKEN_CLS'"),
                                              ("FEATURE_EXTRACTION", "task 'feature-extraction'")])
def test_an_adapter_for_a_task_evaluate_does_not_handle_is_refused(files, task_type, named):
    adapter = _peft_adapter(files, task_type)
    with pytest.raises(TrainingConfigError) as err:
        evaluate(EvaluateConfig(model=files["bert"], adapter=adapter, data=files["small"], device="cpu"))
    message = str(err.value)
    assert named in message and "handles seq-cls and causal-lm only" in message
    assert "contradicts" not in message and "\n" not in message
    with pytest.raises(TrainingConfigError, match="handles seq-cls and causal-lm only"):  # also with a --task
        evaluate(EvaluateConfig(model=files["bert"], adapter=adapter, data=files["small"], device="cpu",
                                task="seq-cls"))


def test_the_cli_exits_2_with_one_line(files):
    import subprocess
    import sys

    adapter = _peft_adapter(files, "TOKEN_CLS")
    result = subprocess.run([sys.executable, "-m", "bca_deploy.cli", "evaluate", "--model", str(files["bert"]),
                             "--adapter", str(adapter), "--data", str(files["small"]), "--device", "cpu"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "TOKEN_CLS" in result.stderr
    assert "accuracy" not in result.stdout


def test_evaluating_on_another_base_than_the_run_trained_on_is_noted(files, tmp_path, capsys):
    """A checkpoint of the same shapes loads the adapter without a word and gives other numbers (helper-75): the
    run's recorded base, when it is a directory here, is compared with --model."""
    import shutil

    from bca_deploy.training import train
    from training_helpers import config

    train(config(files["bert"], files["small"], tmp_path / "run", max_steps=1))
    twin = tmp_path / "twin"
    shutil.copytree(files["bert"], twin)
    capsys.readouterr()
    evaluate(EvaluateConfig(model=files["bert"], adapter=tmp_path / "run", data=files["small"]))
    assert "was trained on" not in capsys.readouterr().err
    evaluate(EvaluateConfig(model=twin, adapter=tmp_path / "run", data=files["small"]))
    assert f"note: {tmp_path / 'run' / 'last'} was trained on {files['bert']} (bca_training.json); evaluating it on " \
        f"{twin}" in capsys.readouterr().err
