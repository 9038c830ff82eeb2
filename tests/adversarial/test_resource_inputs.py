"""Well-formed files whose values would make a stage spend unbounded time or memory before it refuses them.

Each test makes the expensive step fail the test if it is reached (transformers building the config's model, the
config read by transformers, every pattern of a PEFT config compiled), so a regression is a quick failure, not a
run that takes minutes and gigabytes. The expectations come from the checkpoint's own headers (shapes, tensor
counts), never from the code under test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bca_deploy as bd  # noqa: E402
from adversarial_helpers import tree_digest  # noqa: E402
from bca_deploy.config import HeadSpec  # noqa: E402
from bca_deploy.errors import BCAError, CheckpointFormatError  # noqa: E402
from conftest import tiny_bert  # noqa: E402


def _edit_config(model_dir: Path, **fields) -> Path:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny BERT classification checkpoint (2 labels) saved as safetensors."""
    directory = tmp_path / "base"
    tiny_bert(num_labels=2).save_pretrained(directory)
    return directory


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail the test if transformers starts building a model for real (the expensive step)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was reached: the config's model would be built before any size check")

    for name in ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


# ---- config.json: layer counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["num_hidden_layers", "text_config__num_hidden_layers", "num_local_experts"])
def test_config_with_millions_of_layers_is_refused_before_transformers_reads_it(tmp_path, monkeypatch, field):
    # transformers expands qwen2's num_hidden_layers into a list while reading the config: 1e8 took 113 s, 12 GiB
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32,
                                                       "num_attention_heads": 4, "num_hidden_layers": 2}))
    path = _edit_config(directory, **{field: 10**8})
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("transformers read a config with 1e8 layers or experts")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    from bca_deploy.models import load_config

    with pytest.raises(CheckpointFormatError) as info:
        load_config(directory)
    message = str(info.value)
    assert str(path) in message and f"{field.replace('__', '.')}=100000000" in message, message


def test_real_layer_counts_still_read(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 126,
        "max_window_layers": 126, "num_key_value_heads": 2}))
    from bca_deploy.models import load_config

    assert load_config(directory).num_hidden_layers == 126


# ---- config.json vs the weights, before a model is built (export, evaluate, train) ---------------------------------


def _head() -> HeadSpec:
    return HeadSpec(modules=["classifier"], num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                    label2id={"a": 0, "b": 1, "c": 2})


@pytest.mark.parametrize("fields", [{"num_hidden_layers": 5000}, {"max_position_embeddings": 10**7},
                                    {"vocab_size": 10**9}])
def test_load_base_refuses_a_config_the_weights_do_not_fit_before_building_it(checkpoint, no_model_build, fields):
    # num_hidden_layers 1e6 made export run for minutes; max_position_embeddings 3e7 made it take 12 GiB and export
    # a graph with random position embeddings (the adapter's head sets ignore_mismatched_sizes)
    from bca_deploy.models import ModelTask, load_base

    before = tree_digest(checkpoint)
    config_path = _edit_config(checkpoint, **fields)
    stored = {k: tuple(v.shape) for k, v in load_file(checkpoint / "model.safetensors").items()}
    with pytest.raises(CheckpointFormatError) as info:
        load_base(checkpoint, ModelTask("seq-cls", "text-classification", _head()))
    message = str(info.value)
    assert str(config_path) in message, message
    (field, value), = fields.items()
    if field == "num_hidden_layers":
        assert f"num_hidden_layers={value}, but the checkpoint holds only {len(stored)} tensors" in message, message
    else:
        name = {"max_position_embeddings": "bert.embeddings.position_embeddings.weight",
                "vocab_size": "bert.embeddings.word_embeddings.weight"}[field]
        assert f"tensor {name} (model.safetensors): stored {list(stored[name])}, config.json gives " \
               f"{[value, stored[name][1]]}" in message, message
    assert tree_digest(checkpoint) == {**before, "config.json": tree_digest(config_path)["."]}


def test_load_base_with_a_new_head_keeps_refusing_other_misfits(checkpoint):
    """A head from the adapters is the one tensor allowed to differ; an edited vocabulary is not initialized at
    random behind a warning (it was, and export wrote and validated a graph with random embeddings)."""
    from bca_deploy.models import ModelTask, load_base

    _edit_config(checkpoint, vocab_size=200)
    with pytest.raises(CheckpointFormatError, match=r"word_embeddings\.weight .*stored \[100, 32\], config.json gives "
                                                     r"\[200, 32\]"):
        load_base(checkpoint, ModelTask("seq-cls", "text-classification", _head()))


def test_load_base_fitting_checkpoint_with_new_head_loads(checkpoint):
    from bca_deploy.models import ModelTask, load_base

    model, missing = load_base(checkpoint, ModelTask("seq-cls", "text-classification", _head()))
    reference = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    for name, tensor in reference.items():
        if not name.startswith("classifier."):
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert state["classifier.weight"].shape == (3, 32) and "classifier.weight" in missing


def test_training_loader_refuses_more_layers_than_tensors_before_building(checkpoint, no_model_build):
    from bca_deploy.training.loading import load_for_training

    _edit_config(checkpoint, num_hidden_layers=5000)
    with pytest.raises(CheckpointFormatError, match=r"num_hidden_layers=5000, but the checkpoint holds only 41 tensors"):
        load_for_training(checkpoint, "causal-lm", torch.float32)


def test_merge_refuses_nested_and_decoder_layer_counts(checkpoint, tmp_path):
    from bca_deploy.merge import merge_checkpoint

    model = bd.inject(tiny_bert(num_labels=2), target_modules=["query"], block_size=8)
    bd.save_adapter(model, tmp_path / "ad")
    _edit_config(checkpoint, num_decoder_layers=10**6)
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError, match=r"num_decoder_layers=1000000, but the checkpoint holds only 41"):
        merge_checkpoint(checkpoint, [(tmp_path / "ad", 1.0)], out, progress=False)
    assert not out.exists()


# ---- PEFT adapter_config.json: how many patterns are matched ------------------------------------------------------


@pytest.fixture
def peft_adapter(tmp_path) -> Path:
    model = bd.inject(tiny_bert(num_labels=2), target_modules=["query", "value"], block_size=8, init="normal")
    bd.save_adapter(model, tmp_path / "ad")
    from bca_deploy.adapter_io import convert_adapter

    convert_adapter(tmp_path / "ad", tmp_path / "peft", to="peft")
    return tmp_path / "peft"


@pytest.mark.parametrize("field", ["block_size_pattern", "modules_to_save"])
def test_peft_config_with_300k_patterns_is_read_without_compiling_them(peft_adapter, monkeypatch, field):
    # 300,000 block_size_pattern keys or modules_to_save entries made read_adapter (inspect, merge, a server loading
    # a store entry) run for minutes: each compiled, then compiled again for every module path it was matched with
    path = peft_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    names = [f"x{i}.*y" for i in range(300_000)]
    config[field] = {n: 8 for n in names} if field == "block_size_pattern" else names + ["classifier"]
    path.write_text(json.dumps(config))
    import bca_deploy.peft_compat as peft_compat

    compiled = 0
    real_compile = re.compile

    def counting_compile(pattern, flags=0):
        nonlocal compiled
        compiled += 1
        if compiled > 20_000:
            raise AssertionError("more than 20,000 patterns compiled for one adapter config")
        return real_compile(pattern, flags)

    monkeypatch.setattr(peft_compat.re, "compile", counting_compile)
    monkeypatch.setattr(peft_compat.re, "match", lambda p, s, flags=0: counting_compile(p, flags).match(s))
    config, tensors = bd.read_adapter(peft_adapter)
    assert sorted(config.modules) == sorted(k[len("base_model.model."):-len(".c3a_kernel")]
                                            for k in load_file(peft_adapter / "adapter_model.safetensors")
                                            if k.endswith(".c3a_kernel"))


def test_peft_config_with_many_patterns_under_the_bound_is_still_checked(peft_adapter):
    """2,000 block_size_pattern keys (more than re's cache holds) are compiled once each and still cross-checked."""
    path = peft_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["block_size_pattern"] = {**{f"x{i}y": 8 for i in range(2_000)}, "value": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(BCAError, match=r"module bert\.encoder\.layer\.0\.attention\.self\.value: the config gives it "
                                       r"block size 4 \(block_size_pattern\['value'\]\)"):
        bd.read_adapter(peft_adapter)


def _sparse_head_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny BERT classifier checkpoint and a 2-label adapter whose saved ``classifier.weight`` declares [2, 10**8]
    (800 MB of float32) in a sparse file of a few KB: (model directory, adapter directory)."""
    import struct

    model = tiny_bert(num_labels=2)
    model.save_pretrained(tmp_path / "model")
    bd.inject(model, ["query"], block_size=8, init="normal", seed=0, modules_to_save=["classifier"])
    bd.save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    raw = weights.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    layout, chunks, offset = {k: v for k, v in header.items() if k == "__metadata__"}, [], 0
    for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]):
        begin, end = header[name]["data_offsets"]
        entry, chunk = dict(header[name]), data[begin:end]
        if name == "classifier.weight":
            entry["shape"], chunk = [2, 10**8], None
        size = 2 * 10**8 * 4 if chunk is None else len(chunk)
        layout[name] = {**entry, "data_offsets": [offset, offset + size]}
        chunks.append((offset, chunk))
        offset += size
    text = json.dumps(layout).encode()
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        start = f.tell()
        for at, chunk in chunks:
            if chunk is not None:
                f.seek(start + at)
                f.write(chunk)
        f.truncate(start + offset)  # the 800 MB are a hole: nothing on disk
    return tmp_path / "model", tmp_path / "adapter"


def test_a_saved_tensor_larger_than_any_of_the_model_is_refused_unread(tmp_path, monkeypatch):
    """helper-57's probe: 28 KB on disk declaring a 900 MB classifier made merge peak at 3 GB of memory (and export,
    whose task resolution read every adapter whole first) before the shape error. Where the model is known, a tensor
    saved whole larger than 4x its largest tensor (+2**20 elements) is refused from the header; the tensor data must
    never be read (the reader fails the test if it is reached)."""
    from bca_deploy import adapter_io
    from bca_deploy.adapter_io import read_adapter_header
    from bca_deploy.merge import merge_checkpoint
    from bca_deploy.models import resolve_task

    model_dir, adapter = _sparse_head_adapter(tmp_path)
    largest = max(t.numel() for t in load_file(model_dir / "model.safetensors").values())  # the checkpoint's own

    def read(*_):
        raise AssertionError("the adapter's tensor data was read")

    monkeypatch.setattr(adapter_io, "load_safetensors", read)
    assert read_adapter_header(adapter).shapes["classifier.weight"] == (2, 10**8)  # the header alone is fine
    expected = f"its largest has {largest:,} elements"
    with pytest.raises(BCAError, match=expected):
        merge_checkpoint(model_dir, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(BCAError, match=expected):
        bd.load_adapter(tiny_bert(num_labels=2), adapter)
    assert resolve_task(model_dir, [adapter]).type == "seq-cls"  # export's first step reads headers only
    with pytest.raises(BCAError, match=r"tensor classifier\.weight: declares F32 \[2, 100000000\]"):
        adapter_io.read_adapter(adapter, largest_elements=largest)
