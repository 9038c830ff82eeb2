"""Which tasks an architecture exports, the task of an export (explicit, from the adapters, from the
checkpoint), and adapter naming."""

from __future__ import annotations

import pytest
from bca_deploy.exporters import UnsupportedExportError, resolve_task, supported_tasks
from bca_deploy.exporters.loading import DECODER_MODEL_TYPES, ENCODER_MODEL_TYPES, adapter_names
from bca_deploy.models import TaskError
from exporters_helpers import tiny  # noqa: F401  (fixtures)


@pytest.mark.parametrize(
    ("name", "task"),
    [("llama", "text-generation-with-past"), ("gpt2", "text-generation-with-past"), ("bert", "feature-extraction"),
     ("roberta", "text-classification")],
)
def test_task_is_inferred_from_the_checkpoint(tiny, name, task):
    model_dir, _ = tiny(name)
    assert resolve_task(model_dir) == (task, name)


def test_task_synonyms_and_explicit_tasks(tiny):
    model_dir, _ = tiny("llama")
    assert resolve_task(model_dir, "causal-lm")[0] == "text-generation-with-past"
    assert resolve_task(model_dir, "text-generation")[0] == "text-generation"
    assert resolve_task(model_dir, "feature-extraction-with-past")[0] == "feature-extraction-with-past"
    with pytest.raises(TaskError, match="fill-mask.*text-classification"):
        resolve_task(model_dir, "fill-mask")
    assert resolve_task(model_dir, "text-classification")[0] == "text-classification"  # (a decoder classifier)
    encoder_dir, _ = tiny("bert")
    with pytest.raises(UnsupportedExportError, match="'text-generation'.*tasks it exports for bert.*`bca-deploy "
                                                     "merge` still writes the adapted model"):
        resolve_task(encoder_dir, "text-generation")


def test_supported_architectures():
    assert supported_tasks("bert") == ["feature-extraction", "text-classification"]
    assert "text-generation-with-past" in supported_tasks("qwen2")
    assert not set(ENCODER_MODEL_TYPES) & set(DECODER_MODEL_TYPES)
    with pytest.raises(UnsupportedExportError, match=r"'ctrl'.*bert.*llama"):
        supported_tasks("ctrl")


def test_adapter_names_are_unique():
    assert adapter_names(["a/x", "b/x", "c/y", "d/x"]) == ["x", "x_2", "y", "x_3"]


def test_a_training_runs_adapter_goes_by_the_runs_name(tmp_path, monkeypatch):
    # bca-deploy train --out runs/sentiment writes runs/sentiment/best: the bank slot is "sentiment", not "best"
    assert adapter_names(["runs/sentiment/best", "runs/topic/best", "runs/topic/last"]) == \
        ["sentiment", "topic", "topic_2"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best").mkdir()
    assert adapter_names(["best"]) == [tmp_path.name]  # relative "best": the run folder is the current one
