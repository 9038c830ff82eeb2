"""Train with PEFT's C3A, serve with bca-deploy (and back), with identical outputs.

Run: python examples/peft_interop.py  (needs `pip install peft`; tiny random Llama, nothing downloaded)
"""

from __future__ import annotations

import tempfile

import torch
from peft import C3AConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import bca_deploy as bd


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=256)
    return LlamaForCausalLM(config).eval()


ids = torch.randint(0, 256, (1, 12))
peft_model = get_peft_model(base_model(), C3AConfig(block_size=16, target_modules=["q_proj", "v_proj"],
                                                    init_weights="xavier_uniform")).eval()
with tempfile.TemporaryDirectory() as tmp:
    peft_model.save_pretrained(f"{tmp}/peft-c3a")
    ours = bd.load_adapter(base_model(), f"{tmp}/peft-c3a")          # PEFT directory, read directly
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    print(f"PEFT C3A -> bca-deploy: max |logit diff| = {diff:.2e}")

    bd.save_adapter(ours, f"{tmp}/back", format="peft")                # and back to PEFT's format
    again = PeftModel.from_pretrained(base_model(), f"{tmp}/back").eval()
    with torch.no_grad():
        diff = (again(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    print(f"bca-deploy -> PEFT C3A: max |logit diff| = {diff:.2e}")
