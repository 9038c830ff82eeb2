"""PEFT C3A interop both ways, against real PEFT, on tiny random Llama and BERT with non-zero kernels."""

from __future__ import annotations

import json

import pytest
import torch
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import bca_deploy as bd
from bca_deploy.errors import AdapterFormatError
from conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj"], {"gate_proj": 16}),
    "bert": (lambda: tiny_bert(num_labels=3), ["query", "value"], {"layer.1.attention.self.query": 4}),
}


def peft_model_with_random_kernels(factory, targets, pattern, **extra):
    torch.manual_seed(11)
    model = get_peft_model(factory(), C3AConfig(block_size=8, target_modules=targets,
                                                block_size_pattern=pattern, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)  # PEFT scales ΔW by 1/in_features: make the delta visible
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_adapter_loads_with_identical_outputs(arch, tmp_path, input_ids):
    factory, targets, pattern = CASES[arch]
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    peft_model = peft_model_with_random_kernels(factory, targets, pattern, **extra)
    if arch == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = model_output(peft_model, input_ids)
    assert (expected - model_output(factory(), input_ids)).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path / "peft")

    ours = bd.load_adapter(factory(), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    p = {n: l.block_sizes["default"] for n, l in bd.bca_layers(ours)}
    assert 16 in p.values() or 4 in p.values()  # the per-module override came through


@pytest.mark.parametrize("arch", sorted(CASES))
def test_bca_adapter_saved_for_peft_loads_with_identical_outputs(arch, tmp_path, input_ids):
    factory, targets, pattern = CASES[arch]
    ours = bd.inject(factory(), targets, block_size=8, block_size_pattern=pattern, init="normal",
                     init_std=0.1, seed=0, scaling=0.5,
                     modules_to_save=["classifier"] if arch == "bert" else ())
    expected = model_output(ours, input_ids)
    bd.save_adapter(ours, tmp_path / "for-peft", format="peft", task_type="SEQ_CLS" if arch == "bert" else None)
    config = json.loads((tmp_path / "for-peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "C3A"

    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "for-peft").eval()
    torch.testing.assert_close(model_output(peft_model, input_ids), expected, rtol=1e-5, atol=1e-5)
    for name, layer in bd.bca_layers(ours):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.block_size["default"] == layer.block_sizes["default"], name


def test_peft_round_trip_is_bit_exact(tmp_path):
    peft_model = peft_model_with_random_kernels(tiny_llama, ["q_proj", "down_proj"], {"down_proj": 16})
    peft_model.save_pretrained(tmp_path / "peft")
    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    bd.save_adapter(ours, tmp_path / "back", format="peft")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_peft_import_then_bca_save_reloads(tmp_path, input_ids):
    peft_model = peft_model_with_random_kernels(tiny_llama, ["v_proj"], {})
    peft_model.save_pretrained(tmp_path / "peft")
    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    bd.save_adapter(ours, tmp_path / "bca")
    again = bd.load_adapter(tiny_llama(), tmp_path / "bca")
    assert torch.equal(model_output(again, input_ids), model_output(ours, input_ids))


def test_conv1d_cannot_be_written_for_peft(tmp_path):
    model = bd.inject(tiny_gpt2(), ["c_attn"], block_size=8)
    with pytest.raises(AdapterFormatError, match="PEFT's C3A supports torch.nn.Linear only.*c_attn"):
        bd.save_adapter(model, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()
