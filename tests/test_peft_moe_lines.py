"""A PEFT C3A adapter of a Qwen2-MoE model made with transformers 5.x, applied on either line.

On 5.x the routed experts are fused 3-D parameters, so ``target_modules=["q_proj", "gate_proj"]`` adapts ``q_proj``
and the shared expert's ``gate_proj`` alone, and the file holds those kernels. On 4.x the same rules select every
routed expert's ``gate_proj`` as well, and ``PeftModel.from_pretrained`` gives each a new random kernel (a "missing
adapter keys" warning): PEFT's numbers there are not the trained adapter's. bca-deploy refuses it on 4.x (load and
merge, nothing written), in one line naming the experts, the line the adapter was made with and the way out (it listed
one line per expert saying to fix layers_to_transform); on 5.x it gives PEFT's numbers. The file is the one PEFT on 5.x
writes: built here with the shared expert named by its longer path (the same kernels on either line), then
``target_modules`` as the user gave it. Tiny random models from configs.
"""

from __future__ import annotations

import json
import warnings

import torch
import transformers
from peft import C3AConfig, PeftModel, get_peft_model

from bca_deploy.models import load_model
from line_helpers import load_and_merge_refusals
from test_merge_moe import CONFIGS, IDS, close

FIVE = int(transformers.__version__.split(".")[0]) >= 5


def five_x_adapter(tmp_path):
    """The base checkpoint and the adapter PEFT on transformers 5.x saves for q_proj, gate_proj (non-zero kernels)."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]()).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft = get_peft_model(model, C3AConfig(target_modules=["q_proj", "shared_expert.gate_proj"], block_size=8,
                                           init_weights="xavier_uniform"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = ["q_proj", "gate_proj"]
    path.write_text(json.dumps(config))
    return tmp_path / "base", tmp_path / "adapter"


def pefts(base, adapter):
    """PEFT's model of the adapter, and the paths it gave a kernel the file lacks (a new random one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    said = " ".join(str(w.message) for w in caught if "missing adapter keys" in str(w.message))
    return model, said


def test_a_5x_peft_moe_adapter_gives_pefts_numbers_on_5x_and_is_refused_on_4x_naming_the_line(tmp_path):
    base, adapter = five_x_adapter(tmp_path)
    peft, missing = pefts(base, adapter)
    if FIVE:
        assert not missing, missing
        ours = load_model(base, [adapter]).eval()
        with torch.no_grad():
            close(ours(input_ids=IDS).logits, peft(input_ids=IDS).logits)
        return
    # PEFT on 4.x: every routed expert's gate_proj adapted with a kernel the file does not hold
    assert "mlp.experts.0.gate_proj" in missing and "shared_expert" not in missing, missing
    for what, message in load_and_merge_refusals(base, adapter, tmp_path / "merged").items():
        for needle in ("8 modules (model.layers.0.mlp.experts.0.gate_proj", "routed experts' Linears the config "
                       "adapts (target_modules ['gate_proj', 'q_proj'])", "only for other layers of those names "
                       "(model.layers.0.mlp.shared_expert.gate_proj", "made with transformers 5.x, which fuses the "
                       "routed experts", "apply the adapter with transformers 5.x, or name the trained modules in "
                       "target_modules by paths no expert's ends with (shared_expert.gate_proj)"):
            assert needle in message, (what, needle, message)
        assert message.count("experts.") < 12, message  # one line for the experts, not one per expert
