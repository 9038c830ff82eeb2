"""Targets naming a mixture of experts' per-expert Linears (Qwen2-MoE's and Qwen3-MoE's ``gate_proj``/``up_proj``/
``down_proj``) on either transformers line.

transformers 4.x has one Linear per expert; 5.x fuses the routed experts into 3-D parameters (``experts.gate_up_proj``,
``experts.down_proj``) and keeps Linears of those names only outside them (Qwen2-MoE's shared expert, DeepSeek's dense
layers). So the same targets adapt every expert on 4.x and the shared expert alone on 5.x: ``inject`` (and ``train``,
whose note is the same rule) said nothing of it, because each entry matched something. The reference for what is
adapted is PEFT's C3A (``get_peft_model`` with the same targets), which adapts the same modules on each line without a
word; bca-deploy adapts exactly those and now names the experts it leaves out (5.x), or, where nothing else matches,
refuses saying why. The adapter applies alike on both lines (it records the paths it adapts; one made with 4.x's
experts is refused on 5.x, ``tests/test_fit_transformers_lines.py``). Tiny random models from configs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from peft import C3AConfig, get_peft_model

import bca_deploy as bd
from bca_deploy.errors import TargetModuleError
from bca_deploy.inject import UnmatchedTargetsWarning
from test_merge_moe import _SMALL, CONFIGS

FIVE = int(transformers.__version__.split(".")[0]) >= 5
QWEN3 = lambda: transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, head_dim=8, **_SMALL)  # noqa: E731


def peft_paths(model, targets) -> set[str]:
    """The modules PEFT's C3A adapts for ``targets`` (in a copy of ``model``); raises where PEFT refuses."""
    peft = get_peft_model(copy.deepcopy(model), C3AConfig(target_modules=targets, block_size=8))
    return {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "c3a_kernel")}


def injected(model, targets) -> tuple[set[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bd.inject(model, targets, block_size=8)
    return ({n for n, _ in bd.bca_layers(model)},
            [str(w.message) for w in caught if issubclass(w.category, UnmatchedTargetsWarning)])


@pytest.mark.parametrize("targets", [["q_proj", "gate_proj", "up_proj", "down_proj"], r".*\.(q_proj|gate_proj)"])
def test_qwen2_moe_expert_targets_say_on_5x_that_the_routed_experts_are_left_out(targets):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]())
    expected = peft_paths(model, targets)
    adapted, said = injected(model, targets)
    assert adapted == expected, sorted(adapted ^ expected)
    if not FIVE:  # every expert a Linear: adapted, nothing to say
        assert "model.layers.1.mlp.experts.3.gate_proj" in adapted and not said, said
        return
    assert not any(".experts." in a for a in adapted) and "model.layers.1.mlp.shared_expert.gate_proj" in adapted
    assert len(said) == 1, said
    entries = ", ".join(targets[1:]) if isinstance(targets, list) else targets
    for needle in (f"target_modules {entries} adapted ", " layers of Qwen2MoeForCausalLM (",
                   "and none of its routed experts: transformers 5.", "fuses the experts of Qwen2MoeForCausalLM into "
                   "3-D parameters (experts.gate_up_proj", "transformers 4.x adapts every expert's Linear as well for "
                   "the same target_modules", "shared_expert.gate_proj"):
        assert needle in said[0], (needle, said[0])


def test_qwen2_moe_targets_by_paths_no_expert_ends_with_say_nothing():
    """The way out the warning gives: the shared expert named by a longer path adapts the same layers, silently."""
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2_moe"]())
    targets = ["q_proj", "shared_expert.gate_proj"]
    expected = peft_paths(model, targets)
    adapted, said = injected(model, targets)
    assert adapted == expected and not said, said


def test_qwen3_moe_expert_targets_alone_are_refused_on_5x_saying_the_experts_are_fused():
    """Qwen3-MoE has no Linear of those names outside its experts: on 5.x nothing matches (PEFT refuses too) and the
    refusal listed the Linear names only; it now says why the named ones are absent. On 4.x both adapt the experts."""
    model = transformers.AutoModelForCausalLM.from_config(QWEN3())
    targets = ["gate_proj", "up_proj"]
    if not FIVE:
        expected = peft_paths(model, targets)
        adapted, said = injected(model, targets)
        assert adapted == expected and len(adapted) == 16 and not said, said
        return
    with pytest.raises(ValueError):
        peft_paths(model, targets)
    with pytest.raises(TargetModuleError) as caught:
        bd.inject(model, targets, block_size=8)
    message = str(caught.value)
    assert "matched no module of this Qwen3MoeForCausalLM" in message and "gate_proj, up_proj: transformers 5." in \
        message and "fuses the experts of Qwen3MoeForCausalLM into 3-D parameters (experts.gate_up_proj" in message, \
        message
    assert not list(bd.bca_layers(model))  # refused before the model changed
