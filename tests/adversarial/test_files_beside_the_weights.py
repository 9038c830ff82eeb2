"""Hostile files beside the weights: what the readers of a model directory, an adapter and an export read other than
the tensors (helper-93's probe of the file readers).

- a tokenizer file declaring gigabytes (sparse: a few KB on disk): transformers read it whole before failing (8 GB of
  zeros as ``tokenizer_config.json`` took 8 GB, or the process was killed); refused unread, naming it;
- a file present by name that is not a regular file, taken for absent without a word: ``generation_config.json`` (the
  export got transformers' default one, other end-of-sequence ids), ``modules.json`` or ``sentence_bert_config.json``
  (the export lost the model's pooling, normalisation or text length), ``config.json`` of a merge ("no config.json"
  warned, then another error); now each is refused or reported naming it and what it is;
- an index naming a shard longer than a file name can be (exit 1 "File name too long", not the index's error);
- a config.json transformers cannot build (merged by shapes alone, exit 0 without a word: now a warning);
- ``inspect`` of an export holding a dangling ``adapters/*.onnx_adapter`` link no bank lists (exit 1, where serve
  starts), and of an adapter whose ``adapter_config.json`` is a link to nothing ("no adapter_config.json").
"""

from __future__ import annotations

import json
import os
import shutil
import string
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from exporters_helpers import build_model  # noqa: E402

import bca_deploy as bd  # noqa: E402
from bca_deploy.cli import main  # noqa: E402
from bca_deploy.errors import BCAError, CheckpointFormatError  # noqa: E402

QUERY = "encoder.layer.0.attention.self.query.weight"


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny BERT (single file, sharded, with a tokenizer), an adapter, and a merged export of it."""
    from conftest import wordpiece_tokenizer

    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("beside")
    build_model("bert").save_pretrained(root / "single")
    build_model("bert").save_pretrained(root / "sharded", max_shard_size="20KB")
    build_model("bert").save_pretrained(root / "tokenized")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    wordpiece_tokenizer(tokens).save_pretrained(root / "tokenized")
    model = bd.inject(build_model("bert"), ["query", "value"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, root / "adapter")
    export(root / "single", root / "onnx", [root / "adapter"], merge=True, task="feature-extraction", validate=False,
           verbose=False)
    return root


def _copy(made: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(made / name, tmp_path / name, symlinks=True)
    return tmp_path / name


# ---- a tokenizer file declaring gigabytes ---------------------------------------------------------------------


def test_a_sparse_giant_tokenizer_file_is_refused_unread(made, tmp_path, monkeypatch):
    import transformers

    from bca_deploy.config import MAX_TOKENIZER_FILE_BYTES
    from bca_deploy.exporters import ExportError, export
    from bca_deploy.models import load_saved_tokenizer

    model_dir = _copy(made, "tokenized", tmp_path)
    giant = model_dir / "tokenizer_config.json"
    with open(giant, "r+b") as f:
        f.truncate(MAX_TOKENIZER_FILE_BYTES + 1)  # sparse: nothing on disk
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("the giant file was handed to transformers"))
    with pytest.raises(CheckpointFormatError, match=rf"{giant}: {MAX_TOKENIZER_FILE_BYTES + 1:,} bytes; a tokenizer "
                       "file of more than .* bytes is refused unread"):
        load_saved_tokenizer(model_dir)
    with pytest.raises(ExportError, match=r"its tokenizer does not load .*tokenizer_config\.json: .* refused unread"):
        export(model_dir, tmp_path / "out", [made / "adapter"], merge=True, task="feature-extraction", validate=False,
               verbose=False)
    assert not (tmp_path / "out").exists()

    export_dir = _copy(made, "onnx", tmp_path)  # an export holding it: inspect says serve would refuse it
    with open(export_dir / "tokenizer_config.json", "wb") as f:
        f.truncate(MAX_TOKENIZER_FILE_BYTES + 1)
    from bca_deploy.exporters.metadata import _served_file_problems

    assert any(p.startswith("tokenizer_config.json: ") and "refused unread" in p
               for p in _served_file_problems(export_dir)), _served_file_problems(export_dir)


def test_real_tokenizer_files_still_load(made):
    from bca_deploy.models import load_saved_tokenizer

    assert load_saved_tokenizer(made / "tokenized")("a b")["input_ids"]


# ---- a file the export copies, there but not a file --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dangling-link", "directory"])
def test_a_generation_config_that_is_not_a_file_is_refused_by_export(made, tmp_path, kind):
    from bca_deploy.exporters import ExportError, export

    model_dir = _copy(made, "single", tmp_path)
    path = model_dir / "generation_config.json"
    {"fifo": lambda: os.mkfifo(path), "dangling-link": lambda: path.symlink_to(tmp_path / "gone"),
     "directory": path.mkdir}[kind]()
    with pytest.raises(ExportError, match=rf"{path}: .*; an export copies the model directory's "
                       r"generation_config\.json"):
        export(model_dir, tmp_path / "out", [made / "adapter"], merge=True, task="feature-extraction",
               validate=False, verbose=False)
    assert not (tmp_path / "out").exists()


def _sentence_transformers(model_dir: Path) -> None:
    (model_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                      "pooling_mode_cls_token": True}))
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))


@pytest.mark.parametrize("name", ["modules.json", "sentence_bert_config.json"])
def test_a_sentence_transformers_file_linking_to_nothing_is_named_not_taken_for_absent(made, tmp_path, name):
    from bca_deploy.exporters import ExportError, export
    from bca_deploy.sentence_embedding import EmbeddingRecipe

    model_dir = _copy(made, "single", tmp_path)
    _sentence_transformers(model_dir)
    assert EmbeddingRecipe.read(model_dir).pooling == "cls"
    (model_dir / name).unlink()
    (model_dir / name).symlink_to(tmp_path / "missing-blob")
    recipe = EmbeddingRecipe.read(model_dir)
    assert any(p.startswith(f"{model_dir / name}: a symbolic link that leads to no file") for p in recipe.problems), \
        recipe
    with pytest.raises(ExportError, match=rf"{model_dir / name}: a symbolic link that leads to no file"):
        export(model_dir, tmp_path / "out", [made / "adapter"], merge=True, task="feature-extraction",
               validate=False, verbose=False)
    assert not (tmp_path / "out").exists()


# ---- merge: the index's shard names, config.json ------------------------------------------------------------


def test_a_shard_name_longer_than_a_file_name_is_the_indexs_error(made, tmp_path):
    from bca_deploy.merge import merge_checkpoint

    model_dir = _copy(made, "sharded", tmp_path)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][QUERY] = "a" * 300 + ".safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"inconsistent checkpoint:\n  - shard 'aaaa.*\.\.\.: File name "
                       "too long"):
        merge_checkpoint(model_dir, [(made / "adapter", 1.0)], tmp_path / "out", progress=False)
    result = _run(["merge", "--model", model_dir, "--adapter", made / "adapter", "--out", tmp_path / "out",
                   "--no-progress"])
    assert result.exit_code == 2 and "File name too long" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["dangling-link", "fifo"])
def test_a_config_json_there_but_not_a_file_is_refused_by_merge_not_called_absent(made, tmp_path, kind):
    from bca_deploy.merge import merge_checkpoint

    model_dir = _copy(made, "single", tmp_path)
    config = model_dir / "config.json"
    config.unlink()
    config.symlink_to(tmp_path / "gone") if kind == "dangling-link" else os.mkfifo(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointFormatError, match=rf"{config}: .*expected a JSON model config"):
            merge_checkpoint(model_dir, [(made / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not [w for w in caught if "no config.json" in str(w.message)], [str(w.message) for w in caught]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, said", [("dangling-link", "a symbolic link that leads to no file"),
                                        ("fifo", "a named pipe (FIFO), not a regular file"),
                                        ("dev-zero", "a character device, not a regular file")])
def test_weights_there_but_not_a_file_are_refused_by_merge_as_what_they_are(made, tmp_path, kind, said):
    """A model.safetensors that is a pipe, a device or a link to nothing (a cache's missing blob) was said to be absent
    and present at once: "no model.safetensors or model.safetensors.index.json; it has model.safetensors: convert the
    checkpoint to safetensors first". It is named as what it is."""
    from bca_deploy.merge import merge_checkpoint

    model_dir = _copy(made, "single", tmp_path)
    weights = model_dir / "model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)
    else:
        weights.symlink_to(tmp_path / "gone" if kind == "dangling-link" else "/dev/zero")
    with pytest.raises(CheckpointFormatError) as caught:
        merge_checkpoint(model_dir, [(made / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert str(caught.value).startswith(f"{weights}: {said}") and "expected a safetensors file" in str(caught.value) \
        and "convert" not in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()
    result = _run(["merge", "--model", str(model_dir), "--adapter", str(made / "adapter"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"Error: {weights}: {said}" in result.output, result.output


@pytest.mark.parametrize("kind, said", [("fifo", "a named pipe (FIFO), not a regular file"),
                                        ("dangling-link", "a symbolic link that leads to no file")])
def test_weights_there_but_not_a_file_are_refused_by_every_command_as_train_and_merge_refuse_them(made, tmp_path,
                                                                                                kind, said):
    """evaluate, export and validate exited 1 (the operating-system error path) on a model.safetensors that is a pipe
    or a link to nothing, where train and merge exit 2 naming the file: every command refuses it by one rule
    (models.weights_file_problem), with the same message and exit code, before anything is read or written."""
    model_dir = _copy(made, "tokenized", tmp_path)
    weights = model_dir / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights) if kind == "fifo" else weights.symlink_to(tmp_path / "gone")
    data = tmp_path / "data.tsv"
    data.write_text("sentence\tlabel\n" + "a b c\t0\nb c d\t1\n" * 4)
    out = tmp_path / "out"
    commands = {
        "train": ["train", "--model", model_dir, "--data", data, "--out", out, "--max-steps", 1, "--block-size", 8,
                  "--no-progress"],
        "evaluate": ["evaluate", "--model", model_dir, "--adapter", made / "adapter", "--data", data],
        "export": ["export", "--model", model_dir, "--adapter", made / "adapter", "--merge", "--out", out],
        "export --bank": ["export", "--model", model_dir, "--adapter", made / "adapter", "--bank", "--out", out],
        "merge": ["merge", "--model", model_dir, "--adapter", made / "adapter", "--out", out],
        "validate": ["validate", "--onnx", made / "onnx", "--model", model_dir, "--adapter", made / "adapter"],
    }
    for name, args in commands.items():
        result = _run(args)
        assert result.exit_code == 2 and f"{weights}: {said}" in result.output \
            and "expected a safetensors file" in result.output, (name, result.output)
        assert not out.exists(), name


def test_a_config_transformers_cannot_build_is_merged_with_a_warning(made, tmp_path):
    from bca_deploy.merge import merge_checkpoint

    model_dir = _copy(made, "single", tmp_path)
    data = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**data, "num_attention_heads": 0}))
    with pytest.warns(UserWarning, match=r"config\.json: transformers cannot build the model it describes "
                      r"\(ZeroDivisionError.*layer types not checked"):
        merge_checkpoint(model_dir, [(made / "adapter", 1.0)], tmp_path / "out", progress=False)


# ---- inspect --------------------------------------------------------------------------------------------------


def test_inspect_of_an_export_with_a_dangling_adapter_file_no_bank_lists_describes_it(made, tmp_path):
    export_dir = _copy(made, "onnx", tmp_path)
    (export_dir / "adapters").mkdir(exist_ok=True)
    (export_dir / "adapters" / "old.onnx_adapter").symlink_to(tmp_path / "gone")
    result = _run(["inspect", export_dir])
    assert result.exit_code == 0 and "files:        model.onnx" in result.output, result.output


def test_inspect_of_an_adapter_config_linking_to_nothing_names_the_link(made, tmp_path):
    adapter = _copy(made, "adapter", tmp_path)
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(tmp_path / "gone")
    for args in (["inspect", adapter], ["convert", "--adapter", adapter, "--to", "peft", "--out", tmp_path / "p"]):
        result = _run(args)
        assert result.exit_code == 2 and f"{adapter / 'adapter_config.json'}: a symbolic link that leads to no file" \
            in result.output, (args, result.output)
    with pytest.raises(BCAError, match="a symbolic link that leads to no file"):
        bd.read_adapter(adapter)


# ---- a training run's best/ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dangling-link", "fifo"])
def test_a_runs_best_adapter_with_a_broken_config_is_named_not_passed_over_for_last(made, tmp_path, kind):
    """``RUN`` stands for RUN/best (chosen on --eval-data), else RUN/last: a best/ whose adapter_config.json was a
    link to nothing or a pipe was taken for no best/ at all, and last/ merged in its place without a word."""
    from bca_deploy.merge import merge_checkpoint

    run = tmp_path / "run"
    shutil.copytree(made / "adapter", run / "best")
    shutil.copytree(made / "adapter", run / "last")
    config = run / "best" / "adapter_config.json"
    config.unlink()
    config.symlink_to(tmp_path / "gone") if kind == "dangling-link" else os.mkfifo(config)
    with pytest.raises(BCAError, match=rf"{config}: "):
        merge_checkpoint(made / "single", [(run, 1.0)], tmp_path / "out", progress=False)
    result = _run(["inspect", run])
    assert result.exit_code == 2 and f"Error: {config}: " in result.output, result.output
    assert not (tmp_path / "out").exists()


# ---- an export's own files, there but not files -------------------------------------------------------------


def test_an_export_graph_linking_to_a_device_is_named_as_such(made, tmp_path):
    """``model.onnx`` a link to /dev/zero: serve and validate said "no model.onnx", inspect "an incomplete export"."""
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.session import bank_metadata

    export_dir = _copy(made, "onnx", tmp_path)
    (export_dir / "model.onnx").unlink()
    (export_dir / "model.onnx").symlink_to("/dev/zero")
    with pytest.raises(ServingError, match=rf"{export_dir / 'model.onnx'}: a character device, not a regular file"):
        bank_metadata(export_dir)
    result = _run(["inspect", export_dir])
    assert result.exit_code == 0 and "graph:        NOT loadable: model.onnx is a character device" in result.output, \
        result.output
    result = _run(["validate", "--onnx", export_dir, "--model", made / "single", "--adapter", made / "adapter"])
    assert result.exit_code == 1 and f"{export_dir / 'model.onnx'}: a character device" in result.output, \
        result.output  # (an operating-system error, as the CLI's other unreadable files: exit code 1)


def test_an_export_metadata_file_linking_to_nothing_is_named_not_taken_for_absent(made, tmp_path):
    """A dangling ``bca_export.json`` made inspect describe "an ONNX directory without bca_export.json (optimum's?)"."""
    export_dir = _copy(made, "onnx", tmp_path)
    (export_dir / "bca_export.json").unlink()
    (export_dir / "bca_export.json").symlink_to(tmp_path / "gone")
    result = _run(["inspect", export_dir])
    assert result.exit_code == 2 and f"{export_dir / 'bca_export.json'}: a symbolic link that leads to no file" in \
        result.output, result.output


def test_a_served_generation_config_linking_to_nothing_is_reported_not_taken_for_absent(tmp_path):
    """Its end-of-sequence ids were dropped without a word (a chat model then ran past its end-of-turn token)."""
    from bca_deploy.serving.session import GenerationDefaults

    path = tmp_path / "generation_config.json"
    path.symlink_to(tmp_path / "gone")
    defaults = GenerationDefaults.read(path)
    assert any(p.startswith(f"{path}: a symbolic link that leads to no file") and "end-of-sequence ids" in p
               for p in defaults.problems), defaults
    path.unlink()
    assert GenerationDefaults.read(path) == GenerationDefaults()  # absent: nothing to say


@pytest.mark.parametrize("version", [True, "1", 1.0, 0])
def test_a_format_version_no_bca_deploy_writes_is_not_said_to_be_newer(made, tmp_path, version):
    """``"format_version": true`` (or "1", 0) said "upgrade bca-deploy to read newer adapters"; 1.0 was read as 1."""
    adapter = _copy(made, "adapter", tmp_path)
    data = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**data, "format_version": version}))
    with pytest.raises(BCAError, match=r"format_version .*, expected the integer 1$") as caught:
        bd.read_adapter(adapter)
    assert "upgrade" not in str(caught.value)


def test_a_store_entry_whose_config_links_to_nothing_is_named_not_unknown(made, tmp_path):
    """The entry was answered as "no adapter 'x' in the adapter store" (and left out of the listing unexplained)."""
    from bca_deploy.errors import AdapterFormatError
    from bca_deploy.serving.store import AdapterStore

    store = tmp_path / "store"
    shutil.copytree(made / "adapter", store / "good")
    shutil.copytree(made / "adapter", store / "broken")
    (store / "broken" / "adapter_config.json").unlink()
    (store / "broken" / "adapter_config.json").symlink_to(store / "broken" / "gone")
    with pytest.raises(AdapterFormatError, match=r"adapter 'broken': adapter_config\.json is a symbolic link that "
                       "leads to no file"):
        AdapterStore(store).path("broken")
    assert AdapterStore(store).path("good") == (store / "good").resolve()
