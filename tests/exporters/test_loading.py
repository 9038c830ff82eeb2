"""Task resolution through optimum's TasksManager, and adapter naming."""

from __future__ import annotations

import pytest
from bca_deploy.exporters import UnsupportedExportError, resolve_task
from bca_deploy.exporters.loading import adapter_names
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
    assert resolve_task(model_dir, "causal-lm")[0] == "text-generation"
    assert resolve_task(model_dir, "feature-extraction-with-past")[0] == "feature-extraction-with-past"
    with pytest.raises(UnsupportedExportError, match="fill-mask"):
        resolve_task(model_dir, "fill-mask")


def test_adapter_names_are_unique():
    assert adapter_names(["a/x", "b/x", "c/y", "d/x"]) == ["x", "x_2", "y", "x_3"]
