"""The one fit check: the same verdict from a model, a checkpoint and a bank graph, every problem listed.

The issue's cases, each through load_adapter (a model target) and the streaming merge (a checkpoint
target): a ``conv1d`` adapter on a square Linear (merge used to add ΔWᵀ), a Linear-shaped adapter on an
embedding table (merge used to add it), ``modules: {}`` with kernels present (merge used to exit 0
having merged nothing), a tensor present in two shards (merge used to add the delta twice).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.adapter_io import adapter_state
from bca_deploy.config import ModuleSpec
from bca_deploy.errors import AdapterFormatError, AdapterMismatchError, AdapterNameError, CheckpointFormatError
from bca_deploy.fit import (
    ParamInfo,
    adapter_problems,
    align_to_target,
    bank_target,
    check_adapter,
    model_target,
    slot_problems,
)
from bca_deploy.merge import merge_checkpoint
from conftest import tiny_bert, tiny_gpt2, tiny_llama


def edit_config(directory, fn):
    data = json.loads((directory / "adapter_config.json").read_text())
    fn(data)
    (directory / "adapter_config.json").write_text(json.dumps(data))


@pytest.fixture
def llama_dirs(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def refused_everywhere(model_dir, adapter_dir, model, needle, tmp_path, error=AdapterMismatchError):
    """load_adapter and merge_checkpoint both refuse, naming ``needle``; neither changes anything."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=needle):
        bd.load_adapter(model, adapter_dir)
    assert not list(bd.bca_layers(model)) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(error, match=needle):
        merge_checkpoint(model_dir, [(adapter_dir, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_conv1d_declared_on_a_square_linear_is_refused(llama_dirs, tmp_path):
    base, adapter = llama_dirs  # q_proj is Linear(32, 32): the kernel shape alone cannot tell
    edit_config(adapter, lambda d: [s.__setitem__("layer_type", "conv1d") for s in d["modules"].values()])
    refused_everywhere(base, adapter, tiny_llama(), r"q_proj: is a Linear in .*declares it a Conv1D", tmp_path)


def test_linear_declared_on_a_gpt2_conv1d_is_refused(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = bd.inject(tiny_gpt2(), ["c_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    # attn.c_proj is a square Conv1D (32 -> 32): a "linear" claim would merge ΔW where ΔWᵀ belongs
    edit_config(tmp_path / "adapter", lambda d: [s.__setitem__("layer_type", "linear") for s in d["modules"].values()
                                                 if s["in_features"] == s["out_features"]])
    refused_everywhere(tmp_path / "base", tmp_path / "adapter", tiny_gpt2(), r"attn.c_proj: is a Conv1D", tmp_path)


def test_adapter_on_an_embedding_table_is_refused(llama_dirs, tmp_path):
    base, adapter = llama_dirs
    path = "model.embed_tokens"  # Embedding(100, 32): stored (100, 32) like a Linear 32 -> 100
    edit_config(adapter, lambda d: d["modules"].__setitem__(path, {
        "block_size": 4, "scaling": 1.0, "in_features": 32, "out_features": 100, "layer_type": "linear"}))
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state[path + ".bca_kernel"] = torch.ones(25, 8, 4)
    save_file(state, str(adapter / "adapter_model.safetensors"))
    refused_everywhere(base, adapter, tiny_llama(), r"model.embed_tokens: is a Embedding", tmp_path)


def test_empty_modules_with_kernels_present_is_refused(llama_dirs, tmp_path):
    base, adapter = llama_dirs
    edit_config(adapter, lambda d: d.__setitem__("modules", {}))
    refused_everywhere(base, adapter, tiny_llama(), r"bca_kernel: unexpected .*which is empty", tmp_path)
    with pytest.raises(AdapterFormatError, match="which is empty"):
        bd.read_adapter(adapter)


def test_tensor_in_two_shards_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][key])
    tensors = load_file(str(tmp_path / "base" / other))
    tensors[key] = torch.zeros(32, 32)  # the same tensor again, in a second shard
    save_file(tensors, str(tmp_path / "base" / other), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=f"tensor {key}: present in both"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(llama_dirs):
    _, adapter = llama_dirs
    config, state = bd.read_adapter(adapter)
    config.modules["model.layers.0.self_attn.q_proj"].layer_type = "conv1d"
    key = "model.layers.1.self_attn.q_proj.bca_kernel"
    state[key] = state[key].to(torch.complex64)
    state["stray"] = torch.zeros(1)
    config.base_model_type = "gpt2"
    target = model_target(tiny_llama())
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(config, state, target, source="the adapter")
    message = str(info.value)
    for needle in ("complex64", "tensor stray: unexpected", "base model_type is 'gpt2'", "declares it a Conv1D"):
        assert needle in message


def test_real_floating_dtypes_are_accepted():
    model = bd.inject(tiny_bert(), ["query"], block_size=8, init="normal", seed=0)
    config = bd.adapter_configs(model)["default"]
    state = adapter_state(model)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        cast = {k: v.to(dtype) for k, v in state.items()}
        assert adapter_problems(config, cast) == []
        check_adapter(config, cast, model_target(tiny_bert()))


def test_prefix_alignment_is_all_or_nothing():
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)  # model.layers.* paths
    config, state = bd.adapter_configs(model)["default"], adapter_state(model)
    bare = tiny_llama().model  # LlamaModel: layers.* paths, base_model_prefix "model"
    aligned, aligned_state = align_to_target(config, state, model_target(bare))
    assert sorted(aligned.modules) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    check_adapter(aligned, aligned_state, model_target(bare))
    # a path found under no rule (a module the model lacks) does not keep the others from aligning; it is kept
    config.modules["nowhere.q_proj"] = ModuleSpec(8, 1.0, 32, 32)
    partly, _ = align_to_target(config, state, model_target(bare))
    assert sorted(partly.modules) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "nowhere.q_proj"]
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(partly, {**aligned_state, "nowhere.q_proj.bca_kernel": torch.ones(4, 4, 8)}, model_target(bare))
    assert str(info.value).endswith("\n  - module nowhere.q_proj: not found in this LlamaModel"), str(info.value)
    # one path found only as it is, the others only renamed: no rule fits them all, so nothing is renamed
    del config.modules["nowhere.q_proj"]
    config.modules["layers.0.self_attn.k_proj"] = ModuleSpec(8, 1.0, 32, 16)
    unchanged, _ = align_to_target(config, state, model_target(bare))
    assert unchanged is config


def test_bank_target_holds_only_its_block_sizes_and_no_whole_modules():
    from bca_deploy.exporters.bank import BankTensor

    layout = {e.name: e for e in (BankTensor("enc.q", 8, 32, 32, "linear"), BankTensor("enc.q", 16, 32, 32, "linear"))}
    target = bank_target(layout, model_type="bert")
    spec = ModuleSpec(4, 1.0, 32, 32)
    config = bd.AdapterConfig(target_modules=["q"], block_size=4, modules={"enc.q": spec}, modules_to_save=["head"])
    state = {"enc.q.bca_kernel": torch.ones(spec.kernel_shape), "head.weight": torch.ones(2, 32)}
    with pytest.raises(AdapterMismatchError) as info:
        check_adapter(config, state, target)
    assert "block size 4; the bank graph holds block size(s) 8, 16" in str(info.value)
    assert "every row of a bank graph shares its whole modules" in str(info.value)
    heads = bank_target(layout, model_type="bert", params={"head.weight": ParamInfo((2, 32))})
    config.modules = {"enc.q": ModuleSpec(8, 1.0, 32, 32)}
    state = {"enc.q.bca_kernel": torch.ones(4, 4, 8), "head.weight": torch.ones(2, 32)}
    check_adapter(config, state, heads)  # a bank with per-adapter heads takes them


def test_slot_problems():
    from bca_deploy.exporters.bank import BankTensor

    entry = BankTensor("enc.q", 8, 32, 32, "linear")
    layout = {entry.name: entry}
    good = torch.zeros(entry.slot_shape).numpy()
    assert slot_problems({entry.name: good}, layout) == []
    assert "not a bank input" in slot_problems({"x": good}, layout)[0]
    assert "dtype int64" in slot_problems({entry.name: good.astype("int64")}, layout)[0]
    assert "NaN/Inf" in slot_problems({entry.name: good + float("nan")}, layout)[0]


def test_failed_load_restores_the_model(llama_dirs, monkeypatch, input_ids):
    """A failure after the checks (here: while copying a kernel) puts every module, weight and flag back."""
    _, adapter = llama_dirs
    model = bd.inject(tiny_llama(), ["v_proj"], block_size=8, init="normal", seed=1, adapter_name="first")
    model.train()
    before_out = model(input_ids=input_ids).logits.detach()
    before_types = [(n, type(m).__name__) for n, m in model.named_modules()]
    before_flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    calls = {"n": 0}
    real_copy = torch.Tensor.copy_

    def failing_copy(self, src, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="device lost"):
        bd.load_adapter(model, adapter)
    monkeypatch.undo()
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before_types
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before_flags
    assert model.training and sorted(bd.adapter_configs(model)) == ["first"]
    torch.testing.assert_close(model(input_ids=input_ids).logits, before_out, rtol=0, atol=0)
    bd.load_adapter(model, adapter)  # 'default' was not left half-registered
    assert sorted(bd.adapter_configs(model)) == ["default", "first"]


def test_duplicate_adapter_name_refused_before_any_change(llama_dirs):
    _, adapter = llama_dirs
    model = bd.load_adapter(tiny_llama(), adapter)
    with pytest.raises(AdapterNameError, match="already has an adapter named 'default'"):
        bd.load_adapter(model, adapter)


def test_checkpoint_without_config_is_checked_by_shapes(llama_dirs, tmp_path):
    """No config.json: no architecture to build, so layer types are unknown; shapes are still checked."""
    from safetensors import safe_open

    base, adapter = llama_dirs
    (base / "config.json").unlink()
    out = merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False)
    model = bd.load_adapter(tiny_llama(), adapter)
    expected = bd.merge.merge_and_unload(model).model.layers[0].self_attn.q_proj.weight
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"), expected)
    edit_config(adapter, lambda d: [s.update(in_features=64, out_features=64) for s in d["modules"].values()])
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: torch.ones(8, 8, 8) for k in state}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=r"(?s)the adapter expects \[64, 64\].*layer types not checked"):
        merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "again", progress=False)


# ---- a task head the model lacks: named once, the rest of the adapter still aligned -----------------------------


def _peft_adapter(model, out, **kwargs):
    """A PEFT C3A adapter as users save one (``get_peft_model`` + ``save_pretrained``), kernels drawn non-zero."""
    import warnings

    from peft import C3AConfig, get_peft_model

    peft_model = get_peft_model(model, C3AConfig(block_size=8, **kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
    return out


def _problems(error):
    return [line[4:] for line in str(error.value).splitlines()[1:]]


def test_a_classification_head_the_model_lacks_is_named_once(tmp_path):
    """A SEQ_CLS adapter (PEFT saves the classifier whole) in a BertModel: the encoder modules align (the bert. prefix
    dropped), and the one problem is the head. It listed every module as not found: the classifier, which no prefix
    resolves, broke the all-or-nothing alignment."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                  max_position_embeddings=64)
    torch.manual_seed(0)
    adapter = _peft_adapter(BertForSequenceClassification(BertConfig(intermediate_size=64, num_labels=3, **config)),
                            tmp_path / "adapter", task_type="SEQ_CLS", target_modules=["query", "dense"])
    head = ("module classifier: {} has no such module; the adapter was trained on a model with a classification head "
            "(classifier): {}")
    bare = BertModel(BertConfig(intermediate_size=64, **config))
    with pytest.raises(AdapterMismatchError) as info:
        bd.load_adapter(bare, adapter)
    assert _problems(info) == [head.format("this BertModel", "load it into BertForSequenceClassification "
                                                              "(AutoModelForSequenceClassification)")]
    assert not list(bd.bca_layers(bare))
    # the streaming merge of the same pair writes the classifier checkpoint the adapter was trained as: its head,
    # 3 labels (read from the saved label layer, models.saved_label_head), though the bare checkpoint says 2
    bare.save_pretrained(tmp_path / "bare")
    merge_checkpoint(tmp_path / "bare", [(adapter, 1.0)], tmp_path / "merged", progress=False)
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 3 and merged.config.architectures == ["BertForSequenceClassification"]
    # every other problem is still listed with it, the modules named in the model's own paths
    narrower = BertModel(BertConfig(intermediate_size=48, **config))
    with pytest.raises(AdapterMismatchError) as info:
        bd.load_adapter(narrower, adapter)
    lines = _problems(info)
    # the module, both weights' shapes and the adapter's tensor (a model of another size)
    assert lines[0] == ("module encoder.layer.0.intermediate.dense: weight (48, 32) (in=32, out=48) but the adapter "
                        "was trained on in=32, out=64 (its kernel, shape (8, 4, 8) at block size 8, is ΔW of a "
                        "weight (64, 32))")
    assert any(line.startswith("module encoder.layer.1.output.dense: weight (32, 48)") for line in lines), lines
    assert lines[-1].startswith("module classifier: this BertModel has no such module") and len(lines) == 5, lines


def test_a_language_modeling_head_the_model_lacks_is_named_once(tmp_path):
    """An adapter with an lm_head kernel in a LlamaModel: the decoder's modules align (model. dropped), lm_head is
    named as the head a LlamaForCausalLM has, with or without the task the PEFT config records."""
    from transformers import LlamaModel

    for task in ({"task_type": "CAUSAL_LM"}, {}):
        adapter = _peft_adapter(tiny_llama(), tmp_path / f"adapter{len(task)}", target_modules=["q_proj", "lm_head"],
                                block_size_pattern={"lm_head": 4}, **task)  # lm_head: 32 -> 100
        bare = LlamaModel(tiny_llama().config)
        with pytest.raises(AdapterMismatchError) as info:
            bd.load_adapter(bare, adapter)
        way_out = "load it into LlamaForCausalLM (AutoModelForCausalLM)" + ("" if task else ", or the class it was "
                                                                                          "trained with")
        assert _problems(info) == ["module lm_head: this LlamaModel has no such module; the adapter was trained on a "
                                   f"model with a language-modeling head (lm_head): {way_out}"]
