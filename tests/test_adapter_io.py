"""Adapter directories: round trip, validation against the model, refusals, no pickle."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.errors import AdapterFormatError, AdapterMismatchError, OutputExistsError
from conftest import TINY_MODELS, model_output, tiny_bert, tiny_llama


@pytest.fixture
def llama_adapter(tmp_path):
    model = bd.inject(tiny_llama(), ["q_proj", "v_proj", "down_proj"], block_size=8,
                      block_size_pattern={"down_proj": 16}, init="normal", init_std=0.1, seed=0, scaling=0.25)
    directory = bd.save_adapter(model, tmp_path / "adapter")
    return model, directory


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_round_trip_reproduces_outputs(arch, tmp_path, input_ids):
    factory, targets, p = TINY_MODELS[arch]
    model = bd.inject(factory(), targets, block_size=p, init="normal", init_std=0.1, seed=3)
    expected = model_output(model, input_ids)
    bd.save_adapter(model, tmp_path / "a")
    loaded = bd.load_adapter(factory(), tmp_path / "a")
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(model_output(loaded, input_ids), expected)


def test_an_adapter_under_a_file_name_that_is_not_utf8_saves_and_loads(tmp_path, input_ids):
    """safetensors takes paths as UTF-8 strings: an adapter in a directory named with other bytes could be neither
    written nor read ("Path ... is not valid UTF-8", blamed on the file)."""
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", init_std=0.1, seed=5)
    directory = tmp_path / os.fsdecode(b"caf\xe9-latin1") / "adapter"
    bd.save_adapter(model, directory)
    loaded = bd.load_adapter(tiny_llama(), directory)
    assert torch.equal(model_output(loaded, input_ids), model_output(model, input_ids))
    config, state = bd.read_adapter(directory)
    assert set(state) == set(bd.read_adapter(bd.save_adapter(model, tmp_path / "plain"))[1])


def test_directory_contents_and_config(llama_adapter):
    model, directory = llama_adapter
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["format"] == "bca-deploy" and config["format_version"] == 1
    assert config["layout"] == "first-column"
    assert config["base_model"]["model_type"] == "llama"
    assert config["base_model"]["adapted_weights"]["model.layers.0.mlp.down_proj.weight"] == [32, 64]
    assert config["modules"]["model.layers.1.mlp.down_proj"]["block_size"] == 16
    assert config["modules"]["model.layers.1.self_attn.v_proj"]["scaling"] == 0.25
    tensors = load_file(directory / "adapter_model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.bca_kernel"].shape == (2, 4, 16)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for name, layer in bd.bca_layers(model):
        assert torch.equal(tensors[name + ".bca_kernel"], layer.bca_kernels["default"].detach())


def test_trainable_load(llama_adapter):
    _, directory = llama_adapter
    model = bd.load_adapter(tiny_llama(), directory, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bca_kernels." in n for n in trainable)


def test_modules_to_save_head_restored(tmp_path, input_ids):
    model = bd.inject(tiny_bert(num_labels=3), ["query"], block_size=8, init="normal", seed=0,
                      modules_to_save=["classifier"])
    assert model.classifier.weight.requires_grad
    with torch.no_grad():
        model.classifier.weight.normal_()
    expected = model(input_ids=input_ids).logits
    bd.save_adapter(model, tmp_path / "a")
    loaded = bd.load_adapter(tiny_bert(num_labels=3, seed=5), tmp_path / "a")
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    # seed 5 changes the base weights too, so compare against a same-seed base instead
    same_base = bd.load_adapter(tiny_bert(num_labels=3), tmp_path / "a")
    assert torch.equal(same_base(input_ids=input_ids).logits, expected)


def test_two_adapters_in_one_model(llama_adapter, tmp_path, input_ids):
    model, directory = llama_adapter
    other = bd.inject(tiny_llama(), ["q_proj"], block_size=4, init="normal", init_std=0.1, seed=9)
    bd.save_adapter(other, tmp_path / "other")
    combined = bd.load_adapter(tiny_llama(), directory)
    bd.load_adapter(combined, tmp_path / "other", adapter_name="other")
    bd.set_adapter(combined, "other")
    assert torch.equal(combined(input_ids=input_ids).logits, other(input_ids=input_ids).logits)
    bd.set_adapter(combined, "default")
    assert torch.equal(combined(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


# ---- validation against the model ---------------------------------------------------------------


def test_wrong_model_lists_every_problem(llama_adapter):
    _, directory = llama_adapter
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError) as err:
        bd.load_adapter(model, directory)
    msg = str(err.value)
    assert "base model_type is 'llama' but this BertModel is 'bert'" in msg
    # one reason shared by every module is said once, naming how many and which (it was one line per module)
    assert re.search(r"\n  - (\d+) modules \(model\.layers\.0\.[a-z_.]+, .*\.\.\. "
                     r"model\.layers\.1\.[a-z_.]+\): not found in this BertModel$", msg), msg
    assert int(re.search(r"(\d+) modules", msg).group(1)) == len(bd.read_adapter(directory)[0].modules)
    assert not list(bd.bca_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_shapes_reported(llama_adapter):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, directory = llama_adapter
    wider = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(AdapterMismatchError) as err:
        bd.load_adapter(wider, directory)
    assert "module model.layers.0.self_attn.q_proj: weight (48, 48) (in=48, out=48) but the adapter was " \
           "trained on in=32, out=32" in str(err.value)


def test_tampered_tensors_reported(llama_adapter):
    _, directory = llama_adapter
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.self_attn.q_proj.bca_kernel"]
    tensors["model.layers.1.self_attn.v_proj.bca_kernel"] = torch.zeros(2, 4, 4)
    tensors["model.layers.9.self_attn.q_proj.bca_kernel"] = torch.zeros(4, 4, 8)
    tensors["lm_head.weight"] = torch.zeros(100, 32)
    save_file(tensors, weights)
    with pytest.raises(AdapterMismatchError) as err:
        bd.load_adapter(tiny_llama(), directory)
    msg = str(err.value)
    assert "tensor model.layers.0.self_attn.q_proj.bca_kernel: missing" in msg
    assert "tensor model.layers.1.self_attn.v_proj.bca_kernel: shape (2, 4, 4), expected (2, 4, 8)" in msg
    assert "tensor model.layers.9.self_attn.q_proj.bca_kernel: unexpected" in msg
    assert "tensor lm_head.weight: unexpected" in msg


def test_malformed_directories(tmp_path, llama_adapter):
    _, directory = llama_adapter
    with pytest.raises(AdapterFormatError, match="adapter directory not found"):
        bd.load_adapter(tiny_llama(), tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        bd.load_adapter(tiny_llama(), broken)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["format_version"] = 99
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="format_version 99 is not supported"):
        bd.load_adapter(tiny_llama(), directory)


def test_pickle_weights_are_refused(tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "C3A"}))
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(AdapterFormatError, match="is a pickle; bca-deploy loads safetensors only"):
        bd.load_adapter(tiny_llama(), directory)


def test_other_peft_types_refused(tmp_path):
    directory = tmp_path / "lora"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, directory / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="is a PEFT LORA adapter; bca-deploy reads PEFT adapters of type C3A"):
        bd.load_adapter(tiny_llama(), directory)


def test_overwrite_false_refuses_existing(llama_adapter):
    model, directory = llama_adapter
    before = (directory / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds an adapter"):
        bd.save_adapter(model, directory, overwrite=False)
    assert (directory / "adapter_model.safetensors").read_bytes() == before


def test_save_replaces_an_adapter_and_refuses_a_folder_that_holds_none(llama_adapter, tmp_path):
    """save_adapter (convert's writer) into a project folder or ~ rebuilt all of it beside the adapter files: now a
    folder holding no adapter (or holding .git) is refused, untouched; an earlier adapter is still replaced."""
    model, directory = llama_adapter
    (directory / "README.md").write_text("notes")
    bd.save_adapter(model, directory, overwrite=True)
    assert (directory / "README.md").read_text() == "notes"  # other files beside an adapter are kept, as before
    for extra in ("notes.txt", ".git"):
        folder = tmp_path / f"mine-{extra}"
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        if extra == ".git":
            (folder / extra).mkdir()
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(OutputExistsError, match=f"{folder}: .*(not an output of bca-deploy|holds .git)"):
            bd.save_adapter(model, folder)
        assert sorted(p.name for p in folder.iterdir()) == before and (folder / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    bd.save_adapter(model, empty)
    assert (empty / "adapter_config.json").is_file()


def test_nan_kernel_refused_on_save(tmp_path):
    model = bd.inject(tiny_bert(), ["query"], block_size=8)
    with torch.no_grad():
        model.get_submodule("encoder.layer.1.attention.self.query").bca_kernels["default"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.query.bca_kernel has NaN"):
        bd.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_unknown_adapter_name(tmp_path):
    model = bd.inject(tiny_bert(), ["query"], block_size=8)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        bd.save_adapter(model, tmp_path / "a", adapter_name="x")


def test_nested_modules_to_save_round_trip(tmp_path, input_ids):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    def factory():
        torch.manual_seed(0)
        return RobertaForSequenceClassification(RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64, num_labels=3)).eval()

    model = bd.inject(factory(), ["query"], block_size=8, init="normal", seed=0, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.out_proj.weight.normal_()  # nested: classifier.dense and classifier.out_proj
    bd.save_adapter(model, tmp_path / "a")
    assert "classifier.out_proj.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    loaded = bd.load_adapter(factory(), tmp_path / "a")
    assert torch.equal(loaded(input_ids=input_ids + 2).logits, model(input_ids=input_ids + 2).logits)


def test_paths_differing_by_base_model_prefix_are_aligned(tmp_path, input_ids):
    from transformers import LlamaModel

    causal = bd.inject(tiny_llama(), ["q_proj", "v_proj"], block_size=8, init="normal", init_std=0.1, seed=0)
    bd.save_adapter(causal, tmp_path / "a")  # paths "model.layers.N..."
    bare = tiny_llama().model  # a LlamaModel: paths "layers.N..."
    loaded = bd.load_adapter(bare, tmp_path / "a")
    assert sorted(dict(bd.bca_layers(loaded))) == [f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert isinstance(loaded, LlamaModel)
    expected = causal.model(input_ids=input_ids).last_hidden_state
    assert torch.equal(loaded(input_ids=input_ids).last_hidden_state, expected)
    # and back: saved from the bare model, loaded into the causal-LM class
    bd.save_adapter(loaded, tmp_path / "b")
    again = bd.load_adapter(tiny_llama(), tmp_path / "b")
    assert torch.equal(again(input_ids=input_ids).logits, causal(input_ids=input_ids).logits)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_get_the_mode_the_umask_gives(tmp_path, mask):
    """safetensors 0.8 writes its files 0o600, so a service account could not read an adapter another user
    trained (and was told the file does not exist). Every file of a saved adapter gets 0o666 & ~umask."""
    model = tiny_llama()
    bd.inject(model, ["q_proj"], block_size=8, init="normal", seed=0)
    old = os.umask(mask)
    try:
        out = bd.save_adapter(model, tmp_path / "ad")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes


def test_weights_this_user_may_not_read_are_named_as_such(tmp_path, monkeypatch):
    """safetensors reports a file it may not open as "No such file or directory"; the reader now names the
    permission problem (emulated with the readability check: the tests may run as root)."""
    import bca_deploy.adapter_io as adapter_io

    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    out = bd.save_adapter(model, tmp_path / "ad")
    weights = out / "adapter_model.safetensors"

    def deny(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(adapter_io, "require_readable", deny)
    with pytest.raises(AdapterFormatError, match=rf"{weights}: cannot read \(Permission denied\)"):
        bd.read_adapter(out)


# ---- what a weights file's header declares: refused or described before any tensor data is read -------------------
# A sparse file (a few KB on disk) can declare GiBs of tensor data. Before, every reader (inspect included) read the
# declared bytes into memory and only then refused or described the adapter: 2 GiB declared took inspect to 6 GB RSS.

GIANT = 1 << 30  # bytes a tampered header declares (small enough that the old code's reading it stays survivable)


def _rewrite(directory, tensors: dict, giant: tuple[str, str, list[int]] | None = None, *, sparse: bool = True,
             config_edit=None) -> None:
    """Write ``tensors`` (real bytes) into ``directory``'s weights file, then ``giant`` = (name, dtype, shape) declared
    after them: its bytes a hole in a sparse file (``sparse``), or absent (the file ends where the real data ends)."""
    import struct

    header, raw = {"__metadata__": {"format": "pt"}}, b""
    names = {torch.float32: "F32", torch.float16: "F16"}
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [len(raw), len(raw) + len(data)]}
        raw += data
    end = len(raw)
    if giant is not None:
        name, dtype, shape = giant
        end += {"F32": 4, "F16": 2}[dtype] * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(raw), end]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(directory / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw)
        if sparse:
            f.truncate(8 + len(text) + end)
    if config_edit is not None:
        path = directory / "adapter_config.json"
        data = json.loads(path.read_text())
        config_edit(data)
        path.write_text(json.dumps(data))


@pytest.fixture
def bert_adapter(tmp_path):
    model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    directory = bd.save_adapter(model, tmp_path / "good")
    return directory, load_file(directory / "adapter_model.safetensors")


def _copy(directory, name):
    import shutil

    return shutil.copytree(directory, directory.parent / name)


def _no_data_read(monkeypatch):
    """Fail the test if any reader reads the weights file's tensor data (every reader goes through load_safetensors)."""
    import bca_deploy.adapter_io as adapter_io

    def refuse(path):
        raise AssertionError(f"{path}: tensor data read")

    monkeypatch.setattr(adapter_io, "load_safetensors", refuse)


KERNEL = "encoder.layer.0.attention.self.query.bca_kernel"


def _header(directory):
    from bca_deploy.adapter_io import read_adapter_header

    return read_adapter_header(directory)


def test_a_kernel_declared_larger_than_its_module_is_refused_unread(bert_adapter, monkeypatch):
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, {k: v for k, v in tensors.items() if k != KERNEL}, (KERNEL, "F32", [GIANT // 4]))
    assert (bad / "adapter_model.safetensors").stat().st_blocks * 512 < 1 << 20  # sparse: the GiB is a hole
    _no_data_read(monkeypatch)
    for read in (lambda: bd.read_adapter(bad), lambda: bd.load_adapter(tiny_bert(), bad), lambda: _header(bad)):
        with pytest.raises(AdapterFormatError) as refused:
            read()
        message = str(refused.value)
        assert f"{bad / 'adapter_model.safetensors'}: tensors whose declared size does not fit" in message
        assert (f"tensor {KERNEL}: declares F32 [{GIANT // 4}], {GIANT:,} bytes; module "
                "encoder.layer.0.attention.self.query has a (4, 4, 8) kernel") in message
        assert "at most 1,024 bytes, in float64" in message  # 4*4*8 elements, 8 bytes each
        assert "refused before reading any tensor data" in message


def test_a_tensor_the_config_has_no_place_for_is_refused_unread(bert_adapter, monkeypatch):
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, tensors, ("junk.weight", "F16", [GIANT // 2]))
    _no_data_read(monkeypatch)
    with pytest.raises(AdapterFormatError, match=re.escape(
            f"tensor junk.weight: declares F16 [{GIANT // 2}], {GIANT:,} bytes; unexpected (not a kernel, and not "
            "under any of modules_to_save [])")):
        bd.read_adapter(bad)


def test_many_empty_tensors_the_config_has_no_place_for_are_refused_unread(bert_adapter, monkeypatch):
    """An empty tensor declares 0 bytes, which was taken as fitting its room of 0: 240,000 of them (a 16 MB header)
    were all read, taking 52.8 s and 711 MB to refuse. Each tensor with no place now counts what reading it costs
    (4,100 of them: within the count the config allows, adapter_tensor_limit, and over what is read)."""
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, {**tensors, **{f"junk.{i}": torch.zeros(0) for i in range(4_100)}})
    _no_data_read(monkeypatch)
    with pytest.raises(AdapterFormatError) as refused:
        bd.read_adapter(bad)
    message = str(refused.value)
    assert "refused before reading any tensor data" in message and \
        "tensor junk.0: declares F32 [0], 0 bytes; unexpected (not a kernel" in message and "and 4050 more" in message


@pytest.mark.parametrize("key", ["data_offsets", "data\\u005foffsets"])
def test_a_header_declaring_more_tensors_than_the_config_allows_is_refused_before_they_are_checked(
        bert_adapter, monkeypatch, key):
    """A 16 MB header declaring 240,000 empty tensors was parsed and checked one by one (~9 s) before its refusal.
    The count is bounded by what the config can hold (adapter_tensor_limit: 4 adapted modules here) and checked
    before any per-tensor work: counted before the parse; a key written with escapes, once parsed."""
    import struct

    import bca_deploy.merge as merge
    from bca_deploy.adapter_io import adapter_tensor_limit

    good, _ = bert_adapter
    bad = _copy(good, "bad")
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"{key}":[0,0]}}' for i in range(240_000))
    raw = ("{" + entries + "}").encode()
    (bad / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    limit = adapter_tensor_limit(json.loads((bad / "adapter_config.json").read_text()))
    assert limit is not None and limit[0] == 3 * 4 + 4096, limit
    _no_data_read(monkeypatch)
    if key == "data_offsets":  # refused before the parse, whose hooks were most of the time
        monkeypatch.setattr(merge, "parse_json_object", lambda *a, **k: pytest.fail("the header was parsed"))
    for read in (lambda: bd.read_adapter(bad), lambda: bd.load_adapter(tiny_bert(), bad), lambda: _header(bad)):
        with pytest.raises(AdapterFormatError) as refused:
            read()
        assert str(refused.value) == (
            f"{bad / 'adapter_model.safetensors'}: the header declares 240,000 tensors, more than its config allows "
            "(4 adapted modules: a kernel, base weight and bias each; 0 modules_to_save: 4,096 tensors each, and as "
            f"many other base weights) ({limit[0]:,} at most); refused before reading them"), str(refused.value)


def test_small_misfits_are_still_read_and_listed_with_every_other_problem(bert_adapter):
    """Misfits of a few bytes are read, so that the usual check lists them with the rest (values included)."""
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, {**tensors, KERNEL: torch.full((4, 4, 8), float("nan")), "junk.weight": torch.zeros(3)})
    with pytest.raises(AdapterFormatError) as refused:
        bd.read_adapter(bad)
    message = str(refused.value)
    assert f"tensor {KERNEL}: has NaN/Inf values" in message and "tensor junk.weight: unexpected" in message


def test_a_header_declaring_more_than_the_file_holds_names_the_tensor(bert_adapter):
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, tensors, ("pooler.dense.weight", "F32", [32, 32]), sparse=False,
             config_edit=lambda d: d.__setitem__("modules_to_save", ["pooler.dense"]))
    for read in (lambda: bd.read_adapter(bad), lambda: _header(bad)):
        with pytest.raises(AdapterFormatError, match=re.escape(
                f"{bad / 'adapter_model.safetensors'}: tensor pooler.dense.weight (F32 [32, 32], 4,096 bytes at bytes "
                "2,048..6,144 of the data section) ends past the end of the file")):
            read()


def _inspect(directory):
    from click.testing import CliRunner

    from bca_deploy.cli import main

    return CliRunner().invoke(main, ["inspect", str(directory)])


def test_inspect_refuses_declared_sizes_that_do_not_fit_without_reading(bert_adapter, monkeypatch):
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    _rewrite(bad, {k: v for k, v in tensors.items() if k != KERNEL}, (KERNEL, "F32", [GIANT // 4]))
    _no_data_read(monkeypatch)
    result = _inspect(bad)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"tensor {KERNEL}: declares F32 [{GIANT // 4}], {GIANT:,} bytes" in result.output


def test_inspect_describes_an_adapter_too_large_to_read_from_its_header(bert_adapter, monkeypatch):
    """A module saved whole has no size in the config: a file declaring more than inspect reads is described from
    its header (names, dtypes, shapes, declared sizes) and flagged, its values not read."""
    good, tensors = bert_adapter
    big = _copy(good, "big")
    _rewrite(big, {**tensors, "pooler.dense.bias": torch.zeros(32)}, ("pooler.dense.weight", "F32", [GIANT // 4]),
             config_edit=lambda d: d.__setitem__("modules_to_save", ["pooler.dense"]))
    _no_data_read(monkeypatch)
    result = _inspect(big)
    assert result.exit_code == 0, result.output
    size = (big / "adapter_model.safetensors").stat().st_size
    lines = result.output.splitlines()
    assert f"saved whole:  pooler.dense ({GIANT // 4 + 32:,} parameters)" in lines
    assert f"weights:      adapter_model.safetensors: 6 tensors (F32), {2048 + 128 + GIANT:,} bytes of tensor data" \
        in lines
    assert (f"values:       NOT read or checked: the file is {size:,} bytes, over the {1 << 30:,} bytes inspect reads "
            f"(largest: pooler.dense.weight F32 [{GIANT // 4}], {GIANT:,} bytes;") in result.output
    assert "encoder.layer.1.attention.self.value  linear      32      32     8  1" in result.output  # the config's table


def test_inspect_still_reads_and_checks_an_adapter_within_the_bound(bert_adapter):
    good, tensors = bert_adapter
    assert "weights:      adapter_model.safetensors: 4 tensors (F32), 2,048 bytes of tensor data" in _inspect(good).output
    bad = _copy(good, "bad")
    _rewrite(bad, {**tensors, KERNEL: torch.full((4, 4, 8), float("inf"))})
    result = _inspect(bad)
    assert result.exit_code == 2 and f"tensor {KERNEL}: has NaN/Inf values" in result.output, result.output


def test_inspect_describes_a_peft_adapter_too_large_to_read_from_its_header(bert_adapter, monkeypatch):
    """A PEFT C3A file's modules come from its kernels' shapes: read from the header, a 1 GiB kernel is described."""
    good, _ = bert_adapter
    model = bd.load_adapter(tiny_bert(), good)
    bd.save_adapter(model, good.parent / "peft", format="peft")
    peft = good.parent / "peft"
    tensors = load_file(peft / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    _rewrite(peft, {k: v for k, v in tensors.items() if k != name}, (name, "F32", [4096, 8192, 8]))
    _no_data_read(monkeypatch)
    result = _inspect(peft)
    assert result.exit_code == 0, result.output
    module = name[len("base_model.model."):-len(".c3a_kernel")]
    assert re.search(rf"{re.escape(module)}\s+linear\s+65536\s+32768\s+8\s", result.output), result.output
    assert f"largest: {name} F32 [4096, 8192, 8], {GIANT:,} bytes" in result.output


def test_inspect_memory_stays_bounded_on_a_sparse_giant(bert_adapter, tmp_path):
    """Peak RSS of the inspect process, measured: before, it held the declared GiB (3x: ~3 GB for 1 GiB); now the
    header is all it reads. Run in a subprocess so that the peak is inspect's own."""
    import subprocess
    import sys

    good, tensors = bert_adapter
    big = _copy(good, "big")
    _rewrite(big, {**tensors, "pooler.dense.bias": torch.zeros(32)}, ("pooler.dense.weight", "F32", [GIANT // 4]),
             config_edit=lambda d: d.__setitem__("modules_to_save", ["pooler.dense"]))
    code = ("import resource, sys\nfrom bca_deploy.cli import main\nbaseline = resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss\ntry:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print('RSS', baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("RSS ")][-1]
    _, baseline, peak, code = line.split()
    assert code in ("0", "None"), proc.stdout + proc.stderr
    assert int(peak) - int(baseline) < 128 << 10, (baseline, peak)  # KiB: nothing near the declared GiB


def _classifier_adapter(tmp_path, names):
    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs

    trained = bd.inject(tiny_bert(num_labels=len(names)), ["query"], block_size=8, init="normal", init_std=0.1, seed=0,
                        modules_to_save=["classifier"])
    trained.config.id2label = dict(enumerate(names))
    trained.config.label2id = {n: i for i, n in enumerate(names)}
    adapter_configs(trained)["default"].task = task_spec_from_config("seq-cls", trained.config, ["classifier"])
    return bd.save_adapter(trained, tmp_path / "classifier")


def test_load_adapter_names_the_classes_as_the_adapter_records_them(tmp_path, input_ids):
    """``load_adapter`` put the adapter's classifier in but left the model's LABEL_0..: a transformers pipeline answered
    LABEL_1 where merge, export and serve say 'positive'. The config now names them as the adapter's head does, and
    removing the adapter (unmerged) gives the base model's back."""
    directory = _classifier_adapter(tmp_path, ["food", "sports", "tech"])
    model = tiny_bert(num_labels=3)
    before = (dict(model.config.id2label), dict(model.config.label2id))
    bd.load_adapter(model, directory)
    assert model.config.id2label == {0: "food", 1: "sports", 2: "tech"}
    assert model.config.label2id == {"food": 0, "sports": 1, "tech": 2}
    logits = model_output(model, input_ids)
    assert model.config.id2label[int(logits[0].argmax())] in {"food", "sports", "tech"}
    # the names follow the head in place: the model's own while another adapter is active or adapters are disabled
    # (helper-62: a pipeline named the base's untrained head's answers with the adapter's classes)
    headless = bd.inject(tiny_bert(num_labels=3), ["value"], block_size=8, init="normal", init_std=0.1, seed=1)
    bd.load_adapter(model, bd.save_adapter(headless, tmp_path / "headless"), adapter_name="other")
    named = {0: "food", 1: "sports", 2: "tech"}
    for step, want in ((lambda: bd.set_adapter(model, ["other"]), before[0]), (lambda: bd.set_adapter(model, "default"),
                       named), (lambda: bd.disable_adapters(model), before[0]), (lambda: bd.enable_adapters(model), named)):
        step()
        assert model.config.id2label == want
    bd.remove_adapters(model)
    assert (model.config.id2label, model.config.label2id) == before
    merged = bd.remove_adapters(bd.load_adapter(tiny_bert(num_labels=3), directory), merge=True)
    assert merged.config.id2label == {0: "food", 1: "sports", 2: "tech"}  # the merged model keeps the adapter's head


def test_a_head_of_another_label_count_is_refused_saying_how_to_build_the_model(tmp_path):
    directory = _classifier_adapter(tmp_path, ["food", "sports", "tech"])
    model = tiny_bert(num_labels=2)
    with pytest.raises(AdapterMismatchError) as err:
        bd.load_adapter(model, directory)
    message = str(err.value)
    assert "tensor classifier.bias: shape (3,), this BertForSequenceClassification has (2,) (the adapter's " \
        "classifier has 3 labels: build the model with num_labels=3" in message, message
    assert "tensor classifier.weight: shape (3, 32)" in message and "bca_deploy.models.load_model" in message
    assert message.count("num_labels=3") == 1  # once, not per tensor
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}


@pytest.mark.parametrize("giant", [False, True], ids=["read", "refused-unread"])
def test_a_long_modules_to_save_is_shown_short_in_each_stray_tensors_line(bert_adapter, giant):
    """helper-105: each stray tensor's line held the whole modules_to_save: a 1.1 MB config of 100,000 entries and
    1,000 stray tensors peaked at 1.28 GB building the refusal. The list is shown by its first entries and count."""
    good, tensors = bert_adapter
    bad = _copy(good, "bad")
    saved = [f"extra{i}" for i in range(500)]
    strays = {f"junk{i}.weight": torch.zeros(3) for i in range(20)}
    _rewrite(bad, {**tensors, **strays}, ("junk.giant", "F16", [GIANT // 2]) if giant else None,
             config_edit=lambda data: data.update(modules_to_save=saved))
    with pytest.raises(AdapterFormatError) as refused:
        bd.read_adapter(bad)
    message = str(refused.value)
    assert "not under any of modules_to_save ['extra0', 'extra1'," in message and "(500 in all)" in message
    assert "extra499" not in message and len(message) < 20_000
