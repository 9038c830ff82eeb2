"""The config-fit check (``bca_deploy.models.config_fit_problems``) on mixture-of-experts checkpoints (Mixtral,
Qwen2-MoE) with one expert broken.

transformers 5.x fuses the per-expert Linears it reads (``block_sparse_moe.experts.N.w1/w2/w3``,
``mlp.experts.N.gate_proj/up_proj/down_proj``) into 3-D parameters (``mlp.experts.gate_up_proj`` (E, 2*I, H),
``down_proj`` (E, H, I)), so the stored tensors name no parameter of the model and the check passed them by: a
checkpoint with one expert's ``w1`` of another shape, or one expert missing, was merged (transformers then refuses the
output: its stack of the experts fails, or the fused parameter has E-1 experts). Now each stored expert tensor is
checked against the shape its fused parameter implies, and every expert must be stored, before anything is written.
On transformers 4.x each expert is a Linear of its own, which the existing per-tensor and layer-list rules check:
the same tests pass there (the reference: what ``from_pretrained`` of either line does with the checkpoint).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.errors import CheckpointFormatError
from bca_deploy.merge import merge_checkpoint
from bca_deploy.models import require_config_fits_weights
from test_merge_moe import CONFIGS

#: a stored key of expert 2 of layer 1, and the model's 4.x name of the MoE block
EXPERT = {"mixtral": ("model.layers.1.block_sparse_moe.experts.2.w1.weight", "block_sparse_moe"),
          "qwen2_moe": ("model.layers.1.mlp.experts.2.gate_proj.weight", "mlp")}


def broken_checkpoint(arch: str, directory, how: str) -> tuple[str, list[int]]:
    """A tiny random checkpoint saved with save_pretrained, then one expert broken: its w1/gate_proj one row short
    (``shape``), or every tensor of it left out (``missing``). Returns the edited key and its saved shape."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    key, _ = EXPERT[arch]
    shape = list(weights[key].shape)
    if how == "shape":
        weights[key] = weights[key][:-1].clone()
    else:
        for k in [k for k in weights if k.startswith(key.rsplit(".", 2)[0] + ".")]:
            del weights[k]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return key, shape


def transformers_refuses_or_reinitializes(directory) -> bool:
    """What from_pretrained does with the checkpoint: raise, or load it with weights missing or resized."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    except Exception:  # noqa: BLE001 - either line's refusal (a size mismatch, a failed conversion)
        return True
    return bool(info["missing_keys"] or info.get("mismatched_keys"))


def refusal(arch: str, directory, how: str) -> tuple[str, list[int], str]:
    """A checkpoint broken ``how``, which transformers itself refuses or loads at random: the broken key, its
    shape, and the message bca-deploy's check refuses it with."""
    key, shape = broken_checkpoint(arch, directory, how)
    assert transformers_refuses_or_reinitializes(directory)
    with pytest.raises(CheckpointFormatError) as caught:
        require_config_fits_weights(directory)
    return key, shape, str(caught.value)


@pytest.mark.parametrize("arch", CONFIGS)
def test_an_expert_tensor_of_another_shape_is_refused_naming_it_and_the_shape_expected(arch, tmp_path):
    key, shape, message = refusal(arch, tmp_path / "base", "shape")
    assert f"tensor {key} (model.safetensors)" in message and f"stored {[shape[0] - 1, shape[1]]}" in message \
        and f"config.json gives {shape}" in message, message


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_missing_expert_is_refused_naming_it(arch, tmp_path):
    """Both lines name each missing tensor of the expert (5.x: of every fused parameter; 4.x: of the expert's entry in
    the experts' ModuleList, which said only "config.json builds 4 entries (num_hidden_layers...)") and the count of
    experts."""
    key, _, message = refusal(arch, tmp_path / "base", "missing")
    expert = key.rsplit(".", 2)[0]
    assert expert in message and "at random" in message, message
    for leaf in {"mixtral": ("w1", "w2", "w3"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}[arch]:
        assert f"{expert}.{leaf}.weight" in message, (leaf, message)
    assert "config.json builds 4 experts" in message, message


@pytest.mark.parametrize("how", ["shape", "missing"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_merge_refuses_a_broken_expert_before_writing(arch, how, tmp_path):
    """merge wrote a checkpoint that transformers then refused or loaded with an expert at random."""
    key, _ = broken_checkpoint(arch, tmp_path / "base", how)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    bd.inject(model, ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(CheckpointFormatError, match="do not fit its config.json") as caught:
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    assert key.rsplit(".", 2)[0] in str(caught.value), str(caught.value)
    assert not (tmp_path / "merged").exists()
