"""bca_deploy.models.load_config: the one reader of a model's (or an export's) config.json, for every stage."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bca_deploy.cli import main
from bca_deploy.errors import CheckpointFormatError, InputNotFoundError
from bca_deploy.models import load_config
from conftest import tiny_bert

BROKEN = {
    "nested": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    "list": ("[1, 2]", "expected a JSON object"),
    "not-json": ("{model_type: bert}", "not valid JSON"),
    "unknown-model-type": (json.dumps({"model_type": "no-such-architecture"}), "transformers cannot read this config"),
    "bad-labels": (json.dumps({"model_type": "bert", "id2label": {"x": "a"}}), "transformers cannot read this config"),
}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    tiny_bert(num_labels=2).save_pretrained(directory)
    return directory


def test_a_model_config_reads_as_transformers_does(bert_dir):
    from transformers import AutoConfig

    assert load_config(bert_dir).to_dict() == AutoConfig.from_pretrained(bert_dir).to_dict()


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_malformed_config_is_one_error_naming_the_file(tmp_path, bert_dir, name):
    text, needle = BROKEN[name]
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match=needle) as caught:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)


def test_every_stage_refuses_a_malformed_model_config_the_same_way(tmp_path, bert_dir):
    """export and train read --model's config.json through load_config: one Error line, exit 2, nothing written
    (a nested config was a RecursionError: 'Internal error', exit 70)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    (model / "config.json").write_text(BROKEN["nested"][0])
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(8)))
    for args in (["export", "--model", str(model), "--merge", "--out", str(tmp_path / "onnx"), "--task", "text-classification"],
                 ["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args[0], result.output)
        assert f"{model / 'config.json'}: JSON nested too deeply" in result.output, (args[0], result.output)
        assert "Traceback" not in result.output and "Internal error" not in result.output
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "run").exists()
    with pytest.raises(InputNotFoundError, match="no config.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("vocab, words", [(2**20, ("do not fit its config.json",)),
                                          # 4.x allocates the model first; 5.x builds it on the meta device and then
                                          # finds the checkpoint's embedding of another shape
                                          (2**40, ("larger than this machine", "do not fit its config.json"))])
def test_a_config_the_weights_do_not_fit_is_the_checkpoints_error_in_every_stage(tmp_path, vocab, words):
    """config.json's vocab_size edited: the weights of another shape were an "Internal error" (RuntimeError: Error(s)
    in loading state_dict), a size no memory holds one too (tried to allocate ... bytes); now one line naming the
    model directory and its config, exit 2, nothing written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
    from training_helpers import tiny_model_dir

    model = tiny_model_dir(tmp_path / "model", "bert", [f"row {i}" for i in range(8)])  # with its tokenizer
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(8)))
    for args in (["export", "--model", str(model), "--merge", "--out", str(tmp_path / "onnx"), "--no-validate"],
                 ["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args[0], result.output)
        assert f"Error: {model}: " in result.output and any(w in result.output for w in words), (args[0], result.output)
        assert "Traceback" not in result.output and "Internal error" not in result.output
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "run").exists()


def test_a_weights_file_this_user_may_not_read_is_named_by_every_loader(bert_dir, monkeypatch):
    """transformers reports an unreadable model.safetensors as "No such file or directory" (export, evaluate,
    train); every loader now names the permission problem first (emulated: the tests may run as root)."""
    from pathlib import Path

    import bca_deploy.models as models
    from bca_deploy.training import TrainingConfigError
    from bca_deploy.training.loading import Labels, load_for_training

    weights = Path(bert_dir) / "model.safetensors"
    assert weights.is_file()

    def deny(path):
        if Path(path) == weights:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(models, "require_readable", deny)
    with pytest.raises(PermissionError) as caught:
        models.load_base(bert_dir, "feature-extraction")
    assert caught.value.filename == str(weights)
    with pytest.raises(TrainingConfigError, match=r"cannot load it for seq-cls \(\[Errno 13\] Permission denied"):
        load_for_training(bert_dir, "seq-cls", torch.float32, head=Labels(2, ["neg", "pos"], False, "new"))


def test_tokenizer_ids_past_the_embedding_are_found_by_id_not_by_count():
    """A vocabulary with gaps (ids renumbered, merged vocabularies) has fewer entries than its largest id: its
    length says it fits a 100-row embedding while two of its ids do not."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bca_deploy.models import describe_ids_past_vocabulary, ids_past_vocabulary

    vocab = {"[UNK]": 0, "the": 1, "water": 2, "hot": 5000, "cold": 5001}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    assert len(tokenizer) == 5
    assert ids_past_vocabulary(tokenizer, 100) == [5000, 5001]
    assert ids_past_vocabulary(tokenizer, 6000) == []
    said = describe_ids_past_vocabulary(tokenizer, [5000, 5001], 100)
    assert said.startswith("2 token(s) of the tokenizer have no embedding row in the model (ids 5000..5001: ")
    assert "hot" in said and "the model embeds 100" in said


def test_a_run_named_with_dots_goes_by_a_name_pytorch_and_the_server_take(bert_dir, tmp_path):
    """``train --out runs/sst2.v1`` trained and merged, but evaluate and export crashed (exit 70: PyTorch's
    "parameter name can't contain '.'" from the adapter named after the folder; helper-75). Folder-derived names now
    map what a name cannot hold to ``_``; a name given explicitly with a dot is refused by name, nothing loaded."""
    import bca_deploy as bd
    from bca_deploy.errors import AdapterNameError
    from bca_deploy.models import adapter_name_of, adapter_names, load_model
    from bca_deploy.serving.session import ADAPTER_NAME_PATTERN

    assert adapter_name_of(tmp_path / "runs" / "sst2.v1" / "best") == "sst2_v1"
    assert adapter_names(["a/my run", "b/my.run", "c/.hidden", "d/-x"]) == ["my_run", "my_run_2", "hidden", "x"]
    assert all(ADAPTER_NAME_PATTERN.fullmatch(n) for n in adapter_names(["a/ünï", "b/x" * 200, "c/..", "."]))
    # a Hugging Face cache snapshot goes by its repository's name, not its 40-character commit (helper-108)
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub" / "models--org--tone.adapter" / "snapshots" / commit
    assert adapter_names([hub, tmp_path / "hub2" / "models--x--tone.adapter" / "snapshots" / commit]) == \
        ["tone_adapter", "tone_adapter_2"]
    assert adapter_name_of(tmp_path / "elsewhere" / commit) == commit  # only inside a cache's snapshots/
    model = tiny_bert(num_labels=2)
    bd.inject(model, ["query"], block_size=8, init="normal", init_std=0.05, seed=0)
    run = tmp_path / "runs" / "sst2.v1" / "last"
    bd.save_adapter(model, run)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded = load_model(bert_dir, [run])
    assert [n for n in bd.adapter_configs(loaded)] == ["sst2_v1"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    plain = tiny_bert(num_labels=2)
    with pytest.raises(AdapterNameError, match=r"adapter name 'sst2\.v1' contains '\.'.*e\.g\. 'sst2_v1'"):
        bd.load_adapter(plain, run, adapter_name="sst2.v1")
    with pytest.raises(AdapterNameError, match="contains '.'"):
        bd.inject(plain, ["query"], block_size=8, adapter_name="a.b")
    assert not list(bd.bca_layers(plain))


def test_a_tokenizer_that_loads_but_cannot_tokenize_is_refused_at_load(tmp_path):
    """helper-80: `model_max_length: "lots"` in tokenizer_config.json loaded, passed export, and a server started
    healthy and answered every text with a 500; every stage now tries the tokenizer once when it loads it."""
    import json
    import string

    from bca_deploy.models import load_saved_tokenizer
    from conftest import wordpiece_tokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]
    wordpiece_tokenizer(tokens).save_pretrained(tmp_path)
    assert load_saved_tokenizer(tmp_path)("a b")["input_ids"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for field, value in (("model_max_length", "lots"), ("model_max_length", [1])):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match="check tokenizer_config.json's field types: it fails on a two-word text"):
            load_saved_tokenizer(tmp_path)


def test_a_tokenizer_file_that_is_not_a_regular_file_is_refused_by_name(tmp_path):
    """helper-80: a dangling tokenizer_config.json link (a cache's missing blob) was skipped as absent: transformers
    built another tokenizer class, which added a BOS token, and every stage tokenized differently without a word."""
    import os
    import string

    from bca_deploy.models import has_tokenizer_files, load_saved_tokenizer
    from conftest import wordpiece_tokenizer

    wordpiece_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase]).save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.unlink()
    config.symlink_to(tmp_path / "missing-blob")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_saved_tokenizer(tmp_path)
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(OSError, match=r"named pipe.*tokenizer_config.json"):
        load_saved_tokenizer(tmp_path)
    only = tmp_path / "only"
    only.mkdir()
    (only / "tokenizer.json").symlink_to(tmp_path / "missing-blob")
    assert has_tokenizer_files(only)  # present (broken): its loader names it, rather than serving token ids only


def test_the_library_takes_a_training_runs_directory_as_the_cli_does(bert_dir, tmp_path):
    """``train --out RUN`` writes RUN/last (and RUN/best with --eval-data); every command takes RUN for its adapter,
    but the library functions the README shows (load_model, merge_checkpoint, export) refused it: "no
    adapter_config.json" (helper-78). They now apply the same rule (config.run_adapter_dir): best/, else last/."""
    import transformers

    import bca_deploy as bd
    from bca_deploy.merge import merge_checkpoint
    from bca_deploy.models import load_model

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = {}
    for folder in ("last", "best"):
        model = tiny_bert(num_labels=2)
        bd.inject(model, ["query"], block_size=8, init="normal", init_std=0.05, seed={"last": 0, "best": 1}[folder])
        bd.save_adapter(model, tmp_path / "run" / folder)
        with torch.no_grad():
            logits[folder] = model(input_ids=ids).logits
        loaded = load_model(bert_dir, [tmp_path / "run"])
        assert list(bd.adapter_configs(loaded)) == ["run"]
        with torch.no_grad():  # best/ once there is one, as every command
            torch.testing.assert_close(loaded(input_ids=ids).logits, logits[folder], rtol=1e-5, atol=1e-6)
    merge_checkpoint(bert_dir, [(tmp_path / "run", 1.0)], tmp_path / "merged", progress=False, fsync=False)
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits["best"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.bool])
def test_a_weight_stored_as_integers_or_8_bit_floats_is_refused_by_every_stage_naming_it(tmp_path, dtype):
    """A floating-point parameter stored as I32, F8_E4M3 or BOOL without a quantization_config (a converted or
    corrupted checkpoint): merge refused it only for adapted layers, export and evaluate failed inside transformers
    on 4.x (F8: exit 70) and 5.x converted it silently (helper-80). Every stage now refuses it from the headers,
    naming the tensor, its dtype and the dtypes read, before anything is written."""
    from safetensors.torch import load_file, save_file

    from bca_deploy.models import load_model

    tiny_bert(num_labels=2).save_pretrained(tmp_path / "base")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.key.weight"
    weights[key] = (weights[key] * 100).to(dtype)
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    stored = {torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL"}[dtype]
    with pytest.raises(CheckpointFormatError, match=rf"{key} \(model.safetensors\): stored as {stored}.*F64, F32"):
        load_model(tmp_path / "base")
    model = tiny_bert(num_labels=2)
    import bca_deploy as bd

    bd.inject(model, ["query"], block_size=8)
    bd.save_adapter(model, tmp_path / "adapter")
    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter",
                                       str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2 and f"stored as {stored}" in result.output, result.output
    assert "nothing was written" in result.output and not (tmp_path / "merged").exists()


def test_a_config_json_that_is_not_a_regular_file_is_named_as_what_it_is(tmp_path):
    """A pipe as config.json: serve said "no config.json (expected a transformers model directory)" of a directory
    that has one (helper-80). It is now refused as what it is, by name, without reading (a pipe would block)."""
    import os

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(OSError, match="named pipe") as info:
        load_config(tmp_path)
    assert info.value.filename == str(tmp_path / "config.json")
