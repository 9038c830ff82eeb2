"""merge on mixture-of-experts checkpoints (Mixtral, Qwen2-MoE): a sequence-classification adapter merges into one
with its head, as either transformers line loads it.

transformers 5.x fuses the per-expert Linears it reads (``block_sparse_moe.experts.N.w1/w2/w3``,
``mlp.experts.N.gate_proj/up_proj/down_proj``) into 3-D parameters (``mlp.experts.gate_up_proj``, ``down_proj``) and
renames Mixtral's ``block_sparse_moe`` to ``mlp``; its ``save_pretrained`` writes the stored (4.x) names back, so a
checkpoint saved by either line is the one built here. merge refused the classifier on 5.x (the fused parameters were
counted as missing from the output), and must write the stored names, which both lines load (5.x's ``mlp.gate`` is a
tensor 4.x does not read: its router would be initialized at random). Reference: the adapted PyTorch model (the
classifier trained with the adapter, unmerged) and PEFT's C3A. Tiny random models from configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors import safe_open

import bca_deploy as bd
from bca_deploy.config import task_spec_from_config
from bca_deploy.merge import merge_checkpoint

IDS = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(1))
_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, **_SMALL),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=48, decoder_sparse_step=1,
                                                     **_SMALL),
}
#: fp32: merged and unmerged differ by summation order only (~1e-7 of the largest logit here)
RTOL = 1e-5


def moe_checkpoint(arch: str, directory):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval().save_pretrained(directory)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def merged_classifier(out, stored: set[str]):
    """The merged checkpoint: the stored names (the causal LM's head left out, the classifier's added), loaded with
    nothing missing, unexpected or resized."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    assert written == (stored - {"lm_head.weight"}) | {"score.weight"}, sorted(written ^ stored)
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=RTOL * expected.abs().max().item())


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_classifier_adapter_merges_into_a_moe_checkpoint_under_its_stored_names(arch, tmp_path):
    stored = moe_checkpoint(arch, tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)  # a head that differs from any initialization
    bd.inject(model, ["q_proj", "v_proj"], block_size=8, init="normal", init_std=0.05, seed=0,
              modules_to_save=["score"])
    bd.adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["score"])
    bd.save_adapter(model, tmp_path / "adapter")
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    close(logits(merged_classifier(out, stored)), logits(model.eval()))


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_peft_classifier_on_a_moe_checkpoint_merges_to_pefts_numbers(arch, tmp_path):
    from peft import C3AConfig, get_peft_model

    stored = moe_checkpoint(arch, tmp_path / "base")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    peft_model = get_peft_model(base, C3AConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"],
                                                block_size=8))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.05 if "c3a_kernel" in name else 0.5)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = logits(copy.deepcopy(peft_model))
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "peft", 1.0)], tmp_path / "merged", progress=False)
    close(logits(merged_classifier(out, stored)), expected)
